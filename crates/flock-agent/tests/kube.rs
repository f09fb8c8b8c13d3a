//! The `kubernetes` datastore against a real kube-apiserver and etcd (the
//! test kit's [`KubeCluster`], built by `scripts/kube-bin.sh`), as root:
//! the shipped CRDs and RBAC applied as they are, the real `flock-agent`
//! running as the flock ServiceAccount in a node namespace, pods created
//! through the API with `spec.nodeName` (no scheduler) and added through
//! the real plugin, their status patched as a kubelet would.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flock_model::NodeConfig;
use flock_testkit::agent::{AgentNode, NODE, Pod, default_node_config, node_config};
use flock_testkit::apiserver::{Forward, KubeCluster};
use flock_testkit::{require_root, udp_echo, udp_probe};
use k8s_openapi::api::core::v1::{Node, Pod as KubePod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};

const AGENT: &str = env!("CARGO_BIN_EXE_flock-agent");
/// The kinds the kubernetes datastore watches.
const KINDS: [&str; 5] = [
    "nodeconfigs",
    "addresspools",
    "namespaces",
    "networkpolicies",
    "pods",
];
const CONF: &str = r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"flock"}"#;

fn plugin() -> PathBuf {
    let path = Path::new(AGENT).with_file_name("flock");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// Polls `f` every 100 ms until it gives `Some`, for at most `within`;
/// panics with `context` when it never does.
fn until_or<T>(
    what: &str,
    within: Duration,
    mut f: impl FnMut() -> Option<T>,
    context: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cluster with Node `node-a` and its NodeConfig, and an agent on it
/// running as the flock ServiceAccount.
struct KubeNode {
    // Dropped in this order: the forward, the agent, the control plane.
    forward: Forward,
    node: AgentNode,
    cluster: KubeCluster,
}

impl KubeNode {
    fn start(node_config: &str) -> KubeNode {
        require_root();
        KubeNode::start_on(KubeCluster::start(), node_config)
    }

    /// [`KubeNode::start`] on a cluster already running.
    fn start_on(cluster: KubeCluster, node_config: &str) -> KubeNode {
        cluster.create_node(NODE);
        cluster.apply(node_config);
        let (mut node, forward) = cluster.agent_node(Path::new(AGENT), &plugin(), NODE);
        node.spawn();
        KubeNode {
            forward,
            node,
            cluster,
        }
    }

    /// Creates pod `ns/name` on the node through the API, ADDs it through
    /// the plugin and reports its addresses and readiness as a kubelet.
    fn add(&self, ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        self.add_annotated(ns, name, labels, &[])
    }

    /// [`KubeNode::add`] with `annotations` on the pod.
    fn add_annotated(
        &self,
        ns: &str,
        name: &str,
        labels: &[(&str, &str)],
        annotations: &[(&str, &str)],
    ) -> Pod {
        let uid = self.cluster.create_pod(ns, name, NODE, labels, annotations);
        let pod = self.node.add_pod_as(ns, name, &uid, CONF);
        self.set_ready(ns, name, &pod, true);
        pod
    }

    /// Reports pod `ns/name` Ready or not, with its first address of each
    /// family as `podIPs` (as a kubelet does).
    fn set_ready(&self, ns: &str, name: &str, pod: &Pod, ready: bool) {
        let ips = pod.ips();
        let mut first: Vec<IpAddr> = Vec::new();
        for ip in ips {
            if !first.iter().any(|f| f.is_ipv4() == ip.is_ipv4()) {
                first.push(ip);
            }
        }
        self.cluster.set_pod_status(ns, name, &first, ready);
    }

    /// DELs `pod` of namespace `ns` through the plugin.
    fn del(&self, ns: &str, name: &str, pod: &Pod) -> std::process::Output {
        self.node.cni_raw(
            "DEL",
            &pod.id,
            &pod.ns.path().display().to_string(),
            "eth0",
            &AgentNode::pod_args(ns, name, &pod.id, "ignored"),
            CONF,
        )
    }

    /// Every unicast address the agent's store holds.
    fn held(&self) -> Vec<IpAddr> {
        self.node
            .settled_store()
            .iter()
            .flat_map(|a| a.unicast().collect::<Vec<_>>())
            .collect()
    }

    /// The sum of the agent's metric samples whose name and labels start
    /// with `series` (e.g. `flock_datastore_lists_total{kind="pods"}`).
    fn metric(&self, series: &str) -> f64 {
        let (code, text) = self.node.http("/metrics");
        assert_eq!(code, 200, "{text}");
        text.lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The lists completed so far, per kind.
    fn lists(&self) -> Vec<(&'static str, f64)> {
        KINDS
            .iter()
            .map(|k| {
                (
                    *k,
                    self.metric(&format!("flock_datastore_lists_total{{kind=\"{k}\"}}")),
                )
            })
            .collect()
    }

    /// [`until_or`], with the agent's log in the panic.
    fn until<T>(&self, what: &str, within: Duration, f: impl FnMut() -> Option<T>) -> T {
        until_or(what, within, f, || self.node.log())
    }

    fn node_configs(&self) -> Api<NodeConfig> {
        Api::all(self.cluster.admin())
    }

    /// The NodeConfig's `Valid` condition: status and message.
    fn valid(&self) -> Option<(String, String)> {
        let nc = self.cluster.block_on(self.node_configs().get(NODE)).ok()?;
        let c = nc
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Valid")?;
        Some((c.status, c.message))
    }

    /// The Node's `NetworkUnavailable` condition: status, reason,
    /// lastTransitionTime, lastHeartbeatTime.
    fn network_unavailable(&self) -> Option<(String, String, String, String)> {
        let nodes: Api<Node> = Api::all(self.cluster.admin());
        let node = self.cluster.block_on(nodes.get_status(NODE)).ok()?;
        let c = node
            .status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "NetworkUnavailable")?;
        Some((
            c.status,
            c.reason.unwrap_or_default(),
            c.last_transition_time?.0.to_string(),
            c.last_heartbeat_time?.0.to_string(),
        ))
    }
}

/// The shipped ClusterRole lets the agent read what it reads and write the
/// statuses it writes, and the API server refuses everything else.
#[test]
fn the_shipped_rbac_grants_what_the_agent_does_and_nothing_more() {
    let cluster = KubeCluster::start();
    cluster.create_node(NODE);
    cluster.apply(&default_node_config());
    let flock = cluster.client_as("kube-system", "flock");
    let forbidden = |what: &str, result: Result<(), kube::Error>| match result {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("{what}: expected 403 Forbidden, got {other:?}"),
    };
    cluster.block_on(async {
        let lp = ListParams::default();
        let pods: Api<KubePod> = Api::all(flock.clone());
        pods.list(&lp).await.expect("list pods");
        let policies: Api<NetworkPolicy> = Api::all(flock.clone());
        policies.list(&lp).await.expect("list networkpolicies");
        let ncs: Api<NodeConfig> = Api::all(flock.clone());
        ncs.list(&lp).await.expect("list nodeconfigs");
        let status = serde_json::json!({"status": {"conditions": [{
            "type": "Valid", "status": "True", "reason": "Accepted", "message": "m",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        ncs.patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("patch nodeconfigs/status");
        let nodes: Api<Node> = Api::all(flock.clone());
        let condition = serde_json::json!({"status": {"conditions": [{
            "type": "NetworkUnavailable", "status": "False", "reason": "FlockReady"}]}});
        nodes
            .patch_status(NODE, &PatchParams::default(), &Patch::Strategic(&condition))
            .await
            .expect("patch nodes/status");

        // Outside the ClusterRole.
        let spec = serde_json::json!({"spec": {"mtu": 9000}});
        forbidden(
            "patch a NodeConfig's spec",
            ncs.patch(NODE, &PatchParams::default(), &Patch::Merge(&spec))
                .await
                .map(drop),
        );
        let peers: Api<flock_model::BgpPeer> = Api::all(flock.clone());
        peers.list(&lp).await.expect("list bgppeers");
        nodes.get(NODE).await.expect("get its node");
        nodes
            .list(&ListParams::default().fields(&format!("metadata.name={NODE}")))
            .await
            .expect("list its node by name");
        // The one Secret, by name: get and watch, nothing else.
        let admin_secrets: Api<Secret> = Api::namespaced(cluster.admin(), "kube-system");
        for name in ["flock-bgp-passwords", "other"] {
            let secret: Secret = serde_json::from_value(serde_json::json!({
                "metadata": {"name": name}, "stringData": {"k": "v"}}))
            .expect("secret");
            admin_secrets
                .create(&PostParams::default(), &secret)
                .await
                .expect("create secret");
        }
        let secrets: Api<Secret> = Api::namespaced(flock.clone(), "kube-system");
        secrets
            .get("flock-bgp-passwords")
            .await
            .expect("get the password secret");
        let _events = secrets
            .watch(
                &kube::api::WatchParams::default().fields("metadata.name=flock-bgp-passwords"),
                "0",
            )
            .await
            .expect("watch the password secret");
        forbidden("list secrets", secrets.list(&lp).await.map(drop));
        forbidden("get another secret", secrets.get("other").await.map(drop));
        let elsewhere: Api<Secret> = Api::namespaced(flock.clone(), "default");
        forbidden(
            "get the name in another namespace",
            elsewhere.get("flock-bgp-passwords").await.map(drop),
        );
        let changed: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "flock-bgp-passwords"}, "stringData": {"k": "w"}}))
        .expect("secret");
        forbidden(
            "replace the password secret",
            secrets
                .replace("flock-bgp-passwords", &PostParams::default(), &changed)
                .await
                .map(drop),
        );
        let pod: KubePod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "intruder"},
            "spec": {"containers": [{"name": "c", "image": "registry.invalid/c:1"}]}
        }))
        .expect("pod");
        let in_default: Api<KubePod> = Api::namespaced(flock.clone(), "default");
        forbidden(
            "create a pod",
            in_default
                .create(&PostParams::default(), &pod)
                .await
                .map(drop),
        );
        // Events: created (and patched for a repeat) on pods; not read.
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(flock.clone(), "default");
        let event: k8s_openapi::api::events::v1::Event = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "probe.1"},
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "reportingController": "flock-agent", "reportingInstance": NODE,
            "action": "AddPodNetwork", "reason": "FlockAddFailed", "type": "Warning",
            "regarding": {"apiVersion": "v1", "kind": "Pod", "namespace": "default", "name": "p"}
        }))
        .expect("event");
        events
            .create(&PostParams::default(), &event)
            .await
            .expect("create an event");
        forbidden("list events", events.list(&lp).await.map(drop));
        forbidden(
            "delete a node",
            nodes.delete(NODE, &DeleteParams::default()).await.map(drop),
        );
        forbidden(
            "label a node",
            nodes
                .patch(
                    NODE,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({"metadata": {"labels": {"x": "y"}}})),
                )
                .await
                .map(drop),
        );
    });
}

/// The agent as the flock ServiceAccount: ready only with its NodeConfig,
/// the Node's `NetworkUnavailable` condition False once it is, pods added
/// and deleted, and NodeConfigs created, refused (by the schema or by the
/// agent, in `status.conditions`), updated and deleted through the API.
#[test]
fn the_agent_serves_pods_and_follows_its_nodeconfig_through_the_api() {
    let mut k = KubeNode::start(&default_node_config());
    let (status, reason, since, beat) =
        k.until("NetworkUnavailable=False", Duration::from_secs(20), || {
            k.network_unavailable()
        });
    assert_eq!((status.as_str(), reason.as_str()), ("False", "FlockReady"));
    let valid = k.until("NodeConfig Valid", Duration::from_secs(20), || k.valid());
    assert_eq!(valid, ("True".into(), "the NodeConfig is in force".into()));

    k.cluster.create_namespace("shop", &[("team", "shop")]);
    let web = k.add("shop", "web", &[("app", "web")]);
    let v4 = web.ip(true);
    let v6 = web.ip(false);
    assert!(
        "198.18.0.0/24"
            .parse::<ipnet::IpNet>()
            .expect("a prefix")
            .contains(&v4),
        "{v4} from cidr4"
    );
    assert!(
        "2001:db8:0:1::/64"
            .parse::<ipnet::IpNet>()
            .expect("a prefix")
            .contains(&v6),
        "{v6} from cidr6"
    );

    // The schema refuses what it can express: the API server answers 422
    // naming the field, and nothing changes.
    let out_of_range = node_config(
        "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  mtu: 70000",
        "",
    );
    let refused = k
        .cluster
        .block_on(flock_testkit::apiserver::apply_as(
            &k.cluster.admin(),
            &out_of_range,
        ))
        .expect_err("mtu 70000 is refused by the schema");
    assert!(refused.contains("spec.mtu"), "{refused}");

    // What only the agent knows (IPv6 needs an MTU of 1280): refused by the
    // agent, named in the log and in status.conditions; the last good
    // NodeConfig stays in force.
    k.cluster.apply(&node_config(
        "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  mtu: 1000",
        "",
    ));
    let (status, message) = k.until("Valid=False", Duration::from_secs(20), || {
        k.valid().filter(|(s, _)| s == "False")
    });
    assert_eq!(status, "False");
    assert!(
        message.contains("spec.mtu") && message.contains("1000"),
        "{message}"
    );
    k.until("the refusal logged", Duration::from_secs(5), || {
        k.node
            .log()
            .lines()
            .any(|l| l.contains("NodeConfig refused") && l.contains("spec.mtu"))
            .then_some(())
    });
    let shop_a = k.add("shop", "a", &[]);
    assert_eq!(mtu(&shop_a), 1400, "the last good NodeConfig's MTU");

    // An update the agent accepts: Valid again, new pods get the new MTU.
    k.cluster.apply(&node_config(
        "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  mtu: 1450",
        "",
    ));
    k.until("Valid=True again", Duration::from_secs(20), || {
        k.valid().filter(|(s, _)| s == "True")
    });
    let shop_b = k.add("shop", "b", &[]);
    assert_eq!(mtu(&shop_b), 1450, "the updated NodeConfig's MTU");

    // Deleted: the last good NodeConfig stays in force (ADD keeps working).
    k.cluster
        .block_on(k.node_configs().delete(NODE, &DeleteParams::default()))
        .expect("delete the NodeConfig");
    k.until("the deletion logged", Duration::from_secs(10), || {
        k.node
            .log()
            .contains("NodeConfig node-a was deleted")
            .then_some(())
    });
    let shop_c = k.add("shop", "c", &[]);
    assert_eq!(mtu(&shop_c), 1450);
    k.cluster.apply(&default_node_config());

    // DEL through the plugin releases the address.
    let del = k.del("shop", "web", &web);
    assert!(
        del.status.success(),
        "DEL: {}",
        String::from_utf8_lossy(&del.stdout)
    );
    let held = k.held();
    assert!(!held.contains(&v4) && !held.contains(&v6), "{held:?}");

    // A restart refreshes the condition without moving its transition time.
    std::thread::sleep(Duration::from_millis(1100));
    k.node.stop();
    k.node.spawn();
    let (_, _, since_after, beat_after) =
        k.until("a fresh heartbeat", Duration::from_secs(20), || {
            k.network_unavailable().filter(|c| c.3 != beat)
        });
    assert_eq!(
        since_after, since,
        "lastTransitionTime unchanged by a refresh"
    );
    assert_ne!(beat_after, beat);
}

/// A pod's eth0 MTU.
fn mtu(pod: &Pod) -> u32 {
    let text = pod.ns.ip_output(&["-o", "link", "show", "eth0"]);
    text.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {text}"))
}

/// NetworkPolicies created, changed and deleted through the API are
/// enforced: real UDP exchanges between pod namespaces.
#[test]
fn network_policies_through_the_api_are_enforced() {
    let k = KubeNode::start(&default_node_config());
    k.cluster.create_namespace("x", &[("team", "x")]);
    let a = k.add("x", "a", &[("pod", "a")]);
    let b = k.add("x", "b", &[("pod", "b")]);
    let c = k.add("x", "c", &[("pod", "c")]);
    let _echo = udp_echo(&b.ns.netns(), 80);
    let to_b = SocketAddr::new(b.ip(true), 80);
    let reaches =
        |from: &Pod| udp_probe(&from.ns.netns(), to_b, Duration::from_millis(300)).is_some();
    assert!(
        reaches(&a) && reaches(&c),
        "no policy: everything reaches b"
    );

    let policies: Api<NetworkPolicy> = Api::namespaced(k.cluster.admin(), "x");
    let policy = |ingress: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: guard-b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: b}}}}\n  policyTypes: [Ingress]\n{ingress}"
        )
    };
    k.cluster.apply(&policy(""));
    k.until("deny-all enforced", Duration::from_secs(10), || {
        (!reaches(&a) && !reaches(&c)).then_some(())
    });
    k.cluster.apply(&policy(
        "  ingress:\n  - from: [{podSelector: {matchLabels: {pod: a}}}]",
    ));
    k.until("a allowed, c still denied", Duration::from_secs(10), || {
        (reaches(&a) && !reaches(&c)).then_some(())
    });
    k.cluster
        .block_on(policies.delete("guard-b", &DeleteParams::default()))
        .expect("delete the policy");
    k.until("open again", Duration::from_secs(10), || {
        (reaches(&a) && reaches(&c)).then_some(())
    });
}

/// Routes to `ip` (a /32 or /128) in the node namespace.
fn routed(k: &KubeNode, ip: &str) -> bool {
    let family = if ip.contains(':') { "-6" } else { "-4" };
    !k.node
        .node
        .ip_output(&[family, "route", "show", ip])
        .trim()
        .is_empty()
}

/// Every pod annotation, read from pods created through the API; the
/// AddressPools that consent to claims, applied and deleted through it; an
/// anycast IP and an extra address routed while the pod's Ready condition,
/// patched as a kubelet would, says True.
#[test]
fn annotations_address_pools_and_anycast_through_the_api() {
    let k = KubeNode::start(&default_node_config());
    k.cluster.apply(flock_testkit::agent::TEST_POOLS);
    k.cluster.create_namespace("shop", &[]);
    let v6 = "2001:db8:0:1::/64".parse::<ipnet::IpNet>().expect("prefix");

    let only6 = k.add_annotated(
        "shop",
        "only6",
        &[],
        &[("flock.fritzlab.net/ipv4", "false")],
    );
    assert!(
        only6.ips().iter().all(IpAddr::is_ipv6),
        "ipv4=false: {:?}",
        only6.ips()
    );
    let only4 = k.add_annotated(
        "shop",
        "only4",
        &[],
        &[("flock.fritzlab.net/ipv6", "false")],
    );
    assert!(
        only4.ips().iter().all(IpAddr::is_ipv4),
        "ipv6=false: {:?}",
        only4.ips()
    );

    let ranged = k.add_annotated(
        "shop",
        "ranged",
        &[],
        &[
            ("flock.fritzlab.net/cidr4", "198.18.0.128/28"),
            ("flock.fritzlab.net/cidr6", "2001:db8:0:1:ffff::/80"),
        ],
    );
    let sub4 = "198.18.0.128/28".parse::<ipnet::IpNet>().expect("prefix");
    let sub6 = "2001:db8:0:1:ffff::/80"
        .parse::<ipnet::IpNet>()
        .expect("prefix");
    assert!(sub4.contains(&ranged.ip(true)), "{:?}", ranged.ips());
    assert!(sub6.contains(&ranged.ip(false)), "{:?}", ranged.ips());

    // ip-algo `namespace`: bits 63-48 of the interface ID are FNV-1a of
    // `shop` folded to 16 bits (docs/ip-algo.md's worked example).
    let algo = k.add_annotated(
        "shop",
        "algo",
        &[],
        &[("flock.fritzlab.net/ip-algo", "namespace")],
    );
    let IpAddr::V6(a6) = algo.ip(false) else {
        unreachable!()
    };
    assert!(v6.contains(&IpAddr::V6(a6)));
    assert_eq!(a6.segments()[4], 0x48ee, "{a6}");

    // A bad annotation fails the ADD naming the key.
    let uid = k.cluster.create_pod(
        "shop",
        "bad",
        NODE,
        &[],
        &[("flock.fritzlab.net/cidr4", "10.0.0.0/33")],
    );
    let ns = flock_testkit::NetnsGuard::new("pod");
    let args = AgentNode::pod_args("shop", "bad", "c0ffeebad", &uid);
    let out = k.node.cni_raw(
        "ADD",
        "c0ffeebad",
        &ns.path().display().to_string(),
        "eth0",
        &args,
        CONF,
    );
    assert!(!out.status.success());
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.contains("flock.fritzlab.net/cidr4"), "{answer}");

    // anycast and addresses: routed while Ready.
    let svc = k.add_annotated(
        "shop",
        "svc",
        &[],
        &[
            (
                "flock.fritzlab.net/anycast",
                "203.0.113.10, 2001:db8:aa::10",
            ),
            ("flock.fritzlab.net/addresses", "198.51.100.5"),
        ],
    );
    assert!(
        svc.ips().contains(&"198.51.100.5".parse().expect("ip")),
        "addresses in the result: {:?}",
        svc.ips()
    );
    let claims = ["203.0.113.10", "2001:db8:aa::10", "198.51.100.5"];
    let all_routed = |want: bool| claims.iter().all(|ip| routed(&k, ip) == want);
    k.until("claims routed while Ready", Duration::from_secs(10), || {
        all_routed(true).then_some(())
    });
    k.set_ready("shop", "svc", &svc, false);
    k.until(
        "claims withdrawn when not Ready",
        Duration::from_secs(10),
        || all_routed(false).then_some(()),
    );
    k.set_ready("shop", "svc", &svc, true);
    k.until("claims routed again", Duration::from_secs(10), || {
        all_routed(true).then_some(())
    });

    // The pools are in force (their Valid condition says so); deleting the
    // anycast one withdraws the anycast IPs though the pod stays Ready.
    let pools: Api<flock_model::AddressPool> = Api::all(k.cluster.admin());
    k.until("the pools' Valid=True", Duration::from_secs(10), || {
        let pool = k.cluster.block_on(pools.get("test-anycast")).ok()?;
        let c = pool
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Valid")?;
        (c.status == "True").then_some(())
    });
    k.cluster
        .block_on(pools.delete("test-anycast", &DeleteParams::default()))
        .expect("delete the pool");
    k.until(
        "anycast withdrawn with its pool",
        Duration::from_secs(10),
        || {
            (!routed(&k, "203.0.113.10")
                && !routed(&k, "2001:db8:aa::10")
                && routed(&k, "198.51.100.5"))
            .then_some(())
        },
    );
    k.until("the withdrawal logged", Duration::from_secs(5), || {
        k.node
            .log()
            .contains("203.0.113.10 withdrawn: no AddressPool of use anycast contains it")
            .then_some(())
    });
}

/// kube-apiserver stopped for 30 s while pods come and go: DEL and ADD of
/// known pods keep working, nothing is lost, and once it is back each
/// watch resumes with at most one list of its kind.
#[test]
fn the_api_server_away_for_30s_during_churn_loses_nothing() {
    let mut k = KubeNode::start(&default_node_config());
    k.cluster.create_namespace("churn", &[]);
    let mut live: Vec<(String, Pod)> = (0..4)
        .map(|i| {
            let name = format!("before-{i}");
            let pod = k.add("churn", &name, &[]);
            (name, pod)
        })
        .collect();
    // Created (scheduled) before the outage, ADDed during it.
    let late: Vec<(String, String)> = (0..3)
        .map(|i| {
            let name = format!("late-{i}");
            let uid = k.cluster.create_pod("churn", &name, NODE, &[], &[]);
            (name, uid)
        })
        .collect();
    // One watch delivers pods in order: once a pod created after them is
    // served, the agent knows the late ones too.
    live.push(("marker".into(), k.add("churn", "marker", &[])));
    let before = k.lists();

    k.cluster.stop_apiserver();
    let down = Instant::now();
    let mut released = Vec::new();
    for (name, uid) in &late {
        let pod = k.node.add_pod_as("churn", name, uid, CONF);
        live.push((name.clone(), pod));
        let (name, pod) = live.remove(0);
        let del = k.del("churn", &name, &pod);
        assert!(
            del.status.success(),
            "DEL {name} with the API server down: {}",
            String::from_utf8_lossy(&del.stdout)
        );
        released.extend(pod.ips());
        std::thread::sleep(Duration::from_secs(2));
    }
    let held = k.held();
    for ip in &released {
        assert!(
            !held.contains(ip),
            "{ip} released while the API server was down"
        );
    }
    for (name, pod) in &live {
        for ip in pod.ips() {
            assert!(held.contains(&ip), "{name}'s {ip} kept");
        }
    }
    std::thread::sleep(Duration::from_secs(30).saturating_sub(down.elapsed()));
    k.cluster.start_apiserver();

    // Back: what happened meanwhile and after is seen, in order.
    for (name, _) in live.iter().filter(|(n, _)| n.starts_with("late")) {
        let pod = &live.iter().find(|(n, _)| n == name).expect("live").1;
        k.set_ready("churn", name, pod, true);
    }
    let after = k.add("churn", "after", &[("app", "after")]);
    k.cluster.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: guard-after, namespace: churn}\nspec:\n  podSelector: {matchLabels: {app: after}}\n  policyTypes: [Ingress]\n",
    );
    let _echo = udp_echo(&after.ns.netns(), 80);
    let to = SocketAddr::new(after.ip(true), 80);
    let from = &live.last().expect("a live pod").1;
    k.until(
        "a policy made after the outage enforced",
        Duration::from_secs(15),
        || {
            udp_probe(&from.ns.netns(), to, Duration::from_millis(300))
                .is_none()
                .then_some(())
        },
    );
    // Past the watchers' longest backoff: every watch has resumed.
    std::thread::sleep(Duration::from_secs(6));
    let lists = k.lists();
    eprintln!("lists before the outage {before:?}, after {lists:?}");
    for ((kind, was), (_, now)) in before.iter().zip(&lists) {
        assert!(
            now - was <= 1.0,
            "{kind}: {} lists after the outage (before {was}, now {now}); at most one",
            now - was
        );
    }
    // Nothing lost: the store holds exactly the live pods' addresses.
    let mut want: Vec<IpAddr> = live.iter().flat_map(|(_, p)| p.ips()).collect();
    want.extend(after.ips());
    want.sort();
    let mut held = k.held();
    held.sort();
    assert_eq!(held, want, "the store holds the live pods, nothing more");
}

/// A watch cut off while objects change and etcd compacts past it gets
/// 410 Gone when it resumes: the agent relists (its counter says so with
/// reason `gone`) and misses none of the changes. The API server runs
/// without its watch cache, so the watch reads etcd itself.
#[test]
fn a_watch_behind_an_etcd_compaction_relists_and_misses_nothing() {
    require_root();
    let cluster = KubeCluster::start_with(&["--watch-cache=false"]);
    let k = KubeNode::start_on(cluster, &default_node_config());
    k.cluster.create_namespace("x", &[]);
    let a = k.add("x", "a", &[("role", "client")]);
    let c = k.add("x", "c", &[("role", "client")]);
    let d = k.add("x", "d", &[("pod", "d")]);
    let b = k.add("x", "b", &[("pod", "b")]);
    let policy = |from: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: guard-b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: b}}}}\n  policyTypes: [Ingress]\n  ingress:\n{from}"
        )
    };
    k.cluster.apply(&policy(
        "  - from: [{podSelector: {matchLabels: {role: client}}}]",
    ));
    let _echo = udp_echo(&b.ns.netns(), 80);
    let to_b = SocketAddr::new(b.ip(true), 80);
    let reaches =
        |from: &Pod| udp_probe(&from.ns.netns(), to_b, Duration::from_millis(300)).is_some();
    k.until("clients allowed, d denied", Duration::from_secs(10), || {
        (reaches(&a) && reaches(&c) && !reaches(&d)).then_some(())
    });
    let gone = |kind: &str| {
        k.metric(&format!(
            "flock_datastore_relists_total{{kind=\"{kind}\",reason=\"gone\"}}"
        ))
    };
    assert_eq!(gone("pods") + gone("networkpolicies"), 0.0);

    // Cut off: pod a's object goes (it leaves the peer set though its
    // network stays), the policy lets d in too; then etcd compacts.
    k.forward.pause();
    let pods: Api<KubePod> = Api::namespaced(k.cluster.admin(), "x");
    k.cluster
        .block_on(pods.delete("a", &DeleteParams::default().grace_period(0)))
        .expect("delete pod a");
    k.cluster.apply(&policy(
        "  - from: [{podSelector: {matchLabels: {role: client}}}, {podSelector: {matchLabels: {pod: d}}}]",
    ));
    let revision = k.cluster.compact_etcd();
    assert!(revision > 0);
    k.forward.resume();

    k.until(
        "410 seen for pods and policies",
        Duration::from_secs(30),
        || (gone("pods") >= 1.0 && gone("networkpolicies") >= 1.0).then_some(()),
    );
    eprintln!(
        "relists after the compaction at revision {revision}: pods {}, networkpolicies {}",
        gone("pods"),
        gone("networkpolicies")
    );
    k.until(
        "every change made while cut off enforced",
        Duration::from_secs(15),
        || (!reaches(&a) && reaches(&c) && reaches(&d)).then_some(()),
    );
    assert!(
        k.node.log().contains("relisted"),
        "the relist logged:\n{}",
        k.node.log()
    );
}

/// The agent restarted while kube-apiserver is down: DEL is served (the
/// address released), ADD of an unknown pod answers "try again later",
/// and once the API server is back the agent is ready with nothing lost.
#[test]
fn the_agent_restarted_while_the_api_server_is_down() {
    let mut k = KubeNode::start(&default_node_config());
    k.cluster.create_namespace("r", &[]);
    let keep = k.add("r", "keep", &[]);
    let gone = k.add("r", "gone", &[]);
    let (_, _, since, _) = k.until("NetworkUnavailable=False", Duration::from_secs(20), || {
        k.network_unavailable()
    });

    k.cluster.stop_apiserver();
    k.node.stop();
    k.node.spawn_serving();
    let del = until_or(
        "DEL served by the restarted agent",
        Duration::from_secs(20),
        || {
            let out = k.del("r", "gone", &gone);
            out.status.success().then_some(out)
        },
        || k.node.log(),
    );
    assert!(del.status.success());
    let held = k.held();
    for ip in gone.ips() {
        assert!(
            !held.contains(&ip),
            "{ip} released with the API server down"
        );
    }
    for ip in keep.ips() {
        assert!(held.contains(&ip), "{ip} kept");
    }
    let ns = flock_testkit::NetnsGuard::new("pod");
    let add = k.node.cni_raw(
        "ADD",
        "c0ffeenew",
        &ns.path().display().to_string(),
        "eth0",
        &AgentNode::pod_args("r", "new", "c0ffeenew", "uid-new"),
        CONF,
    );
    assert!(!add.status.success(), "ADD without the API server");
    let answer: serde_json::Value = serde_json::from_slice(&add.stdout).expect("CNI error JSON");
    assert_eq!(answer["code"], 11, "try again later: {answer}");

    k.cluster.start_apiserver();
    let new = k.until(
        "ADD once the API server is back",
        Duration::from_secs(30),
        || {
            let uid = k
                .cluster
                .block_on(Api::<KubePod>::namespaced(k.cluster.admin(), "r").get_opt("new"))
                .ok()
                .flatten()
                .and_then(|p| p.metadata.uid)
                .unwrap_or_else(|| k.cluster.create_pod("r", "new", NODE, &[], &[]));
            let out = k.node.cni_raw(
                "ADD",
                "c0ffeenew",
                &ns.path().display().to_string(),
                "eth0",
                &AgentNode::pod_args("r", "new", "c0ffeenew", &uid),
                CONF,
            );
            out.status.success().then_some(out)
        },
    );
    let ips =
        flock_testkit::agent::result_ips(&serde_json::from_slice(&new.stdout).expect("result"));
    let mut want: Vec<IpAddr> = keep.ips().into_iter().chain(ips).collect();
    want.sort();
    let mut held = k.held();
    held.sort();
    assert_eq!(held, want, "keep's and new's addresses, nothing more");
    let (status, _, since_after, _) =
        k.until("NetworkUnavailable kept", Duration::from_secs(20), || {
            k.network_unavailable()
        });
    assert_eq!((status.as_str(), since_after), ("False", since));
}

/// BGP inputs through the API as the flock ServiceAccount: a BGPPeer
/// selecting Nodes by label, this Node's labels, and the password Secret
/// read by name; bird.conf follows each, and a Secret gone leaves the
/// session out.
#[test]
fn bgp_peers_node_labels_and_the_password_secret_through_the_api() {
    let k = KubeNode::start(&node_config(
        "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1",
        "",
    ));
    // An uplink on the peer's subnet (for `local`).
    k.node
        .node
        .ip(&["link", "add", "up0", "type", "veth", "peer", "name", "up1"]);
    k.node
        .node
        .ip(&["addr", "add", "198.18.255.1/24", "dev", "up0"]);
    k.node.node.ip(&["link", "set", "up0", "up"]);
    let admin = k.cluster.admin();
    k.cluster.apply(
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: BGPPeer\nmetadata: {name: rack-a}\nspec:\n  address: 198.18.255.254\n  asn: 65000\n  passwordSecretRef: {key: tor}\n  nodeSelector: {matchLabels: {rack: a}}\n",
    );
    let conf = || std::fs::read_to_string(k.node.bird_config()).unwrap_or_default();
    let protocol = "protocol bgp peer_198_18_255_254";
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "kube-system");
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "flock-bgp-passwords"}, "stringData": {"tor": "api-pass-1"}}))
    .expect("secret");
    k.cluster
        .block_on(secrets.create(&PostParams::default(), &secret))
        .expect("create the Secret");
    // Everything for the session is there but the node's label.
    k.until(
        "a render with the Secret read",
        Duration::from_secs(20),
        || conf().contains("protocol static static4").then_some(()),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!conf().contains(protocol), "the node is not in rack a yet");
    let nodes: Api<Node> = Api::all(admin.clone());
    k.cluster
        .block_on(nodes.patch(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"rack": "a"}}})),
        ))
        .expect("label the node");
    k.until(
        "the session with its password",
        Duration::from_secs(20),
        || {
            let c = conf();
            (c.contains(protocol) && c.contains("password \"api-pass-1\";")).then_some(())
        },
    );
    // A changed password follows the watch; a deleted Secret leaves the session out.
    let changed = serde_json::json!({"stringData": {"tor": "api-pass-2"}});
    k.cluster
        .block_on(secrets.patch(
            "flock-bgp-passwords",
            &PatchParams::default(),
            &Patch::Merge(&changed),
        ))
        .expect("change the password");
    k.until("the new password", Duration::from_secs(20), || {
        conf().contains("password \"api-pass-2\";").then_some(())
    });
    k.cluster
        .block_on(secrets.delete("flock-bgp-passwords", &DeleteParams::default()))
        .expect("delete the Secret");
    k.until("the session left out", Duration::from_secs(20), || {
        (!conf().contains(protocol)).then_some(())
    });
    k.until("the missing Secret named", Duration::from_secs(10), || {
        let log = k.node.log();
        (log.contains("BGPPeer rack-a") && log.contains("flock-bgp-passwords does not exist"))
            .then_some(())
    });
    // Created again: the watch sees it.
    k.cluster
        .block_on(secrets.create(&PostParams::default(), &secret))
        .expect("create the Secret again");
    k.until("the session back", Duration::from_secs(20), || {
        conf().contains("password \"api-pass-1\";").then_some(())
    });
    let log = k.node.log();
    assert!(!log.contains("api-pass-1") && !log.contains("api-pass-2"));
}

/// An agent upgraded before the BGPPeer CRD is applied: it cannot read
/// BGPPeers, waits the grace period, then renders bird.conf without them
/// and says what it could not read.
#[test]
fn without_the_bgppeer_crd_bird_conf_is_rendered_after_the_grace_period() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let cluster = KubeCluster::start();
    let crds: Api<CustomResourceDefinition> = Api::all(cluster.admin());
    cluster
        .block_on(crds.delete("bgppeers.flock.fritzlab.net", &DeleteParams::default()))
        .expect("delete the BGPPeer CRD");
    until_or(
        "the BGPPeer CRD gone",
        Duration::from_secs(30),
        || {
            matches!(
                cluster.block_on(crds.get_opt("bgppeers.flock.fritzlab.net")),
                Ok(None)
            )
            .then_some(())
        },
        String::new,
    );
    let started = Instant::now();
    let k = KubeNode::start_on(
        cluster,
        &node_config(
            "  cidr6: 2001:db8:0:1::/64\n  cidr4: 198.18.0.0/24\n  bgp:\n    asn: 65001\n    routerId: 198.18.255.1",
            "",
        ),
    );
    let conf = || std::fs::read_to_string(k.node.bird_config()).unwrap_or_default();
    k.until(
        "bird.conf rendered without BGPPeers",
        Duration::from_secs(40),
        || conf().contains("protocol static static4").then_some(()),
    );
    k.until("the unread input named", Duration::from_secs(5), || {
        let log = k.node.log();
        (log.contains("not read yet") && log.contains("BGPPeers")).then_some(())
    });
    assert!(
        started.elapsed() >= flock_agent::bird::BGP_INPUTS_GRACE,
        "rendered before the grace period: BGPPeers were read after all"
    );
}

/// Events on the pod through the API, as `kubectl describe pod` lists
/// them: (reason, note, series count) of each.
fn pod_events(k: &KubeNode, ns: &str, pod: &str) -> Vec<(String, String, Option<i32>)> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(k.cluster.admin(), ns);
    let list = k
        .cluster
        .block_on(events.list(&ListParams::default()))
        .expect("list events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
        .map(|e| {
            (
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
                e.series.map(|s| s.count),
            )
        })
        .collect()
}

#[test]
fn a_failed_add_is_an_event_on_the_pod_at_most_once_per_reason_and_30s() {
    let k = KubeNode::start(&default_node_config());
    k.until("ready", Duration::from_secs(20), || {
        (k.node.http("/readyz").0 == 200).then_some(())
    });
    let uid = k.cluster.create_pod(
        "default",
        "bad",
        NODE,
        &[],
        &[("flock.fritzlab.net/ipv4", "maybe")],
    );
    let netns = flock_testkit::NetnsGuard::new("pod");
    let add = || {
        k.node.cni_raw(
            "ADD",
            "c0ffeebad",
            &netns.path().display().to_string(),
            "eth0",
            &AgentNode::pod_args("default", "bad", "c0ffeebad", &uid),
            CONF,
        )
    };
    let out = add();
    assert!(!out.status.success(), "the ADD fails");
    let events = k.until("the event on the pod", Duration::from_secs(10), || {
        let e = pod_events(&k, "default", "bad");
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(events.len(), 1, "{events:?}");
    let (reason, note, _) = &events[0];
    assert_eq!(reason, "FlockInvalidConfig");
    assert!(
        note.contains("flock.fritzlab.net/ipv4"),
        "names the field: {note}"
    );
    // The kubelet retries: within 30 s no second event and no repeat count.
    for _ in 0..3 {
        assert!(!add().status.success());
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        pod_events(&k, "default", "bad"),
        events,
        "one event per pod and reason per 30 s"
    );
}
