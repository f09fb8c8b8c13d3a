//! NetworkPolicy: translate + render for a large cluster, loading the
//! ruleset, the delay from a policy change to its enforcement, and
//! pod-to-pod throughput and TCP connection rate with no policies and with
//! 500 policies selecting other pods.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use flock_netpol::{Applier, ClusterPod, Engine, Loader, LocalPod, NamedPort, Protocol};
use flock_testkit::agent::{AgentNode, Pod, default_node_config};
use flock_testkit::{NetnsGuard, tcp_connects, tcp_listen};
use k8s_openapi::api::networking::v1::NetworkPolicy;

use crate::measure::{Summary, ms};

const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
const TRANSLATE_BUDGET: Duration = Duration::from_millis(200);
const ENFORCE_BUDGET: Duration = Duration::from_secs(1);

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

pub fn run(flips: usize, rounds: usize, adds: usize, only: Option<&str>) -> anyhow::Result<()> {
    let part = |name: &str| only.is_none_or(|o| o == name);
    if part("translate") {
        synthetic()?;
    }
    if part("enforce") {
        enforcement(flips)?;
    }
    if part("dataplane") {
        dataplane_cost(rounds)?;
    }
    if part("scale") {
        crate::netpol_scale::run(adds, flips)?;
    }
    Ok(())
}

/// A synthetic cluster: `namespaces` × `per_ns` pods, 10 policies per
/// namespace with pod and namespace selectors, ipBlocks and named ports.
struct Synthetic {
    pods: Vec<ClusterPod>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    policies: Vec<NetworkPolicy>,
}

fn synthetic_cluster(namespaces: usize, per_ns: usize) -> anyhow::Result<Synthetic> {
    let mut pods = Vec::with_capacity(namespaces * per_ns);
    let mut ns_labels = BTreeMap::new();
    let mut policies = Vec::new();
    for n in 0..namespaces {
        let ns = format!("ns-{n:03}");
        ns_labels.insert(
            ns.clone(),
            BTreeMap::from([
                ("kubernetes.io/metadata.name".to_owned(), ns.clone()),
                ("team".to_owned(), format!("team-{}", n % 10)),
            ]),
        );
        for j in 0..per_ns {
            let k = (n * per_ns + j) as u32;
            pods.push(ClusterPod {
                namespace: ns.clone(),
                name: format!("pod-{j}"),
                labels: BTreeMap::from([
                    ("app".to_owned(), format!("app-{}", j % 10)),
                    (
                        "tier".to_owned(),
                        if j % 2 == 0 { "frontend" } else { "backend" }.to_owned(),
                    ),
                ])
                .into(),
                ips: vec![
                    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + k)),
                    IpAddr::V6(Ipv6Addr::from(0xfd10_u128 << 112 | u128::from(k))),
                ],
                ports: vec![NamedPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
            });
        }
        for p in 0..10 {
            let yaml = format!(
                "metadata: {{name: pol-{p}, namespace: {ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app-{p}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{tier: frontend}}}}\n    - namespaceSelector: {{matchLabels: {{team: team-{p}}}}}\n      podSelector: {{matchExpressions: [{{key: app, operator: In, values: [app-{p}, app-{q}]}}]}}\n    ports: [{{port: 80}}, {{port: 443}}, {{port: http}}]\n  - from: [{{ipBlock: {{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}}}]\n  egress:\n  - to: [{{podSelector: {{matchLabels: {{app: app-{q}}}}}}}]\n    ports: [{{port: http}}, {{protocol: UDP, port: 53}}]\n",
                q = (p + 1) % 10
            );
            policies.push(serde_yaml::from_str(&yaml).context("synthetic policy")?);
        }
    }
    Ok(Synthetic {
        pods,
        namespaces: ns_labels,
        policies,
    })
}

fn local_pods(s: &Synthetic, every: usize) -> Vec<LocalPod> {
    s.pods
        .iter()
        .enumerate()
        .filter(|(i, _)| i % every == 0)
        .map(|(i, p)| LocalPod {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            iface: format!("flock{i:08x}"),
        })
        .collect()
}

fn translate_render(s: &Synthetic, local: &[LocalPod]) -> anyhow::Result<String> {
    Ok(translate_render_timed(s, local)?.0)
}

/// The script, and the time translation took.
fn translate_render_timed(s: &Synthetic, local: &[LocalPod]) -> anyhow::Result<(String, Duration)> {
    let start = Instant::now();
    let mut engine = Engine::new();
    engine.set_namespaces(s.namespaces.clone());
    engine.set_policies(&s.policies);
    for p in &s.pods {
        engine.upsert_pod(p.clone());
    }
    for lp in local {
        engine.upsert_local(lp.clone());
    }
    engine.refresh();
    let translated = start.elapsed();
    Ok((flock_netpol::render_table(engine.desired())?, translated))
}

fn synthetic() -> anyhow::Result<()> {
    let s = synthetic_cluster(100, 100)?;
    println!(
        "synthetic cluster: {} pods in {} namespaces, {} policies",
        s.pods.len(),
        s.namespaces.len(),
        s.policies.len()
    );
    let mut scripts = Vec::new();
    for (what, every, runs) in [
        ("100 pods on this node", 100, 20),
        ("all 10,000 pods on this node", 1, 5),
    ] {
        let local = local_pods(&s, every);
        let mut samples = Vec::new();
        let mut translate_only = Vec::new();
        let mut script = String::new();
        for _ in 0..runs {
            let start = Instant::now();
            let (text, translated) = translate_render_timed(&s, &local)?;
            samples.push(start.elapsed());
            translate_only.push(translated);
            script = text;
        }
        let t = Summary::of(samples);
        println!(
            "translate + render, {what}: median {} (translate {}), max of {runs} {} ({} KiB of nft; budget {}, ratio {:.2})",
            ms(t.median),
            ms(Summary::of(translate_only).median),
            ms(t.p99),
            script.len() / 1024,
            ms(TRANSLATE_BUDGET),
            ratio(t.median, TRANSLATE_BUDGET)
        );
        scripts.push((what, script));
    }
    // Loading: each script into a namespace of our own, alternating with
    // a one-policy-smaller variant so no load is skipped as unchanged.
    let ns = NetnsGuard::new("bnft");
    let mut applier = Applier::with_command(&["ip", "netns", "exec", ns.name(), "nft"]);
    let fewer = Synthetic {
        policies: s.policies[1..].to_vec(),
        pods: s.pods.clone(),
        namespaces: s.namespaces.clone(),
    };
    // The realistic case only: the all-pods-on-one-node script is there
    // to bound translation, not something a node loads.
    let (what, script) = &scripts[0];
    let other = translate_render(&fewer, &local_pods(&s, 100))?;
    let runs = 10;
    let mut samples = Vec::new();
    for r in 0..runs {
        let text = if r % 2 == 0 { script } else { &other };
        let start = Instant::now();
        applier.load(text)?;
        samples.push(start.elapsed());
    }
    let t = Summary::of(samples);
    println!(
        "nft -f - (one transaction), {what}: median {} of {runs}",
        ms(t.median)
    );
    Ok(())
}

struct Agent {
    node: AgentNode,
}

fn namespaces_manifest(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}}}\n---\n"))
        .collect()
}

fn pod_manifest(ns: &str, name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, uid: {uid}, labels: {{app: {app}}}}}\nspec: {{nodeName: node-a, containers: [{{name: c, image: 'busybox:1'}}]}}\n---\n",
        uid = flock_testkit::agent::pod_uid(ns, name)
    )
}

impl Agent {
    fn start() -> Agent {
        let exe = std::env::current_exe().expect("current exe");
        Agent {
            node: AgentNode::start(
                &exe.with_file_name("flock-agent"),
                &exe.with_file_name("flock"),
                &default_node_config(),
            ),
        }
    }

    fn table(&self) -> String {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                self.node.node.name(),
                "nft",
                "list",
                "table",
            ])
            .args(["inet", "flock"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

/// From writing a policy manifest to the first connection that shows it.
fn enforcement(flips: usize) -> anyhow::Result<()> {
    let a = Agent::start();
    a.node
        .put_manifest("namespaces", &namespaces_manifest(&["x", "y"]));
    a.node.put_manifest(
        "pods",
        &(pod_manifest("x", "server", "server") + &pod_manifest("y", "client", "client")),
    );
    let server = a.node.add_pod_in("x", "server", CONF);
    let client = a.node.add_pod_in("y", "client", CONF);
    let _listen = tcp_listen(&server.ns.netns(), 80);
    let to = SocketAddr::new(server.ip(true), 80);
    let deny = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec: {podSelector: {}}\n";
    let allow = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}]}]\n";
    let cns = client.ns.netns();
    let connects = || tcp_connects(&cns, to, Duration::from_millis(5));
    let mut to_allow = Vec::new();
    let mut to_deny = Vec::new();
    for i in 0..flips * 2 {
        let (text, want) = if i % 2 == 0 {
            (deny, false)
        } else {
            (allow, true)
        };
        // Quiet before each change, so it is measured alone.
        std::thread::sleep(Duration::from_millis(300));
        let start = Instant::now();
        a.node.put_manifest("policy", text);
        loop {
            let probe = start.elapsed();
            if connects() == want {
                if want {
                    to_allow.push(probe)
                } else {
                    to_deny.push(probe)
                }
                break;
            }
            if start.elapsed() > Duration::from_secs(5) {
                bail!("policy change not enforced within 5 s");
            }
        }
    }
    for (what, samples) in [("allow", to_allow), ("deny", to_deny)] {
        let s = Summary::of(samples);
        println!(
            "policy change → {what} enforced (manifest written → first probe showing it, {flips} runs): median {}, p90 {}, worst {} (budget {}, ratio {:.3})",
            ms(s.median),
            ms(s.p90),
            ms(s.p99),
            ms(ENFORCE_BUDGET),
            ratio(s.p99, ENFORCE_BUDGET)
        );
    }
    Ok(())
}

/// Throughput (iperf3) and TCP connection rate between two pods that no
/// policy selects, on two nodes side by side: one with no policies, one
/// with 500 policies selecting 100 other pods on it. The two are measured
/// in alternating short slices, so a busy moment of this shared machine
/// hits both alike.
fn dataplane_cost(rounds: usize) -> anyhow::Result<()> {
    let plain = BenchNode::start(None)?;
    let policed = BenchNode::start(Some(500))?;
    let table = policed.agent.table();
    ensure!(
        plain.agent.table().matches("chain in_").count() == 0,
        "the node without policies has pod chains"
    );
    println!(
        "with 500 policies: {} pod chains, {} sets, {} KiB of ruleset",
        table.matches("\tchain ").count() - 1,
        table.matches("\tset ").count(),
        table.len() / 1024
    );
    let mut bps = (Vec::new(), Vec::new());
    let mut rate = (Vec::new(), Vec::new());
    let mut port = 9000u16;
    for _ in 0..rounds {
        for (node, into_bps) in [(&plain, &mut bps.0), (&policed, &mut bps.1)] {
            into_bps.push(iperf3(&node.server, &node.client, node.server.ip(true))?);
        }
        // Connection rate: ten 200 ms slices per node, alternating, each
        // to a fresh server port (no TIME_WAIT of an earlier slice in the way).
        for _ in 0..10 {
            for (node, into) in [(&plain, &mut rate.0), (&policed, &mut rate.1)] {
                let listener = tcp_listen(&node.server.ns.netns(), port);
                let to = SocketAddr::new(node.server.ip(true), port);
                connection_rate(&node.client, to, Duration::from_millis(20));
                into.push(connection_rate(
                    &node.client,
                    to,
                    Duration::from_millis(200),
                ));
                drop(listener);
                port += 1;
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (b0, b1) = (median(bps.0), median(bps.1));
    let (c0, c1) = (median(rate.0), median(rate.1));
    println!(
        "pod-to-pod TCP throughput (iperf3 -t 3, median of {rounds} per node, alternating): no policies {:.2} Gbit/s, 500 policies {:.2} Gbit/s → {:.3}× (budget ≥ 0.9)",
        b0 / 1e9,
        b1 / 1e9,
        b1 / b0
    );
    println!(
        "pod-to-pod TCP connection rate (sequential connect + close, median of {} 200 ms slices per node, alternating): no policies {:.0}/s, 500 policies {:.0}/s → {:.3}× (budget ≥ 0.9)",
        rounds * 10,
        c0,
        c1,
        c1 / c0
    );
    Ok(())
}

/// A node with a client and a server pod, and with `policies` policies
/// selecting 100 other pods on it (or none).
struct BenchNode {
    agent: Agent,
    server: Pod,
    client: Pod,
    _others: Vec<Pod>,
}

impl BenchNode {
    fn start(policies: Option<usize>) -> anyhow::Result<BenchNode> {
        let agent = Agent::start();
        let others = if policies.is_some() { 100 } else { 0 };
        agent
            .node
            .put_manifest("namespaces", &namespaces_manifest(&["bench", "others"]));
        let mut pods =
            pod_manifest("bench", "server", "server") + &pod_manifest("bench", "client", "client");
        for i in 0..others {
            pods += &pod_manifest("others", &format!("o{i}"), &format!("o{i}"));
        }
        agent.node.put_manifest("pods", &pods);
        let server = agent.node.add_pod_in("bench", "server", CONF);
        let client = agent.node.add_pod_in("bench", "client", CONF);
        let others_pods: Vec<Pod> = (0..others)
            .map(|i| agent.node.add_pod_in("others", &format!("o{i}"), CONF))
            .collect();
        if let Some(count) = policies {
            let mut text = String::new();
            for i in 0..count {
                let _ = write!(
                    text,
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: others}}\nspec:\n  podSelector: {{matchLabels: {{app: o{}}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: o{}}}}}}}, {{ipBlock: {{cidr: 203.0.113.0/24}}}}]\n    ports: [{{port: {}}}, {{protocol: UDP, port: 53}}]\n  egress: [{{to: [{{namespaceSelector: {{}}}}]}}]\n---\n",
                    i % others,
                    (i + 1) % others,
                    8000 + i
                );
            }
            agent.node.put_manifest("policies", &text);
            let deadline = Instant::now() + Duration::from_secs(10);
            while agent.table().matches("chain in_").count() < others {
                ensure!(
                    Instant::now() < deadline,
                    "the ruleset did not load within 10 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        sysctl(&client, "net.ipv4.tcp_tw_reuse=1")?;
        sysctl(&client, "net.ipv4.ip_local_port_range=1024 65535")?;
        Ok(BenchNode {
            agent,
            server,
            client,
            _others: others_pods,
        })
    }
}

fn sysctl(pod: &Pod, setting: &str) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(["netns", "exec", pod.ns.name(), "sysctl", "-qw", setting])
        .status()?;
    ensure!(status.success(), "sysctl {setting}");
    Ok(())
}

/// Bits per second received, from a 3 s iperf3 run client → server.
fn iperf3(server: &Pod, client: &Pod, ip: IpAddr) -> anyhow::Result<f64> {
    let mut srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            server.ns.name(),
            "iperf3",
            "-s",
            "-1",
            "-p",
            "5201",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("iperf3 (apt-get install iperf3)")?;
    let mut out = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        let o = Command::new("ip")
            .args(["netns", "exec", client.ns.name(), "iperf3", "-c"])
            .arg(ip.to_string())
            .args(["-p", "5201", "-t", "3", "-J"])
            .output()?;
        if o.status.success() {
            out = Some(o);
            break;
        }
    }
    let _ = srv.kill();
    let _ = srv.wait();
    let out = out.context("iperf3 client never connected")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON without end.sum_received.bits_per_second")
}

/// Sequential connections per second from `client` to `to`.
fn connection_rate(client: &Pod, to: SocketAddr, window: Duration) -> f64 {
    let ns = client.ns.netns();
    ns.spawn(move || {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < window {
            if std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).is_ok() {
                n += 1;
            }
        }
        Ok(n as f64 / start.elapsed().as_secs_f64())
    })
    .join()
    .ok()
    .and_then(Result::ok)
    .unwrap_or(0.0)
}
