//! flock-store: the durable record of every allocation on this node.
//!
//! `allocations.json` holds one entry per pod interface, pending while its
//! network is being built and committed once it is. Every change is written
//! atomically and durably before it is acknowledged (temp file, fsync,
//! rename, fsync of the directory), so a crash at any instant leaves either
//! the old file or the new one. A file that cannot be read or parsed is an
//! error naming it; it is left in place for inspection and never replaced
//! by an empty store.

mod allocation;
mod file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use allocation::{AllocState, Allocation};
pub use file::{FILE_NAME, SCHEMA_VERSION};

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
}

impl Store {
    /// Opens the store in `dir`, creating the directory when missing. A
    /// missing file is an empty store (a node's first start); an unreadable
    /// or corrupt one is an error.
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.join(FILE_NAME);
        let entries = file::load(dir, &path)?
            .into_iter()
            .map(|a| ((a.container_id.clone(), a.ifname.clone()), a))
            .collect();
        Ok(Store { path, entries })
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
        let key = (allocation.container_id.clone(), allocation.ifname.clone());
        let previous = self.entries.insert(key.clone(), allocation);
        if let Err(e) = self.persist() {
            match previous {
                Some(p) => self.entries.insert(key, p),
                None => self.entries.remove(&key),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Removes an entry, durably, returning it. Removing a missing entry
    /// succeeds without writing.
    pub fn remove(&mut self, container_id: &str, ifname: &str) -> Result<Option<Allocation>> {
        let key = (container_id.to_owned(), ifname.to_owned());
        let Some(removed) = self.entries.remove(&key) else {
            return Ok(None);
        };
        if let Err(e) = self.persist() {
            self.entries.insert(key, removed);
            return Err(e);
        }
        Ok(Some(removed))
    }

    fn persist(&self) -> Result<()> {
        file::write(&self.path, self.entries.values())
    }
}
