//! A pod's life under restarts, careless runtimes and a bad store, for
//! real, as root: the agent in a node namespace, pods through the real
//! plugin. (The same rules run against fakes with paused time in the
//! agent's unit tests.)

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use flock_testkit::NetnsGuard;
use flock_testkit::agent::{AgentNode, Pod, default_node_config, node_config, result_ips};
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"flock"}"#;

fn plugin() -> PathBuf {
    let path = Path::new(AGENT).with_file_name("flock");
    assert!(path.exists(), "run with cargo test --workspace");
    path
}

fn start(config: &str) -> AgentNode {
    AgentNode::start(Path::new(AGENT), &plugin(), config)
}

fn ok(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "plugin failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).expect("result JSON")
    }
}

/// The error code and message of a failed call.
fn failure(out: &Output) -> (u64, String) {
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    (
        v["code"].as_u64().expect("code"),
        format!("{} {}", v["msg"], v["details"]),
    )
}

fn iface(id: &str) -> String {
    format!("flock{:08x}", flock_ipam::fnv1a32(id.as_bytes()))
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_del_while_the_nodeconfig_is_held_back_tears_the_pod_down_for_real() {
    let mut node = start(&default_node_config());
    let pod = node.add_pod("web", &[], CONF);
    let (v4, v6) = (pod.ip(true), pod.ip(false));
    node.stop();
    node.hold_node_config();
    node.spawn_serving();
    let add = node.cni("ADD", "c0ffeeother", Some(&pod.ns.path()), "web", CONF);
    assert_eq!(failure(&add).0, 11, "ADD waits for the NodeConfig");
    ok(&node.cni("DEL", &pod.id, Some(&pod.ns.path()), &pod.name, CONF));
    wait_until("the veth is gone", Duration::from_secs(3), || {
        node.flock_links().is_empty()
    });
    assert!(node.settled_store().is_empty(), "both addresses released");
    let routes = node.node.ip_output(&["route", "show", "proto", "97"])
        + &node.node.ip_output(&["-6", "route", "show", "proto", "97"]);
    assert!(
        !routes.contains(&v4.to_string()) && !routes.contains(&v6.to_string()),
        "{routes}"
    );
    let pod_addrs = pod.ns.ip_output(&["addr"]);
    assert!(!pod_addrs.contains(&v4.to_string()), "{pod_addrs}");
    node.release_node_config();
    wait_until("the agent becomes ready", Duration::from_secs(10), || {
        node.cni(
            "STATUS",
            "",
            None,
            "",
            r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"flock"}"#,
        )
        .status
        .success()
    });
    node.add_pod("after", &[], CONF);
}

/// A /29 holds five pods: full, so a freed address is the only choice.
fn small_pool(cidr6: &str) -> String {
    node_config(
        &format!("  cidr6: {cidr6}\n  cidr4: 198.18.0.0/29\n  mtu: 1400"),
        "",
    )
}

#[test]
fn prefix_changes_while_veths_are_being_deleted_never_duplicate_an_address() {
    let node = start(&small_pool("2001:db8:0:1::/64"));
    let mut live: Vec<Pod> = (0..5)
        .map(|i| node.add_pod(&format!("p{i}"), &[], CONF))
        .collect();
    for round in 0..8 {
        let gone = live.remove(0);
        let freed = gone.ip(true);
        ok(&node.cni("DEL", &gone.id, Some(&gone.ns.path()), &gone.name, CONF));
        // Rebuild the allocator while the kernel is still deleting the veth.
        let cidr6 = if round % 2 == 0 {
            "2001:db8:0:2::/64"
        } else {
            "2001:db8:0:1::/64"
        };
        node.put_manifest("nodeconfig", &small_pool(cidr6));
        let name = format!("n{round}");
        node.put_pod(&name, &[], true);
        let ns = NetnsGuard::new("pod");
        let id = format!("c0ffeedefault{name}");
        let deadline = Instant::now() + Duration::from_secs(5);
        let result = loop {
            let out = node.cni("ADD", &id, Some(&ns.path()), &name, CONF);
            if out.status.success() {
                break ok(&out);
            }
            let (code, msg) = failure(&out);
            assert!(code == 102 || code == 11, "round {round}: {msg}");
            ok(&node.cni("DEL", &id, Some(&ns.path()), &name, CONF));
            assert!(Instant::now() < deadline, "round {round}: no address freed");
            std::thread::sleep(Duration::from_millis(10));
        };
        let got = result_ips(&result)[0];
        assert_eq!(
            got, freed,
            "round {round}: the only free address, once freed"
        );
        assert!(
            !node.flock_links().contains(&iface(&gone.id)),
            "round {round}: handed out only after the old veth is gone"
        );
        // The pool is full again: one more pod must not get anyone's address.
        node.put_pod("extra", &[], true);
        let extra_ns = NetnsGuard::new("pod");
        let extra = node.cni("ADD", "c0ffeeextra", Some(&extra_ns.path()), "extra", CONF);
        assert_eq!(failure(&extra).0, 102, "round {round}: the pool is full");
        ok(&node.cni("DEL", "c0ffeeextra", Some(&extra_ns.path()), "extra", CONF));
        live.push(Pod {
            ns,
            name,
            id,
            result,
        });
        let held: Vec<String> = node
            .settled_store()
            .iter()
            .filter_map(|a| a.ip4.map(|ip| ip.to_string()))
            .collect();
        let unique: std::collections::HashSet<&String> = held.iter().collect();
        assert_eq!(unique.len(), held.len(), "round {round}: {held:?}");
    }
}

#[test]
fn a_retried_add_answers_from_what_is_in_place_or_rebuilds_it_with_the_same_addresses() {
    let node = start(&default_node_config());
    let pod = node.add_pod("web", &[], CONF);
    let again = ok(&node.cni("ADD", &pod.id, Some(&pod.ns.path()), &pod.name, CONF));
    assert_eq!(again["ips"], pod.result["ips"]);
    // The veth vanished (someone deleted it): rebuilt with the same addresses.
    node.node.ip(&["link", "del", &iface(&pod.id)]);
    let rebuilt = ok(&node.cni("ADD", &pod.id, Some(&pod.ns.path()), &pod.name, CONF));
    assert_eq!(rebuilt["ips"], pod.result["ips"]);
    ok(&node.cni("CHECK", &pod.id, Some(&pod.ns.path()), &pod.name, CONF));
    // The pod's side is gone (renamed inside the pod): rebuilt too.
    pod.ns.ip(&["link", "set", "eth0", "down"]);
    pod.ns.ip(&["link", "set", "eth0", "name", "gone0"]);
    let rebuilt = ok(&node.cni("ADD", &pod.id, Some(&pod.ns.path()), &pod.name, CONF));
    assert_eq!(rebuilt["ips"], pod.result["ips"]);
    ok(&node.cni("CHECK", &pod.id, Some(&pod.ns.path()), &pod.name, CONF));
    let inside = pod.ns.ip_output(&["addr", "show", "eth0"]);
    assert!(inside.contains(&pod.ip(true).to_string()), "{inside}");
    // Another namespace: the pod is rebuilt there, same addresses.
    let moved = NetnsGuard::new("pod");
    let there = ok(&node.cni("ADD", &pod.id, Some(&moved.path()), &pod.name, CONF));
    assert_eq!(there["ips"], pod.result["ips"]);
    let inside = moved.ip_output(&["addr", "show", "eth0"]);
    assert!(inside.contains(&pod.ip(true).to_string()), "{inside}");
    ok(&node.cni("CHECK", &pod.id, Some(&moved.path()), &pod.name, CONF));
    // A second attachment (Multus net1) is refused; the first is untouched.
    let args = AgentNode::pod_args("default", &pod.name, &pod.id, "uid-default-web");
    let second = node.cni_raw(
        "ADD",
        &pod.id,
        &moved.path().display().to_string(),
        "net1",
        &args,
        CONF,
    );
    let (code, msg) = failure(&second);
    assert_eq!(code, 7);
    assert!(
        msg.contains("a second attachment (net1) is not supported"),
        "{msg}"
    );
    ok(&node.cni("CHECK", &pod.id, Some(&moved.path()), &pod.name, CONF));
    // The runtime's cleanup of the refused attachment leaves the first alone.
    ok(&node.cni_raw(
        "DEL",
        &pod.id,
        &moved.path().display().to_string(),
        "net1",
        &args,
        CONF,
    ));
    ok(&node.cni("CHECK", &pod.id, Some(&moved.path()), &pod.name, CONF));
    assert_eq!(node.flock_links(), vec![iface(&pod.id)]);
}

#[test]
fn a_new_pod_uid_under_an_old_container_id_gets_a_fresh_allocation() {
    let node = start(&default_node_config());
    let pod = node.add_pod("web", &[], CONF);
    // The pod was deleted and created again with the same name; a runtime
    // reuses the container id for its sandbox.
    node.put_manifest(
        "web",
        &std::fs::read_to_string(node.manifests().join("web.yaml"))
            .expect("manifest")
            .replace("uid: uid-default-web", "uid: uid-web-2"),
    );
    let args = AgentNode::pod_args("default", "web", &pod.id, "uid-web-2");
    let netns = pod.ns.path().display().to_string();
    let fresh = ok(&node.cni_raw("ADD", &pod.id, &netns, "eth0", &args, CONF));
    assert_ne!(
        result_ips(&fresh)[0],
        pod.ip(true),
        "not the old sandbox's allocation"
    );
    let store = node.settled_store();
    assert_eq!(store.len(), 1);
    assert_eq!(store[0].pod_uid, "uid-web-2");
    // The cache knows only an older pod of that name: wait, then 11.
    let other = NetnsGuard::new("pod");
    let stale = AgentNode::pod_args("default", "web", "c0ffeenewer", "uid-web-3");
    let started = Instant::now();
    let out = node.cni_raw(
        "ADD",
        "c0ffeenewer",
        &other.path().display().to_string(),
        "eth0",
        &stale,
        CONF,
    );
    let (code, msg) = failure(&out);
    assert_eq!(code, 11);
    assert!(
        msg.contains("uid-web-2") && msg.contains("uid-web-3"),
        "{msg}"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));
}

#[test]
fn colliding_host_interface_names_are_code_104_and_the_first_pod_keeps_working() {
    // Two container ids with one FNV-1a-32: one host interface name.
    assert_eq!(iface("c8906"), iface("cc10a0"));
    let node = start(&default_node_config());
    node.put_pod("first", &[], true);
    node.put_pod("second", &[], true);
    let (first_ns, second_ns) = (NetnsGuard::new("pod"), NetnsGuard::new("pod"));
    let first = ok(&node.cni("ADD", "c8906", Some(&first_ns.path()), "first", CONF));
    let out = node.cni("ADD", "cc10a0", Some(&second_ns.path()), "second", CONF);
    let (code, msg) = failure(&out);
    assert_eq!(code, 104, "{msg}");
    assert!(msg.contains("c8906"), "{msg}");
    // The runtime's cleanup DEL of the failed pod touches nothing of the first.
    ok(&node.cni("DEL", "cc10a0", Some(&second_ns.path()), "second", CONF));
    std::thread::sleep(Duration::from_millis(200));
    ok(&node.cni("CHECK", "c8906", Some(&first_ns.path()), "first", CONF));
    let _echo = flock_testkit::udp_echo(&first_ns.netns(), 7007);
    let client = NetnsGuard::new("pod");
    node.put_pod("client", &[], true);
    ok(&node.cni("ADD", "c0ffeeclient", Some(&client.path()), "client", CONF));
    let to = std::net::SocketAddr::new(result_ips(&first)[0], 7007);
    assert!(
        flock_testkit::udp_probe(&client.netns(), to, Duration::from_secs(2)).is_some(),
        "the first pod still answers"
    );
}

#[test]
fn cni_netns_that_is_no_pod_namespace_is_code_4_and_the_node_is_untouched() {
    let node = start(&default_node_config());
    node.put_pod("web", &[], true);
    let routes_before = node.node.ip_output(&["route"]) + &node.node.ip_output(&["-6", "route"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("file");
    let fifo = dir.path().join("fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo")
            .success()
    );
    let agent_ns = format!("/proc/{}/ns/net", node.pid().expect("pid"));
    let node_ns = node.node.path().display().to_string();
    for netns in [
        node_ns.as_str(),
        agent_ns.as_str(),
        &file.display().to_string(),
        &fifo.display().to_string(),
        "/nonexistent/netns",
    ] {
        let started = Instant::now();
        let out = node.cni_raw(
            "ADD",
            "c0ffeebad",
            netns,
            "eth0",
            &AgentNode::pod_args("default", "web", "c0ffeebad", "uid-default-web"),
            CONF,
        );
        let (code, msg) = failure(&out);
        assert_eq!(code, 4, "{netns}: {msg}");
        assert!(msg.contains(netns), "{msg}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{netns}: answered at once"
        );
        ok(&node.cni_raw(
            "DEL",
            "c0ffeebad",
            netns,
            "eth0",
            &AgentNode::pod_args("default", "web", "c0ffeebad", "uid-default-web"),
            CONF,
        ));
    }
    let routes_after = node.node.ip_output(&["route"]) + &node.node.ip_output(&["-6", "route"]);
    assert_eq!(
        routes_before, routes_after,
        "the node's routes are untouched"
    );
    assert!(node.flock_links().is_empty());
    assert!(node.settled_store().is_empty());
    // Served normally afterwards.
    node.add_pod("fine", &[], CONF);
}

#[test]
fn gc_deletes_flock_veths_no_allocation_owns() {
    let node = start(&default_node_config());
    let keep = node.add_pod("keep", &[], CONF);
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
    let gc = serde_json::json!({
        "cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "flock",
        "cni.dev/valid-attachments": [{"containerID": keep.id, "ifname": "eth0"}],
    })
    .to_string();
    ok(&node.cni("GC", "", None, "", &gc));
    wait_until("the orphan veth is deleted", Duration::from_secs(3), || {
        node.flock_links() == vec![iface(&keep.id)]
    });
    ok(&node.cni("CHECK", &keep.id, Some(&keep.ns.path()), &keep.name, CONF));
}

#[test]
fn two_entries_with_one_address_are_kept_reported_and_named_by_check() {
    let mut node = start(&default_node_config());
    let a = node.add_pod("a", &[], CONF);
    let b = node.add_pod("b", &[], CONF);
    node.stop();
    // A store from an older, careless version: b holds a's IPv4 too.
    {
        let mut store = flock_store::Store::open(&node.state_dir()).expect("store");
        let mut entry = store.get(&b.id, "eth0").expect("b").clone();
        entry.ip4 = a.ip(true).to_string().parse().ok();
        store.upsert(entry).expect("write");
    }
    node.spawn();
    let (status, body) = node.http("/readyz");
    assert_eq!(status, 200, "a warning, not a failing probe: {body}");
    // One line; BIRD is not running here, so it warns too.
    assert!(
        body.starts_with("ready; ") && body.contains("allocations") && body.lines().count() == 1,
        "{body}"
    );
    let (_, metrics) = node.http("/metrics");
    assert!(metrics.contains("flock_duplicate_addresses 1"), "{metrics}");
    let log = node.log();
    assert!(
        log.contains("address held by two store entries")
            && log.contains(&a.ip(true).to_string())
            && log.contains(&a.id)
            && log.contains(&b.id),
        "the log names the address and both containers"
    );
    for (me, other) in [(&a, &b), (&b, &a)] {
        let (code, msg) = failure(&node.cni("CHECK", &me.id, Some(&me.ns.path()), &me.name, CONF));
        assert_eq!(code, 103);
        assert!(
            msg.contains(&format!("also held by container {}", other.id)),
            "{msg}"
        );
    }
    // a goes; its address stays b's, never a third pod's.
    ok(&node.cni("DEL", &a.id, Some(&a.ns.path()), &a.name, CONF));
    node.settled_store();
    for i in 0..3 {
        let p = node.add_pod(&format!("new{i}"), &[], CONF);
        assert_ne!(p.ip(true), a.ip(true));
    }
}

#[test]
fn release_times_survive_a_restart() {
    let mut node = start(&default_node_config());
    let a = node.add_pod("a", &[], CONF);
    assert_eq!(a.ip(true).to_string(), "198.18.0.2");
    ok(&node.cni("DEL", &a.id, Some(&a.ns.path()), &a.name, CONF));
    node.settled_store();
    node.stop();
    node.spawn();
    let b = node.add_pod("b", &[], CONF);
    assert_eq!(
        b.ip(true).to_string(),
        "198.18.0.3",
        "a never-used address before the just-released one"
    );
}

#[test]
fn an_unreadable_store_answers_every_call_with_11_until_it_can_be_read() {
    let mut node = AgentNode::prepare(
        Path::new(AGENT),
        &plugin(),
        flock_testkit::agent::NODE,
        &default_node_config(),
    );
    let file = node.state_dir().join(flock_store::FILE_NAME);
    std::fs::write(&file, b"{ not json").expect("corrupt store");
    node.spawn_serving();
    node.put_pod("web", &[], true);
    let ns = NetnsGuard::new("pod");
    for op in ["DEL", "CHECK", "ADD"] {
        let (code, msg) = failure(&node.cni(op, "c0ffeeweb", Some(&ns.path()), "web", CONF));
        assert_eq!(code, 11, "{op}: {msg}");
        assert!(
            msg.contains("allocations.json"),
            "{op} names the file: {msg}"
        );
    }
    let (status, body) = node.http("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("allocations.json"), "{body}");
    assert_eq!(
        std::fs::read(&file).expect("left in place"),
        b"{ not json",
        "the file is left for inspection"
    );
    // The operator moves it aside: within the next retry the agent serves.
    std::fs::rename(&file, node.state_dir().join("allocations.json.bad")).expect("move");
    wait_until("the store is read again", Duration::from_secs(12), || {
        node.cni("DEL", "c0ffeeweb", Some(&ns.path()), "web", CONF)
            .status
            .success()
    });
    wait_until("ready for ADD", Duration::from_secs(10), || {
        node.cni("ADD", "c0ffeeweb", Some(&ns.path()), "web", CONF)
            .status
            .success()
    });
}
