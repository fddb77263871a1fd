//! GPU sampling figures (run with `cargo xtask bench gpu`, or
//! `cargo build --release -p gpu-scaler && cargo bench -p gpu-scaler-tests --bench gpu_pass`):
//!
//! 1. the cost of one sampling pass through the real NVML code path (nvml-wrapper
//!    loading the fake libnvidia-ml.so) for 8 GPUs x 64 processes, next to the
//!    cost of the fake library alone answering the same NVML calls, measured
//!    alternately so both see the same machine; the difference is our code's
//!    (collector + nvml-wrapper) share;
//!    The same for a mixed node: 2 GPUs in MIG mode (7 instances each, GPM),
//!    2 GPUs under MPS (a server and 63 clients each) and 4 plain ones, still
//!    64 processes per GPU;
//! 2. the CPU the poller uses at a 1 s poll interval, in this process, and of
//!    the whole `gpu-scaler serve --gpu nvml` daemon when it runs (its threads'
//!    on-CPU time from /proc/<pid>/task/*/schedstat).
//!
//! Environment: `GPU_BENCH_PASSES` (default 2000), `GPU_BENCH_CPU_SECS`
//! (default 30).

use std::{
    ffi::{c_char, c_uint},
    path::Path,
    time::{Duration, Instant},
};

use gpu_scaler::testing::fake_nvml_library as fake_nvml;

use gpu_scaler::gpu::{self, GpuSource, mock::MockSource, nvml::NvmlSource};
use nvml_wrapper_sys::bindings::{
    NvmlLib, field_id, nvmlDevice_t, nvmlFieldValue_t, nvmlMemory_v2_t, nvmlProcessInfo_t,
    nvmlProcessUtilizationInfo_v1_t, nvmlProcessesUtilizationInfo_t, nvmlUtilization_t,
};

const GPUS: u32 = 8;
const PROCESSES: u32 = 64;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 8 GPUs with 64 busy processes each, in the README's scenario format.
fn scenario() -> String {
    let mut s = String::new();
    for g in 0..GPUS {
        s += "[[gpu]]\nname = \"NVIDIA H100 80GB HBM3\"\nmemory_total_mib = 81559\nutilization = 85\n\
              memory_utilization = 40\ntemperature_c = 62\npower_w = 420.0\npower_limit_w = 700.0\n";
        for p in 0..PROCESSES {
            s += &format!(
                "[[gpu.process]]\npid = {}\nsm_util = {}\nmem_util = {}\nused_memory_mib = {}\n",
                10_000 + g * 1000 + p,
                1 + p % 90,
                p % 40,
                100 + p
            );
        }
    }
    s
}

/// 8 GPUs x 64 processes: GPUs 0-1 in MIG mode (7 instances of 1g.18gb, GPM),
/// 2-3 under MPS (the server and 63 clients), 4-7 plain.
fn mixed_scenario() -> String {
    let mut s = String::new();
    for g in 0..GPUS {
        let pid = |p: u32| 10_000 + g * 1000 + p;
        s += "[[gpu]]\nname = \"NVIDIA H200\"\nmemory_total_mib = 143771\n\
              temperature_c = 62\npower_w = 420.0\npower_limit_w = 700.0\n\
              pcie_tx_kbps = 1000\npcie_rx_kbps = 2000\nnvlink_tx_mbps = 100.0\nnvlink_rx_mbps = 50.0\n";
        match g {
            0 | 1 => {
                s += "mig = true\ngpm = true\n";
                for i in 0..7 {
                    s += &format!(
                        "[[gpu.mig_instance]]\ngpu_instance_id = {}\nprofile = \"1g.18gb\"\n\
                         memory_total_mib = 16384\nsm_util = {}\n",
                        i + 1,
                        10 + i * 10
                    );
                }
                for p in 0..PROCESSES {
                    s += &format!(
                        "[[gpu.process]]\npid = {}\nused_memory_mib = {}\ngpu_instance_id = {}\n",
                        pid(p),
                        100 + p,
                        1 + p % 7
                    );
                }
            }
            2 | 3 => {
                s += &format!(
                    "utilization = 85\nmemory_utilization = 40\nmps_server = {}\n\
                     [[gpu.process]]\npid = {}\nname = \"nvidia-cuda-mps-server\"\nused_memory_mib = 300\n",
                    pid(0),
                    pid(0)
                );
                for p in 1..PROCESSES {
                    s += &format!(
                        "[[gpu.process]]\npid = {}\nkind = \"mps\"\nsm_util = 1\nused_memory_mib = {}\n",
                        pid(p),
                        100 + p
                    );
                }
            }
            _ => {
                s += "utilization = 85\nmemory_utilization = 40\n";
                for p in 0..PROCESSES {
                    s += &format!(
                        "[[gpu.process]]\npid = {}\nsm_util = {}\nmem_util = {}\nused_memory_mib = {}\n",
                        pid(p),
                        1 + p % 90,
                        p % 40,
                        100 + p
                    );
                }
            }
        }
    }
    s
}

/// Passes of the nvml source (fake lib) and the mock source over the mixed
/// scenario, interleaved.
fn mixed_cost(passes: u64) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let lib = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml(), &lib).expect("copy the fake library");
    std::fs::write(dir.path().join("fake-nvml.toml"), mixed_scenario()).expect("write scenario");
    let mut source = NvmlSource::new(Some(lib.clone()));
    let mut mock = MockSource::new(dir.path().join("fake-nvml.toml"));
    for _ in 0..50 {
        source.poll().expect("warm-up");
        mock.poll().expect("warm-up");
    }
    let snap = source.poll().expect("pass");
    let processes: usize = snap.devices.iter().map(|d| d.processes.len()).sum();
    assert_eq!(
        processes,
        (GPUS * PROCESSES) as usize,
        "every process listed once"
    );
    assert_eq!(snap.devices.len(), 8 + 2 * 7, "8 GPUs and 14 MIG instances");
    let (mut full, mut mocked) = (Vec::new(), Vec::new());
    for _ in 0..passes {
        let t = Instant::now();
        std::hint::black_box(source.poll().expect("pass"));
        full.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(mock.poll().expect("mock pass"));
        mocked.push(t.elapsed());
    }
    let (full_m, full_p) = median_p90(full);
    let (mock_m, mock_p) = median_p90(mocked);
    println!(
        "GPU sampling pass, mixed node: {GPUS} GPUs x {PROCESSES} processes (2 MIG x 7 instances with GPM, 2 MPS, 4 plain), {passes} passes"
    );
    println!(
        "  nvml source pass (collector + nvml-wrapper + fake lib): median {:8.1} us  p90 {:8.1} us",
        us(full_m),
        us(full_p)
    );
    println!(
        "  mock source pass (read scenario file + collector)     : median {:8.1} us  p90 {:8.1} us",
        us(mock_m),
        us(mock_p)
    );
}

fn median_p90(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[v.len() * 9 / 10])
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The NVML calls one collector pass makes (nvml-wrapper's two-call array
/// protocol included), straight into the library, with no wrapper and no
/// collector: what the fake library itself costs.
///
/// # Safety
/// `lib` must be an initialized NVML.
unsafe fn raw_pass(lib: &NvmlLib) {
    let f = |r: u32| assert!(r == 0 || r == 7, "NVML call failed: {r}");
    unsafe {
        let mut count: c_uint = 0;
        f((lib.nvmlDeviceGetCount_v2.as_ref().expect("sym"))(
            &mut count,
        ));
        for i in 0..count {
            let mut dev: nvmlDevice_t = std::ptr::null_mut();
            f((lib.nvmlDeviceGetHandleByIndex_v2.as_ref().expect("sym"))(
                i, &mut dev,
            ));
            let mut buf = [0 as c_char; 96];
            f((lib.nvmlDeviceGetUUID.as_ref().expect("sym"))(
                dev,
                buf.as_mut_ptr(),
                96,
            ));
            f((lib.nvmlDeviceGetName.as_ref().expect("sym"))(
                dev,
                buf.as_mut_ptr(),
                96,
            ));
            let mut util: nvmlUtilization_t = std::mem::zeroed();
            f((lib.nvmlDeviceGetUtilizationRates.as_ref().expect("sym"))(
                dev, &mut util,
            ));
            let mut mem: nvmlMemory_v2_t = std::mem::zeroed();
            mem.version = (std::mem::size_of::<nvmlMemory_v2_t>() | (2 << 24)) as u32;
            f((lib.nvmlDeviceGetMemoryInfo_v2.as_ref().expect("sym"))(
                dev, &mut mem,
            ));
            let (mut a, mut b): (c_uint, c_uint) = (0, 0);
            f((lib.nvmlDeviceGetMigMode.as_ref().expect("sym"))(
                dev, &mut a, &mut b,
            ));
            for list in [
                &lib.nvmlDeviceGetComputeRunningProcesses_v3,
                &lib.nvmlDeviceGetMPSComputeRunningProcesses_v3,
                &lib.nvmlDeviceGetGraphicsRunningProcesses_v3,
            ] {
                let list = list.as_ref().expect("sym");
                let mut n: c_uint = 0;
                f(list(dev, &mut n, std::ptr::null_mut()));
                if n > 0 {
                    n += 5;
                    let mut v: Vec<nvmlProcessInfo_t> = vec![std::mem::zeroed(); n as usize];
                    f(list(dev, &mut n, v.as_mut_ptr()));
                }
            }
            // nvmlDeviceGetProcessesUtilizationInfo, as the collector prefers.
            let samples = lib
                .nvmlDeviceGetProcessesUtilizationInfo
                .as_ref()
                .expect("sym");
            let mut info = nvmlProcessesUtilizationInfo_t {
                version: (std::mem::size_of::<nvmlProcessesUtilizationInfo_t>() | (1 << 24)) as u32,
                processSamplesCount: 0,
                lastSeenTimeStamp: 0,
                procUtilArray: std::ptr::null_mut(),
            };
            f(samples(dev, &mut info));
            let mut v: Vec<nvmlProcessUtilizationInfo_v1_t> =
                vec![std::mem::zeroed(); info.processSamplesCount as usize];
            info.procUtilArray = v.as_mut_ptr();
            f(samples(dev, &mut info));
            for counter in [0, 1] {
                let r =
                    (lib.nvmlDeviceGetPcieThroughput.as_ref().expect("sym"))(dev, counter, &mut a);
                assert!(r == 0 || r == 3, "NVML call failed: {r}");
            }
            let mut fields: [nvmlFieldValue_t; 2] = std::mem::zeroed();
            fields[0].fieldId = field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX;
            fields[1].fieldId = field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX;
            f((lib.nvmlDeviceGetFieldValues.as_ref().expect("sym"))(
                dev,
                2,
                fields.as_mut_ptr(),
            ));
            let mut energy = 0u64;
            f((lib
                .nvmlDeviceGetTotalEnergyConsumption
                .as_ref()
                .expect("sym"))(dev, &mut energy));
            f((lib.nvmlDeviceGetTemperature.as_ref().expect("sym"))(
                dev, 0, &mut a,
            ));
            f((lib.nvmlDeviceGetPowerUsage.as_ref().expect("sym"))(
                dev, &mut a,
            ));
            f((lib.nvmlDeviceGetEnforcedPowerLimit.as_ref().expect("sym"))(dev, &mut a));
        }
    }
}

/// CPU time (user + system) of this process.
fn cpu_time() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage fills the struct it is given.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(r, 0, "getrusage");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn pass_cost(dir: &Path, lib: &Path, passes: u64) {
    let mut source = NvmlSource::new(Some(lib.to_path_buf()));
    let first = source.poll().expect("a pass through the fake NVML");
    assert_eq!(first.devices.len(), GPUS as usize);
    assert!(
        first
            .devices
            .iter()
            .all(|d| d.processes.len() == PROCESSES as usize)
    );

    // The same library file, so the same loaded copy and scenario.
    // SAFETY: loading the fake library, which has no initializers.
    let raw = unsafe { NvmlLib::new(lib) }.expect("load the fake library");
    // SAFETY: symbol present; NVML refcounts init.
    assert_eq!(unsafe { (raw.nvmlInit_v2.as_ref().expect("sym"))() }, 0);

    let mut mock = MockSource::new(dir.join("fake-nvml.toml"));
    mock.poll().expect("mock pass");

    for _ in 0..50 {
        source.poll().expect("warm-up");
        // SAFETY: initialized above.
        unsafe { raw_pass(&raw) };
    }
    let (mut full, mut fake, mut mocked) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..passes {
        let t = Instant::now();
        let snap = source.poll().expect("pass");
        full.push(t.elapsed());
        std::hint::black_box(snap);

        let t = Instant::now();
        // SAFETY: initialized above.
        unsafe { raw_pass(&raw) };
        fake.push(t.elapsed());

        let t = Instant::now();
        let snap = mock.poll().expect("mock pass");
        mocked.push(t.elapsed());
        std::hint::black_box(snap);
    }
    let (full_m, full_p) = median_p90(full);
    let (fake_m, fake_p) = median_p90(fake);
    let (mock_m, mock_p) = median_p90(mocked);
    let ours = full_m.saturating_sub(fake_m);
    println!(
        "GPU sampling pass: {GPUS} GPUs x {PROCESSES} processes, {passes} passes of each, interleaved"
    );
    println!(
        "  nvml source pass (collector + nvml-wrapper + fake lib): median {:8.1} us  p90 {:8.1} us",
        us(full_m),
        us(full_p)
    );
    println!(
        "  fake lib alone (same NVML calls, raw FFI)             : median {:8.1} us  p90 {:8.1} us",
        us(fake_m),
        us(fake_p)
    );
    println!(
        "  our code (difference of medians)                      : {:8.1} us  ({:.0} % of the pass; goal < 1000 us)",
        us(ours),
        100.0 * ours.as_secs_f64() / full_m.as_secs_f64()
    );
    println!(
        "  mock source pass (read scenario file + collector)     : median {:8.1} us  p90 {:8.1} us",
        us(mock_m),
        us(mock_p)
    );
}

fn poller_cpu(lib: &Path, secs: u64) {
    let rx = gpu::start(gpu::Config {
        source: gpu::SourceKind::Nvml,
        nvml_lib: Some(lib.to_path_buf()),
        scenario: None,
        poll_interval: Duration::from_secs(1),
    });
    // Let it load NVML and settle.
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        rx.borrow().error.is_none(),
        "poller: {:?}",
        rx.borrow().error
    );
    let (cpu0, t0) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
    assert!(
        rx.borrow().error.is_none(),
        "poller: {:?}",
        rx.borrow().error
    );
    println!(
        "GPU poller at a 1 s interval ({GPUS} GPUs x {PROCESSES} processes, fake lib), {:.0} s: \
         {:.1} ms CPU = {:.3} % of one core (goal < 0.5 %)",
        wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e3,
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
}

/// On-CPU time of every thread of `pid`, from the scheduler's own accounting
/// (nanoseconds, unlike the 10 ms ticks of /proc/<pid>/stat).
fn task_cpu(pid: u32) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let stat = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
        total += Duration::from_nanos(ns);
    }
    Some(total)
}

fn daemon_cpu(lib: &Path, secs: u64) {
    let mut child = std::process::Command::new(gpu_scaler_tests::workspace_bin("gpu-scaler"))
        .args(["serve", "--gpu", "nvml", "--poll-interval", "1s"])
        .arg("--nvml-lib")
        .arg(lib)
        // procfs attribution: eBPF would also count every exec on this shared
        // build machine, which is not GPU sampling.
        .args(["--attribution", "procfs"])
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn gpu-scaler serve");
    std::thread::sleep(Duration::from_secs(3));
    if let Ok(Some(status)) = child.try_wait() {
        let out = child.wait_with_output().expect("daemon output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!(
            "gpu-scaler serve exited at start-up ({status}), no daemon figure: {}",
            stderr.lines().last().unwrap_or("")
        );
        return;
    }
    let pid = child.id();
    let (cpu0, t0) = (task_cpu(pid).expect("daemon schedstat"), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let cpu = task_cpu(pid).expect("daemon schedstat") - cpu0;
    let wall = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "gpu-scaler serve --gpu nvml at a 1 s interval (fake lib), {:.0} s: {:.1} ms CPU = {:.3} % of one core (goal < 0.5 %)",
        wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e3,
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let dir = tempfile::tempdir().expect("temporary directory");
    let lib = dir.path().join("libnvidia-ml.so.1");
    std::fs::copy(fake_nvml(), &lib).expect("copy the fake library");
    std::fs::write(dir.path().join("fake-nvml.toml"), scenario()).expect("write scenario");

    let passes = env_or("GPU_BENCH_PASSES", 2000);
    pass_cost(dir.path(), &lib, passes);
    mixed_cost(passes);
    let secs = env_or("GPU_BENCH_CPU_SECS", 30);
    poller_cpu(&lib, secs);
    daemon_cpu(&lib, secs);
}
