//! What accumulates over sampling passes, kept by the sampler's join task:
//! energy per pod (for chargeback and carbon reports) and GPU holders that sit
//! idle.
//!
//! **Energy.** Each pass splits every GPU board's total-energy counter
//! ([`EnergySplit`]: by SM share, the whole of it for a pod that owns the
//! board). The [`Ledger`] applies that split to the counter's increase since
//! the reading it accounted last, so every millijoule the counter reports is
//! booked exactly once: to a pod and container, or as unattributed with the
//! reason ([`Unattributed`]). Per board, pods + unattributed = the counter's
//! increase since the daemon started. A snapshot the join task never saw (two
//! passes published before it ran) costs nothing: the next one books both
//! passes' energy, with the newer pass's split. A counter that goes backwards
//! (driver reloaded) is a new baseline; that interval is booked to nobody.
//! A pod's series lasts as long as the pod: gone from the node, it is
//! forgotten (so a pod series never goes down while it exists).
//!
//! **Idle holders.** A pod holds a GPU while its processes hold memory on it;
//! it is idle while its SM utilization there is at most
//! [`Config::idle_sm_percent`]. How long it has been so is reported from the
//! first idle pass on; it counts as an idle holder after
//! [`Config::idle_after`]. A pass where its SM utilization is unknown (MPS,
//! missing samples on a busy GPU, MIG without GPM) ends the idle time: the
//! daemon never calls a pod idle that it cannot see.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, SystemTime},
};

use crate::snapshot::{
    Accounts, DeviceEnergy, EnergySplit, Holder, NodeSnapshot, PodEnergy, PodUsage, Reading,
    Unattributed, UnattributedEnergy,
};

/// At most this SM utilization counts as idle, percent.
pub const DEFAULT_IDLE_SM_PERCENT: f64 = 1.0;
/// Idle this long, a holder is listed as idle.
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(600);

/// The ledger's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub idle_sm_percent: f64,
    pub idle_after: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            idle_sm_percent: DEFAULT_IDLE_SM_PERCENT,
            idle_after: DEFAULT_IDLE_AFTER,
        }
    }
}

/// Per GPU index (a MIG GPU's instances share one), the memory a pod holds,
/// MiB, and its SM utilization, %: `None` where a figure is unavailable.
fn held(p: &PodUsage) -> BTreeMap<u32, (Option<u64>, Option<f64>)> {
    let mut per_gpu: BTreeMap<u32, (Option<u64>, Option<f64>)> = BTreeMap::new();
    for g in &p.gpus {
        let e = per_gpu.entry(g.gpu_index).or_insert((Some(0), Some(0.0)));
        e.0 = e.0.zip(g.memory_used_mib.ok()).map(|(a, b)| a + b);
        e.1 = e.1.zip(g.sm_util.ok()).map(|(a, b)| a + b);
    }
    per_gpu
}

/// The accumulated state (see the module documentation).
#[derive(Debug)]
pub struct Ledger {
    config: Config,
    /// Per board UUID: the counter reading booked last, mJ.
    counters: HashMap<String, u64>,
    /// (pod uid, container label, GPU index) -> J.
    pods: BTreeMap<(String, String, u32), f64>,
    /// (GPU index, board UUID, reason) -> J.
    unattributed: BTreeMap<(u32, String, Unattributed), f64>,
    /// (GPU index, board UUID) -> (J booked, counter resets).
    devices: BTreeMap<(u32, String), (f64, u64)>,
    /// (pod uid, GPU index) -> when its idle time began (sample time).
    idle_since: HashMap<(String, u32), SystemTime>,
}

impl Ledger {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            counters: HashMap::new(),
            pods: BTreeMap::new(),
            unattributed: BTreeMap::new(),
            devices: BTreeMap::new(),
            idle_since: HashMap::new(),
        }
    }

    /// Books `snap`'s energy and idle time and sets its [`Accounts`]. Called
    /// with every snapshot the join makes, in order; one that re-joins the
    /// GPU pass of the previous one (the pods changed) books no energy.
    pub fn record(&mut self, snap: &mut NodeSnapshot) {
        for split in &snap.energy {
            self.book(split, snap);
        }
        self.pods
            .retain(|(uid, _, _), _| snap.pods.contains_key(uid));
        self.idle(snap);
        snap.accounts = std::sync::Arc::new(self.accounts(snap));
    }

    fn book(&mut self, split: &EnergySplit, snap: &NodeSnapshot) {
        let Reading::Ok(mj) = split.counter_mj else {
            return;
        };
        if split.uuid.is_empty() {
            return;
        }
        let board = (split.gpu_index, split.uuid.clone());
        let device = self.devices.entry(board.clone()).or_insert((0.0, 0));
        for reason in Unattributed::ALL {
            self.unattributed
                .entry((board.0, board.1.clone(), reason))
                .or_insert(0.0);
        }
        let Some(prev) = self.counters.insert(split.uuid.clone(), mj) else {
            return;
        };
        if mj < prev {
            device.1 += 1;
            tracing::warn!(
                gpu = split.gpu_index,
                uuid = %split.uuid,
                from_mj = prev,
                to_mj = mj,
                "energy counter went backwards (driver reloaded?): new baseline, the interval is booked to nobody"
            );
            return;
        }
        if mj == prev {
            return;
        }
        let joules = (mj - prev) as f64 / 1000.0;
        device.0 += joules;
        let mut booked = 0.0;
        for share in &split.pods {
            if !snap.pods.contains_key(&share.pod_uid) {
                continue;
            }
            let j = joules * share.fraction;
            *self
                .pods
                .entry((
                    share.pod_uid.clone(),
                    share.container.clone(),
                    split.gpu_index,
                ))
                .or_insert(0.0) += j;
            booked += j;
        }
        let no_pod = (joules * split.no_pod).min(joules - booked).max(0.0);
        // Whatever the split did not give away: rounding leaves at most a few
        // ulps either side, never a negative booking (counters only grow).
        let rest = (joules - booked - no_pod).max(0.0);
        let rest_reason = if split.processes == 0 && split.processes_listed {
            Unattributed::NoProcess
        } else {
            Unattributed::Unsplit
        };
        for (reason, j) in [(Unattributed::NoPod, no_pod), (rest_reason, rest)] {
            *self
                .unattributed
                .entry((board.0, board.1.clone(), reason))
                .or_insert(0.0) += j;
        }
    }

    fn idle(&mut self, snap: &NodeSnapshot) {
        self.idle_since
            .retain(|(uid, _), _| snap.pods.contains_key(uid));
        let Some(at) = snap.samples_taken_at else {
            return;
        };
        for (uid, p) in &snap.pods {
            for (gpu, (mem, sm)) in held(p) {
                let key = (uid.clone(), gpu);
                match (mem, sm) {
                    (Some(m), Some(s)) if m > 0 && s <= self.config.idle_sm_percent => {
                        self.idle_since.entry(key).or_insert(at);
                    }
                    _ => {
                        self.idle_since.remove(&key);
                    }
                }
            }
        }
        // GPUs a pod no longer uses end its idle time there.
        self.idle_since.retain(|(uid, gpu), _| {
            snap.pods
                .get(uid)
                .is_some_and(|p| p.gpus.iter().any(|g| g.gpu_index == *gpu))
        });
    }

    fn accounts(&self, snap: &NodeSnapshot) -> Accounts {
        let name = |uid: &str| {
            snap.pods
                .get(uid)
                .map(|p| (p.pod.namespace.clone(), p.pod.name.clone()))
                .unwrap_or_default()
        };
        let pod_energy = self
            .pods
            .iter()
            .map(|((uid, container, gpu), j)| {
                let (namespace, pod) = name(uid);
                PodEnergy {
                    pod_uid: uid.clone(),
                    namespace,
                    pod,
                    container: container.clone(),
                    gpu: *gpu,
                    joules: *j,
                }
            })
            .collect();
        let unattributed_energy = self
            .unattributed
            .iter()
            .map(|((gpu, uuid, reason), j)| UnattributedEnergy {
                gpu: *gpu,
                uuid: uuid.clone(),
                reason: *reason,
                joules: *j,
            })
            .collect();
        let device_energy = self
            .devices
            .iter()
            .map(|((gpu, uuid), (j, resets))| DeviceEnergy {
                gpu: *gpu,
                uuid: uuid.clone(),
                joules: *j,
                resets: *resets,
            })
            .collect();
        let mut holders = Vec::new();
        if let Some(at) = snap.samples_taken_at {
            for (uid, p) in &snap.pods {
                for (gpu, (mem, sm)) in held(p) {
                    let (Some(m), Some(s)) = (mem, sm) else {
                        continue;
                    };
                    if m == 0 {
                        continue;
                    }
                    let idle_s = self
                        .idle_since
                        .get(&(uid.clone(), gpu))
                        .map_or(0.0, |since| {
                            at.duration_since(*since).unwrap_or_default().as_secs_f64()
                        });
                    holders.push(Holder {
                        pod_uid: uid.clone(),
                        namespace: p.pod.namespace.clone(),
                        pod: p.pod.name.clone(),
                        gpu,
                        memory_used_mib: m,
                        sm_percent: s,
                        idle_s,
                        idle: self.idle_since.contains_key(&(uid.clone(), gpu))
                            && idle_s >= self.config.idle_after.as_secs_f64(),
                    });
                }
            }
        }
        Accounts {
            pod_energy,
            unattributed_energy,
            device_energy,
            holders,
            idle_sm_percent: self.config.idle_sm_percent,
            idle_after_s: self.config.idle_after.as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::{
        gpu::{DeviceCounters, GpuDevice, GpuProcess},
        join::{
            join,
            tests::{device, pod, proc, status, table},
        },
        pods::PodSet,
    };

    /// GPU 0 at `mj` on its counter with processes of a (pids 10, 11), b (20)
    /// and the host (30), by SM 30:10:40:20; samples taken at second `at`.
    fn pass(mj: u64, at: u64, processes: Vec<GpuProcess>, pods: &[&str]) -> NodeSnapshot {
        let mut d: GpuDevice = device(0, 100.0, processes);
        d.counters = DeviceCounters {
            energy_mj: Reading::Ok(mj),
            ..DeviceCounters::default()
        };
        let mut st = status(vec![d]);
        if let Some(s) = st.last_good.as_mut() {
            std::sync::Arc::make_mut(s).taken_at = UNIX_EPOCH + Duration::from_secs(at);
        }
        let pods = PodSet::from_pods(pods.iter().map(|p| pod(p)), None, "t");
        join(&st, &pods, &table(), UNIX_EPOCH)
    }

    fn busy() -> Vec<GpuProcess> {
        vec![
            proc(10, 30, 0, 100),
            proc(11, 10, 0, 100),
            proc(20, 40, 0, 100),
            proc(30, 20, 0, 100),
        ]
    }

    fn joules(a: &Accounts, uid: &str) -> f64 {
        a.pod_energy
            .iter()
            .filter(|e| e.pod_uid == uid)
            .map(|e| e.joules)
            .sum()
    }

    fn unattributed(a: &Accounts, reason: Unattributed) -> f64 {
        a.unattributed_energy
            .iter()
            .filter(|e| e.reason == reason)
            .map(|e| e.joules)
            .sum()
    }

    /// Pods + unattributed = what the counter rose by, per board.
    fn balanced(a: &Accounts) {
        let pods: f64 = a.pod_energy.iter().map(|e| e.joules).sum();
        let rest: f64 = a.unattributed_energy.iter().map(|e| e.joules).sum();
        let device: f64 = a.device_energy.iter().map(|e| e.joules).sum();
        assert!(
            (pods + rest - device).abs() < 1e-9,
            "{pods} + {rest} != {device}"
        );
    }

    #[test]
    fn energy_is_booked_once_per_counter_increase_and_adds_up() {
        let mut ledger = Ledger::new(Config::default());
        let mut snap = pass(5_000_000, 1, busy(), &["a", "b"]);
        ledger.record(&mut snap);
        assert!(
            snap.accounts.pod_energy.is_empty(),
            "the first reading is the baseline"
        );
        assert_eq!(
            snap.accounts.unattributed_energy.len(),
            3,
            "every reason, at 0"
        );
        let mut snap = pass(5_300_000, 2, busy(), &["a", "b"]);
        ledger.record(&mut snap);
        let a = snap.accounts.clone();
        assert_eq!((joules(&a, "a"), joules(&a, "b")), (120.0, 120.0));
        assert_eq!(unattributed(&a, Unattributed::NoPod), 60.0);
        assert_eq!(a.device_energy[0].joules, 300.0);
        balanced(&a);
        // The same pass joined again (the pods changed) books nothing.
        let mut again = pass(5_300_000, 2, busy(), &["a", "b"]);
        ledger.record(&mut again);
        assert_eq!(again.accounts.device_energy[0].joules, 300.0);
        // Passes the ledger did not see are booked by the next one it sees.
        let mut snap = pass(5_900_000, 4, busy(), &["a", "b"]);
        ledger.record(&mut snap);
        assert_eq!(joules(&snap.accounts, "a"), 360.0);
        // A counter that went backwards is a new baseline, booked to nobody.
        let mut snap = pass(1_000, 5, busy(), &["a", "b"]);
        ledger.record(&mut snap);
        assert_eq!(snap.accounts.device_energy[0].resets, 1);
        assert_eq!(joules(&snap.accounts, "a"), 360.0);
        // A GPU without processes: its draw is nobody's.
        let mut snap = pass(101_000, 6, vec![], &["a", "b"]);
        ledger.record(&mut snap);
        assert_eq!(unattributed(&snap.accounts, Unattributed::NoProcess), 100.0);
        // One whose process list cannot be read is not known to be idle.
        let mut unlisted = pass(111_000, 6, vec![], &["a", "b"]);
        unlisted.energy[0].processes_listed = false;
        ledger.record(&mut unlisted);
        assert_eq!(
            unattributed(&unlisted.accounts, Unattributed::NoProcess),
            100.0
        );
        assert_eq!(
            unattributed(&unlisted.accounts, Unattributed::Unsplit),
            10.0
        );
        // Shares that cannot be split (an MPS client beside another pod).
        let mut mps = busy();
        mps[0].sm_util = Reading::unavailable("MPS client");
        let mut snap = pass(161_000, 7, mps, &["a", "b"]);
        ledger.record(&mut snap);
        assert_eq!(unattributed(&snap.accounts, Unattributed::Unsplit), 60.0);
        assert_eq!(joules(&snap.accounts, "a"), 360.0);
        balanced(&snap.accounts);
        let names: Vec<_> = snap
            .accounts
            .pod_energy
            .iter()
            .map(|e| (e.namespace.as_str(), e.pod.as_str(), e.gpu))
            .collect();
        assert_eq!(names, [("ml", "a", 0), ("ml", "b", 0)]);
        // A pod gone from the node is forgotten; its energy stays booked in
        // the device total.
        let mut snap = pass(161_000, 8, busy(), &["b"]);
        ledger.record(&mut snap);
        assert_eq!(joules(&snap.accounts, "a"), 0.0);
        assert!(snap.accounts.pod_energy.iter().all(|e| e.pod_uid == "b"));
    }

    #[test]
    fn idle_holders_hold_memory_at_no_sm_for_long_enough() {
        let config = Config {
            idle_sm_percent: 1.0,
            idle_after: Duration::from_secs(600),
        };
        let mut ledger = Ledger::new(config);
        let procs = |sm_a: Option<u32>| {
            let mut a = proc(10, sm_a.unwrap_or(0), 0, 4096);
            if sm_a.is_none() {
                a.sm_util = Reading::unavailable("MPS client");
            }
            // b holds no memory: never a holder.
            vec![a, proc(20, 0, 0, 0)]
        };
        let holder = |snap: &NodeSnapshot| {
            snap.accounts
                .holders
                .iter()
                .find(|h| h.pod == "a")
                .map(|h| (h.idle_s, h.idle))
        };
        let mut at = |t: u64, sm: Option<u32>| {
            let mut snap = pass(1, t, procs(sm), &["a", "b"]);
            ledger.record(&mut snap);
            snap
        };
        assert_eq!(holder(&at(100, Some(0))), Some((0.0, false)));
        assert_eq!(holder(&at(400, Some(1))), Some((300.0, false)));
        let snap = at(700, Some(0));
        assert_eq!(holder(&snap), Some((600.0, true)));
        assert!(snap.accounts.holders.iter().all(|h| h.pod != "b"));
        // Busy again: its idle time ends.
        assert_eq!(holder(&at(710, Some(50))), Some((0.0, false)));
        assert_eq!(holder(&at(720, Some(0))), Some((0.0, false)));
        // Unknown SM: not listed, and the idle time starts over.
        assert_eq!(holder(&at(1400, None)), None);
        assert_eq!(holder(&at(1410, Some(0))), Some((0.0, false)));
        assert_eq!(snap.accounts.idle_after_s, 600.0);
    }
}
