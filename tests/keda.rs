//! KEDA as it really behaves (issue 12), over real sockets with a real tonic
//! client against the real daemon wiring (see `support::scaler`): every case
//! asked the way KEDA asks, GetMetricSpec first, then GetMetrics with the
//! spec's name, then IsActive.
//!
//! - GetMetricSpec never fails on metadata (KEDA drops its errors: "no metric
//!   specs returned", keda#5914); GetMetrics and IsActive carry the
//!   INVALID_ARGUMENT, which KEDA shows as events on the ScaledObject.
//! - `<key>FromEnv` keys, misspelt keys, keda-gpu-scaler's key semantics and
//!   its example ScaledObjects, `gpuIndex`, `Value` + `avg` without the pods
//!   that are not ready, targets below 0.001, values that are not numbers, and
//!   StreamIsActive ending with status OK.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use gpu_scaler::{
    pods::Pod,
    scaler::proto::{
        GetMetricSpecResponse, GetMetricsRequest, IsActiveResponse, ScaledObjectRef,
        external_scaler_client::ExternalScalerClient,
    },
};
use gpu_scaler_tests::{
    engine::{FakeEngine, vllm_exposition},
    scaler::{Node, device, object_ref, pod, process},
};
use tonic::{Code, Status, transport::Channel};

const SLOW_POLL: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(5);

type Pairs<'a> = &'a [(&'a str, &'a str)];

fn object(meta: Pairs<'_>) -> ScaledObjectRef {
    object_ref("ml", "so", meta)
}

/// What KEDA gets from one polling round.
struct Poll {
    spec_name: String,
    target: f64,
    value: Result<f64, Status>,
    active: Result<bool, Status>,
}

/// KEDA's round: GetMetricSpec (which must answer), GetMetrics with the
/// spec's name as KEDA strips it, IsActive.
async fn keda_poll(c: &mut ExternalScalerClient<Channel>, o: &ScaledObjectRef) -> Poll {
    let GetMetricSpecResponse { metric_specs } = c
        .get_metric_spec(o.clone())
        .await
        .unwrap_or_else(|e| panic!("GetMetricSpec must answer, got {e:?}"))
        .into_inner();
    assert_eq!(metric_specs.len(), 1, "one spec");
    let spec = &metric_specs[0];
    assert!(
        spec.target_size_float >= 0.001 && spec.target_size >= 1,
        "{spec:?}"
    );
    let value = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(o.clone()),
            metric_name: spec.metric_name.clone(),
        })
        .await
        .map(|r| {
            let r = r.into_inner();
            assert_eq!(r.metric_values.len(), 1, "one value");
            assert_eq!(r.metric_values[0].metric_name, spec.metric_name);
            r.metric_values[0].metric_value_float
        });
    let active = c.is_active(o.clone()).await.map(|r| r.into_inner().result);
    Poll {
        spec_name: spec.metric_name.clone(),
        target: spec.target_size_float,
        value,
        active,
    }
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-6, "{what}: got {got}, want {want}");
}

/// Namespace `ml`: g0 (60 % SM on GPU 0, 8 GiB), g1 (20 % on GPU 0 and 40 % on
/// GPU 1, 4 + 8 GiB), both `app=gpu`; `app=other` on GPU 1 at 10 %. 80 GiB GPUs.
async fn fleet(node: &Node) {
    node.set_pods(vec![
        pod("ml", "g0", "u0", &[("app", "gpu")]),
        pod("ml", "g1", "u1", &[("app", "gpu")]),
        pod("ml", "other", "uo", &[("app", "other")]),
    ]);
    for (pid, uid) in [(100, "u0"), (101, "u1"), (102, "u1"), (103, "uo")] {
        node.attributor.assign(pid, uid);
    }
    node.set_gpus(vec![
        device(
            0,
            60,
            200.0,
            vec![process(100, 60, 0, 8192), process(101, 20, 0, 4096)],
        ),
        device(
            1,
            70,
            300.0,
            vec![process(102, 40, 0, 8192), process(103, 10, 0, 1024)],
        ),
    ]);
    node.settle().await;
}

/// The scenario of the real-cluster e2e test (tests/e2e_cluster, "bad metadata
/// shows on the ScaledObject") and every other refusal: the spec answers, so
/// KEDA builds the HPA and calls GetMetrics and IsActive, whose
/// INVALID_ARGUMENT names the key, the value and what is allowed.
#[tokio::test]
async fn get_metric_spec_never_fails_on_metadata_and_the_others_carry_the_refusal() {
    let node = Node::start(SLOW_POLL, None).await;
    fleet(&node).await;
    let mut c = node.client().await;
    let cases: &[(Pairs<'_>, &str, f64)] = &[
        // (metadata, what the refusal must say, the spec's target)
        (
            // The e2e scenario's trigger (there without podSelector: its
            // daemons resolve the scale target; this one has no API access).
            &[
                ("scalerAddress", "gpu-scaler:6000"),
                ("podSelector", "app=gpu"),
                ("metric", "tensor_cores"),
            ],
            "metadata metric: \"tensor_cores\" is not allowed: one of gpu_utilization",
            80.0,
        ),
        (
            &[
                ("podSelector", "app=gpu"),
                ("metric", "tensor_cores"),
                ("targetValue", "7"),
            ],
            "metadata metric: \"tensor_cores\"",
            7.0,
        ),
        (
            &[("podSelector", "app in gpu"), ("profile", "ollama")],
            "metadata podSelector: \"app in gpu\" is not allowed",
            70.0,
        ),
        (
            &[("podSelector", "app=gpu"), ("targetValue", "0.0005")],
            "metadata targetValue: \"0.0005\" is not allowed: a number greater than 0, at least 0.001",
            80.0,
        ),
        (
            &[
                ("podSelector", "app=gpu"),
                ("targetGpuUtilization", "0.0001"),
            ],
            "at least 0.001",
            80.0,
        ),
        (
            &[("podselector", "app=gpu"), ("targetValue", "30")],
            "metadata podselector: \"app=gpu\" is not allowed: podselector is not a gpu-scaler key; did you mean podSelector?",
            30.0,
        ),
        (
            &[("podSelector", "app=gpu"), ("metricType", "Value")],
            "the trigger's own metricType field",
            80.0,
        ),
        (
            &[("podSelector", "app=gpu"), ("gpuIndex", "-3")],
            "metadata gpuIndex: \"-3\"",
            80.0,
        ),
        (
            &[("podSelectorFromEnv", "a,"), ("targetValueFromEnv", "12")],
            "metadata podSelectorFromEnv: \"a,\" is not allowed",
            12.0,
        ),
    ];
    for (meta, message, target) in cases {
        let o = object(meta);
        let p = keda_poll(&mut c, &o).await;
        assert_eq!(p.target, *target, "{meta:?}: the target the keys give");
        assert!(p.spec_name.starts_with("gpu-invalid-"), "{}", p.spec_name);
        for (what, r) in [
            ("GetMetrics", p.value.map(|_| ())),
            ("IsActive", p.active.map(|_| ())),
            (
                "StreamIsActive",
                c.stream_is_active(o.clone()).await.map(|_| ()),
            ),
        ] {
            let e = r.expect_err(&format!("{what} refuses {meta:?}"));
            assert_eq!(e.code(), Code::InvalidArgument, "{what} {meta:?}: {e:?}");
            assert!(
                e.message().contains(message),
                "{what} {meta:?}: {:?} should say {message:?}",
                e.message()
            );
        }
        // KEDA v2.21+ also takes the spec from StreamMetricSpec: same answer.
        let mut st = c
            .stream_metric_spec(o.clone())
            .await
            .expect("StreamMetricSpec answers")
            .into_inner();
        let first = tokio::time::timeout(WAIT, st.message())
            .await
            .expect("a spec at once")
            .expect("no error")
            .expect("a message");
        assert_eq!(first.metric_specs[0].metric_name, p.spec_name);
        // Stable: the same metadata, the same name (every daemon computes it).
        assert_eq!(keda_poll(&mut c, &o).await.spec_name, p.spec_name);
    }
    // A metricName of the user's own survives refused metadata.
    let p = keda_poll(
        &mut c,
        &object(&[("metric", "tensor_cores"), ("metricName", "llm-gpu")]),
    )
    .await;
    assert_eq!(p.spec_name, "llm-gpu");
    node.stop().await;
}

/// KEDA resolves `xFromEnv` and sends the value under the key `xFromEnv`
/// (pkg/scalers/external_scaler.go): every key works that way; with both, the
/// plain key wins unless it is blank.
#[tokio::test]
async fn from_env_keys_are_read_like_their_keys() {
    let node = Node::start(SLOW_POLL, None).await;
    fleet(&node).await;
    let mut c = node.client().await;
    let cases: &[(Pairs<'_>, f64, f64)] = &[
        (&[("podSelectorFromEnv", "app=gpu")], 90.0, 80.0),
        (
            &[
                ("podSelectorFromEnv", "app=gpu"),
                ("aggregationFromEnv", "max"),
                ("targetValueFromEnv", "25"),
            ],
            60.0,
            25.0,
        ),
        (
            &[
                ("podSelector", "app=other"),
                ("podSelectorFromEnv", "app=gpu"),
            ],
            10.0,
            80.0,
        ),
        (
            &[("podSelector", ""), ("podSelectorFromEnv", "app=gpu")],
            90.0,
            80.0,
        ),
        (
            &[
                ("podSelectorFromEnv", "app=gpu"),
                ("profileFromEnv", "ollama"),
                ("metricFromEnv", "gpu_utilization"),
            ],
            90.0,
            70.0,
        ),
        (
            &[("podSelectorFromEnv", "app=gpu"), ("gpuIndexFromEnv", "1")],
            40.0,
            80.0,
        ),
    ];
    for (meta, value, target) in cases {
        let p = keda_poll(&mut c, &object(meta)).await;
        assert_close(p.value.expect("value"), *value, &format!("{meta:?}"));
        assert_eq!(p.target, *target, "{meta:?}");
    }
    node.stop().await;
}

/// A known key in another case or one or two typos away is refused naming the
/// key meant; keys of KEDA and of other scalers stay ignored.
#[tokio::test]
async fn misspelt_keys_are_refused_and_foreign_keys_ignored() {
    let node = Node::start(SLOW_POLL, None).await;
    fleet(&node).await;
    let mut c = node.client().await;
    for (sent, meant) in [
        ("podselector", "podSelector"),
        ("PodSelector", "podSelector"),
        ("podSelecter", "podSelector"),
        ("activationTreshold", "activationThreshold"),
        ("targetvalue", "targetValue"),
        ("agregation", "aggregation"),
        ("metricsPath ", "metricsPath"),
    ] {
        let p = keda_poll(&mut c, &object(&[("podSelector", "app=gpu"), (sent, "1")])).await;
        let e = p.value.expect_err(sent);
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message()
                .contains(&format!("metadata {sent}: \"1\" is not allowed"))
                && e.message().contains(&format!("did you mean {meant}?")),
            "{sent}: {}",
            e.message()
        );
        assert_eq!(p.active.expect_err(sent).code(), Code::InvalidArgument);
    }
    let p = keda_poll(
        &mut c,
        &object(&[
            ("podSelector", "app=gpu"),
            ("scalerAddress", "gpu-scaler.gpu-scaler.svc:6000"),
            ("tlsCertFile", "/certs/ca.crt"),
            ("unsafeSsl", "false"),
            // keda-gpu-scaler's: honoured or ignored, never refused.
            ("pollIntervalSeconds", "0"),
            ("gpuIndex", "-1"),
            ("vllmEndpoint", "http://vllm:8000/metrics"),
            // Another scaler's keys, pasted by mistake: nothing like ours.
            ("query", "sum(rate(x[1m]))"),
            ("threshold", "5"),
        ]),
    )
    .await;
    assert_close(p.value.expect("foreign keys ignored"), 90.0, "value");
    node.stop().await;
}

/// A pod on 127.0.112.`host` (its engine's address).
fn pod_at(name: &str, uid: &str, labels: &[(&str, &str)], host: u8) -> Pod {
    let mut p = pod("ml", name, uid, labels);
    p.ip = Some(IpAddr::from([127, 0, 112, host]));
    p
}

/// The trigger metadata of keda-gpu-scaler v0.6.0's example ScaledObjects
/// (deploy/examples/, deploy/helm/keda-gpu-scaler/examples/, the e2e chart's
/// template with its values.yaml, and docs/configuration.md's snippets), keys
/// and values as written there, with a podSelector added: each answers with
/// keda-gpu-scaler's target and activation (pkg/profiles/profiles.go), on the
/// metric keda-gpu-scaler means, measured per pod.
#[tokio::test]
async fn keda_gpu_scaler_examples_answer_with_its_targets() {
    let node = Node::start(SLOW_POLL, None).await;
    let gpu: &[(&str, &str)] = &[("app", "gpu")];
    node.set_pods(vec![
        pod_at("g0", "u0", gpu, 1),
        pod_at("g1", "u1", gpu, 2),
        pod_at("v0", "v0", &[("app", "vllm")], 3),
        pod_at("v1", "v1", &[("app", "vllm")], 4),
        pod_at("t0", "t0", &[("app", "triton")], 5),
    ]);
    for (pid, uid) in [(100, "u0"), (101, "u1"), (102, "u1")] {
        node.attributor.assign(pid, uid);
    }
    node.set_gpus(vec![
        device(
            0,
            60,
            200.0,
            vec![process(100, 60, 0, 8192), process(101, 20, 0, 4096)],
        ),
        device(1, 70, 300.0, vec![process(102, 40, 0, 8192)]),
    ]);
    node.settle().await;
    // vLLM on port 8000 (the examples' vllmEndpoint), one engine and two
    // data-parallel engines: 3 + (2 + 1) waiting; KV cache 0.5 and mean(0.25, 0.75).
    let engine = |host: u8, port: u16| SocketAddr::new(IpAddr::from([127, 0, 112, host]), port);
    let _v0 = FakeEngine::start(engine(3, 8000), &vllm_exposition(&[(3, 1, 0.5)]));
    let _v1 = FakeEngine::start(
        engine(4, 8000),
        &vllm_exposition(&[(2, 0, 0.25), (1, 0, 0.75)]),
    );
    let _t0 = FakeEngine::start_with(
        engine(5, 8002),
        Box::new(|t| gpu_scaler_tests::engine::triton_exposition(&[("resnet", 10.0, 4.0)], t)),
    );
    let mut c = node.client().await;

    const KGS: (&str, &str) = (
        "scalerAddress",
        "keda-gpu-scaler.keda.svc.cluster.local:6000",
    );
    const GPU: (&str, &str) = ("podSelector", "app=gpu");
    // gpu_utilization per pod: g0 60, g1 (20 + 40) / 2 = 30; on GPU 0 only: 60, 20.
    // memory_used_percent per pod: g0 8192 / 81920 = 10 %, g1 12288 / 163840 = 7.5 %.
    struct Case<'a> {
        example: &'a str,
        meta: Vec<(&'a str, &'a str)>,
        target: f64,
        activation: f64,
        value: Option<f64>,
    }
    let cases = [
        Case {
            example: "deploy/examples/custom-gpu-utilization.yaml",
            meta: vec![
                KGS,
                GPU,
                ("targetGpuUtilization", "80"),
                ("activationThreshold", "5"),
                ("aggregation", "max"),
            ],
            target: 80.0,
            activation: 5.0,
            value: Some(60.0),
        },
        Case {
            example: "deploy/examples/ollama-scaledobject.yaml",
            meta: vec![KGS, GPU, ("profile", "ollama")],
            target: 70.0,
            activation: 3.0,
            value: Some(17.5),
        },
        Case {
            example: "deploy/examples/tgi-scaledobject.yaml",
            meta: vec![KGS, GPU, ("profile", "tgi-inference")],
            target: 75.0,
            activation: 5.0,
            value: Some(17.5),
        },
        Case {
            example: "deploy/examples/vllm-scaledobject.yaml",
            meta: vec![KGS, GPU, ("profile", "vllm-inference")],
            target: 80.0,
            activation: 5.0,
            value: Some(17.5),
        },
        Case {
            example: "deploy/helm/keda-gpu-scaler/examples/scaledobject.yaml",
            meta: vec![
                (
                    "scalerAddress",
                    "keda-gpu-scaler.default.svc.cluster.local:6000",
                ),
                GPU,
                ("profile", "vllm-inference"),
            ],
            target: 80.0,
            activation: 5.0,
            value: Some(17.5),
        },
        Case {
            example: "deploy/helm/keda-gpu-scaler/examples/scaledobject.yaml, overrides uncommented",
            meta: vec![
                (
                    "scalerAddress",
                    "keda-gpu-scaler.default.svc.cluster.local:6000",
                ),
                GPU,
                ("profile", "vllm-inference"),
                ("targetGpuUtilization", "80"),
                ("activationThreshold", "5"),
                ("gpuIndex", "0"),
                ("aggregation", "max"),
            ],
            target: 80.0,
            activation: 5.0,
            value: Some(60.0),
        },
        Case {
            example: "deploy/helm/keda-gpu-scaler/examples/mig-scaledobject.yaml",
            meta: vec![
                KGS,
                GPU,
                ("metricType", "gpu_utilization"),
                ("targetValue", "75"),
                ("activationThreshold", "10"),
                ("aggregation", "avg"),
            ],
            target: 75.0,
            activation: 10.0,
            value: Some(45.0),
        },
        Case {
            example: "deploy/helm/keda-gpu-scaler/examples/training-scaledobject.yaml",
            meta: vec![KGS, GPU, ("profile", "training"), ("aggregation", "avg")],
            target: 90.0,
            activation: 0.0,
            value: Some(45.0),
        },
        Case {
            example: "deploy/helm/keda-gpu-scaler-e2e/templates/scaledobject.yaml + values.yaml",
            meta: vec![
                KGS,
                GPU,
                ("targetGpuUtilization", "30"),
                ("activationThreshold", "5"),
                ("aggregation", "max"),
            ],
            target: 30.0,
            activation: 5.0,
            value: Some(60.0),
        },
        Case {
            example: "deploy/examples/vllm-queue-depth-scaledobject.yaml",
            meta: vec![
                KGS,
                ("podSelector", "app=vllm"),
                ("profile", "vllm-queue-depth"),
                (
                    "vllmEndpoint",
                    "http://vllm-deepseek-deployment:8000/metrics",
                ),
            ],
            target: 5.0,
            activation: 1.0,
            value: Some(6.0),
        },
        Case {
            example: "docs/configuration.md, vllm_kv_cache_usage",
            meta: vec![
                KGS,
                ("podSelector", "app=vllm"),
                ("metricType", "vllm_kv_cache_usage"),
                ("vllmEndpoint", "http://vllm:8000/metrics"),
            ],
            target: 80.0,
            activation: 0.0,
            // A percentage under keda-gpu-scaler's key: 50 % + 50 %.
            value: Some(100.0),
        },
        // Triton's figures are rates between two reads: the first read of a
        // new query has none (UNAVAILABLE, never 0), so only the spec is
        // checked here; tests/engine.rs follows them over time.
        Case {
            example: "deploy/examples/triton-queue-wait-scaledobject.yaml",
            meta: vec![
                KGS,
                ("podSelector", "app=triton"),
                ("profile", "triton-queue-wait"),
                (
                    "tritonEndpoint",
                    "http://triton-resnet-deployment:8002/metrics",
                ),
            ],
            target: 50.0,
            activation: 5.0,
            value: None,
        },
        Case {
            example: "deploy/examples/triton-request-rate-scaledobject.yaml",
            meta: vec![
                KGS,
                ("podSelector", "app=triton"),
                ("profile", "triton-request-rate"),
                (
                    "tritonEndpoint",
                    "http://triton-resnet-deployment:8002/metrics",
                ),
            ],
            target: 50.0,
            activation: 1.0,
            value: None,
        },
        Case {
            example: "docs/configuration.md, triton_request_rate",
            meta: vec![
                KGS,
                ("podSelector", "app=triton"),
                ("metricType", "triton_request_rate"),
                ("tritonEndpoint", "http://triton:8002/metrics"),
            ],
            target: 80.0,
            activation: 0.0,
            value: None,
        },
    ];
    for case in &cases {
        let o = object(&case.meta);
        let p = keda_poll(&mut c, &o).await;
        assert!(
            !p.spec_name.starts_with("gpu-invalid-"),
            "{}: refused: {:?}",
            case.example,
            p.value
        );
        assert_eq!(p.target, case.target, "{}", case.example);
        match case.value {
            Some(want) => {
                let v = p
                    .value
                    .unwrap_or_else(|e| panic!("{}: {e:?}", case.example));
                assert_close(v, want, case.example);
                assert_eq!(
                    p.active.expect("IsActive"),
                    v > case.activation,
                    "{}",
                    case.example
                );
                // The activation threshold is keda-gpu-scaler's: just above
                // the value is inactive.
                let mut above = case.meta.clone();
                let threshold = format!("{}", v + 0.5);
                above.push(("activationThreshold", &threshold));
                let r = c.is_active(object(&above)).await.expect("IsActive");
                assert!(!r.into_inner().result, "{}", case.example);
            }
            None => {
                let code = p.value.map_err(|e| e.code());
                assert!(
                    matches!(code, Ok(_) | Err(Code::Unavailable)),
                    "{}: {code:?}",
                    case.example
                );
            }
        }
    }
    node.stop().await;
}

/// keda-gpu-scaler's `gpuIndex`: each pod's use of that GPU of its node.
#[tokio::test]
async fn gpu_index_measures_that_gpu_of_each_pod() {
    let node = Node::start(SLOW_POLL, None).await;
    fleet(&node).await;
    let mut c = node.client().await;
    for (index, sum) in [("-1", 90.0), ("0", 80.0), ("1", 40.0), ("3", 0.0)] {
        let p = keda_poll(
            &mut c,
            &object(&[("podSelector", "app=gpu"), ("gpuIndex", index)]),
        )
        .await;
        assert_close(p.value.expect("value"), sum, index);
    }
    node.stop().await;
}

/// With `metricType: Value` and `aggregation: avg` the HPA computes
/// ceil(ready pods * value / target): the average is over the ready pods, as
/// the HPA's count is, so a replica still loading does not pull it down.
#[tokio::test]
async fn avg_leaves_pods_that_are_not_ready_out() {
    let node = Node::start(SLOW_POLL, None).await;
    let mut loading = pod("ml", "w2", "w2", &[("app", "w")]);
    loading.ready = false;
    let mut pending = pod("ml", "w3", "w3", &[("app", "w")]);
    pending.phase = Some("Pending".into());
    pending.ready = false;
    node.set_pods(vec![
        pod("ml", "w0", "w0", &[("app", "w")]),
        pod("ml", "w1", "w1", &[("app", "w")]),
        loading,
        pending,
    ]);
    for (pid, uid) in [(1, "w0"), (2, "w1"), (3, "w2")] {
        node.attributor.assign(pid, uid);
    }
    node.set_gpus(vec![device(
        0,
        50,
        100.0,
        vec![
            process(1, 60, 0, 1),
            process(2, 40, 0, 1),
            process(3, 2, 0, 1),
        ],
    )]);
    node.settle().await;
    let mut c = node.client().await;
    let avg = keda_poll(
        &mut c,
        &object(&[("podSelector", "app=w"), ("aggregation", "avg")]),
    )
    .await;
    assert_close(avg.value.expect("avg"), 50.0, "avg of the two ready pods");
    // sum (AverageValue) still counts them all: the HPA divides the total.
    let sum = keda_poll(&mut c, &object(&[("podSelector", "app=w")])).await;
    assert_close(sum.value.expect("sum"), 102.0, "sum");
    node.stop().await;
}

/// A value that is not a number is UNAVAILABLE with the reason, never sent
/// (KEDA would turn NaN into 0), even when `max` would hide it.
#[tokio::test]
async fn values_that_are_not_numbers_are_unavailable() {
    let node = Node::start(SLOW_POLL, None).await;
    node.set_pods(vec![
        pod("ml", "w0", "w0", &[("app", "w")]),
        pod("ml", "w1", "w1", &[("app", "w")]),
    ]);
    node.attributor.assign(1, "w0");
    node.attributor.assign(2, "w1");
    node.set_gpus(vec![
        device(0, 50, f64::NAN, vec![process(1, 60, 0, 1)]),
        device(1, 50, f64::INFINITY, vec![process(2, 40, 0, 1)]),
    ]);
    node.settle().await;
    let mut c = node.client().await;
    for agg in ["sum", "max", "min"] {
        let p = keda_poll(
            &mut c,
            &object(&[
                ("podSelector", "app=w"),
                ("metric", "power_draw"),
                ("aggregation", agg),
            ]),
        )
        .await;
        let e = p.value.expect_err("not a number");
        assert_eq!(e.code(), Code::Unavailable, "{agg}: {e:?}");
        assert_eq!(
            p.active.expect_err("not a number").code(),
            Code::Unavailable
        );
    }
    node.stop().await;
}

async fn next(
    st: &mut tonic::Streaming<IsActiveResponse>,
) -> Result<Option<IsActiveResponse>, Status> {
    tokio::time::timeout(WAIT, st.message())
        .await
        .expect("a stream event within 5 s")
}

/// Only a StreamIsActive that ends with status OK resets KEDA's reconnect
/// backoff (2 s doubling to 60 s, pkg/scalers/external_scaler.go
/// `runStreamIsActive`): an answer that becomes unknown ends the stream with
/// OK, and a new stream then says the state at once once it is known again.
#[tokio::test]
async fn stream_is_active_ends_with_ok_when_the_answer_is_unknown() {
    let node = Node::start(SLOW_POLL, None).await;
    node.set_pods(vec![pod("ml", "w0", "w0", &[("app", "w")])]);
    node.attributor.assign(1, "w0");
    node.set_gpus(vec![device(0, 50, 100.0, vec![process(1, 60, 0, 1)])]);
    node.settle().await;
    let mut c = node.client().await;
    let o = object(&[("podSelector", "app=w"), ("activationThreshold", "10")]);
    let mut st = c
        .stream_is_active(o.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    let first = next(&mut st).await;
    assert!(first.expect("ok").expect("a message").result);
    node.fail_gpus("NVML: GPU 0 has fallen off the bus");
    let end = next(&mut st).await;
    assert!(matches!(end, Ok(None)), "ends with status OK: {end:?}");
    // Reconnecting while the answer is still unknown: OK again, no message.
    let mut again = c
        .stream_is_active(o.clone())
        .await
        .expect("opens")
        .into_inner();
    let end = next(&mut again).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
    // Known again: the next stream says so at once.
    node.set_gpus(vec![device(0, 50, 100.0, vec![process(1, 60, 0, 1)])]);
    node.settle().await;
    let mut back = c.stream_is_active(o).await.expect("opens").into_inner();
    assert!(next(&mut back).await.expect("ok").expect("message").result);
    drop(back);
    node.stop().await;
}
