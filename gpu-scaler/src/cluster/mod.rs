//! The cluster: any daemon answers KEDA for a whole workload.
//!
//! - [`workload`]: the workload's pods cluster-wide (one bounded pod watch per
//!   namespace on the Kubernetes API, selectors evaluated locally);
//! - [`target`]: a ScaledObject without `podSelector` resolved to its pods through
//!   its scale target's `scale` subresource, as the HPA does;
//! - [`peer`]: the node-to-node protocol (`proto/gpuscaler_peer_v1.proto`), its
//!   server and clients (mTLS when configured);
//! - [`discovery`]: which daemon serves which node (EndpointSlices of a headless
//!   Service, or a static list);
//! - [`fanout`]: ask only the nodes hosting the workload's pods, concurrently,
//!   with a per-peer timeout, single flight and a short cache;
//! - [`policy`]: what a node that does not answer counts as;
//! - [`usage`]: snapshot <-> protocol conversion, the same for every node;
//! - [`view`]: the scaler's [`crate::scaler::WorkloadView`] for the cluster.

pub mod discovery;
pub(crate) mod fanout;
pub(crate) mod metrics;
pub mod peer;
pub(crate) mod policy;
pub mod target;
pub(crate) mod usage;
pub(crate) mod view;
pub mod workload;

use std::sync::Arc;

pub use fanout::{Fanout, FanoutConfig, PodReport, WorkloadUsage};
pub use metrics::Metrics;
pub use policy::MissingNodePolicy;

/// Errors of the cluster domain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ScaledObject {namespace}/{name} not found (nor a ScaledJob of that name)")]
    ScaledObjectNotFound { namespace: String, name: String },
    /// KEDA reads only an AverageValue target for a ScaledJob.
    #[error(
        "ScaledJob {namespace}/{name}: a trigger with metricType Value cannot scale Jobs: KEDA \
         reads only the AverageValue target of a ScaledJob's triggers (pkg/scaling/scaledjob/\
         metrics.go), so it takes the target as 0 and never creates a Job; leave metricType out \
         (AverageValue)"
    )]
    ScaledJobValue { namespace: String, name: String },
    #[error("ScaledObject {namespace}/{name}: {reason}")]
    ScaledObjectInvalid {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error("scale target {target} of ScaledObject {namespace}/{scaled_object} not found")]
    TargetNotFound {
        namespace: String,
        scaled_object: String,
        target: target::ScaleTarget,
    },
    #[error("the API server does not serve {0}")]
    UnknownKind(target::ScaleTarget),
    #[error(
        "{target} in namespace {namespace} has no scale subresource, so its pods cannot be found; set podSelector"
    )]
    NoScaleSubresource {
        namespace: String,
        target: target::ScaleTarget,
    },
    #[error(
        "the scale subresource of {target} in namespace {namespace} has no status.selector (yet); set podSelector or wait for the controller"
    )]
    NoSelector {
        namespace: String,
        target: target::ScaleTarget,
    },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Pods(#[from] crate::pods::kube::Error),
    /// Not enough of the workload's pods were reported (see [`MissingNodePolicy`]).
    #[error(
        "{missing} of {total} pods of the workload have no report (--missing-node-policy fail)"
    )]
    Unreported { missing: usize, total: usize },
    #[error(
        "only {reported} of {total} pods of the workload reported, fewer than half \
         (--missing-node-policy average)"
    )]
    TooFewReported { reported: usize, total: usize },
    /// A label selector the pods cannot be listed by.
    #[error("selector {selector:?}: {source}")]
    Selector {
        selector: String,
        #[source]
        source: crate::pods::selector::Error,
    },
    /// The pod cache's bounds keep it from watching one more namespace.
    #[error(
        "the pods of {watched} namespaces are watched already, every one in use within \
         {idle:?}; namespace {namespace} is not watched (a ScaledObject's namespace in use is \
         never dropped for a new one)"
    )]
    TooManyNamespaces {
        namespace: String,
        watched: usize,
        idle: std::time::Duration,
    },
    #[error(
        "{cached} pods are cached already (the budget is {budget}); namespace {namespace} is not \
         watched"
    )]
    PodBudget {
        namespace: String,
        cached: usize,
        budget: usize,
    },
    #[error("namespace {namespace} has {pods} pods, more than the cache's budget of {budget}")]
    NamespaceTooBig {
        namespace: String,
        pods: usize,
        budget: usize,
    },
    #[error(
        "the pod list of namespace {namespace} is out of date: the API server has answered only \
         errors for {}s (the limit is {}s)",
        failing.as_secs(),
        limit.as_secs()
    )]
    PodListStale {
        namespace: String,
        failing: std::time::Duration,
        limit: std::time::Duration,
    },
    #[error("peer listener: {0}")]
    PeerListener(#[source] std::io::Error),
    #[error("peer server: {0}")]
    Serve(#[source] tonic::transport::Error),
    #[error("peer TLS: {0}")]
    Tls(#[from] crate::tls::Error),
    #[error("peer TLS: {0}")]
    TlsConfig(#[source] tonic::transport::Error),
    /// An error shared by every query that waited on the same fan-out.
    #[error(transparent)]
    Shared(Arc<Error>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the error is about the request (a missing or wrong ScaledObject)
    /// rather than a transient condition.
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::ScaledObjectNotFound { .. }
            | Self::ScaledJobValue { .. }
            | Self::ScaledObjectInvalid { .. }
            | Self::TargetNotFound { .. }
            | Self::UnknownKind(_)
            | Self::NoScaleSubresource { .. }
            | Self::NoSelector { .. } => true,
            Self::Shared(e) => e.is_user_error(),
            _ => false,
        }
    }
}

/// Why a node gave no report for its pods of a workload: they then count as
/// unreported ([`MissingNodePolicy`]).
#[derive(Clone, Debug, thiserror::Error)]
pub enum NoReport {
    #[error("no gpu-scaler daemon is known on this node")]
    NoDaemon,
    #[error("{addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: Arc<tonic::transport::Error>,
    },
    #[error("{addr}: {}: {}", status.code(), status.message())]
    Refused {
        addr: std::net::SocketAddr,
        status: tonic::Status,
    },
    #[error("{addr}: no answer within {after:?}")]
    Timeout {
        addr: std::net::SocketAddr,
        after: std::time::Duration,
    },
    /// This node's own answer (the daemon asks itself through the same path).
    #[error(transparent)]
    Local(#[from] peer::LocalError),
    #[error("the daemon asked answered for node {0:?}")]
    WrongNode(String),
    #[error("its snapshot is {age:.1?} old (more than {max_age:?})")]
    Stale {
        age: std::time::Duration,
        max_age: std::time::Duration,
    },
    #[error("it reported impossible figures for pod {pod_uid} on GPU {gpu_uuid}: {figures}")]
    ImpossibleGpu {
        pod_uid: String,
        gpu_uuid: String,
        /// The figures as it sent them.
        figures: String,
    },
    #[error("it reported {value:?} for an engine figure of pod {pod_uid}")]
    ImpossibleFigure { pod_uid: String, value: Option<f64> },
    #[error("does not know pods {}", .0.join(", "))]
    UnknownPods(Vec<String>),
}

/// The cluster flags of `serve`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the peer protocol is served.
    pub peer_listen: std::net::SocketAddr,
    /// `--peers`: a static node -> address list (wins over `peer_service`).
    pub peers: Vec<(String, std::net::SocketAddr)>,
    /// `--peer-service`: the headless Service whose EndpointSlices list the peers.
    pub peer_service: Option<String>,
    /// The daemon's own namespace (the peer Service's).
    pub namespace: Option<String>,
    pub peer_timeout: std::time::Duration,
    pub missing_node_policy: MissingNodePolicy,
    pub peer_tls: Option<peer::PeerTls>,
    /// `--kubeconfig`; unset: in-cluster or `KUBECONFIG`.
    pub kubeconfig: Option<std::path::PathBuf>,
}

/// What a daemon's cluster side runs on, ready-made (tests build these by hand).
pub struct Parts {
    pub node_name: String,
    pub peer_listener: tokio::net::TcpListener,
    pub peers: Arc<dyn discovery::PeerBook>,
    pub pods: Arc<dyn workload::PodDirectory>,
    /// Kubernetes access to ScaledObjects; `None`: `podSelector` is required.
    pub resolver: Option<Arc<target::TargetResolver>>,
    pub peer_timeout: std::time::Duration,
    pub policy: MissingNodePolicy,
    pub tls: Option<peer::PeerTls>,
    pub metrics: Arc<Metrics>,
}

/// The cluster side, started.
pub struct Started {
    pub view: Arc<view::ClusterView>,
    pub peer_addr: std::net::SocketAddr,
    pub metrics: Arc<Metrics>,
    /// The peer server; ends after `shutdown`.
    pub task: tokio::task::JoinHandle<Result<()>>,
}

/// Starts the peer server and the cluster view over this node's snapshots.
pub fn start(
    parts: Parts,
    snapshots: crate::snapshot::SnapshotReceiver,
    poll_interval: std::time::Duration,
    scraper: Option<crate::engine::Scraper>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<Started> {
    let peer_addr = parts
        .peer_listener
        .local_addr()
        .map_err(Error::PeerListener)?;
    let local: Arc<dyn peer::LocalUsage> = Arc::new(usage::SnapshotUsage::new(
        parts.node_name.clone(),
        snapshots.clone(),
        poll_interval,
        scraper,
    ));
    let clients = peer::PeerClients::new(parts.tls.as_ref(), parts.peer_timeout)?;
    parts.metrics.peers.set(parts.peers.clone());
    let fanout = Fanout::new(
        FanoutConfig {
            node_name: parts.node_name,
            cache_ttl: poll_interval,
            policy: parts.policy,
        },
        local.clone(),
        parts.peers,
        clients,
        parts.pods,
        parts.metrics.clone(),
    );
    let view = Arc::new(view::ClusterView::new(fanout, parts.resolver, snapshots));
    let tls = parts.tls;
    let listener = parts.peer_listener;
    let task = tokio::spawn(async move {
        peer::serve(listener, local, tls.as_ref(), shutdown.cancelled_owned()).await
    });
    tracing::info!(%peer_addr, "serving the peer protocol");
    Ok(Started {
        view,
        peer_addr,
        metrics: parts.metrics,
        task,
    })
}
