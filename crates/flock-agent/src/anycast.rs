//! The anycast loop: keeps the routes of anycast and `addresses` IPs equal
//! to their Ready pods, and publishes the IPs announced because of them
//! (for BIRD). Triggers: every ADD and DEL, pod readiness changes, a 2 s tick.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use flock_datastore::{Cache, Event};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::allocations::Allocations;
use crate::kernel::Kernel;
use crate::metrics::Metrics;
use crate::status::Board;
use crate::store::AllocationStore;

/// How often anycast routes are reconciled without a trigger.
pub const ANYCAST_TICK: Duration = Duration::from_secs(2);

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
    announced: watch::Sender<Option<BTreeSet<IpAddr>>>,
    board: Arc<Board>,
    metrics: Metrics,
    /// Each skipped address is logged once, not every pass.
    warned: HashSet<String>,
}

impl<K: Kernel, S: AllocationStore> AnycastLoop<K, S> {
    /// The loop and what it publishes; `trigger` wakes it.
    pub fn new(
        cache: Cache,
        allocations: Arc<Allocations<S>>,
        kernel: Arc<K>,
        trigger: Arc<Notify>,
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
                announced,
                board,
                metrics,
                warned: HashSet::new(),
            },
            rx,
        )
    }

    /// Runs until cancelled. After a start nothing is touched until this
    /// node's pods are listed: the routes installed before stay (adopted,
    /// not flapped).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = self.cache.subscribe();
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
        let entries = self.allocations.snapshot();
        let cache = &self.cache;
        let (targets, warnings) = flock_anycast::resolve(&entries, |ns, pod| {
            cache.local_pod(ns, pod).is_some_and(|p| p.ready)
        });
        for warning in warnings {
            if self.warned.insert(warning.clone()) {
                warn!(%warning, "anycast address skipped");
            }
        }
        self.announced.send_if_modified(|announced| {
            let now: BTreeSet<IpAddr> = targets.keys().copied().collect();
            let changed = announced.as_ref() != Some(&now);
            *announced = Some(now);
            changed
        });
        match flock_anycast::reconcile(&*self.kernel, &targets).await {
            Ok(changes) => {
                for _ in 0..changes.replaced {
                    self.metrics.reconciled("anycast_route_set");
                }
                for _ in 0..changes.removed {
                    self.metrics.reconciled("anycast_route_removed");
                }
                for error in &changes.errors {
                    self.metrics.error("anycast");
                    warn!(%error, "an anycast route could not be reconciled");
                }
                self.board.set("anycast", changes.errors);
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
