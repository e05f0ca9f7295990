//! The admin HTTP listener: `/healthz` (the process is alive), `/ready`
//! (the store is loaded and the gRPC listener is serving) and `/metrics`
//! (Prometheus text format).

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};

use crate::{metrics::Metrics, registry::Registry};

#[derive(Clone)]
struct AdminState {
    metrics: Metrics,
    registry: Registry,
}

pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    registry: Registry,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_handler))
        .with_state(AdminState { metrics, registry });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    format!(
        "ready: {} instances in {} services\n",
        s.registry.len(),
        s.registry.services().len()
    )
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
