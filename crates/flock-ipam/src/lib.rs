//! flock-ipam: the address allocator.
//!
//! It will own effective-CIDR resolution, random and ip-algo IPv6 interface
//! IDs with collision retries, lowest-free IPv4 allocation that skips the
//! network, gateway and broadcast addresses, and idempotent release. It is
//! pure: no I/O; the store it is seeded from lives in `flock-store`.
