//! flock-datastore: where the agent reads Kubernetes objects from.
//!
//! One [`Cache`] holds this node's NodeConfig, the pods (those on this node
//! in full, the cluster's for NetworkPolicy), namespaces and
//! NetworkPolicies, and publishes change events (pod readiness flips as
//! their own event). Two sources fill it: the Kubernetes API through kube
//! watchers ([`kubernetes`]), or a directory of ordinary manifests watched
//! for changes ([`DirSource`]), so the agent runs with no cluster at all.

mod cache;
mod dir;
pub mod kubernetes;
mod objects;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use cache::{Cache, Event};
pub use dir::{DirSource, DirWatch, SCAN_INTERVAL};
pub use objects::{ContainerPort, Passwords, PodInfo};

/// Which source the agent reads objects from (`--datastore`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreSpec {
    /// The cluster's API server, through the in-cluster or kubeconfig credentials.
    Kubernetes,
    /// A directory of manifests (`dir:PATH`).
    Dir(PathBuf),
}

/// A `--datastore` value that is neither `kubernetes` nor `dir:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("datastore {value:?}: {reason}")]
pub struct DatastoreSpecError {
    value: String,
    reason: &'static str,
}

impl FromStr for DatastoreSpec {
    type Err = DatastoreSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let error = |reason| DatastoreSpecError {
            value: s.to_owned(),
            reason,
        };
        if s == "kubernetes" {
            return Ok(DatastoreSpec::Kubernetes);
        }
        match s.strip_prefix("dir:") {
            Some("") => Err(error(
                "dir: needs a directory path, as in dir:/etc/flock/manifests",
            )),
            Some(path) => Ok(DatastoreSpec::Dir(PathBuf::from(path))),
            None => Err(error("expected kubernetes or dir:PATH")),
        }
    }
}

impl fmt::Display for DatastoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatastoreSpec::Kubernetes => f.write_str("kubernetes"),
            DatastoreSpec::Dir(path) => write!(f, "dir:{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_sources_and_names_bad_values() {
        assert_eq!("kubernetes".parse(), Ok(DatastoreSpec::Kubernetes));
        assert_eq!(
            "dir:/tmp/m".parse(),
            Ok(DatastoreSpec::Dir("/tmp/m".into()))
        );
        assert_eq!(
            DatastoreSpec::Dir("/tmp/m".into()).to_string(),
            "dir:/tmp/m"
        );
        for bad in ["", "dir:", "k8s", "Kubernetes", "file:/x"] {
            let err = bad.parse::<DatastoreSpec>().expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}
