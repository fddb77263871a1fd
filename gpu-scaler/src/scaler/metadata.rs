//! ScaledObject trigger metadata -> a [`Query`]. Every key is documented in the
//! README's "ScaledObject metadata" section; keep the two in step
//! (tests/examples.rs runs deploy/examples/ through [`parse`]).
//!
//! What KEDA sends (kedacore/keda pkg/scalers/external_scaler.go,
//! `parseExternalScalerMetadata`): the trigger's `metadata` as written, except
//! that a key ending in `FromEnv` carries the value of the environment variable
//! it names (resolved from the scale target's containers; left out when unset or
//! empty). KEDA adds no key of its own and sends only this trigger's metadata.
//! So:
//!
//! - every key also works as `<key>FromEnv`. With both, the plain key wins unless
//!   it is empty, as in KEDA's own scalers (pkg/scalers/scalersconfig/typed_config.go,
//!   `configParamValue`: trigger metadata first, a blank value skipped), and a
//!   line is logged;
//! - a key that is a known key in another case, or one or two typos away from
//!   one, is an [`Error`] naming the key meant: ignoring `podselector` would
//!   silently measure other pods. Any other key (KEDA's `scalerAddress`, its TLS
//!   keys, another scaler's) is ignored;
//! - keda-gpu-scaler's keys mean what they mean there (pkg/scaler/server.go,
//!   `parseMetadata`): later keys over earlier ones (`targetMemoryUtilization`
//!   over `targetGpuUtilization` over `targetValue` and the metric, logged when
//!   they disagree), `gpuIndex` honoured, `pollIntervalSeconds` ignored.
//!
//! A known key with a bad value is an [`Error`] naming the key as sent, the
//! value and what is allowed.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    sync::Mutex,
};

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

/// The `profile` table (README: "Profiles"): keda-gpu-scaler's profiles
/// (pkg/profiles/profiles.go `builtinProfiles`), same metric, target and
/// activation, and gpu-scaler's own.
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
/// The smallest target KEDA can pass on: it sends targets to the HPA in
/// milli-units (pkg/scalers/scaler.go `GetMetricTargetMili`), so a smaller one
/// becomes 0.
pub const MIN_TARGET: f64 = 0.001;

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
    /// keda-gpu-scaler's: one GPU of the pod's node, by NVML index.
    pub const GPU_INDEX: &str = "gpuIndex";
    /// keda-gpu-scaler's poll period: accepted and ignored (gpu-scaler polls on
    /// its own `--poll-interval`).
    pub const POLL_INTERVAL_SECONDS: &str = "pollIntervalSeconds";

    /// The suffix KEDA resolves from the scale target's environment.
    pub const FROM_ENV: &str = "FromEnv";

    /// Every key the parser knows (each also as `<key>FromEnv`).
    pub const ALL: [&str; 23] = [
        POD_SELECTOR,
        METRIC,
        METRIC_TYPE,
        PROFILE,
        TARGET_VALUE,
        ACTIVATION_THRESHOLD,
        TARGET_GPU_UTILIZATION,
        TARGET_MEMORY_UTILIZATION,
        AGGREGATION,
        METRIC_NAME,
        METRICS_PORT,
        METRICS_PATH,
        VLLM_ENDPOINT,
        TRITON_ENDPOINT,
        ENGINE_METRIC,
        ENGINE_QUANTILE,
        ACTIVATION_POD_SELECTOR,
        ACTIVATION_METRIC,
        ACTIVATION_ENGINE_METRIC,
        ACTIVATION_METRICS_PORT,
        ACTIVATION_METRICS_PATH,
        GPU_INDEX,
        POLL_INTERVAL_SECONDS,
    ];

    /// The activation query's keys and the key each stands for in it.
    pub const ACTIVATION: [(&str, &str); 5] = [
        (ACTIVATION_POD_SELECTOR, POD_SELECTOR),
        (ACTIVATION_METRIC, METRIC),
        (ACTIVATION_ENGINE_METRIC, ENGINE_METRIC),
        (ACTIVATION_METRICS_PORT, METRICS_PORT),
        (ACTIVATION_METRICS_PATH, METRICS_PATH),
    ];
}

/// A metadata key with a value it cannot take, or a key that looks like a
/// known one misspelt.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("metadata {key}: {value:?} is not allowed: {allowed}")]
pub struct Error {
    /// The key as the trigger has it (`podSelectorFromEnv`, a misspelling).
    pub key: String,
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
    /// `gpuIndex` (GPU figures only): each pod's use of that GPU of its node.
    pub gpu_index: Option<u32>,
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

/// Logs `message` at warn level the first time it is seen, at debug after:
/// KEDA asks three times per polling interval, and each call parses again.
fn warn_once(message: String) {
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let first = {
        let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        let seen = seen.get_or_insert_with(HashSet::new);
        // Bounded: metadata comes from callers.
        if seen.len() >= 1024 {
            seen.clear();
        }
        seen.insert(message.clone())
    };
    if first {
        tracing::warn!(conflict = %message, "trigger metadata keys disagree");
    } else {
        tracing::debug!(conflict = %message, "trigger metadata keys disagree");
    }
}

/// Edit distance (Levenshtein) of two ASCII-lowercased strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(above + 1);
            diag = above;
        }
    }
    row[b.len()]
}

/// How many typos a key of `len` characters may carry and still be taken for
/// that key: one from 6 characters (`metrics` for `metric`), two from 10;
/// none below (no known key is that short today; a short word is too easily
/// another scaler's key).
fn typo_budget(len: usize) -> usize {
    match len {
        0..6 => 0,
        6..10 => 1,
        _ => 2,
    }
}

/// The known key `sent` was probably meant to be, if it is not one: the same
/// in another case, or within [`typo_budget`] edits. `pollIntervalSeconds` is
/// never suggested: it is ignored anyway.
fn meant(sent: &str) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for key in keys::ALL
        .iter()
        .filter(|k| **k != keys::POLL_INTERVAL_SECONDS)
    {
        for candidate in [key.to_string(), format!("{key}{}", keys::FROM_ENV)] {
            if candidate == sent {
                return None;
            }
            // More edits apart than the budget by length alone: skip the
            // distance (keys may be 256 bytes, and there may be 64 of them).
            if sent.len().abs_diff(candidate.len()) > typo_budget(key.len()) {
                continue;
            }
            let d = if candidate.eq_ignore_ascii_case(sent) {
                0
            } else {
                edit_distance(&candidate, sent)
            };
            if d <= typo_budget(key.len()) && best.as_ref().is_none_or(|(b, _)| d < *b) {
                best = Some((d, candidate));
            }
        }
    }
    best.map(|(_, k)| k)
}

/// One known key's value, and the key it came under.
#[derive(Clone, Copy, Debug)]
struct Entry<'a> {
    sent: &'a str,
    value: &'a str,
}

/// The trigger's metadata as the parser reads it: each known key with the value
/// it was given, directly or as `<key>FromEnv`.
#[derive(Clone, Debug, Default)]
pub struct Metadata<'a> {
    entries: BTreeMap<&'static str, Entry<'a>>,
    /// For the activation query: a key that is absent is named by its
    /// `activation*` key in errors.
    activation: bool,
}

fn known(key: &str) -> Option<&'static str> {
    keys::ALL.into_iter().find(|k| *k == key)
}

impl<'a> Metadata<'a> {
    /// Reads `meta`: known keys and their `FromEnv` forms; a misspelt known key
    /// is an error, every other key is ignored.
    pub fn read(meta: &'a HashMap<String, String>) -> Result<Self> {
        Self::read_checked(meta, true)
    }

    fn read_checked(meta: &'a HashMap<String, String>, check_typos: bool) -> Result<Self> {
        // Sorted, so which of several problems is reported does not depend on
        // the hash map's order.
        let mut sorted: Vec<(&'a str, &'a str)> =
            meta.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        sorted.sort_unstable();
        let mut entries: BTreeMap<&'static str, Entry<'a>> = BTreeMap::new();
        for &(k, v) in &sorted {
            if let Some(key) = known(k) {
                entries.insert(key, Entry { sent: k, value: v });
            }
        }
        for &(k, v) in &sorted {
            if known(k).is_some() {
                continue;
            }
            if let Some(key) = k.strip_suffix(keys::FROM_ENV).and_then(known) {
                match entries.get(key) {
                    Some(plain) if !plain.value.trim().is_empty() => {
                        warn_once(format!(
                            "{key} and {k} are both set: {key} wins, as in KEDA's own scalers"
                        ));
                    }
                    _ => {
                        entries.insert(key, Entry { sent: k, value: v });
                    }
                }
                continue;
            }
            if check_typos && let Some(meant) = meant(k) {
                return Err(Error {
                    key: k.to_owned(),
                    value: v.to_owned(),
                    allowed: format!(
                        "{k} is not a gpu-scaler key; did you mean {meant}? (keys are \
                         case-sensitive; KEDA sends only this trigger's metadata)"
                    ),
                });
            }
        }
        Ok(Self {
            entries,
            activation: false,
        })
    }

    /// The value of known key `key`, from `key` or `keyFromEnv`.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.entries.get(key).map(|e| e.value)
    }

    /// How errors name `key`: as it was sent.
    fn name(&self, key: &'static str) -> &'a str {
        match self.entries.get(key) {
            Some(e) => e.sent,
            None if self.activation => keys::ACTIVATION
                .iter()
                .find(|(_, inner)| *inner == key)
                .map_or(key, |(outer, _)| outer),
            None => key,
        }
    }

    fn error(&self, key: &'static str, allowed: impl Into<String>) -> Error {
        Error {
            key: self.name(key).to_owned(),
            value: self.get(key).unwrap_or_default().to_owned(),
            allowed: allowed.into(),
        }
    }

    /// `key` as a finite number that `ok` accepts, if it is set.
    fn number(
        &self,
        key: &'static str,
        allowed: &str,
        ok: impl Fn(f64) -> bool,
    ) -> Result<Option<f64>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        match value.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && ok(v) => Ok(Some(v)),
            _ => Err(self.error(key, allowed)),
        }
    }

    /// A target key: a number KEDA can pass on, and `ok`.
    fn target(
        &self,
        key: &'static str,
        what: &str,
        ok: impl Fn(f64) -> bool,
    ) -> Result<Option<f64>> {
        self.number(
            key,
            &format!(
                "{what}, at least {MIN_TARGET} (KEDA sends targets in milli-units: a smaller \
                 one becomes 0)"
            ),
            |x| x >= MIN_TARGET && ok(x),
        )
    }

    fn metric(&self, key: &'static str) -> Result<Option<Metric>> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let v = value.trim();
        // Under keda-gpu-scaler's key a name means what keda-gpu-scaler means by
        // it: its vllm_kv_cache_usage is a percentage (pkg/scaler/server.go).
        if key == keys::METRIC_TYPE && v.eq_ignore_ascii_case("vllm_kv_cache_usage") {
            return Ok(Some(Metric::VllmKvCachePercent));
        }
        if let Some(m) = Metric::parse(v) {
            return Ok(Some(m));
        }
        let all = format!("one of {}", list(Metric::ALL));
        let why = if v.eq_ignore_ascii_case("Value") || v.eq_ignore_ascii_case("AverageValue") {
            format!(
                "{all}; {v} is the trigger's own metricType field (next to metadata, not in it); \
                 in metadata, metricType is keda-gpu-scaler's name for metric"
            )
        } else {
            all
        };
        Err(self.error(key, why))
    }
}

/// Whether a trigger must name its pods with `podSelector`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodSelector {
    /// Nothing else can find the pods (no Kubernetes API access).
    Required,
    /// A missing one gives `selector: None`: the pods come from the
    /// ScaledObject's scale target.
    Optional,
}

/// The error for a missing `podSelector` where nothing else can find the pods.
pub fn pod_selector_required() -> Error {
    Error {
        key: keys::POD_SELECTOR.to_owned(),
        value: String::new(),
        allowed: "a Kubernetes label selector such as app=vllm,tier in (gpu,edge),!canary \
                  (required without access to the Kubernetes API, which would find the pods \
                  through the ScaledObject's scaleTargetRef)"
            .into(),
    }
}

/// Parses a trigger's metadata (after KEDA resolved its `xFromEnv` keys).
pub fn parse(meta: &HashMap<String, String>, pod_selector: PodSelector) -> Result<Query> {
    parse_metadata(
        &Metadata::read(meta)?,
        pod_selector == PodSelector::Optional,
    )
}

/// The target GetMetricSpec announces for metadata that [`parse`]
/// refuses: what the target keys give where they can be read (the last key
/// that reads wins, as in keda-gpu-scaler), else `None`. GetMetricSpec never
/// fails on metadata: KEDA drops its errors (the user would see only "no metric
/// specs returned"), while GetMetrics and IsActive show the refusal as events.
pub fn readable_target(meta: &HashMap<String, String>) -> Option<f64> {
    let m = Metadata::read_checked(meta, false).ok()?;
    let mut target = m.get(keys::PROFILE).and_then(|v| {
        PROFILES
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(v.trim()))
            .map(|p| p.target)
    });
    let percent = |x: f64| x <= 100.0;
    for (key, ok) in [
        (keys::TARGET_VALUE, None),
        (keys::TARGET_GPU_UTILIZATION, Some(percent)),
        (keys::TARGET_MEMORY_UTILIZATION, Some(percent)),
    ] {
        if let Ok(Some(t)) = m.target(key, "", |x| ok.is_none_or(|f| f(x))) {
            target = Some(t);
        }
    }
    target
}

fn parse_metadata(m: &Metadata<'_>, selector_optional: bool) -> Result<Query> {
    let selector = match m.get(keys::POD_SELECTOR) {
        None if selector_optional => None,
        None if m.activation => return Err(m.error(keys::POD_SELECTOR, "a label selector")),
        None => return Err(pod_selector_required()),
        Some(selector_text) => Some(Selector::parse(selector_text).map_err(|e| {
            m.error(
                keys::POD_SELECTOR,
                format!(
                    "a Kubernetes label selector such as app=vllm,tier in (gpu,edge),!canary ({e})"
                ),
            )
        })?),
    };

    let profile = match m.get(keys::PROFILE) {
        None => None,
        Some(v) => Some(
            PROFILES
                .iter()
                .find(|p| p.name.eq_ignore_ascii_case(v.trim()))
                .ok_or_else(|| {
                    let all = format!("one of {}", list(PROFILES.iter().map(|p| p.name)));
                    m.error(keys::PROFILE, all)
                })?,
        ),
    };
    let mut chosen_metric = profile.map(|p| p.metric);
    let mut target = profile.map(|p| p.target);
    let mut activation = profile.map(|p| p.activation);

    let explicit_metric = match (m.metric(keys::METRIC)?, m.metric(keys::METRIC_TYPE)?) {
        (Some(m1), Some(m2)) if m1 != m2 => {
            return Err(m.error(
                keys::METRIC_TYPE,
                format!(
                    "the same metric as {} ({m1}): metricType is an alias of metric; set one of them",
                    m.name(keys::METRIC)
                ),
            ));
        }
        (Some(m1), _) => Some(m1),
        (None, m2) => m2,
    };
    // Which key set the metric and the target, for the conflict log.
    let mut metric_from: Option<&str> = None;
    if let Some(em) = explicit_metric {
        chosen_metric = Some(em);
        metric_from = Some(if m.get(keys::METRIC).is_some() {
            m.name(keys::METRIC)
        } else {
            m.name(keys::METRIC_TYPE)
        });
    }
    let mut target_from: Option<&str> = None;
    if let Some(t) = m.target(keys::TARGET_VALUE, "a number greater than 0", |_| true)? {
        target = Some(t);
        target_from = Some(m.name(keys::TARGET_VALUE));
    }
    activation = m
        .number(
            keys::ACTIVATION_THRESHOLD,
            "a number greater than or equal to 0",
            |x| x >= 0.0,
        )?
        .or(activation);

    // keda-gpu-scaler's shorthands set the metric and the target together, and
    // apply after targetValue and the metric in its parser, so they win over
    // them (and the memory one over the GPU one). targetMemoryUtilization means
    // VRAM used % (memory_used_percent), as there; not the memory-controller %.
    let shorthands = [
        (keys::TARGET_GPU_UTILIZATION, Metric::GpuUtilization),
        (keys::TARGET_MEMORY_UTILIZATION, Metric::MemoryUsedPercent),
    ];
    for (key, shorthand_metric) in shorthands {
        let Some(t) = m.target(key, "a percentage greater than 0 and at most 100", |x| {
            x <= 100.0
        })?
        else {
            continue;
        };
        let sent = m.name(key);
        if let (Some(from), Some(prev)) = (metric_from, chosen_metric)
            && prev != shorthand_metric
        {
            warn_once(format!(
                "{sent} sets metric {shorthand_metric}, over {from}'s {prev} (later keys win, as in keda-gpu-scaler)"
            ));
        }
        if let (Some(from), Some(prev)) = (target_from, target)
            && prev != t
        {
            warn_once(format!(
                "{sent} sets the target {t}, over {from}'s {prev} (later keys win, as in keda-gpu-scaler)"
            ));
        }
        chosen_metric = Some(shorthand_metric);
        metric_from = Some(sent);
        target = Some(t);
        target_from = Some(sent);
    }

    let metric = chosen_metric.unwrap_or(Metric::GpuUtilization);
    let aggregation = match m.get(keys::AGGREGATION) {
        Some(v) => Aggregation::parse(v).ok_or_else(|| {
            m.error(
                keys::AGGREGATION,
                format!("one of {}", list(Aggregation::ALL)),
            )
        })?,
        None => Aggregation::default_for(metric),
    };
    let metric_name = match m.get(keys::METRIC_NAME) {
        None => None,
        Some(v) => {
            let ok = !v.is_empty()
                && v.len() <= 200
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
                && v.as_bytes()[0].is_ascii_alphanumeric();
            if !ok {
                return Err(m.error(
                    keys::METRIC_NAME,
                    "1-200 characters: letters, digits, '-', '_' or '.', starting with a letter or digit",
                ));
            }
            Some(v.to_owned())
        }
    };
    let gpu_index = gpu_index(m, metric)?;
    let engine = engine_query(metric, m)?;
    let activation_query = activation_query(m, metric)?;
    Ok(Query {
        selector,
        metric,
        aggregation,
        target: target.unwrap_or(DEFAULT_TARGET),
        activation: activation.unwrap_or(DEFAULT_ACTIVATION),
        metric_name,
        gpu_index,
        engine,
        activation_query,
    })
}

/// keda-gpu-scaler's `gpuIndex`: -1 (its default) is every GPU; an index
/// keeps each pod's use of that GPU of its node. Like keda-gpu-scaler, it only
/// applies to GPU figures (pkg/scaler/server.go: "only used for NVML metrics").
fn gpu_index(m: &Metadata<'_>, metric: Metric) -> Result<Option<u32>> {
    let Some(v) = m.get(keys::GPU_INDEX) else {
        return Ok(None);
    };
    let index: i64 = v.trim().parse().map_err(|_| {
        m.error(
            keys::GPU_INDEX,
            "an integer: an NVML GPU index of the pod's node (0, 1, ...), or -1 for all its GPUs",
        )
    })?;
    let index = match index {
        -1 => None,
        i => Some(u32::try_from(i).map_err(|_| {
            m.error(
                keys::GPU_INDEX,
                "an NVML GPU index of the pod's node (0, 1, ...), or -1 for all its GPUs",
            )
        })?),
    };
    if index.is_some() && metric.is_engine() {
        tracing::debug!(%metric, "gpuIndex ignored: it applies to GPU figures only, as in keda-gpu-scaler");
        return Ok(None);
    }
    Ok(index)
}

/// The activation query, from the `activation*` keys: parsed by the same rules
/// as the trigger's own keys, its errors naming the `activation*` key.
fn activation_query(m: &Metadata<'_>, metric: Metric) -> Result<Option<Box<Query>>> {
    if m.get(keys::ACTIVATION_POD_SELECTOR).is_none() {
        if let Some((key, _)) = keys::ACTIVATION[1..]
            .iter()
            .find(|(k, _)| m.get(k).is_some())
        {
            return Err(m.error(key, format!("only with {}", keys::ACTIVATION_POD_SELECTOR)));
        }
        return Ok(None);
    }
    let mut sub = Metadata {
        entries: BTreeMap::new(),
        activation: true,
    };
    for (outer, inner) in keys::ACTIVATION {
        if let Some(e) = m.entries.get(outer) {
            sub.entries.insert(inner, *e);
        }
    }
    sub.entries.entry(keys::METRIC).or_insert(Entry {
        sent: keys::ACTIVATION_METRIC,
        value: metric.as_str(),
    });
    parse_metadata(&sub, false).map(|q| Some(Box::new(q)))
}

/// The port and path of keda-gpu-scaler's `vllmEndpoint`/`tritonEndpoint`
/// URL. Its host is never contacted: every selected pod is read at its own IP.
fn endpoint_url(m: &Metadata<'_>, key: &'static str) -> Result<(Option<u16>, Option<String>)> {
    let value = m.get(key).unwrap_or_default();
    let err = |why: &str| {
        m.error(
            key,
            format!(
                "an http:// URL such as http://vllm:8000/metrics ({why}); only its port and path \
                 are used: gpu-scaler reads every selected pod at its own IP, never this host"
            ),
        )
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
fn engine_query(metric: Metric, m: &Metadata<'_>) -> Result<Option<EngineQuery>> {
    let engine_only = [
        keys::METRICS_PORT,
        keys::METRICS_PATH,
        keys::ENGINE_METRIC,
        keys::ENGINE_QUANTILE,
    ];
    let Some(figure) = metric.engine_figure() else {
        if let Some(key) = engine_only.into_iter().find(|k| m.get(k).is_some()) {
            return Err(m.error(
                key,
                format!(
                    "only with an engine metric ({}); metric is {metric}",
                    list(Metric::ALL.into_iter().filter(|m| m.is_engine()))
                ),
            ));
        }
        return Ok(None);
    };
    let (mut port, mut path) = (None, None);
    let url_key = match figure.engine {
        crate::engine::Engine::Vllm => Some(keys::VLLM_ENDPOINT),
        crate::engine::Engine::Triton | crate::engine::Engine::TrtLlm => {
            Some(keys::TRITON_ENDPOINT)
        }
        _ => None,
    };
    if let Some(key) = url_key
        && m.get(key).is_some()
    {
        (port, path) = endpoint_url(m, key)?;
    }
    if let Some(v) = m.get(keys::METRICS_PORT) {
        port = Some(
            v.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| m.error(keys::METRICS_PORT, "a port from 1 to 65535"))?,
        );
    }
    if let Some(v) = m.get(keys::METRICS_PATH) {
        path = Some(v.trim().to_owned());
    }
    let quantile = m.number(
        keys::ENGINE_QUANTILE,
        "a quantile between 0 and 1, exclusive (e.g. 0.95)",
        |q| q > 0.0 && q < 1.0,
    )?;
    let engine_metric = m.get(keys::ENGINE_METRIC);
    EngineQuery::new(figure, engine_metric, quantile, port, path.as_deref())
        .map(Some)
        .map_err(|e| {
            let key = known(e.key).unwrap_or(keys::ENGINE_METRIC);
            let value = match key {
                keys::METRICS_PATH => path.clone().unwrap_or_default(),
                keys::METRICS_PORT => port.map(|p| p.to_string()).unwrap_or_default(),
                k => m.get(k).unwrap_or_default().to_owned(),
            };
            Error {
                key: m.name(key).to_owned(),
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
        parse(&meta(pairs), PodSelector::Required).unwrap_or_else(|e| panic!("{pairs:?}: {e}"))
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

    /// keda-gpu-scaler's parser applies keys in order, each over the earlier
    /// ones (pkg/scaler/server.go `parseMetadata`): the same combinations give
    /// the same metric and target here.
    #[test]
    fn keda_gpu_scaler_later_keys_win() {
        let cases: &[(Pairs, Metric, f64)] = &[
            (
                &[("targetValue", "10"), ("targetGpuUtilization", "50")],
                Metric::GpuUtilization,
                50.0,
            ),
            (
                &[
                    ("metricType", "memory_used_mib"),
                    ("targetGpuUtilization", "50"),
                ],
                Metric::GpuUtilization,
                50.0,
            ),
            (
                &[
                    ("metric", "vllm_queue_depth"),
                    ("targetMemoryUtilization", "40"),
                ],
                Metric::MemoryUsedPercent,
                40.0,
            ),
            (
                &[
                    ("targetGpuUtilization", "50"),
                    ("targetMemoryUtilization", "60"),
                ],
                Metric::MemoryUsedPercent,
                60.0,
            ),
            (
                &[
                    ("profile", "vllm-queue-depth"),
                    ("targetValue", "3"),
                    ("targetGpuUtilization", "70"),
                ],
                Metric::GpuUtilization,
                70.0,
            ),
            (
                &[("profile", "ollama"), ("metricType", "gpu_utilization")],
                Metric::GpuUtilization,
                70.0,
            ),
            (
                &[("metricType", "gpu_utilization"), ("targetValue", "75")],
                Metric::GpuUtilization,
                75.0,
            ),
        ];
        for (pairs, metric, target) in cases {
            let mut all = vec![("podSelector", "a")];
            all.extend_from_slice(pairs);
            let q = ok(&all);
            assert_eq!((q.metric, q.target), (*metric, *target), "{pairs:?}");
        }
        // pollIntervalSeconds is ignored, whatever it says (keda-gpu-scaler
        // panics on 0).
        for v in ["10", "0", "-5", "soon"] {
            ok(&[("podSelector", "a"), ("pollIntervalSeconds", v)]);
        }
    }

    #[test]
    fn gpu_index() {
        assert_eq!(ok(&[("podSelector", "a")]).gpu_index, None);
        assert_eq!(
            ok(&[("podSelector", "a"), ("gpuIndex", "-1")]).gpu_index,
            None
        );
        assert_eq!(
            ok(&[("podSelector", "a"), ("gpuIndex", " 2 ")]).gpu_index,
            Some(2)
        );
        // Engine figures are not per GPU: ignored, as keda-gpu-scaler does.
        assert_eq!(
            ok(&[
                ("podSelector", "a"),
                ("metric", "vllm_queue_depth"),
                ("gpuIndex", "0")
            ])
            .gpu_index,
            None
        );
    }

    /// KEDA resolves `xFromEnv` from the scale target's environment and sends
    /// the value under the key `xFromEnv` (pkg/scalers/external_scaler.go).
    #[test]
    fn every_key_also_from_env() {
        let q = ok(&[
            ("podSelectorFromEnv", "app=vllm"),
            ("metricFromEnv", "power_draw"),
            ("targetValueFromEnv", "12"),
            ("activationThresholdFromEnv", "2"),
            ("aggregationFromEnv", "max"),
            ("gpuIndexFromEnv", "1"),
        ]);
        assert_eq!(
            q.selector.map(|s| s.to_string()).as_deref(),
            Some("app=vllm")
        );
        assert_eq!(
            (q.metric, q.target, q.activation, q.aggregation, q.gpu_index),
            (Metric::PowerDraw, 12.0, 2.0, Aggregation::Max, Some(1))
        );
        for key in keys::ALL {
            let from_env = format!("{key}FromEnv");
            let m = meta(&[(from_env.as_str(), "x")]);
            assert_eq!(
                Metadata::read(&m).expect("known").get(key),
                Some("x"),
                "{from_env}"
            );
        }
        // Both: the plain key wins, unless it is blank (KEDA's typed config
        // skips blank values).
        let q = ok(&[
            ("podSelector", "app=plain"),
            ("podSelectorFromEnv", "app=env"),
        ]);
        assert_eq!(
            q.selector.map(|s| s.to_string()).as_deref(),
            Some("app=plain")
        );
        let q = ok(&[("podSelector", " "), ("podSelectorFromEnv", "app=env")]);
        assert_eq!(
            q.selector.map(|s| s.to_string()).as_deref(),
            Some("app=env")
        );
        // Errors name the key as sent.
        let e = parse(
            &meta(&[("podSelector", "a"), ("targetValueFromEnv", "-1")]),
            PodSelector::Required,
        )
        .expect_err("bad");
        assert_eq!(e.key, "targetValueFromEnv");
        assert!(
            e.to_string()
                .starts_with("metadata targetValueFromEnv: \"-1\""),
            "{e}"
        );
        let e = parse(
            &meta(&[
                ("podSelector", "a"),
                ("activationPodSelectorFromEnv", "r"),
                ("activationMetric", "engine"),
            ]),
            PodSelector::Required,
        )
        .expect_err("no engine metric");
        assert_eq!(e.key, "activationEngineMetric");
    }

    #[test]
    fn misspelt_keys_are_refused_and_other_scalers_keys_ignored() {
        for (sent, meant) in [
            ("podselector", "podSelector"),
            ("PodSelector", "podSelector"),
            ("podSelecter", "podSelector"),
            ("podSelectr", "podSelector"),
            ("targetvalue", "targetValue"),
            ("activationTreshold", "activationThreshold"),
            ("targetGPUUtilization", "targetGpuUtilization"),
            ("metricname", "metricName"),
            ("metricsport", "metricsPort"),
            ("profil", "profile"),
            ("Metric", "metric"),
            ("metrics", "metric"),
            ("gpuindex", "gpuIndex"),
            ("podSelectorFromenv", "podSelectorFromEnv"),
        ] {
            let e = parse(
                &meta(&[("podSelector", "a"), (sent, "v")]),
                PodSelector::Required,
            )
            .expect_err(sent);
            assert_eq!(e.key, sent);
            assert!(
                e.allowed.contains(&format!("did you mean {meant}?")),
                "{sent}: {e}"
            );
        }
        // Keys KEDA and other scalers use, and words too short to be typos.
        ok(&[
            ("podSelector", "a"),
            ("scalerAddress", "gpu-scaler:6000"),
            ("scalerAddressFromEnv", "x"),
            ("tlsCertFile", "/c"),
            ("caCert", "pem"),
            ("unsafeSsl", "true"),
            ("enableTLS", "true"),
            ("query", "sum(up)"),
            ("threshold", "5"),
            ("pollIntervalSecond", "5"),
            ("somethingFromEnv", "x"),
        ]);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("abc", "ABC"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn readable_target_for_refused_metadata() {
        let t = |pairs: &[(&str, &str)]| readable_target(&meta(pairs));
        assert_eq!(t(&[("metric", "tensor_cores")]), None);
        assert_eq!(
            t(&[("metric", "tensor_cores"), ("targetValue", "7")]),
            Some(7.0)
        );
        assert_eq!(
            t(&[("profile", "ollama"), ("aggregation", "median")]),
            Some(70.0)
        );
        assert_eq!(
            t(&[("targetValue", "abc"), ("targetGpuUtilization", "60")]),
            Some(60.0)
        );
        assert_eq!(t(&[("targetValue", "0.0001")]), None);
        assert_eq!(
            t(&[("podselector", "a"), ("targetValueFromEnv", "9")]),
            Some(9.0)
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
            assert_eq!(
                parse(&meta(pairs), PodSelector::Required)
                    .expect_err("bad")
                    .key,
                key,
                "{pairs:?}"
            );
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
                &[("podSelector", "a"), ("targetValue", "0.0009")],
                "targetValue",
                "at least 0.001",
            ),
            (
                &[("podSelector", "a"), ("targetGpuUtilization", "0.0001")],
                "targetGpuUtilization",
                "milli-units",
            ),
            (
                &[("podSelector", "a"), ("metricType", "Value")],
                "metricType",
                "trigger's own metricType field",
            ),
            (
                &[("podSelector", "a"), ("gpuIndex", "-2")],
                "gpuIndex",
                "-1 for all its GPUs",
            ),
            (
                &[("podSelector", "a"), ("gpuIndex", "first")],
                "gpuIndex",
                "an integer",
            ),
            (
                &[("podselector", "a")],
                "podselector",
                "did you mean podSelector?",
            ),
            (
                &[("podSelector", "a"), ("targetValeu", "5")],
                "targetValeu",
                "did you mean targetValue?",
            ),
            (
                &[("podSelector", "a"), ("metricsPth", "/m")],
                "metricsPth",
                "did you mean metricsPath?",
            ),
            (
                &[("podSelectorFromEnv", "app in x")],
                "podSelectorFromEnv",
                "label selector",
            ),
            (
                &[("podSelector", "a"), ("targetValueFromENV", "5")],
                "targetValueFromENV",
                "did you mean targetValueFromEnv?",
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
            let err = parse(&meta(pairs), PodSelector::Required)
                .expect_err(&format!("{pairs:?} must be rejected"));
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
