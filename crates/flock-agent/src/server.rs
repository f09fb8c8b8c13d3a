//! The unix-socket RPC server the plugin talks to.
//!
//! One connection carries one request and one response. Each connection runs
//! on its own task and each handler call on another, bounded by a deadline;
//! a malformed, oversized or slow request gets an error response and affects
//! no other connection.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flock_proto::rpc::{self, FrameError, Op, Request, Response};
use flock_proto::{CniError, ErrorCode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::handler::HandlerSlot;
use crate::metrics::Metrics;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The socket's directory could not be created.
    #[error("cannot create socket directory {dir}: {source}")]
    CreateDir {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Something that is not a socket sits at the path; it is left alone.
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The socket path.
        path: PathBuf,
    },
    /// Another process is serving on the socket.
    #[error("{path} is in use: another flock-agent is accepting connections there")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Binding, restricting or moving the socket into place failed.
    #[error("cannot {step} socket {path}: {source}")]
    Io {
        /// Which step failed.
        step: &'static str,
        /// The path it failed on.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// Limits that keep one client from holding the agent up.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request accepted, newline excluded.
    pub max_request_bytes: usize,
    /// How long a client may take to send its request once connected.
    pub request_read_timeout: Duration,
    /// How long a handler may take for each verb before the client is told to retry.
    pub deadline: fn(Op) -> Duration,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: rpc::MAX_FRAME_BYTES,
            request_read_timeout: Duration::from_secs(10),
            deadline: rpc::agent_deadline,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// A bound RPC socket, ready to serve.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket we bound, so shutdown removes only our own.
    identity: (u64, u64),
    slot: HandlerSlot,
    limits: Limits,
    metrics: Option<Metrics>,
}

impl Server {
    /// Records every RPC's latency and result in `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Server {
        self.metrics = Some(metrics);
        self
    }

    /// Binds `path` with mode 0600, creating its directory and replacing a
    /// stale socket left by a previous run. A live socket (another agent)
    /// and a non-socket file are refused. The socket appears at `path` only
    /// once its mode is 0600, so no other user can ever connect.
    pub fn bind(path: &Path, slot: HandlerSlot, limits: Limits) -> Result<Server, BindError> {
        let (listener, identity) = bind_socket(path)?;
        Ok(Server {
            listener,
            path: path.to_owned(),
            identity,
            slot,
            limits,
            metrics: None,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` completes; then stops accepting, removes the
    /// socket, and waits (up to the drain timeout) for in-flight requests.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Server {
            listener,
            path,
            identity,
            slot,
            limits,
            metrics,
        } = self;
        let tracker = TaskTracker::new();
        tokio::pin!(shutdown);
        info!(socket = %path.display(), "serving plugin requests");
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tracker.spawn(serve_connection(stream, slot.clone(), limits.clone(), tracker.clone(), metrics.clone()));
                    }
                    Err(error) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        remove_if_ours(&path, identity);
        tracker.close();
        let in_flight = tracker.len();
        info!(in_flight, "stopped accepting; finishing in-flight requests");
        if tokio::time::timeout(limits.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                abandoned = tracker.len(),
                "in-flight requests did not finish within the drain timeout"
            );
        }
    }
}

/// Binds a unix socket at `path` with mode 0600 (it appears at `path` only
/// once restricted), creating its directory and replacing a stale socket;
/// a live socket and a non-socket file are refused. Returns the listener
/// and the socket's device and inode (see [`remove_if_ours`]).
pub(crate) fn bind_socket(path: &Path) -> Result<(UnixListener, (u64, u64)), BindError> {
    let io_err = |step, path: &Path| {
        let path = path.to_owned();
        move |source| BindError::Io { step, path, source }
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| BindError::CreateDir {
        dir: dir.to_owned(),
        source,
    })?;
    refuse_live_or_foreign(path)?;

    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let staging = dir.join(format!(
        ".{}.{}.tmp",
        name.unwrap_or_else(|| "flock.sock".into()),
        std::process::id()
    ));
    // A leftover from a crashed start of this same pid; nothing else uses the name.
    let _ = std::fs::remove_file(&staging);
    let listener =
        std::os::unix::net::UnixListener::bind(&staging).map_err(io_err("bind", &staging))?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err("restrict", &staging))
        .and_then(|()| std::fs::rename(&staging, path).map_err(io_err("move into place", path)));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    let meta = std::fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err("configure", path))?;
    let listener = UnixListener::from_std(listener).map_err(io_err("register", path))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

fn refuse_live_or_foreign(path: &Path) -> Result<(), BindError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(BindError::NotASocket {
            path: path.to_owned(),
        });
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(BindError::InUse {
            path: path.to_owned(),
        }),
        // Nobody listens: a stale socket from an earlier run, replaced by the rename.
        Err(_) => Ok(()),
    }
}

/// Removes the socket at `path` if it is still the one bound (`identity`).
pub(crate) fn remove_if_ours(path: &Path, identity: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == identity => {
            if let Err(error) = std::fs::remove_file(path) {
                warn!(%error, socket = %path.display(), "cannot remove socket");
            }
        }
        Ok(_) => {
            info!(socket = %path.display(), "socket was replaced by another process; leaving it")
        }
        Err(_) => {}
    }
}

async fn serve_connection(
    stream: UnixStream,
    slot: HandlerSlot,
    limits: Limits,
    tracker: TaskTracker,
    metrics: Option<Metrics>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let read = tokio::time::timeout(
        limits.request_read_timeout,
        read_frame(&mut reader, limits.max_request_bytes),
    )
    .await;
    let response = match read {
        Err(_) => refuse(format!(
            "no complete request within {}s",
            limits.request_read_timeout.as_secs()
        )),
        Ok(Err(FrameError::Closed)) => return,
        Ok(Err(error)) => refuse(format!("cannot read request: {error}")),
        Ok(Ok(frame)) => match serde_json::from_slice::<Request>(&frame) {
            Ok(request) => dispatch(request, &slot, &limits, &tracker, metrics.as_ref()).await,
            Err(error) => Response::Error(
                CniError::new(
                    ErrorCode::DECODING_FAILURE,
                    "request is not a valid flock RPC request",
                )
                .with_details(error.to_string()),
            ),
        },
    };
    if let Err(error) = write.write_all(&rpc::encode(&response)).await {
        debug!(%error, "client left before the response was written");
    }
    let _ = write.shutdown().await;
}

fn refuse(msg: String) -> Response {
    warn!(reason = %msg, "refused a request");
    Response::Error(CniError::new(ErrorCode::DECODING_FAILURE, msg))
}

async fn read_frame(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    limit: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await
        .map_err(FrameError::Io)?;
    rpc::finish_frame(buf, limit)
}

async fn dispatch(
    request: Request,
    slot: &HandlerSlot,
    limits: &Limits,
    tracker: &TaskTracker,
    metrics: Option<&Metrics>,
) -> Response {
    let op = request.op;
    let span = info_span!(
        "rpc",
        op = %op,
        container_id = %request.container_id,
        if_name = %request.if_name,
    );
    async move {
        let started = Instant::now();
        let deadline = (limits.deadline)(op);
        // The handler runs on a task of its own: a deadline answers the
        // client but does not cut an operation off halfway.
        let task = tracker.spawn(slot.current().handle(request).in_current_span());
        let response = match tokio::time::timeout(deadline, task).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => Response::Error(
                CniError::new(ErrorCode::AGENT_INTERNAL, format!("agent failed during {op}"))
                    .with_details(error.to_string()),
            ),
            Err(_) => Response::Error(CniError::new(
                ErrorCode::TRY_AGAIN_LATER,
                format!(
                    "agent did not finish {op} within {}s; it goes on in the background, retry later",
                    deadline.as_secs_f32()
                ),
            )),
        };
        let elapsed = started.elapsed();
        let elapsed_us = elapsed.as_micros() as u64;
        if let Some(m) = metrics {
            let result = match &response {
                Response::Error(e) => e.code.to_string(),
                _ => "ok".to_owned(),
            };
            m.observe_rpc(op.as_str(), &result, elapsed);
        }
        match &response {
            Response::Error(e) => info!(elapsed_us, code = e.code.0, msg = %e.msg, "rpc failed"),
            _ => info!(elapsed_us, "rpc done"),
        }
        response
    }
    .instrument(span)
    .await
}
