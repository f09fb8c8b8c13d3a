//! `kubernetes`: objects from the API server through kube watchers.
//!
//! Six watchers feed the [`Cache`]: every NodeConfig (this node's own and
//! the cluster's pod prefixes), AddressPools, the pods on this node
//! (`spec.nodeName=<node>`), every pod of the cluster (kept compact off
//! this node: labels, addresses, ports and flock's claim annotations),
//! namespaces and NetworkPolicies. Each relists after an expired watch or a 410 Gone, and
//! a relist replaces what it covers, so nothing deleted meanwhile lingers.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use flock_model::{AddressPool, NodeConfig};
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{Cache, PodInfo};

/// The running watchers; dropping it stops them.
#[derive(Debug)]
pub struct KubeWatch {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for KubeWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the watchers feeding `cache`.
pub fn start(client: Client, cache: Cache) -> KubeWatch {
    let node = cache.node().to_owned();
    let mut tasks = Vec::new();

    // Every node's NodeConfig: this node's own, and every pod prefix of the
    // cluster (no claimed IP may lie in one).
    let node_configs: Api<NodeConfig> = Api::all(client.clone());
    tasks.push(tokio::spawn(follow(
        "nodeconfigs",
        watcher::watcher(node_configs, watcher::Config::default()),
        {
            let cache = cache.clone();
            let mut known: BTreeMap<String, NodeConfig> = BTreeMap::new();
            move |change: Change<NodeConfig>| {
                match change {
                    Change::Reset(all) => {
                        known = all.into_iter().map(|nc| (nc.name_any(), nc)).collect()
                    }
                    Change::Apply(nc) => {
                        known.insert(nc.name_any(), nc);
                    }
                    Change::Delete(nc) => {
                        known.remove(&nc.name_any());
                    }
                }
                cache.replace_node_configs(known.values().cloned().collect());
            }
        },
    )));

    let pools: Api<AddressPool> = Api::all(client.clone());
    tasks.push(tokio::spawn(follow(
        "addresspools",
        watcher::watcher(pools, watcher::Config::default()),
        {
            let cache = cache.clone();
            let mut known: BTreeMap<String, AddressPool> = BTreeMap::new();
            move |change: Change<AddressPool>| {
                match change {
                    Change::Reset(all) => {
                        known = all.into_iter().map(|p| (p.name_any(), p)).collect()
                    }
                    Change::Apply(p) => {
                        known.insert(p.name_any(), p);
                    }
                    Change::Delete(p) => {
                        known.remove(&p.name_any());
                    }
                }
                cache.replace_pools(known.values().cloned().collect());
            }
        },
    )));

    let pods: Api<Pod> = Api::all(client.clone());
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    tasks.push(tokio::spawn(follow(
        "local pods",
        watcher::watcher(pods.clone(), on_node),
        {
            let cache = cache.clone();
            move |change: Change<Pod>| match change {
                Change::Reset(all) => {
                    cache.replace_local_pods(all.iter().map(PodInfo::from_pod).collect())
                }
                Change::Apply(p) => cache.upsert_pod(PodInfo::from_pod(&p)),
                Change::Delete(p) => {
                    cache.delete_pod(&p.namespace().unwrap_or_default(), &p.name_any())
                }
            }
        },
    )));

    tasks.push(tokio::spawn(follow(
        "cluster pods",
        watcher::watcher(pods, watcher::Config::default()),
        {
            let cache = cache.clone();
            let node = node.clone();
            let compact = move |p: &Pod| {
                let info = PodInfo::from_pod(p);
                if info.node.as_deref() == Some(node.as_str()) {
                    info
                } else {
                    info.compact()
                }
            };
            move |change: Change<Pod>| match change {
                Change::Reset(all) => cache.replace_pods(all.iter().map(&compact)),
                Change::Apply(p) => cache.upsert_pod(compact(&p)),
                Change::Delete(p) => {
                    cache.delete_pod(&p.namespace().unwrap_or_default(), &p.name_any())
                }
            }
        },
    )));

    let namespaces: Api<Namespace> = Api::all(client.clone());
    tasks.push(tokio::spawn(follow(
        "namespaces",
        watcher::watcher(namespaces, watcher::Config::default()),
        {
            let cache = cache.clone();
            let mut known: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
            move |change: Change<Namespace>| {
                let labels = |ns: &Namespace| {
                    let mut l = ns.labels().clone();
                    l.insert("kubernetes.io/metadata.name".into(), ns.name_any());
                    (ns.name_any(), l)
                };
                match change {
                    Change::Reset(all) => known = all.iter().map(labels).collect(),
                    Change::Apply(ns) => {
                        let (name, l) = labels(&ns);
                        known.insert(name, l);
                    }
                    Change::Delete(ns) => {
                        known.remove(&ns.name_any());
                    }
                }
                cache.replace_namespaces(known.clone());
            }
        },
    )));

    let policies: Api<NetworkPolicy> = Api::all(client.clone());
    tasks.push(tokio::spawn(follow(
        "networkpolicies",
        watcher::watcher(policies, watcher::Config::default()),
        {
            let cache = cache.clone();
            // Shared with the cache: one copy of each policy.
            let mut known: BTreeMap<(String, String), Arc<NetworkPolicy>> = BTreeMap::new();
            move |change: Change<NetworkPolicy>| {
                let key = |p: &NetworkPolicy| (p.namespace().unwrap_or_default(), p.name_any());
                match change {
                    Change::Reset(all) => {
                        known = all.into_iter().map(|p| (key(&p), Arc::new(p))).collect()
                    }
                    Change::Apply(p) => {
                        known.insert(key(&p), Arc::new(p));
                    }
                    Change::Delete(p) => {
                        known.remove(&key(&p));
                    }
                }
                cache.replace_policies(known.values().cloned());
            }
        },
    )));

    KubeWatch { tasks }
}

/// What a watcher reports, after buffering a relist into one reset.
enum Change<K> {
    Reset(Vec<K>),
    Apply(K),
    Delete(K),
}

/// Drives one watcher forever (with kube's default backoff on errors),
/// turning its events into [`Change`]s.
async fn follow<K, S>(what: &'static str, stream: S, mut apply: impl FnMut(Change<K>) + Send)
where
    K: Debug + Send,
    S: Stream<Item = Result<WatchEvent<K>, watcher::Error>> + Send,
{
    let stream = stream.default_backoff();
    futures_util::pin_mut!(stream);
    let mut buffer: Option<Vec<K>> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(WatchEvent::Init) => buffer = Some(Vec::new()),
            Ok(WatchEvent::InitApply(k)) => buffer.get_or_insert_with(Vec::new).push(k),
            Ok(WatchEvent::InitDone) => {
                let all = buffer.take().unwrap_or_default();
                info!(watcher = what, objects = all.len(), "listed");
                apply(Change::Reset(all));
            }
            Ok(WatchEvent::Apply(k)) => apply(Change::Apply(k)),
            Ok(WatchEvent::Delete(k)) => apply(Change::Delete(k)),
            Err(error) => warn!(watcher = what, %error, "watch failed; retrying"),
        }
    }
}
