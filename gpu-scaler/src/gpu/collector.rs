//! One sampling pass: asks a [`Driver`] NVML's questions and turns the answers
//! into a [`GpuSnapshot`].
//!
//! Both sources go through this code: `nvml` with the real library behind
//! nvml-wrapper, `mock` with a scenario file answering the same calls. So the
//! rules below (lastSeen, samples over 100 %, MIG, lost devices) are written once
//! and the mock behaves as NVML would for the same scenario.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::SystemTime,
};

use nvml_wrapper::{
    enums::device::UsedGpuMemory,
    error::NvmlError,
    struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample},
};

use super::{Error, GpuDevice, GpuProcess, GpuSnapshot, ProcessKind, Reading, Result};

pub(crate) type NvResult<T> = std::result::Result<T, NvmlError>;

/// NVML's library-level calls.
pub(crate) trait Driver {
    /// `nvmlDeviceGetCount_v2`.
    fn device_count(&mut self) -> NvResult<u32>;
    /// `nvmlDeviceGetHandleByIndex_v2`.
    fn device(&self, index: u32) -> NvResult<Box<dyn DriverDevice + '_>>;
}

/// NVML's per-device calls, in NVML's units (bytes, milliwatts).
pub(crate) trait DriverDevice {
    fn uuid(&self) -> NvResult<String>;
    fn name(&self) -> NvResult<String>;
    /// (SM %, memory-controller %).
    fn utilization(&self) -> NvResult<(u32, u32)>;
    /// (used, total) bytes.
    fn memory(&self) -> NvResult<(u64, u64)>;
    fn temperature(&self) -> NvResult<u32>;
    fn power_mw(&self) -> NvResult<u32>;
    fn power_limit_mw(&self) -> NvResult<u32>;
    fn mig_enabled(&self) -> NvResult<bool>;
    fn processes(&self, kind: ProcessKind) -> NvResult<Vec<ProcessInfo>>;
    /// `nvmlDeviceGetProcessUtilization(lastSeen)`.
    fn samples(&self, last_seen_us: u64) -> NvResult<Vec<ProcessUtilizationSample>>;
}

const MIB: u64 = 1024 * 1024;

/// (SM %, memory-controller %) per pid over one pass.
type UtilByPid = HashMap<u32, (Reading<u32>, Reading<u32>)>;

/// What a device was called the last time NVML told us.
#[derive(Clone, Debug)]
struct Identity {
    index: u32,
    uuid: String,
    name: String,
}

/// State kept between passes.
#[derive(Debug, Default)]
pub(crate) struct Collector {
    /// Newest process-utilization sample timestamp per device UUID: NVML's
    /// lastSeen, so no sample is counted in two passes.
    last_seen: HashMap<String, u64>,
    /// Every device ever enumerated, by UUID. One that stops being enumerated
    /// (fell off the bus and was dropped by the driver) is reported as lost
    /// rather than silently vanishing with its pods' usage.
    seen: BTreeMap<String, Identity>,
    by_index: HashMap<u32, Identity>,
}

impl Collector {
    pub(crate) fn pass(&mut self, driver: &mut dyn Driver) -> Result<GpuSnapshot> {
        let count = driver.device_count().map_err(|source| Error::Nvml {
            call: "nvmlDeviceGetCount_v2",
            source,
        })?;
        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = match driver.device(index) {
                Ok(dev) => self.device(index, &*dev),
                Err(e) => self.unreadable(index, &format!("nvmlDeviceGetHandleByIndex_v2: {e}")),
            };
            devices.push(device);
        }
        let present: HashSet<&str> = devices.iter().map(|d| d.uuid.as_str()).collect();
        let vanished: Vec<GpuDevice> = self
            .seen
            .values()
            .filter(|id| !present.contains(id.uuid.as_str()))
            .map(|id| lost_device(id, "no longer enumerated by NVML (fell off the bus?)"))
            .collect();
        devices.extend(vanished);
        Ok(GpuSnapshot {
            taken_at: SystemTime::now(),
            devices,
        })
    }

    /// A device whose handle NVML would not give: every figure is unavailable.
    fn unreadable(&self, index: u32, reason: &str) -> GpuDevice {
        let id = self.by_index.get(&index).cloned().unwrap_or(Identity {
            index,
            uuid: String::new(),
            name: String::new(),
        });
        lost_device(&Identity { index, ..id }, reason)
    }

    fn device(&mut self, index: u32, dev: &dyn DriverDevice) -> GpuDevice {
        let known = self.by_index.get(&index);
        let uuid = dev.uuid();
        let name = dev.name();
        let identity = Identity {
            index,
            uuid: match &uuid {
                Ok(u) => u.clone(),
                Err(_) => known.map(|k| k.uuid.clone()).unwrap_or_default(),
            },
            name: match &name {
                Ok(n) => n.clone(),
                Err(_) => known.map(|k| k.name.clone()).unwrap_or_default(),
            },
        };
        if uuid.is_ok() {
            self.seen.insert(identity.uuid.clone(), identity.clone());
            self.by_index.insert(index, identity.clone());
        }

        let (sm_util, mem_util) = match dev.utilization() {
            Ok((sm, mem)) => (Reading::Ok(sm), Reading::Ok(mem)),
            Err(e) => {
                let r = unavailable("nvmlDeviceGetUtilizationRates", &e);
                (r.clone(), r)
            }
        };
        let (memory_used_mib, memory_total_mib) = match dev.memory() {
            Ok((used, total)) => (Reading::Ok(used / MIB), Reading::Ok(total / MIB)),
            Err(e) => {
                let r = unavailable("nvmlDeviceGetMemoryInfo_v2", &e);
                (r.clone(), r)
            }
        };
        let mig = dev.mig_enabled();
        let (processes, processes_error) = self.processes(&identity.uuid, dev, &mig);
        GpuDevice {
            index,
            uuid: identity.uuid,
            name: identity.name,
            sm_util,
            mem_util,
            memory_used_mib,
            memory_total_mib,
            temperature_c: reading("nvmlDeviceGetTemperature", dev.temperature()),
            power_w: reading("nvmlDeviceGetPowerUsage", dev.power_mw().map(watts)),
            power_limit_w: reading(
                "nvmlDeviceGetEnforcedPowerLimit",
                dev.power_limit_mw().map(watts),
            ),
            mig_enabled: matches!(mig, Ok(true)),
            processes,
            processes_error,
        }
    }

    fn processes(
        &mut self,
        uuid: &str,
        dev: &dyn DriverDevice,
        mig: &NvResult<bool>,
    ) -> (Vec<GpuProcess>, Option<Arc<str>>) {
        // One entry per (pid, GPU instance): a process with both a compute and a
        // graphics context is listed twice by NVML, with the same memory figure,
        // and its utilization samples are per pid.
        let mut listed: BTreeMap<(u32, Option<u32>), (ProcessKind, Reading<u64>)> = BTreeMap::new();
        for (kind, call) in [
            (
                ProcessKind::Compute,
                "nvmlDeviceGetComputeRunningProcesses_v3",
            ),
            (
                ProcessKind::Mps,
                "nvmlDeviceGetMPSComputeRunningProcesses_v3",
            ),
            (
                ProcessKind::Graphics,
                "nvmlDeviceGetGraphicsRunningProcesses_v3",
            ),
        ] {
            let list = match dev.processes(kind) {
                Ok(list) => list,
                // MPS and graphics lists are missing from older drivers and
                // unsupported on some boards; there are then no such processes to
                // miss. The compute list has no such excuse.
                Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_))
                    if kind != ProcessKind::Compute =>
                {
                    continue;
                }
                Err(e) => return (Vec::new(), Some(format!("{call}: {e}").into())),
            };
            for p in list {
                let memory = match p.used_gpu_memory {
                    UsedGpuMemory::Used(bytes) => Reading::Ok(bytes / MIB),
                    UsedGpuMemory::Unavailable => {
                        Reading::unavailable(format!("{call}: NVML reports no memory figure"))
                    }
                };
                listed
                    .entry((p.pid, p.gpu_instance_id))
                    .and_modify(|(_, m)| *m = larger(m, &memory))
                    .or_insert((kind, memory));
            }
        }

        let utilization = match mig {
            Ok(true) => Err(Arc::<str>::from(
                "MIG device: NVML reports no per-process utilization",
            )),
            Ok(false) | Err(NvmlError::NotSupported) => self.utilization(uuid, dev),
            Err(e) => Err(format!("nvmlDeviceGetMigMode: {e}").into()),
        };
        let processes = listed
            .into_iter()
            .map(|((pid, gpu_instance_id), (kind, used_memory_mib))| {
                let (sm_util, mem_util) = match &utilization {
                    Err(reason) => (
                        Reading::Unavailable(reason.clone()),
                        Reading::Unavailable(reason.clone()),
                    ),
                    // No samples since the previous pass: the process was idle.
                    Ok(by_pid) => by_pid
                        .get(&pid)
                        .cloned()
                        .unwrap_or((Reading::Ok(0), Reading::Ok(0))),
                };
                GpuProcess {
                    pid,
                    kind,
                    used_memory_mib,
                    sm_util,
                    mem_util,
                    gpu_instance_id,
                }
            })
            .collect();
        (processes, None)
    }

    /// Per-pid utilization from the samples newer than this device's lastSeen.
    /// Samples of pids NVML does not list are dropped with them: the sampler
    /// only attributes listed processes.
    fn utilization(
        &mut self,
        uuid: &str,
        dev: &dyn DriverDevice,
    ) -> std::result::Result<UtilByPid, Arc<str>> {
        let last_seen = self.last_seen.get(uuid).copied().unwrap_or(0);
        let samples = match dev.samples(last_seen) {
            Ok(samples) => samples,
            // NVML's way of saying "no samples since lastSeen".
            Err(NvmlError::NotFound) => Vec::new(),
            Err(e) => return Err(format!("nvmlDeviceGetProcessUtilization: {e}").into()),
        };
        let (by_pid, newest) = aggregate(&samples, last_seen);
        if newest > last_seen && !uuid.is_empty() {
            self.last_seen.insert(uuid.to_owned(), newest);
        }
        Ok(by_pid)
    }
}

/// Running sums of one pid's samples for one figure.
#[derive(Clone, Copy, Debug, Default)]
struct Mean {
    sum: u64,
    n: u32,
    over_100: u32,
}

impl Mean {
    fn add(&mut self, v: u32) {
        if v > 100 {
            self.over_100 += 1;
        } else {
            self.sum += u64::from(v);
            self.n += 1;
        }
    }

    fn reading(self) -> Reading<u32> {
        if self.n == 0 {
            return Reading::unavailable(format!("all {} samples were over 100 %", self.over_100));
        }
        let n = u64::from(self.n);
        // Round to nearest; the mean of values <= 100 fits in u32.
        Reading::Ok(((self.sum + n / 2) / n) as u32)
    }
}

/// Folds the samples newer than `last_seen` into one figure per pid: the mean
/// of its samples, leaving out values over 100 % (a driver glitch, not load).
/// Some drivers return older samples whatever lastSeen says; they are skipped
/// here so nothing is counted twice. Returns the newest timestamp seen.
fn aggregate(samples: &[ProcessUtilizationSample], last_seen: u64) -> (UtilByPid, u64) {
    let mut sums: HashMap<u32, (Mean, Mean)> = HashMap::new();
    let mut newest = last_seen;
    for s in samples.iter().filter(|s| s.timestamp > last_seen) {
        newest = newest.max(s.timestamp);
        let (sm, mem) = sums.entry(s.pid).or_default();
        sm.add(s.sm_util);
        mem.add(s.mem_util);
    }
    let by_pid = sums
        .into_iter()
        .map(|(pid, (sm, mem))| (pid, (sm.reading(), mem.reading())))
        .collect();
    (by_pid, newest)
}

fn larger(a: &Reading<u64>, b: &Reading<u64>) -> Reading<u64> {
    match (a, b) {
        (Reading::Ok(x), Reading::Ok(y)) => Reading::Ok(*x.max(y)),
        (Reading::Ok(_), _) => a.clone(),
        _ => b.clone(),
    }
}

fn watts(mw: u32) -> f64 {
    f64::from(mw) / 1000.0
}

fn unavailable<T>(call: &str, e: &NvmlError) -> Reading<T> {
    Reading::unavailable(format!("{call}: {e}"))
}

fn reading<T>(call: &str, r: NvResult<T>) -> Reading<T> {
    match r {
        Ok(v) => Reading::Ok(v),
        Err(e) => unavailable(call, &e),
    }
}

fn lost_device(id: &Identity, reason: &str) -> GpuDevice {
    let r: Arc<str> = reason.into();
    GpuDevice {
        index: id.index,
        uuid: id.uuid.clone(),
        name: id.name.clone(),
        sm_util: Reading::Unavailable(r.clone()),
        mem_util: Reading::Unavailable(r.clone()),
        memory_used_mib: Reading::Unavailable(r.clone()),
        memory_total_mib: Reading::Unavailable(r.clone()),
        temperature_c: Reading::Unavailable(r.clone()),
        power_w: Reading::Unavailable(r.clone()),
        power_limit_w: Reading::Unavailable(r.clone()),
        mig_enabled: false,
        processes: Vec::new(),
        processes_error: Some(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32, timestamp: u64, sm_util: u32, mem_util: u32) -> ProcessUtilizationSample {
        ProcessUtilizationSample {
            pid,
            timestamp,
            sm_util,
            mem_util,
            enc_util: 0,
            dec_util: 0,
        }
    }

    #[test]
    fn several_samples_of_one_pid_become_their_mean() {
        let (by_pid, newest) = aggregate(
            &[
                sample(1, 10, 40, 10),
                sample(1, 20, 61, 20),
                sample(2, 15, 5, 0),
            ],
            0,
        );
        assert_eq!(newest, 20);
        assert_eq!(by_pid[&1], (Reading::Ok(51), Reading::Ok(15)));
        assert_eq!(by_pid[&2], (Reading::Ok(5), Reading::Ok(0)));
    }

    #[test]
    fn samples_not_newer_than_last_seen_are_skipped() {
        let (by_pid, newest) = aggregate(&[sample(1, 10, 90, 90), sample(1, 20, 30, 30)], 10);
        assert_eq!(newest, 20);
        assert_eq!(by_pid[&1], (Reading::Ok(30), Reading::Ok(30)));
        let (by_pid, newest) = aggregate(&[sample(1, 10, 90, 90)], 20);
        assert!(by_pid.is_empty());
        assert_eq!(newest, 20, "lastSeen never goes backwards");
    }

    #[test]
    fn values_over_100_are_dropped_and_never_become_a_figure() {
        let (by_pid, _) = aggregate(
            &[
                sample(1, 1, 250, 10),
                sample(1, 2, 50, 10),
                sample(2, 3, 101, 7),
            ],
            0,
        );
        assert_eq!(by_pid[&1].0, Reading::Ok(50));
        assert!(
            matches!(&by_pid[&2].0, Reading::Unavailable(r) if r.contains("over 100")),
            "{:?}",
            by_pid[&2]
        );
        assert_eq!(
            by_pid[&2].1,
            Reading::Ok(7),
            "the valid figure of the sample stays"
        );
    }

    #[test]
    fn merged_memory_prefers_a_figure_and_the_larger_one() {
        let na = Reading::unavailable("n/a");
        assert_eq!(larger(&Reading::Ok(3), &Reading::Ok(5)), Reading::Ok(5));
        assert_eq!(larger(&na, &Reading::Ok(5)), Reading::Ok(5));
        assert_eq!(larger(&Reading::Ok(3), &na), Reading::Ok(3));
    }
}
