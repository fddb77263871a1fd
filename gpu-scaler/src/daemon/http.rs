//! The HTTP listener: /healthz (the process answers and a GPU sampling pass
//! succeeded lately, see [`super::liveness`]), /readyz (GPU source answering
//! and a fresh snapshot), /metrics (Prometheus text) and, where allowed
//! ([`SnapshotAccess`]), /v1/snapshot (the newest node snapshot as JSON).
//!
//! The accept loop is bounded (issue 13: 300 half-open connections were never
//! closed): a request head must arrive within [`HEADER_READ_TIMEOUT`], and at
//! most [`MAX_CONNECTIONS`] are open; a new connection past that closes the
//! oldest one that is not in a request, so the kubelet's probes (a new
//! connection each) get in whatever idle clients do.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
    time::SystemTime,
};

use axum::{Router, extract, http::StatusCode, response::IntoResponse, routing::get};
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;

/// A client must send a whole request head within this, or the connection is
/// closed (also between requests on a kept-alive connection).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections open at once on the HTTP listener.
pub const MAX_CONNECTIONS: usize = 512;

/// Who may read /v1/snapshot, which shows every local pod's labels, container
/// ids and host pids (issue 13).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotAccess {
    /// Served only when the HTTP listener is on a loopback address.
    #[default]
    Auto,
    /// Served wherever the listener is.
    On,
    /// Never served.
    Off,
}

impl SnapshotAccess {
    /// Whether a listener on `addr` serves /v1/snapshot.
    pub fn serves(self, addr: SocketAddr) -> bool {
        match self {
            Self::Auto => addr.ip().is_loopback(),
            Self::On => true,
            Self::Off => false,
        }
    }
}

use crate::{gpu::GpuStatus, snapshot::SnapshotReceiver, telemetry::metrics};

/// What the handlers read.
#[derive(Clone)]
pub struct State {
    pub snapshots: SnapshotReceiver,
    pub gpu: watch::Receiver<Arc<GpuStatus>>,
    pub poll_interval: Duration,
    /// The domains' counters and histograms (join, scaler, engine, cluster).
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Asked for its table sizes and counters at scrape time.
    pub attributor: Arc<dyn crate::attribution::Attributor>,
    /// The engines read on this node.
    pub engines: watch::Receiver<Arc<crate::engine::EngineSnapshot>>,
    /// When the daemon started: the liveness clock before the first good pass.
    pub started_at: SystemTime,
    /// Whether /v1/snapshot is served ([`SnapshotAccess::serves`]).
    pub snapshot: bool,
    /// Start-up problems, reasons for not being ready ([`super::Settings::problems`]).
    pub problems: Arc<[String]>,
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
    let mut reasons = s.problems.to_vec();
    reasons.extend(super::readiness(
        &snap,
        &gpu,
        s.poll_interval,
        SystemTime::now(),
    ));
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
            registry: &s.registry,
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
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let router = if state.snapshot {
        router.route("/v1/snapshot", get(snapshot))
    } else {
        router
    };
    router.with_state(state)
}

/// One open connection: closed through `close`; `busy` while it is in a request.
struct Conn {
    close: CancellationToken,
    busy: Arc<AtomicBool>,
}

/// The open connections by age (ids grow).
#[derive(Default)]
struct Conns {
    open: Mutex<BTreeMap<u64, Conn>>,
    next: AtomicU64,
}

impl Conns {
    /// Registers a new connection, first closing the oldest idle one when the
    /// cap is reached. `None`: every open connection is in a request; the new
    /// one is refused.
    fn admit(&self, max: usize) -> Option<(u64, CancellationToken, Arc<AtomicBool>)> {
        let mut open = self.open.lock().expect("connections lock");
        if open.len() >= max {
            let idle = open
                .iter()
                .find(|(_, c)| !c.busy.load(Ordering::Acquire))
                .map(|(id, _)| *id)?;
            if let Some(c) = open.remove(&idle) {
                c.close.cancel();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            close: CancellationToken::new(),
            busy: Arc::default(),
        };
        let handles = (id, conn.close.clone(), conn.busy.clone());
        open.insert(id, conn);
        Some(handles)
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("connections lock").remove(&id);
    }

    fn close_all(&self) {
        for c in self.open.lock().expect("connections lock").values() {
            c.close.cancel();
        }
    }
}

/// What one listener accepts: open connections and how long a request head
/// may take.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
        }
    }
}

/// Serves `router` (the daemon's is [`router`]) within `limits` until
/// `shutdown`, then closes the open connections gracefully (requests in flight
/// finish).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let Limits {
        max_connections,
        header_read_timeout,
    } = limits;
    let conns = Arc::new(Conns::default());
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            // Reap finished connection tasks so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: pause, do not exit.
                    tracing::warn!(%error, "HTTP accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some((id, close, busy)) = conns.admit(max_connections) else {
            tracing::debug!("HTTP connection cap reached with every connection busy; refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = hyper::service::service_fn({
            let router = router.clone();
            move |req: hyper::Request<hyper::body::Incoming>| {
                let busy = busy.clone();
                busy.store(true, Ordering::Release);
                let call = tower::ServiceExt::oneshot(router.clone(), req);
                async move {
                    let res = call.await;
                    busy.store(false, Ordering::Release);
                    res
                }
            }
        });
        let conns = conns.clone();
        tasks.spawn(async move {
            let builder = {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(header_read_timeout)
                    .keep_alive(true);
                b
            };
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = close.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.as_mut().await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%error, "HTTP connection ended with an error");
            }
            conns.remove(id);
        });
    }
    conns.close_all();
    // Requests in flight finish; idle connections close at once.
    while tasks.join_next().await.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_is_served_on_loopback_or_when_asked() {
        let lo: SocketAddr = "127.0.0.1:9090".parse().expect("addr");
        let lo6: SocketAddr = "[::1]:9090".parse().expect("addr");
        let any: SocketAddr = "0.0.0.0:9090".parse().expect("addr");
        let pod: SocketAddr = "10.0.3.7:9090".parse().expect("addr");
        assert!(SnapshotAccess::Auto.serves(lo) && SnapshotAccess::Auto.serves(lo6));
        assert!(!SnapshotAccess::Auto.serves(any) && !SnapshotAccess::Auto.serves(pod));
        assert!(SnapshotAccess::On.serves(any));
        assert!(!SnapshotAccess::Off.serves(lo));
    }

    #[test]
    fn a_full_table_makes_room_by_closing_the_oldest_idle_connection() {
        let conns = Conns::default();
        let (a, close_a, busy_a) = conns.admit(2).expect("first");
        let (_b, close_b, _) = conns.admit(2).expect("second");
        // The oldest is in a request: the next idle one goes instead.
        busy_a.store(true, Ordering::Release);
        let (_c, _, _) = conns.admit(2).expect("third, closing b");
        assert!(close_b.is_cancelled() && !close_a.is_cancelled());
        // Every one busy: refused.
        for c in conns.open.lock().expect("lock").values() {
            c.busy.store(true, Ordering::Release);
        }
        assert!(conns.admit(2).is_none(), "all in requests");
        conns.remove(a);
        assert!(conns.admit(2).is_some(), "a slot freed");
    }
}
