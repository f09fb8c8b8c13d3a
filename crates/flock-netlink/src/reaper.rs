//! Deleting links off the caller's path.
//!
//! The kernel acknowledges a link deletion only after an RCU grace period
//! (16–24 ms here), and it does that work inside the `sendmsg` of the
//! request. The reaper owns threads and netlink sockets for exactly that
//! wait, so neither the runtime's workers nor the RPC that asked for the
//! teardown sit through it.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::is_gone;
use crate::{NetlinkError, Netns, Result};

/// Deletions that can be waiting in the kernel at once.
const WORKERS: usize = 4;

struct Job {
    index: u32,
    name: String,
    done: oneshot::Sender<Result<()>>,
}

/// A handle to the reaper thread; the thread ends when this is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Reaper {
    tx: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "delete link {} ({})", self.name, self.index)
    }
}

impl Reaper {
    /// Starts [`WORKERS`] reaper threads, each with its own socket in
    /// `node`: the kernel's waits of concurrent deletions overlap.
    pub fn start(node: Netns) -> Result<Reaper> {
        let (tx, rx) = mpsc::unbounded_channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for worker in 0..WORKERS {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
            let (node, rx) = (node.clone(), rx.clone());
            std::thread::Builder::new()
                .name(format!("flock-reaper-{worker}"))
                .spawn(move || reap(node, rx, ready_tx))
                .map_err(NetlinkError::io("start a link reaper thread"))?;
            ready_rx.recv().map_err(|_| {
                NetlinkError::io("start a link reaper")(std::io::Error::other("thread ended"))
            })??;
        }
        Ok(Reaper { tx })
    }

    /// Queues the deletion of link `index`; the receiver resolves once the
    /// kernel has finished it.
    pub fn delete(&self, index: u32, name: &str) -> oneshot::Receiver<Result<()>> {
        let (done, finished) = oneshot::channel();
        let job = Job {
            index,
            name: name.to_owned(),
            done,
        };
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job) {
            let _ = job
                .done
                .send(Err(NetlinkError::io(format!("delete link {name}"))(
                    std::io::Error::other("the link reaper has stopped"),
                )));
        }
        finished
    }
}

/// One reaper thread: its own runtime and socket, deleting one link at a time.
fn reap(
    node: Netns,
    rx: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(NetlinkError::io("start the link reaper runtime")(e)));
            return;
        }
    };
    runtime.block_on(async move {
        let handle = match node.connect().await {
            Ok(h) => h,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        loop {
            // Hold the lock only to take a job, not while the kernel works.
            let Some(job) = rx.lock().await.recv().await else {
                return;
            };
            let result = match handle.link().del(job.index).execute().await {
                Err(e) if !is_gone(&e) => Err(NetlinkError::netlink(format!(
                    "delete link {}",
                    job.name
                ))(e)),
                _ => Ok(()),
            };
            // The caller may have stopped waiting; the link is gone either way.
            let _ = job.done.send(result);
        }
    });
}
