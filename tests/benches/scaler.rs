//! Figures for the KEDA-facing scaler (a benchmark that prints, never asserts):
//! GetMetrics latency and throughput over loopback at 1, 64 and 512 concurrent
//! clients; the daemon's memory with 10,000 open StreamIsActive streams; and
//! freshness from a new GPU pass to GetMetrics showing it and to the
//! StreamIsActive push.
//!
//! Run: `cargo xtask bench scaler` (or `cargo bench -p gpu-scaler-tests --bench scaler`).
//!
//! The server runs in a child process (this binary re-executed with
//! `GPU_SCALER_BENCH_SERVER=1`) so its memory is measured alone; it is the real
//! daemon wiring fed by hand (`support::scaler::Node`): 64 selected pods on 8
//! GPUs plus 64 same-labelled pods in another namespace, re-fed every poll
//! interval (1 s) like a GPU poller would. Commands on its stdin change the load.
//! The end-to-end freshness run starts a second server whose GPU figures come
//! from the real poller reading a mock scenario file the benchmark rewrites.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Write as _},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use gpu_scaler::scaler::proto::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use gpu_scaler_tests::scaler::{Node, device, pod, process};
use tonic::transport::{Channel, Endpoint};

const SERVER_ENV: &str = "GPU_SCALER_BENCH_SERVER";
const PODS: u32 = 64;
const GPUS: u32 = 8;
const POLL: Duration = Duration::from_secs(1);

fn main() {
    // `cargo bench` passes `--bench`; nothing else is understood.
    match std::env::var(SERVER_ENV).as_deref() {
        Ok("mock") => mock_server(),
        Ok(_) => server(),
        Err(_) => client(),
    }
}

const SCENARIO_ENV: &str = "GPU_SCALER_BENCH_SCENARIO";
/// GPUs (one selected pod each) in the end-to-end freshness run.
const MOCK_PODS: u32 = 8;

/// A scenario file: MOCK_PODS GPUs, each running one process at `level` SM %.
fn mock_scenario(level: u32) -> String {
    let mut s = String::new();
    for i in 0..MOCK_PODS {
        s.push_str(&format!(
            "[[gpu]]\nmemory_total_mib = 81920\nutilization = {level}\nmemory_utilization = 0\n\
             temperature_c = 60\npower_w = 300.0\npower_limit_w = 700.0\n\n\
             [[gpu.process]]\npid = {}\nsm_util = {level}\nused_memory_mib = 1024\n\n",
            30_000 + i
        ));
    }
    s
}

/// The server with the real GPU poller on the mock scenario source.
fn mock_server() {
    let path = std::env::var(SCENARIO_ENV).expect("scenario path");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let gpu = gpu_scaler::gpu::start(gpu_scaler::gpu::Config {
            source: gpu_scaler::gpu::SourceKind::Mock,
            nvml_lib: None,
            scenario: Some(path.into()),
            poll_interval: POLL,
        });
        let node = Node::start_with_sources(POLL, None, None, Some(gpu)).await;
        let pods = (0..MOCK_PODS)
            .map(|i| {
                node.attributor.assign(30_000 + i, &format!("m{i}"));
                pod(
                    "bench",
                    &format!("m-{i}"),
                    &format!("m{i}"),
                    &[("app", "mock")],
                )
            })
            .collect();
        node.set_pods(pods);
        println!("addr {}", node.grpc_addr);
        // Serve until the parent closes stdin.
        let mut lines =
            tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
        while let Ok(Some(_)) = lines.next_line().await {}
    });
}

fn feed(node: &Node, level: u32) {
    let mut pods = Vec::new();
    let mut procs: Vec<Vec<_>> = (0..GPUS).map(|_| Vec::new()).collect();
    for (ns, base) in [("bench", 10_000u32), ("other", 20_000)] {
        for i in 0..PODS {
            let uid = format!("{ns}-{i}");
            pods.push(pod(
                ns,
                &format!("vllm-{i}"),
                &uid,
                &[("app", "vllm"), ("tier", "gpu")],
            ));
            node.attributor.assign(base + i, &uid);
            procs[(i % GPUS) as usize].push(process(base + i, level, level / 2, 1024));
        }
    }
    node.set_pods(pods);
    let devices = procs
        .into_iter()
        .enumerate()
        .map(|(i, p)| device(i as u32, 60, 300.0, p))
        .collect();
    node.set_gpus(devices);
}

fn server() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let node = Arc::new(Node::start(POLL, None).await);
        let level = Arc::new(std::sync::atomic::AtomicU32::new(10));
        feed(&node, 10);
        node.settle().await;
        println!("addr {}", node.grpc_addr);
        let (n, l) = (node.clone(), level.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL);
            loop {
                tick.tick().await;
                feed(&n, l.load(std::sync::atomic::Ordering::SeqCst));
            }
        });
        let mut lines =
            tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(tokio::io::stdin()));
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(v) = line.strip_prefix("level ") {
                let v: u32 = v.trim().parse().expect("level");
                level.store(v, std::sync::atomic::Ordering::SeqCst);
                feed(&node, v);
                println!("ok");
            }
        }
    });
}

struct Server {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    addr: String,
}

impl Server {
    fn start() -> Server {
        Self::start_with(&[(SERVER_ENV, "1")])
    }

    fn start_with(env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .envs(env.iter().copied())
            .env("RUST_LOG", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the server process");
        let stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("server address");
        let addr = line
            .trim()
            .strip_prefix("addr ")
            .expect("addr line")
            .to_owned();
        Server {
            child,
            stdin,
            stdout,
            addr,
        }
    }

    /// Resident and peak memory of the server process, KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .expect("VmRSS/VmHWM")
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (USER_HZ, 100 on Linux).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn object(meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "bench".into(),
        namespace: "bench".into(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

async fn connect(addr: &str) -> ExternalScalerClient<Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect");
    ExternalScalerClient::new(channel)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// `pace`: `None` is closed loop (each client sends its next request as soon
/// as the previous one returns: saturation throughput, latency is mostly
/// queueing); `Some(p)` sends one request per client every `p` (open loop, as
/// KEDA's polling does), so the latency is the service's own.
async fn latency(server: &Server, clients: usize, run_for: Duration, pace: Option<Duration>) {
    let addr = server.addr.as_str();
    let mut conns = Vec::with_capacity(clients);
    for _ in 0..clients {
        conns.push(connect(addr).await);
    }
    let o = object(&[("podSelector", "app=vllm,tier in (gpu)")]);
    let request = GetMetricsRequest {
        scaled_object_ref: Some(o),
        metric_name: String::new(),
    };
    // Warm-up: every connection once.
    for c in &mut conns {
        c.get_metrics(request.clone()).await.expect("GetMetrics");
    }
    let cpu0 = cpu_time(server.child.id());
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                // Clients are spread evenly over the period, as independent
                // ScaledObjects' polling loops are, rather than all at once.
                let mut tick = pace.map(|p| {
                    let offset = p.mul_f64(i as f64 / clients as f64);
                    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + offset, p);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                });
                while start.elapsed() < run_for {
                    if let Some(t) = &mut tick {
                        t.tick().await;
                    }
                    let t = Instant::now();
                    c.get_metrics(request.clone()).await.expect("GetMetrics");
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time(server.child.id()) - cpu0;
    all.sort();
    let mode = match pace {
        None => "closed loop".to_owned(),
        Some(p) => format!("1 req / {} ms each", p.as_millis()),
    };
    println!(
        "GetMetrics  clients {clients:>4} ({mode}): p50 {}  p99 {}  max {}  throughput {:.0} req/s  ({} requests in {:.1} s; daemon CPU {:.1} us/request)",
        ms(percentile(&all, 50.0)),
        ms(percentile(&all, 99.0)),
        ms(*all.last().expect("requests")),
        all.len() as f64 / elapsed.as_secs_f64(),
        all.len(),
        elapsed.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / all.len() as f64
    );
}

async fn freshness(server: &mut Server) {
    let addr = server.addr.clone();
    let mut c = connect(&addr).await;
    // The sum over 64 pods of the level: 20 -> 1280, 40 -> 2560; with the
    // activation at 2000 every flip of the level flips IsActive, so every flip
    // is pushed exactly once.
    let o = object(&[("podSelector", "app=vllm"), ("activationThreshold", "2000")]);
    let request = GetMetricsRequest {
        scaled_object_ref: Some(o.clone()),
        metric_name: String::new(),
    };
    let mut stream = connect(&addr)
        .await
        .stream_is_active(o.clone())
        .await
        .expect("stream")
        .into_inner();
    let mut active = stream
        .message()
        .await
        .expect("first")
        .expect("first message")
        .result;
    let mut to_metrics = Vec::new();
    let mut to_push = Vec::new();
    let mut level = if active { 40 } else { 20 };
    for _ in 0..40 {
        level = if level == 40 { 20 } else { 40 };
        let want = f64::from(level * PODS);
        let t0 = Instant::now();
        // Only write here; the acknowledgement is read after measuring.
        writeln!(server.stdin, "level {level}").expect("send command");
        let push = async {
            let m = stream.message().await.expect("push").expect("message");
            (m.result, t0.elapsed())
        };
        let visible = async {
            loop {
                let v = c
                    .get_metrics(request.clone())
                    .await
                    .expect("GetMetrics")
                    .into_inner();
                if v.metric_values[0].metric_value_float == want {
                    return t0.elapsed();
                }
            }
        };
        let ((pushed, push_t), metrics_t) = tokio::join!(push, visible);
        assert_ne!(pushed, active, "every flip is pushed");
        active = pushed;
        to_push.push(push_t);
        to_metrics.push(metrics_t);
        let mut ack = String::new();
        tokio::task::block_in_place(|| server.stdout.read_line(&mut ack)).expect("ack");
    }
    to_metrics.sort();
    to_push.sort();
    println!(
        "freshness   GPU pass published -> GetMetrics shows it: p50 {}  p99 {}  max {}",
        ms(percentile(&to_metrics, 50.0)),
        ms(percentile(&to_metrics, 99.0)),
        ms(*to_metrics.last().expect("samples"))
    );
    println!(
        "freshness   GPU pass published -> StreamIsActive push: p50 {}  p99 {}  max {}",
        ms(percentile(&to_push, 50.0)),
        ms(percentile(&to_push, 99.0)),
        ms(*to_push.last().expect("samples"))
    );
    println!(
        "            (a scenario change reaches the GPU poller at its next pass: add up to one poll interval)"
    );
}

/// From a rewrite of the mock scenario file to GetMetrics showing it and to
/// the StreamIsActive push, through the real GPU poller (1 s interval).
async fn end_to_end_freshness() {
    let dir = std::env::temp_dir().join(format!("gpu-scaler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("scenario.toml");
    let tmp = dir.join("scenario.toml.tmp");
    std::fs::write(&path, mock_scenario(20)).expect("write scenario");
    let path_str = path.display().to_string();
    let server = Server::start_with(&[(SERVER_ENV, "mock"), (SCENARIO_ENV, &path_str)]);
    let mut c = connect(&server.addr).await;
    // 8 pods at 20 % = 160, at 40 % = 320; activation 240.
    let o = object(&[("podSelector", "app=mock"), ("activationThreshold", "240")]);
    let request = GetMetricsRequest {
        scaled_object_ref: Some(o.clone()),
        metric_name: String::new(),
    };
    loop {
        let v = c.get_metrics(request.clone()).await;
        if v.is_ok_and(|v| v.into_inner().metric_values[0].metric_value_float == 160.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stream = connect(&server.addr)
        .await
        .stream_is_active(o.clone())
        .await
        .expect("stream")
        .into_inner();
    assert!(
        !stream
            .message()
            .await
            .expect("first")
            .expect("first message")
            .result
    );
    let mut level = 20;
    let (mut to_metrics, mut to_push) = (Vec::new(), Vec::new());
    for i in 0..12u64 {
        // Land the change at different points of the poll cycle.
        tokio::time::sleep(Duration::from_millis(100 + (i * 379) % 1000)).await;
        level = if level == 20 { 40 } else { 20 };
        let want = f64::from(level * MOCK_PODS);
        std::fs::write(&tmp, mock_scenario(level)).expect("write scenario");
        let t0 = Instant::now();
        std::fs::rename(&tmp, &path).expect("replace scenario");
        let push = async {
            let m = stream.message().await.expect("push").expect("message");
            assert_eq!(m.result, level == 40);
            t0.elapsed()
        };
        let visible = async {
            loop {
                let v = c
                    .get_metrics(request.clone())
                    .await
                    .expect("GetMetrics")
                    .into_inner();
                if v.metric_values[0].metric_value_float == want {
                    return t0.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let (p, m) = tokio::join!(push, visible);
        to_push.push(p);
        to_metrics.push(m);
    }
    to_metrics.sort();
    to_push.sort();
    println!(
        "end to end  scenario file rewritten -> GetMetrics shows it (poll 1 s): p50 {}  max {}",
        ms(percentile(&to_metrics, 50.0)),
        ms(*to_metrics.last().expect("samples"))
    );
    println!(
        "end to end  scenario file rewritten -> StreamIsActive push (poll 1 s): p50 {}  max {}",
        ms(percentile(&to_push, 50.0)),
        ms(*to_push.last().expect("samples"))
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `when` says what the daemon did before (its allocator keeps what earlier
/// load grew, so the same streams cost more RSS after a load spike).
async fn streams(server: &Server, count: usize, per_connection: usize, when: &str) {
    let (rss0, _) = server.memory_kib();
    let o = object(&[("podSelector", "app=vllm"), ("activationThreshold", "5")]);
    let mut open = Vec::with_capacity(count);
    let started = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..count.div_ceil(per_connection) {
        conns.push(connect(&server.addr).await);
    }
    let mut tasks = Vec::new();
    for i in 0..count {
        let mut c = conns[i / per_connection].clone();
        let o = o.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = c.stream_is_active(o).await.expect("stream").into_inner();
            s.message().await.expect("first").expect("first message");
            s
        }));
    }
    for t in tasks {
        open.push(t.await.expect("stream task"));
    }
    let opened = started.elapsed();
    // Let at least one poll pass re-evaluate every stream.
    tokio::time::sleep(POLL * 2).await;
    let (rss, hwm) = server.memory_kib();
    println!(
        "streams     {count} open StreamIsActive ({} connections, {when}): daemon RSS {:.1} MiB (was {:.1} MiB before: +{:.1} KiB per stream), peak {:.1} MiB; opened in {:.1} s",
        conns.len(),
        rss as f64 / 1024.0,
        rss0 as f64 / 1024.0,
        (rss.saturating_sub(rss0)) as f64 / count as f64,
        hwm as f64 / 1024.0,
        opened.as_secs_f64()
    );
    drop(open);
}

/// The scaler's own work per GetMetrics (metadata, selection, value), without
/// gRPC, in this process.
async fn handler_cost() {
    use gpu_scaler::scaler::{LocalView, WorkloadView as _, metadata, value};
    let node = Node::start(Duration::from_secs(60), None).await;
    feed(&node, 30);
    node.settle().await;
    let view = LocalView::new(node.snapshots(), Duration::from_secs(60));
    let meta = object(&[("podSelector", "app=vllm,tier in (gpu)")]).scaler_metadata;
    let n = 100_000;
    let t = Instant::now();
    let mut sum = 0.0;
    for _ in 0..n {
        let q = metadata::parse(&meta, metadata::PodSelector::Required).expect("metadata");
        let selector = q
            .selector
            .as_ref()
            .expect("podSelector is required by parse");
        let w = view
            .workload("bench", selector, None)
            .await
            .expect("workload");
        sum += value::workload_value(&q, &w.pods).expect("value");
    }
    let per = t.elapsed() / n;
    assert_eq!(sum, f64::from(n) * f64::from(30 * PODS));
    println!(
        "handler     metadata + select {PODS} of {} pods + value, no gRPC: {:.2} us/request",
        2 * PODS,
        per.as_secs_f64() * 1e6
    );
    node.stop().await;
}

fn client() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut server = Server::start();
    println!(
        "gpu-scaler scaler bench: server pid {} on {}; {} CPUs shared by client and server",
        server.child.id(),
        server.addr,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (rss, _) = server.memory_kib();
    println!("daemon RSS idle: {:.1} MiB", rss as f64 / 1024.0);
    println!(
        "load average at start: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    rt.block_on(async {
        {
            let fresh = Server::start();
            streams(&fresh, 10_000, 100, "fresh daemon").await;
        }
        handler_cost().await;
        for clients in [1, 64, 512] {
            latency(&server, clients, Duration::from_secs(5), None).await;
        }
        for clients in [1, 64, 512] {
            latency(
                &server,
                clients,
                Duration::from_secs(5),
                Some(Duration::from_millis(100)),
            )
            .await;
        }
        freshness(&mut server).await;
        end_to_end_freshness().await;
        streams(&server, 10_000, 100, "after the latency runs").await;
    });
}
