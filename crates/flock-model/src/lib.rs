//! flock-model: the typed view of what operators and workloads tell flock.
//!
//! Operators describe each node with a [`NodeConfig`] (its prefixes,
//! family defaults, MTU and BGP peers) and consent to claimed IPs with
//! [`AddressPool`]s; workloads tune their addressing
//! with `flock.fritzlab.net/*` pod annotations. This crate turns both into
//! validated values, with errors that name the object, the field and the
//! bad value, and implements the precedence rules (pod annotation >
//! NodeConfig > built-in). It also parses `CNI_ARGS`, derives the workload
//! name ip-algo embeds, and names host interfaces. It does no I/O.

mod addresspool;
mod annotations;
mod bgp;
mod cni_args;
pub mod crd;
mod error;
mod iface;
mod ipalgo;
mod nodeconfig;
mod workload;

pub use addresspool::{AddressPool, AddressPoolSpec, AddressPoolStatus, Pool, PoolUse};
pub use annotations::{
    ADDRESSES, ANYCAST, CIDR4, CIDR6, FamilyDefaults, IP_ALGO, IPV4, IPV6, PodNetwork, claimed_ips,
    parse_pod_annotations,
};
pub use bgp::{
    Bfd, BfdSpec, BgpPeer, BgpPeerSpec, Communities, Community, ImportPolicy, LargeCommunity,
    Neighbor, PASSWORD_SECRET, Peer, PeerSpec, SecretKeyRef, check_password,
};
pub use cni_args::CniArgs;
pub use error::{ModelError, Result};
pub use iface::host_iface_name;
pub use ipalgo::resolve_ip_algo;
pub use nodeconfig::{
    BgpSpec, FamilyDefaultsSpec, NodeBgp, NodeConfig, NodeConfigSpec, NodeConfigStatus,
    NodeSettings,
};
pub use workload::{app_name, image_ref};
