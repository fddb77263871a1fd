//! The eBPF backend: loads the embedded probe with this kernel's tracepoint
//! offsets, seeds the [`Tracker`] from /proc, and follows the probe's ring buffer.
//!
//! Start-up order matters: the probe is attached before the cgroup walk and the
//! /proc scan, so nothing that happens during the scan is missed; events queued
//! meanwhile are applied afterwards and, being newer, win over the scan.
//!
//! This module is the engine ([`EbpfAttributor`]: start-up, the seed from /proc,
//! lookups, stats); its parts are in `loader` (the probe and its maps),
//! `follow` (the event loop), `record` (ring buffer records decoded) and
//! `ring_size` ([`RingBufferSize`]).

mod follow;
mod loader;
mod record;
mod ring_size;

pub use loader::{PID_MAP_CAPACITY, probe_embedded};
pub use record::{Event, WatchEvent, WatchKind, decode};
pub use ring_size::RingBufferSize;

use std::{
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use aya::Ebpf;
use tokio::{io::unix::AsyncFd, sync::broadcast, task::JoinHandle};

use super::{
    Attribution, Attributor, Backend, Error, Result,
    cgroup_tree::{Cgroup2Mount, CgroupInfo, CgroupTree},
    procfs,
    tracker::{Stats, Tracker},
};
use loader::PidMap;

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

/// What the engine and its follow task share.
struct Shared {
    tracker: RwLock<Tracker>,
    watchers: broadcast::Sender<WatchEvent>,
    /// Taken out of the `Ebpf` so the follow task can count it.
    pid_map: Mutex<PidMap>,
    counters: Mutex<EbpfStats>,
}

/// The eBPF attribution engine. Dropping it detaches the probe.
pub struct EbpfAttributor {
    shared: Arc<Shared>,
    ebpf: Mutex<Ebpf>,
    mount: Cgroup2Mount,
    task: JoinHandle<()>,
}

impl EbpfAttributor {
    /// Loads and attaches the probe with the default ring buffer, seeds from
    /// /proc and starts following events. Must run inside a tokio runtime.
    pub async fn start(grace: Duration) -> Result<Arc<Self>> {
        Self::start_with(grace, RingBufferSize::DEFAULT).await
    }

    /// [`EbpfAttributor::start`] with an event ring buffer of `ring` bytes.
    pub async fn start_with(grace: Duration, ring: RingBufferSize) -> Result<Arc<Self>> {
        let loader::Loaded {
            ebpf,
            ring,
            ring_buffer_bytes,
            pid_map,
            pid_map_capacity,
            drops,
        } = loader::load(ring)?;

        let mount = Cgroup2Mount::discover()?;
        let seeded = {
            let mount = mount.clone();
            tokio::task::spawn_blocking(move || seed(&mount, grace))
                .await
                .map_err(|source| Error::Task {
                    what: "seeding",
                    source,
                })??
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
                source: e.into_parts().1,
            })?;
        let task = tokio::spawn(follow::follow(shared.clone(), ring, drops, mount.clone()));
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
        follow::count_keys(&map, capacity) as usize
    }

    fn counters(&self) -> EbpfStats {
        *self.shared.counters.lock().expect("counters poisoned")
    }

    /// Per attached program: (name, runs, total time in the program). The kernel
    /// counts these only while BPF run-time statistics are enabled (the
    /// benchmark enables them with `aya::sys::enable_stats`).
    pub fn program_stats(&self) -> Vec<(&'static str, u64, Duration)> {
        loader::program_stats(&self.ebpf.lock().expect("ebpf poisoned"))
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
