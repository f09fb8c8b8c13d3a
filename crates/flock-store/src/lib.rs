//! flock-store: the durable record of every allocation on this node.
//!
//! `allocations.json` holds one entry per pod interface, pending while its
//! network is being built and committed once it is. Every change is durable
//! before it is acknowledged: appended to `allocations.journal` and
//! fdatasynced, which costs the same whatever the store's size. When the
//! journal is as long as the store, the snapshot is rewritten atomically
//! (temp file, fsync, rename, fsync of the directory) and the journal
//! emptied; a crash at any instant leaves a snapshot and a journal whose
//! replay gives every acknowledged change. A file that cannot be read or
//! parsed is an error naming it; it is left in place for inspection and
//! never replaced by an empty store.

mod allocation;
mod file;
mod journal;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use allocation::{AllocState, Allocation};
pub use file::{FILE_NAME, SCHEMA_VERSION};
pub use journal::JOURNAL_NAME;

use journal::{Journal, Record};

/// The journal is compacted into the snapshot once it holds this many
/// records, or as many as the store has entries if that is more.
const MIN_COMPACTION: usize = 128;

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
}

/// Result alias for this crate.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The in-memory view of `allocations.json`, keyed by container id and
/// interface name. Every mutation is on disk before it returns.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    entries: BTreeMap<(String, String), Allocation>,
    journal: Journal,
}

impl Store {
    /// Opens the store in `dir`, creating the directory when missing. A
    /// missing file is an empty store (a node's first start); an unreadable
    /// or corrupt one is an error.
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.join(FILE_NAME);
        let mut entries: BTreeMap<(String, String), Allocation> = file::load(dir, &path)?
            .into_iter()
            .map(|a| ((a.container_id.clone(), a.ifname.clone()), a))
            .collect();
        let (journal, records) = Journal::open(&dir.join(JOURNAL_NAME))?;
        for record in records {
            apply(&mut entries, record);
        }
        Ok(Store {
            path,
            entries,
            journal,
        })
    }

    /// The entries as they are on disk in `dir`, read without changing
    /// anything (safe while an agent owns the store; for inspection and tests).
    pub fn read_only(dir: &Path) -> Result<Vec<Allocation>> {
        let mut entries: BTreeMap<(String, String), Allocation> = file::read(&dir.join(FILE_NAME))?
            .into_iter()
            .map(|a| ((a.container_id.clone(), a.ifname.clone()), a))
            .collect();
        let (records, _, _) = journal::read(&dir.join(JOURNAL_NAME))?;
        for record in records {
            apply(&mut entries, record);
        }
        Ok(entries.into_values().collect())
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entry for one container interface.
    pub fn get(&self, container_id: &str, ifname: &str) -> Option<&Allocation> {
        self.entries
            .get(&(container_id.to_owned(), ifname.to_owned()))
    }

    /// Every entry, ordered by container id and interface.
    pub fn iter(&self) -> impl Iterator<Item = &Allocation> {
        self.entries.values()
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Inserts or replaces an entry, durably. On error nothing changed.
    pub fn upsert(&mut self, allocation: Allocation) -> Result<()> {
        self.record(Record::Upsert(allocation))?;
        Ok(())
    }

    /// Removes an entry, durably, returning it. Removing a missing entry
    /// succeeds without writing.
    pub fn remove(&mut self, container_id: &str, ifname: &str) -> Result<Option<Allocation>> {
        if self.get(container_id, ifname).is_none() {
            return Ok(None);
        }
        self.record(Record::Remove {
            container_id: container_id.to_owned(),
            ifname: ifname.to_owned(),
        })
    }

    /// Journals `record`, then applies it; compacts when the journal is long.
    fn record(&mut self, record: Record) -> Result<Option<Allocation>> {
        self.journal.append(&record)?;
        let previous = apply(&mut self.entries, record);
        if self.journal.records() >= MIN_COMPACTION.max(self.entries.len()) {
            // The change is durable already; a failed compaction only
            // leaves a longer journal, retried at the next change.
            let _ = self.compact();
        }
        Ok(previous)
    }

    /// Writes the snapshot and empties the journal.
    pub fn compact(&mut self) -> Result<()> {
        file::write(&self.path, self.entries.values())?;
        self.journal.reset()
    }
}

/// Applies one record, returning the entry it replaced or removed.
fn apply(
    entries: &mut BTreeMap<(String, String), Allocation>,
    record: Record,
) -> Option<Allocation> {
    match record {
        Record::Upsert(a) => entries.insert((a.container_id.clone(), a.ifname.clone()), a),
        Record::Remove {
            container_id,
            ifname,
        } => entries.remove(&(container_id, ifname)),
    }
}
