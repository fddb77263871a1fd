//! Metric names: unique per distinct query, stable across restarts and daemons
//! (every daemon behind the Service must answer to the same name), and matched
//! the way names come back from KEDA: possibly with its `sN-` trigger-index
//! prefix and in another case (the external metrics API lowercases them).

use super::metadata::Query;

/// FNV-1a, 64 bit: stable across Rust versions, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The name of `query`'s metric: `metricName` if set, otherwise
/// `gpu-<metric>-<aggregation>-<hash>` where the hash covers everything that
/// changes the value (metric, aggregation, canonical selector). The target and
/// activation only change the spec, so they are not part of it.
pub fn metric_name(query: &Query) -> String {
    if let Some(name) = &query.metric_name {
        return name.clone();
    }
    let pods = match &query.selector {
        Some(s) => s.to_string(),
        // The ScaledObject's own scale target: KEDA scopes names per ScaledObject.
        None => "scaleTargetRef".to_owned(),
    };
    let mut canonical = format!("{}|{}|{}", query.metric, query.aggregation, pods);
    // Only when set, so the names of queries without it stay what they were.
    if let Some(i) = query.gpu_index {
        canonical.push_str(&format!("|gpu{i}"));
    }
    format!(
        "gpu-{}-{}-{:08x}",
        query.metric.as_str().replace('_', "-"),
        query.aggregation,
        fnv1a(canonical.as_bytes()) as u32
    )
}

/// The name GetMetricSpec announces for metadata the parser refuses (it never
/// fails on metadata: KEDA would drop the error, see `service.rs`): the
/// `metricName` if it is a valid one, else `gpu-invalid-<hash>` over the whole
/// metadata, so it is stable across calls and daemons and changes when the
/// metadata is edited. No GetMetrics ever answers to it: they carry the
/// refusal.
pub fn refused_metric_name(meta: &std::collections::HashMap<String, String>) -> String {
    if let Some(name) = meta.get(super::metadata::keys::METRIC_NAME) {
        let m: std::collections::HashMap<String, String> =
            [(super::metadata::keys::METRIC_NAME.to_owned(), name.clone())]
                .into_iter()
                .chain([(
                    super::metadata::keys::POD_SELECTOR.to_owned(),
                    "a".to_owned(),
                )])
                .collect();
        if let Ok(q) = super::metadata::parse(&m, super::metadata::PodSelector::Required)
            && let Some(n) = q.metric_name
        {
            return n;
        }
    }
    let mut pairs: Vec<(&String, &String)> = meta.iter().collect();
    pairs.sort();
    let mut canonical = Vec::new();
    for (k, v) in pairs {
        canonical.extend_from_slice(k.as_bytes());
        canonical.push(0);
        canonical.extend_from_slice(v.as_bytes());
        canonical.push(0);
    }
    format!("gpu-invalid-{:08x}", fnv1a(&canonical) as u32)
}

/// Strips KEDA's `s<index>-` prefix, if there is one.
fn strip_index(name: &str) -> &str {
    let Some(rest) = name.strip_prefix(['s', 'S']) else {
        return name;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    match rest[digits..].strip_prefix('-') {
        Some(tail) if digits > 0 => tail,
        _ => name,
    }
}

/// Whether a name KEDA sent refers to `served`.
pub fn matches(requested: &str, served: &str) -> bool {
    requested.eq_ignore_ascii_case(served) || strip_index(requested).eq_ignore_ascii_case(served)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::scaler::metadata;

    fn query(pairs: &[(&str, &str)]) -> Query {
        let meta: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        metadata::parse(&meta, metadata::PodSelector::Required).expect("valid metadata")
    }

    #[test]
    fn stable_and_unique_per_query() {
        let a = metric_name(&query(&[("podSelector", "app=vllm,tier=gpu")]));
        assert_eq!(
            a,
            metric_name(&query(&[
                ("podSelector", "tier=gpu, app==vllm"),
                ("targetValue", "5")
            ]))
        );
        assert!(a.starts_with("gpu-gpu-utilization-sum-"), "{a}");
        // Pinned so a change of the scheme is a deliberate one (names must stay
        // stable across daemon versions during a rolling update).
        assert_eq!(a, "gpu-gpu-utilization-sum-63eab0c7");
        let others = [
            metric_name(&query(&[("podSelector", "app=vllm")])),
            metric_name(&query(&[
                ("podSelector", "app=vllm,tier=gpu"),
                ("aggregation", "max"),
            ])),
            metric_name(&query(&[
                ("podSelector", "app=vllm,tier=gpu"),
                ("metric", "power_draw"),
            ])),
        ];
        for o in &others {
            assert_ne!(&a, o);
        }
        assert_eq!(
            metric_name(&query(&[("podSelector", "a"), ("metricName", "Mine")])),
            "Mine"
        );
    }

    #[test]
    fn gpu_index_and_refused_names() {
        let all = metric_name(&query(&[("podSelector", "a")]));
        assert_eq!(
            all,
            metric_name(&query(&[("podSelector", "a"), ("gpuIndex", "-1")]))
        );
        let one = metric_name(&query(&[("podSelector", "a"), ("gpuIndex", "1")]));
        assert_ne!(all, one);
        let meta = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let bad = meta(&[("metric", "tensor_cores"), ("scalerAddress", "x:6000")]);
        let name = refused_metric_name(&bad);
        assert!(name.starts_with("gpu-invalid-"), "{name}");
        assert_eq!(name, refused_metric_name(&bad.clone()), "stable");
        assert_ne!(
            name,
            refused_metric_name(&meta(&[
                ("metric", "tensor_core"),
                ("scalerAddress", "x:6000")
            ]))
        );
        assert_eq!(
            refused_metric_name(&meta(&[("metric", "tensor_cores"), ("metricName", "mine")])),
            "mine"
        );
        assert!(
            refused_metric_name(&meta(&[("metricName", "has space")])).starts_with("gpu-invalid-")
        );
    }

    #[test]
    fn matching() {
        assert!(matches("gpu-x-sum-1", "gpu-x-sum-1"));
        assert!(matches("s0-gpu-x-sum-1", "gpu-x-sum-1"));
        assert!(matches("S12-GPU-X-Sum-1", "gpu-x-sum-1"));
        assert!(matches("s1-mine", "s1-mine"));
        assert!(!matches("s-gpu-x", "gpu-x"));
        assert!(!matches("s0gpu-x", "gpu-x"));
        assert!(!matches("s0-gpu-y", "gpu-x"));
    }
}
