//! Attribution figures on the real kernel (root). Printed, never asserted:
//! run with `cargo xtask bench attribution`.
//!
//! 1. fork+exec overhead: time per fork+exec+wait of /bin/true, in a separate
//!    process, with the probe attached (and this process's engine following its
//!    events) and without, in alternating rounds of one run; median of each and
//!    their ratio, and the time the kernel counts inside the probe's programs.
//! 2. lookups/s with 10,000 tracked pids (real processes in 100 pod cgroups).
//! 3. resident memory of the daemon side with those 10,000 pids: this process
//!    (before/after the engine) and a `gpu-scaler ps --watch` process.
//! 4. churn: 100,000 short-lived processes in 4 pods; every one checked against
//!    the pod it ran in while inside the grace period; the tables' sizes during
//!    and after.
//!
//! Options (after `--`): `--churn N` (default 100000), `--hold N` (default
//! 10000), `--rounds N` (default 16), `--iters N` per round (default 300),
//! `--only overhead|pids|churn` (one section).

use std::{
    ffi::CString,
    io::{BufRead as _, BufReader},
    os::fd::{AsRawFd as _, RawFd},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use gpu_scaler::attribution::{Attributor, Owner, ebpf::EbpfAttributor, procfs::ProcfsAttributor};
use gpu_scaler_tests::{
    cgroup::{Cgroup, TestTree, container_id, pod_uid},
    kernel, process, wait_for, workspace_bin,
};

const HELPER: &str = env!("CARGO_BIN_EXE_attribution-helper");

struct Opts {
    only: Option<String>,
    churn: usize,
    hold: usize,
    rounds: usize,
    iters: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        only: None,
        churn: 100_000,
        hold: 10_000,
        rounds: 16,
        iters: 300,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = || {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--only" => o.only = args.get(i + 1).cloned(),
            "--churn" => o.churn = v(),
            "--hold" => o.hold = v(),
            "--rounds" => o.rounds = v(),
            "--iters" => o.iters = v(),
            _ => {
                i += 1; // cargo bench passes `--bench`
                continue;
            }
        }
        i += 2;
    }
    o
}

fn main() {
    let o = opts();
    kernel::require("root", kernel::probe_root());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!("attribution benchmark (kernel {})", kernel_release());
    let start = || {
        rt.block_on(EbpfAttributor::start(Duration::from_secs(30)))
            .expect("eBPF engine starts (root, BPF, tracefs)")
    };
    let run = |name: &str| o.only.as_deref().is_none_or(|only| only == name);
    if run("overhead") {
        overhead(&o, &start);
    }
    if run("pids") {
        tracked_pids(&o, &start);
    }
    if run("churn") {
        churn(&o, &start);
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// fork, (move into `cgroup_fd`'s cgroup,) exec `path`, wait. Returns the pid.
fn fork_exec_wait(path: &CString, cgroup_fd: Option<RawFd>) -> u32 {
    let argv = [path.as_ptr(), std::ptr::null()];
    // SAFETY: the child only calls async-signal-safe functions (write, execv,
    // _exit) on memory prepared before the fork.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            if let Some(fd) = cgroup_fd {
                libc::write(fd, b"0".as_ptr().cast(), 1);
            }
            libc::execv(path.as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
        assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        pid as u32
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPU time (user + system) of this process's reaped children so far.
fn children_cpu_us() -> f64 {
    // SAFETY: a zeroed rusage is a valid out-parameter.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

/// Mean wall-clock and CPU us per fork+exec+wait, measured by a separate
/// process (as the workloads on a node are): forking from this process would
/// also copy the page tables of the probe's ring buffer mapping, a cost the
/// daemon itself never pays. The CPU time (the loop and its children, which it
/// reaps) includes the probe's programs, which run in the forking, exec'ing and
/// exiting tasks, but not the time spent waiting for a CPU that other work on a
/// shared machine holds, so it is the steadier of the two figures there.
fn per_iter_us(iters: usize) -> (f64, f64) {
    let cpu0 = children_cpu_us();
    let out = Command::new(HELPER)
        .args(["forkloop", &iters.to_string()])
        .output()
        .expect("run the fork loop");
    let cpu = (children_cpu_us() - cpu0) / iters as f64;
    assert!(out.status.success(), "fork loop failed");
    let wall = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("fork loop prints us per iteration");
    (wall, cpu)
}

fn overhead(o: &Opts, start: &dyn Fn() -> Arc<EbpfAttributor>) {
    // Warm-up: page cache, dynamic loader.
    let _ = per_iter_us(50);
    let (mut with, mut without, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cpu_with, mut cpu_without, mut cpu_ratios) = (Vec::new(), Vec::new(), Vec::new());
    // Time spent inside the probe's programs, counted by the kernel.
    let _stats = aya_stats();
    let in_probe_ns = std::cell::Cell::new(0u64);
    for round in 0..o.rounds {
        // Alternate which goes first so drift in machine load cancels out.
        // Loading and freeing the probe's maps leaves deferred kernel work (RCU
        // callbacks, vfree); let it finish outside the timed loops.
        let settle = || std::thread::sleep(Duration::from_millis(500));
        let measure_with = || {
            let engine = start();
            settle();
            let before: u64 = prog_ns(&engine);
            let r = per_iter_us(o.iters);
            in_probe_ns.set(in_probe_ns.get() + prog_ns(&engine) - before);
            drop(engine); // detaches the probe
            settle();
            r
        };
        let ((a, ca), (b, cb)) = if round % 2 == 0 {
            let a = measure_with();
            (a, per_iter_us(o.iters))
        } else {
            let b = per_iter_us(o.iters);
            (measure_with(), b)
        };
        with.push(a);
        without.push(b);
        ratios.push(a / b);
        cpu_with.push(ca);
        cpu_without.push(cb);
        cpu_ratios.push(ca / cb);
        println!(
            "  round {round}: wall with {a:.1} us, without {b:.1} us; CPU with {ca:.1} us, without {cb:.1} us"
        );
    }
    let (mw, mo) = (median(&mut with), median(&mut without));
    let (cw, co) = (median(&mut cpu_with), median(&mut cpu_without));
    println!(
        "fork+exec+wait of /bin/true, {} rounds x {} iterations (load average {}):",
        o.rounds,
        o.iters,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("  wall time without probe: median {mo:.1} us/iteration");
    println!("  wall time with probe:    median {mw:.1} us/iteration");
    println!(
        "  wall ratio of medians {:.3}; median of per-round ratios {:.3} (goal <= 1.05)",
        mw / mo,
        median(&mut ratios)
    );
    println!(
        "  CPU time without / with probe: median {co:.1} / {cw:.1} us/iteration; ratio of medians {:.3}; median of per-round ratios {:.3}",
        cw / co,
        median(&mut cpu_ratios)
    );
    let per_iter = in_probe_ns.get() as f64 / (o.rounds * o.iters) as f64;
    println!(
        "  time inside the probe's programs (kernel bpf stats): {per_iter:.0} ns per fork+exec+exit = {:.3}% of an iteration",
        per_iter / (mo * 1e3) * 100.0
    );
}

/// Total nanoseconds the kernel has counted inside the engine's programs.
fn prog_ns(engine: &EbpfAttributor) -> u64 {
    engine
        .program_stats()
        .iter()
        .map(|(_, _, t)| t.as_nanos() as u64)
        .sum()
}

/// Turns on the kernel's BPF run-time statistics while the returned fd lives.
fn aya_stats() -> Option<std::os::fd::OwnedFd> {
    match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(e) => {
            println!("  (BPF run-time statistics unavailable: {e})");
            None
        }
    }
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Kills and reaps a child process when dropped.
struct Reaped(Child);
impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tracked_pids(o: &Opts, start: &dyn Fn() -> Arc<EbpfAttributor>) {
    let tree = TestTree::new("bench-hold").expect("cgroup v2 test tree");
    let pods = 100;
    let per_pod = o.hold.div_ceil(pods);
    let rss_before = vm_rss_kib(std::process::id());
    let engine = start();
    let mut holders = Vec::new();
    let mut cgroups: Vec<(Cgroup, String)> = Vec::new();
    for i in 0..pods {
        let uid = pod_uid(1000 + i as u32);
        let cg = tree.create(&format!(
            "kubepods/burstable/pod{uid}/{}",
            container_id(1000 + i as u32)
        ));
        let mut cmd = Command::new(HELPER);
        cmd.args(["hold", &per_pod.to_string()])
            .stdout(Stdio::piped());
        let mut child = process::spawn_in(&cg.dir, &mut cmd).expect("spawn holder");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("holder ready");
        holders.push(Reaped(child));
        cgroups.push((cg, uid));
    }
    let ready = Instant::now();
    // Every pid in the pod cgroups, from the kernel's own list, with its pod.
    let pids: Vec<(u32, String)> = cgroups
        .iter()
        .flat_map(|(cg, uid)| {
            std::fs::read_to_string(cg.dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
                .filter_map(|l| l.parse().ok())
                .map(|p| (p, uid.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    let not_their_pod = || {
        pids.iter()
            .filter(|(p, uid)| {
                !matches!(engine.resolve(*p).map(|a| a.owner),
                    Some(Owner::Pod(id)) if id.pod_uid == *uid)
            })
            .count()
    };
    // The last forks may still be in the ring buffer (drained every 20 ms, later
    // on a loaded machine): wait for the engine to catch up before judging.
    let caught_up = wait_for(Duration::from_secs(30), || {
        (not_their_pod() == 0).then_some(())
    });
    let lag = ready.elapsed();
    let stats = engine.stats().expect("stats");
    println!(
        "tracked pids: {} in {} pod cgroups ({} in total, {} cgroups known)",
        pids.len(),
        pods,
        stats.tracked_pids,
        stats.cgroups
    );
    let wrong = not_their_pod();
    println!(
        "  of which not resolved to their own pod: {wrong} (engine {} {:.1} ms after the last holder was ready)",
        if caught_up.is_some() {
            "caught up"
        } else {
            "still behind"
        },
        lag.as_secs_f64() * 1e3
    );
    if wrong > 0 {
        println!("    engine stats: {:?}", engine.stats());
    }
    let pids: Vec<u32> = pids.into_iter().map(|(p, _)| p).collect();

    let lookups = |a: &dyn Attributor, dur: Duration| {
        let t = Instant::now();
        let mut n = 0u64;
        let mut hits = 0u64;
        while t.elapsed() < dur {
            for &p in &pids {
                hits += a.resolve(p).is_some() as u64;
            }
            n += pids.len() as u64;
        }
        (n as f64 / t.elapsed().as_secs_f64(), hits == n)
    };
    let (rate, all) = lookups(&*engine, Duration::from_secs(3));
    println!(
        "  eBPF engine: {:.2} M lookups/s, single thread (all hits: {all})",
        rate / 1e6
    );
    let procfs = ProcfsAttributor::new(Duration::from_secs(30));
    let (rate_p, _) = lookups(&procfs, Duration::from_secs(2));
    println!("  procfs backend, for comparison: {:.0} lookups/s", rate_p);
    drop(procfs);
    // What the engine pays every 5 s for gpu_scaler_ebpf_map_entries: a walk of
    // the kernel's pid map, one bpf() syscall per key, on the blocking pool.
    let mut walks: Vec<f64> = Vec::new();
    let mut entries = 0;
    for _ in 0..7 {
        let t = Instant::now();
        entries = engine.kernel_map_len();
        walks.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "  counting the kernel pid map ({entries} entries): median {:.2} ms per count",
        median(&mut walks)
    );
    let rss_after = vm_rss_kib(std::process::id());
    println!(
        "  resident memory of this process: {:.1} MiB before the engine, {:.1} MiB with it and {} pids",
        rss_before as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        stats.tracked_pids
    );
    // The real binary, as a user would run it, tracking the same pids.
    let bin = workspace_bin("gpu-scaler");
    let mut watch = Reaped(
        Command::new(&bin)
            .args(["ps", "--watch", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("gpu-scaler ps --watch"),
    );
    let mut lines = BufReader::new(watch.0.stdout.take().expect("stdout")).lines();
    // Its first exec event means the probe is attached and the seed is done.
    let true_bin = CString::new("/bin/true").expect("path");
    fork_exec_wait(&true_bin, None);
    let _ = lines.next();
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "  resident memory of `gpu-scaler ps --watch` (release) tracking them: {:.1} MiB (goal < 20 MiB)",
        vm_rss_kib(watch.0.id()) as f64 / 1024.0
    );
    drop(watch);
    drop(holders);
    drop(tree);
}

fn churn(o: &Opts, start: &dyn Fn() -> Arc<EbpfAttributor>) {
    let tree = TestTree::new("bench-churn").expect("cgroup v2 test tree");
    let engine = start();
    let pods: Vec<(Cgroup, std::fs::File, Owner)> = (0..4u32)
        .map(|i| {
            let uid = pod_uid(2000 + i);
            let cid = container_id(2000 + i);
            let cg = tree.create(&format!("kubepods/besteffort/pod{uid}/{cid}"));
            let owner = gpu_scaler::attribution::cgroup_path::parse(&cg.path).expect("pod path");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(cg.dir.join("cgroup.procs"))
                .expect("cgroup.procs");
            (cg, f, owner)
        })
        .collect();
    let true_bin = CString::new("/bin/true").expect("path");
    let base = engine.stats().expect("stats");
    let kernel_base = engine.kernel_map_len();
    let batch = 1000;
    let (mut misattributed, mut missing, mut done) = (0usize, 0usize, 0usize);
    let mut peak_tracked = 0;
    let t = Instant::now();
    while done < o.churn {
        let n = batch.min(o.churn - done);
        // Pids are allocated cyclically: none of a batch's pids can be handed out
        // again before the check that follows it, so each has one true owner.
        let mut spawned = Vec::with_capacity(n);
        for i in 0..n {
            let k = (done + i) % pods.len();
            let pid = fork_exec_wait(&true_bin, Some(pods[k].1.as_raw_fd()));
            spawned.push((pid, k));
        }
        let (last, lk) = *spawned.last().expect("batch not empty");
        // Events arrive in order: once the last exec is applied, so is the batch.
        wait_for(Duration::from_secs(10), || {
            engine
                .resolve(last)
                .filter(|a| *a.cgroup_path == *pods[lk].0.path)
        });
        for (pid, k) in spawned {
            match engine.resolve(pid) {
                Some(a) if a.owner == pods[k].2 => {}
                Some(_) => misattributed += 1,
                None => missing += 1,
            }
        }
        done += n;
        peak_tracked = peak_tracked.max(engine.stats().expect("stats").tracked_pids);
    }
    let elapsed = t.elapsed();
    let during = engine.stats().expect("stats");
    let kernel_during = engine.kernel_map_len();
    println!(
        "churn: {} short-lived processes in 4 pods in {:.1} s ({:.0} us each)",
        o.churn,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1e6 / o.churn as f64
    );
    println!("  misattributed: {misattributed}; unresolved inside the grace period: {missing}");
    println!(
        "  user-space pids: {} before, peak {} (exited ones kept 30 s, at most {}), {} at the end; evicted early: {}",
        base.tracked_pids,
        peak_tracked,
        gpu_scaler::attribution::tracker::MAX_EXITED,
        during.tracked_pids,
        during.evicted_early
    );
    println!(
        "  kernel pid map: {kernel_base} entries before, {kernel_during} after (capacity {})",
        gpu_scaler_common_capacity()
    );
    println!("  events lost in the kernel: {}", during.dropped_events);
    // After the grace period the exited pids are gone again.
    std::thread::sleep(Duration::from_secs(31));
    let after = engine.stats().expect("stats");
    println!(
        "  after the grace period: {} user-space pids ({} exited), {} cgroups, kernel map {}",
        after.tracked_pids,
        after.exited_pids,
        after.cgroups,
        engine.kernel_map_len()
    );
    drop(engine);
    drop(pods);
    drop(tree);
}

fn gpu_scaler_common_capacity() -> u32 {
    gpu_scaler::attribution::ebpf::PID_MAP_CAPACITY
}
