//! A daemon of a test cluster, in-process on its own loopback address
//! (127.0.0.N), wired exactly as `serve` wires one in a cluster
//! (`daemon::start` with the cluster side): local pods from the fake API server's
//! node-scoped pod watch, workload pods from its label-selector watches,
//! ScaledObjects through its scale subresources, peers from its EndpointSlices.
//! Only the GPU and the pid -> pod map are hand-fed ([`gpu_scaler::testing::Attributions`]
//! and a `GpuStatus` channel re-published every poll so samples stay fresh).

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use gpu_scaler::{
    cluster::{
        Metrics, MissingNodePolicy, Parts,
        discovery::EndpointPeers,
        target::{RESOLVE_TTL, TargetResolver},
        workload::{CacheLimits, WorkloadPods},
    },
    daemon::{self, Inputs, Settings},
    gpu::{GpuDevice, GpuSnapshot, GpuStatus},
    pods::kube::{client, node_source},
    scaler::proto::external_scaler_client::ExternalScalerClient,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use gpu_scaler::testing::Attributions;

/// How a test cluster's daemons are set up.
#[derive(Clone)]
pub struct ClusterSettings {
    pub kubeconfig: std::path::PathBuf,
    /// Namespace and name of the headless Service listing the daemons.
    pub namespace: String,
    pub service: String,
    pub poll_interval: Duration,
    pub peer_timeout: Duration,
    pub policy: MissingNodePolicy,
}

/// One daemon. Its addresses stay the same across [`ClusterDaemon::stop`] and
/// [`ClusterDaemon::start`].
pub struct ClusterDaemon {
    pub node: String,
    pub ip: IpAddr,
    pub attributor: Arc<Attributions>,
    devices: Arc<Mutex<Vec<GpuDevice>>>,
    pub grpc_addr: SocketAddr,
    pub peer_addr: SocketAddr,
    settings: ClusterSettings,
    run: Option<(CancellationToken, daemon::Running)>,
    /// The listeners reserved by `new`, used by the first start.
    reserved: Option<(tokio::net::TcpListener, tokio::net::TcpListener)>,
    pub metrics: Option<Arc<Metrics>>,
}

impl ClusterDaemon {
    /// Reserves the daemon's addresses on `ip` (not started yet).
    pub async fn new(node: &str, ip: IpAddr, settings: ClusterSettings) -> Self {
        let grpc = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind gRPC");
        let peer = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind peer");
        Self {
            node: node.into(),
            ip,
            attributor: Arc::default(),
            devices: Arc::default(),
            grpc_addr: grpc.local_addr().expect("addr"),
            peer_addr: peer.local_addr().expect("addr"),
            settings,
            run: None,
            reserved: Some((grpc, peer)),
            metrics: None,
        }
    }

    /// The GPUs this node reports from its next poll on.
    pub fn set_gpus(&self, devices: Vec<GpuDevice>) {
        *self.devices.lock().expect("devices lock") = devices;
    }

    /// Starts (or restarts) the daemon on its addresses.
    pub async fn start(&mut self) {
        assert!(self.run.is_none(), "{} is already running", self.node);
        let s = self.settings.clone();
        let token = CancellationToken::new();
        let kube = client(Some(&s.kubeconfig)).await.expect("kube client");
        let (gpu_tx, gpu_rx) = watch::channel(Arc::new(GpuStatus {
            last_good: None,
            error: Some("no pass yet".into()),
            updated_at: SystemTime::now(),
        }));
        // The GPU poller: a pass every poll interval.
        let devices = self.devices.clone();
        let feeder_token = token.clone();
        let poll = s.poll_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            loop {
                tokio::select! {
                    () = feeder_token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let now = SystemTime::now();
                let devices = devices.lock().expect("devices lock").clone();
                gpu_tx.send_replace(Arc::new(GpuStatus {
                    last_good: Some(Arc::new(GpuSnapshot {
                        taken_at: now,
                        devices,
                    })),
                    error: None,
                    updated_at: now,
                }));
            }
        });
        let pods = node_source(kube.clone(), &self.node, token.clone());
        let (grpc, peer) = match self.reserved.take() {
            Some(l) => l,
            None => (
                bind_again(self.grpc_addr).await,
                bind_again(self.peer_addr).await,
            ),
        };
        let http = tokio::net::TcpListener::bind((self.ip, 0))
            .await
            .expect("bind HTTP");
        let metrics: Arc<Metrics> = Arc::default();
        let parts = Parts {
            node_name: self.node.clone(),
            peer_listener: peer,
            peers: Arc::new(EndpointPeers::start(kube.clone(), &s.namespace, &s.service)),
            pods: WorkloadPods::new(kube.clone(), CacheLimits::default()),
            resolver: Some(Arc::new(TargetResolver::new(kube, RESOLVE_TTL))),
            peer_timeout: s.peer_timeout,
            policy: s.policy,
            tls: None,
            metrics: metrics.clone(),
        };
        let running = daemon::start(
            Inputs {
                attributor: self.attributor.clone(),
                gpu: gpu_rx,
                pods,
                cluster: Some(parts),
            },
            grpc,
            http,
            Settings {
                poll_interval: s.poll_interval,
                tls: None,
                snapshot: gpu_scaler::daemon::http::SnapshotAccess::Auto,
                problems: Vec::new(),
                accounting: Default::default(),
                gpu_source: "gpu",
            },
            token.clone(),
        )
        .expect("daemon starts");
        self.metrics = Some(metrics);
        self.run = Some((token, running));
    }

    /// Stops the daemon (its ports close) and waits until it has.
    pub async fn stop(&mut self) {
        let (token, running) = self.run.take().expect("running");
        token.cancel();
        tokio::time::timeout(Duration::from_secs(10), running.wait())
            .await
            .expect("daemon stops within 10 s")
            .expect("daemon stops cleanly");
    }

    /// The running daemon's HTTP listener (/metrics, /readyz).
    pub fn http_addr(&self) -> SocketAddr {
        self.run.as_ref().expect("running").1.http_addr
    }

    /// A gRPC client of this daemon's ExternalScaler.
    pub async fn client(&self) -> ExternalScalerClient<Channel> {
        ExternalScalerClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .expect("connect to the scaler")
    }
}

/// Binds `addr` again after a stop (the port may linger briefly).
async fn bind_again(addr: SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr} again");
}
