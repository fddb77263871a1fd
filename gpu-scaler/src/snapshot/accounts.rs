//! What the ledger (`accounting`) has accumulated by a snapshot: energy
//! per pod and container, energy booked to no pod, and idle GPU holders. Data
//! only; the booking rules are the ledger's.

use serde::Serialize;

/// Why energy was booked to no pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unattributed {
    /// Processes of no known pod had it (host daemons, pods not on this node's
    /// list, pids attribution does not know).
    NoPod,
    /// The board had no process: its idle draw.
    NoProcess,
    /// It could not be split: SM shares unknown (MPS, missing samples), MIG
    /// with pods that share the board, or the process list unreadable (a
    /// board whose processes cannot be listed is not known to be idle).
    Unsplit,
}

impl Unattributed {
    pub const ALL: [Self; 3] = [Self::NoPod, Self::NoProcess, Self::Unsplit];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoPod => "no_pod",
            Self::NoProcess => "no_process",
            Self::Unsplit => "unsplit",
        }
    }
}

/// Energy booked to one part of a pod on one GPU since the pod appeared.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodEnergy {
    pub pod_uid: String,
    pub namespace: String,
    pub pod: String,
    /// The `container` label of the per-pod series.
    pub container: String,
    pub gpu: u32,
    pub joules: f64,
}

/// Energy of one board booked to no pod, by reason.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UnattributedEnergy {
    pub gpu: u32,
    pub uuid: String,
    pub reason: Unattributed,
    pub joules: f64,
}

/// What a board's counter increased by while the ledger watched it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceEnergy {
    pub gpu: u32,
    pub uuid: String,
    /// Booked: its pods' energy plus its unattributed energy.
    pub joules: f64,
    /// Times the counter went backwards (driver reloaded).
    pub resets: u64,
}

/// A pod holding GPU memory on one GPU, and how long it has been idle there.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Holder {
    pub pod_uid: String,
    pub namespace: String,
    pub pod: String,
    pub gpu: u32,
    pub memory_used_mib: u64,
    pub sm_percent: f64,
    /// Seconds its SM utilization has been at most the idle threshold (0 while
    /// it is busy).
    pub idle_s: f64,
    /// `idle_s` reached [`Config::idle_after`].
    pub idle: bool,
}

/// What the ledger has accumulated, as of one snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Accounts {
    pub pod_energy: Vec<PodEnergy>,
    pub unattributed_energy: Vec<UnattributedEnergy>,
    pub device_energy: Vec<DeviceEnergy>,
    /// Every pod holding GPU memory whose SM utilization is known.
    pub holders: Vec<Holder>,
    pub idle_sm_percent: f64,
    pub idle_after_s: f64,
}
