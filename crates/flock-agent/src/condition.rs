//! The node-condition loop: once the node runtime is ready, keeps the
//! Node's `NetworkUnavailable` condition False (reason `FlockReady`),
//! refreshed every minute. Only the kubernetes datastore has one.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::status::Readiness;

/// How often the condition is refreshed.
pub const CONDITION_REFRESH: Duration = Duration::from_secs(60);

/// Where the condition is written.
pub trait NodeCondition: Send + Sync + 'static {
    /// Sets `NetworkUnavailable=False` on this node.
    fn set_network_available(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// The API server's Node object.
#[derive(Clone)]
pub struct KubeNode {
    nodes: kube::Api<k8s_openapi::api::core::v1::Node>,
    name: String,
}

impl KubeNode {
    /// Node `name` through `client`.
    pub fn new(client: kube::Client, name: &str) -> KubeNode {
        KubeNode {
            nodes: kube::Api::all(client),
            name: name.to_owned(),
        }
    }
}

impl NodeCondition for KubeNode {
    async fn set_network_available(&self) -> Result<(), String> {
        flock_datastore::kubernetes::set_network_available(&self.nodes, &self.name)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Runs until cancelled: waits for readiness, then refreshes.
pub async fn keep_network_available(
    node: impl NodeCondition,
    mut readiness: watch::Receiver<Readiness>,
    cancel: CancellationToken,
) {
    tokio::select! {
        () = cancel.cancelled() => return,
        ready = readiness.wait_for(|r| *r == Readiness::Ready) => if ready.is_err() { return },
    }
    let mut tick = tokio::time::interval(CONDITION_REFRESH);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let outcome = node
            .set_network_available()
            .instrument(info_span!("node_condition"))
            .await;
        if let Err(error) = outcome {
            warn!(%error, "cannot update the NetworkUnavailable condition");
        }
    }
}
