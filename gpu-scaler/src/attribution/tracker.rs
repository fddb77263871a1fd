//! The attribution engine's state: pid -> cgroup, fed by lifecycle events (from the
//! probe, or from a /proc scan), answering lookups from memory.
//!
//! Rules that keep attribution honest:
//! - every exec or fork of a pid replaces whatever the pid meant before, so a
//!   reused pid never inherits the previous process's pod, even inside its grace;
//! - an exited process stays resolvable for `grace`, then is dropped; the queue of
//!   exits is bounded ([`MAX_EXITED`]), so churn cannot grow memory without limit;
//! - entries hold their cgroup by reference, so a pod's cgroup can be removed (as
//!   runtimes do right after the last process exits) and its exited pids still
//!   resolve to it during the grace period.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    Attribution, Backend,
    cgroup_tree::{CgroupInfo, CgroupTree},
};

/// Exited pids kept at most, whatever the grace period: beyond this the oldest
/// are dropped early (and counted), so a fork storm cannot exhaust memory.
pub const MAX_EXITED: usize = 65_536;

#[derive(Debug)]
struct PidEntry {
    cgroup: Arc<CgroupInfo>,
    /// When the process exited; `None` while it runs.
    exited_at: Option<Instant>,
    /// Distinguishes this process from an earlier one with the same pid in the
    /// exit queue.
    generation: u64,
}

/// Counters for diagnostics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Pids currently resolvable (running or inside the grace period).
    pub tracked_pids: usize,
    /// Of those, pids that have exited.
    pub exited_pids: usize,
    /// cgroups known by id.
    pub cgroups: usize,
    /// Exited pids dropped before their grace ended because of [`MAX_EXITED`].
    pub evicted_early: u64,
    /// Events lost in the kernel (ring buffer full), as the probe counts them.
    pub dropped_events: u64,
    /// Events referring to a cgroup that could not be found (already removed).
    pub unknown_cgroups: u64,
    /// The eBPF backend's event, resync and map counters; `None` for procfs.
    pub ebpf: Option<super::EbpfStats>,
}

/// A fresh look at /proc, taken after events were lost, for [`Tracker::resync`].
#[derive(Clone, Debug, Default)]
pub struct ProcScan {
    /// The cgroup v2 mount as walked before the processes were read, plus the
    /// cgroups of processes created after the walk.
    pub cgroups: Vec<(u64, String)>,
    /// Every process (tgid) that could be read, with its cgroup path.
    pub processes: Vec<(u32, String)>,
    /// `(tid, tgid)` of the other threads of those processes.
    pub threads: Vec<(u32, u32)>,
}

/// What [`Tracker::resync`] corrected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resynced {
    /// Pids placed in a cgroup they were not tracked in: appeared unseen, moved,
    /// or reused by a new process while events were lost.
    pub started: usize,
    /// Running pids that are gone from /proc, now marked exited.
    pub exited: usize,
    /// Pids dropped because their cgroup could not be found (never the old owner).
    pub forgotten: usize,
}

/// What an event did to a pid, for watchers.
#[derive(Clone, Debug)]
pub enum Change {
    /// The pid now runs in this cgroup.
    Started(Arc<CgroupInfo>),
    /// The pid exited from this cgroup.
    Exited(Arc<CgroupInfo>),
    /// The pid is no longer known (its new cgroup could not be found).
    Forgotten,
    None,
}

/// The pid and cgroup tables. Not synchronised: the engine wraps it in a lock.
#[derive(Debug)]
pub struct Tracker {
    pids: HashMap<u32, PidEntry>,
    exits: VecDeque<(Instant, u32, u64)>,
    cgroups: CgroupTree,
    grace: Duration,
    backend: Backend,
    next_generation: u64,
    stats: Stats,
}

impl Tracker {
    pub fn new(cgroups: CgroupTree, grace: Duration, backend: Backend) -> Self {
        Self {
            pids: HashMap::new(),
            exits: VecDeque::new(),
            cgroups,
            grace,
            backend,
            next_generation: 0,
            stats: Stats::default(),
        }
    }

    pub fn cgroups(&self) -> &CgroupTree {
        &self.cgroups
    }

    pub fn cgroups_mut(&mut self) -> &mut CgroupTree {
        &mut self.cgroups
    }

    /// `pid` runs in cgroup `cgroup_id` from now on (exec, fork, or seen in /proc).
    /// An unknown cgroup forgets the pid rather than keep a stale owner.
    pub fn start(&mut self, pid: u32, cgroup_id: u64) -> Change {
        let Some(cgroup) = self.cgroups.get(cgroup_id).cloned() else {
            self.stats.unknown_cgroups += 1;
            return match self.pids.remove(&pid) {
                Some(_) => Change::Forgotten,
                None => Change::None,
            };
        };
        self.start_in(pid, cgroup)
    }

    /// Like [`Tracker::start`] with the cgroup already looked up.
    pub fn start_in(&mut self, pid: u32, cgroup: Arc<CgroupInfo>) -> Change {
        self.next_generation += 1;
        self.pids.insert(
            pid,
            PidEntry {
                cgroup: cgroup.clone(),
                exited_at: None,
                generation: self.next_generation,
            },
        );
        Change::Started(cgroup)
    }

    /// Seeds a pid found in /proc unless an event already told us about it (an
    /// event is newer than a scan that raced with it).
    pub fn seed(&mut self, pid: u32, cgroup: Arc<CgroupInfo>) {
        if !self.pids.contains_key(&pid) {
            self.start_in(pid, cgroup);
        }
    }

    /// The process `pid` exited at `now`; it stays resolvable for the grace period.
    pub fn exit(&mut self, pid: u32, now: Instant) -> Change {
        let Some(entry) = self.pids.get_mut(&pid) else {
            return Change::None;
        };
        if entry.exited_at.is_some() {
            return Change::None;
        }
        entry.exited_at = Some(now);
        self.exits.push_back((now, pid, entry.generation));
        let change = Change::Exited(entry.cgroup.clone());
        while self.exits.len() > MAX_EXITED {
            if let Some((_, pid, generation)) = self.exits.pop_front()
                && self.drop_if_exited(pid, generation)
            {
                self.stats.evicted_early += 1;
            }
        }
        change
    }

    /// A thread (not a process) ended: its tid entry, made by its clone event,
    /// goes at once. Samples name processes, so there is nothing to keep.
    pub fn thread_exit(&mut self, tid: u32) {
        if self.pids.get(&tid).is_some_and(|e| e.exited_at.is_none()) {
            self.pids.remove(&tid);
        }
    }

    /// Drops exited pids whose grace period is over.
    pub fn sweep(&mut self, now: Instant) {
        while let Some(&(at, pid, generation)) = self.exits.front() {
            if now.saturating_duration_since(at) < self.grace {
                break;
            }
            self.exits.pop_front();
            self.drop_if_exited(pid, generation);
        }
    }

    fn drop_if_exited(&mut self, pid: u32, generation: u64) -> bool {
        match self.pids.get(&pid) {
            Some(e) if e.generation == generation && e.exited_at.is_some() => {
                self.pids.remove(&pid);
                true
            }
            _ => false,
        }
    }

    /// Marks as exited every running pid that `alive` says is gone (used after
    /// events were lost, with a fresh /proc scan as `alive`). Returns how many.
    pub fn reconcile(&mut self, alive: impl Fn(u32) -> bool, now: Instant) -> usize {
        let gone: Vec<u32> = self
            .pids
            .iter()
            .filter(|(pid, e)| e.exited_at.is_none() && !alive(**pid))
            .map(|(pid, _)| *pid)
            .collect();
        for &pid in &gone {
            self.exit(pid, now);
        }
        gone.len()
    }

    /// Brings the table in line with `scan` after the kernel lost events: what
    /// happened in the gap is unknown, so /proc is the truth. A pid that exited
    /// is marked exited (it keeps its own owner for the grace period); a pid
    /// that appeared, moved, or was reused by a new process is placed where it
    /// is now, as a new process; a pid whose cgroup cannot be found is dropped
    /// rather than left with an owner that may be another process's.
    ///
    /// Threads are placed in their process's cgroup (the same one, outside
    /// cgroup v2 threaded subtrees) and only when already tracked, as the
    /// start-up seed does not track threads either.
    pub fn resync(&mut self, scan: ProcScan, now: Instant) -> Resynced {
        let mut out = Resynced::default();
        self.cgroups.merge(scan.cgroups);
        let alive: HashSet<u32> = scan
            .processes
            .iter()
            .map(|(pid, _)| *pid)
            .chain(scan.threads.iter().map(|(tid, _)| *tid))
            .collect();
        out.exited = self.reconcile(|pid| alive.contains(&pid), now);
        let path_of: HashMap<u32, &str> = scan
            .processes
            .iter()
            .map(|(pid, path)| (*pid, path.as_str()))
            .collect();
        let threads = scan
            .threads
            .iter()
            .filter(|(tid, _)| self.pids.contains_key(tid))
            .filter_map(|(tid, tgid)| Some((*tid, *path_of.get(tgid)?)));
        let places: Vec<(u32, Option<Arc<CgroupInfo>>)> = scan
            .processes
            .iter()
            .map(|(pid, path)| (*pid, path.as_str()))
            .chain(threads)
            .map(|(pid, path)| (pid, self.cgroups.by_path(path).cloned()))
            .collect();
        for (pid, cgroup) in places {
            match cgroup {
                Some(cgroup) => {
                    let same = self
                        .pids
                        .get(&pid)
                        .is_some_and(|e| e.exited_at.is_none() && e.cgroup.id == cgroup.id);
                    if !same {
                        self.start_in(pid, cgroup);
                        out.started += 1;
                    }
                }
                None => {
                    if self.pids.remove(&pid).is_some() {
                        out.forgotten += 1;
                    }
                }
            }
        }
        out
    }

    /// The owner of `pid` as of `now`. O(1), no I/O.
    pub fn resolve(&self, pid: u32, now: Instant) -> Option<Attribution> {
        let entry = self.pids.get(&pid)?;
        if let Some(at) = entry.exited_at
            && now.saturating_duration_since(at) >= self.grace
        {
            return None;
        }
        Some(Attribution {
            cgroup_id: Some(entry.cgroup.id),
            cgroup_path: entry.cgroup.path.clone(),
            owner: entry.cgroup.owner.clone(),
            backend: self.backend,
        })
    }

    /// Whether `pid` is tracked as running (not exited).
    pub fn is_running(&self, pid: u32) -> bool {
        self.pids.get(&pid).is_some_and(|e| e.exited_at.is_none())
    }

    pub fn stats(&self) -> Stats {
        Stats {
            tracked_pids: self.pids.len(),
            exited_pids: self.pids.values().filter(|e| e.exited_at.is_some()).count(),
            cgroups: self.cgroups.len(),
            ..self.stats
        }
    }

    pub fn set_dropped_events(&mut self, n: u64) {
        self.stats.dropped_events = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Owner;

    const A: &str = "/kubepods/pod7b5b4c2e-1f4a-4d3e-9c8b-0a1b2c3d4e5f/4f2a9c0d1e3b5a7c9e1f3a5b";
    const B: &str = "/kubepods/burstable/pod11111111-2222-3333-4444-555555555555/aaaaaaaaaaaaaaaa";

    fn tracker(grace: Duration) -> Tracker {
        let tree = CgroupTree::from_walk(vec![(1, "/".into()), (10, A.into()), (20, B.into())]);
        Tracker::new(tree, grace, Backend::Ebpf)
    }

    fn pod_of(t: &Tracker, pid: u32, now: Instant) -> Option<String> {
        t.resolve(pid, now).map(|a| match a.owner {
            Owner::Pod(p) => p.pod_uid,
            Owner::Host => "host".into(),
        })
    }

    #[test]
    fn exited_pid_resolves_within_grace_then_is_gone() {
        let mut t = tracker(Duration::from_secs(30));
        let t0 = Instant::now();
        t.start(100, 10);
        t.exit(100, t0);
        let uid = Some("7b5b4c2e-1f4a-4d3e-9c8b-0a1b2c3d4e5f".to_string());
        assert_eq!(pod_of(&t, 100, t0 + Duration::from_secs(29)), uid);
        assert_eq!(pod_of(&t, 100, t0 + Duration::from_secs(30)), None);
        t.sweep(t0 + Duration::from_secs(31));
        assert_eq!(t.stats().tracked_pids, 0);
    }

    #[test]
    fn reused_pid_never_inherits_the_old_pod() {
        let mut t = tracker(Duration::from_secs(30));
        let t0 = Instant::now();
        t.start(100, 10);
        t.exit(100, t0);
        t.start(100, 20); // same pid, new process in pod B, inside A's grace
        let b = Some("11111111-2222-3333-4444-555555555555".to_string());
        assert_eq!(pod_of(&t, 100, t0), b);
        // The old exit's sweep must not drop the new process.
        t.sweep(t0 + Duration::from_secs(60));
        assert_eq!(pod_of(&t, 100, t0 + Duration::from_secs(60)), b);
    }

    #[test]
    fn reuse_into_an_unknown_cgroup_forgets_the_old_owner() {
        let mut t = tracker(Duration::from_secs(30));
        t.start(100, 10);
        t.exit(100, Instant::now());
        assert!(matches!(t.start(100, 999), Change::Forgotten));
        assert!(t.resolve(100, Instant::now()).is_none());
        assert_eq!(t.stats().unknown_cgroups, 1);
    }

    #[test]
    fn removed_cgroup_still_resolves_for_exited_pids() {
        let mut t = tracker(Duration::from_secs(30));
        let now = Instant::now();
        t.start(5, 20);
        t.exit(5, now);
        t.cgroups_mut().remove(20);
        let a = t.resolve(5, now).expect("inside grace");
        assert_eq!(&*a.cgroup_path, B);
        assert_eq!(a.cgroup_id, Some(20));
    }

    #[test]
    fn seed_does_not_override_events() {
        let mut t = tracker(Duration::from_secs(30));
        t.start(7, 20);
        let a = t.cgroups().get(10).unwrap().clone();
        t.seed(7, a);
        assert_eq!(t.resolve(7, Instant::now()).unwrap().cgroup_id, Some(20));
    }

    #[test]
    fn thread_exit_forgets_the_tid_at_once() {
        let mut t = tracker(Duration::from_secs(30));
        t.start(50, 10);
        t.start(51, 10); // a thread of 50
        t.thread_exit(51);
        assert!(t.resolve(51, Instant::now()).is_none());
        assert!(t.resolve(50, Instant::now()).is_some());
    }

    #[test]
    fn exit_queue_is_bounded() {
        let mut t = tracker(Duration::from_secs(3600));
        let now = Instant::now();
        for pid in 0..(MAX_EXITED as u32 + 10) {
            t.start(pid, 10);
            t.exit(pid, now);
        }
        let s = t.stats();
        assert_eq!(s.tracked_pids, MAX_EXITED);
        assert_eq!(s.evicted_early, 10);
        assert!(t.resolve(0, now).is_none(), "oldest evicted");
    }

    #[test]
    fn reconcile_marks_vanished_pids_exited() {
        let mut t = tracker(Duration::from_millis(10));
        let now = Instant::now();
        t.start(1, 10);
        t.start(2, 10);
        t.reconcile(|pid| pid == 1, now);
        assert!(t.is_running(1));
        assert!(!t.is_running(2));
        assert!(t.resolve(2, now + Duration::from_millis(20)).is_none());
    }

    const C: &str = "/kubepods/besteffort/pod99999999-8888-7777-6666-555555555555/cccccccccccc";

    fn scan(processes: &[(u32, &str)], threads: &[(u32, u32)]) -> ProcScan {
        ProcScan {
            cgroups: vec![(1, "/".into()), (10, A.into()), (20, B.into())],
            processes: processes.iter().map(|(p, c)| (*p, c.to_string())).collect(),
            threads: threads.to_vec(),
        }
    }

    #[test]
    fn resync_after_lost_events_trusts_proc() {
        let grace = Duration::from_secs(30);
        let mut t = tracker(grace);
        let t0 = Instant::now();
        let a = Some("7b5b4c2e-1f4a-4d3e-9c8b-0a1b2c3d4e5f".to_string());
        let b = Some("11111111-2222-3333-4444-555555555555".to_string());
        t.start(1, 10); // keeps running in A, unchanged
        t.start(2, 10); // exits in the gap
        t.start(3, 10); // exits in the gap, its pid reused by a process in B
        t.start(4, 10); // moved to B in the gap (attach lost)
        t.start(5, 10); // reused in the gap by a process in a cgroup not yet known
        t.start(60, 10); // a thread of 1
        t.start(61, 10); // a thread of 1 that ended in the gap
        t.start(7, 20); // exited before the gap, in grace
        t.exit(7, t0);
        let before = t.resolve(1, t0).expect("1 tracked").cgroup_id;
        // Pid 8 appeared in the gap; 7 was reused by a new process in A.
        let mut s = scan(
            &[(1, A), (3, B), (4, B), (5, C), (7, A), (8, B)],
            &[(60, 1), (62, 1)],
        );
        s.cgroups.push((30, C.into()));
        let now = t0 + Duration::from_secs(1);
        let r = t.resync(s, now);
        assert_eq!(pod_of(&t, 1, now), a);
        assert_eq!(t.resolve(1, now).unwrap().cgroup_id, before);
        assert!(t.is_running(1));
        // Exited in the gap: its own pod for the grace period, then gone.
        assert!(!t.is_running(2));
        assert_eq!(pod_of(&t, 2, now), a);
        t.sweep(now + grace);
        assert_eq!(pod_of(&t, 2, now + grace), None);
        // Reused: the new process's pod, never the old one's.
        assert_eq!(pod_of(&t, 3, now), b);
        assert!(t.is_running(3));
        assert_eq!(pod_of(&t, 4, now), b);
        assert_eq!(
            pod_of(&t, 5, now),
            Some("99999999-8888-7777-6666-555555555555".to_string())
        );
        assert_eq!(pod_of(&t, 7, now), a);
        assert!(t.is_running(7));
        assert_eq!(pod_of(&t, 8, now), b);
        // Threads: a tracked live one stays, an ended one exits, an untracked
        // one is not added.
        assert!(t.is_running(60));
        assert!(!t.is_running(61));
        assert!(t.resolve(62, now).is_none());
        assert_eq!(
            r,
            Resynced {
                started: 5, // 3, 4, 5, 7, 8
                exited: 2,  // 2, 61
                forgotten: 0
            }
        );
    }

    #[test]
    fn resync_forgets_a_pid_whose_cgroup_is_unknown() {
        let mut t = tracker(Duration::from_secs(30));
        let now = Instant::now();
        t.start(3, 10);
        t.exit(3, now);
        // Reused in the gap by a process in a cgroup already removed again.
        let r = t.resync(scan(&[(3, "/gone/pod-less")], &[]), now);
        assert_eq!(r.forgotten, 1);
        assert!(t.resolve(3, now).is_none(), "never the old owner");
    }
}
