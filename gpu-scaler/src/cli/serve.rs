//! `gpu-scaler serve`: the node daemon.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::{attribution, daemon, gpu};

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

    /// Where GPU figures come from.
    #[arg(long, env = "GPU_SCALER_GPU", value_enum, default_value_t)]
    pub gpu: gpu::SourceKind,

    /// Path of libnvidia-ml.so (default: the system's).
    #[arg(long, env = "GPU_SCALER_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,

    /// Scenario file for `--gpu mock` (format in README.md).
    #[arg(long, env = "GPU_SCALER_GPU_SCENARIO", required_if_eq("gpu", "mock"))]
    pub gpu_scenario: Option<PathBuf>,

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
}

pub async fn run(args: ServeArgs) -> super::Result<()> {
    let config = daemon::Config {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        node_name: args.node_name,
        attribution: attribution::Config {
            mode: args.attribution,
            exit_grace: args.exit_grace,
        },
        gpu: gpu::Config {
            source: args.gpu,
            nvml_lib: args.nvml_lib,
            scenario: args.gpu_scenario,
            poll_interval: args.poll_interval,
        },
        pods_file: args.pods_file,
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| daemon::TlsFiles {
                cert,
                key,
                client_ca: args.tls_client_ca,
            }),
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
