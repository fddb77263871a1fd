//! The real NVML collector (nvml-wrapper loading a library at run time) against
//! the fake `libnvidia-ml.so` from `tests/fake-nvml`, which behaves as unkindly
//! as a real driver (issue 11): each driver behaviour below, and through
//! `serve` to KEDA's GetMetrics where it changes the value.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use gpu_scaler::{
    gpu::{
        self, GpuDevice, GpuProcess, GpuSnapshot, GpuSource, GpuStatus, ProcessKind,
        nvml::NvmlSource,
    },
    snapshot::Reading,
};
use gpu_scaler_tests::{
    fake_nvml::FakeNvml,
    scaler::{Node, metric_value, pod},
};

const TWO_GPUS: &str = r#"
driver_version = "550.54.15"

[[gpu]]
uuid = "GPU-5c1f0000-0000-0000-0000-000000000001"
name = "NVIDIA H100 80GB HBM3"
memory_total_mib = 81559
utilization = 65
memory_utilization = 40
temperature_c = 62
energy_mj = 123456789
pcie_tx_kbps = 1200
pcie_rx_kbps = 3400
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
energy_mj = 5000
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
    assert_eq!(h100.sm_util, Reading::Ok(65));
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
    assert_eq!(
        mps.used_memory_mib,
        Reading::Ok(1024),
        "MPS client memory is exact"
    );
    assert!(
        reason(&mps.sm_util).contains("MPS client"),
        "NVML credits an MPS client's SM time to the server"
    );
    let gfx = process(h100, 6161);
    assert_eq!(gfx.kind, ProcessKind::Graphics);
    assert!(reason(&gfx.used_memory_mib).contains("no memory figure"));
    assert_eq!(
        gfx.sm_util,
        Reading::Ok(0),
        "no sample, and the sampled processes account for the GPU's 65 %: idle"
    );
    assert_eq!(h100.counters.pcie_tx_kbps, Reading::Ok(1200));
    assert_eq!(h100.counters.pcie_rx_kbps, Reading::Ok(3400));
    assert_eq!(h100.counters.energy_mj, Reading::Ok(123_456_789));
    assert!(reason(&h100.counters.nvlink_tx_mbps).contains("not available"));

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
            "[[gpu]]\nignore_last_seen = {ignore}\nutilization = 0\nmemory_utilization = 0\n\
             [[gpu.process]]\npid = 7\nused_memory_mib = 1\n\
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
            "no samples newer than lastSeen=2000 on an idle GPU (ignore={ignore})"
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
    let busy = |error: &str, util: u32| {
        format!(
            "[[gpu]]\nutilization = {util}\nmemory_utilization = 1\n\
             [gpu.errors]\nprocess_utilization = \"{error}\"\n\
             [[gpu.process]]\npid = 9\nsm_util = 70\nused_memory_mib = 100\n"
        )
    };
    let scenario = |error: &str| busy(error, 3);
    // NOT_FOUND is NVML's "no samples since lastSeen": on a GPU that is itself
    // idle the process was idle ...
    let fake = FakeNvml::new(&scenario("NOT_FOUND"));
    let snap = poll(&mut source(&fake));
    assert_eq!(process(&snap.devices[0], 9).sm_util, Reading::Ok(0));
    // ... but on a busy GPU it says nothing about the process: unknown.
    let fake = FakeNvml::new(&busy("NOT_FOUND", 90));
    let snap = poll(&mut source(&fake));
    let why = reason(&process(&snap.devices[0], 9).sm_util).to_owned();
    assert!(
        why.contains("90 % busy") && why.contains("account for 0 %"),
        "{why}"
    );

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
            // NOT_SUPPORTED from the newer call falls back to the legacy one.
            why.contains("nvmlDeviceGetProcess")
                && why.contains("Utilization")
                && why.contains(text),
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
    assert_eq!(before.devices[0].sm_util, Reading::Ok(65));

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
    assert_eq!(d.sm_util, Reading::Ok(65));
    assert!(reason(&d.temperature_c).contains("internal driver error"));
    assert!(d.processes.is_empty());
    assert!(
        d.processes_error
            .as_deref()
            .is_some_and(|e| e.contains("nvmlDeviceGetComputeRunningProcesses_v3"))
    );

    fake.set_scenario(TWO_GPUS);
    let after = poll(&mut src);
    // The energy counter kept counting meanwhile.
    assert_eq!(
        steady(after.devices),
        steady(before.devices),
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

/// An H200 in MIG mode with two instances; `extra` goes into the GPU's table.
fn mig_scenario(extra: &str) -> String {
    format!(
        "[[gpu]]\nuuid = \"GPU-h200\"\nname = \"NVIDIA H200\"\nmig = true\n{extra}\n\
         memory_total_mib = 143771\ntemperature_c = 50\npower_w = 300.0\n\
         [[gpu.mig_instance]]\ngpu_instance_id = 9\nuuid = \"MIG-small\"\nprofile = \"1g.18gb\"\nmemory_total_mib = 16384\nsm_util = 70\n\
         [[gpu.mig_instance]]\ngpu_instance_id = 1\nuuid = \"MIG-big\"\nprofile = \"3g.71gb\"\nmemory_total_mib = 71680\nsm_util = 40\n\
         [[gpu.process]]\npid = 11\nsm_util = 30\nused_memory_mib = 14000\ngpu_instance_id = 9\n\
         [[gpu.process]]\npid = 12\nused_memory_mib = 9000\ngpu_instance_id = 1\n\
         [[gpu.process]]\npid = 13\nused_memory_mib = 1000\ngpu_instance_id = 1\n"
    )
}

fn device<'a>(snap: &'a GpuSnapshot, uuid: &str) -> &'a GpuDevice {
    snap.devices
        .iter()
        .find(|d| d.uuid == uuid)
        .unwrap_or_else(|| panic!("no device {uuid}: {:?}", snap.devices))
}

#[test]
fn mig_instances_are_devices_with_their_own_memory() {
    // No privilege (the default DaemonSet): the parent handle refuses memory
    // and process queries; the instances' own handles answer.
    let fake = FakeNvml::new(&mig_scenario(""));
    let snap = poll(&mut source(&fake));
    assert_eq!(snap.devices.len(), 3, "the GPU and its two instances");
    let parent = device(&snap, "GPU-h200");
    assert!(parent.mig_enabled);
    assert!(parent.mig_instance.is_none());
    let why = reason(&parent.memory_used_mib);
    assert!(
        why.contains("permission") && why.contains("docs/security.md"),
        "{why}"
    );
    assert!(
        parent.processes.is_empty(),
        "processes live on the instances"
    );
    assert_eq!(parent.processes_error, None);
    assert!(reason(&parent.sm_util).contains("not available"));

    let small = device(&snap, "MIG-small");
    assert_eq!(small.index, 0, "the parent's index");
    assert_eq!(small.name, "NVIDIA H200 MIG 1g.18gb");
    let mig = small.mig_instance.as_ref().expect("an instance");
    assert_eq!(
        (mig.parent_uuid.as_str(), mig.gpu_instance_id),
        ("GPU-h200", 9)
    );
    assert_eq!(
        small.memory_total_mib,
        Reading::Ok(16384),
        "the instance's size"
    );
    assert_eq!(small.memory_used_mib, Reading::Ok(14000));
    assert_eq!(small.temperature_c, Reading::Ok(50), "one chip");
    assert!(reason(&small.power_w).contains("whole GPU"));
    assert!(reason(&small.counters.energy_mj).contains("whole GPU"));
    let p = process(small, 11);
    assert_eq!(p.used_memory_mib, Reading::Ok(14000));
    assert_eq!(p.gpu_instance_id, Some(9));
    assert!(reason(&p.sm_util).contains("GPM"), "no GPM: no SM figure");
    assert!(reason(&small.sm_util).contains("GPM"));

    let big = device(&snap, "MIG-big");
    assert_eq!(big.memory_total_mib, Reading::Ok(71680));
    assert_eq!(big.memory_used_mib, Reading::Ok(10000));
    let pids: Vec<u32> = big.processes.iter().map(|p| p.pid).collect();
    assert_eq!(pids, vec![12, 13]);

    // With the monitor privilege the parent's whole-GPU memory reads too.
    let fake = FakeNvml::new(&mig_scenario("mig_monitor = true"));
    let snap = poll(&mut source(&fake));
    assert_eq!(
        device(&snap, "GPU-h200").memory_used_mib,
        Reading::Ok(24000)
    );
}

#[test]
fn gpm_gives_mig_instances_their_sm_activity() {
    let fake = FakeNvml::new(&mig_scenario("gpm = true"));
    let mut src = source(&fake);
    let first = poll(&mut src);
    assert!(
        reason(&device(&first, "MIG-small").sm_util).contains("two samples"),
        "GPM needs two samples: {:?}",
        device(&first, "MIG-small").sm_util
    );
    let second = poll(&mut src);
    let small = device(&second, "MIG-small");
    assert_eq!(small.sm_util, Reading::Ok(70));
    assert_eq!(
        process(small, 11).sm_util,
        Reading::Ok(70),
        "the instance's only process has all of it"
    );
    let big = device(&second, "MIG-big");
    assert_eq!(big.sm_util, Reading::Ok(40));
    assert!(
        reason(&process(big, 12).sm_util).contains("2 processes share"),
        "two processes: GPM cannot split the instance"
    );
}

#[test]
fn mps_clients_have_exact_memory_and_no_invented_sm() {
    let fake = FakeNvml::new(MPS);
    let snap = poll(&mut source(&fake));
    let d = &snap.devices[0];
    assert_eq!(d.sm_util, Reading::Ok(85));
    for (pid, mib) in [(11, 20000), (12, 30000)] {
        let c = process(d, pid);
        assert_eq!(c.kind, ProcessKind::Mps);
        assert_eq!(c.used_memory_mib, Reading::Ok(mib));
        let why = reason(&c.sm_util);
        assert!(why.contains("MPS server (pid 900)"), "{why}");
        assert!(reason(&c.mem_util).contains("MPS"));
    }
    let server = process(d, 900);
    assert_eq!(server.kind, ProcessKind::Compute);
    let why = reason(&server.sm_util);
    assert!(
        why.contains("MPS server") && why.contains("[11, 12]"),
        "the server never silently keeps its clients' SM time: {why}"
    );
    assert_eq!(server.used_memory_mib, Reading::Ok(300));
}

const MPS: &str = r#"
[[gpu]]
name = "NVIDIA A100"
memory_total_mib = 81920
utilization = 85
memory_utilization = 30
power_w = 300.0
mps_server = 900

[[gpu.process]]
pid = 900
name = "/usr/bin/nvidia-cuda-mps-server"
used_memory_mib = 300

[[gpu.process]]
pid = 11
kind = "mps"
sm_util = 40
mem_util = 10
used_memory_mib = 20000

[[gpu.process]]
pid = 12
kind = "mps"
sm_util = 45
mem_util = 20
used_memory_mib = 30000
"#;

#[test]
fn a_busy_process_without_a_new_sample_keeps_its_last_one_then_is_unknown() {
    let scenario = "[[gpu]]\nutilization = 90\nmemory_utilization = 10\n\
         [[gpu.process]]\npid = 5\nsm_util = 88\nmem_util = 9\nused_memory_mib = 10\nsample_every = 1000\n\
         [[gpu.process]]\npid = 6\nused_memory_mib = 10\n";
    let fake = FakeNvml::new(scenario);
    // Polled every second: the sample is kept for three seconds.
    let mut src = source(&fake);
    let first = poll(&mut src);
    assert_eq!(process(&first.devices[0], 5).sm_util, Reading::Ok(88));
    let second = poll(&mut src);
    assert_eq!(
        process(&second.devices[0], 5).sm_util,
        Reading::Ok(88),
        "no new sample this pass: the last one, still young"
    );
    assert_eq!(
        process(&second.devices[0], 6).sm_util,
        Reading::Ok(0),
        "pid 5's sample accounts for the GPU's 90 %: pid 6 is idle"
    );

    // Polled so fast that the sample is old at the next pass: the GPU is 90 %
    // busy and no process has a sample, so nobody's figure is known.
    let fake = FakeNvml::new(scenario);
    let mut src = NvmlSource::new(Some(fake.lib_path().to_path_buf()))
        .with_poll_interval(Duration::from_millis(1));
    poll(&mut src);
    std::thread::sleep(Duration::from_millis(10));
    let later = poll(&mut src);
    for pid in [5, 6] {
        let why = reason(&process(&later.devices[0], pid).sm_util).to_owned();
        assert!(
            why.contains("nvmlDeviceGetProcessesUtilizationInfo") && why.contains("90 % busy"),
            "{why}"
        );
    }
}

#[test]
fn the_size_query_count_is_not_the_number_of_samples() {
    // The fake answers the size query with a fixed 100 (as drivers do), even
    // with no samples at all, and an exact count when told to: the figures
    // are the same either way, through both calls.
    for size in ["", "utilization_size_query = 0\n"] {
        for symbol in [None, Some("nvmlDeviceGetProcessesUtilizationInfo")] {
            let text = format!(
                "[[gpu]]\n{size}utilization = 40\nmemory_utilization = 1\n\
                 [[gpu.process]]\npid = 3\nsm_util = 40\nused_memory_mib = 1\n\
                 [[gpu]]\n{size}utilization = 0\nmemory_utilization = 0\n\
                 [[gpu.process]]\npid = 4\nused_memory_mib = 1\n"
            );
            let fake = match symbol {
                None => FakeNvml::new(&text),
                Some(s) => FakeNvml::without_symbol(&text, s),
            };
            let snap = poll(&mut source(&fake));
            assert_eq!(process(&snap.devices[0], 3).sm_util, Reading::Ok(40));
            assert_eq!(
                process(&snap.devices[1], 4).sm_util,
                Reading::Ok(0),
                "an idle GPU answers NOT_FOUND after the size query ({size:?}, {symbol:?})"
            );
        }
    }
}

#[test]
fn a_process_starting_between_size_query_and_fill_is_retried_not_an_error() {
    let fake = FakeNvml::new(&format!(
        "{MPS}\n[[gpu.process]]\npid = 13\nkind = \"mps\"\nlate = true\nused_memory_mib = 5000\n\
         [[gpu.process]]\npid = 14\nlate = true\nused_memory_mib = 700\n"
    ));
    let snap = poll(&mut source(&fake));
    let d = &snap.devices[0];
    assert_eq!(
        d.processes_error, None,
        "the MPS list has no headroom: retried"
    );
    assert_eq!(process(d, 13).used_memory_mib, Reading::Ok(5000));
    assert_eq!(process(d, 13).kind, ProcessKind::Mps);
    assert_eq!(process(d, 14).used_memory_mib, Reading::Ok(700));
}

#[test]
fn drivers_with_a_broken_process_struct_are_refused_by_name() {
    for (version, text) in [
        ("535.54.03", "535.43 to 535.98"),
        ("535.98", "535.43 to 535.98"),
        ("470.223.02", "before 510"),
    ] {
        let fake = FakeNvml::new(&format!(
            "driver_version = \"{version}\"\nprocess_info_layout = \"r535\"\n{}",
            TWO_GPUS.replacen("driver_version = \"550.54.15\"\n", "", 1)
        ));
        let err = source(&fake).poll().expect_err("refused").to_string();
        assert!(
            err.contains(version) && err.contains(text) && err.contains("upgrade"),
            "{err}"
        );
    }
    // What the gate prevents: the same layout read as `_v3` garbles every
    // entry after the first.
    let fake = FakeNvml::new(&format!(
        "process_info_layout = \"r535\"\n{}",
        TWO_GPUS.replacen("driver_version = \"550.54.15\"\n", "", 1)
    ));
    let snap = poll(&mut source(&fake));
    let pids: Vec<u32> = snap.devices[0].processes.iter().map(|p| p.pid).collect();
    assert_ne!(pids, vec![4242, 5151, 6161], "garbled: {pids:?}");
}

#[test]
fn a_library_driver_mismatch_says_what_to_do() {
    let fake = FakeNvml::new(&format!(
        "{TWO_GPUS}\n[errors]\ninit = \"LIB_RM_VERSION_MISMATCH\"\n"
    ));
    let err = source(&fake).poll().expect_err("mismatch").to_string();
    assert!(
        err.contains("different driver versions") && err.contains("reboot"),
        "{err}"
    );
}

#[test]
fn a_driver_reload_is_recovered_by_initialising_nvml_again() {
    let fake = FakeNvml::new(TWO_GPUS);
    let mut src = source(&fake);
    let before = poll(&mut src);
    // The kernel module is reloaded: every handle from the earlier init is lost.
    fake.set_scenario(&format!("driver_reloads = 1\n{TWO_GPUS}"));
    let lost = poll(&mut src);
    for d in &lost.devices[..2] {
        assert!(reason(&d.sm_util).contains("fell off the bus"), "{d:?}");
    }
    let after = poll(&mut src);
    // The reloaded driver's energy counter started again.
    assert_eq!(
        steady(after.devices),
        steady(before.devices),
        "re-initialised: the same figures as before the reload"
    );
}

#[test]
fn a_gpu_gone_for_good_is_forgotten_after_the_configured_time() {
    let fake = FakeNvml::new(TWO_GPUS);
    let mut src = source(&fake).forget_lost_after(Duration::from_millis(200));
    poll(&mut src);
    let one_gpu = &TWO_GPUS[..TWO_GPUS.rfind("[[gpu]]").expect("second GPU")];
    fake.set_scenario(one_gpu);
    let lost = poll(&mut src);
    assert_eq!(lost.devices.len(), 2, "reported lost at first");
    std::thread::sleep(Duration::from_millis(250));
    let later = poll(&mut src);
    assert_eq!(
        later.devices.len(),
        1,
        "then forgotten: {:?}",
        later.devices
    );
}

#[test]
fn nvlink_throughput_is_the_counter_rate_between_passes() {
    let fake = FakeNvml::new(
        "[[gpu]]\nnvlink_tx_mbps = 5000.0\nnvlink_rx_mbps = 250.5\npower_w = 100.0\n",
    );
    let mut src = source(&fake);
    let first = poll(&mut src);
    assert!(reason(&first.devices[0].counters.nvlink_tx_mbps).contains("second pass"));
    let e1 = first.devices[0].counters.energy_mj.ok().expect("energy");
    std::thread::sleep(Duration::from_millis(200));
    let second = poll(&mut src);
    let c = &second.devices[0].counters;
    let tx = c.nvlink_tx_mbps.ok().expect("tx rate");
    let rx = c.nvlink_rx_mbps.ok().expect("rx rate");
    assert!((tx - 5000.0).abs() < 50.0, "{tx}");
    assert!((rx - 250.5).abs() < 2.5, "{rx}");
    let e2 = c.energy_mj.ok().expect("energy");
    // 100 W for >= 200 ms is >= 20 J.
    assert!(e2 - e1 >= 19_900, "{e1} -> {e2}");
}

#[test]
fn a_missing_symbol_is_a_clean_error() {
    // A driver before R550 has no nvmlDeviceGetProcessesUtilizationInfo: the
    // legacy call answers, with the same figures.
    let fake = FakeNvml::without_symbol(TWO_GPUS, "nvmlDeviceGetProcessesUtilizationInfo");
    let snap = poll(&mut source(&fake));
    assert_eq!(process(&snap.devices[0], 4242).sm_util, Reading::Ok(60));
    // One that has it but does not support it on this GPU (HAMi-core#218's
    // Blackwell drivers return nothing through the other one).
    let fake = FakeNvml::new(&TWO_GPUS.replacen(
        "pcie_tx_kbps = 1200\n",
        "pcie_tx_kbps = 1200\nprocesses_utilization_info = false\n",
        1,
    ));
    let snap = poll(&mut source(&fake));
    assert_eq!(process(&snap.devices[0], 4242).sm_util, Reading::Ok(60));

    // The newer call alone: preferred, and it answers.
    let fake = FakeNvml::without_symbol(TWO_GPUS, "nvmlDeviceGetProcessUtilization");
    let snap = poll(&mut source(&fake));
    assert_eq!(process(&snap.devices[0], 4242).sm_util, Reading::Ok(60));

    // No per-process utilization in this "driver" at all: those figures are
    // unavailable, everything else still reads.
    let fake = FakeNvml::without_symbol(
        &TWO_GPUS.replacen(
            "pcie_tx_kbps = 1200\n",
            "pcie_tx_kbps = 1200\nprocesses_utilization_info = false\n",
            1,
        ),
        "nvmlDeviceGetProcessUtilization",
    );
    let snap = poll(&mut source(&fake));
    let d = &snap.devices[0];
    assert_eq!(d.sm_util, Reading::Ok(65));
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

    // The driver fails as a whole: the last good snapshot stays, marked stale
    // (the last one before the failure: more good passes may have come since
    // `snap`, and the energy counters grew with the clock in between).
    install(
        dir.path(),
        &format!("{TWO_GPUS}\n[errors]\ndevice_count = \"UNKNOWN\"\n"),
    );
    let stale = wait_for(&rx, "the count error", |s| s.error.is_some());
    assert!(
        stale
            .error
            .as_deref()
            .is_some_and(|e| e.contains("nvmlDeviceGetCount_v2")),
        "{:?}",
        stale.error
    );
    let kept = stale.last_good.clone().expect("last good snapshot kept");
    assert!(kept.taken_at >= snap.taken_at, "a good snapshot, not older");
    assert_eq!(
        steady(kept.devices.clone()),
        steady(snap.devices.clone()),
        "the good figures"
    );
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
    install(dir.path(), TWO_GPUS);
    let back = wait_for(&rx, "recovery", |s| s.error.is_none());
    assert!(
        back.last_good
            .as_ref()
            .is_some_and(|s| s.taken_at > snap.taken_at)
    );
}

/// Writes the scenario the fake in `dir` reads as a whole (write, then rename),
/// as [`FakeNvml::set_scenario`] does: a pass never reads half a file.
fn install(dir: &std::path::Path, scenario: &str) {
    let tmp = dir.join(".scenario.tmp");
    std::fs::write(&tmp, scenario).expect("write the scenario");
    std::fs::rename(&tmp, dir.join("fake-nvml.toml")).expect("install the scenario");
}

/// The devices with the energy counter blanked: a counter that grows with
/// the clock differs between two passes taken moments apart.
fn steady(mut devices: Vec<GpuDevice>) -> Vec<GpuDevice> {
    for d in &mut devices {
        d.counters.energy_mj = Reading::unavailable("clock");
        d.counters.energy_pass = Reading::unavailable("clock");
    }
    devices
}

#[test]
fn mock_and_nvml_answer_alike_for_one_scenario() {
    let late = format!(
        "{MPS}\n[[gpu.process]]\npid = 13\nkind = \"mps\"\nlate = true\nused_memory_mib = 5000\n"
    );
    for scenario in [
        TWO_GPUS,
        MPS,
        &mig_scenario(""),
        &mig_scenario("gpm = true"),
        &late,
    ] {
        let fake = FakeNvml::new(scenario);
        let dir = tempfile::tempdir().expect("temporary directory");
        let file = dir.path().join("scenario.toml");
        std::fs::write(&file, scenario).expect("write scenario");
        let mut mock = gpu::source(&gpu::Config {
            source: gpu::SourceKind::Mock,
            nvml_lib: None,
            scenario: Some(file),
            poll_interval: Duration::from_secs(1),
        })
        .expect("mock source");
        let mut nvml = source(&fake);
        for pass in 0..2 {
            let from_mock = mock.poll().expect("mock pass");
            let from_nvml = poll(&mut nvml);
            assert_eq!(
                steady(from_mock.devices),
                steady(from_nvml.devices),
                "pass {pass} of {scenario}"
            );
        }
    }
}

/// A daemon reading the fake NVML every 50 ms, with pods `a` (uid `ua`) and
/// `b` (`ub`) labelled app=x in namespace ml, owning `pids_a` and `pids_b`.
async fn serve(fake: &FakeNvml, pids_a: &[u32], pids_b: &[u32]) -> Node {
    serve_every(Duration::from_millis(50), fake, pids_a, pids_b).await
}

/// As [`serve`], reading the fake every `interval`.
async fn serve_every(interval: Duration, fake: &FakeNvml, pids_a: &[u32], pids_b: &[u32]) -> Node {
    let node = Node::start_with_nvml(interval, fake.lib_path()).await;
    node.set_pods(vec![
        pod("ml", "a", "ua", &[("app", "x")]),
        pod("ml", "b", "ub", &[("app", "x")]),
    ]);
    for pid in pids_a {
        node.attributor.assign(*pid, "ua");
    }
    for pid in pids_b {
        node.attributor.assign(*pid, "ub");
    }
    node
}

/// GetMetrics for pods app=x in ml with `meta`, once the daemon answers for
/// GPU samples (anything but "not ready yet").
async fn get(node: &Node, meta: &[(&str, &str)]) -> Result<f64, tonic::Status> {
    let mut c = node.client().await;
    let mut all = vec![("podSelector", "app=x")];
    all.extend_from_slice(meta);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = metric_value(&mut c, "ml", "so", &all).await;
        let warming = r.as_ref().err().is_some_and(|s| {
            let m = s.message();
            m.contains("not been polled") || m.contains("not produced a sample")
        });
        if !warming || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn keda_sees_mps_clients_memory_exactly_and_their_sm_as_unavailable() {
    let fake = FakeNvml::new(MPS);
    let node = serve(&fake, &[11], &[12]).await;
    node.attributor.assign_host(900);
    let used = get(&node, &[("metric", "memory_used_mib")]).await;
    assert_eq!(used.expect("memory is exact"), 50000.0);
    for metric in ["gpu_utilization", "power_draw"] {
        let err = get(&node, &[("metric", metric)])
            .await
            .expect_err("SM time of MPS clients is not known per client");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{metric}: {err:?}");
        assert!(err.message().contains("MPS"), "{metric}: {}", err.message());
    }
    node.stop().await;
}

#[tokio::test]
async fn keda_sees_a_busy_gpu_without_samples_as_unavailable_not_zero() {
    let fake = FakeNvml::new(
        "[[gpu]]\nutilization = 90\nmemory_utilization = 10\nmemory_total_mib = 1000\npower_w = 100.0\n\
         [[gpu.process]]\npid = 21\nused_memory_mib = 100\n\
         [[gpu.process]]\npid = 22\nused_memory_mib = 100\n[gpu.errors]\nprocess_utilization = \"NOT_FOUND\"\n",
    );
    let node = serve(&fake, &[21], &[22]).await;
    let err = get(&node, &[]).await.expect_err("no zero for a busy GPU");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("90 % busy"), "{}", err.message());
    // The same GPU idle: NOT_FOUND then means idle, and 0 is the truth.
    fake.set_scenario(
        "[[gpu]]\nutilization = 0\nmemory_utilization = 0\nmemory_total_mib = 1000\npower_w = 100.0\n\
         [[gpu.process]]\npid = 21\nused_memory_mib = 100\n\
         [[gpu.process]]\npid = 22\nused_memory_mib = 100\n[gpu.errors]\nprocess_utilization = \"NOT_FOUND\"\n",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match get(&node, &[]).await {
            Ok(v) => {
                assert_eq!(v, 0.0);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "still {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn an_unattributed_gpu_process_makes_pods_without_processes_unavailable_not_zero() {
    let fake = FakeNvml::new(
        "[[gpu]]\nutilization = 60\nmemory_utilization = 10\nmemory_total_mib = 1000\npower_w = 100.0\n\
         [[gpu.process]]\npid = 21\nsm_util = 30\nused_memory_mib = 100\n\
         [[gpu.process]]\npid = 22\nsm_util = 30\nused_memory_mib = 100\n",
    );
    // 21 is pod a's; 22 is a live process no one can attribute: it may be
    // pod b's.
    let node = serve(&fake, &[21], &[]).await;
    node.attributor.alive_unknown(22);
    let err = get(&node, &[("metric", "memory_used_mib")])
        .await
        .expect_err("pod b may own pid 22: not 0");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("[22]") && err.message().contains("could not be attributed"),
        "{}",
        err.message()
    );
    // Once attributed (a host job), pod b's 0 is the truth.
    node.attributor.assign_host(22);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match get(&node, &[("metric", "memory_used_mib")]).await {
            Ok(v) => {
                assert_eq!(v, 100.0, "pod a's 100 MiB + pod b's 0");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "still {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

#[tokio::test]
async fn keda_sees_memory_used_percent_against_the_mig_instance() {
    let fake = FakeNvml::new(&mig_scenario(""));
    let node = serve(&fake, &[11], &[]).await;
    // The big instance's processes are a host job's: unattributed, they
    // could be pod b's, and b would read unavailable rather than 0.
    node.attributor.assign_host(12);
    node.attributor.assign_host(13);
    let percent = get(&node, &[("metric", "memory_used_percent")])
        .await
        .expect("the instance's memory is known");
    // 14000 MiB of a 16384 MiB 1g.18gb slice, not of the H200's 143771 MiB.
    assert!(
        (percent - 100.0 * 14000.0 / 16384.0).abs() < 0.01,
        "{percent}"
    );
    let err = get(&node, &[("metric", "gpu_utilization")])
        .await
        .expect_err("no GPM on this GPU");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert!(err.message().contains("GPM"), "{}", err.message());
    node.stop().await;

    // With GPM the instance's only process has the instance's SM activity.
    let fake = FakeNvml::new(&mig_scenario("gpm = true"));
    let node = serve(&fake, &[11], &[]).await;
    node.attributor.assign_host(12);
    node.attributor.assign_host(13);
    let deadline = Instant::now() + Duration::from_secs(20);
    let sm = loop {
        match get(&node, &[("metric", "gpu_utilization")]).await {
            Ok(v) => break v,
            Err(e) => assert!(Instant::now() < deadline, "still {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sm, 70.0);
    node.stop().await;
}

#[tokio::test]
async fn keda_is_told_which_driver_to_upgrade() {
    let fake = FakeNvml::new(&format!(
        "driver_version = \"535.54.03\"\n{}",
        MPS.trim_start()
    ));
    let node = serve(&fake, &[11], &[12]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        let err = get(&node, &[("metric", "memory_used_mib")])
            .await
            .expect_err("a driver that garbles process lists gives no figures");
        if err.message().contains("535.54.03") || Instant::now() > deadline {
            break err;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("upgrade the driver"),
        "{}",
        err.message()
    );
    node.stop().await;
}

#[test]
fn the_energy_counter_grows_with_the_power_drawn_and_gives_its_mean() {
    // A bursty board: 250 W +- 100 W every 370 ms; the instantaneous reading
    // swings, the counter integrates.
    let fake =
        FakeNvml::new("[[gpu]]\nenergy_mj = 1000000\npower_w = 250.0\npower_ripple_w = 100.0\n");
    let mut src = source(&fake);
    let first = poll(&mut src);
    let c = &first.devices[0].counters;
    assert_eq!(
        c.energy_mj,
        Reading::Ok(1_000_000),
        "its value when first read"
    );
    assert!(reason(&c.energy_pass).contains("second pass"));
    let mut instants = Vec::new();
    let mut means = Vec::new();
    let started = Instant::now();
    let mut last = 1_000_000;
    while started.elapsed() < Duration::from_millis(1500) {
        std::thread::sleep(Duration::from_millis(370));
        let snap = poll(&mut src);
        let d = &snap.devices[0];
        let e = d.counters.energy_mj.ok().expect("a counter");
        assert!(e > last, "the counter only grows: {last} -> {e}");
        last = e;
        instants.push(d.power_w.ok().expect("an instant"));
        means.push(d.counters.energy_pass.ok().expect("an increase").watts());
    }
    // Over a whole ripple period the mean is the mean draw (give or take the
    // poll's own jitter); the instants are anywhere in 150-350 W.
    for w in &means {
        assert!((w - 250.0).abs() < 40.0, "mean power {w} W ({means:?})");
    }
    assert!(
        instants.iter().all(|w| (150.0..=350.0).contains(w)),
        "{instants:?}"
    );
    // A new power changes the slope, never the value.
    fake.set_scenario("[[gpu]]\nenergy_mj = 1000000\npower_w = 10.0\n");
    let after = poll(&mut src);
    let e = after.devices[0].counters.energy_mj.ok().expect("a counter");
    assert!(e >= last, "{last} -> {e}");
}

/// Two pods on the first GPU by SM 60:20, a pod alone on the second, a GPU
/// moving data while no process uses SM, MPS, and MIG.
const COUNTERS: &str = r#"
[[gpu]]
uuid = "GPU-shared"
utilization = 80
memory_total_mib = 81920
power_w = 400.0
pcie_tx_kbps = 1200
pcie_rx_kbps = 2400
nvlink_tx_mbps = 8000.0
nvlink_rx_mbps = 4000.0

[[gpu.process]]
pid = 11
sm_util = 60
used_memory_mib = 1000

[[gpu.process]]
pid = 12
sm_util = 20
used_memory_mib = 1000

[[gpu]]
uuid = "GPU-owned"
utilization = 0
memory_total_mib = 81920
power_w = 100.0
pcie_tx_kbps = 700
pcie_rx_kbps = 0
nvlink_tx_mbps = 60000.0
nvlink_rx_mbps = 0.0

[[gpu.process]]
pid = 13
used_memory_mib = 1000
"#;

/// A daemon on the fake with pods a (pids 11, 13) and b (12), and GetMetrics
/// for pod `a` alone (`podSelector` on its name label).
async fn counters_node(scenario: &str) -> Node {
    let fake = FakeNvml::new(scenario);
    let node = serve(&fake, &[11, 13], &[12]).await;
    // The library must outlive the daemon's use of it.
    std::mem::forget(fake);
    node
}

/// GetMetrics for `meta` once it answers with a number or a settled error:
/// throughputs need two passes (NVLink rates), the energy counter too.
async fn settled(node: &Node, meta: &[(&str, &str)]) -> Result<f64, tonic::Status> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = get(node, meta).await;
        let young = r
            .as_ref()
            .err()
            .is_some_and(|s| s.message().contains("second pass"));
        if !young || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn keda_sees_pcie_and_nvlink_per_pod_by_sm_share_and_whole_for_an_owner() {
    let node = counters_node(COUNTERS).await;
    // Pod a: 60/80 of the shared GPU's traffic, all of the GPU it owns alone
    // (whose SM utilization is unknown there: no sample, and the scenario
    // gives the device none; it owns the GPU, so all of the traffic is its own).
    let pcie_tx = settled(&node, &[("metric", "pcie_tx_kbps")])
        .await
        .expect("pcie tx");
    assert_eq!(pcie_tx, 1200.0 + 700.0, "the workload's total (a and b)");
    let rx = settled(&node, &[("metricType", "pcie_rx_kbps")])
        .await
        .expect("pcie rx");
    assert_eq!(rx, 2400.0, "keda-gpu-scaler's metricType name");
    let a_tx = settled(&node, &[("aggregation", "max"), ("metric", "pcie_tx_kbps")])
        .await
        .expect("max over pods");
    assert_eq!(
        a_tx,
        1200.0 * 60.0 / 80.0 + 700.0,
        "pod a: its share + the owned GPU"
    );
    let b_tx = settled(&node, &[("aggregation", "min"), ("metric", "pcie_tx_kbps")])
        .await
        .expect("min over pods");
    assert_eq!(b_tx, 1200.0 * 20.0 / 80.0, "pod b: its SM share");
    // NVLink: the counters' rate between passes (KiB granularity), split alike.
    let nv = settled(
        &node,
        &[("aggregation", "max"), ("metricType", "nvlink_tx_mbps")],
    )
    .await
    .expect("nvlink tx");
    let expected = 8000.0 * 0.75 + 60000.0;
    assert!(
        (nv - expected).abs() / expected < 0.01,
        "{nv} vs {expected}"
    );
    // keda-gpu-scaler's distributed-training profile: NVLink TX, summed.
    let dt = settled(&node, &[("profile", "distributed-training")])
        .await
        .expect("profile");
    let expected = 8000.0 + 60000.0;
    assert!(
        (dt - expected).abs() / expected < 0.01,
        "{dt} vs {expected}"
    );
    node.stop().await;
}

#[tokio::test]
async fn keda_sees_counters_it_cannot_split_as_unavailable_never_zero() {
    // Busy moving data while no process used SM, two pods: whose is unknown.
    let node = counters_node(
        "[[gpu]]\nutilization = 0\nmemory_utilization = 0\nmemory_total_mib = 1000\npower_w = 50.0\npcie_tx_kbps = 900\npcie_rx_kbps = 0\n\
         [[gpu.process]]\npid = 11\nused_memory_mib = 10\n[[gpu.process]]\npid = 12\nused_memory_mib = 10\n",
    )
    .await;
    let err = settled(&node, &[("metric", "pcie_tx_kbps")])
        .await
        .expect_err("no split of traffic nobody's SM explains");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("none of its 2 processes used SM"),
        "{}",
        err.message()
    );
    // Nothing moved: 0 is what the driver said.
    assert_eq!(
        settled(&node, &[("metric", "pcie_rx_kbps")])
            .await
            .expect("rx"),
        0.0
    );
    // No NVLink on this GPU: unavailable, not 0.
    let err = settled(&node, &[("metric", "nvlink_rx_mbps")])
        .await
        .expect_err("no NVLink");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    node.stop().await;

    // MPS: the clients' SM shares are the server's secret.
    let node = counters_node(&MPS.replacen(
        "[[gpu]]\n",
        "[[gpu]]\npcie_tx_kbps = 100\npcie_rx_kbps = 100\n",
        1,
    ))
    .await;
    node.attributor.assign_host(900);
    let err = settled(&node, &[("metric", "pcie_tx_kbps")])
        .await
        .expect_err("MPS");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("MPS"), "{}", err.message());
    node.stop().await;

    // MIG: the counters are the whole GPU's; pods share it.
    let node = counters_node(&mig_scenario("pcie_tx_kbps = 100\npcie_rx_kbps = 100")).await;
    let err = settled(&node, &[("metric", "pcie_tx_kbps")])
        .await
        .expect_err("MIG");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("whole GPU only"),
        "{}",
        err.message()
    );
    node.stop().await;
}

#[tokio::test]
async fn keda_sees_power_from_the_energy_counter() {
    // 300 W steady on the counter; the instantaneous reading is what the
    // scenario says at one instant (power_w): the same here, so the mean
    // from the counter must match it. A pass of 250 ms, the mean's window:
    // see the bound below.
    let fake = FakeNvml::new(
        "[[gpu]]\nutilization = 50\nmemory_total_mib = 1000\npower_w = 300.0\n\
         [[gpu.process]]\npid = 11\nsm_util = 30\nused_memory_mib = 10\n\
         [[gpu.process]]\npid = 12\nsm_util = 10\nused_memory_mib = 10\n",
    );
    let node = serve_every(Duration::from_millis(250), &fake, &[11], &[12]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let snap = loop {
        let snap = node.snapshots().borrow().clone();
        if snap.gpus.first().and_then(|g| g.power_source)
            == Some(gpu_scaler::snapshot::PowerSource::EnergyCounter)
        {
            break snap;
        }
        assert!(Instant::now() < deadline, "the counter's mean never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Pod a has 3/4 of the counter's mean, exactly.
    let mean = snap.gpus[0].power_attributed_w.ok().expect("a mean");
    let a = snap.pods["ua"].gpus[0].power_w.ok().expect("a's power");
    assert!((a - mean * 0.75).abs() < 1e-9, "{a} of {mean}");
    // And that mean is the 300 W the board draws: the fake integrates it
    // exactly, and each read is timed at the midpoint of its call, a few µs
    // from the counter's own time; more when the machine preempts the poller
    // inside the call, or emulates it (qemu-user runs the aarch64 build about
    // ten times slower). 5 % of a 250 ms window is 12 ms of that.
    assert!((mean - 300.0).abs() < 15.0, "{mean}");
    let w = get(&node, &[("metric", "power_draw"), ("aggregation", "max")])
        .await
        .expect("power");
    assert!((w - 225.0).abs() < 225.0 * 0.05, "{w}");
    node.stop().await;
}

/// Parses `family{labels} value` lines of an exposition into (labels, value)
/// for `family`.
fn series(text: &str, family: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(family)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => {
                    let (labels, v) = r.split_once("} ")?;
                    (labels.to_owned(), v)
                }
                None => (String::new(), rest.strip_prefix(' ')?),
            };
            Some((labels, value.split(' ').next()?.parse().ok()?))
        })
        .collect()
}

#[tokio::test]
async fn energy_split_over_pods_and_unattributed_adds_up_to_the_device_counter() {
    // Pods a and b by SM 30:10, a host process 10; the load and power change
    // mid-window, and for a while nobody runs (the board's idle draw).
    let load = |w: f64, a: u32, b: u32, host: u32| {
        format!(
            "[[gpu]]\nutilization = {}\nmemory_total_mib = 1000\npower_w = {w}\npower_ripple_w = 40.0\n\
             [[gpu.process]]\npid = 11\nsm_util = {a}\nused_memory_mib = 10\n\
             [[gpu.process]]\npid = 12\nsm_util = {b}\nused_memory_mib = 10\n\
             [[gpu.process]]\npid = 30\nsm_util = {host}\nused_memory_mib = 10\n",
            a + b + host
        )
    };
    let fake = FakeNvml::new(&load(300.0, 30, 10, 10));
    let node = serve(&fake, &[11], &[12]).await;
    node.attributor.assign_host(30);
    let scrape = || async {
        let (status, text) = node.http_get("/metrics").await;
        assert_eq!(status, 200);
        let sum = |family: &str| series(&text, family).iter().map(|s| s.1).sum::<f64>();
        (
            sum("gpu_scaler_device_energy_joules_total"),
            sum("gpu_scaler_pod_energy_joules_total"),
            sum("gpu_scaler_unattributed_energy_joules_total"),
            series(&text, "gpu_scaler_pod_energy_joules_total"),
        )
    };
    // Wait for the ledger's first booking, then measure a window.
    let deadline = Instant::now() + Duration::from_secs(20);
    let start = loop {
        let s = scrape().await;
        if s.1 > 0.0 {
            break s;
        }
        assert!(Instant::now() < deadline, "no energy booked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    fake.set_scenario(&load(450.0, 60, 20, 0));
    tokio::time::sleep(Duration::from_millis(400)).await;
    fake.set_scenario("[[gpu]]\nutilization = 0\nmemory_total_mib = 1000\npower_w = 60.0\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let end = scrape().await;
    let device = end.0 - start.0;
    let booked = (end.1 - start.1) + (end.2 - start.2);
    assert!(device > 100.0, "the board drew {device} J");
    assert!(
        (booked - device).abs() <= device * 0.01,
        "pods + unattributed = {booked} J, the device counter rose {device} J"
    );
    // Each pod's energy is its share: a thrice b's throughout.
    let of = |s: &[(String, f64)], pod: &str| {
        s.iter()
            .filter(|(l, _)| l.contains(&format!("pod=\"{pod}\"")))
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let a = of(&end.3, "a") - of(&start.3, "a");
    let b = of(&end.3, "b") - of(&start.3, "b");
    assert!((a / b - 3.0).abs() < 0.01, "a {a} J, b {b} J");
    node.stop().await;
}
