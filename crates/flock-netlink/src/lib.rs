//! flock-netlink: the kernel side of a pod's network.
//!
//! It will own safe network-namespace entry, the routed veth setup and
//! teardown of a pod, kernel-state inspection for CNI CHECK, and the host
//! routes flock installs (anycast multipath routes, node-CIDR blackholes),
//! all tagged with flock's own route protocol number.
