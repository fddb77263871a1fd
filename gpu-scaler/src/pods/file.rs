//! Pods from a file: a PodList in the JSON `kubectl get pods -A -o json` prints
//! (`kind: List` or `PodList`), re-read when it changes.
//!
//! The file is checked every `check_interval` (size, mtime and inode, so an
//! atomic rename is seen too) rather than through inotify, which misses renames
//! over the watched path and is not available on every filesystem. A file that
//! fails to parse keeps the last good pods and records the error in the set.

use std::{
    collections::BTreeMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;

use super::{Container, ContainerKind, Pod, PodSet, PodsReceiver};

/// Settings of the file source.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    /// This node's name; `None` makes every pod local.
    pub node_name: Option<String>,
    /// How often the file is checked for changes.
    pub check_interval: Duration,
}

/// Errors of the file source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading pods file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pods file {path} is not a PodList: {message}")]
    Format { path: String, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Deserialize)]
struct ListJson {
    kind: Option<String>,
    #[serde(default)]
    items: Vec<PodJson>,
}

#[derive(Deserialize)]
struct PodJson {
    kind: Option<String>,
    metadata: Option<MetaJson>,
    spec: Option<SpecJson>,
    status: Option<StatusJson>,
}

#[derive(Deserialize)]
struct MetaJson {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecJson {
    node_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StatusJson {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default)]
    conditions: Option<Vec<ConditionJson>>,
    container_statuses: Option<Vec<ContainerStatusJson>>,
    init_container_statuses: Option<Vec<ContainerStatusJson>>,
    ephemeral_container_statuses: Option<Vec<ContainerStatusJson>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContainerStatusJson {
    name: Option<String>,
    #[serde(rename = "containerID")]
    container_id: Option<String>,
    last_state: Option<LastStateJson>,
}

#[derive(Deserialize)]
struct LastStateJson {
    terminated: Option<TerminatedJson>,
}

#[derive(Deserialize)]
struct TerminatedJson {
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

/// The containers of a status's three lists; `what` (`items[3].status`) labels
/// errors.
fn containers(s: &StatusJson, what: &str) -> std::result::Result<Vec<Container>, String> {
    let mut out = Vec::new();
    for (list, field, kind) in [
        (
            &s.container_statuses,
            "containerStatuses",
            ContainerKind::App,
        ),
        (
            &s.init_container_statuses,
            "initContainerStatuses",
            ContainerKind::Init,
        ),
        (
            &s.ephemeral_container_statuses,
            "ephemeralContainerStatuses",
            ContainerKind::Ephemeral,
        ),
    ] {
        for (j, c) in list.iter().flatten().enumerate() {
            let previous = c
                .last_state
                .as_ref()
                .and_then(|l| l.terminated.as_ref())
                .and_then(|t| t.container_id.as_deref());
            let container = Container::from_status(
                c.name.as_deref().unwrap_or_default(),
                c.container_id.as_deref(),
                previous,
                kind,
            )
            .map_err(|e| format!("{what}.{field}[{j}]: {e}"))?;
            out.push(container);
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
struct ConditionJson {
    #[serde(rename = "type")]
    kind: String,
    status: String,
}

/// Parses a PodList's JSON text. `path` only labels errors.
pub fn parse(path: &str, text: &str) -> Result<Vec<Pod>> {
    let format = |message: String| Error::Format {
        path: path.to_owned(),
        message,
    };
    let list: ListJson = serde_json::from_str(text).map_err(|e| format(e.to_string()))?;
    match list.kind.as_deref() {
        Some("List") | Some("PodList") => {}
        Some(other) => {
            return Err(format(format!(
                "kind is {other:?}; expected \"List\" or \"PodList\""
            )));
        }
        None => {
            return Err(format(
                "no \"kind\" field; expected \"List\" or \"PodList\"".into(),
            ));
        }
    }
    let mut pods = Vec::with_capacity(list.items.len());
    for (i, item) in list.items.into_iter().enumerate() {
        if let Some(kind) = item.kind.as_deref()
            && kind != "Pod"
        {
            return Err(format(format!("items[{i}] is a {kind}, not a Pod")));
        }
        let meta = item
            .metadata
            .ok_or_else(|| format(format!("items[{i}] has no metadata")))?;
        let field = |v: Option<String>, name: &str| {
            v.filter(|s| !s.is_empty())
                .ok_or_else(|| format(format!("items[{i}] has no metadata.{name}")))
        };
        let name = field(meta.name, "name")?;
        let namespace = field(meta.namespace, "namespace")?;
        let uid = field(meta.uid, "uid")?;
        let ip = item
            .status
            .as_ref()
            .and_then(|s| super::pod_ip(s.pod_ip.as_deref()));
        let (phase, ready, containers) = match item.status {
            Some(s) => {
                let ready = s
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.kind == "Ready" && c.status == "True");
                let containers = containers(&s, &format!("items[{i}].status")).map_err(format)?;
                (s.phase, ready, containers)
            }
            None => (None, false, Vec::new()),
        };
        pods.push(Pod {
            uid,
            namespace,
            name,
            labels: meta.labels.unwrap_or_default(),
            node_name: item
                .spec
                .and_then(|s| s.node_name)
                .filter(|n| !n.is_empty()),
            phase,
            ready,
            ip,
            annotations: super::scrape_annotations(meta.annotations.iter().flatten()),
            containers,
        });
    }
    Ok(pods)
}

/// Reads and parses the PodList file at `path` once.
pub fn load(path: &Path) -> Result<Vec<Pod>> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: shown.clone(),
        source,
    })?;
    parse(&shown, &text)
}

/// What identifies one version of the file without reading it.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        ino: m.ino(),
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

/// Loads the file (an unreadable or invalid file is an error at start-up) and
/// follows it on a task until every receiver is dropped.
pub fn start(config: Config) -> Result<PodsReceiver> {
    let source: Arc<str> = format!("file:{}", config.path.display()).into();
    let mut last_stamp = stamp(&config.path);
    let pods = load(&config.path)?;
    tracing::info!(path = %config.path.display(), pods = pods.len(), "pods file loaded");
    let set = PodSet::from_pods(pods, config.node_name.clone(), source.clone());
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(set));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.check_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                _ = tick.tick() => {}
            }
            let now_stamp = stamp(&config.path);
            // A failed parse may have read a half-written file: retry until it
            // parses even if the stamp has not moved since.
            if now_stamp == last_stamp && !failing {
                continue;
            }
            last_stamp = now_stamp;
            match load(&config.path) {
                Ok(pods) => {
                    failing = false;
                    tracing::info!(path = %config.path.display(), pods = pods.len(), "pods file reloaded");
                    let set = PodSet::from_pods(pods, config.node_name.clone(), source.clone());
                    tx.send_replace(Arc::new(set));
                }
                Err(err) => {
                    let first = !failing;
                    failing = true;
                    if first {
                        tracing::warn!(error = %err, "pods file could not be reloaded; keeping the last good pods");
                        let reason: Arc<str> = err.to_string().into();
                        tx.send_modify(|set| {
                            let mut next = PodSet::clone(set);
                            next.error = Some(reason);
                            *set = Arc::new(next);
                        });
                    }
                }
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{
      "apiVersion": "v1",
      "kind": "List",
      "metadata": {"resourceVersion": ""},
      "items": [
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "vllm-0", "namespace": "ml", "uid": "11111111-2222-3333-4444-555555555555",
                      "labels": {"app": "vllm"}, "annotations": {"x": "y"}},
         "spec": {"nodeName": "gpu-1", "containers": [{"name": "c", "image": "i"}]},
         "status": {"phase": "Running", "conditions": [
             {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
           "initContainerStatuses": [{"name": "fetch", "ready": false, "restartCount": 0,
             "containerID": "cri-o://1111", "state": {"terminated": {"exitCode": 0, "containerID": "cri-o://1111"}}}],
           "containerStatuses": [
             {"name": "c", "ready": true, "restartCount": 1, "image": "i", "imageID": "i@sha256:00",
              "containerID": "containerd://aaaa", "started": true, "state": {"running": {"startedAt": "2026-11-29T00:00:00Z"}},
              "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled", "containerID": "containerd://9999"}}},
             {"name": "waiting", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
              "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}}],
           "ephemeralContainerStatuses": [{"name": "debugger", "containerID": "docker://dddd", "ready": false}]}},
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "pending", "namespace": "ml", "uid": "u2"},
         "spec": {},
         "status": {"phase": "Pending"}}
      ]
    }"#;

    #[test]
    fn parses_kubectl_output() {
        let pods = parse("t", LIST).expect("valid list");
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0].name, "vllm-0");
        assert_eq!(pods[0].namespace, "ml");
        assert_eq!(pods[0].uid, "11111111-2222-3333-4444-555555555555");
        assert_eq!(pods[0].labels.get("app").map(String::as_str), Some("vllm"));
        assert_eq!(pods[0].node_name.as_deref(), Some("gpu-1"));
        assert_eq!(pods[0].phase.as_deref(), Some("Running"));
        assert!(pods[0].ready);
        assert_eq!(pods[1].node_name, None);
        assert!(!pods[1].ready);
        assert!(pods[1].labels.is_empty());
        assert!(pods[1].containers.is_empty(), "pending: no statuses yet");
    }

    #[test]
    fn parses_the_three_container_status_lists() {
        let pods = parse("t", LIST).expect("valid list");
        let got = crate::pods::container_summary(&pods[0]);
        assert_eq!(
            got,
            [
                ("c", Some("aaaa"), Some("9999"), ContainerKind::App),
                ("waiting", None, None, ContainerKind::App),
                ("fetch", Some("1111"), None, ContainerKind::Init),
                ("debugger", Some("dddd"), None, ContainerKind::Ephemeral),
            ]
        );
        assert_eq!(
            pods[0].container_by_id("9999").map(|c| c.name.as_str()),
            Some("c")
        );
    }

    #[test]
    fn rejects_malformed_container_statuses() {
        let item = |status: &str| {
            format!(
                r#"{{"kind": "List", "items": [{{"metadata": {{"name": "a", "namespace": "b", "uid": "u"}},
                   "status": {status}}}]}}"#
            )
        };
        for (status, want) in [
            (
                r#"{"containerStatuses": [{"containerID": "containerd://a"}]}"#,
                "items[0].status.containerStatuses[0]: a container status has no name",
            ),
            (
                r#"{"initContainerStatuses": [{"name": "x", "containerID": "abc"}]}"#,
                "items[0].status.initContainerStatuses[0]: container \"x\": containerID \"abc\" has no runtime scheme",
            ),
            (
                r#"{"ephemeralContainerStatuses": [{"name": "d", "containerID": "docker://"}]}"#,
                "ephemeralContainerStatuses[0]: container \"d\"",
            ),
            (
                r#"{"containerStatuses": [{"name": "c", "lastState": {"terminated": {"containerID": "x//y"}}}]}"#,
                "x//y",
            ),
            (
                r#"{"containerStatuses": {"name": "c"}}"#,
                "expected a sequence",
            ),
            (
                r#"{"containerStatuses": [{"name": 7}]}"#,
                "expected a string",
            ),
        ] {
            let text = item(status);
            let err = parse("f.json", &text).expect_err(status).to_string();
            assert!(
                err.contains(want) && err.contains("f.json"),
                "{status}: {err}"
            );
        }
        // Present but null or empty lists are simply no containers.
        let pods = parse(
            "f.json",
            &item(r#"{"containerStatuses": null, "initContainerStatuses": []}"#),
        )
        .expect("null and empty lists");
        assert!(pods[0].containers.is_empty());
    }

    #[test]
    fn rejects_what_is_not_a_pod_list() {
        for (text, want) in [
            ("not json", "expected"),
            (r#"{"items": []}"#, "no \"kind\""),
            (r#"{"kind": "ServiceList", "items": []}"#, "ServiceList"),
            (
                r#"{"kind": "List", "items": [{"kind": "Service", "metadata": {}}]}"#,
                "items[0] is a Service",
            ),
            (
                r#"{"kind": "List", "items": [{"kind": "Pod"}]}"#,
                "items[0] has no metadata",
            ),
            (
                r#"{"kind": "List", "items": [{"metadata": {"name": "a", "namespace": "b"}}]}"#,
                "metadata.uid",
            ),
            (
                r#"{"kind": "List", "items": [{"metadata": {"name": "a", "uid": "u"}}]}"#,
                "metadata.namespace",
            ),
        ] {
            let err = parse("f.json", text).expect_err(text).to_string();
            assert!(
                err.contains(want) && err.contains("f.json"),
                "{text}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn follows_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pods.json");
        std::fs::write(&path, LIST).expect("write");
        let mut rx = start(Config {
            path: path.clone(),
            node_name: Some("gpu-1".into()),
            check_interval: Duration::from_millis(20),
        })
        .expect("start");
        let first = rx.borrow_and_update().clone();
        assert_eq!(first.pods.len(), 2);
        assert_eq!(first.local().count(), 1, "only the pod on gpu-1 is local");

        // A broken write keeps the old pods and says why.
        std::fs::write(&path, "{ half").expect("write");
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("error published")
            .expect("sender alive");
        let broken = rx.borrow_and_update().clone();
        assert_eq!(broken.pods.len(), 2);
        assert!(
            broken
                .error
                .as_deref()
                .is_some_and(|e| e.contains("pods.json")),
            "{:?}",
            broken.error
        );

        // An atomic replace (write + rename) with a new pod is picked up.
        let tmp = dir.path().join("pods.json.tmp");
        let updated = LIST.replace("\"name\": \"pending\"", "\"name\": \"renamed\"");
        std::fs::write(&tmp, updated).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("reload published")
            .expect("sender alive");
        let reloaded = rx.borrow_and_update().clone();
        assert!(reloaded.error.is_none());
        assert_eq!(reloaded.get("u2").map(|p| p.name.as_str()), Some("renamed"));
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = start_blocking("/nonexistent/pods.json").expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/pods.json"), "{err}");
    }

    fn start_blocking(path: &str) -> Result<PodsReceiver> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = rt.enter();
        start(Config {
            path: path.into(),
            node_name: None,
            check_interval: Duration::from_secs(1),
        })
    }
}
