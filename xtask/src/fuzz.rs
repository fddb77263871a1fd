//! `cargo xtask fuzz`: runs the fuzz targets of the parsers of untrusted text
//! (cgroup paths and kernel text; engine metrics) with cargo-fuzz on nightly,
//! each for a bounded time; `cargo xtask test` runs them briefly. Installs
//! cargo-fuzz only when it is missing.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

/// The fuzz crate, relative to the workspace root.
const FUZZ_CRATE_PARENT: &str = "gpu-scaler";
const TARGETS: [&str; 2] = ["cgroup_path", "exposition"];
/// An engine's answer is bounded by the scraper's body limit; memory use by
/// the parsers must stay small whatever the input.
const RSS_LIMIT_MB: &str = "-rss_limit_mb=1024";

/// Fuzzes each target for `seconds`; any crash fails (libFuzzer exits non-zero
/// and leaves the input under gpu-scaler/fuzz/artifacts/).
pub fn run(seconds: u64) -> Result<()> {
    for target in TARGETS {
        run_one(target, seconds)?;
    }
    Ok(())
}

fn run_one(target: &str, seconds: u64) -> Result<()> {
    ensure_cargo_fuzz()?;
    // The fuzz crate is its own workspace; start it from the main lock file so it
    // builds the same dependency versions (aya-build stays pinned, see docs/architecture.md#toolchain-pins).
    std::fs::copy(
        "Cargo.lock",
        Path::new(FUZZ_CRATE_PARENT).join("fuzz/Cargo.lock"),
    )
    .context("copying Cargo.lock into gpu-scaler/fuzz")?;
    let corpus = format!("fuzz/corpus/{target}");
    std::fs::create_dir_all(Path::new(FUZZ_CRATE_PARENT).join(&corpus))
        .with_context(|| format!("creating {corpus}"))?;
    let mut cmd = rustup_cargo();
    cmd.current_dir(FUZZ_CRATE_PARENT)
        // The parsers do not need the probe; skipping its BPF build keeps the
        // sanitizer build to host code.
        .env("GPU_SCALER_NO_EBPF", "1")
        .arg(format!("+{}", super::toolchain::NIGHTLY))
        .args(["fuzz", "run", target, &corpus])
        .arg(format!("fuzz/seeds/{target}"))
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-max_len=4096",
            RSS_LIMIT_MB,
        ]);
    super::run(&mut cmd)
}

/// `cargo` through rustup's proxy, so `+<pinned nightly>` selects the toolchain whatever
/// toolchain runs xtask.
fn rustup_cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO");
    cmd
}

fn ensure_cargo_fuzz() -> Result<()> {
    let present = rustup_cargo()
        .arg(format!("+{}", super::toolchain::NIGHTLY))
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return Ok(());
    }
    eprintln!("cargo-fuzz is missing: installing it");
    super::run(rustup_cargo().args(["install", "cargo-fuzz", "--locked"]))
}
