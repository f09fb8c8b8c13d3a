//! The translation, kept incrementally: the cluster's pods, namespaces and
//! policies in, this node's nft objects out, and after each change only
//! the objects it touched.
//!
//! Every rule of a policy that selects a pod of this node (an *active*
//! policy) has named sets: one pair per pod peer, named for the peer
//! (`q<hash>_p4`/`_p6`: its scope and selectors) and shared by every rule
//! naming the same peer, and its own for its ipBlocks and named-port pairs
//! (`r<hash>_i0_b4`: policy hash, ingress rule 0, ipBlocks, IPv4). A pod
//! joining or leaving a peer changes one element per family, however many
//! rules name the peer. The other policies of the cluster keep no peers
//! and own nothing in the table: a node holds sets for the policies of its
//! own pods, not for the cluster's. Every isolated pod on this node owns its chains (`in_<iface>`,
//! `out_<iface>`) and its verdict map elements. [`Engine::refresh`] turns
//! what changed since the last call into a [`Delta`] (set elements,
//! chains, map elements); [`Engine::desired`] is the whole table, for
//! start-up and healing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::selector::selects;

mod explain;
use crate::translate::{
    AddrRanges, Allow, ClusterPod, Direction, LocalPod, PodRules, PortSpec, Protocol, Ruleset,
    ip_block, merge_ports, policy_types,
};
pub use explain::{Decision, Explanation, Side};

type Key = (String, String);
type Labels = BTreeMap<String, String>;

/// One named set: its nft type, whether it holds intervals, its elements
/// (as nft writes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetSpec {
    /// `ipv4_addr`, `ipv6_addr . inet_proto . inet_service`, …
    pub ty: &'static str,
    /// `flags interval`.
    pub interval: bool,
    /// The elements, sorted.
    pub elements: BTreeSet<String>,
}

/// The whole table flock wants: named sets, pod chains and the two
/// verdict maps (interface → chain).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Sets by name.
    pub sets: BTreeMap<String, SetSpec>,
    /// Pod chains by name: their rules in order.
    pub chains: BTreeMap<String, Vec<String>>,
    /// `egress_pods`: interface → chain.
    pub egress: BTreeMap<String, String>,
    /// `ingress_pods`: interface → chain.
    pub ingress: BTreeMap<String, String>,
}

/// What changed in the table since the last [`Engine::refresh`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// Sets to create (with their elements).
    pub new_sets: BTreeMap<String, SetSpec>,
    /// Elements to add to existing sets.
    pub add_elements: BTreeMap<String, BTreeSet<String>>,
    /// Elements to remove from existing sets.
    pub remove_elements: BTreeMap<String, BTreeSet<String>>,
    /// Chains to create or replace, with their rules.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Map elements to add: (map, interface, chain).
    pub add_map: Vec<(&'static str, String, String)>,
    /// Map elements to remove: (map, interface).
    pub remove_map: Vec<(&'static str, String)>,
    /// Chains to delete.
    pub delete_chains: BTreeSet<String>,
    /// Sets to delete.
    pub delete_sets: BTreeSet<String>,
}

impl Delta {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self == &Delta::default()
    }
}

/// One peer element with selectors.
#[derive(Debug, Clone)]
struct PeerSel {
    /// `None`: the policy's own namespace.
    namespaces: Option<LabelSelector>,
    /// `None`: every pod of the selected namespaces.
    pods: Option<LabelSelector>,
    /// Its sets' name prefix (`q<hash>`), from what it selects
    /// ([`peer_key`]): every rule with the same peer shares its sets, so
    /// a pod joining a peer many policies name is one element per family,
    /// not one per rule.
    set: String,
    /// Its index in the rule's `from`/`to`.
    at: usize,
}

/// One rule of a policy.
#[derive(Debug, Clone)]
struct Rule {
    /// Its sets' name prefix.
    base: String,
    egress: bool,
    /// `None`: any peer.
    peers: Option<Vec<PeerSel>>,
    /// ipBlock addresses.
    blocks: AddrRanges,
    /// Each ipBlock peer's addresses, with its index in the rule's
    /// `from`/`to` (to name the one that admits an address).
    block_at: Vec<(usize, AddrRanges)>,
    /// Numeric ports; `None`: any.
    ports: Option<Vec<PortSpec>>,
    /// Named ports (resolved on the destination).
    named: Vec<(String, Protocol)>,
    /// Pod peers' addresses by peer (its index in `peers`), counted (two
    /// pods of one address count twice).
    members: BTreeMap<(usize, IpAddr), u32>,
    /// Egress named ports resolved on the peer pods, counted.
    pairs: BTreeMap<(IpAddr, Protocol, u16), u32>,
    /// Members that came or went since the last refresh.
    moved_members: BTreeSet<(usize, IpAddr)>,
    /// Pairs that came or went since the last refresh.
    moved_pairs: BTreeSet<(IpAddr, Protocol, u16)>,
}

impl Rule {
    fn has_pod_peers(&self) -> bool {
        self.peers.as_ref().is_some_and(|p| !p.is_empty())
    }

    fn wants_pairs(&self) -> bool {
        self.egress && !self.named.is_empty()
    }

    fn selects_by_namespace(&self) -> bool {
        self.peers.iter().flatten().any(|p| p.namespaces.is_some())
    }
}

#[derive(Debug, Clone)]
struct Compiled {
    /// `ns/name`.
    name: String,
    /// Its rules' set names start with it (`r<hash>`).
    prefix: String,
    /// `None`: every pod of the namespace.
    selector: Option<LabelSelector>,
    ingress: Option<Vec<Rule>>,
    egress: Option<Vec<Rule>>,
    warnings: Vec<String>,
}

/// Which rule: policy, egress, index.
type RuleId = (Key, bool, usize);

/// The incremental translation.
#[derive(Debug, Default)]
pub struct Engine {
    pods: HashMap<Key, ClusterPod>,
    /// Pods whose place in peer sets waits for the next refresh (see
    /// [`Engine::upsert_pod_peers_later`]): the view that is counted in
    /// the rules' members (`None`: none is).
    pending: HashMap<Key, Option<ClusterPod>>,
    /// Pod names by namespace, so a rule looks at the pods it can select.
    pods_by_ns: HashMap<String, BTreeSet<String>>,
    /// Rules selecting pods of the policy's own namespace, by namespace.
    same_ns_rules: HashMap<String, BTreeSet<RuleId>>,
    /// Rules selecting by namespace labels, by the namespaces they select.
    cross_rules: HashMap<String, BTreeSet<RuleId>>,
    /// Rules every pod may contribute to (named-port pairs of any peer or
    /// of an ipBlock).
    open_rules: BTreeSet<RuleId>,
    local: BTreeMap<String, LocalPod>,
    local_by_key: HashMap<Key, BTreeSet<String>>,
    /// Local pods' interfaces by namespace.
    local_by_ns: HashMap<String, BTreeSet<String>>,
    /// Policies selecting a local pod: only their rules are indexed,
    /// counted and own sets.
    active: BTreeSet<Key>,
    namespaces: BTreeMap<String, Labels>,
    policies: BTreeMap<Key, Compiled>,
    by_ns: HashMap<String, BTreeSet<Key>>,
    /// Policies nft refused: they isolate but allow nothing.
    disabled: BTreeSet<Key>,
    /// The policies as given, to tell a change from a repeat.
    sources: BTreeMap<Key, Arc<NetworkPolicy>>,
    desired: Desired,
    /// Rules whose sets are rebuilt whole at the next refresh.
    dirty_rules: BTreeSet<RuleId>,
    /// Rules whose members or pairs moved one by one (their sets change
    /// by those elements only).
    moved_rules: BTreeSet<RuleId>,
    /// Sets of removed or recompiled policies, to drop unless recreated.
    stale_sets: BTreeSet<String>,
    /// Active rules by the names of their sets (a peer's sets may have
    /// several): a set stays while one of them is live.
    set_rules: HashMap<String, Vec<RuleId>>,
    /// Names given to policies and peers: what each stands for (the
    /// policy's `ns/name`, the peer's scope and selectors), and how many
    /// hold it.
    names: HashMap<String, (String, u32)>,
    dirty_ifaces: BTreeSet<String>,
}

/// FNV-1a, 64 bits.
fn fnv64(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn key_of(p: &NetworkPolicy) -> Key {
    (
        p.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

impl Engine {
    /// An engine with nothing in it.
    pub fn new() -> Engine {
        Engine::default()
    }

    // --- inputs ---------------------------------------------------------

    /// Adds or replaces a cluster pod (this node's too). Pods that are
    /// gone, terminating or whose addresses belong to another must not be
    /// given: the caller resolves ownership.
    pub fn upsert_pod(&mut self, pod: ClusterPod) {
        let key = (pod.namespace.clone(), pod.name.clone());
        let shown = self.pods.remove(&key);
        let pending = self.pending.remove(&key);
        let counted = match &pending {
            Some(counted) => counted.as_ref(),
            None => shown.as_ref(),
        };
        if counted != Some(&pod) {
            if let Some(counted) = counted {
                let counted = counted.clone();
                self.account(&counted, false);
            }
            self.account(&pod, true);
        }
        self.show_pod(key, shown, pod);
    }

    /// [`Engine::upsert_pod`] for a pod of this node being added: which
    /// policies select it, and so its chains, follow at once; its place in
    /// the peer sets of rules (other pods' business) waits for the next
    /// [`Engine::refresh`], so that an ADD's isolation
    /// ([`Engine::refresh_iface`]) does not judge every rule's peers. Until
    /// then the sets leave the pod out: closed to it, never open.
    pub fn upsert_pod_peers_later(&mut self, pod: ClusterPod) {
        let key = (pod.namespace.clone(), pod.name.clone());
        let shown = self.pods.remove(&key);
        if !self.pending.contains_key(&key) {
            self.pending.insert(key.clone(), shown.clone());
        }
        self.show_pod(key, shown, pod);
    }

    /// Makes `pod` the view selection uses (`shown`: the one before).
    fn show_pod(&mut self, key: Key, shown: Option<ClusterPod>, pod: ClusterPod) {
        let labels_or_ports_changed = shown
            .as_ref()
            .is_none_or(|o| o.labels != pod.labels || o.ports != pod.ports);
        if shown.is_none() {
            self.pods_by_ns
                .entry(key.0.clone())
                .or_default()
                .insert(key.1.clone());
        }
        self.pods.insert(key.clone(), pod);
        if labels_or_ports_changed && self.local_by_key.contains_key(&key) {
            self.touch_local(&key);
            self.update_active_in(&key.0.clone(), Some(&key), true);
        }
    }

    /// Counts the pods whose accounting waited in their rules' peers.
    fn account_pending(&mut self) {
        for (key, counted) in std::mem::take(&mut self.pending) {
            let shown = self.pods.get(&key).cloned();
            if counted == shown {
                continue;
            }
            if let Some(counted) = &counted {
                self.account(counted, false);
            }
            if let Some(shown) = &shown {
                self.account(shown, true);
            }
        }
    }

    /// Removes a cluster pod.
    pub fn remove_pod(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(old) = self.pods.remove(&key) {
            if let Some(names) = self.pods_by_ns.get_mut(namespace) {
                names.remove(name);
                if names.is_empty() {
                    self.pods_by_ns.remove(namespace);
                }
            }
            let counted = self.pending.remove(&key).unwrap_or(Some(old));
            if let Some(counted) = &counted {
                self.account(counted, false);
            }
            if self.local_by_key.contains_key(&key) {
                self.touch_local(&key);
                self.update_active_in(namespace, None, true);
            }
        }
    }

    /// Adds or replaces a pod of this node (by interface).
    pub fn upsert_local(&mut self, pod: LocalPod) {
        if self.local.get(&pod.iface) == Some(&pod) {
            return;
        }
        let before = self.forget_local(&pod.iface);
        self.local_by_key
            .entry((pod.namespace.clone(), pod.name.clone()))
            .or_default()
            .insert(pod.iface.clone());
        self.local_by_ns
            .entry(pod.namespace.clone())
            .or_default()
            .insert(pod.iface.clone());
        self.dirty_ifaces.insert(pod.iface.clone());
        let key = (pod.namespace.clone(), pod.name.clone());
        self.local.insert(pod.iface.clone(), pod);
        if let Some(before) = &before
            && *before != key.0
        {
            self.update_active_in(before, None, true);
        }
        self.update_active_in(&key.0, Some(&key), before.is_some());
    }

    /// Removes a pod of this node.
    pub fn remove_local(&mut self, iface: &str) {
        if let Some(ns) = self.forget_local(iface) {
            self.update_active_in(&ns, None, true);
        }
    }

    /// Takes the pod on `iface` out of the local indexes; its namespace.
    fn forget_local(&mut self, iface: &str) -> Option<String> {
        let old = self.local.remove(iface)?;
        let key = (old.namespace, old.name);
        if let Some(set) = self.local_by_key.get_mut(&key) {
            set.remove(iface);
            if set.is_empty() {
                self.local_by_key.remove(&key);
            }
        }
        if let Some(set) = self.local_by_ns.get_mut(&key.0) {
            set.remove(iface);
            if set.is_empty() {
                self.local_by_ns.remove(&key.0);
            }
        }
        self.dirty_ifaces.insert(iface.to_owned());
        Some(key.0)
    }

    /// The pods of this node, by interface.
    pub fn locals(&self) -> impl Iterator<Item = &LocalPod> {
        self.local.values()
    }

    /// The pod of this node on `iface`.
    pub fn local(&self, iface: &str) -> Option<&LocalPod> {
        self.local.get(iface)
    }

    /// Replaces the namespaces and their labels; for each namespace whose
    /// labels changed, the rules whose selection of it changed are
    /// recomputed.
    pub fn set_namespaces(&mut self, namespaces: BTreeMap<String, Labels>) {
        if self.namespaces == namespaces {
            return;
        }
        let changed: BTreeSet<String> = self
            .namespaces
            .keys()
            .chain(namespaces.keys())
            .filter(|ns| self.namespaces.get(*ns) != namespaces.get(*ns))
            .cloned()
            .collect();
        let old = std::mem::replace(&mut self.namespaces, namespaces);
        let cross: Vec<RuleId> = self.cross_rule_ids().collect();
        let mut recount = BTreeSet::new();
        for ns in changed {
            let before = self.cross_rules.remove(&ns).unwrap_or_default();
            let after: BTreeSet<RuleId> = cross
                .iter()
                .filter(|id| {
                    self.rule(id)
                        .is_some_and(|r| self.selects_namespace(r, &ns))
                })
                .cloned()
                .collect();
            // Each peer has its own sets: a rule that selects `ns` before
            // and after may do so through other peers now.
            recount.extend(
                before
                    .union(&after)
                    .filter(|id| {
                        self.rule(id).is_some_and(|rule| {
                            peer_namespaces_in(&old, &id.0.0, rule, &ns)
                                != peer_namespaces_in(&self.namespaces, &id.0.0, rule, &ns)
                        })
                    })
                    .cloned(),
            );
            if !after.is_empty() {
                self.cross_rules.insert(ns, after);
            }
        }
        for id in recount {
            self.recount(&id);
        }
    }

    /// Adds or replaces a policy.
    pub fn upsert_policy(&mut self, policy: impl Into<Arc<NetworkPolicy>>) {
        let policy = policy.into();
        let key = key_of(&policy);
        self.drop_policy(&key);
        let name = format!("{}/{}", key.0, key.1);
        let prefix = self.claim(format!("r{:016x}", fnv64(&name)), &name);
        let mut compiled = compile(&policy, &prefix);
        for sel in compiled
            .ingress
            .iter_mut()
            .chain(&mut compiled.egress)
            .flatten()
            .flat_map(|rule| rule.peers.iter_mut().flatten())
        {
            let what = peer_key(&key.0, sel);
            sel.set = self.claim(format!("q{:016x}", fnv64(&what)), &what);
        }
        self.sources.insert(key.clone(), policy);
        self.by_ns
            .entry(key.0.clone())
            .or_default()
            .insert(key.clone());
        self.policies.insert(key.clone(), compiled);
        self.update_active(&key);
        self.touch_namespace(&key.0);
    }

    /// Removes a policy.
    pub fn remove_policy(&mut self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        self.sources.remove(&key);
        if self.policies.contains_key(&key) {
            self.drop_policy(&key);
            self.touch_namespace(namespace);
        }
    }

    /// Replaces every policy, touching only those that changed; given
    /// shared (`Arc`), the engine keeps them without a copy.
    pub fn set_policies<P>(&mut self, policies: &[P])
    where
        P: std::borrow::Borrow<NetworkPolicy> + Clone + Into<Arc<NetworkPolicy>>,
    {
        let wanted: BTreeMap<Key, &P> = policies.iter().map(|p| (key_of(p.borrow()), p)).collect();
        let gone: Vec<Key> = self
            .policies
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for (ns, name) in gone {
            self.remove_policy(&ns, &name);
        }
        for (key, p) in wanted {
            if self
                .sources
                .get(&key)
                .is_none_or(|have| **have != *p.borrow())
            {
                self.upsert_policy(p.clone());
            }
        }
    }

    /// Marks policies nft refused: they keep isolating their pods but
    /// allow nothing (and own no sets) until cleared.
    pub fn set_disabled(&mut self, disabled: BTreeSet<(String, String)>) {
        if self.disabled == disabled {
            return;
        }
        let changed: BTreeSet<Key> = self
            .disabled
            .symmetric_difference(&disabled)
            .cloned()
            .collect();
        self.disabled = disabled;
        for key in changed {
            let ids: Vec<RuleId> = self.rule_ids_of(&key).collect();
            self.dirty_rules.extend(ids);
            self.touch_namespace(&key.0);
        }
    }

    // --- bookkeeping ----------------------------------------------------

    /// Whether policy `key`'s rules own their sets: it selects a pod of
    /// this node and nft has not refused it.
    fn live(&self, key: &Key) -> bool {
        self.active.contains(key) && !self.disabled.contains(key)
    }

    fn drop_policy(&mut self, key: &Key) {
        if self.active.remove(key) {
            let ids: Vec<RuleId> = self.rule_ids_of(key).collect();
            for id in &ids {
                self.index_rule(id, false);
            }
        }
        let ids: Vec<RuleId> = self.rule_ids_of(key).collect();
        for id in &ids {
            let names = self.rule(id).map(set_names).unwrap_or_default();
            self.stale_sets.extend(names);
        }
        if let Some(old) = self.policies.remove(key) {
            self.release_name(&old.prefix);
            for sel in old
                .ingress
                .iter()
                .chain(&old.egress)
                .flatten()
                .flat_map(|rule| rule.peers.iter().flatten())
            {
                self.release_name(&sel.set);
            }
            if let Some(set) = self.by_ns.get_mut(&key.0) {
                set.remove(key);
            }
        }
    }

    /// A name for what `key` says (a policy, a peer): `name`, or `name`
    /// with a suffix when another key's hash gave it (two tenants'
    /// objects never share sets by a hash collision). Counted: each claim
    /// is released once.
    fn claim(&mut self, name: String, key: &str) -> String {
        let mut candidate = name.clone();
        for n in 1.. {
            match self.names.get_mut(&candidate) {
                None => {
                    self.names.insert(candidate.clone(), (key.to_owned(), 1));
                    break;
                }
                Some((k, users)) if k == key => {
                    *users += 1;
                    break;
                }
                Some(_) => candidate = format!("{name}x{n}"),
            }
        }
        candidate
    }

    /// Gives back one claim of a name [`Engine::claim`] gave.
    fn release_name(&mut self, name: &str) {
        if let Some((_, users)) = self.names.get_mut(name) {
            *users -= 1;
            if *users == 0 {
                self.names.remove(name);
            }
        }
    }

    fn rule_ids_of(&self, key: &Key) -> impl Iterator<Item = RuleId> + use<> {
        let p = self.policies.get(key);
        let ing = p.and_then(|p| p.ingress.as_ref()).map_or(0, Vec::len);
        let eg = p.and_then(|p| p.egress.as_ref()).map_or(0, Vec::len);
        let (k1, k2) = (key.clone(), key.clone());
        (0..ing)
            .map(move |i| (k1.clone(), false, i))
            .chain((0..eg).map(move |i| (k2.clone(), true, i)))
    }

    /// Every active rule that selects peers by namespace labels.
    fn cross_rule_ids(&self) -> impl Iterator<Item = RuleId> + '_ {
        self.active
            .iter()
            .flat_map(|k| self.rule_ids_of(k))
            .filter(|id| self.rule(id).is_some_and(Rule::selects_by_namespace))
    }

    /// Whether policy `key` selects a pod of this node.
    fn selects_local(&self, key: &Key) -> bool {
        let Some(policy) = self.policies.get(key) else {
            return false;
        };
        self.local_by_ns
            .get(&key.0)
            .into_iter()
            .flatten()
            .filter_map(|iface| self.local.get(iface))
            .any(|lp| self.selects_pod(policy, &lp.namespace, &lp.name))
    }

    /// Whether `policy` selects pod `ns/name` (by its cluster labels).
    fn selects_pod(&self, policy: &Compiled, ns: &str, name: &str) -> bool {
        let no_labels = Labels::new();
        let labels = self
            .pods
            .get(&(ns.to_owned(), name.to_owned()))
            .map_or(&no_labels, |p| &p.labels);
        policy.selector.as_ref().is_none_or(|s| selects(s, labels))
    }

    /// Makes policy `key` active (its rules indexed and counted from the
    /// pods they may select) or inactive (their peers dropped, their sets
    /// deleted at the next refresh), as its selection of local pods says.
    fn update_active(&mut self, key: &Key) {
        let want = self.selects_local(key);
        if want == self.active.contains(key) {
            return;
        }
        let ids: Vec<RuleId> = self.rule_ids_of(key).collect();
        if want {
            self.active.insert(key.clone());
            for id in &ids {
                self.index_rule(id, true);
            }
            for id in &ids {
                if !self.seed(id, &ids) {
                    self.recount(id);
                }
            }
        } else {
            for id in &ids {
                self.index_rule(id, false);
            }
            self.active.remove(key);
            for id in ids {
                if let Some(rule) = self.rule_mut(&id) {
                    rule.members.clear();
                    rule.pairs.clear();
                    rule.moved_members.clear();
                    rule.moved_pairs.clear();
                }
                self.dirty_rules.insert(id);
            }
        }
    }

    /// [`Engine::update_active`] for the policies of namespace `ns` whose
    /// activity may have changed: after local pod `came` arrived or
    /// changed, the inactive ones that select it; after a local pod left
    /// or changed (`left`), the active ones.
    fn update_active_in(&mut self, ns: &str, came: Option<&Key>, left: bool) {
        let keys: Vec<Key> = self
            .by_ns
            .get(ns)
            .into_iter()
            .flatten()
            .filter(|k| {
                if self.active.contains(*k) {
                    return left;
                }
                came.is_some_and(|(pns, name)| {
                    self.policies
                        .get(*k)
                        .is_some_and(|p| self.selects_pod(p, pns, name))
                })
            })
            .cloned()
            .collect();
        for key in keys {
            self.update_active(&key);
        }
    }

    /// Whether one of `rule`'s peers selects namespace `ns` by its labels.
    fn selects_namespace(&self, rule: &Rule, ns: &str) -> bool {
        let Some(labels) = self.namespaces.get(ns) else {
            return false;
        };
        rule.peers.iter().flatten().any(|p| {
            p.namespaces
                .as_ref()
                .is_some_and(|sel| selects(sel, labels))
        })
    }

    /// Enters (or takes out) a rule in the indexes telling which pods it
    /// may select and which sets it has.
    fn index_rule(&mut self, id: &RuleId, add: bool) {
        let Some(rule) = self.rule(id) else { return };
        for name in set_names(rule) {
            if add {
                self.set_rules.entry(name).or_default().push(id.clone());
            } else if let Some(users) = self.set_rules.get_mut(&name) {
                users.retain(|u| u != id);
                if users.is_empty() {
                    self.set_rules.remove(&name);
                }
            }
        }
        let Some(rule) = self.rule(id) else { return };
        let open = rule.wants_pairs() && (rule.peers.is_none() || !rule.blocks.is_empty());
        let same_ns = rule.peers.iter().flatten().any(|p| p.namespaces.is_none());
        let cross: Vec<String> = if rule.selects_by_namespace() {
            self.namespaces
                .keys()
                .filter(|ns| self.selects_namespace(rule, ns))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let policy_ns = id.0.0.clone();
        let edit = |map: &mut HashMap<String, BTreeSet<RuleId>>, ns: String| {
            if add {
                map.entry(ns).or_default().insert(id.clone());
            } else if let Some(set) = map.get_mut(&ns) {
                set.remove(id);
                if set.is_empty() {
                    map.remove(&ns);
                }
            }
        };
        if same_ns {
            edit(&mut self.same_ns_rules, policy_ns);
        }
        for ns in cross {
            edit(&mut self.cross_rules, ns);
        }
        if open {
            if add {
                self.open_rules.insert(id.clone());
            } else {
                self.open_rules.remove(id);
            }
        }
    }

    /// The rules a pod of namespace `ns` may contribute to.
    fn candidate_rules(&self, ns: &str) -> BTreeSet<RuleId> {
        let mut ids = self.open_rules.clone();
        for map in [&self.same_ns_rules, &self.cross_rules] {
            ids.extend(map.get(ns).into_iter().flatten().cloned());
        }
        ids
    }

    /// The pods that may contribute to rule `id`.
    fn candidate_pods(&self, id: &RuleId) -> Vec<&ClusterPod> {
        let Some(rule) = self.rule(id) else {
            return Vec::new();
        };
        if self.open_rules.contains(id) {
            return self
                .pods
                .iter()
                .filter_map(|(key, pod)| self.counted(key, pod))
                .collect();
        }
        let mut namespaces: BTreeSet<&str> = BTreeSet::new();
        if rule.peers.iter().flatten().any(|p| p.namespaces.is_none()) {
            namespaces.insert(&id.0.0);
        }
        if rule.selects_by_namespace() {
            namespaces.extend(
                self.namespaces
                    .keys()
                    .filter(|ns| self.selects_namespace(rule, ns))
                    .map(String::as_str),
            );
        }
        let mut pods = Vec::new();
        // One key, refilled: no allocation per pod.
        let mut key = (String::new(), String::new());
        for ns in namespaces {
            key.0.clear();
            key.0.push_str(ns);
            for name in self.pods_by_ns.get(ns).into_iter().flatten() {
                key.1.clear();
                key.1.push_str(name);
                if let Some(pod) = self.pods.get(&key) {
                    pods.extend(self.counted(&key, pod));
                }
            }
        }
        pods
    }

    /// The view of pod `key` (shown as `pod`) that its rules count.
    fn counted<'a>(&'a self, key: &Key, pod: &'a ClusterPod) -> Option<&'a ClusterPod> {
        match self.pending.get(key) {
            Some(counted) => counted.as_ref(),
            None => Some(pod),
        }
    }

    fn rule(&self, (key, egress, i): &RuleId) -> Option<&Rule> {
        let p = self.policies.get(key)?;
        if *egress {
            p.egress.as_ref()
        } else {
            p.ingress.as_ref()
        }?
        .get(*i)
    }

    fn rule_mut(&mut self, (key, egress, i): &RuleId) -> Option<&mut Rule> {
        let p = self.policies.get_mut(key)?;
        if *egress {
            p.egress.as_mut()
        } else {
            p.ingress.as_mut()
        }?
        .get_mut(*i)
    }

    fn touch_namespace(&mut self, namespace: &str) {
        if let Some(ifaces) = self.local_by_ns.get(namespace) {
            self.dirty_ifaces.extend(ifaces.iter().cloned());
        }
    }

    fn touch_local(&mut self, key: &Key) {
        if let Some(ifaces) = self.local_by_key.get(key) {
            self.dirty_ifaces.extend(ifaces.iter().cloned());
        }
    }

    /// For each of `rule`'s peers, whether its namespace part selects
    /// namespace `ns`.
    fn peer_namespaces(&self, policy_ns: &str, rule: &Rule, ns: &str) -> Vec<bool> {
        peer_namespaces_in(&self.namespaces, policy_ns, rule, ns)
    }

    /// Whether peer `sel`'s namespace part (of a policy in `policy_ns`)
    /// selects namespace `ns`.
    fn peer_namespace(&self, policy_ns: &str, sel: &PeerSel, ns: &str) -> bool {
        peer_namespace_in(&self.namespaces, policy_ns, sel, ns)
    }

    /// Adds (or takes away) `pod`'s contribution to every rule.
    fn account(&mut self, pod: &ClusterPod, add: bool) {
        // Each peer is judged once (by its sets' name: one peer, one
        // name), however many rules name it.
        let mut judged: HashMap<String, bool> = HashMap::new();
        for id in self.candidate_rules(&pod.namespace) {
            let Some(rule) = self.rule(&id) else { continue };
            if !rule.has_pod_peers() && !rule.wants_pairs() {
                continue;
            }
            let picked: Vec<bool> = rule
                .peers
                .iter()
                .flatten()
                .map(|sel| match judged.get(sel.set.as_str()) {
                    Some(ok) => *ok,
                    None => {
                        let ok = self.peer_namespace(&id.0.0, sel, &pod.namespace)
                            && peer_picks(sel, pod);
                        judged.insert(sel.set.clone(), ok);
                        ok
                    }
                })
                .collect();
            let c = contribution_of(rule, pod, &picked);
            if c.members.is_empty() && c.pairs.is_empty() {
                continue;
            }
            let rule = self.rule_mut(&id).expect("just looked up");
            for ip in c.members {
                if count(&mut rule.members, ip, add) {
                    rule.moved_members.insert(ip);
                }
            }
            for pair in c.pairs {
                if count(&mut rule.pairs, pair, add) {
                    rule.moved_pairs.insert(pair);
                }
            }
            self.moved_rules.insert(id);
        }
    }

    /// Rule `id`'s members copied from the active rules it shares each pod
    /// peer's sets with (not those of `fresh`, activated with it): a
    /// policy's first local pod costs what its peers hold, not a look at
    /// every pod they may select. `false` when a peer has no such rule or
    /// the rule resolves named ports on its peers (its pairs are its own).
    fn seed(&mut self, id: &RuleId, fresh: &[RuleId]) -> bool {
        let Some(rule) = self.rule(id) else {
            return false;
        };
        if rule.wants_pairs() || !rule.has_pod_peers() {
            return false;
        }
        let mut members = BTreeMap::new();
        for (i, sel) in rule.peers.iter().flatten().enumerate() {
            let donor = self
                .set_rules
                .get(&format!("{}_p4", sel.set))
                .into_iter()
                .flatten()
                .filter(|u| *u != id && !fresh.contains(u))
                .find_map(|u| {
                    let d = self.rule(u)?;
                    let j = d.peers.iter().flatten().position(|p| p.set == sel.set)?;
                    Some((d, j))
                });
            let Some((donor, j)) = donor else {
                return false;
            };
            let all =
                (j, IpAddr::V4(Ipv4Addr::UNSPECIFIED))..=(j, IpAddr::V6(Ipv6Addr::from(u128::MAX)));
            members.extend(donor.members.range(all).map(|(&(_, ip), &n)| ((i, ip), n)));
        }
        let rule = self.rule_mut(id).expect("just looked up");
        rule.members = members;
        rule.pairs.clear();
        rule.moved_members.clear();
        rule.moved_pairs.clear();
        self.dirty_rules.insert(id.clone());
        true
    }

    /// Recomputes one rule's members and pairs from every pod.
    fn recount(&mut self, id: &RuleId) {
        let Some(rule) = self.rule(id) else { return };
        let mut members = BTreeMap::new();
        let mut pairs = BTreeMap::new();
        if rule.has_pod_peers() || rule.wants_pairs() {
            // Candidates come namespace by namespace: each namespace's
            // selection is judged once.
            let mut ns_ok: Option<(&str, Vec<bool>)> = None;
            for pod in self.candidate_pods(id) {
                if ns_ok.as_ref().is_none_or(|(ns, _)| *ns != pod.namespace) {
                    let ok = self.peer_namespaces(&id.0.0, rule, &pod.namespace);
                    ns_ok = Some((&pod.namespace, ok));
                }
                let ok = ns_ok.as_ref().map_or(&[][..], |(_, ok)| ok);
                let c = contribution_in(rule, pod, ok);
                for ip in c.members {
                    count(&mut members, ip, true);
                }
                for pair in c.pairs {
                    count(&mut pairs, pair, true);
                }
            }
        }
        let rule = self.rule_mut(id).expect("just looked up");
        rule.members = members;
        rule.pairs = pairs;
        rule.moved_members.clear();
        rule.moved_pairs.clear();
        self.dirty_rules.insert(id.clone());
    }

    // --- outputs --------------------------------------------------------

    /// Turns every change since the last call into table changes, and
    /// applies them to [`Engine::desired`].
    pub fn refresh(&mut self) -> Delta {
        self.account_pending();
        let mut delta = Delta::default();
        // Sets of the rules that changed, and of rules that are gone: each
        // as a live rule having it says (all of them agree), or gone.
        let mut names = std::mem::take(&mut self.stale_sets);
        let dirty = std::mem::take(&mut self.dirty_rules);
        for id in &dirty {
            names.extend(self.rule(id).map(set_names).unwrap_or_default());
        }
        let touched_sets: BTreeMap<String, Option<SetSpec>> = names
            .into_iter()
            .map(|name| {
                let spec = self
                    .set_rules
                    .get(&name)
                    .into_iter()
                    .flatten()
                    .find(|id| self.live(&id.0))
                    .and_then(|id| self.rule(id))
                    .and_then(|rule| rule_set(rule, &name));
                (name, spec)
            })
            .collect();
        // Rules whose peers moved one by one: only those elements.
        let mut moved: Vec<(String, String, bool)> = Vec::new();
        for id in std::mem::take(&mut self.moved_rules) {
            let live = self.live(&id.0);
            let Some(rule) = self.rule_mut(&id) else {
                continue;
            };
            let members = std::mem::take(&mut rule.moved_members);
            let pairs = std::mem::take(&mut rule.moved_pairs);
            if !live || dirty.contains(&id) {
                continue;
            }
            let rule = self.rule(&id).expect("just looked up");
            for (peer, ip) in members {
                let Some(sel) = rule.peers.iter().flatten().nth(peer) else {
                    continue;
                };
                let v = if ip.is_ipv4() { "p4" } else { "p6" };
                let present = rule.members.contains_key(&(peer, ip));
                moved.push((format!("{}_{v}", sel.set), ip.to_string(), present));
            }
            for pair in pairs {
                let v = if pair.0.is_ipv4() { "n4" } else { "n6" };
                let present = rule.pairs.contains_key(&pair);
                moved.push((format!("{}_{v}", rule.base), pair_element(&pair), present));
            }
        }
        for (name, new) in touched_sets {
            let old = self.desired.sets.get(&name).cloned();
            match (old, new) {
                (None, None) => {}
                (None, Some(new)) => {
                    delta.new_sets.insert(name.clone(), new.clone());
                    self.desired.sets.insert(name, new);
                }
                (Some(_), None) => {
                    delta.delete_sets.insert(name.clone());
                    self.desired.sets.remove(&name);
                }
                (Some(old), Some(new)) if old.ty != new.ty || old.interval != new.interval => {
                    // Recreated under the same name: delete, then create.
                    delta.delete_sets.insert(name.clone());
                    delta.new_sets.insert(name.clone(), new.clone());
                    self.desired.sets.insert(name, new);
                }
                (Some(old), Some(new)) => {
                    let add: BTreeSet<String> =
                        new.elements.difference(&old.elements).cloned().collect();
                    let remove: BTreeSet<String> =
                        old.elements.difference(&new.elements).cloned().collect();
                    if !add.is_empty() {
                        delta.add_elements.insert(name.clone(), add);
                    }
                    if !remove.is_empty() {
                        delta.remove_elements.insert(name.clone(), remove);
                    }
                    self.desired.sets.insert(name, new);
                }
            }
        }
        for (name, element, present) in moved {
            let Some(set) = self.desired.sets.get_mut(&name) else {
                continue;
            };
            if present && set.elements.insert(element.clone()) {
                delta.add_elements.entry(name).or_default().insert(element);
            } else if !present && set.elements.remove(&element) {
                delta
                    .remove_elements
                    .entry(name)
                    .or_default()
                    .insert(element);
            }
        }
        for iface in std::mem::take(&mut self.dirty_ifaces) {
            let chains = self.chains_of(&iface);
            self.put_chains(&mut delta, &iface, chains);
        }
        // A set deleted and recreated in one pass is both in the lists.
        delta
    }

    /// Only what the isolation of the pod on `iface` needs: its chains and
    /// map elements, when every set they use is in the table already (else
    /// everything, as [`Engine::refresh`]). Set elements of other rules the
    /// pod joined or left stay for the next refresh.
    pub fn refresh_iface(&mut self, iface: &str) -> Delta {
        if !self.dirty_ifaces.contains(iface) {
            return Delta::default();
        }
        let chains = self.chains_of(iface);
        let sets_exist = chains.iter().flatten().flatten().all(|line| {
            line.split_whitespace()
                .filter_map(|w| w.strip_prefix('@'))
                .all(|set| self.desired.sets.contains_key(set))
        });
        if !sets_exist {
            return self.refresh();
        }
        self.dirty_ifaces.remove(iface);
        let mut delta = Delta::default();
        self.put_chains(&mut delta, iface, chains);
        delta
    }

    /// The rules of the pod on `iface`'s chains: egress, ingress (`None`:
    /// not isolated that way).
    fn chains_of(&self, iface: &str) -> [Option<Vec<String>>; 2] {
        let rules = self.local.get(iface).map(|lp| self.pod_rules(lp, false));
        let lines = |egress: bool| {
            let r = rules.as_ref()?;
            let d = if egress {
                r.egress.as_ref()
            } else {
                r.ingress.as_ref()
            }?;
            Some(chain_lines(d, if egress { "daddr" } else { "saddr" }))
        };
        [lines(true), lines(false)]
    }

    /// Puts `chains` (from [`Engine::chains_of`]) in place for `iface`.
    fn put_chains(&mut self, delta: &mut Delta, iface: &str, chains: [Option<Vec<String>>; 2]) {
        let [egress_lines, ingress_lines] = chains;
        for (egress, lines) in [(true, egress_lines), (false, ingress_lines)] {
            let (map, prefix) = if egress {
                ("egress_pods", "out")
            } else {
                ("ingress_pods", "in")
            };
            let chain = format!("{prefix}_{iface}");
            let entries = if egress {
                &mut self.desired.egress
            } else {
                &mut self.desired.ingress
            };
            match lines {
                Some(lines) => {
                    if self.desired.chains.get(&chain) != Some(&lines) {
                        delta.chains.insert(chain.clone(), lines.clone());
                        self.desired.chains.insert(chain.clone(), lines);
                    }
                    if entries.get(iface) != Some(&chain) {
                        if entries.contains_key(iface) {
                            delta.remove_map.push((map, iface.to_owned()));
                        }
                        delta.add_map.push((map, iface.to_owned(), chain.clone()));
                        entries.insert(iface.to_owned(), chain);
                    }
                }
                None => {
                    if entries.remove(iface).is_some() {
                        delta.remove_map.push((map, iface.to_owned()));
                    }
                    if self.desired.chains.remove(&chain).is_some() {
                        delta.delete_chains.insert(chain);
                    }
                }
            }
        }
    }

    /// The whole table (after [`Engine::refresh`]).
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Whether the pod on `iface` is isolated in either direction.
    pub fn isolates(&self, iface: &str) -> bool {
        let Some(lp) = self.local.get(iface) else {
            return false;
        };
        self.by_ns
            .get(&lp.namespace)
            .into_iter()
            .flatten()
            .filter_map(|k| self.policies.get(k))
            .any(|p| {
                (p.ingress.is_some() || p.egress.is_some())
                    && self.selects_pod(p, &lp.namespace, &lp.name)
            })
    }

    /// Problems found in the policies, each naming the policy and field.
    pub fn warnings(&self) -> Vec<String> {
        self.policies
            .values()
            .flat_map(|p| p.warnings.iter().cloned())
            .collect()
    }

    /// The policies (`ns`, `name`) that have rules, for finding one nft refuses.
    pub fn policy_keys(&self) -> Vec<(String, String)> {
        self.policies.keys().cloned().collect()
    }

    /// The rules of every isolated pod of this node, as values (for tests
    /// and inspection).
    pub fn ruleset(&self) -> Ruleset {
        let pods = self
            .local
            .values()
            .map(|lp| self.pod_rules(lp, true))
            .filter(|r| r.ingress.is_some() || r.egress.is_some())
            .collect();
        Ruleset {
            pods,
            warnings: self.warnings(),
        }
    }

    /// One local pod's rules, from the policies of its namespace; with
    /// `materialize`, peers and pairs as values (else only which sets).
    fn pod_rules(&self, lp: &LocalPod, materialize: bool) -> PodRules {
        let cluster = self.pods.get(&(lp.namespace.clone(), lp.name.clone()));
        let no_labels = Labels::new();
        let labels = cluster.map_or(&no_labels, |p| &p.labels);
        let mut rules = PodRules {
            namespace: lp.namespace.clone(),
            name: lp.name.clone(),
            iface: lp.iface.clone(),
            ingress: None,
            egress: None,
        };
        for key in self.by_ns.get(&lp.namespace).into_iter().flatten() {
            let Some(policy) = self.policies.get(key) else {
                continue;
            };
            if !policy.selector.as_ref().is_none_or(|s| selects(s, labels)) {
                continue;
            }
            let live = !self.disabled.contains(key);
            for (compiled, direction, ingress) in [
                (&policy.ingress, &mut rules.ingress, true),
                (&policy.egress, &mut rules.egress, false),
            ] {
                let Some(compiled) = compiled else { continue };
                let d = direction.get_or_insert_with(Direction::default);
                d.policies.push(policy.name.clone());
                if !live {
                    continue;
                }
                for rule in compiled {
                    let mut ports = rule.ports.clone();
                    if ingress && !rule.named.is_empty() {
                        let resolved = cluster.into_iter().flat_map(|p| &p.ports).filter(|cp| {
                            rule.named
                                .iter()
                                .any(|(n, proto)| *n == cp.name && *proto == cp.protocol)
                        });
                        ports
                            .get_or_insert_with(Vec::new)
                            .extend(resolved.map(|cp| PortSpec {
                                protocol: cp.protocol,
                                from: cp.port,
                                to: cp.port,
                            }));
                    }
                    if let Some(list) = ports.as_mut() {
                        merge_ports(list);
                    }
                    let mut peers_v = None;
                    if rule.peers.is_some() {
                        let mut r = AddrRanges::default();
                        if materialize {
                            for (_, ip) in rule.members.keys() {
                                r.add_ip(*ip);
                            }
                            r.extend(&rule.blocks);
                            r.normalize();
                        }
                        peers_v = Some(Arc::new(r));
                    }
                    d.allows.push(Allow {
                        peers: peers_v,
                        ports,
                        sets: Some(rule.base.clone()),
                        peer_sets: rule.peers.iter().flatten().map(|p| p.set.clone()).collect(),
                        blocks: (!rule.blocks.v4.is_empty(), !rule.blocks.v6.is_empty()),
                    });
                    if rule.wants_pairs() {
                        if materialize {
                            d.pairs.push(Arc::new(rule.pairs.keys().copied().collect()));
                        }
                        d.pair_sets.push(rule.base.clone());
                    }
                }
            }
        }
        for d in [&mut rules.ingress, &mut rules.egress]
            .into_iter()
            .flatten()
        {
            d.policies.sort();
        }
        rules
    }
}

#[derive(Default)]
struct Contribution {
    /// (peer, address).
    members: Vec<(usize, IpAddr)>,
    pairs: Vec<(IpAddr, Protocol, u16)>,
}

/// Which of `rule`'s peers (of a policy in `policy_ns`) select namespace
/// `ns`, as `namespaces` labels it.
fn peer_namespaces_in(
    namespaces: &BTreeMap<String, Labels>,
    policy_ns: &str,
    rule: &Rule,
    ns: &str,
) -> Vec<bool> {
    rule.peers
        .iter()
        .flatten()
        .map(|sel| peer_namespace_in(namespaces, policy_ns, sel, ns))
        .collect()
}

/// Whether peer `sel`'s namespace part selects namespace `ns`.
fn peer_namespace_in(
    namespaces: &BTreeMap<String, Labels>,
    policy_ns: &str,
    sel: &PeerSel,
    ns: &str,
) -> bool {
    match &sel.namespaces {
        None => ns == policy_ns,
        Some(s) => namespaces.get(ns).is_some_and(|labels| selects(s, labels)),
    }
}

/// What `pod` adds to `rule`, given for each peer whether its namespace
/// part selects the pod's namespace: member addresses and named-port pairs.
fn contribution_in(rule: &Rule, pod: &ClusterPod, ns_ok: &[bool]) -> Contribution {
    let picked: Vec<bool> = rule
        .peers
        .iter()
        .flatten()
        .zip(ns_ok)
        .map(|(sel, ok)| *ok && peer_picks(sel, pod))
        .collect();
    contribution_of(rule, pod, &picked)
}

/// Whether peer `sel`'s pod part selects `pod` (its namespace part aside).
fn peer_picks(sel: &PeerSel, pod: &ClusterPod) -> bool {
    sel.pods.as_ref().is_none_or(|s| selects(s, &pod.labels))
}

/// What `pod` adds to `rule`, given which of its peers select it.
fn contribution_of(rule: &Rule, pod: &ClusterPod, picked: &[bool]) -> Contribution {
    let mut c = Contribution::default();
    let mut selected = false;
    for (i, ok) in picked.iter().enumerate() {
        if *ok {
            selected = true;
            c.members.extend(pod.ips.iter().map(|ip| (i, *ip)));
        }
    }
    if rule.wants_pairs() {
        let anyone = rule.peers.is_none();
        for cp in &pod.ports {
            if !rule
                .named
                .iter()
                .any(|(n, proto)| *n == cp.name && *proto == cp.protocol)
            {
                continue;
            }
            for ip in &pod.ips {
                if anyone || selected || rule.blocks.contains(*ip) {
                    c.pairs.push((*ip, cp.protocol, cp.port));
                }
            }
        }
    }
    c
}

/// Counts `key` in or out; whether it came or went.
fn count<K: Ord>(map: &mut BTreeMap<K, u32>, key: K, add: bool) -> bool {
    if add {
        let n = map.entry(key).or_default();
        *n += 1;
        *n == 1
    } else if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
            return true;
        }
        false
    } else {
        false
    }
}

/// A named-port pair as a set element.
fn pair_element((ip, proto, port): &(IpAddr, Protocol, u16)) -> String {
    format!("{ip} . {} . {port}", proto.nft())
}

/// The names of the sets a rule has when live: two per pod peer (shared
/// with every rule naming the same peer), its ipBlocks' and its
/// named-port pairs' (its own).
fn set_names(rule: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    for sel in rule.peers.iter().flatten() {
        out.push(format!("{}_p4", sel.set));
        out.push(format!("{}_p6", sel.set));
    }
    let own = |s: &str| format!("{}_{s}", rule.base);
    if !rule.blocks.v4.is_empty() {
        out.push(own("b4"));
    }
    if !rule.blocks.v6.is_empty() {
        out.push(own("b6"));
    }
    if rule.wants_pairs() {
        out.push(own("n4"));
        out.push(own("n6"));
    }
    out
}

/// Set `name` of `rule` (one of [`set_names`]) with its elements.
fn rule_set(rule: &Rule, name: &str) -> Option<SetSpec> {
    rule_sets(rule)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, spec)| spec)
}

/// A rule's sets with their elements.
fn rule_sets(rule: &Rule) -> Vec<(String, SetSpec)> {
    let mut out = Vec::new();
    let name = |s: &str| format!("{}_{s}", rule.base);
    for (i, sel) in rule.peers.iter().flatten().enumerate() {
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = rule
            .members
            .keys()
            .filter(|(peer, _)| *peer == i)
            .map(|(_, ip)| *ip)
            .partition(IpAddr::is_ipv4);
        out.push((
            format!("{}_p4", sel.set),
            plain("ipv4_addr", v4.iter().map(ToString::to_string)),
        ));
        out.push((
            format!("{}_p6", sel.set),
            plain("ipv6_addr", v6.iter().map(ToString::to_string)),
        ));
    }
    if !rule.blocks.v4.is_empty() {
        out.push((
            name("b4"),
            intervals("ipv4_addr", rule.blocks.v4_elements()),
        ));
    }
    if !rule.blocks.v6.is_empty() {
        out.push((
            name("b6"),
            intervals("ipv6_addr", rule.blocks.v6_elements()),
        ));
    }
    if rule.wants_pairs() {
        let (v4, v6): (Vec<_>, Vec<_>) = rule.pairs.keys().partition(|(ip, _, _)| ip.is_ipv4());
        out.push((
            name("n4"),
            plain(
                "ipv4_addr . inet_proto . inet_service",
                v4.into_iter().map(pair_element),
            ),
        ));
        out.push((
            name("n6"),
            plain(
                "ipv6_addr . inet_proto . inet_service",
                v6.into_iter().map(pair_element),
            ),
        ));
    }
    out
}

fn plain(ty: &'static str, elements: impl Iterator<Item = String>) -> SetSpec {
    SetSpec {
        ty,
        interval: false,
        elements: elements.collect(),
    }
}

fn intervals(ty: &'static str, elements: Vec<String>) -> SetSpec {
    SetSpec {
        ty,
        interval: true,
        elements: elements.into_iter().collect(),
    }
}

/// Up to this many single ports are one rule each (two comparisons);
/// more, or any range, are one anonymous set per rule. Each set a batch
/// creates costs the kernel a pass over every set of the table (0.1 ms
/// and more at 700 sets): an ADD's chains then create none.
const PORTS_AS_RULES: usize = 4;

/// A pod chain's rules: each allow `return`s, the rest is dropped.
fn chain_lines(d: &Direction, addr: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for allow in &d.allows {
        let ports: Vec<String> = match &allow.ports {
            None => vec![String::new()],
            Some(list) if list.is_empty() => continue,
            Some(list) if list.len() <= PORTS_AS_RULES && list.iter().all(|p| p.from == p.to) => {
                list.iter()
                    .map(|p| format!(" {} dport {}", p.protocol.nft(), p.from))
                    .collect()
            }
            Some(list) => {
                let elements: Vec<String> = list
                    .iter()
                    .map(|p| {
                        if p.from == p.to {
                            format!("{} . {}", p.protocol.nft(), p.from)
                        } else {
                            format!("{} . {}-{}", p.protocol.nft(), p.from, p.to)
                        }
                    })
                    .collect();
                vec![format!(
                    " meta l4proto . th dport {{ {} }}",
                    elements.join(", ")
                )]
            }
        };
        let Some(base) = &allow.sets else { continue };
        if allow.peers.is_none() {
            for ports in &ports {
                lines.push(format!("{ports} return").trim_start().to_owned());
            }
            continue;
        }
        for (family, v) in [("ip", '4'), ("ip6", '6')] {
            let has_block = if v == '4' {
                allow.blocks.0
            } else {
                allow.blocks.1
            };
            let sets = allow
                .peer_sets
                .iter()
                .map(|set| format!("{set}_p{v}"))
                .chain(has_block.then(|| format!("{base}_b{v}")));
            for set in sets {
                for ports in &ports {
                    lines.push(format!("{family} {addr} @{set}{ports} return"));
                }
            }
        }
    }
    for base in &d.pair_sets {
        for (family, v) in [("ip", '4'), ("ip6", '6')] {
            lines.push(format!(
                "{family} {addr} . meta l4proto . th dport @{base}_n{v} return"
            ));
        }
    }
    lines.push("drop".into());
    lines
}

/// Compiles one policy (its rules' selectors, blocks and ports).
/// Compiles one policy; `prefix` starts its rules' set names. Peers'
/// set names are left for the engine to give.
fn compile(policy: &NetworkPolicy, prefix: &str) -> Compiled {
    let (ns, pname) = key_of(policy);
    let name = format!("{ns}/{pname}");
    let at_policy = format!("NetworkPolicy {name}");
    let mut warnings = Vec::new();
    let Some(spec) = policy.spec.as_ref() else {
        return Compiled {
            name,
            prefix: prefix.to_owned(),
            selector: None,
            ingress: Some(Vec::new()),
            egress: None,
            warnings,
        };
    };
    let (ingress, egress) = policy_types(spec);
    let mut direction = |field: &str, egress: bool, rules: Vec<RuleInput<'_>>| -> Vec<Rule> {
        rules
            .into_iter()
            .enumerate()
            .map(|(i, (peers, ports))| {
                let at = format!("{at_policy}: spec.{field}[{i}]");
                let base = format!("{prefix}_{}{i}", if egress { 'e' } else { 'i' });
                compile_rule(base, peers, ports, egress, &at, &mut warnings)
            })
            .collect()
    };
    let ingress = ingress.then(|| {
        let rules = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_deref(), r.ports.as_deref()))
            .collect();
        direction("ingress", false, rules)
    });
    let egress = egress.then(|| {
        let rules = spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_deref(), r.ports.as_deref()))
            .collect();
        direction("egress", true, rules)
    });
    Compiled {
        name,
        prefix: prefix.to_owned(),
        selector: spec.pod_selector.clone(),
        ingress,
        egress,
        warnings,
    }
}

/// What a pod peer selects, as text: its selectors, and the policy's
/// namespace when it has no namespace selector. Rules naming the same
/// peer share its sets.
fn peer_key(policy_ns: &str, sel: &PeerSel) -> String {
    let scope = if sel.namespaces.is_some() {
        "*"
    } else {
        policy_ns
    };
    let json = |s: &Option<LabelSelector>| serde_json::to_string(s).unwrap_or_default();
    format!("{scope}\n{}\n{}", json(&sel.namespaces), json(&sel.pods))
}

type RuleInput<'a> = (
    Option<&'a [NetworkPolicyPeer]>,
    Option<&'a [NetworkPolicyPort]>,
);

fn compile_rule(
    base: String,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    egress: bool,
    at: &str,
    warnings: &mut Vec<String>,
) -> Rule {
    let field = if egress { "to" } else { "from" };
    let mut rule = Rule {
        base,
        egress,
        peers: None,
        blocks: AddrRanges::default(),
        block_at: Vec::new(),
        ports: None,
        named: Vec::new(),
        members: BTreeMap::new(),
        pairs: BTreeMap::new(),
        moved_members: BTreeSet::new(),
        moved_pairs: BTreeSet::new(),
    };
    // Peers: absent or empty is everyone.
    if let Some(peers) = peers.filter(|p| !p.is_empty()) {
        let mut sels = Vec::new();
        for (i, peer) in peers.iter().enumerate() {
            if let Some(block) = &peer.ip_block {
                match ip_block(block) {
                    Ok(r) => {
                        rule.blocks.extend(&r);
                        rule.block_at.push((i, r));
                    }
                    Err(problem) => warnings.push(format!("{at}.{field}[{i}].ipBlock: {problem}")),
                }
                continue;
            }
            if peer.namespace_selector.is_none() && peer.pod_selector.is_none() {
                warnings.push(format!(
                    "{at}.{field}[{i}]: a peer needs podSelector, namespaceSelector or ipBlock"
                ));
                continue;
            }
            sels.push(PeerSel {
                namespaces: peer.namespace_selector.clone(),
                pods: peer.pod_selector.clone(),
                set: String::new(),
                at: i,
            });
        }
        rule.blocks.normalize();
        rule.peers = Some(sels);
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
    merge_ports(&mut numeric);
    rule.ports = Some(numeric);
    rule
}

#[cfg(test)]
mod tests {
    use super::Engine;

    #[test]
    fn a_name_another_key_holds_gets_a_suffix_and_claims_are_counted() {
        let mut e = Engine::new();
        assert_eq!(e.claim("q1".into(), "a"), "q1");
        assert_eq!(e.claim("q1".into(), "b"), "q1x1", "a hash collision");
        assert_eq!(e.claim("q1".into(), "c"), "q1x2");
        assert_eq!(
            e.claim("q1".into(), "a"),
            "q1",
            "the same key, the same name"
        );
        e.release_name("q1");
        assert_eq!(e.claim("q1".into(), "b"), "q1x1", "a still holds q1");
        e.release_name("q1");
        assert!(!e.names.contains_key("q1"), "both claims of a given back");
        assert_eq!(e.names["q1x1"], ("b".to_owned(), 2));
    }
}
