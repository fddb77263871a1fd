//! `cargo xtask run --kubernetes` (issue 16): the local demo's closed loop on the
//! real control plane of this harness. A Deployment `demo/vllm` with a
//! ScaledObject on gpu-scaler; the clients' demand curve (requests in flight)
//! spread over the running replicas becomes each replica's GPU use (the mock
//! scenario the kubelet stand-in writes) and its engine's queue (its vLLM
//! exposition); the real KEDA and the real HPA do the scaling. Each refresh
//! shows `kubectl get`-like lines for the Deployment and its HPA beside the
//! daemons' view of every pod, or prints one JSON object (`--json`).
//!
//! The load model is the local demo's own (`xtask/src/demo/model.rs`, included
//! below as a module, as `gpu/scenario.rs` is into the fake NVML library), so the
//! two demos show the same workload.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use gpu_scaler::scaler::proto::{
    GetMetricsRequest, ScaledObjectRef, external_scaler_client::ExternalScalerClient,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use super::{
    Cluster, METRICS_PORT, SCALER_PORT, SCALER_SERVICE, deployment, kubelet::ENGINE_PORT,
    scaled_object,
};

// Its stabilizer is the local demo's own HPA (the real one runs here), and its
// unit tests run in xtask (without libtest here, they compile to nothing).
#[allow(dead_code, unused_imports)]
#[path = "../../xtask/src/demo/model.rs"]
mod model;

const NAMESPACE: &str = "demo";
const APP: &str = "vllm";
/// How often the screen refreshes (the HPA runs every 2 s here, KEDA polls
/// every 2 s).
const REFRESH: Duration = Duration::from_secs(2);
/// Refreshes of replica history on the screen.
const HISTORY: usize = 40;

/// What the workload scales on, as `cargo xtask run --signal` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Gpu,
    Engine,
}

/// The demo's options, passed through by `cargo xtask run --kubernetes`.
pub struct Options {
    duration: Option<Duration>,
    json: bool,
    signal: Signal,
    demand: model::Demand,
    scale_down_window: u64,
    min_replicas: u32,
    max_replicas: u32,
}

impl Options {
    /// `--duration N --json --signal gpu|engine --demand SPEC
    /// --scale-down-window S --min-replicas N --max-replicas N`.
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self, String> {
        let mut o = Self {
            duration: None,
            json: false,
            signal: Signal::Gpu,
            demand: model::Demand::default_cycle(),
            scale_down_window: 30,
            min_replicas: 1,
            max_replicas: 7,
        };
        let mut it = args.iter().map(AsRef::as_ref);
        while let Some(a) = it.next() {
            let mut value = || {
                it.next()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{a} needs a value"))
            };
            let number = |v: String| {
                v.parse::<u64>()
                    .map_err(|e| format!("{a} {v:?}: not a whole number: {e}"))
            };
            match a {
                "--json" => o.json = true,
                "--duration" => o.duration = Some(Duration::from_secs(number(value()?)?)),
                "--signal" => {
                    o.signal = match value()?.as_str() {
                        "gpu" => Signal::Gpu,
                        "engine" => Signal::Engine,
                        other => return Err(format!("--signal {other:?}: gpu or engine")),
                    }
                }
                "--demand" => {
                    o.demand = model::Demand::parse(&value()?).map_err(|e| format!("{e:#}"))?
                }
                "--scale-down-window" => o.scale_down_window = number(value()?)?,
                "--min-replicas" => o.min_replicas = number(value()?)? as u32,
                "--max-replicas" => o.max_replicas = number(value()?)? as u32,
                other => return Err(format!("unknown demo option {other:?}")),
            }
        }
        if o.min_replicas == 0 || o.min_replicas > o.max_replicas || o.max_replicas > 20 {
            return Err("need 1 <= --min-replicas <= --max-replicas <= 20".into());
        }
        Ok(o)
    }

    /// The trigger's metadata: the local demo's targets.
    fn trigger(&self, scaler: &str) -> Vec<(&'static str, String)> {
        let mut t = vec![("scalerAddress", scaler.to_owned())];
        match self.signal {
            Signal::Gpu => t.extend([
                ("metric", "gpu_utilization".into()),
                ("targetValue", "60".into()),
            ]),
            // gpu-scaler refuses metricsPort beside a GPU figure: it is where
            // an engine is read.
            Signal::Engine => t.extend([
                ("metric", "vllm_queue_depth".into()),
                ("targetValue", "2".into()),
                ("metricsPort", ENGINE_PORT.to_string()),
            ]),
        }
        t
    }
}

/// Writes a refresh to stdout as it comes.
pub fn print(refresh: String) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{refresh}");
    let _ = out.flush();
}

/// One pod as the daemons see it.
struct PodView {
    name: String,
    node: String,
    sm: Option<f64>,
    waiting: Option<f64>,
}

/// Runs the demo on the started cluster until `--duration` or Ctrl-C (which
/// ends the process; the cluster's processes die with their parent's session),
/// giving `emit` each refresh: a screen, or with `--json` one JSON line.
pub fn run(c: &mut Cluster, o: &Options, emit: &mut dyn FnMut(String)) {
    let scaler = c.scaler_address();
    let trigger = o.trigger(&scaler);
    c.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}));
    c.apply(deployment(NAMESPACE, APP, APP, o.min_replicas as i32));
    let metadata: serde_json::Map<String, Value> = trigger
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::from(v.clone())))
        .collect();
    let mut so = scaled_object(
        NAMESPACE,
        APP,
        APP,
        json!({"type": "external", "metadata": metadata}),
        json!({"minReplicaCount": o.min_replicas, "maxReplicaCount": o.max_replicas}),
    );
    // The real HPA's rule with a short scale-down window, so the demo moves
    // within a minute (300 s by default).
    so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] =
        json!(o.scale_down_window);
    c.apply(so);

    let started = Instant::now();
    let mut history: Vec<u32> = Vec::new();
    let mut client = None;
    loop {
        let t = started.elapsed().as_secs_f64();
        if o.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        c.check();
        // The clients spread the demand over the replicas that are running.
        let running = c.kubelet.running(NAMESPACE, APP) as u32;
        let demand = o.demand.at(t);
        let load = model::replica_load(demand, running);
        c.kubelet
            .set_demand(NAMESPACE, APP, load.sm.min(100) * running);
        c.kubelet.set_queue(NAMESPACE, APP, load.waiting * running);

        let (spec, ready) = c.replicas(NAMESPACE, APP);
        let hpa = c.hpa(NAMESPACE, APP);
        let value = c.rt.block_on(get_metrics(c, &mut client, &trigger));
        let pods = c.rt.block_on(pod_views(c));
        history.push(spec as u32);
        if o.json {
            let signal = match o.signal {
                Signal::Gpu => "gpu",
                Signal::Engine => "engine",
            };
            let line = json!({
                "t": t.round(),
                "signal": signal,
                "trigger": trigger.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                "demand": demand,
                "replica_load": load,
                "replicas": spec,
                "ready": ready,
                "hpa_desired": hpa.as_ref().map(|h| h.0),
                "hpa_current": hpa.as_ref().and_then(|h| h.1.clone()),
                "value": value.as_ref().ok(),
                "value_error": value.as_ref().err(),
                "pods": pods.iter().map(|p| json!({
                    "name": p.name, "node": p.node, "measured_sm": p.sm,
                    "measured_queue": p.waiting})).collect::<Vec<_>>(),
            });
            emit(line.to_string());
        } else {
            let screen = render(o, t, demand, (spec, ready), &hpa, &value, &pods, &history);
            // Clear and home, then the frame: one write, so it does not flicker.
            emit(format!("\x1b[2J\x1b[H{screen}"));
        }
        std::thread::sleep(REFRESH);
    }
}

/// GetMetrics as KEDA sends it, to the first node's daemon, over mTLS with
/// KEDA's client certificate from the chart (the daemons take no other).
async fn get_metrics(
    c: &Cluster,
    client: &mut Option<ExternalScalerClient<tonic::transport::Channel>>,
    trigger: &[(&'static str, String)],
) -> Result<f64, String> {
    if client.is_none() {
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
        let [ca, cert, key] = &c.keda_client;
        let addr = SocketAddr::new(IpAddr::V4(c.nodes[0].0.ip), SCALER_PORT);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name(SCALER_SERVICE);
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(tls))
            .map_err(|e| format!("{addr}: {e}"))?
            .connect()
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        *client = Some(ExternalScalerClient::new(channel));
    }
    let request = GetMetricsRequest {
        scaled_object_ref: Some(ScaledObjectRef {
            name: APP.into(),
            namespace: NAMESPACE.into(),
            scaler_metadata: trigger
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        }),
        metric_name: String::new(),
    };
    let answer = client
        .as_mut()
        .expect("connected above")
        .get_metrics(request)
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    answer
        .into_inner()
        .metric_values
        .first()
        .map(|m| m.metric_value_float)
        .ok_or_else(|| "no value in the answer".into())
}

/// The workload's pods and what the daemon of each one's node measures for it,
/// from that daemon's /metrics as Prometheus scrapes it (the chart turns
/// /v1/snapshot off): SM % summed over its containers and GPUs, and its
/// engine's queue while a query reads it.
async fn pod_views(c: &Cluster) -> Vec<PodView> {
    let api: Api<Pod> = Api::namespaced(c.cp.admin.clone(), NAMESPACE);
    let Ok(list) = api
        .list(&ListParams::default().labels(&format!("app={APP}")))
        .await
    else {
        return Vec::new();
    };
    let mut scrapes = std::collections::HashMap::new();
    let mut views = Vec::new();
    for p in list.items {
        let Some(name) = p.metadata.name.clone() else {
            continue;
        };
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let scrape = match c.nodes.iter().find(|(n, _)| n.name == node) {
            Some((n, _)) => scrapes
                .entry(node.clone())
                .or_insert_with(|| {
                    let http = SocketAddr::new(IpAddr::V4(n.ip), METRICS_PORT);
                    let (_, body) = gpu_scaler::testing::http_get(http, "/metrics").ok()?;
                    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).ok()
                })
                .as_ref(),
            None => None,
        };
        let sum = |family: &str, figure: Option<&str>| {
            let s = scrape?;
            let values: Vec<f64> = s
                .samples
                .iter()
                .filter(|x| {
                    x.metric == family
                        && x.labels.get("namespace") == Some(NAMESPACE)
                        && x.labels.get("pod") == Some(name.as_str())
                        && figure.is_none_or(|f| x.labels.get("figure") == Some(f))
                })
                .filter_map(|x| match x.value {
                    prometheus_parse::Value::Gauge(v) => Some(v),
                    _ => None,
                })
                .collect();
            (!values.is_empty()).then(|| values.iter().sum())
        };
        views.push(PodView {
            sm: sum("gpu_scaler_pod_sm_utilization_percent", None),
            waiting: sum("gpu_scaler_pod_engine_figure", Some("vllm_queue_depth")),
            name,
            node,
        });
    }
    views.sort_by(|a, b| a.name.cmp(&b.name));
    views
}

/// One screen: the demand, `kubectl get deployment,hpa`-like lines, the
/// daemons' view of each pod, the value KEDA gets, the replica history.
#[allow(clippy::too_many_arguments)]
fn render(
    o: &Options,
    t: f64,
    demand: f64,
    (spec, ready): (i32, i32),
    hpa: &Option<(i32, Option<String>)>,
    value: &Result<f64, String>,
    pods: &[PodView],
    history: &[u32],
) -> String {
    let mut s = String::new();
    let (metric, target) = match o.signal {
        Signal::Gpu => ("gpu_utilization", 60),
        Signal::Engine => ("vllm_queue_depth", 2),
    };
    let _ = writeln!(
        s,
        "gpu-scaler on the real control plane (etcd, kube-apiserver, kube-controller-manager, \
         KEDA; 3 nodes)   t = {t:.0} s   Ctrl-C to stop\n\
         clients: {demand:.0} requests in flight   ScaledObject {NAMESPACE}/{APP}: {metric}, \
         targetValue {target} per replica, {}-{} replicas\n",
        o.min_replicas, o.max_replicas
    );
    let _ = writeln!(s, "$ kubectl -n {NAMESPACE} get deployment {APP}");
    let _ = writeln!(s, "{:<8}{:<8}{:<12}", "NAME", "READY", "UP-TO-DATE");
    let _ = writeln!(s, "{APP:<8}{:<8}{spec:<12}\n", format!("{ready}/{spec}"));
    let _ = writeln!(s, "$ kubectl -n {NAMESPACE} get hpa keda-hpa-{APP}");
    let _ = writeln!(
        s,
        "{:<16}{:<18}{:<20}{:<9}{:<9}REPLICAS",
        "NAME", "REFERENCE", "TARGETS", "MINPODS", "MAXPODS"
    );
    let (desired, current) = match hpa {
        Some((d, c)) => (
            d.to_string(),
            c.clone().unwrap_or_else(|| "<unknown>".into()),
        ),
        None => ("-".into(), "<unknown>".into()),
    };
    let _ = writeln!(
        s,
        "{:<16}{:<18}{:<20}{:<9}{:<9}{desired}\n",
        format!("keda-hpa-{APP}"),
        format!("Deployment/{APP}"),
        format!("{current}/{target} (avg)"),
        o.min_replicas,
        o.max_replicas
    );
    let _ = writeln!(s, "gpu-scaler's view (each pod's node's daemon, /metrics)");
    let _ = writeln!(
        s,
        "{:<28}{:<13}{:>6}{:>9}",
        "POD", "NODE", "SM %", "WAITING"
    );
    let fig = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    for p in pods {
        let _ = writeln!(
            s,
            "{:<28}{:<13}{:>6}{:>9}",
            p.name,
            p.node,
            fig(p.sm),
            fig(p.waiting)
        );
    }
    let value = match value {
        Ok(v) => format!("{v:.1}"),
        Err(e) => format!("error: {e}"),
    };
    let _ = writeln!(
        s,
        "\nGetMetrics (what KEDA gets, the workload's sum): {value}\n\
         replicas over the last {} s: {}",
        HISTORY * REFRESH.as_secs() as usize,
        model::sparkline(
            history.iter().rev().take(HISTORY).rev().copied(),
            o.max_replicas
        )
    );
    s
}
