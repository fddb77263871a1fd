//! What one node's GPUs are doing, per pod, at one moment: the [`NodeSnapshot`]
//! the join (`join`) publishes on a watch channel every poll, the
//! figures in it ([`Reading`]) and the rule for when it may be answered from
//! ([`check_fresh`]). Everything that serves figures (the scaler, the peer
//! protocol, `/metrics`, `top`) reads these and nothing else.

mod accounts;
mod reading;

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::watch;

pub use accounts::{Accounts, DeviceEnergy, Holder, PodEnergy, Unattributed, UnattributedEnergy};
pub use reading::Reading;

use crate::{
    attribution::Backend,
    gpu::{DeviceCounters, MigInstance},
    pods::{ContainerKind, Pod},
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
    /// The power split over its processes for `power_draw`: the energy
    /// counter's mean over the last pass, or `power_w` where there is no
    /// counter (and on the first pass).
    pub power_attributed_w: Reading<f64>,
    /// Which of the two `power_attributed_w` is; `None` when it is unavailable.
    pub power_source: Option<PowerSource>,
    pub mig_enabled: bool,
    /// Set when this entry is one MIG instance of a GPU (see
    /// [`GpuDevice::mig_instance`]).
    pub mig_instance: Option<MigInstance>,
    /// The device's PCIe, NVLink and energy counters.
    pub counters: DeviceCounters,
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
    /// Their share of the GPU's PCIe throughput, KB/s, by SM share (all of it
    /// for a pod that owns the GPU).
    pub pcie_tx_kbps: Reading<f64>,
    pub pcie_rx_kbps: Reading<f64>,
    /// Their share of the GPU's NVLink throughput, MB/s, likewise.
    pub nvlink_tx_mbps: Reading<f64>,
    pub nvlink_rx_mbps: Reading<f64>,
}

/// Where a GPU's attributed power comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerSource {
    /// The total-energy counter's increase over the last pass.
    EnergyCounter,
    /// `nvmlDeviceGetPowerUsage`: one instant.
    Instantaneous,
}

/// How one pass splits a GPU board's energy counter: the fractions of its
/// increase each pod (and container) and the processes of no pod get. The
/// ledger (`accounting`) applies them to the increase since the
/// counter reading it accounted last, so no energy is lost or counted twice
/// whatever passes it did not see.
#[derive(Clone, Debug, PartialEq)]
pub struct EnergySplit {
    pub gpu_index: u32,
    /// The board's UUID (a MIG GPU's, not an instance's).
    pub uuid: String,
    /// The counter, mJ, as this pass read it.
    pub counter_mj: Reading<u64>,
    /// Processes on the board (its instances' on MIG).
    pub processes: usize,
    /// Whether every process list of the board could be read (else
    /// `processes` may be short, and what the split leaves is not idle draw).
    pub processes_listed: bool,
    pub pods: Vec<EnergyShare>,
    /// Processes of no known pod.
    pub no_pod: f64,
}

/// One part of a pod's share of a board's energy.
#[derive(Clone, Debug, PartialEq)]
pub struct EnergyShare {
    pub pod_uid: String,
    /// The `container` label ([`ContainerRole::label`]).
    pub container: String,
    pub fraction: f64,
}

/// One local pod and its GPU use (empty `gpus` when it runs no GPU process).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodUsage {
    pub pod: Arc<Pod>,
    /// Per GPU, the sums over all of the pod's processes: what the scaler
    /// computes its values from.
    pub gpus: Vec<GpuUsage>,
    /// The same processes split by the part of the pod they run in, per GPU:
    /// for each GPU, the figures over `containers` add up to the `gpus` entry.
    /// Local snapshots only: peers send pod totals, so a pod's usage from a
    /// peer has none.
    pub containers: Vec<ContainerUsage>,
}

/// Which part of its pod a process runs in. The cgroup path names the
/// container's runtime id ([`crate::attribution::PodIdentity::container_id`]); only the pod's
/// container statuses say which container that is, or that it is none of them
/// (the sandbox), so this is known only after the join (`join::container_role`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum ContainerRole {
    /// A container the pod's status reports (current or previous instance).
    Container { name: String, kind: ContainerKind },
    /// A container the pod's statuses do not list while they list others: the
    /// sandbox (pause) container the runtime starts before any of them. (A
    /// container in the moment between its start and the kubelet's next status
    /// update reads as the sandbox too.)
    Sandbox,
    /// In the pod's cgroup but in none of its containers: directly in the
    /// pod-level cgroup, or CRI-O's `crio-conmon-` monitor of a container.
    PodCgroup,
    /// In one of the pod's containers, but the pod source reports no container
    /// statuses for the pod (pending, or a source without them): which one is
    /// unknown.
    Unknown,
}

impl ContainerRole {
    /// Whether this is the pod's sandbox container: `None` when that cannot be
    /// told (no container statuses).
    pub fn is_sandbox(&self) -> Option<bool> {
        match self {
            Self::Sandbox => Some(true),
            Self::Container { .. } | Self::PodCgroup => Some(false),
            Self::Unknown => None,
        }
    }

    /// The `container` label of the per-pod metric series: the container's
    /// name; `POD` for the sandbox (as cAdvisor names it; no real container can
    /// be called that, Kubernetes names are lowercase); empty when the process
    /// is in no container or its container is unknown.
    pub fn label(&self) -> &str {
        match self {
            Self::Container { name, .. } => name,
            Self::Sandbox => "POD",
            Self::PodCgroup | Self::Unknown => "",
        }
    }
}

/// What the processes of one part of a pod use, per GPU.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ContainerUsage {
    #[serde(flatten)]
    pub role: ContainerRole,
    /// The runtime ids of the containers its processes ran in, as the cgroup
    /// paths name them (two for a container whose previous instance's process
    /// is still sampled; empty for [`ContainerRole::PodCgroup`]).
    pub container_ids: Vec<String>,
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
    /// How this pass splits each board's energy (for the ledger).
    #[serde(skip)]
    pub energy: Vec<EnergySplit>,
    /// Energy per pod and idle GPU holders, accumulated over the passes so far
    /// (empty until the sampler's ledger has seen a snapshot).
    pub accounts: Arc<Accounts>,
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

/// How old GPU samples may be: three poll intervals.
pub fn staleness_limit(poll_interval: Duration) -> Duration {
    poll_interval * 3
}

/// Why a snapshot may not be answered from.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Unfit {
    /// The GPU source is not answering, or has not answered yet.
    #[error("the GPU source is down: {0}")]
    GpuDown(Arc<str>),
    #[error(
        "GPU samples are {} ms old, more than three poll intervals ({} ms): the GPU poller is not keeping up",
        age.as_millis(),
        limit.as_millis()
    )]
    Stale { age: Duration, limit: Duration },
    /// A GPU's process list could not be read: per-pod figures on it are
    /// unknown.
    #[error("the process list of GPU {index} ({uuid}) could not be read: {reason}")]
    ProcessList {
        index: u32,
        uuid: String,
        reason: Arc<str>,
    },
}

/// Checks that a snapshot may be answered from at `now`: its GPU source is up,
/// its samples are at most [`staleness_limit`] old and every GPU's process list
/// was read.
pub fn check_fresh(
    snap: &NodeSnapshot,
    poll_interval: Duration,
    now: SystemTime,
) -> Result<(), Unfit> {
    if let Some(err) = &snap.gpu_error {
        return Err(Unfit::GpuDown(err.clone()));
    }
    let limit = staleness_limit(poll_interval);
    let age = snap
        .samples_age(now)
        .ok_or_else(|| Unfit::GpuDown("no GPU sample yet".into()))?;
    if age > limit {
        return Err(Unfit::Stale { age, limit });
    }
    if let Some(g) = snap.gpus.iter().find(|g| g.processes_error.is_some()) {
        return Err(Unfit::ProcessList {
            index: g.index,
            uuid: g.uuid.clone(),
            reason: g.processes_error.clone().unwrap_or_default(),
        });
    }
    Ok(())
}
