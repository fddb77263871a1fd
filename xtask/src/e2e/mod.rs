//! `cargo xtask e2e`: gpu-scaler under the real control plane (issue 15).
//!
//! 1. Builds etcd, kube-apiserver, kube-controller-manager, the KEDA operator and
//!    KEDA's metrics API server from their Go modules, once per machine
//!    ([`build`]).
//! 2. Renders gpu-scaler's chart and reads KEDA's CRDs from the KEDA module, as
//!    JSON, into `target/e2e/manifests/`.
//! 3. Runs the scenarios: `tests/e2e_cluster/` (the `e2e_cluster` test target,
//!    `test = false`, so only this command runs it) starts the control plane as
//!    processes and drives it; see docs/e2e.md.

mod build;

use std::{fs, path::Path, time::Instant};

use anyhow::{Context as _, Result};

/// Values the e2e renders the chart with: none. The daemons run as processes the
/// test starts (there is no container runtime), with the chart's ServiceAccount,
/// RBAC and Services; its DaemonSet's pods are played by the kubelet stand-in.
const CHART_SET: &[&str] = &[];

#[derive(clap::Args)]
pub struct Args {
    /// Only build the real parts (cached under target/e2e/), run no scenario.
    #[arg(long)]
    pub build_only: bool,
    /// Extra arguments for the test harness (e.g. a scenario name filter).
    #[arg(trailing_var_arg = true)]
    pub args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let target = Path::new("target");
    let started = Instant::now();
    let parts = build::ensure(target)?;
    eprintln!(
        "xtask e2e: real parts ready in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if args.build_only {
        return Ok(());
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

    crate::cargo(&["build", "--package", "gpu-scaler"])?;
    let manifests = manifests.canonicalize().context("target/e2e/manifests")?;
    let mut test = vec![
        "test",
        "--package",
        "gpu-scaler-tests",
        "--test",
        "e2e_cluster",
        "--",
        "--test-threads=1",
        "--nocapture",
    ];
    test.extend(args.args.iter().map(String::as_str));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(
        std::process::Command::new(cargo)
            .args(&test)
            .env("GPU_SCALER_E2E_BIN", &parts.bin)
            .env("GPU_SCALER_E2E_MANIFESTS", &manifests),
    )?;
    eprintln!(
        "xtask e2e: done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
