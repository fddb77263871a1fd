//! The ExternalScaler gRPC service, as KEDA uses it.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt as _, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{
    Error, Result, metadata,
    metadata::Query,
    naming,
    proto::{
        GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
        MetricValue, ScaledObjectRef, external_scaler_server::ExternalScaler,
    },
    value,
    view::WorkloadView,
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
    streams: Arc<OpenStreams>,
}

/// Open streams by method, for /metrics.
#[derive(Debug, Default)]
pub struct OpenStreams {
    pub stream_is_active: AtomicU64,
    pub stream_metric_spec: AtomicU64,
}

/// Counts one open stream while it lives.
struct StreamGuard<'a>(&'a AtomicU64);

impl<'a> StreamGuard<'a> {
    fn open(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for StreamGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The int field of a float figure: KEDA reads the float when it is > 0 and the
/// int otherwise, so both must say the same.
fn as_int(v: f64) -> i64 {
    v.round().clamp(i64::MIN as f64, i64::MAX as f64) as i64
}

fn spec(query: &Query) -> MetricSpec {
    MetricSpec {
        metric_name: naming::metric_name(query),
        // A target rounding to 0 would divide by zero in KEDA's int path.
        target_size: as_int(query.target).max(1),
        target_size_float: query.target,
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
            streams: Arc::default(),
        }
    }

    /// The service's open-stream counts.
    pub fn open_streams(&self) -> Arc<OpenStreams> {
        self.streams.clone()
    }

    fn query(&self, r: &ScaledObjectRef) -> Result<Query> {
        if r.namespace.is_empty() {
            return Err(Error::MissingNamespace);
        }
        Ok(metadata::parse_with(
            &r.scaler_metadata,
            self.view.resolves_scale_targets(),
        )?)
    }

    /// The value of ScaledObject `r` for its already parsed query.
    pub async fn value(&self, r: &ScaledObjectRef, query: &Query) -> Result<f64> {
        let workload = match &query.selector {
            Some(selector) => self.view.workload(&r.namespace, selector).await?,
            None => {
                self.view
                    .scale_target_workload(&r.namespace, &r.name)
                    .await?
            }
        };
        value::workload_value_counting_missing(query, &workload.pods, workload.missing)
    }

    async fn active(&self, r: &ScaledObjectRef, query: &Query) -> Result<bool> {
        Ok(self.value(r, query).await? > query.activation)
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
        let query = self.query(&r)?;
        let (tx, rx) = mpsc::channel(1);
        let this = self.clone();
        tokio::spawn(async move {
            let _open = StreamGuard::open(&this.streams.stream_is_active);
            let mut updates = this.view.updates();
            let mut recheck = tokio::time::interval(this.recheck);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            recheck.tick().await;
            let mut last = None;
            loop {
                match this.active(&r, &query).await {
                    Ok(active) if last != Some(active) => {
                        if tx
                            .send(Ok(IsActiveResponse { result: active }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                        last = Some(active);
                    }
                    Ok(_) => {}
                    // KEDA reconnects with backoff; a stream that carried on
                    // would leave it trusting a state nobody can vouch for.
                    Err(err) => {
                        tracing::debug!(error = %err, namespace = %r.namespace, "StreamIsActive ends with an error");
                        let _ = tx.send(Err(err.into())).await;
                        break;
                    }
                }
                tokio::select! {
                    _ = this.shutdown.cancelled() => break,
                    _ = tx.closed() => break,
                    u = updates.next() => if u.is_none() { break },
                    _ = recheck.tick() => {}
                }
            }
            // Dropping `tx` ends the stream with status OK.
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let query = self.query(request.get_ref())?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![spec(&query)],
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
        let query = self.query(request.get_ref())?;
        let (tx, rx) = mpsc::channel(1);
        let shutdown = self.shutdown.clone();
        let streams = self.streams.clone();
        tokio::spawn(async move {
            let _open = StreamGuard::open(&streams.stream_metric_spec);
            let first = GetMetricSpecResponse {
                metric_specs: vec![spec(&query)],
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            // The spec comes from the metadata alone, so it never changes while
            // the stream is open; keep it open until the client or we go.
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tx.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
