//! The kubernetes source over real HTTP against a small list/watch test
//! double: initial list, streamed events, an expired watch, 410 Gone and a
//! relist.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{Method, Uri};
use axum::routing::any;
use flock_datastore::{Cache, Event, kubernetes};
use kube::Client;
use serde_json::{Value, json};
use tokio::sync::broadcast;

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const NODECONFIGS: &str = "/apis/flock.fritzlab.net/v1alpha1/nodeconfigs";

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    /// How many of the next watches of a path answer 410 Gone.
    gone_next: BTreeMap<String, usize>,
    watches: usize,
}

/// `Some(event)` for a resource, or `None` to end every open watch.
type Broadcast = Option<(String, Value)>;

#[derive(Clone)]
struct Double {
    inner: Arc<Mutex<Inner>>,
    tx: broadcast::Sender<Broadcast>,
}

fn key(obj: &Value) -> (String, String) {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_owned(),
        m["name"].as_str().unwrap_or_default().to_owned(),
    )
}

fn matches(obj: &Value, field_selector: Option<&String>) -> bool {
    field_selector.is_none_or(|sel| {
        sel.split(',').all(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let pointer = format!("/{}", k.replace('.', "/"));
            obj.pointer(&pointer).and_then(Value::as_str) == Some(v)
        })
    })
}

impl Double {
    fn new() -> Double {
        Double {
            inner: Arc::default(),
            tx: broadcast::channel(256).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("double lock")
    }

    /// Adds or changes an object and streams it to watchers.
    fn put(&self, path: &str, mut obj: Value) {
        let mut inner = self.lock();
        inner.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let kind = if inner
            .objects
            .entry(path.into())
            .or_default()
            .insert(key(&obj), obj.clone())
            .is_some()
        {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let _ = self
            .tx
            .send(Some((path.into(), json!({"type": kind, "object": obj}))));
    }

    fn delete(&self, path: &str, ns: &str, name: &str, announce: bool) {
        let mut inner = self.lock();
        inner.rv += 1;
        let rv = inner.rv;
        if let Some(mut obj) = inner
            .objects
            .entry(path.into())
            .or_default()
            .remove(&(ns.into(), name.into()))
            && announce
        {
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let _ = self.tx.send(Some((
                path.into(),
                json!({"type": "DELETED", "object": obj}),
            )));
        }
    }

    fn end_watches(&self) {
        let _ = self.tx.send(None);
    }

    async fn serve(self) -> String {
        let app = Router::new().fallback(any(list_or_watch)).with_state(self);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        format!("http://{addr}")
    }
}

async fn list_or_watch(
    State(d): State<Double>,
    method: Method,
    uri: Uri,
    Query(q): Query<BTreeMap<String, String>>,
) -> axum::response::Response {
    assert_eq!(method, Method::GET, "{uri}");
    let path = uri.path().to_owned();
    let selector = q.get("fieldSelector");
    if q.get("watch").map(String::as_str) != Some("true") {
        let inner = d.lock();
        let items: Vec<Value> = inner
            .objects
            .get(&path)
            .map(|m| {
                m.values()
                    .filter(|o| matches(o, selector))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let body = json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
        return axum::response::Response::new(Body::from(body.to_string()));
    }
    let gone = {
        let mut inner = d.lock();
        inner.watches += 1;
        match inner.gone_next.get_mut(&path) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    };
    if gone {
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410, "reason": "Expired", "message": "too old resource version"}});
        return axum::response::Response::new(Body::from(format!("{status}\n")));
    }
    let rx = d.tx.subscribe();
    let selector = selector.cloned();
    let stream = futures_util::stream::unfold(rx, move |mut rx| {
        let (path, selector) = (path.clone(), selector.clone());
        async move {
            loop {
                match rx.recv().await {
                    Ok(Some((p, event)))
                        if p == path && matches(&event["object"], selector.as_ref()) =>
                    {
                        return Some((
                            Ok::<_, Infallible>(bytes::Bytes::from(format!("{event}\n"))),
                            rx,
                        ));
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return None,
                }
            }
        }
    });
    axum::response::Response::new(Body::from_stream(stream))
}

fn pod(name: &str, node: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("u-{name}"), "labels": {"app": "web"}, "annotations": {"flock.fritzlab.net/ipv4": "false"}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx:1.27"}]},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
    })
}

fn node_config(name: &str) -> Value {
    json!({"apiVersion": "flock.fritzlab.net/v1alpha1", "kind": "NodeConfig", "metadata": {"name": name}, "spec": {"cidr4": "198.18.0.0/24"}})
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn event(rx: &mut broadcast::Receiver<Event>, want: Event) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = tokio::time::timeout_at(deadline, rx.recv()).await;
        match got {
            Ok(Ok(e)) if e == want => return,
            Ok(Ok(_)) => continue,
            other => panic!("waiting for {want:?}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_streams_and_relists_after_expiry_and_gone() {
    let double = Double::new();
    double.put(PODS, pod("web-1", "node-a", false));
    double.put(PODS, pod("other", "node-b", true));
    double.put(NODECONFIGS, node_config("node-a"));
    double.put(NODECONFIGS, node_config("node-b"));
    double.put(NAMESPACES, json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "a"}}}));
    double.put(POLICIES, json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny", "namespace": "shop"}, "spec": {"podSelector": {}}}));
    let url = double.clone().serve().await;
    let client = Client::try_from(kube::Config::new(url.parse().expect("url"))).expect("client");

    let cache = Cache::new("node-a");
    let mut events = cache.subscribe();
    let _watch = kubernetes::start(
        client.clone(),
        cache.clone(),
        std::sync::Arc::new(kubernetes::Unobserved),
        "kube-system",
    );

    // Initial list.
    until("initial lists", || {
        cache.node_config().is_some()
            && cache.local_pod("shop", "web-1").is_some()
            && cache.pods().len() == 2
            && cache.policies().len() == 1
            && cache.namespaces().contains_key("shop")
    })
    .await;
    assert_eq!(
        cache.node_config().map(|nc| nc.metadata.name),
        Some(Some("node-a".into()))
    );
    assert!(
        cache.local_pod("shop", "other").is_none(),
        "other node's pod is not local"
    );
    let other = cache
        .pods()
        .into_iter()
        .find(|p| p.name == "other")
        .expect("cluster pod");
    assert!(other.annotations.is_empty(), "kept compact off this node");
    assert_eq!(
        cache
            .local_pod("shop", "web-1")
            .map(|p| p.annotations.len()),
        Some(1)
    );

    // Streamed events, readiness as its own event.
    double.put(PODS, pod("web-1", "node-a", true));
    event(
        &mut events,
        Event::PodReady {
            namespace: "shop".into(),
            name: "web-1".into(),
            ready: true,
        },
    )
    .await;
    double.delete(PODS, "shop", "web-1", true);
    event(
        &mut events,
        Event::PodDeleted {
            namespace: "shop".into(),
            name: "web-1".into(),
        },
    )
    .await;

    // An expired watch: the watchers watch again and events keep coming.
    let before = double.lock().watches;
    double.end_watches();
    until("re-watch", || double.lock().watches >= before + 5).await;
    double.put(PODS, pod("web-2", "node-a", false));
    until("event after re-watch", || {
        cache.local_pod("shop", "web-2").is_some()
    })
    .await;

    // 410 Gone: a pod deleted while nobody watched disappears after the relist.
    double.delete(PODS, "shop", "other", false);
    // Both pod watchers (this node's and the cluster's) get the 410.
    double.lock().gone_next.insert(PODS.into(), 2);
    double.end_watches();
    until("relist after 410", || {
        cache.pods().iter().all(|p| p.name != "other")
    })
    .await;
    assert!(
        cache.local_pod("shop", "web-2").is_some(),
        "relist keeps what exists"
    );
}
