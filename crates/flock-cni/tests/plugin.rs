//! The real `flock` binary against real listeners on unix sockets in temp
//! dirs: the in-process agent server with a canned handler, the real
//! `flock-agent` binary before its runtime is ready, and raw listeners that
//! misbehave on purpose.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flock_agent::handler::{FnHandler, HandlerSlot};
use flock_agent::server::{Limits, Server};
use flock_proto::rpc::{Op, Request, Response};
use flock_proto::{CniError, CniResult, CniVersion, ErrorCode};
use serde_json::Value;

const FLOCK: &str = env!("CARGO_BIN_EXE_flock");

/// What one run of the plugin did.
struct Run {
    stdout: String,
    success: bool,
    elapsed: Duration,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout {:?}: {e}", self.stdout))
    }

    /// The CNI error printed on stdout, checking the exit status too.
    fn error(&self) -> CniError {
        assert!(!self.success, "expected failure, stdout {:?}", self.stdout);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout {:?}: {e}", self.stdout))
    }
}

/// Runs the plugin with exactly `env` (plus the socket override) and `stdin`.
fn flock(socket: &Path, env: &[(&str, &str)], stdin: &str) -> Run {
    let mut child = Command::new(FLOCK)
        .env_clear()
        .env("FLOCK_AGENT_SOCKET", socket)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn flock");
    let started = Instant::now();
    // A plugin may exit before reading all of stdin (the runtime ignores
    // the broken pipe too); what counts is what it printed.
    if let Err(e) = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
    {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    let out = child.wait_with_output().expect("flock runs");
    Run {
        stdout: String::from_utf8(out.stdout).expect("utf8 stdout"),
        success: out.status.success(),
        elapsed: started.elapsed(),
    }
}

fn conf(version: &str) -> String {
    format!(r#"{{"cniVersion":"{version}","name":"k8s-pod-network","type":"flock"}}"#)
}

const ADD_ENV: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "c0ffee"),
    ("CNI_NETNS", "/var/run/netns/cni-1234"),
    ("CNI_IFNAME", "eth0"),
    (
        "CNI_ARGS",
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0",
    ),
    ("CNI_PATH", "/opt/cni/bin"),
];

fn with_command(command: &str) -> Vec<(&str, &str)> {
    let mut env = ADD_ENV.to_vec();
    env[0] = ("CNI_COMMAND", command);
    env
}

fn canned_result() -> CniResult {
    serde_json::from_str(include_str!(
        "../../flock-proto/tests/golden/result-1.1.0.json"
    ))
    .expect("golden result")
}

/// The agent's server in process, with a handler that answers ADD with a
/// canned result, fails for container `fail`, and records every request.
/// Dropping it drops the runtime, which stops the server, then the temp dir.
struct TestAgent {
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl TestAgent {
    fn start() -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("flock.sock");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let handler = FnHandler(move |req: Request| {
            record.lock().expect("lock").push(req.clone());
            async move {
                if req.container_id == "fail" {
                    return Response::Error(
                        CniError::new(ErrorCode::INVALID_NETWORK_CONFIG, "pod default/web-0: annotation flock.fritzlab.net/ipv4: \"maybe\" is not true or false")
                            .with_details("from the canned handler"),
                    );
                }
                match req.op {
                    Op::Add => Response::Result(canned_result()),
                    _ => Response::Done {},
                }
            }
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = {
            let _guard = runtime.enter();
            Server::bind(&socket, HandlerSlot::new(handler), Limits::default()).expect("bind")
        };
        runtime.spawn(server.run(std::future::pending()));
        TestAgent {
            _runtime: runtime,
            _dir: dir,
            socket,
            seen,
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.seen.lock().expect("lock").clone()
    }
}

#[test]
fn help_is_a_usage_text_for_people() {
    let out = Command::new(FLOCK)
        .arg("--help")
        .output()
        .expect("flock --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("USAGE") && text.contains("flock lab") && text.contains("CNI_COMMAND"),
        "{text}"
    );
    // A runtime (no terminal) without CNI_COMMAND still gets a CNI error.
    let run = flock(Path::new("/nonexistent.sock"), &[], "");
    assert!(!run.success);
    assert!(run.json().get("code").is_some(), "{}", run.stdout);
}

#[test]
fn version_is_answered_by_the_plugin_alone() {
    let nowhere = Path::new("/nonexistent/flock.sock");
    let run = flock(
        nowhere,
        &[("CNI_COMMAND", "VERSION")],
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(run.success);
    assert_eq!(
        run.json(),
        serde_json::json!({"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]})
    );
    // libcni's probe: dummy values everywhere, and no config at all.
    let probe = [
        ("CNI_COMMAND", "VERSION"),
        ("CNI_NETNS", "dummy"),
        ("CNI_IFNAME", "dummy"),
        ("CNI_PATH", "dummy"),
    ];
    let run = flock(nowhere, &probe, "");
    assert!(run.success);
    assert_eq!(run.json()["cniVersion"], "1.1.0");
    assert_eq!(
        run.json()["supportedVersions"].as_array().map(Vec::len),
        Some(3)
    );
}

#[test]
fn add_prints_the_agents_result_in_the_configs_version() {
    let agent = TestAgent::start();
    for version in CniVersion::ALL {
        let run = flock(&agent.socket, ADD_ENV, &conf(version.as_str()));
        assert!(run.success, "{version}: {}", run.stdout);
        let expected = serde_json::to_value(canned_result().to_version(version)).expect("json");
        assert_eq!(run.json(), expected, "{version}");
        assert_eq!(run.stdout.lines().count(), 1, "one JSON document");
        let has_ip_versions = run.json()["ips"][0].get("version").is_some();
        assert_eq!(has_ip_versions, version == CniVersion::V0_4_0, "{version}");
    }
    let req = agent.requests().pop().expect("a request reached the agent");
    assert_eq!(req.op, Op::Add);
    assert_eq!(req.container_id, "c0ffee");
    assert_eq!(req.netns, "/var/run/netns/cni-1234");
    assert_eq!(req.if_name, "eth0");
    assert_eq!(
        req.args,
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"
    );
    assert_eq!(req.path, "/opt/cni/bin");
    assert_eq!(req.config.name, "k8s-pod-network");
}

#[test]
fn del_check_status_and_gc_succeed_with_empty_stdout() {
    let agent = TestAgent::start();
    for op in ["DEL", "CHECK"] {
        let run = flock(&agent.socket, &with_command(op), &conf("1.0.0"));
        assert!(
            run.success && run.stdout.is_empty(),
            "{op}: {:?}",
            run.stdout
        );
    }
    // DEL may come without a netns (the sandbox is already gone).
    let mut del = with_command("DEL");
    del.retain(|(k, _)| *k != "CNI_NETNS");
    assert!(flock(&agent.socket, &del, &conf("0.4.0")).success);

    let gc_conf = r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"flock",
        "cni.dev/valid-attachments":[{"containerID":"keep","ifname":"eth0"}]}"#;
    let gc = flock(
        &agent.socket,
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        gc_conf,
    );
    assert!(gc.success && gc.stdout.is_empty(), "{:?}", gc.stdout);
    let status = flock(&agent.socket, &[("CNI_COMMAND", "STATUS")], &conf("1.1.0"));
    assert!(
        status.success && status.stdout.is_empty(),
        "{:?}",
        status.stdout
    );

    let ops: Vec<Op> = agent.requests().iter().map(|r| r.op).collect();
    assert_eq!(ops, [Op::Del, Op::Check, Op::Del, Op::Gc, Op::Status]);
    let gc = &agent.requests()[3];
    let valid = gc
        .config
        .gc_valid_attachments()
        .expect("attachments forwarded");
    assert_eq!(valid[0].container_id, "keep");
}

#[test]
fn gc_and_status_need_a_1_1_0_config() {
    let agent = TestAgent::start();
    for op in ["GC", "STATUS"] {
        let err = flock(&agent.socket, &[("CNI_COMMAND", op)], &conf("1.0.0")).error();
        assert_eq!(err.code, ErrorCode::INCOMPATIBLE_VERSION, "{op}");
        assert!(err.msg.contains("1.1.0"), "{}", err.msg);
    }
    assert!(
        agent.requests().is_empty(),
        "refused before reaching the agent"
    );
}

#[test]
fn agent_errors_are_printed_with_the_configs_version() {
    let agent = TestAgent::start();
    let mut env = ADD_ENV.to_vec();
    env[1] = ("CNI_CONTAINERID", "fail");
    let err = flock(&agent.socket, &env, &conf("0.4.0")).error();
    assert_eq!(err.code, ErrorCode::INVALID_NETWORK_CONFIG);
    assert_eq!(err.cni_version.as_deref(), Some("0.4.0"));
    assert!(err.msg.contains("flock.fritzlab.net/ipv4"), "{}", err.msg);
    assert_eq!(err.details.as_deref(), Some("from the canned handler"));
}

#[test]
fn a_bad_environment_is_code_4_naming_the_variable() {
    let agent = TestAgent::start();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![], "CNI_COMMAND"),
        (with_command("FROB"), "FROB"),
        (
            ADD_ENV
                .iter()
                .copied()
                .filter(|(k, _)| *k != "CNI_NETNS")
                .collect(),
            "CNI_NETNS",
        ),
        (
            ADD_ENV
                .iter()
                .copied()
                .filter(|(k, _)| *k != "CNI_IFNAME")
                .collect(),
            "CNI_IFNAME",
        ),
        (
            ADD_ENV
                .iter()
                .map(|&(k, v)| {
                    if k == "CNI_CONTAINERID" {
                        (k, "")
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            "CNI_CONTAINERID",
        ),
        (
            ADD_ENV
                .iter()
                .map(|&(k, v)| {
                    if k == "CNI_CONTAINERID" {
                        (k, "-bad id")
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            "CNI_CONTAINERID",
        ),
        (
            ADD_ENV
                .iter()
                .map(|&(k, v)| {
                    if k == "CNI_IFNAME" {
                        (k, "much-too-long-ifname")
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            "CNI_IFNAME",
        ),
        (
            with_command("CHECK")
                .into_iter()
                .filter(|(k, _)| *k != "CNI_NETNS")
                .collect(),
            "CNI_NETNS",
        ),
    ];
    for (env, named) in cases {
        let err = flock(&agent.socket, &env, &conf("1.0.0")).error();
        assert_eq!(err.code, ErrorCode::INVALID_ENVIRONMENT, "{env:?}");
        assert!(err.msg.contains(named), "{named} in {:?}", err.msg);
    }
    assert!(agent.requests().is_empty());
}

#[test]
fn bad_config_json_and_versions_get_the_specs_codes() {
    let agent = TestAgent::start();
    let cases = [
        ("{", ErrorCode::DECODING_FAILURE),
        ("", ErrorCode::DECODING_FAILURE),
        ("[]", ErrorCode::DECODING_FAILURE),
        (
            r#"{"name":"n","type":"flock"}"#,
            ErrorCode::INCOMPATIBLE_VERSION,
        ),
        (
            r#"{"cniVersion":"0.3.1","name":"n","type":"flock"}"#,
            ErrorCode::INCOMPATIBLE_VERSION,
        ),
        (
            r#"{"cniVersion":"1.2.0","name":"n","type":"flock"}"#,
            ErrorCode::INCOMPATIBLE_VERSION,
        ),
        (
            r#"{"cniVersion":"1.0.0","type":"flock"}"#,
            ErrorCode::INVALID_NETWORK_CONFIG,
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"bad name","type":"flock"}"#,
            ErrorCode::INVALID_NETWORK_CONFIG,
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"n","type":"flock","agentSocket":""}"#,
            ErrorCode::INVALID_NETWORK_CONFIG,
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"n","type":"flock","prevResult":{"ips":[{"address":"nope"}]}}"#,
            ErrorCode::DECODING_FAILURE,
        ),
    ];
    for (stdin, code) in cases {
        let err = flock(&agent.socket, ADD_ENV, stdin).error();
        assert_eq!(err.code, code, "{stdin:?}: {err}");
    }
    let huge = format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"flock","pad":"{}"}}"#,
        "x".repeat(flock_proto::rpc::MAX_FRAME_BYTES)
    );
    let err = flock(&agent.socket, ADD_ENV, &huge).error();
    assert_eq!(err.code, ErrorCode::INVALID_NETWORK_CONFIG);
    assert!(agent.requests().is_empty());
}

#[test]
fn the_configs_agent_socket_is_used_when_the_environment_does_not_override_it() {
    let agent = TestAgent::start();
    let stdin = format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"flock","agentSocket":"{}"}}"#,
        agent.socket.display()
    );
    let env: Vec<_> = with_command("DEL")
        .into_iter()
        .chain([("FLOCK_AGENT_SOCKET", "")])
        .collect();
    let run = flock(Path::new(""), &env, &stdin);
    assert!(run.success, "{}", run.stdout);
    assert_eq!(agent.requests().len(), 1);
}

#[test]
fn an_unreachable_agent_is_try_again_later_naming_the_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.sock");
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).expect("bind"));
    for socket in [&missing, &stale] {
        let err = flock(socket, ADD_ENV, &conf("1.1.0")).error();
        assert_eq!(err.code, ErrorCode::TRY_AGAIN_LATER);
        assert!(
            err.msg.contains(&socket.display().to_string()),
            "{}",
            err.msg
        );
        assert_eq!(err.cni_version.as_deref(), Some("1.1.0"));
    }
    // The default socket is named when nothing overrides it.
    let err = flock(Path::new(""), ADD_ENV, &conf("1.1.0")).error();
    assert!(err.msg.contains("/run/flock/flock.sock"), "{}", err.msg);
}

/// A listener whose backlog is full: a further connect blocks in the kernel.
#[test]
fn a_connect_that_blocks_gives_up_after_two_seconds() {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("full.sock");
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    bind(fd.as_raw_fd(), &UnixAddr::new(&path).expect("addr")).expect("bind");
    listen(&fd, Backlog::new(0).expect("backlog")).expect("listen");
    // Backlog 0 admits one pending connection; the plugin's is the next.
    let _pending = UnixStream::connect(&path).expect("first connect fits");
    let run = flock(&path, ADD_ENV, &conf("1.1.0"));
    let err = run.error();
    assert_eq!(err.code, ErrorCode::TRY_AGAIN_LATER);
    assert!(err.msg.contains("timed out"), "{}", err.msg);
    assert!(
        run.elapsed >= Duration::from_millis(1900) && run.elapsed < Duration::from_secs(4),
        "{:?}",
        run.elapsed
    );
}

/// A listener that accepts, reads the request, and then misbehaves.
fn misbehaving_agent(path: &Path, reply: Option<&'static [u8]>) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let mut stream = stream.expect("accept");
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .expect("request");
            match reply {
                Some(bytes) => {
                    let _ = stream.write_all(bytes);
                }
                None => held.push(stream),
            }
        }
    })
}

#[test]
fn a_silent_agent_is_bounded_by_the_read_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("silent.sock");
    let _agent = misbehaving_agent(&path, None);
    let add = {
        let path = path.clone();
        std::thread::spawn(move || flock(&path, ADD_ENV, &conf("1.1.0")))
    };
    let status = flock(&path, &[("CNI_COMMAND", "STATUS")], &conf("1.1.0"));
    let err = status.error();
    assert_eq!(err.code, ErrorCode::TRY_AGAIN_LATER);
    assert!(
        err.msg.contains("did not answer STATUS within 5s"),
        "{}",
        err.msg
    );
    assert!(status.elapsed >= Duration::from_secs(5) && status.elapsed < Duration::from_secs(7));

    let add = add.join().expect("ADD thread");
    let err = add.error();
    assert_eq!(err.code, ErrorCode::TRY_AGAIN_LATER);
    assert!(
        err.msg.contains("did not answer ADD within 30s"),
        "{}",
        err.msg
    );
    assert!(add.elapsed >= Duration::from_secs(30) && add.elapsed < Duration::from_secs(33));
}

#[test]
fn an_agent_that_hangs_up_or_answers_garbage_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hangs_up = dir.path().join("hangs-up.sock");
    let _a = misbehaving_agent(&hangs_up, Some(b""));
    let err = flock(&hangs_up, ADD_ENV, &conf("1.1.0")).error();
    assert_eq!(err.code, ErrorCode::TRY_AGAIN_LATER);
    assert!(err.msg.contains("hangs-up.sock"), "{}", err.msg);

    let garbage = dir.path().join("garbage.sock");
    let _b = misbehaving_agent(&garbage, Some(b"HTTP/1.1 400 Bad Request\r\n\r\n\n"));
    let err = flock(&garbage, ADD_ENV, &conf("1.1.0")).error();
    assert_eq!(err.code, ErrorCode::AGENT_PROTOCOL);

    // A bare success is not an answer to ADD, and a result is not one to DEL.
    let done = dir.path().join("done.sock");
    let _c = misbehaving_agent(&done, Some(b"{\"done\":{}}\n"));
    assert_eq!(
        flock(&done, ADD_ENV, &conf("1.1.0")).error().code,
        ErrorCode::AGENT_PROTOCOL
    );
}

/// The real agent binary before its runtime exists.
struct AgentProcess {
    child: Child,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    /// Dropped after the agent is killed.
    _ns: flock_testkit::NetnsGuard,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_binary() -> PathBuf {
    let path = Path::new(FLOCK).with_file_name("flock-agent");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

fn start_agent_binary() -> AgentProcess {
    // In a namespace of its own: the agent opens netlink and looks at the
    // node's links from its first instant.
    let ns = flock_testkit::NetnsGuard::new("cni");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/flock.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(agent_binary())
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--node", "node-a", "--log-format", "json"])
        .arg("--datastore")
        .arg(format!("dir:{}", dir.path().join("manifests").display()))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn flock-agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "agent socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    AgentProcess {
        child,
        _dir: dir,
        socket,
        _ns: ns,
    }
}

#[test]
fn a_not_ready_agent_refuses_add_status_and_gc_and_serves_del_and_check() {
    let agent = start_agent_binary();
    let err = flock(&agent.socket, ADD_ENV, &conf("1.1.0")).error();
    assert_eq!(err.code, ErrorCode::TRY_AGAIN_LATER);
    assert!(err.msg.starts_with("agent not ready: "), "{}", err.msg);
    assert!(err.msg.contains("node-a"), "{}", err.msg);

    // DEL and CHECK are served from the store before any NodeConfig: an
    // unknown container's DEL succeeds, its CHECK says it is unknown.
    let run = flock(&agent.socket, &with_command("DEL"), &conf("1.1.0"));
    assert!(
        run.success && run.stdout.is_empty(),
        "DEL: {:?}",
        run.stdout
    );
    let err = flock(&agent.socket, &with_command("CHECK"), &conf("1.1.0")).error();
    assert_eq!(err.code, ErrorCode::UNKNOWN_CONTAINER, "{}", err.msg);
    let err = flock(&agent.socket, &[("CNI_COMMAND", "STATUS")], &conf("1.1.0")).error();
    assert_eq!(err.code, ErrorCode::PLUGIN_NOT_AVAILABLE);
    assert!(err.msg.starts_with("agent not ready: "), "{}", err.msg);
    let err = flock(&agent.socket, &[("CNI_COMMAND", "GC")], &conf("1.1.0")).error();
    assert_eq!(err.code, ErrorCode::TRY_AGAIN_LATER);
}
