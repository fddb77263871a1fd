//! `cargo xtask bench daemon`: the daemon's resident memory and CPU use at
//! idle (8 mock GPUs, no pods) and with 500 pods running one GPU process each
//! on 8 GPUs, 1 s poll, /metrics scraped every few seconds. Prints figures;
//! asserts nothing.
//!
//! The pods are real: 500 `sleep` processes, each in its own cgroup laid out
//! as the kubelet does (systemd driver, containerd), under a
//! `gpu-scaler-bench` directory of the cgroup v2 mount, named by a PodList
//! file; the release daemon attributes them through /proc (`--attribution
//! procfs`, so the figure does not depend on eBPF being loadable; `--attribution
//! ebpf` measures the eBPF backend). Needs root for the cgroups.
//!
//! `--baseline BINARY` runs a second daemon (another build) beside this one on
//! the same pods and scenario, so the two figures share the machine's load:
//! quote them side by side. CPU is read in windows and the median window
//! quoted, with the load average next to it.

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::host::{cgroup2_mount, http_get, write_atomic};

const GPUS: u32 = 8;
const NODE: &str = "bench-node";

/// What `cargo xtask bench daemon` was asked for.
pub struct Options {
    pub pods: usize,
    /// Seconds measured per phase.
    pub secs: u64,
    /// Seconds between scrapes of each daemon's /metrics.
    pub scrape_every: u64,
    /// CPU is read every `window` seconds; the median window is quoted.
    pub window: u64,
    /// `--attribution` of the daemons: `procfs` or `ebpf`.
    pub attribution: String,
    /// Another gpu-scaler binary run beside the fresh build on the same pods
    /// and scenario, so both are measured under the same machine load.
    pub baseline: Option<PathBuf>,
}

/// One daemon under measurement.
struct Daemon {
    label: String,
    pid: u32,
    metrics: String,
    log: PathBuf,
}

pub fn run(o: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the daemon bench creates pod cgroups: run it as root");
    }
    if !matches!(o.attribution.as_str(), "procfs" | "ebpf") {
        bail!("--attribution {:?}: expected procfs or ebpf", o.attribution);
    }
    if o.window == 0 || o.window > o.secs {
        bail!("--window must be between 1 and --secs");
    }
    super::cargo(&["build", "--release", "--package", "gpu-scaler"])?;
    let mut binaries = vec![(
        "this build".to_owned(),
        PathBuf::from("target/release/gpu-scaler"),
    )];
    if let Some(b) = &o.baseline {
        if !b.is_file() {
            bail!("--baseline {}: no such file", b.display());
        }
        binaries.push((format!("baseline {}", b.display()), b.clone()));
    }
    let work = tempfile_dir()?;
    let mount = cgroup2_mount()?;
    let base = mount.join("gpu-scaler-bench");
    let mut cleanup = Cleanup {
        base: base.clone(),
        children: Vec::new(),
        work: work.clone(),
    };
    fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;

    let scenario = work.join("scenario.toml");
    let pods_file = work.join("pods.json");
    write_atomic(&scenario, scenario_toml(&[]).as_bytes())?;
    write_atomic(&pods_file, &serde_json::to_vec(&pod_list(&[]))?)?;

    let mut daemons = Vec::new();
    for (i, (label, binary)) in binaries.iter().enumerate() {
        let log_path = work.join(format!("daemon-{i}.log"));
        let log = fs::File::create(&log_path)?;
        let metrics = format!("127.0.0.1:{}", 16190 + i);
        let child = Command::new(binary)
            .args(["serve", "--gpu", "mock", "--attribution", &o.attribution])
            .args(["--node-name", NODE, "--poll-interval", "1s"])
            .arg("--gpu-scenario")
            .arg(&scenario)
            .arg("--pods-file")
            .arg(&pods_file)
            .args(["--listen", &format!("127.0.0.1:{}", 16100 + i)])
            .args(["--metrics-listen", &metrics])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} serve", binary.display()))?;
        daemons.push(Daemon {
            label: label.clone(),
            pid: child.id(),
            metrics,
            log: log_path,
        });
        cleanup.children.push(child);
    }
    for (i, d) in daemons.iter().enumerate() {
        wait_ready(&mut cleanup.children[i], d)?;
    }

    println!(
        "gpu-scaler serve (release), mock source with {GPUS} GPUs, 1 s poll, {} attribution, \
         /metrics scraped every {} s, measured over {} s per phase (CPU read every {} s; \
         median window and whole phase)",
        o.attribution, o.scrape_every, o.secs, o.window
    );
    let idle = measure(&daemons, o)?;
    for (d, p) in daemons.iter().zip(&idle) {
        p.print(&format!("{}: idle (8 GPUs, no pods)", d.label));
    }

    // The load: `pods` real processes in pod cgroups, one per pod, spread
    // over the GPUs.
    let mut load = Vec::with_capacity(o.pods);
    for i in 0..o.pods {
        let uid = format!("b0000000-0000-4000-8000-{i:012}");
        let container = format!("{i:064x}");
        let dir = base
            .join("kubepods.slice")
            .join("kubepods-burstable.slice")
            .join(format!(
                "kubepods-burstable-pod{}.slice",
                uid.replace('-', "_")
            ))
            .join(format!("cri-containerd-{container}.scope"));
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let child = Command::new("bash")
            .args([
                "-c",
                &format!(
                    "echo $$ > '{}/cgroup.procs' && exec sleep infinity",
                    dir.display()
                ),
            ])
            .stdin(Stdio::null())
            .spawn()
            .context("starting a pod process")?;
        load.push(BenchPod {
            uid,
            container,
            pid: child.id(),
            gpu: i as u32 % GPUS,
            index: i,
        });
        cleanup.children.push(child);
    }
    // Let every process reach its cgroup before the daemon first sees it.
    thread::sleep(Duration::from_millis(500));
    write_atomic(&pods_file, &serde_json::to_vec(&pod_list(&load))?)?;
    write_atomic(&scenario, scenario_toml(&load).as_bytes())?;
    for d in &daemons {
        wait_busy(d, o.pods)?;
    }
    let loaded = measure(&daemons, o)?;
    for (d, p) in daemons.iter().zip(&loaded) {
        p.print(&format!("{}: {} pods on {GPUS} GPUs", d.label, o.pods));
    }
    drop(cleanup);
    Ok(())
}

/// Waits until `d`'s snapshot carries every pod's usage.
fn wait_busy(d: &Daemon, pods: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        let snap = http_get(&d.metrics, "/v1/snapshot")?;
        let snap: Value = serde_json::from_str(&snap).context("/v1/snapshot is not JSON")?;
        let listed = snap["pods"].as_array().map_or(&[][..], Vec::as_slice);
        let busy = listed
            .iter()
            .filter(|p| p["gpus"].as_array().is_some_and(|g| !g.is_empty()))
            .count();
        if busy == pods {
            // The PodList's containerStatuses name each pod's container `main`;
            // a baseline binary from before the per-container split names none.
            let named = listed
                .iter()
                .filter(|p| {
                    p["containers"]
                        .as_array()
                        .is_some_and(|c| c.len() == 1 && c[0]["name"] == "main")
                })
                .count();
            println!(
                "{}: {named} of {pods} pods' GPU use attributed to their container \"main\"",
                d.label
            );
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "{}: after 30 s only {busy} of {pods} pods show GPU use; see {}",
                d.label,
                d.log.display()
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
}

struct BenchPod {
    uid: String,
    container: String,
    pid: u32,
    gpu: u32,
    index: usize,
}

/// Figures of one phase.
struct Phase {
    rss_start_kib: u64,
    rss_end_kib: u64,
    hwm_kib: u64,
    /// CPU % of one core over each window, sorted.
    cpu_windows: Vec<f64>,
    /// CPU % of one core over the whole phase.
    cpu_percent: f64,
    /// The 1-minute load average at the start and the end of the phase.
    load: (f64, f64),
    scrapes: usize,
    scrape_bytes: usize,
    scrape_series: usize,
    scrape_ms_median: f64,
}

impl Phase {
    fn print(&self, what: &str) {
        println!(
            "{what}: RSS {:.1} MiB at start, {:.1} MiB at end (peak {:.1} MiB); CPU {:.2} % of one \
             core (median of {} windows; {:.2} .. {:.2}; {:.2} over the phase); load average \
             {:.2} -> {:.2}; {} scrapes of {} series ({:.1} KiB), median {:.2} ms",
            self.rss_start_kib as f64 / 1024.0,
            self.rss_end_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0,
            median(&self.cpu_windows),
            self.cpu_windows.len(),
            self.cpu_windows.first().copied().unwrap_or(f64::NAN),
            self.cpu_windows.last().copied().unwrap_or(f64::NAN),
            self.cpu_percent,
            self.load.0,
            self.load.1,
            self.scrapes,
            self.scrape_series,
            self.scrape_bytes as f64 / 1024.0,
            self.scrape_ms_median,
        );
    }
}

/// The middle value of sorted `v` (NaN when empty).
fn median(v: &[f64]) -> f64 {
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn load_average() -> Result<f64> {
    let text = fs::read_to_string("/proc/loadavg")?;
    text.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .context("odd /proc/loadavg")
}

/// Measures every daemon over the same `o.secs`, so they share the machine's
/// load; each daemon's /metrics is scraped every `o.scrape_every` seconds.
fn measure(daemons: &[Daemon], o: &Options) -> Result<Vec<Phase>> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let load0 = load_average()?;
    let mut rss_start = Vec::new();
    for d in daemons {
        rss_start.push(status_kib(d.pid, "VmRSS")?);
    }
    let ticks = || -> Result<Vec<u64>> { daemons.iter().map(|d| cpu_ticks(d.pid)).collect() };
    let first = ticks()?;
    let t0 = Instant::now();
    let mut window_start = (t0, first.clone());
    let mut windows: Vec<Vec<f64>> = vec![Vec::new(); daemons.len()];
    let mut scrape_ms: Vec<Vec<f64>> = vec![Vec::new(); daemons.len()];
    let mut sizes = vec![(0, 0); daemons.len()];
    let mut next_scrape = Instant::now();
    let mut next_window = t0 + Duration::from_secs(o.window);
    let n_windows = (o.secs / o.window) as usize;
    // Until the phase is over and its last window read.
    while t0.elapsed() < Duration::from_secs(o.secs)
        || windows.first().is_some_and(|w| w.len() < n_windows)
    {
        if Instant::now() >= next_scrape {
            for (i, d) in daemons.iter().enumerate() {
                let s = Instant::now();
                let body = http_get(&d.metrics, "/metrics")?;
                scrape_ms[i].push(s.elapsed().as_secs_f64() * 1e3);
                sizes[i] = (
                    body.len(),
                    body.lines().filter(|l| !l.starts_with('#')).count(),
                );
            }
            next_scrape += Duration::from_secs(o.scrape_every);
        }
        if Instant::now() >= next_window {
            let now = (Instant::now(), ticks()?);
            let secs = now.0.duration_since(window_start.0).as_secs_f64();
            for (i, w) in windows.iter_mut().enumerate() {
                w.push((now.1[i] - window_start.1[i]) as f64 / hz / secs * 100.0);
            }
            window_start = now;
            next_window += Duration::from_secs(o.window);
        }
        thread::sleep(Duration::from_millis(100));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let last = ticks()?;
    let load1 = load_average()?;
    let mut phases = Vec::new();
    for (i, d) in daemons.iter().enumerate() {
        let mut w = std::mem::take(&mut windows[i]);
        w.sort_by(f64::total_cmp);
        let mut ms = std::mem::take(&mut scrape_ms[i]);
        ms.sort_by(f64::total_cmp);
        phases.push(Phase {
            rss_start_kib: rss_start[i],
            rss_end_kib: status_kib(d.pid, "VmRSS")?,
            hwm_kib: status_kib(d.pid, "VmHWM")?,
            cpu_windows: w,
            cpu_percent: (last[i] - first[i]) as f64 / hz / elapsed * 100.0,
            load: (load0, load1),
            scrapes: ms.len(),
            scrape_bytes: sizes[i].0,
            scrape_series: sizes[i].1,
            scrape_ms_median: median(&ms),
        });
    }
    Ok(phases)
}

/// utime + stime of `pid`, in clock ticks (fields 14 and 15 of /proc/pid/stat).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).context("the daemon is gone")?;
    // The command name may contain spaces: count fields after its ')'.
    let rest = stat.rsplit_once(')').context("odd /proc/pid/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).context("the daemon is gone")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

fn wait_ready(child: &mut Child, d: &Daemon) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{} exited ({status}); see {}", d.label, d.log.display());
        }
        if http_get(&d.metrics, "/readyz").is_ok() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "{} was not ready within 30 s; see {}",
                d.label,
                d.log.display()
            );
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The mock scenario (README's format): 8 GPUs, each pod's process on its GPU.
fn scenario_toml(pods: &[BenchPod]) -> String {
    let mut s = String::from("# Written by `cargo xtask bench daemon`.\n");
    for gpu in 0..GPUS {
        let on: Vec<&BenchPod> = pods.iter().filter(|p| p.gpu == gpu).collect();
        let _ = write!(
            s,
            "\n[[gpu]]\nname = \"Bench GPU {gpu}\"\nmemory_total_mib = 81559\nutilization = {}\n\
             memory_utilization = 10\ntemperature_c = 50\npower_w = 300.0\npower_limit_w = 700.0\n",
            on.len().min(100),
        );
        for p in on {
            let _ = write!(
                s,
                "\n[[gpu.process]]\npid = {}\nsm_util = {}\nmem_util = 1\nused_memory_mib = {}\n",
                p.pid,
                1 + p.index % 3,
                100 + p.index % 50,
            );
        }
    }
    s
}

/// The pods as `kubectl get pods -A -o json` prints them.
fn pod_list(pods: &[BenchPod]) -> Value {
    let items: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": format!("worker-{}", p.index), "namespace": "bench",
                             "uid": p.uid, "labels": {"app": format!("app-{}", p.index % 20)}},
                "spec": {"nodeName": NODE, "containers": [{"name": "main", "image": "bench"}]},
                "status": {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [{"name": "main", "ready": true,
                                           "containerID": format!("containerd://{}", p.container)}]
                }
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}})
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("gpu-scaler-bench-daemon-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Kills what the bench started and removes its cgroups (deepest first) and
/// files, also when it fails half-way.
struct Cleanup {
    base: PathBuf,
    children: Vec<Child>,
    work: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut dirs = Vec::new();
        collect_dirs(&self.base, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            let _ = fs::remove_dir(&d);
        }
        let _ = fs::remove_dir(&self.base);
        let _ = fs::remove_dir_all(&self.work);
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let p = e.path();
            collect_dirs(&p, out);
            out.push(p);
        }
    }
}
