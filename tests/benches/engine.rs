//! Engine reading as a node runs it: one release `gpu-scaler serve` reading
//! `PODS` vLLM pods (real HTTP servers on 127.0.1.x, each answering a ~100 KB
//! exposition) every second, with one ScaledObject's query live. Prints the
//! daemon's CPU (% of one core, from /proc/<pid>/stat over the window) and the
//! freshness (an engine gauge changes -> GetMetrics shows it: median and p90
//! over repeated changes). Asserts nothing about speed.
//! `cargo xtask bench engine` runs it with the exposition parser's bench.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use gpu_scaler::scaler::proto::external_scaler_client::ExternalScalerClient;
use gpu_scaler_tests::{
    engine::{FakeEngine, vllm_exposition_sized},
    scaler::metric_value,
    serve::{ServeProcess, free_port},
};

const PODS: usize = 100;
const EXPOSITION_BYTES: usize = 100 * 1024;
const CPU_WINDOW: Duration = Duration::from_secs(20);
const CHANGES: usize = 20;

fn ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("daemon stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the comm.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port(IpAddr::from([127, 0, 1, 1]));
    let ip = |i: usize| IpAddr::from([127, 0, 1, u8::try_from(i + 1).expect("< 255 pods")]);
    let engines: Vec<FakeEngine> = (0..PODS)
        .map(|i| {
            FakeEngine::start(
                SocketAddr::new(ip(i), port),
                &vllm_exposition_sized(EXPOSITION_BYTES, 1),
            )
        })
        .collect();
    let items: Vec<serde_json::Value> = (0..PODS)
        .map(|i| {
            serde_json::json!({
                "kind": "Pod",
                "metadata": {"name": format!("vllm-{i}"), "namespace": "ml",
                             "uid": format!("00000000-0000-0000-0000-{:012}", i + 1),
                             "labels": {"app": "vllm"},
                             "annotations": {"prometheus.io/port": port.to_string()}},
                "spec": {"nodeName": "node-a"},
                "status": {"phase": "Running", "podIP": ip(i).to_string(),
                           "conditions": [{"type": "Ready", "status": "True"}]},
            })
        })
        .collect();
    let pods = dir.path().join("pods.json");
    std::fs::write(
        &pods,
        serde_json::json!({"kind": "List", "items": items}).to_string(),
    )
    .expect("pods");
    let scenario = dir.path().join("gpu.toml");
    std::fs::write(
        &scenario,
        "[[gpu]]\nmemory_total_mib = 81920\nutilization = 0\nmemory_utilization = 0\n",
    )
    .expect("scenario");
    let lo = IpAddr::from([127, 0, 0, 1]);
    let (grpc, http, peer) = (
        SocketAddr::new(lo, free_port(lo)),
        SocketAddr::new(lo, free_port(lo)),
        SocketAddr::new(lo, free_port(lo)),
    );
    let args: Vec<String> = [
        "--node-name",
        "node-a",
        "--attribution",
        "procfs",
        "--gpu",
        "mock",
        "--poll-interval",
        "1s",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "--gpu-scenario".into(),
        scenario.display().to_string(),
        "--pods-file".into(),
        pods.display().to_string(),
        "--listen".into(),
        grpc.to_string(),
        "--metrics-listen".into(),
        http.to_string(),
        "--peer-listen".into(),
        peer.to_string(),
        "--peers".into(),
        format!("node-a={peer}"),
    ])
    .collect();
    let mut serve = ServeProcess::spawn("bench", args, &dir.path().join("serve.log"));
    serve.wait_ready(http);
    let pid = serve.pid();
    let mut client = ExternalScalerClient::connect(format!("http://{grpc}"))
        .await
        .expect("connect");
    let meta: &[(&str, &str)] = &[("podSelector", "app=vllm"), ("metric", "vllm_queue_depth")];
    let want = PODS as f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric_value(&mut client, "ml", "so", meta).await.ok() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "the daemon never read all {PODS} engines"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hz = 100.0; // USER_HZ on Linux
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Warm-up done; measure while KEDA's query keeps the endpoints wanted.
    let t0 = ticks(pid);
    let start = Instant::now();
    let mut polls = 0;
    while start.elapsed() < CPU_WINDOW {
        metric_value(&mut client, "ml", "so", meta)
            .await
            .expect("value");
        polls += 1;
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let cpu = (ticks(pid) - t0) as f64 / hz / start.elapsed().as_secs_f64() * 100.0;
    let reads: u64 = engines.iter().map(FakeEngine::requests).sum();

    // Freshness: one pod's queue moves; time until GetMetrics shows the new sum.
    let mut lags = Vec::new();
    for c in 0..CHANGES {
        let waiting = 2 + (c as u32 % 2);
        engines[0].set(&vllm_exposition_sized(EXPOSITION_BYTES, waiting));
        let changed = Instant::now();
        let want = (PODS - 1) as f64 + f64::from(waiting);
        loop {
            if metric_value(&mut client, "ml", "so", meta).await.ok() == Some(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lags.push(changed.elapsed().as_secs_f64() * 1e3);
        // Changes land at different points of the poll cycle.
        tokio::time::sleep(Duration::from_millis(137 * (c as u64 % 7))).await;
    }
    lags.sort_by(f64::total_cmp);
    println!(
        "engine: {PODS} pods, {} KB expositions, read every 1 s by one gpu-scaler serve (release)",
        EXPOSITION_BYTES / 1024
    );
    println!(
        "  daemon CPU: {cpu:.2} % of one core over {:.0} s ({polls} GetMetrics), RSS {} MiB, {reads} engine reads so far",
        CPU_WINDOW.as_secs_f64(),
        rss_kib(pid) / 1024
    );
    println!(
        "  freshness (gauge change -> GetMetrics): median {:.0} ms, p90 {:.0} ms, max {:.0} ms over {CHANGES} changes (poll 1 s)",
        lags[lags.len() / 2],
        lags[lags.len() * 9 / 10],
        lags[lags.len() - 1]
    );
    let (load1, _) = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
        .unwrap_or_default();
    println!("  load average (1 min) at the end: {load1}");
}
