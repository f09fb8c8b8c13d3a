//! Pods, namespaces and policies → per-pod allow lists (pure).
//!
//! Only the pods on this node get rules (the node enforces for its own
//! veths); the whole cluster's pods feed the peer sets and named ports.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::selector::selects;

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
    /// Labels.
    pub labels: BTreeMap<String, String>,
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
    fn add_ip(&mut self, ip: IpAddr) {
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

    fn extend(&mut self, other: &AddrRanges) {
        self.v4.extend_from_slice(&other.v4);
        self.v6.extend_from_slice(&other.v6);
    }

    fn normalize(&mut self) {
        merge(&mut self.v4);
        merge(&mut self.v6);
    }

    /// Whether no address is in it.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn contains(&self, ip: IpAddr) -> bool {
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
    /// `None`: any address. Shared by every pod the same rule applies to.
    pub peers: Option<Arc<AddrRanges>>,
    /// The destination ports; `None`: any protocol and port.
    pub ports: Option<Vec<PortSpec>>,
}

/// What a pod may do in one direction once isolated in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Direction {
    /// Allow rules (their union).
    pub allows: Vec<Allow>,
    /// Egress to named ports: lists of (peer address, protocol, that
    /// pod's port), one per rule, shared by the pods the rule applies to.
    pub pairs: Vec<Arc<Vec<(IpAddr, Protocol, u16)>>>,
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
fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match &spec.policy_types {
        Some(types) if !types.is_empty() => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        _ => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

/// One rule of a policy, compiled once for every pod it applies to.
#[derive(Debug, Clone, Default)]
struct CompiledRule {
    /// `None`: any peer.
    peers: Option<Arc<AddrRanges>>,
    /// Numeric port entries; `None`: any port.
    ports: Option<Vec<PortSpec>>,
    /// Named port entries (resolved per destination pod).
    named: Vec<(String, Protocol)>,
    /// Egress named ports resolved on the peer pods.
    pairs: Arc<Vec<(IpAddr, Protocol, u16)>>,
}

#[derive(Debug, Clone, Default)]
struct CompiledPolicy {
    ingress: Option<Vec<CompiledRule>>,
    egress: Option<Vec<CompiledRule>>,
}

struct Index<'a> {
    input: &'a Input<'a>,
    by_namespace: HashMap<&'a str, Vec<&'a ClusterPod>>,
}

impl<'a> Index<'a> {
    /// The pods one peer element selects, or `None` for an element without
    /// a selector.
    fn peer_pods(&self, policy_ns: &str, peer: &NetworkPolicyPeer) -> Option<Vec<&'a ClusterPod>> {
        if peer.namespace_selector.is_none() && peer.pod_selector.is_none() {
            return None;
        }
        let namespaces: Vec<&str> = match &peer.namespace_selector {
            None => vec![policy_ns],
            Some(sel) => self
                .input
                .namespaces
                .iter()
                .filter(|(_, labels)| selects(sel, labels))
                .map(|(name, _)| name.as_str())
                .collect(),
        };
        let mut out = Vec::new();
        for ns in namespaces {
            for pod in self.by_namespace.get(ns).into_iter().flatten() {
                if peer
                    .pod_selector
                    .as_ref()
                    .is_none_or(|sel| selects(sel, &pod.labels))
                {
                    out.push(*pod);
                }
            }
        }
        Some(out)
    }
}

/// Translates the cluster's policies into rules for this node's pods.
pub fn translate(input: &Input<'_>) -> Ruleset {
    let mut by_namespace: HashMap<&str, Vec<&ClusterPod>> = HashMap::new();
    let mut by_key: HashMap<(&str, &str), &ClusterPod> = HashMap::new();
    for pod in input.pods {
        by_namespace.entry(&pod.namespace).or_default().push(pod);
        by_key.insert((&pod.namespace, &pod.name), pod);
    }
    let mut policies_by_ns: HashMap<&str, Vec<(usize, &NetworkPolicy)>> = HashMap::new();
    for (i, p) in input.policies.iter().enumerate() {
        let ns = p.metadata.namespace.as_deref().unwrap_or("default");
        policies_by_ns.entry(ns).or_default().push((i, p));
    }
    let index = Index {
        input,
        by_namespace,
    };
    let mut compiled: HashMap<usize, CompiledPolicy> = HashMap::new();
    let mut warnings = Vec::new();
    let no_labels = BTreeMap::new();
    let mut pods = Vec::new();
    let mut local: Vec<&LocalPod> = input.local.iter().collect();
    local.sort_by(|a, b| a.iface.cmp(&b.iface));
    local.dedup_by(|a, b| a.iface == b.iface);
    for lp in local {
        let cluster_pod = by_key
            .get(&(lp.namespace.as_str(), lp.name.as_str()))
            .copied();
        let labels = cluster_pod.map_or(&no_labels, |p| &p.labels);
        let mut rules = PodRules {
            namespace: lp.namespace.clone(),
            name: lp.name.clone(),
            iface: lp.iface.clone(),
            ingress: None,
            egress: None,
        };
        for &(i, policy) in policies_by_ns
            .get(lp.namespace.as_str())
            .into_iter()
            .flatten()
        {
            let spec = policy.spec.as_ref();
            let selector = spec.and_then(|s| s.pod_selector.as_ref());
            if !selector.is_none_or(|sel| selects(sel, labels)) {
                continue;
            }
            let c = compiled
                .entry(i)
                .or_insert_with(|| compile(&index, policy, &mut warnings));
            let name = format!(
                "{}/{}",
                policy.metadata.namespace.as_deref().unwrap_or("default"),
                policy.metadata.name.as_deref().unwrap_or_default()
            );
            for (compiled_rules, direction, ingress) in [
                (&c.ingress, &mut rules.ingress, true),
                (&c.egress, &mut rules.egress, false),
            ] {
                let Some(compiled_rules) = compiled_rules else {
                    continue;
                };
                let d = direction.get_or_insert_with(Direction::default);
                d.policies.push(name.clone());
                for rule in compiled_rules {
                    let mut ports = rule.ports.clone();
                    if ingress && !rule.named.is_empty() {
                        // Named ports of the destination: this pod.
                        let resolved =
                            cluster_pod.into_iter().flat_map(|p| &p.ports).filter(|cp| {
                                rule.named
                                    .iter()
                                    .any(|(n, proto)| *n == cp.name && *proto == cp.protocol)
                            });
                        let list = ports.get_or_insert_with(Vec::new);
                        list.extend(resolved.map(|cp| PortSpec {
                            protocol: cp.protocol,
                            from: cp.port,
                            to: cp.port,
                        }));
                    }
                    let empty_ports = ports.as_ref().is_some_and(Vec::is_empty);
                    let empty_peers = rule.peers.as_ref().is_some_and(|p| p.is_empty());
                    if !empty_ports && !empty_peers {
                        if let Some(list) = ports.as_mut() {
                            list.sort_unstable();
                            list.dedup();
                        }
                        d.allows.push(Allow {
                            peers: rule.peers.clone(),
                            ports,
                        });
                    }
                    if !ingress && !rule.pairs.is_empty() {
                        d.pairs.push(rule.pairs.clone());
                    }
                }
            }
        }
        for d in [&mut rules.ingress, &mut rules.egress]
            .into_iter()
            .flatten()
        {
            d.pairs.sort_unstable();
            d.pairs.dedup();
            d.policies.sort();
            d.allows.dedup();
        }
        if rules.ingress.is_some() || rules.egress.is_some() {
            pods.push(rules);
        }
    }
    Ruleset { pods, warnings }
}

fn compile(
    index: &Index<'_>,
    policy: &NetworkPolicy,
    warnings: &mut Vec<String>,
) -> CompiledPolicy {
    let ns = policy.metadata.namespace.as_deref().unwrap_or("default");
    let name = format!(
        "NetworkPolicy {ns}/{}",
        policy.metadata.name.as_deref().unwrap_or_default()
    );
    let Some(spec) = policy.spec.as_ref() else {
        return CompiledPolicy {
            ingress: Some(Vec::new()),
            egress: None,
        };
    };
    let (ingress, egress) = policy_types(spec);
    let direction =
        |field: &str, egress: bool, rules: Vec<Rule<'_>>, warnings: &mut Vec<String>| {
            rules
                .into_iter()
                .enumerate()
                .map(|(i, (peers, ports))| {
                    let at = format!("{name}: spec.{field}[{i}]");
                    compile_rule(index, ns, peers, ports, egress, &at, warnings)
                })
                .collect()
        };
    CompiledPolicy {
        ingress: ingress.then(|| {
            let rules = spec.ingress.iter().flatten();
            let rules = rules
                .map(|r| (r.from.as_deref(), r.ports.as_deref()))
                .collect();
            direction("ingress", false, rules, warnings)
        }),
        egress: egress.then(|| {
            let rules = spec.egress.iter().flatten();
            let rules = rules
                .map(|r| (r.to.as_deref(), r.ports.as_deref()))
                .collect();
            direction("egress", true, rules, warnings)
        }),
    }
}

/// One rule's peers (`from` or `to`) and ports.
type Rule<'a> = (
    Option<&'a [NetworkPolicyPeer]>,
    Option<&'a [NetworkPolicyPort]>,
);

fn compile_rule(
    index: &Index<'_>,
    policy_ns: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    egress: bool,
    at: &str,
    warnings: &mut Vec<String>,
) -> CompiledRule {
    let field = if egress { "to" } else { "from" };
    let mut rule = CompiledRule::default();
    // Peers: absent or empty is everyone.
    let peers = peers.filter(|p| !p.is_empty());
    let mut peer_pods: Vec<&ClusterPod> = Vec::new();
    let mut blocks = AddrRanges::default();
    if let Some(peers) = peers {
        let mut ranges = AddrRanges::default();
        for (i, peer) in peers.iter().enumerate() {
            if let Some(block) = &peer.ip_block {
                match ip_block(block) {
                    Ok(r) => blocks.extend(&r),
                    Err(problem) => warnings.push(format!("{at}.{field}[{i}].ipBlock: {problem}")),
                }
                continue;
            }
            match index.peer_pods(policy_ns, peer) {
                Some(pods) => {
                    for pod in &pods {
                        for ip in &pod.ips {
                            ranges.add_ip(*ip);
                        }
                    }
                    peer_pods.extend(pods);
                }
                None => warnings.push(format!(
                    "{at}.{field}[{i}]: a peer needs podSelector, namespaceSelector or ipBlock"
                )),
            }
        }
        ranges.extend(&blocks);
        ranges.normalize();
        blocks.normalize();
        rule.peers = Some(Arc::new(ranges));
    }
    // Ports: absent or empty is every port of every protocol.
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return rule;
    };
    let mut numeric = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let Some(protocol) = Protocol::parse(p.protocol.as_deref()) else {
            warnings.push(format!(
                "{at}.ports[{i}].protocol: {:?} is not TCP, UDP or SCTP; the entry matches nothing",
                p.protocol.as_deref().unwrap_or_default()
            ));
            continue;
        };
        match &p.port {
            None => numeric.push(PortSpec {
                protocol,
                from: 0,
                to: u16::MAX,
            }),
            Some(IntOrString::Int(n)) => {
                let end = p.end_port.unwrap_or(*n);
                match (u16::try_from(*n), u16::try_from(end)) {
                    (Ok(from), Ok(to)) if from >= 1 && to >= from => numeric.push(PortSpec {
                        protocol,
                        from,
                        to,
                    }),
                    _ => warnings.push(format!(
                        "{at}.ports[{i}]: port {n} to endPort {end} is not a valid range; the entry matches nothing"
                    )),
                }
            }
            Some(IntOrString::String(name)) => {
                if p.end_port.is_some() {
                    warnings.push(format!(
                        "{at}.ports[{i}].endPort: not allowed with the named port {name:?}; the entry matches nothing"
                    ));
                    continue;
                }
                rule.named.push((name.clone(), protocol));
            }
        }
    }
    rule.ports = Some(numeric);
    if egress && !rule.named.is_empty() {
        // Named ports of the destination: the peer pods. Without `to`,
        // every pod of the cluster; an ipBlock covers the pods inside it.
        let candidates: Vec<(&ClusterPod, bool)> = match peers {
            None => index.input.pods.iter().map(|p| (p, true)).collect(),
            Some(_) => {
                let in_blocks = index.input.pods.iter().filter(|_| !blocks.is_empty());
                peer_pods
                    .iter()
                    .map(|p| (*p, true))
                    .chain(in_blocks.map(|p| (p, false)))
                    .collect()
            }
        };
        let mut pairs = Vec::new();
        for (pod, selected) in candidates {
            for cp in &pod.ports {
                if !rule
                    .named
                    .iter()
                    .any(|(n, proto)| *n == cp.name && *proto == cp.protocol)
                {
                    continue;
                }
                for ip in &pod.ips {
                    if selected || blocks.contains(*ip) {
                        pairs.push((*ip, cp.protocol, cp.port));
                    }
                }
            }
        }
        pairs.sort_unstable();
        pairs.dedup();
        rule.pairs = Arc::new(pairs);
    }
    rule
}

/// An ipBlock's addresses: `cidr` (host bits masked) minus each `except`.
fn ip_block(block: &k8s_openapi::api::networking::v1::IPBlock) -> Result<AddrRanges, String> {
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
