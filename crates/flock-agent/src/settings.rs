//! The NodeConfig loop: validates this node's NodeConfig once per change,
//! publishes the settings to the rest of the agent, rebuilds the allocator
//! when the prefixes change, and keeps the node's prefixes blackholed and
//! published (for BIRD and the claim checks). A prefix the NodeConfig no
//! longer has stays — blackholed and announced, so its pods stay
//! reachable from other nodes — as long as an allocation holds an address
//! in it; after a restart such prefixes are found again among the
//! blackholes flock installed. An invalid or deleted NodeConfig keeps the
//! last good settings.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use flock_datastore::{Cache, Event};
use flock_model::{NodeConfig, NodeConfigSpec, NodeSettings};
use flock_netlink::RouteKind;
use ipnet::IpNet;
use kube::ResourceExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::allocations::Allocations;
use crate::condition::ValidStatus;
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

/// NodeConfigs validated once per change: the outcome of an unchanged one
/// (same name, annotations and spec) is reused.
#[derive(Debug, Default)]
pub struct Validations {
    seen: HashMap<String, Validation>,
    /// How many validations ran.
    runs: u64,
}

#[derive(Debug)]
struct Validation {
    annotations: BTreeMap<String, String>,
    spec: NodeConfigSpec,
    outcome: Result<Arc<NodeSettings>, String>,
}

impl Validations {
    /// `nc`'s settings, or why it is refused (naming the field).
    pub fn settings(&mut self, nc: &NodeConfig) -> Result<Arc<NodeSettings>, String> {
        let name = nc.name_any();
        if let Some(v) = self.seen.get(&name)
            && v.spec == nc.spec
            && &v.annotations == nc.annotations()
        {
            return v.outcome.clone();
        }
        self.runs += 1;
        let outcome = nc.settings().map(Arc::new).map_err(|e| e.to_string());
        self.seen.insert(
            name,
            Validation {
                annotations: nc.annotations().clone(),
                spec: nc.spec.clone(),
                outcome: outcome.clone(),
            },
        );
        outcome
    }

    /// Forgets NodeConfigs not in `names` (deleted ones).
    pub fn retain(&mut self, names: &HashSet<String>) {
        self.seen.retain(|name, _| names.contains(name));
    }

    /// How many validations ran so far.
    pub fn runs(&self) -> u64 {
        self.runs
    }
}

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
    /// The blackholes as this loop left them: `None` until the kernel's
    /// routes are listed (at the start, and again after a failed change).
    blackholes: Option<BTreeSet<IpNet>>,
    /// This node's NodeConfig, validated once per change.
    validations: Validations,
    /// Where the NodeConfig's `Valid` condition is written (kubernetes datastore).
    status: Option<ValidStatus<NodeConfig>>,
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
                blackholes: None,
                validations: Validations::default(),
                status: None,
            },
            rx,
        )
    }

    /// Reports the NodeConfig's validity in its status too.
    pub fn reporting(mut self, status: ValidStatus<NodeConfig>) -> Self {
        self.status = Some(status);
        self
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
        let node_config = self.cache.node_config();
        let validated = node_config.as_ref().map(|nc| self.validations.settings(nc));
        let mut refused = None;
        match validated {
            // Deleted after one was in force: it stays in force, and says so.
            None if self.published.borrow().is_some() => {
                self.refuse(format!("NodeConfig {} was deleted", self.cache.node()));
            }
            None => {}
            Some(Err(problem)) => refused = Some(problem),
            Some(Ok(settings)) => {
                let before = self.published.borrow().clone();
                if before.as_deref() != Some(&*settings) {
                    match self.allocations.apply_settings(settings.clone()) {
                        Ok(()) => {
                            if let Some(old) = before {
                                self.retired.extend(own_prefixes(&old));
                            }
                            fresh = Some(settings);
                        }
                        Err(problem) => refused = Some(problem),
                    }
                } else {
                    self.accept();
                }
            }
        }
        if let Some(problem) = &refused {
            self.refuse(problem.clone());
        }
        if let (Some(status), Some(nc)) = (&self.status, &node_config)
            && let Err(error) = status.report(nc, refused.as_deref()).await
        {
            warn!(node = %nc.name_any(), %error, "cannot write the NodeConfig's Valid condition");
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
    /// The node's routes are listed only at the start and after a failed
    /// change; otherwise the loop works from what it installed, and each
    /// wanted blackhole is created exclusively (one in place is not
    /// touched, one removed by hand comes back).
    async fn keep_prefixes(&mut self, current: &[IpNet]) -> flock_netlink::Result<()> {
        let mut blackholes = match self.blackholes.take() {
            Some(known) => known,
            None => self
                .kernel
                .installed()
                .await?
                .into_iter()
                .filter(|r| r.kind == RouteKind::Blackhole)
                .map(|r| r.dst)
                .collect(),
        };
        if !self.adopted {
            // After a restart: the blackholes of older prefixes tell which they were.
            self.adopted = true;
            self.retired.extend(blackholes.iter().copied());
        }
        let before = self.retired.clone();
        if !self.retired.is_empty() {
            let held: Vec<std::net::IpAddr> = self
                .allocations
                .snapshot()
                .iter()
                .flat_map(|a| a.unicast().collect::<Vec<_>>())
                .collect();
            self.retired
                .retain(|p| !current.contains(p) && held.iter().any(|ip| p.contains(ip)));
        }
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
        let unwanted: Vec<IpNet> = blackholes
            .iter()
            .filter(|b| !want.contains(b))
            .copied()
            .collect();
        for dst in unwanted {
            self.kernel.remove(dst).await?;
            blackholes.remove(&dst);
        }
        for cidr in &want {
            self.kernel.ensure_blackhole(*cidr).await?;
            blackholes.insert(*cidr);
        }
        self.blackholes = Some(blackholes);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node_config(cidr4: &str) -> NodeConfig {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "flock.fritzlab.net/v1alpha1",
            "kind": "NodeConfig",
            "metadata": {"name": "node-a"},
            "spec": {"cidr4": cidr4},
        }))
        .expect("NodeConfig")
    }

    #[test]
    fn a_nodeconfig_is_validated_once_per_change() {
        let mut validations = Validations::default();
        let nc = node_config("198.18.0.0/24");
        for _ in 0..3 {
            assert!(validations.settings(&nc).is_ok());
        }
        assert_eq!(
            validations.runs(),
            1,
            "an unchanged NodeConfig is not validated again"
        );
        let bad = node_config("198.18.0.0/33");
        let refused = validations.settings(&bad).expect_err("refused");
        assert!(refused.contains("spec.cidr4"), "{refused}");
        assert_eq!(validations.settings(&bad), Err(refused));
        assert_eq!(validations.runs(), 2);
        let mut annotated = nc.clone();
        annotated
            .metadata
            .annotations
            .get_or_insert_default()
            .insert("flock.fritzlab.net/ip-algo".into(), "random".into());
        let _ = validations.settings(&annotated);
        assert_eq!(validations.runs(), 3, "annotations are part of the change");
        validations.retain(&HashSet::new());
        let _ = validations.settings(&annotated);
        assert_eq!(validations.runs(), 4, "a deleted NodeConfig is forgotten");
    }
}
