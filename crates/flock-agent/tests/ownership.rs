//! An address reused by a pod with other labels never gets the old pod's
//! NetworkPolicy access, over IPv4 and IPv6, even while the old pod's
//! object lingers (graceful termination) still reporting it; and no flow
//! of the old pod survives into the new one (its conntrack entries go
//! before the address is handed out again). As root, for real.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use flock_testkit::agent::{AgentNode, node_config, result_ips};
use flock_testkit::{NetnsGuard, tcp_connects, tcp_listen};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;

/// A pod manifest in namespace `app` with `labels`, optionally terminating
/// and reporting `ips` in its status, as the API shows a deleted pod
/// during its grace period.
fn pod(name: &str, labels: &str, annotations: &str, deleting: bool, ips: &[String]) -> String {
    let deletion = if deleting {
        "\n  deletionTimestamp: '2026-12-01T00:00:00Z'"
    } else {
        ""
    };
    let pod_ips: Vec<String> = ips.iter().map(|ip| format!("{{ip: '{ip}'}}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: app\n  uid: uid-app-{name}\n  creationTimestamp: '2026-11-01T00:00:00Z'{deletion}\n  labels: {{{labels}}}\n  annotations: {{{annotations}}}\nspec:\n  nodeName: node-a\n  containers: [{{name: c, image: 'busybox:1', ports: [{{name: http, containerPort: 80}}]}}]\nstatus:\n  conditions: [{{type: Ready, status: 'True'}}]\n  podIPs: [{}]\n",
        pod_ips.join(", ")
    )
}

fn add(node: &AgentNode, name: &str, ns: &NetnsGuard) -> Vec<std::net::IpAddr> {
    let out = node.cni_in(
        "app",
        "ADD",
        &format!("c0ffee{name}"),
        Some(&ns.path()),
        name,
        CONF,
    );
    assert!(
        out.status.success(),
        "ADD {name}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    result_ips(&serde_json::from_slice(&out.stdout).expect("result"))
}

fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_reused_address_gets_nothing_of_its_old_pods_access_and_no_old_flow_survives() {
    // Tiny prefixes, so the freed addresses are the only ones left.
    let config = node_config(
        "  cidr6: 2001:db8:0:1::/125\n  cidr4: 198.18.0.0/29\n  mtu: 1400",
        "",
    );
    let node = AgentNode::start(
        Path::new(AGENT),
        &Path::new(AGENT).with_file_name("flock"),
        &config,
    );
    node.put_manifest(
        "namespaces",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: app}\n",
    );
    node.put_manifest(
        "policy",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: clients-only, namespace: app}\nspec:\n  podSelector: {matchLabels: {role: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: 80}]}]\n",
    );
    let server_ns = NetnsGuard::new("pod");
    node.put_manifest("server", &pod("server", "role: server", "", false, &[]));
    let server = add(&node, "server", &server_ns);
    let _listen = tcp_listen(&server_ns.netns(), 80);
    let old_ns = NetnsGuard::new("pod");
    node.put_manifest("old", &pod("old", "role: client", "", false, &[]));
    let old = add(&node, "old", &old_ns);
    // Fill both prefixes: the /29 has 5 addresses, the /125 seven.
    let mut fillers = Vec::new();
    for i in 0..3 {
        let ns = NetnsGuard::new("pod");
        let name = format!("filler{i}");
        node.put_manifest(&name, &pod(&name, "role: filler", "", false, &[]));
        add(&node, &name, &ns);
        fillers.push(ns);
    }
    for i in 0..2 {
        let ns = NetnsGuard::new("pod");
        let name = format!("v6only{i}");
        node.put_manifest(
            &name,
            &pod(
                &name,
                "role: filler",
                "flock.fritzlab.net/ipv4: 'false'",
                false,
                &[],
            ),
        );
        add(&node, &name, &ns);
        fillers.push(ns);
    }
    let to = |v4: bool| {
        SocketAddr::new(
            *server.iter().find(|ip| ip.is_ipv4() == v4).expect("ip"),
            80,
        )
    };
    for v4 in [true, false] {
        eventually("the client reaches the server", || {
            tcp_connects(&old_ns.netns(), to(v4), Duration::from_millis(500))
        });
    }
    // A flow of the old pod, established and so accepted from then on.
    let server_v4 = to(true);
    let flow = old_ns.netns().spawn(move || {
        Ok(std::net::TcpStream::connect_timeout(&server_v4, Duration::from_secs(1)).ok())
    });
    let _flow = flow.join().expect("flow thread").expect("flow");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dataplane = rt
        .block_on(flock_netlink::Dataplane::new(node.node.netns()))
        .expect("dataplane");
    let tracked = |ip: std::net::IpAddr| {
        rt.block_on(dataplane.conntrack_addresses())
            .expect("conntrack")
            .contains(&ip)
    };
    assert!(tracked(old[0]), "the node tracks the old pod's flow");

    // The old pod is deleted; its object lingers, terminating, still
    // reporting its addresses and its labels.
    let old_ips: Vec<String> = old.iter().map(ToString::to_string).collect();
    node.put_manifest("old", &pod("old", "role: client", "", true, &old_ips));
    let out = node.cni_in("app", "DEL", "c0ffeeold", Some(&old_ns.path()), "old", CONF);
    assert!(out.status.success());
    // The intruder gets exactly those addresses (the only free ones).
    let intruder_ns = NetnsGuard::new("pod");
    node.put_manifest("intruder", &pod("intruder", "role: other", "", false, &[]));
    let deadline = Instant::now() + Duration::from_secs(5);
    let intruder = loop {
        let out = node.cni_in(
            "app",
            "ADD",
            "c0ffeeintruder",
            Some(&intruder_ns.path()),
            "intruder",
            CONF,
        );
        if out.status.success() {
            break result_ips(&serde_json::from_slice(&out.stdout).expect("result"));
        }
        let _ = node.cni_in(
            "app",
            "DEL",
            "c0ffeeintruder",
            Some(&intruder_ns.path()),
            "intruder",
            CONF,
        );
        assert!(Instant::now() < deadline, "no address was freed");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut got = intruder.clone();
    got.sort();
    let mut had = old.clone();
    had.sort();
    assert_eq!(got, had, "the old pod's addresses, both families");
    assert!(
        !tracked(old[0]) && !tracked(old[1]),
        "no conntrack entry of the old addresses is left"
    );
    // The intruder has the old pod's addresses, not its access.
    std::thread::sleep(Duration::from_millis(500));
    for v4 in [true, false] {
        assert!(
            !tcp_connects(&intruder_ns.netns(), to(v4), Duration::from_millis(700)),
            "the intruder reached the server over {}",
            if v4 { "IPv4" } else { "IPv6" }
        );
    }
    // The policy still works for a real client.
    drop(fillers.remove(0));
    let _ = node.cni_in("app", "DEL", "c0ffeefiller0", None, "filler0", CONF);
    let client_ns = NetnsGuard::new("pod");
    node.put_manifest("client", &pod("client", "role: client", "", false, &[]));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = node.cni_in(
            "app",
            "ADD",
            "c0ffeeclient",
            Some(&client_ns.path()),
            "client",
            CONF,
        );
        if out.status.success() {
            break;
        }
        let _ = node.cni_in(
            "app",
            "DEL",
            "c0ffeeclient",
            Some(&client_ns.path()),
            "client",
            CONF,
        );
        assert!(Instant::now() < deadline, "the client got no address");
        std::thread::sleep(Duration::from_millis(50));
    }
    eventually("a real client still reaches the server", || {
        tcp_connects(&client_ns.netns(), to(true), Duration::from_millis(500))
    });
}
