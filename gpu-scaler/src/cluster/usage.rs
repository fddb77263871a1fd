//! Per-pod usage between the sampler's snapshot and the peer protocol.
//!
//! Every daemon turns every node's figures, its own included, into
//! `sampler::PodUsage` through [`from_proto`], after they went through
//! [`to_proto`]: the same conversion for all, so the value computed from them is
//! the same whichever daemon KEDA asks. The conversion is lossless (f64, u64 and
//! u32 travel unchanged; an unreadable figure travels as its reason).

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::peer::{LocalUsage, proto};
use crate::{
    gpu::Reading,
    pods::Pod,
    sampler::{GpuUsage, PodUsage, SnapshotReceiver},
    scaler::view::check_fresh,
};

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
            })
            .collect(),
    }
}

/// This node's usage from the sampler's newest snapshot.
pub struct SnapshotUsage {
    node_name: String,
    snapshots: SnapshotReceiver,
    poll_interval: Duration,
}

impl SnapshotUsage {
    pub fn new(node_name: String, snapshots: SnapshotReceiver, poll_interval: Duration) -> Self {
        Self {
            node_name,
            snapshots,
            poll_interval,
        }
    }
}

impl LocalUsage for SnapshotUsage {
    fn node_name(&self) -> &str {
        &self.node_name
    }

    fn pod_usage(&self, uids: &[String]) -> Result<proto::GetPodUsageResponse, String> {
        let snap = self.snapshots.borrow().clone();
        // A stale snapshot or a GPU source that is down is an error, as for
        // a local query: the asking daemon then applies its policy.
        check_fresh(&snap, self.poll_interval, SystemTime::now()).map_err(|e| e.to_string())?;
        let taken = snap.samples_taken_at.unwrap_or(snap.taken_at);
        let mut resp = proto::GetPodUsageResponse {
            node_name: self.node_name.clone(),
            snapshot_unix_nanos: taken
                .duration_since(UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                .unwrap_or(0),
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
    fn round_trip_is_lossless() {
        let pod = Arc::new(Pod {
            uid: "u1".into(),
            namespace: "ml".into(),
            name: "p".into(),
            labels: BTreeMap::new(),
            node_name: Some("n".into()),
            phase: Some("Running".into()),
            ready: true,
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
            }],
        };
        let wire = to_proto(&usage);
        let bytes = prost::Message::encode_to_vec(&wire);
        let decoded: proto::PodUsage = prost::Message::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(from_proto(pod, &decoded), usage);
    }
}
