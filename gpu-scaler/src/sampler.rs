//! Joins attribution x GPU samples x pods into a per-pod [`NodeSnapshot`] every
//! poll, published immutably on a watch channel. gRPC handlers only read these.
//!
//! A snapshot is rebuilt whenever the GPU poller publishes a pass or the pods
//! change. Its freshness is that of its GPU samples (`samples_taken_at`), not of
//! the join: re-joining old samples does not make them new.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    attribution::{Attributor, Backend, Owner},
    gpu::{GpuDevice, GpuStatus, Reading},
    pods::{Pod, PodSet, PodsReceiver},
};

/// One GPU of the node as the snapshot saw it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuSummary {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub sm_util: Reading<u32>,
    pub mem_util: Reading<u32>,
    pub memory_used_mib: Reading<u64>,
    pub memory_total_mib: Reading<u64>,
    pub temperature_c: Reading<u32>,
    pub power_w: Reading<f64>,
    pub mig_enabled: bool,
    /// Why the GPU's process list could not be read: per-pod figures on this
    /// GPU are then unknown.
    pub processes_error: Option<Arc<str>>,
}

/// What one pod (or one unowned process) uses of one GPU.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuUsage {
    pub gpu_index: u32,
    pub gpu_uuid: String,
    /// The processes counted, in the daemon's pid namespace.
    pub pids: Vec<u32>,
    /// Summed SM utilization % of the processes.
    pub sm_util: Reading<f64>,
    /// Summed memory-controller utilization %.
    pub mem_util: Reading<f64>,
    pub memory_used_mib: Reading<u64>,
    /// The device's memory size (so a usage is self-contained for peers).
    pub memory_total_mib: Reading<u64>,
    /// The device's temperature.
    pub temperature_c: Reading<u32>,
    /// The share of the device's power attributed to these processes.
    pub power_w: Reading<f64>,
}

/// One local pod and its GPU use (empty `gpus` when it runs no GPU process).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodUsage {
    pub pod: Arc<Pod>,
    pub gpus: Vec<GpuUsage>,
}

/// Why GPU use belongs to no pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Unowned {
    /// The process is not in a pod's cgroup (system service, login shell).
    Host,
    /// Attribution does not know the pid.
    UnknownPid,
    /// The process is in a pod's cgroup but the pod source does not list that pod
    /// on this node.
    UnknownPod { pod_uid: String },
}

/// GPU use of processes that belong to no known local pod, per GPU and reason.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnownedUsage {
    pub why: Unowned,
    pub usage: GpuUsage,
}

/// Per-pod GPU usage on this node at one moment.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeSnapshot {
    /// When the join ran.
    pub taken_at: SystemTime,
    /// When the GPU samples were taken; `None` before the first good pass.
    pub samples_taken_at: Option<SystemTime>,
    /// Why the GPU source is not answering, if it is not.
    pub gpu_error: Option<Arc<str>>,
    pub node_name: Option<String>,
    pub attribution: Backend,
    pub gpus: Vec<GpuSummary>,
    /// Every local pod, by UID (serialized as a list of [`PodUsage`]).
    #[serde(serialize_with = "values_only")]
    pub pods: BTreeMap<String, Arc<PodUsage>>,
    pub unowned: Vec<UnownedUsage>,
    /// Why the pod source's newest refresh failed, if it did.
    pub pods_error: Option<Arc<str>>,
}

fn values_only<S: serde::Serializer>(
    map: &BTreeMap<String, Arc<PodUsage>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(map.values())
}

impl NodeSnapshot {
    /// Age of the GPU samples at `now`; `None` without samples.
    pub fn samples_age(&self, now: SystemTime) -> Option<std::time::Duration> {
        self.samples_taken_at
            .map(|t| now.duration_since(t).unwrap_or_default())
    }
}

/// The channel snapshots are published on.
pub type SnapshotReceiver = watch::Receiver<Arc<NodeSnapshot>>;

/// Sums readings; the first unavailable one makes the sum unavailable.
fn sum_readings<T: Copy + std::ops::Add<Output = T>>(
    acc: &mut Option<Reading<T>>,
    next: Reading<T>,
) {
    *acc = Some(match (acc.take(), next) {
        (None, n) => n,
        (Some(Reading::Unavailable(r)), _) | (Some(Reading::Ok(_)), Reading::Unavailable(r)) => {
            Reading::Unavailable(r)
        }
        (Some(Reading::Ok(a)), Reading::Ok(b)) => Reading::Ok(a + b),
    });
}

/// Each process's share of the device's power: by SM share, equally when the
/// processes have no SM samples (all zero). Unavailable when the device power or
/// any process's SM figure is (MIG): splitting by a guess would be a guess.
fn power_shares(dev: &GpuDevice) -> Vec<Reading<f64>> {
    let n = dev.processes.len();
    let power = match &dev.power_w {
        Reading::Ok(p) => *p,
        Reading::Unavailable(r) => {
            return vec![Reading::Unavailable(format!("GPU {} power: {r}", dev.index).into()); n];
        }
    };
    let mut sm = Vec::with_capacity(n);
    for p in &dev.processes {
        match &p.sm_util {
            Reading::Ok(v) => sm.push(f64::from(*v)),
            Reading::Unavailable(r) => {
                let reason: Arc<str> = format!(
                    "GPU {} power cannot be split: per-process SM utilization is unavailable ({r})",
                    dev.index
                )
                .into();
                return vec![Reading::Unavailable(reason); n];
            }
        }
    }
    let total: f64 = sm.iter().sum();
    sm.into_iter()
        .map(|s| {
            Reading::Ok(if total > 0.0 {
                power * s / total
            } else {
                power / n as f64
            })
        })
        .collect()
}

fn summary(dev: &GpuDevice) -> GpuSummary {
    GpuSummary {
        index: dev.index,
        uuid: dev.uuid.clone(),
        name: dev.name.clone(),
        sm_util: dev.sm_util.clone(),
        mem_util: dev.mem_util.clone(),
        memory_used_mib: dev.memory_used_mib.clone(),
        memory_total_mib: dev.memory_total_mib.clone(),
        temperature_c: dev.temperature_c.clone(),
        power_w: dev.power_w.clone(),
        mig_enabled: dev.mig_enabled,
        processes_error: dev.processes_error.clone(),
    }
}

/// Accumulates one owner's processes on one GPU.
struct Acc {
    pids: Vec<u32>,
    sm: Option<Reading<f64>>,
    mem: Option<Reading<f64>>,
    used: Option<Reading<u64>>,
    power: Option<Reading<f64>>,
}

impl Acc {
    fn new() -> Self {
        Self {
            pids: Vec::new(),
            sm: None,
            mem: None,
            used: None,
            power: None,
        }
    }

    fn finish(self, dev: &GpuDevice) -> GpuUsage {
        let zero = || Reading::Ok(0.0);
        GpuUsage {
            gpu_index: dev.index,
            gpu_uuid: dev.uuid.clone(),
            pids: self.pids,
            sm_util: self.sm.unwrap_or_else(zero),
            mem_util: self.mem.unwrap_or_else(zero),
            memory_used_mib: self.used.unwrap_or(Reading::Ok(0)),
            memory_total_mib: dev.memory_total_mib.clone(),
            temperature_c: dev.temperature_c.clone(),
            power_w: self.power.unwrap_or_else(zero),
        }
    }
}

fn as_f64(r: &Reading<u32>) -> Reading<f64> {
    match r {
        Reading::Ok(v) => Reading::Ok(f64::from(*v)),
        Reading::Unavailable(e) => Reading::Unavailable(e.clone()),
    }
}

/// The join itself, for one GPU status and one pod set.
pub fn join(
    gpu: &GpuStatus,
    pods: &PodSet,
    attributor: &dyn Attributor,
    now: SystemTime,
) -> NodeSnapshot {
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Key {
        Pod(String),
        Host,
        UnknownPid,
        UnknownPod(String),
    }

    let mut pod_usage: BTreeMap<String, PodUsage> = pods
        .local()
        .map(|p| {
            (
                p.uid.clone(),
                PodUsage {
                    pod: p.clone(),
                    gpus: Vec::new(),
                },
            )
        })
        .collect();
    let mut unowned = Vec::new();
    let mut gpus = Vec::new();
    let devices = gpu.last_good.as_ref().map_or(&[][..], |s| &s.devices[..]);
    for dev in devices {
        gpus.push(summary(dev));
        let shares = power_shares(dev);
        let mut by_owner: BTreeMap<Key, Acc> = BTreeMap::new();
        for (proc, share) in dev.processes.iter().zip(shares) {
            let key = match attributor.resolve(proc.pid).map(|a| a.owner) {
                None => Key::UnknownPid,
                Some(Owner::Host) => Key::Host,
                Some(Owner::Pod(id)) if pod_usage.contains_key(&id.pod_uid) => Key::Pod(id.pod_uid),
                Some(Owner::Pod(id)) => Key::UnknownPod(id.pod_uid),
            };
            let acc = by_owner.entry(key).or_insert_with(Acc::new);
            acc.pids.push(proc.pid);
            sum_readings(&mut acc.sm, as_f64(&proc.sm_util));
            sum_readings(&mut acc.mem, as_f64(&proc.mem_util));
            sum_readings(&mut acc.used, proc.used_memory_mib.clone());
            sum_readings(&mut acc.power, share);
        }
        for (key, acc) in by_owner {
            let usage = acc.finish(dev);
            match key {
                Key::Pod(uid) => {
                    if let Some(p) = pod_usage.get_mut(&uid) {
                        p.gpus.push(usage);
                    }
                }
                Key::Host => unowned.push(UnownedUsage {
                    why: Unowned::Host,
                    usage,
                }),
                Key::UnknownPid => unowned.push(UnownedUsage {
                    why: Unowned::UnknownPid,
                    usage,
                }),
                Key::UnknownPod(pod_uid) => unowned.push(UnownedUsage {
                    why: Unowned::UnknownPod { pod_uid },
                    usage,
                }),
            }
        }
    }
    let gpu_error = match (&gpu.error, &gpu.last_good) {
        (Some(e), _) => Some(e.clone()),
        (None, None) => Some("the GPU source has not produced a sample yet".into()),
        (None, Some(_)) => None,
    };
    NodeSnapshot {
        taken_at: now,
        samples_taken_at: gpu.last_good.as_ref().map(|s| s.taken_at),
        gpu_error,
        node_name: pods.node_name.clone(),
        attribution: attributor.backend(),
        gpus,
        pods: pod_usage
            .into_iter()
            .map(|(uid, u)| (uid, Arc::new(u)))
            .collect(),
        unowned,
        pods_error: pods.error.clone(),
    }
}

/// Told about every join (telemetry); called on the sampler's task, so it
/// must be cheap.
pub trait Observer: Send + Sync {
    /// One join took `took`.
    fn joined(&self, took: std::time::Duration);
    /// A GPU pass that failed arrived.
    fn gpu_failed(&self);
    /// A pod set whose refresh failed arrived.
    fn pods_failed(&self);
}

struct Unobserved;

impl Observer for Unobserved {
    fn joined(&self, _: std::time::Duration) {}
    fn gpu_failed(&self) {}
    fn pods_failed(&self) {}
}

/// Starts the join task: a new snapshot whenever the GPU status or the pods
/// change. Runs until its inputs close or every snapshot receiver is dropped.
pub fn start(
    attributor: Arc<dyn Attributor>,
    gpu: watch::Receiver<Arc<GpuStatus>>,
    pods: PodsReceiver,
) -> SnapshotReceiver {
    start_observed(attributor, gpu, pods, Arc::new(Unobserved))
}

/// As [`start`], telling `observer` about every join and failed input.
pub fn start_observed(
    attributor: Arc<dyn Attributor>,
    mut gpu: watch::Receiver<Arc<GpuStatus>>,
    mut pods: PodsReceiver,
    observer: Arc<dyn Observer>,
) -> SnapshotReceiver {
    let first = join(
        &gpu.borrow_and_update(),
        &pods.borrow_and_update(),
        attributor.as_ref(),
        SystemTime::now(),
    );
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            let (gpu_new, pods_new) = tokio::select! {
                _ = tx.closed() => break,
                r = gpu.changed() => if r.is_err() { break } else { (true, false) },
                r = pods.changed() => if r.is_err() { break } else { (false, true) },
            };
            let status = gpu.borrow_and_update().clone();
            let set = pods.borrow_and_update().clone();
            if gpu_new && status.error.is_some() {
                observer.gpu_failed();
            }
            if pods_new && set.error.is_some() {
                observer.pods_failed();
            }
            let started = std::time::Instant::now();
            let snap = join(&status, &set, attributor.as_ref(), SystemTime::now());
            observer.joined(started.elapsed());
            tracing::trace!(
                pods = snap.pods.len(),
                gpus = snap.gpus.len(),
                "node snapshot"
            );
            tx.send_replace(Arc::new(snap));
        }
        tracing::debug!("sampler stopped");
    });
    rx
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::{
        attribution::{Attribution, PodIdentity, QosClass},
        gpu::{GpuProcess, GpuSnapshot, ProcessKind},
    };

    /// A hand-written attributor: a fixed pid -> owner table.
    pub struct Table(pub HashMap<u32, Attribution>);

    impl Attributor for Table {
        fn resolve(&self, pid: u32) -> Option<Attribution> {
            self.0.get(&pid).cloned()
        }
        fn backend(&self) -> Backend {
            Backend::Procfs
        }
    }

    fn owned_by(uid: Option<&str>) -> Attribution {
        Attribution {
            cgroup_id: None,
            cgroup_path: "/x".into(),
            owner: match uid {
                None => Owner::Host,
                Some(u) => Owner::Pod(PodIdentity {
                    pod_uid: u.into(),
                    container_id: None,
                    runtime: None,
                    qos: QosClass::Burstable,
                    is_conmon: false,
                }),
            },
            backend: Backend::Procfs,
        }
    }

    fn proc(pid: u32, sm: u32, mem: u32, used: u64) -> GpuProcess {
        GpuProcess {
            pid,
            kind: ProcessKind::Compute,
            used_memory_mib: Reading::Ok(used),
            sm_util: Reading::Ok(sm),
            mem_util: Reading::Ok(mem),
            gpu_instance_id: None,
        }
    }

    fn device(index: u32, power: f64, processes: Vec<GpuProcess>) -> GpuDevice {
        GpuDevice {
            index,
            uuid: format!("GPU-{index}"),
            name: "Mock".into(),
            sm_util: Reading::Ok(50),
            mem_util: Reading::Ok(20),
            memory_used_mib: Reading::Ok(1000),
            memory_total_mib: Reading::Ok(80_000),
            temperature_c: Reading::Ok(60 + index),
            power_w: Reading::Ok(power),
            power_limit_w: Reading::Ok(700.0),
            mig_enabled: false,
            processes,
            processes_error: None,
        }
    }

    fn pod(uid: &str) -> Pod {
        Pod {
            uid: uid.into(),
            namespace: "ml".into(),
            name: uid.into(),
            labels: BTreeMap::new(),
            node_name: Some("n1".into()),
            phase: None,
            ready: true,
        }
    }

    fn status(devices: Vec<GpuDevice>) -> GpuStatus {
        GpuStatus {
            last_good: Some(Arc::new(GpuSnapshot {
                taken_at: SystemTime::UNIX_EPOCH,
                devices,
            })),
            error: None,
            updated_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn table() -> Table {
        Table(HashMap::from([
            (10, owned_by(Some("a"))),
            (11, owned_by(Some("a"))),
            (20, owned_by(Some("b"))),
            (30, owned_by(None)),
            (40, owned_by(Some("elsewhere"))),
        ]))
    }

    #[test]
    fn joins_pods_gpus_and_power() {
        let pods = PodSet::from_pods([pod("a"), pod("b"), pod("idle")], Some("n1".into()), "t");
        let st = status(vec![
            device(
                0,
                300.0,
                vec![
                    proc(10, 30, 10, 1000),
                    proc(11, 10, 5, 500),
                    proc(20, 60, 20, 2000),
                ],
            ),
            device(
                1,
                100.0,
                vec![
                    proc(20, 0, 0, 100),
                    proc(30, 0, 0, 50),
                    proc(99, 0, 0, 7),
                    proc(40, 0, 0, 1),
                ],
            ),
        ]);
        let snap = join(&st, &pods, &table(), SystemTime::UNIX_EPOCH);
        assert!(snap.gpu_error.is_none());
        assert_eq!(snap.pods.len(), 3);
        assert!(snap.pods["idle"].gpus.is_empty());

        let a = &snap.pods["a"].gpus;
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].pids, [10, 11]);
        assert_eq!(a[0].sm_util, Reading::Ok(40.0));
        assert_eq!(a[0].mem_util, Reading::Ok(15.0));
        assert_eq!(a[0].memory_used_mib, Reading::Ok(1500));
        // 300 W split by SM share 30:10:60.
        assert_eq!(a[0].power_w, Reading::Ok(120.0));

        let b = &snap.pods["b"].gpus;
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].power_w, Reading::Ok(180.0));
        // No SM samples on GPU 1: 100 W split equally over its 4 processes.
        assert_eq!(b[1].power_w, Reading::Ok(25.0));
        assert_eq!(b[1].temperature_c, Reading::Ok(61));
        assert_eq!(b[1].memory_total_mib, Reading::Ok(80_000));

        let whys: Vec<_> = snap
            .unowned
            .iter()
            .map(|u| (&u.why, u.usage.pids.clone()))
            .collect();
        assert_eq!(
            whys,
            [
                (&Unowned::Host, vec![30]),
                (&Unowned::UnknownPid, vec![99]),
                (
                    &Unowned::UnknownPod {
                        pod_uid: "elsewhere".into()
                    },
                    vec![40]
                ),
            ]
        );
    }

    #[test]
    fn unavailable_stays_unavailable() {
        let pods = PodSet::from_pods([pod("a")], None, "t");
        let mut p = proc(10, 0, 0, 100);
        p.sm_util = Reading::unavailable("MIG");
        let mut dev = device(0, 200.0, vec![p, proc(11, 50, 0, 1)]);
        dev.temperature_c = Reading::unavailable("sensor");
        let snap = join(&status(vec![dev]), &pods, &table(), SystemTime::UNIX_EPOCH);
        let u = &snap.pods["a"].gpus[0];
        assert!(matches!(&u.sm_util, Reading::Unavailable(r) if r.as_ref() == "MIG"));
        assert!(matches!(&u.power_w, Reading::Unavailable(r) if r.contains("cannot be split")));
        assert!(matches!(&u.temperature_c, Reading::Unavailable(_)));
        assert_eq!(u.memory_used_mib, Reading::Ok(101));

        let mut dev = device(0, 0.0, vec![proc(10, 5, 0, 1)]);
        dev.power_w = Reading::unavailable("not supported");
        let snap = join(&status(vec![dev]), &pods, &table(), SystemTime::UNIX_EPOCH);
        assert!(
            matches!(&snap.pods["a"].gpus[0].power_w, Reading::Unavailable(r) if r.contains("not supported"))
        );
    }

    #[test]
    fn gpu_errors_are_carried() {
        let pods = PodSet::from_pods([pod("a")], None, "t");
        let none = GpuStatus {
            last_good: None,
            error: None,
            updated_at: SystemTime::UNIX_EPOCH,
        };
        let snap = join(&none, &pods, &table(), SystemTime::UNIX_EPOCH);
        assert!(snap.gpu_error.is_some());
        assert_eq!(snap.samples_taken_at, None);
        let mut failing = status(vec![device(0, 1.0, vec![])]);
        failing.error = Some("NVML: GPU is lost".into());
        let snap = join(&failing, &pods, &table(), SystemTime::UNIX_EPOCH);
        assert_eq!(snap.gpu_error.as_deref(), Some("NVML: GPU is lost"));
    }

    #[tokio::test]
    async fn publishes_on_change() {
        let (gtx, grx) = watch::channel(Arc::new(status(vec![])));
        let (_ptx, prx) = watch::channel(Arc::new(PodSet::from_pods([pod("a")], None, "t")));
        let mut snaps = start(Arc::new(table()), grx, prx);
        assert!(snaps.borrow_and_update().pods["a"].gpus.is_empty());
        gtx.send_replace(Arc::new(status(vec![device(
            0,
            10.0,
            vec![proc(10, 7, 0, 1)],
        )])));
        tokio::time::timeout(std::time::Duration::from_secs(5), snaps.changed())
            .await
            .expect("snapshot published")
            .expect("sampler alive");
        assert_eq!(snaps.borrow().pods["a"].gpus[0].sm_util, Reading::Ok(7.0));
    }
}
