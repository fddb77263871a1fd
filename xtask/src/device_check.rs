//! `cargo xtask device-check`: gpu-scaler against a real NVIDIA GPU (issue 11,
//! item 9). Runs a CUDA load in two processes (a small CUDA program built with
//! nvcc, or PyTorch when nvcc is missing), compares what `gpu-scaler gpus
//! --json` reports for them with `nvidia-smi --query-compute-apps` (memory)
//! and `nvidia-smi pmon` (SM %), then repeats the run under an MPS control
//! daemon of its own (private pipe and log directories), and prints a table.
//!
//! It reads and never changes the card: no clocks, no compute mode, no MIG
//! layout, no persistence mode. It takes about two minutes after the build
//! (well under ten). Without an NVIDIA GPU it fails at once, saying so. It is
//! not part of `cargo xtask test`: CI machines have no GPU.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The load of one process: memory it holds and the share of time its kernels run.
struct Load {
    mib: u64,
    duty_percent: u32,
}

const LOADS: [Load; 2] = [
    Load {
        mib: 1024,
        duty_percent: 30,
    },
    Load {
        mib: 2048,
        duty_percent: 60,
    },
];

/// How long each load runs: warm-up, then the samples.
const LOAD_SECS: u64 = 40;
const WARM_UP: Duration = Duration::from_secs(8);
const SAMPLES: usize = 3;
const SAMPLE_EVERY: Duration = Duration::from_secs(4);

const CUDA_LOAD: &str = r#"
// A CUDA load: holds MIB MiB and keeps the GPU busy DUTY % of the time for SECS s.
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

__global__ void spin(float *p, long n, int iters) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) {
        float x = p[i];
        for (int k = 0; k < iters; k++) x = x * 1.0000001f + 0.0000001f;
        p[i] = x;
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: load MIB SECS DUTY\n"); return 2; }
    size_t mib = strtoul(argv[1], 0, 10);
    double secs = atof(argv[2]), duty = atof(argv[3]) / 100.0;
    float *p;
    if (cudaMalloc(&p, mib << 20) != cudaSuccess) { fprintf(stderr, "cudaMalloc failed\n"); return 1; }
    cudaMemset(p, 0, mib << 20);
    long n = 1 << 20;
    double end = now() + secs;
    while (now() < end) {
        double t0 = now();
        spin<<<(n + 255) / 256, 256>>>(p, n, 20000);
        if (cudaDeviceSynchronize() != cudaSuccess) { fprintf(stderr, "kernel failed\n"); return 1; }
        double busy = now() - t0;
        if (duty < 1.0) usleep((useconds_t)(busy * (1.0 - duty) / duty * 1e6));
    }
    return 0;
}
"#;

const TORCH_LOAD: &str = r#"
import sys, time, torch
mib, secs, duty = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]) / 100.0
hold = torch.empty(mib * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
a = torch.randn(2048, 2048, device="cuda")
end = time.time() + secs
while time.time() < end:
    t0 = time.time()
    for _ in range(8):
        a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
    busy = time.time() - t0
    if duty < 1.0:
        time.sleep(busy * (1.0 - duty) / duty)
"#;

/// Runs `cargo xtask device-check`.
pub fn run(binary: Option<PathBuf>, skip_mps: bool) -> Result<()> {
    let started = Instant::now();
    let gpus = probe()?;
    println!("GPUs (nvidia-smi -L):\n{gpus}");
    let work = WorkDir::new()?;
    let binary = match binary {
        Some(b) => b,
        None => build()?,
    };
    let load = prepare_load(work.path())?;
    println!("CUDA load: {}", load.describe());

    let mut tables = Vec::new();
    tables.push(("without MPS", phase(&binary, &load, None)?));
    if skip_mps {
        println!("MPS phase skipped (--skip-mps)");
    } else {
        match Mps::start(work.path()) {
            Ok(mps) => {
                let t = phase(&binary, &load, Some(&mps));
                mps.stop();
                tables.push(("under MPS (our own control daemon)", t?));
            }
            Err(e) => println!("MPS phase skipped: {e:#}"),
        }
    }
    for (name, table) in &tables {
        println!("\n== {name} ==\n{table}");
    }
    println!("device-check took {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// A private working directory, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn new() -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("gpu-scaler-device-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fails clearly when there is no NVIDIA GPU to check.
fn probe() -> Result<String> {
    let out = Command::new("nvidia-smi").arg("-L").output();
    let out = match out {
        Ok(o) => o,
        Err(e) => bail!(
            "no NVIDIA GPU here: nvidia-smi cannot be run ({e}); device-check needs a machine \
             with an NVIDIA GPU and its driver"
        ),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains("GPU ") {
        bail!(
            "no NVIDIA GPU here: `nvidia-smi -L` answered {}: {}{}",
            out.status,
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

/// Builds the daemon without its eBPF probe (`gpus` does not attribute by
/// eBPF, and the GPU machine may lack the eBPF toolchain).
fn build() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    super::run(
        Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "gpu-scaler",
                "--bin",
                "gpu-scaler",
            ])
            .env("GPU_SCALER_NO_EBPF", "1"),
    )?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release/gpu-scaler"))
}

enum LoadKind {
    Cuda(PathBuf),
    Torch(PathBuf),
}

impl LoadKind {
    fn describe(&self) -> String {
        match self {
            Self::Cuda(p) => format!("CUDA program {}", p.display()),
            Self::Torch(p) => format!("PyTorch script {}", p.display()),
        }
    }

    fn spawn(&self, load: &Load, mps: Option<&Mps>) -> Result<Child> {
        let args = [
            load.mib.to_string(),
            LOAD_SECS.to_string(),
            load.duty_percent.to_string(),
        ];
        let mut cmd = match self {
            Self::Cuda(p) => Command::new(p),
            Self::Torch(p) => {
                let mut c = Command::new("python3");
                c.arg(p);
                c
            }
        };
        cmd.args(args).stdout(Stdio::null());
        if let Some(mps) = mps {
            mps.env(&mut cmd);
        }
        cmd.spawn().context("starting the CUDA load")
    }
}

/// The CUDA program built with nvcc, else the PyTorch script.
fn prepare_load(dir: &Path) -> Result<LoadKind> {
    let src = dir.join("load.cu");
    std::fs::write(&src, CUDA_LOAD)?;
    let bin = dir.join("load");
    let nvcc = Command::new("nvcc")
        .arg("-O2")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status();
    if nvcc.is_ok_and(|s| s.success()) {
        return Ok(LoadKind::Cuda(bin));
    }
    let torch = Command::new("python3")
        .args([
            "-c",
            "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)",
        ])
        .status();
    if torch.is_ok_and(|s| s.success()) {
        let py = dir.join("load.py");
        std::fs::write(&py, TORCH_LOAD)?;
        return Ok(LoadKind::Torch(py));
    }
    bail!("neither nvcc nor PyTorch with CUDA is available to run a CUDA load")
}

/// An MPS control daemon of our own: private pipe and log directories, so a
/// system-wide one is neither used nor disturbed. Compute mode is not changed.
struct Mps {
    pipe: PathBuf,
    log: PathBuf,
}

impl Mps {
    fn start(dir: &Path) -> Result<Self> {
        let mps = Self {
            pipe: dir.join("mps-pipe"),
            log: dir.join("mps-log"),
        };
        std::fs::create_dir_all(&mps.pipe)?;
        std::fs::create_dir_all(&mps.log)?;
        let mut cmd = Command::new("nvidia-cuda-mps-control");
        cmd.arg("-d");
        mps.env(&mut cmd);
        let status = cmd
            .status()
            .context("starting nvidia-cuda-mps-control -d")?;
        if !status.success() {
            bail!("nvidia-cuda-mps-control -d failed: {status}");
        }
        Ok(mps)
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("CUDA_MPS_PIPE_DIRECTORY", &self.pipe)
            .env("CUDA_MPS_LOG_DIRECTORY", &self.log);
    }

    fn stop(self) {
        let mut cmd = Command::new("nvidia-cuda-mps-control");
        self.env(&mut cmd);
        let quit = cmd.stdin(Stdio::piped()).spawn().and_then(|mut c| {
            use std::io::Write as _;
            if let Some(mut stdin) = c.stdin.take() {
                stdin.write_all(b"quit\n")?;
            }
            c.wait()
        });
        if let Err(e) = quit {
            eprintln!("stopping our MPS control daemon: {e}");
        }
    }
}

/// One row per pid: what each tool said, per sample.
#[derive(Default)]
struct Row {
    ours_kind: String,
    ours_mib: Vec<String>,
    ours_sm: Vec<String>,
    smi_mib: Vec<String>,
    pmon_sm: Vec<String>,
    pmon_mib: Vec<String>,
}

fn phase(binary: &Path, load: &LoadKind, mps: Option<&Mps>) -> Result<String> {
    let mut children = Vec::new();
    for l in &LOADS {
        children.push(load.spawn(l, mps)?);
    }
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    std::thread::sleep(WARM_UP);
    let mut rows: BTreeMap<u32, Row> = BTreeMap::new();
    let result = (|| -> Result<()> {
        for _ in 0..SAMPLES {
            sample(binary, &mut rows)?;
            std::thread::sleep(SAMPLE_EVERY);
        }
        Ok(())
    })();
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    result?;
    let mut table = format!(
        "{:>8}  {:<7}  {:<24}  {:<24}  {:<20}  {:<20}  {:<20}\n",
        "PID",
        "KIND",
        "MEMORY MiB (gpu-scaler)",
        "MEMORY MiB (smi apps)",
        "MEMORY MiB (pmon)",
        "SM % (gpu-scaler)",
        "SM % (pmon)"
    );
    for (pid, r) in &rows {
        let mark = if pids.contains(pid) { "*" } else { " " };
        table += &format!(
            "{mark}{pid:>7}  {:<7}  {:<24}  {:<24}  {:<20}  {:<20}  {:<20}\n",
            r.ours_kind,
            r.ours_mib.join(" "),
            r.smi_mib.join(" "),
            r.pmon_mib.join(" "),
            r.ours_sm.join(" "),
            r.pmon_sm.join(" "),
        );
    }
    table += &format!(
        "* our load processes ({} MiB at {} %, {} MiB at {} %); n/a: gpu-scaler reports the \
         figure unavailable (see `gpu-scaler gpus` for the reason); -: the tool did not list the pid",
        LOADS[0].mib, LOADS[0].duty_percent, LOADS[1].mib, LOADS[1].duty_percent
    );
    Ok(table)
}

fn reading(v: &Value) -> String {
    if let Some(x) = v.get("ok") {
        return x.to_string();
    }
    "n/a".to_owned()
}

/// One sample of each tool, appended to `rows`.
fn sample(binary: &Path, rows: &mut BTreeMap<u32, Row>) -> Result<()> {
    let ours = Command::new(binary)
        .args(["gpus", "--json"])
        .output()
        .context("running gpu-scaler gpus --json")?;
    if !ours.status.success() {
        bail!(
            "gpu-scaler gpus --json failed: {}",
            String::from_utf8_lossy(&ours.stderr)
        );
    }
    let doc: Value = serde_json::from_slice(&ours.stdout).context("gpu-scaler gpus --json")?;
    let mut seen = Vec::new();
    for d in doc["devices"].as_array().into_iter().flatten() {
        for p in d["processes"].as_array().into_iter().flatten() {
            let Some(pid) = p["pid"].as_u64().and_then(|x| u32::try_from(x).ok()) else {
                continue;
            };
            let r = rows.entry(pid).or_default();
            r.ours_kind = p["kind"].as_str().unwrap_or("?").to_owned();
            r.ours_mib.push(reading(&p["used_memory_mib"]));
            r.ours_sm.push(reading(&p["sm_util"]));
            seen.push(pid);
        }
    }

    let apps = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .context("nvidia-smi --query-compute-apps")?;
    for line in String::from_utf8_lossy(&apps.stdout).lines() {
        let mut f = line.split(',').map(str::trim);
        if let (Some(pid), Some(mib)) = (f.next(), f.next())
            && let Ok(pid) = pid.parse::<u32>()
        {
            rows.entry(pid).or_default().smi_mib.push(mib.to_owned());
        }
    }

    let pmon = Command::new("nvidia-smi")
        .args(["pmon", "-c", "1", "-s", "um"])
        .output()
        .context("nvidia-smi pmon")?;
    let text = String::from_utf8_lossy(&pmon.stdout);
    let mut header: Vec<String> = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix('#') {
            if header.is_empty() {
                header = h.split_whitespace().map(str::to_owned).collect();
            }
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| h == name)
                .and_then(|i| cols.get(i).copied())
        };
        if let Some(pid) = col("pid").and_then(|p| p.parse::<u32>().ok()) {
            let r = rows.entry(pid).or_default();
            r.pmon_sm.push(col("sm").unwrap_or("?").to_owned());
            r.pmon_mib.push(col("fb").unwrap_or("?").to_owned());
        }
    }
    // A pid one tool lists and another does not gets a "-" for that sample.
    let n = rows
        .values()
        .map(|r| r.ours_mib.len().max(r.smi_mib.len()).max(r.pmon_sm.len()))
        .max()
        .unwrap_or(0);
    for r in rows.values_mut() {
        for v in [
            &mut r.ours_mib,
            &mut r.ours_sm,
            &mut r.smi_mib,
            &mut r.pmon_sm,
            &mut r.pmon_mib,
        ] {
            while v.len() < n {
                v.push("-".to_owned());
            }
        }
    }
    Ok(())
}
