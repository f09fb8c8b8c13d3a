//! The compact views of Kubernetes objects the agent keeps.

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// What flock keeps of a pod: enough for the pod handler and anycast on its
/// own node, and for NetworkPolicy cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// Labels (NetworkPolicy selectors), shared with NetworkPolicy's view
    /// of the pod.
    pub labels: Arc<BTreeMap<String, String>>,
    /// Annotations (flock's own among them).
    pub annotations: BTreeMap<String, String>,
    /// The workload name ip-algo embeds.
    pub app: String,
    /// The first container's image.
    pub image: Option<String>,
    /// Whether the `Ready` condition is `True`.
    pub ready: bool,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// Container ports: name, number, protocol (named ports for NetworkPolicy).
    pub ports: Arc<[ContainerPort]>,
    /// `status.phase` is Succeeded or Failed: its IPs may belong to
    /// another pod already, so NetworkPolicy ignores it.
    pub terminated: bool,
    /// `metadata.creationTimestamp`: who claimed an IP first.
    pub created: Option<k8s_openapi::jiff::Timestamp>,
    /// `metadata.deletionTimestamp` is set: the pod is going (its
    /// anycast and `addresses` IPs are withdrawn at once, Ready or not,
    /// and it leaves every NetworkPolicy peer set).
    pub deleting: bool,
    /// `spec.hostNetwork`: its addresses are the node's, not its own.
    pub host_network: bool,
}

/// One declared container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    /// The port's name, if any.
    pub name: Option<String>,
    /// The number.
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

impl PodInfo {
    /// The compact view of `pod`.
    pub fn from_pod(pod: &Pod) -> PodInfo {
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let ips = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().filter_map(|ip| ip.ip.parse().ok()).collect())
            .unwrap_or_default();
        let ports: Vec<ContainerPort> = spec
            .map(|s| {
                s.containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .filter_map(|p| {
                        Some(ContainerPort {
                            name: p.name.clone(),
                            port: u16::try_from(p.container_port).ok()?,
                            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (labels, ports) = shared(pod.labels(), ports);
        PodInfo {
            namespace: pod.namespace().unwrap_or_else(|| "default".into()),
            name: pod.name_any(),
            uid: pod.uid().unwrap_or_default(),
            node: spec.and_then(|s| s.node_name.clone()),
            labels,
            annotations: pod.annotations().clone(),
            app: flock_model::app_name(pod),
            image: flock_model::image_ref(pod).map(str::to_owned),
            ready,
            ips,
            ports,
            terminated: status
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed"),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            deleting: pod.metadata.deletion_timestamp.is_some(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        }
    }

    /// Whether this pod came first among two claiming one IP: the older
    /// `creationTimestamp`, then the smaller UID (a pod without a timestamp
    /// counts as newest).
    pub fn older_than(&self, other: &PodInfo) -> bool {
        let key = |p: &PodInfo| (p.created.is_none(), p.created, p.uid.clone());
        key(self) < key(other)
    }

    /// Off this node only what NetworkPolicy and claim checks need is kept:
    /// labels, addresses, ports, and flock's claim annotations.
    pub fn compact(mut self) -> PodInfo {
        self.annotations
            .retain(|k, _| k == flock_model::ANYCAST || k == flock_model::ADDRESSES);
        self.image = None;
        self
    }

    /// `namespace/name`.
    pub fn key(&self) -> (String, String) {
        (self.namespace.clone(), self.name.clone())
    }
}

/// Label sets and port lists, each held once however many pods have it:
/// the pods of one workload have equal ones, so 10,000 pods hold a few
/// hundred of each.
#[derive(Default)]
struct Shared {
    labels: HashSet<Arc<BTreeMap<String, String>>>,
    ports: HashSet<Arc<[ContainerPort]>>,
    /// Entries after the last sweep of those no pod holds any more.
    swept: usize,
}

static SHARED: Mutex<Option<Shared>> = Mutex::new(None);

/// The shared copies of `labels` and `ports`.
fn shared(
    labels: &BTreeMap<String, String>,
    ports: Vec<ContainerPort>,
) -> (Arc<BTreeMap<String, String>>, Arc<[ContainerPort]>) {
    // Only whole values are swapped in: a poisoned lock still holds a
    // consistent set.
    let mut guard = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    let s = guard.get_or_insert_with(Shared::default);
    let labels = match s.labels.get(labels) {
        Some(l) => l.clone(),
        None => {
            let l = Arc::new(labels.clone());
            s.labels.insert(l.clone());
            l
        }
    };
    let ports = match s.ports.get(ports.as_slice()) {
        Some(p) => p.clone(),
        None => {
            let p: Arc<[ContainerPort]> = ports.into();
            s.ports.insert(p.clone());
            p
        }
    };
    // Sweep when the sets have doubled since the last sweep: amortized
    // constant per pod, and never more than twice the live entries.
    if s.labels.len() + s.ports.len() > 2 * s.swept + 1024 {
        s.labels.retain(|l| Arc::strong_count(l) > 1);
        s.ports.retain(|p| Arc::strong_count(p) > 1);
        s.swept = s.labels.len() + s.ports.len();
    }
    (labels, ports)
}

/// The entries of the Secret `flock-bgp-passwords`: key → password bytes.
/// Its `Debug` shows the keys only, so no log or panic message can hold a
/// password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Passwords(BTreeMap<String, Vec<u8>>);

impl Passwords {
    /// The Secret's `data` and `stringData` (which wins, as the API server
    /// would merge it).
    pub fn from_secret(secret: &k8s_openapi::api::core::v1::Secret) -> Passwords {
        let mut entries: BTreeMap<String, Vec<u8>> = secret
            .data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone()))
            .collect();
        for (k, v) in secret.string_data.iter().flatten() {
            entries.insert(k.clone(), v.clone().into_bytes());
        }
        Passwords(entries)
    }

    /// The password under `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(Vec::as_slice)
    }
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("keys", &self.0.keys().collect::<Vec<_>>())
            .finish()
    }
}
