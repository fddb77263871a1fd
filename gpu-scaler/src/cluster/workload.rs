//! A workload's pods cluster-wide: one pod list/watch per namespace that
//! ScaledObjects ask about, shared by every selector in it and evaluated
//! locally, as the HPA controller's pod informer does. So the load on the API
//! server grows with the number of namespaces in use, never with the number of
//! distinct selectors a caller sends (issue 13: 4,000 selectors in 15 s made
//! 4,003 LISTs and up to 2,504 open watches).
//!
//! Bounded every way: at most [`CacheLimits::max_namespaces`] watches and
//! [`CacheLimits::max_pods`] cached pods; a namespace in use (asked about
//! within [`CacheLimits::idle`]) is never dropped for a new one, which is
//! refused instead; a watch whose API server has answered only errors for
//! longer than [`CacheLimits::max_stale`] answers UNAVAILABLE rather than a pod
//! list of unknown age.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use kube::Client;

use super::{Error, Result};
use crate::pods::{
    Selector,
    kube::{PodMap, PodWatch},
};

/// Where the pods of a workload come from.
pub trait PodDirectory: Send + Sync {
    /// The pods matching `selector` (label selector syntax) in `namespace`, by uid.
    fn workload_pods<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PodMap>>>;
}

/// Limits of the namespace watches.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// A namespace no query asked about for this long stops being watched.
    pub idle: Duration,
    /// At most this many namespaces are watched at once.
    pub max_namespaces: usize,
    /// At most this many pods are cached over all namespaces (a trimmed pod is
    /// a few hundred bytes: 50,000 stay well inside the chart's memory limit).
    /// A namespace that would start past it is refused.
    pub max_pods: usize,
    /// How long a query waits for a new watch's first list.
    pub first_list: Duration,
    /// The oldest a namespace's pod list may be while the API server answers
    /// only errors; past it queries get UNAVAILABLE (and the watch is started
    /// afresh, which also tells a quiet recovery from an outage).
    pub max_stale: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(300),
            max_namespaces: 256,
            max_pods: 50_000,
            first_list: Duration::from_millis(1500),
            max_stale: Duration::from_secs(60),
        }
    }
}

struct Entry {
    watch: Arc<PodWatch>,
    started: Instant,
    last_used: Instant,
}

/// Pods by namespace from the Kubernetes API, selected locally.
pub struct WorkloadPods {
    client: Client,
    limits: CacheLimits,
    entries: Mutex<HashMap<String, Entry>>,
}

impl WorkloadPods {
    /// Also starts a sweeper that stops idle watches even when no query comes.
    pub fn new(client: Client, limits: CacheLimits) -> Arc<Self> {
        let this = Arc::new(Self {
            client,
            limits,
            entries: Mutex::default(),
        });
        let weak: Weak<Self> = Arc::downgrade(&this);
        let period = (limits.idle / 4).max(Duration::from_millis(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                match weak.upgrade() {
                    Some(this) => this.evict_idle(Instant::now()),
                    None => return,
                }
            }
        });
        this
    }

    /// How many namespaces are watched now.
    pub fn watched(&self) -> usize {
        self.entries.lock().expect("cache lock").len()
    }

    /// How many pods the watches hold now.
    pub fn cached_pods(&self) -> usize {
        let entries = self.entries.lock().expect("cache lock");
        entries.values().map(|e| e.watch.len()).sum()
    }

    fn evict_idle(&self, now: Instant) {
        let mut entries = self.entries.lock().expect("cache lock");
        let before = entries.len();
        entries.retain(|_, e| now.duration_since(e.last_used) < self.limits.idle);
        if entries.len() < before {
            tracing::debug!(
                evicted = before - entries.len(),
                left = entries.len(),
                "stopped idle namespace pod watches"
            );
        }
    }

    /// The watch of `namespace`: the running one, a fresh one past the age
    /// limit, or a new one within the budgets.
    fn watch(&self, namespace: &str) -> Result<Arc<PodWatch>> {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("cache lock");
        if let Some(e) = entries.get_mut(namespace) {
            e.last_used = now;
            let stale = e
                .watch
                .failing_for()
                .is_some_and(|f| f > self.limits.max_stale);
            // At most one restart per age limit: each is one LIST.
            if stale && now.duration_since(e.started) > self.limits.max_stale {
                tracing::info!(
                    namespace,
                    "pod watch failing past its age limit; starting it afresh"
                );
                e.watch = Arc::new(PodWatch::namespace(self.client.clone(), namespace));
                e.started = now;
            }
            return Ok(e.watch.clone());
        }
        entries.retain(|_, e| now.duration_since(e.last_used) < self.limits.idle);
        if entries.len() >= self.limits.max_namespaces {
            return Err(Error::TooManyNamespaces {
                namespace: namespace.to_owned(),
                watched: entries.len(),
                idle: self.limits.idle,
            });
        }
        let cached: usize = entries.values().map(|e| e.watch.len()).sum();
        if cached >= self.limits.max_pods {
            return Err(Error::PodBudget {
                namespace: namespace.to_owned(),
                cached,
                budget: self.limits.max_pods,
            });
        }
        tracing::debug!(namespace, "watching a namespace's pods");
        let watch = Arc::new(PodWatch::namespace(self.client.clone(), namespace));
        entries.insert(
            namespace.to_owned(),
            Entry {
                watch: watch.clone(),
                started: now,
                last_used: now,
            },
        );
        Ok(watch)
    }

    async fn get(&self, namespace: &str, selector: &str) -> Result<Arc<PodMap>> {
        // Parsed before anything is watched: a bad selector costs no request.
        let selector = Selector::parse(selector.trim()).map_err(|source| Error::Selector {
            selector: selector.to_owned(),
            source,
        })?;
        let watch = self.watch(namespace)?;
        let pods = watch
            .ready(self.limits.first_list)
            .await
            .map_err(Error::Pods)?;
        if let Some(failing) = watch.failing_for()
            && failing > self.limits.max_stale
        {
            return Err(Error::PodListStale {
                namespace: namespace.to_owned(),
                failing,
                limit: self.limits.max_stale,
            });
        }
        if pods.len() > self.limits.max_pods {
            return Err(Error::NamespaceTooBig {
                namespace: namespace.to_owned(),
                pods: pods.len(),
                budget: self.limits.max_pods,
            });
        }
        Ok(Arc::new(
            pods.iter()
                .filter(|(_, p)| selector.matches(&p.labels))
                .map(|(uid, p)| (uid.clone(), p.clone()))
                .collect(),
        ))
    }
}

impl PodDirectory for WorkloadPods {
    fn workload_pods<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PodMap>>> {
        Box::pin(self.get(namespace, selector))
    }
}

/// Pods from a pod source's sets (the `--pods-file` PodList, which lists the
/// whole cluster's pods), for static setups without the Kubernetes API.
pub struct PodSetDirectory(pub crate::pods::PodsReceiver);

impl PodDirectory for PodSetDirectory {
    fn workload_pods<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PodMap>>> {
        let set = self.0.borrow().clone();
        Box::pin(async move {
            let selector =
                crate::pods::Selector::parse(selector).map_err(|source| Error::Selector {
                    selector: selector.to_owned(),
                    source,
                })?;
            let pods: PodMap = set
                .select(namespace, &selector)
                .map(|p| (p.uid.clone(), p.clone()))
                .collect();
            Ok(Arc::new(pods))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::{Pod, PodSet};

    fn pod(uid: &str, ns: &str, app: &str, node: &str) -> Pod {
        Pod {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("p-{uid}"),
            labels: [("app".to_owned(), app.to_owned())].into(),
            node_name: Some(node.into()),
            phase: Some("Running".into()),
            ready: true,
            ip: None,
            annotations: Default::default(),
            containers: Vec::new(),
        }
    }

    #[tokio::test]
    async fn pod_set_directory_selects_cluster_wide_within_the_namespace() {
        let set = PodSet::from_pods(
            [
                pod("1", "ml", "llm", "n1"),
                pod("2", "ml", "llm", "n2"),
                pod("3", "other", "llm", "n1"),
                pod("4", "ml", "web", "n1"),
            ],
            Some("n1".into()),
            "test",
        );
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(set));
        let dir = PodSetDirectory(rx);
        let got = dir.workload_pods("ml", "app=llm").await.expect("pods");
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            ["1", "2"],
            "every node, one namespace"
        );
        let e = dir
            .workload_pods("ml", "app in llm")
            .await
            .expect_err("bad selector");
        assert!(e.to_string().contains("app in llm"), "{e}");
    }
}
