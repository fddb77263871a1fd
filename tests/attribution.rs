//! Attribution on the real kernel: the eBPF probe loads and attaches, real
//! processes in real cgroup v2 directories laid out as the kubelet lays them out
//! resolve to the right pod and container, and the eBPF backend agrees with the
//! procfs backend and with its own kernel map. Needs root; skips (or fails under
//! GPU_SCALER_REQUIRE_KERNEL=1) only when the kernel cannot do it.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use gpu_scaler::attribution::{
    Attribution, Attributor, Backend, Owner, PodIdentity, QosClass, RingBufferSize, Runtime,
    ebpf::{EbpfAttributor, PID_MAP_CAPACITY, WatchKind, resolve_from_proc},
    procfs::ProcfsAttributor,
    tracefs,
};
use gpu_scaler_tests::{
    cgroup::{Cgroup, TestTree, container_id, pod_uid},
    kernel, process, serve, wait_for, workspace_bin,
};

const HELPER: &str = env!("CARGO_BIN_EXE_attribution-helper");

/// Held by tests that rewind the kernel's pid counter or that expect a freed pid
/// to stay free for a while, so they do not run at the same time.
static PID_COUNTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const SETTLE: Duration = Duration::from_secs(5);

/// The eBPF engine, or `None` (a skip) where root/BPF/tracefs are missing.
async fn engine(grace: Duration) -> Option<Arc<EbpfAttributor>> {
    if !kernel::require("root", kernel::probe_root()) {
        return None;
    }
    match EbpfAttributor::start(grace).await {
        Ok(e) => Some(e),
        Err(e) => {
            kernel::require("eBPF attribution", Err(e));
            None
        }
    }
}

fn tree(tag: &str) -> TestTree {
    TestTree::new(tag).expect("create a cgroup v2 test directory as root")
}

/// Kills and reaps a child when the test ends, pass or fail.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(cg: &Cgroup, args: &[&str]) -> Reaped {
    let mut cmd = Command::new(HELPER);
    cmd.args(args).stdout(Stdio::piped());
    Reaped(process::spawn_in(&cg.dir, &mut cmd).expect("spawn helper in cgroup"))
}

/// Waits until the engine sees `pid` in `cg`, then checks the owner, and that the
/// procfs backend and the kernel's pid map agree.
fn check(engine: &EbpfAttributor, pid: u32, cg: &Cgroup, expected: &Owner) -> Attribution {
    let got = check_user_space(engine, pid, cg, expected);
    assert_eq!(
        engine.kernel_cgroup_of(pid),
        got.cgroup_id,
        "kernel map disagrees for pid {pid}"
    );
    got
}

/// [`check`] without the kernel map: a thread moved with its process keeps its
/// old cgroup there (the kernel reports the move once, for the leader, and the
/// probe cannot walk a thread group), while user space moves it.
fn check_user_space(
    engine: &EbpfAttributor,
    pid: u32,
    cg: &Cgroup,
    expected: &Owner,
) -> Attribution {
    // The tracker's own answer: a pid it does not know yet is read from
    // /proc on the spot (backend procfs), which would end the wait before the
    // probe's events are applied.
    let got = wait_for(SETTLE, || {
        engine
            .resolve(pid)
            .filter(|a| *a.cgroup_path == *cg.path && a.backend == Backend::Ebpf)
    })
    .unwrap_or_else(|| {
        panic!(
            "pid {pid} never resolved to {}; last: {:?}",
            cg.path,
            engine.resolve(pid)
        )
    });
    assert_agrees(got, pid, cg, expected)
}

/// `got`, the engine's answer for the live `pid` in `cg`, is `expected` and
/// agrees with the procfs backend.
fn assert_agrees(got: Attribution, pid: u32, cg: &Cgroup, expected: &Owner) -> Attribution {
    assert_eq!(&got.owner, expected, "owner of pid {pid} in {}", cg.path);
    let procfs = ProcfsAttributor::new(Duration::from_secs(30))
        .resolve(pid)
        .expect("procfs resolves a live pid");
    assert_eq!(procfs.owner, got.owner, "procfs disagrees for {}", cg.path);
    assert_eq!(procfs.cgroup_path, got.cgroup_path);
    assert_eq!(
        procfs.cgroup_id, got.cgroup_id,
        "cgroup ids (inodes) differ"
    );
    got
}

fn pod(uid: &str, cid: Option<&str>, rt: Option<Runtime>, qos: QosClass, conmon: bool) -> Owner {
    Owner::Pod(PodIdentity {
        pod_uid: uid.to_owned(),
        container_id: cid.map(str::to_owned),
        runtime: rt,
        qos,
        is_conmon: conmon,
    })
}

/// (relative path, expected owner) for every kubelet layout in docs/architecture.md#kubelet-cgroup-layouts.
fn layouts() -> Vec<(String, Owner)> {
    let mut out = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        (pod_uid(n), container_id(n))
    };
    use QosClass::*;
    for (qos, slice) in [
        (Burstable, "-burstable"),
        (BestEffort, "-besteffort"),
        (Guaranteed, ""),
    ] {
        for (prefix, rt, conmon) in [
            ("cri-containerd-", Runtime::Containerd, false),
            ("crio-", Runtime::CriO, false),
            ("crio-conmon-", Runtime::CriO, true),
            ("docker-", Runtime::Docker, false),
            ("libpod-", Runtime::Podman, false),
        ] {
            let (uid, cid) = next();
            let u = uid.replace('-', "_");
            let q = if slice.is_empty() {
                String::new()
            } else {
                format!("/kubepods{slice}.slice")
            };
            out.push((
                format!("kubepods.slice{q}/kubepods{slice}-pod{u}.slice/{prefix}{cid}.scope"),
                pod(&uid, Some(&cid), Some(rt), qos, conmon),
            ));
        }
        // cgroupfs driver: bare id (containerd, docker) and crio-<id>.
        let dir = if slice.is_empty() {
            "kubepods".to_string()
        } else {
            format!("kubepods/{}", &slice[1..])
        };
        let (uid, cid) = next();
        out.push((
            format!("{dir}/pod{uid}/{cid}"),
            pod(&uid, Some(&cid), Some(Runtime::Unknown), qos, false),
        ));
        let (uid, cid) = next();
        out.push((
            format!("{dir}/pod{uid}/crio-{cid}"),
            pod(&uid, Some(&cid), Some(Runtime::CriO), qos, false),
        ));
        // kind: kubelet.slice/kubelet-kubepods...
        let (uid, cid) = next();
        let u = uid.replace('-', "_");
        let q = if slice.is_empty() {
            String::new()
        } else {
            format!("/kubelet-kubepods{slice}.slice")
        };
        out.push((
            format!(
                "kubelet.slice/kubelet-kubepods.slice{q}/kubelet-kubepods{slice}-pod{u}.slice/cri-containerd-{cid}.scope"
            ),
            pod(&uid, Some(&cid), Some(Runtime::Containerd), qos, false),
        ));
    }
    // A process directly in the pod cgroup; crun's `container` subgroup.
    let (uid, _) = next();
    out.push((
        format!("kubepods/burstable/pod{uid}"),
        pod(&uid, None, None, Burstable, false),
    ));
    let (uid, cid) = next();
    out.push((
        format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/crio-{cid}.scope/container",
            uid.replace('-', "_")
        ),
        pod(&uid, Some(&cid), Some(Runtime::CriO), BestEffort, false),
    ));
    // A host service next to the pods.
    out.push(("system.slice/containerd.service".into(), Owner::Host));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_loads_and_attaches_on_this_kernel() {
    let Some(engine) = engine(Duration::from_secs(30)).await else {
        return;
    };
    let stats = engine.stats().expect("eBPF engine has stats");
    assert!(
        stats.cgroups > 0,
        "the cgroup walk found nothing: {stats:?}"
    );
    assert!(
        stats.tracked_pids > 1,
        "the /proc seed found nothing: {stats:?}"
    );
    // Seeded from /proc: this test process resolves, as the host's.
    let me = engine.resolve(std::process::id()).expect("own pid seeded");
    assert_eq!(
        me.backend,
        Backend::Ebpf,
        "the tracker's seed, not the on-the-spot /proc lookup"
    );
    let procfs = ProcfsAttributor::new(Duration::from_secs(1))
        .resolve(std::process::id())
        .expect("own pid via procfs");
    assert_eq!(me.cgroup_path, procfs.cgroup_path);
    assert_eq!(me.owner, procfs.owner);
    // The offsets the loader used come from this kernel's format files.
    let formats =
        tracefs::Formats::read(&tracefs::ensure_mounted().expect("tracefs")).expect("format files");
    let offsets = formats.offsets().expect("offsets");
    assert_eq!(
        offsets.fork_child_pid,
        formats.fork.field("child_pid").expect("child_pid").offset
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kubelet_layout_resolves_to_its_pod_and_container() {
    let Some(engine) = engine(Duration::from_secs(30)).await else {
        return;
    };
    let t = tree("layouts");
    let mut children = Vec::new();
    let cases: Vec<(Cgroup, Owner)> = layouts()
        .into_iter()
        .map(|(rel, owner)| (t.create(&rel), owner))
        .collect();
    assert!(cases.len() >= 20, "layouts: {}", cases.len());
    // Processes moved into the cgroup after fork and before exec.
    for (cg, _) in &cases {
        children.push(spawn(cg, &["sleep"]));
    }
    for ((cg, owner), child) in cases.iter().zip(&children) {
        check(&engine, child.0.id(), cg, owner);
        // What a GPU process the probe has not reported resolves to: the
        // same owner, read from /proc on the spot, marked as procfs's.
        let now = resolve_from_proc(engine.mount(), child.0.id())
            .unwrap_or_else(|| panic!("pid {} resolves from /proc", child.0.id()));
        assert_eq!(&now.owner, owner, "{}", cg.path);
        assert_eq!(&*now.cgroup_path, &*cg.path);
        assert_eq!(now.backend, Backend::Procfs);
    }
    assert_eq!(
        resolve_from_proc(engine.mount(), u32::MAX),
        None,
        "no such process"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forked_children_and_threads_belong_to_the_pod() {
    let Some(engine) = engine(Duration::from_secs(30)).await else {
        return;
    };
    let t = tree("fork");
    let uid = pod_uid(900);
    let cid = container_id(900);
    let cg = t.create(&format!("kubepods/besteffort/pod{uid}/{cid}"));
    let owner = pod(
        &uid,
        Some(&cid),
        Some(Runtime::Unknown),
        QosClass::BestEffort,
        false,
    );

    // A shell that forks children which exec, and a subshell that never execs.
    let mut sh = Command::new("sh");
    sh.args([
        "-c",
        "sleep 60 & sleep 60 & ( while :; do sleep 1; done ) & wait",
    ]);
    let sh = Reaped(process::spawn_in(&cg.dir, &mut sh).expect("spawn sh"));
    check(&engine, sh.0.id(), &cg, &owner);
    let kids = wait_for(SETTLE, || {
        let k = process::children(sh.0.id());
        (k.len() >= 3).then_some(k)
    })
    .expect("sh started its three children");
    for kid in kids {
        check(&engine, kid, &cg, &owner);
    }

    // Threads: the process and each thread id resolve to the pod.
    let mut threaded = spawn(&cg, &["threads", "4"]);
    let pid = threaded.0.id();
    let stdout = threaded.0.stdout.take().expect("stdout");
    let tids: Vec<u32> = BufReader::new(stdout)
        .lines()
        .take(4)
        .map(|l| l.expect("tid line").trim().parse().expect("tid"))
        .collect();
    assert_eq!(tids.len(), 4);
    check(&engine, pid, &cg, &owner);
    for tid in tids {
        assert_ne!(tid, pid);
        check(&engine, tid, &cg, &owner);
    }
    assert!(process::threads(pid).len() >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_forks_and_exits_at_once() {
    let _serial = PID_COUNTER.lock().await;
    let Some(engine) = engine(Duration::from_secs(30)).await else {
        return;
    };
    let t = tree("forkexit");
    let uid = pod_uid(901);
    let cid = container_id(901);
    let cg = t.create(&format!(
        "kubepods.slice/kubepods-pod{}.slice/cri-containerd-{cid}.scope",
        uid.replace('-', "_")
    ));
    let owner = pod(
        &uid,
        Some(&cid),
        Some(Runtime::Containerd),
        QosClass::Guaranteed,
        false,
    );
    let mut parent = spawn(&cg, &["fork-exit"]);
    let parent_pid = parent.0.id();
    let mut line = String::new();
    BufReader::new(parent.0.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("child pid");
    let child: u32 = line.trim().parse().expect("child pid");
    assert!(parent.0.wait().expect("wait").success());
    // The child never exec'd: only the fork event placed it.
    let _child_guard = ChildPid(child);
    check(&engine, child, &cg, &owner);
    // The parent is gone but inside the grace period.
    let a = engine
        .resolve(parent_pid)
        .expect("exited parent within grace");
    assert_eq!(a.owner, owner);
}

/// Kills a pid that is not our child (reparented) when the test ends.
struct ChildPid(u32);

impl Drop for ChildPid {
    fn drop(&mut self) {
        // SAFETY: sending a signal has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exited_process_resolves_within_the_grace_period_then_is_gone() {
    let _serial = PID_COUNTER.lock().await;
    let grace = Duration::from_millis(1500);
    let Some(engine) = engine(grace).await else {
        return;
    };
    let mut events = engine.subscribe();
    let t = tree("grace");
    let uid = pod_uid(902);
    let cid = container_id(902);
    let cg = t.create(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/crio-{cid}.scope",
        uid.replace('-', "_")
    ));
    let owner = pod(
        &uid,
        Some(&cid),
        Some(Runtime::CriO),
        QosClass::Burstable,
        false,
    );
    let mut cmd = Command::new("true");
    let mut child = process::spawn_in(&cg.dir, &mut cmd).expect("spawn true");
    let pid = child.id();
    assert!(child.wait().expect("wait").success());
    // Wait for the engine to apply the exit (the watch stream reports it).
    let exited_at = loop {
        let ev = tokio::time::timeout(SETTLE, events.recv())
            .await
            .expect("exit event in time")
            .expect("watch stream open");
        if ev.pid == pid && ev.event == WatchKind::Exit {
            assert_eq!(ev.attribution.as_ref().map(|a| &a.owner), Some(&owner));
            break Instant::now();
        }
    };
    let a = engine.resolve(pid).expect("resolvable right after exit");
    assert_eq!(a.owner, owner);
    assert!(
        exited_at.elapsed() < grace,
        "test too slow to check the grace period"
    );
    tokio::time::sleep(grace + Duration::from_millis(300)).await;
    // The pid may belong to a new process by now (the reuse test rewinds the pid
    // counter): it must then resolve to that process, never to the old pod.
    let before = std::fs::metadata(format!("/proc/{pid}")).is_ok();
    let after = engine.resolve(pid);
    let still_free = !before && std::fs::metadata(format!("/proc/{pid}")).is_err();
    assert_ne!(
        after.as_ref().map(|a| &a.owner),
        Some(&owner),
        "old pod after the grace period"
    );
    if still_free {
        assert_eq!(after, None, "still resolvable after the grace period");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_pid_gets_the_new_processs_pod() {
    let _serial = PID_COUNTER.lock().await;
    let Some(engine) = engine(Duration::from_secs(30)).await else {
        return;
    };
    let mut events = engine.subscribe();
    let t = tree("reuse");
    let (uid_a, cid_a) = (pod_uid(903), container_id(903));
    let (uid_b, cid_b) = (pod_uid(904), container_id(904));
    let a = t.create(&format!("kubepods/pod{uid_a}/{cid_a}"));
    let b = t.create(&format!("kubepods/burstable/pod{uid_b}/crio-{cid_b}"));
    let owner_a = pod(
        &uid_a,
        Some(&cid_a),
        Some(Runtime::Unknown),
        QosClass::Guaranteed,
        false,
    );
    let owner_b = pod(
        &uid_b,
        Some(&cid_b),
        Some(Runtime::CriO),
        QosClass::Burstable,
        false,
    );

    let mut first = process::spawn_in(&a.dir, &mut Command::new("true")).expect("spawn");
    let pid = first.id();
    assert!(first.wait().expect("wait").success());
    loop {
        let ev = tokio::time::timeout(SETTLE, events.recv())
            .await
            .expect("exit event in time")
            .expect("watch stream open");
        if ev.pid == pid && ev.event == WatchKind::Exit {
            break;
        }
    }
    assert_eq!(engine.resolve(pid).map(|a| a.owner), Some(owner_a.clone()));

    // A new process in pod B with the same pid, inside A's grace period.
    let second = process::spawn_with_pid(
        pid,
        &b.dir,
        || {
            let mut c = Command::new(HELPER);
            c.arg("sleep");
            c
        },
        500,
    );
    let Some(second) = second else {
        if kernel::required() {
            panic!("could not obtain pid {pid} again through ns_last_pid");
        }
        eprintln!("SKIPPED: pid {pid} kept being taken by other processes");
        return;
    };
    let second = Reaped(second);
    assert_eq!(second.0.id(), pid);
    let got = check(&engine, pid, &b, &owner_b);
    assert_ne!(got.owner, owner_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ps_lists_processes_and_watches_events_with_their_pod() {
    if !kernel::require("root", kernel::probe_root()) {
        return;
    }
    let bin = workspace_bin("gpu-scaler");
    let t = tree("ps");
    let uid = pod_uid(905);
    let cid = container_id(905);
    let cg = t.create(&format!(
        "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{cid}.scope",
        uid.replace('-', "_")
    ));
    let sleeper = spawn(&cg, &["sleep"]);

    let rows = ps_json(&["ps", "--json"]);
    let row = rows
        .iter()
        .find(|r| r["pid"] == sleeper.0.id())
        .expect("ps lists the sleeper");
    assert_eq!(row["owner"]["pod_uid"], uid.as_str());
    assert_eq!(row["owner"]["container_id"], cid.as_str());
    assert_eq!(row["owner"]["runtime"], "containerd");
    assert_eq!(row["cgroup_path"], cg.path.as_str());

    // --watch: a process exec'd in the pod shows up with its identity.
    let mut watch = Reaped(
        Command::new(&bin)
            .args(["ps", "--watch", "--json"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run gpu-scaler ps --watch"),
    );
    let mut lines = BufReader::new(watch.0.stdout.take().expect("stdout")).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.by_ref() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watcher needs a moment to load its probe; keep starting processes
    // until one is reported.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = None;
    while seen.is_none() && Instant::now() < deadline {
        let mut c = process::spawn_in(&cg.dir, &mut Command::new("true")).expect("spawn");
        let pid = c.id();
        c.wait().expect("wait");
        let until = Instant::now() + Duration::from_millis(500);
        while let Ok(line) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            let v: serde_json::Value =
                serde_json::from_str(&line.expect("line")).expect("JSON event");
            if v["pid"] == pid && v["event"] == "exec" {
                seen = Some(v);
                break;
            }
        }
    }
    let v = seen.expect("ps --watch reported an exec in the pod");
    assert_eq!(v["comm"], "true");
    assert_eq!(v["owner"]["pod_uid"], uid.as_str());
    assert_eq!(v["owner"]["qos"], "besteffort");
    assert_eq!(v["backend"], "ebpf");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_honours_the_mode() {
    use gpu_scaler::attribution::{Backend, Config, Mode, start};
    let config = |mode| Config {
        mode,
        exit_grace: Duration::from_secs(30),
        ebpf_ring_buffer: RingBufferSize::DEFAULT,
    };
    let procfs = start(config(Mode::Procfs))
        .await
        .expect("procfs always starts");
    assert_eq!(procfs.backend(), Backend::Procfs);
    let me = procfs
        .resolve(std::process::id())
        .expect("own pid via procfs");
    assert_eq!(me.backend, Backend::Procfs);
    // Auto picks eBPF wherever eBPF can load.
    let probe = EbpfAttributor::start(Duration::from_secs(1))
        .await
        .map(drop);
    if !kernel::require("eBPF attribution", probe) {
        // Without eBPF, auto must still answer, through procfs.
        let auto = start(config(Mode::Auto)).await.expect("auto falls back");
        assert_eq!(auto.backend(), Backend::Procfs);
        assert!(start(config(Mode::Ebpf)).await.is_err());
        return;
    }
    let auto = start(config(Mode::Auto)).await.expect("auto starts");
    assert_eq!(auto.backend(), Backend::Ebpf);
    let ebpf = start(Config {
        ebpf_ring_buffer: "8KiB".parse().expect("8KiB"),
        ..config(Mode::Ebpf)
    })
    .await
    .expect("ebpf starts");
    assert_eq!(ebpf.backend(), Backend::Ebpf);
    let counters = ebpf.stats().and_then(|s| s.ebpf).expect("eBPF counters");
    assert_eq!(
        counters.ring_buffer_bytes, 8192,
        "the ring has the size asked for"
    );
    assert_eq!(counters.pid_map_capacity, PID_MAP_CAPACITY);
    assert_eq!(
        ebpf.resolve(std::process::id()).map(|a| a.cgroup_path),
        Some(me.cgroup_path)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_moved_without_exec_follows_its_new_cgroup() {
    let Some(engine) = engine(Duration::from_secs(30)).await else {
        return;
    };
    let t = tree("move");
    let (uid_a, cid_a) = (pod_uid(906), container_id(906));
    let (uid_b, cid_b) = (pod_uid(907), container_id(907));
    let a = t.create(&format!("kubepods/pod{uid_a}/{cid_a}"));
    let b = t.create(&format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/docker-{cid_b}.scope",
        uid_b.replace('-', "_")
    ));
    let owner_a = pod(
        &uid_a,
        Some(&cid_a),
        Some(Runtime::Unknown),
        QosClass::Guaranteed,
        false,
    );
    let owner_b = pod(
        &uid_b,
        Some(&cid_b),
        Some(Runtime::Docker),
        QosClass::Burstable,
        false,
    );
    // Threads too: a cgroup.procs write moves the whole thread group.
    let mut child = spawn(&a, &["threads", "3"]);
    let pid = child.0.id();
    let tids: Vec<u32> = BufReader::new(child.0.stdout.take().expect("stdout"))
        .lines()
        .take(3)
        .map(|l| l.expect("tid").trim().parse().expect("tid"))
        .collect();
    check(&engine, pid, &a, &owner_a);
    std::fs::write(b.dir.join("cgroup.procs"), pid.to_string()).expect("move to pod B");
    check(&engine, pid, &b, &owner_b);
    for tid in tids {
        check_user_space(&engine, tid, &b, &owner_b);
    }
}

/// [`check`] for a test on a current-thread runtime, where the engine only
/// runs while the test awaits: polls with `tokio::time::sleep`.
async fn check_async(engine: &EbpfAttributor, pid: u32, cg: &Cgroup, expected: &Owner) {
    let deadline = Instant::now() + SETTLE;
    let got = loop {
        match engine.resolve(pid) {
            Some(a) if *a.cgroup_path == *cg.path && a.backend == Backend::Ebpf => break a,
            last if Instant::now() >= deadline => {
                panic!("pid {pid} never resolved to {}; last: {last:?}", cg.path)
            }
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    let got = assert_agrees(got, pid, cg, expected);
    assert_eq!(
        engine.kernel_cgroup_of(pid),
        got.cgroup_id,
        "kernel map disagrees for pid {pid}"
    );
}

/// An exited pid must resolve to one of `allowed`: its own pod inside the grace
/// period, `None` after it. If another process has taken the pid since, the
/// answer must be that process's pod (as procfs says).
fn assert_exited(engine: &EbpfAttributor, pid: u32, allowed: &[Option<&Owner>]) {
    let alive_before = std::fs::metadata(format!("/proc/{pid}")).is_ok();
    let got = engine.resolve(pid);
    let alive_after = std::fs::metadata(format!("/proc/{pid}")).is_ok();
    if alive_before || alive_after {
        // Reused by a process we do not control: never the old owner unless
        // procfs says the new process is in that pod too.
        let now = ProcfsAttributor::new(Duration::from_secs(1)).resolve(pid);
        if let (Some(got), Some(now)) = (&got, &now) {
            assert!(
                got.owner == now.owner || allowed.contains(&Some(&got.owner)),
                "reused pid {pid}: engine says {got:?}, procfs {now:?}"
            );
        }
        return;
    }
    let got = got.as_ref().map(|a| &a.owner);
    assert!(
        allowed.contains(&got),
        "exited pid {pid} resolves to {got:?}, not one of {allowed:?}"
    );
}

/// After the grace period an exited pid must not resolve to its old pod. It
/// resolves to nothing, unless another process took the pid since (pids wrap
/// at pid_max, 32768 by default): then to that process's owner, which procfs
/// confirms while it lives (a short-lived one may be gone already).
fn assert_gone(engine: &EbpfAttributor, pid: u32, old: &Owner) {
    let got = engine.resolve(pid);
    assert_ne!(
        got.as_ref().map(|a| &a.owner),
        Some(old),
        "exited pid {pid} still resolves to its old pod after the grace period"
    );
    if let Some(got) = got
        && let Some(now) = ProcfsAttributor::new(Duration::from_secs(1)).resolve(pid)
    {
        assert_eq!(got.owner, now.owner, "reused pid {pid}");
    }
}

/// Kills and reaps `child`, returning its pid.
fn end(mut child: Reaped) -> u32 {
    let pid = child.0.id();
    let _ = child.0.kill();
    child.0.wait().expect("reap");
    pid
}

/// Forces the probe's smallest ring buffer (one page) to overflow and checks
/// that the engine recovers from /proc: the losses are counted, a resync runs,
/// and afterwards every live test process resolves to the pod it is in now
/// (appeared, moved, and pid-reused while events were lost), and processes
/// that exited in the gap keep their own pod for the grace period, then go.
///
/// The runtime is current-thread on purpose: while the test body runs without
/// awaiting, the engine's task cannot drain the ring, so a burst of process
/// churn fills the page and the events that follow are lost, as when a starved
/// daemon falls behind on a busy node. No test hook in the engine is involved.
#[tokio::test(flavor = "current_thread")]
async fn a_ring_buffer_overflow_is_recovered_from_proc() {
    let _serial = PID_COUNTER.lock().await;
    if !kernel::require("root", kernel::probe_root()) {
        return;
    }
    let grace = Duration::from_secs(3);
    let page = RingBufferSize::one_page();
    let engine = match EbpfAttributor::start_with(grace, page).await {
        Ok(e) => e,
        Err(e) => {
            kernel::require("eBPF attribution", Err(e));
            return;
        }
    };
    let stats = || {
        let s = engine.stats().expect("eBPF engine has stats");
        (s, s.ebpf.expect("eBPF counters"))
    };
    assert_eq!(stats().1.ring_buffer_bytes, page.bytes(), "ring resized");
    let t = tree("overflow");
    let mut pods = Vec::new();
    for n in 910..914 {
        let (uid, cid) = (pod_uid(n), container_id(n));
        let cg = t.create(&format!("kubepods/burstable/pod{uid}/{cid}"));
        let owner = pod(
            &uid,
            Some(&cid),
            Some(Runtime::Unknown),
            QosClass::Burstable,
            false,
        );
        pods.push((cg, owner));
    }
    let [(a, owner_a), (b, owner_b), (c, owner_c), (d, owner_d)] =
        <[_; 4]>::try_from(pods).expect("four pods");

    // Before the gap, four processes in pod A, all tracked.
    let stays = spawn(&a, &["sleep"]);
    let victim = spawn(&a, &["sleep"]);
    let mover = spawn(&a, &["sleep"]);
    let exits = spawn(&a, &["sleep"]);
    for p in [&stays, &victim, &mover, &exits] {
        check_async(&engine, p.0.id(), &a, &owner_a).await;
    }
    let (before, before_ebpf) = stats();

    // The gap: nothing below awaits until the ring has overflowed and the
    // interesting changes are made. A burst of fork+exec+exit (3 records of
    // 56 bytes each per process) fills one page many times over.
    let mut burst = spawn(&d, &["forkloop", "300"]);
    assert!(burst.0.wait().expect("burst").success());
    let burst = burst.0.id();
    // Exits: its exit event is lost.
    let exited = end(exits);
    // Pid reuse: the victim exits and a new process in pod B takes its pid.
    let victim = end(victim);
    let reused = process::spawn_with_pid(
        victim,
        &b.dir,
        || {
            let mut c = Command::new(HELPER);
            c.arg("sleep");
            c
        },
        500,
    )
    .map(Reaped);
    // Appears: a new process in pod B.
    let appeared = spawn(&b, &["sleep"]);
    // Moves from pod A to pod C without exec.
    std::fs::write(c.dir.join("cgroup.procs"), mover.0.id().to_string()).expect("move to C");

    // Close the gap: the engine drains, sees the losses and resyncs.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats().1.resyncs == before_ebpf.resyncs {
        assert!(
            Instant::now() < deadline,
            "no resync after the overflow: {:?}",
            stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (after, after_ebpf) = stats();
    assert!(
        after.dropped_events > before.dropped_events,
        "one page overflowed without a loss? {before:?} -> {after:?}"
    );
    assert!(after_ebpf.resyncs > before_ebpf.resyncs);

    // Live processes: where they are now, as procfs and the kernel map say.
    check_async(&engine, stays.0.id(), &a, &owner_a).await;
    check_async(&engine, appeared.0.id(), &b, &owner_b).await;
    check_async(&engine, mover.0.id(), &c, &owner_c).await;
    match &reused {
        Some(r) => {
            assert_eq!(r.0.id(), victim);
            check_async(&engine, victim, &b, &owner_b).await;
        }
        None if kernel::required() => panic!("could not obtain pid {victim} again"),
        None => eprintln!("SKIPPED the reuse check: pid {victim} kept being taken"),
    }
    // Exited in the gap: their own pod during the grace period (the burst's
    // process may have been lost whole, if noise filled the page first) ...
    assert_exited(&engine, exited, &[Some(&owner_a)]);
    assert_exited(&engine, burst, &[Some(&owner_d), None]);
    if reused.is_none() {
        assert_exited(&engine, victim, &[Some(&owner_a)]);
    }
    // ... and nothing after it.
    tokio::time::sleep(grace + Duration::from_millis(500)).await;
    assert_gone(&engine, exited, &owner_a);
    assert_gone(&engine, burst, &owner_d);
    if reused.is_some() {
        check_async(&engine, victim, &b, &owner_b).await;
    }
    check_async(&engine, stays.0.id(), &a, &owner_a).await;
}

/// The eBPF series of one scrape: (name, label value) -> value.
fn ebpf_series(body: &str) -> std::collections::HashMap<(String, String), f64> {
    body.lines()
        .filter(|l| l.starts_with("gpu_scaler_ebpf_"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, label) = match series.split_once('{') {
                Some((name, labels)) => {
                    let v = labels.split_once('"')?.1.split_once('"')?.0;
                    (name, v)
                }
                None => (series, ""),
            };
            Some(((name.to_owned(), label.to_owned()), value.parse().ok()?))
        })
        .collect()
}

/// The real daemon with eBPF attribution and a 64 KiB ring buffer: /metrics
/// carries the engine's events by kind, resyncs and map occupancy, and the
/// counts grow as processes start and exit in a pod cgroup.
#[test]
fn serve_exports_ebpf_events_and_map_occupancy() {
    // A bad size is refused before anything starts, with the reason.
    let bin = workspace_bin("gpu-scaler");
    let out = Command::new(&bin)
        .args(["serve", "--ebpf-ring-buffer-bytes", "5000"])
        .output()
        .expect("run gpu-scaler serve");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("power-of-two multiple of the page size"),
        "{err}"
    );

    if !kernel::require("root", kernel::probe_root()) {
        return;
    }
    let probe = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            EbpfAttributor::start(Duration::from_secs(1))
                .await
                .map(drop)
        });
    if !kernel::require("eBPF attribution", probe) {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let pods = dir.path().join("pods.json");
    std::fs::write(&pods, r#"{"apiVersion":"v1","kind":"List","items":[]}"#).expect("pods");
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(
        &scenario,
        "[[gpu]]\nname = \"Fake H100\"\nmemory_total_mib = 80000\nutilization = 0\n\
         memory_utilization = 0\ntemperature_c = 40\npower_w = 100.0\npower_limit_w = 700.0\n",
    )
    .expect("scenario");
    let localhost: std::net::IpAddr = [127, 0, 0, 1].into();
    let port = || format!("127.0.0.1:{}", serve::free_port(localhost));
    let http: std::net::SocketAddr = port().parse().expect("address");
    let mut args: Vec<std::ffi::OsString> = vec![
        "--gpu-scenario".into(),
        scenario.into(),
        "--pods-file".into(),
        pods.into(),
        "--metrics-listen".into(),
        http.to_string().into(),
        "--listen".into(),
        port().into(),
        "--peer-listen".into(),
        port().into(),
    ];
    args.extend(
        [
            "--attribution",
            "ebpf",
            "--gpu",
            "mock",
            "--ebpf-ring-buffer-bytes",
            "64KiB",
            "--poll-interval",
            "250ms",
        ]
        .map(Into::into),
    );
    let mut daemon =
        serve::ServeProcess::spawn("ebpf-metrics", args, &dir.path().join("serve.log"));
    daemon.wait_ready(http);
    let scrape = || {
        serve::http_get(http, "/metrics")
            .filter(|(status, _)| *status == 200)
            .map(|(_, body)| ebpf_series(&body))
    };
    let key = |name: &str, label: &str| (name.to_owned(), label.to_owned());
    let events = |kind: &str| key("gpu_scaler_ebpf_events_total", kind);
    let entries = key("gpu_scaler_ebpf_map_entries", "PID_CGROUP");
    // Up, with the pid map counted once.
    let base = wait_for(Duration::from_secs(30), || {
        scrape().filter(|s| s.contains_key(&entries))
    })
    .expect("the pid map counted within 30 s");
    assert_eq!(
        base.get(&key("gpu_scaler_ebpf_map_capacity", "PID_CGROUP")),
        Some(&f64::from(PID_MAP_CAPACITY))
    );
    assert_eq!(
        base.get(&key("gpu_scaler_ebpf_map_capacity", "EVENTS")),
        Some(&65536.0),
        "the ring buffer has the size asked for"
    );
    assert!(base.contains_key(&key("gpu_scaler_ebpf_resyncs_total", "")));
    assert!(base.contains_key(&key("gpu_scaler_ebpf_events_dropped_total", "")));

    // 20 short processes started in a new pod cgroup (each: fork, a move into
    // the cgroup, exec, exit), one long-lived one, then the cgroup removed.
    const N: f64 = 20.0;
    let stays = tree("metrics-stays");
    let sleeper_cg = stays.create(&format!(
        "kubepods/pod{}/{}",
        pod_uid(914),
        container_id(914)
    ));
    let _sleeper = spawn(&sleeper_cg, &["sleep"]);
    let t = tree("metrics");
    let cg = t.create(&format!(
        "kubepods/pod{}/{}",
        pod_uid(915),
        container_id(915)
    ));
    for _ in 0..N as usize {
        let mut c = process::spawn_in(&cg.dir, &mut Command::new("true")).expect("spawn");
        assert!(c.wait().expect("wait").success());
    }
    drop(t);
    let grew = |s: &std::collections::HashMap<_, f64>, k: &(String, String), by: f64| {
        s.get(k).copied().unwrap_or(0.0) >= base.get(k).copied().unwrap_or(0.0) + by
    };
    let after = wait_for(Duration::from_secs(15), || {
        scrape().filter(|s| {
            ["exec", "fork", "exit", "attach"]
                .iter()
                .all(|kind| grew(s, &events(kind), N))
                && grew(s, &events("cgroup_mkdir"), 1.0)
                && grew(s, &events("cgroup_rmdir"), 1.0)
                // Counted again since the sleeper started (every 5 s).
                && s.get(&entries).is_some_and(|n| *n >= 1.0)
        })
    });
    let Some(after) = after else {
        panic!(
            "event counts did not grow by {N}: {base:?} -> {:?}",
            scrape()
        );
    };
    let n = after[&entries];
    assert!(n <= f64::from(PID_MAP_CAPACITY), "pid map entries {n}");
}

/// The procfs backend answers a live process from its cache (pid and start
/// time) and reads its cgroup again after its recheck period: a process moved
/// to another pod's cgroup without exec is seen moved within that period.
#[test]
fn procfs_sees_a_process_moved_without_exec_after_its_recheck() {
    if !kernel::require("root", kernel::probe_root()) {
        return;
    }
    let recheck = Duration::from_millis(500);
    let procfs = ProcfsAttributor::with_recheck(Duration::from_secs(30), recheck);
    let t = tree("procfs-move");
    let (uid_a, cid_a) = (pod_uid(908), container_id(908));
    let (uid_b, cid_b) = (pod_uid(909), container_id(909));
    let a = t.create(&format!("kubepods/pod{uid_a}/{cid_a}"));
    let b = t.create(&format!("kubepods/pod{uid_b}/{cid_b}"));
    let child = spawn(&a, &["sleep"]);
    let pid = child.0.id();
    let owner_of = |uid: &str, cid: &str| {
        pod(
            uid,
            Some(cid),
            Some(Runtime::Unknown),
            QosClass::Guaranteed,
            false,
        )
    };
    let first = procfs.resolve(pid).expect("live pid resolves");
    assert_eq!(first.owner, owner_of(&uid_a, &cid_a));
    assert_eq!(&*first.cgroup_path, a.path);
    std::fs::write(b.dir.join("cgroup.procs"), pid.to_string()).expect("move to pod B");
    let seen = wait_for(recheck * 4, || {
        procfs
            .resolve(pid)
            .filter(|x| x.owner == owner_of(&uid_b, &cid_b))
    })
    .expect("the move is seen after the recheck period");
    assert_eq!(&*seen.cgroup_path, b.path);
}

/// `ps --pods-file` names a pod process's container from the pod's statuses and
/// marks the sandbox: a container scope the statuses do not list.
#[test]
fn ps_with_a_pods_file_names_containers_and_the_sandbox() {
    if !kernel::require("root", kernel::probe_root()) {
        return;
    }
    let t = tree("ps-pods");
    let uid = pod_uid(910);
    let (app, pause) = (container_id(910), container_id(911));
    let scope = |cid: &str| {
        t.create(&format!(
            "kubepods.slice/kubepods-pod{}.slice/crio-{cid}.scope",
            uid.replace('-', "_")
        ))
    };
    let worker = spawn(&scope(&app), &["sleep"]);
    let sandbox = spawn(&scope(&pause), &["sleep"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let pods = dir.path().join("pods.json");
    std::fs::write(
        &pods,
        serde_json::json!({"kind": "List", "items": [{
            "metadata": {"name": "llm-0", "namespace": "ml", "uid": uid},
            "status": {"phase": "Running",
                       "containerStatuses": [{"name": "worker", "containerID": format!("cri-o://{app}")}]}
        }]})
        .to_string(),
    )
    .expect("write pods file");
    let rows = ps_json(&[
        "ps".as_ref(),
        "--json".as_ref(),
        "--attribution".as_ref(),
        "procfs".as_ref(),
        "--pods-file".as_ref(),
        pods.as_os_str(),
    ]);
    let row = |pid: u32| {
        rows.iter()
            .find(|r| r["pid"] == pid)
            .unwrap_or_else(|| panic!("ps lists pid {pid}"))
    };
    let w = &row(worker.0.id())["pod"];
    assert_eq!(w["namespace"], "ml");
    assert_eq!(w["name"], "llm-0");
    assert_eq!(w["container"]["role"], "container");
    assert_eq!(w["container"]["name"], "worker");
    assert_eq!(w["is_sandbox"], false);
    let s = row(sandbox.0.id());
    assert_eq!(s["pod"]["container"]["role"], "sandbox");
    assert_eq!(s["pod"]["is_sandbox"], true);
    assert_eq!(s["owner"]["container_id"], pause.as_str());
    // Processes outside pods carry no pod column.
    assert!(row(std::process::id())["pod"].is_null());

    let table = Command::new(workspace_bin("gpu-scaler"))
        .args(["ps", "--attribution", "procfs", "--pods-file"])
        .arg(&pods)
        .output()
        .expect("run gpu-scaler ps");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("ml/llm-0/worker"), "{table}");
    assert!(table.contains("ml/llm-0/(sandbox)"), "{table}");

    // A pods file that does not parse is a clear error, not a table.
    std::fs::write(&pods, "{\"kind\": \"List\", \"items\": [").expect("write");
    let bad = Command::new(workspace_bin("gpu-scaler"))
        .args(["ps", "--attribution", "procfs", "--pods-file"])
        .arg(&pods)
        .output()
        .expect("run gpu-scaler ps");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("pods.json"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

/// Runs `gpu-scaler` with `args` (a `ps ... --json` command line) and parses
/// its output, one JSON object per line; panics with its stderr if it fails.
fn ps_json<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<serde_json::Value> {
    let out = Command::new(workspace_bin("gpu-scaler"))
        .args(args)
        .output()
        .expect("run gpu-scaler ps");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}
