//! CNI_ARGS parsing: never panics, and the pairs it keeps re-render to a
//! string that parses to the same result.
#![no_main]

use flock_model::CniArgs;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|s: &str| {
    let Ok(args) = CniArgs::parse(s) else {
        return;
    };
    let mut parts = Vec::new();
    let known = [
        ("K8S_POD_NAMESPACE", &args.pod_namespace),
        ("K8S_POD_NAME", &args.pod_name),
        ("K8S_POD_UID", &args.pod_uid),
        ("K8S_POD_INFRA_CONTAINER_ID", &args.infra_container_id),
    ];
    for (k, v) in known {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    }
    if args.ignore_unknown {
        parts.push("IgnoreUnknown=1".into());
    }
    // Values containing ';' cannot round-trip (the runtime could not have sent them either).
    if parts.iter().any(|p| p.contains(';')) || args.other.iter().any(|(k, v)| k.contains(';') || v.contains(';')) {
        return;
    }
    for (k, v) in &args.other {
        parts.push(format!("{k}={v}"));
    }
    let again = CniArgs::parse(&parts.join(";")).expect("re-rendered args parse");
    assert_eq!(again.pod_namespace, args.pod_namespace);
    assert_eq!(again.pod_name, args.pod_name);
    assert_eq!(again.pod_uid, args.pod_uid);
    assert_eq!(again.infra_container_id, args.infra_container_id);
    assert_eq!(again.ignore_unknown, args.ignore_unknown);
});
