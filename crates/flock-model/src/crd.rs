//! The CRD manifests, generated from the Rust types.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{AddressPool, BgpPeer, NodeConfig};

/// Where the NodeConfig manifest is checked in, from the project root.
pub const CRD_PATH: &str = "deploy/crds/nodeconfigs.flock.fritzlab.net.yaml";

/// Every CRD flock defines: its plural (the argument of `flock-crd`) and
/// where its manifest is checked in.
pub const CRDS: [(&str, &str); 3] = [
    ("nodeconfigs", CRD_PATH),
    (
        "addresspools",
        "deploy/crds/addresspools.flock.fritzlab.net.yaml",
    ),
    ("bgppeers", "deploy/crds/bgppeers.flock.fritzlab.net.yaml"),
];

fn definition(plural: &str) -> Option<CustomResourceDefinition> {
    match plural {
        "nodeconfigs" => Some(NodeConfig::crd()),
        "addresspools" => Some(AddressPool::crd()),
        "bgppeers" => Some(BgpPeer::crd()),
        _ => None,
    }
}

/// The NodeConfig CRD manifest.
pub fn crd_yaml() -> String {
    crd_yaml_for("nodeconfigs").unwrap_or_default()
}

/// The CRD manifest of `plural` as YAML, with a header saying how to
/// regenerate it; `None` for a kind flock does not define.
pub fn crd_yaml_for(plural: &str) -> Option<String> {
    let (_, path) = CRDS.iter().find(|(p, _)| *p == plural)?;
    let body = serde_yaml::to_string(&definition(plural)?)
        // The CRD type is plain data with string keys: serialising cannot fail.
        .expect("the CRD serialises");
    Some(format!(
        "# Generated from flock-model's types; do not edit.\n\
         # Regenerate: cargo run -q -p flock-model --bin flock-crd {plural} > {path}\n{body}"
    ))
}
