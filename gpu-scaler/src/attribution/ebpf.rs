//! The eBPF backend: loads the embedded probe with this kernel's tracepoint
//! offsets, seeds the [`Tracker`] from /proc, and follows the probe's ring buffer.
//!
//! Start-up order matters: the probe is attached before the cgroup walk and the
//! /proc scan, so nothing that happens during the scan is missed; events queued
//! meanwhile are applied afterwards and, being newer, win over the scan.

use std::{
    collections::HashSet,
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use gpu_scaler_common::{
    CgroupEvent, DROP_RING_FULL, EVENT_ATTACH, EVENT_CGROUP_MKDIR, EVENT_CGROUP_RMDIR, EVENT_EXEC,
    EVENT_EXIT, EVENT_FORK, ProcessEvent,
};
use tokio::{io::unix::AsyncFd, sync::broadcast, task::JoinHandle};

use super::{
    Attribution, Attributor, Backend, Error, Result,
    cgroup_tree::{Cgroup2Mount, CgroupInfo, CgroupTree},
    procfs, tracefs,
    tracker::{Change, Stats, Tracker},
};

/// The probe object built by gpu-scaler/build.rs; absent in a
/// `GPU_SCALER_NO_EBPF=1` build.
#[cfg(not(gpu_scaler_no_ebpf))]
static PROBE: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/gpu-scaler-probe"
)));
#[cfg(gpu_scaler_no_ebpf)]
static PROBE: Option<&[u8]> = None;

/// Capacity of the probe's pid -> cgroup LRU map.
pub const PID_MAP_CAPACITY: u32 = gpu_scaler_common::MAX_TRACKED_PIDS;

/// Whether this binary has the probe embedded.
pub fn probe_embedded() -> bool {
    PROBE.is_some()
}

/// (program name in the object, tracepoint category, tracepoint name)
const PROGRAMS: [(&str, &str, &str); 6] = [
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("cgroup_mkdir", "cgroup", "cgroup_mkdir"),
    ("cgroup_rmdir", "cgroup", "cgroup_rmdir"),
    // Not enough alone (it misses clone3(CLONE_INTO_CGROUP), which runc and crun
    // use), but it catches moves without exec, which the other events miss.
    ("cgroup_attach_task", "cgroup", "cgroup_attach_task"),
];

/// Most events applied under one write lock, so lookups never wait long.
const BATCH: usize = 512;
/// How often the ring buffer is drained without a wakeup: the probe only wakes
/// user space once `WAKEUP_BYTES` are pending, so this bounds event latency.
const DRAIN_EVERY: Duration = Duration::from_millis(20);
/// How often exited pids are swept and the drop counter is read.
const TICK: Duration = Duration::from_millis(250);
/// Least time between two walks of the cgroup mount triggered by unknown ids.
const REWALK_EVERY: Duration = Duration::from_millis(200);

/// A lifecycle event as `gpu-scaler ps --watch` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WatchEvent {
    pub event: WatchKind,
    pub pid: u32,
    pub comm: String,
    /// Who the process belongs to; `None` if its cgroup could not be found.
    #[serde(flatten)]
    pub attribution: Option<Attribution>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchKind {
    Exec,
    Exit,
}

/// A probe record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Exec {
        pid: u32,
        old_pid: u32,
        cgroup_id: u64,
        comm: [u8; 16],
    },
    Fork {
        pid: u32,
        cgroup_id: u64,
    },
    /// Task `pid` (a tid) was moved into `cgroup_id` without exec.
    Attach {
        pid: u32,
        cgroup_id: u64,
    },
    Exit {
        tid: u32,
        tgid: u32,
        group_dead: bool,
        comm: [u8; 16],
    },
    Mkdir {
        id: u64,
        /// `None` when the path did not fit in the record.
        path: Option<String>,
    },
    Rmdir {
        id: u64,
    },
}

/// Decodes one ring buffer record; `None` for a record of unknown kind or size
/// (a probe and daemon from different builds), which is logged by the caller.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        EVENT_EXEC | EVENT_FORK | EVENT_EXIT | EVENT_ATTACH => {
            if bytes.len() < size_of::<ProcessEvent>() {
                return None;
            }
            // SAFETY: length checked; ProcessEvent is plain integers (aya::Pod).
            let ev: ProcessEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            Some(match kind {
                EVENT_EXEC => Event::Exec {
                    pid: ev.pid,
                    old_pid: ev.aux,
                    cgroup_id: ev.cgroup_id,
                    comm: ev.comm,
                },
                EVENT_FORK => Event::Fork {
                    pid: ev.pid,
                    cgroup_id: ev.cgroup_id,
                },
                EVENT_ATTACH => Event::Attach {
                    pid: ev.pid,
                    cgroup_id: ev.cgroup_id,
                },
                _ => Event::Exit {
                    tid: ev.pid,
                    tgid: ev.tgid,
                    group_dead: ev.aux != 0,
                    comm: ev.comm,
                },
            })
        }
        EVENT_CGROUP_MKDIR | EVENT_CGROUP_RMDIR => {
            if bytes.len() < size_of::<CgroupEvent>() {
                return None;
            }
            // SAFETY: as above.
            let ev: CgroupEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
            if kind == EVENT_CGROUP_RMDIR {
                return Some(Event::Rmdir { id: ev.id });
            }
            let len = (ev.path_len as usize).min(ev.path.len());
            let path = (ev.truncated == 0)
                .then(|| std::str::from_utf8(&ev.path[..len]).ok().map(str::to_owned))
                .flatten();
            Some(Event::Mkdir { id: ev.id, path })
        }
        _ => None,
    }
}

fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

struct Shared {
    tracker: RwLock<Tracker>,
    watchers: broadcast::Sender<WatchEvent>,
}

/// The eBPF attribution engine. Dropping it detaches the probe.
pub struct EbpfAttributor {
    shared: Arc<Shared>,
    ebpf: Mutex<Ebpf>,
    mount: Cgroup2Mount,
    task: JoinHandle<()>,
}

fn ebpf_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::EbpfUnavailable(format!("{what}: {e}"))
}

impl EbpfAttributor {
    /// Loads and attaches the probe, seeds from /proc and starts following events.
    /// Must run inside a tokio runtime.
    pub async fn start(grace: Duration) -> Result<Arc<Self>> {
        let Some(probe) = PROBE else {
            return Err(Error::EbpfUnavailable(
                "this binary was built with GPU_SCALER_NO_EBPF=1 and has no probe embedded".into(),
            ));
        };
        raise_memlock_limit();
        let tracefs = tracefs::ensure_mounted()?;
        let offsets = tracefs::Formats::read(&tracefs)?.offsets()?;
        tracing::debug!(?offsets, tracefs = %tracefs.display(), "tracepoint offsets");
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .load(probe)
            .map_err(|e| ebpf_err("loading the probe", e))?;
        for (prog, category, name) in PROGRAMS {
            let tp: &mut TracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| ebpf_err("probe object", format!("no program {prog}")))?
                .try_into()
                .map_err(|e| ebpf_err(prog, e))?;
            tp.load()
                .map_err(|e| ebpf_err(&format!("loading {prog}"), e))?;
            tp.attach(category, name)
                .map_err(|e| ebpf_err(&format!("attaching {category}/{name}"), e))?;
        }
        let ring = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or_else(|| ebpf_err("probe object", "no EVENTS map"))?,
        )
        .map_err(|e| ebpf_err("EVENTS", e))?;
        let drops: PerCpuArray<MapData, u64> = PerCpuArray::try_from(
            ebpf.take_map("DROPS")
                .ok_or_else(|| ebpf_err("probe object", "no DROPS map"))?,
        )
        .map_err(|e| ebpf_err("DROPS", e))?;

        let mount = Cgroup2Mount::discover()?;
        let seeded = {
            let mount = mount.clone();
            tokio::task::spawn_blocking(move || seed(&mount, grace))
                .await
                .map_err(|e| ebpf_err("seeding", e))??
        };
        let stats = seeded.stats();
        tracing::info!(
            pids = stats.tracked_pids,
            cgroups = stats.cgroups,
            cgroup2 = %mount.mount_point.display(),
            "eBPF attribution attached"
        );
        let (watchers, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            tracker: RwLock::new(seeded),
            watchers,
        });
        // SAFETY: the RingBuf owns its map fd, keeps it open until it is dropped
        // (with the AsyncFd), and always returns that same fd.
        let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| Error::Io {
                path: "eBPF ring buffer".into(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let task = tokio::spawn(follow(shared.clone(), ring, drops, mount.clone()));
        Ok(Arc::new(Self {
            shared,
            ebpf: Mutex::new(ebpf),
            mount,
            task,
        }))
    }

    /// Lifecycle events as they are applied (for `ps --watch`).
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.shared.watchers.subscribe()
    }

    /// The cgroup id the kernel map holds for task `pid` (diagnostics, tests).
    pub fn kernel_cgroup_of(&self, pid: u32) -> Option<u64> {
        let ebpf = self.ebpf.lock().expect("ebpf poisoned");
        let map: BpfHashMap<_, u32, u64> = BpfHashMap::try_from(ebpf.map("PID_CGROUP")?).ok()?;
        map.get(&pid, 0).ok()
    }

    /// Entries in the kernel's pid map (bounded by its LRU capacity).
    pub fn kernel_map_len(&self) -> usize {
        let ebpf = self.ebpf.lock().expect("ebpf poisoned");
        let Some(map) = ebpf.map("PID_CGROUP") else {
            return 0;
        };
        let Ok(map) = BpfHashMap::<_, u32, u64>::try_from(map) else {
            return 0;
        };
        map.keys().filter(Result::is_ok).count()
    }

    /// Per attached program: (name, runs, total time in the program). The kernel
    /// counts these only while BPF run-time statistics are enabled (the
    /// benchmark enables them with `aya::sys::enable_stats`).
    pub fn program_stats(&self) -> Vec<(&'static str, u64, Duration)> {
        let ebpf = self.ebpf.lock().expect("ebpf poisoned");
        PROGRAMS
            .iter()
            .filter_map(|(name, _, _)| {
                let info = ebpf.program(name)?.info().ok()?;
                Some((*name, info.run_count(), info.run_time()))
            })
            .collect()
    }

    /// The cgroup v2 mount this engine walks.
    pub fn mount(&self) -> &Cgroup2Mount {
        &self.mount
    }
}

impl Drop for EbpfAttributor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Attributor for EbpfAttributor {
    fn resolve(&self, pid: u32) -> Option<Attribution> {
        self.shared
            .tracker
            .read()
            .expect("tracker poisoned")
            .resolve(pid, Instant::now())
    }

    fn backend(&self) -> Backend {
        Backend::Ebpf
    }

    fn stats(&self) -> Option<Stats> {
        Some(
            self.shared
                .tracker
                .read()
                .expect("tracker poisoned")
                .stats(),
        )
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the
/// memory cgroup); raising it is harmless where it no longer matters.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

/// A tracker holding every cgroup and every process now on the machine.
fn seed(mount: &Cgroup2Mount, grace: Duration) -> Result<Tracker> {
    let tree = CgroupTree::from_walk(mount.walk()?);
    let mut tracker = Tracker::new(tree, grace, Backend::Ebpf);
    for (pid, info) in scan_proc(mount, &mut tracker)? {
        tracker.seed(pid, info);
    }
    Ok(tracker)
}

/// Every process in /proc with its cgroup, adding cgroups the tree lacks.
fn scan_proc(mount: &Cgroup2Mount, tracker: &mut Tracker) -> Result<Vec<(u32, Arc<CgroupInfo>)>> {
    let mut out = Vec::new();
    for pid in procfs::pids()? {
        let Some(path) = procfs::read_cgroup(pid) else {
            continue; // exited meanwhile, or a kernel thread without a v2 line
        };
        let info = match tracker.cgroups().by_path(&path) {
            Some(info) => info.clone(),
            None => match mount.id_of(&path) {
                Some(id) => tracker.cgroups_mut().insert(id, &path),
                None => continue,
            },
        };
        out.push((pid, info));
    }
    Ok(out)
}

/// The event loop: drains the ring buffer, sweeps exited pids, and resynchronises
/// from /proc when the probe reports lost events.
async fn follow(
    shared: Arc<Shared>,
    mut ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    mount: Cgroup2Mount,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seen_drops = 0u64;
    let mut last_walk = Instant::now();
    let fd = ring.get_ref().as_raw_fd();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(error) => {
                        tracing::error!(%error, fd, "eBPF ring buffer unreadable; attribution stops following events");
                        return;
                    }
                };
                drain_ring(&shared, guard.get_inner_mut(), &mount, &mut last_walk);
                guard.clear_ready();
            }
            _ = drain.tick() => {
                drain_ring(&shared, ring.get_mut(), &mount, &mut last_walk);
            }
            _ = tick.tick() => {
                let now = Instant::now();
                shared.tracker.write().expect("tracker poisoned").sweep(now);
                let dropped = drops
                    .get(&DROP_RING_FULL, 0)
                    .map(|v| v.iter().sum::<u64>())
                    .unwrap_or(seen_drops);
                if dropped > seen_drops {
                    tracing::warn!(lost = dropped - seen_drops, total = dropped,
                        "eBPF ring buffer overflowed; resynchronising from /proc");
                    seen_drops = dropped;
                    resync(&shared, &mount).await;
                    shared.tracker.write().expect("tracker poisoned").set_dropped_events(dropped);
                }
            }
        }
    }
}

fn drain_ring(
    shared: &Shared,
    ring: &mut RingBuf<MapData>,
    mount: &Cgroup2Mount,
    last_walk: &mut Instant,
) {
    loop {
        let batch = read_batch(ring);
        if batch.is_empty() {
            return;
        }
        apply(shared, batch, mount, last_walk);
    }
}

fn read_batch(ring: &mut RingBuf<MapData>) -> Vec<Event> {
    let mut batch = Vec::new();
    while batch.len() < BATCH {
        let Some(item) = ring.next() else { break };
        match decode(&item) {
            Some(ev) => batch.push(ev),
            None => tracing::warn!(len = item.len(), "undecodable eBPF event skipped"),
        }
    }
    batch
}

fn apply(shared: &Shared, batch: Vec<Event>, mount: &Cgroup2Mount, last_walk: &mut Instant) {
    // Unknown cgroups (mkdir lost or path truncated) are found by walking the
    // mount, outside the lock so lookups never wait on the filesystem.
    let needs_walk = {
        let t = shared.tracker.read().expect("tracker poisoned");
        batch.iter().any(|ev| match ev {
            Event::Exec { cgroup_id, .. }
            | Event::Fork { cgroup_id, .. }
            | Event::Attach { cgroup_id, .. } => t.cgroups().get(*cgroup_id).is_none(),
            Event::Mkdir { path: None, .. } => true,
            _ => false,
        })
    };
    let walked = if needs_walk && last_walk.elapsed() >= REWALK_EVERY {
        *last_walk = Instant::now();
        mount.walk().ok()
    } else {
        None
    };
    let watching = shared.watchers.receiver_count() > 0;
    let mut out = Vec::new();
    let mut moved = Vec::new();
    let now = Instant::now();
    let mut t = shared.tracker.write().expect("tracker poisoned");
    if let Some(walked) = walked {
        t.cgroups_mut().merge(walked);
    }
    for ev in batch {
        match ev {
            Event::Exec {
                pid,
                old_pid,
                cgroup_id,
                comm,
            } => {
                if old_pid != pid {
                    // A non-leader thread exec'd and took the group's pid.
                    t.thread_exit(old_pid);
                }
                let change = t.start(pid, cgroup_id);
                if watching {
                    out.push(WatchEvent {
                        event: WatchKind::Exec,
                        pid,
                        comm: comm_str(&comm),
                        attribution: matches!(change, Change::Started(_))
                            .then(|| t.resolve(pid, now))
                            .flatten(),
                    });
                }
            }
            Event::Fork { pid, cgroup_id } => {
                t.start(pid, cgroup_id);
            }
            Event::Attach { pid, cgroup_id } => {
                t.start(pid, cgroup_id);
                moved.push((pid, cgroup_id));
            }
            Event::Exit {
                tid,
                tgid,
                group_dead,
                comm,
            } => {
                if tid != tgid {
                    t.thread_exit(tid);
                }
                if group_dead {
                    let attribution = t.resolve(tgid, now);
                    t.exit(tgid, now);
                    if watching {
                        out.push(WatchEvent {
                            event: WatchKind::Exit,
                            pid: tgid,
                            comm: comm_str(&comm),
                            attribution,
                        });
                    }
                }
            }
            Event::Mkdir { id, path } => {
                if let Some(path) = path {
                    t.cgroups_mut().insert(id, &path);
                }
            }
            Event::Rmdir { id } => t.cgroups_mut().remove(id),
        }
    }
    drop(t);
    for ev in out {
        let _ = shared.watchers.send(ev);
    }
    if !moved.is_empty() {
        move_threads(shared, moved);
    }
}

/// A `cgroup.procs` write moves a whole thread group but the kernel reports it
/// once, for the leader: move the tids we track for its threads too. Migrations
/// are rare, so reading /proc here (never in a lookup) costs little.
fn move_threads(shared: &Shared, moved: Vec<(u32, u64)>) {
    let tids: Vec<(u32, u64)> = moved
        .into_iter()
        .flat_map(|(pid, cgroup_id)| {
            procfs::tids(pid)
                .into_iter()
                .filter(move |tid| *tid != pid)
                .map(move |tid| (tid, cgroup_id))
        })
        .collect();
    let mut t = shared.tracker.write().expect("tracker poisoned");
    for (tid, cgroup_id) in tids {
        if t.is_running(tid) {
            t.start(tid, cgroup_id);
        }
    }
}

/// After lost events: re-read every process's cgroup, correct what differs, and
/// mark tracked pids that no longer exist as exited.
async fn resync(shared: &Arc<Shared>, mount: &Cgroup2Mount) {
    let mount = mount.clone();
    let scan = tokio::task::spawn_blocking(move || {
        let walked = mount.walk()?;
        let pids = procfs::pids()?;
        let found: Vec<(u32, String)> = pids
            .into_iter()
            .filter_map(|pid| Some((pid, procfs::read_cgroup(pid)?)))
            .collect();
        Ok::<_, Error>((walked, found))
    })
    .await;
    let (walked, found) = match scan {
        Ok(Ok(x)) => x,
        Ok(Err(error)) => return tracing::warn!(%error, "resync from /proc failed"),
        Err(error) => return tracing::warn!(%error, "resync from /proc failed"),
    };
    let now = Instant::now();
    let mut t = shared.tracker.write().expect("tracker poisoned");
    t.cgroups_mut().merge(walked);
    let alive: HashSet<u32> = found.iter().map(|(pid, _)| *pid).collect();
    t.reconcile(|pid| alive.contains(&pid), now);
    for (pid, path) in found {
        let Some(info) = t.cgroups().by_path(&path).cloned() else {
            continue;
        };
        let current = t.resolve(pid, now);
        if !t.is_running(pid) || current.is_none_or(|a| a.cgroup_id != Some(info.id)) {
            t.start_in(pid, info);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-integer #[repr(C)] value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_process_events() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"bash");
        let ev = ProcessEvent {
            kind: EVENT_EXIT,
            pid: 12,
            tgid: 10,
            aux: 1,
            cgroup_id: 99,
            ktime_ns: 5,
            comm,
        };
        assert_eq!(
            decode(&bytes(&ev)),
            Some(Event::Exit {
                tid: 12,
                tgid: 10,
                group_dead: true,
                comm
            })
        );
        assert_eq!(comm_str(&comm), "bash");
        let attach = ProcessEvent {
            kind: EVENT_ATTACH,
            ..ev
        };
        assert_eq!(
            decode(&bytes(&attach)),
            Some(Event::Attach {
                pid: 12,
                cgroup_id: 99
            })
        );
        let exec = ProcessEvent {
            kind: EVENT_EXEC,
            aux: 11,
            ..ev
        };
        assert!(matches!(
            decode(&bytes(&exec)),
            Some(Event::Exec {
                pid: 12,
                old_pid: 11,
                cgroup_id: 99,
                ..
            })
        ));
    }

    #[test]
    fn decodes_cgroup_events_and_truncation() {
        let mut ev = CgroupEvent {
            kind: EVENT_CGROUP_MKDIR,
            level: 2,
            id: 4242,
            path_len: 6,
            truncated: 0,
            path: [0; gpu_scaler_common::CGROUP_PATH_BYTES],
        };
        ev.path[..6].copy_from_slice(b"/a/bcd");
        assert_eq!(
            decode(&bytes(&ev)),
            Some(Event::Mkdir {
                id: 4242,
                path: Some("/a/bcd".into())
            })
        );
        ev.truncated = 1;
        assert_eq!(
            decode(&bytes(&ev)),
            Some(Event::Mkdir {
                id: 4242,
                path: None
            })
        );
        ev.kind = EVENT_CGROUP_RMDIR;
        assert_eq!(decode(&bytes(&ev)), Some(Event::Rmdir { id: 4242 }));
    }

    #[test]
    fn short_or_unknown_records_are_rejected() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[1, 0, 0]), None);
        assert_eq!(decode(&EVENT_EXEC.to_ne_bytes()), None);
        assert_eq!(decode(&77u32.to_ne_bytes().repeat(20)), None);
        assert_eq!(decode(&EVENT_CGROUP_MKDIR.to_ne_bytes().repeat(12)), None);
    }
}
