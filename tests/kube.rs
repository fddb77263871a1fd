//! The daemon's Kubernetes code (kube-rs client, kube-runtime watcher, API
//! discovery, scale subresource) against the fake API server in
//! `support/kube_api.rs`, over real HTTP in the real JSON wire format.

use std::{sync::Arc, time::Duration};

use gpu_scaler::{
    cluster::{
        Error,
        discovery::{EndpointPeers, PeerBook as _},
        target::{ScaleTarget, TargetResolver},
        workload::{CacheLimits, PodDirectory as _, WorkloadPods},
    },
    pods::kube::{PodMap, PodWatch, client},
};
use gpu_scaler_tests::kube_api::{
    FakeKube, Kubeconfig, ResourceType, endpoint_slice, pod, scaled_object, wait_until, workload,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// A client configured through a kubeconfig file, as `--kubeconfig` would be.
async fn connect(fake: &FakeKube) -> (kube::Client, Kubeconfig) {
    let config = fake.kubeconfig();
    (
        client(Some(&config.path))
            .await
            .expect("client from kubeconfig"),
        config,
    )
}

fn names(pods: &PodMap) -> Vec<String> {
    let mut v: Vec<String> = pods
        .values()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    v.sort();
    v
}

/// The error under any [`Error::Shared`] (cached and coalesced errors are shared).
fn root(e: &Error) -> &Error {
    match e {
        Error::Shared(inner) => root(inner),
        e => e,
    }
}

fn current_names(w: &PodWatch) -> Vec<String> {
    w.current().map(|p| names(&p)).unwrap_or_default()
}

#[tokio::test]
async fn node_watch_follows_pods_through_bookmarks_and_410_relists() {
    let fake = FakeKube::start().await;
    fake.set_bookmark_interval(Duration::from_millis(50));
    let pods = ResourceType::pods();
    fake.apply(
        &pods,
        pod(
            "ml",
            "a",
            "uid-a",
            &[("app", "x")],
            Some("gpu-1"),
            "Running",
            true,
        ),
    );
    fake.apply(
        &pods,
        pod(
            "other",
            "b",
            "uid-b",
            &[("app", "y")],
            Some("gpu-1"),
            "Running",
            false,
        ),
    );
    fake.apply(
        &pods,
        pod(
            "ml",
            "c",
            "uid-c",
            &[("app", "x")],
            Some("gpu-2"),
            "Running",
            true,
        ),
    );
    let (client, _dir) = connect(&fake).await;

    let watch = PodWatch::node(client, "gpu-1");
    let first = watch.ready(WAIT).await.expect("first list");
    assert_eq!(
        names(&first),
        ["ml/a", "other/b"],
        "only pods on gpu-1, every namespace"
    );
    let b = first.get("uid-b").expect("pod b by uid");
    assert_eq!(b.node_name.as_deref(), Some("gpu-1"));
    assert!(!b.ready, "readiness comes from the Ready condition");
    assert_eq!(b.labels.get("app").map(String::as_str), Some("y"));
    // The node's own pods keep their container statuses, id without scheme.
    let main: Vec<_> = b
        .containers
        .iter()
        .map(|c| (c.name.as_str(), c.id.clone()))
        .collect();
    assert_eq!(
        main,
        [(
            "main",
            Some(gpu_scaler_tests::kube_api::container_id_of("uid-b"))
        )]
    );

    // A pod scheduled onto the node appears; one moved away disappears (the
    // fake sends DELETED when an object leaves the field selector).
    fake.apply(
        &pods,
        pod("ml", "d", "uid-d", &[], Some("gpu-1"), "Pending", false),
    );
    fake.apply(
        &pods,
        pod(
            "ml",
            "a",
            "uid-a",
            &[("app", "x")],
            Some("gpu-3"),
            "Running",
            true,
        ),
    );
    wait_until("d appears and a leaves", WAIT, || {
        current_names(&watch) == ["ml/d", "other/b"]
    })
    .await;

    // Bookmarks flow without disturbing the set.
    wait_until("bookmarks sent", WAIT, || {
        fake.requests()
            .get("bookmark pods")
            .is_some_and(|n| *n >= 2)
    })
    .await;
    assert_eq!(current_names(&watch), ["ml/d", "other/b"]);

    // 410 Gone: the watcher must re-list; a pod deleted while it does and one
    // added must both be reflected, without a DELETED event for the first.
    let lists_before = fake.requests().get("list pods").copied().unwrap_or(0);
    fake.expire_watches();
    fake.delete(&pods, "other", "b");
    fake.apply(
        &pods,
        pod("ml", "e", "uid-e", &[], Some("gpu-1"), "Running", true),
    );
    wait_until("re-listed after 410", WAIT, || {
        current_names(&watch) == ["ml/d", "ml/e"]
    })
    .await;
    let lists_after = fake.requests().get("list pods").copied().unwrap_or(0);
    assert!(
        lists_after > lists_before,
        "410 must cause a re-list ({lists_before} -> {lists_after})"
    );
}

#[tokio::test]
async fn workload_pods_one_watch_per_namespace_selected_locally_and_evicted_when_idle() {
    let fake = FakeKube::start().await;
    // Bookmarks show the fake that a dropped watch's client is gone.
    fake.set_bookmark_interval(Duration::from_millis(50));
    let pods = ResourceType::pods();
    fake.apply(
        &pods,
        pod(
            "ml",
            "w-1",
            "u1",
            &[("app", "vllm"), ("tier", "gpu")],
            Some("n1"),
            "Running",
            true,
        ),
    );
    fake.apply(
        &pods,
        pod(
            "ml",
            "w-2",
            "u2",
            &[("app", "vllm"), ("tier", "edge")],
            Some("n2"),
            "Running",
            true,
        ),
    );
    fake.apply(
        &pods,
        pod(
            "ml",
            "w-3",
            "u3",
            &[("app", "vllm"), ("canary", "1")],
            Some("n2"),
            "Running",
            true,
        ),
    );
    fake.apply(
        &pods,
        pod(
            "other",
            "w-1",
            "u4",
            &[("app", "vllm"), ("tier", "gpu")],
            Some("n1"),
            "Running",
            true,
        ),
    );
    let (client, _dir) = connect(&fake).await;
    let cache = WorkloadPods::new(
        client,
        CacheLimits {
            idle: Duration::from_millis(600),
            max_namespaces: 2,
            first_list: WAIT,
            ..CacheLimits::default()
        },
    );

    let sel = "app=vllm,tier in (gpu,edge),!canary";
    let got = futures::future::join_all((0..20).map(|_| cache.workload_pods("ml", sel))).await;
    for g in &got {
        assert_eq!(names(g.as_ref().expect("pods")), ["ml/w-1", "ml/w-2"]);
    }
    assert!(
        got[0]
            .as_ref()
            .expect("pods")
            .values()
            .all(|p| p.containers.is_empty()),
        "workload caches keep no container statuses"
    );
    wait_until("the watch started", WAIT, || {
        fake.requests().contains_key("watch pods")
    })
    .await;
    let req = fake.requests();
    assert_eq!(
        req.get("list pods"),
        Some(&1),
        "20 queries share one list: {req:?}"
    );
    assert_eq!(req.get("watch pods"), Some(&1), "and one watch: {req:?}");
    assert_eq!(cache.watched(), 1);

    // Changes arrive through the shared watch.
    fake.apply(
        &pods,
        pod(
            "ml",
            "w-4",
            "u5",
            &[("app", "vllm"), ("tier", "gpu")],
            Some("n3"),
            "Running",
            true,
        ),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    while cache.workload_pods("ml", sel).await.expect("pods").len() != 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "new replica never seen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Other selectors in the namespace cost the API server nothing more.
    for i in 0..50 {
        cache
            .workload_pods("ml", &format!("app=vllm,tier!=t{i}"))
            .await
            .expect("pods");
    }
    let e = cache
        .workload_pods("ml", "app in (a")
        .await
        .expect_err("bad selector");
    assert!(e.to_string().contains("app in (a"), "{e}");
    let req = fake.requests();
    assert_eq!(req.get("list pods"), Some(&1), "{req:?}");
    assert_eq!(req.get("watch pods"), Some(&1), "{req:?}");

    // Namespaced: the other namespace's same-labelled pod is not the workload's.
    let other = cache.workload_pods("other", sel).await.expect("pods");
    assert_eq!(names(&other), ["other/w-1"]);
    assert_eq!(cache.watched(), 2);

    // Bounded: a third namespace is refused while both are in use; the ones in
    // use keep answering.
    let e = cache
        .workload_pods("third", "app=x")
        .await
        .expect_err("over the namespace budget");
    assert!(e.to_string().contains("in use"), "{e}");
    assert_eq!(cache.watched(), 2);
    assert_eq!(
        cache.workload_pods("ml", sel).await.expect("pods").len(),
        3,
        "the namespace in use is never dropped for a new one"
    );
    wait_until("both watch streams open at the API server", WAIT, || {
        fake.open_watches() == 2
    })
    .await;

    // Idle watches stop on their own, and their streams really close.
    wait_until("idle watches stopped", WAIT, || cache.watched() == 0).await;
    wait_until("the API server sees the streams close", WAIT, || {
        fake.open_watches() == 0
    })
    .await;
}

#[tokio::test]
async fn a_pod_list_older_than_the_age_limit_during_an_outage_is_unavailable() {
    let fake = FakeKube::start().await;
    fake.set_bookmark_interval(Duration::from_millis(50));
    let pods = ResourceType::pods();
    fake.apply(
        &pods,
        pod(
            "ml",
            "w-1",
            "u1",
            &[("app", "w")],
            Some("n1"),
            "Running",
            true,
        ),
    );
    let (client, _dir) = connect(&fake).await;
    let max_stale = Duration::from_millis(800);
    let cache = WorkloadPods::new(
        client,
        CacheLimits {
            first_list: Duration::from_millis(500),
            max_stale,
            ..CacheLimits::default()
        },
    );
    assert_eq!(
        cache.workload_pods("ml", "app=w").await.expect("up").len(),
        1
    );

    fake.set_unavailable(true);
    // Within the age limit the last list still answers.
    wait_until("the watch sees the outage", WAIT, || {
        fake.requests().get("unavailable").copied().unwrap_or(0) > 0
    })
    .await;
    assert_eq!(
        cache
            .workload_pods("ml", "app=w")
            .await
            .expect("within the age limit")
            .len(),
        1
    );
    // Past it: UNAVAILABLE (a cluster error, never an empty or old list).
    tokio::time::sleep(max_stale + Duration::from_millis(200)).await;
    let e = cache
        .workload_pods("ml", "app=w")
        .await
        .expect_err("past the age limit");
    assert!(
        !e.is_user_error(),
        "an outage is UNAVAILABLE, not the user's error: {e}"
    );

    // Back up: answers again, with what changed meanwhile.
    fake.set_unavailable(false);
    fake.apply(
        &pods,
        pod(
            "ml",
            "w-2",
            "u2",
            &[("app", "w")],
            Some("n1"),
            "Running",
            true,
        ),
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match cache.workload_pods("ml", "app=w").await {
            Ok(p) if p.len() == 2 => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "never recovered: {:?}",
                other.map(|p| p.len())
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_client_rate_limit_bounds_requests_whatever_callers_ask() {
    let fake = FakeKube::start().await;
    let config = fake.kubeconfig();
    let limits = gpu_scaler::pods::kube::ClientLimits {
        qps: 10.0,
        burst: 5,
    };
    let client = gpu_scaler::pods::kube::client_with(Some(&config.path), limits)
        .await
        .expect("client");
    let started = std::time::Instant::now();
    let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, "ml");
    // 200 callers at once, for one second.
    let calls = futures::future::join_all((0..200).map(|i| {
        let api = api.clone();
        async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), api.get_opt(&format!("p{i}"))).await;
        }
    }));
    calls.await;
    let elapsed = started.elapsed().as_secs_f64();
    let served = fake.requests().get("get pods").copied().unwrap_or(0);
    let bound = 5.0 + 10.0 * elapsed + 1.0;
    assert!(
        (served as f64) <= bound,
        "{served} requests in {elapsed:.2}s; the limit allows at most {bound:.0}"
    );
    assert!(served >= 5, "the burst goes through at once: {served}");
}

#[tokio::test]
async fn scaled_objects_resolve_through_the_scale_subresource() {
    let fake = FakeKube::start().await;
    let (client, _dir) = connect(&fake).await;
    let resolver = TargetResolver::new(client, Duration::from_secs(30));

    // Default target kind: apps/v1 Deployment; selector rendered from spec.selector.
    fake.apply(
        &ResourceType::deployments(),
        workload("ml", "web", 3, &[("app", "web"), ("tier", "gpu")]),
    );
    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "web-so", (None, None, "web")),
    );
    let r = resolver
        .resolve("ml", "web-so")
        .await
        .expect("deployment resolves");
    assert_eq!(
        r.target,
        ScaleTarget {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            name: "web".into()
        }
    );
    assert_eq!(r.selector, "app=web,tier=gpu");

    // StatefulSet named explicitly.
    fake.apply(
        &ResourceType::stateful_sets(),
        workload("ml", "db", 2, &[("app", "db")]),
    );
    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "db-so", (Some("apps/v1"), Some("StatefulSet"), "db")),
    );
    assert_eq!(
        resolver
            .resolve("ml", "db-so")
            .await
            .expect("statefulset")
            .selector,
        "app=db"
    );

    // A custom resource with a scale subresource: plural found by discovery,
    // selector from its status (the CRD's labelSelectorPath).
    let isvc = ResourceType::new(
        "serving.example.com",
        "v1",
        "InferenceService",
        "inferenceservices",
        true,
    );
    fake.register(isvc.clone());
    fake.apply(
        &isvc,
        json!({"metadata": {"name": "llm", "namespace": "ml"}, "spec": {"replicas": 2},
               "status": {"replicas": 2, "selector": "serving.example.com/isvc=llm"}}),
    );
    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object(
            "ml",
            "llm-so",
            (
                Some("serving.example.com/v1"),
                Some("InferenceService"),
                "llm",
            ),
        ),
    );
    let r = resolver
        .resolve("ml", "llm-so")
        .await
        .expect("custom resource");
    assert_eq!(r.selector, "serving.example.com/isvc=llm");
    assert!(
        fake.requests()
            .contains_key("discovery serving.example.com/v1")
    );

    // Cached: a second resolution costs no API request.
    let scale_gets = fake.requests().get("scale inferenceservices").copied();
    resolver.resolve("ml", "llm-so").await.expect("cached");
    assert_eq!(
        fake.requests().get("scale inferenceservices").copied(),
        scale_gets
    );

    // Clear errors.
    let e = resolver
        .resolve("ml", "nope")
        .await
        .expect_err("missing ScaledObject");
    assert!(
        matches!(root(&e), Error::ScaledObjectNotFound { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("ml/nope"), "{e}");
    assert!(e.is_user_error());
    // Remembered for a while: asking again costs no request.
    let gets = fake.requests().get("get scaledobjects").copied();
    let again = resolver
        .resolve("ml", "nope")
        .await
        .expect_err("still missing");
    assert!(
        matches!(root(&again), Error::ScaledObjectNotFound { .. }),
        "{again}"
    );
    assert_eq!(
        fake.requests().get("get scaledobjects").copied(),
        gets,
        "negative cache"
    );

    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "ghost-so", (None, None, "ghost")),
    );
    let e = resolver
        .resolve("ml", "ghost-so")
        .await
        .expect_err("missing target");
    assert!(matches!(root(&e), Error::TargetNotFound { .. }), "{e}");
    assert!(e.to_string().contains("Deployment ghost"), "{e}");

    let noscale = ResourceType::new("example.com", "v1", "Widget", "widgets", false);
    fake.register(noscale.clone());
    fake.apply(
        &noscale,
        json!({"metadata": {"name": "w", "namespace": "ml"}}),
    );
    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "w-so", (Some("example.com/v1"), Some("Widget"), "w")),
    );
    let e = resolver
        .resolve("ml", "w-so")
        .await
        .expect_err("no scale subresource");
    assert!(matches!(root(&e), Error::NoScaleSubresource { .. }), "{e}");

    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "u-so", (Some("nothere.io/v1"), Some("Thing"), "t")),
    );
    let e = resolver
        .resolve("ml", "u-so")
        .await
        .expect_err("unknown kind");
    assert!(matches!(root(&e), Error::UnknownKind(_)), "{e}");

    fake.apply(
        &isvc,
        json!({"metadata": {"name": "fresh", "namespace": "ml"}, "spec": {"replicas": 1}}),
    );
    fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object(
            "ml",
            "fresh-so",
            (
                Some("serving.example.com/v1"),
                Some("InferenceService"),
                "fresh",
            ),
        ),
    );
    let e = resolver
        .resolve("ml", "fresh-so")
        .await
        .expect_err("no selector yet");
    assert!(matches!(root(&e), Error::NoSelector { .. }), "{e}");

    fake.apply(
        &ResourceType::scaled_objects(),
        json!({"metadata": {"name": "bad-so", "namespace": "ml"}, "spec": {}}),
    );
    let e = resolver
        .resolve("ml", "bad-so")
        .await
        .expect_err("no scaleTargetRef");
    assert!(e.to_string().contains("scaleTargetRef is missing"), "{e}");

    // A ScaledObject of another namespace is not visible from this one.
    let e = resolver
        .resolve("other", "web-so")
        .await
        .expect_err("other namespace");
    assert!(
        matches!(root(&e), Error::ScaledObjectNotFound { .. }),
        "{e}"
    );
}

#[tokio::test]
async fn peers_come_from_endpoint_slices() {
    let fake = FakeKube::start().await;
    let slices = ResourceType::endpoint_slices();
    fake.apply(
        &slices,
        endpoint_slice(
            "gpu-scaler",
            "peers-abc",
            "gpu-scaler-peers",
            &[("n1", "10.0.0.1"), ("n2", "10.0.0.2")],
            6001,
        ),
    );
    fake.apply(
        &slices,
        endpoint_slice(
            "gpu-scaler",
            "unrelated",
            "other-svc",
            &[("n9", "10.0.0.9")],
            80,
        ),
    );
    let (client, _dir) = connect(&fake).await;
    let peers = Arc::new(EndpointPeers::start(
        client,
        "gpu-scaler",
        "gpu-scaler-peers",
    ));
    wait_until("two peers", WAIT, || peers.all().len() == 2).await;
    assert_eq!(
        peers.address("n1"),
        Some("10.0.0.1:6001".parse().expect("addr"))
    );
    assert_eq!(
        peers.address("n9"),
        None,
        "other Services' endpoints are not peers"
    );

    // A daemon moves (new pod IP) and another node joins in a second slice.
    fake.apply(
        &slices,
        endpoint_slice(
            "gpu-scaler",
            "peers-abc",
            "gpu-scaler-peers",
            &[("n1", "10.0.1.1"), ("n2", "10.0.0.2")],
            6001,
        ),
    );
    fake.apply(
        &slices,
        endpoint_slice(
            "gpu-scaler",
            "peers-def",
            "gpu-scaler-peers",
            &[("n3", "10.0.0.3")],
            6001,
        ),
    );
    wait_until("moved and joined", WAIT, || {
        peers.address("n1") == Some("10.0.1.1:6001".parse().expect("addr"))
            && peers.address("n3").is_some()
    })
    .await;
    fake.delete(&slices, "gpu-scaler", "peers-def");
    wait_until("n3 gone", WAIT, || peers.address("n3").is_none()).await;
}
