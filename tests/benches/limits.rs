//! Figures for the daemon's limits under bad input and load (issue 13; prints,
//! never asserts): a real `gpu-scaler serve` process (release build, mock GPU,
//! a pods file) is measured from outside through /proc/<pid>/status.
//!
//! 1. The issue's 3.9 MiB podSelector (`a,a,a,...`), 20 times: time to the
//!    refusal (median, max) and the daemon's peak RSS before and after.
//! 2. 10,000 idle TCP connections opened on the metrics port (9090 in the
//!    chart), then 200 `/healthz` probes, each a new connection as the kubelet's
//!    are: probe latency p50/p99, how many idle connections the daemon closed
//!    and its RSS.
//!
//! Run: `cargo build --release -p gpu-scaler && cargo bench -p gpu-scaler-tests --bench limits`.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use gpu_scaler::scaler::proto::{ScaledObjectRef, external_scaler_client::ExternalScalerClient};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The daemon under test; killed when dropped.
struct Daemon {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary() -> std::path::PathBuf {
    // target/release/deps/limits-HASH -> target/release/gpu-scaler
    let exe = std::env::current_exe().expect("own path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("gpu-scaler"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p gpu-scaler` first",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn start() -> Daemon {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("scenario.toml"),
        "[[gpu]]\nmemory_total_mib = 81559\nutilization = 10\nmemory_utilization = 5\n",
    )
    .expect("scenario");
    std::fs::write(
        dir.path().join("pods.json"),
        r#"{"apiVersion": "v1", "kind": "List", "items": []}"#,
    )
    .expect("pods file");
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let child = Command::new(binary())
        .args(["serve", "--attribution", "procfs", "--gpu", "mock"])
        .arg("--gpu-scenario")
        .arg(dir.path().join("scenario.toml"))
        .arg("--pods-file")
        .arg(dir.path().join("pods.json"))
        .args(["--listen", &grpc.to_string()])
        .args(["--metrics-listen", &http.to_string()])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start gpu-scaler serve");
    let d = Daemon {
        child,
        grpc,
        http,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(d.http).is_err() {
        assert!(Instant::now() < deadline, "the daemon never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    d
}

/// VmRSS and VmHWM (peak) of `pid`, in MiB.
fn rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn oversize_selector(d: &Daemon) {
    println!("== a 3.9 MiB podSelector (`a,a,a,...`), 20 calls");
    let mut c = ExternalScalerClient::connect(format!("http://{}", d.grpc))
        .await
        .expect("connect")
        .max_encoding_message_size(8 << 20);
    let huge = "a,".repeat(2_000_000);
    let request = ScaledObjectRef {
        name: "so".into(),
        namespace: "ml".into(),
        scaler_metadata: [("podSelector".to_owned(), huge)].into(),
    };
    let (rss_before, hwm_before) = rss(d.child.id());
    let mut took = Vec::new();
    let mut code = None;
    for _ in 0..20 {
        let t = Instant::now();
        let r = c.get_metric_spec(request.clone()).await;
        took.push(t.elapsed());
        code = r.err().map(|s| s.code());
    }
    took.sort();
    let (rss_after, hwm_after) = rss(d.child.id());
    println!(
        "refused with {code:?}: median {}, max {}; daemon RSS {rss_before:.1} -> {rss_after:.1} MiB, \
         peak RSS {hwm_before:.1} -> {hwm_after:.1} MiB (+{:.1} MiB)",
        ms(percentile(&took, 0.5)),
        ms(*took.last().expect("calls")),
        hwm_after - hwm_before
    );
}

async fn probe(addr: SocketAddr) -> Option<Duration> {
    let t = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    out.starts_with(b"HTTP/1.1 200").then(|| t.elapsed())
}

fn raise_fd_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = want.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

async fn idle_connections(d: &Daemon) {
    let want = 10_000usize;
    println!("== {want} idle connections on the metrics port, then 200 /healthz probes");
    let mut quiet = Vec::new();
    for _ in 0..50 {
        quiet.push(probe(d.http).await.expect("probe on a quiet daemon"));
    }
    quiet.sort();
    let (rss_before, _) = rss(d.child.id());
    let mut idle = Vec::with_capacity(want);
    let opened = Instant::now();
    while idle.len() < want {
        match tokio::net::TcpStream::connect(d.http).await {
            Ok(s) => idle.push(s),
            Err(e) => {
                println!("stopped opening at {}: {e}", idle.len());
                break;
            }
        }
    }
    let open_took = opened.elapsed();
    let mut loaded = Vec::new();
    let mut failed = 0;
    for _ in 0..200 {
        match tokio::time::timeout(Duration::from_secs(5), probe(d.http)).await {
            Ok(Some(t)) => loaded.push(t),
            _ => failed += 1,
        }
    }
    loaded.sort();
    let (rss_loaded, _) = rss(d.child.id());
    // Which idle ones has the daemon closed (EOF on read)?
    let closed = |idle: &mut Vec<tokio::net::TcpStream>| {
        let mut n = 0;
        let mut buf = [0u8; 1];
        for s in idle.iter_mut() {
            match s.try_read(&mut buf) {
                Ok(0) => n += 1,
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => n += 1,
                _ => {}
            }
        }
        n
    };
    let closed_now = closed(&mut idle);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let closed_later = closed(&mut idle);
    println!(
        "/healthz on a quiet daemon: p50 {}, p99 {}",
        ms(percentile(&quiet, 0.5)),
        ms(percentile(&quiet, 0.99))
    );
    println!(
        "opened {} connections in {:.1} s; /healthz under them: p50 {}, p99 {}, {failed} of 200 failed",
        idle.len(),
        open_took.as_secs_f64(),
        ms(percentile(&loaded, 0.5)),
        ms(percentile(&loaded, 0.99))
    );
    println!(
        "idle connections closed by the daemon: {closed_now} right after the probes, \
         {closed_later} 12 s later (header-read timeout 10 s); daemon RSS {rss_before:.1} -> \
         {rss_loaded:.1} MiB"
    );
}

#[tokio::main]
async fn main() {
    let fds = raise_fd_limit(20_000);
    let d = start();
    println!("daemon pid {} (fd limit {fds})", d.child.id());
    oversize_selector(&d).await;
    idle_connections(&d).await;
}
