//! gRPC request metrics as a tower layer around the tonic server: every
//! ExternalScaler call is counted by method and status code, and timed.
//!
//! The status is read from the response head. tonic answers an error from a
//! handler as a trailers-only response, so `grpc-status` is then a header; a
//! response head without it is the start of a successful call. For streams
//! that is their set-up (an error later in the stream is not counted here).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use super::Metrics;

/// The path prefix of KEDA's ExternalScaler service (proto package
/// `externalscaler`); other services (grpc.health.v1) are not counted.
const SCALER_PREFIX: &str = "/externalscaler.ExternalScaler/";

/// Adds [`Instrumented`] around a service.
#[derive(Clone)]
pub struct Layer {
    metrics: Arc<Metrics>,
}

impl Layer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Instrumented<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Instrumented {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A service that records each ExternalScaler call it passes on.
#[derive(Clone)]
pub struct Instrumented<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The methods of `proto/externalscaler.proto`: the only `method` label values,
/// so a client cannot grow /metrics by calling invented methods (issue 13: 500
/// such calls added 10,500 lines, each kept forever).
pub const SCALER_METHODS: [&str; 5] = [
    "IsActive",
    "StreamIsActive",
    "GetMetricSpec",
    "GetMetrics",
    "StreamMetricSpec",
];

/// The label of every call to a method the service does not have.
pub const OTHER_METHOD: &str = "other";

/// The `method` label of a request path, if it is an ExternalScaler call: one of
/// [`SCALER_METHODS`], or [`OTHER_METHOD`] for anything else under the service.
pub fn scaler_method(path: &str) -> Option<&'static str> {
    let method = path.strip_prefix(SCALER_PREFIX)?;
    Some(
        SCALER_METHODS
            .iter()
            .find(|m| **m == method)
            .copied()
            .unwrap_or(OTHER_METHOD),
    )
}

/// The status code a response head carries (OK without `grpc-status`).
pub fn head_code(headers: &http::HeaderMap) -> tonic::Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<i32>().ok())
        .map_or(tonic::Code::Ok, tonic::Code::from)
}

impl<S, B, RB> tower::Service<http::Request<B>> for Instrumented<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = scaler_method(req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let res = fut.await;
            if let Some(method) = method {
                let code = match &res {
                    Ok(r) => head_code(r.headers()),
                    // The transport failed before a status was sent.
                    Err(_) => tonic::Code::Internal,
                };
                metrics.call(method, code, started.elapsed());
            }
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_of_the_scaler_only() {
        assert_eq!(
            scaler_method("/externalscaler.ExternalScaler/GetMetrics"),
            Some("GetMetrics")
        );
        assert_eq!(scaler_method("/grpc.health.v1.Health/Check"), None);
        for m in SCALER_METHODS {
            assert_eq!(
                scaler_method(&format!("/externalscaler.ExternalScaler/{m}")),
                Some(m)
            );
        }
        for invented in ["", "a/b", "getmetrics", "GetMetrics2", "Invented123"] {
            assert_eq!(
                scaler_method(&format!("/externalscaler.ExternalScaler/{invented}")),
                Some(OTHER_METHOD),
                "{invented}"
            );
        }
    }

    #[test]
    fn code_from_the_head() {
        let mut h = http::HeaderMap::new();
        assert_eq!(head_code(&h), tonic::Code::Ok);
        h.insert("grpc-status", "3".parse().expect("header value"));
        assert_eq!(head_code(&h), tonic::Code::InvalidArgument);
        h.insert("grpc-status", "14".parse().expect("header value"));
        assert_eq!(head_code(&h), tonic::Code::Unavailable);
    }
}
