//! ADD: a new pod's addresses and network, or a retried ADD answered from
//! what is in place (rebuilt with the same addresses when it is not).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use flock_ipam::{AllocRequest, Identity};
use flock_model::{CniArgs, host_iface_name, parse_pod_annotations, resolve_ip_algo};
use flock_proto::rpc::{Op, Request};
use flock_proto::{CniError, CniResult, ErrorCode};
use flock_store::{AllocState, Allocation};
use tracing::{info, warn};

use super::{IFACE_TAKEN, Pods, err, internal, result};
use crate::allocations::ReserveError;
use crate::kernel::{Kernel, OpenedNetns};
use crate::policy::NotEnforced;
use crate::store::AllocationStore;

/// How long ADD waits for the pod to show up in the cache.
pub const POD_WAIT: Duration = Duration::from_secs(3);

/// How long an ADD waits for a DEL of the same container to finish.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Who the runtime says the pod is.
struct PodRef<'a> {
    namespace: String,
    name: String,
    uid: String,
    text: String,
    request: &'a Request,
}

impl<K: Kernel, S: AllocationStore> Pods<K, S> {
    pub(super) async fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        self.ready_for(Op::Add)?;
        let args = CniArgs::parse(&req.args)
            .map_err(|e| err(ErrorCode::INVALID_ENVIRONMENT, e.to_string()))?;
        let (namespace, name) = args
            .pod_ref()
            .map_err(|e| err(ErrorCode::INVALID_ENVIRONMENT, e.to_string()))?;
        let pod = PodRef {
            text: format!("{namespace}/{name}"),
            namespace,
            name,
            uid: args.pod_uid.unwrap_or_default(),
            request: req,
        };
        let _turn = self.locks.lock(&req.container_id).await;
        let opened = self
            .kernel
            .open_netns(Path::new(&req.netns))
            .await
            .map_err(|e| {
                err(
                    ErrorCode::INVALID_ENVIRONMENT,
                    format!("pod {}: {e}", pod.text),
                )
            })?;

        if let Some(existing) = self.allocations.attachment(&req.container_id) {
            if existing.ifname != req.if_name {
                return Err(err(
                    ErrorCode::INVALID_NETWORK_CONFIG,
                    format!(
                        "pod {}: container {} already has interface {}; a second attachment ({}) is not supported",
                        pod.text, req.container_id, existing.ifname, req.if_name
                    ),
                ));
            }
            let stale_sandbox =
                !pod.uid.is_empty() && !existing.pod_uid.is_empty() && existing.pod_uid != pod.uid;
            match existing.state {
                AllocState::Releasing => {}
                _ if stale_sandbox => {
                    info!(pod = %pod.text, old_uid = %existing.pod_uid, uid = %pod.uid, "container id reused by another pod: the old sandbox's allocation is torn down first");
                    self.release(&existing).await.map_err(|e| CniError {
                        msg: format!("pod {}: {}", pod.text, e.msg),
                        ..e
                    })?;
                }
                AllocState::Committed => return self.again(existing, &pod, &opened).await,
                // An earlier ADD of this container stopped half-way: finish it.
                AllocState::Pending => return self.build(existing, &pod, &opened).await,
            }
            if !self
                .allocations
                .wait_gone(&req.container_id, RELEASE_WAIT)
                .await
            {
                return Err(err(
                    ErrorCode::TRY_AGAIN_LATER,
                    format!(
                        "pod {}: container {} is still being deleted",
                        pod.text, req.container_id
                    ),
                ));
            }
        }
        let pending = self.allocate(&pod).await?;
        self.build(pending, &pod, &opened).await
    }

    /// A retried ADD of a committed container: the stored result when its
    /// veth is intact in the same namespace, else the network rebuilt with
    /// the same addresses.
    async fn again(
        &self,
        existing: Allocation,
        pod: &PodRef<'_>,
        opened: &OpenedNetns,
    ) -> Result<CniResult, CniError> {
        let spec = self.spec(&existing, opened.netns.clone());
        let same_netns = existing.netns_inode == Some(opened.inode);
        let gap = if same_netns {
            self.kernel.attachment_gap(&spec).await.map_err(|e| {
                internal(&format!("pod {}: looking at its veth failed", pod.text), e)
            })?
        } else {
            Some(format!(
                "CNI_NETNS {} is not the namespace it was built in",
                pod.request.netns
            ))
        };
        match gap {
            None => {
                info!(pod = %pod.text, "ADD retried; returning the committed allocation");
                self.isolate(pod, &existing).await?;
                Ok(result(&existing, &pod.request.netns, self.mtu(&existing)))
            }
            Some(gap) => {
                info!(pod = %pod.text, %gap, "ADD retried and the attachment is not intact; rebuilding it with the same addresses");
                self.build(existing, pod, opened).await
            }
        }
    }

    /// Chooses addresses and records them as pending, durably.
    async fn allocate(&self, pod: &PodRef<'_>) -> Result<Allocation, CniError> {
        let node = self.cache.node().to_owned();
        let want_uid = pod.uid.clone();
        let cached = self
            .cache
            .wait_for_pod_where(&pod.namespace, &pod.name, POD_WAIT, |p| {
                want_uid.is_empty() || p.uid.is_empty() || p.uid == want_uid
            })
            .await
            .ok_or_else(|| {
                let known = self.cache.local_pod(&pod.namespace, &pod.name);
                err(
                    ErrorCode::TRY_AGAIN_LATER,
                    match known {
                        Some(other) => format!(
                            "pod {} on node {node} is known with uid {}, but the runtime's is {}; waiting for the datastore to catch up",
                            pod.text, other.uid, pod.uid
                        ),
                        None => format!("pod {} is not (yet) known on node {node}", pod.text),
                    },
                )
            })?;
        let settings = self.allocations.settings().ok_or_else(|| {
            err(
                ErrorCode::TRY_AGAIN_LATER,
                "agent not ready: no NodeConfig applied yet",
            )
        })?;
        let (intent, warnings) =
            parse_pod_annotations(&pod.text, &cached.annotations, settings.defaults)
                .map_err(|e| err(ErrorCode::INVALID_NETWORK_CONFIG, e.to_string()))?;
        let (algo, algo_warnings) =
            resolve_ip_algo(&pod.text, &cached.annotations, Some(&settings.annotations));
        for warning in warnings.iter().chain(&algo_warnings) {
            warn!(%warning, "annotation ignored");
        }
        self.judge_claims(pod, &cached, &intent.anycast, &intent.addresses)?;
        let req = pod.request;
        let template = Allocation {
            container_id: req.container_id.clone(),
            ifname: req.if_name.clone(),
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            pod_uid: if pod.uid.is_empty() {
                cached.uid.clone()
            } else {
                pod.uid.clone()
            },
            host_iface: host_iface_name(&req.container_id),
            ip6: None,
            ip4: None,
            anycast: intent.anycast,
            addresses: intent.addresses,
            netns: req.netns.clone(),
            netns_inode: None,
            mtu: Some(settings.mtu.unwrap_or(self.default_mtu)),
            state: AllocState::Pending,
            allocated_at: SystemTime::now(),
        };
        let request = AllocRequest {
            want_v6: intent.want_v6,
            want_v4: intent.want_v4,
            cidr6: &intent.cidr6,
            cidr4: &intent.cidr4,
            ip_algo: algo.as_ref(),
            identity: Identity {
                namespace: &pod.namespace,
                app: &cached.app,
                image: cached.image.as_deref(),
                container_id: &req.container_id,
            },
        };
        let reserved = self
            .allocations
            .reserve(template, &request)
            .await
            .map_err(|e| {
                let msg = format!("pod {}: {e}", pod.text);
                match e {
                    ReserveError::IfaceTaken { .. } => err(IFACE_TAKEN, msg),
                    ReserveError::Ipam(_) => err(ErrorCode::ADDRESS_ALLOCATION, msg),
                    ReserveError::NoPools | ReserveError::Refusing(_) | ReserveError::Store(_) => {
                        self.metrics.error("store");
                        err(ErrorCode::TRY_AGAIN_LATER, msg)
                    }
                }
            })?;
        if let Some(usage) = self.allocations.usage() {
            self.metrics.set_usage(usage);
        }
        Ok(reserved)
    }

    /// Refuses the ADD (code 7, naming pod, key, value and reason) when a
    /// claimed IP lacks an AddressPool's consent or would take another's.
    fn judge_claims(
        &self,
        pod: &PodRef<'_>,
        cached: &flock_datastore::PodInfo,
        anycast: &[std::net::IpAddr],
        addresses: &[std::net::IpAddr],
    ) -> Result<(), CniError> {
        if anycast.is_empty() && addresses.is_empty() {
            return Ok(());
        }
        let Some(consent) = self.consent.borrow().clone() else {
            return Err(err(
                ErrorCode::TRY_AGAIN_LATER,
                format!(
                    "pod {}: AddressPools and NodeConfigs are not listed yet, so its claimed IPs cannot be judged",
                    pod.text
                ),
            ));
        };
        let (mut unicast, claims) = crate::claims::cluster_claims(&self.cache.pods());
        for a in self.allocations.snapshot() {
            for ip in a.unicast() {
                unicast.insert(ip, format!("{}/{}", a.namespace, a.pod));
            }
        }
        let namespaces = self.cache.namespaces();
        let held = self.prefixes.borrow().clone();
        let labels = namespaces.get(&pod.namespace).cloned().unwrap_or_default();
        let ctx = crate::claims::Context {
            namespace_labels: &labels,
            held_prefixes: &held,
            unicast: &unicast,
            claims: &claims,
        };
        let wanted = anycast
            .iter()
            .map(|ip| (*ip, flock_model::PoolUse::Anycast))
            .chain(
                addresses
                    .iter()
                    .map(|ip| (*ip, flock_model::PoolUse::Addresses)),
            );
        for (ip, usage) in wanted {
            if let Err(reason) = crate::claims::judge(&consent, cached, usage, ip, &ctx) {
                self.metrics.error("claim_refused");
                return Err(err(
                    ErrorCode::INVALID_NETWORK_CONFIG,
                    format!(
                        "pod {}: annotation {}: {ip}: refused: {reason}",
                        pod.text,
                        usage.annotation()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Builds the network of a pending (or committed, to rebuild) entry in
    /// the request's namespace, commits it durably and answers.
    async fn build(
        &self,
        entry: Allocation,
        pod: &PodRef<'_>,
        opened: &OpenedNetns,
    ) -> Result<CniResult, CniError> {
        let started = Instant::now();
        let spec = self.spec(&entry, opened.netns.clone());
        // The pod's NetworkPolicy chains key on its host interface's name
        // alone, so they go in while the veth is built (the pending entry
        // names it); the ADD answers only once both are done.
        let network = async {
            let done = self.kernel.setup(&spec).await;
            (done, started.elapsed())
        };
        let isolation = async {
            let done = self.isolate(pod, &entry).await;
            (done, started.elapsed())
        };
        let ((set_up, network_took), (isolated, isolation_took)) = tokio::join!(network, isolation);
        set_up.map_err(|e| {
            self.metrics.error("setup");
            internal(
                &format!("setting up the network of pod {} failed", pod.text),
                e,
            )
        })?;
        let set_up = started.elapsed();
        let committed = self
            .allocations
            .commit(entry, &pod.request.netns, opened.inode)
            .await
            .map_err(|e| {
                self.metrics.error("store");
                err(
                    ErrorCode::TRY_AGAIN_LATER,
                    format!(
                        "pod {}: recording the committed allocation failed: {e}",
                        pod.text
                    ),
                )
            })?;
        self.anycast.notify_one();
        isolated?;
        info!(
            pod = %pod.text,
            ip6 = ?committed.ip6,
            ip4 = ?committed.ip4,
            setup_us = set_up.as_micros() as u64,
            network_us = network_took.as_micros() as u64,
            isolation_us = isolation_took.as_micros() as u64,
            commit_us = (started.elapsed() - set_up).as_micros() as u64,
            "pod added"
        );
        Ok(result(&committed, &pod.request.netns, self.mtu(&committed)))
    }

    /// Puts the NetworkPolicy rules of a pod in place before its ADD
    /// answers; a pod must not start open. Until pods, namespaces and
    /// policies have been listed the answer is "try again later" (11).
    async fn isolate(&self, pod: &PodRef<'_>, a: &Allocation) -> Result<(), CniError> {
        self.policy
            .isolate(&pod.namespace, &a.host_iface)
            .await
            .map_err(|e| match e {
                NotEnforced::NotListed => err(
                    ErrorCode::TRY_AGAIN_LATER,
                    format!(
                        "pod {}: pods, namespaces or NetworkPolicies are not listed yet, so its isolation is unknown",
                        pod.text
                    ),
                ),
                NotEnforced::Failed(e) => internal(
                    &format!("enforcing NetworkPolicy for pod {} failed", pod.text),
                    e,
                ),
            })
    }
}
