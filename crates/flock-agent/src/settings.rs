//! The NodeConfig loop: validates this node's NodeConfig once per change,
//! publishes the settings to the rest of the agent, rebuilds the allocator
//! when the prefixes change, and keeps the prefixes' blackholes in place.
//! An invalid or deleted NodeConfig keeps the last good settings.

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

/// The loop's own state.
pub struct SettingsLoop<K, S> {
    cache: Cache,
    allocations: Arc<Allocations<S>>,
    kernel: Arc<K>,
    published: watch::Sender<Option<Arc<NodeSettings>>>,
    board: Arc<Board>,
    metrics: Metrics,
    /// The problem last reported, so each is logged once.
    last_problem: Option<String>,
}

impl<K: Kernel, S: AllocationStore> SettingsLoop<K, S> {
    /// The loop and what it publishes.
    pub fn new(
        cache: Cache,
        allocations: Arc<Allocations<S>>,
        kernel: Arc<K>,
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
                board,
                metrics,
                last_problem: None,
            },
            rx,
        )
    }

    /// Follows NodeConfig changes, and every 30 s checks the blackholes.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = self.cache.subscribe();
        let mut tick = tokio::time::interval(BLACKHOLE_TICK);
        loop {
            self.pass().instrument(info_span!("nodeconfig_pass")).await;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    event = events.recv() => match event {
                        Ok(Event::NodeConfig) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                    _ = tick.tick() => break,
                }
            }
        }
    }

    async fn pass(&mut self) {
        match self.cache.node_config().map(|nc| nc.settings()) {
            None => {}
            Some(Err(problem)) => self.refuse(problem.to_string()),
            Some(Ok(settings)) => {
                let changed = self.published.borrow().as_deref() != Some(&settings);
                if changed {
                    let settings = Arc::new(settings);
                    match self.allocations.apply_settings(settings.clone()) {
                        Ok(()) => {
                            info!(cidr6 = ?settings.cidr6, cidr4 = ?settings.cidr4, "NodeConfig applied");
                            self.published.send_replace(Some(settings));
                            self.accept();
                        }
                        Err(problem) => self.refuse(problem),
                    }
                } else {
                    self.accept();
                }
            }
        }
        let settings = self.published.borrow().clone();
        if let Some(settings) = settings
            && let Err(e) = reconcile_blackholes(&*self.kernel, &settings).await
        {
            self.metrics.error("blackholes");
            warn!(error = %e, "reconciling node blackholes failed");
        }
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

/// Blackholes exactly for the node's current prefixes.
pub async fn reconcile_blackholes<K: Kernel>(
    kernel: &K,
    settings: &NodeSettings,
) -> flock_netlink::Result<()> {
    let want: Vec<IpNet> = settings
        .cidr6
        .map(IpNet::V6)
        .into_iter()
        .chain(settings.cidr4.map(IpNet::V4))
        .collect();
    for installed in kernel.installed().await? {
        if installed.kind == RouteKind::Blackhole && !want.contains(&installed.dst) {
            kernel.remove(installed.dst).await?;
        }
    }
    for cidr in want {
        kernel.ensure_blackhole(cidr).await?;
    }
    Ok(())
}
