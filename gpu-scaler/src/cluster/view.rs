//! The cluster-wide [`WorkloadView`]: the workload's pods on every node, through
//! the fan-out, with the missing-node policy applied.

use std::{collections::HashMap, sync::Arc};

use tokio_stream::{StreamExt as _, wrappers::WatchStream};

use super::{Error, Fanout, target::TargetResolver, usage::from_proto};
use crate::{
    engine::EngineQuery,
    pods::Selector,
    scaler::{
        self,
        view::{BoxFuture, Updates, Workload, WorkloadView},
    },
    snapshot::SnapshotReceiver,
};

/// Answers for the whole cluster from any daemon.
pub struct ClusterView {
    fanout: Arc<Fanout>,
    resolver: Option<Arc<TargetResolver>>,
    snapshots: SnapshotReceiver,
}

impl ClusterView {
    /// `resolver` (Kubernetes access) lets ScaledObjects leave `podSelector` out.
    pub fn new(
        fanout: Arc<Fanout>,
        resolver: Option<Arc<TargetResolver>>,
        snapshots: SnapshotReceiver,
    ) -> Self {
        Self {
            fanout,
            resolver,
            snapshots,
        }
    }

    async fn answer(
        &self,
        namespace: &str,
        selector: &str,
        engine: Option<&EngineQuery>,
    ) -> scaler::Result<Workload> {
        let usage = self
            .fanout
            .workload(namespace, selector, engine)
            .await
            .map_err(scaler::Error::from)?;
        let missing = self
            .fanout
            .admit(&usage, namespace, selector)
            .map_err(scaler::Error::from)?;
        let reported: Vec<_> = usage
            .pods
            .iter()
            .filter_map(|r| r.usage.as_ref().map(|u| (r, u)))
            .collect();
        // The fan-out kept only pods whose engine figure was readable.
        let engine = match engine {
            None => Vec::new(),
            Some(_) => reported
                .iter()
                .map(|(_, u)| {
                    super::usage::reading(u.figures.first())
                        .ok()
                        .unwrap_or(f64::NAN)
                })
                .collect(),
        };
        let pods = reported
            .into_iter()
            .map(|(r, u)| Arc::new(from_proto(r.pod.clone(), u)))
            .collect();
        Ok(Workload {
            pods,
            missing,
            engine,
        })
    }
}

/// The one place a cluster error becomes a scaler error (whose codes
/// `scaler::error` sets): a problem with the ScaledObject itself (missing, its
/// target unresolvable, [`Error::is_user_error`]) is a workload error, which
/// KEDA sees as FAILED_PRECONDITION; everything else (peers, the pod cache,
/// the missing-node policy) is UNAVAILABLE: transient, never a number.
impl From<Error> for scaler::Error {
    fn from(e: Error) -> Self {
        match e {
            Error::Shared(inner) => match Arc::try_unwrap(inner) {
                Ok(e) => e.into(),
                Err(shared) => Self::from(&*shared),
            },
            e => Self::from(&e),
        }
    }
}

impl From<&Error> for scaler::Error {
    fn from(e: &Error) -> Self {
        match e {
            Error::Shared(inner) => Self::from(&**inner),
            e if e.is_user_error() => Self::Workload(e.to_string()),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

impl WorkloadView for ClusterView {
    fn workload<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a Selector,
        engine: Option<&'a EngineQuery>,
    ) -> BoxFuture<'a, scaler::Result<Workload>> {
        Box::pin(async move { self.answer(namespace, &selector.to_string(), engine).await })
    }

    fn updates(&self) -> Updates {
        // Peers publish on the same poll interval as this node, so this node's
        // snapshots are the cadence at which any answer can change.
        Box::pin(WatchStream::from_changes(self.snapshots.clone()).map(|_| ()))
    }

    fn resolves_scale_targets(&self) -> bool {
        self.resolver.is_some()
    }

    fn scale_target_workload<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        metadata: &'a HashMap<String, String>,
        engine: Option<&'a EngineQuery>,
    ) -> BoxFuture<'a, scaler::Result<Workload>> {
        Box::pin(async move {
            let Some(resolver) = &self.resolver else {
                return Err(scaler::Error::Metadata(
                    scaler::metadata::pod_selector_required(),
                ));
            };
            let resolved = resolver
                .resolve(namespace, name)
                .await
                .map_err(scaler::Error::from)?;
            if resolved.is_value_trigger(metadata) {
                return Err(Error::ScaledJobValue {
                    namespace: namespace.into(),
                    name: name.into(),
                }
                .into());
            }
            self.answer(namespace, &resolved.selector, engine).await
        })
    }
}
