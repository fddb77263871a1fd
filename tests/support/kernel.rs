//! Probe-or-fail: tests that need root or a kernel feature call [`require`]
//! with the result of actually trying the feature, never a guess.

/// The environment variable that turns a skip into a failure (CI sets it).
pub const REQUIRE_ENV: &str = "GPU_SCALER_REQUIRE_KERNEL";

/// Whether the kernel feature `feature` is usable, given `probe`, the result
/// of trying it. On `Err` the test should return early (a skip, printed to
/// stderr), unless `GPU_SCALER_REQUIRE_KERNEL=1`, in which case this panics
/// with the probe's error so CI cannot pass by skipping.
///
/// ```no_run
/// # let probe: Result<(), String> = Ok(());
/// if !gpu_scaler_tests::kernel::require("eBPF tracepoints", probe) {
///     return;
/// }
/// ```
pub fn require<E: std::fmt::Display>(feature: &str, probe: Result<(), E>) -> bool {
    match probe {
        Ok(()) => true,
        Err(e) if required() => {
            panic!("{feature} is required ({REQUIRE_ENV}=1) but unavailable: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {feature} unavailable: {e} (set {REQUIRE_ENV}=1 to fail instead)");
            false
        }
    }
}

/// Whether skips are failures in this run.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// `Ok` when running as root (uid 0), which cgroup and BPF tests need.
pub fn probe_root() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    match unsafe { libc::geteuid() } {
        0 => Ok(()),
        uid => Err(format!("running as uid {uid}, not root")),
    }
}
