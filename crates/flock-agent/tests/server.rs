//! The RPC server in process: framing errors, deadlines, parallelism,
//! handler swaps, shutdown and socket setup, over a real unix socket.

use std::io::{BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flock_agent::handler::{FnHandler, Handler, HandlerSlot, NotReady};
use flock_agent::server::{BindError, Limits, Server};
use flock_proto::rpc::{self, Op, Request, Response};
use flock_proto::{CniResult, ErrorCode, NetConf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Running {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    done: JoinHandle<()>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().expect("stopped once").send(());
        (&mut self.done).await.expect("server task");
    }
}

fn start_with(slot: HandlerSlot, limits: Limits) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("run/flock.sock");
    let server = Server::bind(&socket, slot, limits).expect("bind");
    let (stop, stopped) = oneshot::channel();
    let done = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Running {
        _dir: dir,
        socket,
        stop: Some(stop),
        done,
    }
}

fn start(handler: impl Handler) -> Running {
    start_with(HandlerSlot::new(handler), Limits::default())
}

fn request(op: Op, container_id: &str) -> Request {
    Request {
        op,
        container_id: container_id.into(),
        netns: "/var/run/netns/test".into(),
        if_name: "eth0".into(),
        args: String::new(),
        path: String::new(),
        config: NetConf::parse(br#"{"cniVersion":"1.1.0","name":"net","type":"flock"}"#)
            .expect("config"),
    }
}

/// Sends raw bytes (a request line, or garbage) and reads one response.
async fn send_raw(socket: &Path, bytes: Vec<u8>) -> Response {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut stream = UnixStream::connect(&socket).expect("connect");
        // An oversized request is cut off by the server; the write may fail then.
        let _ = stream.write_all(&bytes);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let frame = rpc::read_frame(&mut BufReader::new(stream), rpc::MAX_FRAME_BYTES)
            .expect("a response frame");
        serde_json::from_slice(&frame).expect("a response")
    })
    .await
    .expect("client thread")
}

async fn call(socket: &Path, req: &Request) -> Response {
    send_raw(socket, rpc::encode(req)).await
}

fn echo_container() -> impl Handler {
    FnHandler(|req: Request| async move {
        if req.op == Op::Add {
            Response::Result(CniResult {
                cni_version: Some(req.container_id),
                ..CniResult::default()
            })
        } else {
            Response::Done {}
        }
    })
}

fn error_code(response: &Response) -> ErrorCode {
    match response {
        Response::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_errors_and_the_server_keeps_serving() {
    let agent = start(echo_container());
    for garbage in [
        &b"not json\n"[..],
        b"{\"op\":\"ADD\"}\n",
        b"{\"op\":\"FLY\",\"config\":{}}\n",
        b"[1,2]\n",
    ] {
        let response = send_raw(&agent.socket, garbage.to_vec()).await;
        assert_eq!(
            error_code(&response),
            ErrorCode::DECODING_FAILURE,
            "{garbage:?}"
        );
    }
    let truncated = send_raw(&agent.socket, b"{\"op\":\"A".to_vec()).await;
    match &truncated {
        Response::Error(e) => assert!(e.msg.contains("middle"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        call(&agent.socket, &request(Op::Del, "c1")).await,
        Response::Done {}
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_without_reading_it_all() {
    let agent = start(echo_container());
    let huge = vec![b'a'; rpc::MAX_FRAME_BYTES + 1024 * 1024];
    let response = send_raw(&agent.socket, huge).await;
    match &response {
        Response::Error(e) => {
            assert_eq!(e.code, ErrorCode::DECODING_FAILURE);
            assert!(e.msg.contains("larger than"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // A request of nearly the limit is still served.
    let mut big = request(Op::Add, "big");
    big.args = "x".repeat(rpc::MAX_FRAME_BYTES - 4096);
    match call(&agent.socket, &big).await {
        Response::Result(r) => assert_eq!(r.cni_version.as_deref(), Some("big")),
        other => panic!("{other:?}"),
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_times_out_without_holding_up_others() {
    let limits = Limits {
        request_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let agent = start_with(HandlerSlot::new(echo_container()), limits);
    let socket = agent.socket.clone();
    let silent = tokio::task::spawn_blocking(move || {
        let stream = UnixStream::connect(&socket).expect("connect");
        let started = Instant::now();
        let frame = rpc::read_frame(&mut BufReader::new(stream), 4096).expect("response");
        (
            started.elapsed(),
            serde_json::from_slice::<Response>(&frame).expect("json"),
        )
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    assert_eq!(
        call(&agent.socket, &request(Op::Check, "c")).await,
        Response::Done {}
    );
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "served while a client sat silent"
    );
    let (waited, response) = silent.await.expect("silent client");
    assert_eq!(error_code(&response), ErrorCode::DECODING_FAILURE);
    assert!(
        waited >= Duration::from_millis(200),
        "cut off after the read timeout, not before"
    );
    agent.stop().await;
}

fn short_deadline(_: Op) -> Duration {
    Duration::from_millis(200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_is_answered_with_try_again_at_its_deadline() {
    let limits = Limits {
        deadline: short_deadline,
        ..Limits::default()
    };
    let handler = FnHandler(|_req: Request| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Response::Done {}
    });
    let agent = start_with(HandlerSlot::new(handler), limits);
    let started = Instant::now();
    let response = call(&agent.socket, &request(Op::Add, "slow")).await;
    assert_eq!(error_code(&response), ErrorCode::TRY_AGAIN_LATER);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // Not stopped: shutdown would wait for the sleeping handler to finish.
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_an_internal_error_not_a_dead_agent() {
    let handler = FnHandler(|req: Request| async move {
        assert!(req.container_id != "boom", "handler bug");
        Response::Done {}
    });
    let agent = start(handler);
    let response = call(&agent.socket, &request(Op::Del, "boom")).await;
    assert_eq!(error_code(&response), ErrorCode::AGENT_INTERNAL);
    assert_eq!(
        call(&agent.socket, &request(Op::Del, "fine")).await,
        Response::Done {}
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_different_containers_run_in_parallel() {
    let handler = FnHandler(|req: Request| async move {
        if req.container_id == "slow" {
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
        Response::Done {}
    });
    let agent = start(handler);
    let socket = agent.socket.clone();
    let slow = tokio::spawn(async move { call(&socket, &request(Op::Del, "slow")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    assert_eq!(
        call(&agent.socket, &request(Op::Del, "fast")).await,
        Response::Done {}
    );
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.await.expect("slow call"), Response::Done {});
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swapped_handler_serves_the_next_request() {
    let slot = HandlerSlot::new(NotReady::new("starting"));
    let agent = start_with(slot.clone(), Limits::default());
    let response = call(&agent.socket, &request(Op::Add, "c1")).await;
    assert_eq!(error_code(&response), ErrorCode::TRY_AGAIN_LATER);
    slot.swap(echo_container());
    match call(&agent.socket, &request(Op::Add, "c1")).await {
        Response::Result(r) => assert_eq!(r.cni_version.as_deref(), Some("c1")),
        other => panic!("{other:?}"),
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_requests_and_removes_the_socket() {
    let handler = FnHandler(|_req: Request| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        Response::Done {}
    });
    let agent = start(handler);
    let socket = agent.socket.clone();
    let in_flight = tokio::spawn({
        let socket = socket.clone();
        async move { call(&socket, &request(Op::Del, "c1")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = tokio::spawn(agent.stop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !socket.exists(),
        "socket removed as soon as accepting stops"
    );
    assert!(UnixStream::connect(&socket).is_err(), "no new connections");
    assert!(
        !stopped.is_finished(),
        "shutdown waits for the in-flight request"
    );
    assert_eq!(in_flight.await.expect("client"), Response::Done {});
    stopped.await.expect("server stopped");
}

#[tokio::test]
async fn bind_creates_the_directory_and_a_0600_socket() {
    let agent = start(echo_container());
    let mode = std::fs::metadata(&agent.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(agent.socket.parent().expect("dir"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no staging files left: {leftovers:?}");
    agent.stop().await;
}

#[tokio::test]
async fn bind_replaces_a_stale_socket_and_refuses_a_live_one_or_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("flock.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).expect("stale socket"));
    assert!(path.exists(), "a dropped listener leaves its file");
    let slot = HandlerSlot::new(echo_container());
    let live = Server::bind(&path, slot.clone(), Limits::default()).expect("stale replaced");

    match Server::bind(&path, slot.clone(), Limits::default()) {
        Err(BindError::InUse { path: p }) => assert_eq!(p, path),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("a live socket must not be replaced"),
    }
    drop(live);

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").expect("file");
    match Server::bind(&file, slot, Limits::default()) {
        Err(e @ BindError::NotASocket { .. }) => assert!(e.to_string().contains("not-a-socket")),
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("a regular file must not be replaced"),
    }
    assert_eq!(std::fs::read(&file).expect("file"), b"keep me");
}
