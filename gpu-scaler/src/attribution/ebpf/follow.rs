//! Following the probe: the task that drains the ring buffer (on wakeups and on
//! a short timer), applies events to the
//! [`Tracker`](crate::attribution::tracker::Tracker) in batches, moves the
//! threads of a migrated process, sweeps exited pids, resynchronises from /proc
//! when the probe reports lost events, and counts the kernel's pid map for the
//! stats. It owns no BPF setup: the maps it reads come from the loader.

use std::{
    collections::HashSet,
    os::fd::AsRawFd as _,
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray, RingBuf};
use gpu_scaler_common::DROP_RING_FULL;
use tokio::io::unix::AsyncFd;

use super::{
    super::{
        Result,
        cgroup_tree::Cgroup2Mount,
        procfs,
        tracker::{Change, ProcScan},
    },
    EventCounts, Shared,
    loader::PidMap,
    record::{Event, WatchEvent, WatchKind, comm_str, decode},
};

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

/// The event loop: drains the ring buffer, sweeps exited pids, and resynchronises
/// from /proc when the probe reports lost events.
pub(super) async fn follow(
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
/// correct what differs
/// ([`Tracker::resync`](crate::attribution::tracker::Tracker::resync)). The
/// caller has applied every event queued before the loss; events queued during
/// the scan are newer than it and are applied after. `false` if /proc could not
/// be read.
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
/// running; the result is read by
/// [`Attributor::stats`](crate::attribution::Attributor::stats).
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
pub(super) fn count_keys(map: &PidMap, capacity: u32) -> u64 {
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
