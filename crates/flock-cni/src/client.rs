//! One blocking request to the agent, bounded in time at every step.

use std::io::{self, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use flock_proto::rpc::{self, FrameError, Request, Response};
use flock_proto::{CniError, ErrorCode};

/// Where the agent listens unless the config's `agentSocket` says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/flock/flock.sock";

/// Environment variable that overrides the socket path (tests, debugging).
pub const SOCKET_ENV: &str = "FLOCK_AGENT_SOCKET";

/// How long connecting to the agent may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `request` to the agent at `socket` and returns its response.
/// Every failure to get one is code 11 ("try again later") naming the socket,
/// except an answer that is not a response at all (code 100).
pub fn call_agent(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<Response, CniError> {
    let unreachable = |what: String| {
        CniError::new(
            ErrorCode::TRY_AGAIN_LATER,
            format!("flock agent at {} {what}", socket.display()),
        )
    };
    let mut stream = connect(socket, CONNECT_TIMEOUT)
        .map_err(|e| unreachable(format!("is unreachable: {e}")))?;
    rpc::write_frame(&mut stream, request)
        .map_err(|e| unreachable(format!("did not take the {} request: {e}", request.op)))?;
    let deadline = Instant::now() + timeout;
    let mut reader = BufReader::new(DeadlineReader { stream, deadline });
    let frame = rpc::read_frame(&mut reader, rpc::MAX_FRAME_BYTES).map_err(|e| match e {
        FrameError::Io(e) if is_timeout(&e) => unreachable(format!(
            "did not answer {} within {}s",
            request.op,
            timeout.as_secs()
        )),
        other => unreachable(format!("failed while answering {}: {other}", request.op)),
    })?;
    serde_json::from_slice(&frame).map_err(|e| {
        CniError::new(
            ErrorCode::AGENT_PROTOCOL,
            format!(
                "flock agent at {} answered {} with something that is not a response",
                socket.display(),
                request.op
            ),
        )
        .with_details(e.to_string())
    })
}

/// Connects within `timeout`. A unix-socket connect blocks only when the
/// listener's backlog is full (an agent that stopped accepting); the
/// attempt runs on its own thread so the plugin can give up on it.
fn connect(socket: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let (tx, rx) = mpsc::channel();
    let path: PathBuf = socket.to_owned();
    thread::spawn(move || {
        // The receiver is gone only if we already gave up; nothing to report then.
        let _ = tx.send(UnixStream::connect(path));
    });
    match rx.recv_timeout(timeout) {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connect timed out after {}s", timeout.as_secs()),
        )),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    )
}

/// A stream whose reads share one overall deadline, so a peer that trickles
/// bytes cannot stretch the wait.
struct DeadlineReader {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for DeadlineReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}
