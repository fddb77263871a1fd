//! The scaler's metric families (ExternalScaler calls by method and code, their
//! latency, open streams), owned here and registered once
//! ([`Metrics::register`]); [`super::instrument`] records every call.

use std::time::Duration;

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// The label set of a call: method (one of [`super::instrument::SCALER_METHODS`]
/// or `other`) and status code name.
type CallLabels = [(&'static str, &'static str); 2];
type MethodLabel = [(&'static str, &'static str); 1];

/// 100 µs .. ~6.5 s: a local answer is sub-millisecond, a fan-out with a slow
/// peer several seconds.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// Counters and histograms of the KEDA-facing service. Cheap to record into.
#[derive(Debug)]
pub struct Metrics {
    /// Finished calls by method and status code.
    pub requests: Family<CallLabels, Counter>,
    /// Their latency by method.
    pub duration: Family<MethodLabel, Histogram>,
    /// Open StreamIsActive / StreamMetricSpec streams.
    pub streams: Family<MethodLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency),
            streams: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers the families in `registry` (the /metrics registry, once).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gpu_scaler_grpc_requests",
            "Finished ExternalScaler calls by method and status code",
            self.requests.clone(),
        );
        registry.register(
            "gpu_scaler_grpc_request_duration_seconds",
            "Latency of ExternalScaler calls (streams count their set-up)",
            self.duration.clone(),
        );
        // Both methods always have a series, 0 while none is open.
        for method in ["StreamIsActive", "StreamMetricSpec"] {
            let _ = self.streams.get_or_create(&[("method", method)]);
        }
        registry.register(
            "gpu_scaler_grpc_streams",
            "Open StreamIsActive / StreamMetricSpec streams",
            self.streams.clone(),
        );
    }

    /// Records one finished call.
    pub fn call(&self, method: &'static str, code: tonic::Code, took: Duration) {
        self.requests
            .get_or_create(&[("method", method), ("code", code_name(code))])
            .inc();
        self.duration
            .get_or_create(&[("method", method)])
            .observe(took.as_secs_f64());
    }

    /// The open-stream gauge of `method`.
    pub fn stream(&self, method: &'static str) -> Gauge {
        self.streams.get_or_create(&[("method", method)]).clone()
    }
}

/// The status code's name as gRPC spells it (`OK`, `INVALID_ARGUMENT`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
