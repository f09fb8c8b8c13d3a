//! The NodeConfig CRD manifest, generated from the Rust type.

use kube::CustomResourceExt;

use crate::NodeConfig;

/// Where the generated manifest is checked in, from the project root.
pub const CRD_PATH: &str = "deploy/crds/nodeconfigs.flock.fritzlab.net.yaml";

/// The CRD manifest as YAML, with a header saying how to regenerate it.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&NodeConfig::crd())
        // The CRD type is plain data with string keys: serialising cannot fail.
        .expect("the CRD serialises");
    format!(
        "# Generated from flock-model's NodeConfig type; do not edit.\n\
         # Regenerate: cargo run -q -p flock-model --bin flock-crd > {CRD_PATH}\n{body}"
    )
}
