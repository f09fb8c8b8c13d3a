//! The journal: every change appended as one JSON line and made durable
//! with `fdatasync`, so a write costs the same with ten entries or ten
//! thousand. The snapshot (`allocations.json`) is rewritten, atomically,
//! only when the journal has grown as long as the store.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Allocation, Result, StoreError};

/// The journal's file name beside the snapshot.
pub const JOURNAL_NAME: &str = "allocations.journal";

/// One change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Record {
    /// An entry inserted or replaced.
    Upsert(Allocation),
    /// An entry removed.
    Remove {
        /// Its container id.
        container_id: String,
        /// Its interface.
        ifname: String,
    },
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

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    len: u64,
    records: usize,
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
                .map_err(|source| StoreError::Write {
                    step: "drop the torn tail of",
                    path: path.to_owned(),
                    source,
                })?;
        }
        let count = records.len();
        Ok((
            Journal {
                path: path.to_owned(),
                file,
                len: good_len as u64,
                records: count,
            },
            records,
        ))
    }

    /// How many records it holds.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Appends `record` durably. On error the journal is cut back to what it
    /// was, so no partial line stays behind.
    pub fn append(&mut self, record: &Record) -> Result<()> {
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
                let _ = self.file.set_len(self.len);
                Err(StoreError::Write {
                    step: "append to",
                    path: self.path.clone(),
                    source,
                })
            }
        }
    }

    /// Empties the journal once a snapshot holds everything in it.
    pub fn reset(&mut self) -> Result<()> {
        self.file
            .set_len(0)
            .and_then(|()| self.file.sync_all())
            .map_err(|source| StoreError::Write {
                step: "truncate",
                path: self.path.clone(),
                source,
            })?;
        self.len = 0;
        self.records = 0;
        Ok(())
    }
}
