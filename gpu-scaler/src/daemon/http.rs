//! The HTTP listener: /healthz (the process answers), /readyz (GPU source
//! answering and a fresh snapshot), /metrics (Prometheus text) and
//! /v1/snapshot (the newest node snapshot as JSON).

use std::{fmt::Write as _, sync::Arc, time::Duration, time::SystemTime};

use axum::{Router, extract, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

use crate::{gpu::GpuStatus, sampler::SnapshotReceiver};

/// What the handlers read.
#[derive(Clone)]
pub struct State {
    pub snapshots: SnapshotReceiver,
    pub gpu: watch::Receiver<Arc<GpuStatus>>,
    pub poll_interval: Duration,
}

async fn healthz() -> &'static str {
    "ok\n"
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

/// A minimal exposition until the full metric set lands (shipping issue).
async fn metrics(extract::State(s): extract::State<State>) -> impl IntoResponse {
    let snap = s.snapshots.borrow().clone();
    let now = SystemTime::now();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP gpu_scaler_snapshot_age_seconds Age of the GPU samples in the newest node snapshot."
    );
    let _ = writeln!(out, "# TYPE gpu_scaler_snapshot_age_seconds gauge");
    match snap.samples_age(now) {
        Some(age) => {
            let _ = writeln!(out, "gpu_scaler_snapshot_age_seconds {}", age.as_secs_f64());
        }
        None => {
            let _ = writeln!(out, "gpu_scaler_snapshot_age_seconds NaN");
        }
    }
    let _ = writeln!(
        out,
        "# HELP gpu_scaler_gpu_source_up Whether the GPU source answered its newest poll."
    );
    let _ = writeln!(out, "# TYPE gpu_scaler_gpu_source_up gauge");
    let _ = writeln!(
        out,
        "gpu_scaler_gpu_source_up {}",
        u8::from(snap.gpu_error.is_none())
    );
    let _ = writeln!(
        out,
        "# HELP gpu_scaler_local_pods Pods on this node known to the pod source."
    );
    let _ = writeln!(out, "# TYPE gpu_scaler_local_pods gauge");
    let _ = writeln!(out, "gpu_scaler_local_pods {}", snap.pods.len());
    let _ = writeln!(out, "# HELP gpu_scaler_gpus GPUs in the newest snapshot.");
    let _ = writeln!(out, "# TYPE gpu_scaler_gpus gauge");
    let _ = writeln!(out, "gpu_scaler_gpus {}", snap.gpus.len());
    ([("content-type", "text/plain; version=0.0.4")], out)
}

/// The newest node snapshot as JSON (diagnostics, the demo).
async fn snapshot(extract::State(s): extract::State<State>) -> impl IntoResponse {
    let snap = s.snapshots.borrow().clone();
    match serde_json::to_string(&*snap) {
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
