//! flock-netpol: NetworkPolicy enforced with nftables.
//!
//! It will own the pure translation of pods, namespaces and
//! `networking.k8s.io/v1` NetworkPolicies into per-pod rules, the pure
//! rendering of one `table inet flock` script with verdict-map dispatch and
//! named sets, and its atomic application with `nft -f -`.
