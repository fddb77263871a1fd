//! The control plane's processes: started with their output in a log file, killed
//! with the test (PR_SET_PDEATHSIG) or when dropped, their last log lines printed
//! when the test fails.

use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::Read as _,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use super::network::Netns;

pub struct Proc {
    child: Child,
    name: String,
    log: PathBuf,
}

impl Proc {
    /// Starts `program ARGS` with `env` added, in `netns` if given, its stdout and
    /// stderr appended to `<logs>/<name>.log` (a restart adds to the same file).
    pub fn spawn<S: AsRef<OsStr>>(
        name: &str,
        program: &Path,
        args: impl IntoIterator<Item = S>,
        env: &[(&str, String)],
        netns: Option<&Netns>,
        logs: &Path,
    ) -> Self {
        Self::start(name, program, args, env, netns, None, logs)
    }

    /// [`Proc::spawn`] on the host's network, with `hosts` as its /etc/hosts: a
    /// mount namespace of its own (private propagation, so nothing leaks to the
    /// host's) where `hosts` is bind-mounted over /etc/hosts. What cluster DNS
    /// would answer for a Service name, without touching the machine's file.
    pub fn spawn_with_hosts<S: AsRef<OsStr>>(
        name: &str,
        program: &Path,
        args: impl IntoIterator<Item = S>,
        env: &[(&str, String)],
        hosts: &Path,
        logs: &Path,
    ) -> Self {
        Self::start(name, program, args, env, None, Some(hosts), logs)
    }

    fn start<S: AsRef<OsStr>>(
        name: &str,
        program: &Path,
        args: impl IntoIterator<Item = S>,
        env: &[(&str, String)],
        netns: Option<&Netns>,
        hosts: Option<&Path>,
        logs: &Path,
    ) -> Self {
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("open {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log file");
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        if let Some(ns) = netns {
            ns.enter(&mut cmd);
        }
        if let Some(hosts) = hosts {
            let source = CString::new(hosts.as_os_str().as_bytes()).expect("a path without NUL");
            // SAFETY: unshare and mount are plain syscalls, async-signal-safe; the
            // strings are made before the fork and live in the closure.
            unsafe {
                cmd.pre_exec(move || {
                    let root = c"/";
                    let target = c"/etc/hosts";
                    if libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(
                            std::ptr::null(),
                            root.as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) != 0
                        || libc::mount(
                            source.as_ptr(),
                            target.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        // SAFETY: prctl is async-signal-safe. A test killed without unwinding
        // takes its control plane with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", program.display()));
        Self {
            child,
            name: name.to_owned(),
            log,
        }
    }

    /// Panics with the log's tail if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited ({status}); its log ends:\n{}",
                self.name,
                self.tail(30)
            );
        }
    }

    pub fn tail(&self, lines: usize) -> String {
        let mut text = String::new();
        let _ = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut text));
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} log, last lines ---\n{}", self.name, self.tail(20));
        }
        self.stop();
    }
}
