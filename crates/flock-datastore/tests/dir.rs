//! The directory source: manifests in, cache and events out.

use std::time::Duration;

use flock_datastore::{Cache, DirSource, Event};

const NODE_CONFIGS: &str = r#"
apiVersion: flock.fritzlab.net/v1alpha1
kind: NodeConfig
metadata:
  name: node-a
  annotations:
    flock.fritzlab.net/ip-algo: namespace,app
spec:
  cidr6: 2001:db8:0:1::/64
  cidr4: 198.18.0.0/24
---
apiVersion: flock.fritzlab.net/v1alpha1
kind: NodeConfig
metadata:
  name: node-b
spec:
  cidr4: 198.18.1.0/24
"#;

fn pod(name: &str, node: &str, ready: bool) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {{app: web, pod-template-hash: 5d4f}}
  annotations: {{flock.fritzlab.net/ipv4: "false"}}
  ownerReferences:
  - {{apiVersion: apps/v1, kind: ReplicaSet, name: web-5d4f, uid: u1, controller: true}}
spec:
  nodeName: {node}
  containers:
  - name: web
    image: nginx:1.27
    ports: [{{name: http, containerPort: 8080}}]
status:
  conditions: [{{type: Ready, status: "{}"}}]
"#,
        if ready { "True" } else { "False" }
    )
}

fn drain(rx: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

#[tokio::test]
async fn manifests_fill_the_cache_with_node_filtering() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("nodes.yaml"), NODE_CONFIGS).expect("write");
    std::fs::write(
        dir.path().join("pods.yml"),
        format!(
            "{}---\n{}",
            pod("web-1", "node-a", false),
            pod("web-2", "node-b", true)
        ),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("ns.json"),
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop","labels":{"team":"a"}}}"#,
    )
    .expect("write");
    std::fs::write(dir.path().join("README.md"), "not a manifest").expect("write");
    let cache = Cache::new("node-a");
    let mut source = DirSource::new(dir.path(), cache.clone());
    assert_eq!(source.scan(), Vec::<String>::new());

    let nc = cache.node_config().expect("own NodeConfig");
    assert_eq!(nc.spec.cidr6.as_deref(), Some("2001:db8:0:1::/64"));
    let local = cache.local_pods();
    assert_eq!(local.len(), 1, "only pods on node-a are local");
    let p = &local[0];
    assert_eq!(
        (p.name.as_str(), p.app.as_str(), p.image.as_deref()),
        ("web-1", "web", Some("nginx:1.27"))
    );
    assert_eq!(p.ports[0].name.as_deref(), Some("http"));
    assert!(!p.ready);
    assert_eq!(cache.pods().len(), 2, "all pods kept for NetworkPolicy");
    let (one, two) = (
        cache.pod_shared("shop", "web-1").expect("web-1"),
        cache.pod_shared("shop", "web-2").expect("web-2"),
    );
    assert!(
        std::sync::Arc::ptr_eq(&one.labels, &two.labels)
            && std::sync::Arc::ptr_eq(&one.ports, &two.ports),
        "pods of one workload hold one copy of their labels and ports"
    );
    assert!(cache.local_pod("shop", "web-2").is_none());
    assert_eq!(cache.namespaces()["shop"]["team"], "a");
    assert_eq!(
        cache.namespaces()["shop"]["kubernetes.io/metadata.name"],
        "shop"
    );
}

#[tokio::test]
async fn changes_deletions_and_readiness_become_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pod.yaml");
    std::fs::write(&path, pod("web-1", "node-a", false)).expect("write");
    let cache = Cache::new("node-a");
    let mut source = DirSource::new(dir.path(), cache.clone());
    let mut events = cache.subscribe();
    source.scan();
    assert_eq!(
        drain(&mut events),
        vec![
            // BGPPeers, the Node and the password Secret read (none here).
            Event::Bgp,
            Event::Pod {
                namespace: "shop".into(),
                name: "web-1".into()
            },
            Event::Namespaces,
        ]
    );
    assert!(cache.bgp_inputs_listed());
    source.scan();
    assert_eq!(
        drain(&mut events),
        vec![],
        "an unchanged directory is quiet"
    );

    std::fs::write(&path, pod("web-1", "node-a", true)).expect("rewrite");
    source.scan();
    assert_eq!(
        drain(&mut events),
        vec![Event::PodReady {
            namespace: "shop".into(),
            name: "web-1".into(),
            ready: true
        }]
    );

    std::fs::remove_file(&path).expect("rm");
    source.scan();
    let got = drain(&mut events);
    assert!(
        got.contains(&Event::PodDeleted {
            namespace: "shop".into(),
            name: "web-1".into()
        }),
        "{got:?}"
    );
    assert!(cache.local_pods().is_empty());
}

#[tokio::test]
async fn a_scan_publishes_policies_before_the_pods_read_with_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a-pod.yaml"), pod("web-1", "node-a", false)).expect("write");
    std::fs::write(
        dir.path().join("b-policy.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {podSelector: {}}\n",
    )
    .expect("write");
    let cache = Cache::new("node-a");
    let mut source = DirSource::new(dir.path(), cache.clone());
    let mut events = cache.subscribe();
    let before = cache.policies_revision();
    source.scan();
    let got = drain(&mut events);
    let at = |want: &Event| got.iter().position(|e| e == want);
    let pod = Event::Pod {
        namespace: "shop".into(),
        name: "web-1".into(),
    };
    // An ADD waits for its pod and then isolates by the policies it sees:
    // a pod visible means the policies read with it are too.
    assert!(
        at(&Event::Policies).expect("policies") < at(&pod).expect("pod"),
        "{got:?}"
    );
    assert!(cache.policies_revision() > before);
    let revision = cache.policies_revision();
    source.scan();
    assert_eq!(
        cache.policies_revision(),
        revision,
        "unchanged policies keep their revision"
    );
}

#[tokio::test]
async fn a_malformed_file_is_reported_by_path_and_the_rest_keep_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("nodes.yaml"), NODE_CONFIGS).expect("write");
    let good = dir.path().join("pod.yaml");
    std::fs::write(&good, pod("web-1", "node-a", true)).expect("write");
    let bad = dir.path().join("broken.yaml");
    std::fs::write(&bad, "kind: Pod\nmetadata: [unclosed\n").expect("write");
    let cache = Cache::new("node-a");
    let mut source = DirSource::new(dir.path(), cache.clone());
    let problems = source.scan();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("broken.yaml"), "{problems:?}");
    assert!(cache.node_config().is_some() && cache.local_pod("shop", "web-1").is_some());

    // A good file that turns bad keeps its last good objects.
    std::fs::write(&good, "kind: Pod\nspec: {containers: 7}\n").expect("break");
    let problems = source.scan();
    assert!(
        problems.iter().any(|p| p.contains("pod.yaml")),
        "{problems:?}"
    );
    assert!(
        cache.local_pod("shop", "web-1").is_some(),
        "last good version kept"
    );
}

#[tokio::test]
async fn the_running_source_notices_new_files_and_waiters_wake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = Cache::new("node-a");
    let handle = DirSource::new(dir.path(), cache.clone()).start();
    assert!(cache.node_config().is_none());
    let writer = {
        let path = dir.path().to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            std::fs::write(path.join("n.yaml"), NODE_CONFIGS).expect("write");
            std::fs::write(path.join("p.yaml"), pod("late", "node-a", false)).expect("write");
        })
    };
    let nc = cache.wait_for_node_config(Duration::from_secs(5)).await;
    assert!(nc.is_some(), "NodeConfig seen");
    assert!(
        cache
            .wait_for_pod("shop", "late", Duration::from_secs(5))
            .await
            .is_some()
    );
    assert!(
        cache
            .wait_for_pod("shop", "never", Duration::from_millis(300))
            .await
            .is_none()
    );
    writer.await.expect("writer");
    drop(handle);
}

#[tokio::test]
async fn every_nodeconfig_and_address_pool_is_kept_and_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("nodes.yaml"), NODE_CONFIGS).expect("write");
    let cache = Cache::new("node-a");
    let mut events = cache.subscribe();
    let mut source = DirSource::new(dir.path(), cache.clone());
    assert!(source.scan().is_empty());
    assert!(cache.claim_inputs_listed(), "listed, even with no pool");
    assert!(cache.pools().is_empty());
    let names: Vec<String> = cache
        .node_configs()
        .iter()
        .filter_map(|nc| nc.metadata.name.clone())
        .collect();
    assert_eq!(names, ["node-a", "node-b"]);
    assert_eq!(
        cache.node_config().and_then(|nc| nc.metadata.name),
        Some("node-a".into())
    );
    drain(&mut events);
    std::fs::write(
        dir.path().join("pool.yaml"),
        "apiVersion: flock.fritzlab.net/v1alpha1\nkind: AddressPool\nmetadata: {name: dns}\nspec: {cidrs: [203.0.113.0/28], use: anycast}\n",
    )
    .expect("write");
    assert!(source.scan().is_empty());
    assert_eq!(cache.pools().len(), 1);
    assert!(drain(&mut events).contains(&Event::Pools));
    std::fs::write(
        dir.path().join("nodes.yaml"),
        NODE_CONFIGS.replace("198.18.1.0/24", "198.18.9.0/24"),
    )
    .expect("write");
    assert!(source.scan().is_empty());
    let seen = drain(&mut events);
    assert!(seen.contains(&Event::NodeConfigs), "{seen:?}");
    assert!(
        !seen.contains(&Event::NodeConfig),
        "node-a's own is unchanged: {seen:?}"
    );
}

#[test]
fn bgp_peers_the_nodes_labels_and_the_password_secret_come_from_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("bgp.yaml"),
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {rack: a}}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: node-b, labels: {rack: b}}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: other}\nstringData: {tor: not-this}\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {name: flock-bgp-passwords}\ndata: {tor: czNjcmV0}\nstringData: {rack: r4ck}\n---\n\
         apiVersion: flock.fritzlab.net/v1alpha1\nkind: BGPPeer\nmetadata: {name: tor}\nspec: {address: 192.0.2.1, asn: 65000}\n",
    )
    .expect("write");
    let cache = Cache::new("node-a");
    DirSource::new(dir.path(), cache.clone()).scan();
    assert!(cache.bgp_inputs_listed());
    assert_eq!(cache.node_labels()["rack"], "a", "this node's own Node");
    let passwords = cache.passwords().expect("the Secret");
    assert_eq!(passwords.get("tor"), Some(&b"s3cret"[..]));
    assert_eq!(passwords.get("rack"), Some(&b"r4ck"[..]));
    assert!(
        !format!("{passwords:?}").contains("s3cret"),
        "Debug shows keys only"
    );
    assert_eq!(cache.bgp_peers().len(), 1);
    // A Secret that does not parse is refused without its values.
    std::fs::write(
        dir.path().join("bgp.yaml"),
        "apiVersion: v1\nkind: Secret\nmetadata: {name: flock-bgp-passwords}\ndata: {tor: 'not base64 s3cret!'}\n",
    )
    .expect("write");
    let problems = DirSource::new(dir.path(), Cache::new("node-a")).scan();
    let text = format!("{problems:?}");
    assert!(
        text.contains("Secret") && !text.contains("s3cret"),
        "{text}"
    );
}
