//! `gpu-scaler serve` wired up: attribution, GPU sampling, pods, the sampler,
//! the gRPC scaler (ExternalScaler + grpc.health.v1, TLS/mTLS) and the HTTP
//! listener (/healthz, /readyz, /metrics), with graceful shutdown.
//!
//! [`start_with`] takes the inputs ready-made so tests can feed a hand-written
//! attributor and GPU channel through the same wiring as [`run`].

pub mod http;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    attribution::{self, Attributor},
    gpu::{self, GpuStatus},
    join,
    pods::{self, PodSet, PodsReceiver},
    scaler::{LocalView, ScalerService, server},
    snapshot::{NodeSnapshot, SnapshotReceiver},
};

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Attribution(#[from] attribution::Error),
    #[error(transparent)]
    Pods(#[from] pods::file::Error),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] crate::tls::Error),
    #[error(transparent)]
    Grpc(#[from] server::Error),
    #[error("HTTP listener: {0}")]
    Http(#[source] std::io::Error),
    #[error("a daemon task panicked: {0}")]
    Task(String),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::Error),
    #[error("{0}")]
    ClusterConfig(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Paths of the TLS material for the scaler port.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: the DNS SANs a client certificate must carry one of.
    pub client_names: Vec<String>,
}

impl TlsFiles {
    pub fn load(&self) -> Result<server::Tls> {
        let read = |p: &Path| crate::tls::read(p);
        Ok(server::Tls {
            cert_pem: read(&self.cert)?,
            key_pem: read(&self.key)?,
            client_ca_pem: self.client_ca.as_deref().map(read).transpose()?,
            client_names: self.client_names.clone(),
        })
    }
}

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub node_name: Option<String>,
    pub attribution: attribution::Config,
    pub gpu: gpu::Config,
    pub pods_file: Option<PathBuf>,
    pub tls: Option<TlsFiles>,
    /// Whether the HTTP listener serves /v1/snapshot.
    pub snapshot: http::SnapshotAccess,
    /// Peers, Kubernetes access and the missing-node policy.
    pub cluster: crate::cluster::Config,
    /// The energy and idle-holder ledger.
    pub accounting: crate::accounting::Config,
}

/// The daemon's inputs, already started.
pub struct Inputs {
    pub attributor: Arc<dyn Attributor>,
    pub gpu: watch::Receiver<Arc<GpuStatus>>,
    pub pods: PodsReceiver,
    /// The cluster side, ready-made: with it the daemon answers for the whole
    /// cluster (the cluster-wide view, and the peer protocol served for other
    /// daemons); without, for this node's pods only.
    pub cluster: Option<crate::cluster::Parts>,
}

/// Settings of the serving side.
#[derive(Clone, Debug)]
pub struct Settings {
    pub poll_interval: Duration,
    pub tls: Option<server::Tls>,
    /// Whether the HTTP listener serves /v1/snapshot.
    pub snapshot: http::SnapshotAccess,
    /// What start-up found that keeps the daemon from answering correctly (no
    /// usable Kubernetes configuration, say): each is a readiness reason for as
    /// long as the daemon runs, so KEDA's Service never routes to it and an
    /// empty pod set is never read as "no GPU use" (issue 13).
    pub problems: Vec<String>,
    /// The energy and idle-holder ledger.
    pub accounting: crate::accounting::Config,
    /// The GPU source's label in `gpu_scaler_sample_errors` (`nvml`, `mock`).
    pub gpu_source: &'static str,
}

/// A started daemon.
pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub snapshots: SnapshotReceiver,
    /// Where the peer protocol is served, in cluster mode.
    pub peer_addr: Option<SocketAddr>,
    task: JoinHandle<Result<()>>,
}

impl Running {
    /// Waits until the daemon has shut down (after its token was cancelled) or
    /// failed.
    pub async fn wait(self) -> Result<()> {
        self.task.await.map_err(|e| Error::Task(e.to_string()))?
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Starts every part from `config` and serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let tls = config.tls.as_ref().map(TlsFiles::load).transpose()?;
    let attributor = attribution::start(config.attribution.clone()).await?;
    tracing::info!(backend = %attributor.backend(), "attribution started");
    let poll_interval = config.gpu.poll_interval;
    let gpu = gpu::start(config.gpu.clone());
    // Kubernetes: wherever there is no pods file (in a cluster), or when a
    // kubeconfig is named explicitly.
    let mut problems = Vec::new();
    let kube = if config.pods_file.is_none() || config.cluster.kubeconfig.is_some() {
        match pods::kube::client(config.cluster.kubeconfig.as_deref()).await {
            Ok(c) => Some(c),
            Err(e) if config.cluster.kubeconfig.is_some() => {
                return Err(Error::ClusterConfig(e.to_string()));
            }
            Err(e) => {
                // Without the API and without a pods file no pod can be named:
                // every workload would read as idle. Serve (probes, /metrics),
                // but never ready.
                tracing::error!(error = %e, "no Kubernetes API access and no --pods-file: not ready");
                problems.push(format!(
                    "pods: no usable Kubernetes configuration and no --pods-file ({e})"
                ));
                None
            }
        }
    } else {
        None
    };
    let pods = match (&config.pods_file, &kube, &config.node_name) {
        (Some(path), _, _) => pods::file::start(pods::file::Config {
            path: path.clone(),
            node_name: config.node_name.clone(),
            check_interval: poll_interval.min(Duration::from_secs(1)),
        })?,
        (None, Some(client), Some(node)) => {
            tracing::info!(node, "local pods from the Kubernetes API");
            pods::kube::node_source(client.clone(), node, shutdown.clone())
        }
        _ => {
            tracing::warn!(
                "no pod source (--pods-file): GPU use is attributed to pod UIDs but no workload can be selected"
            );
            let (tx, rx) =
                watch::channel(Arc::new(PodSet::empty("none", config.node_name.clone())));
            // Keep the sender alive as long as the daemon so the sampler runs.
            let token = shutdown.clone();
            tokio::spawn(async move {
                token.cancelled().await;
                drop(tx);
            });
            rx
        }
    };
    let grpc = bind(config.listen).await?;
    let http = bind(config.metrics_listen).await?;
    let cluster = cluster_parts(&config, kube, &pods).await?;
    let running = start(
        Inputs {
            attributor,
            gpu,
            pods,
            cluster,
        },
        grpc,
        http,
        Settings {
            poll_interval,
            tls,
            snapshot: config.snapshot,
            problems,
            accounting: config.accounting,
            gpu_source: match config.gpu.source {
                gpu::SourceKind::Nvml => "nvml",
                gpu::SourceKind::Mock => "mock",
            },
        },
        shutdown,
    )?;
    tracing::info!(grpc = %running.grpc_addr, http = %running.http_addr, peer = ?running.peer_addr, "serving");
    running.wait().await
}

/// The cluster side from the flags: on when the node has a name and either the
/// Kubernetes API or a static peer list says where the other daemons are.
async fn cluster_parts(
    config: &Config,
    kube: Option<kube::Client>,
    pods: &PodsReceiver,
) -> Result<Option<crate::cluster::Parts>> {
    use crate::cluster::{Parts, discovery, target, workload};
    let c = &config.cluster;
    let Some(node_name) = config.node_name.clone() else {
        tracing::info!("no --node-name: answering for this node's pods only");
        return Ok(None);
    };
    if kube.is_none() && c.peers.is_empty() {
        tracing::info!(
            "neither Kubernetes access nor --peers: answering for this node's pods only"
        );
        return Ok(None);
    }
    let peers: Arc<dyn discovery::PeerBook> = match (&c.peer_service, &kube) {
        _ if !c.peers.is_empty() => Arc::new(discovery::StaticPeers::new(c.peers.clone())),
        (Some(service), Some(client)) => {
            let namespace = c.namespace.clone().ok_or_else(|| {
                Error::ClusterConfig(
                    "--peer-service needs the daemon's namespace (--namespace or POD_NAMESPACE)"
                        .into(),
                )
            })?;
            tracing::info!(%namespace, service, "peers from the Service's EndpointSlices");
            Arc::new(discovery::EndpointPeers::start(
                client.clone(),
                &namespace,
                service,
            ))
        }
        _ => {
            tracing::warn!(
                "no --peers and no --peer-service: pods on other nodes count as unreported \
                 (--missing-node-policy)"
            );
            Arc::new(discovery::StaticPeers::default())
        }
    };
    let directory: Arc<dyn workload::PodDirectory> = match &kube {
        Some(client) => {
            workload::WorkloadPods::new(client.clone(), workload::CacheLimits::default())
        }
        None => Arc::new(workload::PodSetDirectory(pods.clone())),
    };
    let resolver =
        kube.map(|client| Arc::new(target::TargetResolver::new(client, target::RESOLVE_TTL)));
    Ok(Some(Parts {
        node_name,
        peer_listener: bind(c.peer_listen).await?,
        peers,
        pods: directory,
        resolver,
        peer_timeout: c.peer_timeout,
        policy: c.missing_node_policy,
        tls: c.peer_tls.clone(),
        metrics: Arc::default(),
    }))
}

/// Why the daemon is not ready to answer, if it is not: the GPU source must be
/// answering and the snapshot fresh. (Attribution is ready once started.)
pub fn readiness(
    snap: &NodeSnapshot,
    gpu: &GpuStatus,
    poll_interval: Duration,
    now: SystemTime,
) -> Vec<String> {
    let mut reasons = Vec::new();
    if let Some(e) = &gpu.error {
        reasons.push(format!("GPU source: {e}"));
    }
    if let Err(e) = crate::snapshot::check_fresh(snap, poll_interval, now) {
        reasons.push(format!("snapshot: {e}"));
    }
    reasons
}

/// /healthz fails once no GPU sampling pass has succeeded for this many poll
/// intervals ...
pub const LIVENESS_INTERVALS: u32 = 10;
/// ... and at least this long: the kubelet then restarts a daemon whose
/// sampling is stuck (an NVML call that never returns, a driver that went away
/// and never came back to this process). Issue 11.
pub const LIVENESS_AT_LEAST: Duration = Duration::from_secs(60);

/// Whether the daemon is alive: a sampling pass succeeded within
/// [`LIVENESS_INTERVALS`] poll intervals (at least [`LIVENESS_AT_LEAST`]),
/// counted from `started_at` before the first one. A clock that stepped back
/// counts as fresh.
pub fn liveness(
    gpu: &GpuStatus,
    started_at: SystemTime,
    poll_interval: Duration,
    now: SystemTime,
) -> std::result::Result<(), String> {
    let limit = (poll_interval * LIVENESS_INTERVALS).max(LIVENESS_AT_LEAST);
    let (since, what) = match &gpu.last_good {
        Some(s) => (s.taken_at, "the last successful GPU sampling pass"),
        None => (
            started_at,
            "start-up, and no GPU sampling pass has succeeded",
        ),
    };
    let age = now.duration_since(since).unwrap_or_default();
    if age <= limit {
        return Ok(());
    }
    Err(format!(
        "{}s since {what} (limit {}s){}",
        age.as_secs(),
        limit.as_secs(),
        gpu.error
            .as_deref()
            .map(|e| format!("; newest error: {e}"))
            .unwrap_or_default()
    ))
}

/// Wires started inputs to bound listeners and serves until `shutdown`; every
/// domain's counters and histograms are registered for /metrics.
pub fn start(
    inputs: Inputs,
    grpc: TcpListener,
    http: TcpListener,
    settings: Settings,
    shutdown: CancellationToken,
) -> Result<Running> {
    let cluster = inputs.cluster;
    let grpc_addr = grpc.local_addr().map_err(Error::Http)?;
    let http_addr = http.local_addr().map_err(Error::Http)?;
    let gpu = inputs.gpu.clone();
    let attributor = inputs.attributor.clone();
    // Engines are read on the poll interval, each read bounded well inside it.
    let scraper = crate::engine::Scraper::new(
        crate::engine::ScrapeConfig {
            interval: settings.poll_interval,
            timeout: (settings.poll_interval / 2).min(Duration::from_secs(2)),
            ..Default::default()
        },
        inputs.pods.clone(),
    );
    tokio::spawn(scraper.clone().run(shutdown.clone()));
    let engines = scraper.subscribe();
    let join_metrics = Arc::new(join::Metrics::new(settings.gpu_source));
    let snapshots = join::start(
        inputs.attributor,
        inputs.gpu,
        inputs.pods,
        join::Options {
            accounting: settings.accounting,
            metrics: join_metrics.clone(),
        },
    );
    let local_policy = cluster
        .as_ref()
        .map_or(crate::cluster::MissingNodePolicy::default(), |p| p.policy);
    let cluster = cluster
        .map(|parts| {
            crate::cluster::start(
                parts,
                snapshots.clone(),
                settings.poll_interval,
                Some(scraper.clone()),
                shutdown.clone(),
            )
        })
        .transpose()?;
    let view: Arc<dyn crate::scaler::WorkloadView> = match &cluster {
        Some(c) => c.view.clone(),
        None => Arc::new(
            LocalView::new(snapshots.clone(), settings.poll_interval).with_engines(
                scraper.clone(),
                Arc::new(move |total, missing| {
                    local_policy
                        .admit(total, missing)
                        .map_err(|e| e.to_string())
                }),
            ),
        ),
    };
    let (peer_addr, cluster_metrics, peer_task) = match cluster {
        Some(c) => (Some(c.peer_addr), Some(c.metrics), Some(c.task)),
        None => (None, None, None),
    };
    let service = ScalerService::new(view, shutdown.clone(), settings.poll_interval);
    let mut registry = crate::telemetry::metrics::registry();
    join_metrics.register(&mut registry);
    service.metrics().register(&mut registry);
    scraper.metrics().register(&mut registry);
    if let Some(m) = &cluster_metrics {
        m.register(&mut registry);
    }
    let (reporter, health_service) = server::health();

    // grpc.health.v1 follows readiness, so probes and KEDA-side checks see a
    // scaler that cannot answer as NOT_SERVING.
    let health_task = {
        let mut snaps = snapshots.clone();
        let gpu = gpu.clone();
        let shutdown = shutdown.clone();
        let poll = settings.poll_interval;
        let no_problems = settings.problems.is_empty();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            let mut last = None;
            loop {
                let ready = {
                    let snap = snaps.borrow_and_update().clone();
                    no_problems
                        && readiness(&snap, &gpu.borrow(), poll, SystemTime::now()).is_empty()
                };
                if last != Some(ready) {
                    if ready {
                        reporter.set_serving::<server::Served>().await;
                    } else {
                        reporter.set_not_serving::<server::Served>().await;
                    }
                    last = Some(ready);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = snaps.changed() => {}
                    _ = tick.tick() => {}
                }
            }
            reporter.set_not_serving::<server::Served>().await;
        })
    };

    let http_state = http::State {
        snapshots: snapshots.clone(),
        gpu,
        poll_interval: settings.poll_interval,
        registry: Arc::new(registry),
        attributor,
        engines,
        started_at: SystemTime::now(),
        snapshot: settings.snapshot.serves(http_addr),
        problems: settings.problems.clone().into(),
    };
    let grpc_fut = server::serve(
        grpc,
        service,
        settings.tls,
        Some(health_service),
        shutdown.clone(),
    );
    let http_fut = http::serve(
        http,
        http::router(http_state),
        http::Limits::default(),
        shutdown.clone(),
    );
    let task = tokio::spawn(async move {
        let (g, h) = tokio::join!(
            async {
                let r = grpc_fut.await;
                // One listener failing takes the daemon down, not half of it.
                shutdown.cancel();
                r
            },
            async {
                let r = http_fut.await;
                shutdown.cancel();
                r
            }
        );
        let _ = health_task.await;
        let p = match peer_task {
            Some(t) => t.await.map_err(|e| Error::Task(e.to_string()))?,
            None => Ok(()),
        };
        tracing::info!("daemon stopped");
        g?;
        h.map_err(Error::Http)?;
        Ok(p?)
    });
    Ok(Running {
        grpc_addr,
        http_addr,
        snapshots,
        peer_addr,
        task,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{attribution::Backend, gpu::GpuSnapshot};

    fn snapshot(samples_at: Option<SystemTime>, gpu_error: Option<&str>) -> NodeSnapshot {
        NodeSnapshot {
            taken_at: SystemTime::now(),
            samples_taken_at: samples_at,
            gpu_error: gpu_error.map(Into::into),
            node_name: None,
            attribution: Backend::Procfs,
            gpus: Vec::new(),
            pods: BTreeMap::new(),
            unowned: Vec::new(),
            pods_error: None,
            energy: Vec::new(),
            accounts: Default::default(),
        }
    }

    fn status(error: Option<&str>) -> GpuStatus {
        GpuStatus {
            last_good: Some(Arc::new(GpuSnapshot {
                taken_at: SystemTime::now(),
                devices: Vec::new(),
            })),
            error: error.map(Into::into),
            updated_at: SystemTime::now(),
        }
    }

    #[test]
    fn readiness_reasons() {
        let poll = Duration::from_secs(1);
        let now = SystemTime::now();
        assert!(readiness(&snapshot(Some(now), None), &status(None), poll, now).is_empty());
        let old = now - Duration::from_secs(4);
        let r = readiness(&snapshot(Some(old), None), &status(None), poll, now);
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("4000 ms old"), "{r:?}");
        let r = readiness(
            &snapshot(Some(now), Some("no driver")),
            &status(Some("no driver")),
            poll,
            now,
        );
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r.iter().all(|x| x.contains("no driver")), "{r:?}");
        let r = readiness(&snapshot(None, None), &status(None), poll, now);
        assert!(r[0].contains("no GPU sample yet"), "{r:?}");
    }

    #[test]
    fn liveness_fails_only_after_ten_intervals_without_a_good_pass() {
        let now = SystemTime::now();
        let at = |secs: u64| now - Duration::from_secs(secs);
        let good_at = |t: SystemTime, error: Option<&str>| GpuStatus {
            last_good: Some(Arc::new(GpuSnapshot {
                taken_at: t,
                devices: Vec::new(),
            })),
            error: error.map(Into::into),
            updated_at: now,
        };
        let never = GpuStatus {
            last_good: None,
            error: Some("no driver".into()),
            updated_at: now,
        };
        let poll = Duration::from_secs(10);
        // 10 intervals of 10 s: 100 s.
        assert_eq!(
            liveness(&good_at(at(99), Some("lost")), at(500), poll, now),
            Ok(())
        );
        let err = liveness(&good_at(at(101), Some("GPU is lost")), at(500), poll, now)
            .expect_err("stuck for over 100 s");
        assert!(err.contains("101s") && err.contains("GPU is lost"), "{err}");
        // Never a good pass: counted from start-up.
        assert_eq!(liveness(&never, at(30), poll, now), Ok(()));
        let err = liveness(&never, at(120), poll, now).expect_err("never sampled");
        assert!(
            err.contains("start-up") && err.contains("no driver"),
            "{err}"
        );
        // Short intervals: at least 60 s.
        let fast = Duration::from_millis(100);
        assert_eq!(liveness(&good_at(at(59), None), at(500), fast, now), Ok(()));
        assert!(liveness(&good_at(at(61), None), at(500), fast, now).is_err());
        // A clock that stepped back is not a stuck daemon.
        let future = now + Duration::from_secs(3600);
        assert_eq!(liveness(&good_at(future, None), at(500), poll, now), Ok(()));
    }

    #[test]
    fn tls_files_name_the_missing_path() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
            client_names: Vec::new(),
        };
        let err = files.load().expect_err("missing files");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }
}
