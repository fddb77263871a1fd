//! The HTTP listener: /healthz (the process answers and a GPU sampling pass
//! succeeded lately, see [`super::liveness`]), /readyz (GPU source answering
//! and a fresh snapshot), /metrics (Prometheus text) and
//! /v1/snapshot (the newest node snapshot as JSON).

use std::{sync::Arc, time::Duration, time::SystemTime};

use axum::{Router, extract, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{
    gpu::GpuStatus,
    sampler::SnapshotReceiver,
    telemetry::metrics::{self, Metrics},
};

/// What the handlers read.
#[derive(Clone)]
pub struct State {
    pub snapshots: SnapshotReceiver,
    pub gpu: watch::Receiver<Arc<GpuStatus>>,
    pub poll_interval: Duration,
    /// What accumulates between scrapes.
    pub metrics: Arc<Metrics>,
    /// The cluster path's counters, in cluster mode.
    pub cluster: Option<Arc<crate::cluster::Stats>>,
    /// Open ExternalScaler streams.
    pub streams: Arc<crate::scaler::service::OpenStreams>,
    /// Asked for its table sizes and counters at scrape time.
    pub attributor: Arc<dyn crate::attribution::Attributor>,
    /// The engines read on this node.
    pub engines: watch::Receiver<Arc<crate::engine::EngineSnapshot>>,
    /// When the daemon started: the liveness clock before the first good pass.
    pub started_at: SystemTime,
}

async fn healthz(extract::State(s): extract::State<State>) -> impl IntoResponse {
    let gpu = s.gpu.borrow().clone();
    match super::liveness(&gpu, s.started_at, s.poll_interval, SystemTime::now()) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        ),
    }
}

async fn readyz(extract::State(s): extract::State<State>) -> impl IntoResponse {
    let snap = s.snapshots.borrow().clone();
    let gpu = s.gpu.borrow().clone();
    let reasons = super::readiness(&snap, &gpu, s.poll_interval, SystemTime::now());
    if reasons.is_empty() {
        (
            StatusCode::OK,
            format!(
                "ready: attribution {}, {} GPUs, {} local pods\n",
                snap.attribution,
                snap.gpus.len(),
                snap.pods.len()
            ),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", reasons.join("\n")),
        )
    }
}

/// The Prometheus exposition, rendered from the newest snapshot at scrape time.
async fn metrics(extract::State(s): extract::State<State>) -> impl IntoResponse {
    let snap = s.snapshots.borrow().clone();
    let gpu_up = s.gpu.borrow().error.is_none();
    let engines = s.engines.borrow().clone();
    let body = metrics::render(
        &snap,
        &metrics::Sources {
            metrics: &s.metrics,
            cluster: s.cluster.as_deref(),
            streams: Some(&s.streams),
            attribution: s.attributor.stats(),
            gpu_up,
            engines: Some(&engines),
        },
        SystemTime::now(),
    );
    ([("content-type", metrics::CONTENT_TYPE)], body)
}

/// The newest node snapshot as JSON (diagnostics, the demo).
async fn snapshot(extract::State(s): extract::State<State>) -> impl IntoResponse {
    let snap = s.snapshots.borrow().clone();
    let engines = s.engines.borrow().clone();
    let json = serde_json::to_value(&*snap).map(|mut v| {
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "engines".into(),
                serde_json::to_value(&engines.pods).unwrap_or_default(),
            );
        }
        v
    });
    match json.and_then(|v| serde_json::to_string(&v)) {
        Ok(body) => (StatusCode::OK, [("content-type", "application/json")], body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("serializing the snapshot: {e}\n"),
        ),
    }
}

pub fn router(state: State) -> Router {
    Router::new()
        .route("/v1/snapshot", get(snapshot))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

pub async fn serve(
    listener: TcpListener,
    state: State,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}
