//! Claimed addresses and what the node announces, for real: a ToR running
//! BIRD peered with a node running BIRD and the real agent, pods through
//! the real plugin. Every refusal (a namespace the pool does not select,
//! another pod's address, an IP an older pod claims, a node prefix, a
//! prefix the node still holds, no pool) fails the ADD and changes
//! nothing, on the node or the ToR; a replica whose veth is gone leaves a
//! shared IP routed and announced through the others; a narrowed pool
//! withdraws; a terminating pod leaves its nexthops; a peer added or
//! removed restarts no other session; a configuration BIRD would refuse
//! never replaces the good bird.conf.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use flock_testkit::NetnsGuard;
use flock_testkit::agent::{AgentNode, TEST_POOLS, node_config_for};
use flock_testkit::fabric::{self, Rack, RouteMonitor, until};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;

fn failure(out: &std::process::Output) -> (u64, String) {
    assert!(
        !out.status.success(),
        "expected a refusal: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    (v["code"].as_u64().expect("code"), v["msg"].to_string())
}

fn tor_routes(tor: &NetnsGuard) -> String {
    tor.ip_output(&["route"]) + &tor.ip_output(&["-6", "route"])
}

/// A pod manifest of `default` on node-a with `annotations`, optionally
/// being deleted.
fn pod(name: &str, annotations: &str, deleting: bool) -> String {
    let deletion = if deleting {
        "\n  deletionTimestamp: '2026-12-01T00:00:00Z'"
    } else {
        ""
    };
    manifest(
        "default",
        name,
        "node-a",
        &format!("'2026-11-01T00:00:00Z'{deletion}"),
        annotations,
        "",
    )
}

/// A pod manifest: `created` is the creationTimestamp (and any metadata
/// lines after it), `pod_ips` its `status.podIPs` entries.
fn manifest(
    namespace: &str,
    name: &str,
    node: &str,
    created: &str,
    annotations: &str,
    pod_ips: &str,
) -> String {
    let uid = flock_testkit::agent::pod_uid(namespace, name);
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: {uid}\n  creationTimestamp: {created}\n  annotations: {{{annotations}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: 'busybox:1'}}]\nstatus:\n  podIPs: [{pod_ips}]\n  conditions: [{{type: Ready, status: 'True'}}]\n"
    )
}

fn add(node: &AgentNode, name: &str, ns: &NetnsGuard) -> std::process::Output {
    add_in(node, "default", name, ns)
}

fn add_in(node: &AgentNode, namespace: &str, name: &str, ns: &NetnsGuard) -> std::process::Output {
    node.cni_in(
        namespace,
        "ADD",
        &format!("c0ffee{name}"),
        Some(&ns.path()),
        name,
        CONF,
    )
}

fn rack() -> Rack {
    Rack::start(Path::new(AGENT), &Path::new(AGENT).with_file_name("flock"))
}

#[test]
fn claims_need_consent_take_nothing_and_what_is_announced_is_what_is_routed() {
    let mut rack = rack();
    let (a, tor) = (&mut rack.a, &rack.tor);
    let node = &a.node;

    // The victim, and tenants who try to take its addresses or an IP no
    // pool covers.
    let victim_ns = NetnsGuard::new("pod");
    node.put_manifest("victim", &pod("victim", "", false));
    let victim = flock_testkit::agent::result_ips(
        &serde_json::from_slice(&add(node, "victim", &victim_ns).stdout).expect("victim"),
    );
    let (v4, v6) = (victim[0], victim[1]);
    let host_routes = || {
        node.node.ip_output(&["route", "show", &v4.to_string()])
            + &node
                .node
                .ip_output(&["-6", "route", "show", &v6.to_string()])
    };
    let before = (host_routes(), tor_routes(tor));
    for (name, annotation, reason) in [
        (
            "thief",
            format!("flock.fritzlab.net/addresses: '{v4},{v6}'"),
            "inside NodeConfig node-a's pod prefix",
        ),
        (
            "resolver",
            "flock.fritzlab.net/anycast: '8.8.8.8'".to_owned(),
            "no AddressPool of use anycast contains it",
        ),
    ] {
        node.put_manifest(name, &pod(name, &annotation, false));
        let ns = NetnsGuard::new("pod");
        let (code, msg) = failure(&add(node, name, &ns));
        assert_eq!(code, 7, "{msg}");
        assert!(
            msg.contains(&format!("pod default/{name}")) && msg.contains(reason),
            "{msg}"
        );
        // Its sandbox is torn down by the runtime; nothing was left anyway.
        let _ = node.cni(
            "DEL",
            &format!("c0ffee{name}"),
            Some(&ns.path()),
            name,
            CONF,
        );
    }
    std::thread::sleep(flock_agent::anycast::ANYCAST_TICK + Duration::from_millis(500));
    assert_eq!(
        host_routes(),
        before.0,
        "the victim's host routes are untouched"
    );
    assert_eq!(tor_routes(tor), before.1, "the ToR's routes are untouched");
    assert!(!node.node.ip_output(&["route"]).contains("8.8.8.8"));
    assert_eq!(node.flock_links().len(), 1, "only the victim's veth");

    // An anycast service: announced while a pool covers it.
    let svc: IpAddr = "203.0.113.77".parse().expect("ip");
    let ann = format!("flock.fritzlab.net/anycast: '{svc}'");
    let (s1, s2) = (NetnsGuard::new("pod"), NetnsGuard::new("pod"));
    for (name, ns) in [("svc-1", &s1), ("svc-2", &s2)] {
        node.put_manifest(name, &pod(name, &ann, false));
        assert!(add(node, name, ns).status.success(), "{name}");
    }
    let route_to_svc = || node.node.ip_output(&["route", "show", &svc.to_string()]);
    until("two nexthops, announced", Duration::from_secs(15), || {
        let r = route_to_svc();
        (r.matches("nexthop").count() == 2 && tor_routes(tor).contains(&svc.to_string()))
            .then_some(r)
    });
    // A third replica whose veth goes away under the agent (its entry
    // stays): the kernel drops the whole multipath route, and the next
    // pass routes the IP through the two veths that exist, still announced.
    let s3 = NetnsGuard::new("pod");
    let links = node.flock_links();
    node.put_manifest("svc-3", &pod("svc-3", &ann, false));
    assert!(add(node, "svc-3", &s3).status.success(), "svc-3");
    until("three nexthops", Duration::from_secs(15), || {
        let r = route_to_svc();
        (r.matches("nexthop").count() == 3).then_some(r)
    });
    let gone = node
        .flock_links()
        .into_iter()
        .find(|l| !links.contains(l))
        .expect("svc-3's veth");
    node.node.ip(&["link", "del", &gone]);
    until(
        "routed through the other two, still announced",
        Duration::from_secs(15),
        || {
            let r = route_to_svc();
            (r.matches("nexthop").count() == 2
                && !r.contains(&gone)
                && tor_routes(tor).contains(&svc.to_string()))
            .then_some(r)
        },
    );
    let log = node.log();
    assert!(
        log.contains(&format!(
            "dev {gone} left out until its host veth exists again"
        )),
        "{log}"
    );
    let (_, metrics) = node.http("/metrics");
    assert!(
        metrics.contains("flock_errors_total{kind=\"anycast\"}"),
        "{metrics}"
    );
    let del = node.cni("DEL", "c0ffeesvc-3", Some(&s3.path()), "svc-3", CONF);
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stdout)
    );
    // svc-2 is being deleted (a preStop drain): out of the nexthops at once.
    node.put_manifest("svc-2", &pod("svc-2", &ann, true));
    until("one nexthop", Duration::from_secs(5), || {
        let r = route_to_svc();
        (!r.is_empty() && !r.contains("nexthop")).then_some(r)
    });
    // The pool narrows so that it no longer covers the IP: withdrawn on
    // the node and on the ToR, and logged.
    node.put_manifest(
        "test-pools",
        &TEST_POOLS.replacen("203.0.113.0/24", "203.0.113.0/26", 1),
    );
    until(
        "withdrawn from the node and the ToR",
        Duration::from_secs(15),
        || {
            (route_to_svc().is_empty() && !tor_routes(tor).contains(&svc.to_string()))
                .then_some(String::new())
        },
    );
    assert!(
        node.log()
            .contains("203.0.113.77 withdrawn: no AddressPool of use anycast contains it")
    );
    let (_, metrics) = node.http("/metrics");
    assert!(metrics.contains("flock_withdrawn_claims 1"), "{metrics}");
    node.put_test_pools();
    until("announced again", Duration::from_secs(15), || {
        tor_routes(tor)
            .contains(&svc.to_string())
            .then_some(String::new())
    });

    // A new peer (sorting before the ToR): no other session restarts.
    let monitor = RouteMonitor::start(tor);
    let spec = fabric::node_spec(1, 65001) + "\n    - {address: 198.19.1.2, asn: 65010}";
    node.put_manifest("nodeconfig", &node_config_for("node-a", &spec, ""));
    until(
        "bird.conf with the new peer",
        Duration::from_secs(10),
        || {
            let c = std::fs::read_to_string(node.bird_config()).ok()?;
            c.contains("protocol bgp peer_198_19_1_2 {").then_some(c)
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let changes = monitor.stop();
    assert!(
        !changes.lines().any(|l| l.starts_with("Deleted")
            && (l.contains("198.18.1.0/24")
                || l.contains("2001:db8:0:1::/64")
                || l.contains("203.0.113.77"))),
        "adding a peer withdrew routes on the ToR:\n{changes}"
    );
    // The peer removed again: no other session restarts either. (Its
    // sessions up first, or a restart would have nothing to withdraw.)
    until(
        "the ToR has node-a's routes",
        Duration::from_secs(30),
        || {
            let r = tor_routes(tor);
            (r.contains("198.18.1.0/24 via 198.19.1.1")
                && r.contains("2001:db8:0:1::/64 via 2001:db8:ff:1::1")
                && r.contains("203.0.113.77"))
            .then_some(r)
        },
    );
    let monitor = RouteMonitor::start(tor);
    node.put_manifest(
        "nodeconfig",
        &node_config_for("node-a", &fabric::node_spec(1, 65001), ""),
    );
    until(
        "bird.conf without the peer",
        Duration::from_secs(10),
        || {
            let c = std::fs::read_to_string(node.bird_config()).ok()?;
            (!c.contains("peer_198_19_1_2 ") && c.contains("protocol bgp peer_198_19_1_254 {"))
                .then_some(c)
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    let changes = monitor.stop();
    assert!(
        !changes.lines().any(|l| l.starts_with("Deleted")
            && (l.contains("198.18.1.0/24")
                || l.contains("2001:db8:0:1::/64")
                || l.contains("203.0.113.77"))),
        "removing a peer withdrew routes on the ToR:\n{changes}"
    );
    assert!(
        tor_routes(tor).contains("198.18.1.0/24 via 198.19.1.1")
            && tor_routes(tor).contains("203.0.113.77"),
        "the ToR still has node-a's routes"
    );

    // A link-local peer with no interface (BIRD would refuse it): the
    // NodeConfig is refused by field before rendering, the good bird.conf
    // stays on disk, and it shows as a warning, not a failure.
    let good = std::fs::read_to_string(node.bird_config()).expect("bird.conf");
    let spec = fabric::node_spec(1, 65001) + "\n    - {address: 'fe80::1', asn: 65010}";
    node.put_manifest("nodeconfig", &node_config_for("node-a", &spec, ""));
    let body = until("the refusal is a warning", Duration::from_secs(10), || {
        let (status, body) = node.http("/readyz");
        (status == 200 && body.contains("nodeconfig")).then_some(body)
    });
    assert!(body.starts_with("ready; "), "{body}");
    let log = node.log();
    assert!(
        log.contains("NodeConfig refused")
            && log.contains("address")
            && log.contains("fe80::1")
            && log.contains("peer by `interface` instead"),
        "the refusal names the peer's field:\n{log}"
    );
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        std::fs::read_to_string(node.bird_config()).expect("bird.conf"),
        good,
        "the good bird.conf is kept"
    );
    let (_, m) = node.http("/metrics");
    assert!(
        !m.contains("flock_bird_reloads_total{result=\"refused\"}"),
        "nothing reached bird -p:\n{m}"
    );
    drop(a.bird.take());
}

/// Pools for the refusals: anycast from 203.0.113.0/26 for namespaces
/// labelled `team: dns` only, `addresses` from 198.51.100.0/24 for every
/// namespace.
const REFUSAL_POOLS: &str = "apiVersion: flock.fritzlab.net/v1alpha1
kind: AddressPool
metadata: {name: team-dns}
spec:
  cidrs: [203.0.113.0/26]
  use: anycast
  namespaceSelector: {matchLabels: {team: dns}}
---
apiVersion: flock.fritzlab.net/v1alpha1
kind: AddressPool
metadata: {name: public}
spec:
  cidrs: [198.51.100.0/24]
  use: addresses
";

#[test]
fn every_refusal_fails_the_add_and_leaves_the_victim_and_the_tor_as_they_were() {
    let rack = rack();
    let (node, tor) = (&rack.a.node, &rack.tor);
    node.put_manifest("test-pools", REFUSAL_POOLS);
    node.put_manifest(
        "namespaces",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: dns-team, labels: {team: dns}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
    );
    // Pods of node-b (no agent there): one whose own address is outside
    // every NodeConfig prefix, and an older one claiming an `addresses` IP.
    node.put_manifest(
        "remote",
        &manifest(
            "default",
            "remote",
            "node-b",
            "'2026-10-01T00:00:00Z'",
            "",
            "{ip: 198.51.100.20}",
        ),
    );
    node.put_manifest(
        "owner",
        &manifest(
            "default",
            "owner",
            "node-b",
            "'2026-10-01T00:00:00Z'",
            "flock.fritzlab.net/addresses: '198.51.100.30'",
            "",
        ),
    );
    let victim_ns = NetnsGuard::new("pod");
    node.put_manifest("victim", &pod("victim", "", false));
    let added = add(node, "victim", &victim_ns);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stdout)
    );
    let victim =
        flock_testkit::agent::result_ips(&serde_json::from_slice(&added.stdout).expect("victim"));
    let (v4, v6) = (victim[0], victim[1]);
    let host_routes = || {
        node.node.ip_output(&["route", "show", &v4.to_string()])
            + &node
                .node
                .ip_output(&["-6", "route", "show", &v6.to_string()])
    };

    // Each refusal: code 7 naming pod, key, value and reason; nothing of
    // the pod left; the victim's routes and the ToR's routes unchanged.
    let refused = |namespace: &str,
                   name: &str,
                   created: &str,
                   key: &str,
                   value: &str,
                   reason: &str| {
        let family = if value.contains(':') { "-6" } else { "-4" };
        let routes_to = || node.node.ip_output(&[family, "route", "show", value]);
        let before = (
            host_routes(),
            tor_routes(tor),
            node.flock_links(),
            node.settled_store().len(),
            routes_to(),
        );
        node.put_manifest(
            name,
            &manifest(
                namespace,
                name,
                "node-a",
                created,
                &format!("{key}: '{value}'"),
                "",
            ),
        );
        let ns = NetnsGuard::new("pod");
        let (code, msg) = failure(&add_in(node, namespace, name, &ns));
        assert_eq!(code, 7, "{msg}");
        let whose = format!("pod {namespace}/{name}");
        for part in [whose.as_str(), key, value, reason] {
            assert!(msg.contains(part), "{part:?} not in {msg}");
        }
        // Its sandbox is torn down by the runtime; nothing was left anyway.
        let _ = node.cni_in(
            namespace,
            "DEL",
            &format!("c0ffee{name}"),
            Some(&ns.path()),
            name,
            CONF,
        );
        std::thread::sleep(flock_agent::anycast::ANYCAST_TICK + Duration::from_millis(500));
        assert_eq!(
            (
                host_routes(),
                tor_routes(tor),
                node.flock_links(),
                node.settled_store().len(),
                routes_to(),
            ),
            before,
            "{name}: the victim's routes, the ToR's routes, the veths and the store are as they were"
        );
    };
    let newer = "'2026-11-01T00:00:00Z'";
    refused(
        "other",
        "intruder",
        newer,
        "flock.fritzlab.net/anycast",
        "203.0.113.10",
        "AddressPool team-dns contains it but does not select namespace other",
    );
    refused(
        "default",
        "impostor",
        newer,
        "flock.fritzlab.net/addresses",
        "198.51.100.20",
        "it is the address of pod default/remote",
    );
    refused(
        "default",
        "late",
        newer,
        "flock.fritzlab.net/addresses",
        "198.51.100.30",
        "pod default/owner claims it already (it is older)",
    );
    refused(
        "default",
        "thief",
        newer,
        "flock.fritzlab.net/anycast",
        &v4.to_string(),
        "it is inside NodeConfig node-a's pod prefix 198.18.1.0/24",
    );
    refused(
        "default",
        "squatter",
        newer,
        "flock.fritzlab.net/anycast",
        "198.18.1.250",
        "it is inside NodeConfig node-a's pod prefix 198.18.1.0/24",
    );

    // node-a moves to a new prefix while the victim still holds an address
    // of the old one; a pool now covering the old prefix (no NodeConfig's
    // any more) still cannot hand out its IPs.
    let spec = fabric::node_spec(1, 65001).replace("cidr4: 198.18.1.0/24", "cidr4: 198.18.11.0/24");
    node.put_manifest("nodeconfig", &node_config_for("node-a", &spec, ""));
    until(
        "the ToR learns the new prefix",
        Duration::from_secs(15),
        || {
            let r = tor_routes(tor);
            (r.contains("198.18.11.0/24 via 198.19.1.1")
                && r.contains("198.18.1.0/24 via 198.19.1.1"))
            .then_some(r)
        },
    );
    node.put_manifest(
        "old-prefix-pool",
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: AddressPool\nmetadata: {name: old-prefix}\nspec:\n  cidrs: [198.18.1.0/24]\n  use: anycast\n",
    );
    until(
        "the old-prefix pool is in force",
        Duration::from_secs(10),
        || {
            let log = node.log();
            log.contains("\"pools\":3").then_some(log)
        },
    );
    refused(
        "default",
        "squatter",
        newer,
        "flock.fritzlab.net/anycast",
        "198.18.1.250",
        "it is inside 198.18.1.0/24, a prefix this node still holds pod addresses of",
    );

    // And a pod of a namespace the pool selects gets its claim, routed and
    // announced.
    node.put_manifest(
        "resolver",
        &manifest(
            "dns-team",
            "resolver",
            "node-a",
            newer,
            "flock.fritzlab.net/anycast: '203.0.113.10'",
            "",
        ),
    );
    let ns = NetnsGuard::new("pod");
    let out = add_in(node, "dns-team", "resolver", &ns);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    until(
        "203.0.113.10 routed and announced",
        Duration::from_secs(15),
        || {
            let r = tor_routes(tor);
            (!node
                .node
                .ip_output(&["route", "show", "203.0.113.10"])
                .is_empty()
                && r.contains("203.0.113.10 via 198.19.1.1"))
            .then_some(r)
        },
    );
    assert_eq!(
        host_routes().lines().count(),
        2,
        "the victim keeps its routes: {}",
        host_routes()
    );
}
