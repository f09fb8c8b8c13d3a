//! flock-netpol: `networking.k8s.io/v1` NetworkPolicy enforced with
//! nftables.
//!
//! Three steps: [`translate`] (pure) turns the cluster's pods, namespaces
//! and policies into per-pod allow lists for the pods on this node;
//! [`render`] (pure) writes them as one `table inet flock` script, with
//! verdict maps dispatching on the pod's veth and every peer and port in a
//! named set; [`Applier`] loads it with one atomic `nft -f -` and heals the
//! table when someone else changes it.

mod apply;
mod render;
mod selector;
mod translate;

pub use apply::{Applied, Applier, ApplyError, Loader};
pub use render::{RenderError, TABLE, render};
pub use selector::selects;
pub use translate::{
    AddrRanges, Allow, ClusterPod, Direction, Input, LocalPod, NamedPort, PodRules, PortSpec,
    Protocol, Ruleset, translate,
};
