//! `cargo xtask bench scaler`: the scaler's figures (GetMetrics latency and
//! throughput at 1/64/512 clients, memory with 10,000 StreamIsActive streams,
//! freshness). The benchmark itself is `tests/benches/scaler.rs`.

use anyhow::Result;

pub fn run() -> Result<()> {
    super::cargo(&[
        "bench",
        "--package",
        "gpu-scaler-tests",
        "--bench",
        "scaler",
    ])
}
