//! Startup: make the allocations and the kernel agree before ADD is
//! served. Pending entries (an ADD cut short) and releasing ones (a DEL
//! whose teardown a crash interrupted) are torn down and removed;
//! committed entries whose veth is gone (a reboot: no runtime will ever
//! send their DEL) are released, but only once a lookup by name confirms
//! the veth is missing; flock veths no entry owns are deleted. DEL and
//! CHECK are served meanwhile; each container is handled in its turn, and
//! an entry a DEL's task is finishing already is left to that task.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use flock_netlink::NetlinkError;
use flock_store::{AllocState, Allocation};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::kernel::Kernel;
use crate::pods::Pods;
use crate::store::AllocationStore;

/// What recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Entries removed (pending, releasing, veth gone).
    pub released: usize,
    /// Veths deleted that no entry owned.
    pub orphans: usize,
    /// Entries left for the background to finish (a teardown or write failed).
    pub deferred: usize,
}

/// Why an entry is released at startup.
fn reason(entry: &Allocation, listed: &HashSet<String>) -> Option<&'static str> {
    match entry.state {
        AllocState::Pending => Some("pending"),
        AllocState::Releasing => Some("releasing"),
        AllocState::Committed if !listed.contains(&entry.host_iface) => Some("veth_gone"),
        AllocState::Committed => None,
    }
}

/// Runs recovery; only failing to list the kernel's links is an error.
pub async fn recover<K: Kernel, S: AllocationStore>(
    pods: &Arc<Pods<K, S>>,
) -> Result<Recovered, NetlinkError> {
    let listed: HashSet<String> = pods.kernel.flock_links().await?.into_iter().collect();
    let mut work = JoinSet::new();
    for entry in pods.allocations.snapshot() {
        if reason(&entry, &listed).is_none() {
            continue;
        }
        let pods = pods.clone();
        let listed = listed.clone();
        work.spawn(async move { settle(&pods, entry, &listed).await });
    }
    let mut recovered = Recovered::default();
    while let Some(done) = work.join_next().await {
        match done {
            Ok(Some(true)) => recovered.released += 1,
            Ok(Some(false)) => recovered.deferred += 1,
            Ok(None) => {}
            Err(e) => warn!(error = %e, "a recovery task failed"),
        }
    }
    for iface in &listed {
        if pods.allocations.owner_of_iface(iface).is_some()
            || !pods.kernel.host_link_exists(iface).await.unwrap_or(true)
        {
            continue; // owned, or gone with a released entry
        }
        match pods.kernel.teardown(iface, None, None).await {
            Ok(removal) => match removal.await {
                Ok(()) => {
                    recovered.orphans += 1;
                    pods.metrics.reconciled("orphan_veth");
                    info!(%iface, "deleted a flock veth no allocation owns");
                }
                Err(error) => {
                    warn!(%iface, %error, "deleting a flock veth no allocation owns failed")
                }
            },
            Err(error) => warn!(%iface, %error, "deleting a flock veth no allocation owns failed"),
        }
    }
    Ok(recovered)
}

/// Settles one entry in its container's turn: `Some(true)` released,
/// `Some(false)` handed to the background, `None` nothing to do (after all).
async fn settle<K: Kernel, S: AllocationStore>(
    pods: &Arc<Pods<K, S>>,
    listed_entry: Allocation,
    listed: &HashSet<String>,
) -> Option<bool> {
    let _turn = pods.locks.lock(&listed_entry.container_id).await;
    // A DEL may have come first.
    let entry = pods
        .allocations
        .attachment(&listed_entry.container_id)
        .filter(|a| a.ifname == listed_entry.ifname)?;
    let why = reason(&entry, listed)?;
    // A DEL served during recovery may have a task finishing it already:
    // that one releases it, alone.
    let claim = pods.claim_release(&entry)?;
    if why == "veth_gone" {
        // A dump is no proof: look the veth up by name.
        match pods.kernel.host_link_exists(&entry.host_iface).await {
            Ok(false) => {}
            Ok(true) => return None,
            Err(error) => {
                warn!(container_id = %entry.container_id, %error, "cannot tell whether its veth exists; keeping the allocation");
                return None;
            }
        }
    }
    let pod = format!("{}/{}", entry.namespace, entry.pod);
    let finished = async {
        let releasing = pods
            .allocations
            .mark_releasing(&entry)
            .await
            .map_err(|e| e.to_string())?;
        let removal = pods
            .kernel
            .teardown(&releasing.host_iface, releasing.ip6, releasing.ip4)
            .await
            .map_err(|e| e.to_string())?;
        removal.await.map_err(|e| e.to_string())?;
        pods.kernel
            .forget_flows(releasing.unicast().collect())
            .await
            .map_err(|e| e.to_string())?;
        pods.allocations
            .finish_release(&releasing, SystemTime::now())
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    drop(claim);
    match finished {
        Ok(false) => None,
        Ok(true) => {
            pods.metrics.reconciled(why);
            info!(container_id = %entry.container_id, %pod, reason = why, "released allocation");
            Some(true)
        }
        Err(error) => {
            warn!(container_id = %entry.container_id, %pod, %error, "releasing at startup failed; retrying in the background");
            pods.finish_in_background(entry, None);
            Some(false)
        }
    }
}
