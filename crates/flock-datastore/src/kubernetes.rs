//! `kubernetes`: objects from the API server through kube watchers.
//!
//! One watch per kind, each applied in the order the API server sends it
//! (resourceVersion order): every NodeConfig (this node's own and the
//! cluster's pod prefixes), AddressPools, namespaces and NetworkPolicies
//! each into a kube [reflector store](kube::runtime::reflector::store)
//! whose snapshot the [`Cache`] takes after each change; and every pod of
//! the cluster from one watch straight into the cache's pod map (this
//! node's pods in full and indexed, the others kept compact: labels,
//! addresses, ports and flock's claim annotations). A relist (after a 410
//! Gone, a failed list page, …) is buffered and replaces what it covers
//! at once, so nothing deleted meanwhile lingers and no reader sees half a
//! list. A watch that ends (the API server restarting) resumes from its
//! resourceVersion: no list unless the API server says it is too old.
//! BGP inputs come the same way: every BGPPeer, this node's own Node (by
//! name, for its labels), and the Secret `flock-bgp-passwords` with no
//! verb but `get` and `watch` on that one name.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use flock_model::{AddressPool, BgpPeer, NodeConfig, PASSWORD_SECRET};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{WatchEvent as ApiEvent, WatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{Lookup, Store, store};
use kube::runtime::utils::{Backoff, ResetTimerBackoff};
use kube::runtime::watcher::{self, Event as WatchEvent, ExponentialBackoff};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::{Cache, Passwords, PodInfo};

/// Told of every list a watch completes: the first of its kind, and each
/// relist with the reason the watch had to start over.
pub trait ListObserver: Send + Sync + 'static {
    /// `kind` was listed (`objects` of them); `relist` says why when it
    /// was not the first list: `gone` (the API server answered 410, the
    /// resourceVersion being compacted or too old), `list_failed` (a page
    /// of the previous list failed), `no_resource_version`.
    fn listed(&self, kind: &'static str, objects: usize, relist: Option<&'static str>);
}

/// A [`ListObserver`] that only logs (the watchers log every list anyway).
#[derive(Debug, Default, Clone, Copy)]
pub struct Unobserved;

impl ListObserver for Unobserved {
    fn listed(&self, _: &'static str, _: usize, _: Option<&'static str>) {}
}

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

/// Starts the watchers feeding `cache`, telling `observer` of each list;
/// the session passwords are read from `namespace`.
pub fn start(
    client: Client,
    cache: Cache,
    observer: Arc<dyn ListObserver>,
    namespace: &str,
) -> KubeWatch {
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(reflect::<BgpPeer>(
        "bgppeers",
        Api::all(client.clone()),
        watcher::Config::default(),
        observer.clone(),
        {
            let cache = cache.clone();
            move |all| cache.replace_bgp_peers(all.iter().map(|p| (**p).clone()).collect())
        },
    )));
    tasks.push(tokio::spawn(reflect::<Node>(
        "nodes",
        Api::all(client.clone()),
        watcher::Config::default().fields(&format!("metadata.name={}", cache.node())),
        observer.clone(),
        {
            let cache = cache.clone();
            let node = cache.node().to_owned();
            move |all| {
                let labels = all
                    .iter()
                    .find(|n| n.name_any() == node)
                    .map(|n| n.labels().clone())
                    .unwrap_or_default();
                cache.set_node_labels(labels)
            }
        },
    )));
    tasks.push(tokio::spawn(passwords(
        Api::namespaced(client.clone(), namespace),
        cache.clone(),
    )));
    tasks.push(tokio::spawn(reflect::<NodeConfig>(
        "nodeconfigs",
        Api::all(client.clone()),
        watcher::Config::default(),
        observer.clone(),
        {
            let cache = cache.clone();
            move |all| cache.replace_node_configs(all.iter().map(|nc| (**nc).clone()).collect())
        },
    )));
    tasks.push(tokio::spawn(reflect::<AddressPool>(
        "addresspools",
        Api::all(client.clone()),
        watcher::Config::default(),
        observer.clone(),
        {
            let cache = cache.clone();
            move |all| cache.replace_pools(all.iter().map(|p| (**p).clone()).collect())
        },
    )));
    tasks.push(tokio::spawn(reflect::<Namespace>(
        "namespaces",
        Api::all(client.clone()),
        watcher::Config::default(),
        observer.clone(),
        {
            let cache = cache.clone();
            move |all| {
                cache.replace_namespaces(
                    all.iter()
                        .map(|ns| {
                            let name = ResourceExt::name_any(&**ns);
                            let mut labels = ns.labels().clone();
                            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
                            (name, labels)
                        })
                        .collect(),
                )
            }
        },
    )));
    tasks.push(tokio::spawn(reflect::<NetworkPolicy>(
        "networkpolicies",
        Api::all(client.clone()),
        watcher::Config::default(),
        observer.clone(),
        {
            let cache = cache.clone();
            // The store's copies, shared with the cache and the policy engine.
            move |all| cache.replace_policies(all)
        },
    )));
    tasks.push(tokio::spawn(pods(Api::all(client), cache, observer)));
    KubeWatch { tasks }
}

/// Reflects one kind into a kube store and hands `changed` the store's
/// snapshot after each change (a whole relist counting as one).
async fn reflect<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    observer: Arc<dyn ListObserver>,
    mut changed: impl FnMut(Vec<Arc<K>>) + Send,
) where
    K: Resource + Lookup + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    <K as Lookup>::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (reader, mut writer): (Store<K>, _) = store();
    follow(kind, api, config, observer, |event| {
        let publish = !matches!(event, WatchEvent::Init | WatchEvent::InitApply(_));
        writer.apply_watcher_event(&event);
        if publish {
            changed(reader.state());
        }
        match event {
            WatchEvent::InitDone => Some(reader.len()),
            _ => None,
        }
    })
    .await
}

/// The cluster's pods from one watch into the cache, each converted to
/// its compact [`PodInfo`] as it arrives (a relist of 10,000 pods is
/// never held as full objects).
async fn pods(api: Api<Pod>, cache: Cache, observer: Arc<dyn ListObserver>) {
    let node = cache.node().to_owned();
    let info = move |p: &Pod| {
        let info = PodInfo::from_pod(p);
        if info.node.as_deref() == Some(node.as_str()) {
            info
        } else {
            info.compact()
        }
    };
    let mut relist: Option<Vec<PodInfo>> = None;
    follow(
        "pods",
        api,
        watcher::Config::default(),
        observer,
        |event| match event {
            WatchEvent::Init => {
                relist = Some(Vec::new());
                None
            }
            WatchEvent::InitApply(p) => {
                relist.get_or_insert_with(Vec::new).push(info(&p));
                None
            }
            WatchEvent::InitDone => {
                let all = relist.take().unwrap_or_default();
                let n = all.len();
                cache.replace_pods(all);
                Some(n)
            }
            WatchEvent::Apply(p) => {
                cache.upsert_pod(info(&p));
                None
            }
            WatchEvent::Delete(p) => {
                cache.delete_pod(
                    &ResourceExt::namespace(&p).unwrap_or_default(),
                    &p.name_any(),
                );
                None
            }
        },
    )
    .await
}

/// The Secret `flock-bgp-passwords` into the cache, with only the verbs
/// RBAC grants on that one name: a `get` for its state (absent is a state
/// too), then a `watch` by name with no resourceVersion, which the API
/// server starts at its most recent version with the object's current
/// state first (never a 410 for a version too old, however long the
/// Secret went unchanged); again after the watch ends, waiting after a
/// watch that failed. A deletion in the instant between the `get` and the
/// watch's start is seen at the next round (the API server ends a watch
/// after a few minutes). Neither the Secret nor an error about it is
/// logged with its values.
async fn passwords(api: Api<Secret>, cache: Cache) {
    let mut failures = 0u32;
    loop {
        let got = api.get_opt(PASSWORD_SECRET).await;
        if let Err(kube::Error::Api(status)) = &got
            && status.code == 403
        {
            // No RBAC for it (an older rbac.yaml): as if there were no
            // Secret; sessions that need a password are left out, named.
            cache.set_passwords(None);
        }
        let watched = match got {
            Ok(secret) => {
                cache.set_passwords(secret.as_ref().map(Passwords::from_secret));
                let params =
                    WatchParams::default().fields(&format!("metadata.name={PASSWORD_SECRET}"));
                api.watch(&params, "").await
            }
            Err(error) => Err(error),
        };
        let stream = match watched {
            Ok(stream) => stream,
            Err(error) => {
                failures += 1;
                warn!(secret = PASSWORD_SECRET, error = %error_without_body(&error), "reading the BGP passwords failed; retrying");
                tokio::time::sleep(retry_delay(failures)).await;
                continue;
            }
        };
        futures_util::pin_mut!(stream);
        let started = std::time::Instant::now();
        let mut failed = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(ApiEvent::Added(s) | ApiEvent::Modified(s)) => {
                    cache.set_passwords(Some(Passwords::from_secret(&s)))
                }
                Ok(ApiEvent::Deleted(_)) => cache.set_passwords(None),
                Ok(ApiEvent::Bookmark(_)) => {}
                Ok(ApiEvent::Error(status)) => {
                    failed = Some(format!("{} {}", status.code, status.reason));
                    break;
                }
                Err(error) => {
                    failed = Some(error_without_body(&error));
                    break;
                }
            }
        }
        if failed.is_none() && started.elapsed() < Duration::from_secs(1) {
            failed = Some("the watch ended at once".to_owned());
        }
        // A watch that fails at once, again and again, must not become a
        // loop of requests: wait, longer each time, until one runs clean.
        match failed {
            Some(error) => {
                failures += 1;
                warn!(secret = PASSWORD_SECRET, %error, "watching the BGP passwords failed; reading them again");
                tokio::time::sleep(retry_delay(failures)).await;
            }
            None => failures = 0,
        }
    }
}

/// An API error for the log, without the response body (which may quote
/// the object).
fn error_without_body(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => format!("{} {}", status.code, status.reason),
        other => other.to_string(),
    }
}

/// 250 ms doubling to 5 s, like [`backoff`].
fn retry_delay(failures: u32) -> Duration {
    Duration::from_millis(250u64.saturating_mul(1 << failures.min(5))).min(Duration::from_secs(5))
}

/// Drives one kind's watcher forever, retrying after errors with
/// [`backoff`]; `apply` takes each event in order and answers, for an
/// `InitDone`, how many objects the list held.
async fn follow<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    observer: Arc<dyn ListObserver>,
    mut apply: impl FnMut(WatchEvent<K>) -> Option<usize> + Send,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let stream = watcher::watcher(api, config).backoff(backoff());
    futures_util::pin_mut!(stream);
    let mut lists = 0u64;
    // Why the watch last had to start over, until its list completes.
    let mut restart: Option<&'static str> = None;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if let Some(objects) = apply(event) {
                    let relist = (lists > 0).then(|| restart.take().unwrap_or("restarted"));
                    restart = None;
                    lists += 1;
                    match relist {
                        None => info!(kind, objects, "listed"),
                        Some(reason) => warn!(kind, objects, reason, "relisted"),
                    }
                    observer.listed(kind, objects, relist);
                }
            }
            Err(error) => {
                if let Some(reason) = restart_reason(&error) {
                    restart.get_or_insert(reason);
                }
                warn!(kind, %error, "watch failed; retrying");
            }
        }
    }
}

/// Why `error` makes kube's watcher start over with a list, if it does
/// (a watch that merely failed resumes from its resourceVersion).
fn restart_reason(error: &watcher::Error) -> Option<&'static str> {
    match error {
        watcher::Error::WatchError(status) if status.code == 410 => Some("gone"),
        watcher::Error::InitialListFailed(_) => Some("list_failed"),
        watcher::Error::NoResourceVersion => Some("no_resource_version"),
        _ => None,
    }
}

/// Retries 250 ms after the first error, doubling to at most 5 s (with
/// jitter, so a fleet of agents does not return in step to a restarted API
/// server), and starts over once a watch has run for a minute: an API
/// server back after an outage is reached within 5 s.
fn backoff() -> impl Backoff {
    ResetTimerBackoff::new(
        ExponentialBackoff::from(
            backon::ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(5))
                .with_factor(2.0)
                .with_jitter()
                .without_max_times(),
        ),
        Duration::from_secs(60),
    )
}
