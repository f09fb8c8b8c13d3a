//! The allocation store behind a small trait: the real one owns
//! `flock_store::Store` on a thread of its own, so `fdatasync` never runs
//! on a runtime worker and no lock is held while it does. The store's
//! compaction writes its snapshot on a thread of its own while writes go
//! on (only the short swap of the journal runs between two writes), so a
//! write never waits for a snapshot of every entry. Tests use a recording
//! fake that can fail or stop at any write.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use flock_store::{Allocation, Record, Store, Written};
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

/// How often the store thread looks for a finished snapshot while writes
/// are quiet.
const SNAPSHOT_POLL: Duration = Duration::from_millis(5);

fn serve(store: &mut Store, queue: &mpsc::Receiver<Job>) {
    let (done_tx, done) = mpsc::channel::<Written>();
    let mut snapshots: Option<std::thread::JoinHandle<()>> = None;
    // A compaction is begun when writes pause, and once per write after
    // one failed (not over and over while idle).
    let mut may_begin = true;
    loop {
        if let Ok(written) = done.try_recv() {
            finish(store, written, &mut snapshots);
        }
        let job = if store.compacting() {
            match queue.recv_timeout(SNAPSHOT_POLL) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match queue.try_recv() {
                Ok(job) => job,
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => {
                    if may_begin && store.compaction_due() {
                        may_begin = false;
                        match store.begin_compaction() {
                            Ok(Some(compaction)) => {
                                let done_tx = done_tx.clone();
                                let spawned = std::thread::Builder::new()
                                    .name("flock-store-snapshot".into())
                                    .spawn(move || {
                                        let _ = done_tx.send(compaction.write());
                                    });
                                match spawned {
                                    Ok(handle) => snapshots = Some(handle),
                                    Err(error) => {
                                        store.abandon_compaction();
                                        warn!(%error, "cannot start the store's snapshot thread; the journal keeps every change")
                                    }
                                }
                                continue;
                            }
                            Ok(None) => {}
                            Err(error) => {
                                warn!(%error, "store compaction failed; the journal keeps every change")
                            }
                        }
                    }
                    match queue.recv() {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                }
            }
        };
        let (record, reply) = job;
        let _ = reply.send(store.record(record).map(drop).map_err(StoreFailure::from));
        may_begin = true;
    }
    // Stopping: a snapshot on its way is finished, not left half done.
    if store.compacting()
        && let Ok(written) = done.recv_timeout(Duration::from_secs(10))
    {
        finish(store, written, &mut snapshots);
    }
}

fn finish(
    store: &mut Store,
    written: Written,
    snapshots: &mut Option<std::thread::JoinHandle<()>>,
) {
    if let Some(handle) = snapshots.take() {
        let _ = handle.join();
    }
    if let Err(error) = store.finish_compaction(written) {
        warn!(%error, "store compaction failed; the journal keeps every change");
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use flock_store::{AllocState, JOURNAL_NAME};

    use super::*;

    fn entry(n: u32) -> Allocation {
        Allocation {
            container_id: format!("c{n}"),
            ifname: "eth0".into(),
            namespace: "default".into(),
            pod: format!("p{n}"),
            pod_uid: format!("u{n}"),
            host_iface: format!("flock{n:08x}"),
            ip6: None,
            ip4: Some(Ipv4Addr::from(0xc612_0000 + n)),
            anycast: vec![],
            addresses: vec![],
            netns: String::new(),
            netns_inode: None,
            mtu: None,
            state: AllocState::Committed,
            allocated_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_runs_beside_the_writes_and_loses_none_of_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = StoreThread::open(dir.path()).expect("open");
        let journal = || {
            std::fs::read_to_string(dir.path().join(JOURNAL_NAME))
                .expect("journal")
                .lines()
                .count()
        };
        // Bursts with pauses between them, so compactions begin and the
        // next burst's writes land while a snapshot is on its way.
        let mut most = 0;
        for burst in 0..20u32 {
            for n in 0..50 {
                store
                    .write(Record::Upsert(entry(burst * 50 + n)))
                    .await
                    .expect("write");
            }
            most = most.max(journal());
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            journal() < 1000,
            "compacted along the way: {} records left (at most {most})",
            journal()
        );
        drop(store);
        let reopened = Store::open(dir.path()).expect("reopen");
        assert_eq!(reopened.len(), 1000, "every write kept");
        assert_eq!(reopened.get("c999", "eth0"), Some(&entry(999)));
    }
}
