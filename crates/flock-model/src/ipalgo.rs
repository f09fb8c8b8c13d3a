//! Which ip-algo a pod gets: its own annotation, else its NodeConfig's,
//! else none (a random interface ID).

use std::collections::BTreeMap;

use flock_ipam::IpAlgo;

use crate::annotations::IP_ALGO;

/// Resolves ip-algo for one pod. An empty, whitespace-only or invalid value
/// (unknown or duplicate field) at either level falls through to the next
/// with a warning; both absent is the random baseline, silently.
pub fn resolve_ip_algo(
    pod: &str,
    pod_annotations: &BTreeMap<String, String>,
    node_annotations: Option<&BTreeMap<String, String>>,
) -> (Option<IpAlgo>, Vec<String>) {
    let mut warnings = Vec::new();
    let levels = [
        (format!("pod {pod}"), Some(pod_annotations)),
        ("NodeConfig".to_owned(), node_annotations),
    ];
    for (whose, annotations) in levels {
        let Some(value) = annotations.and_then(|a| a.get(IP_ALGO)) else {
            continue;
        };
        match value.parse::<IpAlgo>() {
            Ok(algo) => return (Some(algo), warnings),
            Err(e) => warnings.push(format!(
                "{whose}: annotation {IP_ALGO}: {value:?}: {e}; ignored"
            )),
        }
    }
    (None, warnings)
}
