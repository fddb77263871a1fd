//! Where a workload's pods and their GPU use come from.
//!
//! The gRPC service asks a [`WorkloadView`] for the pods of one namespace that
//! a selector matches. [`LocalView`] answers from this node's [`NodeSnapshot`];
//! a cluster-wide view (fan-out to peer daemons) implements the same trait.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio_stream::{Stream, StreamExt as _, wrappers::WatchStream};

use super::{Error, Result};
use crate::{
    engine::{EngineQuery, Scraper},
    pods::Selector,
    snapshot::{NodeSnapshot, PodUsage, SnapshotReceiver, check_fresh},
};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// Fires whenever an answer may have changed.
pub type Updates = Pin<Box<dyn Stream<Item = ()> + Send>>;

/// A workload's pods and their GPU use at one moment.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The selected pods (only ever from the requested namespace), each with
    /// its GPU use (empty when it runs no GPU process).
    pub pods: Vec<Arc<PodUsage>>,
    /// Pods of the workload whose node did not answer, or whose engine could
    /// not be read, admitted by the missing-node policy: each counts as the
    /// average of the reported pods' values.
    pub missing: usize,
    /// For an engine query: each reported pod's figure (pods whose engine
    /// could not be read are in `missing`, not here). Empty otherwise.
    pub engine: Vec<f64>,
}

/// The missing-node policy as the local view applies it: `Ok(n)` admits `n`
/// unreported pods of `total`, an error is UNAVAILABLE with the reason.
pub type Admit = Arc<dyn Fn(usize, usize) -> std::result::Result<usize, String> + Send + Sync>;

/// Answers "which pods are this workload and what do they use".
pub trait WorkloadView: Send + Sync + 'static {
    /// The pods of `namespace` matching `selector`. Pods of other namespaces
    /// must never be returned. Data that cannot be trusted (stale, a GPU source
    /// down) is an error, never a partial answer.
    fn workload<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a Selector,
        engine: Option<&'a EngineQuery>,
    ) -> BoxFuture<'a, Result<Workload>>;

    /// A stream that yields when new data arrives (for StreamIsActive).
    fn updates(&self) -> Updates;

    /// Whether [`WorkloadView::scale_target_workload`] can answer, i.e. whether
    /// `podSelector` may be left out.
    fn resolves_scale_targets(&self) -> bool {
        false
    }

    /// The pods of ScaledObject `name` in `namespace`, which has no
    /// `podSelector`: those its scale target's scale subresource selects (or,
    /// for a ScaledJob of that name, its Jobs' pods). `metadata` is the
    /// trigger's, as KEDA sent it.
    fn scale_target_workload<'a>(
        &'a self,
        namespace: &'a str,
        name: &'a str,
        metadata: &'a std::collections::HashMap<String, String>,
        engine: Option<&'a EngineQuery>,
    ) -> BoxFuture<'a, Result<Workload>> {
        let _ = (namespace, name, metadata, engine);
        Box::pin(async { Err(Error::Metadata(super::metadata::pod_selector_required())) })
    }
}

/// This node's pods, from its own snapshots.
#[derive(Clone)]
pub struct LocalView {
    snapshots: SnapshotReceiver,
    poll_interval: Duration,
    engines: Option<(Scraper, Admit)>,
}

impl LocalView {
    pub fn new(snapshots: SnapshotReceiver, poll_interval: Duration) -> Self {
        Self {
            snapshots,
            poll_interval,
            engines: None,
        }
    }

    /// Reads engine figures through `scraper`; pods whose engine cannot be
    /// read count as `admit` says.
    pub fn with_engines(mut self, scraper: Scraper, admit: Admit) -> Self {
        self.engines = Some((scraper, admit));
        self
    }

    async fn with_engine(&self, mut w: Workload, query: &EngineQuery) -> Result<Workload> {
        let Some((scraper, admit)) = &self.engines else {
            return Err(Error::Unavailable(
                "engine figures are not read by this daemon".into(),
            ));
        };
        let pods: Vec<_> = w.pods.iter().map(|u| u.pod.clone()).collect();
        let readings = scraper.readings(&pods, query).await.values;
        let total = w.pods.len();
        let mut kept = Vec::with_capacity(total);
        let mut unreadable = Vec::new();
        for (u, r) in std::mem::take(&mut w.pods).into_iter().zip(readings) {
            match r {
                crate::snapshot::Reading::Ok(v) => {
                    kept.push(u);
                    w.engine.push(v);
                }
                crate::snapshot::Reading::Unavailable(why) => {
                    unreadable.push(format!("{}: {why}", u.pod.name));
                }
            }
        }
        w.pods = kept;
        if !unreadable.is_empty() {
            tracing::debug!(metric = query.name, pods = ?unreadable, "engines not read");
            w.missing = admit(total, unreadable.len()).map_err(|e| {
                Error::Unavailable(format!("{e}; not read: {}", unreadable.join("; ")))
            })?;
        }
        Ok(w)
    }

    /// The answer from one snapshot (synchronous: it is all in memory).
    pub fn select(
        &self,
        snap: &NodeSnapshot,
        namespace: &str,
        selector: &Selector,
    ) -> Result<Workload> {
        check_fresh(snap, self.poll_interval, SystemTime::now())?;
        let pods = snap
            .pods
            .values()
            .filter(|u| u.pod.namespace == namespace && selector.matches(&u.pod.labels))
            .cloned()
            .collect();
        Ok(Workload {
            pods,
            missing: 0,
            engine: Vec::new(),
        })
    }
}

impl WorkloadView for LocalView {
    fn workload<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a Selector,
        engine: Option<&'a EngineQuery>,
    ) -> BoxFuture<'a, Result<Workload>> {
        let snap: Arc<NodeSnapshot> = self.snapshots.borrow().clone();
        Box::pin(async move {
            let w = self.select(&snap, namespace, selector)?;
            match engine {
                None => Ok(w),
                Some(q) => self.with_engine(w, q).await,
            }
        })
    }

    fn updates(&self) -> Updates {
        Box::pin(WatchStream::from_changes(self.snapshots.clone()).map(|_| ()))
    }
}
