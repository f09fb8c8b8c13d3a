//! Claimed addresses: an `anycast` or `addresses` IP is a pod's only with
//! the operator's consent (an AddressPool of that use that contains it and
//! selects the pod's namespace) and only when it takes nothing from
//! anyone: never inside a node's pod prefix or a prefix this node still
//! holds addresses of, never another pod's own address, and (`addresses`)
//! never an IP an older pod anywhere already claims.
//!
//! [`Consent`] is the validated pools and the cluster's pod prefixes,
//! rebuilt once per change of either ([`ConsentLoop`]); [`judge`] is pure
//! and serves both the ADD path (a refusal fails the ADD) and the anycast
//! loop (a claim a pool no longer covers is withdrawn).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use flock_datastore::{Cache, Event, PodInfo};
use flock_model::{AddressPool, Pool, PoolUse, claimed_ips};
use ipnet::IpNet;
use kube::ResourceExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::metrics::Metrics;
use crate::settings::Validations;
use crate::status::Board;

/// The pools in force and the cluster's pod prefixes.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Consent {
    /// Valid pools.
    pub pools: Vec<Pool>,
    /// Pools refused, by name, with why.
    pub refused: BTreeMap<String, String>,
    /// Every node's pod prefixes.
    pub node_prefixes: Vec<(String, IpNet)>,
}

/// What a claim is judged against besides the consent.
pub struct Context<'a> {
    /// The pod's namespace's labels.
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// Prefixes this node holds addresses of (its own and older ones).
    pub held_prefixes: &'a [IpNet],
    /// Every pod's own addresses, with the pod (`namespace/name`).
    pub unicast: &'a HashMap<IpAddr, String>,
    /// Other pods' `addresses` claims, cluster-wide.
    pub claims: &'a HashMap<IpAddr, Vec<PodInfo>>,
}

impl Consent {
    /// Validates every pool and refuses one that overlaps a node's pod
    /// prefix, naming both.
    pub fn build(pools: &[AddressPool], node_prefixes: Vec<(String, IpNet)>) -> Consent {
        let mut consent = Consent {
            node_prefixes,
            ..Consent::default()
        };
        for p in pools {
            let pool = match p.validated() {
                Ok(pool) => pool,
                Err(e) => {
                    consent.refused.insert(p.name_any(), e.to_string());
                    continue;
                }
            };
            let overlap = pool.cidrs.iter().find_map(|c| {
                consent
                    .node_prefixes
                    .iter()
                    .find(|(_, n)| n.contains(&c.network()) || c.contains(&n.network()))
                    .map(|(node, n)| (*c, node.clone(), *n))
            });
            match overlap {
                Some((c, node, n)) => {
                    consent.refused.insert(
                        pool.name.clone(),
                        format!(
                            "AddressPool {}: spec.cidrs: {c} overlaps NodeConfig {node}'s pod prefix {n}",
                            pool.name
                        ),
                    );
                }
                None => consent.pools.push(pool),
            }
        }
        consent
    }
}

/// Why `pod`'s claim of `ip` for `usage` is refused, or `Ok`.
pub fn judge(
    consent: &Consent,
    pod: &PodInfo,
    usage: PoolUse,
    ip: IpAddr,
    ctx: &Context<'_>,
) -> Result<(), String> {
    if let Some((node, prefix)) = consent.node_prefixes.iter().find(|(_, n)| n.contains(&ip)) {
        return Err(format!(
            "it is inside NodeConfig {node}'s pod prefix {prefix}"
        ));
    }
    if let Some(prefix) = ctx.held_prefixes.iter().find(|n| n.contains(&ip)) {
        return Err(format!(
            "it is inside {prefix}, a prefix this node still holds pod addresses of"
        ));
    }
    let me = format!("{}/{}", pod.namespace, pod.name);
    if let Some(owner) = ctx.unicast.get(&ip).filter(|o| **o != me) {
        return Err(format!("it is the address of pod {owner}"));
    }
    let of_use: Vec<&Pool> = consent
        .pools
        .iter()
        .filter(|p| p.usage == usage && p.covering(ip).is_some())
        .collect();
    if of_use.is_empty() {
        return Err(format!("no AddressPool of use {usage} contains it"));
    }
    let selects = |p: &&Pool| {
        p.namespace_selector
            .as_ref()
            .is_none_or(|s| flock_netpol::selects(s, ctx.namespace_labels))
    };
    if !of_use.iter().any(selects) {
        let names: Vec<&str> = of_use.iter().map(|p| p.name.as_str()).collect();
        return Err(format!(
            "AddressPool {} contains it but does not select namespace {}",
            names.join(", "),
            pod.namespace
        ));
    }
    if usage == PoolUse::Addresses
        && let Some(older) = ctx
            .claims
            .get(&ip)
            .into_iter()
            .flatten()
            .find(|o| (o.namespace != pod.namespace || o.name != pod.name) && o.older_than(pod))
    {
        return Err(format!(
            "pod {}/{} claims it already (it is older)",
            older.namespace, older.name
        ));
    }
    Ok(())
}

/// Every pod's own addresses and every pod's `addresses` claims, from the
/// cluster view, skipping pods that are gone or going.
pub fn cluster_claims(
    pods: &[PodInfo],
) -> (HashMap<IpAddr, String>, HashMap<IpAddr, Vec<PodInfo>>) {
    let mut unicast = HashMap::new();
    let mut claims: HashMap<IpAddr, Vec<PodInfo>> = HashMap::new();
    for p in pods.iter().filter(|p| !p.terminated && !p.deleting) {
        for ip in &p.ips {
            unicast.insert(*ip, format!("{}/{}", p.namespace, p.name));
        }
        for ip in claimed_ips(&p.annotations, flock_model::ADDRESSES) {
            claims.entry(ip).or_default().push(p.clone());
        }
    }
    (unicast, claims)
}

/// The node prefixes of every NodeConfig that validates (each validated
/// once per change).
fn node_prefixes(cache: &Cache, validations: &mut Validations) -> Vec<(String, IpNet)> {
    let configs = cache.node_configs();
    validations.retain(&configs.iter().map(|nc| nc.name_any()).collect());
    let mut out = Vec::new();
    for nc in configs {
        if let Ok(s) = validations.settings(&nc) {
            out.extend(s.cidr6.map(|c| (s.node.clone(), IpNet::V6(c))));
            out.extend(s.cidr4.map(|c| (s.node.clone(), IpNet::V4(c))));
        }
    }
    out.sort();
    out
}

/// The consent in force: `None` until pools and NodeConfigs are listed.
pub type Consented = watch::Receiver<Option<Arc<Consent>>>;

/// Where each pool's `Valid` condition is written: the API server's
/// AddressPool status (the kubernetes datastore; with `dir:` refusals are
/// logged only).
pub type PoolStatus = crate::condition::ValidStatus<AddressPool>;

/// Rebuilds the [`Consent`] on every change of pools or NodeConfigs.
pub struct ConsentLoop {
    cache: Cache,
    published: watch::Sender<Option<Arc<Consent>>>,
    board: Arc<Board>,
    metrics: Metrics,
    status: Option<PoolStatus>,
    /// Every NodeConfig, validated once per change.
    validations: Validations,
}

impl ConsentLoop {
    /// The loop and what it publishes.
    pub fn new(cache: Cache, board: Arc<Board>, metrics: Metrics) -> (ConsentLoop, Consented) {
        let (published, rx) = watch::channel(None);
        (
            ConsentLoop {
                cache,
                published,
                board,
                metrics,
                status: None,
                validations: Validations::default(),
            },
            rx,
        )
    }

    /// Reports each pool's validity in its status too.
    pub fn reporting(mut self, status: PoolStatus) -> ConsentLoop {
        self.status = Some(status);
        self
    }

    /// Runs until cancelled.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut events = self.cache.subscribe();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                listed = self.cache.wait_for_claim_inputs(std::time::Duration::from_secs(60)) => {
                    if listed { break }
                    warn!("AddressPools or NodeConfigs not listed yet; no claimed IP is accepted until they are");
                }
            }
        }
        loop {
            self.pass().instrument(info_span!("consent_pass")).await;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    event = events.recv() => match event {
                        Ok(Event::Pools | Event::NodeConfigs)
                        | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        }
    }

    async fn pass(&mut self) {
        let pools = self.cache.pools();
        let consent = Consent::build(&pools, node_prefixes(&self.cache, &mut self.validations));
        if let Some(status) = &self.status {
            for pool in &pools {
                let refused = consent.refused.get(&pool.name_any()).map(String::as_str);
                if let Err(error) = status.report(pool, refused).await {
                    warn!(pool = %pool.name_any(), %error, "cannot write the AddressPool's Valid condition");
                }
            }
        }
        let before = self.published.borrow().clone();
        if before.as_deref() == Some(&consent) {
            return;
        }
        for (pool, why) in &consent.refused {
            if before
                .as_ref()
                .is_none_or(|b| b.refused.get(pool) != Some(why))
            {
                self.metrics.error("addresspool");
                warn!(%pool, problem = %why, "AddressPool refused; its IPs are not accepted");
            }
        }
        info!(
            pools = consent.pools.len(),
            refused = consent.refused.len(),
            "AddressPools in force"
        );
        self.board
            .set("addresspools", consent.refused.values().cloned().collect());
        self.published.send_replace(Some(Arc::new(consent)));
    }
}
