//! Per-pod values and their aggregation into the workload's one number.
//!
//! With KEDA's default `AverageValue` the HPA computes `ceil(value / target)`
//! replicas, so the default aggregation is `sum`: the workload's total, whose
//! ratio to a per-replica target is the replica count.

use std::sync::Arc;

use crate::{
    snapshot::Reading,
    snapshot::{GpuUsage, PodUsage},
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

/// One pod's value of a GPU `metric` over its GPUs, or only over the GPU of
/// its node with NVML index `gpu_index` (keda-gpu-scaler's `gpuIndex`); a pod
/// with no process there is 0.
pub fn pod_value_on(metric: Metric, gpu_index: Option<u32>, pod: &PodUsage) -> Result<f64> {
    if metric.is_engine() {
        // Engine figures come from the pod's engine, never from its GPUs.
        return Err(Error::ReadingUnavailable(format!(
            "{metric} is read from the pod's engine, not its GPUs"
        )));
    }
    let gpus: Vec<&GpuUsage> = pod
        .gpus
        .iter()
        .filter(|g| gpu_index.is_none_or(|i| g.gpu_index == i))
        .collect();
    if gpus.is_empty() {
        return Ok(0.0);
    }
    let n = gpus.len() as f64;
    let mut acc = 0.0;
    match metric {
        Metric::GpuUtilization => {
            for g in &gpus {
                acc += get(&g.sm_util, "SM utilization", pod, g)?;
            }
            Ok(acc / n)
        }
        Metric::MemoryUtilization => {
            for g in &gpus {
                acc += get(&g.mem_util, "memory-controller utilization", pod, g)?;
            }
            Ok(acc / n)
        }
        Metric::MemoryUsedMib => {
            for g in &gpus {
                acc += get(&g.memory_used_mib, "memory used", pod, g)? as f64;
            }
            Ok(acc)
        }
        Metric::MemoryUsedPercent => {
            let mut total = 0.0;
            for g in &gpus {
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
            for g in &gpus {
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
            for g in &gpus {
                hottest = hottest.max(f64::from(get(&g.temperature_c, "temperature", pod, g)?));
            }
            Ok(hottest)
        }
        engine => unreachable!("{engine} returned above"),
    }
}

/// Whether the HPA counts `pod` as a replica: Running and Ready, as its
/// replica calculator's ready-pod count (kubernetes pkg/controller/podautoscaler
/// replica_calculator.go `getReadyPodsCount`).
pub fn counts_as_ready(pod: &crate::pods::Pod) -> bool {
    pod.phase.as_deref() == Some("Running") && pod.ready
}

/// Whether `aggregation` leaves pods that are not ready out. `avg` is the
/// per-replica figure of a `metricType: Value` trigger, and for it the HPA
/// multiplies the value by the ready pods (desired = ceil(ready * value /
/// target)): a pod still loading its model counted as 0 would pull the average
/// down and under-scale while replicas start. KEDA does not tell the scaler the
/// trigger's metricType, so this holds for `avg` whatever it is (with
/// AverageValue, `avg` is the wrong aggregation anyway: use `sum`).
fn ready_pods_only(aggregation: Aggregation) -> bool {
    aggregation == Aggregation::Avg
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
        .filter(|p| !ready_pods_only(query.aggregation) || counts_as_ready(&p.pod))
        .map(|p| {
            let v = pod_value_on(query.metric, query.gpu_index, p)?;
            finite(query, v, &p.pod)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(aggregate_counting_missing(
        query.aggregation,
        values,
        missing,
    ))
}

/// `v` if it is a number KEDA can use: KEDA turns NaN into 0, and one pod's
/// NaN can hide behind `max` or `min`, so every pod's value is checked.
fn finite(query: &Query, v: f64, pod: &crate::pods::Pod) -> Result<f64> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::ReadingUnavailable(format!(
            "the {} of pod {}/{} is {v}, not a number KEDA can use",
            query.metric, pod.namespace, pod.name
        )))
    }
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
        // `engine` holds one figure per pod of `pods`, in order (both views
        // keep them together); pods not ready read 0 there.
        let values =
            if ready_pods_only(query.aggregation) && workload.engine.len() == workload.pods.len() {
                workload
                    .pods
                    .iter()
                    .zip(&workload.engine)
                    .filter(|(p, _)| counts_as_ready(&p.pod))
                    .map(|(p, v)| finite(query, *v, &p.pod))
                    .collect::<Result<Vec<_>>>()?
            } else {
                if let Some(v) = workload.engine.iter().find(|v| !v.is_finite()) {
                    return Err(Error::ReadingUnavailable(format!(
                        "a pod's {} is {v}, not a number KEDA can use",
                        query.metric
                    )));
                }
                workload.engine.clone()
            };
        aggregate_counting_missing(query.aggregation, values, workload.missing)
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
                phase: Some("Running".into()),
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
        assert_eq!(
            pod_value_on(Metric::GpuUtilization, None, &p).expect("ok"),
            40.0
        );
        assert_eq!(
            pod_value_on(Metric::MemoryUtilization, None, &p).expect("ok"),
            20.0
        );
        assert_eq!(
            pod_value_on(Metric::MemoryUsedMib, None, &p).expect("ok"),
            2048.0
        );
        assert_eq!(
            pod_value_on(Metric::MemoryUsedPercent, None, &p).expect("ok"),
            12.5
        );
        assert_eq!(
            pod_value_on(Metric::PowerDraw, None, &p).expect("ok"),
            150.0
        );
        assert_eq!(
            pod_value_on(Metric::Temperature, None, &p).expect("ok"),
            80.0
        );
        // Throughputs add up over the GPUs, as the pod's total traffic.
        assert_eq!(
            pod_value_on(Metric::PcieTxKbps, None, &p).expect("ok"),
            1500.0
        );
        assert_eq!(
            pod_value_on(Metric::PcieRxKbps, None, &p).expect("ok"),
            3000.0
        );
        assert_eq!(
            pod_value_on(Metric::NvlinkTxMbps, None, &p).expect("ok"),
            15000.0
        );
        assert_eq!(
            pod_value_on(Metric::NvlinkRxMbps, None, &p).expect("ok"),
            30000.0
        );
        for m in Metric::ALL.into_iter().filter(|m| !m.is_engine()) {
            assert_eq!(
                pod_value_on(m, None, &pod(vec![])).expect("ok"),
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
        let err = pod_value_on(Metric::GpuUtilization, None, &p).expect_err("unavailable");
        assert!(
            err.to_string().contains("ml/p") && err.to_string().contains("MIG"),
            "{err}"
        );
        assert_eq!(
            pod_value_on(Metric::MemoryUsedMib, None, &p).expect("memory still known"),
            1024.0
        );
        let mut g = gpu(0, 60.0, 10.0, 1024, 4096, 70, 100.0);
        g.nvlink_tx_mbps = Reading::unavailable("MPS: no split");
        let err = pod_value_on(Metric::NvlinkTxMbps, None, &pod(vec![g])).expect_err("unavailable");
        assert!(
            err.to_string().contains("NVLink TX") && err.to_string().contains("MPS"),
            "{err}"
        );
        let mut g = gpu(0, 1.0, 1.0, 1, 0, 1, 1.0);
        g.memory_total_mib = Reading::Ok(0);
        assert!(pod_value_on(Metric::MemoryUsedPercent, None, &pod(vec![g])).is_err());
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
                crate::scaler::metadata::PodSelector::Required,
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

    fn query(pairs: &[(&str, &str)]) -> Query {
        crate::scaler::metadata::parse(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            crate::scaler::metadata::PodSelector::Required,
        )
        .expect("query")
    }

    #[test]
    fn gpu_index_keeps_that_gpu_of_each_pod() {
        let p = Arc::new(pod(vec![
            gpu(0, 60.0, 10.0, 1024, 4096, 70, 100.0),
            gpu(1, 20.0, 30.0, 2048, 4096, 80, 50.0),
        ]));
        let v = |pairs: &[(&str, &str)]| {
            workload_value(&query(pairs), std::slice::from_ref(&p)).expect("value")
        };
        assert_eq!(v(&[("podSelector", "a")]), 40.0);
        assert_eq!(v(&[("podSelector", "a"), ("gpuIndex", "-1")]), 40.0);
        assert_eq!(v(&[("podSelector", "a"), ("gpuIndex", "0")]), 60.0);
        assert_eq!(v(&[("podSelector", "a"), ("gpuIndex", "1")]), 20.0);
        assert_eq!(
            v(&[
                ("podSelector", "a"),
                ("gpuIndex", "1"),
                ("metric", "memory_used_mib")
            ]),
            2048.0
        );
        // A GPU the pod does not use: it uses nothing there.
        assert_eq!(v(&[("podSelector", "a"), ("gpuIndex", "7")]), 0.0);
    }

    #[test]
    fn avg_leaves_pods_that_are_not_ready_out() {
        let with = |sm: f64, phase: &str, ready: bool| {
            let mut p = pod(vec![gpu(0, sm, 0.0, 1, 1, 0, 0.0)]);
            let mut meta = (*p.pod).clone();
            meta.phase = Some(phase.into());
            meta.ready = ready;
            p.pod = Arc::new(meta);
            Arc::new(p)
        };
        let pods = [
            with(60.0, "Running", true),
            with(40.0, "Running", true),
            with(0.0, "Running", false),
            with(0.0, "Pending", false),
        ];
        let avg = query(&[("podSelector", "a"), ("aggregation", "avg")]);
        assert_eq!(workload_value(&avg, &pods).expect("avg"), 50.0);
        // sum (AverageValue) counts every pod: the HPA divides the total itself.
        let sum = query(&[("podSelector", "a")]);
        assert_eq!(workload_value(&sum, &pods).expect("sum"), 100.0);
        // Engine figures: the pods not ready read 0 and are left out of avg.
        let q = query(&[
            ("podSelector", "a"),
            ("metric", "vllm_queue_depth"),
            ("aggregation", "avg"),
        ]);
        let w = Workload {
            pods: pods.to_vec(),
            missing: 0,
            engine: vec![4.0, 2.0, 0.0, 0.0],
        };
        assert_eq!(value(&q, &w).expect("engine avg"), 3.0);
        // No ready pod: nothing is measured, 0.
        assert_eq!(workload_value(&avg, &pods[2..]).expect("none ready"), 0.0);
    }

    #[test]
    fn a_nan_hidden_behind_max_is_still_refused() {
        let q = query(&[
            ("podSelector", "a"),
            ("metric", "vllm_queue_depth"),
            ("aggregation", "min"),
        ]);
        let w = Workload {
            pods: Vec::new(),
            missing: 0,
            engine: vec![1.0, f64::NAN],
        };
        let e = value(&q, &w).expect_err("NaN");
        assert!(matches!(e, Error::ReadingUnavailable(_)), "{e}");
        let p = Arc::new(pod(vec![gpu(0, f64::NAN, 0.0, 1, 1, 0, 0.0)]));
        let q = query(&[("podSelector", "a"), ("aggregation", "max")]);
        let e = workload_value(&q, &[p, Arc::new(pod(vec![]))]).expect_err("NaN");
        assert!(e.to_string().contains("not a number"), "{e}");
    }

    #[test]
    fn engine_values_sum_with_missing_and_never_send_nan() {
        let q = crate::scaler::metadata::parse(
            &[("podSelector", "a"), ("metric", "vllm_queue_depth")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            crate::scaler::metadata::PodSelector::Required,
        )
        .expect("query");
        let w = |engine: Vec<f64>, missing| Workload {
            pods: Vec::new(),
            missing,
            engine,
        };
        assert_eq!(value(&q, &w(vec![3.0, 5.0], 1)).expect("value"), 12.0);
        assert_eq!(value(&q, &w(vec![], 0)).expect("no pods"), 0.0);
        assert!(value(&q, &w(vec![f64::NAN], 0)).is_err());
        assert!(value(&q, &w(vec![f64::INFINITY, 1.0], 0)).is_err());
    }
}
