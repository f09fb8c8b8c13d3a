//! The allocation store behind a small trait: the real one owns
//! `flock_store::Store` on a thread of its own, so `fdatasync` never runs
//! on a runtime worker and no lock is held while it does; the store's
//! compaction runs on that thread after the write it follows has been
//! answered. Tests use a recording fake that can fail or stop at any write.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::mpsc;
use std::time::SystemTime;

use flock_store::{Allocation, Record, Store};
use tokio::sync::oneshot;
use tracing::warn;

/// What the store held when it was opened.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Every entry.
    pub entries: Vec<Allocation>,
    /// When addresses no entry holds were given back.
    pub released: Vec<(IpAddr, SystemTime)>,
}

/// A write that did not become durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StoreFailure {
    /// What failed, naming the file.
    pub message: String,
    /// Whether the store takes no more writes until the agent restarts.
    pub refusing: bool,
}

impl From<flock_store::StoreError> for StoreFailure {
    fn from(e: flock_store::StoreError) -> Self {
        StoreFailure {
            refusing: matches!(e, flock_store::StoreError::Poisoned { .. }),
            message: e.to_string(),
        }
    }
}

/// Durable allocation records.
pub trait AllocationStore: Send + Sync + 'static {
    /// Makes `record` durable; `Ok` only once it is.
    fn write(&self, record: Record) -> impl Future<Output = Result<(), StoreFailure>> + Send;
}

type Job = (Record, oneshot::Sender<Result<(), StoreFailure>>);

/// The real store, served by its own thread.
#[derive(Debug, Clone)]
pub struct StoreThread {
    jobs: mpsc::Sender<Job>,
}

impl StoreThread {
    /// Opens the store in `dir` (blocking: call it off the runtime) and
    /// starts its thread; the thread ends when every handle is dropped.
    pub fn open(dir: &Path) -> Result<(StoreThread, Loaded), flock_store::StoreError> {
        let mut store = Store::open(dir)?;
        let loaded = Loaded {
            entries: store.iter().cloned().collect(),
            released: store.released().collect(),
        };
        let (jobs, queue) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("flock-store".into())
            .spawn(move || serve(&mut store, &queue));
        if let Err(source) = spawned {
            return Err(flock_store::StoreError::Write {
                step: "start a thread for",
                path: dir.to_owned(),
                source,
            });
        }
        Ok((StoreThread { jobs }, loaded))
    }
}

fn serve(store: &mut Store, queue: &mpsc::Receiver<Job>) {
    let mut next = queue.recv().ok();
    while let Some((record, reply)) = next.take() {
        let _ = reply.send(store.record(record).map(drop).map_err(StoreFailure::from));
        next = match queue.try_recv() {
            Ok(job) => Some(job),
            Err(mpsc::TryRecvError::Disconnected) => None,
            Err(mpsc::TryRecvError::Empty) => {
                // Compaction waits until no write is queued: it never delays one.
                if let Err(error) = store.compact_if_due() {
                    warn!(%error, "store compaction failed; the journal keeps every change");
                }
                queue.recv().ok()
            }
        };
    }
}

impl AllocationStore for StoreThread {
    async fn write(&self, record: Record) -> Result<(), StoreFailure> {
        let (tx, rx) = oneshot::channel();
        let gone = || StoreFailure {
            message: "the store thread has stopped".into(),
            refusing: true,
        };
        self.jobs.send((record, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}
