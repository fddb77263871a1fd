//! Joins attribution x GPU samples x pods into a per-pod [`NodeSnapshot`] every
//! poll, published immutably on a watch channel. gRPC handlers only read these.
//!
//! A snapshot is rebuilt whenever the GPU poller publishes a pass or the pods
//! change. Its freshness is that of its GPU samples (`samples_taken_at`), not of
//! the join: re-joining old samples does not make them new.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::sync::watch;

use crate::{
    accounting::Ledger,
    attribution::{Attributor, Owner, PodIdentity},
    gpu::{GpuDevice, GpuProcess, GpuStatus},
    pods::{Pod, PodSet, PodsReceiver},
    snapshot::{
        ContainerRole, ContainerUsage, EnergyShare, EnergySplit, GpuSummary, GpuUsage,
        NodeSnapshot, PodUsage, PowerSource, Reading, SnapshotReceiver, Unowned, UnownedUsage,
    },
};

/// The power `power_draw` splits, and where it comes from: the energy
/// counter's mean over the last pass where the GPU has the counter (steadier
/// than one instant), else `nvmlDeviceGetPowerUsage`.
fn attributable_power(dev: &GpuDevice) -> (Reading<f64>, Option<PowerSource>) {
    match (&dev.counters.energy_pass, &dev.power_w) {
        (Reading::Ok(p), _) if p.seconds > 0.0 => {
            (Reading::Ok(p.watts()), Some(PowerSource::EnergyCounter))
        }
        (_, Reading::Ok(w)) => (Reading::Ok(*w), Some(PowerSource::Instantaneous)),
        (_, Reading::Unavailable(r)) => (Reading::Unavailable(r.clone()), None),
    }
}

/// The device figures split over a GPU's processes, by index into a
/// [`Shares`] array.
const POWER: usize = 0;
/// The share of the energy counter's increase (a fraction: the ledger knows
/// the increase).
const ENERGY: usize = 1;
const PCIE_TX: usize = 2;
const PCIE_RX: usize = 3;
const NVLINK_TX: usize = 4;
const NVLINK_RX: usize = 5;
const SPLIT: usize = 6;

/// One process's (or one owner's) part of each split figure.
type Shares = [Reading<f64>; SPLIT];

/// How a split figure is shared when no process used SM.
#[derive(Clone, Copy, PartialEq)]
enum WhenIdle {
    /// Equally: the idle draw of a GPU is the cost of holding it.
    Equally,
    /// Unknown unless it is 0: data moved by copy engines is nobody's SM time.
    Unknown,
}

/// Name and idle rule of each split figure, in [`Shares`] order.
const SPLIT_FIGURES: [(&str, WhenIdle); SPLIT] = [
    ("power", WhenIdle::Equally),
    ("energy", WhenIdle::Equally),
    ("PCIe TX throughput", WhenIdle::Unknown),
    ("PCIe RX throughput", WhenIdle::Unknown),
    ("NVLink TX throughput", WhenIdle::Unknown),
    ("NVLink RX throughput", WhenIdle::Unknown),
];

/// The whole-GPU value of each split figure (energy: 1, the whole increase).
fn whole_figures(dev: &GpuDevice) -> Shares {
    let c = &dev.counters;
    [
        attributable_power(dev).0,
        match &c.energy_mj {
            Reading::Ok(_) => Reading::Ok(1.0),
            Reading::Unavailable(r) => Reading::Unavailable(r.clone()),
        },
        c.pcie_tx_kbps.map(f64::from),
        c.pcie_rx_kbps.map(f64::from),
        c.nvlink_tx_mbps.clone(),
        c.nvlink_rx_mbps.clone(),
    ]
}

/// Each process's part of each split figure of the GPU whose figures are
/// `whole` (a MIG GPU's: its instances' processes share the board), by SM
/// share. Unavailable, with the reason, where the figure or a process's SM
/// utilization is (MPS, missing samples), on MIG (NVML has no per-process
/// utilization there), and for a throughput moved while no process used SM.
/// A pod that owns every process of the GPU gets the whole figure anyway
/// ([`join`]).
fn shares(whole: &GpuDevice, procs: &[&GpuProcess]) -> Vec<Shares> {
    let n = procs.len();
    let mut sm = Vec::with_capacity(n);
    let mut sm_unknown = None;
    for p in procs {
        match &p.sm_util {
            Reading::Ok(v) => sm.push(f64::from(*v)),
            Reading::Unavailable(r) => {
                sm_unknown = Some(r.clone());
                break;
            }
        }
    }
    let total: f64 = sm.iter().sum();
    let figures = whole_figures(whole);
    let mut out: Vec<Shares> = vec![std::array::from_fn(|_| Reading::Ok(0.0)); n];
    for (q, (figure, (name, when_idle))) in figures.iter().zip(SPLIT_FIGURES).enumerate() {
        let column: Vec<Reading<f64>> = match figure {
            Reading::Unavailable(r) => {
                let r: Arc<str> = format!("GPU {} {name}: {r}", whole.index).into();
                vec![Reading::Unavailable(r); n]
            }
            Reading::Ok(_) if whole.mig_enabled => {
                let r: Arc<str> = format!(
                    "MIG: NVML reports the {name} of GPU {} for the whole GPU only, and no per-process utilization to split it by",
                    whole.index
                )
                .into();
                vec![Reading::Unavailable(r); n]
            }
            Reading::Ok(_) if sm_unknown.is_some() => {
                let r: Arc<str> = format!(
                    "GPU {} {name} cannot be split: per-process SM utilization is unavailable ({})",
                    whole.index,
                    sm_unknown.as_deref().unwrap_or_default()
                )
                .into();
                vec![Reading::Unavailable(r); n]
            }
            Reading::Ok(v) if total > 0.0 => {
                sm.iter().map(|s| Reading::Ok(v * s / total)).collect()
            }
            Reading::Ok(v) if *v == 0.0 => vec![Reading::Ok(0.0); n],
            Reading::Ok(v) => match when_idle {
                WhenIdle::Equally => vec![Reading::Ok(v / n as f64); n],
                WhenIdle::Unknown => {
                    let r: Arc<str> = format!(
                        "GPU {} {name} is {v:.1} while none of its {n} processes used SM: whose it is cannot be told",
                        whole.index
                    )
                    .into();
                    vec![Reading::Unavailable(r); n]
                }
            },
        };
        for (share, value) in out.iter_mut().zip(column) {
            share[q] = value;
        }
    }
    out
}

fn summary(dev: &GpuDevice) -> GpuSummary {
    let (power_attributed_w, power_source) = attributable_power(dev);
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
        power_attributed_w,
        power_source,
        mig_enabled: dev.mig_enabled,
        mig_instance: dev.mig_instance.clone(),
        counters: dev.counters.clone(),
        processes_error: dev.processes_error.clone(),
    }
}

/// Accumulates one owner's processes on one GPU.
struct Acc {
    pids: Vec<u32>,
    sm: Option<Reading<f64>>,
    mem: Option<Reading<f64>>,
    used: Option<Reading<u64>>,
    split: [Option<Reading<f64>>; SPLIT],
}

impl Acc {
    fn new() -> Self {
        Self {
            pids: Vec::new(),
            sm: None,
            mem: None,
            used: None,
            split: Default::default(),
        }
    }

    fn add(&mut self, proc: &GpuProcess, shares: &Shares) {
        self.pids.push(proc.pid);
        Reading::accumulate(&mut self.sm, &proc.sm_util.map(f64::from));
        Reading::accumulate(&mut self.mem, &proc.mem_util.map(f64::from));
        Reading::accumulate(&mut self.used, &proc.used_memory_mib);
        for (acc, share) in self.split.iter_mut().zip(shares) {
            Reading::accumulate(acc, share);
        }
    }

    /// The owner's usage, and its share of the energy counter's increase.
    fn finish(self, dev: &GpuDevice) -> (GpuUsage, Reading<f64>) {
        let zero = || Reading::Ok(0.0);
        let [power, energy, pcie_tx, pcie_rx, nvlink_tx, nvlink_rx] =
            self.split.map(|s| s.unwrap_or_else(zero));
        (
            GpuUsage {
                gpu_index: dev.index,
                gpu_uuid: dev.uuid.clone(),
                pids: self.pids,
                sm_util: self.sm.unwrap_or_else(zero),
                mem_util: self.mem.unwrap_or_else(zero),
                memory_used_mib: self.used.unwrap_or(Reading::Ok(0)),
                memory_total_mib: dev.memory_total_mib.clone(),
                temperature_c: dev.temperature_c.clone(),
                power_w: power,
                pcie_tx_kbps: pcie_tx,
                pcie_rx_kbps: pcie_rx,
                nvlink_tx_mbps: nvlink_tx,
                nvlink_rx_mbps: nvlink_rx,
            },
            energy,
        )
    }
}

/// Gives a pod that owns every process of a GPU its `1 / entries` of the
/// whole-GPU figures `whole` (a MIG GPU the pod uses through several instances
/// is several entries): exact, whatever the SM shares say.
fn own_whole(usage: &mut GpuUsage, energy: &mut Reading<f64>, whole: &Shares, entries: usize) {
    let k = entries.max(1) as f64;
    let part = |r: &Reading<f64>| match r {
        Reading::Ok(v) => Reading::Ok(v / k),
        Reading::Unavailable(e) => Reading::Unavailable(e.clone()),
    };
    usage.power_w = part(&whole[POWER]);
    *energy = part(&whole[ENERGY]);
    usage.pcie_tx_kbps = part(&whole[PCIE_TX]);
    usage.pcie_rx_kbps = part(&whole[PCIE_RX]);
    usage.nvlink_tx_mbps = part(&whole[NVLINK_TX]);
    usage.nvlink_rx_mbps = part(&whole[NVLINK_RX]);
}

/// A part of a pod as one process's identity names it, borrowed from the pod
/// (the join compares it with the parts it has without allocating).
enum RoleRef<'p> {
    Container(&'p crate::pods::Container),
    Sandbox,
    PodCgroup,
    Unknown,
}

impl RoleRef<'_> {
    fn of<'p>(pod: &'p Pod, id: &PodIdentity) -> RoleRef<'p> {
        let cid = match &id.container_id {
            Some(cid) if !id.is_conmon => cid,
            _ => return RoleRef::PodCgroup,
        };
        match pod.container_by_id(cid) {
            Some(c) => RoleRef::Container(c),
            None if pod.containers.is_empty() => RoleRef::Unknown,
            None => RoleRef::Sandbox,
        }
    }

    fn is(&self, role: &ContainerRole) -> bool {
        match (self, role) {
            (Self::Container(c), ContainerRole::Container { name, kind }) => {
                c.name == *name && c.kind == *kind
            }
            (Self::Sandbox, ContainerRole::Sandbox)
            | (Self::PodCgroup, ContainerRole::PodCgroup)
            | (Self::Unknown, ContainerRole::Unknown) => true,
            _ => false,
        }
    }

    fn to_role(&self) -> ContainerRole {
        match self {
            Self::Container(c) => ContainerRole::Container {
                name: c.name.clone(),
                kind: c.kind,
            },
            Self::Sandbox => ContainerRole::Sandbox,
            Self::PodCgroup => ContainerRole::PodCgroup,
            Self::Unknown => ContainerRole::Unknown,
        }
    }
}

/// Which part of `pod` the process with cgroup identity `id` runs in.
pub fn container_role(pod: &Pod, id: &PodIdentity) -> ContainerRole {
    RoleRef::of(pod, id).to_role()
}

/// One part of a pod during the join: its usage on the GPUs joined so far and
/// its processes on the GPU being joined.
struct Part {
    usage: ContainerUsage,
    acc: Option<Acc>,
}

/// One local pod during the join.
struct PodWork {
    usage: PodUsage,
    /// Its processes on the GPU being joined, all parts together.
    total: Option<Acc>,
    parts: Vec<Part>,
}

/// What one GPU board (a GPU, or a MIG GPU with its instances) is shared by
/// during the join.
struct Board {
    /// Its figures, whole.
    whole: Shares,
    /// The local pod that owns every process on it, if one does.
    sole: Option<String>,
    /// Its devices that have processes (1, or a MIG GPU's busy instances).
    entries: usize,
    split: EnergySplit,
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
        Host,
        UnknownPid,
        UnknownPod(String),
    }

    // Keyed by the pod set's own uids: no copies.
    let mut work: BTreeMap<&str, PodWork> = pods
        .local()
        .map(|p| {
            (
                p.uid.as_str(),
                PodWork {
                    usage: PodUsage {
                        pod: p.clone(),
                        gpus: Vec::new(),
                        containers: Vec::new(),
                    },
                    total: None,
                    parts: Vec::new(),
                },
            )
        })
        .collect();
    let mut unowned = Vec::new();
    let mut unresolved: Vec<(&GpuDevice, Vec<u32>)> = Vec::new();
    let mut gpus = Vec::new();
    let devices = gpu.last_good.as_ref().map_or(&[][..], |s| &s.devices[..]);

    // Every process's owner, resolved once: the shares of a board depend on
    // who owns all of its processes.
    let owners: Vec<Vec<Option<Owner>>> = devices
        .iter()
        .map(|d| {
            d.processes
                .iter()
                .map(|p| attributor.resolve(p.pid).map(|a| a.owner))
                .collect()
        })
        .collect();
    // The device whose board figures each device's processes share: itself,
    // or a MIG instance's parent (power, energy, PCIe and NVLink are the
    // board's).
    let whole_of: Vec<usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| match &d.mig_instance {
            Some(m) => devices
                .iter()
                .position(|p| p.mig_instance.is_none() && p.uuid == m.parent_uuid)
                .unwrap_or(i),
            None => i,
        })
        .collect();
    let mut shares_of: Vec<Vec<Shares>> = vec![Vec::new(); devices.len()];
    let mut boards: BTreeMap<usize, Board> = BTreeMap::new();
    for (w, whole) in devices.iter().enumerate() {
        if whole_of[w] != w {
            continue;
        }
        let members: Vec<usize> = (0..devices.len()).filter(|i| whole_of[*i] == w).collect();
        let procs: Vec<&GpuProcess> = members
            .iter()
            .flat_map(|i| &devices[*i].processes)
            .collect();
        let mut sh = shares(whole, &procs).into_iter();
        for i in &members {
            shares_of[*i] = sh.by_ref().take(devices[*i].processes.len()).collect();
        }
        let readable = members
            .iter()
            .all(|i| devices[*i].processes_error.is_none());
        let mut uids = members.iter().flat_map(|i| &owners[*i]).map(|o| match o {
            Some(Owner::Pod(id)) if work.contains_key(id.pod_uid.as_str()) => {
                Some(id.pod_uid.as_str())
            }
            _ => None,
        });
        let first = uids.next().flatten();
        let sole = match first {
            Some(uid) if readable && uids.all(|u| u == Some(uid)) => Some(uid.to_owned()),
            _ => None,
        };
        boards.insert(
            w,
            Board {
                whole: whole_figures(whole),
                sole,
                entries: members
                    .iter()
                    .filter(|i| !devices[**i].processes.is_empty())
                    .count(),
                split: EnergySplit {
                    gpu_index: whole.index,
                    uuid: whole.uuid.clone(),
                    counter_mj: whole.counters.energy_mj.clone(),
                    processes: procs.len(),
                    processes_listed: readable,
                    pods: Vec::new(),
                    no_pod: 0.0,
                },
            },
        );
    }

    for (i, dev) in devices.iter().enumerate() {
        gpus.push(summary(dev));
        let board = boards
            .get_mut(&whole_of[i])
            .expect("every device's board was made above");
        let mut by_owner: BTreeMap<Key, Acc> = BTreeMap::new();
        for ((proc, owner), share) in dev.processes.iter().zip(&owners[i]).zip(&shares_of[i]) {
            let id = match owner {
                Some(Owner::Pod(id)) => id,
                other => {
                    let key = if other.is_some() {
                        Key::Host
                    } else {
                        Key::UnknownPid
                    };
                    by_owner
                        .entry(key)
                        .or_insert_with(Acc::new)
                        .add(proc, share);
                    continue;
                }
            };
            let Some(PodWork {
                usage,
                total,
                parts,
                ..
            }) = work.get_mut(id.pod_uid.as_str())
            else {
                by_owner
                    .entry(Key::UnknownPod(id.pod_uid.clone()))
                    .or_insert_with(Acc::new)
                    .add(proc, share);
                continue;
            };
            let role = RoleRef::of(&usage.pod, id);
            let k = match parts.iter().position(|p| role.is(&p.usage.role)) {
                Some(i) => i,
                None => {
                    parts.push(Part {
                        usage: ContainerUsage {
                            role: role.to_role(),
                            container_ids: Vec::new(),
                            gpus: Vec::new(),
                        },
                        acc: None,
                    });
                    parts.len() - 1
                }
            };
            let part = &mut parts[k];
            if let Some(cid) = id.container_id.as_ref().filter(|_| !id.is_conmon)
                && !part.usage.container_ids.contains(cid)
            {
                part.usage.container_ids.push(cid.clone());
            }
            part.acc.get_or_insert_with(Acc::new).add(proc, share);
            total.get_or_insert_with(Acc::new).add(proc, share);
        }
        for (uid, w) in work.iter_mut() {
            let Some(acc) = w.total.take() else {
                continue;
            };
            let sole = board.sole.as_deref() == Some(*uid);
            let (mut usage, mut energy) = acc.finish(dev);
            if sole {
                own_whole(&mut usage, &mut energy, &board.whole, board.entries);
            }
            w.usage.gpus.push(usage);
            let here = w.parts.iter().filter(|p| p.acc.is_some()).count();
            let mut booked = 0.0;
            for part in &mut w.parts {
                let Some(acc) = part.acc.take() else {
                    continue;
                };
                let (mut u, mut e) = acc.finish(dev);
                if sole && here == 1 {
                    own_whole(&mut u, &mut e, &board.whole, board.entries);
                }
                part.usage.gpus.push(u);
                if let (Reading::Ok(_), Reading::Ok(f)) = (&energy, e) {
                    booked += f;
                    board.split.pods.push(EnergyShare {
                        pod_uid: (*uid).to_owned(),
                        container: part.usage.role.label().to_owned(),
                        fraction: f,
                    });
                }
            }
            // The pod's share that its containers' shares do not explain
            // (it owns the GPU, its containers' SM shares are unknown) is the
            // pod's all the same: under container "", whose container cannot
            // be told.
            if let Reading::Ok(f) = energy
                && f - booked > 1e-12
            {
                board.split.pods.push(EnergyShare {
                    pod_uid: (*uid).to_owned(),
                    container: String::new(),
                    fraction: f - booked,
                });
            }
        }
        for (key, acc) in by_owner {
            let why = match key {
                Key::Host => Unowned::Host,
                Key::UnknownPid => Unowned::UnknownPid,
                Key::UnknownPod(pod_uid) => Unowned::UnknownPod { pod_uid },
            };
            let (usage, energy) = acc.finish(dev);
            if let Reading::Ok(f) = energy {
                board.split.no_pod += f;
            }
            if why == Unowned::UnknownPid {
                let alive: Vec<u32> = usage
                    .pids
                    .iter()
                    .copied()
                    .filter(|pid| attributor.unresolved_alive(*pid))
                    .collect();
                if !alive.is_empty() {
                    unresolved.push((dev, alive));
                }
            }
            unowned.push(UnownedUsage { why, usage });
        }
    }
    // A live GPU process no one could attribute (not in the probe's table,
    // and /proc/<pid>/cgroup unreadable or not a cgroup v2 path) may be any
    // local pod's; a gone one (NVML lags exits) is no one's. A pod that
    // shows no GPU process would read 0, and a 0 scales a workload away:
    // its GPU figures are UNAVAILABLE with the reason instead, until the
    // process is attributed or gone. Pods with attributed processes keep
    // their figures.
    if !unresolved.is_empty() {
        for w in work.values_mut() {
            if !w.usage.gpus.is_empty() {
                continue;
            }
            for (dev, pids) in &unresolved {
                let why: Arc<str> = format!(
                    "GPU {} runs processes {pids:?} that could not be attributed to a pod yet (live, but not reported by the probe and /proc/<pid>/cgroup names no cgroup v2 path); this pod may own them",
                    dev.index
                )
                .into();
                let na = || Reading::Unavailable(why.clone());
                w.usage.gpus.push(GpuUsage {
                    gpu_index: dev.index,
                    gpu_uuid: dev.uuid.clone(),
                    pids: Vec::new(),
                    sm_util: na(),
                    mem_util: na(),
                    memory_used_mib: Reading::Unavailable(why.clone()),
                    memory_total_mib: dev.memory_total_mib.clone(),
                    temperature_c: dev.temperature_c.clone(),
                    power_w: na(),
                    pcie_tx_kbps: na(),
                    pcie_rx_kbps: na(),
                    nvlink_tx_mbps: na(),
                    nvlink_rx_mbps: na(),
                });
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
        pods: work
            .into_iter()
            .map(|(uid, w)| {
                let mut usage = w.usage;
                usage.containers = w.parts.into_iter().map(|p| p.usage).collect();
                usage.containers.sort_by(|a, b| a.role.cmp(&b.role));
                (uid.to_owned(), Arc::new(usage))
            })
            .collect(),
        unowned,
        pods_error: pods.error.clone(),
        energy: boards.into_values().map(|b| b.split).collect(),
        accounts: Arc::default(),
    }
}

/// The join's metric families (its duration, failed inputs), owned here and
/// registered once ([`Metrics::register`]).
#[derive(Debug)]
pub struct Metrics {
    /// One join of GPU samples, attribution and pods into a snapshot.
    pub duration: Histogram,
    /// Failed polls by source (the GPU source's name, `pods`).
    pub errors: Family<[(&'static str, &'static str); 1], Counter>,
    /// The GPU source's label in `errors` (`nvml`, `mock`).
    pub gpu_source: &'static str,
}

impl Metrics {
    pub fn new(gpu_source: &'static str) -> Self {
        Self {
            // 100 µs .. ~6.5 s: a join is sub-millisecond on a busy node.
            duration: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            errors: Family::default(),
            gpu_source,
        }
    }

    /// Registers the families in `registry` (the /metrics registry, once).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gpu_scaler_sample_duration_seconds",
            "One join of GPU samples, attribution and pods into a snapshot",
            self.duration.clone(),
        );
        registry.register(
            "gpu_scaler_sample_errors",
            "Failed polls by source",
            self.errors.clone(),
        );
    }

    fn error(&self, source: &'static str) {
        self.errors.get_or_create(&[("source", source)]).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new("gpu")
    }
}

/// What the join task runs with besides its inputs.
#[derive(Debug, Default)]
pub struct Options {
    /// The ledger's settings (idle GPU holders).
    pub accounting: crate::accounting::Config,
    /// Where every join and failed input is recorded.
    pub metrics: Arc<Metrics>,
}

/// Starts the join task: a new snapshot whenever the GPU status or the pods
/// change. Runs until its inputs close or every snapshot receiver is dropped.
pub fn start(
    attributor: Arc<dyn Attributor>,
    mut gpu: watch::Receiver<Arc<GpuStatus>>,
    mut pods: PodsReceiver,
    options: Options,
) -> SnapshotReceiver {
    let Options {
        accounting,
        metrics,
    } = options;
    // The ledger lives on the join task: it sees every snapshot, once, in order.
    let mut ledger = Ledger::new(accounting);
    let mut first = join(
        &gpu.borrow_and_update(),
        &pods.borrow_and_update(),
        attributor.as_ref(),
        SystemTime::now(),
    );
    ledger.record(&mut first);
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
                metrics.error(metrics.gpu_source);
            }
            if pods_new && set.error.is_some() {
                metrics.error("pods");
            }
            let started = std::time::Instant::now();
            let mut snap = join(&status, &set, attributor.as_ref(), SystemTime::now());
            ledger.record(&mut snap);
            metrics.duration.observe(started.elapsed().as_secs_f64());
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
    use super::*;
    use crate::{
        attribution::{Attribution, Backend, PodIdentity, QosClass},
        gpu::{DeviceCounters, GpuProcess, GpuSnapshot, MigInstance},
        pods::ContainerKind,
        testing::Attributions,
    };

    pub(crate) fn owned_by(uid: Option<&str>) -> Attribution {
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

    pub(crate) use crate::testing::process as proc;

    pub(crate) fn device(index: u32, power: f64, processes: Vec<GpuProcess>) -> GpuDevice {
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
            mig_instance: None,
            counters: DeviceCounters::default(),
            processes,
            processes_error: None,
        }
    }

    pub(crate) fn pod(uid: &str) -> Pod {
        Pod {
            uid: uid.into(),
            namespace: "ml".into(),
            name: uid.into(),
            labels: BTreeMap::new(),
            node_name: Some("n1".into()),
            phase: None,
            ready: true,
            ip: None,
            annotations: Default::default(),
            containers: Vec::new(),
        }
    }

    pub(crate) fn status(devices: Vec<GpuDevice>) -> GpuStatus {
        GpuStatus {
            last_good: Some(Arc::new(GpuSnapshot {
                taken_at: SystemTime::UNIX_EPOCH,
                devices,
            })),
            error: None,
            updated_at: SystemTime::UNIX_EPOCH,
        }
    }

    pub(crate) fn table() -> Attributions {
        Attributions::from_table([
            (10, owned_by(Some("a"))),
            (11, owned_by(Some("a"))),
            (20, owned_by(Some("b"))),
            (30, owned_by(None)),
            (40, owned_by(Some("elsewhere"))),
        ])
    }

    #[test]
    fn a_live_unattributed_process_makes_pods_without_processes_unavailable() {
        let pods = PodSet::from_pods([pod("a"), pod("idle")], Some("n1".into()), "t");
        let st = status(vec![
            device(0, 300.0, vec![proc(10, 30, 10, 1000)]),
            device(1, 100.0, vec![proc(99, 20, 0, 7)]),
        ]);
        let snap = join(
            &st,
            &pods,
            &table().unknowns_alive(),
            SystemTime::UNIX_EPOCH,
        );
        // "idle" shows no process, so live pid 99 may be its: not 0.
        let idle = &snap.pods["idle"].gpus;
        assert_eq!(idle.len(), 1, "{idle:?}");
        assert_eq!(idle[0].gpu_index, 1);
        assert!(idle[0].pids.is_empty());
        let why = idle[0].sm_util.reason().expect("unavailable");
        assert!(why.contains("[99]") && why.contains("GPU 1"), "{why}");
        assert!(idle[0].memory_used_mib.reason().is_some());
        assert!(idle[0].power_w.reason().is_some());
        // "a" has its own process: its figures stand.
        let a = &snap.pods["a"].gpus;
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].sm_util, Reading::Ok(30.0));
        // The same pid gone: no one's, "idle" uses no GPU.
        let snap = join(&st, &pods, &table(), SystemTime::UNIX_EPOCH);
        assert!(snap.pods["idle"].gpus.is_empty());
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
        // Pid 99 is gone (the table does not know it): no one's.
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
        // Pid 40 is in a pod this node does not list: `a` shares the GPU.
        let mut dev = device(
            0,
            200.0,
            vec![p.clone(), proc(11, 50, 0, 1), proc(40, 5, 0, 1)],
        );
        dev.temperature_c = Reading::unavailable("sensor");
        let snap = join(&status(vec![dev]), &pods, &table(), SystemTime::UNIX_EPOCH);
        let u = &snap.pods["a"].gpus[0];
        assert!(matches!(&u.sm_util, Reading::Unavailable(r) if r.as_ref() == "MIG"));
        assert!(matches!(&u.power_w, Reading::Unavailable(r) if r.contains("cannot be split")));
        assert!(matches!(&u.temperature_c, Reading::Unavailable(_)));
        assert_eq!(u.memory_used_mib, Reading::Ok(101));
        // Alone on the GPU, `a` has all of its power whatever its SM shares.
        let dev = device(0, 200.0, vec![p, proc(11, 50, 0, 1)]);
        let snap = join(&status(vec![dev]), &pods, &table(), SystemTime::UNIX_EPOCH);
        assert_eq!(snap.pods["a"].gpus[0].power_w, Reading::Ok(200.0));

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

    fn in_container(uid: &str, cid: Option<&str>, is_conmon: bool) -> Attribution {
        let mut a = owned_by(Some(uid));
        if let Owner::Pod(id) = &mut a.owner {
            id.container_id = cid.map(Into::into);
            id.is_conmon = is_conmon;
        }
        a
    }

    fn with_containers(uid: &str, containers: &[(&str, &str, ContainerKind)]) -> Pod {
        Pod {
            containers: containers
                .iter()
                .map(|(name, id, kind)| crate::pods::Container {
                    name: (*name).into(),
                    id: Some((*id).into()),
                    previous_id: Some(format!("{id}-before")),
                    kind: *kind,
                })
                .collect(),
            ..pod(uid)
        }
    }

    fn role(name: &str, kind: ContainerKind) -> ContainerRole {
        ContainerRole::Container {
            name: name.into(),
            kind,
        }
    }

    /// (pids, SM, memory, power) of one part of a pod on one GPU.
    type Figures = (Vec<u32>, Reading<f64>, Reading<u64>, Reading<f64>);

    /// The figures of one part of a pod on one GPU.
    fn part(u: &PodUsage, role: &ContainerRole, gpu: u32) -> Option<Figures> {
        let c = u.containers.iter().find(|c| &c.role == role)?;
        let g = c.gpus.iter().find(|g| g.gpu_index == gpu)?;
        Some((
            g.pids.clone(),
            g.sm_util.clone(),
            g.memory_used_mib.clone(),
            g.power_w.clone(),
        ))
    }

    #[test]
    fn splits_pods_by_container_and_finds_the_sandbox() {
        let pods = PodSet::from_pods(
            [
                with_containers(
                    "a",
                    &[
                        ("server", "c-server", ContainerKind::App),
                        ("sidecar", "c-sidecar", ContainerKind::App),
                        ("warmup", "c-init", ContainerKind::Init),
                    ],
                ),
                // No container statuses (pending, as the source saw it).
                pod("b"),
            ],
            None,
            "t",
        );
        let table = Attributions::from_table([
            (10, in_container("a", Some("c-server"), false)),
            (11, in_container("a", Some("c-server"), false)),
            (12, in_container("a", Some("c-sidecar"), false)),
            (13, in_container("a", Some("c-pause"), false)),
            // The previous instance of the server, still sampled.
            (14, in_container("a", Some("c-server-before"), false)),
            (15, in_container("a", Some("c-init"), false)),
            (16, in_container("a", Some("c-server"), true)),
            (17, in_container("a", None, false)),
            (20, in_container("b", Some("c-b"), false)),
        ]);
        let st = status(vec![
            device(
                0,
                400.0,
                vec![
                    proc(10, 20, 1, 1000),
                    proc(11, 10, 1, 500),
                    proc(12, 30, 2, 2000),
                    proc(13, 10, 0, 4),
                    proc(20, 30, 3, 100),
                ],
            ),
            device(
                1,
                100.0,
                vec![
                    proc(14, 5, 0, 10),
                    proc(15, 5, 0, 20),
                    proc(16, 0, 0, 1),
                    proc(17, 0, 0, 2),
                ],
            ),
        ]);
        let snap = join(&st, &pods, &table, SystemTime::UNIX_EPOCH);
        let a = &snap.pods["a"];
        let server = role("server", ContainerKind::App);
        // GPU 0: 400 W split by SM 20:10:30:10:30.
        assert_eq!(
            part(a, &server, 0),
            Some((
                vec![10, 11],
                Reading::Ok(30.0),
                Reading::Ok(1500),
                Reading::Ok(120.0)
            ))
        );
        assert_eq!(
            part(a, &role("sidecar", ContainerKind::App), 0),
            Some((
                vec![12],
                Reading::Ok(30.0),
                Reading::Ok(2000),
                Reading::Ok(120.0)
            ))
        );
        assert_eq!(
            part(a, &ContainerRole::Sandbox, 0),
            Some((
                vec![13],
                Reading::Ok(10.0),
                Reading::Ok(4),
                Reading::Ok(40.0)
            ))
        );
        // GPU 1: the server's previous instance is the server's; the init
        // container is named; conmon and the pod-level cgroup are no container.
        assert_eq!(
            part(a, &server, 1),
            Some((
                vec![14],
                Reading::Ok(5.0),
                Reading::Ok(10),
                Reading::Ok(50.0)
            ))
        );
        assert_eq!(
            part(a, &role("warmup", ContainerKind::Init), 1).map(|p| p.0),
            Some(vec![15])
        );
        assert_eq!(
            part(a, &ContainerRole::PodCgroup, 1).map(|p| p.0),
            Some(vec![16, 17])
        );
        let ids = |r: &ContainerRole| {
            a.containers
                .iter()
                .find(|c| &c.role == r)
                .map(|c| c.container_ids.clone())
        };
        assert_eq!(
            ids(&server),
            Some(vec!["c-server".into(), "c-server-before".into()])
        );
        assert_eq!(ids(&ContainerRole::Sandbox), Some(vec!["c-pause".into()]));
        assert_eq!(ids(&ContainerRole::PodCgroup), Some(vec![]));
        // The pod totals are the sums over its parts, per GPU.
        assert_eq!(a.gpus[0].pids, [10, 11, 12, 13]);
        assert_eq!(a.gpus[0].sm_util, Reading::Ok(70.0));
        assert_eq!(a.gpus[0].power_w, Reading::Ok(280.0));
        assert_eq!(a.gpus[1].pids, [14, 15, 16, 17]);
        for g in &a.gpus {
            let parts: Vec<&GpuUsage> = a
                .containers
                .iter()
                .flat_map(|c| &c.gpus)
                .filter(|p| p.gpu_index == g.gpu_index)
                .collect();
            let sm: f64 = parts.iter().filter_map(|p| p.sm_util.ok()).sum();
            let used: u64 = parts.iter().filter_map(|p| p.memory_used_mib.ok()).sum();
            let n: usize = parts.iter().map(|p| p.pids.len()).sum();
            assert_eq!(Reading::Ok(sm), g.sm_util, "GPU {}", g.gpu_index);
            assert_eq!(Reading::Ok(used), g.memory_used_mib);
            assert_eq!(n, g.pids.len());
        }
        // Without statuses the container cannot be told, nor whether it is the sandbox.
        let b = &snap.pods["b"];
        assert_eq!(b.containers.len(), 1);
        assert_eq!(b.containers[0].role, ContainerRole::Unknown);
        assert_eq!(b.containers[0].role.is_sandbox(), None);
        assert_eq!(b.containers[0].container_ids, ["c-b"]);
        assert_eq!(ContainerRole::Sandbox.is_sandbox(), Some(true));
        assert_eq!(server.is_sandbox(), Some(false));
        assert_eq!(
            (
                server.label(),
                ContainerRole::Sandbox.label(),
                ContainerRole::Unknown.label()
            ),
            ("server", "POD", "")
        );
        // Parts serialize flat, tagged by their role.
        let json = serde_json::to_value(&a.containers[0]).expect("serializes");
        assert_eq!(json["role"], "container");
        assert_eq!(json["name"], "server");
        assert_eq!(json["kind"], "app");
        assert_eq!(json["gpus"][0]["gpu_index"], 0);
    }

    #[test]
    fn roles_from_identities() {
        let p = with_containers("a", &[("main", "c1", ContainerKind::Ephemeral)]);
        let id = |cid: Option<&str>, conmon: bool| match in_container("a", cid, conmon).owner {
            Owner::Pod(id) => id,
            Owner::Host => unreachable!("in_container makes pods"),
        };
        assert_eq!(
            container_role(&p, &id(Some("c1"), false)),
            role("main", ContainerKind::Ephemeral)
        );
        assert_eq!(
            container_role(&p, &id(Some("zz"), false)),
            ContainerRole::Sandbox
        );
        assert_eq!(
            container_role(&p, &id(Some("c1"), true)),
            ContainerRole::PodCgroup
        );
        assert_eq!(
            container_role(&p, &id(None, false)),
            ContainerRole::PodCgroup
        );
        assert_eq!(
            container_role(&pod("a"), &id(Some("c1"), false)),
            ContainerRole::Unknown
        );
    }

    #[tokio::test]
    async fn publishes_on_change() {
        let (gtx, grx) = watch::channel(Arc::new(status(vec![])));
        let (_ptx, prx) = watch::channel(Arc::new(PodSet::from_pods([pod("a")], None, "t")));
        let mut snaps = start(Arc::new(table()), grx, prx, Options::default());
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

    fn with_counters(mut d: GpuDevice, pcie: (u32, u32), nvlink: (f64, f64)) -> GpuDevice {
        d.counters = DeviceCounters {
            pcie_tx_kbps: Reading::Ok(pcie.0),
            pcie_rx_kbps: Reading::Ok(pcie.1),
            nvlink_tx_mbps: Reading::Ok(nvlink.0),
            nvlink_rx_mbps: Reading::Ok(nvlink.1),
            energy_mj: Reading::Ok(1_000_000),
            energy_pass: Reading::unavailable("first pass"),
        };
        d
    }

    fn unknown_sm(pid: u32, why: &str) -> GpuProcess {
        GpuProcess {
            sm_util: Reading::unavailable(why),
            ..proc(pid, 0, 0, 100)
        }
    }

    fn because<'r>(r: &'r Reading<f64>, what: &str) -> &'r str {
        match r {
            Reading::Unavailable(why) => why,
            Reading::Ok(v) => panic!("{what}: expected unavailable, got {v}"),
        }
    }

    #[test]
    fn throughputs_split_by_sm_share_whole_for_a_pod_that_owns_the_gpu_never_guessed() {
        let pods = PodSet::from_pods([pod("a"), pod("b")], None, "t");
        let st = status(vec![
            // Shared by SM: a 30 + 10, b 60.
            with_counters(
                device(
                    0,
                    100.0,
                    vec![proc(10, 30, 0, 1), proc(11, 10, 0, 1), proc(20, 60, 0, 1)],
                ),
                (1000, 2000),
                (3000.0, 4000.0),
            ),
            // a alone, its SM unknown (an MPS client): all of it is a's.
            with_counters(
                device(1, 100.0, vec![unknown_sm(10, "MPS client")]),
                (500, 0),
                (70.0, 0.0),
            ),
            // Busy moving data while nobody used SM: whose is unknown; what is
            // 0 is 0; power is shared equally (idle draw).
            with_counters(
                device(2, 100.0, vec![proc(10, 0, 0, 1), proc(20, 0, 0, 1)]),
                (500, 0),
                (0.0, 0.0),
            ),
            // Shared, one SM share unknown: nobody's share is known.
            with_counters(
                device(
                    3,
                    100.0,
                    vec![unknown_sm(10, "MPS client"), proc(20, 20, 0, 1)],
                ),
                (500, 600),
                (1.0, 2.0),
            ),
        ]);
        let snap = join(&st, &pods, &table(), SystemTime::UNIX_EPOCH);
        let on = |uid: &str, gpu: u32| {
            snap.pods[uid]
                .gpus
                .iter()
                .find(|g| g.gpu_index == gpu)
                .cloned()
                .expect("uses the GPU")
        };
        let (a0, b0) = (on("a", 0), on("b", 0));
        assert_eq!(
            (
                a0.pcie_tx_kbps,
                a0.pcie_rx_kbps,
                a0.nvlink_tx_mbps,
                a0.nvlink_rx_mbps
            ),
            (
                Reading::Ok(400.0),
                Reading::Ok(800.0),
                Reading::Ok(1200.0),
                Reading::Ok(1600.0)
            )
        );
        assert_eq!(
            (b0.pcie_tx_kbps, b0.nvlink_rx_mbps),
            (Reading::Ok(600.0), Reading::Ok(2400.0))
        );
        let a1 = on("a", 1);
        assert_eq!(
            (a1.pcie_tx_kbps, a1.nvlink_tx_mbps, a1.power_w),
            (Reading::Ok(500.0), Reading::Ok(70.0), Reading::Ok(100.0)),
            "exact for the pod that owns the GPU"
        );
        let (a2, b2) = (on("a", 2), on("b", 2));
        assert!(
            because(&a2.pcie_tx_kbps, "busy, no SM").contains("none of its 2 processes used SM")
        );
        assert!(because(&b2.pcie_tx_kbps, "busy, no SM").contains("GPU 2 PCIe TX"));
        assert_eq!(
            (a2.pcie_rx_kbps, b2.nvlink_tx_mbps),
            (Reading::Ok(0.0), Reading::Ok(0.0))
        );
        assert_eq!(
            (a2.power_w, b2.power_w),
            (Reading::Ok(50.0), Reading::Ok(50.0))
        );
        let b3 = on("b", 3);
        for r in [
            &b3.pcie_tx_kbps,
            &b3.pcie_rx_kbps,
            &b3.nvlink_tx_mbps,
            &b3.power_w,
        ] {
            assert!(
                because(r, "MPS").contains("cannot be split")
                    && because(r, "MPS").contains("MPS client")
            );
        }
        // A GPU without the counter: unavailable with NVML's reason.
        let st = status(vec![device(
            0,
            100.0,
            vec![proc(10, 30, 0, 1), proc(20, 10, 0, 1)],
        )]);
        let snap = join(&st, &pods, &table(), SystemTime::UNIX_EPOCH);
        assert!(because(&snap.pods["a"].gpus[0].nvlink_tx_mbps, "no counter").contains("not read"));
    }

    #[test]
    fn power_is_the_energy_counters_mean_where_there_is_one() {
        let pods = PodSet::from_pods([pod("a"), pod("b")], None, "t");
        let mut dev = device(0, 999.0, vec![proc(10, 30, 0, 1), proc(20, 10, 0, 1)]);
        dev.counters.energy_pass = Reading::Ok(crate::gpu::EnergyPass {
            joules: 150.0,
            seconds: 0.5,
        });
        let snap = join(
            &status(vec![dev.clone()]),
            &pods,
            &table(),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(snap.gpus[0].power_attributed_w, Reading::Ok(300.0));
        assert_eq!(snap.gpus[0].power_source, Some(PowerSource::EnergyCounter));
        assert_eq!(
            snap.gpus[0].power_w,
            Reading::Ok(999.0),
            "the instant is still shown"
        );
        assert_eq!(snap.pods["a"].gpus[0].power_w, Reading::Ok(225.0));
        assert_eq!(snap.pods["b"].gpus[0].power_w, Reading::Ok(75.0));
        dev.counters.energy_pass = Reading::unavailable("no counter");
        let snap = join(&status(vec![dev]), &pods, &table(), SystemTime::UNIX_EPOCH);
        assert_eq!(snap.gpus[0].power_source, Some(PowerSource::Instantaneous));
        assert_eq!(snap.pods["a"].gpus[0].power_w, Reading::Ok(999.0 * 0.75));
    }

    /// A MIG GPU (parent with the board's counters, no processes) and its
    /// instances with their processes.
    fn mig(owners: [u32; 2]) -> Vec<GpuDevice> {
        let mut parent = with_counters(device(0, 300.0, vec![]), (900, 90), (0.0, 0.0));
        parent.mig_enabled = true;
        parent.uuid = "GPU-parent".into();
        let instance = |gi: u32, pid: u32| {
            let r: Arc<str> = "MIG instance: NVML reports this for the whole GPU 0 only".into();
            let mut d = device(0, 0.0, vec![unknown_sm(pid, "MIG: no GPM")]);
            d.uuid = format!("MIG-{gi}");
            d.mig_enabled = true;
            d.power_w = Reading::Unavailable(r.clone());
            d.counters = DeviceCounters {
                pcie_tx_kbps: Reading::Unavailable(r.clone()),
                pcie_rx_kbps: Reading::Unavailable(r.clone()),
                nvlink_tx_mbps: Reading::Unavailable(r.clone()),
                nvlink_rx_mbps: Reading::Unavailable(r.clone()),
                energy_mj: Reading::Unavailable(r.clone()),
                energy_pass: Reading::Unavailable(r),
            };
            d.mig_instance = Some(MigInstance {
                parent_uuid: "GPU-parent".into(),
                gpu_instance_id: gi,
                compute_instance_id: 0,
            });
            d
        };
        vec![parent, instance(1, owners[0]), instance(2, owners[1])]
    }

    #[test]
    fn mig_counters_are_the_whole_gpus_only_a_pod_owning_it_has_them() {
        let pods = PodSet::from_pods([pod("a"), pod("b")], None, "t");
        let snap = join(
            &status(mig([10, 20])),
            &pods,
            &table(),
            SystemTime::UNIX_EPOCH,
        );
        for uid in ["a", "b"] {
            let g = &snap.pods[uid].gpus[0];
            for r in [&g.power_w, &g.pcie_tx_kbps, &g.nvlink_rx_mbps] {
                assert!(because(r, "MIG").contains("whole GPU only"), "{uid}");
            }
        }
        assert!(
            snap.energy[0].pods.is_empty(),
            "no split of a shared MIG board"
        );
        // One pod on both instances owns the board: each entry has half, the
        // pod the whole.
        let snap = join(
            &status(mig([10, 11])),
            &pods,
            &table(),
            SystemTime::UNIX_EPOCH,
        );
        let a = &snap.pods["a"].gpus;
        assert_eq!(a.len(), 2);
        assert!(a.iter().all(|g| g.pcie_tx_kbps == Reading::Ok(450.0)));
        assert_eq!(
            crate::scaler::value::pod_value_on(
                crate::figures::Metric::PcieTxKbps,
                None,
                &snap.pods["a"]
            )
            .expect("the pod owns the GPU"),
            900.0
        );
        let power: f64 = a.iter().filter_map(|g| g.power_w.ok()).sum();
        assert_eq!(power, 300.0);
        let f: f64 = snap.energy[0].pods.iter().map(|s| s.fraction).sum();
        assert_eq!(
            (snap.energy.len(), snap.energy[0].uuid.as_str(), f),
            (1, "GPU-parent", 1.0)
        );
    }

    #[test]
    fn energy_splits_are_fractions_of_each_board() {
        let pods = PodSet::from_pods(
            [
                with_containers("a", &[("server", "c-server", ContainerKind::App)]),
                pod("b"),
            ],
            None,
            "t",
        );
        let t = table();
        t.insert(10, in_container("a", Some("c-server"), false));
        let st = status(vec![
            with_counters(
                device(
                    0,
                    100.0,
                    vec![proc(10, 30, 0, 1), proc(20, 50, 0, 1), proc(30, 20, 0, 1)],
                ),
                (0, 0),
                (0.0, 0.0),
            ),
            with_counters(device(1, 100.0, vec![]), (0, 0), (0.0, 0.0)),
            // a owns GPU 2 with two containers whose shares are unknown: the
            // pod's share is booked under container "".
            with_counters(
                device(2, 100.0, vec![unknown_sm(10, "MPS"), unknown_sm(11, "MPS")]),
                (0, 0),
                (0.0, 0.0),
            ),
        ]);
        let snap = join(&st, &pods, &t, SystemTime::UNIX_EPOCH);
        let shares = |i: usize| {
            snap.energy[i]
                .pods
                .iter()
                .map(|s| (s.pod_uid.as_str(), s.container.as_str(), s.fraction))
                .collect::<Vec<_>>()
        };
        assert_eq!(shares(0), [("a", "server", 0.3), ("b", "", 0.5)]);
        assert_eq!(snap.energy[0].no_pod, 0.2, "the host process's share");
        assert_eq!((snap.energy[1].processes, shares(1).len()), (0, 0));
        assert_eq!(shares(2), [("a", "", 1.0)]);
        assert_eq!(snap.energy[2].counter_mj, Reading::Ok(1_000_000));
    }
}
