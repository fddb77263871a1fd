//! KEDA's ExternalScaler: ScaledObject metadata -> query -> one number.
//!
//! `metadata` parses a trigger into a [`metadata::Query`]; a
//! [`view::WorkloadView`] finds the workload's pods (in the ScaledObject's
//! namespace only) and their GPU use; `value` turns that into the number;
//! `service` speaks the gRPC contract and `error` maps failures to status
//! codes in one place. Handlers only read published snapshots.

pub(crate) mod client_identity;
pub(crate) mod codec;
pub(crate) mod error;
pub mod hpa;
pub(crate) mod instrument;
pub mod limits;
pub mod metadata;
pub(crate) mod metrics;
pub(crate) mod naming;
pub mod server;
pub(crate) mod service;
pub mod value;
pub(crate) mod view;

pub use error::{Error, Result};
pub use metrics::Metrics;
pub use service::ScalerService;
pub use view::{LocalView, WorkloadView};

/// Code generated from `proto/externalscaler.proto` by build.rs.
pub mod proto {
    tonic::include_proto!("externalscaler");
}
