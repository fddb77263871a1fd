//! KEDA's ExternalScaler contract over real sockets with a real tonic client,
//! against the real daemon wiring fed by hand (see `support::scaler`).

use std::{collections::HashMap, time::Duration};

use gpu_scaler::{
    scaler::{
        hpa::{self, Policy, TargetType},
        proto::{
            GetMetricSpecResponse, GetMetricsRequest, IsActiveResponse, MetricValue,
            ScaledObjectRef, external_scaler_client::ExternalScalerClient,
        },
        server::Tls,
    },
    snapshot::Reading,
};
use gpu_scaler_tests::scaler::{Node, device, pod, process};
use tonic::{Code, Status, transport::Channel};

/// Long enough that samples never go stale in tests that are not about it.
const SLOW_POLL: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(5);

fn object(namespace: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "so".into(),
        namespace: namespace.into(),
        scaler_metadata: meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    }
}

async fn spec(
    c: &mut ExternalScalerClient<Channel>,
    o: &ScaledObjectRef,
) -> Result<GetMetricSpecResponse, Status> {
    c.get_metric_spec(o.clone()).await.map(|r| r.into_inner())
}

async fn metrics(
    c: &mut ExternalScalerClient<Channel>,
    o: &ScaledObjectRef,
    name: &str,
) -> Result<MetricValue, Status> {
    let r = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(o.clone()),
            metric_name: name.into(),
        })
        .await?
        .into_inner();
    assert_eq!(
        r.metric_values.len(),
        1,
        "GetMetrics returns exactly one value: {r:?}"
    );
    Ok(r.metric_values.into_iter().next().expect("one value"))
}

/// KEDA's sequence: GetMetricSpec, then GetMetrics with the spec's name, then
/// IsActive. Returns (target, value, active).
async fn keda_poll(c: &mut ExternalScalerClient<Channel>, o: &ScaledObjectRef) -> (f64, f64, bool) {
    let s = spec(c, o).await.expect("GetMetricSpec");
    assert_eq!(s.metric_specs.len(), 1);
    let s = &s.metric_specs[0];
    let v = metrics(c, o, &s.metric_name).await.expect("GetMetrics");
    let active = c
        .is_active(o.clone())
        .await
        .expect("IsActive")
        .into_inner()
        .result;
    (s.target_size_float, v.metric_value_float, active)
}

fn assert_close(got: f64, want: f64, what: &str) {
    assert!((got - want).abs() < 1e-6, "{what}: got {got}, want {want}");
}

/// Namespace `ml`: vllm-0 (one process on GPU 0), vllm-1 (one on GPU 0, one on
/// GPU 1), vllm-2 (no GPU process), embed (GPU 1); namespace `prod`: a pod with
/// the same labels on GPU 1; a host process on GPU 0.
async fn fleet(node: &Node) {
    node.set_pods(vec![
        pod("ml", "vllm-0", "u0", &[("app", "vllm"), ("tier", "gpu")]),
        pod("ml", "vllm-1", "u1", &[("app", "vllm"), ("tier", "gpu")]),
        pod("ml", "vllm-2", "u2", &[("app", "vllm"), ("tier", "edge")]),
        pod("ml", "embed", "ue", &[("app", "embed")]),
        pod("prod", "vllm-0", "ux", &[("app", "vllm"), ("tier", "gpu")]),
    ]);
    for (pid, uid) in [
        (100, "u0"),
        (101, "u1"),
        (102, "u1"),
        (200, "ux"),
        (300, "ue"),
    ] {
        node.attributor.assign(pid, uid);
    }
    node.attributor.assign_host(400);
    node.set_gpus(vec![
        device(
            0,
            60,
            200.0,
            vec![
                process(100, 30, 10, 8192),
                process(101, 20, 5, 4096),
                process(400, 5, 0, 100),
            ],
        ),
        device(
            1,
            70,
            300.0,
            vec![
                process(102, 40, 20, 8192),
                process(200, 50, 40, 20_000),
                process(300, 10, 1, 1000),
            ],
        ),
    ]);
    node.settle().await;
}

#[tokio::test]
async fn every_rpc_with_both_fields_and_hand_computed_values() {
    let node = Node::start(SLOW_POLL, None).await;
    fleet(&node).await;
    let mut c = node.client().await;

    // GetMetricSpec: from metadata alone, both target fields.
    let o = object(
        "ml",
        &[
            ("podSelector", "app=vllm"),
            ("scalerAddress", "gpu-scaler:6000"),
        ],
    );
    let s = spec(&mut c, &o).await.expect("GetMetricSpec");
    assert_eq!(s.metric_specs.len(), 1);
    let name = s.metric_specs[0].metric_name.clone();
    assert!(name.starts_with("gpu-gpu-utilization-sum-"), "{name}");
    assert_eq!(
        (
            s.metric_specs[0].target_size,
            s.metric_specs[0].target_size_float
        ),
        (80, 80.0)
    );
    let s = spec(
        &mut c,
        &object("ml", &[("podSelector", "app=vllm"), ("targetValue", "7.5")]),
    )
    .await
    .expect("GetMetricSpec");
    assert_eq!(
        (
            s.metric_specs[0].target_size,
            s.metric_specs[0].target_size_float
        ),
        (8, 7.5)
    );
    assert_eq!(
        s.metric_specs[0].metric_name, name,
        "the target does not change the name"
    );

    // GetMetrics under every name KEDA may use; vllm in `prod` never counts.
    // gpu_utilization per pod: u0 30, u1 (20 + 40) / 2 = 30, u2 0.
    for asked in [
        name.clone(),
        format!("s0-{name}"),
        name.to_uppercase(),
        format!("S12-{}", name.to_uppercase()),
        String::new(),
    ] {
        let v = metrics(&mut c, &o, &asked).await.expect("GetMetrics");
        assert_eq!(v.metric_name, name);
        assert_eq!(
            (v.metric_value, v.metric_value_float),
            (60, 60.0),
            "asked as {asked:?}"
        );
    }
    let err = metrics(&mut c, &o, "s0-gpu-memory-used-mib-sum-00000000")
        .await
        .expect_err("other name");
    assert_eq!(err.code(), Code::InvalidArgument);

    // Every metric, hand-computed (GPU 0: 200 W split 30:20:5; GPU 1: 300 W split 40:50:10).
    let power_u0 = 200.0 * 30.0 / 55.0;
    let power_u1 = 200.0 * 20.0 / 55.0 + 300.0 * 40.0 / 100.0;
    for (meta, want) in [
        (
            vec![("metric", "gpu_utilization"), ("aggregation", "avg")],
            20.0,
        ),
        (
            vec![("metric", "gpu_utilization"), ("aggregation", "max")],
            30.0,
        ),
        (
            vec![("metric", "gpu_utilization"), ("aggregation", "min")],
            0.0,
        ),
        (vec![("metric", "memory_utilization")], 10.0 + 12.5),
        (vec![("metricType", "memory_used_mib")], 8192.0 + 12288.0),
        (vec![("metric", "memory_used_percent")], 10.0 + 7.5),
        (vec![("metric", "power_draw")], power_u0 + power_u1),
        (vec![("metric", "temperature")], 70.0),
        (vec![("metric", "temperature"), ("aggregation", "min")], 0.0),
        (vec![("profile", "vllm-inference")], 17.5),
    ] {
        let mut m = vec![("podSelector", "app=vllm")];
        m.extend(meta.iter().copied());
        let o = object("ml", &m);
        let (_, v, _) = keda_poll(&mut c, &o).await;
        assert_close(v, want, &format!("{meta:?}"));
    }
    // Selector forms: set-based and negation pick the same pods as by hand.
    for (sel, want) in [
        ("app=vllm,tier in (gpu)", 60.0),
        ("app=vllm,tier notin (gpu)", 0.0),
        ("app,!tier", 10.0),
    ] {
        let (_, v, _) = keda_poll(&mut c, &object("ml", &[("podSelector", sel)])).await;
        assert_close(v, want, sel);
    }
    // The `prod` namespace sees only its own pod (50 % on GPU 1).
    let (_, v, _) = keda_poll(&mut c, &object("prod", &[("podSelector", "app=vllm")])).await;
    assert_close(v, 50.0, "prod");
    let (_, v, _) = keda_poll(&mut c, &object("staging", &[("podSelector", "app=vllm")])).await;
    assert_close(v, 0.0, "a namespace without pods");

    // IsActive = value > activationThreshold.
    for (threshold, want) in [("59.9", true), ("60", false)] {
        let o = object(
            "ml",
            &[
                ("podSelector", "app=vllm"),
                ("activationThreshold", threshold),
            ],
        );
        let r = c.is_active(o).await.expect("IsActive").into_inner();
        assert_eq!(r.result, want, "activation {threshold}");
    }

    // StreamMetricSpec sends the spec at once.
    let mut st = c
        .stream_metric_spec(o.clone())
        .await
        .expect("StreamMetricSpec")
        .into_inner();
    let first = tokio::time::timeout(WAIT, st.message())
        .await
        .expect("spec within 5 s")
        .expect("no error")
        .expect("a message");
    assert_eq!(first.metric_specs[0].metric_name, name);

    // grpc.health.v1 says the scaler serves.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect"),
    );
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "externalscaler.ExternalScaler".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // The HTTP listener.
    assert_eq!(node.http_get("/healthz").await.0, 200);
    let (code, body) = node.http_get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = node.http_get("/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("gpu_scaler_gpus 2"), "{body}");
    let (code, body) = node.http_get("/v1/snapshot").await;
    assert_eq!(code, 200);
    let snap: serde_json::Value = serde_json::from_str(&body).expect("snapshot JSON");
    let u1 = snap["pods"]
        .as_array()
        .expect("pods list")
        .iter()
        .find(|p| p["pod"]["uid"] == "u1")
        .expect("u1 in the snapshot");
    assert_eq!(u1["gpus"][1]["sm_util"]["ok"], 40.0);
    assert_eq!(snap["unowned"][0]["why"]["kind"], "host");

    drop(st);
    node.stop().await;
}

#[tokio::test]
async fn bad_metadata_is_invalid_argument_naming_the_key() {
    let node = Node::start(SLOW_POLL, None).await;
    fleet(&node).await;
    let mut c = node.client().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "podSelector"),
        (&[("podSelector", "")], "podSelector"),
        (&[("podSelector", "app in vllm")], "podSelector"),
        (&[("podSelector", "app==(x)")], "podSelector"),
        (&[("podSelector", "a,")], "podSelector"),
        (&[("podSelector", "tier in ()")], "podSelector"),
        (&[("podSelector", "a"), ("metric", "gpu")], "metric"),
        (&[("podSelector", "a"), ("metric", "")], "metric"),
        (
            &[("podSelector", "a"), ("metricType", "AverageValue")],
            "metricType",
        ),
        (
            &[
                ("podSelector", "a"),
                ("metric", "power_draw"),
                ("metricType", "temperature"),
            ],
            "metricType",
        ),
        (&[("podSelector", "a"), ("profile", "vllm")], "profile"),
        (
            &[("podSelector", "a"), ("targetValue", "abc")],
            "targetValue",
        ),
        (&[("podSelector", "a"), ("targetValue", "0")], "targetValue"),
        (
            &[("podSelector", "a"), ("targetValue", "-5")],
            "targetValue",
        ),
        (
            &[("podSelector", "a"), ("targetValue", "NaN")],
            "targetValue",
        ),
        (
            &[("podSelector", "a"), ("targetValue", "inf")],
            "targetValue",
        ),
        (&[("podSelector", "a"), ("targetValue", "")], "targetValue"),
        (
            &[("podSelector", "a"), ("activationThreshold", "-1")],
            "activationThreshold",
        ),
        (
            &[("podSelector", "a"), ("activationThreshold", "five")],
            "activationThreshold",
        ),
        (
            &[("podSelector", "a"), ("targetGpuUtilization", "0")],
            "targetGpuUtilization",
        ),
        (
            &[("podSelector", "a"), ("targetGpuUtilization", "150")],
            "targetGpuUtilization",
        ),
        (
            &[("podSelector", "a"), ("targetMemoryUtilization", "x")],
            "targetMemoryUtilization",
        ),
        (
            &[("podSelector", "a"), ("targetValue", "0.0009")],
            "targetValue",
        ),
        (&[("podselector", "a")], "podselector"),
        (
            &[("podSelector", "a"), ("targetGpuUtilizaton", "50")],
            "targetGpuUtilizaton",
        ),
        (&[("podSelectorFromEnv", "a,")], "podSelectorFromEnv"),
        (
            &[("podSelector", "a"), ("aggregation", "median")],
            "aggregation",
        ),
        (
            &[("podSelector", "a"), ("metricName", "has space")],
            "metricName",
        ),
        (&[("podSelector", "a"), ("metricName", "")], "metricName"),
    ];
    assert!(cases.len() >= 25);
    for (meta, key) in cases {
        let o = object("ml", meta);
        let check = |what: &str, r: Status| {
            assert_eq!(r.code(), Code::InvalidArgument, "{what} {meta:?}: {r:?}");
            assert!(
                r.message().contains(key),
                "{what} {meta:?}: {:?} should name {key}",
                r.message()
            );
        };
        // GetMetricSpec answers: KEDA drops its errors (tests/keda.rs).
        spec(&mut c, &o)
            .await
            .expect("GetMetricSpec never fails on metadata");
        check(
            "GetMetrics",
            metrics(&mut c, &o, "").await.expect_err("bad metadata"),
        );
        check(
            "IsActive",
            c.is_active(o.clone()).await.expect_err("bad metadata"),
        );
        check(
            "StreamIsActive",
            c.stream_is_active(o.clone())
                .await
                .expect_err("bad metadata"),
        );
        c.stream_metric_spec(o.clone())
            .await
            .expect("StreamMetricSpec never fails on metadata");
    }
    let err = spec(&mut c, &object("", &[("podSelector", "a")]))
        .await
        .expect_err("no namespace");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("namespace"), "{}", err.message());
    let err = c
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: None,
            metric_name: "x".into(),
        })
        .await
        .expect_err("no ref");
    assert_eq!(err.code(), Code::InvalidArgument);
    node.stop().await;
}

async fn next(st: &mut tonic::Streaming<IsActiveResponse>) -> Result<Option<bool>, Status> {
    tokio::time::timeout(WAIT, st.message())
        .await
        .expect("a stream event within 5 s")
        .map(|m| m.map(|r| r.result))
}

#[tokio::test]
async fn stream_is_active_current_state_changes_and_ok_on_shutdown() {
    let node = Node::start(SLOW_POLL, None).await;
    node.set_pods(vec![pod("ml", "w-0", "w0", &[("app", "w")])]);
    node.attributor.assign(10, "w0");
    node.set_gpus(vec![device(0, 50, 100.0, vec![process(10, 30, 0, 1)])]);
    node.settle().await;
    let mut c = node.client().await;
    let o = object(
        "ml",
        &[("podSelector", "app=w"), ("activationThreshold", "10")],
    );

    let mut st = c
        .stream_is_active(o.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    assert_eq!(
        next(&mut st).await.expect("ok"),
        Some(true),
        "current state at once"
    );
    let mut spec_stream = c
        .stream_metric_spec(o.clone())
        .await
        .expect("StreamMetricSpec")
        .into_inner();
    tokio::time::timeout(WAIT, spec_stream.message())
        .await
        .expect("spec at once")
        .expect("no error")
        .expect("a spec");

    node.set_gpus(vec![device(0, 50, 100.0, vec![process(10, 5, 0, 1)])]);
    assert_eq!(
        next(&mut st).await.expect("ok"),
        Some(false),
        "pushed on change"
    );
    // New data without a change of state sends nothing; the next message is
    // the next change.
    node.set_gpus(vec![device(0, 50, 100.0, vec![process(10, 6, 0, 1)])]);
    node.settle().await;
    node.set_gpus(vec![device(0, 50, 100.0, vec![process(10, 50, 0, 1)])]);
    assert_eq!(next(&mut st).await.expect("ok"), Some(true));

    // A second stream opened now also gets the current state at once.
    let mut st2 = c
        .stream_is_active(o.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    assert_eq!(next(&mut st2).await.expect("ok"), Some(true));

    // Shutdown ends every stream with status OK (end of stream, no error).
    node.stop().await;
    assert_eq!(next(&mut st).await.expect("ends with OK"), None);
    assert_eq!(next(&mut st2).await.expect("ends with OK"), None);
    let end = tokio::time::timeout(WAIT, spec_stream.message())
        .await
        .expect("spec stream ends");
    assert!(matches!(end, Ok(None)), "{end:?}");
}

#[tokio::test]
async fn stale_samples_and_a_down_gpu_source_are_unavailable() {
    // Long enough that a loaded CI machine does not make fresh samples stale
    // between a feed and the next call.
    let poll = Duration::from_millis(250);
    let node = Node::start(poll, None).await;
    node.set_pods(vec![pod("ml", "w-0", "w0", &[("app", "w")])]);
    node.attributor.assign(10, "w0");
    let mut c = node.client().await;
    let o = object("ml", &[("podSelector", "app=w")]);

    // Before the first GPU pass: unavailable, not zero.
    let err = metrics(&mut c, &o, "").await.expect_err("no samples yet");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    node.set_gpus(vec![device(0, 50, 100.0, vec![process(10, 30, 0, 1)])]);
    node.settle().await;
    assert_eq!(
        metrics(&mut c, &o, "")
            .await
            .expect("fresh")
            .metric_value_float,
        30.0
    );

    // Three poll intervals (750 ms) without a pass: stale.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let err = metrics(&mut c, &o, "").await.expect_err("stale");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("old"), "{}", err.message());
    let err = c.is_active(o.clone()).await.expect_err("stale");
    assert_eq!(err.code(), Code::Unavailable);
    let mut st = c
        .stream_is_active(o.clone())
        .await
        .expect("stream opens")
        .into_inner();
    let first = tokio::time::timeout(WAIT, st.message())
        .await
        .expect("first event");
    // Unknown: the stream ends with status OK (KEDA asks again in 2 s).
    assert!(matches!(first, Ok(None)), "{first:?}");
    let (code, body) = node.http_get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("old"), "{body}");
    // GetMetricSpec needs metadata only: still answers.
    spec(&mut c, &o)
        .await
        .expect("spec does not depend on samples");

    // A failing GPU source: unavailable with its reason, even though the last
    // good samples are still there.
    node.set_gpus(vec![device(0, 50, 100.0, vec![process(10, 30, 0, 1)])]);
    node.settle().await;
    metrics(&mut c, &o, "").await.expect("fresh again");
    node.fail_gpus("NVML: GPU 0 has fallen off the bus");
    node.settle().await;
    let err = metrics(&mut c, &o, "").await.expect_err("GPU down");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("fallen off the bus"),
        "{}",
        err.message()
    );
    let (code, body) = node.http_get("/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("fallen off the bus"), "{body}");

    // A figure that cannot be read (MIG: no per-process SM) is unavailable for
    // the metrics that need it, while the others still answer.
    let mut p = process(10, 0, 0, 2048);
    p.sm_util = Reading::unavailable("MIG: per-process utilization is not supported");
    node.set_gpus(vec![device(0, 50, 100.0, vec![p])]);
    node.settle().await;
    let err = metrics(&mut c, &o, "").await.expect_err("no SM figure");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("MIG"), "{}", err.message());
    let mem = object(
        "ml",
        &[("podSelector", "app=w"), ("metric", "memory_used_mib")],
    );
    assert_eq!(
        metrics(&mut c, &mem, "")
            .await
            .expect("memory is known")
            .metric_value,
        2048
    );

    // A GPU whose process list could not be read: nobody's share is known.
    let mut d = device(0, 50, 100.0, vec![]);
    d.processes_error = Some("NVML: insufficient permissions".into());
    node.set_gpus(vec![d]);
    node.settle().await;
    let err = metrics(&mut c, &mem, "")
        .await
        .expect_err("process list unknown");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("insufficient permissions"),
        "{}",
        err.message()
    );
    node.stop().await;
}

/// Test PKI: a CA, a server certificate for `localhost`, a client certificate
/// signed by the CA, and one signed by a different CA.
struct Pki {
    ca_pem: String,
    server: (String, String),
    client: (String, String),
    stranger: (String, String),
    /// Signed by the client CA, but for another name (e.g. the daemons' peer
    /// certificate).
    same_ca_other_name: (String, String),
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let ca = |cn: &str| {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert")
    };
    let leaf = |issuer: &CertifiedIssuer<'_, KeyPair>, name: &str| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .signed_by(&key, issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let ca1 = ca("gpu-scaler test CA");
    let ca2 = ca("someone else's CA");
    Pki {
        ca_pem: ca1.pem(),
        server: leaf(&ca1, "localhost"),
        client: leaf(&ca1, "keda-operator"),
        stranger: leaf(&ca2, "keda-operator"),
        same_ca_other_name: leaf(&ca1, "gpu-scaler-peers"),
    }
}

async fn tls_client(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    identity: Option<&(String, String)>,
) -> Result<ExternalScalerClient<Channel>, String> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut cfg = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        cfg = cfg.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(cfg)
        .expect("TLS config")
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(ExternalScalerClient::new(channel))
}

/// A call that must fail because the TLS handshake is refused (at connect or,
/// with TLS 1.3 client auth, at the first request).
async fn refused(client: Result<ExternalScalerClient<Channel>, String>, o: &ScaledObjectRef) {
    if let Ok(mut c) = client {
        let err = c.get_metric_spec(o.clone()).await.expect_err("refused");
        assert_ne!(err.code(), Code::Ok);
    }
}

#[tokio::test]
async fn tls_and_mtls() {
    let pki = pki();
    let o = object("ml", &[("podSelector", "app=w")]);

    // Server TLS: a client trusting the CA gets answers; plaintext does not.
    let node = Node::start(
        SLOW_POLL,
        Some(Tls {
            cert_pem: pki.server.0.clone().into_bytes(),
            key_pem: pki.server.1.clone().into_bytes(),
            client_ca_pem: None,
            client_names: Vec::new(),
        }),
    )
    .await;
    let mut c = tls_client(node.grpc_addr, &pki.ca_pem, None)
        .await
        .expect("TLS connect");
    spec(&mut c, &o).await.expect("GetMetricSpec over TLS");
    let plain = ExternalScalerClient::connect(format!("http://{}", node.grpc_addr)).await;
    refused(plain.map_err(|e| e.to_string()), &o).await;
    node.stop().await;

    // mTLS: only clients with a certificate from the client CA.
    let node = Node::start(
        SLOW_POLL,
        Some(Tls {
            cert_pem: pki.server.0.clone().into_bytes(),
            key_pem: pki.server.1.clone().into_bytes(),
            client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
            client_names: Vec::new(),
        }),
    )
    .await;
    let mut c = tls_client(node.grpc_addr, &pki.ca_pem, Some(&pki.client))
        .await
        .expect("mTLS connect");
    spec(&mut c, &o).await.expect("GetMetricSpec over mTLS");
    refused(tls_client(node.grpc_addr, &pki.ca_pem, None).await, &o).await;
    refused(
        tls_client(node.grpc_addr, &pki.ca_pem, Some(&pki.stranger)).await,
        &o,
    )
    .await;
    node.stop().await;

    // The client identity pinned: the same CA's certificate for another name
    // is refused; KEDA's name passes.
    let node = Node::start(
        SLOW_POLL,
        Some(Tls {
            cert_pem: pki.server.0.clone().into_bytes(),
            key_pem: pki.server.1.clone().into_bytes(),
            client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
            client_names: vec!["keda-operator".into()],
        }),
    )
    .await;
    let mut c = tls_client(node.grpc_addr, &pki.ca_pem, Some(&pki.client))
        .await
        .expect("mTLS connect");
    spec(&mut c, &o).await.expect("KEDA's name passes");
    let mut other = tls_client(node.grpc_addr, &pki.ca_pem, Some(&pki.same_ca_other_name))
        .await
        .expect("the handshake succeeds: the CA signed it");
    let err = other
        .get_metric_spec(o.clone())
        .await
        .expect_err("another name is refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("keda-operator"), "{}", err.message());
    node.stop().await;
}

/// The HPA loop (KEDA's default AverageValue, tolerance 0.1, min 0, max 20)
/// polling the real server while the demand changes.
///
/// Model: the workload has `replicas` pods, each on its own GPU; a demand of D
/// (SM %) spreads evenly over them, each pod saturating at 100 %. With zero
/// replicas no pod of the deployment exists; new demand then first shows up on
/// a pod started outside the HPA (a Job with the same labels), which is how a
/// GPU-usage metric can wake a workload: IsActive turns true, KEDA scales to
/// one, and the Job's work moves to the deployment.
#[tokio::test]
async fn hpa_simulation_converges_and_scales_to_zero_and_back() {
    let node = Node::start(SLOW_POLL, None).await;
    let mut c = node.client().await;
    let target = 60.0;
    let o = object(
        "ml",
        &[
            ("podSelector", "app=worker"),
            ("targetValue", "60"),
            ("activationThreshold", "5"),
        ],
    );
    let policy = Policy {
        target_type: TargetType::AverageValue,
        min: 0,
        max: 20,
        tolerance: 0.1,
    };

    let feed = |replicas: u32, demand: u32, bootstrap: bool| {
        let mut pods = Vec::new();
        let mut devices = Vec::new();
        let mut placed = Vec::new();
        for i in 0..replicas {
            placed.push((format!("worker-{i}"), format!("w{i}")));
        }
        if bootstrap {
            placed.push(("warmup-job".into(), "job".into()));
        }
        let n = placed.len() as u32;
        for (i, (name, uid)) in placed.iter().enumerate() {
            let pid = 1000 + i as u32;
            pods.push(pod("ml", name, uid, &[("app", "worker")]));
            node.attributor.assign(pid, uid);
            let share = (f64::from(demand) / f64::from(n)).round().min(100.0) as u32;
            devices.push(device(
                i as u32,
                50,
                100.0,
                vec![process(pid, share, 0, 1024)],
            ));
        }
        // The same labels in another namespace never count.
        pods.push(pod("other", "worker-x", "x", &[("app", "worker")]));
        node.attributor.assign(999, "x");
        devices.push(device(99, 50, 100.0, vec![process(999, 100, 0, 1)]));
        node.set_pods(pods);
        node.set_gpus(devices);
    };

    let mut replicas = 1u32;
    let mut history = Vec::new();
    for demand in [150u32, 420, 90] {
        let want = (f64::from(demand) / target).ceil() as u32;
        let mut seen = Vec::new();
        for _ in 0..8 {
            feed(replicas, demand, false);
            node.settle().await;
            let (t, value, active) = keda_poll(&mut c, &o).await;
            assert_eq!(t, target);
            replicas = hpa::desired_replicas(&policy, replicas, value, t, active);
            seen.push(replicas);
        }
        history.push((demand, seen.clone()));
        assert_eq!(
            replicas, want,
            "demand {demand}: converges to ceil({demand} / {target}); saw {seen:?}"
        );
        // No oscillation: the count moves one way and then holds.
        let settled = seen.iter().position(|r| *r == want).expect("reached");
        assert!(
            seen[settled..].iter().all(|r| *r == want),
            "demand {demand}: {seen:?}"
        );
        let monotone =
            seen.windows(2).all(|w| w[0] <= w[1]) || seen.windows(2).all(|w| w[0] >= w[1]);
        assert!(monotone, "demand {demand}: {seen:?}");
    }

    // Idle: the value falls to the activation threshold; KEDA scales to zero.
    let mut st = c
        .stream_is_active(o.clone())
        .await
        .expect("StreamIsActive")
        .into_inner();
    assert_eq!(next(&mut st).await.expect("ok"), Some(true));
    feed(replicas, 0, false);
    assert_eq!(
        next(&mut st).await.expect("ok"),
        Some(false),
        "pushed: inactive"
    );
    let (_, value, active) = keda_poll(&mut c, &o).await;
    assert_eq!((value, active), (0.0, false));
    replicas = hpa::desired_replicas(&policy, replicas, value, target, active);
    assert_eq!(replicas, 0);
    feed(0, 0, false);
    node.settle().await;
    let (_, value, active) = keda_poll(&mut c, &o).await;
    assert_eq!((value, active), (0.0, false), "nothing runs: stays at zero");

    // Back: demand appears on the warm-up Job's pod; the stream says active at
    // once and KEDA wakes the deployment, after which the HPA converges.
    feed(0, 150, true);
    assert_eq!(
        next(&mut st).await.expect("ok"),
        Some(true),
        "pushed: active"
    );
    let (_, value, active) = keda_poll(&mut c, &o).await;
    assert!(active && value == 100.0, "value {value}");
    replicas = hpa::desired_replicas(&policy, replicas, value, target, active);
    assert_eq!(replicas, 1, "KEDA activates to one replica");
    for _ in 0..6 {
        feed(replicas, 150, false);
        node.settle().await;
        let (t, value, active) = keda_poll(&mut c, &o).await;
        replicas = hpa::desired_replicas(&policy, replicas, value, t, active);
    }
    assert_eq!(replicas, 3, "history {history:?}");
    drop(st);
    node.stop().await;
}

fn query_args(
    addr: std::net::SocketAddr,
    metadata: &[&str],
    replicas: u32,
) -> gpu_scaler::cli::query::QueryArgs {
    use clap::Parser as _;
    let mut argv = vec![
        "gpu-scaler".to_owned(),
        "query".to_owned(),
        "--address".to_owned(),
        addr.to_string(),
        "--namespace".to_owned(),
        "ml".to_owned(),
        "--replicas".to_owned(),
        replicas.to_string(),
    ];
    argv.extend(metadata.iter().map(|m| m.to_string()));
    match gpu_scaler::cli::Args::parse_from(argv).command {
        gpu_scaler::cli::Command::Query(q) => q,
        _ => panic!("parsed as query"),
    }
}

#[tokio::test]
async fn query_command_asks_as_keda_and_computes_replicas() {
    let node = Node::start(SLOW_POLL, None).await;
    fleet(&node).await;
    // vllm in `ml`: gpu_utilization 30 + 30 + 0 = 60; with target 25 on 1 replica
    // the HPA asks for ceil(60 / 25) = 3.
    let args = query_args(
        node.grpc_addr,
        &["podSelector=app=vllm", "targetValue=25"],
        1,
    );
    let a = gpu_scaler::cli::query::ask(&args).await.expect("query");
    assert!(
        a.metric_name.starts_with("gpu-gpu-utilization-sum-"),
        "{a:?}"
    );
    assert_eq!((a.target, a.value, a.active), (25.0, 60.0, true));
    assert_eq!((a.current_replicas, a.desired_replicas), (1, 3));
    // Within the 10 % tolerance on 2 replicas (60 / 50 = 1.2 is outside; 60 / 57 inside).
    let args = query_args(
        node.grpc_addr,
        &["podSelector=app=vllm", "targetValue=28.5"],
        2,
    );
    assert_eq!(
        gpu_scaler::cli::query::ask(&args)
            .await
            .expect("query")
            .desired_replicas,
        2
    );
    let args = query_args(
        node.grpc_addr,
        &["podSelector=app=vllm", "targetValue=-1"],
        2,
    );
    let err = gpu_scaler::cli::query::ask(&args)
        .await
        .expect_err("bad metadata");
    assert!(
        err.to_string().contains("InvalidArgument") && err.to_string().contains("targetValue"),
        "{err}"
    );
    node.stop().await;

    // Over mTLS with the client options.
    let pki = pki();
    let tmpdir = tempfile::tempdir().expect("temp dir");
    let dir = tmpdir.path();
    let write = |name: &str, pem: &str| {
        let p = dir.join(name);
        std::fs::write(&p, pem).expect("write PEM");
        p.display().to_string()
    };
    let (ca, cert, key) = (
        write("ca.pem", &pki.ca_pem),
        write("c.pem", &pki.client.0),
        write("k.pem", &pki.client.1),
    );
    let node = Node::start(
        SLOW_POLL,
        Some(Tls {
            cert_pem: pki.server.0.clone().into_bytes(),
            key_pem: pki.server.1.clone().into_bytes(),
            client_ca_pem: Some(pki.ca_pem.clone().into_bytes()),
            client_names: Vec::new(),
        }),
    )
    .await;
    fleet(&node).await;
    let mut args = query_args(node.grpc_addr, &["podSelector=app=vllm"], 1);
    args.tls_ca = Some(ca.clone().into());
    args.tls_server_name = Some("localhost".into());
    assert!(
        gpu_scaler::cli::query::ask(&args).await.is_err(),
        "mTLS refuses a client without a certificate"
    );
    args.tls_cert = Some(cert.into());
    args.tls_key = Some(key.into());
    let a = gpu_scaler::cli::query::ask(&args)
        .await
        .expect("query over mTLS");
    assert_eq!(a.value, 60.0);
    node.stop().await;
}

#[tokio::test]
async fn pods_file_feeds_the_scaler_and_only_local_pods_count() {
    let tmpdir = tempfile::tempdir().expect("temp dir");
    let dir = tmpdir.path();
    let path = dir.join("pods.json");
    let list = |b_node: &str| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""},
            "items": [
                {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "vllm-a", "namespace": "ml", "uid": "ua", "labels": {"app": "vllm"}},
                 "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}},
                {"apiVersion": "v1", "kind": "Pod",
                 "metadata": {"name": "vllm-b", "namespace": "ml", "uid": "ub", "labels": {"app": "vllm"}},
                 "spec": {"nodeName": b_node}, "status": {"phase": "Running"}}
            ]
        })
        .to_string()
    };
    std::fs::write(&path, list("n2")).expect("write pods file");
    let pods = gpu_scaler::pods::file::start(gpu_scaler::pods::file::Config {
        path: path.clone(),
        node_name: Some("n1".into()),
        check_interval: Duration::from_millis(20),
    })
    .expect("pods file source");
    let node = Node::start_with_pods(SLOW_POLL, None, Some(pods)).await;
    node.attributor.assign(1, "ua");
    node.attributor.assign(2, "ub");
    let gpus = || {
        vec![device(
            0,
            50,
            100.0,
            vec![process(1, 30, 0, 1), process(2, 20, 0, 1)],
        )]
    };
    node.set_gpus(gpus());
    node.settle().await;
    let mut c = node.client().await;
    let o = object("ml", &[("podSelector", "app=vllm")]);
    assert_eq!(
        metrics(&mut c, &o, "")
            .await
            .expect("value")
            .metric_value_float,
        30.0,
        "only vllm-a is on n1"
    );

    // The pod moves to this node (a rewrite of the file): it counts from then on.
    std::fs::write(&path, list("n1")).expect("rewrite pods file");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        node.set_gpus(gpus());
        node.settle().await;
        let v = metrics(&mut c, &o, "")
            .await
            .expect("value")
            .metric_value_float;
        if v == 50.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rewritten file was not picked up (value {v})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.stop().await;
}

/// A scenario with one GPU per (pid, SM %) pair, 80 GiB, 200 W.
fn scenario(procs: &[(u32, u32)]) -> String {
    let mut s = String::new();
    for (pid, sm) in procs {
        s.push_str(&format!(
            "[[gpu]]\nmemory_total_mib = 81920\nutilization = {sm}\nmemory_utilization = 0\n\
             temperature_c = 60\npower_w = 200.0\npower_limit_w = 700.0\n\n\
             [[gpu.process]]\npid = {pid}\nsm_util = {sm}\nmem_util = 0\nused_memory_mib = 1024\n\n"
        ));
    }
    s
}

/// The real GPU poller with the mock scenario source, through the daemon's
/// wiring: figures from the file reach GetMetrics, and a rewrite of the file
/// reaches it on a following poll.
#[tokio::test]
async fn mock_scenario_source_reaches_get_metrics() {
    let tmpdir = tempfile::tempdir().expect("temp dir");
    let dir = tmpdir.path();
    let path = dir.join("scenario.toml");
    std::fs::write(&path, scenario(&[(100, 30), (101, 50), (200, 90)])).expect("write scenario");
    let poll = Duration::from_millis(100);
    let gpu = gpu_scaler::gpu::start(gpu_scaler::gpu::Config {
        source: gpu_scaler::gpu::SourceKind::Mock,
        nvml_lib: None,
        scenario: Some(path.clone()),
        poll_interval: poll,
    });
    let node = Node::start_with_sources(Duration::from_secs(10), None, None, Some(gpu)).await;
    node.set_pods(vec![
        pod("ml", "a", "ua", &[("app", "vllm")]),
        pod("ml", "b", "ub", &[("app", "vllm")]),
        pod("prod", "c", "uc", &[("app", "vllm")]),
    ]);
    node.attributor.assign(100, "ua");
    node.attributor.assign(101, "ub");
    node.attributor.assign(200, "uc");
    let mut c = node.client().await;
    let o = object("ml", &[("podSelector", "app=vllm")]);
    let waiter = c.clone();
    let wait_for = |want: f64| {
        let o = o.clone();
        let mut c = waiter.clone();
        async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let got = metrics(&mut c, &o, "").await.map(|v| v.metric_value_float);
                if got.as_ref().is_ok_and(|v| *v == want) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "waiting for {want}, have {got:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for(80.0).await;
    let mem = object(
        "ml",
        &[
            ("podSelector", "app=vllm"),
            ("metric", "memory_used_percent"),
        ],
    );
    assert_close(
        metrics(&mut c, &mem, "")
            .await
            .expect("memory")
            .metric_value_float,
        2.0 * 100.0 * 1024.0 / 81920.0,
        "memory_used_percent",
    );

    let tmp = dir.join("scenario.toml.tmp");
    std::fs::write(&tmp, scenario(&[(100, 10), (101, 15), (200, 90)])).expect("write scenario");
    std::fs::rename(&tmp, &path).expect("replace scenario");
    wait_for(25.0).await;
    node.stop().await;
}
