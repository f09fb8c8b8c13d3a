//! `CNI_ARGS`: the `K=V;K=V` string Kubernetes runtimes pass.

use crate::{ModelError, Result};

/// The keys flock reads from `CNI_ARGS`. Values that are empty count as absent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`.
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `K8S_POD_UID` (absent from old runtimes).
    pub pod_uid: Option<String>,
    /// `K8S_POD_INFRA_CONTAINER_ID`.
    pub infra_container_id: Option<String>,
    /// `IgnoreUnknown` was `1` or `true`.
    pub ignore_unknown: bool,
    /// Every other pair, in order; flock ignores them (runtimes add their own).
    pub other: Vec<(String, String)>,
}

impl CniArgs {
    /// Parses `CNI_ARGS`: pairs separated by `;`, each split at its first
    /// `=` (values may contain `=`), keys case-sensitive, order irrelevant,
    /// a repeated key's last value winning. Empty segments are skipped; a
    /// segment without `=` is an error.
    pub fn parse(s: &str) -> Result<CniArgs> {
        let mut args = CniArgs::default();
        for segment in s.split(';').filter(|seg| !seg.trim().is_empty()) {
            let (key, value) = segment
                .split_once('=')
                .ok_or_else(|| ModelError::CniArgs(format!("{segment:?} is not KEY=VALUE")))?;
            let value = value.to_owned();
            let set =
                |slot: &mut Option<String>| *slot = Some(value.clone()).filter(|v| !v.is_empty());
            match key {
                "K8S_POD_NAMESPACE" => set(&mut args.pod_namespace),
                "K8S_POD_NAME" => set(&mut args.pod_name),
                "K8S_POD_UID" => set(&mut args.pod_uid),
                "K8S_POD_INFRA_CONTAINER_ID" => set(&mut args.infra_container_id),
                "IgnoreUnknown" => {
                    args.ignore_unknown = value == "1" || value.eq_ignore_ascii_case("true");
                }
                _ => args.other.push((key.to_owned(), value)),
            }
        }
        Ok(args)
    }

    /// `namespace/name` of the pod, or an error naming what is missing
    /// (ADD needs both).
    pub fn pod_ref(&self) -> Result<(String, String)> {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(name)) => Ok((ns.clone(), name.clone())),
            (ns, name) => {
                let missing: Vec<&str> = [
                    ns.is_none().then_some("K8S_POD_NAMESPACE"),
                    name.is_none().then_some("K8S_POD_NAME"),
                ]
                .into_iter()
                .flatten()
                .collect();
                Err(ModelError::CniArgs(format!(
                    "{} missing",
                    missing.join(" and ")
                )))
            }
        }
    }
}
