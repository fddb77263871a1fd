//! A scaler daemon in-process with hand-fed inputs, for the gRPC tests.
//!
//! [`Node`] runs the real wiring (`gpu_scaler::daemon::start`: the join,
//! gRPC server with ExternalScaler + grpc.health.v1, HTTP listener) on
//! 127.0.0.1 ephemeral ports. What cannot run here is fed by hand through the
//! same interfaces the real parts use: a [`Attributions`] (pid -> owner map)
//! implements `Attributor`, GPU passes are sent on the `GpuStatus` watch
//! channel, and pods on the `PodSet` channel.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use gpu_scaler::{
    attribution::Attributor,
    daemon::{self, Inputs, Settings},
    gpu::{GpuDevice, GpuSnapshot, GpuStatus},
    pods::{Pod, PodSet, PodsReceiver, PodsSender},
    scaler::{
        proto::{GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient},
        server::Tls,
    },
    testing::Attributions,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

pub use gpu_scaler::testing::{device, pod, process};

/// A daemon on 127.0.0.1 with hand-fed inputs.
pub struct Node {
    pub attributor: Arc<Attributions>,
    gpu_tx: watch::Sender<Arc<GpuStatus>>,
    pods_tx: PodsSender,
    /// When the newest input was fed; the sampler's join of it runs later.
    last_fed: std::sync::Mutex<SystemTime>,
    pub grpc_addr: std::net::SocketAddr,
    pub http_addr: std::net::SocketAddr,
    pub shutdown: CancellationToken,
    running: Option<daemon::Running>,
}

impl Node {
    /// Starts a daemon polling every `poll_interval` (which sets the staleness
    /// limit: three intervals), with optional TLS.
    pub async fn start(poll_interval: Duration, tls: Option<Tls>) -> Node {
        Self::start_with_pods(poll_interval, tls, None).await
    }

    /// As [`Node::start`], with pods from a real source (e.g. the pods file)
    /// instead of [`Node::set_pods`] (which then has no effect).
    pub async fn start_with_pods(
        poll_interval: Duration,
        tls: Option<Tls>,
        pods: Option<PodsReceiver>,
    ) -> Node {
        Self::start_with_sources(poll_interval, tls, pods, None).await
    }

    /// As [`Node::start`], with GPU passes from the real NVML code loading
    /// `nvml_lib` (the fake libnvidia-ml.so) every `poll_interval`.
    pub async fn start_with_nvml(poll_interval: Duration, nvml_lib: &std::path::Path) -> Node {
        let gpu = gpu_scaler::gpu::start(gpu_scaler::gpu::Config {
            source: gpu_scaler::gpu::SourceKind::Nvml,
            nvml_lib: Some(nvml_lib.to_path_buf()),
            scenario: None,
            poll_interval,
        });
        Self::start_with_sources(poll_interval, None, None, Some(gpu)).await
    }

    /// As [`Node::start`], with pods and/or GPU passes from real sources (the
    /// pods file; `gpu_scaler::gpu::start`, e.g. the mock scenario source)
    /// instead of [`Node::set_pods`] / [`Node::set_gpus`], which then have no
    /// effect (and [`Node::settle`] only covers what was fed by hand).
    pub async fn start_with_sources(
        poll_interval: Duration,
        tls: Option<Tls>,
        pods: Option<PodsReceiver>,
        gpu: Option<watch::Receiver<Arc<GpuStatus>>>,
    ) -> Node {
        Self::start_with_inputs(poll_interval, tls, pods, gpu, None).await
    }

    /// As [`Node::start_with_sources`], with a real attribution engine (e.g.
    /// the procfs backend resolving real processes in real pod cgroups) when
    /// `attributor` is given; [`Node::attributor`]'s table then has no effect.
    pub async fn start_with_inputs(
        poll_interval: Duration,
        tls: Option<Tls>,
        pods: Option<PodsReceiver>,
        gpu: Option<watch::Receiver<Arc<GpuStatus>>>,
        attributor: Option<Arc<dyn Attributor>>,
    ) -> Node {
        let table = Arc::new(Attributions::default());
        let (gpu_tx, own_gpu) = watch::channel(Arc::new(GpuStatus {
            last_good: None,
            error: Some("no pass yet".into()),
            updated_at: SystemTime::now(),
        }));
        let gpu_rx = gpu.unwrap_or(own_gpu);
        let (pods_tx, own_pods) = watch::channel(Arc::new(PodSet::empty("test", None)));
        let pods_rx = pods.unwrap_or(own_pods);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind HTTP");
        let shutdown = CancellationToken::new();
        let running = daemon::start(
            Inputs {
                attributor: attributor.unwrap_or_else(|| table.clone()),
                gpu: gpu_rx,
                pods: pods_rx,
                cluster: None,
            },
            grpc,
            http,
            Settings {
                poll_interval,
                tls,
                snapshot: gpu_scaler::daemon::http::SnapshotAccess::Auto,
                problems: Vec::new(),
                accounting: Default::default(),
                gpu_source: "gpu",
            },
            shutdown.clone(),
        )
        .expect("daemon starts");
        Node {
            attributor: table,
            gpu_tx,
            pods_tx,
            last_fed: std::sync::Mutex::new(SystemTime::now()),
            grpc_addr: running.grpc_addr,
            http_addr: running.http_addr,
            shutdown,
            running: Some(running),
        }
    }

    /// Publishes a new pod set.
    pub fn set_pods(&self, pods: Vec<Pod>) {
        self.fed();
        self.pods_tx
            .send_replace(Arc::new(PodSet::from_pods(pods, None, "test")));
    }

    /// Publishes a GPU pass taken now.
    pub fn set_gpus(&self, devices: Vec<GpuDevice>) {
        self.fed();
        let now = SystemTime::now();
        self.gpu_tx.send_replace(Arc::new(GpuStatus {
            last_good: Some(Arc::new(GpuSnapshot {
                taken_at: now,
                devices,
            })),
            error: None,
            updated_at: now,
        }));
    }

    /// Publishes a failed GPU pass (the last good samples are kept, as the real
    /// poller does).
    pub fn fail_gpus(&self, reason: &str) {
        self.fed();
        let last_good = self.gpu_tx.borrow().last_good.clone();
        self.gpu_tx.send_replace(Arc::new(GpuStatus {
            last_good,
            error: Some(reason.into()),
            updated_at: SystemTime::now(),
        }));
    }

    fn fed(&self) {
        *self.last_fed.lock().expect("last_fed lock") = SystemTime::now();
    }

    /// Waits until the sampler has joined everything fed so far (its join
    /// starts after the feed, so its timestamp is not earlier).
    pub async fn settle(&self) {
        let since = *self.last_fed.lock().expect("last_fed lock");
        let mut rx = self.running.as_ref().expect("running").snapshots.clone();
        tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.taken_at >= since))
            .await
            .expect("snapshot within 5 s")
            .expect("sampler alive");
    }

    /// The daemon's node snapshots.
    pub fn snapshots(&self) -> gpu_scaler::snapshot::SnapshotReceiver {
        self.running.as_ref().expect("running").snapshots.clone()
    }

    /// A plaintext gRPC client.
    pub async fn client(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("connect to the scaler")
    }

    /// Cancels the daemon and waits for it to stop.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let running = self.running.take().expect("running");
        tokio::time::timeout(Duration::from_secs(10), running.wait())
            .await
            .expect("daemon stops within 10 s")
            .expect("daemon stops cleanly");
    }

    /// GET `path` on the HTTP listener: (status code, body).
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.http_addr, path).await
    }
}

/// A ScaledObjectRef as KEDA sends it.
pub fn object_ref(namespace: &str, name: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: name.into(),
        namespace: namespace.into(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
    }
}

/// GetMetrics exactly as KEDA sends it (no metric name): the one value's float
/// field. Panics if the answer carries other than one value.
pub async fn metric_value(
    client: &mut ExternalScalerClient<Channel>,
    namespace: &str,
    name: &str,
    meta: &[(&str, &str)],
) -> Result<f64, tonic::Status> {
    let r = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object_ref(namespace, name, meta)),
            metric_name: String::new(),
        })
        .await?
        .into_inner();
    assert_eq!(r.metric_values.len(), 1, "exactly one value");
    Ok(r.metric_values[0].metric_value_float)
}

/// GET `path` from the daemon HTTP listener at `addr` with a plain HTTP/1.1
/// request ([`gpu_scaler::testing::http_get`], off the runtime's threads):
/// (status code, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || gpu_scaler::testing::http_get(addr, &path))
        .await
        .expect("HTTP GET task")
        .expect("HTTP GET")
}
