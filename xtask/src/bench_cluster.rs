//! `cargo xtask bench cluster [latency|coalescing|memory]`: fan-out latency over
//! 1, 8 and 64 peer processes, peer RPCs per KEDA polling round, and pod cache
//! memory. The benchmark itself is `tests/benches/cluster.rs`.

use anyhow::Result;

pub fn run(part: Option<&str>) -> Result<()> {
    // The serve part starts real `gpu-scaler serve` processes.
    super::cargo(&["build", "--release", "--package", "gpu-scaler"])?;
    let mut args = vec![
        "bench",
        "--package",
        "gpu-scaler-tests",
        "--bench",
        "cluster",
    ];
    if let Some(p) = part {
        args.extend(["--", p]);
    }
    super::cargo(&args)
}
