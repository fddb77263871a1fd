//! `gpu-scaler serve` as a real process, for the end-to-end tests: started
//! from the workspace binary, its log kept in a file (printed when a test
//! fails), readiness read from its /readyz, SIGKILLed when dropped.

use std::{
    ffi::OsStr,
    fs::OpenOptions,
    io::Read as _,
    net::{IpAddr, SocketAddr, TcpListener},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{wait_for, workspace_bin};

/// How long a daemon may take to become ready (eBPF load and /proc seed on a
/// loaded CI machine included).
pub const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running `gpu-scaler serve`.
pub struct ServeProcess {
    child: Child,
    /// Names the daemon in panics and log dumps.
    name: String,
    log: PathBuf,
}

impl ServeProcess {
    /// Starts `gpu-scaler serve ARGS`, its stderr appended to `log` (so a
    /// restart adds to the same file), `RUST_LOG=info` without colours.
    pub fn spawn<S: AsRef<OsStr>>(
        name: &str,
        args: impl IntoIterator<Item = S>,
        log: &Path,
    ) -> Self {
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let mut cmd = Command::new(workspace_bin("gpu-scaler"));
        cmd.arg("serve")
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe. If the test binary dies without
        // unwinding (killed by a harness timeout), the daemon dies with it
        // instead of keeping its eBPF probe loaded.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Self {
            child: cmd
                .spawn()
                .unwrap_or_else(|e| panic!("start gpu-scaler serve for {name}: {e}")),
            name: name.to_owned(),
            log: log.to_owned(),
        }
    }

    /// Waits until GET /readyz on `http` answers 200; panics if the daemon
    /// exits first or takes longer than [`READY_WITHIN`].
    pub fn wait_ready(&mut self, http: SocketAddr) {
        let ready = wait_for(READY_WITHIN, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{}: gpu-scaler serve exited during start-up: {status}",
                    self.name
                );
            }
            http_get(http, "/readyz")
                .is_some_and(|(code, _)| code == 200)
                .then_some(())
        });
        assert!(
            ready.is_some(),
            "{}: gpu-scaler serve not ready within {READY_WITHIN:?}",
            self.name
        );
    }

    /// The daemon's pid (for CPU and memory readings in benchmarks).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as when a node is lost: no graceful shutdown.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let mut text = String::new();
            let _ = std::fs::File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            eprintln!("--- {} log, last lines ---\n{}", self.name, tail.join("\n"));
        }
    }
}

/// A port free on `ip` right now (it may be taken again before it is used;
/// good enough on a test machine).
pub fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// GET `path` over plain HTTP/1.1: (status, body), or None if nothing answers
/// ([`gpu_scaler::testing::http_get`]).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    gpu_scaler::testing::http_get(addr, path).ok()
}
