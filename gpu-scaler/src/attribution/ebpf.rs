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
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf},
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
    tracker::{Change, ProcScan, Stats, Tracker},
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
/// How often the kernel's pid map is counted for `gpu_scaler_ebpf_map_entries`.
/// Counting walks every key with one syscall each (see `bench attribution` for
/// the cost at 10,000 pids), on the blocking pool, never in a lookup; a gauge a
/// few seconds old is fresh enough for a Prometheus scrape.
const MAP_COUNT_EVERY: Duration = Duration::from_secs(5);

/// Size of the probe's event ring buffer in bytes.
///
/// The kernel only creates a `BPF_MAP_TYPE_RINGBUF` whose size is a power of two
/// and a multiple of the page size (`ringbuf_map_alloc` in kernel/bpf/ringbuf.c
/// returns EINVAL otherwise): [`RingBufferSize::new`] checks that up front, so a
/// bad value is a clear error naming the nearest valid sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingBufferSize(u32);

impl RingBufferSize {
    /// 1 MiB: about 18,000 process events (56 bytes each in the ring).
    pub const DEFAULT: Self = Self(gpu_scaler_common::RING_BUF_BYTES);

    /// `bytes`, if this machine's kernel accepts it as a ring buffer size.
    pub fn new(bytes: u64) -> Result<Self> {
        Self::with_page_size(bytes, page_size())
    }

    /// The smallest ring the kernel accepts: one page.
    pub fn one_page() -> Self {
        Self(page_size() as u32)
    }

    /// [`RingBufferSize::new`] for a machine with pages of `page` bytes (a power
    /// of two).
    pub fn with_page_size(bytes: u64, page: u64) -> Result<Self> {
        let max = 1u64 << 31; // the largest power of two a u32 max_entries holds
        if bytes >= page && bytes <= max && bytes.is_power_of_two() {
            return Ok(Self(bytes as u32));
        }
        let hint = if bytes < page {
            format!("the smallest is one page, {}", human(page))
        } else if bytes > max {
            format!("the largest is {}", human(max))
        } else {
            let below = 1u64 << bytes.ilog2();
            format!("the nearest are {} and {}", human(below), human(below * 2))
        };
        Err(Error::RingBufferSize(format!(
            "{bytes} bytes is not a power-of-two multiple of the page size ({page} bytes); {hint}"
        )))
    }

    pub fn bytes(self) -> u32 {
        self.0
    }
}

impl Default for RingBufferSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for RingBufferSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&human(u64::from(self.0)))
    }
}

/// Parses a byte count with an optional binary unit: `4096`, `64KiB`, `1MiB`,
/// `2M`, `1 GiB` (K, Ki, KiB, M, Mi, MiB, G, Gi, GiB, any case), then checks it
/// with [`RingBufferSize::new`].
impl std::str::FromStr for RingBufferSize {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "ki" | "kib" => 10,
            "m" | "mi" | "mib" => 20,
            "g" | "gi" | "gib" => 30,
            _ => {
                return Err(Error::RingBufferSize(format!(
                    "{s:?}: unknown unit {unit:?} (use bytes, KiB, MiB or GiB)"
                )));
            }
        };
        let n: u64 = digits.parse().map_err(|_| {
            Error::RingBufferSize(format!(
                "{s:?} is not a size in bytes (e.g. 4096, 64KiB, 1MiB)"
            ))
        })?;
        let bytes = n
            .checked_mul(1 << shift)
            .ok_or_else(|| Error::RingBufferSize(format!("{s:?} is too large")))?;
        Self::new(bytes)
    }
}

/// `bytes` in the largest binary unit that divides it.
fn human(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}")
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

/// Lifecycle events read from the ring buffer, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EventCounts {
    pub exec: u64,
    /// Processes forked and threads cloned (the tracepoint fires for both).
    pub fork: u64,
    /// Processes and threads that ended.
    pub exit: u64,
    /// Tasks moved to another cgroup without exec (`cgroup_attach_task`).
    pub attach: u64,
    pub cgroup_mkdir: u64,
    pub cgroup_rmdir: u64,
}

/// The eBPF backend's own counters, in [`Stats::ebpf`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EbpfStats {
    pub events: EventCounts,
    /// Resynchronisations from /proc after the probe reported lost events.
    pub resyncs: u64,
    /// GPU processes the tracker did not know, resolved from /proc on the spot.
    pub proc_lookups: u64,
    /// Entries in the kernel's pid -> cgroup map as last counted (every few
    /// seconds); `None` before the first count.
    pub pid_map_entries: Option<u64>,
    /// That map's max_entries, as the kernel reports it.
    pub pid_map_capacity: u32,
    /// Size of the event ring buffer in bytes, as the kernel reports it.
    pub ring_buffer_bytes: u32,
}

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
    /// Taken out of the `Ebpf` so the follow task can count it.
    pid_map: Mutex<PidMap>,
    counters: Mutex<EbpfStats>,
}

type PidMap = BpfHashMap<MapData, u32, u64>;

/// The eBPF attribution engine. Dropping it detaches the probe.
pub struct EbpfAttributor {
    shared: Arc<Shared>,
    ebpf: Mutex<Ebpf>,
    mount: Cgroup2Mount,
    task: JoinHandle<()>,
}

/// max_entries of a map, as the kernel reports it (a ring buffer's is its size
/// in bytes).
fn max_entries(map: &Map) -> Result<u32> {
    let data = match map {
        Map::LruHashMap(d) | Map::HashMap(d) | Map::RingBuf(d) => d,
        other => {
            return Err(ebpf_err(
                "probe object",
                format!("unexpected map {other:?}"),
            ));
        }
    };
    data.info()
        .map(|i| i.max_entries())
        .map_err(|e| ebpf_err("map info", e))
}

fn ebpf_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::EbpfUnavailable(format!("{what}: {e}"))
}

impl EbpfAttributor {
    /// Loads and attaches the probe with the default ring buffer, seeds from
    /// /proc and starts following events. Must run inside a tokio runtime.
    pub async fn start(grace: Duration) -> Result<Arc<Self>> {
        Self::start_with(grace, RingBufferSize::DEFAULT).await
    }

    /// [`EbpfAttributor::start`] with an event ring buffer of `ring` bytes.
    pub async fn start_with(grace: Duration, ring: RingBufferSize) -> Result<Arc<Self>> {
        let Some(probe) = PROBE else {
            return Err(Error::EbpfUnavailable(
                "this binary was built with GPU_SCALER_NO_EBPF=1 and has no probe embedded".into(),
            ));
        };
        raise_memlock_limit();
        let tracefs = tracefs::ensure_mounted()?;
        let offsets = tracefs::Formats::read(&tracefs)?.offsets()?;
        tracing::debug!(?offsets, tracefs = %tracefs.display(), "tracepoint offsets");
        let wakeup_at = gpu_scaler_common::wakeup_bytes(ring.bytes());
        let mut ebpf = EbpfLoader::new()
            .override_global("OFFSETS", &offsets, true)
            .override_global("WAKEUP_AT", &wakeup_at, true)
            .map_max_entries("EVENTS", ring.bytes())
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
        let ring = ebpf
            .take_map("EVENTS")
            .ok_or_else(|| ebpf_err("probe object", "no EVENTS map"))?;
        let ring_buffer_bytes = max_entries(&ring)?;
        let ring = RingBuf::try_from(ring).map_err(|e| ebpf_err("EVENTS", e))?;
        let pid_map = ebpf
            .take_map("PID_CGROUP")
            .ok_or_else(|| ebpf_err("probe object", "no PID_CGROUP map"))?;
        let pid_map_capacity = max_entries(&pid_map)?;
        let pid_map: PidMap =
            BpfHashMap::try_from(pid_map).map_err(|e| ebpf_err("PID_CGROUP", e))?;
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
            ring_buffer_bytes,
            "eBPF attribution attached"
        );
        let (watchers, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            tracker: RwLock::new(seeded),
            watchers,
            pid_map: Mutex::new(pid_map),
            counters: Mutex::new(EbpfStats {
                pid_map_capacity,
                ring_buffer_bytes,
                ..EbpfStats::default()
            }),
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
        let map = self.shared.pid_map.lock().expect("pid map poisoned");
        map.get(&pid, 0).ok()
    }

    /// Entries in the kernel's pid map (bounded by its LRU capacity), counted now.
    pub fn kernel_map_len(&self) -> usize {
        let capacity = self.counters().pid_map_capacity;
        let map = self.shared.pid_map.lock().expect("pid map poisoned");
        count_keys(&map, capacity) as usize
    }

    fn counters(&self) -> EbpfStats {
        *self.shared.counters.lock().expect("counters poisoned")
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

/// `pid`'s owner read from /proc/<pid>/cgroup now (`None`: no such process),
/// for a pid the tracker does not know; marked as procfs's answer.
pub fn resolve_from_proc(mount: &Cgroup2Mount, pid: u32) -> Option<Attribution> {
    let path = procfs::read_cgroup(pid)?;
    let info = CgroupInfo::new(mount.id_of(&path).unwrap_or(0), &path);
    Some(Attribution {
        cgroup_id: (info.id != 0).then_some(info.id),
        cgroup_path: info.path.clone(),
        owner: info.owner.clone(),
        backend: Backend::Procfs,
    })
}

impl Attributor for EbpfAttributor {
    fn resolve(&self, pid: u32) -> Option<Attribution> {
        let known = self
            .shared
            .tracker
            .read()
            .expect("tracker poisoned")
            .resolve(pid, Instant::now());
        if known.is_some() {
            return known;
        }
        // Not known to the tracker: a process whose events were lost (the
        // resync that follows is still to come) or that the probe has not
        // reported yet. The sampler asks only for the processes NVML lists,
        // a handful per GPU, so one read of /proc/<pid>/cgroup here is cheap;
        // without it the process's pod would read 0 (and be scaled away)
        // until the next resync. The answer is procfs's, and marked so.
        let found = resolve_from_proc(&self.mount, pid)?;
        self.shared
            .counters
            .lock()
            .expect("counters poisoned")
            .proc_lookups += 1;
        tracing::debug!(pid, cgroup = %found.cgroup_path, "pid unknown to the probe, resolved from /proc");
        Some(found)
    }

    fn backend(&self) -> Backend {
        Backend::Ebpf
    }

    fn stats(&self) -> Option<Stats> {
        let stats = self
            .shared
            .tracker
            .read()
            .expect("tracker poisoned")
            .stats();
        Some(Stats {
            ebpf: Some(self.counters()),
            ..stats
        })
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
    let mut count = tokio::time::interval(MAP_COUNT_EVERY);
    count.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            _ = count.tick() => count_pid_map(&shared),
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
                    // Apply what was queued before the loss first: replayed
                    // after the scan, those older events would undo it (a pid
                    // reused in the gap would get its old process's cgroup).
                    drain_ring(&shared, ring.get_mut(), &mount, &mut last_walk);
                    if resync(&shared, &mount).await {
                        seen_drops = dropped; // else: retried at the next tick
                    }
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
    let mut counted = EventCounts::default();
    for ev in &batch {
        let n = match ev {
            Event::Exec { .. } => &mut counted.exec,
            Event::Fork { .. } => &mut counted.fork,
            Event::Attach { .. } => &mut counted.attach,
            Event::Exit { .. } => &mut counted.exit,
            Event::Mkdir { .. } => &mut counted.cgroup_mkdir,
            Event::Rmdir { .. } => &mut counted.cgroup_rmdir,
        };
        *n += 1;
    }
    shared
        .counters
        .lock()
        .expect("counters poisoned")
        .events
        .add(&counted);
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

/// After lost events: re-read every process's cgroup and let the tracker
/// correct what differs ([`Tracker::resync`]). The caller has applied every
/// event queued before the loss; events queued during the scan are newer than
/// it and are applied after. `false` if /proc could not be read.
async fn resync(shared: &Arc<Shared>, mount: &Cgroup2Mount) -> bool {
    let mount = mount.clone();
    let scan = match tokio::task::spawn_blocking(move || scan_for_resync(&mount)).await {
        Ok(Ok(scan)) => scan,
        Ok(Err(error)) => {
            tracing::warn!(%error, "resync from /proc failed");
            return false;
        }
        Err(error) => {
            tracing::warn!(%error, "resync from /proc failed");
            return false;
        }
    };
    let done = shared
        .tracker
        .write()
        .expect("tracker poisoned")
        .resync(scan, Instant::now());
    shared.counters.lock().expect("counters poisoned").resyncs += 1;
    tracing::info!(
        started = done.started,
        exited = done.exited,
        forgotten = done.forgotten,
        "resynchronised from /proc"
    );
    true
}

/// Every process with its cgroup and threads, and the cgroup tree (walked
/// first, then completed with the cgroups of processes created after the walk).
fn scan_for_resync(mount: &Cgroup2Mount) -> Result<ProcScan> {
    let mut cgroups = mount.walk()?;
    let mut processes = Vec::new();
    let mut threads = Vec::new();
    for pid in procfs::pids()? {
        let Some(path) = procfs::read_cgroup(pid) else {
            continue; // exited meanwhile
        };
        threads.extend(
            procfs::tids(pid)
                .into_iter()
                .filter(|&tid| tid != pid)
                .map(|tid| (tid, pid)),
        );
        processes.push((pid, path));
    }
    let walked: HashSet<&str> = cgroups.iter().map(|(_, p)| p.as_str()).collect();
    let missing: HashSet<&str> = processes
        .iter()
        .map(|(_, p)| p.as_str())
        .filter(|p| !walked.contains(p))
        .collect();
    let found: Vec<(u64, String)> = missing
        .into_iter()
        .filter_map(|p| Some((mount.id_of(p)?, p.to_owned())))
        .collect();
    cgroups.extend(found);
    Ok(ProcScan {
        cgroups,
        processes,
        threads,
    })
}

/// Counts the kernel's pid map on the blocking pool, unless a count is still
/// running; the result is read by [`Attributor::stats`].
fn count_pid_map(shared: &Arc<Shared>) {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || {
        let Ok(map) = shared.pid_map.try_lock() else {
            return; // a count (or a diagnostic lookup) is running
        };
        let capacity = shared
            .counters
            .lock()
            .expect("counters poisoned")
            .pid_map_capacity;
        let n = count_keys(&map, capacity);
        drop(map);
        shared
            .counters
            .lock()
            .expect("counters poisoned")
            .pid_map_entries = Some(n);
    });
}

/// Distinct keys in the pid map. `BPF_MAP_GET_NEXT_KEY` restarts from the first
/// key when the key it is given was deleted meanwhile
/// (`htab_map_get_next_key` in kernel/bpf/hashtab.c), so under churn a walk can
/// see keys twice: count each once, and stop after twice the capacity.
fn count_keys(map: &PidMap, capacity: u32) -> u64 {
    let mut seen = HashSet::new();
    for key in map.keys().take(capacity as usize * 2) {
        match key {
            Ok(k) => {
                seen.insert(k);
            }
            Err(_) => break,
        }
    }
    seen.len() as u64
}

impl EventCounts {
    fn add(&mut self, o: &Self) {
        self.exec += o.exec;
        self.fork += o.fork;
        self.exit += o.exit;
        self.attach += o.attach;
        self.cgroup_mkdir += o.cgroup_mkdir;
        self.cgroup_rmdir += o.cgroup_rmdir;
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
    fn ring_buffer_sizes_are_power_of_two_pages() {
        let ok = |b| RingBufferSize::with_page_size(b, 4096).map(RingBufferSize::bytes);
        assert_eq!(ok(4096).unwrap(), 4096);
        assert_eq!(ok(1 << 20).unwrap(), 1 << 20);
        assert_eq!(ok(1 << 31).unwrap(), 1 << 31);
        for bad in [0, 1, 2048, 4095, 4097, 12288, 3 << 20, 1 << 32] {
            let e = ok(bad).expect_err("invalid size").to_string();
            assert!(e.contains("power-of-two multiple"), "{bad}: {e}");
        }
        let e = ok(12288).unwrap_err().to_string();
        assert!(e.contains("8KiB and 16KiB"), "{e}");
        let e = ok(2048).unwrap_err().to_string();
        assert!(e.contains("smallest is one page, 4KiB"), "{e}");
        // 64 KiB pages (arm64, ppc64): 4 KiB is too small there.
        assert!(RingBufferSize::with_page_size(4096, 65536).is_err());
        assert!(RingBufferSize::with_page_size(65536, 65536).is_ok());
    }

    #[test]
    fn ring_buffer_sizes_parse_with_binary_units() {
        let p = |s: &str| s.parse::<RingBufferSize>().map(RingBufferSize::bytes);
        assert_eq!(p("1048576").unwrap(), 1 << 20);
        assert_eq!(p("1MiB").unwrap(), 1 << 20);
        assert_eq!(p("1 M").unwrap(), 1 << 20);
        assert_eq!(p("64kib").unwrap(), 64 << 10);
        assert_eq!(p("1GiB").unwrap(), 1 << 30);
        assert_eq!(RingBufferSize::DEFAULT.to_string(), "1MiB");
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "-4096",
            "4096 bytes",
            "1MB",
            "99999999999GiB",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
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
