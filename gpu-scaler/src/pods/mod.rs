//! Pod metadata: which pods exist, where, and with which labels.
//!
//! A pod source publishes immutable [`PodSet`]s on a `tokio::sync::watch` channel
//! ([`PodsReceiver`]); readers (the sampler, the scaler's workload views) only
//! ever see whole sets. Sources: [`file`] (a PodList JSON file, re-read on change);
//! a Kubernetes watch feeds the same channel type.

pub mod file;
pub mod kube;
pub mod selector;

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use serde::Serialize;

pub use selector::Selector;

/// The fields of a Kubernetes Pod that scaling needs; everything else is dropped
/// at the edge so caches stay small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    /// metadata.uid, dashed form.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// spec.nodeName; `None` while unscheduled.
    pub node_name: Option<String>,
    /// status.phase (`Pending`, `Running`, ...).
    pub phase: Option<String>,
    /// The pod's Ready condition is True.
    pub ready: bool,
}

/// One immutable view of the pods a source knows, published as a whole.
#[derive(Clone, Debug, Serialize)]
pub struct PodSet {
    /// Every pod the source knows, by UID (not only this node's).
    pub pods: BTreeMap<String, Arc<Pod>>,
    /// This node's name; `None` means every pod counts as local.
    pub node_name: Option<String>,
    /// Where the set came from, for logs and diagnostics (e.g. `file:/etc/pods.json`).
    pub source: Arc<str>,
    /// When the source last produced this set.
    pub loaded_at: SystemTime,
    /// Why the newest attempt to refresh failed, if it did; the pods are then the
    /// last good ones.
    pub error: Option<Arc<str>>,
}

/// The channel every pod source publishes to.
pub type PodsReceiver = tokio::sync::watch::Receiver<Arc<PodSet>>;
/// The sending side of [`PodsReceiver`], owned by a source's task.
pub type PodsSender = tokio::sync::watch::Sender<Arc<PodSet>>;

impl PodSet {
    /// A set with no pods, e.g. when no pod source is configured.
    pub fn empty(source: impl Into<Arc<str>>, node_name: Option<String>) -> Self {
        Self {
            pods: BTreeMap::new(),
            node_name,
            source: source.into(),
            loaded_at: SystemTime::now(),
            error: None,
        }
    }

    pub fn from_pods(
        pods: impl IntoIterator<Item = Pod>,
        node_name: Option<String>,
        source: impl Into<Arc<str>>,
    ) -> Self {
        Self {
            pods: pods
                .into_iter()
                .map(|p| (p.uid.clone(), Arc::new(p)))
                .collect(),
            node_name,
            source: source.into(),
            loaded_at: SystemTime::now(),
            error: None,
        }
    }

    pub fn get(&self, uid: &str) -> Option<&Arc<Pod>> {
        self.pods.get(uid)
    }

    /// Whether `pod` runs on this node (always true without a node name).
    pub fn is_local(&self, pod: &Pod) -> bool {
        match &self.node_name {
            None => true,
            Some(node) => pod.node_name.as_deref() == Some(node.as_str()),
        }
    }

    /// The pods on this node.
    pub fn local(&self) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods.values().filter(|p| self.is_local(p))
    }

    /// The pods of `namespace` that `selector` matches, on any node.
    pub fn select<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a Selector,
    ) -> impl Iterator<Item = &'a Arc<Pod>> + 'a {
        self.pods
            .values()
            .filter(move |p| p.namespace == namespace && selector.matches(&p.labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ns: &str, node: Option<&str>, app: &str) -> Pod {
        Pod {
            uid: uid.into(),
            namespace: ns.into(),
            name: format!("{app}-{uid}"),
            labels: [("app".to_string(), app.to_string())].into(),
            node_name: node.map(Into::into),
            phase: Some("Running".into()),
            ready: true,
        }
    }

    #[test]
    fn local_and_select() {
        let set = PodSet::from_pods(
            [
                pod("1", "a", Some("n1"), "vllm"),
                pod("2", "a", Some("n2"), "vllm"),
                pod("3", "b", Some("n1"), "vllm"),
                pod("4", "a", None, "vllm"),
                pod("5", "a", Some("n1"), "other"),
            ],
            Some("n1".into()),
            "test",
        );
        let local: Vec<_> = set.local().map(|p| p.uid.as_str()).collect();
        assert_eq!(local, ["1", "3", "5"]);
        let s = Selector::parse("app=vllm").expect("selector");
        let sel: Vec<_> = set.select("a", &s).map(|p| p.uid.as_str()).collect();
        assert_eq!(sel, ["1", "2", "4"]);
        let all = PodSet {
            node_name: None,
            ..set
        };
        assert_eq!(all.local().count(), 5);
    }
}
