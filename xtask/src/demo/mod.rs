//! `cargo xtask run`: the whole thing on one machine without a GPU or a cluster,
//! the loop closed.
//!
//! Demo "pods" are real processes in kubelet-style cgroups (systemd and cgroupfs
//! driver layouts, nested under a demo directory the way kind nests a node),
//! listed in a PodList file the daemon reads. The vLLM replicas serve a vLLM
//! exposition on their own pod IPs. Clients keep a demand curve of requests in
//! flight, spread over the replicas; each replica's share becomes its engine's
//! figures and its process's SM use in the mock GPU scenario, which this task
//! rewrites every second. Every second the demo asks the daemon as KEDA does
//! (real gRPC), applies the HPA's rule to the value, and carries it out: it
//! starts a replica in a fresh pod cgroup, or stops the newest one.

mod model;
mod pods;
mod view;

use std::{
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
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
use serde_json::Value;

use crate::host::{cgroup2_mount, http_get, write_atomic};
use model::{Demand, ReplicaLoad, Stabilizer};
pub use pods::serve_engine;
use pods::{Fleet, GPUS, NAMESPACE, NODE};

/// What the demo's vLLM workload scales on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Signal {
    /// Its pods' GPU use (SM %), summed: `metric=gpu_utilization`.
    Gpu,
    /// Its engines' waiting requests, summed: `metric=vllm_queue_depth`.
    Engine,
}

impl Signal {
    /// The ScaledObject trigger's metadata.
    fn trigger(self) -> &'static [&'static str] {
        match self {
            Signal::Gpu => &[
                "podSelector=app=vllm",
                "metric=gpu_utilization",
                "targetValue=60",
            ],
            Signal::Engine => &[
                "podSelector=app=vllm",
                "metric=vllm_queue_depth",
                "targetValue=2",
            ],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Gpu => "gpu",
            Signal::Engine => "engine",
        }
    }
}

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
    /// What the workload scales on: its pods' GPU use, or its engines' queue
    /// (`vllm:num_requests_waiting`).
    #[arg(long, value_enum, default_value = "gpu")]
    pub signal: Signal,
    /// Requests the clients keep in flight, as steps `SECONDS:REQUESTS,...`
    /// (e.g. `0:10,30:32,90:12`; the last step holds). Default: a 210 s cycle of
    /// 10, 32, 12 and 24.
    #[arg(long)]
    pub demand: Option<String>,
    /// The HPA's scale-down stabilization window, seconds (the real HPA's
    /// default is 300; shorter so the demo moves within a minute).
    #[arg(long, default_value_t = 30)]
    pub scale_down_window: u64,
    /// The ScaledObject's minReplicaCount (at least 1: at zero there is no
    /// engine to read).
    #[arg(long, default_value_t = 1)]
    pub min_replicas: u32,
    /// The ScaledObject's maxReplicaCount (at most 7: one mock GPU each).
    #[arg(long, default_value_t = 7)]
    pub max_replicas: u32,
    /// Replicas at start.
    #[arg(long, default_value_t = 3)]
    pub replicas: u32,
    /// A gpu-scaler binary to run instead of building one (skips the toolchain
    /// check and the build).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Run the demo on the real control plane instead (root): etcd,
    /// kube-apiserver, kube-controller-manager and KEDA built from their Go
    /// modules as `cargo xtask e2e` builds them, three nodes, a Deployment and a
    /// ScaledObject scaled by the real HPA (docs/e2e.md). Takes --duration,
    /// --json, --signal, --demand, --scale-down-window, --min-replicas and
    /// --max-replicas.
    #[arg(long)]
    pub kubernetes: bool,
    /// Runs beside other demos: instance N keeps its files in target/demo-N, its
    /// cgroups in gpu-scaler-demo-N and its pod IPs in 127.(10+N).0.0/16 (the
    /// closed-loop test runs two at once).
    #[arg(long, default_value_t = 0, hide = true)]
    pub instance: u8,
}

/// One refresh's measurement and decision.
struct Tick {
    t: f64,
    demand: f64,
    replicas: u32,
    load: ReplicaLoad,
    snapshot: Result<Value>,
    query: Result<Value>,
    recommended: Option<u32>,
    scaled_to: u32,
}

pub fn run(binary: &Path, args: RunArgs) -> Result<()> {
    let demand = match &args.demand {
        Some(spec) => Demand::parse(spec)?,
        None => Demand::default_cycle(),
    };
    let max_allowed = GPUS - 1;
    if args.min_replicas == 0 || args.max_replicas > max_allowed {
        bail!(
            "--min-replicas must be at least 1 and --max-replicas at most {max_allowed} \
             (one mock GPU per replica)"
        );
    }
    if args.min_replicas > args.max_replicas {
        bail!("--min-replicas is above --max-replicas");
    }
    let first = args.replicas.clamp(args.min_replicas, args.max_replicas);
    for addr in [&args.listen, &args.metrics_listen] {
        addr.parse::<SocketAddr>()
            .with_context(|| format!("{addr:?} is not HOST:PORT"))?;
    }
    if !binary.exists() {
        bail!("{} does not exist", binary.display());
    }

    let root = crate::toolchain::is_root();
    if args.instance > 100 {
        bail!("--instance must be at most 100");
    }
    let suffix = match args.instance {
        0 => String::new(),
        n => format!("-{n}"),
    };
    let work = PathBuf::from(format!("target/demo{suffix}"));
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let work = work.canonicalize()?;

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing Ctrl-C handler")?;
    }

    let base = cgroup_base(root, &format!("gpu-scaler-demo{suffix}"))?;
    let mut fleet = Fleet::new(base.clone(), &work, args.instance)?;
    fleet.start_embedder()?;
    fleet.scale_to(first)?;
    let scenario = work.join("scenario.toml");
    write_atomic(
        &scenario,
        scenario_at(&fleet, &model::replica_load(demand.at(0.0), first)).as_bytes(),
    )?;

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
    let log_path = work.join("daemon.log");
    let log = fs::File::create(&log_path)?;
    // Declared after the fleet, so dropped (killed) before the pods go.
    let mut serve = Command::new(binary);
    // SAFETY: prctl is async-signal-safe. A demo killed without unwinding
    // (SIGKILL, a test harness's timeout) takes its daemon with it.
    unsafe {
        serve.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut daemon = Daemon(
        serve
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
            .arg(fleet.pods_file())
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
            .context("starting gpu-scaler serve")?,
    );
    eprintln!(
        "gpu-scaler serving KEDA's ExternalScaler on {} (daemon log: {}); Ctrl-C to stop",
        args.listen,
        log_path.display()
    );

    // Ready (eBPF loaded, /proc seeded, first poll done) before the first
    // question, as KEDA only reaches a daemon its Service routes to.
    let ready_by = Instant::now() + Duration::from_secs(30);
    while http_get(&args.metrics_listen, "/readyz").is_err() {
        if let Some(status) = daemon.0.try_wait()? {
            bail!("the daemon exited ({status}); see {}", log_path.display());
        }
        if Instant::now() > ready_by {
            bail!(
                "the daemon was not ready within 30 s; see {}",
                log_path.display()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }

    let window = args.scale_down_window as f64;
    let mut stabilizer = Stabilizer::new(window, 0.0, first);
    let mut history: Vec<u32> = Vec::new();
    let started = Instant::now();
    let mut next = started;
    while !stop.load(Ordering::SeqCst) {
        let t = started.elapsed().as_secs_f64();
        if args.duration.is_some_and(|d| t >= d as f64) {
            break;
        }
        if let Some(status) = daemon.0.try_wait()? {
            bail!("the daemon exited ({status}); see {}", log_path.display());
        }
        let replicas = fleet.replicas();
        let offered = demand.at(t);
        let load = model::replica_load(offered, replicas);
        fleet.set_load(&load)?;
        write_atomic(&scenario, scenario_at(&fleet, &load).as_bytes())?;

        let snapshot = http_get(&args.metrics_listen, "/v1/snapshot").and_then(|body| {
            serde_json::from_str::<Value>(&body).context("/v1/snapshot: not JSON")
        });
        let query = query(binary, &args, replicas);
        // The HPA's rule on the value (gpu-scaler's own arithmetic, run by
        // `query`), then its scale-down window. Without an answer the HPA
        // keeps the replicas as they are.
        let recommended = query
            .as_ref()
            .ok()
            .and_then(|q| q.get("desired_replicas")?.as_u64())
            .map(|r| r as u32);
        let scaled_to = recommended.map_or(replicas, |r| stabilizer.decide(t, replicas, r));
        history.push(replicas);
        let tick = Tick {
            t,
            demand: offered,
            replicas,
            load,
            snapshot,
            query,
            recommended,
            scaled_to,
        };
        if args.json {
            println!("{}", view::json_line(&tick, &fleet, &args));
        } else {
            view::render(&tick, &fleet, &args, &history);
        }
        if scaled_to != replicas {
            fleet.scale_to(scaled_to)?;
        }
        // A steady 1 s cadence, however long the query took.
        next += Duration::from_secs(1);
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    drop(daemon);
    drop(fleet);
    Ok(())
}

/// Kills the daemon when the demo ends, also when it fails half-way.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The mock GPU scenario (README's format) for the pods as they are, each vLLM
/// replica carrying `load`.
fn scenario_at(fleet: &Fleet, load: &ReplicaLoad) -> String {
    let mut s = String::from("# Written by `cargo xtask run` every second.\n");
    for gpu in 0..GPUS {
        // (pid, SM %, memory MiB) of each process on this GPU.
        let on: Vec<(u32, u32, u64)> = fleet
            .pods
            .iter()
            .filter(|p| p.gpu == gpu)
            .map(|p| match p.app {
                "vllm" => (p.pid, load.sm, model::REPLICA_MEMORY_MIB),
                _ => (p.pid, 25, 12_000),
            })
            .collect();
        let util: u32 = on.iter().map(|&(_, sm, _)| sm).sum::<u32>().min(100);
        s.push_str(&format!(
            "\n[[gpu]]\nname = \"Demo GPU {gpu}\"\nmemory_total_mib = 81559\nutilization = {util}\n\
             memory_utilization = {}\ntemperature_c = {}\npower_w = {:.1}\npower_limit_w = 700.0\n",
            util / 2,
            35 + util / 3,
            80.0 + 5.0 * f64::from(util),
        ));
        for (pid, sm, mib) in on {
            s.push_str(&format!(
                "\n[[gpu.process]]\npid = {pid}\nsm_util = {sm}\nmem_util = {}\nused_memory_mib = {mib}\n",
                sm / 2,
            ));
        }
    }
    s
}

fn query(binary: &Path, args: &RunArgs, replicas: u32) -> Result<Value> {
    let out = Command::new(binary)
        .args([
            "query",
            "--json",
            "--address",
            &format!("http://{}", args.listen),
            "--namespace",
            NAMESPACE,
            "--name",
            "vllm",
        ])
        .args(["--replicas", &replicas.to_string()])
        .args(["--min-replicas", &args.min_replicas.to_string()])
        .args(["--max-replicas", &args.max_replicas.to_string()])
        .args(args.signal.trigger())
        .stderr(Stdio::piped())
        .output()
        .context("running gpu-scaler query")?;
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    serde_json::from_slice(&out.stdout).context("parsing `gpu-scaler query --json`")
}

/// Where the demo creates its cgroups: a `gpu-scaler-demo` directory under the
/// cgroup v2 mount when root, else under this process's own cgroup if it is
/// delegated to us (systemd user sessions), else nowhere. `name` is that
/// directory's name.
fn cgroup_base(root: bool, name: &str) -> Result<Option<PathBuf>> {
    let mount = cgroup2_mount()?;
    let candidate = if root {
        mount.join(name)
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
            .map(|p| p.join(name))
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

/// One engine figure of a pod in the daemon's /v1/snapshot (read only while a
/// query asks for it).
fn engine_figure(snapshot: &Value, uid: &str, figure: &str) -> Option<f64> {
    snapshot
        .get("engines")?
        .as_array()?
        .iter()
        .find(|e| e.get("pod_uid").and_then(Value::as_str) == Some(uid))?
        .get("figures")?
        .get(figure)?
        .get("ok")?
        .as_f64()
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
