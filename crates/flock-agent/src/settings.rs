//! The NodeConfig loop: validates this node's NodeConfig once per change,
//! publishes the settings to the rest of the agent, rebuilds the allocator
//! when the prefixes change, and keeps the node's prefixes blackholed and
//! published (for BIRD and the claim checks). A prefix the NodeConfig no
//! longer has stays — blackholed and announced, so its pods stay
//! reachable from other nodes — as long as an allocation holds an address
//! in it; after a restart such prefixes are found again among the
//! blackholes flock installed. An invalid or deleted NodeConfig keeps the
//! last good settings.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use flock_datastore::{Cache, Event};
use flock_model::NodeSettings;
use flock_netlink::RouteKind;
use ipnet::IpNet;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::allocations::Allocations;
use crate::kernel::Kernel;
use crate::metrics::Metrics;
use crate::status::Board;
use crate::store::AllocationStore;

/// How often the blackholes are checked without a change.
pub const BLACKHOLE_TICK: Duration = Duration::from_secs(30);

/// The settings in force: `None` until a valid NodeConfig was seen.
pub type Published = watch::Receiver<Option<Arc<NodeSettings>>>;

/// The node's prefixes: the NodeConfig's and older ones still held.
pub type Prefixes = watch::Receiver<Vec<IpNet>>;

/// The loop's own state.
pub struct SettingsLoop<K, S> {
    cache: Cache,
    allocations: Arc<Allocations<S>>,
    kernel: Arc<K>,
    published: watch::Sender<Option<Arc<NodeSettings>>>,
    prefixes: watch::Sender<Vec<IpNet>>,
    board: Arc<Board>,
    metrics: Metrics,
    /// The problem last reported, so each is logged once.
    last_problem: Option<String>,
    /// Prefixes of an earlier NodeConfig that allocations still hold.
    retired: BTreeSet<IpNet>,
    /// Whether the kernel's blackholes were looked at for retired prefixes.
    adopted: bool,
}

impl<K: Kernel, S: AllocationStore> SettingsLoop<K, S> {
    /// The loop; it publishes into `prefixes` and the returned settings.
    pub fn new(
        cache: Cache,
        allocations: Arc<Allocations<S>>,
        kernel: Arc<K>,
        prefixes: watch::Sender<Vec<IpNet>>,
        board: Arc<Board>,
        metrics: Metrics,
    ) -> (SettingsLoop<K, S>, Published) {
        let (published, rx) = watch::channel(None);
        (
            SettingsLoop {
                cache,
                allocations,
                kernel,
                published,
                prefixes,
                board,
                metrics,
                last_problem: None,
                retired: BTreeSet::new(),
                adopted: false,
            },
            rx,
        )
    }

    /// Follows NodeConfig changes (and, while an old prefix is kept, the
    /// allocations), and every 30 s checks the blackholes.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = self.cache.subscribe();
        let mut held = self.allocations.subscribe();
        let mut tick = tokio::time::interval(BLACKHOLE_TICK);
        loop {
            self.pass().instrument(info_span!("nodeconfig_pass")).await;
            let watch_held = !self.retired.is_empty();
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    event = events.recv() => match event {
                        Ok(Event::NodeConfig) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    changed = held.changed(), if watch_held => if changed.is_ok() { break },
                    _ = tick.tick() => break,
                }
            }
        }
    }

    async fn pass(&mut self) {
        let mut fresh = None;
        match self.cache.node_config().map(|nc| nc.settings()) {
            None => {}
            Some(Err(problem)) => self.refuse(problem.to_string()),
            Some(Ok(settings)) => {
                let before = self.published.borrow().clone();
                if before.as_deref() != Some(&settings) {
                    let settings = Arc::new(settings);
                    match self.allocations.apply_settings(settings.clone()) {
                        Ok(()) => {
                            if let Some(old) = before {
                                self.retired.extend(own_prefixes(&old));
                            }
                            fresh = Some(settings);
                        }
                        Err(problem) => self.refuse(problem),
                    }
                } else {
                    self.accept();
                }
            }
        }
        let Some(settings) = fresh.clone().or_else(|| self.published.borrow().clone()) else {
            return;
        };
        let current = own_prefixes(&settings);
        if let Err(e) = self.keep_prefixes(&current).await {
            self.metrics.error("blackholes");
            warn!(error = %e, "reconciling node blackholes failed");
        }
        // New settings only once their prefixes are published: BIRD renders
        // on the settings, and a render without the prefixes would withdraw
        // them from the fabric (on every restart, until the next pass).
        if let Some(settings) = fresh
            && self.adopted
        {
            info!(cidr6 = ?settings.cidr6, cidr4 = ?settings.cidr4, "NodeConfig applied");
            self.published.send_replace(Some(settings));
            self.accept();
        }
    }

    /// Drops retired prefixes no allocation holds an address in, publishes
    /// the current and retired prefixes and makes the blackholes equal them.
    async fn keep_prefixes(&mut self, current: &[IpNet]) -> flock_netlink::Result<()> {
        let installed = self.kernel.installed().await?;
        let blackholes: Vec<IpNet> = installed
            .iter()
            .filter(|r| r.kind == RouteKind::Blackhole)
            .map(|r| r.dst)
            .collect();
        let held: Vec<std::net::IpAddr> = self
            .allocations
            .snapshot()
            .iter()
            .flat_map(|a| a.unicast().collect::<Vec<_>>())
            .collect();
        if !self.adopted {
            // After a restart: the blackholes of older prefixes tell which they were.
            self.adopted = true;
            self.retired.extend(blackholes.iter().copied());
        }
        let before = self.retired.clone();
        self.retired
            .retain(|p| !current.contains(p) && held.iter().any(|ip| p.contains(ip)));
        for gone in before.difference(&self.retired) {
            if !current.contains(gone) {
                info!(prefix = %gone, "no pod holds an address of an old prefix any more; it is withdrawn");
            }
        }
        let want: Vec<IpNet> = current.iter().chain(&self.retired).copied().collect();
        // Published before the kernel is touched: BIRD announces from its
        // own static routes, whatever a failed blackhole here.
        self.prefixes.send_if_modified(|p| {
            let changed = *p != want;
            *p = want.clone();
            changed
        });
        for dst in blackholes.iter().filter(|b| !want.contains(b)) {
            self.kernel.remove(*dst).await?;
        }
        for cidr in &want {
            self.kernel.ensure_blackhole(*cidr).await?;
        }
        Ok(())
    }

    fn refuse(&mut self, problem: String) {
        if self.last_problem.as_ref() != Some(&problem) {
            self.metrics.error("nodeconfig");
            warn!(%problem, "NodeConfig refused; the last good one stays in force");
            self.board.set(
                "nodeconfig",
                vec![format!(
                    "{problem}; the last good NodeConfig stays in force"
                )],
            );
            self.last_problem = Some(problem);
        }
    }

    fn accept(&mut self) {
        if self.last_problem.take().is_some() {
            self.board.set("nodeconfig", Vec::new());
        }
    }
}

/// The NodeConfig's own prefixes.
pub fn own_prefixes(settings: &NodeSettings) -> Vec<IpNet> {
    settings
        .cidr6
        .map(IpNet::V6)
        .into_iter()
        .chain(settings.cidr4.map(IpNet::V4))
        .collect()
}
