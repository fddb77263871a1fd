//! Checks, on this machine's kernel, the chart's least-privilege claim: a process that
//! is uid 0 but holds only the capabilities the DaemonSet adds can do everything the
//! eBPF probe needs (read tracepoint ids from tracefs, create a ring buffer, load a
//! tracepoint program, open the tracepoint and attach the program to it, read another
//! process's /proc/<pid>/cgroup), and with any one of them removed it cannot.
//!
//! The parent re-executes this xtask binary (`xtask probe-privileges`, hidden) with its
//! capability bounding set cut down before exec; for uid 0 the permitted and effective
//! sets after exec are the bounding set, exactly what a container runtime does with
//! `capabilities: {drop: [ALL], add: [...]}`. The child makes the raw syscalls and
//! prints one `step=outcome` line per step.
//!
//! Needs root and a kernel with CAP_BPF/CAP_PERFMON (5.8+). Without them it skips,
//! unless GPU_SCALER_REQUIRE_KERNEL=1 (CI) turns the skip into a failure.

use std::{
    collections::BTreeMap, fs, os::unix::process::CommandExt as _, path::Path, process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEPOINT_ID: &str = "/sys/kernel/tracing/events/sched/sched_process_exec/id";

/// The steps the child reports, in order.
const STEPS: &[&str] = &[
    "tracefs",
    "ringbuf",
    "prog_load",
    "perf_event_open",
    "attach",
    "proc_cgroup",
];

/// Capability numbers (linux/capability.h) of the names a chart may add.
fn capability_number(name: &str) -> Result<u32> {
    Ok(match name {
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => bail!("capability {other:?} is not known to xtask/src/privileges.rs"),
    })
}

/// Runs the check for the capability names the chart adds (e.g. `["BPF", "PERFMON"]`).
pub fn check(added: &[String]) -> Result<()> {
    if let Some(reason) = unsupported()? {
        let required = std::env::var("GPU_SCALER_REQUIRE_KERNEL").is_ok_and(|v| v == "1");
        ensure!(
            !required,
            "privilege check cannot run: {reason} (GPU_SCALER_REQUIRE_KERNEL=1)"
        );
        eprintln!("xtask: SKIPPED the capability check: {reason}");
        return Ok(());
    }
    let caps: Vec<u32> = added
        .iter()
        .map(|c| capability_number(c))
        .collect::<Result<_>>()?;

    let all = run_child(&caps)?;
    let failed: Vec<String> = all
        .iter()
        .filter(|(_, outcome)| *outcome != "ok")
        .map(|(step, outcome)| format!("{step}: {outcome}"))
        .collect();
    ensure!(
        failed.is_empty(),
        "uid 0 with only {added:?} cannot run the probe on this kernel: {failed:?}"
    );

    for (i, name) in added.iter().enumerate() {
        let mut fewer = caps.clone();
        fewer.remove(i);
        let outcome = run_child(&fewer)?;
        ensure!(
            outcome.values().any(|o| o != "ok"),
            "capability {name} is not needed: every step succeeds without it ({outcome:?}); drop it from the chart"
        );
        eprintln!("xtask: without {name}: {outcome:?}");
    }
    eprintln!("xtask: uid 0 with exactly {added:?} loads and attaches a tracepoint program");
    Ok(())
}

/// Why the check cannot run here, if it cannot.
fn unsupported() -> Result<Option<String>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(Some("not root".into()));
    }
    let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()?;
    if last < 39 {
        return Ok(Some(format!(
            "kernel without CAP_BPF (cap_last_cap {last})"
        )));
    }
    if !Path::new(TRACEPOINT_ID).exists() {
        // tracefs is mounted on demand on some hosts; mount it as the attribution tests do.
        let _ = Command::new("mount")
            .args(["-t", "tracefs", "nodev", TRACEFS])
            .status();
        if !Path::new(TRACEPOINT_ID).exists() {
            return Ok(Some(format!("{TRACEPOINT_ID} missing (no tracefs)")));
        }
    }
    Ok(None)
}

/// Runs the child with a bounding set of exactly `caps` and parses its report.
fn run_child(caps: &[u32]) -> Result<BTreeMap<String, String>> {
    let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()?;
    let drop: Vec<u32> = (0..=last).filter(|c| !caps.contains(c)).collect();
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("probe-privileges");
    // SAFETY: the closure runs between fork and exec and only makes the prctl system
    // call (async-signal-safe) over a vector allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for &cap in &drop {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let out = cmd.output().context("running the privilege probe")?;
    ensure!(
        out.status.success(),
        "privilege probe failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: BTreeMap<String, String> = String::from_utf8(out.stdout)?
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for step in STEPS {
        ensure!(
            report.contains_key(*step),
            "probe report lacks {step}: {report:?}"
        );
    }
    Ok(report)
}

/// The child: each step's outcome on stdout as `step=ok` or `step=<errno text>`.
pub fn child() -> Result<()> {
    let id = match fs::read_to_string(TRACEPOINT_ID) {
        Ok(s) => {
            println!("tracefs=ok");
            s.trim().parse::<u64>().context("tracepoint id")?
        }
        Err(e) => {
            println!("tracefs={}", e.kind());
            // Without the id nothing can be attached; the later steps still say what
            // the kernel allows, with the id of no tracepoint.
            0
        }
    };
    let ringbuf = bpf_map_create_ringbuf();
    println!("ringbuf={}", outcome(&ringbuf));
    let prog = bpf_prog_load_tracepoint();
    println!("prog_load={}", outcome(&prog));
    let event = perf_event_open_tracepoint(id);
    println!("perf_event_open={}", outcome(&event));
    match (event, prog) {
        (Ok(event), Ok(prog)) => {
            // SAFETY: both are descriptors this process owns.
            let r = unsafe { libc::ioctl(event, PERF_EVENT_IOC_SET_BPF, prog) };
            println!(
                "attach={}",
                outcome(&if r < 0 { Err(errno()) } else { Ok(0) })
            );
        }
        _ => println!("attach=skipped"),
    }
    println!(
        "proc_cgroup={}",
        match fs::read_to_string("/proc/1/cgroup") {
            Ok(_) => "ok".to_owned(),
            Err(e) => e.kind().to_string(),
        }
    );
    Ok(())
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_RINGBUF: u32 = 27;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

fn outcome(r: &Result<i32, std::io::Error>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => e.raw_os_error().map_or_else(|| e.to_string(), errno_name),
    }
}

fn errno_name(n: i32) -> String {
    match n {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::ENOENT => "ENOENT".into(),
        other => format!("errno {other}"),
    }
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// `union bpf_attr` as bytes: the fields used here sit at fixed offsets of the UAPI.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> Result<i32, std::io::Error> {
    // SAFETY: attr is a valid, writable buffer of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 { Err(errno()) } else { Ok(fd as i32) }
}

fn bpf_map_create_ringbuf() -> Result<i32, std::io::Error> {
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_MAP_TYPE_RINGBUF.to_ne_bytes());
    // max_entries: the ring's size, a power-of-two multiple of the page size.
    attr[12..16].copy_from_slice(&(256u32 * 1024).to_ne_bytes());
    bpf(BPF_MAP_CREATE, &mut attr)
}

fn bpf_prog_load_tracepoint() -> Result<i32, std::io::Error> {
    // `r0 = 0; exit`: struct bpf_insn {u8 code; u8 regs; s16 off; s32 imm}.
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_TRACEPOINT.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    bpf(BPF_PROG_LOAD, &mut attr)
}

fn perf_event_open_tracepoint(id: u64) -> Result<i32, std::io::Error> {
    // struct perf_event_attr, PERF_ATTR_SIZE_VER0 (64 bytes) is enough: type, size,
    // config, sample_period, wakeup_events.
    let mut attr = [0u8; 64];
    attr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
    attr[4..8].copy_from_slice(&64u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&id.to_ne_bytes());
    attr[16..24].copy_from_slice(&1u64.to_ne_bytes());
    attr[48..52].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: attr is a valid buffer of the size it declares; pid -1 + cpu 0 is a
    // system-wide event on CPU 0.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            -1 as libc::pid_t,
            0,
            -1,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 { Err(errno()) } else { Ok(fd as i32) }
}
