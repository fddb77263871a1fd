//! The daemon's HTTP listener as a scraper and a probe see it, and `top`
//! through a running daemon: the real wiring fed by hand (`support::scaler`),
//! over real sockets.

use std::{collections::HashMap, time::Duration};

use clap::Parser as _;
use gpu_scaler::{
    cli::{Args, Command},
    scaler::proto::ScaledObjectRef,
};
use gpu_scaler_tests::scaler::{Node, device, pod, process};

const MIB: f64 = 1024.0 * 1024.0;
/// Long enough that samples never go stale in tests that are not about it.
const SLOW_POLL: Duration = Duration::from_secs(30);

/// A node running one training pod (pid 100 on GPU 0, pids 101 and 102 on
/// GPU 1) and one host process (pid 200 on GPU 0).
async fn busy_node() -> Node {
    let node = Node::start(SLOW_POLL, None).await;
    node.set_pods(vec![
        pod("ml", "trainer-0", "uid-trainer", &[("app", "trainer")]),
        pod("web", "idle-0", "uid-idle", &[("app", "web")]),
    ]);
    node.attributor.assign(100, "uid-trainer");
    node.attributor.assign(101, "uid-trainer");
    node.attributor.assign(102, "uid-trainer");
    node.attributor.assign_host(200);
    node.set_gpus(vec![
        device(
            0,
            61,
            300.0,
            vec![process(100, 60, 20, 4096), process(200, 20, 0, 512)],
        ),
        device(
            1,
            55,
            200.0,
            vec![process(101, 30, 5, 1000), process(102, 10, 5, 1000)],
        ),
    ]);
    node.settle().await;
    node
}

/// The samples of a scrape, parsed as Prometheus text format.
fn scrape(body: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses as Prometheus text format")
}

/// The value of the one sample of `name` whose labels include `labels`.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<f64> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: not a plain value: {other:?}"),
        })
        .collect();
    assert!(
        found.len() <= 1,
        "{name}{labels:?} is not one series: {found:?}"
    );
    found.first().copied()
}

fn pod_series(s: &prometheus_parse::Scrape, name: &str, gpu: &str) -> Option<f64> {
    value(
        s,
        name,
        &[
            ("namespace", "ml"),
            ("pod", "trainer-0"),
            ("container", ""),
            ("gpu", gpu),
        ],
    )
}

#[tokio::test]
async fn metrics_carry_the_pods_series_and_drop_gone_pods() {
    let node = busy_node().await;
    // One good and one bad ExternalScaler call for the gRPC series.
    let mut c = node.client().await;
    let good = ScaledObjectRef {
        name: "so".into(),
        namespace: "ml".into(),
        scaler_metadata: HashMap::from([("podSelector".into(), "app=trainer".into())]),
    };
    c.get_metric_spec(good.clone())
        .await
        .expect("GetMetricSpec answers");
    let bad = ScaledObjectRef {
        namespace: String::new(),
        ..good.clone()
    };
    let err = c.get_metric_spec(bad).await.expect_err("no namespace");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // An open StreamIsActive stream counts while it is open.
    let mut stream = c
        .stream_is_active(good.clone())
        .await
        .expect("StreamIsActive opens")
        .into_inner();
    stream
        .message()
        .await
        .expect("first state")
        .expect("a message");

    let (code, body) = node.http_get("/metrics").await;
    assert_eq!(code, 200, "{body}");
    let s = scrape(&body);
    assert_eq!(
        value(
            &s,
            "gpu_scaler_grpc_streams",
            &[("method", "StreamIsActive")]
        ),
        Some(1.0),
        "{body}"
    );

    let sm = "gpu_scaler_pod_sm_utilization_percent";
    let mem = "gpu_scaler_pod_memory_used_bytes";
    assert_eq!(pod_series(&s, sm, "0"), Some(60.0), "{body}");
    assert_eq!(pod_series(&s, sm, "1"), Some(40.0), "two processes summed");
    assert_eq!(pod_series(&s, mem, "0"), Some(4096.0 * MIB));
    assert_eq!(pod_series(&s, mem, "1"), Some(2000.0 * MIB));
    assert_eq!(
        pod_series(&s, "gpu_scaler_pod_processes", "1"),
        Some(2.0),
        "{body}"
    );
    // GPU 0's 300 W split 60:20 by SM share.
    assert_eq!(
        pod_series(&s, "gpu_scaler_pod_power_watts", "0"),
        Some(225.0)
    );
    assert_eq!(
        value(&s, sm, &[("pod", "idle-0")]),
        None,
        "no series for a pod without GPU processes"
    );
    assert_eq!(
        value(
            &s,
            "gpu_scaler_unattributed_sm_utilization_percent",
            &[("gpu", "0")]
        ),
        Some(20.0)
    );
    assert_eq!(
        value(&s, "gpu_scaler_unattributed_processes", &[("gpu", "1")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "gpu_scaler_device_memory_total_bytes",
            &[("gpu", "1"), ("uuid", "GPU-00000001")]
        ),
        Some(81_920.0 * MIB)
    );
    assert_eq!(value(&s, "gpu_scaler_gpu_source_up", &[]), Some(1.0));
    assert_eq!(value(&s, "gpu_scaler_local_pods", &[]), Some(2.0));
    assert_eq!(
        value(
            &s,
            "gpu_scaler_grpc_requests_total",
            &[("method", "GetMetricSpec"), ("code", "OK")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &s,
            "gpu_scaler_grpc_requests_total",
            &[("method", "GetMetricSpec"), ("code", "INVALID_ARGUMENT")]
        ),
        Some(1.0),
        "{body}"
    );
    assert!(
        value(&s, "gpu_scaler_sample_duration_seconds_count", &[]).is_some_and(|n| n >= 1.0),
        "{body}"
    );

    // The pod goes: its series go with it.
    node.set_pods(vec![pod("web", "idle-0", "uid-idle", &[("app", "web")])]);
    node.settle().await;
    let (_, body) = node.http_get("/metrics").await;
    let s = scrape(&body);
    assert_eq!(pod_series(&s, sm, "0"), None, "{body}");
    assert!(
        !body.contains("trainer-0"),
        "a gone pod leaves no series: {body}"
    );
    // Its processes now count as belonging to no known pod.
    assert_eq!(
        value(&s, "gpu_scaler_unattributed_processes", &[("gpu", "0")]),
        Some(2.0)
    );
    node.stop().await;
}

#[tokio::test]
async fn readyz_follows_the_gpu_source() {
    let node = busy_node().await;
    let (code, body) = node.http_get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, _) = node.http_get("/healthz").await;
    assert_eq!(code, 200);

    node.fail_gpus("NVML: GPU is lost");
    node.settle().await;
    let (code, body) = node.http_get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("GPU is lost"), "{body}");
    let (code, _) = node.http_get("/healthz").await;
    assert_eq!(code, 200, "alive while not ready");
    let (_, metrics) = node.http_get("/metrics").await;
    let s = scrape(&metrics);
    assert_eq!(value(&s, "gpu_scaler_gpu_source_up", &[]), Some(0.0));
    assert_eq!(
        value(&s, "gpu_scaler_sample_errors_total", &[("source", "gpu")]),
        Some(1.0),
        "{metrics}"
    );

    node.set_gpus(vec![device(0, 60, 100.0, vec![process(100, 50, 0, 10)])]);
    node.settle().await;
    let (code, body) = node.http_get("/readyz").await;
    assert_eq!(code, 200, "recovered: {body}");
    let (_, metrics) = node.http_get("/metrics").await;
    assert_eq!(
        value(&scrape(&metrics), "gpu_scaler_gpu_source_up", &[]),
        Some(1.0)
    );
    node.stop().await;
}

fn top_args(args: &[&str]) -> gpu_scaler::cli::top::TopArgs {
    let mut argv = vec!["gpu-scaler", "top"];
    argv.extend_from_slice(args);
    match Args::try_parse_from(argv)
        .expect("top's flags parse")
        .command
    {
        Command::Top(a) => a,
        other => panic!("parsed as {other:?}"),
    }
}

#[tokio::test]
async fn top_once_json_through_a_running_daemon() {
    let node = busy_node().await;
    let addr = node.http_addr.to_string();
    let out = gpu_scaler::cli::top::output_once(top_args(&[
        "--address",
        &addr,
        "--once",
        "--json",
        "--sort",
        "memory",
    ]))
    .await
    .expect("top --once --json");
    let v: serde_json::Value = serde_json::from_str(&out).expect("top prints JSON");
    let pods = v["pods"].as_array().expect("pods list");
    assert_eq!(pods.len(), 1, "only pods on a GPU: {out}");
    let p = &pods[0];
    assert_eq!(p["namespace"], "ml");
    assert_eq!(p["pod"], "trainer-0");
    assert_eq!(p["gpus"], serde_json::json!([0, 1]));
    assert_eq!(p["sm_percent"], 100.0, "60 + 30 + 10: {out}");
    assert_eq!(p["memory_used_mib"], 6096);
    assert_eq!(p["processes"], 3);
    // 225 W of GPU 0 (60 of 80 SM) + all 200 W of GPU 1.
    assert_eq!(p["power_w"], 425.0);
    let d0 = &v["devices"][0];
    assert_eq!(d0["index"], 0);
    assert_eq!(d0["power_w"], 300.0);
    assert_eq!(d0["memory_used_mib"], 4608);
    assert_eq!(d0["pods"], 1);
    assert_eq!(d0["unattributed_processes"], 1);
    assert_eq!(v["sort"], "memory");

    // The table form carries the same figures.
    let table = gpu_scaler::cli::top::output_once(top_args(&["--address", &addr, "--once"]))
        .await
        .expect("top --once");
    assert!(table.contains("ml/trainer-0"), "{table}");
    assert!(table.contains("425.0"), "{table}");

    // A daemon that is not there is an error, not an empty view.
    node.stop().await;
    let err = gpu_scaler::cli::top::output_once(top_args(&["--address", &addr, "--once"]))
        .await
        .expect_err("no daemon");
    assert!(err.to_string().contains(&addr), "{err}");
}

/// `top` on this node: the mock GPU source, procfs attribution of a real
/// process in a pod's cgroup (systemd driver, containerd) and a PodList file.
#[tokio::test]
async fn top_once_json_locally_with_mock_gpus() {
    use gpu_scaler_tests::{cgroup, kernel};
    let tree = match kernel::probe_root().and_then(|()| cgroup::TestTree::new("top")) {
        Ok(t) => t,
        Err(e) => {
            kernel::require("root and a cgroup v2 mount", Err::<(), _>(e));
            return;
        }
    };
    let uid = cgroup::pod_uid(1);
    let cid = cgroup::container_id(1);
    let cg = tree.create(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{cid}.scope",
        uid.replace('-', "_")
    ));
    let mut child = std::process::Command::new("bash")
        .args([
            "-c",
            &format!(
                "echo $$ > '{}/cgroup.procs' && exec sleep 60",
                cg.dir.display()
            ),
        ])
        .spawn()
        .expect("start the pod's process");
    let pid = child.id();
    // Until the process is in the pod's cgroup.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .is_ok_and(|c| c.contains(&cid) && !c.contains("bash"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "process never reached its cgroup"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(
        &scenario,
        format!(
            "[[gpu]]\nname = \"Mock GPU\"\nmemory_total_mib = 81559\nutilization = 70\n\
             memory_utilization = 10\ntemperature_c = 50\npower_w = 280.0\npower_limit_w = 700.0\n\
             \n[[gpu.process]]\npid = {pid}\nsm_util = 55\nmem_util = 5\nused_memory_mib = 1234\n\
             \n[[gpu.process]]\npid = {host}\nsm_util = 15\nmem_util = 1\nused_memory_mib = 100\n",
            host = std::process::id()
        ),
    )
    .expect("write scenario");
    let pods = dir.path().join("pods.json");
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [{
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "local-0", "namespace": "ml", "uid": uid},
        "spec": {"nodeName": "n1", "containers": [{"name": "main", "image": "x"}]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                   "containerStatuses": [{"name": "main", "ready": true, "containerID": format!("containerd://{cid}")}]}
    }]});
    std::fs::write(&pods, list.to_string()).expect("write pods file");
    let out = gpu_scaler::cli::top::output_once(top_args(&[
        "--gpu",
        "mock",
        "--gpu-scenario",
        scenario.to_str().expect("utf-8 path"),
        "--pods-file",
        pods.to_str().expect("utf-8 path"),
        "--node-name",
        "n1",
        "--attribution",
        "procfs",
        "--once",
        "--json",
    ]))
    .await
    .expect("top --once --json locally");
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value = serde_json::from_str(&out).expect("top prints JSON");
    assert_eq!(v["pods"].as_array().map(Vec::len), Some(1), "{out}");
    let p = &v["pods"][0];
    assert_eq!(p["namespace"], "ml");
    assert_eq!(p["pod"], "local-0");
    assert_eq!(p["sm_percent"], 55.0, "{out}");
    assert_eq!(p["memory_used_mib"], 1234);
    assert_eq!(p["gpus"], serde_json::json!([0]));
    assert_eq!(p["containers"], serde_json::json!(["main"]), "{out}");
    let d = &v["devices"][0];
    assert_eq!(d["power_w"], 280.0);
    assert_eq!(d["pods"], 1);
    assert_eq!(
        d["unattributed_processes"], 1,
        "this test process is the host's: {out}"
    );
    assert_eq!(v["attribution"], "procfs");
}

/// A sleeping process started inside `cg` (moved there before it execs, as a
/// runtime does); killed and reaped when dropped.
struct InCgroup(std::process::Child);

impl InCgroup {
    fn start(cg: &gpu_scaler_tests::cgroup::Cgroup) -> Self {
        let child = gpu_scaler_tests::process::spawn_in(
            &cg.dir,
            std::process::Command::new("sleep")
                .arg("120")
                .stdin(std::process::Stdio::null()),
        )
        .expect("start a process in its container's cgroup");
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The per-pod series split by container, from real processes in real
/// container cgroups: procfs attribution, the mock GPU source and a PodList
/// file whose container statuses name the containers by the ids their cgroups
/// carry (all three runtime schemes), through the daemon's /metrics and
/// /v1/snapshot.
///
/// | pod (layout) | container (status) | GPU: SM %, MiB |
/// |---|---|---|
/// | ml/vllm-0 (systemd, containerd) | server (app) | 0: 30, 2000 · 1: 20, 1000 |
/// | | sidecar (app) | 0: 10, 500 |
/// | | sandbox: a scope the statuses do not list | 0: 5, 10 |
/// | ml/train-0 (systemd, CRI-O) | trainer (app, `cri-o://`) | 0: 15, 3000 |
/// | ml/legacy-0 (systemd, docker) | debugger (ephemeral, `docker://`) | 1: 10, 100 |
/// | ml/pending-0 (cgroupfs) | no statuses reported | 1: 20, 700 |
///
/// GPU 0 draws 600 W (shares by SM 30:10:5:15), GPU 1 200 W (20:10:20).
#[tokio::test]
async fn metrics_split_pod_series_by_container_for_real_processes() {
    use gpu_scaler_tests::{cgroup, kernel};
    let tree = match kernel::probe_root().and_then(|()| cgroup::TestTree::new("containers")) {
        Ok(t) => t,
        Err(e) => {
            kernel::require("root and a cgroup v2 mount", Err::<(), _>(e));
            return;
        }
    };
    let systemd = |qos: &str, uid: &str, scope: &str| {
        format!(
            "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice/{scope}.scope",
            uid.replace('-', "_")
        )
    };
    let (uid_vllm, uid_train, uid_legacy, uid_pending) = (
        cgroup::pod_uid(31),
        cgroup::pod_uid(32),
        cgroup::pod_uid(33),
        cgroup::pod_uid(34),
    );
    let [server, sidecar, pause, trainer, debugger, pending] =
        [41, 42, 43, 44, 45, 46].map(cgroup::container_id);
    let cg = |rel: String| tree.create(&rel);
    let p_server0 = InCgroup::start(&cg(systemd(
        "burstable",
        &uid_vllm,
        &format!("cri-containerd-{server}"),
    )));
    let p_server1 = InCgroup::start(&cg(systemd(
        "burstable",
        &uid_vllm,
        &format!("cri-containerd-{server}"),
    )));
    let p_sidecar = InCgroup::start(&cg(systemd(
        "burstable",
        &uid_vllm,
        &format!("cri-containerd-{sidecar}"),
    )));
    let p_pause = InCgroup::start(&cg(systemd(
        "burstable",
        &uid_vllm,
        &format!("cri-containerd-{pause}"),
    )));
    let p_trainer = InCgroup::start(&cg(systemd(
        "besteffort",
        &uid_train,
        &format!("crio-{trainer}"),
    )));
    let p_debugger = InCgroup::start(&cg(systemd(
        "besteffort",
        &uid_legacy,
        &format!("docker-{debugger}"),
    )));
    let p_pending = InCgroup::start(&cg(format!(
        "kubepods/besteffort/pod{uid_pending}/{pending}"
    )));

    let dir = tempfile::tempdir().expect("temp dir");
    let scenario = dir.path().join("scenario.toml");
    let process = |pid: u32, sm: u32, mib: u64| {
        format!(
            "\n[[gpu.process]]\npid = {pid}\nsm_util = {sm}\nmem_util = 1\nused_memory_mib = {mib}\n"
        )
    };
    let gpu = |power: f64| {
        format!(
            "\n[[gpu]]\nname = \"Mock GPU\"\nmemory_total_mib = 81559\nutilization = 60\n\
             memory_utilization = 10\ntemperature_c = 50\npower_w = {power:.1}\npower_limit_w = 700.0\n"
        )
    };
    std::fs::write(
        &scenario,
        [
            gpu(600.0),
            process(p_server0.pid(), 30, 2000),
            process(p_sidecar.pid(), 10, 500),
            process(p_pause.pid(), 5, 10),
            process(p_trainer.pid(), 15, 3000),
            gpu(200.0),
            process(p_server1.pid(), 20, 1000),
            process(p_debugger.pid(), 10, 100),
            process(p_pending.pid(), 20, 700),
        ]
        .concat(),
    )
    .expect("write scenario");
    let status = |name: &str, id: &str| {
        serde_json::json!({"name": name, "ready": true, "restartCount": 0, "image": "x", "imageID": "",
                           "containerID": id, "state": {"running": {"startedAt": "2026-11-29T00:00:00Z"}}})
    };
    let item = |name: &str, uid: &str, status: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ml", "uid": uid},
            "spec": {"nodeName": "n1", "containers": [{"name": "x", "image": "x"}]},
            "status": status
        })
    };
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
        item("vllm-0", &uid_vllm, serde_json::json!({"phase": "Running", "containerStatuses": [
            status("server", &format!("containerd://{server}")),
            status("sidecar", &format!("containerd://{sidecar}"))]})),
        item("train-0", &uid_train, serde_json::json!({"phase": "Running",
            "initContainerStatuses": [status("fetch", "cri-o://0000")],
            "containerStatuses": [status("trainer", &format!("cri-o://{trainer}"))]})),
        item("legacy-0", &uid_legacy, serde_json::json!({"phase": "Running",
            "containerStatuses": [status("app", "docker://1111")],
            "ephemeralContainerStatuses": [status("debugger", &format!("docker://{debugger}"))]})),
        item("pending-0", &uid_pending, serde_json::json!({"phase": "Pending"})),
    ]});
    let pods_file = dir.path().join("pods.json");
    std::fs::write(&pods_file, list.to_string()).expect("write pods file");

    let poll = Duration::from_millis(100);
    let pods = gpu_scaler::pods::file::start(gpu_scaler::pods::file::Config {
        path: pods_file,
        node_name: Some("n1".into()),
        check_interval: poll,
    })
    .expect("pods file source");
    let gpus = gpu_scaler::gpu::start(gpu_scaler::gpu::Config {
        source: gpu_scaler::gpu::SourceKind::Mock,
        nvml_lib: None,
        scenario: Some(scenario),
        poll_interval: poll,
    });
    let attributor = std::sync::Arc::new(gpu_scaler::attribution::procfs::ProcfsAttributor::new(
        Duration::from_secs(30),
    ));
    let node = Node::start_with_inputs(
        Duration::from_secs(10),
        None,
        Some(pods),
        Some(gpus),
        Some(attributor),
    )
    .await;

    let sm = "gpu_scaler_pod_sm_utilization_percent";
    let series =
        |s: &prometheus_parse::Scrape, name: &str, pod: &str, container: &str, gpu: &str| {
            value(
                s,
                name,
                &[
                    ("namespace", "ml"),
                    ("pod", pod),
                    ("container", container),
                    ("gpu", gpu),
                ],
            )
        };
    // Until the mock source's first pass has been joined.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (body, s) = loop {
        let (code, body) = node.http_get("/metrics").await;
        assert_eq!(code, 200, "{body}");
        let s = scrape(&body);
        if series(&s, sm, "pending-0", "", "1").is_some() {
            break (body, s);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pod series: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (pod, container, gpu, want_sm, want_mib, want_w) in [
        ("vllm-0", "server", "0", 30.0, 2000.0, 300.0),
        ("vllm-0", "sidecar", "0", 10.0, 500.0, 100.0),
        ("vllm-0", "POD", "0", 5.0, 10.0, 50.0),
        ("vllm-0", "server", "1", 20.0, 1000.0, 80.0),
        ("train-0", "trainer", "0", 15.0, 3000.0, 150.0),
        ("legacy-0", "debugger", "1", 10.0, 100.0, 40.0),
        ("pending-0", "", "1", 20.0, 700.0, 80.0),
    ] {
        let what = format!("{pod}/{container} on GPU {gpu}");
        assert_eq!(
            series(&s, sm, pod, container, gpu),
            Some(want_sm),
            "{what}: {body}"
        );
        assert_eq!(
            series(&s, "gpu_scaler_pod_memory_used_bytes", pod, container, gpu),
            Some(want_mib * MIB),
            "{what}"
        );
        // The power split is the energy counter's mean over the last pass: a
        // counter in whole mJ, so within 1 mJ per pass of the scenario's draw.
        let w = series(&s, "gpu_scaler_pod_power_watts", pod, container, gpu);
        assert!(
            w.is_some_and(|w| (w - want_w).abs() < 0.05),
            "{what}: {w:?} W, not {want_w}"
        );
        assert_eq!(
            series(&s, "gpu_scaler_pod_processes", pod, container, gpu),
            Some(1.0),
            "{what}"
        );
    }
    // Nothing else: no "" series for pods whose containers are all named.
    let vllm_series: Vec<_> = s
        .samples
        .iter()
        .filter(|x| x.metric == sm && x.labels.get("pod") == Some("vllm-0"))
        .map(|x| {
            (
                x.labels.get("container").unwrap_or("?").to_owned(),
                x.labels.get("gpu").unwrap_or("?").to_owned(),
            )
        })
        .collect();
    assert_eq!(vllm_series.len(), 4, "{vllm_series:?}");

    // The snapshot carries the same split; its pod totals are the sums.
    let (code, snap) = node.http_get("/v1/snapshot").await;
    assert_eq!(code, 200, "{snap}");
    let snap: serde_json::Value = serde_json::from_str(&snap).expect("snapshot JSON");
    let vllm = snap["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .find(|p| p["pod"]["name"] == "vllm-0")
        .expect("vllm-0 in the snapshot");
    assert_eq!(vllm["gpus"][0]["sm_util"]["ok"], 45.0, "30 + 10 + 5");
    assert_eq!(vllm["gpus"][0]["pids"].as_array().map(Vec::len), Some(3));
    let part = |role: &str, name: Option<&str>| {
        vllm["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .find(|c| c["role"] == role && name.is_none_or(|n| c["name"] == n))
            .cloned()
            .unwrap_or_else(|| panic!("no {role} {name:?} in {vllm}"))
    };
    let sandbox = part("sandbox", None);
    assert_eq!(sandbox["container_ids"], serde_json::json!([pause]));
    assert_eq!(
        sandbox["gpus"][0]["pids"],
        serde_json::json!([p_pause.pid()])
    );
    let srv = part("container", Some("server"));
    assert_eq!(srv["kind"], "app");
    assert_eq!(srv["container_ids"], serde_json::json!([server]));
    assert_eq!(
        srv["gpus"]
            .as_array()
            .map(|g| g.iter().map(|g| g["gpu_index"].clone()).collect::<Vec<_>>()),
        Some(vec![serde_json::json!(0), serde_json::json!(1)])
    );
    assert_eq!(
        vllm["pod"]["containers"][0],
        serde_json::json!({"name": "server", "id": server, "previous_id": null, "kind": "app"})
    );
    node.stop().await;
    drop((
        p_server0, p_server1, p_sidecar, p_pause, p_trainer, p_debugger, p_pending,
    ));
}
