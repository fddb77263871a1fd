//! The scaler's errors and the one place they become gRPC status codes.

use std::{sync::Arc, time::Duration};

use super::{limits, metadata};
use crate::snapshot::Unfit;

/// Why a scaler request cannot be answered with a number.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A known metadata key has a bad value.
    #[error(transparent)]
    Metadata(#[from] metadata::Error),
    /// The reference is too big or names something no Kubernetes object can be.
    #[error(transparent)]
    Limits(#[from] limits::Error),
    #[error(
        "the ScaledObject reference has no namespace; the scaler only answers within a namespace"
    )]
    MissingNamespace,
    #[error("GetMetrics has no scaledObjectRef")]
    MissingRef,
    #[error("metric {requested:?} is not this ScaledObject's metric; its metric is {served:?}")]
    UnknownMetric { requested: String, served: String },
    #[error(
        "GPU samples are {age_ms} ms old, more than three poll intervals ({limit_ms} ms): the GPU poller is not keeping up"
    )]
    Stale { age_ms: u128, limit_ms: u128 },
    #[error("the GPU source is down: {0}")]
    GpuDown(Arc<str>),
    /// A figure a value needs could not be read (MIG, a lost process list).
    #[error("{0}")]
    ReadingUnavailable(String),
    /// Anything else a workload view cannot answer (e.g. a peer daemon).
    #[error("{0}")]
    Unavailable(String),
    /// The ScaledObject cannot name its pods: it, its scale target or the
    /// target's selector is missing (podSelector left out in a cluster).
    #[error("{0}")]
    Workload(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn stale(age: Duration, limit: Duration) -> Self {
        Self::Stale {
            age_ms: age.as_millis(),
            limit_ms: limit.as_millis(),
        }
    }

    /// Whether the error is about the trigger's metadata (a key's value, or its
    /// size): GetMetricSpec then still answers (see `service.rs`).
    pub fn is_metadata(&self) -> bool {
        matches!(
            self,
            Self::Metadata(_)
                | Self::Limits(
                    limits::Error::TooManyEntries { .. }
                        | limits::Error::KeyTooLong { .. }
                        | limits::Error::ValueTooLong { .. }
                )
        )
    }

    /// The gRPC code KEDA sees: bad input is INVALID_ARGUMENT (KEDA shows it on
    /// the ScaledObject and retrying will not help); a source that cannot answer
    /// is UNAVAILABLE (transient; never turned into a number).
    pub fn code(&self) -> tonic::Code {
        match self {
            Self::Metadata(_)
            | Self::Limits(_)
            | Self::MissingNamespace
            | Self::MissingRef
            | Self::UnknownMetric { .. } => tonic::Code::InvalidArgument,
            Self::Workload(_) => tonic::Code::FailedPrecondition,
            Self::Stale { .. }
            | Self::GpuDown(_)
            | Self::ReadingUnavailable(_)
            | Self::Unavailable(_) => tonic::Code::Unavailable,
        }
    }
}

impl From<Unfit> for Error {
    fn from(unfit: Unfit) -> Self {
        match unfit {
            Unfit::GpuDown(why) => Self::GpuDown(why),
            Unfit::Stale { age, limit } => Self::stale(age, limit),
            e @ Unfit::ProcessList { .. } => Self::ReadingUnavailable(e.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        tonic::Status::new(err.code(), err.to_string())
    }
}
