//! flock-store: the durable record of every allocation on this node.
//!
//! It will own `allocations.json`: pending and committed entries keyed by
//! container id and interface, written atomically (temp file, fsync, rename,
//! fsync of the directory) and never silently replaced by an empty file when
//! it cannot be read.
