//! flock-netlink: the kernel side of a pod's network.
//!
//! A pod gets a routed veth: the host end `flock<8hex>` in the node's
//! namespace, the peer created directly inside the pod's namespace under
//! `CNI_IFNAME`. [`Dataplane::setup`] programs both ends, their addresses
//! and routes; [`Dataplane::teardown`] removes them, keeping the kernel's
//! slow veth unregistration off the caller's path; [`Dataplane::inspect`]
//! reports how the kernel differs from what a pod should have (CNI CHECK).
//! The route programmer installs anycast routes (plain or multipath) and
//! node-CIDR blackholes, each tagged with [`FLOCK_ROUTE_PROTOCOL`] so flock
//! can find and reconcile its own routes.
//!
//! Every operation is idempotent. Namespaces are entered only on dedicated
//! threads (see [`Netns`]); no task ever holds a `setns` across an `.await`.

mod conntrack;
mod error;
mod inspect;
mod link;
mod neighbour;
mod netns;
mod nftables;
mod pod;
mod reaper;
mod router;
mod routes;
mod sysctl;
mod watch;

pub use error::{NetlinkError, Result};
pub use inspect::Drift;
pub use netns::{Netns, NetnsRefusal, PodNetns, netns_inode};
pub use nftables::{Change, Element, ElementChange, Match, NewSet, NftElements, NftRule, SetKey};
pub use pod::{Dataplane, PodSpec, SetupStep, Teardown};
pub use router::find_routers;
pub use routes::{InstalledRoute, Nexthop, RouteKind, is_flock_iface};
pub use watch::AddressWatch;

use std::net::{Ipv4Addr, Ipv6Addr};

/// The protocol number on every route flock installs (`ip route show proto 97`).
pub const FLOCK_ROUTE_PROTOCOL: u8 = 97;

/// The IPv6 gateway every pod sees: a permanent neighbour entry in the pod
/// for the host end's MAC (the host end holds no address).
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The IPv4 gateway every pod sees: a permanent neighbour entry in the pod
/// for the host end's MAC (proxy ARP on the host end answers too).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
