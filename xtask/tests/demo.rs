//! `cargo xtask run --duration N --json` with the loop closed: the real daemon,
//! real pod processes in real cgroups, real gRPC. A short demand curve (a step
//! up, then down) and a short scale-down window; the test reads the JSON lines
//! and checks that the replicas follow the HPA's rule on the value GetMetrics
//! returned, that each decision is carried out, and that scale-down waits for
//! the window. Two demos run at once (GPU and engine signal) to keep it short.
//!
//! Needs root (cgroups) and the debug gpu-scaler binary: `cargo test
//! --workspace` (`cargo xtask test`) builds it; alone, run `cargo build -p
//! gpu-scaler` first.

use std::{
    io::{BufRead as _, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const REQUIRE_ENV: &str = "GPU_SCALER_REQUIRE_KERNEL";
/// Steps of requests in flight: 10, then 32 from t=10, then 8 from t=24.
const DEMAND: &str = "0:10,10:32,24:8";
const STEP_UP_S: f64 = 10.0;
const STEP_DOWN_S: f64 = 24.0;
const WINDOW_S: f64 = 8.0;
const DURATION_S: u64 = 40;
const MIN: u32 = 1;
const MAX: u32 = 7;

/// The xtask process, killed if the test fails before it ends.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn gpu_scaler() -> PathBuf {
    // target/<profile>/deps/<test> -> target/<profile>/gpu-scaler
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .join("gpu-scaler");
    assert!(
        bin.exists(),
        "{} not built; run `cargo build -p gpu-scaler` or `cargo test --workspace`",
        bin.display()
    );
    bin
}

fn free_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").to_string()
}

/// Runs one demo to its end and returns its JSON lines.
fn run_demo(signal: &str, instance: u8) -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let mut child = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(root)
        .args(["run", "--json", "--signal", signal, "--demand", DEMAND])
        .args(["--duration", &DURATION_S.to_string()])
        .args(["--scale-down-window", &(WINDOW_S as u64).to_string()])
        .args(["--min-replicas", &MIN.to_string()])
        .args(["--max-replicas", &MAX.to_string()])
        .args(["--replicas", "3", "--instance", &instance.to_string()])
        .args(["--listen", &free_port(), "--metrics-listen", &free_port()])
        .arg("--binary")
        .arg(gpu_scaler())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start xtask run");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let mut demo = Demo(child);
    let errors = thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let lines: Vec<Value> = BufReader::new(stdout)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("read a line")).expect("each line is JSON"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = demo.0.try_wait().expect("wait for xtask") {
            break s;
        }
        assert!(Instant::now() < deadline, "xtask run did not end");
        thread::sleep(Duration::from_millis(50));
    };
    let errors = errors.join().unwrap_or_default();
    assert!(
        status.success(),
        "{signal}: xtask run failed: {status}\n{errors}"
    );
    assert!(
        lines.len() as u64 >= DURATION_S - 5,
        "{signal}: {} refreshes in {DURATION_S} s\n{errors}",
        lines.len()
    );
    lines
}

fn num(line: &Value, key: &str) -> Option<f64> {
    line.get(key)?.as_f64()
}

fn int(line: &Value, key: &str) -> u32 {
    line.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{key} missing: {line}")) as u32
}

/// The checks both signals share: the HPA's rule on each value, the window,
/// and each decision carried out by the next refresh.
fn follows_the_hpa(signal: &str, lines: &[Value]) {
    // The starting replicas count as a recommendation at t=0 (no scale-down
    // before a window has passed).
    let mut recent: Vec<(f64, u32)> = vec![(0.0, int(&lines[0], "replicas"))];
    for (i, line) in lines.iter().enumerate() {
        let t = num(line, "t").expect("t");
        let replicas = int(line, "replicas");
        let scaled_to = int(line, "scaled_to");
        let vllm_pods = line["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .filter(|p| p["app"] == "vllm")
            .count() as u32;
        assert_eq!(vllm_pods, replicas, "{signal} t={t}: pods running");
        if i > 0 {
            assert_eq!(
                int(&lines[i - 1], "scaled_to"),
                replicas,
                "{signal} t={t}: the previous decision was carried out"
            );
        }
        let (Some(value), Some(target)) = (num(line, "value"), num(line, "target")) else {
            // No answer: the HPA keeps the replicas.
            assert_eq!(scaled_to, replicas, "{signal} t={t}: {line}");
            continue;
        };
        // The HPA's rule (AverageValue), computed here on its own.
        let ratio = value / (target * f64::from(replicas));
        let rule = if (ratio - 1.0).abs() <= 0.1 {
            replicas
        } else {
            ((value / target).ceil() as u32).clamp(MIN, MAX)
        };
        assert_eq!(
            int(line, "recommended"),
            rule,
            "{signal} t={t}: value {value} target {target} on {replicas}"
        );
        // Scale-up at once; scale-down to the highest recommendation of the
        // last WINDOW_S seconds (the window is measured on the demo's clock,
        // which `t` rounds: allow one second either way by checking bounds).
        recent.push((t, rule));
        if rule >= replicas {
            assert_eq!(
                scaled_to, rule,
                "{signal} t={t}: scale-up (or steady) at once"
            );
        } else {
            let held = |w: f64| {
                recent
                    .iter()
                    .filter(|&&(at, _)| at > t - w)
                    .map(|&(_, r)| r)
                    .max()
                    .unwrap_or(rule)
                    .min(replicas)
            };
            let (lo, hi) = (held(WINDOW_S - 1.0), held(WINDOW_S + 1.0));
            assert!(
                (lo..=hi).contains(&scaled_to),
                "{signal} t={t}: scaled to {scaled_to}, the window holds {lo}..={hi}"
            );
        }
    }
}

fn at(lines: &[Value], from: f64, to: f64) -> impl Iterator<Item = &Value> {
    lines.iter().filter(move |l| {
        let t = num(l, "t").unwrap_or(-1.0);
        (from..to).contains(&t)
    })
}

#[test]
fn the_demo_scales_its_pods_as_the_hpa_would() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        let required = std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1");
        assert!(
            !required,
            "root is required ({REQUIRE_ENV}=1) for the demo's pod cgroups"
        );
        eprintln!("SKIPPED: not root (the demo's pods need cgroups); set {REQUIRE_ENV}=1 to fail");
        return;
    }
    let gpu = thread::spawn(|| run_demo("gpu", 41));
    let engine = run_demo("engine", 42);
    let gpu = gpu.join().expect("gpu demo");

    follows_the_hpa("gpu", &gpu);
    follows_the_hpa("engine", &engine);

    // GPU signal. 32 requests need 6 replicas at SM target 60: each then runs
    // 5.3 of its 8 batch slots, 60 % SM, 360 in all. Reached before the drop.
    let settled: Vec<&Value> = at(&gpu, STEP_DOWN_S - 4.0, STEP_DOWN_S).collect();
    assert!(!settled.is_empty());
    for line in &settled {
        assert_eq!(int(line, "replicas"), 6, "after the step up: {line}");
        // What the daemon measured per pod follows demand / replicas.
        for pod in line["pods"].as_array().expect("pods") {
            if pod["app"] == "vllm" {
                let sm = pod["measured_sm"].as_f64();
                assert!(
                    sm.is_some_and(|v| (55.0..=65.0).contains(&v)),
                    "measured SM of {}: {sm:?}",
                    pod["name"]
                );
            }
        }
    }
    // After the drop (8 requests, 90 % SM in all: 2 replicas), the replicas
    // hold for the window, then go.
    let first_lower = at(&gpu, STEP_DOWN_S, 100.0)
        .find(|l| int(l, "recommended") < int(l, "replicas"))
        .expect("a lower recommendation after the drop");
    let t0 = num(first_lower, "t").expect("t");
    for line in at(&gpu, t0, t0 + WINDOW_S - 1.0) {
        assert_eq!(int(line, "replicas"), 6, "held within the window: {line}");
    }
    let last = gpu.last().expect("lines");
    assert_eq!(int(last, "scaled_to"), 2, "after the window: {last}");

    // Engine signal: the engines' queue is read from each pod's own IP, and
    // 32 requests in flight (too many for the replicas at first) scale it up.
    let queued = engine
        .iter()
        .flat_map(|l| l["pods"].as_array().into_iter().flatten())
        .any(|p| p["measured_queue"].as_f64().is_some());
    assert!(queued, "the daemon read no engine's queue");
    let before = at(&engine, STEP_UP_S - 1.0, STEP_UP_S)
        .map(|l| int(l, "replicas"))
        .max()
        .expect("a line before the step");
    let peak = at(&engine, STEP_UP_S, STEP_DOWN_S)
        .map(|l| int(l, "replicas"))
        .max()
        .expect("lines after the step");
    assert!(
        peak > before,
        "engine: {before} -> {peak} after the step up"
    );
}
