//! CHECK: the kernel and the allocations compared with what the pod
//! should have; served from the first instant, like DEL.

use std::path::Path;

use flock_proto::rpc::Request;
use flock_proto::{CniError, ErrorCode};
use flock_store::AllocState;

use super::{Pods, err, internal};
use crate::kernel::Kernel;
use crate::store::AllocationStore;

impl<K: Kernel, S: AllocationStore> Pods<K, S> {
    pub(super) async fn check(&self, req: &Request) -> Result<(), CniError> {
        let _turn = self.locks.lock(&req.container_id).await;
        let entry = self
            .allocations
            .attachment(&req.container_id)
            .filter(|a| a.ifname == req.if_name)
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
        match entry.state {
            AllocState::Committed => {}
            AllocState::Pending => problems.push("its ADD never completed".to_owned()),
            AllocState::Releasing => problems.push("it is being deleted".to_owned()),
        }
        for (ip, other) in self.allocations.sharing_with(&entry) {
            problems.push(format!("{ip} is also held by container {other}"));
        }
        if let Some(prev) = &req.config.prev_result {
            for ip in entry.unicast() {
                if !prev.ips.iter().any(|c| c.address.addr() == ip) {
                    problems.push(format!("prevResult lacks {ip}"));
                }
            }
        }
        match self.kernel.open_netns(Path::new(&req.netns)).await {
            Err(refused) => problems.push(refused.to_string()),
            Ok(opened) => {
                if entry.netns_inode.is_some_and(|ino| ino != opened.inode) {
                    problems.push(format!(
                        "CNI_NETNS {} is not the namespace the pod was built in",
                        req.netns
                    ));
                }
                let spec = self.spec(&entry, opened.netns);
                let drifts = self
                    .kernel
                    .inspect(&spec)
                    .await
                    .map_err(|e| internal("inspecting the kernel failed", e))?;
                problems.extend(drifts.iter().map(ToString::to_string));
            }
        }
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
}
