//! `flockctl` against a real agent: a node with its BIRD peering with a
//! ToR's BIRD, two pods (one carrying an anycast IP), then faults planted
//! behind the agent's back for `ipam check` to find.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use flock_testkit::fabric::{self, Rack, until};

const FLOCKCTL: &str = env!("CARGO_BIN_EXE_flockctl");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;

fn sibling(name: &str) -> PathBuf {
    let path = Path::new(FLOCKCTL).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// The rack: a ToR and node-a, with their BIRDs.
fn rack() -> Rack {
    Rack::start(&sibling("flock-agent"), &sibling("flock"))
}

/// flockctl on node-a's admin socket.
trait Flockctl {
    fn flockctl(&self, args: &[&str]) -> Output;
}

impl Flockctl for Rack {
    fn flockctl(&self, args: &[&str]) -> Output {
        Command::new(FLOCKCTL)
            .arg("--socket")
            .arg(self.a.node.admin_socket())
            .args(args)
            .output()
            .expect("run flockctl")
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

/// The pod's host veth, from `flockctl -o json pods`.
fn veth_of(rack: &Rack, pod: &str) -> (String, String, String) {
    let pods = json(&rack.flockctl(&["-o", "json", "pods"]));
    let entry = pods["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["pod"] == pod)
        .unwrap_or_else(|| panic!("{pod} in {pods}"));
    let v4 = entry["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| a.contains('.'))
        .expect("an IPv4")
        .to_owned();
    (
        entry["containerId"].as_str().expect("id").to_owned(),
        entry["hostIface"].as_str().expect("veth").to_owned(),
        v4,
    )
}

#[test]
fn every_command_reports_the_real_node_and_ipam_check_names_planted_faults() {
    let rack = rack();
    let node = &rack.a.node;
    let web = node.add_pod(
        "web",
        &[("flock.fritzlab.net/anycast", "203.0.113.10")],
        CONF,
    );
    let db = node.add_pod("db", &[], CONF);

    // The socket is root's only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(node.admin_socket())
            .expect("admin socket")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    let status = until(
        "status shows the session up",
        Duration::from_secs(30),
        || {
            let out = rack.flockctl(&["status"]);
            let t = text(&out);
            (out.status.success() && t.contains("2 of 2 sessions up")).then_some(t)
        },
    );
    for want in [
        "node        node-a",
        "nodeconfig  node-a: 2001:db8:0:1::/64, 198.18.1.0/24, AS 65001",
        "ready       yes",
        "198.18.1.0/24",
        "2 allocations",
        "peer_198_19_1_254 up Established",
    ] {
        assert!(status.contains(want), "{want:?} in:\n{status}");
    }

    let out = rack.flockctl(&["pods"]);
    assert!(out.status.success(), "{}", text(&out));
    let pods = text(&out);
    let web_v4 = web.ip(true).to_string();
    let db_v4 = db.ip(true).to_string();
    assert!(
        pods.lines().any(|l| l.starts_with("default/web")
            && l.contains(&web_v4)
            && l.contains("203.0.113.10")
            && l.ends_with("committed")),
        "{pods}"
    );
    assert!(
        pods.lines()
            .any(|l| l.starts_with("default/db") && l.contains(&db_v4)),
        "{pods}"
    );
    let (db_id, db_veth, _) = veth_of(&rack, "db");
    let (web_id, web_veth, _) = veth_of(&rack, "web");

    let anycast = until("the anycast IP is routed", Duration::from_secs(10), || {
        let t = text(&rack.flockctl(&["anycast"]));
        t.lines()
            .any(|l| l.starts_with("203.0.113.10") && l.contains("yes"))
            .then_some(t)
    });
    assert!(
        anycast.contains(&format!("default/web via {web_veth}"))
            && anycast.contains("routed to 1 of 1"),
        "{anycast}"
    );

    let out = rack.flockctl(&["bgp"]);
    assert!(out.status.success(), "{}", text(&out));
    let bgp = text(&out);
    assert!(
        bgp.lines()
            .any(|l| l.starts_with("peer_198_19_1_254") && l.contains("Established")),
        "{bgp}"
    );
    assert!(
        bgp.contains("peer_198_19_1_254 announces ")
            && bgp
                .lines()
                .any(|l| l.starts_with("peer_198_19_1_254 announces")
                    && l.contains("198.18.1.0/24")
                    && l.contains("203.0.113.10/32")),
        "the node's prefix and the anycast IP: {bgp}"
    );
    let sessions = json(&rack.flockctl(&["-o", "json", "bgp"]));
    let exports = |s: &serde_json::Value| {
        s["exported"]
            .as_array()
            .is_some_and(|e| e.iter().any(|c| c[1].as_u64() > Some(0)))
    };
    assert!(
        sessions["bgp"]["sessions"]
            .as_array()
            .is_some_and(|all| all.len() == 2 && all.iter().all(exports)),
        "both sessions export the node's prefixes: {sessions}"
    );

    let out = rack.flockctl(&["ipam", "check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("2 store entries") && text(&out).contains("no problems"));

    // Faults behind the agent's back: db's veth deleted (its entry leaks),
    // a flock-named veth and a flock host route nobody owns (orphans), and
    // a pod of another node reporting web's address (a duplicate).
    node.node.ip(&["link", "del", &db_veth]);
    node.node.ip(&[
        "link",
        "add",
        "flock0000beef",
        "type",
        "veth",
        "peer",
        "name",
        "orphanpeer",
    ]);
    node.node.ip(&["link", "set", "flock0000beef", "up"]);
    node.node.ip(&[
        "route",
        "add",
        "198.18.1.250/32",
        "dev",
        "flock0000beef",
        "proto",
        "97",
    ]);
    node.put_manifest(
        "impostor",
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: impostor, namespace: other, uid: impostor-uid}}\nspec:\n  nodeName: node-b\n  containers: [{{name: c, image: 'busybox:1'}}]\nstatus:\n  podIPs: [{{ip: '{web_v4}'}}]\n"
        ),
    );
    let report = until(
        "ipam check sees every fault",
        Duration::from_secs(10),
        || {
            let out = rack.flockctl(&["ipam", "check"]);
            let t = text(&out);
            (out.status.code() == Some(1) && t.contains("impostor")).then_some(t)
        },
    );
    let line_with = |kind: &str, parts: &[&str]| {
        assert!(
            report
                .lines()
                .any(|l| l.starts_with(kind) && parts.iter().all(|p| l.contains(p))),
            "{kind} {parts:?} in:\n{report}"
        );
    };
    line_with("leaked", &[&db_id, &db_veth, &db_v4]);
    line_with("orphaned", &["flock0000beef", "has no store entry"]);
    line_with("orphaned", &["198.18.1.250", "flock0000beef"]);
    line_with(
        "duplicate",
        &[&web_id, &web_veth, &web_v4, "other/impostor", "node-b"],
    );
    assert_eq!(report.matches('\n').count(), 2 + 4, "{report}");

    let as_json = json(&rack.flockctl(&["-o", "json", "ipam", "check"]));
    let kinds: Vec<&str> = as_json["ipamCheck"]["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p["kind"].as_str())
        .collect();
    assert_eq!(
        kinds,
        ["leaked", "orphaned", "orphaned", "duplicate"],
        "{as_json}"
    );

    // A peer that never answers: its session is down, the others are
    // still shown with what they announce, and `bgp` is not a failure.
    let spec = fabric::node_spec(1, 65001) + "\n    - {address: 198.19.1.253, asn: 65010}";
    node.put_manifest(
        "nodeconfig",
        &flock_testkit::agent::node_config_for("node-a", &spec, ""),
    );
    let bgp = until("three sessions, one down", Duration::from_secs(20), || {
        let out = rack.flockctl(&["bgp"]);
        let t = text(&out);
        (out.status.code() == Some(0) && t.contains("peer_198_19_1_253")).then_some(t)
    });
    assert!(
        bgp.lines()
            .any(|l| l.starts_with("peer_198_19_1_253") && !l.contains("Established")),
        "{bgp}"
    );
    assert!(
        bgp.contains("peer_198_19_1_254 announces ")
            && !bgp.contains("peer_198_19_1_253 announces"),
        "{bgp}"
    );
    let status = text(&rack.flockctl(&["status"]));
    assert!(status.contains("2 of 3 sessions up"), "{status}");
}

#[test]
fn usage_errors_exit_2_an_absent_agent_3_and_help_reads_like_a_man_page() {
    let out = Command::new(FLOCKCTL)
        .args(["--socket", "/nonexistent/admin.sock", "status"])
        .output()
        .expect("flockctl");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("/nonexistent/admin.sock"),
        "names the socket: {}",
        text(&out)
    );

    let out = Command::new(FLOCKCTL)
        .arg("frobnicate")
        .output()
        .expect("flockctl");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    let out = Command::new(FLOCKCTL)
        .arg("--help")
        .output()
        .expect("flockctl");
    assert!(out.status.success());
    let help = text(&out);
    for section in [
        "DESCRIPTION",
        "EXIT STATUS",
        "FILES",
        "EXAMPLES",
        "ipam",
        "anycast",
    ] {
        assert!(help.contains(section), "{section} in:\n{help}");
    }
    let out = Command::new(FLOCKCTL)
        .args(["ipam", "check", "--help"])
        .output()
        .expect("flockctl");
    assert!(text(&out).contains("Leaked: a store entry whose veth or pod sandbox is gone"));
}

/// The doctor's line for `check`, from `flockctl doctor`.
fn verdict_of(report: &str, check: &str) -> String {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(check.split(' ').next().unwrap_or(check)))
        .unwrap_or_else(|| panic!("{check} in:\n{report}"))
        .to_owned()
}

#[test]
fn doctor_passes_a_healthy_node_and_names_each_planted_fault() {
    let mut rack = rack();
    let node = &rack.a.node;
    let pod = node.add_pod("web", &[], CONF);
    let (_, veth, _) = veth_of(&rack, "web");

    let healthy = until("every check passes", Duration::from_secs(30), || {
        let out = rack.flockctl(&["doctor"]);
        let t = text(&out);
        (out.status.code() == Some(0)).then_some(t)
    });
    for check in ["sysctls", "blackholes", "nftables", "cni", "mtu", "bird"] {
        assert!(
            verdict_of(&healthy, check).starts_with("ok"),
            "{check}:\n{healthy}"
        );
    }
    assert!(healthy.contains("all checks passed"), "{healthy}");

    // Faults, each as an operator or another program would leave it.
    node.node
        .ip(&["route", "del", "blackhole", "198.18.1.0/24"]);
    node.node.ip(&["link", "set", &veth, "mtu", "1300"]);
    let sysctl = |kv: &str| {
        let out = Command::new("ip")
            .args(["netns", "exec", node.node.name(), "sysctl", "-qw", kv])
            .output()
            .expect("sysctl");
        assert!(out.status.success(), "{kv}: {}", text(&out));
    };
    sysctl("net.ipv4.fib_multipath_hash_policy=0");
    // The loop heals the table every 30 s: deleted again until doctor has
    // looked while it was gone.
    let delete_table = || {
        Command::new("ip")
            .args(["netns", "exec", node.node.name()])
            .args(["nft", "delete", "table", "inet", "flock"])
            .output()
            .expect("nft")
    };
    let nft = delete_table();
    assert!(nft.status.success(), "{}", text(&nft));
    std::fs::write(
        node.cni_conf_dir().join("00-calico.conflist"),
        r#"{"name":"k8s-pod-network","cniVersion":"0.3.1","plugins":[{"type":"calico"}]}"#,
    )
    .expect("conflist");
    drop(rack.a.bird.take());

    let report = until("doctor sees the faults", Duration::from_secs(20), || {
        let out = rack.flockctl(&["doctor"]);
        let t = text(&out);
        let gone = t.contains("is gone");
        if !gone {
            let _ = delete_table();
        }
        (out.status.code() == Some(1) && gone).then_some(t)
    });
    let line = |check: &str| verdict_of(&report, check);
    assert!(
        line("sysctls").starts_with("WARNING")
            && line("sysctls").contains("net.ipv4.fib_multipath_hash_policy=0"),
        "{report}"
    );
    assert!(
        line("blackholes").starts_with("PROBLEM") && line("blackholes").contains("198.18.1.0/24"),
        "{report}"
    );
    assert!(
        line("nftables").starts_with("PROBLEM") && line("nftables").contains("is gone"),
        "{report}"
    );
    assert!(
        line("cni").starts_with("WARNING")
            && line("cni").contains("00-calico.conflist (calico) sorts before 01-flock.conflist"),
        "{report}"
    );
    assert!(
        line("mtu").starts_with("PROBLEM")
            && line("mtu").contains(&format!("{veth} of default/web: MTU 1300, set to")),
        "{report}"
    );
    assert!(
        line("bird").starts_with("PROBLEM") && line("bird").contains("not reachable"),
        "{report}"
    );

    // Forwarding off is a problem of its own.
    sysctl("net.ipv4.ip_forward=0");
    let report = text(&rack.flockctl(&["doctor"]));
    assert!(
        verdict_of(&report, "sysctls").starts_with("PROBLEM")
            && report.contains("net.ipv4.ip_forward=0"),
        "{report}"
    );
    let as_json = json(&rack.flockctl(&["-o", "json", "doctor"]));
    assert!(
        as_json["doctor"].as_array().is_some_and(|c| c
            .iter()
            .any(|c| c["check"] == "nftables" && c["verdict"] == "problem")),
        "{as_json}"
    );
    drop(pod);
}

fn remote_pod(name: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  uid: uid-{name}\n  labels: {{app: {app}}}\nspec:\n  nodeName: node-b\n  containers: [{{name: c, image: 'busybox:1'}}]\nstatus:\n  podIPs: [{{ip: '{ip}'}}]\n  conditions: [{{type: Ready, status: 'True'}}]\n"
    )
}

const DB_POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 5432}]
  - from: [{ipBlock: {cidr: 192.0.2.0/24}}]
";

#[test]
fn policy_explain_names_the_deciding_rule_for_any_pair_and_agrees_with_the_kernel() {
    flock_testkit::require_root();
    let node = flock_testkit::agent::AgentNode::start(
        &sibling("flock-agent"),
        &sibling("flock"),
        &flock_testkit::agent::default_node_config(),
    );
    let web = node.add_pod("web", &[], CONF);
    let db = node.add_pod("db", &[], CONF);
    node.put_manifest("remote-web", &remote_pod("remote-web", "web", "198.18.2.5"));
    node.put_manifest("remote-db", &remote_pod("remote-db", "db", "198.18.2.6"));
    node.put_manifest("policy", DB_POLICY);
    let flockctl = |args: &[&str]| {
        Command::new(FLOCKCTL)
            .arg("--socket")
            .arg(node.admin_socket())
            .args(args)
            .output()
            .expect("flockctl")
    };
    let explain = |src: &str, dst: &str, port: &str| {
        let out = flockctl(&["policy", "explain", src, dst, port]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        text(&out)
    };

    // Local to local: what the kernel does is what explain says.
    let db_ip = db.ip(true);
    let listeners = [
        flock_testkit::tcp_listen(&db.ns.netns(), 5432),
        flock_testkit::tcp_listen(&db.ns.netns(), 22),
    ];
    let connects = |port: u16| {
        flock_testkit::tcp_connects(
            &web.ns.netns(),
            std::net::SocketAddr::new(db_ip, port),
            Duration::from_millis(300),
        )
    };
    until("the policy is enforced", Duration::from_secs(10), || {
        (!connects(22)).then(String::new)
    });
    assert!(connects(5432), "web reaches db:5432");
    let allowed = explain("default/web", "default/db", "5432");
    assert!(
        allowed.starts_with(&format!(
            "default/web ({}, on node-a) → default/db ({db_ip}, on node-a) 5432/TCP: ALLOWED",
            web.ip(true)
        )),
        "{allowed}"
    );
    assert!(
        allowed.contains(
            "ingress allowed by default/db-from-web spec.ingress[0] from[0] (enforced on node-a)"
        ),
        "{allowed}"
    );
    assert!(
        allowed.contains("egress  default/web is not isolated for egress: allowed"),
        "{allowed}"
    );
    let denied = explain("default/web", "default/db", "22/tcp");
    assert!(denied.contains(": DENIED"), "{denied}");
    assert!(
        denied.contains("denied: default/db is isolated for ingress by default/db-from-web and no rule admits the source on 22/tcp (enforced on node-a)"),
        "{denied}"
    );
    drop(listeners);

    // A pair on another node, and an outside address through the ipBlock.
    until("the remote pods are known", Duration::from_secs(10), || {
        let out = flockctl(&[
            "policy",
            "explain",
            "default/remote-web",
            "default/remote-db",
            "5432",
        ]);
        (out.status.code() == Some(0)).then(String::new)
    });
    let remote = explain("default/remote-web", "default/remote-db", "5432");
    assert!(
        remote.contains("ALLOWED") && remote.contains("(enforced on node-b)"),
        "{remote}"
    );
    let remote = explain("default/remote-web", "198.18.2.6", "80/udp");
    assert!(
        remote.contains("DENIED") && remote.contains("80/udp"),
        "{remote}"
    );
    let outside = explain("192.0.2.7", "default/remote-db", "9999");
    assert!(
        outside.contains("192.0.2.7 (no pod)")
            && outside.contains("not a pod: no NetworkPolicy applies")
            && outside.contains("allowed by default/db-from-web spec.ingress[1] ipBlock from[0]"),
        "{outside}"
    );
    let as_json = json(&flockctl(&[
        "-o",
        "json",
        "policy",
        "explain",
        "default/web",
        "default/db",
        "22",
    ]));
    assert_eq!(as_json["policyExplain"]["allowed"], false, "{as_json}");
    assert_eq!(
        as_json["policyExplain"]["ingress"]["isolatedBy"][0], "default/db-from-web",
        "{as_json}"
    );

    // Unknown pods and bad ports are named.
    let out = flockctl(&["policy", "explain", "default/nope", "default/db", "80"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("source default/nope"), "{}", text(&out));
    let out = flockctl(&["policy", "explain", "default/web", "default/db", "99999"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}
