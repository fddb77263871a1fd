//! A kubelet stand-in for the test's nodes (there is no scheduler and no container
//! runtime here). Every few hundred milliseconds it lists the cluster's pods and:
//!
//! - binds a pod without `spec.nodeName` (a DaemonSet's pod to the node its
//!   affinity names, any other to the node with the fewest pods): `pods/binding`,
//!   as the scheduler does;
//! - starts a pod bound to one of its nodes: one real process per container in the
//!   container's cgroup of the pod's UID in the systemd/containerd kubelet layout,
//!   then reports it Running and Ready with a pod IP and each container's
//!   `containerID`, as a kubelet does. A pod of gpu-scaler's DaemonSet gets no
//!   process (the test runs that node's `gpu-scaler serve` itself) and the node's
//!   address as its IP, so the chart's headless Service's EndpointSlices, built by
//!   the real EndpointSlice controller, name the daemons;
//! - stops a pod being deleted (kills its processes, removes its cgroups) and
//!   finishes the deletion;
//! - writes each node's mock GPU scenario: a workload's demand (set by the test, in
//!   SM %) shared out over its running pods' first processes, as requests spread
//!   over replicas.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use gpu_scaler_tests::{
    cgroup::{self, TestTree},
    kube_api::container_id_of,
    pod::systemd_containerd,
    process,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Client,
    api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

/// One of the test's nodes.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    /// Its address: the daemon's, and its DaemonSet pod's IP.
    pub ip: Ipv4Addr,
    /// Its GPU, as the daemon's mock source reads it.
    pub scenario: PathBuf,
}

/// A pod this kubelet runs.
struct LocalPod {
    namespace: String,
    app: Option<String>,
    node: usize,
    processes: Vec<Child>,
    /// The pod's cgroup directory (containers below it).
    dir: Option<PathBuf>,
}

impl LocalPod {
    fn stop(mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(dir) = &self.dir {
            cgroup::remove_tree(dir);
        }
    }
}

#[derive(Default)]
struct State {
    /// (namespace, `app` label) -> the workload's total GPU demand, SM %.
    demand: HashMap<(String, String), u32>,
    pods: BTreeMap<String, LocalPod>,
    /// What went wrong in the loop, reported by [`Kubelet::check`].
    errors: Vec<String>,
    /// Scenario text last written per node.
    written: Vec<String>,
}

pub struct Kubelet {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    /// Starts the loop on the current runtime; `nodes` exist already.
    pub fn start(client: Client, nodes: Vec<Node>, tree: TestTree) -> Self {
        let state = Arc::new(Mutex::new(State {
            written: vec![String::new(); nodes.len()],
            ..State::default()
        }));
        for n in &nodes {
            write_atomically(&n.scenario, &scenario(&[]));
        }
        let s = state.clone();
        let task = tokio::spawn(async move {
            let tree = tree;
            loop {
                if let Err(e) = sync(&client, &nodes, &tree, &s).await {
                    s.lock().expect("kubelet state").errors.push(e);
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Self { state, task }
    }

    /// Sets workload `namespace`/`app`'s total GPU demand (SM %).
    pub fn set_demand(&self, namespace: &str, app: &str, sm: u32) {
        self.state
            .lock()
            .expect("kubelet state")
            .demand
            .insert((namespace.into(), app.into()), sm);
    }

    /// Running pods of `namespace` with `app=<app>`.
    pub fn running(&self, namespace: &str, app: &str) -> usize {
        self.state
            .lock()
            .expect("kubelet state")
            .pods
            .values()
            .filter(|p| p.namespace == namespace && p.app.as_deref() == Some(app))
            .count()
    }

    /// Every error the loop met so far (for a failure's message).
    pub fn errors(&self) -> Vec<String> {
        self.state.lock().expect("kubelet state").errors.clone()
    }

    /// Panics with the loop's errors, if any (a failed bind or status update is a
    /// broken test, not a scenario result).
    pub fn check(&self) {
        let errors = &self.state.lock().expect("kubelet state").errors;
        // Races with the controllers happen and are retried on the next round: a
        // conflicting write, a pod deleted between the list and the update.
        let real: Vec<_> = errors
            .iter()
            .filter(|e| {
                !e.contains("Conflict") && !e.contains("NotFound") && !e.contains("not found")
            })
            .collect();
        assert!(real.is_empty(), "kubelet stand-in: {real:#?}");
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
        let mut s = self.state.lock().expect("kubelet state");
        for (_, p) in std::mem::take(&mut s.pods) {
            p.stop();
        }
    }
}

fn daemonset_owned(pod: &Pod) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "DaemonSet")
}

/// The node a DaemonSet pod's required node affinity names (`metadata.name`).
fn affinity_node(pod: &Pod) -> Option<String> {
    let terms = &pod
        .spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

async fn sync(
    client: &Client,
    nodes: &[Node],
    tree: &TestTree,
    state: &Mutex<State>,
) -> Result<(), String> {
    let all: Api<Pod> = Api::all(client.clone());
    let pods = all
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list pods: {e}"))?;
    let mut seen = Vec::new();
    for pod in &pods.items {
        let (Some(uid), Some(ns), Some(name)) = (
            pod.metadata.uid.clone(),
            pod.metadata.namespace.clone(),
            pod.metadata.name.clone(),
        ) else {
            continue;
        };
        seen.push(uid.clone());
        let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
        if pod.metadata.deletion_timestamp.is_some() {
            let local = state.lock().expect("kubelet state").pods.remove(&uid);
            if let Some(p) = local {
                p.stop();
            }
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            };
            match api.delete(&name, &dp).await {
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Ok(_) => {}
                Err(e) => return Err(format!("finish deleting {ns}/{name}: {e}")),
            }
            continue;
        }
        let spec = pod.spec.clone().unwrap_or_default();
        let Some(node_name) = spec.node_name.clone() else {
            let target = match affinity_node(pod) {
                Some(n) => n,
                None => {
                    let s = state.lock().expect("kubelet state");
                    let busy = |i: usize| s.pods.values().filter(|p| p.node == i).count();
                    let i = (0..nodes.len()).min_by_key(|&i| busy(i)).expect("nodes");
                    nodes[i].name.clone()
                }
            };
            let binding = json!({"apiVersion": "v1", "kind": "Binding",
                                 "metadata": {"name": name},
                                 "target": {"apiVersion": "v1", "kind": "Node", "name": target}});
            api.create_subresource::<Value, Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await
            .map_err(|e| format!("bind {ns}/{name} to {target}: {e}"))?;
            continue;
        };
        let Some(node) = nodes.iter().position(|n| n.name == node_name) else {
            continue;
        };
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
        if state.lock().expect("kubelet state").pods.contains_key(&uid)
            || matches!(phase.as_deref(), Some("Succeeded" | "Failed"))
        {
            continue;
        }
        let app = pod
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app").cloned());
        let mut local = LocalPod {
            namespace: ns.clone(),
            app,
            node,
            processes: Vec::new(),
            dir: None,
        };
        let mut statuses = Vec::new();
        let ds = daemonset_owned(pod);
        for c in &spec.containers {
            let cid = container_id_of(&format!("{uid}/{}", c.name));
            if !ds {
                let cg = tree.create(&systemd_containerd(&uid, &cid));
                local.dir = cg.dir.parent().map(PathBuf::from);
                let child = process::spawn_in(
                    &cg.dir,
                    Command::new("sleep")
                        .arg("3600")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null()),
                )
                .map_err(|e| format!("start {ns}/{name} {}: {e}", c.name))?;
                local.processes.push(child);
            }
            statuses.push(json!({
                "name": c.name, "ready": true, "started": true, "restartCount": 0,
                "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "containerID": format!("containerd://{cid}"),
                "state": {"running": {}},
            }));
        }
        let pod_ip = if ds {
            nodes[node].ip.to_string()
        } else {
            let k = state.lock().expect("kubelet state").pods.len() % 250 + 2;
            format!("10.214.{}.{k}", node + 1)
        };
        let host_ip = nodes[node].ip.to_string();
        let conditions: Vec<Value> = [
            "PodReadyToStartContainers",
            "Initialized",
            "ContainersReady",
            "Ready",
            "PodScheduled",
        ]
        .iter()
        .map(|t| json!({"type": t, "status": "True"}))
        .collect();
        let status = json!({"status": {
            "phase": "Running", "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
            "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
            "conditions": conditions, "containerStatuses": statuses,
        }});
        let patched = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await;
        if let Err(e) = patched {
            local.stop();
            return Err(format!("report {ns}/{name} running: {e}"));
        }
        state.lock().expect("kubelet state").pods.insert(uid, local);
    }
    let mut s = state.lock().expect("kubelet state");
    let gone: Vec<String> = s
        .pods
        .keys()
        .filter(|u| !seen.contains(u))
        .cloned()
        .collect();
    for uid in gone {
        if let Some(p) = s.pods.remove(&uid) {
            p.stop();
        }
    }
    write_scenarios(nodes, &mut s);
    Ok(())
}

/// Shares each workload's demand over its running pods (equal parts, the
/// remainder to the first by UID) and writes every node's scenario that changed.
fn write_scenarios(nodes: &[Node], s: &mut State) {
    let mut loads: Vec<Vec<(u32, u32)>> = vec![Vec::new(); nodes.len()];
    for ((ns, app), &demand) in &s.demand {
        let pods: Vec<&LocalPod> = s
            .pods
            .values()
            .filter(|p| {
                &p.namespace == ns && p.app.as_ref() == Some(app) && !p.processes.is_empty()
            })
            .collect();
        let Ok(n) = u32::try_from(pods.len()) else {
            continue;
        };
        if n == 0 {
            continue;
        }
        for (i, p) in pods.iter().enumerate() {
            let share = demand / n + u32::from((i as u32) < demand % n);
            loads[p.node].push((p.processes[0].id(), share));
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let text = scenario(&loads[i]);
        if s.written[i] != text {
            write_atomically(&node.scenario, &text);
            s.written[i] = text;
        }
    }
}

/// One GPU running `loads` (pid, SM %); a share over 100 is the scenario's to
/// clamp, as NVML's samples can be.
fn scenario(loads: &[(u32, u32)]) -> String {
    let busy: u32 = loads.iter().map(|l| l.1).sum();
    let mut s = format!(
        "[[gpu]]\nname = \"Fake H100\"\nmemory_total_mib = 81920\nutilization = {}\n\
         memory_utilization = 10\ntemperature_c = 60\npower_w = 300.0\npower_limit_w = 700.0\n",
        busy.min(100)
    );
    for (pid, sm) in loads {
        s.push_str(&format!(
            "\n[[gpu.process]]\npid = {pid}\nsm_util = {}\nmem_util = 5\nused_memory_mib = 1024\n",
            (*sm).min(100)
        ));
    }
    s
}

fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write scenario");
    std::fs::rename(&tmp, path).expect("rename scenario");
}
