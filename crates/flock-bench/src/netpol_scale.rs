//! NetworkPolicy at scale, in one run: a cluster of 10,000 realistic pods
//! (100 namespaces; metadata with owner references and labels, two
//! containers with ports, status with conditions and podIPs — about 2 KB
//! of JSON each) and 1,000 policies, 100 of the pods on the measured node.
//! Two nodes side by side, the same pods on both, the policies on one:
//! ADD of a pod the policies select, against ADD with no policies, in
//! alternating slices; a policy change at that scale until it is enforced;
//! the agent's RSS.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flock_testkit::agent::{AgentNode, NODE, node_config, pod_uid};
use flock_testkit::{NetnsGuard, tcp_connects, tcp_listen};

use crate::measure::{Summary, ms};

const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
pub(crate) const NAMESPACES: usize = 100;
pub(crate) const PER_NS: usize = 100;
const ADD_BUDGET: f64 = 1.5;
const CHANGE_BUDGET: Duration = Duration::from_millis(100);
const RSS_BUDGET_MB: f64 = 60.0;

/// One pod as the API serves it (about 2 KB).
pub(crate) fn pod_json(ns: &str, name: &str, app: usize, k: u32, node: &str) -> String {
    let tier = if k.is_multiple_of(2) {
        "frontend"
    } else {
        "backend"
    };
    let v4 = format!("10.{}.{}.{}", (k >> 16) & 255, (k >> 8) & 255, k & 255);
    let v6 = format!("fd10::{:x}", k);
    format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"{ns}","uid":"{uid}","resourceVersion":"{k}","creationTimestamp":"2026-11-20T10:00:00Z","generateName":"app-{app}-5d4f8b9c7-","labels":{{"app":"app-{app}","tier":"{tier}","pod-template-hash":"5d4f8b9c7","app.kubernetes.io/part-of":"shop"}},"ownerReferences":[{{"apiVersion":"apps/v1","kind":"ReplicaSet","name":"app-{app}-5d4f8b9c7","uid":"{k:08x}-rs00-4bbb-8ccc-000000000000","controller":true,"blockOwnerDeletion":true}}]}},"spec":{{"nodeName":"{node}","serviceAccountName":"default","containers":[{{"name":"main","image":"registry.example/shop/app-{app}:1.4.2","ports":[{{"name":"http","containerPort":8080,"protocol":"TCP"}},{{"name":"metrics","containerPort":9090,"protocol":"TCP"}}],"resources":{{"requests":{{"cpu":"100m","memory":"128Mi"}}}}}},{{"name":"sidecar","image":"registry.example/mesh/proxy:2.1.0","ports":[{{"name":"admin","containerPort":15000,"protocol":"TCP"}}]}}],"restartPolicy":"Always","terminationGracePeriodSeconds":30}},"status":{{"phase":"Running","conditions":[{{"type":"Initialized","status":"True","lastTransitionTime":"2026-11-20T10:00:01Z"}},{{"type":"Ready","status":"True","lastTransitionTime":"2026-11-20T10:00:05Z"}},{{"type":"ContainersReady","status":"True","lastTransitionTime":"2026-11-20T10:00:05Z"}},{{"type":"PodScheduled","status":"True","lastTransitionTime":"2026-11-20T10:00:00Z"}}],"hostIP":"198.19.0.{}","podIP":"{v4}","podIPs":[{{"ip":"{v4}"}},{{"ip":"{v6}"}}],"startTime":"2026-11-20T10:00:00Z"}}}}"#,
        k % 250 + 1,
        uid = pod_uid(ns, name)
    )
}

/// Ten policies per namespace: pod and namespace selectors, an ipBlock,
/// named and numeric ports, both directions.
pub(crate) fn policies_json(ns: &str) -> String {
    let mut out = String::new();
    for p in 0..10 {
        let q = (p + 1) % 10;
        let _ = writeln!(
            out,
            r#"{{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{{"name":"pol-{p}","namespace":"{ns}"}},"spec":{{"podSelector":{{"matchLabels":{{"app":"app-{p}"}}}},"policyTypes":["Ingress","Egress"],"ingress":[{{"from":[{{"podSelector":{{"matchLabels":{{"tier":"frontend"}}}}}},{{"namespaceSelector":{{"matchLabels":{{"team":"team-{p}"}}}},"podSelector":{{"matchExpressions":[{{"key":"app","operator":"In","values":["app-{p}","app-{q}"]}}]}}}}],"ports":[{{"port":80}},{{"port":443}},{{"port":"http"}}]}},{{"from":[{{"ipBlock":{{"cidr":"192.168.0.0/16","except":["192.168.1.0/24"]}}}}]}}],"egress":[{{"to":[{{"podSelector":{{"matchLabels":{{"app":"app-{q}"}}}}}}],"ports":[{{"port":"http"}},{{"protocol":"UDP","port":53}}]}}]}}}}"#
        );
    }
    out
}

/// The node of the `j`th pod of a namespace (`k`th of the cluster): one
/// pod per namespace is this node's, 100 of the 10,000; the rest spread
/// over 97 others.
pub(crate) fn pod_node(j: usize, k: u32) -> String {
    if j == 0 {
        NODE.to_owned()
    } else {
        format!("node-{}", k % 97)
    }
}

/// Writes the cluster's manifests (one file per namespace) into `dir`.
fn write_cluster(dir: &Path, with_policies: bool) -> anyhow::Result<()> {
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n:03}");
        let mut text = format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"{ns}\",\"labels\":{{\"kubernetes.io/metadata.name\":\"{ns}\",\"team\":\"team-{}\"}}}}}}\n",
            n % 10
        );
        for j in 0..PER_NS {
            let k = (n * PER_NS + j) as u32;
            text += &pod_json(&ns, &format!("pod-{j}"), j % 10, k, &pod_node(j, k));
            text.push('\n');
        }
        if with_policies {
            text += &policies_json(&ns);
        }
        // A directory of manifests takes one JSON document per line as YAML.
        let yaml = text.lines().collect::<Vec<_>>().join("\n---\n");
        std::fs::write(dir.join(format!("{ns}.yaml")), yaml)?;
    }
    Ok(())
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A node with the synthetic cluster, its 100 local pods added.
fn node(with_policies: bool) -> anyhow::Result<(AgentNode, Vec<NetnsGuard>)> {
    let exe = std::env::current_exe()?;
    let mut node = AgentNode::prepare(
        &exe.with_file_name("flock-agent"),
        &exe.with_file_name("flock"),
        NODE,
        &node_config(
            "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/16\n  mtu: 1500",
            "",
        ),
    );
    write_cluster(&node.manifests(), with_policies)?;
    node.spawn();
    let mut netns = Vec::new();
    for n in 0..NAMESPACES {
        let ns = NetnsGuard::new("sp");
        let out = node.cni_in(
            &format!("ns-{n:03}"),
            "ADD",
            &format!("local{n:03}"),
            Some(&ns.path()),
            "pod-0",
            CONF,
        );
        if !out.status.success() {
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            bail!(
                "ADD of a local pod: {}\nthe agent's log ends:\n{}",
                String::from_utf8_lossy(&out.stdout),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        netns.push(ns);
    }
    Ok((node, netns))
}

/// ADD (timed) and DEL of pod `name` in ns-000, which pol-0 selects.
fn add_del(node: &AgentNode, name: &str, id: &str) -> anyhow::Result<Duration> {
    let ns = NetnsGuard::new("sa");
    let start = Instant::now();
    let out = node.cni_in("ns-000", "ADD", id, Some(&ns.path()), name, CONF);
    let took = start.elapsed();
    if !out.status.success() {
        bail!("ADD {name}: {}", String::from_utf8_lossy(&out.stdout));
    }
    let out = node.cni_in("ns-000", "DEL", id, Some(&ns.path()), name, CONF);
    if !out.status.success() {
        bail!("DEL {name}");
    }
    Ok(took)
}

/// Runs the scale part: `adds` ADDs on each node, `flips` policy changes.
pub fn run(adds: usize, flips: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let (with, _with_ns) = node(true).context("the node with policies")?;
    let ready_with = started.elapsed();
    let (without, _without_ns) = node(false).context("the node without policies")?;
    println!(
        "netpol scale: {} pods in {NAMESPACES} namespaces, {} policies, 100 pods on the node; set up in {:.1} s (the node with policies ready after {:.1} s)",
        NAMESPACES * PER_NS,
        NAMESPACES * 10,
        started.elapsed().as_secs_f64(),
        ready_with.as_secs_f64()
    );
    // Pods to ADD: app-0 (selected by pol-0) in ns-000, on this node.
    let mut extra = String::new();
    for i in 0..adds {
        extra += &pod_json("ns-000", &format!("new-{i}"), 0, 900_000 + i as u32, NODE);
        extra += "\n---\n";
    }
    with.put_manifest("new-pods", &extra);
    without.put_manifest("new-pods", &extra);
    std::thread::sleep(Duration::from_millis(800));
    let (mut on_with, mut on_without) = (Vec::new(), Vec::new());
    for i in 0..adds {
        // Alternating slices: a busy moment of the machine hits both alike.
        let name = format!("new-{i}");
        let id = format!("scale{i:04}");
        if i.is_multiple_of(2) {
            on_with.push(add_del(&with, &name, &id)?);
            on_without.push(add_del(&without, &name, &id)?);
        } else {
            on_without.push(add_del(&without, &name, &id)?);
            on_with.push(add_del(&with, &name, &id)?);
        }
    }
    let (a, b) = (Summary::of(on_with), Summary::of(on_without));
    let ratio = a.median.as_secs_f64() / b.median.as_secs_f64();
    println!(
        "ADD of a pod the policies select, 10,000 pods / 1,000 policies: median {}, p90 {}; with no policies: median {}, p90 {} ({adds} each, alternating) → ratio {ratio:.2} (budget ≤ {ADD_BUDGET})",
        ms(a.median),
        ms(a.p90),
        ms(b.median),
        ms(b.p90)
    );

    // A policy change at that scale: a server and a client on this node,
    // the server's namespace policy flipped between deny and allow.
    let server_ns = NetnsGuard::new("sv");
    let client_ns = NetnsGuard::new("sc");
    with.put_manifest(
        "gate-pods",
        &format!(
            "{}\n---\n{}",
            pod_json("ns-001", "gate-server", 9, 950_000, NODE)
                .replace("\"app\":\"app-9\"", "\"app\":\"gate\""),
            pod_json("ns-002", "gate-client", 9, 950_001, NODE)
                .replace("\"app\":\"app-9\"", "\"app\":\"gate-client\"")
        ),
    );
    std::thread::sleep(Duration::from_millis(800));
    let add = |name: &str, ns: &str, netns: &NetnsGuard| -> anyhow::Result<std::net::IpAddr> {
        let out = with.cni_in(
            ns,
            "ADD",
            &format!("c{name}"),
            Some(&netns.path()),
            name,
            CONF,
        );
        if !out.status.success() {
            bail!("ADD {name}: {}", String::from_utf8_lossy(&out.stdout));
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(flock_testkit::agent::result_ips(&v)[0])
    };
    let server_ip = add("gate-server", "ns-001", &server_ns)?;
    add("gate-client", "ns-002", &client_ns)?;
    let _listen = tcp_listen(&server_ns.netns(), 80);
    let to = SocketAddr::new(server_ip, 80);
    let deny = r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"gate","namespace":"ns-001"},"spec":{"podSelector":{"matchLabels":{"app":"gate"}}}}"#;
    let allow = r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"gate","namespace":"ns-001"},"spec":{"podSelector":{"matchLabels":{"app":"gate"}},"ingress":[{"from":[{"namespaceSelector":{},"podSelector":{"matchLabels":{"app":"gate-client"}}}]}]}}"#;
    let cns = client_ns.netns();
    let mut changes = Vec::new();
    for i in 0..flips * 2 {
        let (text, want) = if i.is_multiple_of(2) {
            (deny, false)
        } else {
            (allow, true)
        };
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        with.put_manifest("gate-policy", text);
        loop {
            if tcp_connects(&cns, to, Duration::from_millis(5)) == want {
                changes.push(start.elapsed());
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the policy change was not enforced within 10 s");
            }
        }
    }
    let c = Summary::of(changes);
    println!(
        "policy change → enforced at that scale (manifest written → first probe showing it, {} changes): median {}, p90 {}, worst {} (budget {}, ratio {:.2})",
        flips * 2,
        ms(c.median),
        ms(c.p90),
        ms(c.p99),
        ms(CHANGE_BUDGET),
        c.median.as_secs_f64() / CHANGE_BUDGET.as_secs_f64()
    );
    let rss = with.pid().map_or(0.0, rss_mb);
    let rss_plain = without.pid().map_or(0.0, rss_mb);
    println!(
        "agent RSS with that cluster: {rss:.1} MB with the policies, {rss_plain:.1} MB without (budget ≤ {RSS_BUDGET_MB} MB)"
    );
    Ok(())
}
