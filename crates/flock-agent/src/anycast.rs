//! The anycast loop: keeps the routes of anycast and `addresses` IPs equal
//! to their serving pods (Ready, and not being deleted), and publishes the
//! IPs announced because of them (for BIRD): only those it has a route
//! for. A claim no AddressPool (any more) consents to is withdrawn, logged
//! once per IP. Triggers: every ADD and DEL, pod changes (readiness,
//! deletion), AddressPool and NodeConfig changes, a 2 s tick.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use flock_datastore::{Cache, Event};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::allocations::Allocations;
use crate::claims::{Consented, Context, cluster_claims, judge};
use crate::kernel::Kernel;
use crate::metrics::Metrics;
use crate::settings::Prefixes;
use crate::status::Board;
use crate::store::AllocationStore;

/// How often anycast routes are reconciled without a trigger.
pub const ANYCAST_TICK: Duration = Duration::from_secs(2);
/// How often each installed anycast route is looked up in the kernel, so
/// one removed or changed by hand comes back. Only the routes the loop
/// installed are looked up, one by one: no pass dumps the node's links or
/// routes (they are listed once at the start, and after a failed change).
pub const ANYCAST_RESYNC: Duration = Duration::from_secs(30);

/// How long the loop waits for the first list of this node's pods after a
/// start before it treats missing pods as gone.
pub const LOCAL_PODS_TIMEOUT: Duration = Duration::from_secs(60);

/// The announced IPs: `None` until the first pass after a start, so nothing
/// is withdrawn before the pods are known.
pub type Announced = watch::Receiver<Option<BTreeSet<IpAddr>>>;

/// The loop's own state.
pub struct AnycastLoop<K, S> {
    cache: Cache,
    allocations: Arc<Allocations<S>>,
    kernel: Arc<K>,
    trigger: Arc<Notify>,
    consent: Consented,
    prefixes: Prefixes,
    announced: watch::Sender<Option<BTreeSet<IpAddr>>>,
    board: Arc<Board>,
    metrics: Metrics,
    /// The skipped addresses of the last pass: each is logged when it
    /// starts being skipped, not every pass, and again if it comes back
    /// after it was routed.
    warned: HashSet<String>,
    /// The routes as the loop left them.
    routes: flock_anycast::Reconciler,
    /// When the installed routes were last looked up.
    verified_at: Instant,
}

impl<K: Kernel, S: AllocationStore> AnycastLoop<K, S> {
    /// The loop and what it publishes; `trigger` wakes it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cache: Cache,
        allocations: Arc<Allocations<S>>,
        kernel: Arc<K>,
        trigger: Arc<Notify>,
        consent: Consented,
        prefixes: Prefixes,
        board: Arc<Board>,
        metrics: Metrics,
    ) -> (AnycastLoop<K, S>, Announced) {
        let (announced, rx) = watch::channel(None);
        (
            AnycastLoop {
                cache,
                allocations,
                kernel,
                trigger,
                consent,
                prefixes,
                announced,
                board,
                metrics,
                warned: HashSet::new(),
                routes: flock_anycast::Reconciler::new(),
                verified_at: Instant::now(),
            },
            rx,
        )
    }

    /// Runs until cancelled. After a start nothing is touched until this
    /// node's pods, the AddressPools and the NodeConfigs are listed: the
    /// routes installed before stay (adopted, not flapped).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = self.cache.subscribe();
        tokio::select! {
            () = cancel.cancelled() => return,
            listed = self.consent.wait_for(Option::is_some) => if listed.is_err() { return },
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            listed = self.cache.wait_for_local_pods(LOCAL_PODS_TIMEOUT) => if !listed {
                warn!(
                    timeout_s = LOCAL_PODS_TIMEOUT.as_secs(),
                    "this node's pods were not listed in time; reconciling anycast routes with what is known"
                );
            },
        }
        let mut tick = tokio::time::interval(ANYCAST_TICK);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = self.trigger.notified() => {}
                changed = self.consent.changed() => if changed.is_err() { return },
                event = events.recv() => match event {
                    Ok(Event::PodReady { .. } | Event::PodDeleted { .. } | Event::Pod { .. })
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => {}
            }
            self.pass().instrument(info_span!("anycast_pass")).await;
        }
    }

    async fn pass(&mut self) {
        // Only the entries that claim an IP, and only with claims on this
        // node is the cluster (and this node's unicast IPs) looked at.
        let entries = self.allocations.claimants();
        let cache = &self.cache;
        let consent = self.consent.borrow().clone();
        let claiming = !entries.is_empty();
        let (mut unicast, claims) = if claiming {
            cluster_claims(&cache.pods())
        } else {
            Default::default()
        };
        if claiming {
            unicast.extend(self.allocations.unicast_ips());
        }
        let namespaces = if claiming {
            cache.namespaces()
        } else {
            Default::default()
        };
        let held = self.prefixes.borrow().clone();
        let no_labels = Default::default();
        let withdrawn = std::cell::Cell::new(0i64);
        let (targets, warnings) = flock_anycast::resolve(
            &entries,
            |ns, pod| {
                cache
                    .local_pod(ns, pod)
                    .is_some_and(|p| p.ready && !p.deleting)
            },
            |a, ip, claim| {
                let verdict = match (&consent, cache.local_pod(&a.namespace, &a.pod)) {
                    (None, _) => Err("AddressPools are not listed yet".to_owned()),
                    (_, None) => Err("the pod is not known".to_owned()),
                    (Some(consent), Some(pod)) => {
                        let ctx = Context {
                            namespace_labels: namespaces.get(&a.namespace).unwrap_or(&no_labels),
                            held_prefixes: &held,
                            unicast: &unicast,
                            claims: &claims,
                        };
                        let usage = match claim {
                            flock_anycast::Claim::Anycast => flock_model::PoolUse::Anycast,
                            flock_anycast::Claim::Addresses => flock_model::PoolUse::Addresses,
                        };
                        judge(consent, &pod, usage, ip, &ctx)
                    }
                };
                if verdict.is_err() {
                    withdrawn.set(withdrawn.get() + 1);
                }
                verdict
            },
        );
        self.metrics.withdrawn_claims.set(withdrawn.get());
        for warning in &warnings {
            if !self.warned.contains(warning) {
                warn!(%warning, "anycast address not routed or announced");
            }
        }
        self.warned = warnings.into_iter().collect();
        if self.verified_at.elapsed() >= ANYCAST_RESYNC {
            let drifted = self.routes.verify(&*self.kernel).await;
            if drifted > 0 {
                warn!(
                    routes = drifted,
                    "anycast routes were changed or removed outside flock; putting them back"
                );
            }
            self.verified_at = Instant::now();
        }
        let reconciled = self.routes.pass(&*self.kernel, &targets).await;
        // Announced: what the node has a route for.
        let routed: BTreeSet<IpAddr> = match &reconciled {
            Ok(changes) => targets
                .keys()
                .filter(|ip| !changes.failed.contains_key(ip))
                .copied()
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        if reconciled.is_ok() {
            self.announced.send_if_modified(|announced| {
                let changed = announced.as_ref() != Some(&routed);
                *announced = Some(routed);
                changed
            });
        }
        match reconciled {
            Ok(changes) => {
                for _ in 0..changes.replaced {
                    self.metrics.reconciled("anycast_route_set");
                }
                for _ in 0..changes.removed {
                    self.metrics.reconciled("anycast_route_removed");
                }
                let problems: Vec<String> = changes
                    .missing
                    .iter()
                    .flat_map(|(ip, hops)| {
                        hops.iter().map(move |h| {
                            format!(
                                "{ip}: nexthop {} dev {} left out until its host veth exists again",
                                h.via, h.dev
                            )
                        })
                    })
                    .chain(
                        changes
                            .failed
                            .iter()
                            .map(|(ip, e)| format!("{ip} not routed (so not announced): {e}")),
                    )
                    .chain(changes.errors)
                    .collect();
                for error in &problems {
                    self.metrics.error("anycast");
                    warn!(%error, "an anycast route could not be reconciled");
                }
                self.board.set("anycast", problems);
            }
            Err(e) => {
                self.metrics.error("anycast");
                warn!(error = %e, "reconciling anycast routes failed");
                self.board
                    .set("anycast", vec![format!("reconciling failed: {e}")]);
            }
        }
    }
}
