//! Per-pod values and their aggregation into the workload's one number.
//!
//! With KEDA's default `AverageValue` the HPA computes `ceil(value / target)`
//! replicas, so the default aggregation is `sum`: the workload's total, whose
//! ratio to a per-replica target is the replica count.

use std::sync::Arc;

use crate::{
    gpu::Reading,
    sampler::{GpuUsage, PodUsage},
};

use super::{
    Error, Result,
    metadata::{Aggregation, Metric, Query},
    view::Workload,
};

fn get<T: Copy>(r: &Reading<T>, what: &str, pod: &PodUsage, gpu: &GpuUsage) -> Result<T> {
    match r {
        Reading::Ok(v) => Ok(*v),
        Reading::Unavailable(reason) => Err(Error::ReadingUnavailable(format!(
            "{what} of pod {}/{} on GPU {} ({}) is unavailable: {reason}",
            pod.pod.namespace, pod.pod.name, gpu.gpu_index, gpu.gpu_uuid
        ))),
    }
}

/// One pod's value of a GPU `metric`. A pod with no GPU process is 0.
pub fn pod_value(metric: Metric, pod: &PodUsage) -> Result<f64> {
    if metric.is_engine() {
        // Engine figures come from the pod's engine, never from its GPUs.
        return Err(Error::ReadingUnavailable(format!(
            "{metric} is read from the pod's engine, not its GPUs"
        )));
    }
    if pod.gpus.is_empty() {
        return Ok(0.0);
    }
    let n = pod.gpus.len() as f64;
    let mut acc = 0.0;
    match metric {
        Metric::GpuUtilization => {
            for g in &pod.gpus {
                acc += get(&g.sm_util, "SM utilization", pod, g)?;
            }
            Ok(acc / n)
        }
        Metric::MemoryUtilization => {
            for g in &pod.gpus {
                acc += get(&g.mem_util, "memory-controller utilization", pod, g)?;
            }
            Ok(acc / n)
        }
        Metric::MemoryUsedMib => {
            for g in &pod.gpus {
                acc += get(&g.memory_used_mib, "memory used", pod, g)? as f64;
            }
            Ok(acc)
        }
        Metric::MemoryUsedPercent => {
            let mut total = 0.0;
            for g in &pod.gpus {
                acc += get(&g.memory_used_mib, "memory used", pod, g)? as f64;
                total += get(&g.memory_total_mib, "memory size", pod, g)? as f64;
            }
            if total <= 0.0 {
                return Err(Error::ReadingUnavailable(format!(
                    "the GPUs of pod {}/{} report no memory",
                    pod.pod.namespace, pod.pod.name
                )));
            }
            Ok(100.0 * acc / total)
        }
        Metric::PowerDraw => {
            for g in &pod.gpus {
                acc += get(&g.power_w, "attributed power", pod, g)?;
            }
            Ok(acc)
        }
        Metric::PcieTxKbps | Metric::PcieRxKbps | Metric::NvlinkTxMbps | Metric::NvlinkRxMbps => {
            for g in &pod.gpus {
                let (r, what) = match metric {
                    Metric::PcieTxKbps => (&g.pcie_tx_kbps, "attributed PCIe TX throughput"),
                    Metric::PcieRxKbps => (&g.pcie_rx_kbps, "attributed PCIe RX throughput"),
                    Metric::NvlinkTxMbps => (&g.nvlink_tx_mbps, "attributed NVLink TX throughput"),
                    _ => (&g.nvlink_rx_mbps, "attributed NVLink RX throughput"),
                };
                acc += get(r, what, pod, g)?;
            }
            Ok(acc)
        }
        Metric::Temperature => {
            let mut hottest = f64::MIN;
            for g in &pod.gpus {
                hottest = hottest.max(f64::from(get(&g.temperature_c, "temperature", pod, g)?));
            }
            Ok(hottest)
        }
        engine => unreachable!("{engine} returned above"),
    }
}

/// Aggregates per-pod values; no pods is 0 (nothing runs, nothing is used).
/// Percentiles are nearest-rank.
pub fn aggregate(aggregation: Aggregation, values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
        v[rank.min(v.len()) - 1]
    };
    match aggregation {
        Aggregation::Sum => v.iter().sum(),
        Aggregation::Avg => v.iter().sum::<f64>() / v.len() as f64,
        Aggregation::Max => v[v.len() - 1],
        Aggregation::Min => v[0],
        Aggregation::P95 => percentile(95.0),
        Aggregation::P99 => percentile(99.0),
    }
}

/// The workload's value for `query` over its pods.
pub fn workload_value(query: &Query, pods: &[Arc<PodUsage>]) -> Result<f64> {
    workload_value_counting_missing(query, pods, 0)
}

/// As [`workload_value`], with `missing` more pods (their node did not answer,
/// and the missing-node policy admitted the answer) each counted as the mean
/// of the reported pods' values. The mean is summed in sorted order so every
/// daemon computes the same bits whatever order the pods arrived in.
pub fn workload_value_counting_missing(
    query: &Query,
    pods: &[Arc<PodUsage>],
    missing: usize,
) -> Result<f64> {
    let values = pods
        .iter()
        .map(|p| pod_value(query.metric, p))
        .collect::<Result<Vec<_>>>()?;
    Ok(aggregate_counting_missing(
        query.aggregation,
        values,
        missing,
    ))
}

/// Aggregates `values` with `missing` more, each the mean of `values`.
fn aggregate_counting_missing(
    aggregation: Aggregation,
    mut values: Vec<f64>,
    missing: usize,
) -> f64 {
    if missing > 0 && !values.is_empty() {
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        values.extend(std::iter::repeat_n(mean, missing));
    }
    aggregate(aggregation, &values)
}

/// The value of `query` for a workload a view answered: GPU figures from the
/// pods' usage, engine figures from their engines' readings.
pub fn value(query: &Query, workload: &Workload) -> Result<f64> {
    let v = if query.engine.is_some() {
        aggregate_counting_missing(query.aggregation, workload.engine.clone(), workload.missing)
    } else {
        workload_value_counting_missing(query, &workload.pods, workload.missing)?
    };
    // KEDA turns NaN into 0: a figure that is not a number is no answer.
    if !v.is_finite() {
        return Err(Error::ReadingUnavailable(format!(
            "the workload's {} is {v}, not a number KEDA can use",
            query.metric
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::pods::Pod;

    fn gpu(
        index: u32,
        sm: f64,
        mem: f64,
        used: u64,
        total: u64,
        temp: u32,
        power: f64,
    ) -> GpuUsage {
        GpuUsage {
            gpu_index: index,
            gpu_uuid: format!("GPU-{index}"),
            pids: vec![1],
            sm_util: Reading::Ok(sm),
            mem_util: Reading::Ok(mem),
            memory_used_mib: Reading::Ok(used),
            memory_total_mib: Reading::Ok(total),
            temperature_c: Reading::Ok(temp),
            power_w: Reading::Ok(power),
            pcie_tx_kbps: Reading::Ok(power * 10.0),
            pcie_rx_kbps: Reading::Ok(power * 20.0),
            nvlink_tx_mbps: Reading::Ok(power * 100.0),
            nvlink_rx_mbps: Reading::Ok(power * 200.0),
        }
    }

    fn pod(gpus: Vec<GpuUsage>) -> PodUsage {
        PodUsage {
            pod: Arc::new(Pod {
                uid: "u".into(),
                namespace: "ml".into(),
                name: "p".into(),
                labels: BTreeMap::new(),
                node_name: None,
                phase: None,
                ready: true,
                ip: None,
                annotations: Default::default(),
                containers: Vec::new(),
            }),
            gpus,
            containers: Vec::new(),
        }
    }

    #[test]
    fn per_pod_definitions() {
        let p = pod(vec![
            gpu(0, 60.0, 10.0, 1024, 4096, 70, 100.0),
            gpu(1, 20.0, 30.0, 1024, 12288, 80, 50.0),
        ]);
        assert_eq!(pod_value(Metric::GpuUtilization, &p).expect("ok"), 40.0);
        assert_eq!(pod_value(Metric::MemoryUtilization, &p).expect("ok"), 20.0);
        assert_eq!(pod_value(Metric::MemoryUsedMib, &p).expect("ok"), 2048.0);
        assert_eq!(pod_value(Metric::MemoryUsedPercent, &p).expect("ok"), 12.5);
        assert_eq!(pod_value(Metric::PowerDraw, &p).expect("ok"), 150.0);
        assert_eq!(pod_value(Metric::Temperature, &p).expect("ok"), 80.0);
        // Throughputs add up over the GPUs, as the pod's total traffic.
        assert_eq!(pod_value(Metric::PcieTxKbps, &p).expect("ok"), 1500.0);
        assert_eq!(pod_value(Metric::PcieRxKbps, &p).expect("ok"), 3000.0);
        assert_eq!(pod_value(Metric::NvlinkTxMbps, &p).expect("ok"), 15000.0);
        assert_eq!(pod_value(Metric::NvlinkRxMbps, &p).expect("ok"), 30000.0);
        for m in Metric::ALL.into_iter().filter(|m| !m.is_engine()) {
            assert_eq!(
                pod_value(m, &pod(vec![])).expect("ok"),
                0.0,
                "{m}: a pod without GPU processes is 0"
            );
        }
    }

    #[test]
    fn unavailable_is_an_error_never_a_number() {
        let mut g = gpu(0, 60.0, 10.0, 1024, 4096, 70, 100.0);
        g.sm_util = Reading::unavailable("MIG");
        let p = pod(vec![g]);
        let err = pod_value(Metric::GpuUtilization, &p).expect_err("unavailable");
        assert!(
            err.to_string().contains("ml/p") && err.to_string().contains("MIG"),
            "{err}"
        );
        assert_eq!(
            pod_value(Metric::MemoryUsedMib, &p).expect("memory still known"),
            1024.0
        );
        let mut g = gpu(0, 60.0, 10.0, 1024, 4096, 70, 100.0);
        g.nvlink_tx_mbps = Reading::unavailable("MPS: no split");
        let err = pod_value(Metric::NvlinkTxMbps, &pod(vec![g])).expect_err("unavailable");
        assert!(
            err.to_string().contains("NVLink TX") && err.to_string().contains("MPS"),
            "{err}"
        );
        let mut g = gpu(0, 1.0, 1.0, 1, 0, 1, 1.0);
        g.memory_total_mib = Reading::Ok(0);
        assert!(pod_value(Metric::MemoryUsedPercent, &pod(vec![g])).is_err());
    }

    #[test]
    fn aggregations() {
        let v = [10.0, 40.0, 20.0, 30.0];
        assert_eq!(aggregate(Aggregation::Sum, &v), 100.0);
        assert_eq!(aggregate(Aggregation::Avg, &v), 25.0);
        assert_eq!(aggregate(Aggregation::Max, &v), 40.0);
        assert_eq!(aggregate(Aggregation::Min, &v), 10.0);
        assert_eq!(aggregate(Aggregation::P95, &v), 40.0);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(aggregate(Aggregation::P95, &hundred), 95.0);
        assert_eq!(aggregate(Aggregation::P99, &hundred), 99.0);
        assert_eq!(aggregate(Aggregation::P99, &[5.0]), 5.0);
        for a in Aggregation::ALL {
            assert_eq!(aggregate(a, &[]), 0.0);
        }
    }

    #[test]
    fn missing_pods_count_as_the_mean_of_the_reported() {
        let q = |agg: &str| {
            crate::scaler::metadata::parse(
                &[("podSelector", "a"), ("aggregation", agg)]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
            .expect("query")
        };
        let pods = [
            Arc::new(pod(vec![gpu(0, 10.0, 0.0, 0, 1, 0, 0.0)])),
            Arc::new(pod(vec![gpu(1, 30.0, 0.0, 0, 1, 0, 0.0)])),
        ];
        assert_eq!(
            workload_value_counting_missing(&q("sum"), &pods, 2).expect("sum"),
            80.0
        );
        assert_eq!(
            workload_value_counting_missing(&q("avg"), &pods, 2).expect("avg"),
            20.0
        );
        assert_eq!(
            workload_value_counting_missing(&q("max"), &pods, 1).expect("max"),
            30.0
        );
        assert_eq!(
            workload_value_counting_missing(&q("sum"), &pods, 0).expect("none"),
            40.0
        );
    }

    #[test]
    fn engine_values_sum_with_missing_and_never_send_nan() {
        let q = crate::scaler::metadata::parse(
            &[("podSelector", "a"), ("metric", "vllm_queue_depth")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .expect("query");
        let w = |engine: Vec<f64>, missing| Workload {
            pods: Vec::new(),
            sampled_at: std::time::SystemTime::now(),
            missing,
            engine,
        };
        assert_eq!(value(&q, &w(vec![3.0, 5.0], 1)).expect("value"), 12.0);
        assert_eq!(value(&q, &w(vec![], 0)).expect("no pods"), 0.0);
        assert!(value(&q, &w(vec![f64::NAN], 0)).is_err());
        assert!(value(&q, &w(vec![f64::INFINITY, 1.0], 0)).is_err());
    }
}
