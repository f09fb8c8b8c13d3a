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
    _forward: Forward,
    node: AgentNode,
    cluster: KubeCluster,
}

impl KubeNode {
    fn start(node_config: &str) -> KubeNode {
        require_root();
        let cluster = KubeCluster::start();
        cluster.create_node(NODE);
        cluster.apply(node_config);
        let mut node = AgentNode::prepare(Path::new(AGENT), &plugin(), NODE, "");
        let forward = cluster.forward_into(&node.node);
        let kubeconfig = node.file("flock.kubeconfig");
        cluster.kubeconfig_for("kube-system", "flock", &kubeconfig);
        node.use_kubernetes(&kubeconfig);
        node.spawn();
        KubeNode {
            _forward: forward,
            node,
            cluster,
        }
    }

    /// Creates pod `ns/name` on the node through the API, ADDs it through
    /// the plugin and reports its addresses and readiness as a kubelet.
    fn add(&self, ns: &str, name: &str, labels: &[(&str, &str)]) -> Pod {
        let uid = self.cluster.create_pod(ns, name, NODE, labels, &[]);
        let pod = self.node.add_pod_as(ns, name, &uid, CONF);
        self.cluster.set_pod_status(ns, name, &pod.ips(), true);
        pod
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
        let secrets: Api<Secret> = Api::namespaced(flock.clone(), "kube-system");
        forbidden("list secrets", secrets.list(&lp).await.map(drop));
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
    let del = k.node.cni_raw(
        "DEL",
        &web.id,
        &web.ns.path().display().to_string(),
        "eth0",
        &AgentNode::pod_args("shop", "web", &web.id, "ignored"),
        CONF,
    );
    assert!(
        del.status.success(),
        "DEL: {}",
        String::from_utf8_lossy(&del.stdout)
    );
    let held: Vec<IpAddr> = k
        .node
        .settled_store()
        .iter()
        .flat_map(|a| a.unicast().collect::<Vec<_>>())
        .collect();
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
