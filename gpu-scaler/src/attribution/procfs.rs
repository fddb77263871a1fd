//! The procfs backend: reads `/proc/<pid>/cgroup` on demand. It is the fallback
//! when BPF cannot load and the oracle the eBPF backend is tested against; its
//! /proc readers also seed the eBPF engine at start-up.

use std::{
    collections::HashMap,
    fs,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use super::{
    Attribution, Attributor, Backend, Result,
    cgroup_tree::{Cgroup2Mount, CgroupInfo},
    tracker::Stats,
};

/// The cgroup v2 path of a process from the text of `/proc/<pid>/cgroup`: the
/// `0::<path>` line. `None` when the process is in no v2 cgroup (or the text is
/// not a cgroup file).
pub fn v2_path(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .filter(|p| p.starts_with('/'))
}

/// The cgroup v2 path of `pid`, or `None` if the process is gone or has none.
pub fn read_cgroup(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    v2_path(&text).map(str::to_owned)
}

/// Every process (tgid) in /proc.
pub fn pids() -> Result<Vec<u32>> {
    let rd = fs::read_dir("/proc").map_err(|source| super::Error::Io {
        path: "/proc".into(),
        source,
    })?;
    Ok(rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

/// The thread ids of process `pid` (empty if it is gone).
pub fn tids(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `comm` of a process, if it still exists.
pub fn comm(pid: u32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_owned())
}

/// Start time of a process in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`): with the pid, it names one process across pid reuse.
///
/// Read on every lookup, so read lean: one `read` into a stack buffer, where
/// `std::fs::read_to_string` would ask for the size (procfs says 0), probe
/// and grow through several reads, each a syscall procfs answers.
pub fn start_time(pid: u32) -> Option<u64> {
    use std::io::Read as _;
    // A stat line is 52 numbers and a comm of at most 16 bytes: well under 1 KiB.
    let mut buf = [0u8; 2048];
    let mut file = fs::File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut len = 0;
    // seq_file hands the whole line to the first read that has room for it;
    // the loop only matters if it ever does not.
    while len < buf.len() && !buf[..len].ends_with(b"\n") {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    parse_start_time(&buf[..len])
}

/// Field 22 of a stat line. `comm` (field 2) may hold spaces, parentheses and
/// bytes that are not UTF-8, so fields are counted from its last `)`.
fn parse_start_time(stat: &[u8]) -> Option<u64> {
    let after = &stat[stat.iter().rposition(|&b| b == b')')? + 1..];
    // after ")" come fields 3.. ; starttime is field 22 -> index 19 here.
    let field = after
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .nth(19)?;
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// How long a cached cgroup is trusted for a live process before
/// `/proc/<pid>/cgroup` is read again: bounds how late a process moved to
/// another cgroup without exec is seen (the eBPF backend sees it at once).
pub const RECHECK: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct PidCache {
    pids: HashMap<u32, Cached>,
    last_sweep: Instant,
}

#[derive(Debug)]
struct Cached {
    attribution: Attribution,
    /// Start time of the process the attribution is of: a pid with another
    /// start time is a new process and never gets this answer.
    start_time: u64,
    /// When `/proc/<pid>/cgroup` was last read for it.
    read_at: Instant,
    /// When the pid was first found gone.
    gone_since: Option<Instant>,
}

/// Resolves pids by reading /proc when asked. Remembers the last answer per
/// process (pid and start time) so a live process costs one read of
/// `/proc/<pid>/stat` per lookup rather than three reads, its cgroup being
/// read again every [`RECHECK`], and a pid that exited is still resolvable for
/// the grace period; a pid whose start time changed is a new process and
/// never gets the old answer.
pub struct ProcfsAttributor {
    mount: Option<Cgroup2Mount>,
    grace: Duration,
    recheck: Duration,
    cache: Mutex<PidCache>,
    cgroups: Mutex<HashMap<String, Arc<CgroupInfo>>>,
}

impl ProcfsAttributor {
    pub fn new(grace: Duration) -> Self {
        Self::with_recheck(grace, RECHECK)
    }

    /// As [`Self::new`], trusting a cached cgroup for `recheck`.
    pub fn with_recheck(grace: Duration, recheck: Duration) -> Self {
        let mount = match Cgroup2Mount::discover() {
            Ok(m) => Some(m),
            Err(error) => {
                tracing::warn!(%error, "no cgroup v2 mount: cgroup ids will be unknown");
                None
            }
        };
        Self {
            mount,
            grace,
            recheck,
            cache: Mutex::new(PidCache {
                pids: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            cgroups: Mutex::new(HashMap::new()),
        }
    }

    fn info(&self, path: &str) -> Arc<CgroupInfo> {
        let mut cgroups = self.cgroups.lock().expect("cgroup cache poisoned");
        if let Some(info) = cgroups.get(path) {
            return info.clone();
        }
        let id = self.mount.as_ref().and_then(|m| m.id_of(path)).unwrap_or(0);
        let info = Arc::new(CgroupInfo::new(id, path));
        // Bounded: cgroup paths are few, but a long-running daemon sees many pods.
        if cgroups.len() > 16_384 {
            cgroups.clear();
        }
        cgroups.insert(path.to_owned(), info.clone());
        info
    }

    /// The cgroup of the process `pid` that started at `start`; `None` if
    /// that process is gone.
    fn read(&self, pid: u32, start: u64) -> Option<Attribution> {
        let path = read_cgroup(pid)?;
        // Read the start time again: if the pid was reused between the two reads,
        // the cgroup may be the new process's.
        if start_time(pid)? != start {
            return None;
        }
        let info = self.info(&path);
        Some(Attribution {
            cgroup_id: (info.id != 0).then_some(info.id),
            cgroup_path: info.path.clone(),
            owner: info.owner.clone(),
            backend: Backend::Procfs,
        })
    }
}

impl Attributor for ProcfsAttributor {
    fn resolve(&self, pid: u32) -> Option<Attribution> {
        let now = Instant::now();
        let start = start_time(pid);
        {
            let mut cache = self.cache.lock().expect("pid cache poisoned");
            // Forget processes gone for longer than the grace period, once a
            // second rather than on every lookup.
            if now.duration_since(cache.last_sweep) >= Duration::from_secs(1) {
                cache.last_sweep = now;
                let grace = self.grace;
                cache
                    .pids
                    .retain(|_, c| c.gone_since.is_none_or(|g| now.duration_since(g) < grace));
            }
            if let (Some(start), Some(c)) = (start, cache.pids.get(&pid))
                && c.start_time == start
                && c.gone_since.is_none()
                && now.duration_since(c.read_at) < self.recheck
            {
                return Some(c.attribution.clone());
            }
        }
        // A new process, a cgroup due for a re-read, or a pid that is gone:
        // read /proc without holding the cache.
        let fresh = start.and_then(|s| Some((s, self.read(pid, s)?)));
        let mut cache = self.cache.lock().expect("pid cache poisoned");
        match fresh {
            Some((start_time, attribution)) => {
                cache.pids.insert(
                    pid,
                    Cached {
                        attribution: attribution.clone(),
                        start_time,
                        read_at: now,
                        gone_since: None,
                    },
                );
                Some(attribution)
            }
            None => {
                let cached = cache.pids.get_mut(&pid)?;
                // The pid names another process now: the old answer is not its.
                if start.is_some_and(|s| s != cached.start_time) {
                    cache.pids.remove(&pid);
                    return None;
                }
                let gone_since = *cached.gone_since.get_or_insert(now);
                (now.duration_since(gone_since) < self.grace).then(|| cached.attribution.clone())
            }
        }
    }

    fn backend(&self) -> Backend {
        Backend::Procfs
    }

    fn stats(&self) -> Option<Stats> {
        let cache = self.cache.lock().expect("pid cache poisoned");
        Some(Stats {
            tracked_pids: cache.pids.len(),
            exited_pids: cache
                .pids
                .values()
                .filter(|c| c.gone_since.is_some())
                .count(),
            cgroups: self.cgroups.lock().expect("cgroup cache poisoned").len(),
            ..Stats::default()
        })
    }
}

impl std::fmt::Debug for ProcfsAttributor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcfsAttributor")
            .field("mount", &self.mount)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::Owner;

    #[test]
    fn v2_line_of_a_hybrid_host() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/kubepods/pod1/abc\n";
        assert_eq!(v2_path(text), Some("/kubepods/pod1/abc"));
        assert_eq!(v2_path("4:memory:/x\n"), None);
        assert_eq!(v2_path("0::garbage\n"), None);
        assert_eq!(v2_path(""), None);
    }

    #[test]
    fn start_time_survives_odd_comms() {
        let stat = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat.as_bytes()), Some(987654));
        assert_eq!(parse_start_time(b"42 (x) S 1"), None);
        assert_eq!(parse_start_time(b"no paren"), None);
        // A comm that is not UTF-8 (a process may name itself anything).
        let mut odd = b"42 (\xff\xfe) ".to_vec();
        odd.extend_from_slice(b"S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 555 1000 10\n");
        assert_eq!(parse_start_time(&odd), Some(555));
    }

    #[test]
    fn start_time_of_this_process_matches_its_stat_file() {
        let me = std::process::id();
        let text = fs::read(format!("/proc/{me}/stat")).expect("own stat");
        let expected = parse_start_time(&text).expect("parses");
        assert_eq!(start_time(me), Some(expected));
        assert_eq!(start_time(u32::MAX), None, "no such process");
    }

    #[test]
    fn resolves_this_process_and_remembers_it() {
        let a = ProcfsAttributor::new(Duration::from_secs(30));
        let me = std::process::id();
        let got = a.resolve(me).expect("own pid resolves");
        assert_eq!(got.backend, Backend::Procfs);
        let expected = read_cgroup(me).expect("own cgroup");
        assert_eq!(&*got.cgroup_path, expected);
        let owner = crate::attribution::cgroup_path::parse(&expected).unwrap_or(Owner::Host);
        assert_eq!(got.owner, owner);
        assert!(a.resolve(u32::MAX).is_none());
    }

    #[test]
    fn exited_process_is_remembered_for_the_grace_period_only() {
        let a = ProcfsAttributor::new(Duration::from_millis(300));
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let live = a.resolve(pid).expect("live child resolves");
        child.wait().expect("wait");
        assert_eq!(a.resolve(pid), Some(live), "inside the grace period");
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(a.resolve(pid), None, "after the grace period");
    }

    /// A `sleep` child of this test, killed and reaped when dropped (also
    /// when an assertion fails first).
    struct Sleeper(std::process::Child);

    impl Sleeper {
        fn start() -> Self {
            Self(
                std::process::Command::new("sleep")
                    .arg("5")
                    .spawn()
                    .expect("spawn sleep"),
            )
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Rewrites the cached answer for `pid` as if it had been read earlier
    /// for a process that started at `start_time` in cgroup `path`.
    fn plant(a: &ProcfsAttributor, pid: u32, start_time: u64, path: &str) {
        let mut cache = a.cache.lock().expect("pid cache");
        let c = cache.pids.get_mut(&pid).expect("pid cached");
        c.start_time = start_time;
        c.attribution.cgroup_path = path.into();
    }

    #[test]
    fn a_live_process_is_answered_from_the_cache_until_the_recheck() {
        let a = ProcfsAttributor::with_recheck(Duration::from_secs(30), Duration::from_millis(300));
        let child = Sleeper::start();
        let pid = child.pid();
        let real = a.resolve(pid).expect("live child resolves");
        let start = start_time(pid).expect("start time");
        // Same process (same start time): the cached cgroup is the answer,
        // /proc/<pid>/cgroup is not read again.
        plant(&a, pid, start, "/cached");
        assert_eq!(
            &*a.resolve(pid).expect("cached").cgroup_path,
            "/cached",
            "inside the recheck period"
        );
        // After the recheck period the cgroup is read again.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(
            a.resolve(pid),
            Some(real.clone()),
            "re-read after the recheck"
        );
        drop(child);
    }

    #[test]
    fn a_pid_with_another_start_time_never_gets_the_cached_answer() {
        let a = ProcfsAttributor::with_recheck(Duration::from_secs(30), Duration::from_secs(3600));
        let child = Sleeper::start();
        let pid = child.pid();
        let real = a.resolve(pid).expect("live child resolves");
        let start = start_time(pid).expect("start time");
        // As if the cached answer were of an earlier process with this pid.
        plant(&a, pid, start.wrapping_sub(1), "/earlier-process");
        assert_eq!(a.resolve(pid), Some(real), "the live process's own cgroup");
        drop(child);
        // Gone now: the grace period answers with the last process's cgroup,
        // never the earlier one's.
        assert_ne!(
            a.resolve(pid).map(|x| x.cgroup_path),
            Some("/earlier-process".into())
        );
    }
}
