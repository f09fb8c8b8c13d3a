//! Prometheus metrics, served at `/metrics`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an RPC observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// ADD, DEL, CHECK, STATUS or GC.
    pub op: String,
    /// `ok`, or the CNI error code.
    pub result: String,
}

/// Labels naming an address family.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FamilyLabels {
    /// `ipv6` or `ipv4`.
    pub family: String,
}

/// Labels naming a kind of event.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// What happened.
    pub kind: String,
}

/// Every metric the agent exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    /// RPC latency by verb and result.
    pub rpc: Family<RpcLabels, Histogram>,
    /// Addresses in use per family.
    pub pool_in_use: Family<FamilyLabels, Gauge>,
    /// Addresses a pool can hand out (IPv4).
    pub pool_capacity: Family<FamilyLabels, Gauge>,
    /// Reconciliation actions (stale entries released, orphan veths deleted, …).
    pub reconciles: Family<KindLabels, Counter>,
    /// Errors outside any RPC (teardown completion, reconcile failures, …).
    pub errors: Family<KindLabels, Counter>,
    /// `birdc configure` runs by result (`ok`, `error` or `refused`).
    pub bird_reloads: Family<ResultLabels, Counter>,
    /// Addresses held by more than one allocation (a store from before
    /// that was refused); never handed to a third pod.
    pub duplicate_addresses: Gauge,
    /// Claimed IPs of this node's pods that are not routed or announced
    /// because no AddressPool (any more) consents to them.
    pub withdrawn_claims: Gauge,
    /// NetworkPolicies nft refused: they isolate their pods and allow nothing.
    pub netpol_refused: Gauge,
    /// Lists the datastore's watches completed, by kind.
    pub datastore_lists: Family<KindLabels, Counter>,
    /// Lists after the first, by kind and why the watch started over.
    pub datastore_relists: Family<RelistLabels, Counter>,
    /// 1 per BGP session BIRD has Established, 0 per session it has not.
    pub bgp_session_up: Family<SessionLabels, Gauge>,
    /// 1 while `birdc` answers on BIRD's control socket.
    pub bird_up: Gauge,
}

/// Labels naming a BGP session.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    /// BIRD's protocol name (`peer_…`).
    pub session: String,
}

/// Labels of a relist.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RelistLabels {
    /// The kind listed (`pods`, `networkpolicies`, …).
    pub kind: String,
    /// Why: `gone` (410), `list_failed`, `no_resource_version`, `restarted`.
    pub reason: String,
}

/// Labels naming an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flock");
        let rpc = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            // 100 µs to ~3 s.
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        registry.register(
            "rpc_duration_seconds",
            "Plugin RPC latency by verb and result",
            rpc.clone(),
        );
        let pool_in_use = Family::<FamilyLabels, Gauge>::default();
        registry.register(
            "ipam_in_use",
            "Pod addresses in use per family",
            pool_in_use.clone(),
        );
        let pool_capacity = Family::<FamilyLabels, Gauge>::default();
        registry.register(
            "ipam_capacity",
            "Pod addresses the node prefix can hand out",
            pool_capacity.clone(),
        );
        let reconciles = Family::<KindLabels, Counter>::default();
        registry.register(
            "reconcile_actions",
            "Reconciliation actions taken, by kind",
            reconciles.clone(),
        );
        let errors = Family::<KindLabels, Counter>::default();
        registry.register("errors", "Errors outside RPCs, by kind", errors.clone());
        let bird_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "bird_reloads",
            "BIRD configuration reloads (write + birdc configure), by result",
            bird_reloads.clone(),
        );
        let duplicate_addresses = Gauge::default();
        registry.register(
            "duplicate_addresses",
            "Addresses held by more than one allocation (see /readyz and the log)",
            duplicate_addresses.clone(),
        );
        let withdrawn_claims = Gauge::default();
        registry.register(
            "withdrawn_claims",
            "Claimed anycast/addresses IPs of this node's pods withdrawn for want of an AddressPool's consent (the log names each)",
            withdrawn_claims.clone(),
        );
        let netpol_refused = Gauge::default();
        registry.register(
            "netpol_refused_policies",
            "NetworkPolicies nft refused: their pods stay isolated and they allow nothing (the log names each)",
            netpol_refused.clone(),
        );
        let datastore_lists = Family::<KindLabels, Counter>::default();
        registry.register(
            "datastore_lists",
            "Lists the Kubernetes datastore's watches completed, by kind (the first and every relist)",
            datastore_lists.clone(),
        );
        let datastore_relists = Family::<RelistLabels, Counter>::default();
        registry.register(
            "datastore_relists",
            "Lists after a kind's first, by kind and reason (gone: the API server answered 410 for the watch's resourceVersion)",
            datastore_relists.clone(),
        );
        let bgp_session_up = Family::<SessionLabels, Gauge>::default();
        registry.register(
            "bgp_session_up",
            "1 for each BGP session BIRD has Established, 0 for each it has not (read from birdc every 15 s)",
            bgp_session_up.clone(),
        );
        let bird_up = Gauge::default();
        registry.register(
            "bird_up",
            "1 while BIRD answers birdc on its control socket",
            bird_up.clone(),
        );
        Metrics {
            registry: Arc::new(Mutex::new(registry)),
            bgp_session_up,
            bird_up,
            datastore_lists,
            datastore_relists,
            netpol_refused,
            duplicate_addresses,
            withdrawn_claims,
            rpc,
            pool_in_use,
            pool_capacity,
            reconciles,
            errors,
            bird_reloads,
        }
    }

    /// Counts one BIRD reload attempt: `ok`, `error` (retried) or
    /// `refused` (BIRD's parser would not take the text; the file was kept).
    pub fn bird_reloaded(&self, outcome: &flock_bird::Outcome) {
        let result = match outcome {
            flock_bird::Outcome::Reloaded => "ok",
            flock_bird::Outcome::Failed(_) => "error",
            flock_bird::Outcome::Refused(_) => "refused",
        };
        self.bird_reloads
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Records what BIRD said of its sessions (or that it said nothing).
    pub fn bgp_sessions(&self, bgp: &flock_proto::admin::Bgp) {
        self.bird_up.set(i64::from(bgp.error.is_none()));
        self.bgp_session_up.clear();
        for s in &bgp.sessions {
            let up = s.state == "up" && s.info.starts_with("Established");
            self.bgp_session_up
                .get_or_create(&SessionLabels {
                    session: s.name.clone(),
                })
                .set(i64::from(up));
        }
    }

    /// Records one RPC.
    pub fn observe_rpc(&self, op: &str, result: &str, took: Duration) {
        self.rpc
            .get_or_create(&RpcLabels {
                op: op.to_owned(),
                result: result.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts one reconciliation action.
    pub fn reconciled(&self, kind: &str) {
        self.reconciles
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts one error.
    pub fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Publishes the pools' fill.
    pub fn set_usage(&self, usage: flock_ipam::Usage) {
        let family = |f: &str| FamilyLabels {
            family: f.to_owned(),
        };
        self.pool_in_use
            .get_or_create(&family("ipv6"))
            .set(usage.v6_in_use as i64);
        self.pool_in_use
            .get_or_create(&family("ipv4"))
            .set(usage.v4_in_use as i64);
        self.pool_capacity
            .get_or_create(&family("ipv4"))
            .set(i64::from(usage.v4_capacity));
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}

impl flock_datastore::kubernetes::ListObserver for Metrics {
    fn listed(&self, kind: &'static str, _objects: usize, relist: Option<&'static str>) {
        self.datastore_lists
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
        if let Some(reason) = relist {
            self.datastore_relists
                .get_or_create(&RelistLabels {
                    kind: kind.to_owned(),
                    reason: reason.to_owned(),
                })
                .inc();
        }
    }
}
