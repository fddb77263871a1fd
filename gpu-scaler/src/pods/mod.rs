//! Pod metadata: which pods exist, where, with which labels, and (for this
//! node's pods) which containers their statuses report.
//!
//! A pod source publishes immutable [`PodSet`]s on a `tokio::sync::watch` channel
//! ([`PodsReceiver`]); readers (the sampler, the scaler's workload views) only
//! ever see whole sets. Sources: [`file`] (a PodList JSON file, re-read on change);
//! a Kubernetes watch feeds the same channel type.

pub mod file;
pub mod kube;
pub(crate) mod selector;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::SystemTime};

use serde::Serialize;

pub use selector::Selector;

/// The fields of a Kubernetes Pod that scaling needs; everything else is dropped
/// at the edge so caches stay small.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
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
    /// status.podIP: where its engine is read (this node's pods only).
    pub ip: Option<IpAddr>,
    /// The annotations engine reading uses ([`SCRAPE_ANNOTATION_PREFIX`]); the
    /// others are dropped at the edge (this node's pods only).
    pub annotations: BTreeMap<String, String>,
    /// The containers the kubelet reports in the pod's status (app, init and
    /// ephemeral), in that order. Empty while the pod is pending, and from
    /// sources that do not keep them (the cluster-wide workload watches).
    pub containers: Vec<Container>,
}

/// Which of the pod's status lists reported a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerKind {
    /// `status.containerStatuses`.
    App,
    /// `status.initContainerStatuses`.
    Init,
    /// `status.ephemeralContainerStatuses` (`kubectl debug`).
    Ephemeral,
}

/// One container of a pod, as its status reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Container {
    pub name: String,
    /// The runtime's container id without the status's scheme (`containerd://`,
    /// `cri-o://`, `docker://`): the id the container's cgroup is named by.
    /// `None` until the runtime has created the container.
    pub id: Option<String>,
    /// The id of the instance before the newest restart
    /// (`lastState.terminated.containerID`): its exiting processes can still
    /// have GPU samples, and they are this container's, not the sandbox's.
    pub previous_id: Option<String>,
    pub kind: ContainerKind,
}

impl Container {
    /// A container from the fields of its status: `container_id` and
    /// `previous_id` as the status spells them (`<runtime>://<id>`).
    pub fn from_status(
        name: &str,
        container_id: Option<&str>,
        previous_id: Option<&str>,
        kind: ContainerKind,
    ) -> Result<Self, String> {
        if name.is_empty() {
            return Err("a container status has no name".into());
        }
        let id = |raw: Option<&str>| {
            raw.map_or(Ok(None), container_id_from_status)
                .map_err(|e| format!("container {name:?}: {e}"))
        };
        Ok(Self {
            name: name.to_owned(),
            id: id(container_id)?,
            previous_id: id(previous_id)?,
            kind,
        })
    }
}

/// Annotations kept on a pod: Prometheus's `prometheus.io/port` and
/// `prometheus.io/path`, which say where its metrics are.
pub const SCRAPE_ANNOTATION_PREFIX: &str = "prometheus.io/";

/// The annotations a pod keeps, from all of them.
pub fn scrape_annotations<'a>(
    all: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> BTreeMap<String, String> {
    all.into_iter()
        .filter(|(k, v)| {
            k.starts_with(SCRAPE_ANNOTATION_PREFIX) && k.len() <= 253 && v.len() <= 256
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// status.podIP, if it is an address. A malformed one is no IP (the API server
/// validates it; a PodList file might not).
pub fn pod_ip(raw: Option<&str>) -> Option<IpAddr> {
    raw.and_then(|s| s.trim().parse().ok())
}

impl Pod {
    /// The container whose current or previous instance has runtime id `id`.
    pub fn container_by_id(&self, id: &str) -> Option<&Container> {
        self.containers
            .iter()
            .find(|c| c.id.as_deref() == Some(id) || c.previous_id.as_deref() == Some(id))
    }
}

/// A status's `containerID` (`<runtime>://<id>`) without its scheme. An empty
/// string (a container not created yet) is `Ok(None)`.
///
/// Any runtime name is accepted (`containerd`, `cri-o`, `docker` are the ones
/// kubelets report; the CRI lets a runtime name itself), but the id must be
/// non-empty and a single cgroup path component.
pub fn container_id_from_status(raw: &str) -> Result<Option<String>, String> {
    if raw.is_empty() {
        return Ok(None);
    }
    let Some((scheme, id)) = raw.split_once("://") else {
        return Err(format!(
            "containerID {raw:?} has no runtime scheme (expected e.g. \"containerd://<id>\")"
        ));
    };
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(format!(
            "containerID {raw:?} has a malformed runtime scheme"
        ));
    }
    if id.is_empty() || id.contains('/') || id.chars().any(char::is_whitespace) {
        return Err(format!(
            "containerID {raw:?}: the id after the scheme is empty or not one path component"
        ));
    }
    Ok(Some(id.to_owned()))
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

/// `(name, id, previous id, kind)` of each container, for the sources' tests.
#[cfg(test)]
pub(crate) fn container_summary(
    pod: &Pod,
) -> Vec<(&str, Option<&str>, Option<&str>, ContainerKind)> {
    pod.containers
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.id.as_deref(),
                c.previous_id.as_deref(),
                c.kind,
            )
        })
        .collect()
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
            ip: None,
            annotations: Default::default(),
            containers: Vec::new(),
        }
    }

    #[test]
    fn container_ids_lose_their_scheme() {
        for (raw, want) in [
            ("containerd://abc123", "abc123"),
            ("cri-o://0123456789abcdef", "0123456789abcdef"),
            ("docker://f00d", "f00d"),
        ] {
            assert_eq!(
                container_id_from_status(raw).expect(raw).as_deref(),
                Some(want)
            );
        }
        assert_eq!(container_id_from_status("").expect("empty"), None);
        for (bad, why) in [
            ("abc123", "no runtime scheme"),
            ("://abc", "malformed runtime scheme"),
            ("con tainerd://abc", "malformed runtime scheme"),
            ("containerd://", "empty"),
            ("containerd://a/b", "one path component"),
        ] {
            let err = container_id_from_status(bad).expect_err(bad);
            assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn containers_by_current_and_previous_id() {
        let mut p = pod("1", "a", None, "vllm");
        p.containers = vec![Container {
            name: "server".into(),
            id: Some("new".into()),
            previous_id: Some("old".into()),
            kind: ContainerKind::App,
        }];
        assert_eq!(
            p.container_by_id("new").map(|c| c.name.as_str()),
            Some("server")
        );
        assert_eq!(
            p.container_by_id("old").map(|c| c.name.as_str()),
            Some("server")
        );
        assert!(p.container_by_id("pause").is_none());
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
