//! A fake Kubernetes API server for tests: the real JSON wire format over real
//! HTTP, so the daemon's real kube-rs code (client, discovery, kube-runtime's
//! watcher) runs against it unchanged. Point kube at [`FakeKube::url`] (or write a
//! kubeconfig with [`FakeKube::write_kubeconfig`] for a daemon process).
//!
//! What it serves (GET only; tests change objects through the methods here):
//! - discovery: `/api/v1` and `/apis/{group}/{version}` as `APIResourceList`s,
//!   listing each registered resource and its `scale` subresource;
//! - list and watch of any registered resource, cluster-wide or in one namespace,
//!   with `labelSelector` (equality- and set-based) and `fieldSelector`
//!   (`path=value`, `path!=value`, e.g. `spec.nodeName=gpu-1`);
//! - watch from a `resourceVersion`: the history after it, then live events;
//!   `BOOKMARK` events every [`FakeKube::set_bookmark_interval`] when
//!   `allowWatchBookmarks=true`; an object that stops (starts) matching a watch's
//!   selectors is sent as `DELETED` (`ADDED`), as the real watch cache does;
//!   `timeoutSeconds` ends the stream;
//! - `410 Gone`: after [`FakeKube::expire_watches`] every open watch gets an
//!   `ERROR` event with a 410 `Status` and ends, and resuming from a version
//!   before the expiry gets the same, so the client must re-list;
//! - get of one object, and the `autoscaling/v1` `Scale` of objects whose type has
//!   a scale subresource: `spec.replicas`, and as `status.selector` the object's own
//!   `status.selector` when it has one (what a CRD's `labelSelectorPath` points at),
//!   else its `spec.selector` rendered the way the API server renders it;
//! - `404 NotFound` as a `Status` object.
//!
//! Requests are counted per verb and resource ([`FakeKube::requests`]) so tests can
//! check that caches share watches, and open watch streams are counted
//! ([`FakeKube::open_watches`]) so they can check that dropped watches really
//! close. [`FakeKube::set_unavailable`] plays an outage: the server is
//! unreachable (connections close without an answer, open watches end).

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame, service::service_fn};
use serde_json::{Value, json};
use tokio::sync::{broadcast, mpsc, watch};

/// A kind of object the fake serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    /// Whether `{plural}/scale` is served.
    pub scale: bool,
}

impl ResourceType {
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, scale: bool) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            scale,
        }
    }
    pub fn pods() -> Self {
        Self::new("", "v1", "Pod", "pods", false)
    }
    pub fn endpoint_slices() -> Self {
        Self::new(
            "discovery.k8s.io",
            "v1",
            "EndpointSlice",
            "endpointslices",
            false,
        )
    }
    pub fn scaled_objects() -> Self {
        Self::new(
            "keda.sh",
            "v1alpha1",
            "ScaledObject",
            "scaledobjects",
            false,
        )
    }
    pub fn scaled_jobs() -> Self {
        Self::new("keda.sh", "v1alpha1", "ScaledJob", "scaledjobs", false)
    }
    pub fn deployments() -> Self {
        Self::new("apps", "v1", "Deployment", "deployments", true)
    }
    pub fn stateful_sets() -> Self {
        Self::new("apps", "v1", "StatefulSet", "statefulsets", true)
    }
    /// `group/version`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

/// One recorded change, the unit of watch history.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    rtype: ResourceType,
    old: Option<Value>,
    new: Option<Value>,
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// Watches may not resume from a version below this (410 Gone).
    oldest_rv: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<(ResourceType, String, String), Value>,
    history: Vec<Change>,
    requests: HashMap<String, u64>,
    next_uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Change>,
    /// Bumped by `expire_watches`: open watches end with 410.
    expiry: watch::Sender<u64>,
    bookmark_every: Mutex<Duration>,
    /// Watch streams whose task is still running.
    open_watches: std::sync::atomic::AtomicI64,
    /// True during an outage ([`FakeKube::set_unavailable`]).
    outage: watch::Sender<bool>,
}

/// Counts one open watch stream while it lives.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0
            .open_watches
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The fake API server; it serves until dropped.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeKube {
    /// Starts serving on 127.0.0.1 (a free port) with pods, EndpointSlices,
    /// ScaledObjects, Deployments and StatefulSets registered.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store {
                rv: 100,
                oldest_rv: 0,
                types: vec![
                    ResourceType::pods(),
                    ResourceType::endpoint_slices(),
                    ResourceType::scaled_objects(),
                    ResourceType::deployments(),
                    ResourceType::stateful_sets(),
                ],
                ..Default::default()
            }),
            changes: broadcast::channel(4096).0,
            expiry: watch::channel(0).0,
            bookmark_every: Mutex::new(Duration::from_secs(1)),
            open_watches: Default::default(),
            outage: watch::channel(false).0,
        });
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accept_shared.clone();
                if *shared.outage.borrow() {
                    count(&shared, "unavailable".into());
                    drop(stream);
                    continue;
                }
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move {
                            if *shared.outage.borrow() {
                                // Unreachable: the connection closes without an answer
                                // (a 503 would be retried inside kube's client).
                                count(&shared, "unavailable".into());
                                return Err("the fake API server is down");
                            }
                            Ok(handle(&shared, req))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig that points at this server (no credentials).
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    /// A kubeconfig pointing at this server in a temporary directory of its
    /// own, for `kube` clients and `--kubeconfig` alike.
    pub fn kubeconfig(&self) -> Kubeconfig {
        let dir = tempfile::tempdir().expect("temp dir for the kubeconfig");
        let path = dir.path().join("kubeconfig");
        self.write_kubeconfig(&path);
        Kubeconfig { _dir: dir, path }
    }

    /// Serves another resource type (e.g. a custom resource with a scale
    /// subresource).
    pub fn register(&self, rtype: ResourceType) {
        let mut store = self.shared.store.lock().expect("store lock");
        if !store.types.contains(&rtype) {
            store.types.push(rtype);
        }
    }

    /// How often open watches that asked for bookmarks get one.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_every.lock().expect("lock") = every;
    }

    /// Creates or replaces an object (namespace and name from its metadata). A
    /// missing uid is generated; resourceVersion is set. Returns the stored object.
    pub fn apply(&self, rtype: &ResourceType, mut obj: Value) -> Value {
        let mut store = self.shared.store.lock().expect("store lock");
        store.rv += 1;
        let rv = store.rv;
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("object has metadata.name")
            .to_owned();
        let key = (rtype.clone(), ns, name);
        let old = store.objects.get(&key).cloned();
        if obj["metadata"]["uid"].is_null() {
            let uid = match &old {
                Some(o) => o["metadata"]["uid"].clone(),
                None => {
                    store.next_uid += 1;
                    json!(format!("00000000-0000-4000-8000-{:012}", store.next_uid))
                }
            };
            obj["metadata"]["uid"] = uid;
        }
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        obj["apiVersion"] = json!(rtype.api_version());
        obj["kind"] = json!(rtype.kind);
        store.objects.insert(key, obj.clone());
        let change = Change {
            rv,
            rtype: rtype.clone(),
            old,
            new: Some(obj.clone()),
        };
        store.history.push(change.clone());
        let _ = self.shared.changes.send(change);
        obj
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, rtype: &ResourceType, namespace: &str, name: &str) -> bool {
        let mut store = self.shared.store.lock().expect("store lock");
        let key = (rtype.clone(), namespace.to_owned(), name.to_owned());
        let Some(mut old) = store.objects.remove(&key) else {
            return false;
        };
        store.rv += 1;
        let rv = store.rv;
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        let change = Change {
            rv,
            rtype: rtype.clone(),
            old: Some(old),
            new: None,
        };
        store.history.push(change.clone());
        let _ = self.shared.changes.send(change);
        true
    }

    /// Compacts the history and ends every open watch with `410 Gone`, as an API
    /// server does when its watch cache no longer holds a client's version.
    pub fn expire_watches(&self) {
        {
            let mut store = self.shared.store.lock().expect("store lock");
            store.rv += 1;
            store.oldest_rv = store.rv;
            store.history.clear();
        }
        self.shared.expiry.send_modify(|g| *g += 1);
    }

    /// Requests served so far, keyed `"{verb} {plural}"` with verb one of `list`,
    /// `watch`, `get`, `scale`, `discovery` (plural is the group/version there), and
    /// `bookmark` for each BOOKMARK event sent.
    pub fn requests(&self) -> HashMap<String, u64> {
        self.shared
            .store
            .lock()
            .expect("store lock")
            .requests
            .clone()
    }

    /// Watch streams open now (a stream counts until the server notices its
    /// client is gone, at the next event or bookmark it tries to send).
    pub fn open_watches(&self) -> i64 {
        self.shared
            .open_watches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts (`true`) or ends an outage: while it lasts the server is
    /// unreachable: new connections are closed at once, requests on open ones
    /// close them without an answer, open watches end without an event. Counted
    /// as `unavailable` in [`FakeKube::requests`].
    pub fn set_unavailable(&self, down: bool) {
        self.shared.outage.send_replace(down);
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().expect("store lock").rv
    }
}

/// A kubeconfig file written by [`FakeKube::kubeconfig`], removed when dropped.
pub struct Kubeconfig {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

/// A scheduled, running and ready pod on `node` (see [`pod`]).
pub fn running_pod(
    namespace: &str,
    name: &str,
    uid: &str,
    labels: &[(&str, &str)],
    node: &str,
) -> Value {
    pod(namespace, name, uid, labels, Some(node), "Running", true)
}

/// The runtime id [`pod`] gives the `main` container of the pod with `uid`:
/// 64 hex digits, as containerd names its cgroup scopes.
pub fn container_id_of(uid: &str) -> String {
    let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex:0>64}").chars().rev().take(64).collect()
}

/// A pod as the API server returns it: `node` is `spec.nodeName`, readiness the
/// Ready condition. A pod that is not `Pending` has its `main` container's
/// status, with the id [`container_id_of`] (`containerd://`); a pending one
/// has none yet.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    labels: &[(&str, &str)],
    node: Option<&str>,
    phase: &str,
    ready: bool,
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).into(), json!(v)))
        .collect();
    let mut pod = json!({
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels,
                     "creationTimestamp": "2026-01-01T00:00:00Z",
                     "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
        "spec": {"nodeName": node.unwrap_or(""),
                 "containers": [{"name": "main", "image": "registry.example/app:1",
                                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        "status": {"phase": phase, "podIP": "10.0.0.1", "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    });
    if phase != "Pending" {
        pod["status"]["containerStatuses"] = json!([{
            "name": "main", "ready": ready, "restartCount": 0, "started": true,
            "image": "registry.example/app:1",
            "imageID": "registry.example/app@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "containerID": format!("containerd://{}", container_id_of(uid)),
            "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}}
        }]);
    }
    pod
}

/// An EndpointSlice of headless Service `service` with one endpoint per
/// `(node, ip)`, all on port `port` named `peer`.
pub fn endpoint_slice(
    namespace: &str,
    name: &str,
    service: &str,
    endpoints: &[(&str, &str)],
    port: u16,
) -> Value {
    let eps: Vec<Value> = endpoints
        .iter()
        .map(|(node, ip)| {
            json!({"addresses": [ip], "nodeName": node,
                   "conditions": {"ready": true, "serving": true, "terminating": false}})
        })
        .collect();
    json!({
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service,
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "peer", "port": port, "protocol": "TCP"}]
    })
}

/// The EndpointSlice `{service}-{node}` listing one daemon, on `node` at
/// `addr`, as a peer of headless Service `service`. In a cluster the daemons
/// share one port on different pod IPs; test daemons on one host each have a
/// port of their own, so each gets its own slice.
pub fn peer_endpoint_slice(namespace: &str, service: &str, node: &str, addr: SocketAddr) -> Value {
    endpoint_slice(
        namespace,
        &format!("{service}-{node}"),
        service,
        &[(node, &addr.ip().to_string())],
        addr.port(),
    )
}

/// A KEDA ScaledObject; `target` is `(apiVersion, kind, name)`, with `None` for
/// apiVersion/kind left out as users do for Deployments.
pub fn scaled_object(
    namespace: &str,
    name: &str,
    target: (Option<&str>, Option<&str>, &str),
) -> Value {
    let mut target_ref = json!({"name": target.2});
    if let Some(v) = target.0 {
        target_ref["apiVersion"] = json!(v);
    }
    if let Some(k) = target.1 {
        target_ref["kind"] = json!(k);
    }
    json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"scaleTargetRef": target_ref, "minReplicaCount": 1, "maxReplicaCount": 10,
                 "triggers": [{"type": "external",
                               "metadata": {"scalerAddress": "gpu-scaler.gpu-scaler:6000"}}]}
    })
}

/// A ScaledJob with one external trigger of `metadata` (and `metricType`, if
/// given), as KEDA's CRD has it.
pub fn scaled_job(
    namespace: &str,
    name: &str,
    metric_type: Option<&str>,
    metadata: &[(&str, &str)],
) -> Value {
    let metadata: serde_json::Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| ((*k).into(), json!(v)))
        .collect();
    let mut trigger = json!({"type": "external", "metadata": metadata});
    if let Some(t) = metric_type {
        trigger["metricType"] = json!(t);
    }
    json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"jobTargetRef": {"template": {"spec": {"restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "registry.example/batch:1"}]}}},
                 "maxReplicaCount": 10,
                 "triggers": [trigger]}
    })
}

/// A Deployment (or StatefulSet: same shape) selecting `match_labels`.
pub fn workload(
    namespace: &str,
    name: &str,
    replicas: u32,
    match_labels: &[(&str, &str)],
) -> Value {
    let labels: serde_json::Map<String, Value> = match_labels
        .iter()
        .map(|(k, v)| ((*k).into(), json!(v)))
        .collect();
    json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}}},
        "status": {"replicas": replicas}
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("response")
}

fn status(code: u16, reason: &str, message: String) -> Response<Body> {
    full(
        StatusCode::from_u16(code).expect("status code"),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn query_params(req: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(q) = req.uri().query() {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.insert(decode(k), decode(v));
        }
    }
    out
}

/// Percent-decoding (and `+` as space) of a query component.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request path names.
struct Target {
    rtype: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    scale: bool,
}

fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    if req.method() != hyper::Method::GET {
        return status(
            405,
            "MethodNotAllowed",
            "the fake API server only serves GET".into(),
        );
    }
    let params = query_params(&req);
    let segs: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => {
            return status(
                404,
                "NotFound",
                format!("the server could not find {}", req.uri().path()),
            );
        }
    };
    let types = shared.store.lock().expect("store lock").types.clone();
    if rest.is_empty() {
        return discovery(shared, &types, group, version);
    }
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_owned()), rest),
        _ => (None, rest),
    };
    let (plural, name, scale) = match rest {
        [plural] => (*plural, None, false),
        [plural, name] => (*plural, Some((*name).to_owned()), false),
        [plural, name, "scale"] => (*plural, Some((*name).to_owned()), true),
        _ => {
            return status(
                404,
                "NotFound",
                format!("the server could not find {}", req.uri().path()),
            );
        }
    };
    let Some(rtype) = types
        .iter()
        .find(|t| t.group == group && t.version == version && t.plural == plural)
        .cloned()
    else {
        return status(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({group}/{version} {plural})"
            ),
        );
    };
    let target = Target {
        rtype,
        namespace,
        name,
        scale,
    };
    if target.name.is_some() {
        return get(shared, &target);
    }
    let label_sel = match params.get("labelSelector").map(|s| LabelSelector::parse(s)) {
        Some(Err(e)) => {
            return status(
                400,
                "BadRequest",
                format!("unable to parse requirement: {e}"),
            );
        }
        Some(Ok(s)) => s,
        None => LabelSelector::default(),
    };
    let field_sel = match params.get("fieldSelector").map(|s| FieldSelector::parse(s)) {
        Some(Err(e)) => return status(400, "BadRequest", e),
        Some(Ok(s)) => s,
        None => FieldSelector::default(),
    };
    let filter = Filter {
        rtype: target.rtype.clone(),
        namespace: target.namespace.clone(),
        labels: label_sel,
        fields: field_sel,
    };
    let is_watch = matches!(params.get("watch").map(String::as_str), Some("true" | "1"));
    if is_watch {
        watch_stream(shared, filter, &params)
    } else {
        list(shared, &filter)
    }
}

fn count(shared: &Shared, key: String) {
    *shared
        .store
        .lock()
        .expect("store lock")
        .requests
        .entry(key)
        .or_default() += 1;
}

fn discovery(
    shared: &Shared,
    types: &[ResourceType],
    group: &str,
    version: &str,
) -> Response<Body> {
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    count(shared, format!("discovery {gv}"));
    let mut resources = Vec::new();
    for t in types
        .iter()
        .filter(|t| t.group == group && t.version == version)
    {
        resources.push(
            json!({"name": t.plural, "singularName": t.kind.to_lowercase(),
            "namespaced": true, "kind": t.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}),
        );
        if t.scale {
            resources.push(
                json!({"name": format!("{}/scale", t.plural), "singularName": "",
                "namespaced": true, "group": "autoscaling", "version": "v1", "kind": "Scale",
                "verbs": ["get", "patch", "update"]}),
            );
        }
    }
    if resources.is_empty() {
        return status(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({gv})"),
        );
    }
    full(
        StatusCode::OK,
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

fn not_found(rtype: &ResourceType, name: &str) -> Response<Body> {
    let qualified = if rtype.group.is_empty() {
        rtype.plural.clone()
    } else {
        format!("{}.{}", rtype.plural, rtype.group)
    };
    full(
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": format!("{qualified} \"{name}\" not found"), "reason": "NotFound",
               "details": {"name": name, "group": rtype.group, "kind": rtype.plural}, "code": 404}),
    )
}

fn get(shared: &Shared, target: &Target) -> Response<Body> {
    let name = target.name.clone().unwrap_or_default();
    let verb = if target.scale { "scale" } else { "get" };
    count(shared, format!("{verb} {}", target.rtype.plural));
    let key = (
        target.rtype.clone(),
        target.namespace.clone().unwrap_or_default(),
        name.clone(),
    );
    let obj = shared
        .store
        .lock()
        .expect("store lock")
        .objects
        .get(&key)
        .cloned();
    let Some(obj) = obj else {
        return not_found(&target.rtype, &name);
    };
    if !target.scale {
        return full(StatusCode::OK, obj);
    }
    if !target.rtype.scale {
        return status(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({}/scale)",
                target.rtype.plural
            ),
        );
    }
    let replicas = obj["spec"]["replicas"].as_u64().unwrap_or(1);
    let selector = match obj["status"]["selector"].as_str() {
        Some(s) => s.to_owned(),
        None => render_selector(&obj["spec"]["selector"]),
    };
    let mut scale_status = json!({"replicas": obj["status"]["replicas"].as_u64().unwrap_or(0)});
    if !selector.is_empty() {
        scale_status["selector"] = json!(selector);
    }
    full(
        StatusCode::OK,
        json!({"kind": "Scale", "apiVersion": "autoscaling/v1",
               "metadata": {"name": name, "namespace": key.1,
                            "uid": obj["metadata"]["uid"], "resourceVersion": obj["metadata"]["resourceVersion"]},
               "spec": {"replicas": replicas}, "status": scale_status}),
    )
}

/// metav1.FormatLabelSelector: matchLabels as `k=v`, then matchExpressions.
fn render_selector(sel: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = sel["matchLabels"].as_object() {
        let sorted: BTreeMap<_, _> = m.iter().collect();
        for (k, v) in sorted {
            parts.push(format!("{k}={}", v.as_str().unwrap_or("")));
        }
    }
    if let Some(exprs) = sel["matchExpressions"].as_array() {
        for e in exprs {
            let key = e["key"].as_str().unwrap_or("");
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            parts.push(match e["operator"].as_str().unwrap_or("") {
                "In" => format!("{key} in ({})", values.join(",")),
                "NotIn" => format!("{key} notin ({})", values.join(",")),
                "Exists" => key.to_owned(),
                _ => format!("!{key}"),
            });
        }
    }
    parts.join(",")
}

/// Which objects one list or watch selects.
struct Filter {
    rtype: ResourceType,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, rtype: &ResourceType, obj: &Value) -> bool {
        if *rtype != self.rtype {
            return false;
        }
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        self.labels.matches(&obj["metadata"]["labels"]) && self.fields.matches(obj)
    }
}

fn list(shared: &Shared, filter: &Filter) -> Response<Body> {
    count(shared, format!("list {}", filter.rtype.plural));
    let store = shared.store.lock().expect("store lock");
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|((t, _, _), obj)| filter.matches(t, obj))
        .map(|(_, obj)| {
            // Items in a list carry no apiVersion/kind on the wire.
            let mut o = obj.clone();
            if let Some(m) = o.as_object_mut() {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    full(
        StatusCode::OK,
        json!({"kind": format!("{}List", filter.rtype.kind), "apiVersion": filter.rtype.api_version(),
               "metadata": {"resourceVersion": store.rv.to_string()}, "items": items}),
    )
}

/// The watch event a change is for this filter, if any.
fn event_for(filter: &Filter, change: &Change) -> Option<Value> {
    let was = change
        .old
        .as_ref()
        .is_some_and(|o| filter.matches(&change.rtype, o));
    let is = change
        .new
        .as_ref()
        .is_some_and(|o| filter.matches(&change.rtype, o));
    let (kind, obj) = match (was, is) {
        (false, true) => ("ADDED", change.new.clone()?),
        (true, true) => ("MODIFIED", change.new.clone()?),
        (true, false) => {
            // Deleted, or no longer selected: the last state with the new version.
            let mut obj = change.new.clone().or_else(|| change.old.clone())?;
            obj["metadata"]["resourceVersion"] = json!(change.rv.to_string());
            ("DELETED", obj)
        }
        (false, false) => return None,
    };
    Some(json!({"type": kind, "object": obj}))
}

fn gone(rv: &str, oldest: u64) -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": format!("too old resource version: {rv} ({oldest})"),
        "reason": "Expired", "code": 410}})
}

fn watch_stream(
    shared: &Arc<Shared>,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Response<Body> {
    count(shared, format!("watch {}", filter.rtype.plural));
    let rv_param = params.get("resourceVersion").cloned().unwrap_or_default();
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    // Subscribe and read history under one lock so no change falls between them.
    let (backlog, mut live, start_rv, expired) = {
        let store = shared.store.lock().expect("store lock");
        let live = shared.changes.subscribe();
        let from: u64 = match rv_param.as_str() {
            "" | "0" => store.rv,
            s => s.parse().unwrap_or(0),
        };
        if from < store.oldest_rv {
            (Vec::new(), live, from, Some(store.oldest_rv))
        } else {
            let backlog: Vec<Change> = store
                .history
                .iter()
                .filter(|c| c.rv > from)
                .cloned()
                .collect();
            (backlog, live, from, None)
        }
    };
    let mut expiry = shared.expiry.subscribe();
    expiry.mark_unchanged();
    let mut outage = shared.outage.subscribe();
    outage.mark_unchanged();
    let shared = shared.clone();
    shared
        .open_watches
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let open = OpenWatch(shared.clone());
    tokio::spawn(async move {
        let _open = open;
        let send = |v: Value| {
            let tx = tx.clone();
            async move { tx.send(Bytes::from(format!("{v}\n"))).await.is_ok() }
        };
        if let Some(oldest) = expired {
            send(gone(&rv_param, oldest)).await;
            return;
        }
        let mut last = start_rv;
        for c in backlog {
            last = c.rv;
            if let Some(ev) = event_for(&filter, &c)
                && !send(ev).await
            {
                return;
            }
        }
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let bookmark_every = *shared.bookmark_every.lock().expect("lock");
        let mut tick = tokio::time::interval(bookmark_every);
        tick.tick().await;
        loop {
            let until_deadline = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            // Biased: an expiry that happened before a change must win over it.
            tokio::select! {
                biased;
                _ = expiry.changed() => {
                    let oldest = shared.store.lock().expect("store lock").oldest_rv;
                    send(gone(&last.to_string(), oldest)).await;
                    return;
                }
                () = until_deadline => return,
                _ = outage.changed() => if *outage.borrow_and_update() { return },
                _ = tick.tick(), if bookmarks => {
                    let rv = shared.store.lock().expect("store lock").rv.max(last);
                    let bm = json!({"type": "BOOKMARK", "object": {"kind": filter.rtype.kind,
                        "apiVersion": filter.rtype.api_version(),
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if !send(bm).await { return; }
                    count(&shared, format!("bookmark {}", filter.rtype.plural));
                }
                change = live.recv() => match change {
                    Ok(c) if c.rv > last => {
                        last = c.rv;
                        if let Some(ev) = event_for(&filter, &c) && !send(ev).await {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind the broadcast buffer: the client must re-list.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        send(gone(&last.to_string(), last)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    });
    let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(body))
        .expect("response")
}

/// A label selector in the API's string syntax: `k=v`, `k==v`, `k!=v`,
/// `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, comma-separated (all must hold).
#[derive(Debug, Default)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Debug)]
enum Requirement {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        let mut parts = Vec::new();
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&s[start..]);
        for part in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let set = |op: &str| -> Option<Result<(String, Vec<String>), String>> {
                let (k, rest) = part.split_once(op)?;
                let rest = rest.trim();
                let inner = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')'));
                Some(match inner {
                    Some(v) => Ok((
                        k.trim().to_owned(),
                        v.split(',').map(|x| x.trim().to_owned()).collect(),
                    )),
                    None => Err(format!("{part:?}: expected a parenthesised set")),
                })
            };
            let req = if let Some(r) = set(" notin ") {
                let (k, v) = r?;
                Requirement::NotIn(k, v)
            } else if let Some(r) = set(" in ") {
                let (k, v) = r?;
                Requirement::In(k, v)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else if part.contains(char::is_whitespace) {
                return Err(format!("{part:?}: not a requirement"));
            } else {
                Requirement::Exists(part.into())
            };
            reqs.push(req);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v),
            Requirement::Ne(k, v) => get(k) != Some(v),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A field selector: `path=value`, `path==value`, `path!=value`, comma-separated;
/// paths are dotted JSON paths such as `spec.nodeName`. A missing field is `""`.
#[derive(Debug, Default)]
pub struct FieldSelector(Vec<(Vec<String>, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, eq, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (p, true, v)
            } else {
                return Err(format!("invalid field selector {part:?}"));
            };
            out.push((
                path.split('.').map(str::to_owned).collect(),
                eq,
                value.to_owned(),
            ));
        }
        Ok(Self(out))
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let mut v = obj;
            for seg in path {
                v = &v[seg.as_str()];
            }
            let got = v.as_str().unwrap_or("");
            (got == want) == *eq
        })
    }
}

/// Polls `check` every 20 ms until it holds, panicking with `what` after
/// `timeout`. For conditions that a watch makes true asynchronously.
pub async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selector_syntax() {
        let labels = json!({"app": "vllm", "tier": "gpu"});
        let m = |s: &str| {
            LabelSelector::parse(s)
                .expect("valid selector")
                .matches(&labels)
        };
        assert!(m("app=vllm"));
        assert!(m("app==vllm,tier in (gpu, edge)"));
        assert!(!m("app=vllm,tier notin (gpu)"));
        assert!(m("app,!canary"));
        assert!(!m("app!=vllm"));
        assert!(LabelSelector::parse("app in gpu").is_err());
    }

    #[test]
    fn decode_query() {
        assert_eq!(decode("spec.nodeName%3Dgpu-1"), "spec.nodeName=gpu-1");
        assert_eq!(decode("a+b%2C%28c%29"), "a b,(c)");
        assert_eq!(decode("100%"), "100%");
    }
}
