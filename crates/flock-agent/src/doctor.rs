//! `flockctl doctor`: the node settings flock relies on, each checked
//! against the kernel, the CNI configuration directory and BIRD as they
//! are now, with what to do when one is not as it should be.

use std::path::Path;

use flock_netlink::RouteKind;
use flock_proto::admin::{Check, Verdict};
use flock_store::AllocState;
use ipnet::IpNet;

use crate::admin::NodePods;
use crate::birdc;
use crate::policy::TableAudit;

fn check(name: &str, verdict: Verdict, detail: impl Into<String>) -> Check {
    Check {
        check: name.to_owned(),
        verdict,
        detail: detail.into(),
    }
}

/// Every check, in a fixed order.
pub async fn run(pods: &NodePods, bird_socket: &Path, cni_conf_dir: &Path) -> Vec<Check> {
    let mut checks = vec![
        sysctls(pods).await,
        blackholes(pods).await,
        nftables(pods).await,
    ];
    checks.push(cni_config(cni_conf_dir));
    checks.extend(mtu(pods).await);
    checks.push(bird(bird_socket).await);
    checks
}

async fn sysctls(pods: &NodePods) -> Check {
    const KEYS: [&str; 4] = [
        "ipv4/ip_forward",
        "ipv6/conf/all/forwarding",
        "ipv4/fib_multipath_hash_policy",
        "ipv6/fib_multipath_hash_policy",
    ];
    let values = match pods.kernel.dataplane.node_sysctls(&KEYS).await {
        Ok(v) => v,
        Err(e) => return check("sysctls", Verdict::Problem, format!("cannot read: {e}")),
    };
    let wrong = |range: std::ops::Range<usize>| -> Vec<String> {
        values[range]
            .iter()
            .filter(|(_, v)| v.as_deref() != Some("1"))
            .map(|(k, v)| {
                format!(
                    "net.{}={}",
                    k.replace('/', "."),
                    v.as_deref().unwrap_or("(unreadable)")
                )
            })
            .collect()
    };
    let forwarding = wrong(0..2);
    let hashing = wrong(2..4);
    if !forwarding.is_empty() {
        return check(
            "sysctls",
            Verdict::Problem,
            format!(
                "{}: the node does not forward pod traffic (the agent sets 1 at start; something reset it)",
                forwarding.join(", ")
            ),
        );
    }
    if !hashing.is_empty() {
        return check(
            "sysctls",
            Verdict::Warning,
            format!(
                "{}: multipath routes hash on addresses only, so one client's flows to an anycast IP all reach one pod (set 1 for the 5-tuple)",
                hashing.join(", ")
            ),
        );
    }
    check(
        "sysctls",
        Verdict::Ok,
        "forwarding on for IPv4 and IPv6; multipath routes hash on the 5-tuple",
    )
}

async fn blackholes(pods: &NodePods) -> Check {
    let Some(settings) = pods.allocations.settings() else {
        return check(
            "blackholes",
            Verdict::Warning,
            "no NodeConfig in force yet: the node's prefixes are not known",
        );
    };
    let want: Vec<IpNet> = settings
        .cidr6
        .map(IpNet::V6)
        .into_iter()
        .chain(settings.cidr4.map(IpNet::V4))
        .collect();
    let routes = match pods.kernel.dataplane.flock_routes().await {
        Ok(r) => r,
        Err(e) => {
            return check(
                "blackholes",
                Verdict::Problem,
                format!("cannot list routes: {e}"),
            );
        }
    };
    let missing: Vec<String> = want
        .iter()
        .filter(|p| {
            !routes
                .iter()
                .any(|r| r.kind == RouteKind::Blackhole && r.dst == **p)
        })
        .map(IpNet::to_string)
        .collect();
    if missing.is_empty() {
        let all: Vec<String> = want.iter().map(IpNet::to_string).collect();
        check(
            "blackholes",
            Verdict::Ok,
            format!("blackhole routes for {}", all.join(" and ")),
        )
    } else {
        check(
            "blackholes",
            Verdict::Problem,
            format!(
                "no blackhole route for {}: traffic to an unallocated address of the node's prefix follows the default route back to the fabric (a loop); the agent restores it when the NodeConfig is applied again or the agent restarts",
                missing.join(" and ")
            ),
        )
    }
}

async fn nftables(pods: &NodePods) -> Check {
    match pods.policy.audit().await {
        TableAudit::AsLoaded => check(
            "nftables",
            Verdict::Ok,
            "table inet flock present and as loaded",
        ),
        TableAudit::NotLoaded(why) => check(
            "nftables",
            Verdict::Problem,
            format!("table inet flock not loaded: {why}"),
        ),
        TableAudit::Differs(how) => check(
            "nftables",
            Verdict::Problem,
            format!(
                "table inet flock was changed outside flock ({how}); the agent loads it again within a minute"
            ),
        ),
        TableAudit::Unreadable(e) => check(
            "nftables",
            Verdict::Problem,
            format!("cannot list table inet flock: {e}"),
        ),
    }
}

/// The CNI plugin types a configuration file names.
fn plugin_types(text: &str) -> Vec<String> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return Vec::new();
    };
    let one = |p: &serde_json::Value| p["type"].as_str().map(str::to_owned);
    match v["plugins"].as_array() {
        Some(list) => list.iter().filter_map(one).collect(),
        None => one(&v).into_iter().collect(),
    }
}

/// The files the runtime reads in `dir`, in its order: `.conf`,
/// `.conflist` and `.json`, by name. The first one is the network.
fn cni_config(dir: &Path) -> Check {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            return check(
                "cni config",
                Verdict::Warning,
                format!(
                    "cannot read {}: {e} (the agent reads it with --cni-conf-dir; the DaemonSet mounts the host's /etc/cni/net.d there)",
                    dir.display()
                ),
            );
        }
    };
    let mut files: Vec<String> = entries
        .filter_map(Result::ok)
        // A symlinked file counts, as the runtime reads it.
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".conf") || n.ends_with(".conflist") || n.ends_with(".json"))
        .collect();
    files.sort();
    let types: Vec<(String, Vec<String>)> = files
        .into_iter()
        .map(|f| {
            let text = std::fs::read_to_string(dir.join(&f)).unwrap_or_default();
            let types = plugin_types(&text);
            (f, types)
        })
        .collect();
    let Some(ours) = types
        .iter()
        .position(|(_, t)| t.iter().any(|t| t == "flock"))
    else {
        return check(
            "cni config",
            Verdict::Problem,
            format!(
                "no flock conflist in {}: the install-cni init container writes 01-flock.conflist; is it done on this node?",
                dir.display()
            ),
        );
    };
    if ours == 0 {
        return check(
            "cni config",
            Verdict::Ok,
            format!(
                "{} sorts first of {} in {}",
                types[0].0,
                types.len(),
                dir.display()
            ),
        );
    }
    let before: Vec<String> = types[..ours]
        .iter()
        .map(|(f, t)| {
            if t.is_empty() {
                f.clone()
            } else {
                format!("{f} ({})", t.join(", "))
            }
        })
        .collect();
    check(
        "cni config",
        Verdict::Warning,
        format!(
            "{} sort{} before {} in {}: the runtime gives new pods that network, not flock's; move {} out of the directory (docs/operations.md, migrating node by node)",
            before.join(", "),
            if before.len() == 1 { "s" } else { "" },
            types[ours].0,
            dir.display(),
            if before.len() == 1 { "it" } else { "them" }
        ),
    )
}

async fn mtu(pods: &NodePods) -> Vec<Check> {
    let dataplane = &pods.kernel.dataplane;
    let mut out = Vec::new();
    let uplink = dataplane.default_route_mtu().await.ok().flatten();
    let configured = pods.allocations.settings().and_then(|s| s.mtu);
    match (configured, uplink) {
        (Some(pod), Some(up)) if pod > up => out.push(check(
            "mtu",
            Verdict::Problem,
            format!(
                "the NodeConfig gives pods MTU {pod}, more than the {up} of the default route's interface: large packets from pods are dropped or fragmented"
            ),
        )),
        _ => {}
    }
    let links = match dataplane.flock_link_mtus().await {
        Ok(l) => l,
        Err(e) => {
            out.push(check(
                "mtu",
                Verdict::Problem,
                format!("cannot list veths: {e}"),
            ));
            return out;
        }
    };
    let mut wrong = Vec::new();
    for entry in pods.allocations.snapshot() {
        if entry.state != AllocState::Committed {
            continue;
        }
        let (Some(want), Some((_, _, Some(have)))) = (
            entry.mtu,
            links.iter().find(|(n, _, _)| *n == entry.host_iface),
        ) else {
            continue;
        };
        if want != *have {
            wrong.push(format!(
                "{} of {}/{}: MTU {have}, set to {want} at ADD",
                entry.host_iface, entry.namespace, entry.pod
            ));
        }
    }
    if !wrong.is_empty() {
        out.push(check("mtu", Verdict::Problem, wrong.join("; ")));
    }
    if out.is_empty() {
        let up = uplink.map_or("no default route".to_owned(), |m| {
            format!("default route's interface {m}")
        });
        out.push(check(
            "mtu",
            Verdict::Ok,
            format!("{} veths at the MTU set at ADD; {up}", links.len()),
        ));
    }
    out
}

async fn bird(socket: &Path) -> Check {
    let bgp = birdc::sessions(socket).await;
    if let Some(e) = bgp.error {
        return check("bird", Verdict::Problem, e);
    }
    let down: Vec<String> = bgp
        .sessions
        .iter()
        .filter(|s| !(s.state == "up" && s.info.starts_with("Established")))
        .map(|s| format!("{} ({} {})", s.name, s.state, s.info))
        .collect();
    if down.is_empty() {
        check(
            "bird",
            Verdict::Ok,
            format!(
                "BIRD answers; {} BGP sessions Established",
                bgp.sessions.len()
            ),
        )
    } else {
        check(
            "bird",
            Verdict::Warning,
            format!(
                "BIRD answers; not Established: {} (flockctl bgp)",
                down.join(", ")
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    const FLOCK: &str =
        r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"flock"}]}"#;
    const CALICO: &str = r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico"},{"type":"portmap"}]}"#;

    #[test]
    fn another_cnis_conflist_sorting_first_is_a_warning_naming_it() {
        let dir = dir_with(&[("01-flock.conflist", FLOCK), ("00-calico.conflist", CALICO)]);
        let c = cni_config(dir.path());
        assert_eq!(c.verdict, Verdict::Warning, "{c:?}");
        assert!(
            c.detail
                .starts_with("00-calico.conflist (calico, portmap) sorts before 01-flock.conflist"),
            "{c:?}"
        );
    }

    #[test]
    fn flock_first_is_fine_and_no_flock_conflist_is_a_problem() {
        let dir = dir_with(&[("01-flock.conflist", FLOCK), ("10-calico.conflist", CALICO)]);
        assert_eq!(cni_config(dir.path()).verdict, Verdict::Ok);
        let dir = dir_with(&[("10-calico.conflist", CALICO), ("notes.txt", "x")]);
        assert_eq!(cni_config(dir.path()).verdict, Verdict::Problem);
        assert_eq!(
            cni_config(Path::new("/nonexistent/cni")).verdict,
            Verdict::Warning
        );
    }
}
