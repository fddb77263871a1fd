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
//!   over replicas; or, while the test says the GPUs are lost, a GPU whose every
//!   NVML call answers GPU_IS_LOST (a GPU fallen off the bus);
//! - serves each running pod's vLLM engine on its pod IP (an address of the test's
//!   bridge, so the daemons reach it from their nodes' namespaces, as a pod network
//!   routes to pod IPs): `vllm:num_requests_waiting` is the workload's queue (set by
//!   the test) shared out over its running pods, as requests queue up on replicas.

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
    engine::{FakeEngine, vllm_exposition},
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

/// Where every pod's engine serves its metrics (the ScaledObjects' `metricsPort`).
pub const ENGINE_PORT: u16 = 8000;
/// GPUs per node. A pod's process runs on the node's least busy one (a device
/// plugin would give it one GPU of its own while they last, time-slicing after),
/// so per-process SM never adds up past 100 on one GPU while each pod has its own.
pub const GPUS_PER_NODE: usize = 4;

/// A pod this kubelet runs.
struct LocalPod {
    namespace: String,
    app: Option<String>,
    node: usize,
    /// The GPU of its node its processes run on.
    gpu: usize,
    processes: Vec<Child>,
    /// The pod's cgroup directory (containers below it).
    dir: Option<PathBuf>,
    /// Its vLLM engine's /metrics on the pod IP.
    engine: Option<FakeEngine>,
}

impl LocalPod {
    fn stop(mut self) {
        if let Some(e) = &mut self.engine {
            e.stop();
        }
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
    /// (namespace, `app` label) -> the requests waiting in the workload's engines.
    queue: HashMap<(String, String), u32>,
    /// Pod IPs handed out so far, per node: each pod gets a new one.
    ips: Vec<u32>,
    pods: BTreeMap<String, LocalPod>,
    /// What went wrong in the loop, reported by [`Kubelet::check`].
    errors: Vec<String>,
    /// Scenario text last written per node.
    written: Vec<String>,
    /// Every node's GPU answers GPU_IS_LOST.
    gpus_lost: bool,
}

pub struct Kubelet {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    /// Starts the loop on the current runtime; `nodes` exist already. Pod IPs are
    /// added to `bridge` (the test's, in the host's namespace).
    pub fn start(client: Client, nodes: Vec<Node>, tree: TestTree, bridge: String) -> Self {
        let state = Arc::new(Mutex::new(State {
            written: vec![String::new(); nodes.len()],
            ips: vec![0; nodes.len()],
            ..State::default()
        }));
        for n in &nodes {
            write_atomically(&n.scenario, &scenario(&[], false));
        }
        let s = state.clone();
        let task = tokio::spawn(async move {
            let tree = tree;
            loop {
                if let Err(e) = sync(&client, &nodes, &tree, &bridge, &s).await {
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

    /// Sets the requests waiting in workload `namespace`/`app`'s engines.
    pub fn set_queue(&self, namespace: &str, app: &str, waiting: u32) {
        self.state
            .lock()
            .expect("kubelet state")
            .queue
            .insert((namespace.into(), app.into()), waiting);
    }

    /// Makes every node's GPU lost (each NVML call answers GPU_IS_LOST), or
    /// brings them back; the daemons keep running and see it on their next poll.
    pub fn set_gpus_lost(&self, lost: bool) {
        self.state.lock().expect("kubelet state").gpus_lost = lost;
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
    bridge: &str,
    state: &Mutex<State>,
) -> Result<(), String> {
    let all: Api<Pod> = Api::all(client.clone());
    let pods = all
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list pods: {e}"))?;
    let mut seen = Vec::new();
    // Pods bound to each node, counting those bound this round (not yet
    // started): a scale-up's new pods spread as the scheduler's spreading does.
    let mut bound: Vec<usize> = nodes
        .iter()
        .map(|n| {
            pods.items
                .iter()
                .filter(|p| {
                    p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(n.name.as_str())
                        && !daemonset_owned(p)
                })
                .count()
        })
        .collect();
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
                    let i = (0..nodes.len()).min_by_key(|&i| bound[i]).expect("nodes");
                    bound[i] += 1;
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
            gpu: {
                let s = state.lock().expect("kubelet state");
                let busy = |g: usize| {
                    s.pods
                        .values()
                        .filter(|p| p.node == node && p.gpu == g && !p.processes.is_empty())
                        .count()
                };
                (0..GPUS_PER_NODE).min_by_key(|&g| busy(g)).expect("GPUs")
            },
            processes: Vec::new(),
            dir: None,
            engine: None,
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
            let k = {
                let mut s = state.lock().expect("kubelet state");
                s.ips[node] += 1;
                s.ips[node]
            };
            // Never reused while the test runs (a few dozen pods): a new pod
            // never answers at a gone one's address.
            let ip = Ipv4Addr::new(10, 214, node as u8 + 1, (k % 250 + 1) as u8);
            if let Err(e) = serve_engine(&mut local, ip, bridge) {
                local.stop();
                return Err(format!("{ns}/{name}: {e}"));
            }
            ip.to_string()
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

/// Gives `pod` the address `ip` (on the test's bridge) and an engine serving
/// there, idle until [`write_scenarios`] sets its queue.
fn serve_engine(pod: &mut LocalPod, ip: Ipv4Addr, bridge: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(["addr", "add", &format!("{ip}/32"), "dev", bridge])
        .output()
        .map_err(|e| format!("ip addr add {ip}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip addr add {ip}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let addr = std::net::SocketAddr::from((ip, ENGINE_PORT));
    pod.engine = Some(FakeEngine::start(addr, &vllm_exposition(&[(0, 0, 0.0)])));
    Ok(())
}

/// The running pods (with processes) of workload `ns`/`app`, by UID: the order
/// the shares are handed out in.
fn running<'a>(s: &'a State, ns: &str, app: &str) -> Vec<&'a LocalPod> {
    s.pods
        .values()
        .filter(|p| p.namespace == ns && p.app.as_deref() == Some(app) && !p.processes.is_empty())
        .collect()
}

/// Shares `total` over `n` parts: equal, the remainder to the first ones.
fn share(total: u32, n: u32, i: u32) -> u32 {
    total / n + u32::from(i < total % n)
}

/// Shares each workload's demand over its running pods (equal parts, the
/// remainder to the first by UID) and writes every node's scenario that changed;
/// shares each workload's queue the same way over its pods' engines.
fn write_scenarios(nodes: &[Node], s: &mut State) {
    for ((ns, app), &waiting) in &s.queue {
        let pods = running(s, ns, app);
        let n = pods.len() as u32;
        for (i, p) in pods.iter().enumerate() {
            if let Some(e) = &p.engine {
                // One data-parallel engine per pod, 4 running, KV cache at 40 %.
                e.set(&vllm_exposition(&[(share(waiting, n, i as u32), 4, 0.4)]));
            }
        }
    }
    let mut loads: Vec<Vec<Load>> = vec![Vec::new(); nodes.len()];
    for ((ns, app), &demand) in &s.demand {
        let pods = running(s, ns, app);
        let n = pods.len() as u32;
        for (i, p) in pods.iter().enumerate() {
            loads[p.node].push(Load {
                gpu: p.gpu,
                pid: p.processes[0].id(),
                sm: share(demand, n, i as u32),
            });
        }
    }
    for (i, node) in nodes.iter().enumerate() {
        let text = scenario(&loads[i], s.gpus_lost);
        if s.written[i] != text {
            write_atomically(&node.scenario, &text);
            s.written[i] = text;
        }
    }
}

/// One process's GPU use in a node's scenario.
#[derive(Clone, Copy)]
struct Load {
    gpu: usize,
    pid: u32,
    /// SM %; a share over 100 is the scenario's to clamp, as NVML's samples can be.
    sm: u32,
}

/// A node's [`GPUS_PER_NODE`] GPUs running `loads`. `lost`: every NVML call
/// about them fails.
fn scenario(loads: &[Load], lost: bool) -> String {
    let mut s = String::new();
    for gpu in 0..GPUS_PER_NODE {
        let here: Vec<&Load> = loads.iter().filter(|l| l.gpu == gpu).collect();
        let busy: u32 = here.iter().map(|l| l.sm.min(100)).sum();
        s.push_str(&format!(
            "[[gpu]]\nname = \"Fake H100\"\nmemory_total_mib = 81920\nutilization = {}\n\
             memory_utilization = 10\ntemperature_c = 60\npower_w = 300.0\npower_limit_w = 700.0\n",
            busy.min(100)
        ));
        if lost {
            s.push_str("\n[gpu.errors]\nall = \"GPU_IS_LOST\"\n");
        }
        for l in here {
            s.push_str(&format!(
                "\n[[gpu.process]]\npid = {}\nsm_util = {}\nmem_util = 5\nused_memory_mib = 1024\n",
                l.pid,
                l.sm.min(100)
            ));
        }
        s.push('\n');
    }
    s
}

fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write scenario");
    std::fs::rename(&tmp, path).expect("rename scenario");
}
