//! flock-anycast: keeps anycast and `addresses` IPs of Ready pods routed.
//!
//! It will own the pure resolver from allocations and pod readiness to the
//! desired nexthop sets, and the reconciler that diffs them against the
//! installed multipath routes and changes only what differs.
