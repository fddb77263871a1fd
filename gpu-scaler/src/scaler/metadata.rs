//! ScaledObject trigger metadata -> a [`Query`]. Every key is documented in the
//! README's "ScaledObject metadata" section; keep the two in step.
//!
//! Unknown keys are ignored: KEDA forwards its own (`scalerAddress`, ...). A known
//! key with a bad value is an [`Error`] naming the key, the value and what is
//! allowed.

use std::{collections::HashMap, fmt};

use crate::{engine::EngineQuery, pods::Selector};

pub use crate::figures::{Aggregation, Metric};

/// A named set of defaults for a kind of workload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    pub name: &'static str,
    pub metric: Metric,
    pub target: f64,
    pub activation: f64,
}

/// The `profile` table (README: "Profiles").
pub const PROFILES: [Profile; 10] = [
    Profile {
        name: "vllm-inference",
        metric: Metric::MemoryUsedPercent,
        target: 80.0,
        activation: 5.0,
    },
    Profile {
        name: "triton-inference",
        metric: Metric::GpuUtilization,
        target: 75.0,
        activation: 10.0,
    },
    Profile {
        name: "training",
        metric: Metric::GpuUtilization,
        target: 90.0,
        activation: 0.0,
    },
    Profile {
        name: "batch",
        metric: Metric::MemoryUsedPercent,
        target: 70.0,
        activation: 1.0,
    },
    Profile {
        name: "ollama",
        metric: Metric::MemoryUsedPercent,
        target: 70.0,
        activation: 3.0,
    },
    Profile {
        name: "tgi-inference",
        metric: Metric::MemoryUsedPercent,
        target: 75.0,
        activation: 5.0,
    },
    // keda-gpu-scaler's engine profiles, same metric, target and activation.
    Profile {
        name: "vllm-queue-depth",
        metric: Metric::VllmQueueDepth,
        target: 5.0,
        activation: 1.0,
    },
    Profile {
        name: "triton-queue-wait",
        metric: Metric::TritonQueueWaitMs,
        target: 50.0,
        activation: 5.0,
    },
    Profile {
        name: "triton-request-rate",
        metric: Metric::TritonRequestRate,
        target: 50.0,
        activation: 1.0,
    },
    // keda-gpu-scaler's, for data-parallel training whose gradients cross
    // NVLink: MB/s sent.
    Profile {
        name: "distributed-training",
        metric: Metric::NvlinkTxMbps,
        target: 50000.0,
        activation: 5000.0,
    },
];

pub const DEFAULT_TARGET: f64 = 80.0;
pub const DEFAULT_ACTIVATION: f64 = 0.0;

/// Metadata keys this scaler reads.
pub mod keys {
    pub const POD_SELECTOR: &str = "podSelector";
    pub const METRIC: &str = "metric";
    pub const METRIC_TYPE: &str = "metricType";
    pub const PROFILE: &str = "profile";
    pub const TARGET_VALUE: &str = "targetValue";
    pub const ACTIVATION_THRESHOLD: &str = "activationThreshold";
    pub const TARGET_GPU_UTILIZATION: &str = "targetGpuUtilization";
    pub const TARGET_MEMORY_UTILIZATION: &str = "targetMemoryUtilization";
    pub const AGGREGATION: &str = "aggregation";
    pub const METRIC_NAME: &str = "metricName";
    pub const METRICS_PORT: &str = "metricsPort";
    pub const METRICS_PATH: &str = "metricsPath";
    pub const VLLM_ENDPOINT: &str = "vllmEndpoint";
    pub const TRITON_ENDPOINT: &str = "tritonEndpoint";
    pub const ENGINE_METRIC: &str = "engineMetric";
    pub const ENGINE_QUANTILE: &str = "engineQuantile";
    pub const ACTIVATION_POD_SELECTOR: &str = "activationPodSelector";
    pub const ACTIVATION_METRIC: &str = "activationMetric";
    pub const ACTIVATION_ENGINE_METRIC: &str = "activationEngineMetric";
    pub const ACTIVATION_METRICS_PORT: &str = "activationMetricsPort";
    pub const ACTIVATION_METRICS_PATH: &str = "activationMetricsPath";

    /// The activation query's keys and the key each stands for in it.
    pub const ACTIVATION: [(&str, &str); 5] = [
        (ACTIVATION_POD_SELECTOR, POD_SELECTOR),
        (ACTIVATION_METRIC, METRIC),
        (ACTIVATION_ENGINE_METRIC, ENGINE_METRIC),
        (ACTIVATION_METRICS_PORT, METRICS_PORT),
        (ACTIVATION_METRICS_PATH, METRICS_PATH),
    ];
}

/// A known key with a value it cannot take.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("metadata {key}: {value:?} is not allowed: {allowed}")]
pub struct Error {
    pub key: &'static str,
    pub value: String,
    /// What would be accepted (and why this was not, when that helps).
    pub allowed: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One ScaledObject trigger's question, parsed and defaulted.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// `podSelector`; `None` only when the caller allowed it to be left out (in
    /// a cluster: the pods are then those of the ScaledObject's scale target).
    pub selector: Option<Selector>,
    pub metric: Metric,
    pub aggregation: Aggregation,
    pub target: f64,
    pub activation: f64,
    /// `metricName`, if the user chose one.
    pub metric_name: Option<String>,
    /// For engine metrics: what is read from each pod's engine, and where.
    pub engine: Option<EngineQuery>,
    /// `activationPodSelector` (+ `activationMetric`, ...): IsActive is this
    /// query's value over `activation`, measured on other pods of the
    /// namespace (a router, a gateway) that exist while the workload has none.
    pub activation_query: Option<Box<Query>>,
}

fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn number(key: &'static str, value: &str, allowed: &str, ok: impl Fn(f64) -> bool) -> Result<f64> {
    let err = || Error {
        key,
        value: value.to_owned(),
        allowed: allowed.to_owned(),
    };
    let v: f64 = value.trim().parse().map_err(|_| err())?;
    if v.is_finite() && ok(v) {
        Ok(v)
    } else {
        Err(err())
    }
}

fn metric(key: &'static str, value: &str) -> Result<Metric> {
    // Under keda-gpu-scaler's key a name means what keda-gpu-scaler means by
    // it: its vllm_kv_cache_usage is a percentage (pkg/scaler/server.go).
    if key == keys::METRIC_TYPE && value.trim().eq_ignore_ascii_case("vllm_kv_cache_usage") {
        return Ok(Metric::VllmKvCachePercent);
    }
    Metric::parse(value).ok_or_else(|| Error {
        key,
        value: value.to_owned(),
        allowed: format!("one of {}", list(Metric::ALL)),
    })
}

/// Parses a trigger's metadata; `podSelector` is required.
pub fn parse(meta: &HashMap<String, String>) -> Result<Query> {
    parse_with(meta, false)
}

/// The error for a missing `podSelector` where nothing else can find the pods.
pub fn pod_selector_required() -> Error {
    Error {
        key: keys::POD_SELECTOR,
        value: String::new(),
        allowed: "a Kubernetes label selector such as app=vllm,tier in (gpu,edge),!canary \
                  (required without access to the Kubernetes API, which would find the pods \
                  through the ScaledObject's scaleTargetRef)"
            .into(),
    }
}

/// Parses a trigger's metadata; with `selector_optional` a missing
/// `podSelector` gives `selector: None` (the pods then come from the
/// ScaledObject's scale target).
pub fn parse_with(meta: &HashMap<String, String>, selector_optional: bool) -> Result<Query> {
    let get = |k: &str| meta.get(k).map(String::as_str);

    let selector = match get(keys::POD_SELECTOR) {
        None if selector_optional => None,
        None => return Err(pod_selector_required()),
        Some(selector_text) => Some(Selector::parse(selector_text).map_err(|e| Error {
            key: keys::POD_SELECTOR,
            value: selector_text.to_owned(),
            allowed: format!(
                "a Kubernetes label selector such as app=vllm,tier in (gpu,edge),!canary ({e})"
            ),
        })?),
    };

    let profile = match get(keys::PROFILE) {
        None => None,
        Some(v) => Some(
            PROFILES
                .iter()
                .find(|p| p.name.eq_ignore_ascii_case(v.trim()))
                .ok_or_else(|| Error {
                    key: keys::PROFILE,
                    value: v.to_owned(),
                    allowed: format!("one of {}", list(PROFILES.iter().map(|p| p.name))),
                })?,
        ),
    };
    let mut chosen_metric = profile.map(|p| p.metric);
    let mut target = profile.map(|p| p.target);
    let mut activation = profile.map(|p| p.activation);

    let explicit_metric = match (get(keys::METRIC), get(keys::METRIC_TYPE)) {
        (Some(m), Some(t)) => {
            let (m1, m2) = (metric(keys::METRIC, m)?, metric(keys::METRIC_TYPE, t)?);
            if m1 != m2 {
                return Err(Error {
                    key: keys::METRIC_TYPE,
                    value: t.to_owned(),
                    allowed: format!(
                        "the same metric as {} ({m1}): metricType is an alias of metric; set one of them",
                        keys::METRIC
                    ),
                });
            }
            Some(m1)
        }
        (Some(m), None) => Some(metric(keys::METRIC, m)?),
        (None, Some(t)) => Some(metric(keys::METRIC_TYPE, t)?),
        (None, None) => None,
    };
    if explicit_metric.is_some() {
        chosen_metric = explicit_metric;
    }

    let explicit_target = match get(keys::TARGET_VALUE) {
        Some(v) => Some(number(
            keys::TARGET_VALUE,
            v,
            "a number greater than 0",
            |x| x > 0.0,
        )?),
        None => None,
    };
    if explicit_target.is_some() {
        target = explicit_target;
    }
    if let Some(v) = get(keys::ACTIVATION_THRESHOLD) {
        activation = Some(number(
            keys::ACTIVATION_THRESHOLD,
            v,
            "a number greater than or equal to 0",
            |x| x >= 0.0,
        )?);
    }

    // Shorthands set metric and target together, so they cannot be combined with
    // a different metric or an explicit target. targetMemoryUtilization means
    // VRAM used % (memory_used_percent), as in keda-gpu-scaler, whose
    // ScaledObjects this keeps working; it is not the memory-controller %.
    let shorthands = [
        (keys::TARGET_GPU_UTILIZATION, Metric::GpuUtilization),
        (keys::TARGET_MEMORY_UTILIZATION, Metric::MemoryUsedPercent),
    ];
    let mut shorthand_used: Option<&'static str> = None;
    for (key, m) in shorthands {
        let Some(v) = get(key) else { continue };
        let t = number(key, v, "a percentage greater than 0 and at most 100", |x| {
            x > 0.0 && x <= 100.0
        })?;
        if let Some(other) = shorthand_used {
            return Err(Error {
                key,
                value: v.to_owned(),
                allowed: format!(
                    "not together with {other}: each sets the metric; use one trigger per metric"
                ),
            });
        }
        if let Some(em) = explicit_metric
            && em != m
        {
            return Err(Error {
                key,
                value: v.to_owned(),
                allowed: format!("only with metric {m} (it sets the metric), but metric is {em}"),
            });
        }
        if explicit_target.is_some() {
            return Err(Error {
                key,
                value: v.to_owned(),
                allowed: format!(
                    "not together with {}: both set the target",
                    keys::TARGET_VALUE
                ),
            });
        }
        shorthand_used = Some(key);
        chosen_metric = Some(m);
        target = Some(t);
    }

    let metric = chosen_metric.unwrap_or(Metric::GpuUtilization);
    let aggregation = match get(keys::AGGREGATION) {
        Some(v) => Aggregation::parse(v).ok_or_else(|| Error {
            key: keys::AGGREGATION,
            value: v.to_owned(),
            allowed: format!("one of {}", list(Aggregation::ALL)),
        })?,
        None => Aggregation::default_for(metric),
    };
    let metric_name = match get(keys::METRIC_NAME) {
        None => None,
        Some(v) => {
            let ok = !v.is_empty()
                && v.len() <= 200
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                && v.as_bytes()[0].is_ascii_alphanumeric();
            if !ok {
                return Err(Error {
                    key: keys::METRIC_NAME,
                    value: v.to_owned(),
                    allowed: "1-200 characters: letters, digits, '-', '_' or '.', starting with a letter or digit"
                        .into(),
                });
            }
            Some(v.to_owned())
        }
    };
    let engine = engine_query(metric, &get)?;
    let activation_query = activation_query(meta, metric)?;
    Ok(Query {
        selector,
        metric,
        aggregation,
        target: target.unwrap_or(DEFAULT_TARGET),
        activation: activation.unwrap_or(DEFAULT_ACTIVATION),
        metric_name,
        engine,
        activation_query,
    })
}

/// The activation query, from the `activation*` keys: parsed by the same rules
/// as the trigger's own keys, its errors naming the `activation*` key.
fn activation_query(meta: &HashMap<String, String>, metric: Metric) -> Result<Option<Box<Query>>> {
    let get = |k: &str| meta.get(k);
    if get(keys::ACTIVATION_POD_SELECTOR).is_none() {
        if let Some((key, _)) = keys::ACTIVATION[1..].iter().find(|(k, _)| get(k).is_some()) {
            return Err(Error {
                key,
                value: get(key).cloned().unwrap_or_default(),
                allowed: format!("only with {}", keys::ACTIVATION_POD_SELECTOR),
            });
        }
        return Ok(None);
    }
    let mut sub: HashMap<String, String> = keys::ACTIVATION
        .iter()
        .filter_map(|(outer, inner)| get(outer).map(|v| ((*inner).to_owned(), v.clone())))
        .collect();
    sub.entry(keys::METRIC.to_owned())
        .or_insert_with(|| metric.as_str().to_owned());
    parse(&sub).map(|q| Some(Box::new(q))).map_err(|e| {
        let key = keys::ACTIVATION
            .iter()
            .find(|(_, inner)| *inner == e.key)
            .map_or(keys::ACTIVATION_POD_SELECTOR, |(outer, _)| outer);
        Error { key, ..e }
    })
}

/// The port and path of keda-gpu-scaler's `vllmEndpoint`/`tritonEndpoint`
/// URL. Its host is never contacted: every selected pod is read at its own IP.
fn endpoint_url(key: &'static str, value: &str) -> Result<(Option<u16>, Option<String>)> {
    let err = |why: &str| Error {
        key,
        value: value.to_owned(),
        allowed: format!(
            "an http:// URL such as http://vllm:8000/metrics ({why}); only its port and path are \
             used: gpu-scaler reads every selected pod at its own IP, never this host"
        ),
    };
    let uri: http::Uri = value.trim().parse().map_err(|_| err("not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(_) => return Err(err("engines are read over plain HTTP")),
        None => return Err(err("no scheme")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(err("no host"));
    }
    let path = match uri.path_and_query().map(|p| p.as_str()) {
        None | Some("") | Some("/") => None,
        Some(p) => {
            crate::engine::check_path(p).map_err(|e| err(&e))?;
            Some(p.to_owned())
        }
    };
    Ok((Some(uri.port_u16().unwrap_or(80)), path))
}

/// For an engine metric, what each pod's engine is read for; engine keys with
/// a GPU metric are an error (keda-gpu-scaler's endpoint URLs are ignored with
/// GPU metrics, as it ignores them).
fn engine_query<'m>(
    metric: Metric,
    get: &impl Fn(&str) -> Option<&'m str>,
) -> Result<Option<EngineQuery>> {
    let engine_only = [
        keys::METRICS_PORT,
        keys::METRICS_PATH,
        keys::ENGINE_METRIC,
        keys::ENGINE_QUANTILE,
    ];
    if !metric.is_engine() {
        if let Some(key) = engine_only.into_iter().find(|k| get(k).is_some()) {
            return Err(Error {
                key,
                value: get(key).unwrap_or_default().to_owned(),
                allowed: format!(
                    "only with an engine metric ({}); metric is {metric}",
                    list(Metric::ALL.into_iter().filter(|m| m.is_engine()))
                ),
            });
        }
        return Ok(None);
    }
    let (mut port, mut path) = (None, None);
    let url_key = match metric.figure().source {
        crate::figures::Source::Engine(crate::engine::Engine::Vllm) => Some(keys::VLLM_ENDPOINT),
        crate::figures::Source::Engine(
            crate::engine::Engine::Triton | crate::engine::Engine::TrtLlm,
        ) => Some(keys::TRITON_ENDPOINT),
        _ => None,
    };
    if let Some(key) = url_key
        && let Some(url) = get(key)
    {
        (port, path) = endpoint_url(key, url)?;
    }
    if let Some(v) = get(keys::METRICS_PORT) {
        port = Some(
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Error {
                    key: keys::METRICS_PORT,
                    value: v.to_owned(),
                    allowed: "a port from 1 to 65535".into(),
                })?,
        );
    }
    if let Some(v) = get(keys::METRICS_PATH) {
        path = Some(v.trim().to_owned());
    }
    let quantile = match get(keys::ENGINE_QUANTILE) {
        None => None,
        Some(v) => Some(number(
            keys::ENGINE_QUANTILE,
            v,
            "a quantile between 0 and 1, exclusive (e.g. 0.95)",
            |q| q > 0.0 && q < 1.0,
        )?),
    };
    let engine_metric = get(keys::ENGINE_METRIC);
    EngineQuery::new(metric, engine_metric, quantile, port, path.as_deref())
        .map(Some)
        .map_err(|e| {
            let value = match e.key {
                keys::METRICS_PATH => path.clone().unwrap_or_default(),
                keys::METRICS_PORT => port.map(|p| p.to_string()).unwrap_or_default(),
                k => get(k).unwrap_or_default().to_owned(),
            };
            Error {
                key: e.key,
                value,
                allowed: e.why,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ok(pairs: &[(&str, &str)]) -> Query {
        parse(&meta(pairs)).unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
    }

    #[test]
    fn defaults() {
        let q = ok(&[
            ("podSelector", "app=vllm"),
            ("scalerAddress", "x:6000"),
            ("whatever", "!!"),
        ]);
        assert_eq!(q.metric, Metric::GpuUtilization);
        assert_eq!(q.aggregation, Aggregation::Sum);
        assert_eq!(q.target, 80.0);
        assert_eq!(q.activation, 0.0);
        assert_eq!(q.metric_name, None);
        assert_eq!(
            q.selector.as_ref().map(ToString::to_string).as_deref(),
            Some("app=vllm")
        );
    }

    #[test]
    fn every_metric_and_alias() {
        for m in Metric::ALL.into_iter().filter(|m| *m != Metric::Engine) {
            assert_eq!(
                ok(&[("podSelector", "a"), ("metric", m.as_str())]).metric,
                m
            );
            // keda-gpu-scaler's vllm_kv_cache_usage is a percentage.
            let expected = if m == Metric::VllmKvCacheUsage {
                Metric::VllmKvCachePercent
            } else {
                m
            };
            assert_eq!(
                ok(&[("podSelector", "a"), ("metricType", m.as_str())]).metric,
                expected
            );
        }
        assert_eq!(
            ok(&[("podSelector", "a"), ("metric", "GPU_Utilization")]).metric,
            Metric::GpuUtilization
        );
        let q = ok(&[
            ("podSelector", "a"),
            ("metric", "power_draw"),
            ("metricType", "power_draw"),
        ]);
        assert_eq!(q.metric, Metric::PowerDraw);
    }

    #[test]
    fn temperature_defaults_to_max() {
        assert_eq!(
            ok(&[("podSelector", "a"), ("metric", "temperature")]).aggregation,
            Aggregation::Max
        );
        let q = ok(&[
            ("podSelector", "a"),
            ("metric", "temperature"),
            ("aggregation", "avg"),
        ]);
        assert_eq!(q.aggregation, Aggregation::Avg);
        for a in Aggregation::ALL {
            assert_eq!(
                ok(&[("podSelector", "a"), ("aggregation", a.as_str())]).aggregation,
                a
            );
        }
    }

    #[test]
    fn profiles_and_overrides() {
        for p in PROFILES {
            let q = ok(&[("podSelector", "a"), ("profile", p.name)]);
            assert_eq!(
                (q.metric, q.target, q.activation),
                (p.metric, p.target, p.activation),
                "{}",
                p.name
            );
        }
        let q = ok(&[
            ("podSelector", "a"),
            ("profile", "vllm-inference"),
            ("targetValue", "60"),
        ]);
        assert_eq!(
            (q.metric, q.target, q.activation),
            (Metric::MemoryUsedPercent, 60.0, 5.0)
        );
        let q = ok(&[
            ("podSelector", "a"),
            ("profile", "training"),
            ("metric", "power_draw"),
            ("activationThreshold", "2.5"),
        ]);
        assert_eq!(
            (q.metric, q.target, q.activation),
            (Metric::PowerDraw, 90.0, 2.5)
        );
        let q = ok(&[
            ("podSelector", "a"),
            ("profile", "batch"),
            ("targetGpuUtilization", "50"),
        ]);
        assert_eq!(
            (q.metric, q.target, q.activation),
            (Metric::GpuUtilization, 50.0, 1.0)
        );
    }

    #[test]
    fn shorthands() {
        let q = ok(&[("podSelector", "a"), ("targetGpuUtilization", "70")]);
        assert_eq!((q.metric, q.target), (Metric::GpuUtilization, 70.0));
        let q = ok(&[("podSelector", "a"), ("targetMemoryUtilization", "55.5")]);
        assert_eq!((q.metric, q.target), (Metric::MemoryUsedPercent, 55.5));
        let q = ok(&[
            ("podSelector", "a"),
            ("metric", "gpu_utilization"),
            ("targetGpuUtilization", "70"),
        ]);
        assert_eq!((q.metric, q.target), (Metric::GpuUtilization, 70.0));
        let q = ok(&[("podSelector", "a"), ("metricName", "my-llm.gpu_1")]);
        assert_eq!(q.metric_name.as_deref(), Some("my-llm.gpu_1"));
        assert_eq!(
            ok(&[("podSelector", "a"), ("targetValue", "0.5")]).target,
            0.5
        );
    }

    #[test]
    fn engine_metrics_ports_paths_and_urls() {
        let q = ok(&[("podSelector", "a"), ("profile", "vllm-queue-depth")]);
        assert_eq!(
            (q.metric, q.target, q.activation),
            (Metric::VllmQueueDepth, 5.0, 1.0)
        );
        let e = q.engine.expect("an engine query");
        assert_eq!((e.port, e.path), (None, None));
        // keda-gpu-scaler's URL: only its port and path are kept.
        let q = ok(&[
            ("podSelector", "a"),
            ("profile", "triton-queue-wait"),
            (
                "tritonEndpoint",
                "http://triton-resnet-deployment:8002/metrics",
            ),
        ]);
        let e = q.engine.expect("engine");
        assert_eq!(
            (q.metric, e.port, e.path.as_deref()),
            (Metric::TritonQueueWaitMs, Some(8002), Some("/metrics"))
        );
        let q = ok(&[
            ("podSelector", "a"),
            ("metric", "vllm_running"),
            ("vllmEndpoint", "http://vllm:9000/metrics"),
            ("metricsPort", "8080"),
        ]);
        assert_eq!(
            q.engine.expect("engine").port,
            Some(8080),
            "metricsPort wins over the URL"
        );
        let q = ok(&[
            ("podSelector", "a"),
            ("metric", "engine"),
            (
                "engineMetric",
                "envoy_cluster_upstream_rq_pending{envoy_cluster_name=\"vllm\"}",
            ),
            ("metricsPort", "9901"),
            ("metricsPath", "/stats/prometheus"),
        ]);
        let e = q.engine.expect("engine");
        assert_eq!(
            (e.port, e.path.as_deref()),
            (Some(9901), Some("/stats/prometheus"))
        );
        assert!(
            ok(&[
                ("podSelector", "a"),
                ("metric", "gpu_utilization"),
                ("vllmEndpoint", "http://x:1/m")
            ])
            .engine
            .is_none()
        );
        assert_eq!(
            Aggregation::default_for(Metric::TritonQueueWaitMs),
            Aggregation::Sum
        );
    }

    #[test]
    fn activation_query_from_other_pods() {
        let q = ok(&[
            ("podSelector", "app=vllm"),
            ("metric", "vllm_queue_depth"),
            ("activationPodSelector", "app=router"),
            ("activationMetric", "engine"),
            ("activationEngineMetric", "vllm_router_num_queued_requests"),
            ("activationMetricsPort", "8001"),
        ]);
        let a = q.activation_query.expect("activation query");
        assert_eq!(
            a.selector.map(|s| s.to_string()).as_deref(),
            Some("app=router")
        );
        assert_eq!(a.metric, Metric::Engine);
        assert_eq!(a.engine.expect("engine").port, Some(8001));
        // Without activationMetric it measures the trigger's own metric.
        let q = ok(&[
            ("podSelector", "app=w"),
            ("activationPodSelector", "app=gw"),
        ]);
        assert_eq!(
            q.activation_query.expect("query").metric,
            Metric::GpuUtilization
        );
        for (pairs, key) in [
            (
                &[("podSelector", "a"), ("activationMetric", "engine")][..],
                "activationMetric",
            ),
            (
                &[("podSelector", "a"), ("activationPodSelector", "a in b")][..],
                "activationPodSelector",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("activationPodSelector", "r"),
                    ("activationMetric", "engine"),
                ][..],
                "activationEngineMetric",
            ),
        ] {
            assert_eq!(parse(&meta(pairs)).expect_err("bad").key, key, "{pairs:?}");
        }
    }

    type Pairs = &'static [(&'static str, &'static str)];

    /// Every bad value of a known key: the error names the key and the value, and
    /// says what is allowed.
    #[test]
    fn bad_metadata() {
        let cases: &[(Pairs, &str, &str)] = &[
            (&[], "podSelector", "required"),
            (&[("podSelector", "")], "podSelector", "empty"),
            (&[("podSelector", "app=")], "", ""),
            (
                &[("podSelector", "app in vllm")],
                "podSelector",
                "expected '('",
            ),
            (&[("podSelector", "app==(x)")], "podSelector", "label value"),
            (&[("podSelector", "a,")], "podSelector", "label key"),
            (
                &[("podSelector", "a"), ("metric", "gpu")],
                "metric",
                "gpu_utilization",
            ),
            (&[("podSelector", "a"), ("metric", "")], "metric", "one of"),
            (
                &[("podSelector", "a"), ("metricType", "AverageValue")],
                "metricType",
                "one of",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "power_draw"),
                    ("metricType", "temperature"),
                ],
                "metricType",
                "alias",
            ),
            (
                &[("podSelector", "a"), ("profile", "vllm")],
                "profile",
                "vllm-inference",
            ),
            (
                &[("podSelector", "a"), ("profile", "")],
                "profile",
                "one of",
            ),
            (
                &[("podSelector", "a"), ("targetValue", "abc")],
                "targetValue",
                "greater than 0",
            ),
            (
                &[("podSelector", "a"), ("targetValue", "0")],
                "targetValue",
                "greater than 0",
            ),
            (
                &[("podSelector", "a"), ("targetValue", "-5")],
                "targetValue",
                "greater than 0",
            ),
            (
                &[("podSelector", "a"), ("targetValue", "NaN")],
                "targetValue",
                "number",
            ),
            (
                &[("podSelector", "a"), ("targetValue", "inf")],
                "targetValue",
                "number",
            ),
            (
                &[("podSelector", "a"), ("targetValue", "")],
                "targetValue",
                "number",
            ),
            (
                &[("podSelector", "a"), ("targetValue", "80%")],
                "targetValue",
                "number",
            ),
            (
                &[("podSelector", "a"), ("activationThreshold", "-1")],
                "activationThreshold",
                "greater than or equal to 0",
            ),
            (
                &[("podSelector", "a"), ("activationThreshold", "five")],
                "activationThreshold",
                "number",
            ),
            (
                &[("podSelector", "a"), ("targetGpuUtilization", "0")],
                "targetGpuUtilization",
                "at most 100",
            ),
            (
                &[("podSelector", "a"), ("targetGpuUtilization", "150")],
                "targetGpuUtilization",
                "at most 100",
            ),
            (
                &[("podSelector", "a"), ("targetMemoryUtilization", "x")],
                "targetMemoryUtilization",
                "percentage",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("targetGpuUtilization", "50"),
                    ("targetMemoryUtilization", "50"),
                ],
                "targetMemoryUtilization",
                "not together with targetGpuUtilization",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "memory_used_mib"),
                    ("targetGpuUtilization", "50"),
                ],
                "targetGpuUtilization",
                "only with metric gpu_utilization",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("targetValue", "10"),
                    ("targetGpuUtilization", "50"),
                ],
                "targetGpuUtilization",
                "both set the target",
            ),
            (
                &[("podSelector", "a"), ("aggregation", "median")],
                "aggregation",
                "sum, avg, max, min, p95, p99",
            ),
            (
                &[("podSelector", "a"), ("aggregation", "")],
                "aggregation",
                "one of",
            ),
            (
                &[("podSelector", "a"), ("metricName", "")],
                "metricName",
                "1-200",
            ),
            (
                &[("podSelector", "a"), ("metricName", "has space")],
                "metricName",
                "letters",
            ),
            (
                &[("podSelector", "a"), ("metricName", "-lead")],
                "metricName",
                "starting with",
            ),
            (
                &[("podSelector", "a"), ("metric", "engine")],
                "engineMetric",
                "required",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "engine"),
                    ("engineMetric", "a{b=~\"c\"}"),
                ],
                "engineMetric",
                "no regular expressions",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "gpu_utilization"),
                    ("metricsPort", "8000"),
                ],
                "metricsPort",
                "only with an engine metric",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "vllm_queue_depth"),
                    ("metricsPort", "0"),
                ],
                "metricsPort",
                "1 to 65535",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "vllm_queue_depth"),
                    ("metricsPath", "metrics"),
                ],
                "metricsPath",
                "absolute path",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "vllm_queue_depth"),
                    ("vllmEndpoint", "https://v:8000/metrics"),
                ],
                "vllmEndpoint",
                "plain HTTP",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "vllm_queue_depth"),
                    ("vllmEndpoint", "vllm:8000"),
                ],
                "vllmEndpoint",
                "never this host",
            ),
            (
                &[
                    ("podSelector", "a"),
                    ("metric", "engine"),
                    ("engineMetric", "h"),
                    ("engineQuantile", "1.5"),
                ],
                "engineQuantile",
                "between 0 and 1",
            ),
        ];
        let mut checked = 0;
        for (pairs, key, allowed) in cases {
            if key.is_empty() {
                // `app=` is a valid selector (empty value), kept here to pin that down.
                ok(pairs);
                continue;
            }
            let err = parse(&meta(pairs)).expect_err(&format!("{pairs:?} must be rejected"));
            assert_eq!(err.key, *key, "{pairs:?}");
            let msg = err.to_string();
            assert!(msg.contains(key), "{msg}");
            assert!(
                msg.contains(allowed),
                "{pairs:?}: {msg} should contain {allowed:?}"
            );
            let bad_value = pairs.iter().find(|(k, _)| k == key).map_or("", |(_, v)| v);
            assert!(
                msg.contains(&format!("{bad_value:?}")),
                "{msg} should quote {bad_value:?}"
            );
            checked += 1;
        }
        assert!(checked >= 25, "only {checked} bad cases");
    }
}
