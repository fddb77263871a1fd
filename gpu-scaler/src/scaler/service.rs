//! The ExternalScaler gRPC service, as KEDA uses it.

use std::{pin::Pin, sync::Arc, time::Duration};

use prometheus_client::metrics::gauge::Gauge;

use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{
    Error, Metrics, Result, metadata,
    metadata::Query,
    naming,
    proto::{
        GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
        MetricValue, ScaledObjectRef, external_scaler_server::ExternalScaler,
    },
    value,
    view::{Updates, WorkloadView},
};

/// Serves KEDA from a [`WorkloadView`].
#[derive(Clone)]
pub struct ScalerService {
    view: Arc<dyn WorkloadView>,
    /// Cancelled when the daemon shuts down: open streams then end with OK.
    shutdown: CancellationToken,
    /// How often an open StreamIsActive re-checks even without new data, so a
    /// stalled source is reported rather than silently kept.
    recheck: Duration,
    metrics: Arc<Metrics>,
}

/// Which streaming method a [`StreamGuard`] counts.
#[derive(Clone, Copy)]
enum StreamKind {
    IsActive,
    MetricSpec,
}

/// Counts one open stream while it lives (it lives in the stream's state, so
/// it goes when hyper drops the response body: client gone or shutdown).
struct StreamGuard(Gauge);

impl StreamGuard {
    fn open(metrics: &Metrics, kind: StreamKind) -> Self {
        let gauge = metrics.stream(match kind {
            StreamKind::IsActive => "StreamIsActive",
            StreamKind::MetricSpec => "StreamMetricSpec",
        });
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The int field of a float figure: KEDA reads the float when it is > 0 and the
/// int otherwise, so both must say the same.
fn as_int(v: f64) -> i64 {
    v.round().clamp(i64::MIN as f64, i64::MAX as f64) as i64
}

fn spec(query: &Query) -> MetricSpec {
    spec_of(naming::metric_name(query), query.target)
}

fn spec_of(metric_name: String, target: f64) -> MetricSpec {
    MetricSpec {
        metric_name,
        // A target rounding to 0 would divide by zero in KEDA's int path.
        target_size: as_int(target).max(1),
        target_size_float: target,
    }
}

impl ScalerService {
    pub fn new(
        view: Arc<dyn WorkloadView>,
        shutdown: CancellationToken,
        recheck: Duration,
    ) -> Self {
        Self {
            view,
            shutdown,
            recheck,
            metrics: Arc::default(),
        }
    }

    /// The service's metric families (calls, latency, open streams), for the
    /// /metrics registry and the instrumenting layer.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn query(&self, r: &ScaledObjectRef) -> Result<Query> {
        super::limits::check(r)?;
        if r.namespace.is_empty() {
            return Err(Error::MissingNamespace);
        }
        let pod_selector = if self.view.resolves_scale_targets() {
            metadata::PodSelector::Optional
        } else {
            metadata::PodSelector::Required
        };
        Ok(metadata::parse(&r.scaler_metadata, pod_selector)?)
    }

    /// The spec of ScaledObject `r`. It never fails on metadata: KEDA drops
    /// GetMetricSpec errors (kedacore/keda pkg/scalers/external_scaler.go
    /// `GetMetricSpecForScaling` logs and returns no spec), so the user would see
    /// only "no metric specs returned" on the ScaledObject, and with several
    /// triggers one failing spec fails every HPA metric of it (keda#5914).
    /// Refused metadata gets a stable name and the target the keys give (else
    /// the default, [`metadata::DEFAULT_TARGET`]); GetMetrics and IsActive then
    /// carry the refusal, which KEDA shows as events on the ScaledObject, and
    /// KEDA's fallback (it needs a spec) can apply.
    fn spec_for(&self, r: &ScaledObjectRef) -> Result<MetricSpec> {
        match self.query(r) {
            Ok(query) => Ok(spec(&query)),
            Err(err) if err.is_metadata() => {
                tracing::debug!(
                    namespace = %r.namespace,
                    scaled_object = %r.name,
                    error = %err,
                    "GetMetricSpec answers a placeholder for refused metadata"
                );
                let target = match err {
                    Error::Metadata(_) => metadata::readable_target(&r.scaler_metadata),
                    _ => None,
                };
                Ok(spec_of(
                    naming::refused_metric_name(&r.scaler_metadata),
                    target.unwrap_or(metadata::DEFAULT_TARGET),
                ))
            }
            Err(err) => Err(err),
        }
    }

    /// The value of ScaledObject `r` for its already parsed query.
    pub async fn value(&self, r: &ScaledObjectRef, query: &Query) -> Result<f64> {
        let engine = query.engine.as_ref();
        let workload = match &query.selector {
            Some(selector) => self.view.workload(&r.namespace, selector, engine).await?,
            None => {
                self.view
                    .scale_target_workload(&r.namespace, &r.name, &r.scaler_metadata, engine)
                    .await?
            }
        };
        value::value(query, &workload)
    }

    async fn active(&self, r: &ScaledObjectRef, query: &Query) -> Result<bool> {
        // With an activation selector the answer comes from those pods: the
        // workload's own may not exist (scaled to zero).
        let measured = query.activation_query.as_deref().unwrap_or(query);
        Ok(self.value(r, measured).await? > query.activation)
    }
}

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for ScalerService {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let r = request.into_inner();
        let query = self.query(&r)?;
        let result = self.active(&r, &query).await?;
        Ok(Response::new(IsActiveResponse { result }))
    }

    type StreamIsActiveStream = StreamOf<IsActiveResponse>;

    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamIsActiveStream>, Status> {
        let r = request.into_inner();
        // Refused metadata fails the call itself: KEDA logs it and backs off
        // (retrying cannot help until the ScaledObject is edited, and an edit
        // starts a new push scaler with a fresh backoff). IsActive and
        // GetMetrics, which KEDA still polls, show it as events.
        let query = self.query(&r)?;
        // The stream is a state machine polled by hyper's body, not a task
        // feeding a channel: KEDA keeps one open per ScaledObject, and a tokio
        // mpsc channel allocates a block of 32 message slots up front (~5.6 KiB
        // with tonic's Status), which was most of a stream's memory.
        let mut recheck = tokio::time::interval(self.recheck);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let state = IsActiveState {
            _open: StreamGuard::open(&self.metrics, StreamKind::IsActive),
            updates: self.view.updates(),
            this: self.clone(),
            r,
            query,
            recheck,
            last: None,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            state,
            IsActiveState::next,
        ))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let spec = self.spec_for(request.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![spec],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let req = request.into_inner();
        let r = req.scaled_object_ref.ok_or(Error::MissingRef)?;
        let query = self.query(&r)?;
        let served = naming::metric_name(&query);
        if !req.metric_name.is_empty() && !naming::matches(&req.metric_name, &served) {
            return Err(Error::UnknownMetric {
                requested: req.metric_name,
                served,
            }
            .into());
        }
        let v = self.value(&r, &query).await?;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: served,
                metric_value: as_int(v),
                metric_value_float: v,
            }],
        }))
    }

    type StreamMetricSpecStream = StreamOf<GetMetricSpecResponse>;

    async fn stream_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<Self::StreamMetricSpecStream>, Status> {
        // KEDA (v2.21+) takes the HPA's spec from this stream too: the same
        // rule as GetMetricSpec.
        let first = GetMetricSpecResponse {
            metric_specs: vec![self.spec_for(request.get_ref())?],
        };
        let open = StreamGuard::open(&self.metrics, StreamKind::MetricSpec);
        let shutdown = self.shutdown.clone();
        // The spec comes from the metadata alone, so it never changes while the
        // stream is open: send it, then stay open until the client or we go
        // (hyper drops the body, and the guard with it, when the client does).
        let rest = futures::stream::once(async move {
            let _open = open;
            shutdown.cancelled().await;
            None
        })
        .filter_map(|x: Option<Result<GetMetricSpecResponse, Status>>| x);
        Ok(Response::new(Box::pin(
            tokio_stream::once(Ok(first)).chain(rest),
        )))
    }
}

/// One open StreamIsActive between two messages.
struct IsActiveState {
    _open: StreamGuard,
    this: ScalerService,
    r: ScaledObjectRef,
    query: Query,
    updates: Updates,
    recheck: tokio::time::Interval,
    last: Option<bool>,
}

impl IsActiveState {
    /// Waits until the answer differs from the last one sent, re-checking on new
    /// data and every `recheck`; `None` ends the stream, always with status OK.
    ///
    /// KEDA reconnects 2 s after a stream ends, and only an end with status OK
    /// resets that backoff; any other end doubles it, up to 60 s
    /// (kedacore/keda pkg/scalers/external_scaler.go `runStreamIsActive`). An
    /// answer that cannot be given (samples stale, a node that did not answer)
    /// therefore ends the stream with OK and the reason logged: KEDA asks again
    /// in 2 s, rather than waking a workload from zero up to a minute late once
    /// the answer is back. A stream that carried on would leave KEDA trusting a
    /// state nobody can vouch for.
    async fn next(mut self) -> Option<(Result<IsActiveResponse, Status>, Self)> {
        loop {
            if self.last.is_some() {
                tokio::select! {
                    _ = self.this.shutdown.cancelled() => {
                        tracing::debug!(namespace = %self.r.namespace, scaled_object = %self.r.name, "StreamIsActive ends (status OK): shutting down");
                        return None;
                    }
                    u = self.updates.next() => { u?; }
                    _ = self.recheck.tick() => {}
                }
            } else {
                // The first answer goes out at once; the interval's first tick
                // is immediate, so consume it here.
                self.recheck.reset();
            }
            match self.this.active(&self.r, &self.query).await {
                Ok(active) if self.last != Some(active) => {
                    self.last = Some(active);
                    return Some((Ok(IsActiveResponse { result: active }), self));
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        code = ?err.code(),
                        namespace = %self.r.namespace,
                        scaled_object = %self.r.name,
                        "StreamIsActive ends (status OK, KEDA asks again in 2 s): the answer is unknown"
                    );
                    return None;
                }
            }
        }
    }
}
