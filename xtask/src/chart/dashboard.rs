//! The Grafana dashboard against `docs/metrics.md`: it queries only documented
//! series, and the daemon exports none the reference leaves out.

use std::{collections::BTreeSet, fs, path::PathBuf};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use super::DAEMON_SOURCES;

const DASHBOARD: &str = "deploy/grafana/gpu-scaler.json";
const METRICS_DOC: &str = "docs/metrics.md";

/// The dashboard is valid JSON and asks only for series that docs/metrics.md lists.
pub(super) fn check_dashboard() -> Result<()> {
    let text = fs::read_to_string(DASHBOARD).with_context(|| format!("reading {DASHBOARD}"))?;
    let dashboard: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {DASHBOARD}"))?;
    let documented = documented_metrics(&fs::read_to_string(METRICS_DOC)?);
    ensure!(!documented.is_empty(), "{METRICS_DOC} lists no metrics");
    let mut used = BTreeSet::new();
    collect_exprs(&dashboard, &mut used);
    ensure!(!used.is_empty(), "{DASHBOARD} queries nothing");
    let unknown: Vec<&String> = used.iter().filter(|m| !documented.contains(*m)).collect();
    ensure!(
        unknown.is_empty(),
        "{DASHBOARD} queries series {METRICS_DOC} does not list: {unknown:?}"
    );

    // And the daemon exports nothing the reference does not list: every quoted
    // `gpu_scaler_*` name in its sources (a counter may leave `_total` to its library).
    let mut exported = BTreeSet::new();
    let mut dirs = vec![PathBuf::from(DAEMON_SOURCES)];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                exported.extend(quoted_metric_names(&fs::read_to_string(&path)?));
            }
        }
    }
    let undocumented: Vec<&String> = exported
        .iter()
        .filter(|m| !documented.contains(*m) && !documented.contains(&format!("{m}_total")))
        .collect();
    ensure!(
        undocumented.is_empty(),
        "the daemon exports {undocumented:?}, which {METRICS_DOC} does not list"
    );
    Ok(())
}

/// `gpu_scaler_*` names inside string literals of Rust source.
fn quoted_metric_names(source: &str) -> BTreeSet<String> {
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .flat_map(metric_names)
        .collect()
}

/// Metric names in the doc: backticked `gpu_scaler_*` words. Histogram suffixes count.
fn documented_metrics(doc: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in doc.split('`').skip(1).step_by(2) {
        let name = word.split('{').next().unwrap_or_default();
        if name.starts_with("gpu_scaler_")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            if let Some(base) = name.strip_suffix("_seconds") {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{base}_seconds{suffix}"));
                }
            }
            out.insert(name.to_owned());
        }
    }
    out
}

/// Every `gpu_scaler_*` identifier in the dashboard's `expr` fields.
fn collect_exprs(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if let (true, Some(expr)) = (k == "expr", v.as_str()) {
                    out.extend(metric_names(expr));
                } else {
                    collect_exprs(v, out);
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("gpu_scaler_"))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_metric_names_only_from_string_literals() {
        let source = r##"use gpu_scaler_common::Event;
            writeln!(out, "# TYPE gpu_scaler_gpus gauge");
            registry.register("gpu_scaler_grpc_requests", "help", c);"##;
        let names = quoted_metric_names(source);
        let expected: BTreeSet<String> = ["gpu_scaler_gpus", "gpu_scaler_grpc_requests"]
            .map(String::from)
            .into();
        assert_eq!(names, expected);
    }

    #[test]
    fn documented_metrics_include_histogram_series() {
        let doc = "| `gpu_scaler_grpc_request_duration_seconds{method}` | x |\n`gpu_scaler_device_sm_utilization_percent` `up`";
        let names = documented_metrics(doc);
        assert!(names.contains("gpu_scaler_grpc_request_duration_seconds_bucket"));
        assert!(names.contains("gpu_scaler_device_sm_utilization_percent"));
        assert!(!names.contains("up"));
        assert_eq!(
            metric_names("sum by (pod) (rate(gpu_scaler_grpc_requests_total{code!=\"OK\"}[5m]))"),
            vec!["gpu_scaler_grpc_requests_total".to_owned()]
        );
    }
}
