//! One sampling pass: asks a [`Driver`] NVML's questions and turns the answers
//! into a [`GpuSnapshot`].
//!
//! Both sources go through this code: `nvml` with the real library behind
//! nvml-wrapper, `mock` with a scenario file answering the same calls. So the
//! rules below are written once and the mock behaves as NVML would for the
//! same scenario. They follow what real drivers do (issue 11; nvml.h; NVIDIA's
//! MPS and MIG guides):
//!
//! - **Samples.** `nvmlDeviceGetProcessUtilization` (or the R550+
//!   `nvmlDeviceGetProcessesUtilizationInfo`) returns only samples newer than
//!   lastSeen, and the driver samples every 1/6 s to 1 s: a 1 s poll can find
//!   no new sample for a busy process. A process keeps its last sample while
//!   that is younger than [`HOLD_INTERVALS`] poll intervals. A process with no
//!   sample reads 0 (idle) only when the processes that have one account for
//!   the GPU's own utilization (within [`IDLE_SLACK_PERCENT`] points);
//!   otherwise it is unavailable: a busy GPU is never read as idle pods.
//!   Timestamps are wall-clock microseconds: a lastSeen in the future (the
//!   clock stepped back) is reset, and samples from the future are ignored.
//! - **MPS.** Samples carry the MPS server's pid; the clients are listed by the
//!   MPS list with their memory only. Clients' memory is exact; their SM and
//!   memory-controller figures are unavailable (NVML does not split them),
//!   and so is the server's own, so that the host process running the server
//!   never absorbs its clients' load.
//! - **MIG.** No utilization per process or per instance through those calls;
//!   the parent handle's memory and process queries need a privilege. Each
//!   MIG instance is reported as a device of its own (its memory, its
//!   processes, per-instance handles need no privilege); its SM activity comes
//!   from GPM where the GPU has it.
//! - **Lists.** A process that starts between the size query and the fill
//!   makes the fill answer INSUFFICIENT_SIZE: the call is retried with a fresh
//!   size.
//! - **Loss.** A device that answers GPU_IS_LOST, or a library that answers
//!   UNINITIALIZED (after a driver reload), asks the source to initialise NVML
//!   again ([`Collector::take_reinit`]). A device no longer enumerated is
//!   reported lost for [`FORGET_LOST_AFTER`], then forgotten.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use nvml_wrapper::{
    enums::device::UsedGpuMemory,
    error::NvmlError,
    struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample},
};

use super::{
    DeviceCounters, Error, GpuDevice, GpuProcess, GpuSnapshot, MigInstance, ProcessKind, Reading,
    Result, driver_version,
};

pub(crate) type NvResult<T> = std::result::Result<T, NvmlError>;

/// NVML's library-level calls.
pub(crate) trait Driver {
    /// `nvmlSystemGetDriverVersion`.
    fn driver_version(&self) -> NvResult<String>;
    /// `nvmlDeviceGetCount_v2`.
    fn device_count(&self) -> NvResult<u32>;
    /// `nvmlDeviceGetHandleByIndex_v2`.
    fn device(&self, index: u32) -> NvResult<Box<dyn DriverDevice + '_>>;
    /// `nvmlSystemGetProcessName`.
    fn process_name(&self, pid: u32) -> NvResult<String>;
}

/// Process-utilization samples (NOT_FOUND: none since lastSeen) and the NVML
/// call that answered.
pub(crate) struct Samples {
    pub call: &'static str,
    pub samples: NvResult<Vec<ProcessUtilizationSample>>,
}

/// NVML's per-device calls, in NVML's units (bytes, milliwatts, KB/s, KiB, mJ).
/// A MIG instance handle answers the same calls for its instance.
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
    /// One list call (nvml-wrapper's size query and fill).
    fn processes(&self, kind: ProcessKind) -> NvResult<Vec<ProcessInfo>>;
    /// Samples newer than `last_seen_us`, through
    /// `nvmlDeviceGetProcessesUtilizationInfo` where the driver has it and
    /// `nvmlDeviceGetProcessUtilization` otherwise.
    fn samples(&self, last_seen_us: u64) -> Samples;
    /// PCIe (TX, RX) KB/s.
    fn pcie_kbps(&self) -> NvResult<(u32, u32)>;
    /// Cumulative NVLink (TX, RX) KiB over all links and the counters'
    /// timestamp in µs.
    fn nvlink_kib(&self) -> NvResult<(u64, u64, u64)>;
    /// Total energy since the driver loaded, mJ, and when it was read, µs on
    /// the pass clock.
    fn energy_mj(&self) -> NvResult<(u64, u64)>;
    /// Handles of the MIG instances of this GPU (MIG mode only).
    fn mig_instances(&self) -> NvResult<Vec<Box<dyn DriverDevice + '_>>>;
    /// (GPU instance id, compute instance id) of a MIG instance handle.
    fn instance_ids(&self) -> NvResult<(u32, u32)>;
    /// SM activity % of a MIG instance handle over the last pass, from GPM.
    fn gpm_sm_util(&self) -> NvResult<u32>;
}

const MIB: u64 = 1024 * 1024;

/// A sample is kept for a process without a new one for this many poll
/// intervals.
pub(crate) const HOLD_INTERVALS: u32 = 3;

/// How many points of the GPU's own utilization the sampled processes may
/// leave unexplained before processes without a sample count as unknown
/// rather than idle. Device and process figures are averaged over slightly
/// different windows.
pub(crate) const IDLE_SLACK_PERCENT: u32 = 10;

/// A device no longer enumerated is reported lost this long, then forgotten
/// (documented in docs/troubleshooting.md).
pub(crate) const FORGET_LOST_AFTER: Duration = Duration::from_secs(600);

/// Samples up to this far ahead of the host clock are taken as clock skew
/// between the driver's and our reading; later ones are from a clock that
/// stepped back since.
const FUTURE_SLACK_US: u64 = 5_000_000;

/// How often a list call is repeated when a process appeared between its size
/// query and its fill.
const LIST_RETRIES: u32 = 3;

/// The MPS server's process name (`/proc/<pid>/comm` truncates it to
/// `nvidia-cuda-mps`; NVML gives the full path).
const MPS_SERVER: &str = "nvidia-cuda-mps";

/// One figure pair of one process.
#[derive(Clone, Debug)]
struct Held {
    sm: Reading<u32>,
    mem: Reading<u32>,
    /// Timestamp of its newest sample, µs.
    at_us: u64,
}

/// (SM %, memory-controller %) per pid over one pass, with the newest sample's
/// timestamp.
type UtilByPid = HashMap<u32, Held>;

/// What a device was called the last time NVML told us.
#[derive(Clone, Debug)]
struct Identity {
    index: u32,
    uuid: String,
    name: String,
    mig_instance: Option<MigInstance>,
}

/// A device ever enumerated.
#[derive(Debug)]
struct Seen {
    id: Identity,
    /// When it stopped being enumerated.
    vanished_since: Option<Instant>,
}

/// Per-device state kept between passes, by UUID.
#[derive(Debug, Default)]
struct DeviceState {
    /// NVML's lastSeen: newest sample timestamp, so no sample is counted twice.
    last_seen: u64,
    /// Each process's last sample.
    held: HashMap<u32, Held>,
    /// Previous NVLink counters (TX KiB, RX KiB, at µs).
    nvlink: Option<(u64, u64, u64)>,
    /// Previous total-energy counter (mJ, read at µs).
    energy: Option<(u64, u64)>,
}

/// State kept between passes.
#[derive(Debug)]
pub(crate) struct Collector {
    hold_us: u64,
    forget_after: Duration,
    /// The driver version passed the gate since NVML was last initialised.
    version_checked: bool,
    /// A device or the library asked for NVML to be initialised again.
    reinit: bool,
    state: HashMap<String, DeviceState>,
    /// Every device ever enumerated, by UUID. One that stops being enumerated
    /// (fell off the bus and was dropped by the driver) is reported as lost
    /// rather than silently vanishing with its pods' usage.
    seen: BTreeMap<String, Seen>,
    by_index: HashMap<u32, Identity>,
}

impl Default for Collector {
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
    }
}

impl Collector {
    /// State for a source polled every `poll_interval`.
    pub(crate) fn new(poll_interval: Duration) -> Self {
        Self {
            hold_us: u64::try_from((poll_interval * HOLD_INTERVALS).as_micros())
                .unwrap_or(u64::MAX),
            forget_after: FORGET_LOST_AFTER,
            version_checked: false,
            reinit: false,
            state: HashMap::new(),
            seen: BTreeMap::new(),
            by_index: HashMap::new(),
        }
    }

    /// Forget devices no longer enumerated after `after` instead of
    /// [`FORGET_LOST_AFTER`].
    pub(crate) fn set_forget_after(&mut self, after: Duration) {
        self.forget_after = after;
    }

    /// Whether the last pass asked for NVML to be initialised again (GPU lost,
    /// driver reloaded); clears the request.
    pub(crate) fn take_reinit(&mut self) -> bool {
        std::mem::take(&mut self.reinit)
    }

    /// NVML was initialised again: the driver may be another version now.
    pub(crate) fn reinitialised(&mut self) {
        self.version_checked = false;
    }

    fn gate(&mut self, driver: &dyn Driver) -> Result<()> {
        if self.version_checked {
            return Ok(());
        }
        match driver.driver_version() {
            Ok(version) => {
                driver_version::check(&version)?;
                if !driver_version::is_known_format(&version) {
                    tracing::warn!(%version, "NVIDIA driver version in an unknown format; not gated");
                } else {
                    tracing::info!(%version, "NVIDIA driver");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the NVIDIA driver version; not gated");
            }
        }
        self.version_checked = true;
        Ok(())
    }

    /// One pass at wall-clock time `now_us` (µs since the epoch, the clock
    /// NVML stamps samples with).
    pub(crate) fn pass(&mut self, driver: &dyn Driver, now_us: u64) -> Result<GpuSnapshot> {
        self.gate(driver)?;
        let count = driver.device_count().map_err(|source| {
            if wants_reinit(&source) {
                self.reinit = true;
            }
            Error::Nvml {
                call: "nvmlDeviceGetCount_v2",
                source,
            }
        })?;
        let mut devices = Vec::with_capacity(count as usize);
        for index in 0..count {
            match driver.device(index) {
                Ok(dev) => self.device(index, &*dev, driver, now_us, &mut devices),
                Err(e) => {
                    if wants_reinit(&e) {
                        self.reinit = true;
                    }
                    devices.push(
                        self.unreadable(index, &format!("nvmlDeviceGetHandleByIndex_v2: {e}")),
                    );
                }
            }
        }
        let present: HashSet<String> = devices.iter().map(|d| d.uuid.clone()).collect();
        let now = Instant::now();
        let mut forgotten = Vec::new();
        for (uuid, seen) in &mut self.seen {
            if present.contains(uuid) {
                seen.vanished_since = None;
                continue;
            }
            let since = *seen.vanished_since.get_or_insert(now);
            if now.duration_since(since) >= self.forget_after {
                forgotten.push(uuid.clone());
            } else {
                devices.push(lost_device(
                    &seen.id,
                    "no longer enumerated by NVML (fell off the bus?)",
                ));
            }
        }
        for uuid in forgotten {
            tracing::info!(%uuid, after = ?self.forget_after, "GPU gone for good: forgotten");
            self.seen.remove(&uuid);
            self.state.remove(&uuid);
            self.by_index.retain(|_, id| id.uuid != uuid);
        }
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
            mig_instance: None,
        });
        lost_device(&Identity { index, ..id }, reason)
    }

    fn remember(&mut self, id: &Identity) {
        self.seen.insert(
            id.uuid.clone(),
            Seen {
                id: id.clone(),
                vanished_since: None,
            },
        );
    }

    fn device(
        &mut self,
        index: u32,
        dev: &dyn DriverDevice,
        driver: &dyn Driver,
        now_us: u64,
        out: &mut Vec<GpuDevice>,
    ) {
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
            mig_instance: None,
        };
        if uuid.is_ok() {
            self.remember(&identity);
            self.by_index.insert(index, identity.clone());
        }
        for r in [&uuid.as_ref().map(|_| ()), &name.as_ref().map(|_| ())] {
            if let Err(e) = r
                && wants_reinit(e)
            {
                self.reinit = true;
            }
        }

        let utilization = dev.utilization();
        let temperature = dev.temperature();
        // A lost GPU answers every call so; these two stand for the rest.
        if [utilization.as_ref().err(), temperature.as_ref().err()]
            .into_iter()
            .flatten()
            .any(wants_reinit)
        {
            self.reinit = true;
        }
        let (sm_util, mem_util) = pair("nvmlDeviceGetUtilizationRates", utilization);
        let mig = dev.mig_enabled();
        let (memory_used_mib, memory_total_mib) = memory(dev.memory(), matches!(mig, Ok(true)));
        let mut device = GpuDevice {
            index,
            uuid: identity.uuid.clone(),
            name: identity.name.clone(),
            sm_util,
            mem_util,
            memory_used_mib,
            memory_total_mib,
            temperature_c: reading("nvmlDeviceGetTemperature", temperature),
            power_w: reading("nvmlDeviceGetPowerUsage", dev.power_mw().map(watts)),
            power_limit_w: reading(
                "nvmlDeviceGetEnforcedPowerLimit",
                dev.power_limit_mw().map(watts),
            ),
            mig_enabled: matches!(mig, Ok(true)),
            mig_instance: None,
            counters: self.counters(&identity.uuid, dev, now_us),
            processes: Vec::new(),
            processes_error: None,
        };
        match mig {
            Ok(true) => {
                // The instances carry the processes; the parent keeps its
                // whole-GPU figures (those NVML gives without privilege).
                let instances = match dev.mig_instances() {
                    Ok(i) => i,
                    Err(e) => {
                        device.processes_error =
                            Some(format!("nvmlDeviceGetMigDeviceHandleByIndex: {e}").into());
                        out.push(device);
                        return;
                    }
                };
                let parent = device.clone();
                out.push(device);
                for inst in instances {
                    let d = self.instance(&parent, &*inst);
                    out.push(d);
                }
            }
            Ok(false) | Err(NvmlError::NotSupported) => {
                let (processes, error) =
                    self.processes(&identity.uuid, dev, driver, &device, now_us);
                device.processes = processes;
                device.processes_error = error;
                out.push(device);
            }
            Err(e) => {
                let reason: Arc<str> = format!("nvmlDeviceGetMigMode: {e}").into();
                device.processes_error = Some(reason);
                out.push(device);
            }
        }
    }

    /// A MIG instance as a device of its own: its memory, its processes (with
    /// their memory; no per-process utilization), SM activity from GPM.
    fn instance(&mut self, parent: &GpuDevice, inst: &dyn DriverDevice) -> GpuDevice {
        let ids = inst.instance_ids();
        let uuid = inst.uuid();
        let (gi, ci) = match (&ids, &uuid) {
            (Ok(ids), Ok(_)) => *ids,
            (Err(e), _) | (_, Err(e)) => {
                let id = Identity {
                    index: parent.index,
                    uuid: String::new(),
                    name: parent.name.clone(),
                    mig_instance: None,
                };
                return lost_device(&id, &format!("MIG instance of GPU {}: {e}", parent.index));
            }
        };
        let mig_instance = MigInstance {
            parent_uuid: parent.uuid.clone(),
            gpu_instance_id: gi,
            compute_instance_id: ci,
        };
        let id = Identity {
            index: parent.index,
            uuid: uuid.unwrap_or_default(),
            name: inst
                .name()
                .unwrap_or_else(|_| format!("{} MIG instance {gi}", parent.name)),
            mig_instance: Some(mig_instance.clone()),
        };
        self.remember(&id);
        let (memory_used_mib, memory_total_mib) = pair(
            "nvmlDeviceGetMemoryInfo_v2 (MIG instance)",
            inst.memory().map(|(u, t)| (u / MIB, t / MIB)),
        );
        let instance_sm = match inst.gpm_sm_util() {
            Ok(v) if v <= 100 => Reading::Ok(v),
            Ok(v) => Reading::unavailable(format!("GPM reported {v} % SM activity")),
            Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_)) => {
                Reading::unavailable(
                    "MIG instance: NVML has no utilization per instance, and this GPU has no GPM (Hopper or later)",
                )
            }
            Err(NvmlError::NoData) => Reading::unavailable(
                "MIG instance: GPM needs two samples; SM activity from the next pass on",
            ),
            Err(e) => Reading::unavailable(format!("nvmlGpmMigSampleGet: {e}")),
        };
        let whole_gpu: Arc<str> = format!(
            "MIG instance: NVML reports this for the whole GPU {} only",
            parent.index
        )
        .into();
        let (listed, error) = list_all(inst);
        let n = listed.len();
        let processes = listed
            .into_iter()
            .map(|((pid, gpu_instance_id), (kind, used_memory_mib))| {
                // GPM measures the instance: exact for its only process.
                let sm_util = match (&instance_sm, n) {
                    (Reading::Ok(v), 1) => Reading::Ok(*v),
                    (Reading::Ok(_), _) => Reading::unavailable(format!(
                        "MIG instance: GPM gives the SM activity of the instance, which {n} processes share"
                    )),
                    (r, _) => r.clone(),
                };
                GpuProcess {
                    pid,
                    kind,
                    used_memory_mib,
                    sm_util,
                    mem_util: Reading::unavailable(
                        "MIG instance: NVML reports no per-process memory-controller utilization",
                    ),
                    gpu_instance_id: gpu_instance_id.or(Some(gi)),
                }
            })
            .collect();
        fn whole<T>(r: &Arc<str>) -> Reading<T> {
            Reading::Unavailable(r.clone())
        }
        GpuDevice {
            index: parent.index,
            uuid: id.uuid,
            name: id.name,
            sm_util: instance_sm,
            mem_util: Reading::unavailable(
                "MIG instance: NVML reports no memory-controller utilization per instance",
            ),
            memory_used_mib,
            memory_total_mib,
            // One chip: the instance is as hot as its GPU.
            temperature_c: parent.temperature_c.clone(),
            power_w: whole(&whole_gpu),
            power_limit_w: whole(&whole_gpu),
            mig_enabled: true,
            mig_instance: Some(mig_instance),
            counters: DeviceCounters {
                pcie_tx_kbps: whole(&whole_gpu),
                pcie_rx_kbps: whole(&whole_gpu),
                nvlink_tx_mbps: whole(&whole_gpu),
                nvlink_rx_mbps: whole(&whole_gpu),
                energy_mj: whole(&whole_gpu),
                energy_pass: whole(&whole_gpu),
            },
            processes,
            processes_error: error,
        }
    }

    fn counters(&mut self, uuid: &str, dev: &dyn DriverDevice, now_us: u64) -> DeviceCounters {
        let (pcie_tx_kbps, pcie_rx_kbps) = pair("nvmlDeviceGetPcieThroughput", dev.pcie_kbps());
        let (nvlink_tx_mbps, nvlink_rx_mbps) = match dev.nvlink_kib() {
            Err(e) => pair::<f64>("nvmlDeviceGetFieldValues(NVLINK_THROUGHPUT_DATA)", Err(e)),
            Ok((tx, rx, at)) => {
                let state = self.state.entry(uuid.to_owned()).or_default();
                let prev = state.nvlink.replace((tx, rx, at));
                match prev {
                    None => {
                        let r = Reading::unavailable("NVLink throughput: needs a second pass");
                        (r.clone(), r)
                    }
                    Some((ptx, prx, pat)) if tx < ptx || rx < prx || at <= pat => {
                        let r = Reading::unavailable(
                            "NVLink throughput: the counters went backwards (driver reloaded?)",
                        );
                        (r.clone(), r)
                    }
                    // KiB * 1024 bytes per µs = MB/s.
                    Some((ptx, prx, pat)) => {
                        let dt = (at - pat) as f64;
                        (
                            Reading::Ok((tx - ptx) as f64 * 1024.0 / dt),
                            Reading::Ok((rx - prx) as f64 * 1024.0 / dt),
                        )
                    }
                }
            }
        };
        let energy = dev.energy_mj();
        let energy_pass = match &energy {
            Err(_) => Reading::unavailable("no total-energy counter (see energy_mj)"),
            Ok((mj, at)) => {
                // A read without a time of its own is timed by the pass.
                let at = if *at == 0 { now_us } else { *at };
                let state = self.state.entry(uuid.to_owned()).or_default();
                energy_pass(state.energy.replace((*mj, at)), (*mj, at))
            }
        };
        DeviceCounters {
            pcie_tx_kbps,
            pcie_rx_kbps,
            nvlink_tx_mbps,
            nvlink_rx_mbps,
            energy_mj: reading(
                "nvmlDeviceGetTotalEnergyConsumption",
                energy.map(|(mj, _)| mj),
            ),
            energy_pass,
        }
    }

    fn processes(
        &mut self,
        uuid: &str,
        dev: &dyn DriverDevice,
        driver: &dyn Driver,
        device: &GpuDevice,
        now_us: u64,
    ) -> (Vec<GpuProcess>, Option<Arc<str>>) {
        let (listed, error) = list_all(dev);
        if let Some(e) = error {
            return (Vec::new(), Some(e));
        }
        // MPS: NVML credits every client's SM time to the server's pid.
        let clients: Vec<u32> = listed
            .iter()
            .filter(|(_, (kind, _))| *kind == ProcessKind::Mps)
            .map(|((pid, _), _)| *pid)
            .collect();
        let server = if clients.is_empty() {
            None
        } else {
            listed
                .iter()
                .filter(|(_, (kind, _))| *kind == ProcessKind::Compute)
                .map(|((pid, _), _)| *pid)
                .find(|pid| {
                    driver.process_name(*pid).is_ok_and(|name| {
                        name.rsplit('/')
                            .next()
                            .is_some_and(|b| b.starts_with(MPS_SERVER))
                    })
                })
        };

        let utilization = self.utilization(uuid, dev, now_us);
        let state = self.state.entry(uuid.to_owned()).or_default();
        let (by_pid, call) = match utilization {
            Err(reason) => {
                let processes = listed
                    .into_iter()
                    .map(
                        |((pid, gpu_instance_id), (kind, used_memory_mib))| GpuProcess {
                            pid,
                            kind,
                            used_memory_mib,
                            sm_util: Reading::Unavailable(reason.clone()),
                            mem_util: Reading::Unavailable(reason.clone()),
                            gpu_instance_id,
                        },
                    )
                    .collect();
                return (processes, None);
            }
            Ok(u) => u,
        };
        // This pass's sample, or the last one while it is young enough.
        let pids: HashSet<u32> = listed.keys().map(|(pid, _)| *pid).collect();
        state
            .held
            .retain(|pid, h| pids.contains(pid) && now_us.saturating_sub(h.at_us) <= self.hold_us);
        for (pid, h) in by_pid {
            if pids.contains(&pid) {
                state.held.insert(pid, h);
            }
        }
        let accounted: u32 = state.held.values().filter_map(|h| h.sm.ok()).sum();
        let unsampled: Arc<str> = match &device.sm_util {
            Reading::Ok(busy) if *busy <= accounted + IDLE_SLACK_PERCENT => Arc::from(""),
            Reading::Ok(busy) => format!(
                "{call}: no recent sample for this process while GPU {} is {busy} % busy \
                 and the sampled processes account for {accounted} %",
                device.index
            )
            .into(),
            Reading::Unavailable(r) => format!(
                "{call}: no recent sample for this process, and the GPU's own utilization is unknown ({r})"
            )
            .into(),
        };
        let processes = listed
            .into_iter()
            .map(|((pid, gpu_instance_id), (kind, used_memory_mib))| {
                let (sm_util, mem_util) = if kind == ProcessKind::Mps {
                    let r = Reading::unavailable(match server {
                        Some(s) => format!(
                            "MPS client: NVML credits the SM time of every MPS client to the MPS server (pid {s}) and does not split it"
                        ),
                        None => "MPS client: NVML credits its SM time to the MPS server and does not split it".to_owned(),
                    });
                    (r.clone(), r)
                } else if Some(pid) == server {
                    let r = Reading::unavailable(format!(
                        "MPS server: its samples are the SM time of its {} clients (pids {clients:?}), which NVML does not split",
                        clients.len()
                    ));
                    (r.clone(), r)
                } else {
                    match state.held.get(&pid) {
                        Some(h) => (h.sm.clone(), h.mem.clone()),
                        None if unsampled.is_empty() => (Reading::Ok(0), Reading::Ok(0)),
                        None => (
                            Reading::Unavailable(unsampled.clone()),
                            Reading::Unavailable(unsampled.clone()),
                        ),
                    }
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

    /// Per-pid utilization from the samples newer than this device's lastSeen,
    /// and the call that gave them.
    fn utilization(
        &mut self,
        uuid: &str,
        dev: &dyn DriverDevice,
        now_us: u64,
    ) -> std::result::Result<(UtilByPid, &'static str), Arc<str>> {
        let hold_us = self.hold_us;
        let state = self.state.entry(uuid.to_owned()).or_default();
        if state.last_seen > now_us.saturating_add(FUTURE_SLACK_US) {
            tracing::warn!(
                %uuid,
                last_seen_us = state.last_seen,
                now_us,
                "sample cursor is in the future (the clock stepped back): reset"
            );
            state.last_seen = now_us.saturating_sub(hold_us);
            state.held.clear();
        }
        let last_seen = state.last_seen;
        let Samples { call, samples } = dev.samples(last_seen);
        let samples = match samples {
            Ok(s) => s,
            // NVML's way of saying "no samples since lastSeen".
            Err(NvmlError::NotFound) => Vec::new(),
            Err(e) => return Err(format!("{call}: {e}").into()),
        };
        let (by_pid, newest) =
            aggregate(&samples, last_seen, now_us.saturating_add(FUTURE_SLACK_US));
        if newest > last_seen && !uuid.is_empty() {
            state.last_seen = newest;
        }
        Ok((by_pid, call))
    }
}

/// The energy counter's increase from `prev` to `now` ((mJ, µs) each).
fn energy_pass(prev: Option<(u64, u64)>, (mj, at): (u64, u64)) -> Reading<super::EnergyPass> {
    match prev {
        None => Reading::unavailable("energy counter: needs a second pass"),
        // The counter counts since the driver loaded: a reload restarts it.
        Some((pmj, _)) if mj < pmj => {
            Reading::unavailable("energy counter: it went backwards (driver reloaded?)")
        }
        Some((_, pat)) if at <= pat => Reading::unavailable(
            "energy counter: no time passed since the previous read (clock stepped back?)",
        ),
        Some((pmj, pat)) => Reading::Ok(super::EnergyPass {
            joules: (mj - pmj) as f64 / 1000.0,
            seconds: (at - pat) as f64 / 1e6,
        }),
    }
}

/// Whether an NVML error means the library must be initialised again.
fn wants_reinit(e: &NvmlError) -> bool {
    matches!(
        e,
        NvmlError::GpuLost | NvmlError::Uninitialized | NvmlError::DriverNotLoaded
    )
}

/// Processes by (pid, GPU instance) from the three lists, or why the compute
/// list could not be read.
type Listed = BTreeMap<(u32, Option<u32>), (ProcessKind, Reading<u64>)>;

/// One list call, repeated with a fresh size while a process appearing between
/// the size query and the fill makes it INSUFFICIENT_SIZE (nvml-wrapper gives
/// the compute list 5 entries of headroom and the MPS list none).
fn list(dev: &dyn DriverDevice, kind: ProcessKind) -> NvResult<Vec<ProcessInfo>> {
    let mut tries = 0;
    loop {
        match dev.processes(kind) {
            Err(NvmlError::InsufficientSize(_)) if tries < LIST_RETRIES => tries += 1,
            r => return r,
        }
    }
}

fn list_all(dev: &dyn DriverDevice) -> (Listed, Option<Arc<str>>) {
    // One entry per (pid, GPU instance): a process with both a compute and a
    // graphics context is listed twice by NVML, with the same memory figure,
    // and its utilization samples are per pid. A pid in the MPS list is an
    // MPS client whatever other list also names it.
    let mut listed: Listed = BTreeMap::new();
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
        let processes = match list(dev, kind) {
            Ok(list) => list,
            // MPS and graphics lists are missing from older drivers and
            // unsupported on some boards; there are then no such processes to
            // miss. The compute list has no such excuse.
            Err(NvmlError::NotSupported | NvmlError::FailedToLoadSymbol(_))
                if kind != ProcessKind::Compute =>
            {
                continue;
            }
            Err(e) => {
                return (
                    BTreeMap::new(),
                    Some(format!("{call}: {e}{}", hint(&e)).into()),
                );
            }
        };
        for p in processes {
            let memory = match p.used_gpu_memory {
                UsedGpuMemory::Used(bytes) => Reading::Ok(bytes / MIB),
                UsedGpuMemory::Unavailable => {
                    Reading::unavailable(format!("{call}: NVML reports no memory figure"))
                }
            };
            listed
                .entry((p.pid, p.gpu_instance_id))
                .and_modify(|(k, m)| {
                    *m = larger(m, &memory);
                    if kind == ProcessKind::Mps {
                        *k = ProcessKind::Mps;
                    }
                })
                .or_insert((kind, memory));
        }
    }
    (listed, None)
}

/// What to do about an error, where there is something to do.
fn hint(e: &NvmlError) -> &'static str {
    match e {
        NvmlError::NoPermission => {
            " (MIG: whole-GPU queries need CAP_SYS_ADMIN or the mig/monitor capability; see docs/security.md)"
        }
        _ => "",
    }
}

fn memory(r: NvResult<(u64, u64)>, mig: bool) -> (Reading<u64>, Reading<u64>) {
    match r {
        Ok((used, total)) => (Reading::Ok(used / MIB), Reading::Ok(total / MIB)),
        Err(e) => {
            let extra = if mig { hint(&e) } else { "" };
            let r = Reading::unavailable(format!("nvmlDeviceGetMemoryInfo_v2: {e}{extra}"));
            (r.clone(), r)
        }
    }
}

fn pair<T>(call: &str, r: NvResult<(T, T)>) -> (Reading<T>, Reading<T>) {
    match r {
        Ok((a, b)) => (Reading::Ok(a), Reading::Ok(b)),
        Err(e) => {
            let reason: Arc<str> = format!("{call}: {e}").into();
            (
                Reading::Unavailable(reason.clone()),
                Reading::Unavailable(reason),
            )
        }
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

/// Folds the samples newer than `last_seen` (and not after `until`) into one
/// figure per pid: the mean of its samples, leaving out values over 100 % (a
/// driver glitch, not load). Some drivers return older samples whatever
/// lastSeen says; they are skipped here so nothing is counted twice. Samples
/// after `until` are from a clock that has since stepped back. Returns the
/// newest timestamp counted.
fn aggregate(samples: &[ProcessUtilizationSample], last_seen: u64, until: u64) -> (UtilByPid, u64) {
    let mut sums: HashMap<u32, (Mean, Mean, u64)> = HashMap::new();
    let mut newest = last_seen;
    for s in samples
        .iter()
        .filter(|s| s.timestamp > last_seen && s.timestamp <= until)
    {
        newest = newest.max(s.timestamp);
        let (sm, mem, at) = sums.entry(s.pid).or_default();
        sm.add(s.sm_util);
        mem.add(s.mem_util);
        *at = (*at).max(s.timestamp);
    }
    let by_pid = sums
        .into_iter()
        .map(|(pid, (sm, mem, at_us))| {
            (
                pid,
                Held {
                    sm: sm.reading(),
                    mem: mem.reading(),
                    at_us,
                },
            )
        })
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
        mig_enabled: id.mig_instance.is_some(),
        mig_instance: id.mig_instance.clone(),
        counters: DeviceCounters {
            pcie_tx_kbps: Reading::Unavailable(r.clone()),
            pcie_rx_kbps: Reading::Unavailable(r.clone()),
            nvlink_tx_mbps: Reading::Unavailable(r.clone()),
            nvlink_rx_mbps: Reading::Unavailable(r.clone()),
            energy_mj: Reading::Unavailable(r.clone()),
            energy_pass: Reading::Unavailable(r.clone()),
        },
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

    fn figures(h: &Held) -> (Reading<u32>, Reading<u32>) {
        (h.sm.clone(), h.mem.clone())
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
            u64::MAX,
        );
        assert_eq!(newest, 20);
        assert_eq!(figures(&by_pid[&1]), (Reading::Ok(51), Reading::Ok(15)));
        assert_eq!(by_pid[&1].at_us, 20);
        assert_eq!(figures(&by_pid[&2]), (Reading::Ok(5), Reading::Ok(0)));
    }

    #[test]
    fn samples_not_newer_than_last_seen_or_from_the_future_are_skipped() {
        let (by_pid, newest) = aggregate(
            &[sample(1, 10, 90, 90), sample(1, 20, 30, 30)],
            10,
            u64::MAX,
        );
        assert_eq!(newest, 20);
        assert_eq!(figures(&by_pid[&1]), (Reading::Ok(30), Reading::Ok(30)));
        let (by_pid, newest) = aggregate(&[sample(1, 10, 90, 90)], 20, u64::MAX);
        assert!(by_pid.is_empty());
        assert_eq!(newest, 20, "lastSeen never goes backwards");
        let (by_pid, newest) = aggregate(&[sample(1, 10, 90, 90), sample(1, 99, 5, 5)], 0, 50);
        assert_eq!(figures(&by_pid[&1]).0, Reading::Ok(90));
        assert_eq!(
            newest, 10,
            "a sample from the future never becomes lastSeen"
        );
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
            u64::MAX,
        );
        assert_eq!(by_pid[&1].sm, Reading::Ok(50));
        assert!(
            matches!(&by_pid[&2].sm, Reading::Unavailable(r) if r.contains("over 100")),
            "{:?}",
            by_pid[&2]
        );
        assert_eq!(
            by_pid[&2].mem,
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

    /// A one-GPU driver whose samples carry the timestamps a test gives, so
    /// the clock can step.
    struct Stepping {
        samples: std::cell::RefCell<Vec<ProcessUtilizationSample>>,
        last_seen_asked: std::cell::Cell<u64>,
    }

    impl Driver for Stepping {
        fn driver_version(&self) -> NvResult<String> {
            Ok("550.54.15".into())
        }
        fn device_count(&self) -> NvResult<u32> {
            Ok(1)
        }
        fn device(&self, _: u32) -> NvResult<Box<dyn DriverDevice + '_>> {
            Ok(Box::new(SteppingDevice(self)))
        }
        fn process_name(&self, _: u32) -> NvResult<String> {
            Err(NvmlError::NotFound)
        }
    }

    struct SteppingDevice<'a>(&'a Stepping);

    impl DriverDevice for SteppingDevice<'_> {
        fn uuid(&self) -> NvResult<String> {
            Ok("GPU-step".into())
        }
        fn name(&self) -> NvResult<String> {
            Ok("step".into())
        }
        fn utilization(&self) -> NvResult<(u32, u32)> {
            Ok((50, 5))
        }
        fn memory(&self) -> NvResult<(u64, u64)> {
            Ok((MIB, 10 * MIB))
        }
        fn temperature(&self) -> NvResult<u32> {
            Ok(40)
        }
        fn power_mw(&self) -> NvResult<u32> {
            Ok(100_000)
        }
        fn power_limit_mw(&self) -> NvResult<u32> {
            Ok(300_000)
        }
        fn mig_enabled(&self) -> NvResult<bool> {
            Ok(false)
        }
        fn processes(&self, kind: ProcessKind) -> NvResult<Vec<ProcessInfo>> {
            Ok(match kind {
                ProcessKind::Compute => vec![ProcessInfo {
                    pid: 7,
                    used_gpu_memory: UsedGpuMemory::Used(MIB),
                    gpu_instance_id: None,
                    compute_instance_id: None,
                }],
                _ => Vec::new(),
            })
        }
        fn samples(&self, last_seen_us: u64) -> Samples {
            self.0.last_seen_asked.set(last_seen_us);
            let samples: Vec<_> = self
                .0
                .samples
                .borrow()
                .iter()
                .filter(|s| s.timestamp > last_seen_us)
                .cloned()
                .collect();
            Samples {
                call: "nvmlDeviceGetProcessUtilization",
                samples: if samples.is_empty() {
                    Err(NvmlError::NotFound)
                } else {
                    Ok(samples)
                },
            }
        }
        fn pcie_kbps(&self) -> NvResult<(u32, u32)> {
            Err(NvmlError::NotSupported)
        }
        fn nvlink_kib(&self) -> NvResult<(u64, u64, u64)> {
            Err(NvmlError::NotSupported)
        }
        fn energy_mj(&self) -> NvResult<(u64, u64)> {
            Err(NvmlError::NotSupported)
        }
        fn mig_instances(&self) -> NvResult<Vec<Box<dyn DriverDevice + '_>>> {
            Err(NvmlError::NotSupported)
        }
        fn instance_ids(&self) -> NvResult<(u32, u32)> {
            Err(NvmlError::NotSupported)
        }
        fn gpm_sm_util(&self) -> NvResult<u32> {
            Err(NvmlError::NotSupported)
        }
    }

    const S: u64 = 1_000_000;

    #[test]
    fn a_last_seen_in_the_future_is_reset_after_the_clock_steps_back() {
        let driver = Stepping {
            samples: std::cell::RefCell::new(vec![sample(7, 10_000 * S, 40, 4)]),
            last_seen_asked: std::cell::Cell::new(0),
        };
        let mut c = Collector::new(Duration::from_secs(1));
        let sm = |snap: &GpuSnapshot| snap.devices[0].processes[0].sm_util.clone();
        let first = c.pass(&driver, 10_000 * S).expect("pass");
        assert_eq!(sm(&first), Reading::Ok(40));
        // The clock steps back an hour; the driver's new samples carry it.
        driver
            .samples
            .borrow_mut()
            .push(sample(7, 6_401 * S, 70, 7));
        let second = c.pass(&driver, 6_401 * S).expect("pass");
        assert_eq!(
            driver.last_seen_asked.get(),
            6_401 * S - 3 * S,
            "the cursor was reset to now minus the hold window"
        );
        assert_eq!(
            sm(&second),
            Reading::Ok(70),
            "the new sample counts; the one from the future does not"
        );
        let third = c.pass(&driver, 6_402 * S).expect("pass");
        assert_eq!(
            driver.last_seen_asked.get(),
            6_401 * S,
            "the cursor moves on from the new sample"
        );
        assert_eq!(
            sm(&third),
            Reading::Ok(70),
            "held: younger than 3 intervals"
        );
    }

    #[test]
    fn energy_pass_is_the_counter_increase_over_the_pass_clock() {
        let first = energy_pass(None, (5_000, 10 * S));
        assert!(first.reason().is_some_and(|r| r.contains("second pass")));
        let p = energy_pass(Some((5_000, 10 * S)), (5_000 + 420_500, 11 * S))
            .ok()
            .expect("an increase");
        assert_eq!((p.joules, p.seconds, p.watts()), (420.5, 1.0, 420.5));
        let reset = energy_pass(Some((5_000, 10 * S)), (10, 11 * S));
        assert!(reset.reason().is_some_and(|r| r.contains("backwards")));
        let stalled = energy_pass(Some((5_000, 10 * S)), (6_000, 10 * S));
        assert!(stalled.reason().is_some_and(|r| r.contains("no time")));
    }
}
