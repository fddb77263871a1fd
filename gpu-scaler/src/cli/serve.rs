//! `gpu-scaler serve`: the node daemon.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{attribution, cluster, daemon};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address of KEDA's ExternalScaler gRPC service (and grpc.health.v1).
    #[arg(long, env = "GPU_SCALER_LISTEN", default_value = "0.0.0.0:6000")]
    pub listen: SocketAddr,

    /// Address of the HTTP listener for /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "GPU_SCALER_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,

    /// This node's name; pods whose spec.nodeName differs are not local. Unset: all
    /// pods in the pods file are local.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// How processes are mapped to pods.
    #[arg(long, env = "GPU_SCALER_ATTRIBUTION", value_enum, default_value_t)]
    pub attribution: attribution::Mode,

    /// How long an exited process still counts for its pod.
    #[arg(long, env = "GPU_SCALER_EXIT_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub exit_grace: Duration,

    /// Size of the eBPF event ring buffer: a power-of-two multiple of the page
    /// size (4KiB .. 2GiB), in bytes or with a KiB/MiB/GiB suffix. When a burst
    /// of process churn overflows it, events are lost and attribution
    /// resynchronises from /proc (gpu_scaler_ebpf_events_dropped_total counts them).
    #[arg(
        long,
        env = "GPU_SCALER_EBPF_RING_BUFFER_BYTES",
        default_value = "1MiB"
    )]
    pub ebpf_ring_buffer_bytes: attribution::RingBufferSize,

    #[command(flatten)]
    pub gpu_source: super::gpu_source::GpuSourceArgs,

    /// How often GPUs are sampled and the node snapshot is rebuilt.
    #[arg(long, env = "GPU_SCALER_POLL_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub poll_interval: Duration,

    /// A PodList as `kubectl get pods -A -o json` prints it, re-read on change.
    #[arg(long, env = "GPU_SCALER_PODS_FILE")]
    pub pods_file: Option<PathBuf>,

    /// PEM certificate chain for TLS on the scaler port.
    #[arg(long, env = "GPU_SCALER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "GPU_SCALER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
    #[arg(long, env = "GPU_SCALER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// With --tls-client-ca: DNS names (comma-separated) one of which a client
    /// certificate must carry as a SAN, e.g. KEDA's `keda-operator.keda.svc`.
    /// Empty: any certificate the CA signed.
    #[arg(
        long,
        env = "GPU_SCALER_TLS_CLIENT_NAMES",
        value_delimiter = ',',
        requires = "tls_client_ca"
    )]
    pub tls_client_names: Vec<String>,

    /// Whether the HTTP listener serves /v1/snapshot (every local pod's labels,
    /// container ids and host pids): `auto` only when --metrics-listen is a
    /// loopback address, `on`, or `off`.
    #[arg(long, env = "GPU_SCALER_SNAPSHOT", value_enum, default_value_t)]
    pub snapshot: daemon::http::SnapshotAccess,

    #[command(flatten)]
    pub accounting: super::accounting::AccountingArgs,

    /// Address of the node-to-node protocol (other daemons ask this one for its
    /// pods' usage).
    #[arg(long, env = "GPU_SCALER_PEER_LISTEN", default_value = "0.0.0.0:6001")]
    pub peer_listen: SocketAddr,

    /// Static peers, `NODE=IP:PORT,...` (instead of `--peer-service`).
    #[arg(long, env = "GPU_SCALER_PEERS", value_delimiter = ',', value_parser = cluster::discovery::parse_peer)]
    pub peers: Vec<(String, SocketAddr)>,

    /// Headless Service in the daemon's namespace whose EndpointSlices list the
    /// daemons (endpoint nodeName -> address, port named `peer`).
    #[arg(long, env = "GPU_SCALER_PEER_SERVICE")]
    pub peer_service: Option<String>,

    /// The daemon's own namespace (of `--peer-service`).
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,

    /// How long a peer may take to answer, connection included (KEDA allows
    /// 3 s for a whole polling round).
    #[arg(long, env = "GPU_SCALER_PEER_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub peer_timeout: Duration,

    /// What the pods of a node that does not answer count as (README: Cluster).
    #[arg(
        long,
        env = "GPU_SCALER_MISSING_NODE_POLICY",
        value_enum,
        default_value_t
    )]
    pub missing_node_policy: cluster::MissingNodePolicy,

    /// PEM certificate for mTLS between daemons (needs --peer-tls-key and
    /// --peer-tls-ca).
    #[arg(long, env = "GPU_SCALER_PEER_TLS_CERT", requires_all = ["peer_tls_key", "peer_tls_ca"])]
    pub peer_tls_cert: Option<PathBuf>,

    /// PEM private key for `--peer-tls-cert`.
    #[arg(long, env = "GPU_SCALER_PEER_TLS_KEY", requires = "peer_tls_cert")]
    pub peer_tls_key: Option<PathBuf>,

    /// PEM CA bundle that signed every daemon's peer certificate.
    #[arg(long, env = "GPU_SCALER_PEER_TLS_CA", requires = "peer_tls_cert")]
    pub peer_tls_ca: Option<PathBuf>,

    /// The name peer certificates must carry (a DNS SAN).
    #[arg(
        long,
        env = "GPU_SCALER_PEER_TLS_SERVER_NAME",
        default_value = "gpu-scaler-peer"
    )]
    pub peer_tls_server_name: String,

    /// Kubeconfig for the Kubernetes API (default: in-cluster, or KUBECONFIG).
    #[arg(long, env = "GPU_SCALER_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

pub async fn run(args: ServeArgs) -> super::Result<()> {
    let config = daemon::Config {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        node_name: args.node_name,
        attribution: attribution::Config {
            mode: args.attribution,
            exit_grace: args.exit_grace,
            ebpf_ring_buffer: args.ebpf_ring_buffer_bytes,
        },
        gpu: args.gpu_source.config(args.poll_interval),
        pods_file: args.pods_file,
        cluster: cluster::Config {
            peer_listen: args.peer_listen,
            peers: args.peers,
            peer_service: args.peer_service,
            namespace: args.namespace,
            peer_timeout: args.peer_timeout,
            missing_node_policy: args.missing_node_policy,
            peer_tls: match (args.peer_tls_cert, args.peer_tls_key, args.peer_tls_ca) {
                (Some(cert), Some(key), Some(ca)) => Some(cluster::peer::PeerTls {
                    cert,
                    key,
                    ca,
                    server_name: args.peer_tls_server_name,
                }),
                _ => None,
            },
            kubeconfig: args.kubeconfig,
        },
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| daemon::TlsFiles {
                cert,
                key,
                client_ca: args.tls_client_ca,
                client_names: args.tls_client_names,
            }),
        snapshot: args.snapshot,
        accounting: args.accounting.config(),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    daemon::run(config, shutdown).await?;
    Ok(())
}

/// SIGTERM (the kubelet) or Ctrl-C starts a graceful shutdown: open
/// StreamIsActive streams end with OK so KEDA reconnects at once.
async fn cancel_on_signal(token: CancellationToken) {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(error = %err, "cannot watch SIGTERM; only Ctrl-C stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
            token.cancel();
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
    }
    token.cancel();
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Args, Command};

    fn serve(args: &[&str]) -> Result<super::ServeArgs, clap::Error> {
        let argv = ["gpu-scaler", "serve"].iter().chain(args);
        Args::try_parse_from(argv).map(|a| match a.command {
            Command::Serve(s) => *s,
            other => panic!("parsed as {other:?}"),
        })
    }

    #[test]
    fn ebpf_ring_buffer_flag() {
        use crate::attribution::RingBufferSize;
        let s = serve(&[]).expect("defaults");
        assert_eq!(s.ebpf_ring_buffer_bytes, RingBufferSize::DEFAULT);
        assert_eq!(s.ebpf_ring_buffer_bytes.bytes(), 1 << 20);
        let s = serve(&["--ebpf-ring-buffer-bytes", "256KiB"]).expect("256KiB");
        assert_eq!(s.ebpf_ring_buffer_bytes.bytes(), 256 * 1024);
        let s = serve(&["--ebpf-ring-buffer-bytes", "4096"]).expect("one page");
        assert_eq!(s.ebpf_ring_buffer_bytes, RingBufferSize::one_page());
        let e = serve(&["--ebpf-ring-buffer-bytes", "5000"])
            .expect_err("not a power of two")
            .to_string();
        assert!(e.contains("power-of-two multiple of the page size"), "{e}");
        assert!(e.contains("4KiB and 8KiB"), "{e}");
        assert!(serve(&["--ebpf-ring-buffer-bytes", "1MB!"]).is_err());
    }

    #[test]
    fn cluster_flags() {
        let s = serve(&[]).expect("defaults");
        assert_eq!(s.peer_listen, "0.0.0.0:6001".parse().expect("addr"));
        assert_eq!(s.peer_timeout, std::time::Duration::from_secs(1));
        assert_eq!(
            s.missing_node_policy,
            crate::cluster::MissingNodePolicy::Average
        );
        assert!(s.peers.is_empty());

        let s = serve(&[
            "--peers",
            "gpu-1=10.0.0.1:6001,gpu-2=10.0.0.2:6001",
            "--missing-node-policy",
            "fail",
            "--peer-timeout",
            "250ms",
            "--peer-service",
            "gpu-scaler-peers",
            "--namespace",
            "gpu-scaler",
        ])
        .expect("cluster flags");
        assert_eq!(
            s.peers,
            vec![
                ("gpu-1".to_owned(), "10.0.0.1:6001".parse().expect("addr")),
                ("gpu-2".to_owned(), "10.0.0.2:6001".parse().expect("addr")),
            ]
        );
        assert_eq!(
            s.missing_node_policy,
            crate::cluster::MissingNodePolicy::Fail
        );
        assert_eq!(s.peer_timeout, std::time::Duration::from_millis(250));
        assert_eq!(s.peer_service.as_deref(), Some("gpu-scaler-peers"));
    }

    #[test]
    fn bad_cluster_flags_are_clear_errors() {
        let e = serve(&["--peers", "gpu-1"])
            .expect_err("no address")
            .to_string();
        assert!(e.contains("NODE=ADDR"), "{e}");
        let e = serve(&["--missing-node-policy", "zero"])
            .expect_err("unknown policy")
            .to_string();
        assert!(e.contains("average") && e.contains("fail"), "{e}");
        assert!(
            serve(&["--peer-tls-cert", "c.pem"]).is_err(),
            "cert without key and CA"
        );
        assert!(
            serve(&[
                "--peer-tls-cert",
                "c.pem",
                "--peer-tls-key",
                "k.pem",
                "--peer-tls-ca",
                "ca.pem"
            ])
            .is_ok()
        );
    }
}
