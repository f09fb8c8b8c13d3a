//! The journal: every change appended as one JSON line and made durable
//! with `fdatasync`, so a write costs the same with ten entries or ten
//! thousand. The snapshot (`allocations.json`) is rewritten, atomically,
//! when the journal has grown as long as the store (see
//! [`crate::Store::compact_if_due`]).
//!
//! An append that fails is cut back off the file. When even that fails,
//! the journal is *poisoned*: the file's tail is unknown, so it takes no
//! further write (one could land after garbage, or a later cut could take
//! an acknowledged record with it) until a restart reopens it and keeps
//! only its valid prefix.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Allocation, Result, StoreError};

/// The journal's file name beside the snapshot.
pub const JOURNAL_NAME: &str = "allocations.journal";

/// One change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Record {
    /// An entry inserted or replaced.
    Upsert(Allocation),
    /// An entry removed, its addresses released at `at`.
    #[serde(rename_all = "camelCase")]
    Remove {
        /// Its container id.
        container_id: String,
        /// Its interface.
        ifname: String,
        /// The unicast addresses it gave back.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        released: Vec<IpAddr>,
        /// When they were given back (journals of older versions have none).
        #[serde(
            default,
            serialize_with = "opt_rfc3339",
            deserialize_with = "opt_from_rfc3339",
            skip_serializing_if = "Option::is_none"
        )]
        at: Option<SystemTime>,
    },
}

fn opt_rfc3339<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => crate::allocation::rfc3339(t, s),
        None => s.serialize_none(),
    }
}

fn opt_from_rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    crate::allocation::from_rfc3339(d).map(Some)
}

/// Reads the journal without changing it: its records, the length of its
/// good prefix and its full length.
pub fn read(path: &Path) -> Result<(Vec<Record>, usize, usize)> {
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let text = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut records = Vec::new();
    let mut good_len = 0usize;
    let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let complete = line.ends_with(b"\n");
        match serde_json::from_slice::<Record>(line) {
            Ok(record) if complete => {
                records.push(record);
                good_len += line.len();
            }
            _ if i + 1 == lines.len() => break, // the torn tail of an unacknowledged append
            Err(e) => return Err(corrupt(format!("line {}: {e}", i + 1))),
            Ok(_) => return Err(corrupt(format!("line {} is not terminated", i + 1))),
        }
    }
    Ok((records, good_len, text.len()))
}

/// What the journal writes through: a file, or a fault-injecting double
/// in this crate's tests.
pub(crate) trait LogFile: Send {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    fn sync_data(&mut self) -> std::io::Result<()>;
    fn set_len(&mut self, len: u64) -> std::io::Result<()>;
}

impl LogFile for File {
    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        Write::write_all(self, bytes)
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        File::sync_data(self)
    }

    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        File::set_len(self, len)
    }
}

/// The open journal.
pub(crate) struct Journal {
    path: PathBuf,
    file: Box<dyn LogFile>,
    /// Length of the acknowledged records.
    len: u64,
    records: usize,
    /// Why no write is taken any more, once an append could not be undone.
    poisoned: Option<String>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("records", &self.records)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Journal {
    /// Opens (creating) the journal and returns it with the records it holds.
    /// A last line cut short by a crash was never acknowledged and is
    /// dropped; a bad line before the last is corruption.
    pub fn open(path: &Path) -> Result<(Journal, Vec<Record>)> {
        let (records, good_len, text_len) = read(path)?;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::Write {
                step: "open",
                path: path.to_owned(),
                source,
            })?;
        if good_len < text_len {
            file.set_len(good_len as u64)
                .and_then(|()| file.sync_data())
                .map_err(|source| StoreError::Write {
                    step: "drop the torn tail of",
                    path: path.to_owned(),
                    source,
                })?;
        }
        let count = records.len();
        Ok((
            Journal::over(path, Box::new(file), good_len as u64, count),
            records,
        ))
    }

    pub(crate) fn over(path: &Path, file: Box<dyn LogFile>, len: u64, records: usize) -> Journal {
        Journal {
            path: path.to_owned(),
            file,
            len,
            records,
            poisoned: None,
        }
    }

    /// How many records it holds.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Why the journal takes no more writes, if it does not.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    fn refuse_if_poisoned(&self) -> Result<()> {
        match &self.poisoned {
            Some(reason) => Err(StoreError::Poisoned {
                path: self.path.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Appends `record` durably. On error the journal is cut back to what it
    /// was; if that fails too, it is poisoned.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        self.refuse_if_poisoned()?;
        // Records have only string keys: serialising cannot fail.
        let mut line = serde_json::to_vec(record).expect("records serialise");
        line.push(b'\n');
        let written = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += line.len() as u64;
                self.records += 1;
                Ok(())
            }
            Err(source) => {
                let len = self.len;
                if let Err(undo) = self.file.set_len(len).and_then(|()| self.file.sync_data()) {
                    self.poisoned = Some(format!(
                        "an append failed ({source}) and could not be cut back off the file ({undo})"
                    ));
                }
                Err(StoreError::Write {
                    step: "append to",
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// Replaces the journal with one holding only `records` (those a new
    /// snapshot lacks): written to a temp file, fsynced, renamed over the
    /// journal, the directory fsynced, then reopened for appending. Until
    /// the rename the old journal stays (with the snapshot, its replay
    /// gives the same state); a failure after it poisons the journal.
    pub fn replace_with(&mut self, records: &[Record]) -> Result<()> {
        self.refuse_if_poisoned()?;
        let mut bytes = Vec::new();
        for record in records {
            // Records have only string keys: serialising cannot fail.
            bytes.extend(serde_json::to_vec(record).expect("records serialise"));
            bytes.push(b'\n');
        }
        crate::file::rename_into_place(
            &self.path,
            &self.path.with_extension("journal.tmp"),
            &bytes,
        )?;
        let reopened = crate::file::sync_dir(&self.path).and_then(|()| {
            OpenOptions::new()
                .append(true)
                .open(&self.path)
                .map_err(|source| StoreError::Write {
                    step: "reopen",
                    path: self.path.clone(),
                    source,
                })
        });
        match reopened {
            Ok(file) => {
                self.file = Box::new(file);
                self.len = bytes.len() as u64;
                self.records = records.len();
                Ok(())
            }
            Err(e) => {
                self.poisoned = Some(format!("the compacted journal was not reopened ({e})"));
                Err(e)
            }
        }
    }

    /// Empties the journal once a snapshot holds everything in it.
    pub fn reset(&mut self) -> Result<()> {
        self.refuse_if_poisoned()?;
        let fail = |source| StoreError::Write {
            step: "truncate",
            path: self.path.clone(),
            source,
        };
        self.file.set_len(0).map_err(fail)?;
        self.len = 0;
        self.records = 0;
        // Empty or not on disk, the journal agrees with the snapshot (its
        // replay is idempotent); but what the disk holds is unknown now.
        if let Err(source) = self.file.sync_data() {
            self.poisoned = Some(format!(
                "emptying the journal was not made durable ({source})"
            ));
            return Err(fail(source));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Faults to inject into the next calls.
    #[derive(Debug, Default)]
    struct Faults {
        /// The next write stores only half its bytes, then fails.
        torn_write: bool,
        /// The next sync fails.
        sync: bool,
        /// Every truncation fails.
        set_len: bool,
    }

    /// A real file whose operations fail on command.
    struct Faulty {
        file: File,
        faults: Arc<Mutex<Faults>>,
    }

    fn io_error(what: &str) -> std::io::Error {
        std::io::Error::other(format!("injected: {what}"))
    }

    impl LogFile for Faulty {
        fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            if std::mem::take(&mut self.faults.lock().expect("faults").torn_write) {
                Write::write_all(&mut self.file, &bytes[..bytes.len() / 2])?;
                return Err(io_error("no space left"));
            }
            Write::write_all(&mut self.file, bytes)
        }

        fn sync_data(&mut self) -> std::io::Result<()> {
            if std::mem::take(&mut self.faults.lock().expect("faults").sync) {
                return Err(io_error("fdatasync"));
            }
            self.file.sync_data()
        }

        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            if self.faults.lock().expect("faults").set_len {
                return Err(io_error("ftruncate"));
            }
            self.file.set_len(len)
        }
    }

    fn faulty(path: &Path) -> (Journal, Arc<Mutex<Faults>>) {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("journal file");
        let faults = Arc::new(Mutex::new(Faults::default()));
        let journal = Journal::over(
            path,
            Box::new(Faulty {
                file,
                faults: faults.clone(),
            }),
            0,
            0,
        );
        (journal, faults)
    }

    fn remove(id: &str) -> Record {
        Record::Remove {
            container_id: id.into(),
            ifname: "eth0".into(),
            released: vec![],
            at: None,
        }
    }

    fn ids(path: &Path) -> Vec<String> {
        read(path)
            .expect("readable")
            .0
            .into_iter()
            .map(|r| match r {
                Record::Remove { container_id, .. } => container_id,
                Record::Upsert(a) => a.container_id,
            })
            .collect()
    }

    #[test]
    fn a_failed_append_is_cut_back_and_the_next_one_lands_cleanly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOURNAL_NAME);
        let (mut journal, faults) = faulty(&path);
        journal.append(&remove("a")).expect("first");
        faults.lock().expect("faults").torn_write = true;
        assert!(matches!(
            journal.append(&remove("b")),
            Err(StoreError::Write { .. })
        ));
        faults.lock().expect("faults").sync = true;
        assert!(journal.append(&remove("c")).is_err(), "sync failure");
        journal.append(&remove("d")).expect("after the failures");
        assert_eq!(journal.poisoned(), None);
        assert_eq!(
            ids(&path),
            ["a", "d"],
            "no half record, nothing unacknowledged"
        );
    }

    #[test]
    fn an_append_that_cannot_be_undone_poisons_the_journal_and_a_reopen_keeps_the_valid_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOURNAL_NAME);
        let (mut journal, faults) = faulty(&path);
        journal.append(&remove("a")).expect("first");
        journal.append(&remove("b")).expect("second");
        {
            let mut f = faults.lock().expect("faults");
            f.torn_write = true;
            f.set_len = true;
        }
        assert!(journal.append(&remove("c")).is_err());
        assert!(journal.poisoned().is_some());
        // Every later write is refused, even once the disk would take it:
        // it would land after the garbage, or a later cut could take it.
        faults.lock().expect("faults").set_len = false;
        assert!(matches!(
            journal.append(&remove("d")),
            Err(StoreError::Poisoned { .. })
        ));
        assert!(matches!(journal.reset(), Err(StoreError::Poisoned { .. })));
        drop(journal);
        let (reopened, records) = Journal::open(&path).expect("reopen");
        assert_eq!(records.len(), 2, "the valid prefix, nothing half-written");
        assert_eq!(reopened.poisoned(), None);
        assert_eq!(ids(&path), ["a", "b"], "the torn tail was dropped on open");
    }
}
