//! `cargo xtask bench attribution`: the attribution figures (root, real kernel):
//! fork+exec overhead of the probe, lookups/s and memory with 10,000 tracked
//! pids, 100,000-process churn. Printed by tests/benches/attribution.rs.

use anyhow::Result;

/// Builds what the benchmark needs and runs it; `args` go to the benchmark.
pub fn run(args: &[String]) -> Result<()> {
    // The benchmark also measures the release daemon binary's memory.
    super::cargo(&["build", "--release", "--package", "gpu-scaler"])?;
    let mut cmd = vec![
        "bench",
        "--package",
        "gpu-scaler-tests",
        "--bench",
        "attribution",
        "--",
    ];
    cmd.extend(args.iter().map(String::as_str));
    super::cargo(&cmd)
}
