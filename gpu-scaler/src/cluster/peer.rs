//! The node-to-node protocol (`gpuscaler.peer.v1`): its server, which answers
//! from this node's newest snapshot, and its clients, one channel per peer.
//! With `--peer-tls-cert/--peer-tls-key/--peer-tls-ca` both sides present a
//! certificate the shared CA signed (mTLS), and clients check the server's name
//! against `--peer-tls-server-name`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::{
    Request, Response, Status,
    transport::{Channel, ClientTlsConfig, Endpoint, Server, ServerTlsConfig},
};

use super::{Error, NoReport, Result};
use crate::tls;

/// Code generated from `proto/gpuscaler_peer_v1.proto` by build.rs.
pub mod proto {
    tonic::include_proto!("gpuscaler.peer.v1");
}

use proto::{
    GetPodUsageRequest, GetPodUsageResponse,
    peer_client::PeerClient,
    peer_server::{Peer, PeerServer},
};

/// Most pod uids one request may ask about.
pub const MAX_PODS_PER_REQUEST: usize = 100_000;
/// Most engine figures one request may ask about.
pub const MAX_FIGURES_PER_REQUEST: usize = 8;

/// Why this node cannot answer for its pods.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LocalError {
    /// The snapshot may not be answered from (GPU source down, stale).
    #[error(transparent)]
    Unfit(#[from] crate::snapshot::Unfit),
    #[error("engine figures are not read by this daemon")]
    NoEngines,
}

/// This node's per-pod usage, as the protocol carries it. The daemon answers its
/// own node through this same function (not a shortcut), so its figures go
/// through the same conversion as every peer's.
pub trait LocalUsage: Send + Sync + 'static {
    /// This node's name.
    fn node_name(&self) -> &str;
    /// Usage of `uids` from the newest snapshot, with each asked engine
    /// figure per pod, or why there is none to give (GPU source down, stale
    /// snapshot): never zeros in its place.
    fn pod_usage<'a>(
        &'a self,
        uids: &'a [String],
        figures: &'a [proto::FigureRequest],
    ) -> futures::future::BoxFuture<'a, std::result::Result<GetPodUsageResponse, LocalError>>;
}

/// The gRPC service peers call.
pub struct PeerService {
    local: Arc<dyn LocalUsage>,
}

impl PeerService {
    pub fn new(local: Arc<dyn LocalUsage>) -> Self {
        Self { local }
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn get_pod_usage(
        &self,
        request: Request<GetPodUsageRequest>,
    ) -> std::result::Result<Response<GetPodUsageResponse>, Status> {
        let req = request.into_inner();
        if req.pod_uids.len() > MAX_PODS_PER_REQUEST {
            return Err(Status::invalid_argument(format!(
                "{} pod uids asked; at most {MAX_PODS_PER_REQUEST} per request",
                req.pod_uids.len()
            )));
        }
        if req.figures.len() > MAX_FIGURES_PER_REQUEST {
            return Err(Status::invalid_argument(format!(
                "{} figures asked; at most {MAX_FIGURES_PER_REQUEST} per request",
                req.figures.len()
            )));
        }
        self.local
            .pod_usage(&req.pod_uids, &req.figures)
            .await
            .map(Response::new)
            .map_err(|reason| {
                Status::unavailable(format!("node {}: {reason}", self.local.node_name()))
            })
    }
}

/// Certificates for mTLS between daemons.
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    /// The name peers' certificates are checked against.
    pub server_name: String,
}

impl PeerTls {
    pub fn server(&self) -> Result<ServerTlsConfig> {
        Ok(ServerTlsConfig::new()
            .identity(tls::identity(&self.cert, &self.key)?)
            .client_ca_root(tls::certificate(&self.ca)?))
    }

    pub fn client(&self) -> Result<ClientTlsConfig> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(tls::certificate(&self.ca)?)
            .identity(tls::identity(&self.cert, &self.key)?)
            .domain_name(self.server_name.clone()))
    }
}

/// Serves the peer protocol on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    local: Arc<dyn LocalUsage>,
    tls: Option<&PeerTls>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    // Transport limits (issue 13), as on the scaler port: a request is a list of
    // one node's pod uids (64 KiB holds ~1,700, far above any node's pod count);
    // one connection per other daemon, each with few calls in flight.
    let mut server = Server::builder()
        .max_concurrent_streams(64)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(crate::scaler::server::KEEPALIVE_TIMEOUT));
    if let Some(tls) = tls {
        let config = tls
            .server()?
            .timeout(crate::scaler::server::TLS_HANDSHAKE_TIMEOUT);
        server = server.tls_config(config).map_err(Error::TlsConfig)?;
    }
    let incoming = crate::listener::capped(listener, 4096, "peer", Arc::default());
    server
        .add_service(
            PeerServer::new(PeerService::new(local))
                .max_decoding_message_size(crate::scaler::server::MAX_DECODE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(Error::Serve)
}

/// Clients for every peer, one lazily connected channel each.
pub struct PeerClients {
    tls: Option<ClientTlsConfig>,
    timeout: Duration,
    channels: Mutex<HashMap<SocketAddr, Channel>>,
}

impl PeerClients {
    /// `timeout` bounds each call, connection included.
    pub fn new(tls: Option<&PeerTls>, timeout: Duration) -> Result<Self> {
        Ok(Self::with_tls_config(
            tls.map(PeerTls::client).transpose()?,
            timeout,
        ))
    }

    /// As [`PeerClients::new`], from a ready client TLS configuration.
    pub fn with_tls_config(tls: Option<ClientTlsConfig>, timeout: Duration) -> Self {
        Self {
            tls,
            timeout,
            channels: Mutex::default(),
        }
    }

    fn channel(&self, addr: SocketAddr) -> std::result::Result<Channel, NoReport> {
        let connect = |source| NoReport::Connect {
            addr,
            source: Arc::new(source),
        };
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(&addr) {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(connect)?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(connect)?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(addr, channel.clone());
        Ok(channel)
    }

    /// Drops channels to addresses no longer in use (peers that went away).
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.channels
            .lock()
            .expect("channels lock")
            .retain(|a, _| keep(a));
    }

    /// Asks the peer at `addr` for `uids`, within the timeout.
    pub async fn ask(
        &self,
        addr: SocketAddr,
        uids: Vec<String>,
        figures: Vec<proto::FigureRequest>,
    ) -> std::result::Result<GetPodUsageResponse, NoReport> {
        let mut client = PeerClient::new(self.channel(addr)?);
        let call = client.get_pod_usage(GetPodUsageRequest {
            pod_uids: uids,
            figures,
        });
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(resp)) => Ok(resp.into_inner()),
            Ok(Err(status)) => Err(NoReport::Refused { addr, status }),
            Err(_) => Err(NoReport::Timeout {
                addr,
                after: self.timeout,
            }),
        }
    }
}
