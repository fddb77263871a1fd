//! The cluster: any daemon answers KEDA for a whole workload.
//!
//! - [`workload`]: the workload's pods cluster-wide (a shared, bounded cache of
//!   label-selector watches on the Kubernetes API);
//! - [`target`]: a ScaledObject without `podSelector` resolved to its pods through
//!   its scale target's `scale` subresource, as the HPA does;
//! - [`peer`]: the node-to-node protocol (`proto/gpuscaler_peer_v1.proto`), its
//!   server and clients (mTLS when configured);
//! - [`discovery`]: which daemon serves which node (EndpointSlices of a headless
//!   Service, or a static list);
//! - [`fanout`]: ask only the nodes hosting the workload's pods, concurrently,
//!   with a per-peer timeout, single flight and a short cache;
//! - [`policy`]: what a node that does not answer counts as.

pub mod discovery;
pub mod fanout;
pub mod peer;
pub mod policy;
pub mod target;
pub mod workload;

use std::sync::Arc;

pub use fanout::{Fanout, FanoutConfig, PodReport, WorkloadUsage};
pub use policy::{MissingNodePolicy, Stats};

/// Errors of the cluster domain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ScaledObject {namespace}/{name} not found")]
    ScaledObjectNotFound { namespace: String, name: String },
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
    /// Not enough of the workload's nodes answered (see [`MissingNodePolicy`]).
    #[error("{0}")]
    Unavailable(String),
    #[error("peer server: {0}")]
    Serve(String),
    #[error("peer TLS: {0}")]
    Tls(String),
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
