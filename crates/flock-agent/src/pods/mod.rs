//! The node runtime's answers to ADD, DEL, CHECK, GC and STATUS.
//!
//! DEL and CHECK are served from the allocations and the kernel from the
//! first instant, before the NodeConfig or the API server is known; ADD and
//! GC wait for readiness (the NodeConfig applied, state recovered).

mod add;
mod check;
mod del;

use std::net::IpAddr;
use std::sync::Arc;

use flock_datastore::Cache;
use flock_netlink::{GATEWAY_V4, GATEWAY_V6, Netns, PodSpec};
use flock_proto::rpc::{Op, Request, Response};
use flock_proto::{CniError, CniResult, ErrorCode, Interface, IpConfig, IpPrefix, Route};
use flock_store::Allocation;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allocations::Allocations;
use crate::handler::{Handler, HandlerFuture};
use crate::kernel::Kernel;
use crate::metrics::Metrics;
use crate::policy::PolicyHandle;
use crate::serial::ContainerLocks;
use crate::status::{Board, Readiness};
use crate::store::AllocationStore;

pub use add::POD_WAIT;

/// flock's own code for a host interface name another pod's veth has.
pub const IFACE_TAKEN: ErrorCode = ErrorCode(104);

/// Everything the pod handler works with.
pub struct Pods<K, S> {
    /// The node's kernel.
    pub kernel: Arc<K>,
    /// The node's allocations.
    pub allocations: Arc<Allocations<S>>,
    /// The objects the datastore delivers.
    pub cache: Cache,
    /// One request per container at a time.
    pub locks: Arc<ContainerLocks>,
    /// Whether ADD and GC can be served.
    pub readiness: watch::Receiver<Readiness>,
    /// MTU for pods when the NodeConfig sets none.
    pub default_mtu: u32,
    /// Metrics.
    pub metrics: Metrics,
    /// Wakes the anycast loop after an ADD or DEL.
    pub anycast: Arc<Notify>,
    /// Reaches the NetworkPolicy loop.
    pub policy: PolicyHandle,
    /// The AddressPools in force, for claimed IPs.
    pub consent: crate::claims::Consented,
    /// The node's prefixes (current and older ones still held).
    pub prefixes: crate::settings::Prefixes,
    /// Warnings the other parts post.
    pub board: Arc<Board>,
    /// Background work (finishing releases), stopped on shutdown.
    pub tasks: TaskTracker,
    /// Stops the background work.
    pub cancel: CancellationToken,
    /// Entries a background task is finishing the release of.
    pub(crate) finishing: del::FinishingSet,
    /// Events on pods whose ADD failed.
    pub events: Arc<crate::events::PodEvents>,
}

/// The handler in force while the store can be read.
pub struct PodHandler<K, S> {
    pods: Arc<Pods<K, S>>,
}

impl<K, S> Clone for PodHandler<K, S> {
    fn clone(&self) -> Self {
        PodHandler {
            pods: self.pods.clone(),
        }
    }
}

impl<K: Kernel, S: AllocationStore> PodHandler<K, S> {
    /// A handler over `pods`.
    pub fn new(pods: Arc<Pods<K, S>>) -> Self {
        PodHandler { pods }
    }

    /// What it works with.
    pub fn pods(&self) -> &Arc<Pods<K, S>> {
        &self.pods
    }
}

pub(crate) fn err(code: ErrorCode, msg: impl Into<String>) -> CniError {
    CniError::new(code, msg)
}

pub(crate) fn internal(what: &str, e: impl std::fmt::Display) -> CniError {
    err(ErrorCode::AGENT_INTERNAL, what.to_owned()).with_details(e.to_string())
}

impl<K: Kernel, S: AllocationStore> Pods<K, S> {
    /// `Err(11)` unless the runtime is ready for `op`.
    fn ready_for(&self, op: Op) -> Result<(), CniError> {
        match &*self.readiness.borrow() {
            Readiness::Ready => Ok(()),
            Readiness::Starting(reason) => Err(err(
                if op == Op::Status {
                    ErrorCode::PLUGIN_NOT_AVAILABLE
                } else {
                    ErrorCode::TRY_AGAIN_LATER
                },
                format!("agent not ready: {reason}"),
            )),
        }
    }

    fn spec(&self, a: &Allocation, netns: Netns) -> PodSpec {
        PodSpec {
            host_iface: a.host_iface.clone(),
            netns,
            if_name: a.ifname.clone(),
            mtu: self.mtu(a),
            ip6: a.ip6,
            ip4: a.ip4,
            anycast: a.anycast.clone(),
            addresses: a.addresses.clone(),
        }
    }

    fn mtu(&self, a: &Allocation) -> u32 {
        a.mtu.unwrap_or(self.default_mtu)
    }

    async fn status(&self) -> Result<(), CniError> {
        self.ready_for(Op::Status)?;
        if let Some(reason) = self.allocations.refusing() {
            return Err(err(
                ErrorCode::PLUGIN_NOT_AVAILABLE,
                format!(
                    "the allocation store takes no writes until flock-agent restarts: {reason}"
                ),
            ));
        }
        let (Some(usage), Some(settings)) = (self.allocations.usage(), self.allocations.settings())
        else {
            return Ok(());
        };
        if settings.cidr4.is_some()
            && settings.defaults.ipv4
            && usage.v4_capacity > 0
            && usage.v4_in_use as u32 >= usage.v4_capacity
        {
            return Err(err(
                ErrorCode::PLUGIN_NOT_AVAILABLE,
                format!(
                    "IPv4 pool {} is exhausted",
                    settings.cidr4.map(|c| c.to_string()).unwrap_or_default()
                ),
            ));
        }
        Ok(())
    }
}

impl<K: Kernel, S: AllocationStore> Handler for PodHandler<K, S> {
    fn readiness(&self) -> Result<(), String> {
        match &*self.pods.readiness.borrow() {
            Readiness::Ready => {}
            Readiness::Starting(reason) => return Err(reason.clone()),
        }
        // Every ADD would answer "try again later" until a restart.
        match self.pods.allocations.refusing() {
            Some(reason) => Err(format!(
                "the allocation store takes no writes until flock-agent restarts: {reason}"
            )),
            None => Ok(()),
        }
    }

    fn warnings(&self) -> Vec<String> {
        let pods = &self.pods;
        let mut out = pods.board.all();
        out.extend(pods.allocations.duplicates().into_iter().map(|(ip, holders)| {
            format!(
                "allocations: {ip} is held by {} entries ({}); it is handed to no other pod until they are deleted",
                holders.len(),
                holders.join(", ")
            )
        }));
        out
    }

    fn handle(&self, request: Request) -> HandlerFuture {
        let pods = self.pods.clone();
        Box::pin(async move {
            let outcome = match request.op {
                Op::Add => {
                    let added = pods.add(&request).await;
                    if let Err(e) = &added {
                        pods.events.failed_add(&request.args, e);
                    }
                    added.map(Response::Result)
                }
                Op::Del => pods
                    .del(&request.container_id, &request.if_name)
                    .await
                    .map(|()| Response::Done {}),
                Op::Check => pods.check(&request).await.map(|()| Response::Done {}),
                Op::Gc => pods.gc(&request).await.map(|()| Response::Done {}),
                Op::Status => pods.status().await.map(|()| Response::Done {}),
            };
            outcome.unwrap_or_else(Response::Error)
        })
    }
}

/// The CNI result for an allocation: the host end (no sandbox) and the pod
/// end, the pod's own addresses first (portmap DNATs to the first of each
/// family), then `addresses`; default routes through the veth gateways.
pub(crate) fn result(a: &Allocation, netns: &str, mtu: u32) -> CniResult {
    let interfaces = vec![
        Interface {
            name: a.host_iface.clone(),
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
