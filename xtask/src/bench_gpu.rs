//! `cargo xtask bench gpu`: the GPU sampling figures (see
//! tests/benches/gpu_pass.rs for what is measured and how).

use anyhow::Result;

/// Runs the GPU sampling benchmark in the release profile.
pub fn run(passes: u64, cpu_secs: u64) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The bench runs the release daemon for its CPU figure.
    super::cargo(&["build", "--release", "--package", "gpu-scaler"])?;
    super::run(
        std::process::Command::new(cargo)
            .args([
                "bench",
                "--package",
                "gpu-scaler-tests",
                "--bench",
                "gpu_pass",
            ])
            .env("GPU_BENCH_PASSES", passes.to_string())
            .env("GPU_BENCH_CPU_SECS", cpu_secs.to_string()),
    )
}
