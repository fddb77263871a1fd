//! A workload's pods cluster-wide: one list/watch per (namespace, selector),
//! shared by every query with that selector, dropped when no query used it for a
//! while, and capped in number so memory stays bounded whatever KEDA asks.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use kube::Client;

use super::{Error, Result};
use crate::pods::kube::{PodMap, PodWatch};

/// Where the pods of a workload come from.
pub trait PodDirectory: Send + Sync {
    /// The pods matching `selector` (label selector syntax) in `namespace`, by uid.
    fn workload_pods<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a str,
    ) -> BoxFuture<'a, Result<Arc<PodMap>>>;
}

/// Limits of the selector cache.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// A watch no query used for this long is stopped.
    pub idle: Duration,
    /// At most this many watches; the least recently used goes first.
    pub max_selectors: usize,
    /// How long a query waits for a new watch's first list.
    pub first_list: Duration,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(300),
            max_selectors: 1024,
            first_list: Duration::from_millis(1500),
        }
    }
}

struct Entry {
    watch: Arc<PodWatch>,
    last_used: Instant,
}

/// Pods by selector from the Kubernetes API.
pub struct WorkloadPods {
    client: Client,
    limits: CacheLimits,
    entries: Mutex<HashMap<(String, String), Entry>>,
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
                    Some(this) => this.evict(Instant::now()),
                    None => return,
                }
            }
        });
        this
    }

    /// How many selectors are watched now.
    pub fn watched(&self) -> usize {
        self.entries.lock().expect("cache lock").len()
    }

    fn evict(&self, now: Instant) {
        let mut entries = self.entries.lock().expect("cache lock");
        let before = entries.len();
        entries.retain(|_, e| now.duration_since(e.last_used) < self.limits.idle);
        while entries.len() > self.limits.max_selectors {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => entries.remove(&k),
                None => break,
            };
        }
        if entries.len() < before {
            tracing::debug!(
                evicted = before - entries.len(),
                left = entries.len(),
                "stopped idle pod watches"
            );
        }
    }

    async fn get(&self, namespace: &str, selector: &str) -> Result<Arc<PodMap>> {
        let key = (namespace.to_owned(), selector.trim().to_owned());
        let watch = {
            let mut entries = self.entries.lock().expect("cache lock");
            let now = Instant::now();
            let entry = entries.entry(key).or_insert_with(|| {
                tracing::debug!(namespace, selector, "watching a new workload's pods");
                Entry {
                    watch: Arc::new(PodWatch::selector(
                        self.client.clone(),
                        namespace,
                        selector.trim(),
                    )),
                    last_used: now,
                }
            });
            entry.last_used = now;
            let watch = entry.watch.clone();
            drop(entries);
            self.evict(now);
            watch
        };
        watch
            .ready(self.limits.first_list)
            .await
            .map_err(Error::Pods)
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
            let selector = crate::pods::Selector::parse(selector)
                .map_err(|e| Error::Unavailable(format!("selector {selector:?}: {e}")))?;
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
