//! `/healthz` and `/readyz` over HTTP.

use std::future::Future;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;

use crate::handler::HandlerSlot;
use crate::metrics::Metrics;

/// Serves the endpoints on `listener` until `shutdown` completes.
/// `/healthz` answers 200 while the process serves; `/readyz` answers 200
/// once the handler in force can serve ADD, else 503 with the reason;
/// `/metrics` is the Prometheus text format.
pub async fn serve(
    listener: TcpListener,
    slot: HandlerSlot,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(slot)
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn readyz(State(slot): State<HandlerSlot>) -> (StatusCode, String) {
    let handler = slot.current();
    match handler.readiness() {
        Ok(()) => {
            let mut body = String::from("ready\n");
            for warning in handler.warnings() {
                body.push_str(&warning);
                body.push('\n');
            }
            (StatusCode::OK, body)
        }
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
