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

/// One line: `ready`, with how many warnings of which parts (the details
/// are in the log), or `not ready: REASON`. 503 means only "cannot serve
/// ADD"; warnings never fail the probe.
async fn readyz(State(slot): State<HandlerSlot>) -> (StatusCode, String) {
    let handler = slot.current();
    match handler.readiness() {
        Ok(()) => (StatusCode::OK, ready_line(&handler.warnings())),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", reason.replace('\n', " ")),
        ),
    }
}

/// `ready` or `ready; 2 warnings (bird, networkpolicy): details in the log`.
fn ready_line(warnings: &[String]) -> String {
    if warnings.is_empty() {
        return "ready\n".into();
    }
    let mut sources: Vec<&str> = warnings
        .iter()
        .map(|w| w.split(':').next().unwrap_or("agent"))
        .collect();
    sources.sort_unstable();
    sources.dedup();
    format!(
        "ready; {} warning{} ({}): details in the log\n",
        warnings.len(),
        if warnings.len() == 1 { "" } else { "s" },
        sources.join(", ")
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ready_line_counts_warnings_by_part_on_one_line() {
        assert_eq!(super::ready_line(&[]), "ready\n");
        let line = super::ready_line(&[
            "bird: last configuration not loaded".into(),
            "allocations: 198.18.0.2 is held by 2 entries".into(),
            "bird: another".into(),
        ]);
        assert_eq!(
            line,
            "ready; 3 warnings (allocations, bird): details in the log\n"
        );
    }
}
