//! Each AddressPool's `Valid` condition as the API server receives it: the
//! consent loop, reporting through a real kube client over HTTP to a small
//! stand-in for the API server that records every request. A refused pool
//! is told why, a good one that it is in force, and a pool whose status
//! says so already gets no request.

use std::sync::Mutex;

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri, header};
use serde_json::{Value, json};

use super::*;
use crate::claims::{ConsentLoop, PoolStatus};

/// One request the stand-in received.
#[derive(Debug, Clone)]
struct Received {
    method: Method,
    path: String,
    content_type: String,
    body: Value,
}

/// Records every request and answers it with the AddressPool its path
/// names, carrying the status the request sent.
#[derive(Clone, Default)]
struct ApiServer(Arc<Mutex<Vec<Received>>>);

impl ApiServer {
    /// Serves on a free port of 127.0.0.1; a client that talks to it.
    async fn serve(&self) -> kube::Client {
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        let url = format!("http://{addr}").parse().expect("url");
        kube::Client::try_from(kube::Config::new(url)).expect("client")
    }

    fn received(&self) -> Vec<Received> {
        self.0.lock().expect("requests").clone()
    }
}

async fn answer(
    State(api): State<ApiServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: String,
) -> axum::Json<Value> {
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let name = uri
        .path()
        .trim_end_matches("/status")
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = body["status"].clone();
    api.0.lock().expect("requests").push(Received {
        method,
        path: uri.path().to_owned(),
        content_type,
        body,
    });
    axum::Json(json!({
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "AddressPool",
        "metadata": {"name": name},
        "spec": {"cidrs": [], "use": "anycast"},
        "status": status,
    }))
}

/// A pool of generation 2 with `cidr`, and the `Valid` condition
/// `(status, message)` its status already holds, if any.
fn pool(name: &str, cidr: &str, valid: Option<(&str, &str)>) -> flock_model::AddressPool {
    let status = valid.map(|(status, message)| {
        json!({"conditions": [{
            "type": "Valid",
            "status": status,
            "reason": if status == "True" { "Accepted" } else { "Refused" },
            "message": message,
            "lastTransitionTime": "2026-12-01T00:00:00Z",
            "observedGeneration": 2,
        }]})
    });
    serde_json::from_value(json!({
        "apiVersion": "flock.fritzlab.net/v1alpha1",
        "kind": "AddressPool",
        "metadata": {"name": name, "generation": 2},
        "spec": {"cidrs": [cidr], "use": "anycast"},
        "status": status,
    }))
    .expect("pool")
}

/// The one `Valid` condition a request patches into the status of `pool`.
fn valid_condition(request: &Received, pool: &str) -> Value {
    assert_eq!(request.method, Method::PATCH, "{request:?}");
    assert_eq!(
        request.path,
        format!("/apis/flock.fritzlab.net/v1alpha1/addresspools/{pool}/status"),
        "{request:?}"
    );
    assert_eq!(
        request.content_type, "application/merge-patch+json",
        "{request:?}"
    );
    let conditions = request.body["status"]["conditions"]
        .as_array()
        .expect("conditions");
    assert_eq!(conditions.len(), 1, "{request:?}");
    let condition = conditions[0].clone();
    assert_eq!(condition["type"], "Valid", "{request:?}");
    assert_eq!(condition["observedGeneration"], 2, "{request:?}");
    assert!(
        condition["lastTransitionTime"]
            .as_str()
            .is_some_and(|t| t.parse::<k8s_openapi::jiff::Timestamp>().is_ok()),
        "{request:?}"
    );
    condition
}

#[tokio::test]
async fn each_pool_is_told_once_whether_it_is_in_force_and_why_not() {
    let api = ApiServer::default();
    let client = api.serve().await;
    let cache = Cache::new(NODE);
    cache.replace_node_configs(vec![node_config("198.18.0.0/24")]);
    cache.replace_pools(vec![
        pool("dns", "203.0.113.0/28", None),
        pool("overlaps", "198.18.0.0/25", None),
        pool(
            "settled",
            "198.51.100.0/28",
            Some(("True", "the pool is in force")),
        ),
    ]);
    let (consent, mut consented) =
        ConsentLoop::new(cache.clone(), Arc::new(Board::default()), Metrics::new());
    let stop = CancellationToken::new();
    tokio::spawn(consent.reporting(PoolStatus::new(client)).run(stop.clone()));
    // The consent is published once the pass has written every condition.
    let within = Duration::from_secs(10);
    tokio::time::timeout(within, consented.wait_for(Option::is_some))
        .await
        .expect("a consent within 10 s")
        .expect("the loop runs");
    let received = api.received();
    assert_eq!(
        received.len(),
        2,
        "dns and overlaps written, settled not: {received:?}"
    );
    let dns = valid_condition(&received[0], "dns");
    assert_eq!(
        (&dns["status"], &dns["reason"], &dns["message"]),
        (
            &json!("True"),
            &json!("Accepted"),
            &json!("the pool is in force")
        )
    );
    let overlaps = valid_condition(&received[1], "overlaps");
    assert_eq!(
        (
            &overlaps["status"],
            &overlaps["reason"],
            &overlaps["message"]
        ),
        (
            &json!("False"),
            &json!("Refused"),
            &json!(
                "AddressPool overlaps: spec.cidrs: 198.18.0.0/25 overlaps NodeConfig node-a's pod prefix 198.18.0.0/24"
            )
        )
    );

    // The watch brings the written conditions back, with a new pool whose
    // prefix does not parse: only the new pool is written to.
    let written = |c: &Value| {
        (
            c["status"].as_str().expect("status").to_owned(),
            c["message"].as_str().expect("message").to_owned(),
        )
    };
    let (dns, overlaps) = (written(&dns), written(&overlaps));
    cache.replace_pools(vec![
        pool("dns", "203.0.113.0/28", Some((&dns.0, &dns.1))),
        pool("late", "203.0.113.300/28", None),
        pool(
            "overlaps",
            "198.18.0.0/25",
            Some((&overlaps.0, &overlaps.1)),
        ),
        pool(
            "settled",
            "198.51.100.0/28",
            Some(("True", "the pool is in force")),
        ),
    ]);
    tokio::time::timeout(within, consented.changed())
        .await
        .expect("a new consent within 10 s")
        .expect("the loop runs");
    let received = api.received();
    assert_eq!(received.len(), 3, "only late is written: {received:?}");
    let late = valid_condition(&received[2], "late");
    assert_eq!(
        (&late["status"], &late["reason"]),
        (&json!("False"), &json!("Refused"))
    );
    let why = late["message"].as_str().expect("message");
    assert!(
        why.contains("AddressPool late") && why.contains("203.0.113.300/28"),
        "{why}"
    );
    stop.cancel();
}
