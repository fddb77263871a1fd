//! Engine signals end to end, with real processes and real sockets: two
//! `gpu-scaler serve` processes as nodes (static `--peers`, the whole cluster
//! in `--pods-file`), and the pods' engines as real HTTP servers on their pod
//! IPs (127.0.0.x). KEDA's GetMetrics goes to either daemon; every expected
//! value is computed by hand from the expositions below.
//!
//! No root needed: engine figures do not depend on attribution (procfs).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use gpu_scaler::scaler::proto::external_scaler_client::ExternalScalerClient;
use gpu_scaler_tests::{
    engine::{FakeEngine, triton_exposition, vllm_exposition},
    scaler::metric_value,
    serve::{ServeProcess, free_port, http_get},
    wait_for,
};

const POLL: &str = "250ms";
const SETTLE: Duration = Duration::from_secs(15);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// One pod of the PodList: (namespace, name, node, ip, labels, metrics port).
struct PodSpec<'a> {
    ns: &'a str,
    name: &'a str,
    node: &'a str,
    ip: IpAddr,
    app: &'a str,
    port: u16,
}

fn pod_list(pods: &[PodSpec<'_>]) -> String {
    let items: Vec<serde_json::Value> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::json!({
                "kind": "Pod",
                "metadata": {
                    "name": p.name, "namespace": p.ns,
                    "uid": format!("00000000-0000-0000-0000-{:012}", i + 1),
                    "labels": {"app": p.app},
                    "annotations": {"prometheus.io/port": p.port.to_string(), "other": "x"},
                },
                "spec": {"nodeName": p.node},
                "status": {
                    "phase": "Running", "podIP": p.ip.to_string(),
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            })
        })
        .collect();
    serde_json::json!({"kind": "List", "items": items}).to_string()
}

/// A daemon of the test cluster (SIGKILLed when dropped).
struct Node {
    _serve: ServeProcess,
    grpc: SocketAddr,
    /// Its /metrics, /v1/snapshot.
    http: SocketAddr,
}

fn start_node(name: &str, grpc: SocketAddr, peer: SocketAddr, peers: &str, dir: &Path) -> Node {
    let http = SocketAddr::new(grpc.ip(), free_port(grpc.ip()));
    let scenario = dir.join(format!("{name}.toml"));
    std::fs::write(
        &scenario,
        "[[gpu]]\nmemory_total_mib = 81920\nutilization = 0\nmemory_utilization = 0\n\
         temperature_c = 40\npower_w = 60.0\npower_limit_w = 700.0\n",
    )
    .expect("scenario");
    let args: Vec<String> = [
        "--node-name",
        name,
        "--attribution",
        "procfs",
        "--gpu",
        "mock",
        "--poll-interval",
        POLL,
        "--peer-timeout",
        "1s",
    ]
    .into_iter()
    .map(String::from)
    .chain([
        "--gpu-scenario".into(),
        scenario.to_str().expect("utf-8").into(),
        "--pods-file".into(),
        dir.join("pods.json").to_str().expect("utf-8").into(),
        "--listen".into(),
        grpc.to_string(),
        "--metrics-listen".into(),
        http.to_string(),
        "--peer-listen".into(),
        peer.to_string(),
        "--peers".into(),
        peers.into(),
    ])
    .collect();
    let mut serve = ServeProcess::spawn(name, args, &dir.join(format!("{name}.log")));
    serve.wait_ready(http);
    Node {
        _serve: serve,
        grpc,
        http,
    }
}

/// Runs `call` with a scaler client of `node`, on a runtime of its own (the
/// tests are sync).
fn with_client<T>(
    node: &Node,
    call: impl AsyncFnOnce(&mut ExternalScalerClient<tonic::transport::Channel>) -> T,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut c = ExternalScalerClient::connect(format!("http://{}", node.grpc))
            .await
            .expect("connect");
        call(&mut c).await
    })
}

/// GetMetrics on `node` as KEDA sends it.
fn ask(node: &Node, ns: &str, meta: &[(&str, &str)]) -> Result<f64, tonic::Status> {
    with_client(node, async |c| metric_value(c, ns, "so", meta).await)
}

/// Waits until every node answers `want` (within `tol`).
fn all_answer(nodes: &[&Node], ns: &str, meta: &[(&str, &str)], want: f64, tol: f64) {
    for n in nodes {
        let mut last = None;
        let hit = wait_for(SETTLE, || {
            let r = ask(n, ns, meta);
            let ok = matches!(&r, Ok(v) if (v - want).abs() <= tol);
            last = Some(r);
            ok.then_some(())
        });
        assert!(
            hit.is_some(),
            "{meta:?} at {}: last answer {last:?}, want {want}",
            n.grpc
        );
    }
}

/// Waits until `node` refuses with UNAVAILABLE; returns the message.
fn refused(node: &Node, ns: &str, meta: &[(&str, &str)]) -> String {
    let mut last = None;
    let hit = wait_for(SETTLE, || {
        let r = ask(node, ns, meta);
        let hit = match &r {
            Err(s) if s.code() == tonic::Code::Unavailable => Some(s.message().to_owned()),
            _ => None,
        };
        last = Some(r);
        hit
    });
    hit.unwrap_or_else(|| panic!("{meta:?}: not UNAVAILABLE, last {last:?}"))
}

#[test]
fn engine_figures_summed_across_nodes_and_engine_failures_count_as_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One port for every engine, each on its own pod IP.
    let port = free_port(ip(11));
    let addr = |last| SocketAddr::new(ip(last), port);

    // vLLM >= 0.12, two data-parallel engines each: waiting 3+4, 2, 5+0.
    let vllm0 = FakeEngine::start(addr(11), &vllm_exposition(&[(3, 1, 0.5), (4, 1, 0.7)]));
    let vllm1 = FakeEngine::start(addr(12), &vllm_exposition(&[(2, 2, 0.2)]));
    let mut vllm2 = FakeEngine::start(addr(13), &vllm_exposition(&[(5, 0, 0.9), (0, 3, 0.1)]));
    // Same labels in another namespace: never counted, never read.
    let other = FakeEngine::start(addr(14), &vllm_exposition(&[(1000, 0, 1.0)]));
    // The host of keda-gpu-scaler's vllmEndpoint URL: never contacted.
    let url_host = FakeEngine::start(addr(99), &vllm_exposition(&[(500, 0, 1.0)]));
    // Triton: (model, requests/s, queue ms per request).
    let triton_a = FakeEngine::start_with(
        addr(21),
        Box::new(|t| triton_exposition(&[("resnet", 30.0, 50.0), ("bert", 10.0, 10.0)], t)),
    );
    let triton_b = FakeEngine::start_with(
        addr(22),
        Box::new(|t| triton_exposition(&[("resnet", 20.0, 20.0)], t)),
    );

    let pods = [
        PodSpec {
            ns: "ml",
            name: "vllm-0",
            node: "node-a",
            ip: ip(11),
            app: "vllm",
            port,
        },
        PodSpec {
            ns: "ml",
            name: "vllm-1",
            node: "node-a",
            ip: ip(12),
            app: "vllm",
            port,
        },
        PodSpec {
            ns: "ml",
            name: "vllm-2",
            node: "node-b",
            ip: ip(13),
            app: "vllm",
            port,
        },
        PodSpec {
            ns: "other",
            name: "vllm-x",
            node: "node-a",
            ip: ip(14),
            app: "vllm",
            port,
        },
        PodSpec {
            ns: "ml",
            name: "triton-a",
            node: "node-a",
            ip: ip(21),
            app: "triton",
            port,
        },
        PodSpec {
            ns: "ml",
            name: "triton-b",
            node: "node-b",
            ip: ip(22),
            app: "triton",
            port,
        },
    ];
    std::fs::write(dir.path().join("pods.json"), pod_list(&pods)).expect("pods file");

    let (ga, gb) = (
        SocketAddr::new(ip(1), free_port(ip(1))),
        SocketAddr::new(ip(2), free_port(ip(2))),
    );
    let (pa, pb) = (
        SocketAddr::new(ip(1), free_port(ip(1))),
        SocketAddr::new(ip(2), free_port(ip(2))),
    );
    let peers = format!("node-a={pa},node-b={pb}");
    let a = start_node("node-a", ga, pa, &peers, dir.path());
    let b = start_node("node-b", gb, pb, &peers, dir.path());

    // keda-gpu-scaler's own example, plus a podSelector: every selected pod is
    // read at its own IP, the URL's host never.
    let url = format!("http://{}/metrics", addr(99));
    let queue: &[(&str, &str)] = &[
        ("podSelector", "app=vllm"),
        ("profile", "vllm-queue-depth"),
        ("vllmEndpoint", &url),
    ];
    all_answer(&[&a, &b], "ml", queue, 14.0, 0.0);
    assert_eq!(url_host.requests(), 0, "the URL's host is never contacted");
    assert_eq!(
        other.requests(),
        0,
        "pods of another namespace are never read"
    );
    all_answer(&[&a, &b], "other", queue, 1000.0, 0.0);

    // KV cache: mean over each pod's engines, summed: 0.6 + 0.2 + 0.5.
    let kv: &[(&str, &str)] = &[
        ("podSelector", "app=vllm"),
        ("metric", "vllm_kv_cache_usage"),
    ];
    all_answer(&[&a, &b], "ml", kv, 1.3, 1e-9);
    // keda-gpu-scaler's metricType means a percentage.
    let kv_pct: &[(&str, &str)] = &[
        ("podSelector", "app=vllm"),
        ("metricType", "vllm_kv_cache_usage"),
    ];
    all_answer(&[&a, &b], "ml", kv_pct, 130.0, 1e-6);

    // A gauge that moves shows on the next polls.
    vllm1.set(&vllm_exposition(&[(6, 2, 0.2)]));
    all_answer(&[&a, &b], "ml", queue, 18.0, 0.0);

    // Triton, from counters between two reads: per request, over all models.
    // triton-a: (30*50 + 10*10) / 40 = 40 ms; triton-b: 20 ms.
    let wait: &[(&str, &str)] = &[
        ("podSelector", "app=triton"),
        ("profile", "triton-queue-wait"),
    ];
    all_answer(&[&a, &b], "ml", wait, 60.0, 1e-6);
    let rate: &[(&str, &str)] = &[
        ("podSelector", "app=triton"),
        ("metric", "triton_request_rate"),
    ];
    // 40/s + 20/s, measured between reads a poll apart: within 25 %.
    all_answer(&[&a, &b], "ml", rate, 60.0, 15.0);
    // An engine restart: counters start again from 0; never a negative wait.
    triton_b.set_with(Box::new(|t| {
        triton_exposition(&[("resnet", 20.0, 20.0)], t)
    }));
    all_answer(&[&a, &b], "ml", wait, 60.0, 1e-6);
    assert!(triton_a.requests() > 0);

    // One engine down of three: `average` counts it as the mean of the other
    // two ((7 + 6) / 2), on both daemons.
    vllm2.stop();
    all_answer(&[&a, &b], "ml", queue, 19.5, 1e-9);
    // Two down: fewer than half reported, UNAVAILABLE (never a number).
    vllm1.set_status(503);
    let why = refused(&a, "ml", queue);
    assert!(why.contains("fewer than half"), "{why}");
    let why = refused(&b, "ml", queue);
    assert!(why.contains("fewer than half"), "{why}");
    assert!(vllm0.requests() > 0);
}

/// IsActive as KEDA asks it, on `node`.
fn is_active(node: &Node, ns: &str, meta: &[(&str, &str)]) -> Result<bool, tonic::Status> {
    with_client(node, async |c| {
        c.is_active(gpu_scaler_tests::scaler::object_ref(ns, "so", meta))
            .await
            .map(|r| r.into_inner().result)
    })
}

/// The node's /metrics and /v1/snapshot show each read engine and its figures;
/// a workload at zero replicas activates from its router's queue.
#[test]
fn engine_figures_in_metrics_and_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port(ip(31));
    let engine = FakeEngine::start(
        SocketAddr::new(ip(31), port),
        &vllm_exposition(&[(9, 1, 0.25)]),
    );
    let router_text = |queued: u32| {
        format!(
            "# HELP vllm_router_num_queued_requests Requests queued at the router\n\
             # TYPE vllm_router_num_queued_requests gauge\n\
             vllm_router_num_queued_requests{{server=\"none\"}} {queued}\n"
        )
    };
    let router = FakeEngine::start(SocketAddr::new(ip(32), port), &router_text(0));
    let pods = [
        PodSpec {
            ns: "ml",
            name: "solo",
            node: "node-a",
            ip: ip(31),
            app: "solo",
            port,
        },
        PodSpec {
            ns: "ml",
            name: "router",
            node: "node-a",
            ip: ip(32),
            app: "router",
            port,
        },
    ];
    std::fs::write(dir.path().join("pods.json"), pod_list(&pods)).expect("pods file");
    let g = SocketAddr::new(ip(1), free_port(ip(1)));
    let p = SocketAddr::new(ip(1), free_port(ip(1)));
    let node = start_node("node-a", g, p, &format!("node-a={p}"), dir.path());
    let http = node.http;
    let meta: &[(&str, &str)] = &[("podSelector", "app=solo"), ("metric", "vllm_queue_depth")];
    all_answer(&[&node], "ml", meta, 9.0, 0.0);
    let series = format!(
        "gpu_scaler_pod_engine_figure{{namespace=\"ml\",pod=\"solo\",endpoint=\"{}/metrics\",figure=\"vllm_queue_depth\"}} 9.0",
        SocketAddr::new(ip(31), port)
    );
    let found = wait_for(SETTLE, || {
        http_get(http, "/metrics").and_then(|(_, body)| body.contains(&series).then_some(()))
    });
    assert!(
        found.is_some(),
        "{series} not in {:?}",
        http_get(http, "/metrics")
    );
    let (code, snap) = http_get(http, "/v1/snapshot").expect("snapshot");
    assert_eq!(code, 200);
    let snap: serde_json::Value = serde_json::from_str(&snap).expect("json");
    assert_eq!(snap["engines"][0]["pod"], "solo", "{snap}");
    assert_eq!(
        snap["engines"][0]["figures"]["vllm_queue_depth"]["ok"], 9.0,
        "{snap}"
    );
    assert!(engine.requests() > 0);

    // A workload scaled to zero (no pod matches app=idle-llm) wakes up from
    // the router's queue: IsActive follows the router, not the absent pods.
    let at_zero: &[(&str, &str)] = &[
        ("podSelector", "app=idle-llm"),
        ("metric", "vllm_queue_depth"),
        ("activationPodSelector", "app=router"),
        ("activationMetric", "engine"),
        ("activationEngineMetric", "vllm_router_num_queued_requests"),
        ("activationThreshold", "0"),
    ];
    all_answer(&[&node], "ml", at_zero, 0.0, 0.0);
    let settle = |want: bool| {
        let hit = wait_for(SETTLE, || {
            (is_active(&node, "ml", at_zero).ok() == Some(want)).then_some(())
        });
        assert!(
            hit.is_some(),
            "IsActive never became {want}: {:?}",
            is_active(&node, "ml", at_zero)
        );
    };
    settle(false);
    router.set(&router_text(3));
    settle(true);
    router.set(&router_text(0));
    settle(false);
    // Without the activation selector the same trigger could never activate.
    let own_only: &[(&str, &str)] = &[
        ("podSelector", "app=idle-llm"),
        ("metric", "vllm_queue_depth"),
    ];
    router.set(&router_text(3));
    settle_value(&node, own_only);
}

/// The trigger's own value stays 0 and IsActive false with no pod.
fn settle_value(node: &Node, meta: &[(&str, &str)]) {
    all_answer(&[node], "ml", meta, 0.0, 0.0);
    assert_eq!(is_active(node, "ml", meta).ok(), Some(false));
}
