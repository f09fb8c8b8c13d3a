//! BGP against a real peer: a ToR namespace running BIRD, peered over
//! veths with node namespaces each running BIRD and the real agent. The
//! ToR learns the nodes' prefixes, and an anycast IP only while a pod
//! holding it is Ready; pods reach each other through it; one anycast IP
//! on two nodes is ECMP on the ToR; restarts withdraw nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flock_testkit::agent::{AgentNode, node_config};
use flock_testkit::fabric::{FabricNode, RouteMonitor, until};
use flock_testkit::{Bird, NetnsGuard, fabric};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;

const TOR_CONF: &str = "log stderr all;
router id 198.18.255.254;
protocol device { scan time 10; }
protocol kernel { ipv4 { export where source = RTS_BGP; }; }
protocol kernel { ipv6 { export where source = RTS_BGP; }; }
protocol bgp node4 { local 198.18.255.254 as 65000; neighbor 198.18.255.1 as 65001; ipv4 { import all; export none; }; }
protocol bgp node6 { local 2001:db8:ff::1 as 65000; neighbor 2001:db8:ff::2 as 65001; ipv6 { import all; export none; }; }
";

#[test]
fn the_tor_learns_node_prefixes_and_anycast_only_while_ready() {
    let plugin: PathBuf = Path::new(AGENT).with_file_name("flock");
    let spec = "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {address: 198.18.255.254, asn: 65000}\n    - {address: '2001:db8:ff::1', asn: 65000}";
    let node = AgentNode::start(Path::new(AGENT), &plugin, &node_config(spec, ""));
    node.put_test_pools();
    let tor = NetnsGuard::new("tor");
    let dir = tempfile::tempdir().expect("tempdir");
    // The uplink: tor0 in the ToR, up0 in the node.
    tor.ip(&[
        "link",
        "add",
        "tor0",
        "type",
        "veth",
        "peer",
        "name",
        "up0",
        "netns",
        node.node.name(),
    ]);
    tor.ip(&["addr", "add", "198.18.255.254/24", "dev", "tor0"]);
    tor.ip(&["addr", "add", "2001:db8:ff::1/64", "dev", "tor0", "nodad"]);
    tor.ip(&["link", "set", "tor0", "up"]);
    node.node
        .ip(&["addr", "add", "198.18.255.1/24", "dev", "up0"]);
    node.node
        .ip(&["addr", "add", "2001:db8:ff::2/64", "dev", "up0", "nodad"]);
    node.node.ip(&["link", "set", "up0", "up"]);
    // The uplink's addresses came after the agent started: it learns them
    // from the kernel's notifications (its tick is 15 s) and renders both
    // sessions' `local` at once.
    let rendered = until("bird.conf with both peers", Duration::from_secs(5), || {
        let c = std::fs::read_to_string(node.bird_config()).ok()?;
        c.contains("neighbor 2001:db8:ff::1 as 65000").then_some(c)
    });
    assert!(
        rendered.contains("local 198.18.255.1 as 65001;"),
        "{rendered}"
    );

    let tor_conf = dir.path().join("tor.conf");
    std::fs::write(&tor_conf, TOR_CONF).expect("tor conf");
    let _tor_bird = Bird::start(tor.name(), &tor_conf, &dir.path().join("tor.ctl"));
    let _node_bird = Bird::start(node.node.name(), &node.bird_config(), &node.bird_socket());

    let tor_routes = || tor.ip_output(&["route"]) + &tor.ip_output(&["-6", "route"]);
    until(
        "the ToR learns the node's prefixes",
        Duration::from_secs(20),
        || {
            let r = tor_routes();
            (r.contains("198.18.0.0/24 via 198.18.255.1")
                && r.contains("2001:db8:0:1::/64 via 2001:db8:ff::2"))
            .then_some(r)
        },
    );

    // An anycast IP is announced while its pod is Ready, withdrawn when it is not.
    let ann = [("flock.fritzlab.net/anycast", "203.0.113.77")];
    node.put_pod("web", &ann, true);
    let pod = NetnsGuard::new("pod");
    let out = node.cni("ADD", "bgppod", Some(&pod.path()), "web", CONF);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    until("anycast announced", Duration::from_secs(20), || {
        tor_routes()
            .contains("203.0.113.77 via 198.18.255.1")
            .then_some(String::new())
    });
    node.put_pod("web", &ann, false);
    until("anycast withdrawn", Duration::from_secs(20), || {
        (!tor_routes().contains("203.0.113.77")).then_some(String::new())
    });
    assert!(
        tor_routes().contains("198.18.0.0/24 via 198.18.255.1"),
        "the node's prefix stays"
    );
}

/// Every UDP flow from a fresh source port of the ToR to `to`; returns
/// once each echo server has answered at least once, or panics.
fn spread_until_all_answer(
    tor: &NetnsGuard,
    to: SocketAddr,
    echoes: &[(&str, &flock_testkit::Echo)],
) {
    for _ in 0..400 {
        let answered = flock_testkit::udp_probe(&tor.netns(), to, Duration::from_millis(500));
        assert!(answered.is_some(), "no answer from {to}");
        if echoes.iter().all(|(_, e)| e.hits() > 0) {
            return;
        }
    }
    let hits: Vec<String> = echoes
        .iter()
        .map(|(n, e)| format!("{n}={}", e.hits()))
        .collect();
    panic!(
        "400 flows to {to} did not reach every pod: {}",
        hits.join(" ")
    );
}

#[test]
fn two_nodes_route_pods_anycast_and_addresses_through_the_tor() {
    let tor = NetnsGuard::new("tor");
    // The ToR routes between its ports, and spreads flows to one anycast
    // IP over the nodes by ports, too.
    fabric::tor_forwarding(tor.name()).expect("ToR sysctls");
    let a = FabricNode::start(
        &tor,
        Path::new(AGENT),
        &Path::new(AGENT).with_file_name("flock"),
        "node-a",
        1,
        65001,
    );
    let b = FabricNode::start(
        &tor,
        Path::new(AGENT),
        &Path::new(AGENT).with_file_name("flock"),
        "node-b",
        2,
        65002,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let tor_conf = dir.path().join("tor.conf");
    let tor_bird = fabric::tor_bird_config(&[("a", 1, 65001), ("b", 2, 65002)]);
    std::fs::write(&tor_conf, tor_bird).expect("tor conf");
    let _tor_bird = Bird::start(tor.name(), &tor_conf, &dir.path().join("tor.ctl"));
    let tor_routes = || tor.ip_output(&["route"]) + &tor.ip_output(&["-6", "route"]);

    // Each node's prefixes, both families, via that node.
    until(
        "the ToR learns both nodes' prefixes",
        Duration::from_secs(30),
        || {
            let r = tor_routes();
            [
                "198.18.1.0/24 via 198.19.1.1",
                "198.18.2.0/24 via 198.19.2.1",
                "2001:db8:0:1::/64 via 2001:db8:ff:1::1",
                "2001:db8:0:2::/64 via 2001:db8:ff:2::1",
            ]
            .iter()
            .all(|p| r.contains(p))
            .then_some(r)
        },
    );

    // Two Ready pods with one anycast IP on node a, a third on node b, and
    // a pod on node a with an extra `addresses` IP.
    let any4 = "203.0.113.10";
    let any6 = "2001:db8:aa::10";
    let anycast = format!("{any4},{any6}");
    let ann = [("flock.fritzlab.net/anycast", anycast.as_str())];
    let a1 = a.node.add_pod("a1", &ann, CONF);
    let a2 = a.node.add_pod("a2", &ann, CONF);
    let b1 = b.node.add_pod("b1", &ann, CONF);
    let extra = "203.0.113.20";
    let a3 = a
        .node
        .add_pod("a3", &[("flock.fritzlab.net/addresses", extra)], CONF);

    // Pods on different nodes reach each other through the ToR.
    let _b1_echo = flock_testkit::udp_echo(&b1.ns.netns(), 7100);
    for v4 in [true, false] {
        let to = SocketAddr::new(b1.ip(v4), 7100);
        assert!(
            flock_testkit::udp_probe(&a1.ns.netns(), to, Duration::from_secs(5)).is_some(),
            "a1 on node-a cannot reach b1 on node-b at {to}\nToR routes:\n{}",
            tor_routes()
        );
    }

    // On node a: one route with two nexthops (a1, a2).
    let node_route = a.node.node.ip_output(&["route", "show", any4]);
    assert_eq!(node_route.matches("nexthop via").count(), 2, "{node_route}");
    // On the ToR: ECMP over both nodes, for both families.
    let ecmp = until(
        "ECMP on the ToR for the anycast IPs",
        Duration::from_secs(30),
        || {
            let v4 = tor.ip_output(&["route", "show", any4]);
            let v6 = tor.ip_output(&["-6", "route", "show", any6]);
            (v4.contains(&format!("nexthop via {}", a.uplink.0))
                && v4.contains(&format!("nexthop via {}", b.uplink.0))
                && v6.contains(&format!("nexthop via {}", a.uplink.1))
                && v6.contains(&format!("nexthop via {}", b.uplink.1)))
            .then_some(v4 + &v6)
        },
    );

    // Traffic from the ToR reaches all three pods holding the anycast IP.
    for any in [any4, any6] {
        let ip: std::net::IpAddr = any.parse().expect("ip");
        let echoes = [
            (
                "a1",
                flock_testkit::udp_echo_on(&a1.ns.netns(), SocketAddr::new(ip, 7200)),
            ),
            (
                "a2",
                flock_testkit::udp_echo_on(&a2.ns.netns(), SocketAddr::new(ip, 7200)),
            ),
            (
                "b1",
                flock_testkit::udp_echo_on(&b1.ns.netns(), SocketAddr::new(ip, 7200)),
            ),
        ];
        let refs: Vec<(&str, &flock_testkit::Echo)> = echoes.iter().map(|(n, e)| (*n, e)).collect();
        spread_until_all_answer(&tor, SocketAddr::new(ip, 7200), &refs);
    }

    // The `addresses` IP is announced and answers on a3's eth0.
    until(
        "the addresses IP reaches the ToR",
        Duration::from_secs(30),
        || {
            tor_routes()
                .contains(&format!("{extra} via {}", a.uplink.0))
                .then_some(String::new())
        },
    );
    let to = SocketAddr::new(extra.parse().expect("ip"), 7300);
    // Bound to the IP, so the answer leaves from it.
    let _a3_echo = flock_testkit::udp_echo_on(&a3.ns.netns(), to);
    assert!(
        flock_testkit::udp_probe(&tor.netns(), to, Duration::from_secs(5)).is_some(),
        "the ToR cannot reach {to} on a3"
    );
    assert!(
        a3.ns
            .ip_output(&["addr", "show", "dev", "eth0"])
            .contains(extra),
        "{extra} is on a3's eth0"
    );

    // Restarts withdraw nothing: watch every route change on the ToR while
    // node a's agent is stopped (SIGTERM) and started, then killed
    // (SIGKILL) and started; then while node a's BIRD is killed and
    // started again (BGP graceful restart keeps its routes on the ToR).
    let mut a = a;
    let monitor = RouteMonitor::start(&tor);
    a.node.stop();
    a.node.spawn();
    a.node.kill();
    a.node.spawn();
    // Past the anycast tick and a bird.conf render.
    std::thread::sleep(flock_agent::anycast::ANYCAST_TICK + Duration::from_secs(1));
    assert_withdrew_nothing("restarting the agent", &monitor.stop());

    let monitor = RouteMonitor::start(&tor);
    drop(a.bird.take());
    a.bird = Some(Bird::start_with(
        a.node.node.name(),
        &a.node.bird_config(),
        &a.node.bird_socket(),
        &["-R"],
    ));
    until(
        "node a's BGP sessions are back",
        Duration::from_secs(30),
        || {
            let out = std::process::Command::new("ip")
                .args(["netns", "exec", a.node.node.name(), "birdc", "-s"])
                .arg(a.node.bird_socket())
                .args(["show", "protocols"])
                .output()
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            (text.matches("Established").count() == 2).then_some(text)
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_withdrew_nothing("restarting node a's BIRD", &monitor.stop());
    let after =
        tor.ip_output(&["route", "show", any4]) + &tor.ip_output(&["-6", "route", "show", any6]);
    assert_eq!(
        after.matches("nexthop via").count(),
        4,
        "ECMP after the restarts:\n{after}\nbefore:\n{ecmp}"
    );

    // Deleting b1 leaves only node a announcing the anycast IP.
    assert!(
        b.node
            .cni("DEL", &b1.id, Some(&b1.ns.path()), &b1.name, CONF)
            .status
            .success()
    );
    until(
        "b1's anycast withdrawn on the ToR",
        Duration::from_secs(30),
        || {
            let r = tor.ip_output(&["route", "show", any4]);
            (r.contains(&format!("{any4} via {}", a.uplink.0)) && !r.contains(b.uplink.0))
                .then_some(r)
        },
    );
    drop(a2);
}

/// What BIRD says of its last reconfiguration (`birdc show status`).
fn last_reconfiguration(node: &AgentNode) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", node.node.name(), "birdc", "-s"])
        .arg(node.bird_socket())
        .args(["show", "status"])
        .output()
        .expect("birdc");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("Last reconfiguration"))
        .unwrap_or_else(|| panic!("no reconfiguration time in:\n{text}"))
        .to_owned()
}

/// BIRD's last reconfiguration once BIRD has settled: up and running (a
/// reload accepted during graceful-restart recovery completes when the
/// recovery does, seconds later) and the same time over 2 s.
fn settled_reconfiguration(node: &AgentNode) -> String {
    let mut last = String::new();
    let mut same = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", node.node.name(), "birdc", "-s"])
            .arg(node.bird_socket())
            .args(["show", "status"])
            .output()
            .expect("birdc");
        let running = String::from_utf8_lossy(&out.stdout).contains("Daemon is up and running");
        let now = last_reconfiguration(node);
        same = if running && now == last { same + 1 } else { 0 };
        if same >= 4 {
            return now;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("BIRD did not settle in 60 s: last reconfiguration {last}");
}

#[test]
fn restarting_the_agent_with_everything_in_place_changes_nothing_in_the_kernel_nft_or_bird() {
    let tor = NetnsGuard::new("tor");
    fabric::tor_forwarding(tor.name()).expect("ToR sysctls");
    let mut a = FabricNode::start(
        &tor,
        Path::new(AGENT),
        &Path::new(AGENT).with_file_name("flock"),
        "node-a",
        1,
        65001,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let tor_conf = dir.path().join("tor.conf");
    std::fs::write(&tor_conf, fabric::tor_bird_config(&[("a", 1, 65001)])).expect("tor conf");
    let _tor_bird = Bird::start(tor.name(), &tor_conf, &dir.path().join("tor.ctl"));
    a.node.put_manifest(
        "policies",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: peers, namespace: default}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}}]\n",
    );
    // Pods of every kind: plain, two sharing an anycast IP (ECMP), one
    // with an extra `addresses` IP.
    let mut pods = Vec::new();
    for i in 0..40 {
        let ann: Vec<(&str, &str)> = match i {
            0 | 1 => vec![("flock.fritzlab.net/anycast", "203.0.113.10,2001:db8:aa::10")],
            2 => vec![("flock.fritzlab.net/addresses", "203.0.113.20")],
            _ => vec![],
        };
        pods.push(a.node.add_pod(&format!("p{i}"), &ann, CONF));
    }
    let nft = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", a.node.node.name(), "nft"])
            .args(args)
            .output()
            .expect("nft")
    };
    until("everything in place", Duration::from_secs(30), || {
        let routes = a.node.node.ip_output(&["route", "show", "203.0.113.10"]);
        let conf = std::fs::read_to_string(a.node.bird_config()).ok()?;
        (routes.matches("nexthop via").count() == 2
            && conf.contains("203.0.113.20")
            && nft(&["list", "table", "inet", "flock"]).status.success())
        .then_some(routes)
    });
    // Past the anycast tick, a render and BIRD's reload of it.
    std::thread::sleep(flock_agent::anycast::ANYCAST_TICK + Duration::from_secs(2));
    let reconfigured = settled_reconfiguration(&a.node);

    let watched = [
        "link", "address", "route", "neigh", "netconf", "rule", "nexthop",
    ];
    let node_monitor = RouteMonitor::watching(&a.node.node, &watched);
    let pod_monitors: Vec<RouteMonitor> = pods[..3]
        .iter()
        .map(|p| RouteMonitor::watching(&p.ns, &watched))
        .collect();
    let mut nft_monitor = std::process::Command::new("ip");
    nft_monitor.args(["netns", "exec", a.node.node.name(), "nft", "monitor"]);
    let nft_monitor = RouteMonitor::spawn(nft_monitor);
    const ADOPTED: &str = "the kernel holds this NetworkPolicy table already";
    let adopted = |node: &AgentNode| node.log().matches(ADOPTED).count();
    let adopted_before = adopted(&a.node);
    // Each start runs its policy start (the table compared, not loaded)
    // before the next stop comes.
    a.node.stop();
    a.node.spawn();
    until(
        "the first start's policy pass",
        Duration::from_secs(20),
        || (adopted(&a.node) > adopted_before).then_some(String::new()),
    );
    a.node.kill();
    a.node.spawn();
    until(
        "the second start's policy pass",
        Duration::from_secs(20),
        || (adopted(&a.node) > adopted_before + 1).then_some(String::new()),
    );
    std::thread::sleep(flock_agent::anycast::ANYCAST_TICK + Duration::from_secs(2));
    // The uplink's own neighbour and BGP traffic is not the agent's.
    let node_changes: Vec<String> = node_monitor
        .stop()
        .lines()
        .filter(|l| !l.contains("up0"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        node_changes,
        Vec::<String>::new(),
        "netlink changes in the node namespace"
    );
    for (pod, monitor) in pods.iter().zip(pod_monitors) {
        assert_eq!(monitor.stop(), "", "netlink changes in {}", pod.name);
    }
    assert_eq!(nft_monitor.stop(), "", "nft changes");
    assert_eq!(
        last_reconfiguration(&a.node),
        reconfigured,
        "BIRD was reloaded"
    );
    assert_eq!(
        adopted(&a.node),
        adopted_before + 2,
        "each start adopted the table"
    );
    // And all of it still works: the routes, the policy, the announcement.
    let routes = a.node.node.ip_output(&["route", "show", "203.0.113.10"]);
    assert_eq!(routes.matches("nexthop via").count(), 2, "{routes}");
    assert!(
        a.node
            .cni(
                "CHECK",
                &pods[5].id,
                Some(&pods[5].ns.path()),
                &pods[5].name,
                CONF
            )
            .status
            .success(),
        "CHECK after the restarts"
    );
}

/// Fails when `changes` (`ip monitor route` output) withdrew a route to a
/// pod prefix, an anycast or an `addresses` IP.
fn assert_withdrew_nothing(during: &str, changes: &str) {
    let withdrawn = changes.lines().any(|l| {
        l.starts_with("Deleted")
            && (l.contains("198.18.")
                || l.contains("203.0.113.")
                || l.contains("2001:db8:0:")
                || l.contains("2001:db8:aa::"))
    });
    assert!(
        !withdrawn,
        "{during} withdrew routes on the ToR:\n{changes}"
    );
}

#[test]
fn a_nodeconfig_with_injection_attempts_is_refused_and_the_last_good_bird_conf_stays() {
    let plugin: PathBuf = Path::new(AGENT).with_file_name("flock");
    let good = "  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {address: 198.18.255.254, asn: 65000}";
    let mut node = AgentNode::start(Path::new(AGENT), &plugin, &node_config(good, ""));
    // An address on the peer's subnet, for `local`; restart to render at once.
    node.node
        .ip(&["addr", "add", "198.18.255.1/24", "dev", "lo"]);
    node.kill();
    node.spawn();
    let last_good = until("bird.conf rendered", Duration::from_secs(10), || {
        std::fs::read_to_string(node.bird_config())
            .ok()
            .filter(|c| c.contains("neighbor 198.18.255.254 as 65000;"))
    });
    let manifest = node.manifests().join("nodeconfig.yaml");
    let attempts = [
        // Each names what the agent's log must point at.
        (
            "  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {address: '10.0.0.1; }', asn: 65000}",
            "spec.bgp.peers[0].address",
        ),
        (
            "  cidr4: 198.18.0.0/24\n  bgp:\n    asn: '65000 }'\n    routerId: 198.18.255.1\n    peers:\n    - {address: 198.18.255.254, asn: 65000}",
            "nodeconfig.yaml",
        ),
        (
            "  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: '1.2.3.4; protocol static { }'\n    peers:\n    - {address: 198.18.255.254, asn: 65000}",
            "spec.bgp.routerId",
        ),
        (
            "  cidr4: '198.18.0.0/24 blackhole; }'\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {address: 198.18.255.254, asn: 65000}",
            "spec.cidr4",
        ),
        (
            "  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {address: 198.18.255.254, asn: 65000, communities: ['65000:1)); accept; } protocol static { route 0.0.0.0/0 blackhole']}",
            "spec.bgp.peers[0].communities[0]",
        ),
        (
            "  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    peers:\n    - {interface: 'eth0\"; } protocol kernel {', asn: 65000}",
            "spec.bgp.peers[0].interface",
        ),
        (
            "  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1\n    largeCommunities: ['1:2:3 }']\n    peers:\n    - {address: 198.18.255.254, asn: 65000}",
            "spec.bgp.largeCommunities[0]",
        ),
    ];
    for (spec, named) in attempts {
        let before = node.log().matches(named).count();
        let tmp = manifest.with_extension("tmp");
        std::fs::write(&tmp, node_config(spec, "")).expect("write");
        std::fs::rename(&tmp, &manifest).expect("rename");
        let log = until(
            &format!("the agent refuses the NodeConfig naming {named}"),
            Duration::from_secs(10),
            || {
                let log = node.log();
                (log.matches(named).count() > before).then_some(log)
            },
        );
        assert!(log.contains("problem"), "{log}");
        // Past a scan and a render pass: nothing changed.
        std::thread::sleep(Duration::from_millis(600));
        assert_eq!(
            std::fs::read_to_string(node.bird_config()).expect("bird.conf"),
            last_good,
            "bird.conf changed after a NodeConfig with {named}"
        );
    }
    // A good change still goes through afterwards.
    let changed = good.replace("198.18.255.254, asn: 65000", "198.18.255.253, asn: 65002");
    let tmp = manifest.with_extension("tmp");
    std::fs::write(&tmp, node_config(&changed, "")).expect("write");
    std::fs::rename(&tmp, &manifest).expect("rename");
    until(
        "the good change is rendered",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(node.bird_config())
                .ok()
                .filter(|c| c.contains("neighbor 198.18.255.253 as 65002;"))
        },
    );
}
