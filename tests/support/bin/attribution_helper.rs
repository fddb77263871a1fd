//! A process with a shape the attribution tests need, started inside a test cgroup:
//!
//! - `threads N`: starts N threads, prints each thread id on a line, then sleeps;
//! - `fork-exit`: forks a child that sleeps without exec'ing, prints the child's
//!   pid and exits at once (the child lives on, reparented);
//! - `hold N`: forks N children that wait (no exec), prints `ready`, then waits
//!   (a benchmark's population of tracked pids; kill the cgroup to end it);
//! - `forkloop N`: forks and execs /bin/true N times, waiting for each, and
//!   prints the mean microseconds per iteration (the benchmark's workload, run
//!   outside the daemon's process as on a real node);
//! - `sleep`: sleeps (until killed, at most a minute).

use std::{io::Write as _, time::Duration};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut out = std::io::stdout();
    match args.get(1).map(String::as_str) {
        Some("threads") => {
            let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(4);
            let (tx, rx) = std::sync::mpsc::channel();
            for _ in 0..n {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    // SAFETY: gettid has no preconditions.
                    tx.send(unsafe { libc::gettid() }).expect("send tid");
                    std::thread::sleep(Duration::from_secs(60));
                });
            }
            for _ in 0..n {
                let tid = rx.recv().expect("tid");
                writeln!(out, "{tid}").expect("stdout");
            }
            out.flush().expect("stdout");
            std::thread::sleep(Duration::from_secs(60));
        }
        Some("fork-exit") => {
            // SAFETY: single-threaded here; the child only sleeps and exits.
            match unsafe { libc::fork() } {
                0 => {
                    std::thread::sleep(Duration::from_secs(60));
                    std::process::exit(0);
                }
                -1 => panic!("fork: {}", std::io::Error::last_os_error()),
                child => {
                    writeln!(out, "{child}").expect("stdout");
                    out.flush().expect("stdout");
                }
            }
        }
        Some("hold") => {
            let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
            for _ in 0..n {
                // SAFETY: single-threaded; the child only sleeps until killed.
                match unsafe { libc::fork() } {
                    0 => loop {
                        // SAFETY: pause has no preconditions.
                        unsafe { libc::pause() };
                    },
                    -1 => panic!("fork: {}", std::io::Error::last_os_error()),
                    _ => {}
                }
            }
            writeln!(out, "ready").expect("stdout");
            out.flush().expect("stdout");
            std::thread::sleep(Duration::from_secs(3600));
        }
        Some("forkloop") => {
            let n: u32 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100);
            let path = c"/bin/true";
            let argv = [path.as_ptr(), std::ptr::null()];
            let start = std::time::Instant::now();
            for _ in 0..n {
                // SAFETY: single-threaded; the child only calls execv and _exit.
                unsafe {
                    let pid = libc::fork();
                    if pid == 0 {
                        libc::execv(path.as_ptr(), argv.as_ptr());
                        libc::_exit(127);
                    }
                    assert!(pid > 0, "fork: {}", std::io::Error::last_os_error());
                    let mut status = 0;
                    libc::waitpid(pid, &mut status, 0);
                }
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / f64::from(n.max(1));
            writeln!(out, "{us}").expect("stdout");
        }
        Some("sleep") => std::thread::sleep(Duration::from_secs(60)),
        other => {
            eprintln!(
                "usage: attribution-helper threads N | fork-exit | hold N | forkloop N | sleep (got {other:?})"
            );
            std::process::exit(2);
        }
    }
}
