//! `cargo xtask run`: the whole thing on one machine without a GPU or a cluster.
//!
//! Demo "pods" are real processes in kubelet-style cgroups (systemd and cgroupfs
//! driver layouts, nested under a demo directory the way kind nests a node), the GPU
//! figures come from a mock scenario this task rewrites every second to ramp the
//! load, and the pods come from a PodList file. The daemon attributes the processes
//! with eBPF (procfs when not root), and the live view shows what it measured per
//! pod, the value KEDA would get and the replicas an HPA would set.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::host::{cgroup2_mount, http_get, write_atomic};

/// Options of `cargo xtask run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Address the daemon serves KEDA's ExternalScaler on.
    #[arg(long, default_value = "127.0.0.1:6000")]
    pub listen: String,
    /// Address of the daemon's HTTP listener (/healthz, /readyz, /metrics).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub metrics_listen: String,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Print one JSON object per refresh instead of redrawing the screen.
    #[arg(long)]
    pub json: bool,
}

const NAMESPACE: &str = "demo";
const NODE: &str = "demo-node";
/// What the vLLM ScaledObject in the demo would say.
const VLLM_QUERY: &[&str] = &[
    "podSelector=app=vllm",
    "metric=gpu_utilization",
    "targetValue=60",
];

/// One demo pod: a namespace/name with labels, one container, one process.
struct DemoPod {
    name: &'static str,
    app: &'static str,
    uid: String,
    container_id: String,
    /// GPU index the process runs on.
    gpu: u32,
    /// cgroup directory of the container, relative to the demo base.
    cgroup: PathBuf,
    pid: u32,
}

pub fn run(binary: &Path, args: RunArgs) -> Result<()> {
    let root = is_root();
    let work = PathBuf::from("target/demo");
    fs::create_dir_all(&work).context("creating target/demo")?;
    let work = work.canonicalize()?;

    let base = cgroup_base(root)?;
    let mut cleanup = Cleanup {
        base: base.clone(),
        children: Vec::new(),
        dirs: Vec::new(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing Ctrl-C handler")?;
    }

    let mut pods = demo_pods();
    for (i, pod) in pods.iter_mut().enumerate() {
        let dir = base.as_ref().map(|b| b.join(&pod.cgroup));
        if let Some(dir) = &dir {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
            cleanup.dirs.push(dir.clone());
        }
        let child = spawn_pod_process(dir.as_deref(), i)?;
        pod.pid = child.id();
        cleanup.children.push(child);
    }

    let pods_file = work.join("pods.json");
    write_atomic(&pods_file, &serde_json::to_vec_pretty(&pod_list(&pods))?)?;
    let scenario = work.join("scenario.toml");
    write_atomic(&scenario, scenario_at(&pods, 0.0).as_bytes())?;

    let attribution = if root { "auto" } else { "procfs" };
    if !root {
        eprintln!(
            "note: not root, so the daemon attributes through /proc instead of eBPF and the demo \
             pods live in {}",
            base.as_ref().map_or(
                "this shell's cgroup (they will show as host processes)".into(),
                |b| b.display().to_string()
            )
        );
    }
    let log = fs::File::create(work.join("daemon.log"))?;
    let daemon = Command::new(binary)
        .args([
            "serve",
            "--gpu",
            "mock",
            "--attribution",
            attribution,
            "--node-name",
            NODE,
        ])
        .arg("--gpu-scenario")
        .arg(&scenario)
        .arg("--pods-file")
        .arg(&pods_file)
        .args([
            "--listen",
            &args.listen,
            "--metrics-listen",
            &args.metrics_listen,
        ])
        .args(["--poll-interval", "1s", "--exit-grace", "5s"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting gpu-scaler serve")?;
    cleanup.children.push(daemon);
    eprintln!(
        "gpu-scaler serving KEDA's ExternalScaler on {} (daemon log: {}); Ctrl-C to stop",
        args.listen,
        work.join("daemon.log").display()
    );

    let started = Instant::now();
    let mut replicas: u64 = 3;
    while !stop.load(Ordering::SeqCst) {
        let t = started.elapsed().as_secs_f64();
        if args.duration.is_some_and(|d| t >= d as f64) {
            break;
        }
        write_atomic(&scenario, scenario_at(&pods, t).as_bytes())?;
        if let Some(status) = cleanup
            .children
            .last_mut()
            .and_then(|d| d.try_wait().transpose())
        {
            bail!(
                "the daemon exited ({}); see {}",
                status?,
                work.join("daemon.log").display()
            );
        }
        let snapshot = http_get(&args.metrics_listen, "/v1/snapshot").and_then(|body| {
            serde_json::from_str::<Value>(&body).context("/v1/snapshot: not JSON")
        });
        let query = query(binary, &args.listen, replicas);
        if let Ok(q) = &query
            && let Some(r) = q.get("desired_replicas").and_then(Value::as_u64)
        {
            replicas = r.max(1);
        }
        render(&pods, t, snapshot, query, args.json);
        thread::sleep(Duration::from_secs(1));
    }
    drop(cleanup);
    Ok(())
}

/// Three replicas of app=vllm and one other app, sharing two mock GPUs.
fn demo_pods() -> Vec<DemoPod> {
    let spec: [(&str, &str, u32, bool); 4] = [
        ("vllm-0", "vllm", 0, true),
        ("vllm-1", "vllm", 0, true),
        ("vllm-2", "vllm", 1, true),
        ("embedder-0", "embedder", 1, false),
    ];
    spec.iter()
        .enumerate()
        .map(|(i, &(name, app, gpu, systemd))| {
            let uid = format!("de30{i:04x}-1111-4222-8333-{:012x}", 0xabc000 + i);
            let container_id = format!("{:064x}", 0xc0ffee00u64 + i as u64);
            // Both kubelet cgroup drivers, as real nodes have them.
            let cgroup = if systemd {
                let qos = "burstable";
                PathBuf::from(format!(
                    "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice/cri-containerd-{container_id}.scope",
                    uid.replace('-', "_")
                ))
            } else {
                PathBuf::from(format!("kubepods/besteffort/pod{uid}/{container_id}"))
            };
            DemoPod { name, app, uid, container_id, gpu, cgroup, pid: 0 }
        })
        .collect()
}

/// Per-pod SM demand at time `t`: the vLLM replicas follow a slow wave between
/// 15 % and 45 % (two of them share GPU 0, so the device never exceeds 100 %) and
/// the HPA's answer moves between 1 and 3 replicas at target 60; the embedder is
/// steady.
fn demand(pod: &DemoPod, t: f64) -> u32 {
    if pod.app == "vllm" {
        let phase = (t / 40.0 * std::f64::consts::TAU).sin();
        (30.0 + 15.0 * phase).round().clamp(0.0, 100.0) as u32
    } else {
        25
    }
}

/// The mock GPU scenario (README's format) at time `t`.
fn scenario_at(pods: &[DemoPod], t: f64) -> String {
    let mut s = String::from("# Written by `cargo xtask run` every second.\n");
    for gpu in 0..2u32 {
        let on: Vec<&DemoPod> = pods.iter().filter(|p| p.gpu == gpu).collect();
        let util: u32 = on.iter().map(|p| demand(p, t)).sum::<u32>().min(100);
        let _ = write!(
            s,
            "\n[[gpu]]\nname = \"Demo GPU {gpu}\"\nmemory_total_mib = 81559\nutilization = {util}\n\
             memory_utilization = {}\ntemperature_c = {}\npower_w = {:.1}\npower_limit_w = 700.0\n",
            util / 2,
            40 + util / 3,
            100.0 + 5.0 * f64::from(util),
        );
        for p in on {
            let d = demand(p, t);
            let _ = write!(
                s,
                "\n[[gpu.process]]\npid = {}\nsm_util = {d}\nmem_util = {}\nused_memory_mib = {}\n",
                p.pid,
                d / 2,
                8_000 + 200 * u64::from(d)
            );
        }
    }
    s
}

/// The pods as `kubectl get pods -A -o json` prints them.
fn pod_list(pods: &[DemoPod]) -> Value {
    let items: Vec<Value> = pods
        .iter()
        .map(|p| {
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": p.name, "namespace": NAMESPACE, "uid": p.uid, "labels": {"app": p.app}},
                "spec": {"nodeName": NODE, "containers": [{"name": p.app, "image": format!("demo/{}:latest", p.app)}]},
                "status": {
                    "phase": "Running",
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [{"name": p.app, "ready": true, "containerID": format!("containerd://{}", p.container_id)}]
                }
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}})
}

fn query(binary: &Path, listen: &str, replicas: u64) -> Result<Value> {
    let out = Command::new(binary)
        .args([
            "query",
            "--json",
            "--address",
            &format!("http://{listen}"),
            "--namespace",
            NAMESPACE,
        ])
        .args(["--replicas", &replicas.to_string()])
        .args(VLLM_QUERY)
        .stderr(Stdio::piped())
        .output()
        .context("running gpu-scaler query")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("parsing `gpu-scaler query --json`")
}

fn render(
    pods: &[DemoPod],
    t: f64,
    snapshot: Result<Value>,
    query: Result<Value>,
    json_lines: bool,
) {
    if json_lines {
        let line = json!({
            "t": t.round(),
            "snapshot": snapshot.as_ref().map_err(|e| format!("{e:#}")).ok(),
            "query": query.as_ref().ok(),
            "query_error": query.as_ref().err().map(|e| format!("{e:#}")),
        });
        println!("{line}");
        return;
    }
    let mut out = String::from("\x1b[2J\x1b[H");
    let _ = writeln!(
        out,
        "gpu-scaler demo  t={t:>4.0}s  namespace={NAMESPACE}  node={NODE}\n"
    );
    let _ = writeln!(
        out,
        "{:<12} {:<9} {:<10} {:>7} {:<5} {:>9} {:>10} {:>10}",
        "POD", "APP", "CONTAINER", "PID", "GPU", "DEMAND%", "MEASURED%", "MEM MiB"
    );
    for p in pods {
        let measured = snapshot
            .as_ref()
            .ok()
            .and_then(|s| pod_figure(s, &p.uid, "sm_util"))
            .map_or("-".into(), |v| format!("{v:.0}"));
        let mem = snapshot
            .as_ref()
            .ok()
            .and_then(|s| pod_figure(s, &p.uid, "memory_used_mib"))
            .map_or("-".into(), |v| format!("{v:.0}"));
        let container = snapshot
            .as_ref()
            .ok()
            .and_then(|s| pod_containers(s, &p.uid))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<12} {:<9} {:<10} {:>7} {:<5} {:>9} {:>10} {:>10}",
            p.name,
            p.app,
            container,
            p.pid,
            p.gpu,
            demand(p, t),
            measured,
            mem
        );
    }
    let _ = writeln!(out, "\nScaledObject trigger: {}", VLLM_QUERY.join(" "));
    match &query {
        Ok(q) => {
            let _ = writeln!(
                out,
                "KEDA GetMetrics value: {}   IsActive: {}   HPA: {} -> {} replicas",
                q.get("value").map_or("?".into(), Value::to_string),
                q.get("active").map_or("?".into(), Value::to_string),
                q.get("current_replicas")
                    .map_or("?".into(), Value::to_string),
                q.get("desired_replicas")
                    .map_or("?".into(), Value::to_string),
            );
        }
        Err(e) => {
            let _ = writeln!(out, "KEDA query: {e:#}");
        }
    }
    let _ = writeln!(out, "\nCtrl-C to stop.");
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// The sum of one per-GPU figure of a pod in the daemon's /v1/snapshot.
fn pod_figure(snapshot: &Value, uid: &str, field: &str) -> Option<f64> {
    let pod = snapshot
        .get("pods")?
        .as_array()?
        .iter()
        .find(|p| p.pointer("/pod/uid").and_then(Value::as_str) == Some(uid))?;
    let gpus = pod.get("gpus")?.as_array()?;
    let mut sum = 0.0;
    for g in gpus {
        sum += g.get(field)?.get("ok")?.as_f64()?;
    }
    Some(sum)
}

/// The containers of a pod that use a GPU in the daemon's /v1/snapshot, by the
/// names its status gives them (`(sandbox)` for the pause container, `?` when
/// the daemon could not tell).
fn pod_containers(snapshot: &Value, uid: &str) -> Option<String> {
    let pod = snapshot
        .get("pods")?
        .as_array()?
        .iter()
        .find(|p| p.pointer("/pod/uid").and_then(Value::as_str) == Some(uid))?;
    let names: Vec<&str> = pod
        .get("containers")?
        .as_array()?
        .iter()
        .map(|c| match c.get("role").and_then(Value::as_str) {
            Some("container") => c.get("name").and_then(Value::as_str).unwrap_or("?"),
            Some("sandbox") => "(sandbox)",
            _ => "?",
        })
        .collect();
    (!names.is_empty()).then(|| names.join(","))
}

/// Where the demo creates its cgroups: a `gpu-scaler-demo` directory under the
/// cgroup v2 mount when root, else under this process's own cgroup if it is
/// delegated to us (systemd user sessions), else nowhere.
fn cgroup_base(root: bool) -> Result<Option<PathBuf>> {
    let mount = cgroup2_mount()?;
    let candidate = if root {
        mount.join("gpu-scaler-demo")
    } else {
        let own = fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or("/")
            .trim_start_matches('/')
            .to_owned();
        mount
            .join(rel)
            .parent()
            .map(|p| p.join("gpu-scaler-demo"))
            .unwrap_or_default()
    };
    match fs::create_dir_all(&candidate) {
        Ok(()) => Ok(Some(candidate)),
        Err(e) if !root => {
            eprintln!("note: cannot create demo cgroups ({e}); run as root for the full demo");
            Ok(None)
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", candidate.display())),
    }
}

/// Starts one pod's process, moved into its cgroup before it execs (the way a
/// container runtime starts it).
fn spawn_pod_process(cgroup: Option<&Path>, i: usize) -> Result<Child> {
    let join = cgroup.map_or(String::new(), |d| {
        format!("echo $$ > '{}/cgroup.procs' && ", d.display())
    });
    // `exec -a` names the process after the demo pod so `gpu-scaler ps` reads well.
    Command::new("bash")
        .args(["-c", &format!("{join}exec -a demo-pod-{i} sleep infinity")])
        .stdin(Stdio::null())
        .spawn()
        .context("starting a demo pod process")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Kills what the demo started and removes its cgroups, deepest first, also when
/// the demo fails half-way.
struct Cleanup {
    base: Option<PathBuf>,
    children: Vec<Child>,
    dirs: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let Some(base) = &self.base else { return };
        let mut all: Vec<PathBuf> = Vec::new();
        for d in &self.dirs {
            let mut p = d.as_path();
            while p.starts_with(base) {
                all.push(p.to_path_buf());
                match p.parent() {
                    Some(parent) => p = parent,
                    None => break,
                }
            }
        }
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        all.dedup();
        for d in all {
            let _ = fs::remove_dir(&d);
        }
    }
}
