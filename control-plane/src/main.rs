use std::time::Duration;

use clap::Parser;
use isdp_control_plane::Config;
use isdp_core::telemetry;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = telemetry::init(telemetry::Settings {
        json_logs: config.log_format == "json",
        otlp_endpoint: config.trace.otlp_endpoint.clone(),
        sample_ratio: config
            .trace
            .trace_sample_ratio
            .unwrap_or(telemetry::DEFAULT_SAMPLE_RATIO),
        service_name: "isdp-control-plane".to_owned(),
        instance_id: None,
    })?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    let result = isdp_control_plane::run(config, rx).await;
    telemetry.shutdown(Duration::from_secs(2)).await;
    result?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
