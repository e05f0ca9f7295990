//! The admin HTTP listener: `/healthz` (the process is alive), `/ready`
//! (the store is loaded, the gRPC listener is serving and the store can be
//! written: 503 with the reason while it cannot) and `/metrics`
//! (Prometheus text format).

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::{net::TcpListener, sync::watch};

use crate::{metrics::Metrics, registry::Registry, store::Store};

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    registry: Registry,
    store: Arc<dyn Store>,
}

pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    registry: Registry,
    store: Arc<dyn Store>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState {
            metrics,
            registry,
            store,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if let Some(problem) = s.store.health().problem {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: store failed: {problem}\n"),
        );
    }
    let text = format!(
        "ready: {} instances in {} services\n",
        s.registry.len(),
        s.registry.services().len()
    );
    (StatusCode::OK, text)
}

async fn metrics_handler(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        s.metrics.render(),
    )
}
