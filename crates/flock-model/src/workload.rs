//! Workload identity of a pod, for ip-algo.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// The label Kubernetes puts on every pod of a ReplicaSet.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";

/// The workload a pod belongs to, the same for all its replicas: the
/// controller owner's name, where a ReplicaSet named `<deployment>-<hash>`
/// (with the pod's `pod-template-hash` label) gives the Deployment's name.
/// A ReplicaSet not following that convention keeps its own name;
/// StatefulSet, DaemonSet, Job and other owners are used as they are; a pod
/// without a controller is its own workload.
pub fn app_name(pod: &Pod) -> String {
    let Some(owner) = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
    else {
        return pod.name_any();
    };
    if owner.kind == "ReplicaSet"
        && let Some(hash) = pod
            .labels()
            .get(POD_TEMPLATE_HASH)
            .filter(|h| !h.is_empty())
        && let Some(deployment) = owner
            .name
            .strip_suffix(hash.as_str())
            .and_then(|s| s.strip_suffix('-'))
            .filter(|d| !d.is_empty())
    {
        return deployment.to_owned();
    }
    owner.name.clone()
}

/// The first container's image reference, as written in the spec.
pub fn image_ref(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()?
        .containers
        .first()?
        .image
        .as_deref()
        .filter(|i| !i.is_empty())
}
