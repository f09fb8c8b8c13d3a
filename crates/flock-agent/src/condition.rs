//! Conditions the agent writes through the API server (the kubernetes
//! datastore only): the node-condition loop, which once the node runtime is
//! ready keeps the Node's `NetworkUnavailable` condition False (reason
//! `FlockReady`), refreshed every minute; and the `Valid` condition of
//! AddressPools and of this node's NodeConfig.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
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
        let node = self
            .nodes
            .get_status(&self.name)
            .await
            .map_err(|e| e.to_string())?;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        // The transition time is when the condition last flipped: a refresh
        // of a condition that is False already keeps it.
        let since = node
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "NetworkUnavailable" && c.status == "False")
            .and_then(|c| c.last_transition_time)
            .map_or_else(|| now.clone(), |t| t.0.to_string());
        let patch = serde_json::json!({
            "status": {
                "conditions": [{
                    "type": "NetworkUnavailable",
                    "status": "False",
                    "reason": "FlockReady",
                    "message": "flock-agent is running on this node",
                    "lastTransitionTime": since,
                    "lastHeartbeatTime": now,
                }]
            }
        });
        self.nodes
            .patch_status(
                &self.name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Strategic(patch),
            )
            .await
            .map(drop)
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

/// An object with a `Valid` condition in its status.
pub trait WithConditions:
    kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The `Valid` condition's message when it is True.
    const IN_FORCE: &'static str;
    /// The status's conditions.
    fn conditions(&self) -> &[Condition];
}

impl WithConditions for flock_model::AddressPool {
    const IN_FORCE: &'static str = "the pool is in force";
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

impl WithConditions for flock_model::NodeConfig {
    const IN_FORCE: &'static str = "the NodeConfig is in force";
    fn conditions(&self) -> &[Condition] {
        self.status.as_ref().map_or(&[], |s| &s.conditions)
    }
}

/// Writes the `Valid` condition of `K`s through the API server.
#[derive(Clone)]
pub struct ValidStatus<K> {
    api: kube::Api<K>,
}

impl<K: WithConditions> ValidStatus<K> {
    /// Through `client`.
    pub fn new(client: kube::Client) -> ValidStatus<K> {
        ValidStatus {
            api: kube::Api::all(client),
        }
    }

    /// Writes `Valid` (with why not, when refused) unless `object` says so
    /// already for its generation. `lastTransitionTime` moves only when
    /// the status flips.
    pub async fn report(&self, object: &K, refused: Option<&str>) -> Result<(), kube::Error> {
        let (status, reason, message) = match refused {
            None => ("True", "Accepted", K::IN_FORCE),
            Some(why) => ("False", "Refused", why),
        };
        let generation = object.meta().generation;
        let current = object.conditions().iter().find(|c| c.type_ == "Valid");
        if current.is_some_and(|c| {
            c.status == status && c.message == message && c.observed_generation == generation
        }) {
            return Ok(());
        }
        let since = match current {
            Some(c) if c.status == status => c.last_transition_time.0.to_string(),
            _ => k8s_openapi::jiff::Timestamp::now().to_string(),
        };
        let patch = serde_json::json!({
            "status": {"conditions": [{
                "type": "Valid",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }]}
        });
        let name = object.meta().name.clone().unwrap_or_default();
        self.api
            .patch_status(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(patch),
            )
            .await
            .map(drop)
    }
}
