//! End to end, as root: the real `flock-agent` in a node namespace with a
//! `dir:` datastore, pods as namespaces added through the real `flock`
//! plugin with kubelet-style environment.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use flock_ipam::{Identity, IpAlgo};
use flock_testkit::agent::{AgentNode, Pod, default_node_config};
use flock_testkit::{NetnsGuard, udp_echo, udp_probe};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
const ECHO_PORT: u16 = 7007;

fn plugin() -> PathBuf {
    let path = Path::new(AGENT).with_file_name("flock");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

fn start() -> AgentNode {
    let node = AgentNode::start(Path::new(AGENT), &plugin(), &default_node_config());
    node.put_test_pools();
    node
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "plugin failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("result JSON")
}

fn error_code(out: &Output) -> u64 {
    assert!(
        !out.status.success(),
        "expected failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    v["code"].as_u64().expect("code")
}

fn add(node: &AgentNode, name: &str, annotations: &[(&str, &str)]) -> Pod {
    node.add_pod(name, annotations, CONF)
}

#[test]
fn dual_stack_by_default_and_pods_reach_each_other() {
    let node = start();
    let a = add(&node, "web-a", &[]);
    let b = add(&node, "web-b", &[]);
    assert_eq!(a.result["cniVersion"], "1.0.0");
    let ips = a.ips();
    assert_eq!(ips.len(), 2, "{}", a.result);
    assert!(
        ips[0].is_ipv4() && ips[1].is_ipv6(),
        "primary IPv4 first, then IPv6: {ips:?}"
    );
    assert_eq!(
        a.result["interfaces"][1]["sandbox"],
        a.ns.path().display().to_string()
    );
    assert!(
        a.result["interfaces"][0].get("sandbox").is_none(),
        "host end has no sandbox"
    );
    assert_eq!(a.result["routes"].as_array().map(Vec::len), Some(2));
    let _echo = udp_echo(&b.ns.netns(), ECHO_PORT);
    for v4 in [true, false] {
        let to = SocketAddr::new(b.ip(v4), ECHO_PORT);
        assert!(
            udp_probe(&a.ns.netns(), to, Duration::from_secs(2)).is_some(),
            "a → b at {to}"
        );
    }
    // The node has blackholes for its prefixes.
    let holes = node.node.ip_output(&["route", "show", "type", "blackhole"]);
    assert!(holes.contains("198.18.0.0/24"), "{holes}");
}

#[test]
fn every_annotation_is_honoured() {
    let node = start();
    let v6only = add(&node, "v6only", &[("flock.fritzlab.net/ipv4", "false")]);
    assert!(
        v6only.ips().iter().all(IpAddr::is_ipv6),
        "{}",
        v6only.result
    );

    let sub = add(
        &node,
        "sub",
        &[
            ("flock.fritzlab.net/cidr4", "198.18.0.128/25"),
            ("flock.fritzlab.net/cidr6", "2001:db8:0:1:abcd::/80"),
        ],
    );
    assert_eq!(sub.ip(true).to_string(), "198.18.0.130");
    assert!(
        sub.ip(false).to_string().starts_with("2001:db8:0:1:abcd:"),
        "{}",
        sub.ip(false)
    );

    let algo = add(
        &node,
        "algo",
        &[("flock.fritzlab.net/ip-algo", "namespace,app")],
    );
    let parsed: IpAlgo = "namespace,app".parse().expect("algo");
    let prefix = parsed
        .workload_prefix(
            "2001:db8:0:1::/64".parse().expect("net"),
            &Identity {
                namespace: "default",
                app: "algo",
                image: Some("busybox:1"),
                container_id: &algo.id,
            },
        )
        .expect("layout");
    let IpAddr::V6(ip6) = algo.ip(false) else {
        unreachable!("ip(false) is IPv6")
    };
    assert!(prefix.contains(&ip6), "{ip6} in {prefix}");

    let any = add(
        &node,
        "any",
        &[
            ("flock.fritzlab.net/anycast", "2001:db8:ffff::1,203.0.113.1"),
            ("flock.fritzlab.net/addresses", "203.0.113.50"),
        ],
    );
    let lo = any.ns.ip_output(&["addr", "show", "dev", "lo"]);
    assert!(
        lo.contains("2001:db8:ffff::1/128") && lo.contains("203.0.113.1/32"),
        "{lo}"
    );
    let eth0 = any.ns.ip_output(&["addr", "show", "dev", "eth0"]);
    assert!(eth0.contains("203.0.113.50/32"), "{eth0}");
    assert!(
        any.ips().contains(&"203.0.113.50".parse().expect("ip")),
        "addresses in the result"
    );

    let bad = NetnsGuard::new("pod");
    node.put_pod("bad", &[("flock.fritzlab.net/ipv4", "maybe")], true);
    let out = node.cni("ADD", "c0ffeebad", Some(&bad.path()), "bad", CONF);
    assert_eq!(error_code(&out), 7);
    assert!(String::from_utf8_lossy(&out.stdout).contains("flock.fritzlab.net/ipv4"));
    // The dir datastore has no API server: the pod's event is logged, once
    // per 30 s however often the runtime retries.
    let _ = node.cni("ADD", "c0ffeebad", Some(&bad.path()), "bad", CONF);
    let logged: Vec<String> = node
        .log()
        .lines()
        .filter(|l| l.contains("pod event") && l.contains("default/bad"))
        .map(str::to_owned)
        .collect();
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(
        logged[0].contains("FlockInvalidConfig") && logged[0].contains("flock.fritzlab.net/ipv4"),
        "{logged:?}"
    );
}

#[test]
fn retried_add_is_stable_del_removes_every_trace_and_check_sees_drift() {
    let node = start();
    let pod = add(&node, "web", &[]);
    let again = json(&node.cni("ADD", &pod.id, Some(&pod.ns.path()), &pod.name, CONF));
    assert_eq!(
        again["ips"], pod.result["ips"],
        "a retried ADD returns the same IPs"
    );

    let check = node.cni("CHECK", &pod.id, Some(&pod.ns.path()), &pod.name, CONF);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    pod.ns.ip(&[
        "addr",
        "del",
        &format!("{}/32", pod.ip(true)),
        "dev",
        "eth0",
    ]);
    let check = node.cni("CHECK", &pod.id, Some(&pod.ns.path()), &pod.name, CONF);
    assert_eq!(error_code(&check), 103);
    assert!(String::from_utf8_lossy(&check.stdout).contains(&pod.ip(true).to_string()));

    let del = node.cni("DEL", &pod.id, Some(&pod.ns.path()), &pod.name, CONF);
    assert!(del.status.success() && del.stdout.is_empty());
    assert!(
        node.cni("DEL", &pod.id, None, &pod.name, CONF)
            .status
            .success(),
        "DEL again, without netns"
    );
    std::thread::sleep(Duration::from_millis(300));
    let links = node.node.ip_output(&["-br", "link"]);
    assert!(!links.contains("flock"), "{links}");
    let routes = node.node.ip_output(&["route", "show", "proto", "97"]);
    assert!(!routes.contains(&pod.ip(true).to_string()), "{routes}");
    let store = node.settled_store();
    assert!(store.iter().all(|a| a.container_id != pod.id), "{store:?}");
    // The address is free again, but the last to be reused: peers may
    // still know it as the deleted pod.
    let next = add(&node, "next", &[]);
    assert_ne!(next.ip(true), pod.ip(true));
    assert_eq!(
        next.ip(true).to_string(),
        "198.18.0.3",
        "the lowest never-used"
    );
}

#[test]
fn portmap_and_bandwidth_chain_after_flock() {
    let node = start();
    node.put_pod("chained", &[], true);
    let pod = NetnsGuard::new("pod");
    let flock_conf = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;
    let result = json(&node.cni("ADD", "chain1", Some(&pod.path()), "chained", flock_conf));
    let env = |cmd: &str| {
        vec![
            ("CNI_COMMAND", cmd.to_owned()),
            ("CNI_CONTAINERID", "chain1".to_owned()),
            ("CNI_NETNS", pod.path().display().to_string()),
            ("CNI_IFNAME", "eth0".to_owned()),
            ("CNI_PATH", "/usr/lib/cni".to_owned()),
            // Runtimes pass their PATH on; portmap finds iptables through it.
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin".to_owned()),
        ]
    };
    // Chained plugins act on the node's namespace, so they run inside it.
    let run = |binary: &str, cmd: &str, conf: Value| -> Output {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", node.node.name(), binary])
            .env_clear();
        for (k, v) in env(cmd) {
            c.env(k, v);
        }
        let mut child = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("stdin");
        child.wait_with_output().expect("wait")
    };
    let portmap = serde_json::json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]},
        "prevResult": result,
    });
    let out = run("/usr/lib/cni/portmap", "ADD", portmap.clone());
    let after_portmap = json(&out);
    assert_eq!(
        after_portmap["ips"], result["ips"],
        "portmap passes flock's result on"
    );
    let bandwidth = serde_json::json!({
        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "bandwidth",
        "ingressRate": 1_000_000, "ingressBurst": 100_000, "egressRate": 1_000_000, "egressBurst": 100_000,
        "prevResult": after_portmap,
    });
    let out = run("/usr/lib/cni/bandwidth", "ADD", bandwidth.clone());
    let final_result = json(&out);
    let qdisc = node.node.ip_output(&["-br", "link"]);
    assert!(qdisc.contains("bwp"), "bandwidth added its ifb: {qdisc}");
    // DEL in reverse order.
    for (bin, conf) in [
        ("/usr/lib/cni/bandwidth", bandwidth),
        ("/usr/lib/cni/portmap", portmap),
    ] {
        let mut conf = conf;
        conf["prevResult"] = final_result.clone();
        let out = run(bin, "DEL", conf);
        assert!(
            out.status.success(),
            "{bin} DEL: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        node.cni("DEL", "chain1", Some(&pod.path()), "chained", flock_conf)
            .status
            .success()
    );
}

#[test]
fn startup_releases_what_a_reboot_or_crash_left() {
    let mut node = start();
    let gone = add(&node, "gone", &[]);
    let kept = add(&node, "kept", &[]);
    node.kill();
    // A reboot: the veth of "gone" vanished and no runtime will send its DEL.
    node.node
        .ip(&["link", "del", &format!("flock{:08x}", fnv(&gone.id))]);
    // An orphan flock veth no allocation claims.
    node.node.ip(&[
        "link",
        "add",
        "flock0badc0de",
        "type",
        "veth",
        "peer",
        "name",
        "orphanpeer",
    ]);
    node.spawn();
    let links = node.node.ip_output(&["-br", "link"]);
    assert!(!links.contains("flock0badc0de"), "orphan deleted: {links}");
    let store = node.settled_store();
    let ids: Vec<&str> = store.iter().map(|a| a.container_id.as_str()).collect();
    assert!(
        !ids.contains(&gone.id.as_str()) && ids.contains(&kept.id.as_str()),
        "{ids:?}"
    );
    let check = node.cni("CHECK", &kept.id, Some(&kept.ns.path()), &kept.name, CONF);
    assert!(
        check.status.success(),
        "the surviving pod is intact: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let fresh = add(&node, "fresh", &[]);
    assert_ne!(
        fresh.ip(true),
        gone.ip(true),
        "the released address is the last to be handed out again"
    );
    assert_eq!(fresh.ip(true).to_string(), "198.18.0.4");
}

fn fnv(s: &str) -> u32 {
    flock_ipam::fnv1a32(s.as_bytes())
}

#[test]
fn metrics_report_rpcs_and_pools() {
    let node = start();
    add(&node, "m", &[]);
    let body = node
        .node
        .netns()
        .spawn(|| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9602").map_err(|e| {
                flock_netlink::NetlinkError::Io {
                    what: "connect".into(),
                    source: e,
                }
            })?;
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            Ok(out)
        })
        .join()
        .expect("thread")
        .expect("metrics");
    assert!(
        body.contains("flock_rpc_duration_seconds_count{op=\"ADD\",result=\"ok\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("flock_ipam_in_use{family=\"ipv4\"} 1"),
        "{body}"
    );
}

#[test]
fn a_nodeconfig_change_applies_to_new_pods_and_old_pods_keep_their_addresses() {
    let node = start();
    let old = add(&node, "before", &[]);
    assert!(old.ip(true).to_string().starts_with("198.18.0."));
    std::fs::write(
        node.manifests().join("nodeconfig.yaml"),
        flock_testkit::agent::node_config(
            "  cidr6: 2001:db8:0:2::/64\n  cidr4: 198.19.0.0/24\n  mtu: 1400",
            "",
        ),
    )
    .expect("rewrite NodeConfig");
    std::thread::sleep(Duration::from_millis(600));
    let new = add(&node, "after", &[]);
    assert!(
        new.ip(true).to_string().starts_with("198.19.0."),
        "{}",
        new.ip(true)
    );
    assert!(
        new.ip(false).to_string().starts_with("2001:db8:0:2:"),
        "{}",
        new.ip(false)
    );
    let check = node.cni("CHECK", &old.id, Some(&old.ns.path()), &old.name, CONF);
    assert!(
        check.status.success(),
        "the old pod keeps its addresses: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    // While "before" holds an address of the old prefix, the old prefix
    // keeps its blackhole and its announcement; then it goes.
    let bird_has = |prefix: &str| {
        std::fs::read_to_string(node.bird_config())
            .unwrap_or_default()
            .contains(&format!("route {prefix} blackhole;"))
    };
    let wait = |what: &str, ok: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !ok() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let holes = || node.node.ip_output(&["route", "show", "type", "blackhole"]);
    wait(
        "both prefixes blackholed and announced while the old one is held",
        &|| {
            let h = holes();
            h.contains("198.19.0.0/24")
                && h.contains("198.18.0.0/24")
                && bird_has("198.19.0.0/24")
                && bird_has("198.18.0.0/24")
        },
    );
    assert!(
        node.cni("DEL", &old.id, Some(&old.ns.path()), &old.name, CONF)
            .status
            .success()
    );
    wait(
        "the old prefix withdrawn once no pod holds an address in it",
        &|| {
            let h = holes();
            h.contains("198.19.0.0/24")
                && !h.contains("198.18.0.0/24")
                && !bird_has("198.18.0.0/24")
        },
    );
}

#[test]
fn concurrent_adds_of_one_container_are_serialised_into_one_allocation() {
    let node = start();
    node.put_pod("twice", &[], true);
    let ns = NetnsGuard::new("pod");
    let results: Vec<Output> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| node.cni("ADD", "samecontainer", Some(&ns.path()), "twice", CONF)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let first = json(&results[0]);
    for r in &results[1..] {
        assert_eq!(
            json(r)["ips"],
            first["ips"],
            "every ADD answers with the one allocation"
        );
    }
    let store = flock_store::Store::read_only(&node.state_dir()).expect("store");
    assert_eq!(store.len(), 1);
}

#[test]
fn gc_removes_every_attachment_the_runtime_no_longer_lists() {
    let node = start();
    let keep = add(&node, "keep", &[]);
    let drop_me = add(&node, "stale", &[]);
    let gc_conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "flock",
        "cni.dev/valid-attachments": [{"containerID": keep.id, "ifname": "eth0"}],
    })
    .to_string();
    let out = node.cni("GC", "", None, "", &gc_conf);
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let store = node.settled_store();
    let ids: Vec<&str> = store.iter().map(|a| a.container_id.as_str()).collect();
    assert_eq!(ids, vec![keep.id.as_str()]);
    let stale_iface = format!("flock{:08x}", fnv(&drop_me.id));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while node.node.ip_output(&["-br", "link"]).contains(&stale_iface) {
        assert!(std::time::Instant::now() < deadline, "stale veth deleted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let check = node.cni("CHECK", &keep.id, Some(&keep.ns.path()), &keep.name, CONF);
    assert!(check.status.success(), "the listed pod is untouched");
    // Without the list nothing is collected.
    let out = node.cni(
        "GC",
        "",
        None,
        "",
        r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"flock"}"#,
    );
    assert!(out.status.success());
    assert_eq!(
        flock_store::Store::read_only(&node.state_dir())
            .expect("store")
            .len(),
        1
    );
}

#[test]
fn anycast_routes_follow_pod_readiness() {
    let node = start();
    let any = "203.0.113.77";
    let ann = [("flock.fritzlab.net/anycast", any)];
    let a = add(&node, "any-a", &ann);
    let b = add(&node, "any-b", &ann);
    let route = || node.node.ip_output(&["route", "show", any]);
    let wait = |what: &str, ok: &dyn Fn(&str) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = route();
            if ok(&r) {
                return r;
            }
            assert!(std::time::Instant::now() < deadline, "{what}: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // Both Ready: one multipath route with both pods, and BIRD told to announce it.
    let r = wait("two nexthops", &|r| r.matches("nexthop via").count() == 2);
    let bird = |want: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let conf = std::fs::read_to_string(node.bird_config()).unwrap_or_default();
            if conf.contains(&format!("route {any}/32 blackhole;")) == want
                && conf.contains("198.18.0.0/24")
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "bird.conf announces {any}: {want}\n{conf}\n{}",
                node.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    bird(true);
    assert!(
        r.contains(&a.ip(true).to_string()) && r.contains(&b.ip(true).to_string()),
        "{r}"
    );
    // a turns NotReady: only b is left, as a plain route.
    node.put_pod("any-a", &ann, false);
    let r = wait("one nexthop", &|r| {
        r.contains(&format!("via {}", b.ip(true))) && !r.contains("nexthop")
    });
    assert!(!r.contains(&a.ip(true).to_string()), "{r}");
    // b deleted: no Ready pod holds it, so no route.
    assert!(
        node.cni("DEL", &b.id, Some(&b.ns.path()), &b.name, CONF)
            .status
            .success()
    );
    wait("no route", &|r| r.trim().is_empty());
    bird(false);
    // Traffic: a Ready again, and a peer reaches the anycast IP on a's lo.
    node.put_pod("any-a", &ann, true);
    wait("back", &|r| r.contains(&format!("via {}", a.ip(true))));
    let peer = add(&node, "peer", &[]);
    let _echo = flock_testkit::udp_echo_on(
        &a.ns.netns(),
        SocketAddr::new(any.parse().expect("ip"), ECHO_PORT),
    );
    let to = SocketAddr::new(any.parse().expect("ip"), ECHO_PORT);
    assert!(
        udp_probe(&peer.ns.netns(), to, Duration::from_secs(2)).is_some(),
        "anycast reaches the Ready pod"
    );
    // Removed by hand: the loop works from what it installed and lists the
    // node's routes again every 30 s, so the route comes back by then.
    node.node.ip(&["route", "del", any]);
    assert!(route().trim().is_empty(), "{}", route());
    let deadline = std::time::Instant::now() + Duration::from_secs(35);
    while !route().contains(&format!("via {}", a.ip(true))) {
        assert!(
            std::time::Instant::now() < deadline,
            "the anycast route removed by hand did not come back:\n{}",
            node.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
