//! End to end on one node, as root on the real kernel: real processes in
//! kubelet-style pod cgroups, the real `gpu-scaler serve` binary attributing
//! them with eBPF, GPU figures from the fake libnvidia-ml (through the real NVML
//! code) and from the mock scenario source, pods from a PodList file, and KEDA's
//! calls made by `gpu-scaler query`'s client over a real socket.
//!
//! Every figure is compared with one computed by hand from the scenario below.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use gpu_scaler::cli::query::{Answer, QueryArgs, ask};
use gpu_scaler::scaler::hpa::TargetType;
use gpu_scaler_tests::{
    cgroup::TestTree,
    fake_nvml::FakeNvml,
    kernel,
    pod::{Layout, RealPod, cgroupfs_guaranteed, systemd_containerd, systemd_crio},
    serve::{ServeProcess, free_port, http_get},
    wait_for,
};
use serde_json::json;

const NODE: &str = "e2e-node";
/// Short, so the exit test does not take long; long enough for a few polls.
const EXIT_GRACE: Duration = Duration::from_secs(3);

/// One pod with one container and one process per GPU it uses.
struct TestPod {
    namespace: &'static str,
    name: &'static str,
    app: &'static str,
    real: RealPod,
}

impl TestPod {
    fn pid(&self, i: usize) -> u32 {
        self.real.pid(i)
    }
}

/// Starts `n` sleeping processes in a new pod cgroup laid out by `layout`.
fn start_pod(
    tree: &TestTree,
    n: u32,
    namespace: &'static str,
    name: &'static str,
    app: &'static str,
    layout: Layout,
    processes: usize,
) -> TestPod {
    TestPod {
        namespace,
        name,
        app,
        real: RealPod::start(tree, n, layout, processes),
    }
}

/// The pods as `kubectl get pods -A -o json` prints them.
fn pod_list(pods: &[&TestPod]) -> String {
    let items: Vec<_> = pods
        .iter()
        .map(|p| {
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "uid": p.real.uid, "labels": {"app": p.app}},
                "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "x"}]},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                           "containerStatuses": [p.real.container_status("main")]}
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string()
}

/// The GPU load of the test, in the scenario format both the fake library and
/// the mock source read.
///
/// | GPU | total MiB | temp | power | processes (pod: sm%, mem%, MiB)                     |
/// |-----|-----------|------|-------|-----------------------------------------------------|
/// | 0   | 40000     | 60   | 300 W | a: 40, 20, 10000 · b0: 30, 10, 6000                 |
/// | 1   | 80000     | 70   | 400 W | b1: 50, 30, 20000 · web: 10, 5, 2000 · c: 40, 5, 8000 |
///
/// a, b = prod/app=vllm; web = prod/app=web; c = staging/app=vllm (same labels,
/// other namespace: never counted for prod).
fn scenario(a: u32, b0: u32, b1: u32, web: u32, c: u32) -> String {
    format!(
        r#"
[[gpu]]
name = "Fake H100"
memory_total_mib = 40000
utilization = 70
memory_utilization = 30
temperature_c = 60
power_w = 300.0
power_limit_w = 700.0

[[gpu.process]]
pid = {a}
sm_util = 40
mem_util = 20
used_memory_mib = 10000

[[gpu.process]]
pid = {b0}
sm_util = 30
mem_util = 10
used_memory_mib = 6000

[[gpu]]
name = "Fake H100"
memory_total_mib = 80000
utilization = 100
memory_utilization = 40
temperature_c = 70
power_w = 400.0
power_limit_w = 700.0

[[gpu.process]]
pid = {b1}
sm_util = 50
mem_util = 30
used_memory_mib = 20000

[[gpu.process]]
pid = {web}
sm_util = 10
mem_util = 5
used_memory_mib = 2000

[[gpu.process]]
pid = {c}
sm_util = 40
mem_util = 5
used_memory_mib = 8000
"#
    )
}

/// A running `gpu-scaler serve` (SIGKILLed when dropped) and its addresses.
struct Daemon {
    _serve: ServeProcess,
    grpc: SocketAddr,
    http: SocketAddr,
}

fn start_daemon(gpu_args: &[&str], pods_file: &Path) -> Daemon {
    let ip = IpAddr::from([127, 0, 0, 1]);
    let grpc = SocketAddr::new(ip, free_port(ip));
    let http = SocketAddr::new(ip, free_port(ip));
    let args: Vec<String> = [
        "--attribution",
        "ebpf",
        "--node-name",
        NODE,
        "--poll-interval",
        "250ms",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "--listen".into(),
        grpc.to_string(),
        "--metrics-listen".into(),
        http.to_string(),
        "--exit-grace".into(),
        format!("{}s", EXIT_GRACE.as_secs()),
        "--pods-file".into(),
        pods_file.to_str().expect("utf-8 path").into(),
    ])
    .chain(gpu_args.iter().map(|a| a.to_string()))
    .collect();
    let mut serve = ServeProcess::spawn(NODE, args, &pods_file.with_file_name("serve.log"));
    serve.wait_ready(http);
    Daemon {
        _serve: serve,
        grpc,
        http,
    }
}

/// The per-pod /metrics series name their container: the status's `main`,
/// matched by the id the eBPF-resolved cgroup carries.
fn check_container_series(d: &Daemon) {
    let line = "gpu_scaler_pod_sm_utilization_percent{namespace=\"prod\",pod=\"vllm-b\",container=\"main\",gpu=\"1\"} 50.0";
    let found = wait_for(Duration::from_secs(10), || {
        http_get(d.http, "/metrics").and_then(|(_, body)| body.contains(line).then_some(()))
    });
    assert!(
        found.is_some(),
        "{line:?} not in /metrics: {:?}",
        http_get(d.http, "/metrics")
    );
}

fn query(d: &Daemon, namespace: &str, metadata: &[&str]) -> Answer {
    let args = QueryArgs {
        address: format!("http://{}", d.grpc),
        namespace: namespace.into(),
        name: "e2e".into(),
        metadata: metadata.iter().map(|s| s.to_string()).collect(),
        replicas: 2,
        metric_type: TargetType::AverageValue,
        min_replicas: 0,
        max_replicas: 100,
        tls_ca: None,
        tls_cert: None,
        tls_key: None,
        tls_server_name: None,
        json: false,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(ask(&args))
        .unwrap_or_else(|e| panic!("query {metadata:?} in {namespace}: {e}"))
}

fn assert_close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() < 1e-6 * want.abs().max(1.0),
        "{what}: got {got}, want {want}"
    );
}

/// Waits until the query's value is `want` (the daemon joins on its own clock).
fn eventually(d: &Daemon, namespace: &str, metadata: &[&str], want: f64) -> Answer {
    eventually_within(d, namespace, metadata, want, 1e-6)
}

/// As [`eventually`], within `relative` of `want`.
fn eventually_within(
    d: &Daemon,
    namespace: &str,
    metadata: &[&str],
    want: f64,
    relative: f64,
) -> Answer {
    let mut last = None;
    let hit = wait_for(Duration::from_secs(10), || {
        let a = query(d, namespace, metadata);
        let ok = (a.value - want).abs() < relative * want.abs().max(1.0);
        last = Some(a.value);
        ok.then_some(a)
    });
    hit.unwrap_or_else(|| panic!("{metadata:?}: value stayed {last:?}, want {want}"))
}

/// Probes root + eBPF (the daemon loads the probe itself; this fails early
/// with a clear reason instead of a daemon that exits).
fn kernel_ready() -> bool {
    kernel::require("root", kernel::probe_root())
        && kernel::require("cgroup v2", TestTree::new("probe").map(drop))
}

struct World {
    _tree: TestTree,
    a: TestPod,
    b: TestPod,
    web: TestPod,
    c: TestPod,
    /// prod/app=vllm with a process that uses no GPU.
    _idle: TestPod,
    dir: tempfile::TempDir,
}

fn world() -> World {
    let tree = TestTree::new("e2e").expect("cgroup tree");
    let a = start_pod(&tree, 1, "prod", "vllm-a", "vllm", systemd_containerd, 1);
    let b = start_pod(&tree, 2, "prod", "vllm-b", "vllm", cgroupfs_guaranteed, 2);
    let web = start_pod(&tree, 3, "prod", "web", "web", systemd_crio, 1);
    let c = start_pod(&tree, 4, "staging", "vllm-c", "vllm", systemd_containerd, 1);
    let idle = start_pod(&tree, 5, "prod", "vllm-idle", "vllm", systemd_containerd, 1);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("pods.json"),
        pod_list(&[&a, &b, &web, &c, &idle]),
    )
    .expect("pods file");
    World {
        _tree: tree,
        a,
        b,
        web,
        c,
        _idle: idle,
        dir,
    }
}

impl World {
    fn scenario(&self) -> String {
        scenario(
            self.a.pid(0),
            self.b.pid(0),
            self.b.pid(1),
            self.web.pid(0),
            self.c.pid(0),
        )
    }
}

/// Every metric for the prod/app=vllm workload equals the hand-computed figure.
fn check_all_metrics(d: &Daemon) {
    let sel = "podSelector=app=vllm";
    // gpu_utilization: per pod, its summed SM % per GPU, averaged over its GPUs.
    // a = 40 (GPU0); b = (30 on GPU0 + 50 on GPU1) / 2 = 40. Sum = 80.
    let a = eventually(d, "prod", &[sel], 80.0);
    assert_close("metricValueFloat", a.metric_value_float, 80.0);
    assert_eq!(a.metric_value, 80, "int field set too");
    assert!(a.active, "80 > activation 0");
    // HPA: AverageValue, target 80 (default) -> ceil(80/80) = 1 replica.
    assert_eq!(a.desired_replicas, 1);
    // memory_utilization: a = 20; b = (10 + 30) / 2 = 20. Sum = 40.
    eventually(d, "prod", &[sel, "metric=memory_utilization"], 40.0);
    // memory_used_mib: 10000 + 6000 + 20000.
    eventually(d, "prod", &[sel, "metric=memory_used_mib"], 36000.0);
    // memory_used_percent: a = 10000/40000 = 25 %; b = 26000/120000 = 21.67 %.
    eventually(
        d,
        "prod",
        &[sel, "metric=memory_used_percent"],
        25.0 + 26000.0 / 120000.0 * 100.0,
    );
    // power_draw: GPU0 300 W split 40:30 over a and b0; GPU1 400 W split
    // 50:10:40 over b1, web, c. a = 300*40/70; b = 300*30/70 + 400*50/100.
    // The power split is the energy counter's mean over a pass: a counter in
    // whole mJ, so within 1 mJ per pass of the scenario's draw.
    let power = 300.0 * 40.0 / 70.0 + 300.0 * 30.0 / 70.0 + 400.0 * 50.0 / 100.0;
    eventually_within(d, "prod", &[sel, "metric=power_draw"], power, 1e-4);
    // temperature defaults to max over pods of their hottest GPU: b uses GPU1 (70).
    eventually(d, "prod", &[sel, "metric=temperature"], 70.0);
    // avg aggregation for metricType: Value users: a, b and the idle pod
    // (selected, no GPU process: 0) -> (40 + 40 + 0) / 3.
    eventually(d, "prod", &[sel, "aggregation=avg"], 80.0 / 3.0);
    eventually(d, "prod", &[sel, "aggregation=min"], 0.0);
    // The same labels in staging see only staging's pod c: 40 on GPU1.
    eventually(d, "staging", &[sel], 40.0);
    // Another app in the same namespace: web alone, 10.
    eventually(d, "prod", &["podSelector=app=web"], 10.0);
}

#[test]
fn fake_nvml_end_to_end() {
    if !kernel_ready() {
        return;
    }
    let w = world();
    let fake = FakeNvml::new(&w.scenario());
    let d = start_daemon(
        &[
            "--gpu",
            "nvml",
            "--nvml-lib",
            fake.lib_path().to_str().expect("utf-8 path"),
        ],
        &w.dir.path().join("pods.json"),
    );
    check_all_metrics(&d);
    check_container_series(&d);
}

#[test]
fn mock_source_end_to_end_and_exit_grace() {
    if !kernel_ready() {
        return;
    }
    let mut w = world();
    let scenario_file = w.dir.path().join("scenario.toml");
    std::fs::write(&scenario_file, w.scenario()).expect("scenario");
    let d = start_daemon(
        &[
            "--gpu",
            "mock",
            "--gpu-scenario",
            scenario_file.to_str().expect("utf-8 path"),
        ],
        &w.dir.path().join("pods.json"),
    );
    check_all_metrics(&d);

    // Pod a's process exits, but its samples keep arriving (NVML lags the
    // exit): inside the grace period they still count for a ...
    let sel = ["podSelector=app=vllm"];
    let killed = w.a.pid(0);
    w.a.real.processes[0].kill().expect("kill pod a's process");
    w.a.real.processes[0].wait().expect("reap pod a's process");
    let a = query(&d, "prod", &sel);
    assert_close("right after exit", a.value, 80.0);
    // ... and after it they belong to no pod: the workload is b alone (40).
    let after = eventually(&d, "prod", &sel, 40.0);
    assert_close("after the grace period", after.value, 40.0);
    assert!(
        std::fs::read_to_string(&scenario_file)
            .expect("scenario")
            .contains(&format!("pid = {killed}")),
        "the exited pid is still in the samples: the drop came from attribution"
    );
}
