//! The per-pod figures: every metric a ScaledObject can scale on, described
//! once (docs/figures.md has the design).
//!
//! A figure is one row of [`FIGURES`]: its metadata name (and keda-gpu-scaler's
//! name for it), unit, how one pod's value is computed, the aggregation that
//! makes the HPA's arithmetic right by default, and the source that measures
//! it. The metadata parser, the peer protocol, the value computation, `/metrics`
//! and `gpu-scaler top` read this table; none keeps a list of its own. Adding a
//! figure is a variant of [`Metric`] and its row; an engine figure also names
//! its [`Rule`] in [`Metric::engine_rule`].

use std::fmt;

use crate::engine::{Engine, EngineFigure, rule::Rule, series::SeriesSelector};

/// What is measured for each pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    GpuUtilization,
    MemoryUtilization,
    MemoryUsedMib,
    MemoryUsedPercent,
    PowerDraw,
    Temperature,
    PcieTxKbps,
    PcieRxKbps,
    NvlinkTxMbps,
    NvlinkRxMbps,
    VllmQueueDepth,
    VllmRunning,
    VllmKvCacheUsage,
    VllmKvCachePercent,
    SglangQueueDepth,
    SglangRunning,
    SglangTokenUsage,
    TgiQueueSize,
    TgiBatchSize,
    TritonPendingRequests,
    TritonQueueWaitMs,
    TritonRequestRate,
    TrtllmQueueDepth,
    TrtllmKvCacheUsage,
    /// Any engine or application metric: `engineMetric` names the series.
    Engine,
}

/// How per-pod values become the workload's one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Aggregation {
    Sum,
    Avg,
    Max,
    Min,
    P95,
    P99,
}

impl Aggregation {
    pub const ALL: [Aggregation; 6] = [
        Self::Sum,
        Self::Avg,
        Self::Max,
        Self::Min,
        Self::P95,
        Self::P99,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sum => "sum",
            Self::Avg => "avg",
            Self::Max => "max",
            Self::Min => "min",
            Self::P95 => "p95",
            Self::P99 => "p99",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str().eq_ignore_ascii_case(s.trim()))
    }

    /// The figure's default (temperatures do not add up, so `max`).
    pub fn default_for(metric: Metric) -> Self {
        metric.figure().aggregation
    }
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which part of the daemon measures a figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The GPU join (NVML per-process figures attributed to the pod); crosses
    /// the peer protocol as the pod's per-GPU usage.
    Gpu,
    /// The pod's serving engine, read over HTTP from the pod's IP; crosses the
    /// peer protocol as a per-pod figure reading.
    Engine(Engine),
}

/// One row of the figure table.
#[derive(Clone, Copy, Debug)]
pub struct Figure {
    pub metric: Metric,
    /// The metadata `metric` value (matched case-insensitively).
    pub name: &'static str,
    /// Other accepted names (keda-gpu-scaler's `metricType` values).
    pub aliases: &'static [&'static str],
    pub aggregation: Aggregation,
    pub source: Source,
}

macro_rules! fig {
    ($m:ident, $name:literal, [$($alias:literal),*], $agg:ident, $src:expr $(,)?) => {
        Figure {
            metric: Metric::$m,
            name: $name,
            aliases: &[$($alias),*],
            aggregation: Aggregation::$agg,
            source: $src,
        }
    };
}

/// Every figure, in the order docs list them.
pub const FIGURES: [Figure; 25] = [
    fig!(GpuUtilization, "gpu_utilization", [], Sum, Source::Gpu,),
    fig!(
        MemoryUtilization,
        "memory_utilization",
        [],
        Sum,
        Source::Gpu,
    ),
    fig!(MemoryUsedMib, "memory_used_mib", [], Sum, Source::Gpu,),
    fig!(
        MemoryUsedPercent,
        "memory_used_percent",
        [],
        Sum,
        Source::Gpu,
    ),
    fig!(PowerDraw, "power_draw", [], Sum, Source::Gpu,),
    fig!(Temperature, "temperature", [], Max, Source::Gpu,),
    fig!(PcieTxKbps, "pcie_tx_kbps", [], Sum, Source::Gpu,),
    fig!(PcieRxKbps, "pcie_rx_kbps", [], Sum, Source::Gpu,),
    fig!(NvlinkTxMbps, "nvlink_tx_mbps", [], Sum, Source::Gpu,),
    fig!(NvlinkRxMbps, "nvlink_rx_mbps", [], Sum, Source::Gpu,),
    fig!(
        VllmQueueDepth,
        "vllm_queue_depth",
        ["vllm_num_requests_waiting"],
        Sum,
        Source::Engine(Engine::Vllm),
    ),
    fig!(
        VllmRunning,
        "vllm_running",
        ["vllm_num_requests_running"],
        Sum,
        Source::Engine(Engine::Vllm),
    ),
    fig!(
        VllmKvCacheUsage,
        "vllm_kv_cache_usage",
        ["vllm_gpu_cache_usage", "vllm_kv_cache_usage_perc"],
        Sum,
        Source::Engine(Engine::Vllm),
    ),
    fig!(
        VllmKvCachePercent,
        "vllm_kv_cache_usage_percent",
        [],
        Sum,
        Source::Engine(Engine::Vllm),
    ),
    fig!(
        SglangQueueDepth,
        "sglang_queue_depth",
        ["sglang_num_queue_reqs"],
        Sum,
        Source::Engine(Engine::Sglang),
    ),
    fig!(
        SglangRunning,
        "sglang_running",
        ["sglang_num_running_reqs"],
        Sum,
        Source::Engine(Engine::Sglang),
    ),
    fig!(
        SglangTokenUsage,
        "sglang_token_usage",
        [],
        Sum,
        Source::Engine(Engine::Sglang),
    ),
    fig!(
        TgiQueueSize,
        "tgi_queue_size",
        [],
        Sum,
        Source::Engine(Engine::Tgi),
    ),
    fig!(
        TgiBatchSize,
        "tgi_batch_size",
        ["tgi_batch_current_size"],
        Sum,
        Source::Engine(Engine::Tgi),
    ),
    fig!(
        TritonPendingRequests,
        "triton_pending_requests",
        ["triton_queue_depth"],
        Sum,
        Source::Engine(Engine::Triton),
    ),
    fig!(
        TritonQueueWaitMs,
        "triton_queue_wait_ms",
        ["triton_queue_wait"],
        Sum,
        Source::Engine(Engine::Triton),
    ),
    fig!(
        TritonRequestRate,
        "triton_request_rate",
        [],
        Sum,
        Source::Engine(Engine::Triton),
    ),
    fig!(
        TrtllmQueueDepth,
        "trtllm_queue_depth",
        [],
        Sum,
        Source::Engine(Engine::TrtLlm),
    ),
    fig!(
        TrtllmKvCacheUsage,
        "trtllm_kv_cache_usage",
        [],
        Sum,
        Source::Engine(Engine::TrtLlm),
    ),
    fig!(Engine, "engine", [], Sum, Source::Engine(Engine::Any),),
];

impl Metric {
    pub const ALL: [Metric; 25] = {
        let mut all = [Metric::Engine; 25];
        let mut i = 0;
        while i < FIGURES.len() {
            all[i] = FIGURES[i].metric;
            i += 1;
        }
        all
    };

    /// This figure's row.
    pub fn figure(self) -> &'static Figure {
        FIGURES
            .iter()
            .find(|f| f.metric == self)
            .expect("every metric has a row (checked by a test)")
    }

    pub fn as_str(self) -> &'static str {
        self.figure().name
    }

    /// The metric a metadata value names: a figure's name or alias, any case.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        FIGURES
            .iter()
            .find(|f| {
                f.name.eq_ignore_ascii_case(s)
                    || f.aliases.iter().any(|a| a.eq_ignore_ascii_case(s))
            })
            .map(|f| f.metric)
    }

    pub fn is_engine(self) -> bool {
        matches!(self.figure().source, Source::Engine(_))
    }

    /// What the engine module needs to read this figure; `None` for GPU figures.
    pub fn engine_figure(self) -> Option<EngineFigure> {
        match self.figure().source {
            Source::Engine(engine) => Some(EngineFigure {
                name: self.as_str(),
                engine,
                rule: self.engine_rule(),
            }),
            Source::Gpu => None,
        }
    }

    /// How a pod's value is computed from its engine's metrics; `None` for GPU
    /// figures and for `engine`, whose rule comes from `engineMetric`.
    pub fn engine_rule(self) -> Option<Rule> {
        let s = |t: &str| SeriesSelector::parse(t).expect("the table's selectors parse (test)");
        let scaled = |alts: &[&str], mean: bool, scale: f64| Rule::Gauge {
            alternatives: alts.iter().map(|a| s(a)).collect(),
            mean,
            scale,
        };
        let gauge = |alts: &[&str], mean: bool| scaled(alts, mean, 1.0);
        let triton_requests = || {
            vec![
                s("nv_inference_request_success"),
                s("nv_inference_request_failure"),
            ]
        };
        Some(match self {
            Self::VllmQueueDepth => gauge(&["vllm:num_requests_waiting"], false),
            Self::VllmRunning => gauge(&["vllm:num_requests_running"], false),
            Self::VllmKvCacheUsage => gauge(
                &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
                true,
            ),
            Self::VllmKvCachePercent => scaled(
                &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
                true,
                100.0,
            ),
            Self::SglangQueueDepth => gauge(&["sglang:num_queue_reqs"], false),
            Self::SglangRunning => gauge(&["sglang:num_running_reqs"], false),
            Self::SglangTokenUsage => gauge(&["sglang:token_usage"], true),
            Self::TgiQueueSize => gauge(&["tgi_queue_size"], false),
            Self::TgiBatchSize => gauge(&["tgi_batch_current_size"], false),
            Self::TritonPendingRequests => gauge(&["nv_inference_pending_request_count"], false),
            Self::TritonQueueWaitMs => Rule::DeltaRatio {
                num: s("nv_inference_queue_duration_us"),
                den: triton_requests(),
                scale: 1e-3,
            },
            Self::TritonRequestRate => Rule::Rate {
                series: triton_requests(),
            },
            Self::TrtllmQueueDepth => gauge(
                &[
                    "trtllm_num_requests_waiting",
                    "nv_trt_llm_request_metrics{request_type=\"waiting\"}",
                ],
                false,
            ),
            Self::TrtllmKvCacheUsage => gauge(
                &[
                    "trtllm_kv_cache_utilization",
                    "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\"}",
                ],
                true,
            ),
            Self::GpuUtilization
            | Self::MemoryUtilization
            | Self::MemoryUsedMib
            | Self::MemoryUsedPercent
            | Self::PowerDraw
            | Self::Temperature
            | Self::PcieTxKbps
            | Self::PcieRxKbps
            | Self::NvlinkTxMbps
            | Self::NvlinkRxMbps
            | Self::Engine => return None,
        })
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_whole_and_unambiguous() {
        let mut names = std::collections::HashSet::new();
        for (i, f) in FIGURES.iter().enumerate() {
            assert_eq!(Metric::ALL[i], f.metric);
            assert_eq!(f.metric.figure().name, f.name);
            for n in std::iter::once(f.name).chain(f.aliases.iter().copied()) {
                assert!(names.insert(n.to_ascii_lowercase()), "{n} twice");
                assert_eq!(Metric::parse(&n.to_ascii_uppercase()), Some(f.metric));
            }
            let engine = f.metric.is_engine();
            let rule = f.metric.engine_rule();
            assert_eq!(
                rule.is_some(),
                engine && f.metric != Metric::Engine,
                "{}: engine figures other than `engine` have a rule",
                f.name
            );
        }
        assert_eq!(
            Aggregation::default_for(Metric::Temperature),
            Aggregation::Max
        );
        assert_eq!(
            Aggregation::default_for(Metric::VllmKvCacheUsage),
            Aggregation::Sum
        );
    }

    /// Each engine figure on an exposition in its engine's exact format
    /// (names, labels, HELP/TYPE, value spelling as the engine prints them).
    #[test]
    fn engine_figures_on_each_engines_format() {
        use crate::engine::rule::Scrape;
        let read = |m: Metric, text: &str| {
            let rule = m.engine_rule().expect("an engine figure");
            let scrape =
                Scrape::new(std::time::Instant::now(), text, &rule.selectors()).expect("parses");
            rule.reading(None, &scrape).ok()
        };
        // vLLM 0.10 (V1 engine, prometheus_client): both KV names, same value.
        let vllm_010 = "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n\
# TYPE vllm:num_requests_waiting gauge\n\
vllm:num_requests_waiting{engine=\"0\",model_name=\"Qwen/Qwen3-4B-Instruct-2507-FP8\"} 2.0\n\
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.DEPRECATED: Use vllm:kv_cache_usage_perc instead.\n\
# TYPE vllm:gpu_cache_usage_perc gauge\n\
vllm:gpu_cache_usage_perc{engine=\"0\",model_name=\"Qwen/Qwen3-4B-Instruct-2507-FP8\"} 0.0011764705882353343\n\
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n\
# TYPE vllm:kv_cache_usage_perc gauge\n\
vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"Qwen/Qwen3-4B-Instruct-2507-FP8\"} 0.0011764705882353343\n\
process_virtual_memory_bytes 1.372014592e+010\n";
        assert_eq!(read(Metric::VllmQueueDepth, vllm_010), Some(2.0));
        assert_eq!(
            read(Metric::VllmKvCacheUsage, vllm_010),
            Some(0.0011764705882353343)
        );
        // vLLM v0 (before the engine label): only the old KV name.
        let vllm_v0 = "# TYPE vllm:gpu_cache_usage_perc gauge\n\
vllm:gpu_cache_usage_perc{model_name=\"unsloth/Llama-3.2-1B-Instruct\"} 0.87\n";
        assert_eq!(read(Metric::VllmKvCacheUsage, vllm_v0), Some(0.87));
        assert_eq!(read(Metric::VllmKvCachePercent, vllm_v0), Some(87.0));
        // SGLang with DP attention: one series per dp_rank (attention-TP rank 0 of
        // each exports), each its own queue.
        let sglang = "# HELP sglang:num_queue_reqs The number of requests in the waiting queue.\n\
# TYPE sglang:num_queue_reqs gauge\n\
sglang:num_queue_reqs{dp_rank=\"0\",engine_type=\"unified\",model_name=\"deepseek-r1\",pp_rank=\"0\",tp_rank=\"0\"} 3.0\n\
sglang:num_queue_reqs{dp_rank=\"1\",engine_type=\"unified\",model_name=\"deepseek-r1\",pp_rank=\"0\",tp_rank=\"1\"} 4.0\n\
# HELP sglang:num_running_reqs The number of running requests.\n\
# TYPE sglang:num_running_reqs gauge\n\
sglang:num_running_reqs{dp_rank=\"0\",engine_type=\"unified\",model_name=\"deepseek-r1\",pp_rank=\"0\",tp_rank=\"0\"} 16.0\n\
sglang:num_running_reqs{dp_rank=\"1\",engine_type=\"unified\",model_name=\"deepseek-r1\",pp_rank=\"0\",tp_rank=\"1\"} 12.0\n\
# HELP sglang:token_usage The token usage.\n\
# TYPE sglang:token_usage gauge\n\
sglang:token_usage{dp_rank=\"0\",engine_type=\"unified\",model_name=\"deepseek-r1\",pp_rank=\"0\",tp_rank=\"0\"} 0.5\n\
sglang:token_usage{dp_rank=\"1\",engine_type=\"unified\",model_name=\"deepseek-r1\",pp_rank=\"0\",tp_rank=\"1\"} 0.3\n";
        assert_eq!(read(Metric::SglangQueueDepth, sglang), Some(7.0));
        assert_eq!(read(Metric::SglangRunning, sglang), Some(28.0));
        assert_eq!(read(Metric::SglangTokenUsage, sglang), Some(0.4));
        // TGI (metrics-exporter-prometheus): no labels, integers without ".0".
        let tgi = "# HELP tgi_queue_size Current queue size\n# TYPE tgi_queue_size gauge\ntgi_queue_size 4\n\
# HELP tgi_batch_current_size Current batch size\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 32\n\
# TYPE tgi_request_queue_duration histogram\ntgi_request_queue_duration_bucket{le=\"0.0001\"} 0\n\
tgi_request_queue_duration_bucket{le=\"0.00015000000000000001\"} 1\ntgi_request_queue_duration_bucket{le=\"+Inf\"} 5\n\
tgi_request_queue_duration_sum 0.25\ntgi_request_queue_duration_count 5\n";
        assert_eq!(read(Metric::TgiQueueSize, tgi), Some(4.0));
        assert_eq!(read(Metric::TgiBatchSize, tgi), Some(32.0));
        // Triton (prometheus-cpp, sorted labels) with two models, one of them the
        // TensorRT-LLM backend with its custom gauges.
        let triton = "# HELP nv_inference_pending_request_count Instantaneous number of pending requests awaiting execution per-model.\n\
# TYPE nv_inference_pending_request_count gauge\n\
nv_inference_pending_request_count{model=\"ensemble\",version=\"1\"} 2\n\
nv_inference_pending_request_count{model=\"tensorrt_llm\",version=\"1\"} 5\n\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics\n\
# TYPE nv_trt_llm_request_metrics gauge\n\
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"active\",version=\"1\"} 8\n\
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"max\",version=\"1\"} 512\n\
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"scheduled\",version=\"1\"} 8\n\
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"context\",version=\"1\"} 1\n\
nv_trt_llm_request_metrics{model=\"tensorrt_llm\",request_type=\"waiting\",version=\"1\"} 1\n\
# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics\n\
# TYPE nv_trt_llm_kv_cache_block_metrics gauge\n\
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"max\",model=\"tensorrt_llm\",version=\"1\"} 1200\n\
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"used\",model=\"tensorrt_llm\",version=\"1\"} 585\n\
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=\"fraction\",model=\"tensorrt_llm\",version=\"1\"} 0.4875\n";
        assert_eq!(read(Metric::TritonPendingRequests, triton), Some(7.0));
        assert_eq!(read(Metric::TrtllmQueueDepth, triton), Some(1.0));
        assert_eq!(read(Metric::TrtllmKvCacheUsage, triton), Some(0.4875));
        // trtllm-serve (/prometheus/metrics): its own names, hard-coded labels.
        let trtllm_serve = "# HELP trtllm_num_requests_waiting Number of queued requests\n\
# TYPE trtllm_num_requests_waiting gauge\n\
trtllm_num_requests_waiting{engine_type=\"undefined\",model_name=\"undefined\"} 2.0\n\
# HELP trtllm_kv_cache_utilization KV cache utilization\n\
# TYPE trtllm_kv_cache_utilization gauge\n\
trtllm_kv_cache_utilization{engine_type=\"undefined\",model_name=\"undefined\"} 0.42\n";
        assert_eq!(read(Metric::TrtllmQueueDepth, trtllm_serve), Some(2.0));
        assert_eq!(read(Metric::TrtllmKvCacheUsage, trtllm_serve), Some(0.42));
        // A family the engine does not export is no reading, never 0.
        assert_eq!(read(Metric::VllmQueueDepth, tgi), None);
    }
}
