//! Claims and the AddressPools' consent over time, with paused time: an
//! upgrade that finds claims no pool covers, a withdrawal that comes back,
//! and the readiness gate that waits for pools and NodeConfigs.

use std::io::Write;
use std::sync::Mutex;

use super::*;
use crate::anycast::{ANYCAST_TICK, Announced, AnycastLoop};

/// What the current thread logs while the guard lives (the paused-time
/// tests run every task on the test's one thread).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// How many lines hold `text`.
    fn count(&self, text: &str) -> usize {
        let bytes = self.0.lock().expect("logs").clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| l.contains(text))
            .count()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts the node's anycast loop; cancel the token to stop it.
fn spawn_anycast(node: &TestNode) -> (Announced, CancellationToken) {
    let (anycast, announced) = AnycastLoop::new(
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
    (announced, stop)
}

fn routed(kernel: &FakeKernel, ip: &str) -> bool {
    kernel
        .state()
        .routes
        .contains_key(&ipnet::IpNet::from(ip_of(ip)))
}

#[tokio::test(start_paused = true)]
async fn an_upgrade_that_finds_claims_no_pool_covers_withdraws_each_loudly() {
    // What a version without AddressPools left: a committed entry with an
    // anycast and an `addresses` IP, its veth, and routes to both.
    let mut old = entry("c1", "dns", "198.18.0.7", AllocState::Committed);
    old.anycast = vec![ip_of("203.0.113.53")];
    old.addresses = vec![ip_of("198.51.100.7")];
    let store = FakeStore::with(vec![old.clone()]);
    let kernel = FakeKernel::default();
    let inode = kernel.add_netns(&old.netns);
    {
        let mut s = kernel.state();
        s.links.insert(
            old.host_iface.clone(),
            crate::fakes::FakeLink {
                netns_inode: inode,
                ifname: "eth0".into(),
                ips: vec![ip_of("198.18.0.7")],
            },
        );
    }
    for ip in ["203.0.113.53", "198.51.100.7"] {
        flock_anycast::Routes::replace(
            &kernel,
            ip_of(ip),
            &[flock_netlink::Nexthop {
                via: ip_of("198.18.0.7"),
                dev: old.host_iface.clone(),
            }],
        )
        .await
        .expect("an old route");
    }
    let (logs, _guard) = Logs::capture();
    // The new version starts with no pool (the pools are listed, empty).
    let node = TestNode::ready(&kernel, &store).await;
    assert_eq!(store.entries().len(), 1, "the pod is kept");
    let mut pod = claim_pod("dns", "flock.fritzlab.net/anycast", "203.0.113.53");
    pod.annotations
        .insert("flock.fritzlab.net/addresses".into(), "198.51.100.7".into());
    node.cache.replace_local_pods(vec![pod]);
    let (announced, stop) = spawn_anycast(&node);
    tokio::time::sleep(ANYCAST_TICK).await;
    assert!(!routed(&kernel, "203.0.113.53"), "anycast route withdrawn");
    assert!(
        !routed(&kernel, "198.51.100.7"),
        "addresses route withdrawn"
    );
    assert_eq!(announced.borrow().clone(), Some(Default::default()));
    assert_eq!(
        logs.count(
            "pod default/dns: 203.0.113.53 withdrawn: no AddressPool of use anycast contains it"
        ),
        1
    );
    assert_eq!(
        logs.count(
            "pod default/dns: 198.51.100.7 withdrawn: no AddressPool of use addresses contains it"
        ),
        1
    );
    assert_eq!(node.pods.metrics.withdrawn_claims.get(), 2);
    assert!(
        node.pods
            .metrics
            .encode()
            .contains("flock_withdrawn_claims 2"),
        "the metric is exported"
    );
    // The pod itself is untouched.
    assert_eq!(kernel.link_names(), vec![old.host_iface.clone()]);
    assert_eq!(store.entries(), vec![old]);
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn a_claim_withdrawn_again_after_it_was_routed_is_logged_again() {
    let (kernel, store) = (FakeKernel::default(), FakeStore::default());
    let (logs, _guard) = Logs::capture();
    let node = TestNode::ready(&kernel, &store).await;
    let pool = [("dns", "203.0.113.0/24", flock_model::PoolUse::Anycast, None)];
    node.allow(&pool);
    let pod = claim_pod("dns", "flock.fritzlab.net/anycast", "203.0.113.53");
    node.cache.replace_local_pods(vec![pod]);
    kernel.add_netns("/run/netns/dns");
    let added = node.call(Op::Add, "c1", "/run/netns/dns", "dns").await;
    assert!(matches!(added, Response::Result(_)), "{added:?}");
    let (_announced, stop) = spawn_anycast(&node);
    let withdrawn = "203.0.113.53 withdrawn: no AddressPool of use anycast contains it";
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(routed(&kernel, "203.0.113.53"));
    node.allow(&[]);
    tokio::time::sleep(ANYCAST_TICK * 3).await;
    assert!(!routed(&kernel, "203.0.113.53"));
    assert_eq!(logs.count(withdrawn), 1, "logged once, not every pass");
    node.allow(&pool);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(routed(&kernel, "203.0.113.53"), "admitted again");
    node.allow(&[]);
    tokio::time::sleep(ANYCAST_TICK * 3).await;
    assert!(!routed(&kernel, "203.0.113.53"));
    assert_eq!(
        logs.count(withdrawn),
        2,
        "the second withdrawal is logged too"
    );
    stop.cancel();
}

#[tokio::test(start_paused = true)]
async fn the_runtime_is_ready_only_once_pools_and_nodeconfigs_are_listed() {
    let cache = Cache::new(NODE);
    cache.replace_pods(Vec::<PodInfo>::new());
    cache.replace_namespaces(BTreeMap::from([("default".into(), BTreeMap::new())]));
    cache.replace_policies(Vec::<k8s_openapi::api::networking::v1::NetworkPolicy>::new());
    cache.mark_local_pods_synced();
    let (consent, consented) =
        crate::claims::ConsentLoop::new(cache.clone(), Arc::new(Board::default()), Metrics::new());
    let stop = CancellationToken::new();
    tokio::spawn(consent.run(stop.clone()));
    let (readiness, state) = watch::channel(Readiness::Starting("recovering".into()));
    let gate = {
        let cache = cache.clone();
        tokio::spawn(async move {
            crate::runtime::ready_once_listed(
                NODE,
                consented,
                &cache,
                Duration::from_secs(10),
                &readiness,
            )
            .await
        })
    };
    let not_ready = |why: &str| match &*state.borrow() {
        Readiness::Starting(reason) => assert!(
            reason.contains("waiting for the AddressPools and NodeConfigs"),
            "{why}: {reason}"
        ),
        Readiness::Ready => panic!("ready {why}"),
    };
    tokio::time::sleep(Duration::from_secs(120)).await;
    not_ready("with nothing listed");
    cache.replace_pools(Vec::new());
    tokio::time::sleep(Duration::from_secs(120)).await;
    not_ready("with the pools listed but no NodeConfig list");
    cache.replace_node_configs(vec![node_config("198.18.0.0/24")]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(*state.borrow(), Readiness::Ready, "both listed");
    gate.await.expect("gate task").expect("ready");
    stop.cancel();
}
