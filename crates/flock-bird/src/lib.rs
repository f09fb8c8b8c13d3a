//! flock-bird: the node's BGP announcements through a BIRD 2 sidecar.
//!
//! It will own the pure, validated rendering of `bird.conf` from the
//! NodeConfig and the active anycast/address set, and the writer that
//! replaces the file atomically and reloads BIRD with `birdc configure`,
//! coalescing bursts of changes.
