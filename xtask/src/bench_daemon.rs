//! `cargo xtask bench daemon`: the daemon's resident memory and CPU use at
//! idle (8 mock GPUs, no pods) and with 500 pods running one GPU process each
//! on 8 GPUs, 1 s poll, /metrics scraped every few seconds. Prints figures;
//! asserts nothing.
//!
//! The pods are real: 500 `sleep` processes, each in its own cgroup laid out
//! as the kubelet does (systemd driver, containerd), under a
//! `gpu-scaler-bench` directory of the cgroup v2 mount, named by a PodList
//! file; the release daemon attributes them through /proc (`--attribution
//! procfs`, so the figure does not depend on eBPF being loadable). Needs root
//! for the cgroups.

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
const LISTEN: &str = "127.0.0.1:16100";
const METRICS: &str = "127.0.0.1:16190";

pub fn run(pods: usize, secs: u64, scrape_every: u64) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the daemon bench creates pod cgroups: run it as root");
    }
    super::cargo(&["build", "--release", "--package", "gpu-scaler"])?;
    let binary = Path::new("target/release/gpu-scaler");
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

    let log = fs::File::create(work.join("daemon.log"))?;
    let daemon = Command::new(binary)
        .args(["serve", "--gpu", "mock", "--attribution", "procfs"])
        .args(["--node-name", NODE, "--poll-interval", "1s"])
        .arg("--gpu-scenario")
        .arg(&scenario)
        .arg("--pods-file")
        .arg(&pods_file)
        .args(["--listen", LISTEN, "--metrics-listen", METRICS])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting gpu-scaler serve")?;
    let pid = daemon.id();
    cleanup.children.push(daemon);
    wait_ready(&mut cleanup, &work)?;

    println!(
        "gpu-scaler serve (release), mock source with {GPUS} GPUs, 1 s poll, procfs attribution, \
         /metrics scraped every {scrape_every} s, measured over {secs} s per phase"
    );
    let idle = measure(pid, secs, scrape_every)?;
    idle.print("idle (8 GPUs, no pods)");

    // The load: `pods` real processes in pod cgroups, one per pod, spread
    // over the GPUs.
    let mut load = Vec::with_capacity(pods);
    for i in 0..pods {
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
    // Until the snapshot carries every pod's usage.
    let started = Instant::now();
    loop {
        let snap = http_get(METRICS, "/v1/snapshot")?;
        let snap: Value = serde_json::from_str(&snap).context("/v1/snapshot is not JSON")?;
        let busy = snap["pods"].as_array().map_or(0, |p| {
            p.iter()
                .filter(|p| p["gpus"].as_array().is_some_and(|g| !g.is_empty()))
                .count()
        });
        if busy == pods {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "after 30 s only {busy} of {pods} pods show GPU use; see {}",
                work.join("daemon.log").display()
            );
        }
        thread::sleep(Duration::from_millis(500));
    }
    let loaded = measure(pid, secs, scrape_every)?;
    loaded.print(&format!("{pods} pods on {GPUS} GPUs"));
    drop(cleanup);
    Ok(())
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
    cpu_percent: f64,
    scrapes: usize,
    scrape_bytes: usize,
    scrape_series: usize,
    scrape_ms_median: f64,
}

impl Phase {
    fn print(&self, what: &str) {
        println!(
            "{what}: RSS {:.1} MiB at start, {:.1} MiB at end (peak {:.1} MiB); CPU {:.2} % of one \
             core; {} scrapes of {} series ({:.1} KiB), median {:.2} ms",
            self.rss_start_kib as f64 / 1024.0,
            self.rss_end_kib as f64 / 1024.0,
            self.hwm_kib as f64 / 1024.0,
            self.cpu_percent,
            self.scrapes,
            self.scrape_series,
            self.scrape_bytes as f64 / 1024.0,
            self.scrape_ms_median,
        );
    }
}

fn measure(pid: u32, secs: u64, scrape_every: u64) -> Result<Phase> {
    let rss_start_kib = status_kib(pid, "VmRSS")?;
    let cpu0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    let mut scrape_ms = Vec::new();
    let (mut bytes, mut series) = (0, 0);
    let mut next_scrape = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_scrape {
            let s = Instant::now();
            let body = http_get(METRICS, "/metrics")?;
            scrape_ms.push(s.elapsed().as_secs_f64() * 1e3);
            bytes = body.len();
            series = body.lines().filter(|l| !l.starts_with('#')).count();
            next_scrape += Duration::from_secs(scrape_every);
        }
        thread::sleep(Duration::from_millis(100));
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    scrape_ms.sort_by(f64::total_cmp);
    Ok(Phase {
        rss_start_kib,
        rss_end_kib: status_kib(pid, "VmRSS")?,
        hwm_kib: status_kib(pid, "VmHWM")?,
        cpu_percent: (cpu1 - cpu0) as f64 / hz / elapsed * 100.0,
        scrapes: scrape_ms.len(),
        scrape_bytes: bytes,
        scrape_series: series,
        scrape_ms_median: scrape_ms
            .get(scrape_ms.len() / 2)
            .copied()
            .unwrap_or(f64::NAN),
    })
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

fn wait_ready(cleanup: &mut Cleanup, work: &Path) -> Result<()> {
    let started = Instant::now();
    loop {
        if let Some(c) = cleanup.children.first_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!(
                "the daemon exited ({status}); see {}",
                work.join("daemon.log").display()
            );
        }
        if http_get(METRICS, "/readyz").is_ok() {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "the daemon was not ready within 30 s; see {}",
                work.join("daemon.log").display()
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
