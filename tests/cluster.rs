//! Four daemons on 127.0.0.1-4 with distinct node names and GPU loads, a
//! workload spread over three of them, and the fake Kubernetes API server
//! (support/kube_api.rs) for pods, EndpointSlices, ScaledObjects and scale
//! subresources. KEDA's calls go over real gRPC to any daemon.

use std::{net::IpAddr, time::Duration};

use gpu_scaler::cluster::{MissingNodePolicy, Stats};
use gpu_scaler_tests::{
    cluster::{ClusterDaemon, ClusterSettings},
    kube_api::{FakeKube, ResourceType, peer_endpoint_slice, running_pod, scaled_object, workload},
    scaler::{device, metric_value, process},
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
        .stats
        .as_ref()
        .map(|s| Stats::get(&s.missing_averaged))
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
