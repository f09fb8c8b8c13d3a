//! NetworkPolicy enforcement: the cluster as the cache sees it and this
//! node's pods as the store records them, through `flock-netpol`, into
//! the kernel with one `nft -f -`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flock_datastore::Event;
use flock_model::host_iface_name;
use flock_netpol::{Applied, Applier, ClusterPod, Input, LocalPod, NamedPort, Protocol, Ruleset};
use tokio::sync::Mutex as AsyncMutex;
use tracing::{info, warn};

use crate::pods::Shared;

/// How often the table is checked for outside changes and re-applied.
pub const POLICY_HEAL: Duration = Duration::from_secs(30);

/// How long an ADD waits for the first lists of pods, namespaces and
/// policies after a start before it answers "try again later".
const SYNC_WAIT: Duration = Duration::from_secs(3);

/// The enforcement state shared by the ADD path and the policy task.
pub(crate) struct Policy {
    applier: Arc<Mutex<Applier>>,
    /// One translation and load at a time, in order.
    turn: AsyncMutex<()>,
    /// Wakes the policy task (after a DEL, or an ADD of an unisolated pod).
    pub trigger: tokio::sync::Notify,
    status: Mutex<PolicyStatus>,
}

/// What the last enforcement left to report.
#[derive(Debug, Clone, Default)]
pub struct PolicyStatus {
    /// The last load failure, cleared by the next success.
    pub last_error: Option<String>,
    /// Problems in the policies (each naming the policy and field).
    pub warnings: Vec<String>,
}

impl Policy {
    /// Enforcement through `nft` (a path or a name on `PATH`).
    pub fn new(nft: &str) -> Policy {
        Policy {
            applier: Arc::new(Mutex::new(Applier::new(nft))),
            turn: AsyncMutex::new(()),
            trigger: tokio::sync::Notify::new(),
            status: Mutex::default(),
        }
    }

    /// The last outcome.
    pub fn status(&self) -> PolicyStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The translation for the current state.
async fn ruleset(shared: &Shared) -> Ruleset {
    let policies = shared.cache.policies();
    if policies.is_empty() {
        // Nothing isolates anyone: no need to look at a single pod.
        return Ruleset::default();
    }
    let mut local = Vec::new();
    let mut local_ips: HashMap<(String, String), Vec<IpAddr>> = HashMap::new();
    {
        let alloc = shared.allocations.lock().await;
        for a in alloc.store.iter() {
            local.push(LocalPod {
                namespace: a.namespace.clone(),
                name: a.pod.clone(),
                iface: host_iface_name(&a.container_id),
            });
            let ips = local_ips
                .entry((a.namespace.clone(), a.pod.clone()))
                .or_default();
            ips.extend(a.ip4.map(IpAddr::V4));
            ips.extend(a.ip6.map(IpAddr::V6));
        }
    }
    // The store knows this node's pods' addresses before the API does.
    let pods: Vec<ClusterPod> = shared
        .cache
        .pods()
        .into_iter()
        .filter(|p| !p.terminated)
        .map(|p| {
            let ips = local_ips
                .remove(&(p.namespace.clone(), p.name.clone()))
                .unwrap_or(p.ips);
            ClusterPod {
                ports: p
                    .ports
                    .iter()
                    .filter_map(|cp| {
                        Some(NamedPort {
                            name: cp.name.clone()?,
                            port: cp.port,
                            protocol: Protocol::parse(Some(&cp.protocol))?,
                        })
                    })
                    .collect(),
                namespace: p.namespace,
                name: p.name,
                labels: p.labels,
                ips,
            }
        })
        .collect();
    let namespaces = shared.cache.namespaces();
    flock_netpol::translate(&Input {
        pods: &pods,
        local: &local,
        namespaces: &namespaces,
        policies: &policies,
    })
}

/// Translates, renders and loads the ruleset (skipped when unchanged);
/// `heal` also re-loads a table changed behind flock's back. A failure
/// keeps the kernel's previous table.
pub(crate) async fn enforce(shared: &Shared, heal: bool) -> Result<(), String> {
    let _turn = shared.policy.turn.lock().await;
    let rules = ruleset(shared).await;
    load(shared, &rules, heal).await
}

/// Renders and loads `rules`; the caller holds the policy turn.
async fn load(shared: &Shared, rules: &Ruleset, heal: bool) -> Result<(), String> {
    let policy = &shared.policy;
    let outcome = match flock_netpol::render(rules) {
        Err(e) => Err(e.to_string()),
        Ok(script) => {
            let applier = policy.applier.clone();
            tokio::task::spawn_blocking(move || {
                let mut a = applier.lock().unwrap_or_else(|p| p.into_inner());
                let loaded = a.apply(&script)?;
                // A table loaded just now needs no check.
                let healed = if heal && loaded == Applied::Unchanged {
                    a.heal()?
                } else {
                    Applied::Unchanged
                };
                Ok::<_, flock_netpol::ApplyError>((loaded, healed))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        }
    };
    let mut status = policy.status.lock().unwrap_or_else(|p| p.into_inner());
    if status.warnings != rules.warnings {
        for w in &rules.warnings {
            warn!(problem = %w, "NetworkPolicy part ignored");
        }
        status.warnings = rules.warnings.clone();
    }
    match outcome {
        Ok((loaded, healed)) => {
            if loaded == Applied::Loaded {
                shared.metrics.reconciled("netpol_loaded");
            }
            if healed == Applied::Healed {
                shared.metrics.reconciled("netpol_healed");
                warn!(
                    "the nft table inet flock was changed or deleted outside flock; loaded again"
                );
            }
            if status.last_error.take().is_some() {
                info!("NetworkPolicy ruleset loaded again after a failure");
            }
            Ok(())
        }
        Err(e) => {
            shared.metrics.error("netpol");
            warn!(error = %e, "NetworkPolicy ruleset not loaded; the kernel keeps the previous one");
            status.last_error = Some(e.clone());
            Err(e)
        }
    }
}

/// Why a new pod's rules are not in place.
#[derive(Debug)]
pub(crate) enum NotEnforced {
    /// Pods, namespaces or policies have not been listed yet.
    NotListed,
    /// Translating or loading failed.
    Failed(String),
}

/// After an ADD: when a policy isolates the new pod, its rules are in the
/// kernel before this returns (no packet passes before them); otherwise
/// the policy task picks the pod up as a peer soon after.
pub(crate) async fn enforce_for_new_pod(
    shared: &Shared,
    namespace: &str,
    iface: &str,
) -> Result<(), NotEnforced> {
    if !shared.cache.wait_for_policy_inputs(SYNC_WAIT).await {
        return Err(NotEnforced::NotListed);
    }
    // Only a policy of its own namespace can isolate a pod.
    if shared.cache.has_policies_in(namespace) {
        let _turn = shared.policy.turn.lock().await;
        let rules = ruleset(shared).await;
        if rules.pod(iface).is_some() {
            return load(shared, &rules, false)
                .await
                .map_err(NotEnforced::Failed);
        }
    }
    shared.policy.trigger.notify_one();
    Ok(())
}

/// Keeps the kernel's table equal to the policies: on every change of
/// pods, namespaces or policies, after DELs, and every 30 s (then also
/// healing outside changes). Loads nothing until pods, namespaces and
/// policies have been listed once after a start, so a restart never opens
/// what was closed: the kernel keeps the table it has meanwhile.
pub(crate) async fn keep_policy_enforced(shared: Arc<Shared>) {
    let mut events = shared.cache.subscribe();
    while !shared
        .cache
        .wait_for_policy_inputs(crate::runtime::LOCAL_PODS_TIMEOUT)
        .await
    {
        warn!(
            "pods, namespaces or NetworkPolicies not listed yet; the kernel keeps its NetworkPolicy table until they are"
        );
    }
    let mut tick = tokio::time::interval(POLICY_HEAL);
    loop {
        let heal = tokio::select! {
            () = shared.policy.trigger.notified() => false,
            event = events.recv() => match event {
                Ok(Event::Pod { .. } | Event::PodDeleted { .. } | Event::Namespaces | Event::Policies)
                | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => false,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = tick.tick() => true,
        };
        // A burst of events is one pass.
        while let Ok(event) = events.try_recv() {
            let _ = event;
        }
        let _ = enforce(&shared, heal).await;
    }
}
