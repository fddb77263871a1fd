//! Pods from the Kubernetes API, through kube-rs.
//!
//! Two uses share one mechanism, [`PodWatch`]: the daemon's own node (a watch with
//! the field selector `spec.nodeName=NODE`) and a workload's pods cluster-wide (a
//! watch with a label selector in one namespace). Each watch keeps only the
//! fields scaling needs ([`Pod`]); the API objects are dropped as they arrive, so a
//! cache of 10,000 pods costs what 10,000 small structs cost, not 10,000 pod specs.
//!
//! kube-runtime's watcher does the protocol work: list, then watch from the list's
//! resourceVersion with bookmarks, resume from the newest version after a dropped
//! connection, and re-list after `410 Gone`.
//!
//! Every request goes through one client-side rate limit ([`ClientLimits`]), as
//! client-go's QPS/burst does, so no input can make the daemon hammer the API
//! server (issue 13).

use std::{
    collections::BTreeMap,
    future::Future as _,
    path::Path,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use ::kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod as ApiPod;
use tokio::sync::watch;

use super::{Container, ContainerKind, Pod};

/// Errors of the Kubernetes pod sources.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no Kubernetes configuration (in-cluster or kubeconfig): {0}")]
    Config(String),
    #[error("Kubernetes client: {0}")]
    Client(#[from] ::kube::Error),
    #[error("the pod list for {what} is not ready after {waited:?}: {reason}")]
    NotReady {
        what: String,
        waited: Duration,
        reason: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The client-side rate limit of every Kubernetes API request: a token bucket
/// of `burst` requests refilled at `qps` per second. A watch costs one request
/// when it starts. Requests past the limit wait (in order) rather than fail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClientLimits {
    pub qps: f64,
    pub burst: u32,
}

impl Default for ClientLimits {
    /// client-go's defaults are 5 and 10; a daemon resolving a burst of
    /// scaleTargetRefs at start-up needs a little more, and one per GPU node
    /// times this must stay well inside the API server's priority-and-fairness
    /// share for a DaemonSet's service account.
    fn default() -> Self {
        Self {
            qps: 20.0,
            burst: 40,
        }
    }
}

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    limits: ClientLimits,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(limits: ClientLimits) -> Self {
        Self {
            limits,
            tokens: f64::from(limits.burst),
            at: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let refill = now.duration_since(self.at).as_secs_f64() * self.limits.qps;
        self.tokens = (self.tokens + refill).min(f64::from(self.limits.burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.limits.qps.max(1e-3),
            ))
        }
    }
}

/// The tower layer of [`ClientLimits`] around kube's HTTP service.
#[derive(Clone, Copy, Debug)]
pub struct RateLimitLayer(pub ClientLimits);

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimited<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimited {
            inner,
            bucket: Bucket::new(self.0),
            sleep: None,
            token: false,
        }
    }
}

/// A service that waits for a token in `poll_ready`. kube puts its service
/// behind a buffer with one worker, so callers queue in order.
pub struct RateLimited<S> {
    inner: S,
    bucket: Bucket,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    token: bool,
}

impl<S, R> tower::Service<R> for RateLimited<S>
where
    S: tower::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.token {
            if let Some(sleep) = self.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            match self.bucket.take(Instant::now()) {
                Ok(()) => self.token = true,
                Err(wait) => self.sleep = Some(Box::pin(tokio::time::sleep(wait))),
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        self.token = false;
        self.inner.call(req)
    }
}

/// A client for the cluster this daemon runs in: the kubeconfig at `kubeconfig`
/// when given, else what kube infers (`KUBECONFIG`, `~/.kube/config`, then the
/// in-cluster service account); every request within [`ClientLimits::default`].
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    client_with(kubeconfig, ClientLimits::default()).await
}

/// As [`client`], within `limits`.
pub async fn client_with(kubeconfig: Option<&Path>, limits: ClientLimits) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = ::kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            ::kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        }
        None => ::kube::Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    let builder = ::kube::client::ClientBuilder::try_from(config)?;
    Ok(builder.with_layer(&RateLimitLayer(limits)).build())
}

/// Keeps the fields of an API pod that scaling uses. A pod without a uid or a
/// name (which the API server never sends) is dropped. Its container statuses
/// are left out ([`Pod::containers`] empty): the cluster-wide workload caches
/// do not need them; the node's own pods keep them ([`trim_with_containers`]).
pub fn trim(pod: &ApiPod) -> Option<Pod> {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    Some(Pod {
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone()?,
        labels: meta.labels.clone().unwrap_or_default(),
        node_name: pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .filter(|n| !n.is_empty()),
        phase: status.and_then(|s| s.phase.clone()),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        ip: None,
        annotations: BTreeMap::new(),
        containers: Vec::new(),
    })
}

/// As [`trim`], keeping the pod IP and scrape annotations (engine reading) and
/// the containers of the pod's three status lists (which
/// the sampler needs to tell a pod's containers and its sandbox apart). A
/// status whose `containerID` is malformed keeps the container without an id,
/// with a warning: the API server's object is still a pod worth knowing.
pub fn trim_with_containers(pod: &ApiPod) -> Option<Pod> {
    let mut trimmed = trim(pod)?;
    trimmed.annotations = super::scrape_annotations(pod.metadata.annotations.iter().flatten());
    let Some(status) = pod.status.as_ref() else {
        return Some(trimmed);
    };
    trimmed.ip = super::pod_ip(status.pod_ip.as_deref());
    for (list, kind) in [
        (&status.container_statuses, ContainerKind::App),
        (&status.init_container_statuses, ContainerKind::Init),
        (
            &status.ephemeral_container_statuses,
            ContainerKind::Ephemeral,
        ),
    ] {
        for c in list.iter().flatten() {
            let previous = c
                .last_state
                .as_ref()
                .and_then(|l| l.terminated.as_ref())
                .and_then(|t| t.container_id.as_deref());
            let container =
                Container::from_status(&c.name, c.container_id.as_deref(), previous, kind).or_else(
                    |error| {
                        tracing::warn!(pod = %trimmed.name, namespace = %trimmed.namespace, %error,
                        "container status not understood; keeping the container without an id");
                        Container::from_status(&c.name, None, None, kind)
                    },
                );
            match container {
                Ok(c) => trimmed.containers.push(c),
                Err(error) => tracing::warn!(pod = %trimmed.name, namespace = %trimmed.namespace,
                    %error, "container status without a name skipped"),
            }
        }
    }
    Some(trimmed)
}

/// Pods by uid.
pub type PodMap = BTreeMap<String, Arc<Pod>>;

/// A live, trimmed copy of the pods one list/watch selects. Dropping it stops the
/// watch.
#[derive(Debug)]
pub struct PodWatch {
    what: String,
    rx: watch::Receiver<State>,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`PodWatch`] publishes.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The pods as of the newest event; `None` until the first list completed.
    pub pods: Option<Arc<PodMap>>,
    /// The newest error from the API server, cleared by the next good event.
    pub error: Option<Arc<str>>,
    /// Since when every answer was an error (cleared like `error`). A watch
    /// that recovers without any change to report keeps it: see
    /// [`PodWatch::failing_for`].
    pub failing_since: Option<Instant>,
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PodWatch {
    /// Pods on `node` in every namespace (the daemon's local pods).
    pub fn node(client: Client, node: &str) -> Self {
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        Self::start(
            Api::all(client),
            config,
            format!("node {node}"),
            trim_with_containers,
        )
    }

    /// Every pod in `namespace` (selectors are evaluated locally, as the HPA
    /// controller's informer does).
    pub fn namespace(client: Client, namespace: &str) -> Self {
        Self::start(
            Api::namespaced(client, namespace),
            watcher::Config::default(),
            format!("namespace {namespace}"),
            trim,
        )
    }

    /// Pods matching `selector` (Kubernetes label selector syntax) in `namespace`.
    pub fn selector(client: Client, namespace: &str, selector: &str) -> Self {
        let config = watcher::Config::default().labels(selector);
        Self::start(
            Api::namespaced(client, namespace),
            config,
            format!("selector {selector:?} in namespace {namespace}"),
            trim,
        )
    }

    fn start(api: Api<ApiPod>, config: watcher::Config, what: String, trim: Trim) -> Self {
        let (tx, rx) = watch::channel(State::default());
        let task = tokio::spawn(run(api, config, what.clone(), tx, trim));
        Self { what, rx, task }
    }

    /// The pods now, or `None` before the first list completed.
    pub fn current(&self) -> Option<Arc<PodMap>> {
        self.rx.borrow().pods.clone()
    }

    /// How long the API server has answered only with errors, if it does now.
    /// kube's watcher reports nothing when a broken watch resumes and nothing
    /// changed, so after an outage this stays set until the next event; callers
    /// that need to know restart the watch (a new list) past their age limit.
    pub fn failing_for(&self) -> Option<Duration> {
        self.rx.borrow().failing_since.map(|t| t.elapsed())
    }

    /// How many pods the watch holds now.
    pub fn len(&self) -> usize {
        self.rx.borrow().pods.as_ref().map_or(0, |p| p.len())
    }

    /// Whether the watch holds no pods (or has not listed yet).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A receiver that sees every published change.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.rx.clone()
    }

    /// The pods, waiting up to `timeout` for the first list.
    pub async fn ready(&self, timeout: Duration) -> Result<Arc<PodMap>> {
        let mut rx = self.rx.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|s| s.pods.is_some())).await;
        match waited {
            Ok(Ok(state)) => Ok(state.pods.clone().expect("waited for Some")),
            Ok(Err(_)) | Err(_) => Err(Error::NotReady {
                what: self.what.clone(),
                waited: timeout,
                reason: self
                    .rx
                    .borrow()
                    .error
                    .as_deref()
                    .unwrap_or("no answer from the API server yet")
                    .to_owned(),
            }),
        }
    }
}

/// The daemon's local pod source in a cluster: the pods on `node`, published as
/// [`super::PodSet`]s like the file source's. The task ends with `shutdown`.
pub fn node_source(
    client: Client,
    node: &str,
    shutdown: tokio_util::sync::CancellationToken,
) -> super::PodsReceiver {
    let source: Arc<str> = format!("kubernetes:spec.nodeName={node}").into();
    let empty = super::PodSet::empty(source.clone(), Some(node.to_owned()));
    let (tx, rx) = watch::channel(Arc::new(super::PodSet {
        error: Some("the first pod list has not arrived yet".into()),
        ..empty
    }));
    let pod_watch = PodWatch::node(client, node);
    let node = node.to_owned();
    tokio::spawn(async move {
        let mut states = pod_watch.subscribe();
        loop {
            let state = states.borrow_and_update().clone();
            let last = tx.borrow().clone();
            let pods = state
                .pods
                .as_deref()
                .cloned()
                .unwrap_or_else(|| last.pods.clone());
            let changed = state.pods.is_some();
            tx.send_replace(Arc::new(super::PodSet {
                pods,
                node_name: Some(node.clone()),
                source: source.clone(),
                loaded_at: if changed {
                    std::time::SystemTime::now()
                } else {
                    last.loaded_at
                },
                error: state.error.clone().or_else(|| {
                    state
                        .pods
                        .is_none()
                        .then(|| Arc::from("the first pod list has not arrived yet"))
                }),
            }));
            tokio::select! {
                () = shutdown.cancelled() => break,
                r = states.changed() => if r.is_err() { break },
            }
        }
        drop(pod_watch);
    });
    rx
}

/// How a watch trims the API's pods: [`trim`] or [`trim_with_containers`].
type Trim = fn(&ApiPod) -> Option<Pod>;

/// Applies watch events to the map and publishes it. Events that are already
/// queued are applied together so a burst costs one publication, not one copy of
/// the map per event.
async fn run(
    api: Api<ApiPod>,
    config: watcher::Config,
    what: String,
    tx: watch::Sender<State>,
    trim: Trim,
) {
    let mut stream = watcher(api, config).default_backoff().boxed();
    // One copy of the map is kept: it is shared with the channel, and a change
    // copies it (Arc::make_mut) only while readers still hold the published one.
    let mut live: Arc<PodMap> = Arc::default();
    // Filled between Init and InitDone, then swapped in: pods that vanished while
    // the watch was down disappear without a Delete event.
    let mut relist: Option<PodMap> = None;
    let mut listed = false;
    while let Some(first) = stream.next().await {
        let mut batch = vec![first];
        while let Some(Some(more)) = futures::FutureExt::now_or_never(stream.next()) {
            batch.push(more);
        }
        let mut changed = false;
        let mut error = None;
        for event in batch {
            match event {
                Ok(watcher::Event::Init) => relist = Some(PodMap::new()),
                Ok(watcher::Event::InitApply(pod)) => {
                    if let (Some(buf), Some(p)) = (relist.as_mut(), trim(&pod)) {
                        buf.insert(p.uid.clone(), Arc::new(p));
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(buf) = relist.take() {
                        live = Arc::new(buf);
                    }
                    listed = true;
                    changed = true;
                }
                Ok(watcher::Event::Apply(pod)) => {
                    if let Some(p) = trim(&pod)
                        && live.get(&p.uid).is_none_or(|old| **old != p)
                    {
                        Arc::make_mut(&mut live).insert(p.uid.clone(), Arc::new(p));
                        changed = true;
                    }
                }
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(uid) = pod.metadata.uid.as_deref()
                        && live.contains_key(uid)
                    {
                        Arc::make_mut(&mut live).remove(uid);
                        changed = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(pods = %what, error = %e, "pod watch error; retrying");
                    error = Some(Arc::<str>::from(e.to_string()));
                }
            }
        }
        let (had_error, failing_since) = {
            let last = tx.borrow();
            (last.error.is_some(), last.failing_since)
        };
        if (changed && listed) || error.is_some() || had_error {
            let pods = listed.then(|| live.clone());
            let failing_since = match (&error, changed) {
                // Any good event in the batch shows the API server answering.
                (_, true) | (None, false) => None,
                (Some(_), false) => Some(failing_since.unwrap_or_else(Instant::now)),
            };
            tx.send_replace(State {
                pods,
                error,
                failing_since,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_pod(json: serde_json::Value) -> ApiPod {
        serde_json::from_value(json).expect("valid pod JSON")
    }

    #[test]
    fn trim_keeps_what_scaling_uses() {
        let pod = api_pod(serde_json::json!({
            "metadata": {"uid": "u-1", "name": "web-0", "namespace": "ml",
                         "labels": {"app": "web"}, "annotations": {"big": "x"}},
            "spec": {"nodeName": "gpu-1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running", "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True"}]}
        }));
        let p = trim(&pod).expect("complete pod");
        assert_eq!(p.uid, "u-1");
        assert_eq!(p.namespace, "ml");
        assert_eq!(p.name, "web-0");
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(p.node_name.as_deref(), Some("gpu-1"));
        assert_eq!(p.phase.as_deref(), Some("Running"));
        assert!(p.ready);
        assert!(p.containers.is_empty(), "workload caches stay small");
    }

    #[test]
    fn trim_with_containers_keeps_the_three_status_lists() {
        let pod = api_pod(serde_json::json!({
            "metadata": {"uid": "u-1", "name": "web-0", "namespace": "ml"},
            "spec": {"nodeName": "gpu-1", "containers": [{"name": "c", "image": "i"}]},
            "status": {"phase": "Running",
                "containerStatuses": [
                    {"name": "server", "ready": true, "restartCount": 2, "image": "i", "imageID": "",
                     "containerID": "containerd://aaaa",
                     "lastState": {"terminated": {"exitCode": 1, "containerID": "containerd://a000"}}},
                    {"name": "sidecar", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                     "state": {"waiting": {"reason": "ContainerCreating"}}}],
                "initContainerStatuses": [
                    {"name": "init", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                     "containerID": "cri-o://bbbb"}],
                "ephemeralContainerStatuses": [
                    {"name": "debug", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
                     "containerID": "docker://cccc"}]}
        }));
        let p = trim_with_containers(&pod).expect("complete pod");
        let got = crate::pods::container_summary(&p);
        assert_eq!(
            got,
            [
                ("server", Some("aaaa"), Some("a000"), ContainerKind::App),
                ("sidecar", None, None, ContainerKind::App),
                ("init", Some("bbbb"), None, ContainerKind::Init),
                ("debug", Some("cccc"), None, ContainerKind::Ephemeral),
            ]
        );
        // The same pod trimmed for a workload cache has the same metadata.
        let small = trim(&pod).expect("complete pod");
        assert_eq!(
            Pod {
                containers: Vec::new(),
                ..p
            },
            small
        );
    }

    #[test]
    fn trim_with_containers_missing_lists_and_bad_ids() {
        let pending = api_pod(serde_json::json!({
            "metadata": {"uid": "u-3", "name": "p", "namespace": "ml"},
            "status": {"phase": "Pending"}
        }));
        let p = trim_with_containers(&pending).expect("complete pod");
        assert!(p.containers.is_empty());
        let no_status = api_pod(serde_json::json!({"metadata": {"uid": "u-4", "name": "q"}}));
        assert!(
            trim_with_containers(&no_status)
                .expect("pod")
                .containers
                .is_empty()
        );
        // A malformed id keeps the container, without an id (and says so in a warning).
        let bad = api_pod(serde_json::json!({
            "metadata": {"uid": "u-5", "name": "r", "namespace": "ml"},
            "status": {"containerStatuses": [
                {"name": "c", "ready": true, "restartCount": 0, "image": "i", "imageID": "",
                 "containerID": "no-scheme"}]}
        }));
        let p = trim_with_containers(&bad).expect("pod");
        assert_eq!(p.containers.len(), 1);
        assert_eq!(p.containers[0].name, "c");
        assert_eq!(p.containers[0].id, None);
    }

    #[test]
    fn trim_unscheduled_unready_and_incomplete() {
        let pod = api_pod(serde_json::json!({
            "metadata": {"uid": "u-2", "name": "web-1", "namespace": "ml"},
            "spec": {"nodeName": "", "containers": []},
            "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]}
        }));
        let p = trim(&pod).expect("complete pod");
        assert_eq!(p.node_name, None);
        assert!(!p.ready);
        let no_uid = api_pod(serde_json::json!({"metadata": {"name": "x"}}));
        assert_eq!(trim(&no_uid), None);
    }
}
