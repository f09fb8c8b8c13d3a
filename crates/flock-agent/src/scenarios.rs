//! The pod handler, recovery and the allocations against the recording
//! fakes, with paused time: every crash point of ADD and DEL, and each
//! lifecycle rule, deterministic and without root. (The same scenarios
//! run for real, in namespaces, in `tests/lifecycle.rs`.)

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flock_datastore::{Cache, PodInfo};
use flock_model::{FamilyDefaults, NodeSettings, host_iface_name};
use flock_proto::rpc::{Op, Request, Response};
use flock_proto::{ErrorCode, NetConf};
use flock_store::{AllocState, Allocation};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allocations::Allocations;
use crate::fakes::{FakeKernel, FakeLoader, FakeStore};
use crate::handler::Handler;
use crate::metrics::Metrics;
use crate::pods::{PodHandler, Pods};
use crate::policy::policy_loop;
use crate::serial::ContainerLocks;
use crate::status::{Board, Readiness};

mod consent;
mod pool_status;

const NODE: &str = "node-a";
const CONF: &str = r#"{"cniVersion":"1.1.0","name":"k8s-pod-network","type":"flock"}"#;

fn settings(cidr4: &str) -> NodeSettings {
    NodeSettings {
        node: NODE.into(),
        cidr6: Some("2001:db8:0:1::/64".parse().expect("v6")),
        cidr4: Some(cidr4.parse().expect("v4")),
        defaults: FamilyDefaults::default(),
        mtu: Some(1400),
        bgp: None,
        annotations: BTreeMap::new(),
    }
}

fn pod_info(name: &str, uid: &str) -> PodInfo {
    PodInfo {
        namespace: "default".into(),
        name: name.into(),
        uid: uid.into(),
        node: Some(NODE.into()),
        labels: Default::default(),
        annotations: BTreeMap::new(),
        app: name.into(),
        image: None,
        ready: true,
        ips: vec![],
        ports: Vec::new().into(),
        terminated: false,
        created: None,
        deleting: false,
        host_network: false,
    }
}

/// A node whose kernel and store outlive it: "restart" builds a new one
/// over the same two.
struct TestNode {
    kernel: FakeKernel,
    cache: Cache,
    pods: Arc<Pods<FakeKernel, FakeStore>>,
    handler: PodHandler<FakeKernel, FakeStore>,
    readiness: watch::Sender<Readiness>,
    /// The AddressPools in force (none by default).
    consent: watch::Sender<Option<Arc<crate::claims::Consent>>>,
    _prefixes: watch::Sender<Vec<ipnet::IpNet>>,
    stop: CancellationToken,
}

impl TestNode {
    /// A node that has not seen its NodeConfig yet.
    fn starting(kernel: &FakeKernel, store: &FakeStore) -> TestNode {
        let allocations = Arc::new(Allocations::new(store.clone(), store.loaded()));
        let cache = Cache::new(NODE);
        cache.replace_pods(Vec::<PodInfo>::new());
        cache.replace_namespaces(BTreeMap::from([("default".into(), BTreeMap::new())]));
        cache.replace_policies(Vec::<k8s_openapi::api::networking::v1::NetworkPolicy>::new());
        let board = Arc::new(Board::default());
        let metrics = Metrics::new();
        let (policy, handle) = policy_loop(
            cache.clone(),
            allocations.clone(),
            FakeLoader::default(),
            board.clone(),
            metrics.clone(),
        );
        let (readiness, rx) = watch::channel(Readiness::Starting("waiting for NodeConfig".into()));
        let (consent, consented) =
            watch::channel(Some(Arc::new(crate::claims::Consent::default())));
        let (prefixes, prefixes_rx) = watch::channel(vec!["198.18.0.0/24".parse().expect("net")]);
        let stop = CancellationToken::new();
        let pods = Arc::new(Pods {
            kernel: Arc::new(kernel.clone()),
            allocations,
            cache: cache.clone(),
            locks: Arc::new(ContainerLocks::default()),
            readiness: rx,
            default_mtu: 1500,
            metrics,
            anycast: Arc::new(Notify::new()),
            policy: handle,
            consent: consented,
            prefixes: prefixes_rx,
            board,
            tasks: TaskTracker::new(),
            cancel: stop.clone(),
            finishing: Default::default(),
            events: Default::default(),
        });
        pods.tasks.spawn(policy.run(stop.clone()));
        TestNode {
            kernel: kernel.clone(),
            cache,
            handler: PodHandler::new(pods.clone()),
            pods,
            readiness,
            consent,
            _prefixes: prefixes,
            stop,
        }
    }

    /// A handler on this node's pods with a NetworkPolicy loop of its own,
    /// running on a recording loader until the token is cancelled.
    fn with_policy_loop(
        &self,
    ) -> (
        PodHandler<FakeKernel, FakeStore>,
        FakeLoader,
        CancellationToken,
    ) {
        let loader = FakeLoader::default();
        let (policy, handle) = policy_loop(
            self.cache.clone(),
            self.pods.allocations.clone(),
            loader.clone(),
            Arc::new(Board::default()),
            Metrics::new(),
        );
        let stop = CancellationToken::new();
        tokio::spawn(policy.run(stop.clone()));
        let handler = PodHandler::new(Arc::new(Pods {
            kernel: self.pods.kernel.clone(),
            allocations: self.pods.allocations.clone(),
            cache: self.cache.clone(),
            locks: Arc::new(ContainerLocks::default()),
            readiness: self.pods.readiness.clone(),
            default_mtu: 1500,
            metrics: Metrics::new(),
            anycast: Arc::new(Notify::new()),
            policy: handle,
            consent: self.pods.consent.clone(),
            prefixes: self.pods.prefixes.clone(),
            board: Arc::new(Board::default()),
            tasks: TaskTracker::new(),
            cancel: stop.clone(),
            finishing: Default::default(),
            events: Default::default(),
        }));
        (handler, loader, stop)
    }

    /// A node with its NodeConfig applied, after recovery.
    async fn ready(kernel: &FakeKernel, store: &FakeStore) -> TestNode {
        let node = TestNode::starting(kernel, store);
        node.recover().await;
        node.apply("198.18.0.0/24");
        node
    }

    /// Puts AddressPools in force: (name, cidr, use, namespace label `team`).
    fn allow(&self, pools: &[(&str, &str, flock_model::PoolUse, Option<&str>)]) {
        let pools: Vec<flock_model::AddressPool> = pools
            .iter()
            .map(|(name, cidr, usage, team)| {
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "flock.fritzlab.net/v1alpha1",
                    "kind": "AddressPool",
                    "metadata": {"name": name},
                    "spec": {
                        "cidrs": [cidr],
                        "use": usage.to_string(),
                        "namespaceSelector": team.map(|t| serde_json::json!({"matchLabels": {"team": t}})),
                    },
                }))
                .expect("pool")
            })
            .collect();
        let prefixes = vec![("node-a".to_owned(), "198.18.0.0/24".parse().expect("net"))];
        self.consent
            .send_replace(Some(Arc::new(crate::claims::Consent::build(
                &pools, prefixes,
            ))));
    }

    fn apply(&self, cidr4: &str) {
        self.pods
            .allocations
            .apply_settings(Arc::new(settings(cidr4)))
            .expect("settings");
        self.readiness.send_replace(Readiness::Ready);
    }

    async fn recover(&self) {
        crate::recovery::recover(&self.pods)
            .await
            .expect("recovery");
    }

    /// A crash: every task stops where it is, memory is gone.
    fn crash(self) {
        self.stop.cancel();
    }

    /// Waits until background releases are done.
    async fn settle(&self) {
        for _ in 0..200 {
            let busy = self
                .pods
                .allocations
                .snapshot()
                .iter()
                .any(|a| a.state == AllocState::Releasing);
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn put_pod(&self, name: &str, uid: &str) {
        self.cache.upsert_pod(pod_info(name, uid));
    }

    fn request(&self, op: Op, id: &str, netns: &str, pod: &str, uid: &str) -> Request {
        Request {
            op,
            container_id: id.into(),
            netns: netns.into(),
            if_name: "eth0".into(),
            args: format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_UID={uid}"),
            path: String::new(),
            config: NetConf::parse(CONF.as_bytes()).expect("conf"),
        }
    }

    async fn call(&self, op: Op, id: &str, netns: &str, pod: &str) -> Response {
        self.call_as(op, id, netns, pod, &format!("uid-{pod}"))
            .await
    }

    async fn call_as(&self, op: Op, id: &str, netns: &str, pod: &str, uid: &str) -> Response {
        self.handler
            .handle(self.request(op, id, netns, pod, uid))
            .await
    }

    /// ADDs a pod (manifest, namespace and all); returns its IPv4.
    async fn add(&self, id: &str, pod: &str) -> IpAddr {
        self.put_pod(pod, &format!("uid-{pod}"));
        let netns = format!("/run/netns/{pod}");
        if !self
            .kernel
            .state()
            .namespaces
            .contains_key(std::path::Path::new(&netns))
        {
            self.kernel.add_netns(&netns);
        }
        match self.call(Op::Add, id, &netns, pod).await {
            Response::Result(r) => r.ips[0].address.addr(),
            other => panic!("ADD {id}: {other:?}"),
        }
    }

    async fn del(&self, id: &str, pod: &str) {
        let netns = format!("/run/netns/{pod}");
        assert_eq!(
            self.call(Op::Del, id, &netns, pod).await,
            Response::Done {},
            "DEL {id}"
        );
    }
}

fn code(r: &Response) -> ErrorCode {
    match r {
        Response::Error(e) => e.code,
        other => panic!("expected an error: {other:?}"),
    }
}

fn message(r: &Response) -> String {
    match r {
        Response::Error(e) => format!("{} {}", e.msg, e.details.clone().unwrap_or_default()),
        other => panic!("expected an error: {other:?}"),
    }
}

/// Nothing of any pod anywhere: no entry, no veth, no host route.
fn assert_empty(kernel: &FakeKernel, store: &FakeStore) {
    assert_eq!(store.entries(), vec![], "no entry left");
    assert_eq!(kernel.link_names(), Vec::<String>::new(), "no veth left");
    assert_eq!(kernel.host_routes(), vec![], "no host route left");
}

fn entry(id: &str, pod: &str, ip4: &str, state: AllocState) -> Allocation {
    Allocation {
        container_id: id.into(),
        ifname: "eth0".into(),
        namespace: "default".into(),
        pod: pod.into(),
        pod_uid: format!("uid-{pod}"),
        host_iface: host_iface_name(id),
        ip6: None,
        ip4: Some(ip4.parse().expect("v4")),
        anycast: vec![],
        addresses: vec![],
        netns: format!("/run/netns/{pod}"),
        netns_inode: None,
        mtu: Some(1400),
        state,
        allocated_at: SystemTime::UNIX_EPOCH,
    }
}

#[tokio::test(start_paused = true)]
async fn a_del_before_the_nodeconfig_tears_down_for_real() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.add("c1", "web").await;
    node.crash();
    // Restarted while the NodeConfig is held back: ADD waits, DEL does not.
    let node = TestNode::starting(&kernel, &store);
    let add = node.call(Op::Add, "c2", "/run/netns/web", "web").await;
    assert_eq!(code(&add), ErrorCode::TRY_AGAIN_LATER);
    node.del("c1", "web").await;
    node.settle().await;
    assert_empty(&kernel, &store);
    // Unknown containers succeed too, and CHECK is served.
    node.del("never", "nobody").await;
    let check = node
        .call(Op::Check, "never", "/run/netns/web", "nobody")
        .await;
    assert_eq!(code(&check), ErrorCode::UNKNOWN_CONTAINER);
}

/// Gates of ADD, in order, each a place a crash can cut it short.
const ADD_CRASH_POINTS: [(&str, &str, usize); 5] = [
    ("store", "write", 1),         // before the pending record is durable
    ("store", "written", 1),       // pending durable, not acknowledged
    ("kernel", "setup_routes", 1), // veth created, routes not
    ("store", "write", 2),         // network built, commit not durable
    ("store", "written", 2),       // commit durable, ADD not answered
];

#[tokio::test(start_paused = true)]
async fn a_crash_at_any_point_of_add_leaks_nothing() {
    for (place, gate, nth) in ADD_CRASH_POINTS {
        let (kernel, store) = (FakeKernel::default(), FakeStore::default());
        let node = TestNode::ready(&kernel, &store).await;
        node.add("keep", "keeper").await;
        node.put_pod("web", "uid-web");
        kernel.add_netns("/run/netns/web");
        let gates = if place == "store" {
            &store.gates
        } else {
            &kernel.gates
        };
        let before = gates.reached(gate);
        gates.hold_nth(gate, nth);
        let handler = node.handler.clone();
        let request = node.request(Op::Add, "c1", "/run/netns/web", "web", "uid-web");
        let add = tokio::spawn(async move { handler.handle(request).await });
        gates.wait_reached(gate, before + nth).await;
        add.abort();
        node.crash();
        gates.release(gate);

        let node = TestNode::ready(&kernel, &store).await;
        // The runtime never got an answer: it tears the sandbox down.
        node.del("c1", "web").await;
        node.settle().await;
        let left = store.entries();
        assert_eq!(
            left.iter()
                .map(|a| a.container_id.as_str())
                .collect::<Vec<_>>(),
            ["keep"],
            "crash at {place} {gate} #{nth}"
        );
        assert_eq!(
            kernel.link_names(),
            vec![host_iface_name("keep")],
            "crash at {place} {gate} #{nth}"
        );
        node.del("keep", "keeper").await;
        node.settle().await;
        assert_empty(&kernel, &store);
    }
}

/// A ready node whose ADD of container c1 (pod web) is cut short by a
/// crash once its veth exists, before its routes: a pending entry left.
async fn crash_mid_add(kernel: &FakeKernel, store: &FakeStore) {
    let node = TestNode::ready(kernel, store).await;
    node.put_pod("web", "uid-web");
    kernel.add_netns("/run/netns/web");
    kernel.gates.hold("setup_routes");
    let handler = node.handler.clone();
    let request = node.request(Op::Add, "c1", "/run/netns/web", "web", "uid-web");
    let add = tokio::spawn(async move { handler.handle(request).await });
    kernel.gates.wait_reached("setup_routes", 1).await;
    add.abort();
    node.crash();
    kernel.gates.release("setup_routes");
}

#[tokio::test(start_paused = true)]
async fn after_a_crash_mid_add_a_retried_add_finishes_it_with_one_allocation() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    crash_mid_add(&kernel, &store).await;
    // Recovery undoes the half-built pod; the retried ADD starts afresh.
    let node = TestNode::ready(&kernel, &store).await;
    assert_eq!(
        kernel.link_names(),
        Vec::<String>::new(),
        "half-built veth removed"
    );
    let ip = node.add("c1", "web").await;
    assert_eq!(store.entries().len(), 1);
    assert_eq!(store.entries()[0].state, AllocState::Committed);
    assert_ne!(
        ip.to_string(),
        "198.18.0.2",
        "the address of the undone attempt is not reused at once"
    );
}

/// Gates of DEL, in order: (fake, gate, which call of that gate in the DEL).
const DEL_CRASH_POINTS: [(&str, &str, usize); 7] = [
    ("store", "write", 1),         // before the releasing record is durable
    ("store", "written", 1),       // releasing durable, DEL not answered
    ("kernel", "teardown", 1),     // releasing durable, routes not yet removed
    ("kernel", "veth_delete", 1),  // DEL answered, the kernel still deleting
    ("kernel", "forget_flows", 1), // veth gone, its flows not yet forgotten
    ("store", "write", 2),         // veth and flows gone, the removal not yet durable
    ("store", "written", 2),       // the removal durable
];

#[tokio::test(start_paused = true)]
async fn a_crash_at_any_point_of_del_leaks_nothing() {
    for (place, gate, nth) in DEL_CRASH_POINTS {
        let (kernel, store) = (FakeKernel::default(), FakeStore::default());
        let node = TestNode::ready(&kernel, &store).await;
        node.add("c1", "web").await;
        let gates = if place == "store" {
            &store.gates
        } else {
            &kernel.gates
        };
        let before = gates.reached(gate);
        gates.hold_nth(gate, nth);
        let handler = node.handler.clone();
        let request = node.request(Op::Del, "c1", "/run/netns/web", "web", "uid-web");
        let del = tokio::spawn(async move { handler.handle(request).await });
        gates.wait_reached(gate, before + nth).await;
        let answered = del.is_finished();
        del.abort();
        node.crash();
        gates.release(gate);

        let node = TestNode::ready(&kernel, &store).await;
        if !answered {
            node.del("c1", "web").await; // the runtime retries an unanswered DEL
        }
        node.settle().await;
        assert_empty(&kernel, &store);
        assert!(
            store
                .loaded()
                .released
                .iter()
                .any(|(ip, _)| ip.to_string() == "198.18.0.2"),
            "{place} {gate} #{nth}: the release is on record"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_del_during_recovery_is_finished_once_and_never_touches_the_containers_next_add() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    // An ADD cut short by a crash once its veth exists: a pending entry.
    crash_mid_add(&kernel, &store).await;
    let first = store.entries();
    assert_eq!(first.len(), 1);

    // Restarted: the runtime's DEL comes before recovery reaches the
    // entry, and its veth deletion fails once (its task retries in 1 s).
    let node = TestNode::starting(&kernel, &store);
    kernel.gates.fail("veth_delete", 1);
    node.del("c1", "web").await;
    node.recover().await;
    node.apply("198.18.0.0/24");
    // The same container ADDed again: a new life of the same key, and a
    // veth of the same name.
    let ip = node.add("c1", "web").await;
    // Long past the DEL task's retries.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let now = store.entries();
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(now[0].state, AllocState::Committed);
    assert_eq!(now[0].ip4.map(IpAddr::V4), Some(ip));
    assert_ne!(now[0].allocated_at, first[0].allocated_at);
    assert_eq!(kernel.link_names(), vec![host_iface_name("c1")]);
    assert_eq!(
        node.call(Op::Check, "c1", "/run/netns/web", "web").await,
        Response::Done {}
    );
    // A release of the earlier life, however late, leaves this one alone.
    let stale = node
        .pods
        .allocations
        .finish_release(&first[0], SystemTime::now())
        .await
        .expect("store");
    assert!(!stale);
    assert_eq!(store.entries(), now);
}

#[tokio::test(start_paused = true)]
async fn a_prefix_change_while_a_veth_is_being_deleted_never_hands_its_address_out() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let a = node.add("a", "pod-a").await;
    kernel.gates.hold("veth_delete");
    node.del("a", "pod-a").await;
    // The allocator is rebuilt for a wider prefix while A's veth is still there.
    node.apply("198.18.0.0/23");
    let mut handed = HashSet::new();
    for i in 0..8 {
        let ip = node.add(&format!("n{i}"), &format!("pod-n{i}")).await;
        assert_ne!(ip, a, "the address of a veth still being deleted");
        handed.insert(ip);
    }
    kernel.gates.release("veth_delete");
    node.settle().await;
    assert!(store.entries().iter().all(|e| e.container_id != "a"));
}

#[tokio::test(start_paused = true)]
async fn a_failed_veth_deletion_keeps_its_addresses_through_rebuilds_and_is_retried() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let a = node.add("a", "pod-a").await;
    kernel.gates.fail("veth_delete", 3);
    node.del("a", "pod-a").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.apply("198.18.0.0/23");
    for i in 0..4 {
        assert_ne!(node.add(&format!("n{i}"), &format!("pod-n{i}")).await, a);
    }
    assert!(
        store.entries().iter().any(|e| e.container_id == "a"),
        "held while the kernel keeps the veth"
    );
    // The background retries (1 s, 2 s, 4 s) get through.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(store.entries().iter().all(|e| e.container_id != "a"));
    assert!(!kernel.link_names().contains(&host_iface_name("a")));
}

#[tokio::test(start_paused = true)]
async fn startup_confirms_a_missing_veth_by_name_before_releasing() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.add("c1", "web").await;
    node.add("c2", "db").await;
    node.crash();
    // One dump misses c1's veth; a reboot really took c2's.
    kernel
        .state()
        .hidden_from_dumps
        .insert(host_iface_name("c1"));
    kernel.state().links.remove(&host_iface_name("c2"));
    let node = TestNode::ready(&kernel, &store).await;
    let ids: Vec<String> = store
        .entries()
        .into_iter()
        .map(|e| e.container_id)
        .collect();
    assert_eq!(
        ids,
        ["c1"],
        "c1 is still there; c2's veth is confirmed gone"
    );
    let check = node.call(Op::Check, "c1", "/run/netns/web", "web").await;
    assert_eq!(check, Response::Done {});
}

#[tokio::test(start_paused = true)]
async fn gc_deletes_veths_no_entry_owns_and_nothing_an_entry_owns() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.add("c1", "web").await;
    kernel.state().links.insert(
        "flock0badc0de".into(),
        crate::fakes::FakeLink {
            netns_inode: 1,
            ifname: "eth0".into(),
            ips: vec![],
        },
    );
    let gc = serde_json::json!({
        "cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "flock",
        "cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "eth0"}],
    });
    let mut request = node.request(Op::Gc, "", "", "", "");
    request.config = NetConf::parse(gc.to_string().as_bytes()).expect("conf");
    assert_eq!(node.handler.handle(request).await, Response::Done {});
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(kernel.link_names(), vec![host_iface_name("c1")]);
}

#[tokio::test(start_paused = true)]
async fn a_retried_add_answers_from_what_is_in_place_or_rebuilds_with_the_same_addresses() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let ip = node.add("c1", "web").await;
    let setups = |k: &FakeKernel| {
        k.state()
            .calls
            .iter()
            .filter(|c| c.starts_with("setup"))
            .count()
    };
    assert_eq!(setups(&kernel), 1);
    // Intact: the stored result, nothing programmed.
    assert_eq!(node.add("c1", "web").await, ip);
    assert_eq!(setups(&kernel), 1);
    // The veth vanished: rebuilt with the same addresses.
    kernel.state().links.clear();
    assert_eq!(node.add("c1", "web").await, ip);
    assert_eq!(setups(&kernel), 2);
    assert_eq!(kernel.link_names(), vec![host_iface_name("c1")]);
    // The pod's side is gone (renamed inside the pod): rebuilt as well.
    kernel
        .state()
        .links
        .get_mut(&host_iface_name("c1"))
        .expect("veth")
        .ifname = "gone0".into();
    assert_eq!(node.add("c1", "web").await, ip);
    assert_eq!(setups(&kernel), 3);
    assert_eq!(kernel.state().links[&host_iface_name("c1")].ifname, "eth0");
    // Another namespace at the same path: rebuilt there.
    let newer = kernel.add_netns("/run/netns/web-2");
    let moved = node.call(Op::Add, "c1", "/run/netns/web-2", "web").await;
    assert!(matches!(moved, Response::Result(_)), "{moved:?}");
    assert_eq!(
        kernel.state().links[&host_iface_name("c1")].netns_inode,
        newer
    );
    assert_eq!(store.entries()[0].netns, "/run/netns/web-2");
    assert_eq!(
        store.entries()[0].ip4,
        Some(ip.to_string().parse().expect("v4"))
    );
    // A second attachment of one container is refused, the first untouched.
    let mut second = node.request(Op::Add, "c1", "/run/netns/web-2", "web", "uid-web");
    second.if_name = "net1".into();
    let refused = node.handler.handle(second).await;
    assert_eq!(code(&refused), ErrorCode::INVALID_NETWORK_CONFIG);
    assert!(message(&refused).contains("a second attachment (net1) is not supported"));
    assert_eq!(store.entries().len(), 1);
    assert_eq!(kernel.link_names(), vec![host_iface_name("c1")]);
    // The runtime's cleanup DEL of net1 leaves eth0 alone.
    let mut cleanup = node.request(Op::Del, "c1", "/run/netns/web-2", "web", "uid-web");
    cleanup.if_name = "net1".into();
    assert_eq!(node.handler.handle(cleanup).await, Response::Done {});
    node.settle().await;
    assert_eq!(store.entries().len(), 1);
    assert_eq!(kernel.link_names(), vec![host_iface_name("c1")]);
}

#[tokio::test(start_paused = true)]
async fn a_pod_uid_that_differs_from_the_entry_or_the_cache_is_never_served_the_old_pod() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let old = node.add("c1", "web").await;
    // A new pod of that name reuses the container id (a new sandbox): the
    // old entry is torn down and the new pod allocated anew.
    node.put_pod("web", "uid-new");
    let renewed = node
        .call_as(Op::Add, "c1", "/run/netns/web", "web", "uid-new")
        .await;
    let Response::Result(r) = renewed else {
        panic!("{renewed:?}")
    };
    assert_ne!(r.ips[0].address.addr(), old);
    assert_eq!(store.entries().len(), 1);
    assert_eq!(store.entries()[0].pod_uid, "uid-new");
    // The cache still knows an older pod of that name: ADD waits, then 11.
    kernel.add_netns("/run/netns/api");
    node.put_pod("api", "uid-old");
    let started = tokio::time::Instant::now();
    let stale = node
        .call_as(Op::Add, "c9", "/run/netns/api", "api", "uid-newer")
        .await;
    assert_eq!(code(&stale), ErrorCode::TRY_AGAIN_LATER);
    assert!(message(&stale).contains("uid-old"), "{}", message(&stale));
    assert!(started.elapsed() >= crate::pods::POD_WAIT);
    assert!(store.entries().iter().all(|e| e.container_id != "c9"));
}

#[tokio::test(start_paused = true)]
async fn a_host_interface_name_in_use_is_code_104_and_the_other_pod_is_untouched() {
    // "c8906" and "cc10a0" give the same FNV-1a-32, so one host interface name.
    assert_eq!(host_iface_name("c8906"), host_iface_name("cc10a0"));
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.add("c8906", "first").await;
    node.put_pod("second", "uid-second");
    kernel.add_netns("/run/netns/second");
    let second = node
        .call(Op::Add, "cc10a0", "/run/netns/second", "second")
        .await;
    assert_eq!(code(&second), crate::pods::IFACE_TAKEN);
    assert!(message(&second).contains("c8906"), "{}", message(&second));
    // Its DEL (the runtime's cleanup) must not touch the first pod's veth.
    node.del("cc10a0", "second").await;
    node.settle().await;
    assert_eq!(kernel.link_names(), vec![host_iface_name("c8906")]);
    let check = node
        .call(Op::Check, "c8906", "/run/netns/first", "first")
        .await;
    assert_eq!(check, Response::Done {});
}

#[tokio::test(start_paused = true)]
async fn the_nodes_own_namespace_or_no_namespace_is_refused_with_code_4() {
    use flock_netlink::NetnsRefusal;
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.put_pod("web", "uid-web");
    kernel.state().node_paths.insert("/proc/1/ns/net".into());
    for (path, refusal) in [
        (
            "/run/netns/fifo",
            NetnsRefusal::NotANetns {
                path: "/run/netns/fifo".into(),
                found: "a FIFO".into(),
            },
        ),
        (
            "/run/netns/hung",
            NetnsRefusal::Timeout {
                path: "/run/netns/hung".into(),
                timeout: crate::kernel::NETNS_OPEN_TIMEOUT,
            },
        ),
    ] {
        kernel.state().refused_paths.insert(path.into(), refusal);
    }
    for path in ["/proc/1/ns/net", "/run/netns/fifo", "/run/netns/hung"] {
        let add = node.call(Op::Add, "c1", path, "web").await;
        assert_eq!(code(&add), ErrorCode::INVALID_ENVIRONMENT, "{path}");
        assert!(message(&add).contains(path), "{}", message(&add));
    }
    assert_eq!(store.entries(), vec![]);
    assert!(
        kernel.state().calls.is_empty(),
        "{:?}",
        kernel.state().calls
    );
}

#[tokio::test(start_paused = true)]
async fn two_entries_holding_one_address_keep_it_from_a_third_and_check_names_the_other() {
    let kernel = FakeKernel::default();
    let store = FakeStore::with(vec![
        entry("c1", "one", "198.18.0.2", AllocState::Committed),
        entry("c2", "two", "198.18.0.2", AllocState::Committed),
    ]);
    for (id, pod) in [("c1", "one"), ("c2", "two")] {
        let inode = kernel.add_netns(&format!("/run/netns/{pod}"));
        kernel.state().links.insert(
            host_iface_name(id),
            crate::fakes::FakeLink {
                netns_inode: inode,
                ifname: "eth0".into(),
                ips: vec!["198.18.0.2".parse().expect("ip")],
            },
        );
    }
    let node = TestNode::ready(&kernel, &store).await;
    assert_eq!(node.pods.allocations.duplicates().len(), 1);
    assert!(
        node.handler
            .warnings()
            .iter()
            .any(|w| w.contains("198.18.0.2") && w.contains("c1") && w.contains("c2")),
        "{:?}",
        node.handler.warnings()
    );
    let check = node.call(Op::Check, "c1", "/run/netns/one", "one").await;
    assert_eq!(code(&check), ErrorCode::DRIFT);
    assert!(
        message(&check).contains("also held by container c2"),
        "{}",
        message(&check)
    );
    node.del("c1", "one").await;
    node.settle().await;
    // A /29 leaves a handful of addresses: new pods take every one of them
    // but the one c2 still holds, however long ago c1 gave it back.
    node.apply("198.18.0.0/29");
    let mut handed = Vec::new();
    for i in 0..8 {
        let (pod, netns) = (format!("new-{i}"), format!("/run/netns/new-{i}"));
        node.put_pod(&pod, &format!("uid-{pod}"));
        kernel.add_netns(&netns);
        match node.call(Op::Add, &format!("n{i}"), &netns, &pod).await {
            Response::Result(r) => handed.push(r.ips[0].address.addr().to_string()),
            refused => {
                assert_eq!(code(&refused), ErrorCode::ADDRESS_ALLOCATION, "{refused:?}");
                break;
            }
        }
    }
    assert!(
        handed.len() >= 3 && handed.len() < 8,
        "the pool ran out: {handed:?}"
    );
    assert!(
        !handed.iter().any(|ip| ip == "198.18.0.2"),
        "still c2's: {handed:?}"
    );
    assert!(node.pods.allocations.duplicates().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_write_reaches_the_runtime_and_a_refusing_store_still_tears_down() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.add("c1", "web").await;
    // The pending record cannot be written: an error, nothing held.
    store.gates.fail("write", 1);
    node.put_pod("db", "uid-db");
    kernel.add_netns("/run/netns/db");
    let add = node.call(Op::Add, "c2", "/run/netns/db", "db").await;
    assert_eq!(code(&add), ErrorCode::TRY_AGAIN_LATER);
    assert_eq!(store.entries().len(), 1);
    assert_eq!(
        node.pods.allocations.len(),
        1,
        "nothing reserved stays held"
    );
    // The journal could not be cut back: every write is refused until a restart.
    store.poison("an append failed and could not be cut back");
    let add = node.call(Op::Add, "c2", "/run/netns/db", "db").await;
    assert_eq!(code(&add), ErrorCode::TRY_AGAIN_LATER);
    let del = node.call(Op::Del, "c1", "/run/netns/web", "web").await;
    assert_eq!(
        code(&del),
        ErrorCode::TRY_AGAIN_LATER,
        "the failure is reported"
    );
    assert!(message(&del).contains("did not record"));
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        kernel.link_names(),
        Vec::<String>::new(),
        "but the kernel side is torn down"
    );
    assert_eq!(kernel.host_routes(), vec![]);
    // It cannot serve ADD: not ready (503), with the reason.
    let not_ready = node.handler.readiness().expect_err("not ready");
    assert!(not_ready.contains("takes no writes"), "{not_ready}");
    let status = node.call(Op::Status, "", "", "").await;
    assert_eq!(code(&status), ErrorCode::PLUGIN_NOT_AVAILABLE);
}

#[tokio::test(start_paused = true)]
async fn a_store_write_in_flight_holds_no_lock_the_others_wait_on() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.add("c1", "web").await;
    node.put_pod("db", "uid-db");
    kernel.add_netns("/run/netns/db");
    let before = store.gates.reached("write");
    store.gates.hold("write");
    let handler = node.handler.clone();
    let request = node.request(Op::Add, "c2", "/run/netns/db", "db", "uid-db");
    let add = tokio::spawn(async move { handler.handle(request).await });
    store.gates.wait_reached("write", before + 1).await;
    // While c2's record is on its way to disk, the allocations are free:
    // another thread reads them at once (it would block on a held lock).
    let allocations = node.pods.allocations.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(allocations.snapshot().len());
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(5)).is_ok(),
        "the allocations lock is held across a store write"
    );
    // and another pod's CHECK is served.
    let check = node.call(Op::Check, "c1", "/run/netns/web", "web").await;
    assert_eq!(check, Response::Done {});
    assert!(!add.is_finished(), "c2's ADD waits for its record");
    store.gates.release("write");
    let added = add.await.expect("ADD");
    assert!(matches!(added, Response::Result(_)), "{added:?}");
}

#[tokio::test(start_paused = true)]
async fn release_order_survives_a_restart() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let first = node.add("c1", "one").await;
    assert_eq!(first.to_string(), "198.18.0.2");
    node.del("c1", "one").await;
    node.settle().await;
    node.crash();
    let node = TestNode::ready(&kernel, &store).await;
    let next = node.add("c2", "two").await;
    assert_eq!(
        next.to_string(),
        "198.18.0.3",
        "never-used addresses first, after a restart too"
    );
}

fn isolate_everyone_in_default() -> k8s_openapi::api::networking::v1::NetworkPolicy {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny-all", "namespace": "default"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }))
    .expect("policy")
}

#[tokio::test(start_paused = true)]
async fn a_pod_a_policy_selects_is_isolated_in_the_loader_before_its_add_answers() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let (handler, loader, stop) = node.with_policy_loop();
    node.cache
        .replace_policies(vec![isolate_everyone_in_default()]);
    node.put_pod("web", "uid-web");
    kernel.add_netns("/run/netns/web");
    let added = handler
        .handle(node.request(Op::Add, "c1", "/run/netns/web", "web", "uid-web"))
        .await;
    assert!(matches!(added, Response::Result(_)), "{added:?}");
    let scripts = loader.loaded.lock().expect("loader").clone();
    let iface = host_iface_name("c1");
    assert!(
        scripts.last().is_some_and(|s| s.contains(&iface)),
        "the pod's chain was loaded before ADD answered: {scripts:?}"
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_policy_whose_event_is_still_on_its_way_isolates_the_add_that_follows_it() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let (handler, loader, stop) = node.with_policy_loop();
    node.put_pod("web", "uid-web");
    kernel.add_netns("/run/netns/web");
    // The loop is running, with no policy.
    while loader.loaded.lock().expect("loader").is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The policy lands in the cache and the ADD follows at once: the loop
    // has its event queued (or is collecting a burst) when the ADD asks.
    node.cache
        .replace_policies(vec![isolate_everyone_in_default()]);
    let added = handler
        .handle(node.request(Op::Add, "c1", "/run/netns/web", "web", "uid-web"))
        .await;
    assert!(matches!(added, Response::Result(_)), "{added:?}");
    let iface = host_iface_name("c1");
    let isolated = loader
        .loaded
        .lock()
        .expect("loader")
        .iter()
        .any(|s| s.contains(&iface));
    assert!(
        isolated,
        "the pod's chain was loaded before ADD answered: {:?}",
        loader.loaded.lock().expect("loader")
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn the_anycast_loop_routes_an_ip_to_its_ready_pods_only() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let mut pod = pod_info("dns", "uid-dns");
    pod.annotations
        .insert("flock.fritzlab.net/anycast".into(), "203.0.113.53".into());
    node.cache.replace_local_pods(vec![pod.clone()]);
    node.allow(&[("dns", "203.0.113.0/24", flock_model::PoolUse::Anycast, None)]);
    kernel.add_netns("/run/netns/dns");
    let added = node.call(Op::Add, "c1", "/run/netns/dns", "dns").await;
    assert!(matches!(added, Response::Result(_)), "{added:?}");
    let (anycast, mut announced) = crate::anycast::AnycastLoop::new(
        node.cache.clone(),
        node.pods.allocations.clone(),
        node.pods.kernel.clone(),
        node.pods.anycast.clone(),
        node.pods.consent.clone(),
        node.pods.prefixes.clone(),
        Arc::new(Board::default()),
        Metrics::new(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(anycast.run(stop.clone()));
    let ip: IpAddr = "203.0.113.53".parse().expect("ip");
    let routed = |k: &FakeKernel| k.state().routes.contains_key(&ipnet::IpNet::from(ip));
    tokio::time::sleep(crate::anycast::ANYCAST_TICK * 2).await;
    assert!(routed(&kernel), "routed while the pod is Ready");
    assert_eq!(
        announced.borrow_and_update().clone(),
        Some(std::collections::BTreeSet::from([ip]))
    );
    pod.ready = false;
    node.cache.upsert_pod(pod);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!routed(&kernel), "withdrawn when it is not");
    assert_eq!(announced.borrow().clone(), Some(Default::default()));
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_missing_veth_of_a_shared_ip_leaves_it_routed_and_announced_through_the_others() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.allow(&[("dns", "203.0.113.0/24", flock_model::PoolUse::Anycast, None)]);
    let pods =
        ["dns-a", "dns-b"].map(|p| claim_pod(p, "flock.fritzlab.net/anycast", "203.0.113.53"));
    node.cache.replace_local_pods(pods.to_vec());
    for (id, pod) in [("ca", "dns-a"), ("cb", "dns-b")] {
        let netns = format!("/run/netns/{pod}");
        kernel.add_netns(&netns);
        assert!(matches!(
            node.call(Op::Add, id, &netns, pod).await,
            Response::Result(_)
        ));
    }
    let board = Arc::new(Board::default());
    let (anycast, announced) = crate::anycast::AnycastLoop::new(
        node.cache.clone(),
        node.pods.allocations.clone(),
        node.pods.kernel.clone(),
        node.pods.anycast.clone(),
        node.pods.consent.clone(),
        node.pods.prefixes.clone(),
        board.clone(),
        node.pods.metrics.clone(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(anycast.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let ip = ip_of("203.0.113.53");
    let hops = |k: &FakeKernel| {
        k.state()
            .routes
            .get(&ipnet::IpNet::from(ip))
            .map_or(0, |r| r.nexthops.len())
    };
    assert_eq!(hops(&kernel), 2);
    let errors = || {
        node.pods
            .metrics
            .errors
            .get_or_create(&crate::metrics::KindLabels {
                kind: "anycast".into(),
            })
            .get()
    };
    assert_eq!(errors(), 0);
    // dns-b's veth goes away under the agent (its entry stays): the kernel
    // drops the multipath route with it.
    let gone = host_iface_name("cb");
    let link = {
        let mut s = kernel.state();
        let link = s.links.remove(&gone).expect("dns-b's veth");
        s.routes.remove(&ipnet::IpNet::from(ip));
        link
    };
    tokio::time::sleep(crate::anycast::ANYCAST_TICK).await;
    assert_eq!(hops(&kernel), 1, "routed through dns-a's veth");
    assert_eq!(
        announced.borrow().clone(),
        Some(std::collections::BTreeSet::from([ip])),
        "and so still announced"
    );
    assert!(errors() >= 1, "the missing nexthop is counted");
    assert!(
        board
            .all()
            .iter()
            .any(|w| w.contains("203.0.113.53") && w.contains(&gone)),
        "{:?}",
        board.all()
    );
    // The veth is back: the next pass routes through both again.
    kernel.state().links.insert(gone, link);
    tokio::time::sleep(crate::anycast::ANYCAST_TICK).await;
    assert_eq!(hops(&kernel), 2);
    assert_eq!(board.all(), Vec::<String>::new());
    stop.cancel();
}

fn claim_pod(name: &str, key: &str, value: &str) -> PodInfo {
    let mut pod = pod_info(name, &format!("uid-{name}"));
    pod.annotations.insert(key.into(), value.into());
    pod
}

#[tokio::test(start_paused = true)]
async fn a_claim_without_consent_or_taking_anothers_is_code_7_and_leaves_nothing_behind() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let victim = node.add("victim", "victim").await;
    node.allow(&[
        ("dns", "203.0.113.0/28", flock_model::PoolUse::Anycast, None),
        (
            "public",
            "198.51.100.0/28",
            flock_model::PoolUse::Addresses,
            Some("web"),
        ),
    ]);
    let cases = [
        (
            "flock.fritzlab.net/anycast",
            victim.to_string(),
            "inside NodeConfig node-a's pod prefix 198.18.0.0/24",
        ),
        (
            "flock.fritzlab.net/anycast",
            "8.8.8.8".to_string(),
            "no AddressPool of use anycast contains it",
        ),
        (
            "flock.fritzlab.net/addresses",
            "203.0.113.1".to_string(),
            "no AddressPool of use addresses contains it",
        ),
        (
            "flock.fritzlab.net/addresses",
            "198.51.100.1".to_string(),
            "AddressPool public contains it but does not select namespace default",
        ),
    ];
    for (i, (key, value, reason)) in cases.iter().enumerate() {
        let name = format!("attacker{i}");
        node.cache.upsert_pod(claim_pod(&name, key, value));
        let netns = format!("/run/netns/{name}");
        kernel.add_netns(&netns);
        let out = node.call(Op::Add, &format!("a{i}"), &netns, &name).await;
        assert_eq!(
            code(&out),
            ErrorCode::INVALID_NETWORK_CONFIG,
            "{key}={value}"
        );
        let msg = message(&out);
        assert!(
            msg.contains(&format!("pod default/{name}"))
                && msg.contains(key)
                && msg.contains(value.as_str())
                && msg.contains(reason),
            "{msg}"
        );
    }
    assert_eq!(store.entries().len(), 1, "nothing of the refused pods");
    assert_eq!(kernel.link_names(), vec![host_iface_name("victim")]);
    // With consent, the same claim goes through.
    node.cache.upsert_pod(claim_pod(
        "dns",
        "flock.fritzlab.net/anycast",
        "203.0.113.5",
    ));
    kernel.add_netns("/run/netns/dns");
    let ok = node.call(Op::Add, "d1", "/run/netns/dns", "dns").await;
    assert!(matches!(ok, Response::Result(_)), "{ok:?}");
}

#[test]
fn claim_rules_hold_one_by_one() {
    use crate::claims::{Consent, Context, judge};
    use flock_model::PoolUse::{Addresses, Anycast};
    let pools: Vec<flock_model::AddressPool> = [
        ("a", "203.0.113.0/28", "anycast"),
        ("b", "198.51.100.0/28", "addresses"),
        ("overlaps", "198.18.1.0/25", "anycast"),
    ]
    .iter()
    .map(|(n, c, u)| {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "flock.fritzlab.net/v1alpha1", "kind": "AddressPool",
            "metadata": {"name": n}, "spec": {"cidrs": [c], "use": u}
        }))
        .expect("pool")
    })
    .collect();
    let consent = Consent::build(
        &pools,
        vec![
            ("node-a".into(), "198.18.0.0/24".parse().expect("net")),
            ("node-b".into(), "198.18.1.0/24".parse().expect("net")),
        ],
    );
    assert_eq!(consent.pools.len(), 2);
    assert!(
        consent.refused["overlaps"]
            .contains("overlaps NodeConfig node-b's pod prefix 198.18.1.0/24"),
        "{:?}",
        consent.refused
    );
    let mut older = pod_info("first", "uid-1");
    older.created = Some("2026-01-01T00:00:00Z".parse().expect("time"));
    let mut newer = pod_info("second", "uid-2");
    newer.created = Some("2026-02-01T00:00:00Z".parse().expect("time"));
    let labels = BTreeMap::new();
    let unicast = std::collections::HashMap::from([(
        "203.0.113.9".parse().expect("ip"),
        "default/somebody".to_owned(),
    )]);
    let claims = std::collections::HashMap::from([(
        "198.51.100.1".parse().expect("ip"),
        vec![older.clone(), newer.clone()],
    )]);
    let held = vec!["10.99.0.0/24".parse().expect("net")];
    let ctx = Context {
        namespace_labels: &labels,
        held_prefixes: &held,
        unicast: &unicast,
        claims: &claims,
    };
    let ip = |s: &str| s.parse().expect("ip");
    assert_eq!(
        judge(&consent, &newer, Anycast, ip("203.0.113.1"), &ctx),
        Ok(())
    );
    assert!(
        judge(&consent, &newer, Anycast, ip("203.0.113.9"), &ctx)
            .expect_err("unicast")
            .contains("the address of pod default/somebody")
    );
    assert!(
        judge(&consent, &newer, Anycast, ip("198.18.1.7"), &ctx)
            .expect_err("node prefix")
            .contains("node-b")
    );
    assert!(
        judge(&consent, &newer, Anycast, ip("10.99.0.1"), &ctx)
            .expect_err("held")
            .contains("still holds")
    );
    assert_eq!(
        judge(&consent, &older, Addresses, ip("198.51.100.1"), &ctx),
        Ok(()),
        "the older pod keeps it"
    );
    assert!(
        judge(&consent, &newer, Addresses, ip("198.51.100.1"), &ctx)
            .expect_err("older claim")
            .contains("pod default/first claims it already")
    );
    assert!(
        judge(&consent, &newer, Addresses, ip("203.0.113.1"), &ctx)
            .expect_err("wrong use")
            .contains("no AddressPool of use addresses")
    );
}

#[tokio::test(start_paused = true)]
async fn a_narrowed_pool_withdraws_and_a_terminating_pod_leaves_its_nexthops_at_once() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    node.allow(&[("dns", "203.0.113.0/24", flock_model::PoolUse::Anycast, None)]);
    let mut a = claim_pod(
        "dns-a",
        "flock.fritzlab.net/anycast",
        "203.0.113.53,203.0.113.200",
    );
    let b = claim_pod("dns-b", "flock.fritzlab.net/anycast", "203.0.113.53");
    node.cache.replace_local_pods(vec![a.clone(), b.clone()]);
    for (id, pod) in [("ca", "dns-a"), ("cb", "dns-b")] {
        let netns = format!("/run/netns/{pod}");
        kernel.add_netns(&netns);
        assert!(matches!(
            node.call(Op::Add, id, &netns, pod).await,
            Response::Result(_)
        ));
    }
    let (anycast, announced) = crate::anycast::AnycastLoop::new(
        node.cache.clone(),
        node.pods.allocations.clone(),
        node.pods.kernel.clone(),
        node.pods.anycast.clone(),
        node.pods.consent.clone(),
        node.pods.prefixes.clone(),
        Arc::new(Board::default()),
        node.pods.metrics.clone(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(anycast.run(stop.clone()));
    tokio::time::sleep(Duration::from_millis(10)).await;
    let hops = |k: &FakeKernel, ip: &str| {
        k.state()
            .routes
            .get(&ipnet::IpNet::from(ip.parse::<IpAddr>().expect("ip")))
            .map_or(0, |r| r.nexthops.len())
    };
    assert_eq!(
        (
            hops(&kernel, "203.0.113.53"),
            hops(&kernel, "203.0.113.200")
        ),
        (2, 1)
    );
    // The pool narrowed to /25: .200 is withdrawn, route and announcement.
    node.allow(&[("dns", "203.0.113.0/25", flock_model::PoolUse::Anycast, None)]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(hops(&kernel, "203.0.113.200"), 0);
    assert_eq!(
        announced.borrow().clone(),
        Some(std::collections::BTreeSet::from([ip_of("203.0.113.53")]))
    );
    assert_eq!(node.pods.metrics.withdrawn_claims.get(), 1);
    // dns-a is being deleted (preStop drain): out of the nexthops, Ready or not.
    a.deleting = true;
    node.cache.upsert_pod(a);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(hops(&kernel, "203.0.113.53"), 1);
    // No pool at all: every claim is withdrawn.
    node.allow(&[]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(hops(&kernel, "203.0.113.53"), 0);
    assert_eq!(announced.borrow().clone(), Some(Default::default()));
    stop.cancel();
}

fn ip_of(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

#[tokio::test(start_paused = true)]
async fn a_policy_nft_refuses_isolates_with_nothing_allowed_and_the_rest_is_enforced() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let policy = |name: &str, port: u16| -> k8s_openapi::api::networking::v1::NetworkPolicy {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": port}]}]},
        }))
        .expect("policy")
    };
    node.cache
        .replace_policies(vec![policy("good", 80), policy("bad", 4242)]);
    let loader = FakeLoader {
        refuse: Some("4242".into()),
        ..FakeLoader::default()
    };
    let board = Arc::new(Board::default());
    let metrics = Metrics::new();
    let (policy_loop, handle) = policy_loop(
        node.cache.clone(),
        node.pods.allocations.clone(),
        loader.clone(),
        board.clone(),
        metrics.clone(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(policy_loop.run(stop.clone()));
    let handler = PodHandler::new(Arc::new(Pods {
        kernel: node.pods.kernel.clone(),
        allocations: node.pods.allocations.clone(),
        cache: node.cache.clone(),
        locks: Arc::new(ContainerLocks::default()),
        readiness: node.pods.readiness.clone(),
        default_mtu: 1500,
        metrics: metrics.clone(),
        anycast: Arc::new(Notify::new()),
        policy: handle,
        consent: node.pods.consent.clone(),
        prefixes: node.pods.prefixes.clone(),
        board: board.clone(),
        tasks: TaskTracker::new(),
        cancel: stop.clone(),
        finishing: Default::default(),
        events: Default::default(),
    }));
    node.put_pod("web", "uid-web");
    kernel.add_netns("/run/netns/web");
    let added = handler
        .handle(node.request(Op::Add, "c1", "/run/netns/web", "web", "uid-web"))
        .await;
    assert!(matches!(added, Response::Result(_)), "{added:?}");
    let scripts = loader.loaded.lock().expect("loader").clone();
    let last = scripts.last().expect("a table was loaded");
    let chain = format!("chain in_{}", host_iface_name("c1"));
    assert!(last.contains(&chain), "the pod is isolated: {last}");
    assert!(last.contains("tcp dport 80"), "the good policy is enforced");
    assert!(!last.contains("4242"), "the refused one allows nothing");
    assert_eq!(metrics.netpol_refused.get(), 1);
    assert!(
        board
            .all()
            .iter()
            .any(|w| w.contains("NetworkPolicy default/bad refused by nft")),
        "{:?}",
        board.all()
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn ipvs_on_the_node_is_a_warning_not_a_failure() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::ready(&kernel, &store).await;
    let proc_root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(proc_root.path().join("net")).expect("net");
    std::fs::write(proc_root.path().join("net/ip_vs"), "IP Virtual Server\n").expect("ip_vs");
    let board = Arc::new(Board::default());
    let (policy_loop, _handle) = policy_loop(
        node.cache.clone(),
        node.pods.allocations.clone(),
        FakeLoader::default(),
        board.clone(),
        Metrics::new(),
    );
    let stop = CancellationToken::new();
    tokio::spawn(
        policy_loop
            .with_proc_root(proc_root.path())
            .run(stop.clone()),
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(
        board
            .all()
            .iter()
            .any(|w| w.starts_with("ipvs:") && w.contains("bypasses NetworkPolicy")),
        "{:?}",
        board.all()
    );
    assert!(node.handler.readiness().is_ok(), "ready all the same");
    stop.cancel();
}

fn node_config(cidr4: &str) -> flock_model::NodeConfig {
    flock_model::NodeConfig::new(
        NODE,
        flock_model::NodeConfigSpec {
            cidr6: Some("2001:db8:0:1::/64".into()),
            cidr4: Some(cidr4.into()),
            ..Default::default()
        },
    )
}

/// Asserts that every prefix of the published settings is published too.
fn announced_with_prefixes(
    published: &crate::settings::Published,
    prefixes: &crate::settings::Prefixes,
) -> Option<Arc<NodeSettings>> {
    let settings = published.borrow().clone()?;
    let held = prefixes.borrow().clone();
    for prefix in crate::settings::own_prefixes(&settings) {
        assert!(
            held.contains(&prefix),
            "settings for {prefix} published before their prefixes: {held:?}"
        );
    }
    Some(settings)
}

#[tokio::test(start_paused = true)]
async fn settings_reach_bird_only_after_their_prefixes_so_a_restart_withdraws_nothing() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let node = TestNode::starting(&kernel, &store);
    node.recover().await;
    node.cache
        .set_node_config(Some(node_config("198.18.0.0/24")));
    let (prefixes_tx, prefixes) = watch::channel(vec![]);
    let (settings_loop, published) = crate::settings::SettingsLoop::new(
        node.cache.clone(),
        node.pods.allocations.clone(),
        node.pods.kernel.clone(),
        prefixes_tx,
        Arc::new(Board::default()),
        Metrics::new(),
    );
    // Held while the blackhole goes in: what BIRD would render then.
    kernel.gates.hold("blackhole");
    let stop = CancellationToken::new();
    tokio::spawn(settings_loop.run(stop.clone()));
    kernel.gates.wait_reached("blackhole", 1).await;
    announced_with_prefixes(&published, &prefixes);
    kernel.gates.release("blackhole");
    for _ in 0..100 {
        if published.borrow().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = announced_with_prefixes(&published, &prefixes).expect("settings published");
    assert_eq!(first.cidr4, Some("198.18.0.0/24".parse().expect("net")));

    // A pod holds an address of the old prefix while it changes: the old
    // one stays announced next to the new one, from the first render on.
    node.readiness.send_replace(Readiness::Ready);
    let old = node.add("c1", "web").await;
    assert!(old.is_ipv4());
    tokio::time::sleep(Duration::from_millis(10)).await;
    let passed = kernel.gates.reached("blackhole");
    kernel.gates.hold("blackhole");
    node.cache
        .set_node_config(Some(node_config("198.18.1.0/24")));
    kernel.gates.wait_reached("blackhole", passed + 1).await;
    let during = announced_with_prefixes(&published, &prefixes).expect("settings");
    assert!(
        prefixes.borrow().iter().any(|p| p.contains(&old)),
        "the prefix of {old} is withdrawn while {during:?} is in force: {:?}",
        prefixes.borrow()
    );
    kernel.gates.release("blackhole");
    for _ in 0..100 {
        if published.borrow().as_ref().and_then(|s| s.cidr4) != first.cidr4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = announced_with_prefixes(&published, &prefixes).expect("settings");
    assert_eq!(second.cidr4, Some("198.18.1.0/24".parse().expect("net")));
    assert!(prefixes.borrow().iter().any(|p| p.contains(&old)));
    stop.cancel();
}

#[tokio::test]
async fn the_change_log_names_each_changed_entry_and_says_when_it_no_longer_reaches_back() {
    let (a, b) = (
        entry("c1", "web", "198.18.0.2", AllocState::Committed),
        entry("c2", "db", "198.18.0.3", AllocState::Committed),
    );
    let store = FakeStore::with(vec![a.clone(), b.clone()]);
    let allocations = Allocations::new(store.clone(), store.loaded());
    let (start, _) = allocations.changes_since(u64::MAX);
    assert_eq!(
        allocations.changes_since(start),
        (start, Some(Default::default())),
        "nothing since"
    );
    let releasing = allocations.mark_releasing(&b).await.expect("releasing");
    let (now, changed) = allocations.changes_since(start);
    assert_eq!(changed, Some([b.host_iface.clone()].into()));
    allocations
        .finish_release(&releasing, SystemTime::UNIX_EPOCH)
        .await
        .expect("released");
    let (later, changed) = allocations.changes_since(now);
    assert_eq!(changed, Some([b.host_iface.clone()].into()));
    // Further back than the log holds: read every entry instead.
    for _ in 0..crate::allocations::CHANGE_LOG {
        allocations.mark_releasing(&a).await.expect("releasing");
        let mut again = a.clone();
        again.state = AllocState::Committed;
        allocations
            .commit(again, &a.netns, 1)
            .await
            .expect("commit");
    }
    assert_eq!(allocations.changes_since(later).1, None);
    assert_eq!(
        allocations
            .changes_since(allocations.changes_since(u64::MAX).0 - 1)
            .1,
        Some([a.host_iface.clone()].into())
    );
}
