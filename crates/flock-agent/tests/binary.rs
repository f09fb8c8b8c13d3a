//! The real `flock-agent` binary: flags, socket and state directory setup,
//! health endpoints, and a clean stop on SIGTERM and SIGINT. Each agent
//! runs in a network namespace of the test's own (it opens netlink and its
//! recovery looks at the node's links from the first instant).

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use flock_proto::rpc::{self, Op, Request, Response};
use flock_proto::{ErrorCode, NetConf};
use flock_testkit::NetnsGuard;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");

/// A running agent; killed by PID on drop if a test failed before stopping it.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    port: u16,
    ns: NetnsGuard,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The agent's command line inside `ns`; `node` None leaves `--node` to `NODE_NAME`.
fn command_for(
    ns: &NetnsGuard,
    dir: &Path,
    socket: &Path,
    port: u16,
    node: Option<&str>,
) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns.name()]).arg(AGENT);
    if let Some(node) = node {
        cmd.args(["--node", node]);
    }
    cmd.arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--log-format", "json"])
        .arg("--datastore")
        .arg(format!("dir:{}", dir.join("manifests").display()))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn command(ns: &NetnsGuard, dir: &Path, socket: &Path, port: u16) -> Command {
    command_for(ns, dir, socket, port, Some("node-a"))
}

fn start() -> Agent {
    let ns = NetnsGuard::new("bin");
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("nested/run/flock.sock");
    let port = free_port();
    let child = command(&ns, dir.path(), &socket, port)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    Agent {
        child,
        dir,
        socket,
        port,
        ns,
    }
}

fn call(socket: &Path, op: Op) -> Response {
    let request = Request {
        op,
        container_id: "c1".into(),
        netns: "/var/run/netns/x".into(),
        if_name: "eth0".into(),
        args: String::new(),
        path: String::new(),
        config: NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"flock"}"#)
            .expect("conf"),
    };
    let mut stream = UnixStream::connect(socket).expect("connect");
    rpc::write_frame(&mut stream, &request).expect("send");
    let frame = rpc::read_frame(&mut BufReader::new(stream), rpc::MAX_FRAME_BYTES).expect("frame");
    serde_json::from_slice(&frame).expect("response")
}

/// GET from the agent's loopback, inside its namespace.
fn http_get(ns: &NetnsGuard, port: u16, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let text = ns
        .netns()
        .spawn(move || {
            let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            stream.write_all(request.as_bytes()).expect("send");
            let mut text = String::new();
            stream.read_to_string(&mut text).expect("read");
            Ok(text)
        })
        .join()
        .expect("http thread")
        .expect("http");
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (status, body)
}

fn wait_for_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serves_not_ready_answers_and_health_then_stops_cleanly_on_sigterm() {
    let mut agent = start();
    let mode = |p: &Path| std::fs::metadata(p).expect("exists").permissions().mode() & 0o777;
    assert_eq!(mode(&agent.socket), 0o600, "socket is root-only");
    assert_eq!(
        mode(&agent.dir.path().join("state")),
        0o700,
        "state dir is private"
    );

    match call(&agent.socket, Op::Add) {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::TRY_AGAIN_LATER);
            assert!(e.msg.starts_with("agent not ready: "), "{}", e.msg);
        }
        other => panic!("{other:?}"),
    }
    // DEL and CHECK are served from the store before any NodeConfig: an
    // unknown container's DEL succeeds, its CHECK says it is unknown.
    assert_eq!(call(&agent.socket, Op::Del), Response::Done {});
    match call(&agent.socket, Op::Check) {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::UNKNOWN_CONTAINER, "{}", e.msg),
        other => panic!("{other:?}"),
    }
    match call(&agent.socket, Op::Status) {
        Response::Error(e) => assert_eq!(e.code, ErrorCode::PLUGIN_NOT_AVAILABLE),
        other => panic!("{other:?}"),
    }

    assert_eq!(
        http_get(&agent.ns, agent.port, "/healthz"),
        (200, "ok\n".into())
    );
    let (status, body) = http_get(&agent.ns, agent.port, "/readyz");
    assert_eq!(status, 503);
    assert!(
        body.starts_with("not ready: ") && body.contains("node-a"),
        "{body}"
    );

    kill(Pid::from_raw(agent.child.id() as i32), Signal::SIGTERM).expect("signal");
    let status = wait_for_exit(&mut agent.child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(!agent.socket.exists(), "socket removed on shutdown");
    let mut logs = String::new();
    agent
        .child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut logs)
        .expect("logs");
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?} is not JSON: {e}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["signal"] == "SIGTERM"),
        "shutdown logged: {logs}"
    );
}

#[test]
fn sigint_stops_it_too_and_a_restart_replaces_nothing_but_its_own_socket() {
    let mut agent = start();
    kill(Pid::from_raw(agent.child.id() as i32), Signal::SIGINT).expect("signal");
    assert!(wait_for_exit(&mut agent.child, Duration::from_secs(10)).success());

    // A crash leaves a stale socket; the next start replaces it.
    drop(std::os::unix::net::UnixListener::bind(&agent.socket).expect("stale"));
    let mut again = command(&agent.ns, agent.dir.path(), &agent.socket, agent.port)
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(stream) = UnixStream::connect(&agent.socket) {
            drop(stream);
            break;
        }
        assert!(Instant::now() < deadline, "restarted agent never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(call(&agent.socket, Op::Del), Response::Done {});
    kill(Pid::from_raw(again.id() as i32), Signal::SIGTERM).expect("signal");
    assert!(wait_for_exit(&mut again, Duration::from_secs(10)).success());
}

fn run_to_end(cmd: &mut Command) -> Output {
    cmd.output().expect("agent runs")
}

#[test]
fn bad_flags_and_a_foreign_file_at_the_socket_path_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let no_node = run_to_end(
        Command::new(AGENT)
            .env_remove("NODE_NAME")
            .args(["--socket", "/nonexistent/x.sock"]),
    );
    assert!(!no_node.status.success());
    assert!(String::from_utf8_lossy(&no_node.stderr).contains("--node"));

    let bad_ds = run_to_end(Command::new(AGENT).args(["--node", "n", "--datastore", "etcd:x"]));
    assert!(!bad_ds.status.success());
    assert!(String::from_utf8_lossy(&bad_ds.stderr).contains("etcd:x"));

    let ns = NetnsGuard::new("bin");
    let file = dir.path().join("flock.sock");
    std::fs::write(&file, b"not a socket").expect("file");
    let out = run_to_end(&mut command(&ns, dir.path(), &file, free_port()));
    assert!(!out.status.success());
    let logs = String::from_utf8_lossy(&out.stdout);
    assert!(
        logs.contains("not a socket") && logs.contains("flock.sock"),
        "{logs}"
    );
    assert_eq!(
        std::fs::read(&file).expect("file"),
        b"not a socket",
        "left untouched"
    );

    // NODE_NAME stands in for --node, as the DaemonSet passes it.
    let socket = dir.path().join("env.sock");
    let mut child = command_for(&ns, dir.path(), &socket, free_port(), None)
        .env("NODE_NAME", "from-env")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    match call(&socket, Op::Add) {
        Response::Error(e) => assert!(e.msg.contains("from-env"), "{}", e.msg),
        other => panic!("{other:?}"),
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("signal");
    assert!(wait_for_exit(&mut child, Duration::from_secs(10)).success());
}
