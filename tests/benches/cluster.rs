//! Cluster benchmark (`cargo xtask bench cluster`): prints figures, asserts
//! nothing about speed.
//!
//! 1. Fan-out latency p50/p99 for a workload spread over 1, 8 and 64 nodes: the
//!    peers are separate processes on loopback (this binary re-run as
//!    `bench-cluster peer`, serving the real peer gRPC service), the asking side
//!    is the real `cluster::Fanout` with its cache off.
//!    Then the same through real `gpu-scaler serve` processes (each on its own
//!    127.0.1.N address, `--gpu mock`, `--pods-file`, `--peers`): KEDA's
//!    GetMetrics on one daemon, each with a selector of its own so no answer
//!    comes from the cache (the pods are idle, so peers answer with no GPUs).
//! 2. Peer RPCs per KEDA polling round with 1,000 ScaledObjects over 10
//!    workloads, each workload over 8 nodes: every ScaledObject asks GetMetrics
//!    and IsActive once per round (both need the value), all at once.
//! 3. Memory of the pod caches holding 10,000 pods, measured with a counting
//!    allocator: live heap bytes after the caches filled, minus before. The pods
//!    come from the fake API server over HTTP (its own store is allocated before
//!    the baseline).
//! 4. `selectors`: unique podSelectors at 5,000 per second (issue 13) against the
//!    fake API server, which counts requests and open watch streams, while the
//!    selector KEDA keeps using is asked every second and callers also claim 50
//!    new namespaces per second: LISTs per second, open watches, watched
//!    namespaces, live heap and the KEDA selector's failures, every 10 s.
//!    `GPU_SCALER_BENCH_SECONDS` (default 60) sets the length.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicIsize, Ordering},
    },
    time::{Duration, Instant},
};

use gpu_scaler::{
    cluster::{
        Fanout, FanoutConfig, MissingNodePolicy,
        discovery::StaticPeers,
        peer::{self, LocalUsage, PeerClients, proto},
        workload::{CacheLimits, PodDirectory, WorkloadPods},
    },
    pods::{
        Pod,
        kube::{PodMap, PodWatch},
    },
};
use gpu_scaler_tests::kube_api::{FakeKube, ResourceType, pod};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A peer's usage: every asked pod uses one GPU at a fixed figure.
struct SyntheticNode {
    name: String,
}

impl LocalUsage for SyntheticNode {
    fn node_name(&self) -> &str {
        &self.name
    }
    fn pod_usage<'a>(
        &'a self,
        uids: &'a [String],
        _figures: &'a [proto::FigureRequest],
    ) -> futures::future::BoxFuture<'a, Result<proto::GetPodUsageResponse, peer::LocalError>> {
        Box::pin(async move { Ok(self.answer(uids)) })
    }
}

impl SyntheticNode {
    fn answer(&self, uids: &[String]) -> proto::GetPodUsageResponse {
        proto::GetPodUsageResponse {
            node_name: self.name.clone(),
            snapshot_unix_nanos: i64::try_from(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("after 1970")
                    .as_nanos(),
            )
            .expect("fits"),
            pods: uids
                .iter()
                .map(|u| proto::PodUsage {
                    pod_uid: u.clone(),
                    figures: Vec::new(),
                    gpus: vec![proto::GpuUsage {
                        gpu_uuid: "GPU-0".into(),
                        sm_util_percent: Some(50.0),
                        mem_util_percent: Some(20.0),
                        memory_used_mib: Some(1024),
                        power_watts: Some(100.0),
                        gpu_memory_total_mib: Some(81920),
                        gpu_temperature_celsius: Some(60),
                        ..Default::default()
                    }],
                })
                .collect(),
            unknown_pod_uids: Vec::new(),
        }
    }
}

/// Child mode: serve the peer protocol for `node`, print the port, run until
/// stdin closes (the parent exited or dropped us).
async fn run_peer(node: String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    println!("{}", listener.local_addr().expect("addr").port());
    let stdin_closed = async {
        let _ =
            tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new())).await;
    };
    peer::serve(
        listener,
        Arc::new(SyntheticNode { name: node }),
        None,
        stdin_closed,
    )
    .await
    .expect("peer server");
}

struct Peers {
    children: Vec<Child>,
    book: Vec<(String, SocketAddr)>,
}

impl Drop for Peers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn_peers(n: usize) -> Peers {
    let exe = std::env::current_exe().expect("own path");
    let mut peers = Peers {
        children: Vec::new(),
        book: Vec::new(),
    };
    for i in 0..n {
        let node = format!("node-{i}");
        let mut child = Command::new(&exe)
            .args(["peer", &node])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn peer");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("peer port");
        let port: u16 = line.trim().parse().expect("port number");
        peers
            .book
            .push((node, SocketAddr::from(([127, 0, 0, 1], port))));
        peers.children.push(child);
    }
    peers
}

struct Fixed(Mutex<BTreeMap<String, Arc<PodMap>>>);

impl PodDirectory for Fixed {
    fn workload_pods<'a>(
        &'a self,
        _namespace: &'a str,
        selector: &'a str,
    ) -> futures::future::BoxFuture<'a, gpu_scaler::cluster::Result<Arc<PodMap>>> {
        let pods = self
            .0
            .lock()
            .expect("lock")
            .get(selector)
            .cloned()
            .unwrap_or_default();
        Box::pin(async move { Ok(pods) })
    }
}

fn workload(selector: &str, nodes: &[(String, SocketAddr)], per_node: usize) -> PodMap {
    let mut pods = PodMap::new();
    for (n, (node, _)) in nodes.iter().enumerate() {
        for k in 0..per_node {
            let uid = format!("{selector}-{n}-{k}");
            pods.insert(
                uid.clone(),
                Arc::new(Pod {
                    uid,
                    namespace: "ml".into(),
                    name: format!("p-{n}-{k}"),
                    labels: BTreeMap::new(),
                    node_name: Some(node.clone()),
                    phase: Some("Running".into()),
                    ready: true,
                    ip: None,
                    annotations: Default::default(),
                    containers: Vec::new(),
                }),
            );
        }
    }
    pods
}

fn fanout(peers: &Peers, dir: Fixed, ttl: Duration) -> Arc<Fanout> {
    Fanout::new(
        FanoutConfig {
            node_name: "asking-node".into(),
            cache_ttl: ttl,
            policy: MissingNodePolicy::Average,
        },
        Arc::new(SyntheticNode {
            name: "asking-node".into(),
        }),
        Arc::new(StaticPeers::new(peers.book.clone())),
        PeerClients::new(None, Duration::from_secs(1)).expect("clients"),
        Arc::new(dir),
        Arc::default(),
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

async fn bench_latency() {
    println!("== fan-out latency (peers = processes on loopback, 4 pods per node, cache off)");
    for n in [1usize, 8, 64] {
        let peers = spawn_peers(n);
        let dir = Fixed(Mutex::new(
            [("w".to_owned(), Arc::new(workload("w", &peers.book, 4)))].into(),
        ));
        let f = fanout(&peers, dir, Duration::ZERO);
        for _ in 0..50 {
            let u = f.workload("ml", "w", None).await.expect("warm-up");
            assert_eq!(u.unreported(), 0, "every peer answers");
        }
        let rounds = 1000;
        let mut lat = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let u = f.workload("ml", "w", None).await.expect("fan-out");
            lat.push(t.elapsed());
            assert_eq!(u.pods.len(), 4 * n);
        }
        lat.sort();
        println!(
            "nodes={n:>3}  pods={:>4}  p50={:>8.3} ms  p99={:>8.3} ms  ({rounds} sequential fan-outs)",
            4 * n,
            percentile(&lat, 50.0).as_secs_f64() * 1e3,
            percentile(&lat, 99.0).as_secs_f64() * 1e3,
        );
    }
}

/// `gpu-scaler serve` processes on 127.0.1.1..N.
struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SIGTERM for a graceful stop, then reap.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

fn gpu_scaler_binary() -> std::path::PathBuf {
    // target/release/deps/cluster-HASH -> target/release/gpu-scaler
    let exe = std::env::current_exe().expect("own path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("gpu-scaler"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release -p gpu-scaler` first (cargo xtask bench cluster does)",
        bin.display()
    );
    bin
}

async fn bench_latency_serve() {
    use gpu_scaler::scaler::proto::{
        GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
    };
    println!(
        "== GetMetrics through `gpu-scaler serve` processes (4 idle pods per node, a new selector each time)"
    );
    let bin = gpu_scaler_binary();
    let dir = std::env::temp_dir().join(format!("gpu-scaler-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("scenario.toml"),
        "[[gpu]]\nmemory_total_mib = 81559\nutilization = 0\nmemory_utilization = 0\n\
         temperature_c = 40\npower_w = 60.0\npower_limit_w = 700.0\n",
    )
    .expect("scenario");
    for n in [1usize, 8, 64] {
        let node = |i: usize| format!("node-{i}");
        let ip = |i: usize| format!("127.0.1.{}", i + 1);
        let items: Vec<serde_json::Value> = (0..n)
            .flat_map(|i| {
                (0..4).map(move |k| {
                    pod(
                        "ml",
                        &format!("w-{i}-{k}"),
                        &format!("00000000-0000-4000-8000-{:06}{:06}", i, k),
                        &[("app", "w")],
                        Some(&node(i)),
                        "Running",
                        true,
                    )
                })
            })
            .collect();
        let pods_file = dir.join(format!("pods-{n}.json"));
        std::fs::write(
            &pods_file,
            serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string(),
        )
        .expect("pods file");
        let peers: Vec<String> = (0..n)
            .map(|i| format!("{}={}:16001", node(i), ip(i)))
            .collect();
        let mut daemons = Daemons(Vec::new());
        for i in 0..n {
            let child = Command::new(&bin)
                .args([
                    "serve",
                    "--attribution",
                    "procfs",
                    "--gpu",
                    "mock",
                    "--poll-interval",
                    "1s",
                ])
                .arg("--gpu-scenario")
                .arg(dir.join("scenario.toml"))
                .arg("--pods-file")
                .arg(&pods_file)
                .args(["--node-name", &node(i)])
                .args(["--listen", &format!("{}:16000", ip(i))])
                .args(["--peer-listen", &format!("{}:16001", ip(i))])
                .args(["--metrics-listen", &format!("{}:19090", ip(i))])
                .args(["--peers", &peers.join(",")])
                .env("RUST_LOG", "error")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(
                    std::fs::File::create(dir.join(format!("stderr-{i}"))).expect("stderr file"),
                )
                .spawn()
                .expect("spawn gpu-scaler serve");
            daemons.0.push(child);
        }
        let ask = |k: usize| GetMetricsRequest {
            scaled_object_ref: Some(ScaledObjectRef {
                name: "bench".into(),
                namespace: "ml".into(),
                scaler_metadata: [("podSelector".to_owned(), format!("app=w,!unused-{k}"))].into(),
            }),
            metric_name: String::new(),
        };
        // Ready: every daemon up, fresh, and answering for all pods.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut client = loop {
            if let Ok(mut c) =
                ExternalScalerClient::connect(format!("http://{}:16000", ip(0))).await
                && c.get_metrics(ask(usize::MAX)).await.is_ok()
            {
                let mut all = true;
                for i in 0..n {
                    all &= tokio::net::TcpStream::connect(format!("{}:16001", ip(i)))
                        .await
                        .is_ok();
                }
                if all {
                    break c;
                }
            }
            // A daemon that cannot start (e.g. no attribution backend on this
            // build) ends this part with its reason: no figure rather than a wrong one.
            for (i, c) in daemons.0.iter_mut().enumerate() {
                if let Ok(Some(status)) = c.try_wait() {
                    let err = std::fs::read_to_string(dir.join(format!("stderr-{i}")))
                        .unwrap_or_default();
                    println!(
                        "NOT MEASURED: gpu-scaler serve on {} exited ({status}): {}",
                        ip(i),
                        err.lines().last().unwrap_or("no output")
                    );
                    let _ = std::fs::remove_dir_all(&dir);
                    return;
                }
            }
            assert!(Instant::now() < deadline, "daemons not ready within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // Two poll intervals: every daemon has a fresh snapshot.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for k in 0..50 {
            client.get_metrics(ask(k)).await.expect("warm-up");
        }
        let rounds = 1000;
        let mut lat = Vec::with_capacity(rounds);
        for k in 0..rounds {
            let t = Instant::now();
            let r = client
                .get_metrics(ask(1_000 + k))
                .await
                .expect("GetMetrics");
            lat.push(t.elapsed());
            assert_eq!(
                r.into_inner().metric_values[0].metric_value_float,
                0.0,
                "idle pods"
            );
        }
        lat.sort();
        println!(
            "nodes={n:>3}  pods={:>4}  p50={:>8.3} ms  p99={:>8.3} ms  ({rounds} sequential GetMetrics, each a full fan-out)",
            4 * n,
            percentile(&lat, 50.0).as_secs_f64() * 1e3,
            percentile(&lat, 99.0).as_secs_f64() * 1e3,
        );
        drop(daemons);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

async fn bench_coalescing() {
    println!(
        "== peer RPCs per KEDA polling round (1,000 ScaledObjects over 10 workloads, 8 nodes each)"
    );
    let peers = spawn_peers(8);
    let dir = Fixed(Mutex::new(
        (0..10)
            .map(|w| {
                let sel = format!("app=w{w}");
                let pods = Arc::new(workload(&sel, &peers.book, 2));
                (sel, pods)
            })
            .collect(),
    ));
    let poll = Duration::from_secs(1);
    let f = fanout(&peers, dir, poll);
    let rounds = 6;
    let mut per_round = Vec::new();
    let began = Instant::now();
    for _ in 0..rounds {
        let before = f.metrics().peer_requests_sent();
        let start = Instant::now();
        // GetMetrics and IsActive of every ScaledObject, all in flight at once.
        let queries = (0..1000).flat_map(|so| {
            let sel = format!("app=w{}", so % 10);
            let f = f.clone();
            [0, 1].map(move |_| {
                let f = f.clone();
                let sel = sel.clone();
                async move { f.workload("ml", &sel, None).await.map(|_| ()) }
            })
        });
        for r in futures::future::join_all(queries).await {
            r.expect("answer");
        }
        per_round.push(f.metrics().peer_requests_sent() - before);
        tokio::time::sleep(poll.saturating_sub(start.elapsed())).await;
    }
    let total: u64 = per_round.iter().sum();
    let intervals = began.elapsed().as_secs_f64() / poll.as_secs_f64();
    println!(
        "poll interval {poll:?}, {rounds} rounds of 2,000 queries (GetMetrics + IsActive x 1,000 ScaledObjects): \
         peer RPCs per round {per_round:?}; {total} in {intervals:.2} intervals = {:.1} per interval \
         (goal <= 10 workloads x 8 nodes = 80; without coalescing 2,000 x 8 = 16,000 per round)",
        total as f64 / intervals
    );
}

async fn bench_memory() {
    println!("== pod cache memory, 10,000 pods (10 workloads x 1,000 pods over 100 nodes)");
    let fake = FakeKube::start().await;
    let pods = ResourceType::pods();
    for i in 0..10_000 {
        let app = format!("w{}", i % 10);
        let node = format!("node-{}", i % 100);
        let uid = format!("00000000-0000-4000-8000-{i:012}");
        fake.apply(
            &pods,
            pod(
                "ml",
                &format!("{app}-{i}"),
                &uid,
                &[("app", &app), ("pod-template-hash", "5d8f7c9b6")],
                Some(&node),
                "Running",
                true,
            ),
        );
    }
    let kubeconfig = std::env::temp_dir().join(format!(
        "gpu-scaler-bench-{}.kubeconfig",
        std::process::id()
    ));
    fake.write_kubeconfig(&kubeconfig);
    let client = gpu_scaler::pods::kube::client(Some(&kubeconfig))
        .await
        .expect("client");
    let _ = std::fs::remove_file(&kubeconfig);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let base = live();
    let cache = WorkloadPods::new(
        client.clone(),
        CacheLimits {
            first_list: Duration::from_secs(30),
            ..CacheLimits::default()
        },
    );
    let mut total = 0;
    for w in 0..10 {
        total += cache
            .workload_pods("ml", &format!("app=w{w}"))
            .await
            .expect("pods")
            .len();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let used = live() - base;
    println!(
        "workload cache: {total} pods in {} namespace watches: {:.2} MiB live heap ({:.0} bytes/pod, watches and client included)",
        cache.watched(),
        used as f64 / (1024.0 * 1024.0),
        used as f64 / total as f64
    );

    let base = live();
    let node = PodWatch::node(client, "node-7");
    let local = node
        .ready(Duration::from_secs(30))
        .await
        .expect("node pods");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let used = live() - base;
    println!(
        "node watch: {} pods of node-7: {:.1} KiB live heap",
        local.len(),
        used as f64 / 1024.0
    );
}

async fn bench_selectors() {
    let seconds: u64 = std::env::var("GPU_SCALER_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let rate = 5_000u64;
    println!(
        "== unique selectors, {rate}/s for {seconds} s, 1,000 pods in namespace ml, \
         plus 50 new namespaces claimed per second"
    );
    let fake = FakeKube::start().await;
    fake.set_bookmark_interval(Duration::from_secs(1));
    let pods = ResourceType::pods();
    for i in 0..1_000 {
        let app = format!("w{}", i % 10);
        fake.apply(
            &pods,
            pod(
                "ml",
                &format!("{app}-{i}"),
                &format!("00000000-0000-4000-8000-{i:012}"),
                &[("app", &app), ("pod-template-hash", "5d8f7c9b6")],
                Some(&format!("node-{}", i % 100)),
                "Running",
                true,
            ),
        );
    }
    let kubeconfig = std::env::temp_dir().join(format!(
        "gpu-scaler-bench-sel-{}.kubeconfig",
        std::process::id()
    ));
    fake.write_kubeconfig(&kubeconfig);
    let client = gpu_scaler::pods::kube::client(Some(&kubeconfig))
        .await
        .expect("client");
    let _ = std::fs::remove_file(&kubeconfig);
    let limits = CacheLimits::default();
    let cache = WorkloadPods::new(client, limits);
    cache
        .workload_pods("ml", "app=w0")
        .await
        .expect("KEDA's selector");
    let base_heap = live();
    let keda_failures = Arc::new(AtomicIsize::new(0));
    let keda = {
        let cache = cache.clone();
        let failures = keda_failures.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                match cache.workload_pods("ml", "app=w0").await {
                    Ok(p) if p.len() == 100 => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    println!(
        "budget: {} namespaces, {} pods; client limit {:?}",
        limits.max_namespaces,
        limits.max_pods,
        gpu_scaler::pods::kube::ClientLimits::default()
    );
    let started = Instant::now();
    let mut last_lists = fake.requests().get("list pods").copied().unwrap_or(0);
    let mut last_report = started;
    let mut sent = 0u64;
    let (mut refused_ns, mut answered) = (0u64, 0u64);
    let mut max_watches = 0i64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < Duration::from_secs(seconds) {
        tick.tick().await;
        // 10 ms worth: 50 unique selectors in ml, and every 2nd tick a new namespace.
        let batch = rate / 100;
        let queries = (0..batch).map(|i| {
            let n = sent + i;
            let cache = cache.clone();
            async move {
                let sel = format!("app=w{},tier notin (t{n})", n % 10);
                cache.workload_pods("ml", &sel).await.is_ok()
            }
        });
        answered += futures::future::join_all(queries)
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count() as u64;
        if (sent / batch).is_multiple_of(2) {
            let ns = format!("claimed-{}", sent / batch);
            if cache.workload_pods(&ns, "app=x").await.is_err() {
                refused_ns += 1;
            }
        }
        sent += batch;
        max_watches = max_watches.max(fake.open_watches());
        if last_report.elapsed() >= Duration::from_secs(10) {
            let lists = fake.requests().get("list pods").copied().unwrap_or(0);
            let secs = last_report.elapsed().as_secs_f64();
            println!(
                "t={:>3.0}s sent {sent} answered {answered}: LIST {:.1}/s, open watches {} \
                 (max {max_watches}), namespaces watched {}, pods cached {}, \
                 namespaces refused {refused_ns}, live heap +{:.1} MiB, KEDA selector failures {}",
                started.elapsed().as_secs_f64(),
                (lists - last_lists) as f64 / secs,
                fake.open_watches(),
                cache.watched(),
                cache.cached_pods(),
                (live() - base_heap) as f64 / (1024.0 * 1024.0),
                keda_failures.load(Ordering::Relaxed)
            );
            last_lists = lists;
            last_report = Instant::now();
        }
    }
    keda.abort();
    let req = fake.requests();
    println!(
        "total: {sent} selectors in {:.1} s ({:.0}/s achieved); LIST pods {}, WATCH pods {}, \
         max open watches {max_watches}; KEDA selector failures {}",
        started.elapsed().as_secs_f64(),
        sent as f64 / started.elapsed().as_secs_f64(),
        req.get("list pods").copied().unwrap_or(0),
        req.get("watch pods").copied().unwrap_or(0),
        keda_failures.load(Ordering::Relaxed)
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; parts and the child mode are plain words.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    match args.as_slice() {
        [mode, node] if mode == "peer" => run_peer(node.clone()).await,
        [] => {
            bench_latency().await;
            bench_latency_serve().await;
            bench_coalescing().await;
            bench_memory().await;
            bench_selectors().await;
        }
        [which] if which == "latency" => {
            bench_latency().await;
            bench_latency_serve().await;
        }
        [which] if which == "serve" => bench_latency_serve().await,
        [which] if which == "coalescing" => bench_coalescing().await,
        [which] if which == "memory" => bench_memory().await,
        [which] if which == "selectors" => bench_selectors().await,
        _ => {
            eprintln!(
                "usage: cargo xtask bench cluster [latency|serve|coalescing|memory|selectors]"
            );
            std::process::exit(2);
        }
    }
}
