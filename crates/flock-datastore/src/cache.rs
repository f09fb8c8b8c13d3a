//! The agent's view of the objects it cares about, with change events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use flock_model::{AddressPool, BgpPeer, NodeConfig};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use tokio::sync::{broadcast, watch};

use crate::objects::{Passwords, PodInfo};

/// Something changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// This node's NodeConfig appeared, changed or went away.
    NodeConfig,
    /// Some node's NodeConfig (this node's included) changed: the cluster's
    /// pod prefixes may be others now.
    NodeConfigs,
    /// AddressPools changed.
    Pools,
    /// A pod appeared or changed (other than only its readiness).
    Pod {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// A pod's `Ready` condition flipped.
    PodReady {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The new value.
        ready: bool,
    },
    /// A pod is gone.
    PodDeleted {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Namespaces (their labels) changed.
    Namespaces,
    /// NetworkPolicies changed.
    Policies,
    /// BGP inputs changed: BGPPeers, this node's Node labels, or the
    /// session passwords; or all of them have been read once now.
    Bgp,
}

type Key = (String, String);

#[derive(Debug, Default)]
struct State {
    node_config: Option<NodeConfig>,
    /// Every node's NodeConfig, by name.
    node_configs: BTreeMap<String, NodeConfig>,
    pools: BTreeMap<String, AddressPool>,
    /// Every BGPPeer, by name.
    bgp_peers: BTreeMap<String, BgpPeer>,
    /// This node's Node labels (empty until read).
    node_labels: BTreeMap<String, String>,
    /// The Secret `flock-bgp-passwords`; `None` while it does not exist.
    passwords: Option<Passwords>,
    /// Whether BGPPeers, this node's Node and the Secret have each been
    /// read once (a render before would drop their sessions).
    bgp_peers_synced: bool,
    node_labels_synced: bool,
    passwords_synced: bool,
    node_configs_synced: bool,
    pools_synced: bool,
    /// Shared with the sources and readers that keep them (one copy of
    /// each pod in the agent).
    pods: BTreeMap<Key, Arc<PodInfo>>,
    /// The keys of `pods` on this node: an index, so nothing that serves
    /// this node's pods walks the cluster's.
    local: BTreeSet<Key>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Shared with the sources and the NetworkPolicy engine.
    policies: BTreeMap<Key, Arc<NetworkPolicy>>,
    /// Bumped with every change of `policies`, under the same lock.
    policies_revision: u64,
    /// Whether this node's pods have been listed once.
    local_pods_synced: bool,
    /// Whether the cluster's pods, namespaces and policies have been
    /// listed once each.
    pods_synced: bool,
    namespaces_synced: bool,
    policies_synced: bool,
}

impl State {
    /// Whether every BGP input has been read once.
    fn bgp_inputs_listed(&self) -> bool {
        self.bgp_peers_synced && self.node_labels_synced && self.passwords_synced
    }

    /// Adds or replaces a pod, keeping the index of this node's pods.
    fn insert_pod(&mut self, node: &str, pod: Arc<PodInfo>) -> Option<Arc<PodInfo>> {
        let key = pod.key();
        if pod.node.as_deref() == Some(node) {
            self.local.insert(key.clone());
        } else {
            self.local.remove(&key);
        }
        self.pods.insert(key, pod)
    }

    /// Removes a pod and its index entry.
    fn remove_pod(&mut self, key: &Key) -> Option<Arc<PodInfo>> {
        self.local.remove(key);
        self.pods.remove(key)
    }
}

/// The objects of one node's world, shared by the sources that fill it and
/// the parts of the agent that read it.
#[derive(Debug, Clone)]
pub struct Cache {
    node: String,
    state: Arc<RwLock<State>>,
    events: broadcast::Sender<Event>,
    generation: Arc<watch::Sender<u64>>,
}

impl Cache {
    /// An empty cache for node `node`.
    pub fn new(node: &str) -> Cache {
        Cache {
            node: node.to_owned(),
            state: Arc::default(),
            events: broadcast::channel(4096).0,
            generation: Arc::new(watch::channel(0).0),
        }
    }

    /// The node this cache is for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Change events. A receiver that lags gets `Lagged` and should resync.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Writers only swap whole values; a poisoned lock still holds a consistent state.
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        for e in events {
            // No receivers is fine.
            let _ = self.events.send(e);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// This node's NodeConfig.
    pub fn node_config(&self) -> Option<NodeConfig> {
        self.read().node_config.clone()
    }

    /// A pod scheduled on this node.
    pub fn local_pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.read()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .filter(|p| p.node.as_deref() == Some(self.node.as_str()))
            .map(|p| PodInfo::clone(p))
    }

    /// A pod of the cluster.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodInfo> {
        self.pod_shared(namespace, name).map(|p| PodInfo::clone(&p))
    }

    /// A pod of the cluster, shared (no copy).
    pub fn pod_shared(&self, namespace: &str, name: &str) -> Option<Arc<PodInfo>> {
        self.read()
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Every pod on this node.
    pub fn local_pods(&self) -> Vec<PodInfo> {
        let s = self.read();
        s.local
            .iter()
            .filter_map(|k| s.pods.get(k))
            .map(|p| PodInfo::clone(p))
            .collect()
    }

    /// Every pod of the cluster.
    pub fn pods(&self) -> Vec<PodInfo> {
        self.read()
            .pods
            .values()
            .map(|p| PodInfo::clone(p))
            .collect()
    }

    /// Every pod of the cluster, shared (no copies).
    pub fn pods_shared(&self) -> Vec<Arc<PodInfo>> {
        self.read().pods.values().cloned().collect()
    }

    /// Namespaces and their labels.
    pub fn namespaces(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.read().namespaces.clone()
    }

    /// Every node's NodeConfig.
    pub fn node_configs(&self) -> Vec<NodeConfig> {
        self.read().node_configs.values().cloned().collect()
    }

    /// Every AddressPool.
    pub fn pools(&self) -> Vec<AddressPool> {
        self.read().pools.values().cloned().collect()
    }

    /// Waits up to `timeout` until every NodeConfig and every AddressPool
    /// has been listed once (so a claim is judged against all of them).
    pub async fn wait_for_claim_inputs(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |c| {
            let s = c.read();
            (s.node_configs_synced && s.pools_synced).then_some(())
        })
        .await
        .is_some()
    }

    /// Whether NodeConfigs and AddressPools have both been listed once.
    pub fn claim_inputs_listed(&self) -> bool {
        let s = self.read();
        s.node_configs_synced && s.pools_synced
    }

    /// Replaces every NodeConfig (a relist, a rescan, a change); this
    /// node's own is taken from them.
    pub fn replace_node_configs(&self, all: Vec<NodeConfig>) {
        use kube::ResourceExt;
        let own = all.iter().find(|nc| nc.name_any() == self.node).cloned();
        let changed = {
            let mut s = self.write();
            let new: BTreeMap<String, NodeConfig> =
                all.into_iter().map(|nc| (nc.name_any(), nc)).collect();
            let specs = |m: &BTreeMap<String, NodeConfig>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.spec.clone()))
                    .collect::<Vec<_>>()
            };
            let changed = specs(&s.node_configs) != specs(&new);
            s.node_configs = new;
            s.node_configs_synced = true;
            changed
        };
        self.set_node_config(own);
        if changed {
            self.emit(vec![Event::NodeConfigs]);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Replaces every AddressPool.
    pub fn replace_pools(&self, pools: Vec<AddressPool>) {
        use kube::ResourceExt;
        let changed = {
            let mut s = self.write();
            let new: BTreeMap<String, AddressPool> =
                pools.into_iter().map(|p| (p.name_any(), p)).collect();
            let specs = |m: &BTreeMap<String, AddressPool>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.spec.clone()))
                    .collect::<Vec<_>>()
            };
            let changed = specs(&s.pools) != specs(&new);
            s.pools = new;
            s.pools_synced = true;
            changed
        };
        if changed {
            self.emit(vec![Event::Pools]);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Every BGPPeer.
    pub fn bgp_peers(&self) -> Vec<BgpPeer> {
        self.read().bgp_peers.values().cloned().collect()
    }

    /// Replaces every BGPPeer.
    pub fn replace_bgp_peers(&self, peers: Vec<BgpPeer>) {
        use kube::ResourceExt;
        let new: BTreeMap<String, BgpPeer> = peers.into_iter().map(|p| (p.name_any(), p)).collect();
        let changed = {
            let mut s = self.write();
            let specs = |m: &BTreeMap<String, BgpPeer>| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.spec.clone()))
                    .collect::<Vec<_>>()
            };
            let listed = s.bgp_inputs_listed();
            let changed = specs(&s.bgp_peers) != specs(&new);
            s.bgp_peers = new;
            s.bgp_peers_synced = true;
            changed || (!listed && s.bgp_inputs_listed())
        };
        if changed {
            self.emit(vec![Event::Bgp]);
        }
    }

    /// Whether BGPPeers, this node's Node labels and the password Secret
    /// have each been read once: until then sessions from them are unknown.
    pub fn bgp_inputs_listed(&self) -> bool {
        self.read().bgp_inputs_listed()
    }

    /// Which BGP inputs have not been read yet: `BGPPeers`, `the Node`,
    /// `the Secret flock-bgp-passwords`.
    pub fn bgp_inputs_missing(&self) -> Vec<&'static str> {
        let s = self.read();
        [
            (s.bgp_peers_synced, "BGPPeers"),
            (s.node_labels_synced, "this node's Node"),
            (s.passwords_synced, "the Secret flock-bgp-passwords"),
        ]
        .into_iter()
        .filter(|(synced, _)| !synced)
        .map(|(_, what)| what)
        .collect()
    }

    /// This node's Node labels (BGPPeers select nodes by them).
    pub fn node_labels(&self) -> BTreeMap<String, String> {
        self.read().node_labels.clone()
    }

    /// Sets this node's Node labels.
    pub fn set_node_labels(&self, labels: BTreeMap<String, String>) {
        let changed = {
            let mut s = self.write();
            let listed = s.bgp_inputs_listed();
            s.node_labels_synced = true;
            std::mem::replace(&mut s.node_labels, labels.clone()) != labels
                || (!listed && s.bgp_inputs_listed())
        };
        if changed {
            self.emit(vec![Event::Bgp]);
        }
    }

    /// The session passwords; `None` while their Secret does not exist.
    pub fn passwords(&self) -> Option<Passwords> {
        self.read().passwords.clone()
    }

    /// Sets (or clears, when the Secret is gone) the session passwords.
    pub fn set_passwords(&self, passwords: Option<Passwords>) {
        let changed = {
            let mut s = self.write();
            let listed = s.bgp_inputs_listed();
            s.passwords_synced = true;
            std::mem::replace(&mut s.passwords, passwords.clone()) != passwords
                || (!listed && s.bgp_inputs_listed())
        };
        if changed {
            self.emit(vec![Event::Bgp]);
        }
    }

    /// Every NetworkPolicy (shared, no copies).
    pub fn policies(&self) -> Vec<Arc<NetworkPolicy>> {
        self.read().policies.values().cloned().collect()
    }

    /// Every NetworkPolicy, with the revision they are at.
    pub fn policies_revised(&self) -> (u64, Vec<Arc<NetworkPolicy>>) {
        let s = self.read();
        (s.policies_revision, s.policies.values().cloned().collect())
    }

    /// The revision of the NetworkPolicies: it changes with each of their
    /// changes, before the [`Event::Policies`] that tells of it.
    pub fn policies_revision(&self) -> u64 {
        self.read().policies_revision
    }

    async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut probe: impl FnMut(&Cache) -> Option<T>,
    ) -> Option<T> {
        let mut changed = self.generation.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(found) = probe(self) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return probe(self),
            }
        }
    }

    /// Waits up to `timeout` for a pod to appear on this node (ADD can
    /// arrive before the watcher has seen the pod).
    pub async fn wait_for_pod(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
    ) -> Option<PodInfo> {
        self.wait_until(timeout, |c| c.local_pod(namespace, name))
            .await
    }

    /// Waits up to `timeout` for a pod on this node that `accept` takes
    /// (the cache may still hold an older pod of the same name).
    pub async fn wait_for_pod_where(
        &self,
        namespace: &str,
        name: &str,
        timeout: Duration,
        accept: impl Fn(&PodInfo) -> bool,
    ) -> Option<PodInfo> {
        self.wait_until(timeout, |c| c.local_pod(namespace, name).filter(&accept))
            .await
    }

    /// Waits up to `timeout` for this node's NodeConfig.
    pub async fn wait_for_node_config(&self, timeout: Duration) -> Option<NodeConfig> {
        self.wait_until(timeout, Cache::node_config).await
    }

    /// Waits up to `timeout` until this node's pods have been listed once
    /// (so a pod missing from the cache is really gone); returns whether
    /// they have.
    pub async fn wait_for_local_pods(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |c| c.read().local_pods_synced.then_some(()))
            .await
            .is_some()
    }

    /// Whether any NetworkPolicy lives in `namespace`.
    pub fn has_policies_in(&self, namespace: &str) -> bool {
        self.read()
            .policies
            .range((namespace.to_owned(), String::new())..)
            .next()
            .is_some_and(|((ns, _), _)| ns == namespace)
    }

    /// Waits up to `timeout` until the cluster's pods, namespaces and
    /// NetworkPolicies have each been listed once (a policy missing then
    /// is really absent); returns whether they have.
    pub async fn wait_for_policy_inputs(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, |c| {
            let s = c.read();
            (s.pods_synced && s.namespaces_synced && s.policies_synced).then_some(())
        })
        .await
        .is_some()
    }

    /// Records that the source has listed this node's pods once.
    pub fn mark_local_pods_synced(&self) {
        let first = !std::mem::replace(&mut self.write().local_pods_synced, true);
        if first {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    /// Sets (or clears) this node's NodeConfig.
    pub fn set_node_config(&self, config: Option<NodeConfig>) {
        let changed = {
            let mut s = self.write();
            let same = match (&s.node_config, &config) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    a.spec == b.spec && a.metadata.annotations == b.metadata.annotations
                }
                _ => false,
            };
            s.node_config = config;
            !same
        };
        if changed {
            self.emit(vec![Event::NodeConfig]);
        }
    }

    /// Adds or updates one pod.
    pub fn upsert_pod(&self, pod: impl Into<Arc<PodInfo>>) {
        let pod: Arc<PodInfo> = pod.into();
        let events = {
            let mut s = self.write();
            let old = s.insert_pod(&self.node, pod.clone());
            pod_events(old.as_deref(), Some(&pod))
        };
        self.emit(events);
    }

    /// Removes one pod.
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let events = {
            let mut s = self.write();
            let old = s.remove_pod(&(namespace.to_owned(), name.to_owned()));
            pod_events(old.as_deref(), None)
        };
        self.emit(events);
    }

    /// Replaces every pod (a relist or a rescan), emitting events for the differences.
    pub fn replace_pods<P: Into<Arc<PodInfo>>>(&self, pods: impl IntoIterator<Item = P>) {
        let events = {
            let mut s = self.write();
            let new: BTreeMap<Key, Arc<PodInfo>> = pods
                .into_iter()
                .map(|p| {
                    let p: Arc<PodInfo> = p.into();
                    (p.key(), p)
                })
                .collect();
            let mut events = Vec::new();
            for (k, old) in &s.pods {
                if !new.contains_key(k) {
                    events.extend(pod_events(Some(old), None));
                }
            }
            for (k, pod) in &new {
                events.extend(pod_events(s.pods.get(k).map(|p| &**p), Some(pod)));
            }
            let node = Some(self.node.as_str());
            s.local = new
                .iter()
                .filter(|(_, p)| p.node.as_deref() == node)
                .map(|(k, _)| k.clone())
                .collect();
            s.pods = new;
            s.pods_synced = true;
            s.local_pods_synced = true;
            events
        };
        self.emit(events);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Replaces the pods of this node only (a relist of the node-scoped
    /// watcher), leaving other nodes' pods as they are.
    pub fn replace_local_pods(&self, pods: Vec<PodInfo>) {
        let events = {
            let mut s = self.write();
            let node = Some(self.node.as_str());
            let new: BTreeMap<Key, Arc<PodInfo>> = pods
                .into_iter()
                .filter(|p| p.node.as_deref() == node)
                .map(|p| (p.key(), Arc::new(p)))
                .collect();
            let mut events = Vec::new();
            let gone: Vec<Key> = s
                .local
                .iter()
                .filter(|k| !new.contains_key(*k))
                .cloned()
                .collect();
            for k in gone {
                let old = s.remove_pod(&k);
                events.extend(pod_events(old.as_deref(), None));
            }
            for (k, pod) in new {
                events.extend(pod_events(s.pods.get(&k).map(|p| &**p), Some(&pod)));
                s.insert_pod(&self.node, pod);
            }
            events
        };
        self.emit(events);
        self.mark_local_pods_synced();
    }

    /// Replaces the namespaces and their labels.
    pub fn replace_namespaces(&self, namespaces: BTreeMap<String, BTreeMap<String, String>>) {
        let changed = {
            let mut s = self.write();
            let changed = s.namespaces != namespaces;
            s.namespaces = namespaces;
            s.namespaces_synced = true;
            changed
        };
        if changed {
            self.emit(vec![Event::Namespaces]);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Replaces the NetworkPolicies.
    pub fn replace_policies<P: Into<Arc<NetworkPolicy>>>(
        &self,
        policies: impl IntoIterator<Item = P>,
    ) {
        let changed = {
            let mut s = self.write();
            let new: BTreeMap<Key, Arc<NetworkPolicy>> = policies
                .into_iter()
                .map(|p| {
                    let p = p.into();
                    let key = (
                        p.metadata
                            .namespace
                            .clone()
                            .unwrap_or_else(|| "default".into()),
                        p.metadata.name.clone().unwrap_or_default(),
                    );
                    (key, p)
                })
                .collect();
            let changed = s.policies != new;
            s.policies = new;
            s.policies_revision += u64::from(changed);
            s.policies_synced = true;
            changed
        };
        if changed {
            self.emit(vec![Event::Policies]);
        }
        self.generation.send_modify(|g| *g += 1);
    }
}

fn pod_events(old: Option<&PodInfo>, new: Option<&PodInfo>) -> Vec<Event> {
    match (old, new) {
        (None, None) => vec![],
        (Some(o), None) => vec![Event::PodDeleted {
            namespace: o.namespace.clone(),
            name: o.name.clone(),
        }],
        (old, Some(n)) => {
            let mut events = Vec::new();
            let mut without_ready = n.clone();
            if let Some(o) = old {
                without_ready.ready = o.ready;
                if o.ready != n.ready {
                    events.push(Event::PodReady {
                        namespace: n.namespace.clone(),
                        name: n.name.clone(),
                        ready: n.ready,
                    });
                }
            }
            if old != Some(&without_ready) {
                events.insert(
                    0,
                    Event::Pod {
                        namespace: n.namespace.clone(),
                        name: n.name.clone(),
                    },
                );
            }
            events
        }
    }
}
