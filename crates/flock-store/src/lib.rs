//! flock-store: the durable record of every allocation on this node.
//!
//! `allocations.json` holds one entry per pod interface, pending while its
//! network is being built, committed once it is, and releasing while a
//! DEL's teardown finishes. Every change is durable before it is
//! acknowledged: appended to `allocations.journal` and fdatasynced, which
//! costs the same whatever the store's size. Compaction rewrites the
//! snapshot atomically (temp file, fsync, rename, fsync of the directory)
//! and then cuts the journal back: [`Store::begin_compaction`] takes the
//! snapshot, [`Compaction::write`] writes it on any thread while the store
//! goes on journaling, and [`Store::finish_compaction`] replaces the
//! journal with the records that came after the snapshot (by a rename). A
//! crash at any instant leaves a snapshot and a journal whose replay gives
//! every acknowledged change. A write that fails is an error and leaves no
//! half record; when the journal cannot even be cut back, the store takes
//! no more writes until it is opened again. A file that cannot be read or
//! parsed is an error naming it; it is left in place for inspection and
//! never replaced by an empty store.
//!
//! The store also remembers when each address was last given back, so the
//! allocator can reuse the longest-released first (peers' policy sets and
//! conntrack still know a just-released one as its old pod).

mod allocation;
mod file;
mod journal;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use allocation::{AllocState, Allocation};
pub use file::{FILE_NAME, SCHEMA_VERSION};
pub use journal::{JOURNAL_NAME, Record};

use file::Released;
use journal::Journal;

/// The journal is compacted into the snapshot once it holds this many
/// records, or as many as the store has entries if that is more.
const MIN_COMPACTION: usize = 128;

/// How many release times are kept; the oldest are forgotten first (an
/// address released that long ago is as good as never used).
pub const MAX_RELEASED: usize = 65_536;

/// What went wrong, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The store file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not a valid allocations file; it is left in place.
    #[error(
        "{path} is not a valid allocations file ({reason}); it was left in place for inspection — move it aside to start with an empty store"
    )]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The file was written by a newer flock.
    #[error("{path} has schema version {found}; this flock understands up to {supported}")]
    NewerSchema {
        /// The store file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The newest version this build reads.
        supported: u32,
    },
    /// Writing the new state failed; the previous state stays in force.
    #[error("cannot {step} {path}: {source}")]
    Write {
        /// Which step failed.
        step: &'static str,
        /// The file or directory it failed on.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// An earlier write failed in a way that leaves the file's tail
    /// unknown; no write is taken until the store is opened again.
    #[error("{path} takes no more writes until flock-agent restarts: {reason}")]
    Poisoned {
        /// The journal.
        path: PathBuf,
        /// What happened.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The in-memory view of `allocations.json`, keyed by container id and
/// interface name. Every mutation is on disk before it returns.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    state: State,
    journal: Journal,
    /// While a [`Compaction`] is being written: the records journaled
    /// since its snapshot was taken, which the new journal keeps.
    since_snapshot: Option<Vec<Record>>,
    /// Which compaction `since_snapshot` belongs to.
    generation: u64,
}

/// A snapshot of the store taken by [`Store::begin_compaction`], to be
/// written by [`Compaction::write`] on any thread while the store goes on
/// taking writes, and handed back to [`Store::finish_compaction`].
#[derive(Debug)]
pub struct Compaction {
    generation: u64,
    path: PathBuf,
    entries: Vec<Allocation>,
    released: Vec<Released>,
}

/// A [`Compaction`] whose snapshot is on disk (or failed to get there).
#[derive(Debug)]
#[must_use = "hand it to Store::finish_compaction"]
pub struct Written {
    generation: u64,
    outcome: Result<()>,
}

impl Compaction {
    /// Writes the snapshot atomically (temp file, fsync, rename, fsync of
    /// the directory). With the journal as it is, it replays to the same
    /// state, so a crash before [`Store::finish_compaction`] loses nothing.
    pub fn write(self) -> Written {
        Written {
            generation: self.generation,
            outcome: file::write(&self.path, self.entries.iter(), self.released),
        }
    }
}

/// The entries and the release history, as replayed from disk.
#[derive(Debug, Default, Clone, PartialEq)]
struct State {
    entries: BTreeMap<(String, String), Allocation>,
    released: History,
}

/// When each address was last given back, oldest forgotten beyond
/// [`MAX_RELEASED`].
#[derive(Debug, Default, Clone, PartialEq)]
struct History {
    at: BTreeMap<IpAddr, SystemTime>,
    by_time: BTreeSet<(SystemTime, IpAddr)>,
}

impl History {
    fn insert(&mut self, ip: IpAddr, at: SystemTime) {
        self.remove(ip);
        self.at.insert(ip, at);
        self.by_time.insert((at, ip));
        while self.at.len() > MAX_RELEASED {
            let Some((_, oldest)) = self.by_time.pop_first() else {
                break;
            };
            self.at.remove(&oldest);
        }
    }

    fn remove(&mut self, ip: IpAddr) {
        if let Some(t) = self.at.remove(&ip) {
            self.by_time.remove(&(t, ip));
        }
    }
}

impl State {
    fn from_disk(snapshot: file::Snapshot, records: Vec<Record>) -> State {
        let mut state = State::default();
        for r in snapshot.released {
            state.released.insert(r.ip, r.at);
        }
        for a in snapshot.allocations {
            state
                .entries
                .insert((a.container_id.clone(), a.ifname.clone()), a);
        }
        for record in records {
            state.apply(record);
        }
        state
    }

    /// Applies one record, returning the entry it replaced or removed.
    fn apply(&mut self, record: Record) -> Option<Allocation> {
        match record {
            Record::Upsert(a) => {
                for ip in a.unicast() {
                    self.released.remove(ip);
                }
                self.entries
                    .insert((a.container_id.clone(), a.ifname.clone()), a)
            }
            Record::Remove {
                container_id,
                ifname,
                released,
                at,
            } => {
                if let Some(at) = at {
                    for ip in released {
                        self.released.insert(ip, at);
                    }
                }
                self.entries.remove(&(container_id, ifname))
            }
        }
    }
}

impl Store {
    /// Opens the store in `dir`, creating the directory when missing. A
    /// missing file is an empty store (a node's first start); an unreadable
    /// or corrupt one is an error.
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.join(FILE_NAME);
        let snapshot = file::load(dir, &path)?;
        let (journal, records) = Journal::open(&dir.join(JOURNAL_NAME))?;
        Ok(Store {
            path,
            state: State::from_disk(snapshot, records),
            journal,
            since_snapshot: None,
            generation: 0,
        })
    }

    /// The entries as they are on disk in `dir`, read without changing
    /// anything (safe while an agent owns the store; for inspection and tests).
    pub fn read_only(dir: &Path) -> Result<Vec<Allocation>> {
        let snapshot = file::read(&dir.join(FILE_NAME))?;
        let (records, _, _) = journal::read(&dir.join(JOURNAL_NAME))?;
        Ok(State::from_disk(snapshot, records)
            .entries
            .into_values()
            .collect())
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry for one container interface.
    pub fn get(&self, container_id: &str, ifname: &str) -> Option<&Allocation> {
        self.state
            .entries
            .get(&(container_id.to_owned(), ifname.to_owned()))
    }

    /// Every entry, ordered by container id and interface.
    pub fn iter(&self) -> impl Iterator<Item = &Allocation> {
        self.state.entries.values()
    }

    /// When addresses no entry holds were last given back.
    pub fn released(&self) -> impl Iterator<Item = (IpAddr, SystemTime)> + '_ {
        self.state.released.at.iter().map(|(ip, at)| (*ip, *at))
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.state.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.state.entries.is_empty()
    }

    /// Why the store takes no more writes, if it does not.
    pub fn poisoned(&self) -> Option<&str> {
        self.journal.poisoned()
    }

    /// Inserts or replaces an entry, durably. On error nothing changed.
    pub fn upsert(&mut self, allocation: Allocation) -> Result<()> {
        self.record(Record::Upsert(allocation))?;
        Ok(())
    }

    /// Removes an entry durably, recording its unicast addresses as given
    /// back at `at`, and returns it. Removing a missing entry succeeds
    /// without writing.
    pub fn remove(
        &mut self,
        container_id: &str,
        ifname: &str,
        at: SystemTime,
    ) -> Result<Option<Allocation>> {
        let Some(entry) = self.get(container_id, ifname) else {
            return Ok(None);
        };
        let released = entry.unicast().collect();
        self.record(Record::Remove {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
            released,
            at: Some(at),
        })
    }

    /// Journals `record`, then applies it.
    pub fn record(&mut self, record: Record) -> Result<Option<Allocation>> {
        self.journal.append(&record)?;
        if let Some(since) = &mut self.since_snapshot {
            since.push(record.clone());
        }
        Ok(self.state.apply(record))
    }

    /// Whether the journal is as long as the store (and at least
    /// [`MIN_COMPACTION`] records), so compacting is worth it.
    pub fn compaction_due(&self) -> bool {
        self.journal.records() >= MIN_COMPACTION.max(self.state.entries.len())
    }

    /// Compacts when due; returns whether it did. The changes are durable
    /// already: a failed compaction only leaves a longer journal.
    pub fn compact_if_due(&mut self) -> Result<bool> {
        if !self.compaction_due() {
            return Ok(false);
        }
        self.compact().map(|()| true)
    }

    /// Writes the snapshot and empties the journal, all at once (nothing
    /// while a compaction begun apart is in flight).
    pub fn compact(&mut self) -> Result<()> {
        match self.begin_compaction()? {
            Some(compaction) => {
                let written = compaction.write();
                self.finish_compaction(written)
            }
            None => Ok(()),
        }
    }

    /// Takes a snapshot to be written off this thread; from now until
    /// [`Store::finish_compaction`] the records journaled are kept aside
    /// too, for the journal that follows the snapshot. `None` while
    /// another is in flight (two snapshots written at once could land in
    /// either order).
    pub fn begin_compaction(&mut self) -> Result<Option<Compaction>> {
        if self.compacting() {
            return Ok(None);
        }
        if let Some(reason) = self.journal.poisoned() {
            return Err(StoreError::Poisoned {
                path: self.path.clone(),
                reason: reason.to_owned(),
            });
        }
        self.since_snapshot = Some(Vec::new());
        self.generation += 1;
        Ok(Some(Compaction {
            generation: self.generation,
            path: self.path.clone(),
            entries: self.state.entries.values().cloned().collect(),
            released: self
                .state
                .released
                .at
                .iter()
                .map(|(&ip, &at)| Released { ip, at })
                .collect(),
        }))
    }

    /// Gives up the compaction in flight (its snapshot will never be
    /// written): the journal keeps everything, and another may begin.
    pub fn abandon_compaction(&mut self) {
        self.since_snapshot = None;
    }

    /// Whether a compaction was begun and not finished.
    pub fn compacting(&self) -> bool {
        self.since_snapshot.is_some()
    }

    /// Once the snapshot is on disk, the journal is replaced by one holding
    /// only what was journaled since the snapshot was taken (a short write:
    /// the snapshot itself was written off the request path). A snapshot
    /// that failed leaves the journal as it is.
    pub fn finish_compaction(&mut self, written: Written) -> Result<()> {
        if written.generation != self.generation || self.since_snapshot.is_none() {
            return Ok(()); // not the one in flight: the journal keeps everything
        }
        let since = self.since_snapshot.take().unwrap_or_default();
        written.outcome?;
        if since.is_empty() {
            self.journal.reset()
        } else {
            self.journal.replace_with(&since)
        }
    }
}
