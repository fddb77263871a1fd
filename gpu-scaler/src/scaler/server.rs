//! The gRPC server: ExternalScaler and grpc.health.v1, optionally over TLS or
//! mTLS, on a listener the caller bound.

use std::{sync::Arc, time::Duration};

use crate::telemetry::metrics::Metrics;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;

use super::{proto::external_scaler_server::ExternalScalerServer, service::ScalerService};

/// PEM material for the scaler port.
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate this CA signed (mTLS), as
    /// KEDA's TriggerAuthentication tlsClientCert/tlsClientKey supply.
    pub client_ca_pem: Option<Vec<u8>>,
}

/// Errors of the gRPC server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("gRPC server: {0}")]
    Transport(#[source] tonic::transport::Error),
}

/// The service name KEDA-side health checks ask grpc.health.v1 about.
pub type Served = ExternalScalerServer<ScalerService>;

/// A health reporter and its service; the reporter marks ExternalScaler
/// serving or not (see `daemon`).
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// Serves until `shutdown` is cancelled, then drains open streams (which end
/// with OK when the service sees the same token).
pub async fn serve(
    listener: TcpListener,
    service: ScalerService,
    tls: Option<Tls>,
    health: Option<
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    >,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    serve_instrumented(listener, service, tls, health, Arc::default(), shutdown).await
}

/// As [`serve`], counting and timing every ExternalScaler call in `metrics`.
pub async fn serve_instrumented(
    listener: TcpListener,
    service: ScalerService,
    tls: Option<Tls>,
    health: Option<
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    >,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)));
    if let Some(tls) = tls {
        let mut cfg =
            ServerTlsConfig::new().identity(Identity::from_pem(tls.cert_pem, tls.key_pem));
        if let Some(ca) = tls.client_ca_pem {
            cfg = cfg.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(cfg).map_err(Error::Tls)?;
    }
    let router = builder
        .layer(crate::telemetry::grpc::Layer::new(metrics))
        .add_optional_service(health)
        .add_service(ExternalScalerServer::new(service));
    router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await
        .map_err(Error::Transport)
}
