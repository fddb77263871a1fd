//! `gpu-scaler gpus` as a user runs it: the real binary, a real scenario file,
//! and the fake libnvidia-ml.so loaded through `--nvml-lib`.

use std::process::Command;

use gpu_scaler::testing::fake_nvml_library as fake_nvml;

const SCENARIO: &str = r#"
[[gpu]]
uuid = "GPU-5c1f0000-0000-0000-0000-000000000001"
name = "NVIDIA H100 80GB HBM3"
memory_total_mib = 81559
utilization = 85
memory_utilization = 40
temperature_c = 62
power_w = 420.0
power_limit_w = 700.0

[[gpu.process]]
pid = PID
sm_util = 60
mem_util = 25
used_memory_mib = 30000
"#;

/// The scenario, with this test process as the GPU process.
fn scenario() -> String {
    SCENARIO.replace("PID", &std::process::id().to_string())
}

fn gpus_json(args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> serde_json::Value {
    let out = Command::new(gpu_scaler_tests::workspace_bin("gpu-scaler"))
        .arg("gpus")
        .arg("--json")
        .args(args)
        .envs(envs.iter().copied())
        .env_remove("GPU_SCALER_GPU")
        .output()
        .expect("run gpu-scaler gpus");
    assert!(
        out.status.success(),
        "gpu-scaler gpus failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("gpus --json prints JSON")
}

fn check(v: &serde_json::Value) {
    let d = &v["devices"][0];
    assert_eq!(d["uuid"], "GPU-5c1f0000-0000-0000-0000-000000000001");
    assert_eq!(d["sm_util"]["ok"], 85);
    assert_eq!(d["power_w"]["ok"], 420.0);
    let p = &d["processes"][0];
    assert_eq!(p["pid"], std::process::id());
    assert_eq!(p["sm_util"]["ok"], 60);
    assert_eq!(p["used_memory_mib"]["ok"], 30000);
    // The process is this test, outside any pod: attribution says "host", or
    // is down and says why while the process is still listed.
    match v["attribution_error"].as_str() {
        None => assert_eq!(p["attribution"]["owner"]["kind"], "host", "{v}"),
        Some(why) => {
            assert!(!why.is_empty());
            assert!(p["attribution"].is_null(), "{v}");
        }
    }
}

#[test]
fn gpus_prints_the_mock_scenario() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("gpus.toml");
    std::fs::write(&file, scenario()).expect("write scenario");
    let v = gpus_json(
        &[
            "--gpu",
            "mock",
            "--gpu-scenario",
            file.to_str().expect("utf-8 path"),
        ],
        &[],
    );
    check(&v);
}

#[test]
fn gpus_reads_nvml_through_the_library_given() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("gpus.toml");
    std::fs::write(&file, scenario()).expect("write scenario");
    let lib = fake_nvml();
    let v = gpus_json(
        &[
            "--gpu",
            "nvml",
            "--nvml-lib",
            lib.to_str().expect("utf-8 path"),
        ],
        &[("FAKE_NVML_SCENARIO", file.as_os_str())],
    );
    check(&v);
}

#[test]
fn gpus_without_a_driver_fails_with_the_reason() {
    let out = Command::new(gpu_scaler_tests::workspace_bin("gpu-scaler"))
        .args([
            "gpus",
            "--gpu",
            "nvml",
            "--nvml-lib",
            "/nonexistent/libnvidia-ml.so.1",
        ])
        .output()
        .expect("run gpu-scaler gpus");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loading NVML from /nonexistent/libnvidia-ml.so.1"),
        "{stderr}"
    );
}
