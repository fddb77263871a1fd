//! Real processes placed in cgroups.

use std::{
    ffi::CString,
    fs::OpenOptions,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Child, Command},
};

/// Spawns `cmd` inside the cgroup directory `cgroup`: the child moves itself
/// there (writes `0` to `cgroup.procs`) after fork and before exec, as a
/// container runtime does, so the exec happens in the cgroup.
pub fn spawn_in(cgroup: &Path, cmd: &mut Command) -> std::io::Result<Child> {
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .map_err(std::io::Error::other)?;
    // SAFETY: only async-signal-safe calls (open, write, close) between fork
    // and exec, on memory allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Spawns `make()`'s command in `cgroup` so that it gets pid `pid`, by
/// setting /proc/sys/kernel/ns_last_pid to `pid - 1` just before forking.
/// Other processes may take the pid first, so it retries; `None` if `pid`
/// could not be obtained (it must be free: the old process reaped).
///
/// Afterwards the counter is put back where it was, so the pids freed just
/// above `pid` (by a test's other exited processes) are not handed out again
/// at once to whatever the machine starts next.
pub fn spawn_with_pid(
    pid: u32,
    cgroup: &Path,
    make: impl FnMut() -> Command,
    attempts: usize,
) -> Option<Child> {
    const LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";
    let before: Option<u32> = std::fs::read_to_string(LAST_PID)
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let child = rewind_and_spawn(pid, cgroup, make, attempts);
    if let Some(before) = before {
        let now: u32 = std::fs::read_to_string(LAST_PID)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        // Only forward: never hand out pids below ones already allocated.
        if now < before {
            let _ = std::fs::write(LAST_PID, before.to_string());
        }
    }
    child
}

fn rewind_and_spawn(
    pid: u32,
    cgroup: &Path,
    mut make: impl FnMut() -> Command,
    attempts: usize,
) -> Option<Child> {
    let mut last_pid = OpenOptions::new()
        .write(true)
        .open("/proc/sys/kernel/ns_last_pid")
        .ok()?;
    for _ in 0..attempts {
        let mut cmd = make();
        last_pid.write_all(format!("{}", pid - 1).as_bytes()).ok()?;
        let mut child = spawn_in(cgroup, &mut cmd).ok()?;
        if child.id() == pid {
            return Some(child);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    None
}

/// The pids of `pid`'s direct children (needs CONFIG_PROC_CHILDREN).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let f = t.path().join("children");
            if let Ok(s) = std::fs::read_to_string(f) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// The thread ids of process `pid`.
pub fn threads(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
