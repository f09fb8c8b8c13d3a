//! Pods, namespaces and policies → per-pod allow lists (pure).
//!
//! Only the pods on this node get rules (the node enforces for its own
//! veths); the whole cluster's pods feed the peer sets and named ports.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};

/// A transport protocol NetworkPolicy can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

impl Protocol {
    /// Parses a Kubernetes protocol name; absent means TCP.
    pub fn parse(name: Option<&str>) -> Option<Protocol> {
        match name.unwrap_or("TCP") {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The nft keyword.
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// A container port with a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    /// `containers[].ports[].name`.
    pub name: String,
    /// The number.
    pub port: u16,
    /// The protocol.
    pub protocol: Protocol,
}

/// A pod of the cluster, as policy sees it. Terminated pods must be left
/// out: their IPs may already belong to someone else.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels (shared with the datastore's copy of the pod).
    pub labels: Arc<BTreeMap<String, String>>,
    /// Its addresses (at most one per family).
    pub ips: Vec<IpAddr>,
    /// Its named container ports.
    pub ports: Vec<NamedPort>,
}

/// A pod on this node: which veth carries its traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The host end of its veth.
    pub iface: String,
}

/// Everything translation reads.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Every live pod of the cluster (this node's included).
    pub pods: &'a [ClusterPod],
    /// The pods on this node.
    pub local: &'a [LocalPod],
    /// Namespaces and their labels.
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// Every NetworkPolicy.
    pub policies: &'a [NetworkPolicy],
}

/// Address ranges, per family, sorted and merged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrRanges {
    /// IPv4 ranges (inclusive).
    pub v4: Vec<(u32, u32)>,
    /// IPv6 ranges (inclusive).
    pub v6: Vec<(u128, u128)>,
}

impl AddrRanges {
    pub(crate) fn add_ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => self.v4.push((a.into(), a.into())),
            IpAddr::V6(a) => self.v6.push((a.into(), a.into())),
        }
    }

    fn add_net_except(&mut self, net: IpNet, except: &[IpNet]) {
        match net {
            IpNet::V4(n) => {
                let mut ranges = vec![(u32::from(n.network()), u32::from(n.broadcast()))];
                for e in except.iter().filter_map(|e| match e {
                    IpNet::V4(e) => Some((u32::from(e.network()), u32::from(e.broadcast()))),
                    IpNet::V6(_) => None,
                }) {
                    ranges = subtract(ranges, e);
                }
                self.v4.extend(ranges);
            }
            IpNet::V6(n) => {
                let mut ranges = vec![(u128::from(n.network()), u128::from(n.broadcast()))];
                for e in except.iter().filter_map(|e| match e {
                    IpNet::V6(e) => Some((u128::from(e.network()), u128::from(e.broadcast()))),
                    IpNet::V4(_) => None,
                }) {
                    ranges = subtract(ranges, e);
                }
                self.v6.extend(ranges);
            }
        }
    }

    pub(crate) fn extend(&mut self, other: &AddrRanges) {
        self.v4.extend_from_slice(&other.v4);
        self.v6.extend_from_slice(&other.v6);
    }

    pub(crate) fn normalize(&mut self) {
        merge(&mut self.v4);
        merge(&mut self.v6);
    }

    /// The IPv4 ranges as nft interval elements.
    pub(crate) fn v4_elements(&self) -> Vec<String> {
        self.v4
            .iter()
            .map(|&(lo, hi)| {
                nft_range(
                    std::net::Ipv4Addr::from(lo),
                    std::net::Ipv4Addr::from(hi),
                    lo == hi,
                )
            })
            .collect()
    }

    /// The IPv6 ranges as nft interval elements.
    pub(crate) fn v6_elements(&self) -> Vec<String> {
        self.v6
            .iter()
            .map(|&(lo, hi)| {
                nft_range(
                    std::net::Ipv6Addr::from(lo),
                    std::net::Ipv6Addr::from(hi),
                    lo == hi,
                )
            })
            .collect()
    }

    /// Whether no address is in it.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().any(|&(lo, hi)| lo <= a && a <= hi)
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().any(|&(lo, hi)| lo <= a && a <= hi)
            }
        }
    }
}

fn nft_range(lo: impl std::fmt::Display, hi: impl std::fmt::Display, single: bool) -> String {
    if single {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// `ranges` without `(lo, hi)`.
fn subtract<T>(ranges: Vec<(T, T)>, (lo, hi): (T, T)) -> Vec<(T, T)>
where
    T: Copy + Ord + std::ops::Add<Output = T> + std::ops::Sub<Output = T> + From<u8>,
{
    let one = T::from(1);
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for (a, b) in ranges {
        if hi < a || lo > b {
            out.push((a, b));
            continue;
        }
        if a < lo {
            out.push((a, lo - one));
        }
        if hi < b {
            out.push((hi + one, b));
        }
    }
    out
}

/// Sorts and merges overlapping or adjacent ranges.
fn merge<T>(ranges: &mut Vec<(T, T)>)
where
    T: Copy + Ord + std::ops::Sub<Output = T> + From<u8>,
{
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(lo, hi) in ranges.iter() {
        if let Some(last) = out.last_mut()
            && (lo <= last.1 || lo - last.1 == T::from(1))
        {
            last.1 = last.1.max(hi);
            continue;
        }
        out.push((lo, hi));
    }
    *ranges = out;
}

/// Destination ports of one protocol, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    /// The protocol.
    pub protocol: Protocol,
    /// First port.
    pub from: u16,
    /// Last port.
    pub to: u16,
}

/// One allow rule of a pod in one direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// The peer addresses (source for ingress, destination for egress);
    /// `None`: any address.
    pub peers: Option<Arc<AddrRanges>>,
    /// The destination ports, disjoint per protocol; `None`: any protocol
    /// and port.
    pub ports: Option<Vec<PortSpec>>,
    /// The name prefix of the rule's sets.
    pub sets: Option<String>,
    /// The name prefixes of its pod peers' sets (`_p4`/`_p6`), one per
    /// peer with selectors.
    pub peer_sets: Vec<String>,
    /// Whether it has IPv4 and IPv6 ipBlocks (`_b4`/`_b6` sets).
    pub blocks: (bool, bool),
}

/// What a pod may do in one direction once isolated in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Direction {
    /// Allow rules (their union).
    pub allows: Vec<Allow>,
    /// Egress to named ports: lists of (peer address, protocol, that
    /// pod's port), one per rule.
    pub pairs: Vec<Arc<Vec<(IpAddr, Protocol, u16)>>>,
    /// The set name prefixes of those rules (`_n4`/`_n6` sets).
    pub pair_sets: Vec<String>,
    /// The policies isolating the pod in this direction (`ns/name`).
    pub policies: Vec<String>,
}

/// The rules of one pod on this node. `None` in a direction: not isolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRules {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The host end of its veth.
    pub iface: String,
    /// Ingress, if isolated.
    pub ingress: Option<Direction>,
    /// Egress, if isolated.
    pub egress: Option<Direction>,
}

/// The translation: the isolated pods of this node (by interface name)
/// and what was wrong in the input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    /// Isolated pods, sorted by interface.
    pub pods: Vec<PodRules>,
    /// Problems found, each naming the policy and the field; the offending
    /// part is left out (it allows nothing; the pod stays isolated).
    pub warnings: Vec<String>,
}

impl Ruleset {
    /// The rules of the pod on `iface`, if it is isolated.
    pub fn pod(&self, iface: &str) -> Option<&PodRules> {
        self.pods
            .binary_search_by(|p| p.iface.as_str().cmp(iface))
            .ok()
            .map(|i| &self.pods[i])
    }
}

/// Which directions a policy applies to: `policyTypes`, or when it is
/// absent or empty, Ingress plus Egress when it has egress rules.
pub(crate) fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

/// Sorts ports and merges, per protocol, the ranges that overlap or touch,
/// so the intervals of one set never overlap (nft refuses overlapping
/// intervals: a protocol-only entry beside a port, a range holding a listed
/// port, a named port inside a range, a duplicate).
pub fn merge_ports(ports: &mut Vec<PortSpec>) {
    ports.sort_unstable();
    let mut out: Vec<PortSpec> = Vec::with_capacity(ports.len());
    for p in ports.iter() {
        if let Some(last) = out.last_mut()
            && last.protocol == p.protocol
            && u32::from(p.from) <= u32::from(last.to) + 1
        {
            last.to = last.to.max(p.to);
            continue;
        }
        out.push(*p);
    }
    *ports = out;
}

/// Translates the cluster's policies into rules for this node's pods (the
/// whole input at once; the agent keeps an [`crate::Engine`] instead).
pub fn translate(input: &Input<'_>) -> Ruleset {
    let mut engine = crate::Engine::new();
    engine.set_namespaces(input.namespaces.clone());
    for pod in input.pods {
        engine.upsert_pod(pod.clone());
    }
    for lp in input.local {
        engine.upsert_local(lp.clone());
    }
    engine.set_policies(input.policies);
    engine.refresh();
    engine.ruleset()
}

/// An ipBlock's addresses: `cidr` (host bits masked) minus each `except`.
pub(crate) fn ip_block(
    block: &k8s_openapi::api::networking::v1::IPBlock,
) -> Result<AddrRanges, String> {
    let cidr: IpNet = parse_net(&block.cidr).map_err(|e| format!("cidr: {e}"))?;
    let mut except = Vec::new();
    for (i, e) in block.except.iter().flatten().enumerate() {
        let net = parse_net(e).map_err(|problem| format!("except[{i}]: {problem}"))?;
        if !(cidr.contains(&net) && net.prefix_len() > cidr.prefix_len()) {
            return Err(format!(
                "except[{i}]: {e:?} is not strictly inside cidr {:?}",
                block.cidr
            ));
        }
        except.push(net);
    }
    let mut r = AddrRanges::default();
    r.add_net_except(cidr.trunc(), &except);
    r.normalize();
    Ok(r)
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| format!("{s:?} is not a CIDR"))
}
