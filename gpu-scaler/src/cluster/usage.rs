//! Per-pod usage between the sampler's snapshot and the peer protocol.
//!
//! Every daemon turns every node's figures, its own included, into
//! `snapshot::PodUsage` through [`from_proto`], after they went through
//! [`to_proto`]: the same conversion for all, so the value computed from them is
//! the same whichever daemon KEDA asks. The conversion is lossless (f64, u64 and
//! u32 travel unchanged; an unreadable figure travels as its reason).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{
    NoReport,
    peer::{LocalError, LocalUsage, proto},
};
use crate::{
    engine::{EngineQuery, Scraper},
    figures::Metric,
    pods::Pod,
    snapshot::{GpuUsage, PodUsage, Reading, SnapshotReceiver, check_fresh},
};

/// What a peer may say: only the pods it was asked about (the others are
/// dropped: a peer cannot replace another node's figure), figures that can be
/// true (finite, utilization 0-100 % per GPU, no negative power), and a
/// snapshot no older than `max_age`. An answer that breaks a rule makes the
/// node count as missing, with why.
pub fn check_answer(
    mut a: proto::GetPodUsageResponse,
    asked: &std::collections::HashSet<String>,
    now: SystemTime,
    max_age: Duration,
) -> Result<proto::GetPodUsageResponse, NoReport> {
    let at = UNIX_EPOCH + Duration::from_nanos(u64::try_from(a.snapshot_unix_nanos).unwrap_or(0));
    let age = now.duration_since(at).unwrap_or_default();
    if age > max_age {
        return Err(NoReport::Stale { age, max_age });
    }
    let before = a.pods.len();
    let mut seen = std::collections::HashSet::new();
    a.pods
        .retain(|p| asked.contains(&p.pod_uid) && seen.insert(p.pod_uid.clone()));
    if a.pods.len() < before {
        tracing::debug!(node = %a.node_name, dropped = before - a.pods.len(), "peer answered for pods it was not asked about");
    }
    a.unknown_pod_uids.retain(|u| asked.contains(u));
    let percent = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && (0.0..=100.0).contains(&v));
    let rate = |v: Option<f64>| v.is_none_or(|v| v.is_finite() && v >= 0.0);
    for p in &a.pods {
        let bad_gpu = p.gpus.iter().find(|g| {
            !percent(g.sm_util_percent)
                || !percent(g.mem_util_percent)
                || !rate(g.power_watts)
                || !rate(g.pcie_tx_kbps)
                || !rate(g.pcie_rx_kbps)
                || !rate(g.nvlink_tx_mbps)
                || !rate(g.nvlink_rx_mbps)
        });
        if let Some(g) = bad_gpu {
            return Err(NoReport::ImpossibleGpu {
                pod_uid: p.pod_uid.clone(),
                gpu_uuid: g.gpu_uuid.clone(),
                figures: format!(
                    "SM {:?} %, memory {:?} %, power {:?} W, PCIe {:?}/{:?} KB/s, NVLink {:?}/{:?} MB/s",
                    g.sm_util_percent,
                    g.mem_util_percent,
                    g.power_watts,
                    g.pcie_tx_kbps,
                    g.pcie_rx_kbps,
                    g.nvlink_tx_mbps,
                    g.nvlink_rx_mbps
                ),
            });
        }
        if let Some(f) = p
            .figures
            .iter()
            .find(|f| f.value.is_some_and(|v| !v.is_finite()))
        {
            return Err(NoReport::ImpossibleFigure {
                pod_uid: p.pod_uid.clone(),
                value: f.value,
            });
        }
    }
    Ok(a)
}

/// An engine query as the protocol carries it.
pub fn figure_request(q: &EngineQuery) -> proto::FigureRequest {
    proto::FigureRequest {
        metric: q.name.to_owned(),
        engine_metric: q.engine_metric.clone().unwrap_or_default(),
        engine_quantile: q.quantile,
        port: q.port.map(u32::from),
        path: q.path.clone(),
    }
}

/// An engine query from the protocol, checked exactly as metadata is.
pub fn engine_query(r: &proto::FigureRequest) -> Result<EngineQuery, String> {
    let figure = Metric::parse(&r.metric)
        .and_then(Metric::engine_figure)
        .ok_or_else(|| format!("{:?} is not an engine figure", r.metric))?;
    let port = r
        .port
        .map(|p| u16::try_from(p).map_err(|_| format!("port {p} is out of range")))
        .transpose()?;
    let engine_metric = Some(r.engine_metric.as_str()).filter(|s| !s.is_empty());
    EngineQuery::new(
        figure,
        engine_metric,
        r.engine_quantile,
        port,
        r.path.as_deref(),
    )
    .map_err(|e| format!("{}: {}", e.key, e.why))
}

/// A reading as the protocol carries it.
pub fn figure_reading(r: &Reading<f64>) -> proto::FigureReading {
    match r {
        Reading::Ok(v) => proto::FigureReading {
            value: Some(*v),
            unavailable: String::new(),
        },
        Reading::Unavailable(why) => proto::FigureReading {
            value: None,
            unavailable: why.to_string(),
        },
    }
}

/// A reading from the protocol; a non-finite value is no reading.
pub fn reading(r: Option<&proto::FigureReading>) -> Reading<f64> {
    match r {
        None => Reading::unavailable("the pod's node did not report this figure"),
        Some(proto::FigureReading { value: Some(v), .. }) if v.is_finite() => Reading::Ok(*v),
        Some(proto::FigureReading { value: Some(v), .. }) => {
            Reading::unavailable(format!("the pod's node reported {v}"))
        }
        Some(r) if r.unavailable.is_empty() => {
            Reading::unavailable("the pod's node gave no value and no reason")
        }
        Some(r) => Reading::unavailable(r.unavailable.as_str()),
    }
}

fn put<T: Copy>(
    r: &Reading<T>,
    field: &str,
    unavailable: &mut std::collections::HashMap<String, String>,
) -> Option<T> {
    match r {
        Reading::Ok(v) => Some(*v),
        Reading::Unavailable(reason) => {
            unavailable.insert(field.to_owned(), reason.to_string());
            None
        }
    }
}

/// One pod's usage as the protocol carries it.
pub fn to_proto(usage: &PodUsage) -> proto::PodUsage {
    proto::PodUsage {
        pod_uid: usage.pod.uid.clone(),
        figures: Vec::new(),
        gpus: usage
            .gpus
            .iter()
            .map(|g| {
                let mut unavailable = std::collections::HashMap::new();
                proto::GpuUsage {
                    gpu_uuid: g.gpu_uuid.clone(),
                    gpu_index: g.gpu_index,
                    sm_util_percent: put(&g.sm_util, "sm_util_percent", &mut unavailable),
                    mem_util_percent: put(&g.mem_util, "mem_util_percent", &mut unavailable),
                    memory_used_mib: put(&g.memory_used_mib, "memory_used_mib", &mut unavailable),
                    power_watts: put(&g.power_w, "power_watts", &mut unavailable),
                    gpu_memory_total_mib: put(
                        &g.memory_total_mib,
                        "gpu_memory_total_mib",
                        &mut unavailable,
                    ),
                    gpu_temperature_celsius: put(
                        &g.temperature_c,
                        "gpu_temperature_celsius",
                        &mut unavailable,
                    ),
                    pcie_tx_kbps: put(&g.pcie_tx_kbps, "pcie_tx_kbps", &mut unavailable),
                    pcie_rx_kbps: put(&g.pcie_rx_kbps, "pcie_rx_kbps", &mut unavailable),
                    nvlink_tx_mbps: put(&g.nvlink_tx_mbps, "nvlink_tx_mbps", &mut unavailable),
                    nvlink_rx_mbps: put(&g.nvlink_rx_mbps, "nvlink_rx_mbps", &mut unavailable),
                    unavailable,
                }
            })
            .collect(),
    }
}

fn get<T>(v: Option<T>, field: &str, g: &proto::GpuUsage) -> Reading<T> {
    match v {
        Some(v) => Reading::Ok(v),
        None => Reading::Unavailable(
            g.unavailable
                .get(field)
                .map(String::as_str)
                .unwrap_or("not reported by the pod's node")
                .into(),
        ),
    }
}

/// A pod's usage from the protocol, for `pod` (as the workload's pod list has it).
/// The protocol carries pod totals only: no per-container usage.
pub fn from_proto(pod: Arc<Pod>, usage: &proto::PodUsage) -> PodUsage {
    PodUsage {
        pod,
        containers: Vec::new(),
        gpus: usage
            .gpus
            .iter()
            .map(|g| GpuUsage {
                gpu_index: g.gpu_index,
                gpu_uuid: g.gpu_uuid.clone(),
                pids: Vec::new(),
                sm_util: get(g.sm_util_percent, "sm_util_percent", g),
                mem_util: get(g.mem_util_percent, "mem_util_percent", g),
                memory_used_mib: get(g.memory_used_mib, "memory_used_mib", g),
                memory_total_mib: get(g.gpu_memory_total_mib, "gpu_memory_total_mib", g),
                temperature_c: get(g.gpu_temperature_celsius, "gpu_temperature_celsius", g),
                power_w: get(g.power_watts, "power_watts", g),
                pcie_tx_kbps: get(g.pcie_tx_kbps, "pcie_tx_kbps", g),
                pcie_rx_kbps: get(g.pcie_rx_kbps, "pcie_rx_kbps", g),
                nvlink_tx_mbps: get(g.nvlink_tx_mbps, "nvlink_tx_mbps", g),
                nvlink_rx_mbps: get(g.nvlink_rx_mbps, "nvlink_rx_mbps", g),
            })
            .collect(),
    }
}

/// This node's usage from the sampler's newest snapshot.
pub struct SnapshotUsage {
    node_name: String,
    snapshots: SnapshotReceiver,
    poll_interval: Duration,
    scraper: Option<Scraper>,
}

impl SnapshotUsage {
    pub fn new(
        node_name: String,
        snapshots: SnapshotReceiver,
        poll_interval: Duration,
        scraper: Option<Scraper>,
    ) -> Self {
        Self {
            node_name,
            snapshots,
            poll_interval,
            scraper,
        }
    }
}

impl LocalUsage for SnapshotUsage {
    fn node_name(&self) -> &str {
        &self.node_name
    }

    fn pod_usage<'a>(
        &'a self,
        uids: &'a [String],
        figures: &'a [proto::FigureRequest],
    ) -> futures::future::BoxFuture<'a, Result<proto::GetPodUsageResponse, LocalError>> {
        Box::pin(async move {
            let snap = self.snapshots.borrow().clone();
            let mut resp = self.gpu_usage(&snap, uids)?;
            if figures.is_empty() {
                return Ok(resp);
            }
            let scraper = self.scraper.as_ref().ok_or(LocalError::NoEngines)?;
            // Every pod of the answer is in `snap`: the answer came from it.
            let pods: Vec<Arc<Pod>> = resp
                .pods
                .iter()
                .filter_map(|p| snap.pods.get(&p.pod_uid).map(|u| u.pod.clone()))
                .collect();
            for f in figures {
                let readings = match engine_query(f) {
                    Ok(q) => scraper.readings(&pods, &q).await,
                    Err(why) => crate::engine::scraper::Readings {
                        values: vec![Reading::unavailable(why); pods.len()],
                        oldest_read: None,
                    },
                };
                for (p, r) in resp.pods.iter_mut().zip(&readings.values) {
                    p.figures.push(figure_reading(r));
                }
                // The answer is as old as its oldest part: engines are read on
                // their own tick, so an engine read can be older than the GPU
                // snapshot (the asker's cache keys its reuse on this).
                if let Some(at) = readings.oldest_read {
                    resp.snapshot_unix_nanos = resp.snapshot_unix_nanos.min(unix_nanos(at));
                }
            }
            Ok(resp)
        })
    }
}

fn unix_nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl SnapshotUsage {
    fn gpu_usage(
        &self,
        snap: &crate::snapshot::NodeSnapshot,
        uids: &[String],
    ) -> Result<proto::GetPodUsageResponse, LocalError> {
        // A stale snapshot or a GPU source that is down is an error, as for
        // a local query: the asking daemon then applies its policy.
        check_fresh(snap, self.poll_interval, SystemTime::now())?;
        let taken = snap.samples_taken_at.unwrap_or(snap.taken_at);
        let mut resp = proto::GetPodUsageResponse {
            node_name: self.node_name.clone(),
            snapshot_unix_nanos: unix_nanos(taken),
            ..Default::default()
        };
        for uid in uids {
            match snap.pods.get(uid) {
                Some(u) => resp.pods.push(to_proto(u)),
                None => resp.unknown_pod_uids.push(uid.clone()),
            }
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn peers_say_only_what_they_were_asked_and_what_can_be_true() {
        let now = SystemTime::now();
        let nanos = |t: SystemTime| {
            i64::try_from(t.duration_since(UNIX_EPOCH).expect("after 1970").as_nanos())
                .expect("fits")
        };
        let pod = |uid: &str, sm: f64| proto::PodUsage {
            pod_uid: uid.into(),
            gpus: vec![proto::GpuUsage {
                gpu_uuid: "GPU-0".into(),
                sm_util_percent: Some(sm),
                ..Default::default()
            }],
            figures: Vec::new(),
        };
        let answer = |pods: Vec<proto::PodUsage>, at: SystemTime| proto::GetPodUsageResponse {
            node_name: "n2".into(),
            snapshot_unix_nanos: nanos(at),
            pods,
            unknown_pod_uids: vec!["elsewhere".into()],
        };
        let asked: std::collections::HashSet<String> = ["a".to_owned()].into();
        let limit = Duration::from_secs(5);
        // A pod it was not asked about (another node's) is dropped, never merged.
        let ok = check_answer(
            answer(vec![pod("a", 40.0), pod("b", 99.0), pod("a", 1.0)], now),
            &asked,
            now,
            limit,
        )
        .expect("valid");
        assert_eq!(ok.pods.len(), 1);
        assert_eq!(ok.pods[0].gpus[0].sm_util_percent, Some(40.0));
        assert!(ok.unknown_pod_uids.is_empty());
        let mut negative_traffic = pod("a", 1.0);
        negative_traffic.gpus[0].nvlink_tx_mbps = Some(-5.0);
        let e = check_answer(answer(vec![negative_traffic], now), &asked, now, limit)
            .expect_err("negative throughput");
        assert!(e.to_string().contains("NVLink"), "{e}");
        for bad in [f64::NAN, f64::INFINITY, 100.5, -1.0] {
            let e = check_answer(answer(vec![pod("a", bad)], now), &asked, now, limit)
                .expect_err("impossible");
            assert!(e.to_string().contains("impossible"), "{e}");
        }
        let mut nan_figure = pod("a", 1.0);
        nan_figure.figures.push(proto::FigureReading {
            value: Some(f64::NAN),
            unavailable: String::new(),
        });
        assert!(check_answer(answer(vec![nan_figure], now), &asked, now, limit).is_err());
        let stale = check_answer(
            answer(vec![pod("a", 1.0)], now - Duration::from_secs(6)),
            &asked,
            now,
            limit,
        )
        .expect_err("stale");
        assert!(stale.to_string().contains("old"), "{stale}");
    }

    #[test]
    fn round_trip_is_lossless() {
        let pod = Arc::new(Pod {
            uid: "u1".into(),
            namespace: "ml".into(),
            name: "p".into(),
            labels: BTreeMap::new(),
            node_name: Some("n".into()),
            phase: Some("Running".into()),
            ready: true,
            ip: None,
            annotations: Default::default(),
            containers: Vec::new(),
        });
        let usage = PodUsage {
            pod: pod.clone(),
            containers: Vec::new(),
            gpus: vec![GpuUsage {
                gpu_index: 3,
                gpu_uuid: "GPU-3".into(),
                pids: Vec::new(),
                sm_util: Reading::Ok(0.1 + 0.2),
                mem_util: Reading::unavailable("MIG: no per-process utilization"),
                memory_used_mib: Reading::Ok(u64::MAX - 1),
                memory_total_mib: Reading::Ok(81_920),
                temperature_c: Reading::Ok(71),
                power_w: Reading::Ok(123.456_789),
                pcie_tx_kbps: Reading::Ok(1234.5),
                pcie_rx_kbps: Reading::unavailable("MPS: the split is unknown"),
                nvlink_tx_mbps: Reading::Ok(0.0),
                nvlink_rx_mbps: Reading::Ok(f64::MAX),
            }],
        };
        let wire = to_proto(&usage);
        let bytes = prost::Message::encode_to_vec(&wire);
        let decoded: proto::PodUsage = prost::Message::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(from_proto(pod.clone(), &decoded), usage);

        // A node from before the throughput fields: its pods' throughputs are
        // unavailable, never 0.
        let mut old = wire.clone();
        for g in &mut old.gpus {
            g.pcie_tx_kbps = None;
            g.unavailable.remove("pcie_rx_kbps");
        }
        let back = from_proto(pod, &old);
        assert!(
            back.gpus[0]
                .pcie_tx_kbps
                .reason()
                .is_some_and(|r| r.contains("not reported")),
            "{back:?}"
        );
    }
}
