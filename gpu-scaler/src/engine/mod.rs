//! Engine signals: each local pod's serving engine (vLLM, SGLang, TGI, Triton,
//! TensorRT-LLM, or any Prometheus exposition) read over HTTP from the pod's
//! IP, once per poll, for the queue and KV-cache figures LLM serving scales on.
//!
//! Only pods of this node that a live query selected are read, at the port and
//! path the query and the pod say ([`EngineQuery::endpoint`]); no host or URL
//! from metadata is ever contacted. An engine that cannot be read is a reading
//! that is unavailable with the reason, never a 0.

pub mod exposition;
pub(crate) mod rule;
pub(crate) mod scraper;
pub mod series;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

pub use scraper::{EngineSnapshot, Metrics, ScrapeConfig, Scraper};

use crate::pods::Pod;
use rule::Rule;
use series::SeriesSelector;

/// A serving engine, for its default metrics port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Vllm,
    Sglang,
    Tgi,
    Triton,
    TrtLlm,
    /// No engine in particular (`metric: engine`): no default port.
    Any,
}

impl Engine {
    /// The port the engine serves `/metrics` on by default.
    pub fn default_port(self) -> Option<u16> {
        match self {
            Self::Vllm => Some(8000),
            Self::Sglang => Some(30000),
            Self::Tgi => Some(80),
            Self::Triton => Some(8002),
            // trtllm-serve serves its OpenAI API and metrics on 8000.
            Self::TrtLlm => Some(8000),
            Self::Any => None,
        }
    }

    /// The path of its Prometheus text: trtllm-serve answers JSON on
    /// `/metrics` and Prometheus text on `/prometheus/metrics`.
    pub fn default_path(self) -> &'static str {
        match self {
            Self::TrtLlm => "/prometheus/metrics",
            _ => DEFAULT_PATH,
        }
    }
}

/// The pod annotations that name where its metrics are (Prometheus's
/// convention), kept by the pod sources.
pub const PORT_ANNOTATION: &str = "prometheus.io/port";
pub const PATH_ANNOTATION: &str = "prometheus.io/path";
const DEFAULT_PATH: &str = "/metrics";
/// Longest `metricsPath` accepted.
pub const MAX_PATH_LEN: usize = 256;

/// An engine figure as the figures table describes it (`figures::Metric::
/// engine_figure`): this module reads engines and knows nothing of the table, so
/// the table hands it what it needs.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineFigure {
    /// Its metadata name (`vllm_queue_depth`, or `engine`).
    pub name: &'static str,
    /// The engine it is read from, for the default port and path.
    pub engine: Engine,
    /// How a pod's value is computed; `None` for `metric: engine`, whose rule
    /// comes from `engineMetric`.
    pub rule: Option<Rule>,
}

/// What one query reads from each of its pods' engines.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineQuery {
    /// The figure's metadata name.
    pub name: &'static str,
    pub engine: Engine,
    pub rule: Rule,
    /// `engineMetric` (for `metric: engine`).
    pub engine_metric: Option<String>,
    /// `engineQuantile` (for a histogram named by `engineMetric`).
    pub quantile: Option<f64>,
    /// `metricsPort`, or the port of keda-gpu-scaler's endpoint URL.
    pub port: Option<u16>,
    /// `metricsPath`, or the path of that URL.
    pub path: Option<String>,
}

/// Why an engine query cannot be built: the metadata key and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryError {
    pub key: &'static str,
    pub why: String,
}

/// Checks a `metricsPath` (or a URL's path): absolute, printable, short.
pub fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/')
        || path.len() > MAX_PATH_LEN
        || path.bytes().any(|b| !b.is_ascii_graphic() || b == b'#')
    {
        return Err(format!(
            "an absolute path such as /metrics: at most {MAX_PATH_LEN} printable ASCII characters, no spaces or '#'"
        ));
    }
    Ok(())
}

impl EngineQuery {
    /// The query for `figure`; `engine_metric` and `quantile` only with
    /// `metric: engine`.
    pub fn new(
        figure: EngineFigure,
        engine_metric: Option<&str>,
        quantile: Option<f64>,
        port: Option<u16>,
        path: Option<&str>,
    ) -> Result<Self, QueryError> {
        if let Some(p) = path {
            check_path(p).map_err(|why| QueryError {
                key: "metricsPath",
                why,
            })?;
        }
        if port == Some(0) {
            return Err(QueryError {
                key: "metricsPort",
                why: "a port from 1 to 65535".into(),
            });
        }
        if let Some(q) = quantile
            && !(q > 0.0 && q < 1.0)
        {
            return Err(QueryError {
                key: "engineQuantile",
                why: "a quantile between 0 and 1, exclusive (e.g. 0.95)".into(),
            });
        }
        let rule = match (figure.rule, engine_metric) {
            (Some(_), Some(_)) => {
                return Err(QueryError {
                    key: "engineMetric",
                    why: format!(
                        "only with metric: engine; metric {} already says what is read",
                        figure.name
                    ),
                });
            }
            (Some(_), None) if quantile.is_some() => {
                return Err(QueryError {
                    key: "engineQuantile",
                    why: "only with metric: engine and a histogram engineMetric".into(),
                });
            }
            (Some(rule), None) => rule,
            (None, Some(text)) => Rule::Auto {
                series: SeriesSelector::parse(text).map_err(|e| QueryError {
                    key: "engineMetric",
                    why: format!(
                        "a series such as vllm:num_requests_waiting{{model_name=\"m\"}} ({e})"
                    ),
                })?,
                quantile,
            },
            (None, None) => {
                return Err(QueryError {
                    key: "engineMetric",
                    why: "required with metric: engine: the series to read, such as \
                          vllm:num_requests_waiting or envoy_cluster_upstream_rq_pending"
                        .into(),
                });
            }
        };
        Ok(Self {
            name: figure.name,
            engine: figure.engine,
            rule,
            engine_metric: engine_metric.map(|s| s.trim().to_owned()),
            quantile,
            port,
            path: path.map(str::to_owned),
        })
    }

    /// Where to read this query's figure from `pod`: the query's port and
    /// path, else the pod's `prometheus.io/port` / `prometheus.io/path`
    /// annotations, else the engine's default; always the pod's own IP.
    pub fn endpoint(&self, pod: &Pod) -> Result<(SocketAddr, String), String> {
        let ip: IpAddr = pod
            .ip
            .ok_or_else(|| "the pod has no IP yet (status.podIP)".to_owned())?;
        let port = match self.port {
            Some(p) => p,
            None => match pod.annotations.get(PORT_ANNOTATION) {
                Some(v) => v.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!("annotation {PORT_ANNOTATION}={v:?} is not a port")
                })?,
                None => self.engine.default_port().ok_or_else(|| {
                    format!(
                        "no metrics port: set metricsPort in the trigger or the pod's {PORT_ANNOTATION} annotation"
                    )
                })?,
            },
        };
        let path = match (&self.path, pod.annotations.get(PATH_ANNOTATION)) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) => {
                check_path(p).map_err(|e| format!("annotation {PATH_ANNOTATION}={p:?}: {e}"))?;
                p.clone()
            }
            (None, None) => self.engine.default_path().to_owned(),
        };
        Ok((SocketAddr::new(ip, port), path))
    }

    /// A stable text for the query (metric names, the scraper's bookkeeping).
    pub fn key(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for EngineQuery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if let Some(m) = &self.engine_metric {
            write!(f, " {m}")?;
        }
        if let Some(q) = self.quantile {
            write!(f, " q{q}")?;
        }
        if let Some(p) = self.port {
            write!(f, " :{p}")?;
        }
        if let Some(p) = &self.path {
            write!(f, " {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    // The table's own rows, so these tests read what the daemon reads.
    use crate::figures::Metric;

    fn figure(m: Metric) -> EngineFigure {
        m.engine_figure().expect("an engine figure")
    }

    fn pod(ip: Option<&str>, annotations: &[(&str, &str)]) -> Pod {
        Pod {
            uid: "u".into(),
            namespace: "ml".into(),
            name: "p".into(),
            ip: ip.map(|i| i.parse().expect("ip")),
            annotations: annotations
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            ..Default::default()
        }
    }

    #[test]
    fn endpoint_order_query_then_annotations_then_default() {
        let q = |port, path| {
            EngineQuery::new(figure(Metric::VllmQueueDepth), None, None, port, path).expect("query")
        };
        let plain = pod(Some("10.0.0.7"), &[]);
        let annotated = pod(
            Some("10.0.0.7"),
            &[(PORT_ANNOTATION, "9400"), (PATH_ANNOTATION, "/stats")],
        );
        assert_eq!(
            q(None, None).endpoint(&plain).expect("default"),
            ("10.0.0.7:8000".parse().expect("addr"), "/metrics".into())
        );
        assert_eq!(
            q(None, None).endpoint(&annotated).expect("annotations"),
            ("10.0.0.7:9400".parse().expect("addr"), "/stats".into())
        );
        assert_eq!(
            q(Some(1234), Some("/m"))
                .endpoint(&annotated)
                .expect("query wins"),
            ("10.0.0.7:1234".parse().expect("addr"), "/m".into())
        );
        assert!(q(None, None).endpoint(&pod(None, &[])).is_err(), "no IP");
        let bad = pod(Some("10.0.0.7"), &[(PORT_ANNOTATION, "http")]);
        assert!(
            q(None, None)
                .endpoint(&bad)
                .expect_err("bad")
                .contains("not a port")
        );
        let generic = EngineQuery::new(figure(Metric::Engine), Some("my_queue"), None, None, None)
            .expect("q");
        assert!(
            generic
                .endpoint(&plain)
                .expect_err("no port")
                .contains("metricsPort")
        );
    }

    #[test]
    fn bad_queries_name_the_key() {
        type Case<'a> = (
            Metric,
            Option<&'a str>,
            Option<f64>,
            Option<u16>,
            Option<&'a str>,
            &'a str,
        );
        let cases: [Case; 7] = [
            (Metric::Engine, None, None, None, None, "engineMetric"),
            (
                Metric::Engine,
                Some("a{b=~\"x\"}"),
                None,
                None,
                None,
                "engineMetric",
            ),
            (
                Metric::VllmQueueDepth,
                Some("x"),
                None,
                None,
                None,
                "engineMetric",
            ),
            (
                Metric::VllmQueueDepth,
                None,
                Some(0.5),
                None,
                None,
                "engineQuantile",
            ),
            (
                Metric::Engine,
                Some("h"),
                Some(1.0),
                None,
                None,
                "engineQuantile",
            ),
            (
                Metric::Engine,
                Some("h"),
                None,
                Some(0),
                None,
                "metricsPort",
            ),
            (
                Metric::Engine,
                Some("h"),
                None,
                None,
                Some("metrics"),
                "metricsPath",
            ),
        ];
        for (m, em, q, port, path, key) in cases {
            let e = EngineQuery::new(figure(m), em, q, port, path).expect_err(key);
            assert_eq!(e.key, key, "{}", e.why);
        }
    }
}
