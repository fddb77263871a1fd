//! `cargo xtask <task>`: the project's set-up-and-go commands and chores.

mod bench_attribution;
mod bench_cluster;
mod bench_daemon;
mod bench_gpu;
mod bench_scaler;
mod chart;
mod cross;
mod demo;
mod deny;
mod device_check;
mod e2e;
mod fuzz;
mod host;
mod privileges;
mod toolchain;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "gpu-scaler developer tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing of the eBPF toolchain (idempotent).
    Setup,
    /// Set up, build, and run the local demo: the daemon with demo pods and a mock
    /// GPU load, shown live.
    Run(demo::RunArgs),
    /// Measure and print performance figures.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
    /// Build the daemon (release, its eBPF probe embedded) for a Linux target,
    /// installing the cross toolchain it lacks.
    Build {
        /// x86_64-unknown-linux-gnu or aarch64-unknown-linux-gnu (default: this
        /// machine's).
        #[arg(long)]
        target: Option<String>,
    },
    /// Set up, then check formatting and lints and run every test.
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the fuzz run.
        #[arg(long)]
        no_fuzz: bool,
        /// Skip `cargo xtask e2e` (the real control plane; needs Go and root).
        #[arg(long)]
        no_e2e: bool,
        /// Skip the aarch64 build and its tests under qemu-user.
        #[arg(long)]
        no_cross: bool,
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// gpu-scaler under the real control plane: build etcd, Kubernetes and KEDA from
    /// their Go modules (binaries in target/e2e/), start them as processes and run
    /// the scenarios of tests/e2e_cluster/ (root; see docs/e2e.md).
    E2e(e2e::Args),
    /// Fuzz the cgroup path parser (cargo-fuzz, nightly) for a while.
    Fuzz {
        /// How long to fuzz.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// On a machine with an NVIDIA GPU: compare `gpu-scaler gpus --json` with
    /// nvidia-smi for a CUDA load in two processes, without and with MPS (never
    /// changes clocks, compute mode or MIG layout). Not part of `test`.
    DeviceCheck {
        /// A gpu-scaler binary to check instead of building one.
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
        /// Skip the run under an MPS control daemon of its own.
        #[arg(long)]
        skip_mps: bool,
    },
    /// Regenerate deploy/manifests/ from the Helm chart with default values.
    Manifests,
    /// Lint, render and validate the Helm chart, its manifests and examples.
    Chart,
    /// (Internal) the child of the chart's capability check.
    #[command(hide = true)]
    ProbePrivileges,
    /// (Internal) a demo vLLM replica: serves its engine's /metrics.
    #[command(hide = true)]
    DemoPod {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        figures: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Cost of one GPU sampling pass (8 GPUs x 64 processes, fake NVML) and
    /// the poller's and daemon's CPU use at a 1 s interval.
    Gpu {
        /// Sampling passes to time.
        #[arg(long, default_value_t = 2000)]
        passes: u64,
        /// Seconds over which CPU use is measured.
        #[arg(long, default_value_t = 30)]
        cpu_secs: u64,
    },
    /// The energy split against the device counter: pods + unattributed per GPU
    /// over a window (fake NVML, rippling power, changing load).
    Energy {
        /// Seconds measured.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// The KEDA-facing gRPC scaler: GetMetrics latency and throughput at 1, 64
    /// and 512 clients, memory with 10,000 StreamIsActive streams, freshness.
    Scaler,
    /// Engine reading: parsing a 200 KB vLLM exposition (MB/s beside a naive
    /// split and prometheus-parse), daemon CPU with 100 engine pods read every
    /// second, and freshness (gauge change -> GetMetrics).
    Engine,
    /// The sampler's join and the /metrics render for 500 pods x 2 containers
    /// on 8 GPUs (medians; `JOIN_BENCH_ITERS` sets the iterations).
    Join,
    /// The cluster: fan-out latency over 1, 8 and 64 peer processes, peer RPCs
    /// per KEDA polling round, pod cache memory with 10,000 pods.
    Cluster {
        /// Only one part: `latency`, `coalescing` or `memory`.
        part: Option<String>,
    },
    /// Attribution (root): fork+exec overhead of the probe, lookups/s and memory
    /// with 10,000 tracked pids, 100,000-process churn.
    Attribution {
        /// Arguments for the benchmark (`--only overhead|pids|churn`, `--churn N`,
        /// `--hold N`, `--rounds N`, `--iters N`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The daemon's resident memory and CPU at idle and with 500 pods on 8
    /// mock GPUs, 1 s poll, /metrics scraped (needs root for pod cgroups).
    Daemon {
        /// Pods (one GPU process each).
        #[arg(long, default_value_t = 500)]
        pods: usize,
        /// Seconds measured per phase.
        #[arg(long, default_value_t = 30)]
        secs: u64,
        /// Seconds between scrapes of /metrics.
        #[arg(long, default_value_t = 5)]
        scrape_every: u64,
        /// Seconds per CPU reading; the median reading is quoted.
        #[arg(long, default_value_t = 10)]
        window: u64,
        /// The daemons' attribution backend: procfs or ebpf.
        #[arg(long, default_value = "procfs")]
        attribution: String,
        /// Another gpu-scaler binary measured beside this build, same inputs.
        #[arg(long)]
        baseline: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.task {
        Task::Setup => toolchain::ensure(),
        Task::Run(args) => {
            if args.kubernetes {
                toolchain::ensure()?;
                return e2e::demo(&args);
            }
            if let Some(binary) = args.binary.clone() {
                return demo::run(&binary, args);
            }
            toolchain::ensure()?;
            let release = std::path::Path::new("target/release/gpu-scaler");
            if !release.exists() {
                eprintln!(
                    "xtask: building gpu-scaler (release, with its eBPF probe): a few minutes \
                     the first time (about 6 on 2 cores), seconds after that"
                );
            }
            cargo(&["build", "--release", "--package", "gpu-scaler"])?;
            demo::run(release, args)
        }
        Task::Bench {
            what: Bench::Gpu { passes, cpu_secs },
        } => bench_gpu::run(passes, cpu_secs),
        Task::Bench {
            what: Bench::Engine,
        } => {
            toolchain::ensure()?;
            cargo(&["build", "--release", "--package", "gpu-scaler"])?;
            for bench in ["exposition", "engine"] {
                cargo(&["bench", "--package", "gpu-scaler-tests", "--bench", bench])?;
            }
            Ok(())
        }
        Task::Bench {
            what: Bench::Energy { secs },
        } => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            run(Command::new(cargo)
                .args([
                    "bench",
                    "--package",
                    "gpu-scaler-tests",
                    "--bench",
                    "energy",
                ])
                .env("GPU_SCALER_BENCH_SECS", secs.to_string()))
        }
        Task::Bench { what: Bench::Join } => {
            toolchain::ensure()?;
            cargo(&["bench", "--package", "gpu-scaler-tests", "--bench", "join"])
        }
        Task::Bench {
            what: Bench::Scaler,
        } => {
            toolchain::ensure()?;
            bench_scaler::run()
        }
        Task::Bench {
            what: Bench::Cluster { part },
        } => {
            toolchain::ensure()?;
            bench_cluster::run(part.as_deref())
        }
        Task::Bench {
            what: Bench::Attribution { args },
        } => {
            toolchain::ensure()?;
            bench_attribution::run(&args)
        }
        Task::Bench {
            what:
                Bench::Daemon {
                    pods,
                    secs,
                    scrape_every,
                    window,
                    attribution,
                    baseline,
                },
        } => {
            toolchain::ensure()?;
            bench_daemon::run(&bench_daemon::Options {
                pods,
                secs,
                scrape_every,
                window,
                attribution,
                baseline,
            })
        }
        Task::Fuzz { seconds } => fuzz::run(seconds),
        Task::E2e(args) => {
            toolchain::ensure()?;
            e2e::run(&args)
        }
        Task::Build { target } => {
            let target = match target {
                Some(t) => cross::Target::parse(&t)?,
                None => cross::Target::host()?,
            };
            cross::build(target).map(drop)
        }
        Task::Test {
            no_lint,
            no_fuzz,
            no_e2e,
            no_cross,
            args,
        } => {
            toolchain::ensure()?;
            if !no_lint {
                cargo(&["fmt", "--all", "--", "--check"])?;
                cargo(&[
                    "clippy",
                    "--workspace",
                    "--all-targets",
                    "--",
                    "-D",
                    "warnings",
                ])?;
                // --all-targets leaves out targets with `test = false`: the
                // real-cluster harness is linted on its own.
                cargo(&[
                    "clippy",
                    "--workspace",
                    "--test",
                    "e2e_cluster",
                    "--",
                    "-D",
                    "warnings",
                ])?;
                deny::check()?;
            }
            chart::check()?;
            // --locked, as the Dockerfile builds: a stale Cargo.lock fails here
            // rather than in the image build.
            // Every binary first: the tests in tests/ run the daemon (and
            // their helpers) as processes, which `cargo test` builds only for
            // a package's own integration tests.
            cargo(&["build", "--workspace", "--locked"])?;
            let mut test = vec!["test", "--workspace", "--locked"];
            test.extend(args.iter().map(String::as_str));
            cargo(&test)?;
            if !no_fuzz {
                fuzz::run(30)?;
            }
            if !no_cross {
                cross::test()?;
            }
            if !no_e2e {
                e2e::run_in_test()?;
            }
            Ok(())
        }
        Task::DeviceCheck { binary, skip_mps } => device_check::run(binary, skip_mps),
        Task::Manifests => chart::manifests(),
        Task::Chart => chart::check(),
        Task::ProbePrivileges => privileges::child(),
        Task::DemoPod { listen, figures } => demo::serve_engine(listen, &figures),
    }
}

/// Runs cargo with `args` in the workspace root.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

/// Runs a command to completion, echoing it first; a non-zero exit is an error.
fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}
