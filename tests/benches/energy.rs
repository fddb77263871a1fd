//! The energy split against the device counter (a benchmark that prints,
//! never asserts): the daemon's real NVML code reads the fake
//! `libnvidia-ml.so`, whose energy counters integrate a rippling power over
//! time, for `GPU_SCALER_BENCH_SECS` seconds (default 60) at a 1 s poll, while
//! the load changes every 10 s. /metrics is scraped at the start and the end;
//! per GPU the increase of the pods' energy counters plus the unattributed
//! ones is set against the increase of the device's own counter. It also
//! prints how much the instantaneous power and the counter's mean per pass
//! vary on the rippling GPU.
//!
//! Run: `cargo xtask bench energy` (or `cargo bench -p gpu-scaler-tests
//! --bench energy`; the accounting is not speed-sensitive, so `--profile dev`
//! reuses the test build).
//!
//! The node: GPU 0 shared by pods a and b and a host process, GPU 1 owned by
//! pod c alone (its SM share unknown: exact anyway), GPU 2 under MPS with
//! clients of a and b (no split: unattributed), GPU 3 with no process (idle
//! draw: unattributed).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use gpu_scaler_tests::{
    fake_nvml::FakeNvml,
    scaler::{Node, pod},
};

const POLL: Duration = Duration::from_secs(1);

/// The node's GPUs at load `step` (0, 1, 2, ...: every 10 s).
fn scenario(step: u32) -> String {
    let (w, a, b, host) = match step % 3 {
        0 => (420.0, 50, 25, 10),
        1 => (610.0, 70, 20, 5),
        _ => (250.0, 10, 30, 0),
    };
    format!(
        r#"
[[gpu]]
uuid = "GPU-shared"
utilization = {util}
memory_utilization = 10
memory_total_mib = 81920
power_w = {w}
power_ripple_w = 60.0
[[gpu.process]]
pid = 11
sm_util = {a}
used_memory_mib = 20000
[[gpu.process]]
pid = 21
sm_util = {b}
used_memory_mib = 10000
[[gpu.process]]
pid = 90
sm_util = {host}
used_memory_mib = 500

[[gpu]]
uuid = "GPU-owned"
memory_total_mib = 81920
power_w = {owned}
power_ripple_w = 30.0
[[gpu.process]]
pid = 31
used_memory_mib = 40000

[[gpu]]
uuid = "GPU-mps"
utilization = 85
memory_utilization = 30
memory_total_mib = 81920
power_w = 300.0
mps_server = 900
[[gpu.process]]
pid = 900
name = "/usr/bin/nvidia-cuda-mps-server"
used_memory_mib = 300
[[gpu.process]]
pid = 12
kind = "mps"
sm_util = 40
used_memory_mib = 20000
[[gpu.process]]
pid = 22
kind = "mps"
sm_util = 45
used_memory_mib = 30000

[[gpu]]
uuid = "GPU-idle"
utilization = 0
memory_utilization = 0
memory_total_mib = 81920
power_w = 62.5
"#,
        util = a + b + host,
        owned = 200.0 + 100.0 * f64::from(step % 2),
    )
}

/// `family{labels} value` lines of an exposition: (labels, value).
fn series<'a>(text: &'a str, family: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?.strip_prefix('{')?;
            let (labels, v) = rest.split_once("} ")?;
            Some((labels, v.split(' ').next()?.parse().ok()?))
        })
        .collect()
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.trim_matches('"'))
    })
}

/// Per GPU: (device J, pods J, unattributed J by reason), and per pod J.
#[derive(Default, Debug)]
struct Reading {
    device: BTreeMap<String, f64>,
    pods: BTreeMap<String, f64>,
    unattributed: BTreeMap<(String, String), f64>,
    per_pod: BTreeMap<String, f64>,
}

fn read(text: &str) -> Reading {
    let mut r = Reading::default();
    for (l, v) in series(text, "gpu_scaler_device_energy_joules_total") {
        *r.device
            .entry(label(l, "gpu").unwrap_or("?").into())
            .or_default() += v;
    }
    for (l, v) in series(text, "gpu_scaler_pod_energy_joules_total") {
        *r.pods
            .entry(label(l, "gpu").unwrap_or("?").into())
            .or_default() += v;
        *r.per_pod
            .entry(label(l, "pod").unwrap_or("?").into())
            .or_default() += v;
    }
    for (l, v) in series(text, "gpu_scaler_unattributed_energy_joules_total") {
        let key = (
            label(l, "gpu").unwrap_or("?").to_owned(),
            label(l, "reason").unwrap_or("?").to_owned(),
        );
        *r.unattributed.entry(key).or_default() += v;
    }
    r
}

fn stddev(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::var("GPU_SCALER_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let fake = FakeNvml::new(&scenario(0));
    let node = Node::start_with_nvml(POLL, fake.lib_path()).await;
    node.set_pods(vec![
        pod("ml", "a", "ua", &[("app", "x")]),
        pod("ml", "b", "ub", &[("app", "x")]),
        pod("ml", "c", "uc", &[("app", "y")]),
    ]);
    for (pid, uid) in [(11, "ua"), (12, "ua"), (21, "ub"), (22, "ub"), (31, "uc")] {
        node.attributor.assign(pid, uid);
    }
    node.attributor.assign_host(90);
    node.attributor.assign_host(900);

    // Start once the ledger has booked a pass on every GPU.
    let started_wait = Instant::now();
    let start = loop {
        let (_, text) = node.http_get("/metrics").await;
        let r = read(&text);
        if r.device.len() == 4 && r.pods.len() >= 2 {
            break r;
        }
        if started_wait.elapsed() > Duration::from_secs(30) {
            eprintln!("no energy booked after 30 s:\n{text}");
            std::process::exit(1);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let t0 = Instant::now();
    let mut instant = Vec::new();
    let mut mean = Vec::new();
    let mut last_taken = None;
    let mut step = 0;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let due = (t0.elapsed().as_secs() / 10) as u32;
        if due != step {
            step = due;
            fake.set_scenario(&scenario(step));
        }
        let snap = node.snapshots().borrow().clone();
        if snap.samples_taken_at != last_taken {
            last_taken = snap.samples_taken_at;
            // Only passes of one load: the ripple, not the load steps.
            if let Some(g) = snap.gpus.first()
                && step % 3 == 0
                && t0.elapsed().as_secs() % 10 >= 2
                && let (Some(i), Some(m)) = (g.power_w.ok(), g.counters.energy_pass.ok())
            {
                instant.push(i);
                mean.push(m.watts());
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let (_, text) = node.http_get("/metrics").await;
    let end = read(&text);
    node.stop().await;

    println!(
        "energy split over {elapsed:.1} s at a {POLL:?} poll (fake libnvidia-ml.so, load changes every 10 s)"
    );
    println!(
        "{:>4} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12} {:>11}",
        "GPU", "device J", "pods J", "no_pod J", "no_proc J", "unsplit J", "sum J", "error"
    );
    let mut worst: f64 = 0.0;
    for (gpu, d1) in &end.device {
        let d = d1 - start.device.get(gpu).copied().unwrap_or(0.0);
        let pods =
            end.pods.get(gpu).copied().unwrap_or(0.0) - start.pods.get(gpu).copied().unwrap_or(0.0);
        let un = |reason: &str| {
            let k = (gpu.clone(), reason.to_owned());
            end.unattributed.get(&k).copied().unwrap_or(0.0)
                - start.unattributed.get(&k).copied().unwrap_or(0.0)
        };
        let (no_pod, no_proc, unsplit) = (un("no_pod"), un("no_process"), un("unsplit"));
        let sum = pods + no_pod + no_proc + unsplit;
        let err = (sum - d) / d;
        worst = worst.max(err.abs());
        println!(
            "{gpu:>4} {d:>12.1} {pods:>12.1} {no_pod:>12.1} {no_proc:>12.1} {unsplit:>12.1} {sum:>12.1} {:>11.1e}",
            err
        );
    }
    println!("largest |sum - device| / device: {worst:.1e} (target: within 1 %, 1e-2)");
    for (p, j) in &end.per_pod {
        let j = j - start.per_pod.get(p).copied().unwrap_or(0.0);
        println!("  pod ml/{p}: {j:.1} J");
    }
    let (mi, si) = stddev(&instant);
    let (mm, sm) = stddev(&mean);
    println!(
        "GPU 0 at a steady 420 W load with a 60 W ripple, {} passes: instantaneous {mi:.1} W +- {si:.1}, energy-counter mean per pass {mm:.1} W +- {sm:.1}",
        instant.len()
    );
}
