//! Helpers for the integration tests in this directory.
//!
//! - [`kernel`]: skip a test only when a probed kernel feature is missing, and
//!   turn that skip into a failure under `GPU_SCALER_REQUIRE_KERNEL=1` (CI).
//! - [`cgroup`]: real cgroup v2 directories in kubelet layouts, unique per test
//!   run and removed (processes killed first) when dropped.
//! - [`process`]: start real processes inside a cgroup before they exec, and
//!   start one with a chosen pid (to test pid reuse).
//! - [`pod`]: a pod on the real kernel: cgroups in a kubelet layout with real
//!   processes in its container.
//! - [`kube_api`], [`cluster`]: the fake Kubernetes API server and in-process
//!   cluster daemons.
//! - [`serve`]: `gpu-scaler serve` as a real process.
//! - [`engine`]: a serving engine's `/metrics` as a real HTTP server, and
//!   vLLM and Triton expositions in their exact formats.
//! - [`wait_for`]: poll a condition with a deadline instead of sleeping blindly.
//! - [`fake_nvml`], [`scaler`]: the fake NVML library and the scaler harness.

pub mod cgroup;
pub mod cluster;
pub mod engine;
pub mod fake_nvml;
pub mod kernel;
pub mod kube_api;
pub mod pod;
pub mod process;
pub mod scaler;
pub mod serve;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Polls `f` every few milliseconds until it returns `Some`, or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A binary of the workspace built into the same target directory as the
/// running test (e.g. `gpu-scaler`); panics with the command to build it.
/// `cargo test --workspace` (what CI runs) builds it first; running one test
/// target alone (`-p gpu-scaler-tests`) uses whatever was built last, so run
/// `cargo build -p gpu-scaler` after changing it.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} not built; run `cargo build -p {name}` or `cargo test --workspace`",
        bin.display()
    );
    bin
}
