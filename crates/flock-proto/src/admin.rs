//! The agent's read-only admin API, which `flockctl` reads: one request
//! line and one response line of JSON per unix-socket connection, framed
//! like the plugin's RPC ([`crate::rpc::write_frame`],
//! [`crate::rpc::read_frame`]).
//!
//! A request names its command: `{"command":"status"}`. The response has
//! one key: `{"status":{…}}` with what was asked, or `{"error":"…"}` when the
//! agent could not answer (nothing is ever changed by a request).

use serde::{Deserialize, Serialize};

/// Where the agent serves the admin API unless `--admin-socket` says
/// otherwise (beside the plugin's socket).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/flock/admin.sock";

/// The largest admin frame either side accepts (a node's pods and routes).
pub const MAX_ADMIN_FRAME_BYTES: usize = 16 << 20;

/// What `flockctl` asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "camelCase")]
pub enum AdminRequest {
    /// The node at a glance.
    Status,
    /// Every allocation on the node.
    Pods,
    /// The store against the kernel against the datastore.
    IpamCheck,
    /// Anycast and `addresses` IPs: local nexthops and announcement.
    Anycast,
    /// BIRD's sessions and route counts.
    Bgp,
    /// The node's settings flock relies on, checked.
    Doctor,
    /// What NetworkPolicy decides for one connection, and why.
    #[serde(rename_all = "camelCase")]
    PolicyExplain {
        /// The source: `namespace/name` of a pod, or an IP.
        src: String,
        /// The destination: `namespace/name` of a pod, or an IP.
        dst: String,
        /// The destination port.
        port: u16,
        /// `TCP`, `UDP` or `SCTP`.
        protocol: String,
    },
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AdminResponse {
    /// For [`AdminRequest::Status`].
    Status(Box<Status>),
    /// For [`AdminRequest::Pods`].
    Pods(Vec<PodEntry>),
    /// For [`AdminRequest::IpamCheck`].
    IpamCheck(IpamReport),
    /// For [`AdminRequest::Anycast`].
    Anycast(Vec<AnycastEntry>),
    /// For [`AdminRequest::Bgp`].
    Bgp(Bgp),
    /// For [`AdminRequest::Doctor`].
    Doctor(Vec<Check>),
    /// For [`AdminRequest::PolicyExplain`].
    PolicyExplain(Box<PolicyVerdict>),
    /// The request could not be answered: why.
    Error(String),
}

/// `status`: the node, its NodeConfig, readiness, warnings, pools and BIRD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The node's name.
    pub node: String,
    /// The agent's version.
    pub version: String,
    /// The NodeConfig in force, if one is.
    pub node_config: Option<NodeConfigSummary>,
    /// Whether ADD is served.
    pub ready: bool,
    /// Why not, when not ready.
    pub reason: Option<String>,
    /// Every warning, each prefixed with the part that posts it.
    pub warnings: Vec<String>,
    /// The node's pools and their use.
    pub pools: Vec<PoolUsage>,
    /// Allocations in the store.
    pub allocations: usize,
    /// BIRD's sessions.
    pub bird: Bgp,
}

/// The NodeConfig in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeConfigSummary {
    /// Its name.
    pub name: String,
    /// The node's IPv6 prefix.
    pub cidr6: Option<String>,
    /// The node's IPv4 prefix.
    pub cidr4: Option<String>,
    /// The node's ASN, when it speaks BGP.
    pub asn: Option<u32>,
}

/// One pool: the prefix and how much of it is in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    /// The prefix.
    pub cidr: String,
    /// Addresses held.
    pub used: u64,
    /// Addresses it can hand out (absent for IPv6, which does not run out).
    pub capacity: Option<u64>,
}

/// One allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEntry {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// The sandbox's container id.
    pub container_id: String,
    /// The interface inside the pod.
    pub ifname: String,
    /// The host end of the veth.
    pub host_iface: String,
    /// The pod's own addresses.
    pub addresses: Vec<String>,
    /// Anycast IPs it carries.
    pub anycast: Vec<String>,
    /// Extra public (`addresses`) IPs it carries.
    pub extra: Vec<String>,
    /// `pending`, `committed` or `releasing`.
    pub state: String,
}

/// `ipam check`: what was compared and every problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamReport {
    /// Store entries compared.
    pub entries: usize,
    /// flock veths found on the node.
    pub links: usize,
    /// flock host routes found on the node.
    pub routes: usize,
    /// Pods in the datastore compared.
    pub datastore_pods: usize,
    /// Each problem, named.
    pub problems: Vec<IpamProblem>,
}

/// The kinds of `ipam check` problems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProblemKind {
    /// A store entry whose veth or pod sandbox is gone.
    Leaked,
    /// A flock veth or host route with no store entry.
    Orphaned,
    /// One address in two entries, or held here and reported by another pod.
    Duplicate,
}

/// One problem, with what names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamProblem {
    /// Which kind.
    pub kind: ProblemKind,
    /// The container id, when an entry is involved.
    pub container_id: Option<String>,
    /// The host interface involved.
    pub interface: Option<String>,
    /// The address involved.
    pub address: Option<String>,
    /// What is wrong, in a sentence.
    pub detail: String,
}

/// One anycast or `addresses` IP held on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AnycastEntry {
    /// The IP.
    pub ip: String,
    /// `anycast` or `addresses`.
    pub kind: String,
    /// The local pods carrying it, each with whether it is routed to.
    pub nexthops: Vec<Nexthop>,
    /// Whether the node routes it (and so announces it).
    pub announced: bool,
    /// Why, or why not.
    pub why: String,
}

/// A local pod carrying an anycast or `addresses` IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Nexthop {
    /// `namespace/name` of the pod.
    pub pod: String,
    /// The host end of its veth.
    pub host_iface: String,
    /// Whether the kernel's route to the IP goes through it.
    pub routed: bool,
}

/// `bgp`: BIRD's sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bgp {
    /// Each BGP protocol BIRD runs.
    pub sessions: Vec<Session>,
    /// Why BIRD could not be asked, when it could not.
    pub error: Option<String>,
}

/// One BGP session as BIRD reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Session {
    /// The protocol's name (`peer_…`).
    pub name: String,
    /// BIRD's protocol state (`up`, `start`, …).
    pub state: String,
    /// Since when.
    pub since: String,
    /// BIRD's info column (`Established`, `Active`, …).
    pub info: String,
    /// Routes imported, by channel (`ipv4`, `ipv6`).
    pub imported: Vec<(String, u64)>,
    /// Routes exported, by channel.
    pub exported: Vec<(String, u64)>,
    /// The prefixes exported (`bgp` only; empty in `status`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exported_routes: Vec<String>,
}

/// `policy explain`: the verdict on one connection and what decides it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyVerdict {
    /// The source.
    pub src: Endpoint,
    /// The destination.
    pub dst: Endpoint,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// The destination port.
    pub port: u16,
    /// Whether the connection is allowed (both sides let it through).
    pub allowed: bool,
    /// The source pod's egress.
    pub egress: SideVerdict,
    /// The destination pod's ingress.
    pub ingress: SideVerdict,
}

/// One end of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// `namespace/name` when it is a pod.
    pub pod: Option<String>,
    /// The address used.
    pub ip: String,
    /// The pod's node, when known.
    pub node: Option<String>,
}

/// One side's verdict: the source's egress or the destination's ingress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SideVerdict {
    /// The node that enforces this side (the pod's), when it is a pod.
    pub enforced_by: Option<String>,
    /// Whether this side lets the connection through.
    pub allowed: bool,
    /// The policy that allows (`namespace/name`).
    pub policy: Option<String>,
    /// Its rule (`spec.ingress[1]`).
    pub rule: Option<String>,
    /// The rule's peer that admits the other end (`from[0]`, `ipBlock
    /// to[2]`, `any peer`).
    pub peer: Option<String>,
    /// When denied: the policies isolating the pod in this direction.
    pub isolated_by: Vec<String>,
    /// The verdict in a sentence.
    pub reason: String,
}

/// One `doctor` check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// What was checked (`forwarding`, `cni config`, …).
    pub check: String,
    /// The outcome.
    pub verdict: Verdict,
    /// What was found, and what to do when it is not fine.
    pub detail: String,
}

/// A check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Verdict {
    /// As flock needs it.
    Ok,
    /// Works, but not as it should (anycast hashing, another CNI first).
    Warning,
    /// Broken: pods or announcements suffer.
    Problem,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_responses_read_as_documented() {
        assert_eq!(
            String::from_utf8(crate::rpc::encode(&AdminRequest::IpamCheck)).expect("utf8"),
            "{\"command\":\"ipamCheck\"}\n"
        );
        let error = AdminResponse::Error("x".into());
        assert_eq!(
            String::from_utf8(crate::rpc::encode(&error)).expect("utf8"),
            "{\"error\":\"x\"}\n"
        );
        let parsed: AdminRequest =
            serde_json::from_str("{\"command\":\"status\"}").expect("status");
        assert_eq!(parsed, AdminRequest::Status);
    }
}
