//! `cargo xtask e2e`: gpu-scaler under the real control plane (issue 15).
//!
//! 1. Builds etcd, kube-apiserver, kube-controller-manager, the KEDA operator and
//!    KEDA's metrics API server from their Go modules, once per machine
//!    ([`build`]).
//! 2. Renders gpu-scaler's chart and reads KEDA's CRDs from the KEDA module, as
//!    JSON, into `target/e2e/manifests/`.
//! 3. Runs the scenarios: `tests/e2e_cluster/` (the `e2e_cluster` test target,
//!    `test = false`, so only this command runs it) starts the control plane as
//!    processes and drives it; see docs/e2e.md. `cargo xtask run --kubernetes`
//!    runs the same harness's demo instead ([`demo`]).

mod build;

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// Values the e2e renders the chart with: none. The daemons run as processes the
/// test starts (there is no container runtime), with the chart's ServiceAccount,
/// RBAC and Services; its DaemonSet's pods are played by the kubelet stand-in.
const CHART_SET: &[&str] = &[];

#[derive(clap::Args)]
pub struct Args {
    /// Only build the real parts (cached under target/e2e/), run no scenario.
    #[arg(long)]
    pub build_only: bool,
    /// A scenario name filter: only scenarios whose name contains it.
    #[arg(trailing_var_arg = true)]
    pub args: Vec<String>,
}

/// The e2e as a step of `cargo xtask test`: everything, unless the machine is
/// not root (the control plane's network namespaces and the pods' cgroups need
/// it) and GPU_SCALER_REQUIRE_KERNEL does not ask for every kernel test: then
/// it says so and skips, before building anything.
pub fn run_in_test() -> Result<()> {
    if !crate::toolchain::is_root() && std::env::var_os("GPU_SCALER_REQUIRE_KERNEL").is_none() {
        eprintln!(
            "xtask test: skipping `cargo xtask e2e`: it needs root (network namespaces, \
             cgroups); GPU_SCALER_REQUIRE_KERNEL=1 makes this a failure"
        );
        return Ok(());
    }
    run(&Args {
        build_only: false,
        args: Vec::new(),
    })
}

pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let Some(harness) = prepare(args.build_only)? else {
        return Ok(());
    };
    harness.run(&args.args)?;
    eprintln!(
        "xtask e2e: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `cargo xtask run --kubernetes`: the demo on the real control plane, with the
/// local demo's options (`tests/e2e_cluster/demo.rs`).
pub fn demo(args: &crate::demo::RunArgs) -> Result<()> {
    if !crate::toolchain::is_root() {
        bail!(
            "cargo xtask run --kubernetes runs a control plane, three nodes' network \
             namespaces and pod cgroups: run it as root"
        );
    }
    if args.binary.is_some() {
        bail!("--binary is for the local demo; --kubernetes builds the workspace's gpu-scaler");
    }
    if !build::built() {
        eprintln!(
            "xtask run --kubernetes: building etcd, kube-apiserver, kube-controller-manager and \
             KEDA from their Go modules, once: about 12 minutes on 2 idle cores, \
             a few minutes when Go's caches have them"
        );
    }
    let harness = prepare(false)?.expect("prepared past the build");
    let mut demo = vec![
        "demo".to_owned(),
        "--signal".into(),
        args.signal.name().into(),
    ];
    if let Some(d) = args.duration {
        demo.extend(["--duration".into(), d.to_string()]);
    }
    if args.json {
        demo.push("--json".into());
    }
    if let Some(spec) = &args.demand {
        demo.extend(["--demand".into(), spec.clone()]);
    }
    demo.extend([
        "--scale-down-window".into(),
        args.scale_down_window.to_string(),
        "--min-replicas".into(),
        args.min_replicas.to_string(),
        "--max-replicas".into(),
        args.max_replicas.to_string(),
    ]);
    harness.run(&demo)
}

/// The built harness: where the real parts and the manifests are.
struct Harness {
    bin: PathBuf,
    manifests: PathBuf,
}

/// Builds the real parts (unless built), then, unless `build_only`, writes the
/// manifests (KEDA's CRDs, the rendered chart) and builds gpu-scaler.
fn prepare(build_only: bool) -> Result<Option<Harness>> {
    let target = Path::new("target");
    let started = Instant::now();
    let parts = build::ensure(target)?;
    eprintln!(
        "xtask e2e: real parts ready in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if build_only {
        return Ok(None);
    }
    let manifests = target.join("e2e/manifests");
    fs::create_dir_all(&manifests)?;
    let mut crds: Vec<_> = fs::read_dir(&parts.keda_crds)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    crds.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    crds.sort();
    let crds = crate::chart::yaml_objects(&crds)?;
    fs::write(manifests.join("keda-crds.json"), serde_json::to_vec(&crds)?)?;
    let chart = crate::chart::render(CHART_SET)?;
    fs::write(manifests.join("chart.json"), serde_json::to_vec(&chart)?)?;
    // --workspace, as `cargo xtask test` builds: the same features for every
    // crate, so nothing is built twice.
    crate::cargo(&["build", "--workspace", "--bins"])?;
    Ok(Some(Harness {
        bin: parts.bin,
        manifests: manifests.canonicalize().context("target/e2e/manifests")?,
    }))
}

impl Harness {
    /// Runs `tests/e2e_cluster` (its own main, no libtest) with `args`.
    fn run(&self, args: &[String]) -> Result<()> {
        let mut test = vec![
            "test",
            "--quiet",
            "--workspace",
            "--test",
            "e2e_cluster",
            "--",
        ];
        test.extend(args.iter().map(String::as_str));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        crate::run(
            std::process::Command::new(cargo)
                .args(&test)
                .env("GPU_SCALER_E2E_BIN", &self.bin)
                .env("GPU_SCALER_E2E_MANIFESTS", &self.manifests),
        )
    }
}
