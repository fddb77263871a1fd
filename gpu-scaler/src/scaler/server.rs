//! The gRPC server: ExternalScaler and grpc.health.v1, optionally over TLS or
//! mTLS, on a listener the caller bound.

use std::{sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;

use super::{proto::external_scaler_server::ExternalScalerServer, service::ScalerService};

/// Largest request message decoded, in bytes. A ScaledObjectRef within the
/// metadata limits ([`super::limits`]) is a few KiB; tonic's default (4 MiB) let
/// one request take the daemon past its memory limit (issue 13).
pub const MAX_DECODE_BYTES: usize = 64 * 1024;
/// Open connections at once. KEDA keeps one per scalerAddress (per operator
/// and metrics-server replica); the rest is headroom for health checks, `gpu-scaler
/// query` and `bench scaler`'s 512 concurrent clients.
pub const MAX_CONNECTIONS: usize = 1024;
/// Concurrent HTTP/2 streams per connection. KEDA multiplexes every
/// ScaledObject's calls, and one StreamIsActive per external-push ScaledObject,
/// over one connection: the cap stays above the 10,000 streams `bench scaler`
/// holds open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16_384;
/// A client that has not finished the TLS handshake by then is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that does not answer an HTTP/2 ping within this is closed.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// PEM material for the scaler port.
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// When set, clients must present a certificate this CA signed (mTLS), as
    /// KEDA's TriggerAuthentication tlsClientCert/tlsClientKey supply.
    pub client_ca_pem: Option<Vec<u8>>,
    /// With mTLS: DNS names one of which the client certificate must carry as a
    /// SAN (KEDA's), so a certificate the same CA signed for something else is
    /// refused. Empty: any certificate the CA signed.
    pub client_names: Vec<String>,
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
/// with OK when the service sees the same token). Every ExternalScaler call is
/// counted and timed in the service's [`super::Metrics`].
pub async fn serve(
    listener: TcpListener,
    service: ScalerService,
    tls: Option<Tls>,
    health: Option<
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    >,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    let mut client_names = Vec::new();
    if let Some(tls) = tls {
        let mut cfg = ServerTlsConfig::new()
            .identity(Identity::from_pem(tls.cert_pem, tls.key_pem))
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = tls.client_ca_pem {
            cfg = cfg.client_ca_root(Certificate::from_pem(ca));
            client_names = tls.client_names;
        }
        builder = builder.tls_config(cfg).map_err(Error::Tls)?;
    }
    let router = builder
        .layer(super::instrument::Layer::new(service.metrics().clone()))
        .layer(super::client_identity::Layer::new(client_names))
        .add_optional_service(health)
        .add_service(
            ExternalScalerServer::new(service).max_decoding_message_size(MAX_DECODE_BYTES),
        );
    let incoming = crate::listener::capped(listener, MAX_CONNECTIONS, "scaler", Arc::default());
    router
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(Error::Transport)
}
