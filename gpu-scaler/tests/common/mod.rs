//! Shared by this package's integration tests and benchmarks.

use std::path::PathBuf;

/// libfake_nvml.so, which cargo builds beside the running test or benchmark
/// executable because `fake-nvml` is a dev-dependency (in `deps/`, and
/// uplifted one level up).
pub fn fake_nvml() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running executable");
    let deps = exe.parent().expect("deps directory");
    [
        deps.join("libfake_nvml.so"),
        deps.join("../libfake_nvml.so"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .expect("libfake_nvml.so beside the executable (fake-nvml is a dev-dependency)")
}
