//! The Kubernetes manifests and the Dockerfile against the code: binary
//! names, flags, paths and ports must be the ones the binaries use; RBAC
//! grants exactly what the agent needs; the examples parse.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Volume};
use k8s_openapi::api::rbac::v1::ClusterRole;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn docs(rel: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(&read(rel))
        .map(|d| serde::Deserialize::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

fn daemonset() -> DaemonSet {
    let all = docs("deploy/daemonset.yaml");
    serde_json::from_value(all[0].clone()).expect("deploy/daemonset.yaml is a DaemonSet")
}

fn container<'a>(list: &'a [Container], name: &str) -> &'a Container {
    list.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("container {name}"))
}

/// The host path behind the volume mounted at a path that `path` is under.
/// The volume (and the path inside it) that holds `path` in container `c`.
fn volume_of(c: &Container, path: &str) -> (String, String) {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("{}: nothing mounted over {path}", c.name));
    let rest = Path::new(path)
        .strip_prefix(&mount.mount_path)
        .expect("under the mount");
    (mount.name.clone(), rest.display().to_string())
}

fn host_path(c: &Container, volumes: &[Volume], path: &str) -> String {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| Path::new(path).starts_with(&m.mount_path))
        .max_by_key(|m| m.mount_path.len())
        .unwrap_or_else(|| panic!("{}: nothing mounted over {path}", c.name));
    let volume = volumes
        .iter()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("volume {}", mount.name));
    let host = volume
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("volume {} is not a hostPath", mount.name));
    let rest = Path::new(path)
        .strip_prefix(&mount.mount_path)
        .expect("under the mount");
    if rest.as_os_str().is_empty() {
        return host.path.clone();
    }
    Path::new(&host.path).join(rest).display().to_string()
}

#[test]
fn the_daemonset_uses_the_binaries_flags_paths_and_ports_of_the_code() {
    let ds = daemonset();
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    let volumes = pod.volumes.clone().expect("volumes");
    let dockerfile = read("Dockerfile");
    assert_eq!(pod.host_network, Some(true));
    // Node by node: only where the operator handed the node to flock.
    assert_eq!(
        pod.node_selector
            .as_ref()
            .and_then(|s| s.get("flock.fritzlab.net/enabled"))
            .map(String::as_str),
        Some("true")
    );

    // The agent: its flags parse with the agent's own command line.
    let agent = container(&pod.containers, "agent");
    let command = agent.command.clone().expect("agent command");
    assert_eq!(command[0], "/usr/local/bin/flock-agent");
    assert!(dockerfile.contains("/out/flock-agent /usr/local/bin/flock-agent"));
    let mut argv = command.clone();
    argv.extend(["--node".to_owned(), "n".to_owned()]);
    let cli = flock_agent::cli::Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("the DaemonSet's agent flags: {e}"));
    let node_env = agent
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(node_env.as_deref(), Some("spec.nodeName"));
    assert_eq!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    // Probes on the metrics port, on the paths the agent serves.
    let port = cli.metrics_addr.port();
    for (probe, path) in [
        (agent.liveness_probe.as_ref(), "/healthz"),
        (agent.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|p| p.http_get.as_ref())
            .expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(port))
        );
    }
    assert!(read("crates/flock-agent/src/health.rs").contains("\"/readyz\""));
    // The plugin finds the agent's socket on the host where the conflist says.
    let socket_on_host = host_path(agent, &volumes, &cli.socket.display().to_string());
    let install = pod
        .init_containers
        .as_deref()
        .map(|cs| container(cs, "install-cni"))
        .expect("install-cni init container");
    let install_cmd = install.command.clone().expect("install command");
    assert_eq!(install_cmd[0], "/usr/local/bin/flock-install");
    assert!(dockerfile.contains("/out/flock-install /usr/local/bin/flock-install"));
    let icli = flock_installer::cli::Cli::try_parse_from(&install_cmd)
        .unwrap_or_else(|e| panic!("the DaemonSet's install-cni flags: {e}"));
    assert_eq!(
        icli.agent_socket, socket_on_host,
        "conflist agentSocket vs the agent's socket on the host"
    );
    assert_eq!(
        icli.agent_socket, "/run/flock/flock.sock",
        "the plugin's default socket"
    );
    assert_eq!(
        host_path(install, &volumes, &icli.cni_bin_dir.display().to_string()),
        "/opt/cni/bin"
    );
    assert_eq!(
        host_path(install, &volumes, &icli.cni_conf_dir.display().to_string()),
        "/etc/cni/net.d"
    );
    assert!(dockerfile.contains(&format!("/out/flock {}", icli.plugin.display())));
    // `flockctl doctor` reads the directory the installer writes, and
    // flockctl is in the image; the admin socket is beside the plugin's.
    assert_eq!(
        host_path(agent, &volumes, &cli.cni_conf_dir.display().to_string()),
        "/etc/cni/net.d"
    );
    assert!(dockerfile.contains("/out/flockctl /usr/local/bin/flockctl"));
    assert_eq!(
        cli.admin_socket().display().to_string(),
        flock_proto::admin::DEFAULT_ADMIN_SOCKET
    );

    // BIRD: the same config file and control socket as the agent, through
    // the same host directories; graceful restart recovery; NET_ADMIN and
    // NET_RAW added, not privileged.
    let bird = container(&pod.containers, "bird");
    let script = bird.command.clone().expect("bird command").join(" ");
    let config = cli.bird_config.display().to_string();
    let bird_socket = cli.bird_socket.display().to_string();
    assert!(
        script.contains(&format!("bird -f -R -c {config} -s {bird_socket}")),
        "{script}"
    );
    assert_eq!(
        host_path(bird, &volumes, &config),
        host_path(agent, &volumes, &config)
    );
    assert_eq!(
        volume_of(bird, &bird_socket),
        volume_of(agent, &bird_socket),
        "BIRD's control socket in one volume the two share"
    );
    assert!(
        bird_socket.starts_with("/run/flock-bird/"),
        "{bird_socket}: not the plugin's /run/flock"
    );
    let bird_volumes: Vec<&str> = bird
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect();
    assert!(
        !bird_volumes.contains(&"run-flock"),
        "BIRD does not get the plugin's /run/flock: {bird_volumes:?}"
    );
    let sc = bird
        .security_context
        .as_ref()
        .expect("bird securityContext");
    assert_ne!(sc.privileged, Some(true));
    let added = sc
        .capabilities
        .as_ref()
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert_eq!(added, ["NET_ADMIN", "NET_RAW"]);
    // The bootstrap config BIRD starts with parses.
    let bootstrap = docs("deploy/bird-bootstrap.yaml");
    let text = bootstrap[0]["data"]["bird.conf"]
        .as_str()
        .expect("bird.conf in the ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("bird.conf"), text).expect("write");
    let out = std::process::Command::new("bird")
        .args(["-p", "-c"])
        .arg(dir.path().join("bird.conf"))
        .output()
        .expect("bird -p (apt-get install bird2)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(script.contains("/etc/flock/bootstrap/bird.conf"));
    // Scheduled on not-ready and network-unavailable nodes.
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/network-unavailable",
    ] {
        assert!(
            tolerations
                .iter()
                .any(|t| t.operator.as_deref() == Some("Exists")
                    && (t.key.as_deref() == Some(key) || t.key.is_none())),
            "{key} not tolerated"
        );
    }
    // The image has what the agent and BIRD run.
    for pkg in ["iproute2", "bird2", "nftables"] {
        assert!(dockerfile.contains(pkg), "Dockerfile lacks {pkg}");
    }
}

#[test]
fn rbac_grants_exactly_what_the_agent_uses() {
    let all = docs("deploy/rbac.yaml");
    let role: ClusterRole = all
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .map(|d| serde_json::from_value(d.clone()).expect("ClusterRole"))
        .expect("a ClusterRole");
    let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for rule in role.rules.iter().flatten() {
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                let mut verbs = rule.verbs.clone();
                verbs.sort();
                got.insert(format!("{group}/{resource}"), verbs);
            }
        }
    }
    let read_only = vec!["get".to_owned(), "list".to_owned(), "watch".to_owned()];
    let want: BTreeMap<String, Vec<String>> = BTreeMap::from([
        ("/pods".to_owned(), read_only.clone()),
        ("/namespaces".to_owned(), read_only.clone()),
        (
            "networking.k8s.io/networkpolicies".to_owned(),
            read_only.clone(),
        ),
        (
            "flock.fritzlab.net/nodeconfigs".to_owned(),
            read_only.clone(),
        ),
        (
            "flock.fritzlab.net/addresspools".to_owned(),
            read_only.clone(),
        ),
        // BGPPeers select nodes by label: the agent reads its own Node.
        ("flock.fritzlab.net/bgppeers".to_owned(), read_only.clone()),
        ("/nodes".to_owned(), read_only),
        (
            "flock.fritzlab.net/nodeconfigs/status".to_owned(),
            vec!["patch".to_owned()],
        ),
        (
            "flock.fritzlab.net/addresspools/status".to_owned(),
            vec!["patch".to_owned()],
        ),
        // Read first, so a refresh keeps the condition's lastTransitionTime.
        (
            "/nodes/status".to_owned(),
            vec!["get".to_owned(), "patch".to_owned()],
        ),
        // Events on pods whose ADD failed; a repeat is a patch.
        (
            "events.k8s.io/events".to_owned(),
            vec!["create".to_owned(), "patch".to_owned()],
        ),
    ]);
    assert_eq!(got, want);
    // Of Secrets, one: the session passwords, by name, get and watch only.
    let secrets: Vec<&serde_json::Value> = all.iter().filter(|d| d["kind"] == "Role").collect();
    assert_eq!(secrets.len(), 1);
    assert_eq!(secrets[0]["metadata"]["namespace"], "kube-system");
    assert_eq!(
        secrets[0]["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["secrets"],
            "resourceNames": [flock_model::PASSWORD_SECRET], "verbs": ["get", "watch"]}])
    );
    let binding = all
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .expect("binding");
    let sa = all
        .iter()
        .find(|d| d["kind"] == "ServiceAccount")
        .expect("service account");
    assert_eq!(binding["subjects"][0]["name"], sa["metadata"]["name"]);
    let ds = daemonset();
    assert_eq!(
        ds.spec
            .and_then(|s| s.template.spec)
            .and_then(|p| p.service_account_name),
        sa["metadata"]["name"].as_str().map(str::to_owned)
    );
}

#[test]
fn the_examples_are_valid() {
    let mut peers = 0;
    for doc in docs("deploy/examples/bgppeers.yaml") {
        if doc["kind"] == "BGPPeer" {
            let peer: flock_model::BgpPeer = serde_json::from_value(doc).expect("BGPPeer");
            peer.validated()
                .unwrap_or_else(|e| panic!("example BGPPeer: {e}"));
            peers += 1;
        } else {
            assert_eq!(doc["metadata"]["name"], flock_model::PASSWORD_SECRET);
        }
    }
    assert_eq!(peers, 2);
    for nc in docs("deploy/examples/nodeconfig.yaml") {
        let nc: flock_model::NodeConfig = serde_json::from_value(nc).expect("NodeConfig");
        nc.settings()
            .unwrap_or_else(|e| panic!("example NodeConfig: {e}"));
    }
    // Every claim in the example pods has an example pool's consent.
    let pools: Vec<flock_model::AddressPool> = docs("deploy/examples/addresspools.yaml")
        .into_iter()
        .map(|d| serde_json::from_value(d).expect("AddressPool"))
        .collect();
    let prefixes = docs("deploy/examples/nodeconfig.yaml")
        .into_iter()
        .filter_map(|d| {
            serde_json::from_value::<flock_model::NodeConfig>(d)
                .ok()?
                .settings()
                .ok()
        })
        .flat_map(|s| {
            let node = s.node.clone();
            s.cidr6
                .map(ipnet::IpNet::V6)
                .into_iter()
                .chain(s.cidr4.map(ipnet::IpNet::V4))
                .map(move |p| (node.clone(), p))
        })
        .collect();
    let consent = flock_agent::claims::Consent::build(&pools, prefixes);
    assert!(consent.refused.is_empty(), "{:?}", consent.refused);
    let labels = BTreeMap::from([(
        "kubernetes.io/metadata.name".to_owned(),
        "default".to_owned(),
    )]);
    let empty = Default::default();
    let ctx = flock_agent::claims::Context {
        namespace_labels: &labels,
        held_prefixes: &[],
        unicast: &empty,
        claims: &Default::default(),
    };
    let mut policies = 0;
    let mut claims = 0;
    for doc in docs("deploy/examples/pods.yaml") {
        let annotations: BTreeMap<String, String> = serde_json::from_value(
            doc.pointer("/spec/template/metadata/annotations")
                .or_else(|| doc.pointer("/metadata/annotations"))
                .cloned()
                .unwrap_or_default(),
        )
        .unwrap_or_default();
        let (intent, _) =
            flock_model::parse_pod_annotations("example", &annotations, Default::default())
                .unwrap_or_else(|e| panic!("example annotations {annotations:?}: {e}"));
        let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "example", "namespace": "default", "annotations": annotations},
        }))
        .expect("pod");
        let pod = flock_datastore::PodInfo::from_pod(&pod);
        let wanted = intent
            .anycast
            .iter()
            .map(|ip| (*ip, flock_model::PoolUse::Anycast))
            .chain(
                intent
                    .addresses
                    .iter()
                    .map(|ip| (*ip, flock_model::PoolUse::Addresses)),
            );
        for (ip, usage) in wanted {
            claims += 1;
            flock_agent::claims::judge(&consent, &pod, usage, ip, &ctx)
                .unwrap_or_else(|e| panic!("example claim {ip}: {e}"));
        }
        if doc["kind"] == "NetworkPolicy" {
            let _: k8s_openapi::api::networking::v1::NetworkPolicy =
                serde_json::from_value(doc).expect("NetworkPolicy");
            policies += 1;
        }
    }
    assert_eq!(policies, 1);
    assert_eq!(claims, 3, "the examples claim anycast and addresses IPs");
}

/// The sample names the agent's `/metrics` carries: counters with
/// `_total`, histograms with `_bucket`, `_count` and `_sum`.
fn exported_metrics() -> std::collections::BTreeSet<String> {
    use flock_agent::metrics::{
        FamilyLabels, KindLabels, Metrics, RelistLabels, ResultLabels, SessionLabels,
    };
    // A family shows in the text once it has a series: one of each.
    let m = Metrics::new();
    m.observe_rpc("ADD", "ok", std::time::Duration::from_millis(1));
    let family = FamilyLabels {
        family: "ipv4".into(),
    };
    m.pool_in_use.get_or_create(&family).set(1);
    m.pool_capacity.get_or_create(&family).set(1);
    let kind = KindLabels { kind: "x".into() };
    m.reconciles.get_or_create(&kind).inc();
    m.errors.get_or_create(&kind).inc();
    m.datastore_lists.get_or_create(&kind).inc();
    m.datastore_relists
        .get_or_create(&RelistLabels {
            kind: "pods".into(),
            reason: "gone".into(),
        })
        .inc();
    m.bird_reloads
        .get_or_create(&ResultLabels {
            result: "ok".into(),
        })
        .inc();
    m.bgp_session_up
        .get_or_create(&SessionLabels {
            session: "peer_x".into(),
        })
        .set(1);
    let text = m.encode();
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_count", "_sum"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Every `flock_…` name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("flock_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `flock_…` preceded by a word character is part of another name.
        let before = rest[..at].chars().next_back();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

#[test]
fn the_dashboard_and_the_alerts_use_only_metrics_the_agent_exports() {
    let exported = exported_metrics();
    assert!(exported.contains("flock_bgp_session_up"), "{exported:?}");

    let rules = docs("deploy/monitoring/flock-alerts.yaml");
    let groups = rules[0]["groups"].as_array().expect("groups");
    let mut alerts = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for rule in groups
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
    {
        let alert = rule["alert"].as_str().expect("alert name");
        let expr = rule["expr"].as_str().expect("expr");
        assert!(
            rule["annotations"]["summary"].is_string(),
            "{alert} has a summary"
        );
        used.extend(metric_names(expr));
        alerts.push(alert.to_owned());
    }
    // What the issue asks to be alerted on.
    for want in [
        "FlockPoolNearlyExhausted",
        "FlockBgpSessionDown",
        "FlockPolicyLoadFailing",
        "FlockBirdReloadFailing",
        "FlockRpcErrors",
    ] {
        assert!(alerts.iter().any(|a| a == want), "{want} in {alerts:?}");
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/monitoring/flock-dashboard.json"))
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{} has queries", panel["title"]);
        for t in targets {
            used.extend(metric_names(t["expr"].as_str().expect("expr")));
        }
    }
    used.extend(metric_names(dashboard["templating"].to_string().as_str()));
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "not exported by the agent: {unknown:?} (exported: {exported:?})"
    );
    assert!(used.len() >= 10, "{used:?}");
}
