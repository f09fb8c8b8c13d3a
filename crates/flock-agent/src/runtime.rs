//! Bringing the node runtime up: the datastore, recovery of what a crash
//! or a reboot left behind, and the node-wide kernel settings.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use flock_datastore::{Cache, DatastoreSpec, DirSource, DirWatch, Event};
use flock_model::{NodeSettings, host_iface_name};
use flock_netlink::{Dataplane, Netns, RouteKind};
use flock_store::{AllocState, Store};
use ipnet::IpNet;
use tokio::sync::Mutex as AsyncMutex;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::pods::{Allocations, PodHandler, Shared};

/// What the runtime needs to start.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// This node's name.
    pub node: String,
    /// Where `allocations.json` lives.
    pub state_dir: PathBuf,
    /// Where objects come from.
    pub datastore: DatastoreSpec,
    /// How long to wait for this node's NodeConfig.
    pub nodeconfig_timeout: Duration,
    /// Where bird.conf is written.
    pub bird_config: PathBuf,
    /// BIRD's control socket.
    pub bird_socket: PathBuf,
    /// The `nft` program.
    pub nft: String,
}

/// Keeps the datastore source running while held.
#[derive(Debug)]
pub enum SourceGuard {
    /// A directory watch.
    Dir(DirWatch),
    /// The Kubernetes watchers (and the node-condition refresher).
    Kube(flock_datastore::kubernetes::KubeWatch),
}

/// The running node runtime.
pub struct Runtime {
    /// The handler to swap in.
    pub handler: PodHandler,
    /// The object cache.
    pub cache: Cache,
    /// The datastore source.
    pub source: SourceGuard,
}

/// Starts the datastore, waits for the NodeConfig, recovers state and
/// prepares the node; returns the handler to swap in.
pub async fn start(cfg: &RuntimeConfig, metrics: Metrics) -> anyhow::Result<Runtime> {
    let cache = Cache::new(&cfg.node);
    let source = match &cfg.datastore {
        DatastoreSpec::Dir(dir) => SourceGuard::Dir(DirSource::new(dir, cache.clone()).start()),
        DatastoreSpec::Kubernetes => {
            // In-cluster service account, else KUBECONFIG / ~/.kube/config.
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            SourceGuard::Kube(flock_datastore::kubernetes::start(
                client,
                cache.clone(),
                true,
            ))
        }
    };
    let node_config = cache
        .wait_for_node_config(cfg.nodeconfig_timeout)
        .await
        .ok_or_else(|| {
            anyhow!(
                "NodeConfig {} did not appear in datastore {} within {}s",
                cfg.node,
                cfg.datastore,
                cfg.nodeconfig_timeout.as_secs()
            )
        })?;
    let settings = node_config.settings()?;
    info!(cidr6 = ?settings.cidr6, cidr4 = ?settings.cidr4, "NodeConfig loaded");

    let dataplane = Dataplane::new(Netns::Current)
        .await
        .context("opening netlink")?;
    let default_mtu = dataplane
        .default_route_mtu()
        .await
        .ok()
        .flatten()
        .unwrap_or(1500);
    let mut store = Store::open(&cfg.state_dir)?;
    recover(&dataplane, &mut store, &metrics).await?;

    dataplane
        .enable_forwarding()
        .await
        .context("enabling forwarding")?;
    if let Err(e) = dataplane.set_multipath_hash_policy().await {
        warn!(error = %e, "cannot set fib_multipath_hash_policy; anycast flows hash on addresses only");
    }
    reconcile_blackholes(&dataplane, &settings).await?;

    let allocations = Allocations::new(store, settings).map_err(|e| anyhow!(e))?;
    metrics.set_usage(allocations.ipam.usage());
    info!(
        entries = allocations.store.len(),
        default_mtu, "node runtime ready"
    );
    let shared = Arc::new(Shared {
        cache: cache.clone(),
        dataplane: dataplane.clone(),
        allocations: AsyncMutex::new(allocations),
        default_mtu,
        metrics: metrics.clone(),
        locks: Mutex::default(),
        anycast: tokio::sync::Notify::new(),
        announced: tokio::sync::watch::Sender::new(Default::default()),
        bird: {
            let metrics = metrics.clone();
            flock_bird::Writer::start_observed(
                cfg.bird_config.clone(),
                cfg.bird_socket.clone(),
                flock_bird::Birdc,
                move |outcome| metrics.bird_reloaded(outcome.is_ok()),
            )
        },
        policy: crate::policy::Policy::new(&cfg.nft),
    });
    tokio::spawn(keep_bird_config(shared.clone()));
    tokio::spawn(crate::policy::keep_policy_enforced(shared.clone()));
    tokio::spawn(watch_node_config(cache.clone(), dataplane));
    tokio::spawn(keep_anycast_routed(shared.clone()));
    Ok(Runtime {
        handler: PodHandler { shared },
        cache,
        source,
    })
}

/// Makes the store and the kernel agree before anything is served:
/// pending entries (an ADD cut short) are undone; committed entries whose
/// veth is gone (a reboot: no runtime will ever send their DEL) are
/// released; flock veths no entry claims are deleted.
async fn recover(
    dataplane: &Dataplane,
    store: &mut Store,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    let links: HashSet<String> = dataplane
        .flock_links()
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let entries: Vec<_> = store.iter().cloned().collect();
    for entry in entries {
        let host = host_iface_name(&entry.container_id);
        let reason = if entry.state == AllocState::Pending {
            dataplane
                .teardown(&host, entry.ip6, entry.ip4)
                .await?
                .finished()
                .await?;
            "pending"
        } else if !links.contains(&host) {
            "veth_gone"
        } else {
            continue;
        };
        store.remove(
            &entry.container_id,
            &entry.ifname,
            std::time::SystemTime::now(),
        )?;
        metrics.reconciled(reason);
        info!(container_id = %entry.container_id, pod = %format!("{}/{}", entry.namespace, entry.pod), reason, "released allocation");
    }
    let claimed: HashSet<String> = store
        .iter()
        .map(|a| host_iface_name(&a.container_id))
        .collect();
    let mut deletions = Vec::new();
    for orphan in links.difference(&claimed) {
        deletions.push(dataplane.teardown(orphan, None, None).await?);
        metrics.reconciled("orphan_veth");
        info!(iface = %orphan, "deleting a flock veth no allocation claims");
    }
    for d in deletions {
        d.finished().await?;
    }
    Ok(())
}

/// Blackholes exactly for the node's current prefixes.
async fn reconcile_blackholes(
    dataplane: &Dataplane,
    settings: &NodeSettings,
) -> anyhow::Result<()> {
    let want: Vec<IpNet> = settings
        .cidr6
        .map(IpNet::V6)
        .into_iter()
        .chain(settings.cidr4.map(IpNet::V4))
        .collect();
    for installed in dataplane.flock_routes().await? {
        if installed.kind == RouteKind::Blackhole && !want.contains(&installed.dst) {
            dataplane.remove_route(installed.dst).await?;
        }
    }
    for cidr in want {
        dataplane.ensure_blackhole(cidr).await?;
    }
    Ok(())
}

/// Follows NodeConfig changes with the blackholes (and every 30 s, in case
/// someone removed them).
async fn watch_node_config(cache: Cache, dataplane: Dataplane) {
    let mut events = cache.subscribe();
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Ok(Event::NodeConfig) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {}
        }
        let Some(settings) = cache.node_config().and_then(|nc| nc.settings().ok()) else {
            continue;
        };
        if let Err(e) = reconcile_blackholes(&dataplane, &settings).await {
            warn!(error = %e, "reconciling node blackholes failed");
        }
    }
}

/// How often anycast routes are reconciled without a trigger.
pub const ANYCAST_TICK: Duration = Duration::from_secs(2);

/// How long the anycast reconciler waits for the first list of this
/// node's pods after a start before it treats missing pods as gone.
pub const LOCAL_PODS_TIMEOUT: Duration = Duration::from_secs(60);

/// Keeps the routes of anycast and `addresses` IPs equal to their Ready
/// pods: after every ADD and DEL, on pod readiness changes, and every 2 s.
/// After a restart nothing is touched until this node's pods are listed:
/// the routes installed before stay (adopted, not flapped).
async fn keep_anycast_routed(shared: Arc<Shared>) {
    let mut events = shared.cache.subscribe();
    if !shared.cache.wait_for_local_pods(LOCAL_PODS_TIMEOUT).await {
        warn!(
            timeout_s = LOCAL_PODS_TIMEOUT.as_secs(),
            "this node's pods were not listed in time; reconciling anycast routes with what is known"
        );
    }
    let mut tick = tokio::time::interval(ANYCAST_TICK);
    // Each skipped address is logged once, not every pass.
    let mut warned = HashSet::new();
    loop {
        tokio::select! {
            () = shared.anycast.notified() => {}
            event = events.recv() => match event {
                Ok(Event::PodReady { .. } | Event::PodDeleted { .. } | Event::Pod { .. })
                | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {}
        }
        let (targets, warnings) = {
            let alloc = shared.allocations.lock().await;
            flock_anycast::resolve(alloc.store.iter(), |ns, pod| {
                shared.cache.local_pod(ns, pod).is_some_and(|p| p.ready)
            })
        };
        for warning in warnings {
            if warned.insert(warning.clone()) {
                warn!(%warning, "anycast address skipped");
            }
        }
        shared.announced.send_if_modified(|announced| {
            let now: std::collections::BTreeSet<std::net::IpAddr> =
                targets.keys().copied().collect();
            let changed = announced.as_ref() != Some(&now);
            *announced = Some(now);
            changed
        });
        match flock_anycast::reconcile(&shared.dataplane, &targets).await {
            Ok(changes) => {
                for _ in 0..changes.replaced {
                    shared.metrics.reconciled("anycast_route_set");
                }
                for _ in 0..changes.removed {
                    shared.metrics.reconciled("anycast_route_removed");
                }
            }
            Err(e) => {
                shared.metrics.error("anycast");
                warn!(error = %e, "reconciling anycast routes failed");
            }
        }
    }
}

/// How often bird.conf is rendered again without a trigger.
pub const BIRD_TICK: Duration = Duration::from_secs(15);

/// Renders bird.conf from the NodeConfig, the announced IPs and the node's
/// addresses, on every change of the announced set or the NodeConfig and
/// every 15 s; the writer skips unchanged text. An invalid NodeConfig keeps
/// the last good configuration.
async fn keep_bird_config(shared: Arc<Shared>) {
    let mut announced = shared.announced.subscribe();
    let mut events = shared.cache.subscribe();
    let mut tick = tokio::time::interval(BIRD_TICK);
    let mut last_problem = None;
    loop {
        tokio::select! {
            changed = announced.changed() => if changed.is_err() { return },
            event = events.recv() => match event {
                Ok(Event::NodeConfig) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => {}
        }
        let rendered = async {
            let nc = shared
                .cache
                .node_config()
                .ok_or("the NodeConfig is gone; keeping the last configuration")?;
            let settings = nc.settings().map_err(|e| e.to_string())?;
            let interfaces = shared
                .dataplane
                .addresses()
                .await
                .map_err(|e| e.to_string())?;
            let Some(ips) = announced.borrow().clone() else {
                // The first anycast pass has not run: rendering now would
                // withdraw every anycast IP until it does.
                return Ok(None);
            };
            flock_bird::render(&flock_bird::BirdInput {
                settings: &settings,
                announced: &ips,
                interfaces: &interfaces,
            })
            .map(Some)
            .map_err(|e| e.to_string())
        }
        .await;
        match rendered {
            Ok(None) => {}
            Ok(Some(text)) => {
                last_problem = None;
                shared.bird.submit(text);
            }
            Err(problem) => {
                if last_problem.as_ref() != Some(&problem) {
                    shared.metrics.error("bird_render");
                    warn!(%problem, "bird.conf not rendered; BIRD keeps its last configuration");
                }
                last_problem = Some(problem);
            }
        }
    }
}
