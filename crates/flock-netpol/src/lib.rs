//! flock-netpol: `networking.k8s.io/v1` NetworkPolicy enforced with
//! nftables.
//!
//! The [`Engine`] keeps the translation of the cluster's pods, namespaces
//! and policies into nft objects for this node's pods — named sets owned by
//! each policy rule, a chain per isolated pod, two verdict maps — and
//! after every change says what changed ([`Delta`]). [`render_table`]
//! writes the whole table (start-up, healing), [`render_delta`] one
//! transaction of changes; [`Applier`] loads them with `nft -f -`.
//! [`translate`] is the same semantics as values, for tests.

mod apply;
mod engine;
mod render;
mod selector;
mod translate;

pub use apply::{Applier, ApplyError, Inventory, Loader};
pub use engine::{Decision, Delta, Desired, Engine, Explanation, SetSpec, Side};
pub use render::{DeltaParts, RenderError, TABLE, delta_parts, render_delta, render_table};
pub use selector::selects;
pub use translate::{
    AddrRanges, Allow, ClusterPod, Direction, Input, LocalPod, NamedPort, PodRules, PortSpec,
    Protocol, Ruleset, merge_ports, translate,
};
