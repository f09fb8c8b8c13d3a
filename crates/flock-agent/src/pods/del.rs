//! DEL and GC: an entry is marked releasing durably, its host routes go at
//! once, its veth is deleted off the request's path, and only once the
//! kernel holds nothing of it is the entry removed and its addresses freed.
//! A crash at any point leaves a releasing (or committed, veth-less) entry
//! that the next start finishes; no DEL is answered "ok" before that
//! finishing is durable.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use flock_model::host_iface_name;
use flock_proto::rpc::{Op, Request};
use flock_proto::{CniError, ErrorCode};
use flock_store::Allocation;
use tracing::{info, warn};

use super::{Pods, err, internal};
use crate::allocations::Allocations;
use crate::kernel::{Kernel, Removal};
use crate::store::AllocationStore;

/// The first wait before a failed teardown or removal is tried again.
const RETRY_FIRST: Duration = Duration::from_secs(1);

/// The longest wait between tries.
const RETRY_MAX: Duration = Duration::from_secs(30);

impl<K: Kernel, S: AllocationStore> Pods<K, S> {
    /// DEL: tears the container's attachment down for real, whatever the
    /// datastore's state. An unknown container succeeds (after removing a
    /// leftover veth of its name that no entry owns).
    pub(super) async fn del(&self, container_id: &str, if_name: &str) -> Result<(), CniError> {
        let _turn = self.locks.lock(container_id).await;
        let entry = self
            .allocations
            .attachment(container_id)
            .filter(|a| a.ifname == if_name);
        match entry {
            Some(entry) => self.release(&entry).await,
            None => self.remove_unowned(&host_iface_name(container_id)).await,
        }
    }

    /// Marks `entry` releasing, removes its routes and has its veth deleted;
    /// the entry goes once that is done. The caller holds the container's turn.
    pub(super) async fn release(&self, entry: &Allocation) -> Result<(), CniError> {
        let recorded = self.allocations.mark_releasing(entry).await;
        self.anycast.notify_one();
        self.policy.trigger();
        let pod = format!("{}/{}", entry.namespace, entry.pod);
        let (removal, failure) = match self
            .kernel
            .teardown(&entry.host_iface, entry.ip6, entry.ip4)
            .await
        {
            Ok(removal) => (Some(removal), None),
            Err(e) => {
                self.metrics.error("teardown");
                let what = format!("pod {pod}: tearing down {} failed", entry.host_iface);
                (None, Some(internal(&what, e)))
            }
        };
        // Whatever happened, the entry is finished in the background,
        // retried until the kernel and the store take it (by one task).
        self.finish_in_background(entry.clone(), removal);
        if let Some(failure) = failure {
            return Err(failure);
        }
        recorded.map_err(|e| {
            self.metrics.error("store");
            err(
                ErrorCode::TRY_AGAIN_LATER,
                format!(
                    "pod {pod}: its network was torn down, but the allocation store did not record it: {e}"
                ),
            )
        })?;
        info!(container_id = %entry.container_id, %pod, "pod deleted");
        Ok(())
    }

    /// Deletes a flock veth called `iface` if no entry owns it.
    async fn remove_unowned(&self, iface: &str) -> Result<(), CniError> {
        if self.allocations.owner_of_iface(iface).is_some() {
            return Ok(()); // another container's (a hash collision): never touched
        }
        let exists = self
            .kernel
            .host_link_exists(iface)
            .await
            .map_err(|e| internal(&format!("looking up {iface} failed"), e))?;
        if !exists {
            return Ok(());
        }
        info!(%iface, "deleting a flock veth no allocation owns");
        let removal = self
            .kernel
            .teardown(iface, None, None)
            .await
            .map_err(|e| internal(&format!("deleting {iface} failed"), e))?;
        let metrics = self.metrics.clone();
        let iface = iface.to_owned();
        self.tasks.spawn(async move {
            if let Err(error) = removal.await {
                metrics.error("teardown");
                warn!(%iface, %error, "deleting a veth no allocation owns failed");
            }
        });
        Ok(())
    }

    /// GC: every attachment the runtime no longer lists, and every flock
    /// veth no entry owns.
    pub(super) async fn gc(&self, req: &Request) -> Result<(), CniError> {
        self.ready_for(Op::Gc)?;
        let Some(valid) = req.config.gc_valid_attachments() else {
            warn!("GC without cni.dev/valid-attachments; nothing collected");
            return Ok(());
        };
        let valid: HashSet<(&str, &str)> = valid
            .iter()
            .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
            .collect();
        let stale: Vec<Allocation> = self
            .allocations
            .snapshot()
            .into_iter()
            .filter(|a| !valid.contains(&(a.container_id.as_str(), a.ifname.as_str())))
            .collect();
        let mut failures = Vec::new();
        for a in stale {
            match self.del(&a.container_id, &a.ifname).await {
                Ok(()) => self.metrics.reconciled("gc"),
                Err(e) => failures.push(format!("{}/{}: {}", a.container_id, a.ifname, e.msg)),
            }
        }
        let links = self
            .kernel
            .flock_links()
            .await
            .map_err(|e| internal("listing flock veths for GC failed", e))?;
        for iface in links {
            // Checked after the listing: an entry is reserved before its veth exists.
            if self.allocations.owner_of_iface(&iface).is_some() {
                continue;
            }
            match self.remove_unowned(&iface).await {
                Ok(()) => self.metrics.reconciled("gc_orphan_veth"),
                Err(e) => failures.push(format!("{iface}: {}", e.msg)),
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
}

impl<K: Kernel, S: AllocationStore> Pods<K, S> {
    /// Finishes a release in the background: waits for `removal` (or tears
    /// the pod down again when there is none or it failed), then removes
    /// the entry durably, retrying with a growing delay until both succeed
    /// or the agent stops (the next start finishes what is left).
    pub(crate) fn finish_in_background(&self, entry: Allocation, removal: Option<Removal>) {
        let Some(finishing) = self.claim_release(&entry) else {
            return; // a task is at it already; it tears down again if it must
        };
        let cancel = self.cancel.clone();
        let kernel = self.kernel.clone();
        let allocations = self.allocations.clone();
        let metrics = self.metrics.clone();
        self.tasks.spawn(async move {
            let _finishing = finishing;
            let mut delay = RETRY_FIRST;
            let mut removal = removal;
            loop {
                if removal.is_none() && !allocations.still_holds(&entry) {
                    // Finished by another (a restart's recovery): a new
                    // teardown by name could hit the veth of the
                    // container's next ADD.
                    return;
                }
                let step = finish_once(&*kernel, &allocations, &entry, removal.take());
                let error = tokio::select! {
                    () = cancel.cancelled() => return,
                    outcome = step => match outcome {
                        Ok(()) => {
                            if let Some(usage) = allocations.usage() {
                                metrics.set_usage(usage);
                            }
                            metrics.duplicate_addresses.set(allocations.duplicates().len() as i64);
                            return;
                        }
                        Err(e) => e,
                    },
                };
                metrics.error("release");
                warn!(container_id = %entry.container_id, %error, retry_in_s = delay.as_secs(), "finishing a release failed; its addresses stay reserved");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
        });
    }
}

impl<K: Kernel, S: AllocationStore> Pods<K, S> {
    /// The one claim on finishing `entry`'s release (`None` while another
    /// task holds it): a second finisher of one entry would tear down by
    /// name again after the first removed it, maybe the veth of the
    /// container's next ADD.
    pub(crate) fn claim_release(&self, entry: &Allocation) -> Option<Finishing> {
        let key = (entry.container_id.clone(), entry.ifname.clone());
        Finishing::claim(&self.finishing, key)
    }
}

/// The entries a task is finishing the release of; each by one at most.
pub(crate) type FinishingSet = Arc<Mutex<HashSet<(String, String)>>>;

/// A claim on finishing one entry, given up when dropped.
pub(crate) struct Finishing {
    set: FinishingSet,
    key: (String, String),
}

impl Finishing {
    fn claim(set: &FinishingSet, key: (String, String)) -> Option<Finishing> {
        let fresh = set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        fresh.then(|| Finishing {
            set: set.clone(),
            key,
        })
    }
}

impl Drop for Finishing {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// One try: the kernel's removal (a new teardown when there is none), then
/// the entry's durable removal.
async fn finish_once<K: Kernel, S: AllocationStore>(
    kernel: &K,
    allocations: &Allocations<S>,
    entry: &Allocation,
    removal: Option<Removal>,
) -> Result<(), String> {
    let removal = match removal {
        Some(r) => r,
        None => kernel
            .teardown(&entry.host_iface, entry.ip6, entry.ip4)
            .await
            .map_err(|e| format!("tearing down {}: {e}", entry.host_iface))?,
    };
    removal
        .await
        .map_err(|e| format!("deleting {}: {e}", entry.host_iface))?;
    kernel
        .forget_flows(entry.unicast().collect())
        .await
        .map_err(|e| {
            format!(
                "forgetting the flows of {:?}: {e}",
                entry.unicast().collect::<Vec<_>>()
            )
        })?;
    allocations
        .finish_release(entry, SystemTime::now())
        .await
        .map(drop)
        .map_err(|e| format!("recording the release: {e}"))
}
