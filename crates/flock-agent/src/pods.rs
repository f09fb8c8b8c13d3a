//! The node runtime's answers to ADD, DEL, CHECK, GC and STATUS.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use flock_datastore::Cache;
use flock_ipam::{AllocRequest, Identity, Ipam};
use flock_model::{CniArgs, NodeSettings, host_iface_name, parse_pod_annotations, resolve_ip_algo};
use flock_netlink::{Dataplane, GATEWAY_V4, GATEWAY_V6, PodSpec};
use flock_proto::rpc::{Op, Request, Response};
use flock_proto::{CniError, CniResult, ErrorCode, Interface, IpConfig, IpPrefix, Route};
use flock_store::{AllocState, Allocation, Store};
use tokio::sync::Mutex as AsyncMutex;
use tracing::{info, warn};

use crate::handler::{Handler, HandlerFuture};
use crate::metrics::Metrics;

/// How long ADD waits for the pod to show up in the cache.
pub const POD_WAIT: Duration = Duration::from_secs(3);

/// Allocation state: the store and the allocator change together.
pub(crate) struct Allocations {
    pub store: Store,
    pub ipam: Ipam,
    pub settings: NodeSettings,
}

impl Allocations {
    /// The allocation state for `settings`, every stored address marked in use.
    pub fn new(store: Store, settings: NodeSettings) -> Result<Allocations, String> {
        let ipam = build_ipam(&store, &settings)?;
        Ok(Allocations {
            store,
            ipam,
            settings,
        })
    }
}

/// An allocator over `settings`' prefixes with every address of `store` in use.
fn build_ipam(store: &Store, settings: &NodeSettings) -> Result<Ipam, String> {
    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id()).rotate_left(32);
    let mut ipam = Ipam::new(settings.cidr6, settings.cidr4, seed)
        .map_err(|e| format!("NodeConfig {}: {e}", settings.node))?;
    for a in store.iter() {
        for ip in a
            .ip6
            .map(IpAddr::V6)
            .into_iter()
            .chain(a.ip4.map(IpAddr::V4))
        {
            if !ipam.mark_in_use(ip) {
                warn!(%ip, container_id = %a.container_id, "address claimed by two store entries");
            }
        }
    }
    Ok(ipam)
}

/// What the handler shares between requests.
pub(crate) struct Shared {
    pub cache: Cache,
    pub dataplane: Dataplane,
    pub allocations: AsyncMutex<Allocations>,
    pub default_mtu: u32,
    pub metrics: Metrics,
    /// One lock per container: requests for one container run one at a time.
    pub locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    /// Wakes the anycast reconciler after an ADD or DEL.
    pub anycast: tokio::sync::Notify,
    /// The IPs announced because a Ready pod holds them (anycast → BIRD);
    /// `None` until the first pass after start, so nothing is withdrawn
    /// before the pods are known.
    pub announced: tokio::sync::watch::Sender<Option<std::collections::BTreeSet<IpAddr>>>,
    /// Installs bird.conf and has BIRD reload it.
    pub bird: flock_bird::Writer,
    /// NetworkPolicy enforcement.
    pub policy: crate::policy::Policy,
}

/// The handler swapped in once the node runtime is ready.
#[derive(Clone)]
pub struct PodHandler {
    pub(crate) shared: Arc<Shared>,
}

fn err(code: ErrorCode, msg: impl Into<String>) -> CniError {
    CniError::new(code, msg)
}

fn internal(what: &str, e: impl std::fmt::Display) -> CniError {
    err(ErrorCode::AGENT_INTERNAL, what.to_owned()).with_details(e.to_string())
}

impl Handler for PodHandler {
    fn warnings(&self) -> Vec<String> {
        let status = self.shared.bird.status();
        let policy = self.shared.policy.status();
        status
            .last_error
            .map(|e| {
                format!(
                    "bird: last reload failed ({} failures so far): {e}",
                    status.failures
                )
            })
            .into_iter()
            .chain(
                policy
                    .last_error
                    .map(|e| format!("networkpolicy: last load failed: {e}")),
            )
            .chain(
                policy
                    .warnings
                    .into_iter()
                    .map(|w| format!("networkpolicy: {w}")),
            )
            .collect()
    }

    fn handle(&self, request: Request) -> HandlerFuture {
        let this = self.clone();
        Box::pin(async move {
            let op = request.op;
            let outcome = match op {
                Op::Add => this.add(&request).await.map(Response::Result),
                Op::Del => this
                    .del(&request.container_id, &request.if_name)
                    .await
                    .map(|()| Response::Done {}),
                Op::Check => this.check(&request).await.map(|()| Response::Done {}),
                Op::Gc => this.gc(&request).await.map(|()| Response::Done {}),
                Op::Status => this.status().await.map(|()| Response::Done {}),
            };
            outcome.unwrap_or_else(Response::Error)
        })
    }
}

impl PodHandler {
    fn lock_for(&self, container_id: &str) -> Arc<AsyncMutex<()>> {
        let mut locks = self.shared.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks.len() > 4096 {
            // Forget idle locks; one in use is held by an Arc elsewhere.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(container_id.to_owned()).or_default().clone()
    }

    /// The stored allocation of one container interface.
    async fn stored(&self, container_id: &str, if_name: &str) -> Option<Allocation> {
        let alloc = self.shared.allocations.lock().await;
        alloc.store.get(container_id, if_name).cloned()
    }

    fn spec(&self, a: &Allocation, netns: &str, mtu: u32) -> PodSpec {
        PodSpec {
            host_iface: host_iface_name(&a.container_id),
            netns: flock_netlink::Netns::Path(PathBuf::from(netns)),
            if_name: a.ifname.clone(),
            mtu,
            ip6: a.ip6,
            ip4: a.ip4,
            anycast: a.anycast.clone(),
            addresses: a.addresses.clone(),
        }
    }

    /// Puts the NetworkPolicy rules of a new pod in place before its ADD
    /// answers; a pod must not start open. Until pods, namespaces and
    /// policies have been listed the answer is "try again later" (11).
    async fn isolate(
        &self,
        namespace: &str,
        name: &str,
        container_id: &str,
    ) -> Result<(), CniError> {
        let iface = host_iface_name(container_id);
        crate::policy::enforce_for_new_pod(&self.shared, namespace, &iface)
            .await
            .map_err(|e| match e {
                crate::policy::NotEnforced::NotListed => err(
                    ErrorCode::TRY_AGAIN_LATER,
                    format!(
                        "pod {namespace}/{name}: pods, namespaces or NetworkPolicies are not listed yet, so its isolation is unknown"
                    ),
                ),
                crate::policy::NotEnforced::Failed(e) => internal(
                    &format!("enforcing NetworkPolicy for pod {namespace}/{name} failed"),
                    e,
                ),
            })
    }

    async fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let args = CniArgs::parse(&req.args)
            .map_err(|e| err(ErrorCode::INVALID_ENVIRONMENT, e.to_string()))?;
        let (namespace, name) = args
            .pod_ref()
            .map_err(|e| err(ErrorCode::INVALID_ENVIRONMENT, e.to_string()))?;
        let lock = self.lock_for(&req.container_id);
        let _serial = lock.lock().await;

        let existing = self.stored(&req.container_id, &req.if_name).await;
        if let Some(a) = &existing
            && a.state == AllocState::Committed
        {
            // Runtimes retry ADD after a timeout: answer with what is in place
            // (isolation included: the first attempt may have failed there).
            info!(pod = %format!("{namespace}/{name}"), "ADD retried; returning the committed allocation");
            self.isolate(&namespace, &name, &a.container_id).await?;
            return Ok(result(
                a,
                &req.netns,
                a.mtu.unwrap_or(self.shared.default_mtu),
            ));
        }
        let started = std::time::Instant::now();
        let allocation = match existing {
            // A pending entry: an earlier ADD of this container stopped half-way; finish it.
            Some(pending) => pending,
            None => {
                self.allocate(req, &namespace, &name, args.pod_uid.unwrap_or_default())
                    .await?
            }
        };
        let allocated = started.elapsed();
        let mtu = allocation.mtu.unwrap_or(self.shared.default_mtu);
        let spec = self.spec(&allocation, &req.netns, mtu);
        self.shared.dataplane.setup(&spec).await.map_err(|e| {
            self.shared.metrics.error("setup");
            internal(
                &format!("setting up the network of pod {namespace}/{name} failed"),
                e,
            )
        })?;
        let set_up = started.elapsed();
        let mut committed = allocation;
        committed.state = AllocState::Committed;
        committed.netns = req.netns.clone();
        self.shared
            .allocations
            .lock()
            .await
            .store
            .upsert(committed.clone())
            .map_err(|e| internal("recording the committed allocation failed", e))?;
        self.shared.anycast.notify_one();
        self.isolate(&namespace, &name, &committed.container_id)
            .await?;
        info!(
            pod = %format!("{namespace}/{name}"),
            ip6 = ?committed.ip6,
            ip4 = ?committed.ip4,
            allocate_us = allocated.as_micros() as u64,
            setup_us = (set_up - allocated).as_micros() as u64,
            commit_us = (started.elapsed() - set_up).as_micros() as u64,
            "pod added"
        );
        Ok(result(&committed, &req.netns, mtu))
    }

    /// Chooses addresses and records them as pending, durably.
    async fn allocate(
        &self,
        req: &Request,
        namespace: &str,
        name: &str,
        pod_uid: String,
    ) -> Result<Allocation, CniError> {
        let pod_ref = format!("{namespace}/{name}");
        let pod = self
            .shared
            .cache
            .wait_for_pod(namespace, name, POD_WAIT)
            .await
            .ok_or_else(|| {
                err(
                    ErrorCode::TRY_AGAIN_LATER,
                    format!(
                        "pod {pod_ref} is not (yet) known on node {}",
                        self.shared.cache.node()
                    ),
                )
            })?;
        let mut alloc = self.shared.allocations.lock().await;
        self.refresh_settings(&mut alloc)?;
        let (intent, warnings) =
            parse_pod_annotations(&pod_ref, &pod.annotations, alloc.settings.defaults)
                .map_err(|e| err(ErrorCode::INVALID_NETWORK_CONFIG, e.to_string()))?;
        let (algo, algo_warnings) = resolve_ip_algo(
            &pod_ref,
            &pod.annotations,
            Some(&alloc.settings.annotations),
        );
        for warning in warnings.iter().chain(&algo_warnings) {
            warn!(%warning, "annotation ignored");
        }
        let got = alloc
            .ipam
            .allocate(&AllocRequest {
                want_v6: intent.want_v6,
                want_v4: intent.want_v4,
                cidr6: &intent.cidr6,
                cidr4: &intent.cidr4,
                ip_algo: algo.as_ref(),
                identity: Identity {
                    namespace,
                    app: &pod.app,
                    image: pod.image.as_deref(),
                    container_id: &req.container_id,
                },
            })
            .map_err(|e| err(ErrorCode::ADDRESS_ALLOCATION, format!("pod {pod_ref}: {e}")))?;
        let pending = Allocation {
            container_id: req.container_id.clone(),
            ifname: req.if_name.clone(),
            namespace: namespace.to_owned(),
            pod: name.to_owned(),
            pod_uid: if pod_uid.is_empty() {
                pod.uid.clone()
            } else {
                pod_uid
            },
            host_iface: host_iface_name(&req.container_id),
            ip6: got.ip6,
            ip4: got.ip4,
            anycast: intent.anycast,
            addresses: intent.addresses,
            netns_inode: None,
            netns: req.netns.clone(),
            mtu: Some(alloc.settings.mtu.unwrap_or(self.shared.default_mtu)),
            state: AllocState::Pending,
            allocated_at: SystemTime::now(),
        };
        if let Err(e) = alloc.store.upsert(pending.clone()) {
            alloc.ipam.release(got.ip6, got.ip4, 0);
            return Err(internal("recording the pending allocation failed", e));
        }
        self.shared.metrics.set_usage(alloc.ipam.usage());
        Ok(pending)
    }

    /// Applies a changed NodeConfig to new pods; existing pods keep their addresses.
    fn refresh_settings(&self, alloc: &mut Allocations) -> Result<(), CniError> {
        let Some(nc) = self.shared.cache.node_config() else {
            return Ok(()); // gone from the datastore: keep serving with the last good one
        };
        let settings = match nc.settings() {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "NodeConfig invalid; keeping the last good one");
                return Ok(());
            }
        };
        if settings == alloc.settings {
            return Ok(());
        }
        let pools_changed =
            settings.cidr6 != alloc.settings.cidr6 || settings.cidr4 != alloc.settings.cidr4;
        if pools_changed {
            alloc.ipam = build_ipam(&alloc.store, &settings)
                .map_err(|e| err(ErrorCode::INVALID_NETWORK_CONFIG, e))?;
            info!(cidr6 = ?settings.cidr6, cidr4 = ?settings.cidr4, "NodeConfig prefixes changed; new pods use them");
        }
        alloc.settings = settings;
        Ok(())
    }

    /// DEL: the entry goes first (durably), then the kernel state. A crash
    /// in between leaves a veth no entry claims, which startup deletes
    /// before serving; the reverse order could leave an entry whose routes
    /// are half gone.
    pub(crate) async fn del(&self, container_id: &str, if_name: &str) -> Result<(), CniError> {
        let lock = self.lock_for(container_id);
        let _serial = lock.lock().await;
        let entry = self
            .shared
            .allocations
            .lock()
            .await
            .store
            .remove(container_id, if_name, SystemTime::now())
            .map_err(|e| internal("removing the allocation failed", e))?;
        let host_iface = host_iface_name(container_id);
        let (ip6, ip4) = entry.as_ref().map_or((None, None), |a| (a.ip6, a.ip4));
        // Also when there is no entry: a veth may be left from a crash or a failed DEL.
        let teardown = self
            .shared
            .dataplane
            .teardown(&host_iface, ip6, ip4)
            .await
            .map_err(|e| {
                // The entry's addresses stay reserved in memory until the next
                // start, which deletes the veth before it serves.
                self.shared.metrics.error("teardown");
                internal(&format!("tearing down {host_iface} failed"), e)
            })?;
        let Some(entry) = entry else {
            return Ok(());
        };
        self.shared.anycast.notify_one();
        self.shared.policy.trigger.notify_one();
        // The addresses go back to the pool only once the kernel holds no
        // route or address of this pod any more.
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if let Err(e) = teardown.finished().await {
                shared.metrics.error("teardown");
                warn!(error = %e, container_id = %entry.container_id, "veth deletion failed; its addresses stay reserved until restart");
                return;
            }
            let mut alloc = shared.allocations.lock().await;
            alloc.ipam.release(entry.ip6, entry.ip4, 0);
            shared.metrics.set_usage(alloc.ipam.usage());
        });
        info!(container_id, pod = %format!("{}/{}", entry.namespace, entry.pod), "pod deleted");
        Ok(())
    }

    async fn check(&self, req: &Request) -> Result<(), CniError> {
        let lock = self.lock_for(&req.container_id);
        let _serial = lock.lock().await;
        let entry = self
            .stored(&req.container_id, &req.if_name)
            .await
            .ok_or_else(|| {
                err(
                    ErrorCode::UNKNOWN_CONTAINER,
                    format!(
                        "container {} interface {} has no allocation",
                        req.container_id, req.if_name
                    ),
                )
            })?;
        let mut problems = Vec::new();
        if entry.state != AllocState::Committed {
            problems.push("its ADD never completed".to_owned());
        }
        if let Some(prev) = &req.config.prev_result {
            for ip in entry
                .ip6
                .map(IpAddr::V6)
                .into_iter()
                .chain(entry.ip4.map(IpAddr::V4))
            {
                if !prev.ips.iter().any(|c| c.address.addr() == ip) {
                    problems.push(format!("prevResult lacks {ip}"));
                }
            }
        }
        let spec = self.spec(
            &entry,
            &req.netns,
            entry.mtu.unwrap_or(self.shared.default_mtu),
        );
        let drifts = self
            .shared
            .dataplane
            .inspect(&spec)
            .await
            .map_err(|e| internal("inspecting the kernel failed", e))?;
        problems.extend(drifts.iter().map(ToString::to_string));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(err(
                ErrorCode::DRIFT,
                format!(
                    "pod {}/{}: {}",
                    entry.namespace,
                    entry.pod,
                    problems.join("; ")
                ),
            ))
        }
    }

    async fn gc(&self, req: &Request) -> Result<(), CniError> {
        let Some(valid) = req.config.gc_valid_attachments() else {
            warn!("GC without cni.dev/valid-attachments; nothing collected");
            return Ok(());
        };
        let valid: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let stale: Vec<(String, String)> = self
            .shared
            .allocations
            .lock()
            .await
            .store
            .iter()
            .filter(|a| !valid.contains(&(a.container_id.as_str(), a.ifname.as_str())))
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        let mut failures = Vec::new();
        for (container_id, ifname) in stale {
            match self.del(&container_id, &ifname).await {
                Ok(()) => self.shared.metrics.reconciled("gc"),
                Err(e) => failures.push(format!("{container_id}/{ifname}: {}", e.msg)),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(err(
                ErrorCode::AGENT_INTERNAL,
                format!("GC could not remove: {}", failures.join("; ")),
            ))
        }
    }

    async fn status(&self) -> Result<(), CniError> {
        let alloc = self.shared.allocations.lock().await;
        let usage = alloc.ipam.usage();
        if alloc.settings.cidr4.is_some()
            && alloc.settings.defaults.ipv4
            && usage.v4_capacity > 0
            && usage.v4_in_use as u32 >= usage.v4_capacity
        {
            return Err(err(
                ErrorCode::PLUGIN_NOT_AVAILABLE,
                format!(
                    "IPv4 pool {} is exhausted",
                    alloc
                        .settings
                        .cidr4
                        .map(|c| c.to_string())
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }
}

/// The CNI result for an allocation: the host end (no sandbox) and the pod
/// end, the pod's own addresses first (portmap DNATs to the first of each
/// family), then `addresses`; default routes through the veth gateways.
fn result(a: &Allocation, netns: &str, mtu: u32) -> CniResult {
    let interfaces = vec![
        Interface {
            name: host_iface_name(&a.container_id),
            ..Interface::default()
        },
        Interface {
            name: a.ifname.clone(),
            mtu: Some(mtu),
            sandbox: Some(netns.to_owned()),
            ..Interface::default()
        },
    ];
    let ips = a
        .ip4
        .map(IpAddr::V4)
        .into_iter()
        .chain(a.ip6.map(IpAddr::V6))
        .chain(a.addresses.iter().copied())
        .map(|ip| IpConfig {
            version: None,
            address: IpPrefix::host(ip),
            gateway: None,
            interface: Some(1),
        })
        .collect();
    let mut routes = Vec::new();
    if a.ip4.is_some() {
        let gw = IpAddr::V4(GATEWAY_V4);
        routes.push(Route::via(IpPrefix::default_route(gw), Some(gw)));
    }
    if a.ip6.is_some() {
        let gw = IpAddr::V6(GATEWAY_V6);
        routes.push(Route::via(IpPrefix::default_route(gw), Some(gw)));
    }
    CniResult {
        cni_version: None,
        interfaces,
        ips,
        routes,
        dns: None,
    }
}
