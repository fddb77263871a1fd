//! The sampler's join and the /metrics rendering of its per-pod series, for a
//! busy node: 500 pods on 8 GPUs, each pod with two containers running one GPU
//! process each (1,000 processes), pods named by a PodList with their
//! container statuses. Prints medians; asserts nothing.
//!
//! `cargo xtask bench join` (or `cargo bench -p gpu-scaler-tests --bench join`).
//! Environment: `JOIN_BENCH_ITERS` (default 2000).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use gpu_scaler::{
    attribution::{Attribution, Backend, Owner, PodIdentity, QosClass, Runtime},
    gpu::{GpuDevice, GpuProcess, GpuSnapshot, GpuStatus, ProcessKind},
    join,
    pods::{PodSet, file},
    scaler,
    snapshot::Reading,
    telemetry::metrics::{self, Sources},
    testing::Attributions,
};

const PODS: u32 = 500;
const GPUS: u32 = 8;
const CONTAINERS: [&str; 2] = ["server", "sidecar"];

fn uid(i: u32) -> String {
    format!("b0000000-0000-4000-8000-{i:012}")
}

fn cid(i: u32, c: usize) -> String {
    format!("{:064x}", u64::from(i) * 16 + c as u64)
}

fn pid(i: u32, c: usize) -> u32 {
    10_000 + i * 4 + c as u32
}

/// The PodList, parsed by the file source's parser.
fn pods() -> PodSet {
    let items: Vec<serde_json::Value> = (0..PODS)
        .map(|i| {
            let statuses: Vec<serde_json::Value> = CONTAINERS
                .iter()
                .enumerate()
                .map(|(c, name)| {
                    serde_json::json!({"name": name, "ready": true,
                                       "containerID": format!("containerd://{}", cid(i, c))})
                })
                .collect();
            serde_json::json!({
                "kind": "Pod",
                "metadata": {"name": format!("worker-{i}"), "namespace": "bench", "uid": uid(i),
                             "labels": {"app": format!("app-{}", i % 20)}},
                "spec": {"nodeName": "n1"},
                "status": {"phase": "Running", "containerStatuses": statuses}
            })
        })
        .collect();
    let text = serde_json::json!({"kind": "List", "items": items}).to_string();
    let pods = file::parse("bench", &text).expect("the bench's PodList parses");
    PodSet::from_pods(pods, Some("n1".into()), "bench")
}

fn attributor() -> Attributions {
    let mut t = HashMap::new();
    for i in 0..PODS {
        for c in 0..CONTAINERS.len() {
            t.insert(
                pid(i, c),
                Attribution {
                    cgroup_id: None,
                    cgroup_path: "/kubepods.slice/x".into(),
                    owner: Owner::Pod(PodIdentity {
                        pod_uid: uid(i),
                        container_id: Some(cid(i, c)),
                        runtime: Some(Runtime::Containerd),
                        qos: QosClass::Burstable,
                        is_conmon: false,
                    }),
                    backend: Backend::Procfs,
                },
            );
        }
    }
    Attributions::from_table(t)
}

fn gpus() -> GpuStatus {
    let devices = (0..GPUS)
        .map(|g| {
            let processes = (0..PODS)
                .filter(|i| i % GPUS == g)
                .flat_map(|i| {
                    (0..CONTAINERS.len()).map(move |c| GpuProcess {
                        pid: pid(i, c),
                        kind: ProcessKind::Compute,
                        used_memory_mib: Reading::Ok(100 + u64::from(i % 50)),
                        sm_util: Reading::Ok(1 + i % 3),
                        mem_util: Reading::Ok(1),
                        gpu_instance_id: None,
                    })
                })
                .collect();
            GpuDevice {
                index: g,
                uuid: format!("GPU-{g}"),
                name: "Bench GPU".into(),
                sm_util: Reading::Ok(80),
                mem_util: Reading::Ok(10),
                memory_used_mib: Reading::Ok(30_000),
                memory_total_mib: Reading::Ok(81_559),
                temperature_c: Reading::Ok(50),
                power_w: Reading::Ok(300.0),
                power_limit_w: Reading::Ok(700.0),
                mig_enabled: false,
                mig_instance: None,
                counters: gpu_scaler::gpu::DeviceCounters::default(),
                processes,
                processes_error: None,
            }
        })
        .collect();
    GpuStatus {
        last_good: Some(Arc::new(GpuSnapshot {
            taken_at: SystemTime::now(),
            devices,
        })),
        error: None,
        updated_at: SystemTime::now(),
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let iters: usize = std::env::var("JOIN_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let (pods, table, status) = (pods(), attributor(), gpus());
    // The daemon's registry: the join's and the scaler's families beside
    // the snapshot's gauges.
    let mut registry = metrics::registry();
    join::Metrics::new("nvml").register(&mut registry);
    scaler::Metrics::default().register(&mut registry);
    let mut join_t = Vec::with_capacity(iters);
    let mut render_t = Vec::with_capacity(iters);
    let mut bytes = 0;
    for _ in 0..iters {
        let t = Instant::now();
        let snap = join::join(&status, &pods, &table, SystemTime::now());
        join_t.push(t.elapsed());
        let t = Instant::now();
        let out = metrics::render(&snap, &Sources::node(&registry), SystemTime::now());
        render_t.push(t.elapsed());
        bytes = out.len();
    }
    println!(
        "{PODS} pods x {} containers, {} GPU processes on {GPUS} GPUs, {iters} iterations:",
        CONTAINERS.len(),
        PODS as usize * CONTAINERS.len()
    );
    println!(
        "  join (join::join)        median {:>8.1} µs",
        median(join_t).as_secs_f64() * 1e6
    );
    println!(
        "  /metrics render             median {:>8.1} µs  ({bytes} bytes)",
        median(render_t).as_secs_f64() * 1e6
    );
}
