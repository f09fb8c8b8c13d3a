//! The on-disk form and its atomic, durable replacement.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::allocation::{from_rfc3339, rfc3339};
use crate::{Allocation, Result, StoreError};

/// The store's file name inside the state directory.
pub const FILE_NAME: &str = "allocations.json";

/// The schema this build writes and the newest it reads. Version 2 added
/// the `releasing` state and the release history; version 1 files load.
pub const SCHEMA_VERSION: u32 = 2;

/// When an address was last given back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Released {
    pub ip: IpAddr,
    #[serde(serialize_with = "rfc3339", deserialize_with = "from_rfc3339")]
    pub at: SystemTime,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FileOut<'a> {
    schema_version: u32,
    allocations: Vec<&'a Allocation>,
    released: Vec<Released>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileIn {
    schema_version: u32,
    allocations: Vec<Allocation>,
    #[serde(default)]
    released: Vec<Released>,
}

/// What a snapshot holds.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub allocations: Vec<Allocation>,
    pub released: Vec<Released>,
}

fn tmp_path(path: &Path) -> std::path::PathBuf {
    path.with_extension("json.tmp")
}

/// Reads the store. Missing → empty; a leftover temp file (a write that
/// never completed, so never acknowledged) is discarded.
pub fn load(dir: &Path, path: &Path) -> Result<Snapshot> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Write {
        step: "create",
        path: dir.to_owned(),
        source,
    })?;
    let _ = std::fs::remove_file(tmp_path(path));
    read(path)
}

/// Reads the snapshot without changing anything. Missing → empty.
pub fn read(path: &Path) -> Result<Snapshot> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Snapshot::default()),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    // Look at the version before the shape, so a newer file is reported as such.
    let version = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(|e| corrupt(e.to_string()))?
        .get("schemaVersion")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| corrupt("no schemaVersion".into()))?;
    if version > u64::from(SCHEMA_VERSION) {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found: u32::try_from(version).unwrap_or(u32::MAX),
            supported: SCHEMA_VERSION,
        });
    }
    let file: FileIn = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if file.schema_version == 0 {
        return Err(corrupt("schemaVersion 0".into()));
    }
    let mut keys = HashSet::new();
    for a in &file.allocations {
        if !keys.insert((a.container_id.as_str(), a.ifname.as_str())) {
            return Err(corrupt(format!(
                "container {} interface {} appears twice",
                a.container_id, a.ifname
            )));
        }
    }
    Ok(Snapshot {
        allocations: file.allocations,
        released: file.released,
    })
}

/// Replaces the file with `entries` and the release history: write a temp
/// file, fsync it, rename it over the old one, fsync the directory. A
/// failure removes the temp file and leaves the old snapshot in force.
pub fn write<'a>(
    path: &Path,
    entries: impl Iterator<Item = &'a Allocation>,
    released: Vec<Released>,
) -> Result<()> {
    let out = FileOut {
        schema_version: SCHEMA_VERSION,
        allocations: entries.collect(),
        released,
    };
    // Allocations have only string keys; serialising cannot fail.
    let mut bytes = serde_json::to_vec_pretty(&out).expect("allocations serialise");
    bytes.push(b'\n');
    rename_into_place(path, &tmp_path(path), &bytes)?;
    sync_dir(path)
}

fn fail(step: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Write { step, path, source }
}

/// Writes `bytes` to `tmp` (mode 0600), fsyncs it and renames it over
/// `path`. A failure removes the temp file and leaves `path` as it was.
pub(crate) fn rename_into_place(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    let written = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .map_err(fail("create", tmp))
        .and_then(|mut file| {
            file.write_all(bytes).map_err(fail("write", tmp))?;
            file.sync_all().map_err(fail("fsync", tmp))
        })
        .and_then(|()| std::fs::rename(tmp, path).map_err(fail("rename into place", path)));
    if written.is_err() {
        // Never acknowledged; the space it took is given back at once.
        let _ = std::fs::remove_file(tmp);
    }
    written
}

/// Makes a rename of `path` durable: fsyncs its directory.
pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail("fsync directory", dir))
}
