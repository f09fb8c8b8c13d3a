//! The dataplane against the real kernel, as root, in namespaces each test
//! creates (and removes on drop, even when it fails): a node namespace
//! standing in for the host, and one namespace per pod.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use flock_netlink::{Dataplane, Drift, Nexthop, PodSpec, RouteKind, SetupStep};
use flock_testkit::{NetnsGuard, udp_echo, udp_echo_on, udp_probe};
use ipnet::IpNet;

const ECHO_PORT: u16 = 7007;

struct Node {
    ns: NetnsGuard,
    dp: Dataplane,
}

async fn node() -> Node {
    let ns = NetnsGuard::new("node");
    // Proxy ARP answers for 169.254.1.1 only with a route to it through
    // another device; a real node has its default route for that.
    ns.ip(&["route", "add", "169.254.1.1/32", "dev", "lo"]);
    let dp = Dataplane::new(ns.netns()).await.expect("dataplane");
    dp.enable_forwarding().await.expect("forwarding");
    Node { ns, dp }
}

fn spec(pod: &NetnsGuard, n: u8) -> PodSpec {
    PodSpec {
        host_iface: format!("flocktest{n:04x}"),
        netns: pod.netns(),
        if_name: "eth0".into(),
        mtu: 1400,
        ip6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, u16::from(n))),
        ip4: Some(Ipv4Addr::new(198, 18, 0, n)),
        anycast: vec![],
        addresses: vec![],
    }
}

fn v4(s: &PodSpec) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(s.ip4.expect("v4")), ECHO_PORT)
}

fn v6(s: &PodSpec) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(s.ip6.expect("v6")), ECHO_PORT)
}

fn reaches(from: &NetnsGuard, to: SocketAddr) -> bool {
    udp_probe(&from.netns(), to, Duration::from_secs(2)).is_some()
}

/// What `ip` shows of a namespace's links, addresses and routes, once no
/// link is still waiting for its carrier (that settles asynchronously).
fn snapshot(ns: &NetnsGuard) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while ns.ip_output(&["-br", "link"]).contains("DOWN") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = ns.ip_output(&["-br", "link"]);
    s += &ns.ip_output(&["-br", "addr"]);
    s += &ns.ip_output(&["route"]);
    s += &ns.ip_output(&["-6", "route"]);
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_reach_each_other_over_both_families_right_after_setup() {
    let node = node().await;
    let (pa, pb) = (NetnsGuard::new("pa"), NetnsGuard::new("pb"));
    let (a, b) = (spec(&pa, 2), spec(&pb, 3));
    node.dp.setup(&a).await.expect("setup a");
    node.dp.setup(&b).await.expect("setup b");
    let _echo_b = udp_echo(&pb.netns(), ECHO_PORT);
    let _echo_a = udp_echo(&pa.netns(), ECHO_PORT);
    assert!(reaches(&pa, v4(&b)), "a → b over IPv4");
    assert!(reaches(&pa, v6(&b)), "a → b over IPv6");
    assert!(reaches(&pb, v4(&a)), "b → a over IPv4");
    assert!(reaches(&pb, v6(&a)), "b → a over IPv6");

    // What the kernel shows matches the design.
    let pod = snapshot(&pa);
    assert!(
        pod.contains("198.18.0.2/32") && pod.contains("2001:db8:0:1::2/128"),
        "{pod}"
    );
    assert!(pod.contains("default via 169.254.1.1 dev eth0"), "{pod}");
    assert!(pod.contains("default via fe80::1 dev eth0"), "{pod}");
    assert!(
        !pa.ip_output(&["-6", "addr", "show", "dev", "eth0"])
            .contains("fe80"),
        "no kernel link-local on the pod end"
    );
    let host = node
        .ns
        .ip_output(&["-d", "addr", "show", "dev", &a.host_iface]);
    assert!(
        !host.contains("inet") && host.contains("mtu 1400"),
        "the host end holds no address: {host}"
    );
    // Both ends know each other's MAC from permanent entries.
    let mac = |ns: &NetnsGuard, dev: &str| {
        let link = ns.ip_output(&["-o", "link", "show", "dev", dev]);
        let at = link.find("link/ether ").expect("a MAC") + "link/ether ".len();
        link[at..at + 17].to_owned()
    };
    let (host_mac, pod_mac) = (mac(&node.ns, &a.host_iface), mac(&pa, "eth0"));
    let pod_neigh = pa.ip_output(&["neigh", "show", "dev", "eth0", "nud", "permanent"]);
    for gw in ["169.254.1.1", "fe80::1"] {
        assert!(
            pod_neigh.contains(&format!("{gw} lladdr {host_mac} PERMANENT")),
            "{pod_neigh}"
        );
    }
    let host_neigh =
        node.ns
            .ip_output(&["neigh", "show", "dev", &a.host_iface, "nud", "permanent"]);
    for ip in ["198.18.0.2", "2001:db8:0:1::2"] {
        assert!(
            host_neigh.contains(&format!("{ip} lladdr {pod_mac} PERMANENT")),
            "{host_neigh}"
        );
    }
    let host = node
        .ns
        .ip_output(&["-d", "link", "show", "dev", &a.host_iface]);
    assert!(host.contains("addrgenmode none"), "{host}");
    let routes = node.ns.ip_output(&["route", "show", "proto", "97"]);
    assert!(
        routes.contains(&format!("198.18.0.2 dev {} scope link", a.host_iface)),
        "{routes}"
    );
    assert_eq!(
        node.ns
            .sysctl(&format!("ipv4/conf/{}/proxy_arp", a.host_iface)),
        "1"
    );
    assert_eq!(
        node.ns
            .sysctl(&format!("ipv4/neigh/{}/proxy_delay", a.host_iface)),
        "0"
    );
    assert_eq!(
        node.ns
            .sysctl(&format!("ipv6/conf/{}/forwarding", a.host_iface)),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_setup_changes_nothing() {
    let node = node().await;
    let pod = NetnsGuard::new("p");
    let mut s = spec(&pod, 2);
    s.anycast = vec![
        "2001:db8:ffff::1".parse().expect("any"),
        "203.0.113.1".parse().expect("any"),
    ];
    s.addresses = vec!["203.0.113.50".parse().expect("addr")];
    node.dp.setup(&s).await.expect("first");
    let before = (snapshot(&node.ns), snapshot(&pod));
    node.dp.setup(&s).await.expect("second");
    assert_eq!((snapshot(&node.ns), snapshot(&pod)), before);
    let lo = pod.ip_output(&["addr", "show", "dev", "lo"]);
    assert!(
        lo.contains("2001:db8:ffff::1/128") && lo.contains("203.0.113.1/32"),
        "anycast on lo: {lo}"
    );
    let eth0 = pod.ip_output(&["addr", "show", "dev", "eth0"]);
    assert!(
        eth0.contains("203.0.113.50/32"),
        "addresses on eth0: {eth0}"
    );
    assert_eq!(node.dp.inspect(&s).await.expect("inspect"), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setup_interrupted_after_any_step_converges_on_the_next() {
    let node = node().await;
    let peer_ns = NetnsGuard::new("peer");
    let peer = spec(&peer_ns, 100);
    node.dp.setup(&peer).await.expect("peer");
    let _echo = udp_echo(&peer_ns.netns(), ECHO_PORT);
    for (i, step) in SetupStep::ALL.into_iter().enumerate() {
        let pod = NetnsGuard::new("p");
        let s = spec(&pod, 10 + i as u8);
        node.dp
            .setup_through(&s, step)
            .await
            .unwrap_or_else(|e| panic!("through {step:?}: {e}"));
        node.dp
            .setup(&s)
            .await
            .unwrap_or_else(|e| panic!("after {step:?}: {e}"));
        assert_eq!(
            node.dp.inspect(&s).await.expect("inspect"),
            vec![],
            "after {step:?}"
        );
        assert!(
            reaches(&pod, v4(&peer)) && reaches(&pod, v6(&peer)),
            "traffic after {step:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_leaves_nothing_behind_and_is_idempotent() {
    let node = node().await;
    let pod = NetnsGuard::new("p");
    let s = spec(&pod, 2);
    let clean_node = snapshot(&node.ns);
    node.dp.setup(&s).await.expect("setup");
    let done = node
        .dp
        .teardown(&s.host_iface, s.ip6, s.ip4)
        .await
        .expect("teardown");
    done.finished().await.expect("finished");
    assert_eq!(snapshot(&node.ns), clean_node, "node back to where it was");
    assert!(
        !pod.ip_output(&["-br", "link"]).contains("eth0"),
        "pod end gone with the veth"
    );
    // Again, and for a container that never existed.
    node.dp
        .teardown(&s.host_iface, s.ip6, s.ip4)
        .await
        .expect("again")
        .finished()
        .await
        .expect("done");
    node.dp
        .teardown("flocknothing", None, None)
        .await
        .expect("unknown")
        .finished()
        .await
        .expect("done");

    // With the pod namespace already gone.
    let pod2 = NetnsGuard::new("p");
    let s2 = spec(&pod2, 3);
    node.dp.setup(&s2).await.expect("setup 2");
    drop(pod2);
    node.dp
        .teardown(&s2.host_iface, s2.ip6, s2.ip4)
        .await
        .expect("netns gone")
        .finished()
        .await
        .expect("done");
    assert_eq!(snapshot(&node.ns), clean_node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_names_each_kind_of_drift() {
    let node = node().await;
    type Break = fn(&NetnsGuard, &NetnsGuard, &PodSpec);
    type Expect = fn(&Drift) -> bool;
    let cases: Vec<(&str, Break, Expect)> = vec![
        (
            "pod address removed",
            |_, p, _| p.ip(&["addr", "del", "198.18.0.2/32", "dev", "eth0"]),
            |d| matches!(d, Drift::MissingAddress { address, .. } if address.to_string() == "198.18.0.2/32"),
        ),
        (
            "host end down",
            |n, _, s| n.ip(&["link", "set", &s.host_iface, "down"]),
            |d| matches!(d, Drift::LinkDown(l) if l.starts_with("flocktest")),
        ),
        (
            "pod end MTU changed",
            |_, p, _| p.ip(&["link", "set", "eth0", "mtu", "1300"]),
            |d| {
                matches!(
                    d,
                    Drift::WrongMtu {
                        want: 1400,
                        got: Some(1300),
                        ..
                    }
                )
            },
        ),
        (
            "pod default route removed",
            |_, p, _| p.ip(&["-6", "route", "del", "default"]),
            |d| matches!(d, Drift::MissingRoute { route, .. } if route.starts_with("::/0 via fe80::1")),
        ),
        (
            "host route removed",
            |n, _, s| n.ip(&["route", "del", "198.18.0.2/32", "dev", &s.host_iface]),
            |d| matches!(d, Drift::MissingRoute { place, .. } if place == "host"),
        ),
        (
            "pod's gateway neighbour removed",
            |_, p, _| p.ip(&["neigh", "del", "fe80::1", "dev", "eth0"]),
            |d| matches!(d, Drift::Neighbour { ip, got: None, .. } if ip.to_string() == "fe80::1"),
        ),
        (
            "host's neighbour for the pod made dynamic",
            |n, _, s| {
                n.ip(&[
                    "neigh",
                    "replace",
                    "198.18.0.2",
                    "lladdr",
                    "02:00:00:00:00:01",
                    "dev",
                    &s.host_iface,
                    "nud",
                    "reachable",
                ])
            },
            |d| matches!(d, Drift::Neighbour { ip, got: Some(_), .. } if ip.to_string() == "198.18.0.2"),
        ),
        (
            "veth deleted",
            |n, _, s| n.ip(&["link", "del", &s.host_iface]),
            |d| matches!(d, Drift::MissingHostLink(_)),
        ),
    ];
    for (what, break_it, expected) in cases {
        let pod = NetnsGuard::new("p");
        let s = spec(&pod, 2);
        node.dp.setup(&s).await.expect("setup");
        assert_eq!(
            node.dp.inspect(&s).await.expect("inspect"),
            vec![],
            "clean before {what}"
        );
        break_it(&node.ns, &pod, &s);
        let drifts = node.dp.inspect(&s).await.expect("inspect");
        assert!(drifts.iter().any(expected), "{what}: {drifts:?}");
        node.dp
            .teardown(&s.host_iface, s.ip6, s.ip4)
            .await
            .expect("teardown")
            .finished()
            .await
            .expect("done");
    }
    let pod = NetnsGuard::new("p");
    let s = spec(&pod, 2);
    node.dp.setup(&s).await.expect("setup");
    pod.ip(&["link", "del", "eth0"]);
    assert!(
        matches!(
            node.dp.inspect(&s).await.expect("inspect")[..],
            [Drift::MissingHostLink(_)]
        ),
        "deleting the pod end deletes both"
    );
    node.dp.setup(&s).await.expect("setup again");
    drop(pod);
    let drifts = node.dp.inspect(&s).await.expect("inspect");
    assert!(
        drifts
            .iter()
            .any(|d| matches!(d, Drift::MissingNetns(_) | Drift::MissingHostLink(_))),
        "{drifts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipath_anycast_routes_grow_and_shrink_in_place() {
    let node = node().await;
    let pods: Vec<NetnsGuard> = (0..3).map(|_| NetnsGuard::new("p")).collect();
    let specs: Vec<PodSpec> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| spec(p, 2 + i as u8))
        .collect();
    for s in &specs {
        node.dp.setup(s).await.expect("setup");
    }
    let any6: IpAddr = "2001:db8:ffff::7".parse().expect("any6");
    let any4: IpAddr = "203.0.113.7".parse().expect("any4");
    let hops = |family6: bool, n: usize| -> Vec<Nexthop> {
        specs[..n]
            .iter()
            .map(|s| Nexthop {
                via: if family6 {
                    IpAddr::V6(s.ip6.expect("v6"))
                } else {
                    IpAddr::V4(s.ip4.expect("v4"))
                },
                dev: s.host_iface.clone(),
            })
            .collect()
    };
    let count = |any: IpAddr| -> usize {
        let family = if any.is_ipv4() { "-4" } else { "-6" };
        let out = node
            .ns
            .ip_output(&[family, "route", "show", &any.to_string()]);
        out.matches(" via ").count()
    };
    for (any, v6) in [(any6, true), (any4, false)] {
        node.dp
            .replace_anycast(any, &hops(v6, 1))
            .await
            .expect("one");
        assert_eq!(count(any), 1);
        let plain = node.ns.ip_output(&[
            if v6 { "-6" } else { "-4" },
            "route",
            "show",
            &any.to_string(),
        ]);
        assert!(
            !plain.contains("nexthop"),
            "one nexthop is a plain route: {plain}"
        );
        node.dp
            .replace_anycast(any, &hops(v6, 3))
            .await
            .expect("three");
        assert_eq!(count(any), 3, "{}", node.ns.ip_output(&["-6", "route"]));
        node.dp
            .replace_anycast(any, &hops(v6, 2))
            .await
            .expect("two");
        assert_eq!(count(any), 2);
        let installed = node.dp.flock_routes().await.expect("list");
        let route = installed
            .iter()
            .find(|r| r.dst.addr() == any)
            .expect("listed");
        assert_eq!((route.kind, route.nexthops.len()), (RouteKind::Unicast, 2));
        // A lookup finds the same route, every nexthop included.
        let looked_up = node.dp.route_to(any).await.expect("lookup");
        assert_eq!(looked_up.as_ref(), Some(route), "{any}");
        node.dp.replace_anycast(any, &[]).await.expect("none");
        assert_eq!(count(any), 0);
        assert!(
            node.dp
                .route_to(any)
                .await
                .expect("lookup")
                .is_none_or(|r| r.dst != IpNet::from(any)),
            "no route to {any} once removed"
        );
        node.dp
            .remove_route(any.into())
            .await
            .expect("removing twice is fine");
    }
    // Anycast traffic reaches a pod that holds the IP on its lo.
    let mut s = specs[0].clone();
    s.anycast = vec![any6, any4];
    node.dp.setup(&s).await.expect("anycast on lo");
    // Bound to the anycast IPs, so replies come from them.
    let _echo6 = udp_echo_on(&pods[0].netns(), SocketAddr::new(any6, ECHO_PORT));
    let _echo4 = udp_echo_on(&pods[0].netns(), SocketAddr::new(any4, ECHO_PORT));
    node.dp
        .replace_anycast(any6, &hops(true, 1))
        .await
        .expect("route v6");
    node.dp
        .replace_anycast(any4, &hops(false, 1))
        .await
        .expect("route v4");
    for any in [any6, any4] {
        assert!(
            reaches(&pods[1], SocketAddr::new(any, ECHO_PORT)),
            "pod 1 reaches anycast {any} on pod 0"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dumps_on_the_node_socket_take_turns() {
    let node = node().await;
    let pod = NetnsGuard::new("p");
    let s = spec(&pod, 2);
    node.dp.setup(&s).await.expect("setup");
    // The kernel refuses a second dump on a socket with EBUSY; these all share one.
    for _ in 0..20 {
        let (routes, links, drift) = tokio::join!(
            node.dp.flock_routes(),
            node.dp.flock_links(),
            node.dp.inspect(&s)
        );
        routes.expect("routes");
        links.expect("links");
        assert_eq!(drift.expect("inspect"), vec![]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_watch_follows_the_nodes_addresses_from_notifications() {
    let node = node().await;
    let mut watch = node.dp.watch_addresses().await.expect("watch");
    let before = watch.addresses();
    let net: IpNet = "198.51.100.7/24".parse().expect("net");
    let net6: IpNet = "2001:db8:77::7/64".parse().expect("net");
    assert!(!before.contains(&net));
    node.ns
        .ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    node.ns.ip(&["link", "set", "up0", "up"]);
    node.ns
        .ip(&["addr", "add", "198.51.100.7/24", "dev", "up0"]);
    node.ns
        .ip(&["addr", "add", "2001:db8:77::7/64", "dev", "up0", "nodad"]);
    let within = Duration::from_secs(5);
    while !(watch.addresses().contains(&net) && watch.addresses().contains(&net6)) {
        assert!(
            tokio::time::timeout(within, watch.changed())
                .await
                .expect("a notification"),
            "the watch goes on"
        );
    }
    node.ns
        .ip(&["addr", "del", "198.51.100.7/24", "dev", "up0"]);
    while watch.addresses().contains(&net) {
        assert!(
            tokio::time::timeout(within, watch.changed())
                .await
                .expect("a notification")
        );
    }
    assert!(watch.addresses().contains(&net6), "the other one stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_of_released_addresses_are_forgotten_with_one_walk_for_requests_together() {
    let node = node().await;
    // Conntrack tracks the node's forwarded packets once a rule asks for it.
    let nft = std::process::Command::new("ip")
        .args(["netns", "exec", node.ns.name(), "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b"table inet t { chain f { type filter hook forward priority 0; ct state established accept; }; }\n")?;
            child.wait()
        })
        .expect("nft");
    assert!(nft.success());
    let pods: Vec<NetnsGuard> = (0..4).map(|_| NetnsGuard::new("p")).collect();
    let specs: Vec<PodSpec> = pods.iter().zip(2..).map(|(p, n)| spec(p, n)).collect();
    for s in &specs {
        node.dp.setup(s).await.expect("setup");
    }
    let _echoes: Vec<_> = pods
        .iter()
        .map(|p| udp_echo(&p.netns(), ECHO_PORT))
        .collect();
    // Flows a → b and c → d.
    for (from, to) in [(0, 1), (2, 3)] {
        assert!(reaches(&pods[from], v4(&specs[to])));
    }
    let ip = |i: usize| IpAddr::V4(specs[i].ip4.expect("v4"));
    let tracked = node.dp.conntrack_addresses().await.expect("conntrack");
    assert!(
        tracked.contains(&ip(0)) && tracked.contains(&ip(2)),
        "{tracked:?}"
    );
    // A walk that just began (here for an address with no flow) holds the
    // next batch back for 100 ms: a's and c's releases, coming together
    // then, share one walk that deletes both flows, and each request hears
    // of the batch's two deletions.
    let unrelated = IpAddr::V4(Ipv4Addr::new(198, 18, 9, 9));
    assert_eq!(
        node.dp.forget_flows(vec![unrelated]).await.expect("walk"),
        0
    );
    let (a, c) = tokio::join!(
        node.dp.forget_flows(vec![ip(0)]),
        node.dp.forget_flows(vec![ip(2)])
    );
    assert_eq!((a.expect("a"), c.expect("c")), (2, 2));
    let tracked = node.dp.conntrack_addresses().await.expect("conntrack");
    assert!(
        !tracked.contains(&ip(0)) && !tracked.contains(&ip(2)),
        "{tracked:?}"
    );
    // A later request alone: its own walk, after the gap.
    assert!(reaches(&pods[0], v4(&specs[1])));
    assert_eq!(node.dp.forget_flows(vec![ip(1)]).await.expect("b"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_blackholes_and_multipath_hash_policy() {
    let node = node().await;
    for cidr in ["2001:db8:0:1::/64", "198.18.0.0/24"] {
        node.dp
            .ensure_blackhole(cidr.parse().expect("cidr"))
            .await
            .expect("blackhole");
        node.dp
            .ensure_blackhole(cidr.parse().expect("cidr"))
            .await
            .expect("idempotent");
    }
    let routes = node.dp.flock_routes().await.expect("list");
    let holes: Vec<String> = routes
        .iter()
        .filter(|r| r.kind == RouteKind::Blackhole)
        .map(|r| r.dst.to_string())
        .collect();
    assert_eq!(holes, vec!["198.18.0.0/24", "2001:db8:0:1::/64"]);
    assert!(
        node.ns
            .ip_output(&["route", "show", "type", "blackhole"])
            .contains("198.18.0.0/24 proto 97")
    );
    for cidr in ["2001:db8:0:1::/64", "198.18.0.0/24"] {
        node.dp
            .remove_route(cidr.parse().expect("cidr"))
            .await
            .expect("remove blackhole");
    }
    assert!(
        node.dp.flock_routes().await.expect("list").is_empty(),
        "blackholes removed"
    );
    node.dp
        .set_multipath_hash_policy()
        .await
        .expect("hash policy");
    assert_eq!(node.ns.sysctl("ipv4/fib_multipath_hash_policy"), "1");
    assert_eq!(node.ns.sysctl("ipv6/fib_multipath_hash_policy"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_namespace_is_opened_once_checked_and_never_the_nodes() {
    use flock_netlink::{NetnsRefusal, PodNetns, netns_inode};
    let pod = NetnsGuard::new("open");
    let node = NetnsGuard::new("opennode");
    let node_inode = netns_inode(&node.path()).expect("node inode");
    let limit = Duration::from_secs(1);

    let opened = PodNetns::open(&pod.path(), &[node_inode], limit)
        .await
        .expect("a pod namespace opens");
    assert_eq!(opened.inode(), netns_inode(&pod.path()).expect("inode"));

    let refused = PodNetns::open(&node.path(), &[node_inode], limit).await;
    assert!(
        matches!(refused, Err(NetnsRefusal::NodeNamespace { .. })),
        "{refused:?}"
    );
    // The test's own namespace, as a process path: refused the same way.
    let own = std::path::Path::new("/proc/self/ns/net");
    let own_inode = netns_inode(own).expect("own namespace");
    let refused = PodNetns::open(own, &[node_inode, own_inode], limit).await;
    assert!(
        matches!(refused, Err(NetnsRefusal::NodeNamespace { .. })),
        "{refused:?}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"not a namespace").expect("file");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).expect("mkfifo");
    let started = std::time::Instant::now();
    for (path, what) in [
        (file.as_path(), "a regular file"),
        (fifo.as_path(), "a FIFO"),
        (std::path::Path::new("/proc/self/ns/mnt"), "another kind"),
    ] {
        match PodNetns::open(path, &[node_inode], limit).await {
            Err(e @ NetnsRefusal::NotANetns { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(&path.display().to_string()) && text.contains(what),
                    "{text}"
                );
            }
            other => panic!("{}: {other:?}", path.display()),
        }
    }
    assert!(
        started.elapsed() < limit,
        "a FIFO does not hold the open up"
    );
    let missing = PodNetns::open(&dir.path().join("gone"), &[node_inode], limit).await;
    assert!(
        matches!(missing, Err(NetnsRefusal::Unopenable { .. })),
        "{missing:?}"
    );
}
