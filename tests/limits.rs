//! Bad input at the daemon's edges, over real sockets (issue 13): an oversize
//! selector, invented gRPC methods, namespaces that would change an API path,
//! idle HTTP connections, and a daemon with no Kubernetes configuration.
//! Figures (time, memory, p99) are in `cargo xtask bench scaler limits`.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use gpu_scaler::scaler::proto::{IsActiveResponse, ScaledObjectRef};
use gpu_scaler_tests::scaler::{Node, object_ref};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

const POLL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn an_oversize_selector_is_refused_before_it_is_parsed() {
    let node = Node::start(POLL, None).await;
    let mut c = node.client().await;

    // The 3.9 MiB selector: past the decode limit, refused by the
    // transport before the message is decoded.
    let huge = "a,".repeat(2_000_000);
    let err = c
        .get_metric_spec(object_ref("ml", "so", &[("podSelector", &huge)]))
        .await
        .expect_err("refused");
    assert!(
        matches!(err.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{err:?}"
    );

    // Within the decode limit but over the value limit: INVALID_ARGUMENT that
    // says which limit, without quoting the value back. GetMetricSpec answers a
    // placeholder (it never fails on metadata: KEDA drops its errors); the
    // calls KEDA reports as events carry the refusal.
    let big = "a,".repeat(10_000);
    let spec = c
        .get_metric_spec(object_ref("ml", "so", &[("podSelector", &big)]))
        .await
        .expect("a placeholder spec")
        .into_inner();
    assert!(
        spec.metric_specs[0].metric_name.starts_with("gpu-invalid-"),
        "{spec:?}"
    );
    let err = c
        .is_active(object_ref("ml", "so", &[("podSelector", &big)]))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("at most 4096 bytes"),
        "{}",
        err.message()
    );
    assert!(err.message().len() < 300, "{}", err.message());

    // Under 4 KiB but 65 requirements.
    let many = (0..65)
        .map(|i| format!("k{i}"))
        .collect::<Vec<_>>()
        .join(",");
    c.get_metric_spec(object_ref("ml", "so", &[("podSelector", &many)]))
        .await
        .expect("a placeholder spec");
    let err = c
        .is_active(object_ref("ml", "so", &[("podSelector", &many)]))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("64 requirements"),
        "{}",
        err.message()
    );

    // The connection is still good for a proper request.
    c.get_metric_spec(object_ref("ml", "so", &[("podSelector", "app=w")]))
        .await
        .expect("a normal request after the refusals");
    node.stop().await;
}

#[tokio::test]
async fn namespaces_and_names_that_would_change_an_api_path_are_refused() {
    let node = Node::start(POLL, None).await;
    let mut c = node.client().await;
    for ns in [
        "ml/pods?x=",
        "..",
        "ml/../kube-system",
        "ml?labelSelector=a",
        "ML",
    ] {
        let err = c
            .get_metric_spec(object_ref(ns, "so", &[("podSelector", "app=w")]))
            .await
            .expect_err(ns);
        assert_eq!(err.code(), Code::InvalidArgument, "{ns}: {err:?}");
        assert!(
            err.message().contains("namespace"),
            "{ns}: {}",
            err.message()
        );
    }
    for name in ["..", "so/scale", "so?x"] {
        let err = c
            .get_metric_spec(object_ref("ml", name, &[("podSelector", "app=w")]))
            .await
            .expect_err(name);
        assert_eq!(err.code(), Code::InvalidArgument, "{name}: {err:?}");
    }
    node.stop().await;
}

/// Calls `/externalscaler.ExternalScaler/{method}` with a ScaledObjectRef.
async fn call_raw(
    grpc: &mut tonic::client::Grpc<tonic::transport::Channel>,
    method: &str,
) -> Result<IsActiveResponse, tonic::Status> {
    grpc.ready().await.expect("channel ready");
    let path: http::uri::PathAndQuery = format!("/externalscaler.ExternalScaler/{method}")
        .parse()
        .expect("path");
    let codec = tonic_prost::ProstCodec::<ScaledObjectRef, IsActiveResponse>::default();
    grpc.unary(
        tonic::Request::new(object_ref("ml", "so", &[("podSelector", "app=w")])),
        path,
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

fn grpc_series(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| l.starts_with("gpu_scaler_grpc_") && !l.starts_with('#'))
        .count()
}

#[tokio::test]
async fn invented_method_names_leave_the_series_count_unchanged() {
    let node = Node::start(POLL, None).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.grpc_addr))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    // One invented call first, so the `other` series exist in the baseline.
    let err = call_raw(&mut grpc, "Invented0")
        .await
        .expect_err("no such method");
    assert_eq!(err.code(), Code::Unimplemented);
    let (_, before) = node.http_get("/metrics").await;
    let base = grpc_series(&before);
    assert!(before.contains("method=\"other\""), "{before}");
    for i in 1..10_000 {
        let err = call_raw(&mut grpc, &format!("Invented{i}"))
            .await
            .expect_err("no such method");
        assert_eq!(err.code(), Code::Unimplemented);
    }
    let (_, after) = node.http_get("/metrics").await;
    assert_eq!(grpc_series(&after), base, "10,000 invented methods");
    assert!(!after.contains("Invented"), "no invented name is a label");
    let other = after
        .lines()
        .find(|l| l.starts_with("gpu_scaler_grpc_requests_total") && l.contains("method=\"other\""))
        .expect("the other series");
    assert!(other.ends_with(" 10000"), "every call counted: {other}");
    node.stop().await;
}

async fn read_to_eof(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test]
async fn idle_http_connections_are_closed_and_never_keep_probes_out() {
    use gpu_scaler::daemon::http::{Limits, serve};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let header_timeout = Duration::from_millis(500);
    let server = tokio::spawn(serve(
        listener,
        router,
        Limits {
            max_connections: 8,
            header_read_timeout: header_timeout,
        },
        shutdown.clone(),
    ));

    // Eight idle connections fill the cap; a half-sent request head is idle too.
    let mut idle = Vec::new();
    for i in 0..8 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        if i == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHo")
                .await
                .expect("half a head");
        }
        idle.push(s);
    }
    // A probe still gets in (the oldest idle connection makes room).
    let answer = get(addr, "/healthz").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        read_to_eof(&mut idle[0], Duration::from_secs(5)).await,
        "the oldest idle connection was closed for the probe"
    );
    // The others are closed by the header-read timeout.
    for (i, s) in idle.iter_mut().enumerate().skip(1) {
        assert!(
            read_to_eof(s, header_timeout * 10).await,
            "idle connection {i} still open after the header timeout"
        );
    }
    shutdown.cancel();
    server
        .await
        .expect("server task")
        .expect("server ends cleanly");
}

/// `gpu-scaler serve` with mock GPUs, no pods file and the given environment
/// for Kubernetes; returns its /readyz answer once it serves HTTP.
fn readyz_without_kube(env: &[(&str, &str)]) -> (u16, String) {
    use gpu_scaler_tests::serve::{free_port, http_get};
    let dir = tempfile::tempdir().expect("temp dir");
    let scenario = dir.path().join("gpus.toml");
    std::fs::write(
        &scenario,
        "[[gpu]]\nutilization = 10\nmemory_utilization = 5\n",
    )
    .expect("scenario");
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let http = SocketAddr::new(ip, free_port(ip));
    let grpc = SocketAddr::new(ip, free_port(ip));
    let mut cmd = std::process::Command::new(gpu_scaler_tests::workspace_bin("gpu-scaler"));
    cmd.args([
        "serve",
        "--gpu",
        "mock",
        "--attribution",
        "procfs",
        "--node-name",
        "gpu-1",
    ])
    .arg("--gpu-scenario")
    .arg(&scenario)
    .args([
        "--listen",
        &grpc.to_string(),
        "--metrics-listen",
        &http.to_string(),
    ])
    .args(["--peer-listen", "127.0.0.1:0"])
    .env_remove("KUBECONFIG")
    .env_remove("KUBERNETES_SERVICE_HOST")
    .env_remove("KUBERNETES_SERVICE_PORT")
    .env_remove("GPU_SCALER_PODS_FILE")
    .env("HOME", dir.path())
    .env("RUST_LOG", "warn")
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start gpu-scaler serve");
    let got = gpu_scaler_tests::wait_for(Duration::from_secs(30), || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("gpu-scaler serve exited: {status}");
        }
        // Past the first GPU sample, so only the Kubernetes reason is left.
        http_get(http, "/readyz").filter(|(_, body)| !body.contains("no GPU sample yet"))
    });
    let _ = child.kill();
    let _ = child.wait();
    got.expect("the daemon serves /readyz")
}

#[test]
fn no_kubernetes_configuration_is_not_ready_with_the_reason() {
    // Nothing at all: no kubeconfig, not in a cluster.
    let (code, body) = readyz_without_kube(&[]);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("no usable Kubernetes configuration"),
        "{body}"
    );
    // In a cluster (the service host is set) but without a service account
    // token: the in-cluster configuration cannot be read.
    let (code, body) = readyz_without_kube(&[
        ("KUBERNETES_SERVICE_HOST", "127.0.0.1"),
        ("KUBERNETES_SERVICE_PORT", "1"),
    ]);
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("no usable Kubernetes configuration"),
        "{body}"
    );
}
