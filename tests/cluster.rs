//! Four daemons on 127.0.0.1-4 with distinct node names and GPU loads, a
//! workload spread over three of them, and the fake Kubernetes API server
//! (support/kube_api.rs) for pods, EndpointSlices, ScaledObjects and scale
//! subresources. KEDA's calls go over real gRPC to any daemon.

use std::{net::IpAddr, time::Duration};

use gpu_scaler::cluster::MissingNodePolicy;
use gpu_scaler_tests::{
    cluster::{ClusterDaemon, ClusterSettings},
    kube_api::{
        FakeKube, ResourceType, endpoint_slice, peer_endpoint_slice, running_pod, scaled_job,
        scaled_object, workload,
    },
    scaler::{device, http_get, metric_value, process},
};

const WAIT: Duration = Duration::from_secs(15);

fn ip(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// GetMetrics exactly as KEDA sends it, through `d`.
async fn get_metrics(
    d: &ClusterDaemon,
    namespace: &str,
    name: &str,
    meta: &[(&str, &str)],
) -> Result<f64, tonic::Status> {
    metric_value(&mut d.client().await, namespace, name, meta).await
}

/// Polls every daemon in `daemons` until each returns `want` for the query.
async fn all_answer(
    daemons: &[&ClusterDaemon],
    namespace: &str,
    name: &str,
    meta: &[(&str, &str)],
    want: f64,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut got = Vec::new();
        for d in daemons {
            got.push((
                d.node.clone(),
                get_metrics(d, namespace, name, meta)
                    .await
                    .map_err(|s| s.message().to_owned()),
            ));
        }
        if got
            .iter()
            .all(|(_, v)| v.as_ref().is_ok_and(|v| *v == want))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {want} from every daemon, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const LLM: &[(&str, &str)] = &[("app", "llm")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_daemons_answer_the_same_for_a_workload_over_three_nodes() {
    let fake = FakeKube::start().await;
    let kubeconfig = fake.kubeconfig();
    let settings = ClusterSettings {
        kubeconfig: kubeconfig.path.clone(),
        namespace: "gpu-scaler".into(),
        service: "gpu-scaler-peers".into(),
        poll_interval: Duration::from_millis(200),
        peer_timeout: Duration::from_millis(500),
        policy: MissingNodePolicy::Average,
    };
    let mut daemons = Vec::new();
    for n in 1..=4u8 {
        daemons.push(ClusterDaemon::new(&format!("gpu-node-{n}"), ip(n), settings.clone()).await);
    }

    // The workload (Deployment llm, 4 replicas over nodes 1-3), a pod of
    // another app and a same-labelled pod of another namespace on node 4.
    let pods = ResourceType::pods();
    let uid = |n: u32| format!("00000000-0000-4000-8000-0000000000{n:02}");
    let web: &[(&str, &str)] = &[("app", "web")];
    for (ns, name, n, labels, node) in [
        ("ml", "llm-1", 1, LLM, "gpu-node-1"),
        ("ml", "llm-2", 2, LLM, "gpu-node-2"),
        ("ml", "llm-3", 3, LLM, "gpu-node-3"),
        ("ml", "llm-4", 4, LLM, "gpu-node-3"),
        ("ml", "web-1", 10, web, "gpu-node-4"),
        ("other", "llm-1", 20, LLM, "gpu-node-4"),
    ] {
        fake.apply(&pods, running_pod(ns, name, &uid(n), labels, node));
    }
    fake.apply(&ResourceType::deployments(), workload("ml", "llm", 4, LLM));
    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "llm-so", (None, None, "llm")),
    );
    for d in &daemons {
        fake.apply(
            &ResourceType::endpoint_slices(),
            peer_endpoint_slice("gpu-scaler", "gpu-scaler-peers", &d.node, d.peer_addr),
        );
    }

    // GPU load: SM % per pod (pid -> pod through the attributor).
    daemons[0].attributor.assign(101, &uid(1));
    daemons[0].set_gpus(vec![device(0, 60, 200.0, vec![process(101, 30, 10, 4096)])]);
    daemons[1].attributor.assign(201, &uid(2));
    daemons[1].set_gpus(vec![device(0, 65, 300.0, vec![process(201, 45, 20, 8192)])]);
    daemons[2].attributor.assign(301, &uid(3));
    daemons[2].attributor.assign(302, &uid(4));
    daemons[2].set_gpus(vec![device(
        0,
        70,
        250.0,
        vec![process(301, 20, 5, 2048), process(302, 25, 5, 2048)],
    )]);
    daemons[3].attributor.assign(401, &uid(10));
    daemons[3].attributor.assign(402, &uid(20));
    daemons[3].set_gpus(vec![device(
        0,
        50,
        150.0,
        vec![process(401, 60, 0, 1024), process(402, 50, 0, 1024)],
    )]);
    for d in &mut daemons {
        d.start().await;
    }
    let all: Vec<&ClusterDaemon> = daemons.iter().collect();

    // Through any daemon: the sum over the four replicas on three nodes, with
    // podSelector and without it (scale subresource of the Deployment).
    let by_selector: &[(&str, &str)] = &[("podSelector", "app=llm")];
    all_answer(&all, "ml", "llm-so", by_selector, 120.0).await;
    all_answer(&all, "ml", "llm-so", &[], 120.0).await;
    all_answer(
        &all,
        "ml",
        "llm-so",
        &[("metric", "memory_used_mib")],
        16384.0,
    )
    .await;
    // Namespaces never mix: the same labels in `other` are only that pod.
    all_answer(&all, "other", "x", by_selector, 50.0).await;

    // A ScaledObject without podSelector whose target does not exist: a clear
    // error naming it, from every daemon.
    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "ghost-so", (None, None, "ghost")),
    );
    let e = get_metrics(&daemons[3], "ml", "ghost-so", &[])
        .await
        .expect_err("no target");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("Deployment ghost"), "{}", e.message());

    // Node 2 goes away: 3 of 4 pods reported, so llm-2 counts as their mean
    // ((30 + 20 + 25) / 3 = 25): 30 + 20 + 25 + 25 = 100 from every daemon left.
    daemons[1].stop().await;
    let up: Vec<&ClusterDaemon> = daemons.iter().filter(|d| d.node != "gpu-node-2").collect();
    all_answer(&up, "ml", "llm-so", by_selector, 100.0).await;
    let averaged = daemons[0]
        .metrics
        .as_ref()
        .map(|m| m.missing_nodes(true))
        .unwrap_or(0);
    assert!(averaged > 0, "the policy was applied and counted");

    // Node 3 too: 1 of 4 reported, fewer than half: UNAVAILABLE, never a number.
    daemons[2].stop().await;
    // (Answers cached within the poll interval may still be served first.)
    let deadline = tokio::time::Instant::now() + WAIT;
    let e = loop {
        match get_metrics(&daemons[0], "ml", "llm-so", by_selector).await {
            Err(e) => break e,
            Ok(v) => assert!(
                tokio::time::Instant::now() < deadline,
                "still answering {v}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("only 1 of 4"), "{}", e.message());

    // Both back: exact again, everywhere.
    daemons[1].start().await;
    daemons[2].start().await;
    let all: Vec<&ClusterDaemon> = daemons.iter().collect();
    all_answer(&all, "ml", "llm-so", by_selector, 120.0).await;

    // llm-4 is rescheduled to node 4 (a new pod; its process now runs there).
    fake.delete(&pods, "ml", "llm-4");
    fake.apply(
        &pods,
        running_pod("ml", "llm-4b", &uid(5), LLM, "gpu-node-4"),
    );
    daemons[3].attributor.assign(403, &uid(5));
    daemons[3].set_gpus(vec![device(
        0,
        50,
        150.0,
        vec![
            process(401, 60, 0, 1024),
            process(402, 50, 0, 1024),
            process(403, 35, 0, 1024),
        ],
    )]);
    all_answer(&all, "ml", "llm-so", by_selector, 130.0).await;
    all_answer(&all, "ml", "llm-so", &[], 130.0).await;

    for d in &mut daemons {
        d.stop().await;
    }
}

/// A ScaledJob without podSelector: KEDA sends its name where a ScaledObject's
/// goes; the daemon finds no ScaledObject of that name, then the ScaledJob, and
/// measures its Jobs' pods (`scaledjob.keda.sh/name=<name>`, the label KEDA
/// puts on their template). A ScaledObject of the same name comes first. A
/// trigger with `metricType: Value` is refused with KEDA's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaled_jobs_without_pod_selector_measure_their_jobs_pods() {
    let fake = FakeKube::start().await;
    fake.register(ResourceType::scaled_jobs());
    let kubeconfig = fake.kubeconfig();
    let settings = ClusterSettings {
        kubeconfig: kubeconfig.path.clone(),
        namespace: "gpu-scaler".into(),
        service: "gpu-scaler-peers".into(),
        poll_interval: Duration::from_millis(200),
        peer_timeout: Duration::from_millis(500),
        policy: MissingNodePolicy::Average,
    };
    let mut daemon = ClusterDaemon::new("gpu-node-1", ip(1), settings).await;
    let pods = ResourceType::pods();
    let uid = |n: u32| format!("00000000-0000-4000-8000-0000000001{n:02}");
    fn job(n: &str) -> [(&str, &str); 2] {
        [("scaledjob.keda.sh/name", "batch"), ("job-name", n)]
    }
    fake.apply(
        &pods,
        running_pod("ml", "batch-a-x", &uid(1), &job("batch-a"), "gpu-node-1"),
    );
    fake.apply(
        &pods,
        running_pod("ml", "batch-b-y", &uid(2), &job("batch-b"), "gpu-node-1"),
    );
    // Another ScaledJob's pod and a Deployment's pod of the same namespace.
    fake.apply(
        &pods,
        running_pod(
            "ml",
            "other-z",
            &uid(3),
            &[("scaledjob.keda.sh/name", "other")],
            "gpu-node-1",
        ),
    );
    fake.apply(
        &pods,
        running_pod("ml", "web-1", &uid(4), &[("app", "web")], "gpu-node-1"),
    );
    fake.apply(
        &ResourceType::endpoint_slices(),
        peer_endpoint_slice(
            "gpu-scaler",
            "gpu-scaler-peers",
            &daemon.node,
            daemon.peer_addr,
        ),
    );
    let trigger: &[(&str, &str)] = &[
        ("scalerAddress", "gpu-scaler.gpu-scaler:6000"),
        ("targetValue", "50"),
    ];
    fake.apply(
        &ResourceType::scaled_jobs(),
        scaled_job("ml", "batch", None, trigger),
    );
    for (pid, n) in [(11, 1), (12, 2), (13, 3), (14, 4)] {
        daemon.attributor.assign(pid, &uid(n));
    }
    daemon.set_gpus(vec![device(
        0,
        60,
        200.0,
        vec![
            process(11, 40, 0, 1024),
            process(12, 35, 0, 1024),
            process(13, 5, 0, 1024),
            process(14, 7, 0, 1024),
        ],
    )]);
    daemon.start().await;
    let d = &daemon;

    // As KEDA polls a ScaledJob: spec, metrics, active. Its two Jobs' pods.
    all_answer(&[d], "ml", "batch", trigger, 75.0).await;
    let mut c = d.client().await;
    let o = gpu_scaler_tests::scaler::object_ref("ml", "batch", trigger);
    let spec = c
        .get_metric_spec(o.clone())
        .await
        .expect("spec")
        .into_inner();
    assert_eq!(spec.metric_specs[0].target_size_float, 50.0);
    assert!(c.is_active(o).await.expect("IsActive").into_inner().result);

    // A ScaledObject of the same name is found first (it scales web).
    fake.apply(
        &ResourceType::deployments(),
        workload("ml", "web", 1, &[("app", "web")]),
    );
    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "web-so", (None, None, "web")),
    );
    fake.apply(
        &ResourceType::scaled_jobs(),
        scaled_job("ml", "web-so", None, trigger),
    );
    all_answer(&[d], "ml", "web-so", trigger, 7.0).await;

    // metricType Value: KEDA would read the target as 0 and make no Job.
    let value_trigger: &[(&str, &str)] = &[
        ("scalerAddress", "gpu-scaler.gpu-scaler:6000"),
        ("targetValue", "40"),
    ];
    fake.apply(
        &ResourceType::scaled_jobs(),
        scaled_job("ml", "by-value", Some("Value"), value_trigger),
    );
    let e = get_metrics(d, "ml", "by-value", value_trigger)
        .await
        .expect_err("Value refused");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("metricType Value") && e.message().contains("AverageValue"),
        "{}",
        e.message()
    );
    // Neither exists: the message says both were looked for.
    let e = get_metrics(d, "ml", "nothing", trigger)
        .await
        .expect_err("not found");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("nor a ScaledJob"), "{}", e.message());
    daemon.stop().await;
}

/// `gpu_scaler_peers{state}` of the daemon's /metrics, as (ready, not_ready);
/// `None` for a state without a sample.
async fn peers_gauge(d: &ClusterDaemon) -> (Option<f64>, Option<f64>) {
    let (code, body) = http_get(d.http_addr(), "/metrics").await;
    assert_eq!(code, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("/metrics parses as Prometheus text format");
    let state = |s: &str| {
        let found: Vec<f64> = scrape
            .samples
            .iter()
            .filter(|x| x.metric == "gpu_scaler_peers" && x.labels.get("state") == Some(s))
            .map(|x| match x.value {
                prometheus_parse::Value::Gauge(v) => v,
                ref other => panic!("gpu_scaler_peers is not a gauge: {other:?}"),
            })
            .collect();
        assert!(found.len() <= 1, "gpu_scaler_peers{{state={s}}}: {found:?}");
        found.first().copied()
    };
    (state("ready"), state("not_ready"))
}

/// Polls the daemon's /metrics until the peers gauge reads (ready, not_ready).
async fn await_peers_gauge(d: &ClusterDaemon, what: &str, ready: f64, not_ready: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = peers_gauge(d).await;
        if got == (Some(ready), Some(not_ready)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: gpu_scaler_peers (ready, not_ready) is {got:?}, expected ({ready}, {not_ready})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `slice` with the endpoint at `index` marked not ready, as the EndpointSlice
/// controller marks a daemon pod failing its readiness probe.
fn not_ready(mut slice: serde_json::Value, index: usize) -> serde_json::Value {
    slice["endpoints"][index]["conditions"]["ready"] = serde_json::Value::Bool(false);
    slice
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peers_gauge_follows_endpoint_slice_readiness() {
    let fake = FakeKube::start().await;
    let kubeconfig = fake.kubeconfig();
    let settings = ClusterSettings {
        kubeconfig: kubeconfig.path.clone(),
        namespace: "gpu-scaler".into(),
        service: "gpu-scaler-peers".into(),
        poll_interval: Duration::from_millis(200),
        peer_timeout: Duration::from_millis(500),
        policy: MissingNodePolicy::Average,
    };
    let mut daemon = ClusterDaemon::new("gpu-node-1", ip(11), settings).await;
    daemon.start().await;
    let slices = ResourceType::endpoint_slices();
    // Node 1 ready; node 2's daemon failing its probe; node 3 in a rolling
    // update (the old pod not ready, the new one ready): node 3 is ready.
    fake.apply(
        &slices,
        not_ready(
            not_ready(
                endpoint_slice(
                    "gpu-scaler",
                    "peers-a",
                    "gpu-scaler-peers",
                    &[
                        ("gpu-node-1", "127.0.0.11"),
                        ("gpu-node-2", "10.0.0.2"),
                        ("gpu-node-3", "10.0.0.30"),
                        ("gpu-node-3", "10.0.0.31"),
                    ],
                    6001,
                ),
                1,
            ),
            2,
        ),
    );
    // Another Service's endpoints are no peers, ready or not.
    fake.apply(
        &slices,
        not_ready(
            endpoint_slice(
                "gpu-scaler",
                "unrelated",
                "other-svc",
                &[("gpu-node-9", "10.0.0.9")],
                6001,
            ),
            0,
        ),
    );
    await_peers_gauge(&daemon, "two ready, one not", 2.0, 1.0).await;

    // Node 2 passes its probe; node 4 joins, not ready yet, in a second slice.
    fake.apply(
        &slices,
        not_ready(
            endpoint_slice(
                "gpu-scaler",
                "peers-a",
                "gpu-scaler-peers",
                &[
                    ("gpu-node-1", "127.0.0.11"),
                    ("gpu-node-2", "10.0.0.2"),
                    ("gpu-node-3", "10.0.0.31"),
                ],
                6001,
            ),
            2,
        ),
    );
    fake.apply(
        &slices,
        not_ready(
            endpoint_slice(
                "gpu-scaler",
                "peers-b",
                "gpu-scaler-peers",
                &[("gpu-node-4", "10.0.0.4")],
                6001,
            ),
            0,
        ),
    );
    // Node 3's only endpoint is now the not-ready one.
    await_peers_gauge(&daemon, "node 2 ready, nodes 3 and 4 not", 2.0, 2.0).await;

    fake.delete(&slices, "gpu-scaler", "peers-b");
    fake.delete(&slices, "gpu-scaler", "peers-a");
    await_peers_gauge(&daemon, "every slice gone", 0.0, 0.0).await;
    daemon.stop().await;
}
