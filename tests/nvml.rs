//! The real NVML collector (nvml-wrapper loading a library at run time) against
//! the fake `libnvidia-ml.so` from `tests/fake-nvml`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use gpu_scaler::gpu::{
    self, GpuDevice, GpuProcess, GpuSnapshot, GpuSource, GpuStatus, ProcessKind, Reading,
    nvml::NvmlSource,
};
use gpu_scaler_tests::fake_nvml::FakeNvml;

const TWO_GPUS: &str = r#"
driver_version = "550.54.15"

[[gpu]]
uuid = "GPU-5c1f0000-0000-0000-0000-000000000001"
name = "NVIDIA H100 80GB HBM3"
memory_total_mib = 81559
utilization = 85
memory_utilization = 40
temperature_c = 62
power_w = 420.5
power_limit_w = 700.0

[[gpu.process]]
pid = 4242
sm_util = 60
mem_util = 25
used_memory_mib = 30000

[[gpu.process]]
pid = 4242
kind = "graphics"
used_memory_mib = 30000

[[gpu.process]]
pid = 5151
kind = "mps"
sm_util = 20
mem_util = 5
used_memory_mib = 1024

[[gpu.process]]
pid = 6161
kind = "graphics"

[[gpu]]
name = "NVIDIA L4"
memory_total_mib = 23034
utilization = 0
memory_utilization = 0
temperature_c = 35
power_w = 16.0
power_limit_w = 72.0
"#;

fn source(fake: &FakeNvml) -> NvmlSource {
    NvmlSource::new(Some(fake.lib_path().to_path_buf()))
}

fn poll(source: &mut NvmlSource) -> GpuSnapshot {
    source
        .poll()
        .expect("a sampling pass through the fake NVML")
}

fn process(device: &GpuDevice, pid: u32) -> &GpuProcess {
    device
        .processes
        .iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("pid {pid} not listed on GPU {}: {device:?}", device.index))
}

fn reason<T: std::fmt::Debug>(r: &Reading<T>) -> &str {
    match r {
        Reading::Unavailable(why) => why,
        Reading::Ok(v) => panic!("expected an unavailable reading, got {v:?}"),
    }
}

#[test]
fn devices_and_processes_come_through_nvml() {
    let fake = FakeNvml::new(TWO_GPUS);
    let snap = poll(&mut source(&fake));
    assert_eq!(snap.devices.len(), 2);

    let h100 = &snap.devices[0];
    assert_eq!(h100.index, 0);
    assert_eq!(h100.uuid, "GPU-5c1f0000-0000-0000-0000-000000000001");
    assert_eq!(h100.name, "NVIDIA H100 80GB HBM3");
    assert_eq!(h100.sm_util, Reading::Ok(85));
    assert_eq!(h100.mem_util, Reading::Ok(40));
    assert_eq!(h100.memory_total_mib, Reading::Ok(81559));
    assert_eq!(
        h100.memory_used_mib,
        Reading::Ok(31024),
        "sum of the processes"
    );
    assert_eq!(h100.temperature_c, Reading::Ok(62));
    assert_eq!(h100.power_w, Reading::Ok(420.5));
    assert_eq!(h100.power_limit_w, Reading::Ok(700.0));
    assert!(!h100.mig_enabled);
    assert_eq!(h100.processes_error, None);

    let pids: Vec<u32> = h100.processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, vec![4242, 5151, 6161], "one entry per pid, sorted");
    let p = process(h100, 4242);
    assert_eq!(p.kind, ProcessKind::Compute);
    assert_eq!(p.used_memory_mib, Reading::Ok(30000));
    assert_eq!(
        (p.sm_util.clone(), p.mem_util.clone()),
        (Reading::Ok(60), Reading::Ok(25))
    );
    assert_eq!(p.gpu_instance_id, None);
    let mps = process(h100, 5151);
    assert_eq!(mps.kind, ProcessKind::Mps);
    assert_eq!(mps.sm_util, Reading::Ok(20));
    let gfx = process(h100, 6161);
    assert_eq!(gfx.kind, ProcessKind::Graphics);
    assert!(reason(&gfx.used_memory_mib).contains("no memory figure"));
    assert_eq!(gfx.sm_util, Reading::Ok(0), "listed without samples: idle");

    let l4 = &snap.devices[1];
    assert_eq!(l4.uuid, "GPU-00000000-0000-0000-0000-000000000001");
    assert_eq!(l4.name, "NVIDIA L4");
    assert_eq!(l4.sm_util, Reading::Ok(0));
    assert_eq!(l4.power_limit_w, Reading::Ok(72.0));
    assert!(l4.processes.is_empty());
}

#[test]
fn figures_missing_from_the_scenario_are_unavailable_not_zero() {
    let fake = FakeNvml::new("[[gpu]]\nname = \"bare\"\n");
    let snap = poll(&mut source(&fake));
    let d = &snap.devices[0];
    for why in [
        reason(&d.sm_util),
        reason(&d.memory_total_mib),
        reason(&d.temperature_c),
        reason(&d.power_w),
    ] {
        assert!(why.contains("not available on the target device"), "{why}");
    }
}

#[test]
fn samples_older_than_last_seen_are_not_counted_twice() {
    let scenario = |extra: &str, ignore: bool| {
        format!(
            "[[gpu]]\nignore_last_seen = {ignore}\n[[gpu.process]]\npid = 7\nused_memory_mib = 1\n\
             sample = [{{ timestamp_us = 1000, sm_util = 40, mem_util = 4 }}, \
             {{ timestamp_us = 2000, sm_util = 61, mem_util = 6 }}{extra}]\n"
        )
    };
    // The fake honours lastSeen (as NVML should), then ignores it (as some
    // drivers do): either way each sample counts in exactly one pass.
    for ignore in [false, true] {
        let fake = FakeNvml::new(&scenario("", ignore));
        let mut src = source(&fake);

        let first = poll(&mut src);
        let p = process(&first.devices[0], 7);
        assert_eq!(
            p.sm_util,
            Reading::Ok(51),
            "mean of both samples (ignore={ignore})"
        );
        assert_eq!(p.mem_util, Reading::Ok(5));

        let second = poll(&mut src);
        assert_eq!(
            process(&second.devices[0], 7).sm_util,
            Reading::Ok(0),
            "no samples newer than lastSeen=2000 (ignore={ignore})"
        );

        fake.set_scenario(&scenario(
            ", { timestamp_us = 3000, sm_util = 90, mem_util = 9 }",
            ignore,
        ));
        let third = poll(&mut src);
        let p = process(&third.devices[0], 7);
        assert_eq!(
            p.sm_util,
            Reading::Ok(90),
            "only the new sample (ignore={ignore})"
        );
        assert_eq!(p.mem_util, Reading::Ok(9));
    }
}

#[test]
fn samples_over_100_percent_are_dropped() {
    let fake = FakeNvml::new(
        "[[gpu]]\n\
         [[gpu.process]]\npid = 1\nsample = [{ timestamp_us = 10, sm_util = 150, mem_util = 20 }, { timestamp_us = 11, sm_util = 50, mem_util = 30 }]\n\
         [[gpu.process]]\npid = 2\nsample = [{ timestamp_us = 12, sm_util = 101, mem_util = 7 }]\n",
    );
    let snap = poll(&mut source(&fake));
    let d = &snap.devices[0];
    assert_eq!(process(d, 1).sm_util, Reading::Ok(50));
    assert_eq!(process(d, 1).mem_util, Reading::Ok(25));
    assert!(reason(&process(d, 2).sm_util).contains("over 100"));
    assert_eq!(process(d, 2).mem_util, Reading::Ok(7));
}

#[test]
fn process_utilization_errors() {
    let scenario = |error: &str| {
        format!(
            "[[gpu]]\n[gpu.errors]\nprocess_utilization = \"{error}\"\n\
             [[gpu.process]]\npid = 9\nsm_util = 70\nused_memory_mib = 100\n"
        )
    };
    // NOT_FOUND is NVML's "no samples since lastSeen": the process was idle.
    let fake = FakeNvml::new(&scenario("NOT_FOUND"));
    let snap = poll(&mut source(&fake));
    assert_eq!(process(&snap.devices[0], 9).sm_util, Reading::Ok(0));

    for (error, text) in [
        ("NOT_SUPPORTED", "not available on the target device"),
        ("UNKNOWN", "internal driver error"),
        ("GPU_IS_LOST", "fell off the bus"),
    ] {
        let fake = FakeNvml::new(&scenario(error));
        let snap = poll(&mut source(&fake));
        let p = process(&snap.devices[0], 9);
        let why = reason(&p.sm_util);
        assert!(
            why.contains("nvmlDeviceGetProcessUtilization") && why.contains(text),
            "{why}"
        );
        assert!(reason(&p.mem_util).contains(text));
        assert_eq!(
            p.used_memory_mib,
            Reading::Ok(100),
            "memory does not depend on samples"
        );
    }
}

#[test]
fn a_gpu_lost_mid_run_is_unavailable_and_recovers() {
    let fake = FakeNvml::new(TWO_GPUS);
    let mut src = source(&fake);
    let before = poll(&mut src);
    assert_eq!(before.devices[0].sm_util, Reading::Ok(85));

    // GPU 0 falls off the bus: every call on it fails, its handle too.
    fake.set_scenario(&TWO_GPUS.replacen(
        "power_limit_w = 700.0\n",
        "power_limit_w = 700.0\n[gpu.errors]\nall = \"GPU_IS_LOST\"\n",
        1,
    ));
    let lost = poll(&mut src);
    assert_eq!(lost.devices.len(), 2);
    let d = &lost.devices[0];
    assert_eq!(
        d.uuid, "GPU-5c1f0000-0000-0000-0000-000000000001",
        "identity kept"
    );
    assert_eq!(d.name, "NVIDIA H100 80GB HBM3");
    for why in [
        reason(&d.sm_util),
        reason(&d.memory_used_mib),
        reason(&d.power_w),
    ] {
        assert!(why.contains("fell off the bus"), "{why}");
    }
    assert!(d.processes.is_empty());
    assert!(
        d.processes_error
            .as_deref()
            .is_some_and(|e| e.contains("fell off the bus"))
    );
    assert_eq!(
        lost.devices[1].sm_util,
        Reading::Ok(0),
        "the other GPU is unaffected"
    );

    // Only some calls fail: those figures alone are unavailable.
    fake.set_scenario(&TWO_GPUS.replacen(
        "power_limit_w = 700.0\n",
        "power_limit_w = 700.0\n[gpu.errors]\ntemperature = \"UNKNOWN\"\ncompute_processes = \"GPU_IS_LOST\"\n",
        1,
    ));
    let partial = poll(&mut src);
    let d = &partial.devices[0];
    assert_eq!(d.sm_util, Reading::Ok(85));
    assert!(reason(&d.temperature_c).contains("internal driver error"));
    assert!(d.processes.is_empty());
    assert!(
        d.processes_error
            .as_deref()
            .is_some_and(|e| e.contains("nvmlDeviceGetComputeRunningProcesses_v3"))
    );

    fake.set_scenario(TWO_GPUS);
    let after = poll(&mut src);
    assert_eq!(
        after.devices, before.devices,
        "recovered to the same figures"
    );
}

#[test]
fn a_gpu_that_stops_being_enumerated_is_reported_lost() {
    let fake = FakeNvml::new(TWO_GPUS);
    let mut src = source(&fake);
    poll(&mut src);
    let one_gpu = &TWO_GPUS[..TWO_GPUS.rfind("[[gpu]]").expect("second GPU")];
    fake.set_scenario(one_gpu);
    let snap = poll(&mut src);
    assert_eq!(snap.devices.len(), 2);
    let gone = &snap.devices[1];
    assert_eq!(gone.uuid, "GPU-00000000-0000-0000-0000-000000000001");
    assert!(reason(&gone.sm_util).contains("no longer enumerated"));
    assert!(gone.processes_error.is_some());
}

#[test]
fn mig_devices_report_memory_per_instance_and_no_utilization() {
    let fake = FakeNvml::new(
        "[[gpu]]\nname = \"NVIDIA A100-SXM4-40GB\"\nmig = true\nutilization = 50\nmemory_utilization = 5\nmemory_total_mib = 40960\n\
         [[gpu.process]]\npid = 11\nsm_util = 30\nused_memory_mib = 4000\ngpu_instance_id = 1\n\
         [[gpu.process]]\npid = 12\nused_memory_mib = 9000\ngpu_instance_id = 2\n",
    );
    let snap = poll(&mut source(&fake));
    let d = &snap.devices[0];
    assert!(d.mig_enabled);
    assert!(
        reason(&d.sm_util).contains("not available"),
        "device utilization"
    );
    assert_eq!(d.memory_used_mib, Reading::Ok(13000));
    let a = process(d, 11);
    assert_eq!(a.gpu_instance_id, Some(1));
    assert_eq!(a.used_memory_mib, Reading::Ok(4000));
    assert!(reason(&a.sm_util).contains("MIG"));
    assert!(reason(&a.mem_util).contains("MIG"));
    assert_eq!(process(d, 12).gpu_instance_id, Some(2));
}

#[test]
fn a_missing_symbol_is_a_clean_error() {
    // No per-process utilization in this "driver": those figures are
    // unavailable, everything else still reads.
    let fake = FakeNvml::without_symbol(TWO_GPUS, "nvmlDeviceGetProcessUtilization");
    let snap = poll(&mut source(&fake));
    let d = &snap.devices[0];
    assert_eq!(d.sm_util, Reading::Ok(85));
    let why = reason(&process(d, 4242).sm_util);
    assert!(why.contains("function symbol failed to load"), "{why}");
    assert_eq!(process(d, 4242).used_memory_mib, Reading::Ok(30000));

    // An older driver without the MPS list: there are no MPS clients to miss.
    let fake = FakeNvml::without_symbol(TWO_GPUS, "nvmlDeviceGetMPSComputeRunningProcesses_v3");
    let snap = poll(&mut source(&fake));
    let pids: Vec<u32> = snap.devices[0].processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, vec![4242, 6161]);
    assert_eq!(snap.devices[0].processes_error, None);

    // Without nvmlInit_v2 the library cannot be used at all.
    let fake = FakeNvml::without_symbol(TWO_GPUS, "nvmlInit_v2");
    let err = source(&fake)
        .poll()
        .expect_err("no nvmlInit_v2")
        .to_string();
    assert!(
        err.contains("loading NVML from") && err.contains("nvmlInit_v2"),
        "{err}"
    );
}

#[test]
fn library_level_errors_fail_the_pass() {
    let fake = FakeNvml::new(&format!(
        "{TWO_GPUS}\n[errors]\ninit = \"DRIVER_NOT_LOADED\"\n"
    ));
    let err = source(&fake).poll().expect_err("init fails").to_string();
    assert!(err.contains("NVIDIA driver is not loaded"), "{err}");

    let fake = FakeNvml::new(&format!(
        "{TWO_GPUS}\n[errors]\ndevice_count = \"UNKNOWN\"\n"
    ));
    let err = source(&fake).poll().expect_err("count fails").to_string();
    assert!(err.contains("nvmlDeviceGetCount_v2"), "{err}");
}

/// Waits for a published status that satisfies `done`.
fn wait_for(
    rx: &tokio::sync::watch::Receiver<Arc<GpuStatus>>,
    what: &str,
    done: impl Fn(&GpuStatus) -> bool,
) -> Arc<GpuStatus> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = rx.borrow().clone();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last status: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_poller_survives_a_missing_library_and_recovers_by_itself() {
    let fake = FakeNvml::new(TWO_GPUS);
    let dir = tempfile::tempdir().expect("temporary directory");
    let lib = dir.path().join("libnvidia-ml.so.1");
    let rx = gpu::start(gpu::Config {
        source: gpu::SourceKind::Nvml,
        nvml_lib: Some(lib.clone()),
        scenario: None,
        poll_interval: Duration::from_millis(50),
    });
    let missing = wait_for(&rx, "the load error", |s| {
        s.error
            .as_deref()
            .is_some_and(|e| e.contains("loading NVML from"))
    });
    assert!(missing.last_good.is_none(), "nothing was ever read");

    // The driver appears (installed, or the container restarted with it);
    // renamed into place so the poller never loads half a file.
    std::fs::copy(
        fake.lib_path().with_file_name("fake-nvml.toml"),
        dir.path().join("fake-nvml.toml"),
    )
    .expect("install the scenario");
    let tmp = dir.path().join("lib.tmp");
    std::fs::copy(fake.lib_path(), &tmp).expect("copy the library");
    std::fs::rename(&tmp, &lib).expect("install the library");
    let ok = wait_for(&rx, "a good pass", |s| s.error.is_none());
    let snap = ok.last_good.as_ref().expect("a snapshot");
    assert_eq!(snap.devices.len(), 2);

    // The driver fails as a whole: the last good snapshot stays, marked stale.
    std::fs::write(
        dir.path().join("fake-nvml.toml"),
        format!("{TWO_GPUS}\n[errors]\ndevice_count = \"UNKNOWN\"\n"),
    )
    .expect("break the scenario");
    let stale = wait_for(&rx, "the count error", |s| s.error.is_some());
    assert!(
        stale
            .error
            .as_deref()
            .is_some_and(|e| e.contains("nvmlDeviceGetCount_v2"))
    );
    let kept = stale.last_good.clone().expect("last good snapshot kept");
    assert_eq!(kept.devices, snap.devices, "the good figures");
    // Later failed passes keep publishing that very snapshot, marked stale.
    let later = wait_for(&rx, "a later failed pass", |s| {
        s.updated_at > stale.updated_at && s.error.is_some()
    });
    assert!(
        later
            .last_good
            .as_ref()
            .is_some_and(|s| Arc::ptr_eq(s, &kept))
    );

    // ...and it recovers by itself once NVML answers again (re-initialized).
    std::fs::write(dir.path().join("fake-nvml.toml"), TWO_GPUS).expect("fix the scenario");
    let back = wait_for(&rx, "recovery", |s| s.error.is_none());
    assert!(
        back.last_good
            .as_ref()
            .is_some_and(|s| s.taken_at > snap.taken_at)
    );
}

#[test]
fn mock_and_nvml_answer_alike_for_one_scenario() {
    let fake = FakeNvml::new(TWO_GPUS);
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("scenario.toml");
    std::fs::write(&file, TWO_GPUS).expect("write scenario");
    let mut mock = gpu::source(&gpu::Config {
        source: gpu::SourceKind::Mock,
        nvml_lib: None,
        scenario: Some(file),
        poll_interval: Duration::from_secs(1),
    })
    .expect("mock source");
    let from_mock = mock.poll().expect("mock pass");
    let from_nvml = poll(&mut source(&fake));
    assert_eq!(from_mock.devices, from_nvml.devices);
}
