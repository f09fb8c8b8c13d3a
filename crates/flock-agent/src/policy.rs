//! NetworkPolicy enforcement, one loop that owns the nft loader: the
//! cluster as the cache sees it and this node's pods as the allocations
//! record them, through `flock-netpol`, into the kernel with one `nft -f -`.
//!
//! An ADD of a pod a policy selects asks the loop, through a
//! [`PolicyHandle`], to put the pod's isolation in place before the ADD
//! answers; the loop serves such requests before any other pass.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flock_datastore::{Cache, Event};
use flock_netpol::{Applied, ClusterPod, Input, Loader, LocalPod, NamedPort, Protocol, Ruleset};
use flock_store::AllocState;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::allocations::Allocations;
use crate::metrics::Metrics;
use crate::status::Board;
use crate::store::AllocationStore;

/// How often the table is checked for outside changes and re-applied.
pub const POLICY_HEAL: Duration = Duration::from_secs(30);

/// How long an ADD waits for the first lists of pods, namespaces and
/// policies after a start before it answers "try again later".
const SYNC_WAIT: Duration = Duration::from_secs(3);

/// How long the loop waits at a time for the first lists after a start.
const LIST_WAIT: Duration = Duration::from_secs(60);

/// Why a new pod's rules are not in place.
#[derive(Debug)]
pub enum NotEnforced {
    /// Pods, namespaces or policies have not been listed yet.
    NotListed,
    /// Translating or loading failed.
    Failed(String),
}

struct Isolate {
    iface: String,
    reply: oneshot::Sender<Result<(), NotEnforced>>,
}

/// What the pod handler holds of the policy loop.
#[derive(Clone)]
pub struct PolicyHandle {
    cache: Cache,
    requests: mpsc::Sender<Isolate>,
    trigger: Arc<Notify>,
}

impl PolicyHandle {
    /// Asks for a pass soon (after a DEL, or an ADD no policy isolates).
    pub fn trigger(&self) {
        self.trigger.notify_one();
    }

    /// After an ADD: when a policy isolates the new pod (host interface
    /// `iface`), its rules are in the kernel before this returns; otherwise
    /// the loop picks the pod up as a peer soon after.
    pub async fn isolate(&self, namespace: &str, iface: &str) -> Result<(), NotEnforced> {
        if !self.cache.wait_for_policy_inputs(SYNC_WAIT).await {
            return Err(NotEnforced::NotListed);
        }
        // Only a policy of its own namespace can isolate a pod.
        if !self.cache.has_policies_in(namespace) {
            self.trigger();
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        let request = Isolate {
            iface: iface.to_owned(),
            reply,
        };
        let stopped = || NotEnforced::Failed("NetworkPolicy enforcement has stopped".into());
        self.requests.send(request).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The policy loop's own state.
pub struct PolicyLoop<L, S> {
    cache: Cache,
    allocations: Arc<Allocations<S>>,
    loader: Arc<Mutex<L>>,
    requests: mpsc::Receiver<Isolate>,
    trigger: Arc<Notify>,
    board: Arc<Board>,
    metrics: Metrics,
    warnings: Vec<String>,
    last_error: Option<String>,
}

/// A loop and the handle that reaches it.
pub fn policy_loop<L: Loader, S: AllocationStore>(
    cache: Cache,
    allocations: Arc<Allocations<S>>,
    loader: L,
    board: Arc<Board>,
    metrics: Metrics,
) -> (PolicyLoop<L, S>, PolicyHandle) {
    let (tx, requests) = mpsc::channel(64);
    let trigger = Arc::new(Notify::new());
    let handle = PolicyHandle {
        cache: cache.clone(),
        requests: tx,
        trigger: trigger.clone(),
    };
    let policy = PolicyLoop {
        cache,
        allocations,
        loader: Arc::new(Mutex::new(loader)),
        requests,
        trigger,
        board,
        metrics,
        warnings: Vec::new(),
        last_error: None,
    };
    (policy, handle)
}

impl<L: Loader, S: AllocationStore> PolicyLoop<L, S> {
    /// Keeps the kernel's table equal to the policies: on every change of
    /// pods, namespaces or policies, after DELs, and every 30 s (then also
    /// healing outside changes). Loads nothing until pods, namespaces and
    /// policies have been listed once after a start, so a restart never
    /// opens what was closed: the kernel keeps the table it has meanwhile.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = self.cache.subscribe();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                listed = self.cache.wait_for_policy_inputs(LIST_WAIT) => if listed { break },
            }
            warn!(
                "pods, namespaces or NetworkPolicies not listed yet; the kernel keeps its NetworkPolicy table until they are"
            );
        }
        let mut tick = tokio::time::interval(POLICY_HEAL);
        loop {
            let heal = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                Some(request) = self.requests.recv() => {
                    let outcome = self.isolate(&request.iface).await;
                    let _ = request.reply.send(outcome);
                    continue;
                }
                () = self.trigger.notified() => false,
                event = events.recv() => match event {
                    Ok(Event::Pod { .. } | Event::PodDeleted { .. } | Event::Namespaces | Event::Policies)
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => false,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = tick.tick() => true,
            };
            // A burst of events is one pass.
            while events.try_recv().is_ok() {}
            let _ = self
                .enforce(heal)
                .instrument(info_span!("netpol_pass", heal))
                .await;
        }
    }

    async fn isolate(&mut self, iface: &str) -> Result<(), NotEnforced> {
        let rules = self.ruleset();
        if rules.pod(iface).is_none() {
            self.trigger.notify_one();
            return Ok(());
        }
        self.load(&rules, false).await.map_err(NotEnforced::Failed)
    }

    async fn enforce(&mut self, heal: bool) -> Result<(), String> {
        let rules = self.ruleset();
        self.load(&rules, heal).await
    }

    /// The translation for the current state.
    fn ruleset(&self) -> Ruleset {
        let policies = self.cache.policies();
        if policies.is_empty() {
            // Nothing isolates anyone: no need to look at a single pod.
            return Ruleset::default();
        }
        let mut local = Vec::new();
        let mut local_ips: HashMap<(String, String), Vec<IpAddr>> = HashMap::new();
        for a in self.allocations.snapshot() {
            if a.state == AllocState::Releasing {
                continue; // its veth is going away
            }
            local.push(LocalPod {
                namespace: a.namespace.clone(),
                name: a.pod.clone(),
                iface: a.host_iface.clone(),
            });
            local_ips
                .entry((a.namespace.clone(), a.pod.clone()))
                .or_default()
                .extend(a.unicast());
        }
        // The store knows this node's pods' addresses before the API does.
        let pods: Vec<ClusterPod> = self
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
        let namespaces = self.cache.namespaces();
        flock_netpol::translate(&Input {
            pods: &pods,
            local: &local,
            namespaces: &namespaces,
            policies: &policies,
        })
    }

    /// Renders and loads `rules`; `heal` also re-loads a table changed
    /// behind flock's back. A failure keeps the kernel's previous table.
    async fn load(&mut self, rules: &Ruleset, heal: bool) -> Result<(), String> {
        let outcome = match flock_netpol::render(rules) {
            Err(e) => Err(e.to_string()),
            Ok(script) => {
                let loader = self.loader.clone();
                tokio::task::spawn_blocking(move || {
                    let mut l = loader.lock().unwrap_or_else(|p| p.into_inner());
                    let loaded = l.apply(&script)?;
                    // A table loaded just now needs no check.
                    let healed = if heal && loaded == Applied::Unchanged {
                        l.heal()?
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
        if self.warnings != rules.warnings {
            for w in &rules.warnings {
                warn!(problem = %w, "NetworkPolicy part ignored");
            }
            self.warnings = rules.warnings.clone();
        }
        let result = match outcome {
            Ok((loaded, healed)) => {
                if loaded == Applied::Loaded {
                    self.metrics.reconciled("netpol_loaded");
                }
                if healed == Applied::Healed {
                    self.metrics.reconciled("netpol_healed");
                    warn!(
                        "the nft table inet flock was changed or deleted outside flock; loaded again"
                    );
                }
                if self.last_error.take().is_some() {
                    info!("NetworkPolicy ruleset loaded again after a failure");
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.error("netpol");
                warn!(error = %e, "NetworkPolicy ruleset not loaded; the kernel keeps the previous one");
                self.last_error = Some(e.clone());
                Err(e)
            }
        };
        self.board.set(
            "networkpolicy",
            self.last_error
                .iter()
                .map(|e| format!("last load failed: {e}"))
                .chain(self.warnings.iter().cloned())
                .collect(),
        );
        result
    }
}
