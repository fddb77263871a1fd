//! gpu-scaler under the real control plane (issue 15), as root on the real kernel:
//! etcd, kube-apiserver (RBAC, ServiceAccount tokens, the aggregation layer),
//! kube-controller-manager (the real HPA, Deployment, ReplicaSet, DaemonSet,
//! EndpointSlice and Job controllers) and KEDA's operator and metrics server, all
//! built by `cargo xtask e2e` from their Go modules and run as processes. KEDA's CRDs
//! and gpu-scaler's rendered chart are server-side applied; three `gpu-scaler serve`
//! processes, one per node in a network namespace of its own, run with the chart's
//! environment and a token of the chart's ServiceAccount (so a permission the chart
//! lacks fails here); a kubelet stand-in (kubelet.rs) runs the pods as real
//! processes in kubelet-layout cgroups and feeds their GPU load through the mock
//! scenario files.
//!
//! Every assertion reads what a user reads with kubectl: a Deployment's replicas,
//! the HPA's status, a ScaledObject's conditions, events, Jobs.
//!
//! Run with `cargo xtask e2e` (this target has `test = false`: `cargo test
//! --workspace` does not build the control plane). The scenarios run in order on
//! one cluster: starting the control plane costs most of a minute. The target has
//! no libtest harness (`harness = false`): its `main` runs the scenarios (those
//! whose name contains the first argument, or GPU_SCALER_E2E_ONLY, if given), or,
//! with `demo ...`, the demo of `cargo xtask run --kubernetes` (demo.rs).

mod certs;
mod control_plane;
mod demo;
mod kubelet;
mod network;
mod process;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use gpu_scaler_tests::{cgroup::TestTree, kernel, serve::http_get, workspace_bin};
use k8s_openapi::api::{
    apps::v1::Deployment, autoscaling::v2::HorizontalPodAutoscaler, core::v1::Pod,
};
use kube::{
    Client,
    api::{Api, DynamicObject, ListParams, PostParams},
    core::{ApiResource, GroupVersionKind},
};
use serde_json::{Value, json};

use control_plane::{Auth, ControlPlane, Inputs, write_kubeconfig};
use kubelet::{Kubelet, Node};
use network::{Netns, Network};
use process::Proc;

/// The chart's release namespace (`cargo xtask e2e` renders it there).
const DAEMON_NS: &str = "gpu-scaler";
/// The chart's names for release `gpu-scaler`.
const SERVICE_ACCOUNT: &str = "gpu-scaler";
const DAEMONSET: &str = "gpu-scaler";
const NODES: [&str; 3] = ["gpu-node-a", "gpu-node-b", "gpu-node-c"];
/// The chart's ports (values.yaml `ports`): every daemon has its own address.
const SCALER_PORT: u16 = 6000;
/// The chart's scaler Service, as the README's ScaledObjects name it; a DNS name
/// of the chart's scaler certificate.
const SCALER_SERVICE: &str = "gpu-scaler.gpu-scaler.svc";
/// The chart's ClusterTriggerAuthentication: KEDA's client certificate (the name
/// the daemons pin) and the CA that signed theirs.
const TRIGGER_AUTH: &str = "gpu-scaler";
/// The chart's Secret of KEDA's client certificate, in KEDA's namespace.
const KEDA_CLIENT_SECRET: (&str, &str) = ("keda", "gpu-scaler-keda-client");
const METRICS_PORT: u16 = 9090;
/// How long the real controllers may take to converge on a new state (KEDA's
/// polling, the HPA's 2 s loop, the ReplicaSet controller, the kubelet stand-in).
const CONVERGE: Duration = Duration::from_secs(120);

fn scaled_objects() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    )
}

/// The test's world. Fields drop in order: daemons, then the kubelet (and the
/// pods' processes and cgroups), then the control plane, then the runtime.
struct Cluster {
    daemons: Vec<Option<Proc>>,
    kubelet: Kubelet,
    cp: ControlPlane,
    nodes: Vec<(Node, Netns)>,
    /// The chart's environment for the daemon, per node (its secret volumes'
    /// paths pointing at the test's copies).
    daemon_env: Vec<Vec<(String, String)>>,
    /// KEDA's client credentials from the chart (CA, certificate, key: PEM), for
    /// the test's own calls to the daemons.
    keda_client: [String; 3],
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

/// What the machine must offer; a skip (or, under GPU_SCALER_REQUIRE_KERNEL=1, a
/// failure) names what is missing.
fn kernel_ready() -> Option<Network> {
    if !kernel::require("root", kernel::probe_root())
        || !kernel::require("cgroup v2", TestTree::new("probe").map(drop))
    {
        return None;
    }
    match Network::create() {
        Ok(n) => Some(n),
        Err(e) => {
            kernel::require::<String>("network namespaces, veth and bridge links", Err(e));
            None
        }
    }
}

impl Cluster {
    fn start(net: Network) -> Self {
        let inputs = Inputs::from_env();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let started = Instant::now();
        let mut cp = rt.block_on(ControlPlane::start(&inputs, net, dir.path()));
        eprintln!(
            "e2e: API server ready after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        rt.block_on(cp.start_keda(&inputs));
        eprintln!(
            "e2e: KEDA serving external.metrics.k8s.io after {:.1} s",
            started.elapsed().as_secs_f64()
        );

        // The cluster gpu-scaler's chart expects: its namespace, the NVIDIA
        // runtime class its DaemonSet names, GPU nodes.
        let chart = inputs.objects("chart.json");
        rt.block_on(async {
            cp.apply(&json!({"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": DAEMON_NS, "labels": {
                                 "pod-security.kubernetes.io/enforce": "privileged"}}}))
                .await;
            cp.apply(
                &json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                             "metadata": {"name": "nvidia"}, "handler": "nvidia"}),
            )
            .await;
            cp.apply_all(&chart).await;
        });
        let mut nodes = Vec::new();
        for (i, name) in NODES.iter().enumerate() {
            let ns = cp
                .net
                .namespace(&format!("n{i}"), 11 + i as u8)
                .expect("a node's network namespace");
            let node = Node {
                name: (*name).to_owned(),
                ip: ns.ip,
                scenario: dir.path().join(format!("{name}.toml")),
            };
            rt.block_on(register_node(&cp.admin, &node));
            nodes.push((node, ns));
        }
        let ips: Vec<_> = nodes.iter().map(|(n, _)| n.ip).collect();
        cp.set_service_addresses(SCALER_SERVICE, &ips);
        let mounts = rt.block_on(mount_secrets(
            &cp.admin,
            &chart,
            &dir.path().join("secrets"),
        ));
        let keda_client = rt.block_on(secret_files(&cp.admin, KEDA_CLIENT_SECRET));
        let pem = |k: &str| {
            String::from_utf8(keda_client.get(k).cloned().unwrap_or_default())
                .unwrap_or_else(|_| panic!("{k} of the KEDA client Secret is PEM text"))
        };
        let keda_client = [pem("ca.crt"), pem("tls.crt"), pem("tls.key")];
        let tree = TestTree::new("e2e").expect("cgroup tree");
        let kubelet = rt.block_on(async {
            Kubelet::start(
                cp.admin.clone(),
                nodes.iter().map(|(n, _)| n.clone()).collect(),
                tree,
                cp.net.bridge().to_owned(),
            )
        });
        let daemon_env = nodes
            .iter()
            .map(|(n, _)| {
                chart_env(&chart, &n.name)
                    .into_iter()
                    .map(|(k, v)| {
                        let v = mounts
                            .iter()
                            .find_map(|(at, local)| {
                                let rest = v.strip_prefix(at.as_str())?;
                                Some(format!("{}{rest}", local.display()))
                            })
                            .unwrap_or(v);
                        (k, v)
                    })
                    .collect()
            })
            .collect();
        let mut c = Self {
            daemons: nodes.iter().map(|_| None).collect(),
            kubelet,
            cp,
            nodes,
            daemon_env,
            keda_client,
            rt,
            _dir: dir,
        };
        c.start_daemons(&[0, 1, 2]);
        eprintln!(
            "e2e: cluster up after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        c
    }

    /// Starts node `i`'s `gpu-scaler serve` in the node's namespace with the
    /// chart's environment and a ServiceAccount token bound to the node's
    /// DaemonSet pod (as the kubelet projects it), and waits for /readyz.
    fn start_daemons(&mut self, which: &[usize]) {
        for &i in which {
            let node = self.nodes[i].0.clone();
            let pod = self.rt.block_on(self.daemon_pod(&node.name));
            let token = self.rt.block_on(self.token_for(&pod));
            let kubeconfig = self.cp.dir.join(format!("{}.kubeconfig", node.name));
            write_kubeconfig(
                &kubeconfig,
                &self.cp.server,
                &self.cp.pki.ca,
                Auth::Token(&token),
            );
            let mut env: Vec<(&str, String)> = self.daemon_env[i]
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            // What differs from a pod: the mock GPU (no GPU here) and how the
            // token reaches the daemon (a kubeconfig, not the projected volume).
            env.retain(|(k, _)| !["GPU_SCALER_GPU", "GPU_SCALER_GPU_SCENARIO"].contains(k));
            env.extend([
                ("GPU_SCALER_GPU", "mock".to_owned()),
                (
                    "GPU_SCALER_GPU_SCENARIO",
                    node.scenario.display().to_string(),
                ),
                ("GPU_SCALER_KUBECONFIG", kubeconfig.display().to_string()),
                ("NO_COLOR", "1".to_owned()),
            ]);
            self.daemons[i] = Some(Proc::spawn(
                &format!("gpu-scaler-{}", node.name),
                &workspace_bin("gpu-scaler"),
                ["serve"],
                &env,
                Some(&self.nodes[i].1),
                &self.cp.logs,
            ));
        }
        for &i in which {
            let http = SocketAddr::new(IpAddr::V4(self.nodes[i].0.ip), METRICS_PORT);
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                self.daemons[i].as_mut().expect("started").assert_running();
                if http_get(http, "/readyz").is_some_and(|(code, _)| code == 200) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "gpu-scaler on {} not ready within 60 s:\n{}",
                    self.nodes[i].0.name,
                    self.daemons[i].as_ref().expect("started").tail(30)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    fn kill_daemon(&mut self, i: usize) {
        self.daemons[i].take().expect("running").kill();
    }

    /// The Running DaemonSet pod the kubelet stand-in runs on `node`.
    async fn daemon_pod(&self, node: &str) -> Pod {
        let pods: Api<Pod> = Api::namespaced(self.cp.admin.clone(), DAEMON_NS);
        let lp = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let deadline = Instant::now() + CONVERGE;
        loop {
            let list = pods.list(&lp).await.expect("list daemon pods");
            if let Some(p) = list.items.into_iter().find(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && p.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.starts_with(DAEMONSET))
            }) {
                return p;
            }
            self.kubelet.check();
            if Instant::now() > deadline {
                let all = pods.list(&ListParams::default()).await.expect("list pods");
                let seen: Vec<_> = all
                    .items
                    .iter()
                    .map(|p| {
                        (
                            p.metadata.name.clone(),
                            p.spec.as_ref().and_then(|s| s.node_name.clone()),
                            p.status.as_ref().and_then(|s| s.phase.clone()),
                        )
                    })
                    .collect();
                panic!(
                    "no Running {DAEMONSET} pod on {node}; pods {seen:?}; kubelet errors {:?}; \
                     DaemonSet events {:?}",
                    self.kubelet.errors(),
                    events(&self.cp.admin, DAEMON_NS, "DaemonSet", DAEMONSET).await
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// A token of the chart's ServiceAccount bound to `pod`, from the TokenRequest
    /// API as the kubelet gets it.
    async fn token_for(&self, pod: &Pod) -> String {
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.cp.admin.clone(), DAEMON_NS);
        let request = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"audiences": [], "expirationSeconds": 3600,
                     "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                                        "name": pod.metadata.name, "uid": pod.metadata.uid}},
        });
        let answer: Value = sa
            .create_subresource("token", SERVICE_ACCOUNT, &PostParams::default(), &request)
            .await
            .expect("TokenRequest for the chart's ServiceAccount");
        answer["status"]["token"]
            .as_str()
            .expect("a token in the TokenRequest status")
            .to_owned()
    }

    /// What a trigger's `scalerAddress` names: the chart's Service, by the name
    /// its certificate carries (KEDA checks it), resolved for KEDA's operator to
    /// every node's daemon.
    fn scaler_address(&self) -> String {
        format!("{SCALER_SERVICE}:{SCALER_PORT}")
    }

    fn apply(&mut self, object: Value) {
        let cp = &mut self.cp;
        self.rt.block_on(cp.apply(&object));
    }

    fn replicas(&self, ns: &str, name: &str) -> (i32, i32) {
        let api: Api<Deployment> = Api::namespaced(self.cp.admin.clone(), ns);
        let d = self.rt.block_on(api.get(name)).expect("get deployment");
        let spec = d.spec.and_then(|s| s.replicas).unwrap_or(1);
        let ready = d.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        (spec, ready)
    }

    /// The HPA KEDA made for ScaledObject `so`: (desired replicas, the external
    /// metric's current value as the HPA read it).
    fn hpa(&self, ns: &str, so: &str) -> Option<(i32, Option<String>)> {
        let api: Api<HorizontalPodAutoscaler> = Api::namespaced(self.cp.admin.clone(), ns);
        let h = self
            .rt
            .block_on(api.get_opt(&format!("keda-hpa-{so}")))
            .ok()??;
        let status = h.status?;
        let value = status.current_metrics.iter().flatten().find_map(|m| {
            let cur = &m.external.as_ref()?.current;
            cur.average_value
                .as_ref()
                .or(cur.value.as_ref())
                .map(|q| q.0.clone())
        });
        Some((status.desired_replicas, value))
    }

    fn scaled_object(&self, ns: &str, name: &str) -> DynamicObject {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.cp.admin.clone(), ns, &scaled_objects());
        self.rt.block_on(api.get(name)).expect("get ScaledObject")
    }

    /// Events about `kind` `name` in `ns`: (reason, message).
    fn events(&self, ns: &str, kind: &str, name: &str) -> Vec<(String, String)> {
        self.rt.block_on(events(&self.cp.admin, ns, kind, name))
    }

    /// Waits until `ns/name` has `want` replicas, all ready, and panics with
    /// what the HPA and KEDA said otherwise.
    #[track_caller]
    fn wait_replicas(&mut self, ns: &str, name: &str, so: &str, want: i32) {
        let deadline = Instant::now() + CONVERGE;
        let started = Instant::now();
        loop {
            self.check();
            let (spec, ready) = self.replicas(ns, name);
            if spec == want && ready == want {
                eprintln!(
                    "e2e: {ns}/{name} at {want} replicas after {:.1} s (HPA: {:?})",
                    started.elapsed().as_secs_f64(),
                    self.hpa(ns, so)
                );
                return;
            }
            if Instant::now() > deadline {
                let so_status = self.scaled_object(ns, so).data["status"].clone();
                panic!(
                    "{ns}/{name}: want {want} replicas, have {spec} ({ready} ready) after {CONVERGE:?}\n\
                     HPA: {:?}\nScaledObject status: {so_status}\nevents: {:?}",
                    self.hpa(ns, so),
                    self.events(ns, "ScaledObject", so)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Asserts `ns/name` keeps `want` replicas for `hold`: where the HPA settles.
    #[track_caller]
    fn holds_replicas(&mut self, ns: &str, name: &str, want: i32, hold: Duration) {
        let until = Instant::now() + hold;
        while Instant::now() < until {
            self.check();
            let (spec, _) = self.replicas(ns, name);
            assert_eq!(spec, want, "{ns}/{name} moved off {want} replicas");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn check(&mut self) {
        self.kubelet.check();
        for d in self.daemons.iter_mut().flatten() {
            d.assert_running();
        }
        for p in [&mut self.cp.keda_operator, &mut self.cp.keda_adapter]
            .into_iter()
            .flatten()
        {
            p.assert_running();
        }
        self.cp.controller_manager.assert_running();
        self.cp.apiserver.assert_running();
    }

    /// Lines of the daemons' logs that report a Kubernetes API refusal (RBAC).
    fn forbidden_in_daemon_logs(&self) -> Vec<String> {
        self.daemons
            .iter()
            .flatten()
            .flat_map(|d| {
                d.log_text()
                    .lines()
                    .filter(|l| l.to_lowercase().contains("forbidden"))
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Events about `kind` `name` in `ns`: (reason, message).
async fn events(admin: &Client, ns: &str, kind: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(admin.clone(), ns);
    let lp = ListParams::default().fields(&format!(
        "involvedObject.kind={kind},involvedObject.name={name}"
    ));
    api.list(&lp)
        .await
        .expect("list events")
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// A Node object for `node`, Ready, with the GPU label the chart's DaemonSet
/// selects.
async fn register_node(admin: &Client, node: &Node) {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    let obj: k8s_openapi::api::core::v1::Node = serde_json::from_value(json!({
        "metadata": {"name": node.name, "labels": {
            "kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux",
            "nvidia.com/gpu.present": "true"}},
    }))
    .expect("node object");
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create node");
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": node.ip.to_string()},
                      {"type": "Hostname", "address": node.name}],
        "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110",
                     "nvidia.com/gpu": kubelet::GPUS_PER_NODE.to_string()},
        "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110",
                        "nvidia.com/gpu": kubelet::GPUS_PER_NODE.to_string()},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "message": "kubelet stand-in of the e2e test"}],
    }});
    api.patch_status(
        &node.name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .expect("node status");
    // The TaintNodesByCondition admission plugin taints a new node
    // not-ready:NoSchedule until the node lifecycle controller (off here, see
    // control_plane.rs) sees it Ready; a DaemonSet does not tolerate that taint.
    api.patch(
        &node.name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&json!({"spec": {"taints": null}})),
    )
    .await
    .expect("untaint node");
}

/// A Secret's data: file name -> bytes.
async fn secret_files(
    admin: &Client,
    (ns, name): (&str, &str),
) -> std::collections::BTreeMap<String, Vec<u8>> {
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), ns);
    let secret = api
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("Secret {ns}/{name}: {e}"));
    secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect()
}

/// What the kubelet does for the chart's DaemonSet's secret volumes: each
/// Secret's keys as files (mode 0400, the chart's `defaultMode`) in a directory
/// of `root`. Returns (the container's mount path, that directory) per volume.
async fn mount_secrets(admin: &Client, chart: &[Value], root: &Path) -> Vec<(String, PathBuf)> {
    use std::os::unix::fs::PermissionsExt as _;
    let ds = chart
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("the chart has a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    let mut mounts = Vec::new();
    for m in pod["containers"][0]["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == m["name"])
            .expect("every volumeMount names a volume");
        let Some(secret) = volume["secret"]["secretName"].as_str() else {
            continue;
        };
        let dir = root.join(secret);
        std::fs::create_dir_all(&dir).expect("secret volume directory");
        for (file, bytes) in secret_files(admin, (DAEMON_NS, secret)).await {
            let path = dir.join(&file);
            std::fs::write(&path, bytes).expect("secret volume file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400))
                .expect("secret file mode");
        }
        let at = m["mountPath"].as_str().expect("mountPath").to_owned();
        mounts.push((at, dir));
    }
    assert!(
        !mounts.is_empty(),
        "the chart mounts its TLS Secrets into the daemon"
    );
    mounts
}

/// The environment the chart's DaemonSet gives its container on `node`: literal
/// values as they are, the downward API's `spec.nodeName` and
/// `metadata.namespace` resolved as the kubelet resolves them.
fn chart_env(chart: &[Value], node: &str) -> Vec<(String, String)> {
    let ds = chart
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("the chart has a DaemonSet");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["args"],
        json!(["serve"]),
        "the chart runs `gpu-scaler serve` with its settings in the environment"
    );
    container["env"]
        .as_array()
        .expect("container env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("spec.nodeName") => node.to_owned(),
                    Some("metadata.namespace") => DAEMON_NS.to_owned(),
                    other => panic!("env {name}: valueFrom {other:?} not resolved by the test"),
                }
            };
            (name, value)
        })
        .collect()
}

fn deployment(ns: &str, name: &str, app: &str, replicas: i32) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"replicas": replicas,
                    "selector": {"matchLabels": {"app": app}},
                    "template": {"metadata": {"labels": {"app": app}},
                                 "spec": {"containers": [{"name": "main", "image": "registry.example/llm:1"}]}}}})
}

/// `trigger` with the chart's ClusterTriggerAuthentication, as the README's
/// ScaledObjects have it: KEDA dials gpu-scaler over mTLS.
fn authenticated(mut trigger: Value) -> Value {
    trigger["authenticationRef"] =
        json!({"name": TRIGGER_AUTH, "kind": "ClusterTriggerAuthentication"});
    trigger
}

/// A ScaledObject for Deployment `target` whose HPA reacts at once (no
/// stabilization window: the scenarios move demand in steps); its trigger
/// authenticated ([`authenticated`]).
fn scaled_object(ns: &str, name: &str, target: &str, trigger: Value, extra: Value) -> Value {
    let trigger = authenticated(trigger);
    let fast = json!({"stabilizationWindowSeconds": 0,
                      "policies": [{"type": "Pods", "value": 10, "periodSeconds": 1}]});
    let mut so = json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
           "metadata": {"name": name, "namespace": ns},
           "spec": {"scaleTargetRef": {"name": target},
                    "pollingInterval": 2,
                    "cooldownPeriod": 5,
                    "minReplicaCount": 1,
                    "maxReplicaCount": 6,
                    "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                        "scaleUp": fast, "scaleDown": fast}}},
                    "triggers": [trigger]}});
    if let (Some(spec), Some(extra)) = (so["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    so
}

/// One scenario, run on the shared cluster.
type Scenario = fn(&mut Cluster);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "demo") {
        let options = demo::Options::parse(&args[1..]).unwrap_or_else(|e| {
            eprintln!("cargo xtask run --kubernetes: {e}");
            std::process::exit(2)
        });
        let Some(net) = kernel_ready() else {
            eprintln!("cargo xtask run --kubernetes: this machine cannot run the cluster");
            std::process::exit(1)
        };
        let mut c = Cluster::start(net);
        demo::run(&mut c, &options, &mut demo::print);
        return;
    }
    gpu_scaler_under_real_kubernetes_and_keda(args.first().cloned());
}

/// Every scenario, or those whose name contains `only`, on one cluster.
fn gpu_scaler_under_real_kubernetes_and_keda(only: Option<String>) {
    let Some(net) = kernel_ready() else {
        return;
    };
    let mut c = Cluster::start(net);
    let scenarios: [(&str, Scenario); 9] = [
        (
            "external: 1 -> 3 -> 1, other namespace never counted",
            scale_up_and_down,
        ),
        (
            "external-push: 0 -> 1 -> 2 from activation",
            push_activates_from_zero,
        ),
        ("ScaledJob creates Jobs", scaled_job_creates_jobs),
        (
            "engine: vllm_queue_depth summed across nodes",
            engine_queue_across_nodes,
        ),
        (
            "demo: `cargo xtask run --kubernetes`'s loop under the real HPA",
            demo_follows_the_real_hpa,
        ),
        (
            "GPUs unreadable: KEDA's fallback replicas",
            fallback_when_gpus_are_unreadable,
        ),
        (
            "every daemon killed: replicas hold (keda#8056)",
            every_daemon_killed_holds_replicas,
        ),
        (
            "bad metadata shows on the ScaledObject",
            bad_metadata_is_visible,
        ),
        // Last: every daemon's log, restarts included.
        (
            "RBAC: the chart's ServiceAccount was never refused",
            no_rbac_refusals,
        ),
    ];
    let only = only.or_else(|| std::env::var("GPU_SCALER_E2E_ONLY").ok());
    let mut ran = 0;
    let total = Instant::now();
    for (name, run) in scenarios {
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let t = Instant::now();
        eprintln!("e2e: scenario: {name}");
        run(&mut c);
        ran += 1;
        eprintln!("e2e: passed in {:.1} s: {name}", t.elapsed().as_secs_f64());
    }
    assert!(ran > 0, "no scenario's name contains {only:?}");
    eprintln!(
        "e2e: {ran} scenarios passed in {:.0} s",
        total.elapsed().as_secs_f64()
    );
}

fn condition(so: &DynamicObject, kind: &str) -> Option<(String, String)> {
    so.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

/// `external`, scaleTargetRef without podSelector: 1 -> 3 -> 1 under the real
/// HPA. Demand 150 SM % shared by the replicas; targetValue 50 per replica:
/// AverageValue, desired = ceil(150 / 50) = 3 (one pod alone reads 100, its share
/// clamped: 2; then 75 + 75: 3; then 50 x 3: stays). Meanwhile other/llm, same
/// labels, its own ScaledObject and no demand, never counts ml's pods.
fn scale_up_and_down(c: &mut Cluster) {
    let scaler = c.scaler_address();
    for ns in ["ml", "other"] {
        c.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}));
        c.apply(deployment(ns, "llm", "llm", 1));
        c.apply(scaled_object(
            ns,
            "llm",
            "llm",
            json!({"type": "external", "metadata": {"scalerAddress": scaler, "targetValue": "50"}}),
            json!({}),
        ));
    }
    c.wait_replicas("ml", "llm", "llm", 1);
    c.kubelet.set_demand("ml", "llm", 150);
    c.wait_replicas("ml", "llm", "llm", 3);
    c.holds_replicas("ml", "llm", 3, Duration::from_secs(10));
    // The HPA reports an AverageValue metric per replica: 150 / 3.
    let (desired, value) = c.hpa("ml", "llm").expect("ml HPA status");
    assert_eq!(
        (desired, value.as_deref()),
        (3, Some("50")),
        "HPA's reading"
    );
    let (desired, value) = c.hpa("other", "llm").expect("other HPA status");
    assert_eq!(
        (desired, value.as_deref()),
        (1, Some("0")),
        "other/llm never counts ml's pods"
    );
    assert_eq!(c.replicas("other", "llm"), (1, 1));
    c.kubelet.set_demand("ml", "llm", 30);
    c.wait_replicas("ml", "llm", "llm", 1);
    // The ReplicaSet controller deletes the surplus pods; the kubelet stand-in
    // stops their processes and finishes the deletion.
    let stopped = gpu_scaler_tests::wait_for(Duration::from_secs(30), || {
        (c.kubelet.running("ml", "llm") == 1).then_some(())
    });
    assert!(stopped.is_some(), "scaled-down pods still running");
    let so = c.scaled_object("ml", "llm");
    assert_eq!(
        condition(&so, "Ready").map(|c| c.0).as_deref(),
        Some("True"),
        "ScaledObject ml/llm Ready: {}",
        so.data["status"]
    );
}

/// A metadata value gpu-scaler refuses reaches the user through KEDA: an event
/// on the ScaledObject with gpu-scaler's own message, and no replicas change.
///
/// Real KEDA v2.21 drops GetMetricSpec errors (the ScaledObject would only say
/// "no metric specs returned from scalers", Ready=False), so gpu-scaler answers
/// GetMetricSpec for refused metadata (issue 12) and the refusal comes from
/// GetMetrics and IsActive, which KEDA records as events (it failed here before
/// issue 12).
fn bad_metadata_is_visible(c: &mut Cluster) {
    let scaler = c.scaler_address();
    c.apply(deployment("ml", "bad", "bad", 1));
    c.apply(scaled_object(
        "ml",
        "bad",
        "bad",
        json!({"type": "external", "metadata": {"scalerAddress": scaler, "metric": "tensor_cores"}}),
        json!({}),
    ));
    const MESSAGE: &str = "metadata metric: \"tensor_cores\" is not allowed";
    let deadline = Instant::now() + CONVERGE;
    loop {
        c.check();
        let events = c.events("ml", "ScaledObject", "bad");
        if let Some((reason, message)) = events.iter().find(|(_, m)| m.contains(MESSAGE)) {
            eprintln!("e2e: ml/bad event {reason}: {message}");
            break;
        }
        let so = c.scaled_object("ml", "bad");
        if let Some((status, message)) = condition(&so, "Ready")
            && message.contains(MESSAGE)
        {
            eprintln!("e2e: ml/bad Ready={status}: {message}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gpu-scaler's refusal never reached ScaledObject ml/bad: events {events:?}, status {}",
            so.data["status"]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A refused query scales nothing: the Deployment stays at its 1.
    c.wait_replicas("ml", "bad", "bad", 1);
    c.holds_replicas("ml", "bad", 1, Duration::from_secs(6));
}

/// `external-push` with minReplicaCount 0: the worker scales on its frontend's
/// GPU use (podSelector), so it can start from zero. No demand: 0 replicas; 80 %:
/// the stream says active, KEDA scales 0 -> 1 and the HPA then to ceil(80 / 50) = 2.
fn push_activates_from_zero(c: &mut Cluster) {
    let scaler = c.scaler_address();
    c.apply(deployment("ml", "frontend", "frontend", 1));
    c.apply(deployment("ml", "worker", "worker", 1));
    c.apply(scaled_object(
        "ml",
        "worker",
        "worker",
        json!({"type": "external-push", "metadata": {
            "scalerAddress": scaler, "podSelector": "app=frontend",
            "targetValue": "50", "activationThreshold": "5"}}),
        json!({"minReplicaCount": 0}),
    ));
    c.wait_replicas("ml", "worker", "worker", 0);
    c.kubelet.set_demand("ml", "frontend", 80);
    c.wait_replicas("ml", "worker", "worker", 2);
    let so = c.scaled_object("ml", "worker");
    assert_eq!(
        condition(&so, "Active").map(|c| c.0).as_deref(),
        Some("True"),
        "{}",
        so.data["status"]
    );
    c.kubelet.set_demand("ml", "frontend", 0);
    c.wait_replicas("ml", "worker", "worker", 0);
}

/// `metric: vllm_queue_depth`: the requests waiting in the workload's vLLM
/// engines, read by the daemons at each pod's IP and summed across the nodes
/// its replicas land on. 9 waiting with `targetValue: 2`: ceil(9 / 2) = 5
/// replicas (the queue does not shrink as replicas are added: it is the
/// clients' backlog), the HPA reading 9 / 5 = 1.8 per replica; an empty queue
/// takes it back to 1.
fn engine_queue_across_nodes(c: &mut Cluster) {
    let scaler = c.scaler_address();
    c.apply(deployment("ml", "chat", "chat", 1));
    c.apply(scaled_object(
        "ml",
        "chat",
        "chat",
        json!({"type": "external", "metadata": {
            "scalerAddress": scaler, "metric": "vllm_queue_depth", "targetValue": "2",
            "metricsPort": kubelet::ENGINE_PORT.to_string()}}),
        json!({}),
    ));
    c.wait_replicas("ml", "chat", "chat", 1);
    c.kubelet.set_queue("ml", "chat", 9);
    c.wait_replicas("ml", "chat", "chat", 5);
    c.holds_replicas("ml", "chat", 5, Duration::from_secs(10));
    let (desired, value) = c.hpa("ml", "chat").expect("ml/chat HPA status");
    assert_eq!(
        (desired, value.as_deref()),
        (5, Some("1800m")),
        "HPA's reading of the summed queue"
    );
    let pods: Api<Pod> = Api::namespaced(c.cp.admin.clone(), "ml");
    let list =
        c.rt.block_on(pods.list(&ListParams::default().labels("app=chat")))
            .expect("list chat pods");
    let nodes: std::collections::BTreeSet<_> = list
        .items
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    assert!(
        nodes.len() > 1,
        "the replicas span nodes, so the sum is cluster-wide: {nodes:?}"
    );
    c.kubelet.set_queue("ml", "chat", 0);
    c.wait_replicas("ml", "chat", "chat", 1);
}

/// The demo of `cargo xtask run --kubernetes`, as `--json --duration 70
/// --demand 0:40` runs it: 40 requests in flight are more than 7 replicas' batches
/// hold at the GPU target (each replica at 90 % SM with a full batch of 8: 450 %
/// in all, ceil(450 / 60) = 8), so the real HPA takes the Deployment from 1 to its
/// maximum, 7, where the demo's lines show the daemons' figures for every
/// replica; then the demo's objects are deleted.
fn demo_follows_the_real_hpa(c: &mut Cluster) {
    let options = demo::Options::parse(&["--json", "--duration", "70", "--demand", "0:40"])
        .expect("demo options");
    let mut lines = Vec::new();
    demo::run(c, &options, &mut |l| lines.push(l));
    let frames: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let last = frames.last().expect("the demo refreshed");
    eprintln!("e2e: demo's last line: {last}");
    assert_eq!(
        (last["replicas"].as_i64(), last["ready"].as_i64()),
        (Some(7), Some(7)),
        "the HPA took demo/vllm to its maximum: {last}"
    );
    let value = last["value"].as_f64().expect("GetMetrics answered");
    assert!(
        (value / 60.0).ceil() >= 7.0,
        "the value asks for the maximum: {value}"
    );
    let measured: Vec<f64> = last["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p["measured_sm"].as_f64())
        .collect();
    assert_eq!(measured.len(), 7, "each replica measured: {last}");
    assert!(
        (measured.iter().sum::<f64>() - value).abs() < 1.0,
        "the value is the sum of what the daemons measured: {measured:?} vs {value}"
    );
    let grew = frames
        .windows(2)
        .all(|w| w[1]["replicas"].as_i64() >= w[0]["replicas"].as_i64());
    assert!(grew, "replicas only grew under a rising load");
    c.rt.block_on(async {
        let d: Api<Deployment> = Api::namespaced(c.cp.admin.clone(), "demo");
        d.delete("vllm", &Default::default())
            .await
            .expect("delete demo/vllm");
        let so: Api<DynamicObject> =
            Api::namespaced_with(c.cp.admin.clone(), "demo", &scaled_objects());
        so.delete("vllm", &Default::default())
            .await
            .expect("delete the demo's ScaledObject");
    });
}

/// A ScaledJob on a queue workload's GPU use: 150 % (over its two pods) with
/// targetValue 50 is three Jobs (KEDA's default strategy: ceil(value / target) minus the running ones).
fn scaled_job_creates_jobs(c: &mut Cluster) {
    let scaler = c.scaler_address();
    // Two replicas, 75 % each: one pod alone would read its share clamped to 100.
    c.apply(deployment("ml", "queue", "queue", 2));
    c.kubelet.set_demand("ml", "queue", 150);
    c.apply(
        json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledJob",
        "metadata": {"name": "batch", "namespace": "ml"},
        "spec": {"pollingInterval": 2, "maxReplicaCount": 6,
                 "jobTargetRef": {"template": {"spec": {"restartPolicy": "Never",
                     "containers": [{"name": "main", "image": "registry.example/batch:1"}]}}},
                 "triggers": [authenticated(json!({"type": "external", "metadata": {
                     "scalerAddress": scaler, "podSelector": "app=queue", "targetValue": "50"}}))]}}),
    );
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(c.cp.admin.clone(), "ml");
    let lp = ListParams::default().labels("scaledjob.keda.sh/name=batch");
    let count = |c: &Cluster| {
        c.rt.block_on(jobs.list(&lp))
            .expect("list jobs")
            .items
            .len()
    };
    let deadline = Instant::now() + CONVERGE;
    while count(c) < 3 {
        c.check();
        assert!(
            Instant::now() < deadline,
            "ScaledJob ml/batch made {} Jobs, want 3; events {:?}",
            count(c),
            c.events("ml", "ScaledJob", "batch")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Running Jobs count against the next round: no more than three.
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(count(c), 3, "KEDA made more Jobs than ceil(150 / 50)");
}

/// Deployment ml/fb at 60 % demand with `targetValue: 50` (2 replicas) and a
/// fallback of 5 replicas after 2 failed polls; waits for the 2 replicas.
/// Server-side apply: each scenario that needs it may call it.
fn fallback_workload(c: &mut Cluster) {
    let scaler = c.scaler_address();
    c.apply(deployment("ml", "fb", "fb", 1));
    c.kubelet.set_demand("ml", "fb", 60);
    c.apply(scaled_object(
        "ml",
        "fb",
        "fb",
        json!({"type": "external", "metadata": {"scalerAddress": scaler, "targetValue": "50"}}),
        json!({"fallback": {"failureThreshold": 2, "replicas": 5}}),
    ));
    c.wait_replicas("ml", "fb", "fb", 2);
}

/// The failures KEDA counted per metric (`status.health.*.numberOfFailures`).
fn failures(so: &DynamicObject) -> Vec<i64> {
    so.data["status"]["health"]
        .as_object()
        .into_iter()
        .flat_map(|h| h.values())
        .filter_map(|m| m["numberOfFailures"].as_i64())
        .collect()
}

/// Waits until ScaledObject `ns/name`'s condition `kind` has `status`.
#[track_caller]
fn wait_condition(c: &mut Cluster, ns: &str, name: &str, kind: &str, status: &str) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        c.check();
        let so = c.scaled_object(ns, name);
        if condition(&so, kind).is_some_and(|(s, _)| s == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ScaledObject {ns}/{name}: {kind} never {status}: {}",
            so.data["status"]
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The daemons up but every GPU lost (each NVML call GPU_IS_LOST): gpu-scaler
/// answers GetMetricSpec (from the metadata alone) and refuses GetMetrics with
/// UNAVAILABLE, never a zero; after `failureThreshold` failed polls KEDA serves
/// the fallback replicas (5) and says Fallback=True. The GPUs back, the real
/// value again: 60 % in total over 5 replicas is still ceil(60 / 50) = 2.
fn fallback_when_gpus_are_unreadable(c: &mut Cluster) {
    fallback_workload(c);
    c.kubelet.set_gpus_lost(true);
    c.wait_replicas("ml", "fb", "fb", 5);
    let so = c.scaled_object("ml", "fb");
    assert_eq!(
        condition(&so, "Fallback").map(|c| c.0).as_deref(),
        Some("True"),
        "{}",
        so.data["status"]
    );
    let failures = failures(&so).into_iter().max();
    assert!(
        failures.is_some_and(|f| f >= 2),
        "KEDA counted the refused GetMetrics as failures: {}",
        so.data["status"]
    );
    c.kubelet.set_gpus_lost(false);
    c.wait_replicas("ml", "fb", "fb", 2);
    wait_condition(c, "ml", "fb", "Fallback", "False");
}

/// Every daemon killed: what real KEDA v2.21 does, asserted so that a KEDA
/// upgrade that changes it fails here. With no daemon to answer, GetMetricSpec
/// fails as well as GetMetrics, and KEDA runs no fallback when GetMetricSpec
/// fails (kedacore/keda#8056: the failure counter and the fallback are only
/// reached after a metric spec, `getScalerState` in pkg/scaling/scale_handler.go):
/// it never says Fallback=True, and the HPA, unable to read the metric
/// (FailedGetExternalMetric), holds the current replicas. Failures counted
/// while the daemons were going down (a poll that got its spec from one still
/// up and then lost GetMetrics) stay, as only a success resets them, and may
/// even pass `failureThreshold`: they feed no fallback either, so the count
/// (0 in most runs, 3 in one) is printed, not asserted. Safe, as
/// gpu-scaler's refusal to answer a zero is meant to be (nothing scales away),
/// but not the fallback: README "What KEDA's fallback covers". The daemons back,
/// the ScaledObject is Ready again and follows the demand.
fn every_daemon_killed_holds_replicas(c: &mut Cluster) {
    fallback_workload(c);
    for i in 0..c.daemons.len() {
        c.kill_daemon(i);
    }
    // Well past failureThreshold (2) x pollingInterval (2 s) and the HPA's 2 s
    // loop: had KEDA counted a failure, the fallback's 5 replicas would show.
    c.holds_replicas("ml", "fb", 2, Duration::from_secs(30));
    let so = c.scaled_object("ml", "fb");
    eprintln!("e2e: ml/fb with every daemon gone: {}", so.data["status"]);
    let fixed = "keda#8056 may be fixed in this KEDA: assert the fallback replicas here instead";
    assert_ne!(
        condition(&so, "Fallback").map(|c| c.0).as_deref(),
        Some("True"),
        "KEDA ran the fallback with every daemon gone; {fixed}: {}",
        so.data["status"]
    );
    eprintln!(
        "e2e: failures KEDA counted as the daemons went down: {:?}",
        failures(&so)
    );
    assert_eq!(
        condition(&so, "HPAActive").map(|c| c.0).as_deref(),
        Some("False"),
        "the HPA cannot read the metric: {}",
        so.data["status"]
    );
    c.start_daemons(&[0, 1, 2]);
    c.kubelet.set_demand("ml", "fb", 120);
    c.wait_replicas("ml", "fb", "fb", 3);
    wait_condition(c, "ml", "fb", "Ready", "True");
}

/// No daemon's log reports a refused API call: the chart's ClusterRole and Role
/// grant what the daemons did above.
fn no_rbac_refusals(c: &mut Cluster) {
    let forbidden = c.forbidden_in_daemon_logs();
    assert!(
        forbidden.is_empty(),
        "the chart's RBAC refused calls: {forbidden:#?}"
    );
}
