//! The `isdp-sidecar` binary: flags, logging, signals around [`isdp_sidecar::run`].

use anyhow::Context;
use clap::Parser;
use isdp_core::telemetry;
use isdp_sidecar::config::{Cli, Config, LogFormat};
use tokio::sync::watch;

/// mimalloc: the request path allocates and frees many small objects
/// (headers, frames, futures), where it costs fewer instructions than
/// glibc's malloc. Built with `no_thp`: transparent huge pages would
/// nearly double the resident size of a process this small (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let config = Config::load(Cli::parse()).context("invalid configuration")?;
    // One worker by default, as linkerd2-proxy does: a sidecar shares its
    // host with the service it fronts, and a single-threaded runtime wakes
    // tasks without cross-thread handoffs, which is most of a request's
    // cost at moderate load. `workers > 1` trades that for parallelism.
    let runtime = if config.workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .enable_all()
            .build()
    }
    .context("starting the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let telemetry = telemetry::init(telemetry::Settings {
        json_logs: config.log_format == LogFormat::Json,
        otlp_endpoint: config.otlp_endpoint.clone(),
        sample_ratio: config.trace_sample_ratio,
        service_name: format!("isdp-sidecar-{}", config.node_id),
        instance_id: Some(config.node_id.clone()),
    })?;
    let result = run(config).await;
    telemetry.shutdown(SPAN_FLUSH_TIMEOUT).await;
    result
}

/// How long spans still queued at exit may take to reach the collector.
const SPAN_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

async fn run(config: Config) -> anyhow::Result<()> {
    let drain_timeout = config.drain_timeout;

    let (stop, shutdown) = watch::channel(false);
    let mut sidecar = tokio::spawn(isdp_sidecar::run(config, shutdown));
    tokio::select! {
        signal = shutdown_signal() => {
            signal?;
            tracing::info!("signal received, draining");
            let _ = stop.send(true);
        }
        result = &mut sidecar => {
            return result.context("sidecar task panicked")?.map_err(Into::into);
        }
    }
    match tokio::time::timeout(drain_timeout, sidecar).await {
        Ok(result) => result.context("sidecar task panicked")??,
        Err(_) => tracing::warn!(?drain_timeout, "drain timeout, exiting"),
    }
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
