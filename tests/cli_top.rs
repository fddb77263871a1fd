//! `gpu-scaler top --once --json` as a user runs it: the real binary against a
//! real daemon's HTTP listener (the daemon wiring in-process, fed by hand).

use std::{
    collections::BTreeMap,
    process::Command,
    sync::Arc,
    time::{Duration, SystemTime},
};

use gpu_scaler::{
    daemon::{self, Inputs, Settings},
    gpu::{GpuDevice, GpuProcess, GpuSnapshot, GpuStatus, ProcessKind},
    pods::{Pod, PodSet},
    snapshot::Reading,
    testing::Attributions,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn process(pid: u32, sm: u32, used_mib: u64) -> GpuProcess {
    GpuProcess {
        pid,
        kind: ProcessKind::Compute,
        used_memory_mib: Reading::Ok(used_mib),
        sm_util: Reading::Ok(sm),
        mem_util: Reading::Ok(0),
        gpu_instance_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_json_of_a_running_daemon() {
    let now = SystemTime::now();
    let device = GpuDevice {
        index: 0,
        uuid: "GPU-top".into(),
        name: "Test GPU".into(),
        sm_util: Reading::Ok(90),
        mem_util: Reading::Ok(10),
        memory_used_mib: Reading::Ok(9000),
        memory_total_mib: Reading::Ok(81920),
        temperature_c: Reading::Ok(60),
        power_w: Reading::Ok(300.0),
        power_limit_w: Reading::Ok(700.0),
        mig_enabled: false,
        mig_instance: None,
        counters: gpu_scaler::gpu::DeviceCounters::default(),
        processes: vec![process(10, 70, 6000), process(20, 20, 3000)],
        processes_error: None,
    };
    let (_gpu_tx, gpu) = watch::channel(Arc::new(GpuStatus {
        last_good: Some(Arc::new(GpuSnapshot {
            taken_at: now,
            devices: vec![device],
        })),
        error: None,
        updated_at: now,
    }));
    let pod = |name: &str, uid: &str| Pod {
        uid: uid.into(),
        namespace: "ml".into(),
        name: name.into(),
        labels: BTreeMap::new(),
        node_name: None,
        phase: Some("Running".into()),
        ready: true,
        ip: None,
        annotations: Default::default(),
        containers: Vec::new(),
    };
    let (_pods_tx, pods) = watch::channel(Arc::new(PodSet::from_pods(
        vec![pod("a-0", "uid-a"), pod("b-0", "uid-b")],
        None,
        "test",
    )));
    let attributor = Arc::new(Attributions::new());
    attributor.assign(10, "uid-a");
    attributor.assign(20, "uid-b");
    let shutdown = CancellationToken::new();
    let running = daemon::start(
        Inputs {
            attributor,
            gpu,
            pods,
            cluster: None,
        },
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gRPC"),
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind HTTP"),
        Settings {
            poll_interval: Duration::from_secs(30),
            tls: None,
            snapshot: gpu_scaler::daemon::http::SnapshotAccess::Auto,
            problems: Vec::new(),
            accounting: Default::default(),
            gpu_source: "mock",
        },
        shutdown.clone(),
    )
    .expect("daemon starts");
    let addr = running.http_addr.to_string();

    let out = tokio::task::spawn_blocking(move || {
        Command::new(gpu_scaler_tests::workspace_bin("gpu-scaler"))
            .args(["top", "--once", "--json", "--sort", "memory", "--address"])
            .arg(&addr)
            .output()
            .expect("runs gpu-scaler top")
    })
    .await
    .expect("blocking task");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");
    let pods = v["pods"].as_array().expect("pods");
    assert_eq!(pods.len(), 2, "{stdout}");
    assert_eq!(pods[0]["pod"], "a-0", "largest memory first: {stdout}");
    assert_eq!(pods[0]["memory_used_mib"], 6000);
    assert_eq!(pods[0]["sm_percent"], 70.0);
    assert_eq!(pods[1]["pod"], "b-0");
    // 300 W split 70:20 by SM share.
    let power = pods[1]["power_w"].as_f64().expect("power");
    assert!((power - 300.0 * 20.0 / 90.0).abs() < 1e-9, "{stdout}");
    assert_eq!(v["devices"][0]["pods"], 2);
    assert_eq!(v["devices"][0]["memory_used_mib"], 9000);

    shutdown.cancel();
    running.wait().await.expect("daemon stops cleanly");
}
