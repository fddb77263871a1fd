//! The GPU scenario file format (TOML), read by the `mock` GPU source and by the
//! fake `libnvidia-ml.so` in `tests/fake-nvml`, which includes this file as a
//! module: it must depend on nothing but `serde`, `toml` and `thiserror`.
//!
//! A scenario describes what NVML would report. Both readers answer NVML's
//! questions from it through the same methods ([`Gpu::utilization`],
//! [`Gpu::process_samples`], ...), so the mock source and the real NVML code
//! running against the fake library see identical answers for one file. The
//! user-facing format is documented in the README ("GPU scenario files").

use serde::{Deserialize, Deserializer, de::Error as _};

/// A scenario file that could not be read: where, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

/// A whole scenario file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What `nvmlSystemGetDriverVersion` reports.
    pub driver_version: Option<String>,
    /// Test-only: errors of the library as a whole.
    #[serde(default)]
    pub errors: LibraryErrors,
    /// Test-only: how many times the kernel driver was reloaded. Handles from
    /// an `nvmlInit_v2` made before the latest reload answer GPU_IS_LOST until
    /// NVML is shut down and initialised again, as after `rmmod nvidia`.
    #[serde(default)]
    pub driver_reloads: u32,
    /// Test-only: the layout the process lists are written in. `r535` is the
    /// 32-byte entry of drivers 535.43-535.86 (an extra
    /// `usedGpuCcProtectedMemory`) where nvml-wrapper reads 24 bytes: every
    /// entry after the first comes out garbled.
    #[serde(default)]
    pub process_info_layout: ProcessInfoLayout,
    #[serde(default)]
    pub gpu: Vec<Gpu>,
}

/// How a fake driver lays out `nvmlProcessInfo_t` entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessInfoLayout {
    /// `nvmlProcessInfo_v2_t`, 24 bytes, what `_v3` calls take elsewhere.
    #[default]
    V3,
    /// The 32-byte entry of drivers 535.43-535.86.
    R535,
}

/// Test-only: NVML errors of calls that are not about one device.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibraryErrors {
    /// `nvmlInit_v2`.
    pub init: Option<NvmlErrorKind>,
    /// `nvmlDeviceGetCount_v2`.
    pub device_count: Option<NvmlErrorKind>,
}

/// One GPU, in NVML index order.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub memory_total_mib: Option<u64>,
    /// Default: the sum of the processes' `used_memory_mib`.
    pub memory_used_mib: Option<u64>,
    /// SM %.
    pub utilization: Option<Percent>,
    /// Memory-controller %.
    pub memory_utilization: Option<Percent>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<Watts>,
    pub power_limit_w: Option<Watts>,
    /// MIG mode enabled: NVML then reports no utilization, device-wide or per
    /// process, and processes carry their GPU instance.
    #[serde(default)]
    pub mig: bool,
    /// MIG: whether the caller may monitor the whole GPU (CAP_SYS_ADMIN or the
    /// `/proc/driver/nvidia/capabilities/mig/monitor` capability). Without it
    /// memory and process queries on the parent handle answer NO_PERMISSION;
    /// the per-instance handles still answer.
    #[serde(default)]
    pub mig_monitor: bool,
    /// MIG: whether the GPU has GPM (Hopper and later): per-instance SM
    /// activity through `nvmlGpmMigSampleGet`.
    #[serde(default)]
    pub gpm: bool,
    /// MIG GPU instances (`mig = true`), in MIG device index order.
    #[serde(default)]
    pub mig_instance: Vec<MigInstance>,
    /// Pid of the MPS server (`nvidia-cuda-mps-server`, a compute process of
    /// this GPU). As with a real driver, the utilization samples of every MPS
    /// client (`kind = "mps"`) are reported under this pid, summed and capped
    /// at 100; without it, MPS clients' SM time is reported under no pid.
    pub mps_server: Option<u32>,
    /// What the size query of `nvmlDeviceGetProcessUtilization` (NULL buffer)
    /// reports: real drivers answer INSUFFICIENT_SIZE with a fixed 100 whatever
    /// the number of samples, even when there are none. 0: the exact count.
    #[serde(default = "default_size_query")]
    pub utilization_size_query: u32,
    /// Test-only: whether the driver has `nvmlDeviceGetProcessesUtilizationInfo`
    /// (R550+) for this GPU; false answers NOT_SUPPORTED, as some drivers do.
    #[serde(default = "yes")]
    pub processes_utilization_info: bool,
    /// PCIe throughput, KB/s (`nvmlDeviceGetPcieThroughput`, a 20 ms window).
    pub pcie_tx_kbps: Option<u32>,
    pub pcie_rx_kbps: Option<u32>,
    /// NVLink throughput, MB/s over all links: served as NVML does, as the
    /// cumulative KiB counters `NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX/RX`
    /// growing at this rate.
    pub nvlink_tx_mbps: Option<f64>,
    pub nvlink_rx_mbps: Option<f64>,
    /// `nvmlDeviceGetTotalEnergyConsumption`: the counter's value (mJ) when it
    /// is first read (default 0). From then on it grows as a board's does, by
    /// the power drawn (`power_w`, with its ripple) integrated over time, at
    /// whatever power the scenario says at the moment (a new `power_w` changes
    /// its slope, never its value); a driver reload (`driver_reloads` grows)
    /// restarts it. Without `power_w` it stays at `energy_mj`; with neither
    /// the GPU has no counter (NOT_SUPPORTED).
    pub energy_mj: Option<u64>,
    /// Amplitude of a sine ripple on the power drawn, W: the board draws
    /// `power_w + power_ripple_w * sin(2 pi t / power_ripple_period_ms)`, and
    /// `nvmlDeviceGetPowerUsage` reports that instant's draw, as real boards
    /// do under a bursty load; the energy counter integrates it exactly.
    pub power_ripple_w: Option<Watts>,
    /// Period of the ripple, ms (default 370: faster than a poll, and not a
    /// divisor of one).
    pub power_ripple_period_ms: Option<u64>,
    /// Test-only: return every process-utilization sample whatever `lastSeen`
    /// says, as some drivers do, so the reader's own filtering is exercised.
    #[serde(default)]
    pub ignore_last_seen: bool,
    /// Test-only: NVML errors per call.
    #[serde(default)]
    pub errors: GpuErrors,
    #[serde(default)]
    pub process: Vec<Process>,
}

fn default_size_query() -> u32 {
    100
}

fn yes() -> bool {
    true
}

/// One MIG instance of a GPU (a GPU instance with one compute instance).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigInstance {
    pub gpu_instance_id: u32,
    #[serde(default)]
    pub compute_instance_id: u32,
    /// Default derived from the parent's index and the instance id.
    pub uuid: Option<String>,
    /// The profile, e.g. `1g.18gb`: the instance is named "<GPU name> MIG <profile>".
    pub profile: Option<String>,
    pub memory_total_mib: Option<u64>,
    /// SM activity % that GPM reports for the instance (`gpm = true` only).
    pub sm_util: Option<Percent>,
}

/// One process on a GPU.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub pid: u32,
    #[serde(default)]
    pub kind: ProcessKind,
    /// SM % of the synthesized utilization sample (none when both are 0, as NVML
    /// reports no samples for an idle process). Ignored when `sample` is given.
    #[serde(default)]
    pub sm_util: Percent,
    #[serde(default)]
    pub mem_util: Percent,
    /// Absent: NVML's "not available" value.
    pub used_memory_mib: Option<u64>,
    /// MIG GPU instance (MIG devices only).
    pub gpu_instance_id: Option<u32>,
    /// What `nvmlSystemGetProcessName` answers (absent: NOT_FOUND).
    pub name: Option<String>,
    /// Test-only: the driver has a new sample for this busy process only on
    /// every Nth utilization query of its GPU (the 1st, N+1th, ...): a driver
    /// sampling more slowly than the daemon polls.
    pub sample_every: Option<u32>,
    /// Test-only: the process starts between the size query and the fill of
    /// its list: the first size query does not count it, every fill lists it.
    #[serde(default)]
    pub late: bool,
    /// Test-only: raw utilization samples with their timestamps (microseconds),
    /// returned when newer than the caller's `lastSeen`. Values over 100 are
    /// allowed here, to test how readers treat them.
    #[serde(default)]
    pub sample: Vec<Sample>,
}

/// Which NVML process list a process is in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    #[default]
    Compute,
    Graphics,
    /// A client of the MPS server (`nvmlDeviceGetMPSComputeRunningProcesses_v3`).
    Mps,
}

/// A raw process-utilization sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub timestamp_us: u64,
    #[serde(default)]
    pub sm_util: u32,
    #[serde(default)]
    pub mem_util: u32,
}

/// A percentage, 0 to 100; anything else is rejected where it is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(pub u32);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v > 100 {
            return Err(D::Error::custom(format!(
                "{v} is not a percentage (0 to 100)"
            )));
        }
        Ok(Self(v))
    }
}

/// Watts: finite and not negative.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd)]
pub struct Watts(pub f64);

impl<'de> Deserialize<'de> for Watts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v < 0.0 || v * 1000.0 > f64::from(u32::MAX) {
            return Err(D::Error::custom(format!(
                "{v} is not a power in watts (0 to 4294967)"
            )));
        }
        Ok(Self(v))
    }
}

/// The NVML return codes a scenario can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NvmlErrorKind {
    NotSupported,
    NoPermission,
    NotFound,
    DriverNotLoaded,
    GpuIsLost,
    InsufficientSize,
    LibRmVersionMismatch,
    Uninitialized,
    Unknown,
}

impl NvmlErrorKind {
    /// The `nvmlReturn_t` value, from `nvml.h`.
    pub fn code(self) -> u32 {
        match self {
            Self::NotSupported => 3,
            Self::NoPermission => 4,
            Self::NotFound => 6,
            Self::DriverNotLoaded => 9,
            Self::GpuIsLost => 15,
            Self::InsufficientSize => 7,
            Self::LibRmVersionMismatch => 18,
            Self::Uninitialized => 1,
            Self::Unknown => 999,
        }
    }
}

/// Test-only: the error each NVML device call returns; `all` applies to every
/// call the others leave unset (a lost GPU).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuErrors {
    pub all: Option<NvmlErrorKind>,
    pub handle: Option<NvmlErrorKind>,
    pub uuid: Option<NvmlErrorKind>,
    pub name: Option<NvmlErrorKind>,
    pub utilization: Option<NvmlErrorKind>,
    pub memory: Option<NvmlErrorKind>,
    pub temperature: Option<NvmlErrorKind>,
    pub power: Option<NvmlErrorKind>,
    pub power_limit: Option<NvmlErrorKind>,
    pub mig_mode: Option<NvmlErrorKind>,
    pub compute_processes: Option<NvmlErrorKind>,
    pub graphics_processes: Option<NvmlErrorKind>,
    pub mps_processes: Option<NvmlErrorKind>,
    pub process_utilization: Option<NvmlErrorKind>,
    pub pcie: Option<NvmlErrorKind>,
    pub nvlink: Option<NvmlErrorKind>,
    pub energy: Option<NvmlErrorKind>,
    pub mig_instances: Option<NvmlErrorKind>,
}

/// What one NVML call answers: a value or an NVML error.
pub type Answer<T> = Result<T, NvmlErrorKind>;

/// A utilization sample as NVML returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleOut {
    pub pid: u32,
    pub timestamp_us: u64,
    pub sm_util: u32,
    pub mem_util: u32,
}

/// A process-list entry as NVML returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessOut {
    pub pid: u32,
    /// `None`: NVML's "not available".
    pub used_memory_bytes: Option<u64>,
    pub gpu_instance_id: Option<u32>,
}

const MIB: u64 = 1024 * 1024;

impl Scenario {
    /// Parses a scenario; errors name the line and column.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((1, 1));
            ParseError {
                line,
                column,
                message: e.message().trim_end().to_owned(),
            }
        })
    }

    pub fn init(&self) -> Answer<()> {
        self.errors.init.map_or(Ok(()), Err)
    }

    pub fn device_count(&self) -> Answer<u32> {
        match self.errors.device_count {
            Some(e) => Err(e),
            None => Ok(u32::try_from(self.gpu.len()).unwrap_or(u32::MAX)),
        }
    }

    /// The GPU at `index`, if its handle can be had.
    pub fn device(&self, index: u32) -> Answer<&Gpu> {
        let gpu = usize::try_from(index)
            .ok()
            .and_then(|i| self.gpu.get(i))
            .ok_or(NvmlErrorKind::NotFound)?;
        gpu.check(gpu.errors.handle)?;
        Ok(gpu)
    }
}

impl Gpu {
    fn check(&self, specific: Option<NvmlErrorKind>) -> Answer<()> {
        specific.or(self.errors.all).map_or(Ok(()), Err)
    }

    pub fn uuid(&self, index: u32) -> Answer<String> {
        self.check(self.errors.uuid)?;
        Ok(self
            .uuid
            .clone()
            .unwrap_or_else(|| format!("GPU-00000000-0000-0000-0000-{index:012x}")))
    }

    pub fn name(&self) -> Answer<String> {
        self.check(self.errors.name)?;
        Ok(self
            .name
            .clone()
            .unwrap_or_else(|| "Scenario GPU".to_owned()))
    }

    /// (SM %, memory-controller %); NVML reads both in one call, so a file
    /// must give both. Not supported in MIG mode.
    pub fn utilization(&self) -> Answer<(u32, u32)> {
        self.check(self.errors.utilization)?;
        if self.mig {
            return Err(NvmlErrorKind::NotSupported);
        }
        match (self.utilization, self.memory_utilization) {
            (Some(sm), Some(mem)) => Ok((sm.0, mem.0)),
            _ => Err(NvmlErrorKind::NotSupported),
        }
    }

    /// (used, total) in bytes.
    pub fn memory(&self) -> Answer<(u64, u64)> {
        self.check(self.errors.memory)?;
        if self.mig && !self.mig_monitor {
            return Err(NvmlErrorKind::NoPermission);
        }
        let total = self.memory_total_mib.ok_or(NvmlErrorKind::NotSupported)?;
        let used = self.memory_used_mib.unwrap_or_else(|| {
            // A process in several lists (compute and graphics) holds its
            // memory once.
            let mut per_process = std::collections::BTreeMap::new();
            for p in &self.process {
                let m = per_process.entry((p.pid, p.gpu_instance_id)).or_insert(0);
                *m = p.used_memory_mib.unwrap_or(0).max(*m);
            }
            per_process.values().sum::<u64>()
        });
        Ok((used.saturating_mul(MIB), total.saturating_mul(MIB)))
    }

    pub fn temperature(&self) -> Answer<u32> {
        self.check(self.errors.temperature)?;
        self.temperature_c.ok_or(NvmlErrorKind::NotSupported)
    }

    /// Milliwatts, as NVML reports them: the draw at the instant `now_us`.
    pub fn power_mw(&self, now_us: u64) -> Answer<u32> {
        self.check(self.errors.power)?;
        self.power_at(now_us)
            .map(|w| milliwatts(Watts(w)))
            .ok_or(NvmlErrorKind::NotSupported)
    }

    fn ripple_period_us(&self) -> u64 {
        self.power_ripple_period_ms.unwrap_or(370).max(1) * 1000
    }

    /// The power drawn at `now_us`, W (never below 0).
    pub fn power_at(&self, now_us: u64) -> Option<f64> {
        let w = self.power_w?.0;
        let Some(Watts(a)) = self.power_ripple_w else {
            return Some(w);
        };
        let period = self.ripple_period_us();
        let phase = (now_us % period) as f64 / period as f64;
        Some((w + a * (std::f64::consts::TAU * phase).sin()).max(0.0))
    }

    /// The energy drawn from `from_us` to `to_us`, mJ: the integral of
    /// [`Gpu::power_at`] (a ripple larger than `power_w` is clipped at 0 W by
    /// `power_at` but not here: keep `power_ripple_w <= power_w`).
    fn energy_between_mj(&self, from_us: u64, to_us: u64) -> f64 {
        let Some(w) = self.power_w else {
            return 0.0;
        };
        let dt_s = to_us.saturating_sub(from_us) as f64 / 1e6;
        let mut joules = w.0 * dt_s;
        if let Some(Watts(a)) = self.power_ripple_w {
            let period = self.ripple_period_us();
            let cos =
                |t: u64| (std::f64::consts::TAU * ((t % period) as f64 / period as f64)).cos();
            // The integral of a sin(2 pi t / T) is -a T / (2 pi) cos(2 pi t / T).
            joules += a * (period as f64 / 1e6) / std::f64::consts::TAU
                * (cos(from_us) - cos(to_us.max(from_us)));
        }
        joules * 1000.0
    }

    pub fn power_limit_mw(&self) -> Answer<u32> {
        self.check(self.errors.power_limit)?;
        self.power_limit_w
            .map(milliwatts)
            .ok_or(NvmlErrorKind::NotSupported)
    }

    pub fn mig_enabled(&self) -> Answer<bool> {
        self.check(self.errors.mig_mode)?;
        Ok(self.mig)
    }

    /// (used, total) bytes of MIG instance `gi`: its processes' memory.
    pub fn instance_memory(&self, gi: u32) -> Answer<(u64, u64)> {
        let inst = self.instance(gi)?;
        let total = inst.memory_total_mib.ok_or(NvmlErrorKind::NotSupported)?;
        let used: u64 = self
            .process
            .iter()
            .filter(|p| p.gpu_instance_id == Some(gi))
            .filter_map(|p| p.used_memory_mib)
            .sum();
        Ok((used.saturating_mul(MIB), total.saturating_mul(MIB)))
    }

    /// The MIG instances NVML enumerates under this GPU (none outside MIG mode).
    pub fn instances(&self) -> Answer<&[MigInstance]> {
        self.check(self.errors.mig_instances)?;
        Ok(if self.mig { &self.mig_instance } else { &[] })
    }

    fn instance(&self, gi: u32) -> Answer<&MigInstance> {
        self.instances()?
            .iter()
            .find(|i| i.gpu_instance_id == gi)
            .ok_or(NvmlErrorKind::NotFound)
    }

    /// A MIG instance's UUID (`MIG-...`).
    pub fn instance_uuid(&self, index: u32, gi: u32) -> Answer<String> {
        let inst = self.instance(gi)?;
        Ok(inst
            .uuid
            .clone()
            .unwrap_or_else(|| format!("MIG-00000000-0000-0000-{index:04x}-{gi:012x}")))
    }

    /// A MIG instance's name, as NVML gives it: "<GPU name> MIG <profile>".
    pub fn instance_name(&self, gi: u32) -> Answer<String> {
        let inst = self.instance(gi)?;
        let profile = inst.profile.clone().unwrap_or_else(|| format!("gi{gi}"));
        Ok(format!("{} MIG {profile}", self.name()?))
    }

    /// The SM activity % GPM reports for MIG instance `gi`.
    pub fn gpm_sm_util(&self, gi: u32) -> Answer<u32> {
        if !self.gpm {
            return Err(NvmlErrorKind::NotSupported);
        }
        let inst = self.instance(gi)?;
        inst.sm_util.map(|p| p.0).ok_or(NvmlErrorKind::NotSupported)
    }

    /// The processes a list call of `kind` sees, on the whole GPU (`None`) or
    /// one MIG instance. On a MIG GPU the whole-GPU list needs `mig_monitor`.
    /// The first size query (`size_query`) in `session` misses `late`
    /// processes; fills and later size queries list them.
    pub fn processes_seen(
        &self,
        kind: ProcessKind,
        index: u32,
        instance: Option<u32>,
        size_query: bool,
        session: &mut Session,
    ) -> Answer<Vec<ProcessOut>> {
        let mut list = match instance {
            None => self.processes(kind)?,
            Some(gi) => {
                self.instance(gi)?;
                self.check(self.kind_error(kind))?;
                self.process
                    .iter()
                    .filter(|p| p.kind == kind && p.gpu_instance_id == Some(gi))
                    .map(|p| self.out(p))
                    .collect()
            }
        };
        let late: Vec<u32> = self
            .process
            .iter()
            .filter(|p| p.late && p.kind == kind)
            .map(|p| p.pid)
            .collect();
        if size_query {
            // Only the first size query misses it: it has started by the next.
            list.retain(|p| !late.contains(&p.pid) || !session.revealed.insert((index, p.pid)));
        }
        Ok(list)
    }

    fn kind_error(&self, kind: ProcessKind) -> Option<NvmlErrorKind> {
        match kind {
            ProcessKind::Compute => self.errors.compute_processes,
            ProcessKind::Graphics => self.errors.graphics_processes,
            ProcessKind::Mps => self.errors.mps_processes,
        }
    }

    fn out(&self, p: &Process) -> ProcessOut {
        ProcessOut {
            pid: p.pid,
            used_memory_bytes: p.used_memory_mib.map(|m| m.saturating_mul(MIB)),
            gpu_instance_id: p.gpu_instance_id.filter(|_| self.mig),
        }
    }

    /// The processes NVML lists for `kind` on the whole GPU.
    pub fn processes(&self, kind: ProcessKind) -> Answer<Vec<ProcessOut>> {
        self.check(self.kind_error(kind))?;
        if self.mig && !self.mig_monitor {
            return Err(NvmlErrorKind::NoPermission);
        }
        Ok(self
            .process
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| self.out(p))
            .collect())
    }

    /// Utilization samples newer than `last_seen_us` (all of them with
    /// `ignore_last_seen`) for utilization query number `query` (0-based) of
    /// this GPU. Processes without explicit samples get one taken at `now_us`
    /// when they are busy (with `sample_every`, only on every Nth query). As in
    /// NVML, MPS clients' samples carry the MPS server's pid. NOT_FOUND when
    /// there are none.
    pub fn process_samples(
        &self,
        last_seen_us: u64,
        now_us: u64,
        query: u64,
    ) -> Answer<Vec<SampleOut>> {
        self.check(self.errors.process_utilization)?;
        if self.mig {
            return Err(NvmlErrorKind::NotSupported);
        }
        let mut out = Vec::new();
        // The MPS server's sample: the sum of its clients' (and its own).
        let mut server = (0u32, 0u32, false);
        for p in &self.process {
            let pid = match (p.kind, self.mps_server) {
                (ProcessKind::Mps, Some(server)) => server,
                // No server named: the clients' SM time is nobody's.
                (ProcessKind::Mps, None) => continue,
                _ => p.pid,
            };
            let credited_to_server = self.mps_server == Some(pid);
            if p.sample.is_empty() {
                let due = p
                    .sample_every
                    .is_none_or(|n| n <= 1 || query.is_multiple_of(u64::from(n)));
                if due && (p.sm_util.0 > 0 || p.mem_util.0 > 0) {
                    if credited_to_server {
                        server.0 += p.sm_util.0;
                        server.1 += p.mem_util.0;
                        server.2 = true;
                    } else {
                        out.push(SampleOut {
                            pid,
                            timestamp_us: now_us,
                            sm_util: p.sm_util.0,
                            mem_util: p.mem_util.0,
                        });
                    }
                }
                continue;
            }
            out.extend(
                p.sample
                    .iter()
                    .filter(|s| self.ignore_last_seen || s.timestamp_us > last_seen_us)
                    .map(|s| SampleOut {
                        pid,
                        timestamp_us: s.timestamp_us,
                        sm_util: s.sm_util,
                        mem_util: s.mem_util,
                    }),
            );
        }
        if let (Some(pid), (sm, mem, true)) = (self.mps_server, server) {
            out.push(SampleOut {
                pid,
                timestamp_us: now_us,
                sm_util: sm.min(100),
                mem_util: mem.min(100),
            });
        }
        if out.is_empty() {
            return Err(NvmlErrorKind::NotFound);
        }
        Ok(out)
    }

    /// (TX, RX) KB/s over PCIe.
    pub fn pcie_kbps(&self) -> Answer<(u32, u32)> {
        self.check(self.errors.pcie)?;
        match (self.pcie_tx_kbps, self.pcie_rx_kbps) {
            (Some(tx), Some(rx)) => Ok((tx, rx)),
            _ => Err(NvmlErrorKind::NotSupported),
        }
    }

    /// The cumulative (TX, RX) NVLink data counters in KiB at `now_us`,
    /// growing at `nvlink_tx_mbps` / `nvlink_rx_mbps`.
    pub fn nvlink_kib(&self, now_us: u64) -> Answer<(u64, u64)> {
        self.check(self.errors.nvlink)?;
        let counter = |mbps: f64| (mbps * 1e6 / 1024.0 * (now_us as f64 / 1e6)) as u64;
        match (self.nvlink_tx_mbps, self.nvlink_rx_mbps) {
            (Some(tx), Some(rx)) if tx >= 0.0 && rx >= 0.0 => Ok((counter(tx), counter(rx))),
            _ => Err(NvmlErrorKind::NotSupported),
        }
    }

    /// The total-energy counter of GPU `index` in mJ at `now_us`, as `meters`
    /// has integrated it so far.
    pub fn energy_mj(
        &self,
        index: u32,
        now_us: u64,
        reloads: u32,
        meters: &mut EnergyMeters,
    ) -> Answer<u64> {
        self.check(self.errors.energy)?;
        if self.energy_mj.is_none() && self.power_w.is_none() {
            return Err(NvmlErrorKind::NotSupported);
        }
        if meters.reloads != reloads {
            // The driver was reloaded: every counter starts again.
            meters.reloads = reloads;
            meters.gpus.clear();
        }
        let start = self.energy_mj.unwrap_or(0) as f64;
        let (at, mj) = meters.gpus.entry(index).or_insert((now_us, start));
        if now_us > *at {
            *mj += self.energy_between_mj(*at, now_us);
            *at = now_us;
        }
        Ok(*mj as u64)
    }
}

/// The total-energy counters of a fake driver, integrated between reads. They
/// outlive NVML sessions (a counter counts since the driver loaded, not since
/// a caller initialised NVML) and restart when the driver is reloaded.
#[derive(Clone, Debug, Default)]
pub struct EnergyMeters {
    reloads: u32,
    /// Per GPU index: (µs of the last read, mJ then).
    gpus: std::collections::HashMap<u32, (u64, f64)>,
}

/// What a fake driver remembers between calls for one initialised session:
/// which `late` processes a size query has missed, and how many utilization
/// queries each GPU has answered.
#[derive(Clone, Debug, Default)]
pub struct Session {
    revealed: std::collections::HashSet<(u32, u32)>,
    queries: std::collections::HashMap<u32, u64>,
    gpm: std::collections::HashSet<(u32, u32)>,
}

impl Session {
    /// The number (0-based) of this utilization query of GPU `index`.
    /// Whether MIG instance `gi` of GPU `index` was GPM-sampled before in this
    /// session (GPM figures need two samples); records this one.
    pub fn gpm_sampled_before(&mut self, index: u32, gi: u32) -> bool {
        !self.gpm.insert((index, gi))
    }

    pub fn next_query(&mut self, index: u32) -> u64 {
        let n = self.queries.entry(index).or_insert(0);
        *n += 1;
        *n - 1
    }
}

impl Scenario {
    /// What `nvmlSystemGetProcessName` answers for `pid`.
    pub fn process_name(&self, pid: u32) -> Answer<String> {
        self.gpu
            .iter()
            .flat_map(|g| &g.process)
            .find(|p| p.pid == pid)
            .and_then(|p| p.name.clone())
            .ok_or(NvmlErrorKind::NotFound)
    }
}

fn milliwatts(w: Watts) -> u32 {
    // Watts::deserialize bounds the value, so this cannot saturate.
    (w.0 * 1000.0).round() as u32
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
[[gpu]]
uuid = "GPU-5c1f0000-0000-0000-0000-000000000001"   # optional, default derived from index
name = "NVIDIA H100 80GB HBM3"                       # optional
memory_total_mib = 81559
utilization = 85            # SM %
memory_utilization = 40     # memory controller %
temperature_c = 62
power_w = 420.0
power_limit_w = 700.0

[[gpu.process]]
pid = 4242
sm_util = 60
mem_util = 25
used_memory_mib = 30000
"#;

    #[test]
    fn parses_the_documented_example() {
        let s = Scenario::parse(ISSUE_EXAMPLE).expect("example parses");
        assert_eq!(s.gpu.len(), 1);
        let g = &s.gpu[0];
        assert_eq!(
            g.uuid(0).expect("uuid"),
            "GPU-5c1f0000-0000-0000-0000-000000000001"
        );
        assert_eq!(g.utilization(), Ok((85, 40)));
        assert_eq!(g.memory(), Ok((30000 * MIB, 81559 * MIB)));
        assert_eq!(g.power_mw(0), Ok(420_000));
        assert_eq!(g.power_limit_mw(), Ok(700_000));
        assert_eq!(g.temperature(), Ok(62));
        assert_eq!(g.mig_enabled(), Ok(false));
        assert_eq!(
            g.processes(ProcessKind::Compute).expect("processes"),
            vec![ProcessOut {
                pid: 4242,
                used_memory_bytes: Some(30000 * MIB),
                gpu_instance_id: None
            }]
        );
        assert_eq!(
            g.process_samples(0, 77, 0).expect("samples"),
            vec![SampleOut {
                pid: 4242,
                timestamp_us: 77,
                sm_util: 60,
                mem_util: 25
            }]
        );
    }

    #[test]
    fn the_readme_examples_parse() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("## GPU scenario files")
            .expect("README has a GPU scenario files section");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let blocks: Vec<&str> = section
            .split("```toml\n")
            .skip(1)
            .map(|b| b.split("```").next().expect("closed block"))
            .collect();
        assert_eq!(blocks.len(), 2, "the format and the test-only keys");
        for block in blocks {
            let s = Scenario::parse(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
            assert!(!s.gpu.is_empty());
        }
    }

    #[test]
    fn defaults_are_derived_not_guessed() {
        let s = Scenario::parse("[[gpu]]\n[[gpu]]\n").expect("parses");
        assert_eq!(
            s.gpu[1].uuid(1).expect("uuid"),
            "GPU-00000000-0000-0000-0000-000000000001"
        );
        // Figures the file does not give are "not supported", never zero.
        assert_eq!(s.gpu[0].utilization(), Err(NvmlErrorKind::NotSupported));
        assert_eq!(s.gpu[0].memory(), Err(NvmlErrorKind::NotSupported));
        assert_eq!(s.gpu[0].power_mw(0), Err(NvmlErrorKind::NotSupported));
        assert_eq!(
            s.gpu[0].process_samples(0, 1, 0),
            Err(NvmlErrorKind::NotFound)
        );
        assert_eq!(s.device_count(), Ok(2));
    }

    #[test]
    fn percent_over_100_names_its_line() {
        let err = Scenario::parse("[[gpu]]\nutilization = 50\n\n[[gpu]]\nutilization = 150\n")
            .expect_err("150 is not a percentage");
        assert_eq!(err.line, 5, "{err}");
        assert!(err.message.contains("150 is not a percentage"), "{err}");
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_their_line() {
        let err = Scenario::parse("[[gpu]]\nname = \"a\"\nutilisation = 3\n").expect_err("typo");
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("utilisation"), "{err}");

        let err = Scenario::parse("[[gpu]]\n\n[[gpu.process]]\npid = = 1\n").expect_err("syntax");
        assert_eq!((err.line, err.column), (4, 7), "{err}");

        let err = Scenario::parse("[[gpu]]\npower_w = -3.0\n").expect_err("negative power");
        assert_eq!(err.line, 2, "{err}");
    }

    #[test]
    fn injected_errors_apply_per_call_and_all_covers_the_rest() {
        let s = Scenario::parse(
            "[[gpu]]\nutilization = 5\nmemory_utilization = 1\nmemory_total_mib = 10\n[gpu.errors]\nall = \"GPU_IS_LOST\"\nmemory = \"UNKNOWN\"\n",
        )
        .expect("parses");
        let g = &s.gpu[0];
        assert_eq!(g.utilization(), Err(NvmlErrorKind::GpuIsLost));
        assert_eq!(g.memory(), Err(NvmlErrorKind::Unknown));
        assert_eq!(s.device(0).err(), Some(NvmlErrorKind::GpuIsLost));
        assert_eq!(s.device(1).err(), Some(NvmlErrorKind::NotFound));
        assert_eq!(NvmlErrorKind::GpuIsLost.code(), 15);
    }

    #[test]
    fn samples_respect_last_seen_unless_told_not_to() {
        let text = "[[gpu]]\n[[gpu.process]]\npid = 7\nsample = [{ timestamp_us = 10, sm_util = 40 }, { timestamp_us = 20, sm_util = 160 }]\n";
        let s = Scenario::parse(text).expect("parses");
        let pids: Vec<u64> = s.gpu[0]
            .process_samples(10, 99, 0)
            .expect("one newer sample")
            .iter()
            .map(|s| s.timestamp_us)
            .collect();
        assert_eq!(pids, vec![20]);
        assert_eq!(
            s.gpu[0].process_samples(20, 99, 0),
            Err(NvmlErrorKind::NotFound)
        );

        let s = Scenario::parse(&text.replace("[[gpu]]\n", "[[gpu]]\nignore_last_seen = true\n"))
            .expect("parses");
        assert_eq!(s.gpu[0].process_samples(20, 99, 0).expect("all").len(), 2);
    }

    #[test]
    fn mig_reports_instances_and_refuses_the_parent_without_privilege() {
        let text = "[[gpu]]\nname = \"H200\"\nmig = true\nutilization = 50\nmemory_total_mib = 143771\n\
             [[gpu.mig_instance]]\ngpu_instance_id = 3\nprofile = \"1g.18gb\"\nmemory_total_mib = 16384\nsm_util = 70\n\
             [[gpu.process]]\npid = 1\nsm_util = 10\ngpu_instance_id = 3\nused_memory_mib = 2\n";
        let s = Scenario::parse(text).expect("parses");
        let g = &s.gpu[0];
        assert_eq!(g.utilization(), Err(NvmlErrorKind::NotSupported));
        assert_eq!(g.process_samples(0, 1, 0), Err(NvmlErrorKind::NotSupported));
        assert_eq!(
            g.processes(ProcessKind::Compute),
            Err(NvmlErrorKind::NoPermission)
        );
        assert_eq!(g.memory(), Err(NvmlErrorKind::NoPermission));
        let mut session = Session::default();
        let listed = g
            .processes_seen(ProcessKind::Compute, 0, Some(3), false, &mut session)
            .expect("the instance's own handle answers");
        assert_eq!(listed[0].gpu_instance_id, Some(3));
        assert_eq!(g.instance_memory(3), Ok((2 * MIB, 16384 * MIB)));
        assert_eq!(g.instance_name(3).as_deref(), Ok("H200 MIG 1g.18gb"));
        assert_eq!(g.gpm_sm_util(3), Err(NvmlErrorKind::NotSupported), "no GPM");

        let s = Scenario::parse(
            &text.replace("mig = true", "mig = true\nmig_monitor = true\ngpm = true"),
        )
        .expect("parses");
        let g = &s.gpu[0];
        assert_eq!(
            g.processes(ProcessKind::Compute).expect("privileged").len(),
            1
        );
        assert_eq!(g.gpm_sm_util(3), Ok(70));
    }

    #[test]
    fn mps_clients_samples_carry_the_servers_pid() {
        let s = Scenario::parse(
            "[[gpu]]\nmps_server = 900\n\
             [[gpu.process]]\npid = 900\nname = \"/usr/bin/nvidia-cuda-mps-server\"\nused_memory_mib = 30\n\
             [[gpu.process]]\npid = 11\nkind = \"mps\"\nsm_util = 40\nused_memory_mib = 1000\n\
             [[gpu.process]]\npid = 12\nkind = \"mps\"\nsm_util = 70\nmem_util = 5\nused_memory_mib = 2000\n",
        )
        .expect("parses");
        let g = &s.gpu[0];
        assert_eq!(
            g.process_samples(0, 5, 0).expect("samples"),
            vec![SampleOut {
                pid: 900,
                timestamp_us: 5,
                sm_util: 100,
                mem_util: 5
            }],
            "one sample for the server, capped at 100"
        );
        let clients: Vec<u32> = g
            .processes(ProcessKind::Mps)
            .expect("MPS list")
            .iter()
            .map(|p| p.pid)
            .collect();
        assert_eq!(clients, vec![11, 12]);
        assert_eq!(
            s.process_name(900).as_deref(),
            Ok("/usr/bin/nvidia-cuda-mps-server")
        );
        assert_eq!(s.process_name(11), Err(NvmlErrorKind::NotFound));
    }

    #[test]
    fn slow_samples_and_late_processes() {
        let s = Scenario::parse(
            "[[gpu]]\n[[gpu.process]]\npid = 1\nsm_util = 50\nsample_every = 3\n\
             [[gpu.process]]\npid = 2\nkind = \"mps\"\nlate = true\n",
        )
        .expect("parses");
        let g = &s.gpu[0];
        let got: Vec<bool> = (0..6).map(|q| g.process_samples(0, 1, q).is_ok()).collect();
        assert_eq!(got, vec![true, false, false, true, false, false]);
        let mut session = Session::default();
        let seen = |size, session: &mut Session| {
            g.processes_seen(ProcessKind::Mps, 0, None, size, session)
                .expect("list")
                .len()
        };
        assert_eq!(
            seen(true, &mut session),
            0,
            "the first size query misses it"
        );
        assert_eq!(seen(false, &mut session), 1, "the fill lists it");
        assert_eq!(seen(true, &mut session), 1, "from then on it is counted");
        let mut fresh = Session::default();
        assert_eq!(seen(false, &mut fresh), 1, "a fill always lists it");
        assert_eq!(g.utilization_size_query, 100, "real drivers' fixed count");
    }

    #[test]
    fn counters_grow_at_their_rates() {
        let s = Scenario::parse(
            "[[gpu]]\npower_w = 200.0\nnvlink_tx_mbps = 1024.0\nnvlink_rx_mbps = 0.0\npcie_tx_kbps = 5\npcie_rx_kbps = 6\n",
        )
        .expect("parses");
        let g = &s.gpu[0];
        let (a, _) = g.nvlink_kib(1_000_000).expect("nvlink");
        let (b, rx) = g.nvlink_kib(2_000_000).expect("nvlink");
        assert_eq!(b - a, 1_000_000, "1024 MB/s for 1 s is 10^6 KiB");
        assert_eq!(rx, 0);
        let mut meters = EnergyMeters::default();
        let e1 = g.energy_mj(0, 1_000_000, 0, &mut meters).expect("energy");
        let e2 = g.energy_mj(0, 3_000_000, 0, &mut meters).expect("energy");
        assert_eq!((e1, e2), (0, 400_000), "200 W for 2 s is 400 J");
        assert_eq!(g.pcie_kbps(), Ok((5, 6)));
        assert_eq!(
            Scenario::parse("[[gpu]]\n").expect("parses").gpu[0].energy_mj(0, 1, 0, &mut meters),
            Err(NvmlErrorKind::NotSupported)
        );
    }

    #[test]
    fn the_energy_counter_integrates_the_power_drawn() {
        let s = |text: &str| Scenario::parse(text).expect("parses").gpu.remove(0);
        let steady = s("[[gpu]]\npower_w = 300.0\nenergy_mj = 1000\n");
        let mut meters = EnergyMeters::default();
        assert_eq!(steady.energy_mj(0, 5_000_000, 0, &mut meters), Ok(1000));
        assert_eq!(steady.energy_mj(0, 6_000_000, 0, &mut meters), Ok(301_000));
        // A new power changes the slope, never the value.
        let lower = s("[[gpu]]\npower_w = 100.0\nenergy_mj = 1000\n");
        assert_eq!(lower.energy_mj(0, 7_000_000, 0, &mut meters), Ok(401_000));
        // A driver reload starts it again.
        assert_eq!(lower.energy_mj(0, 8_000_000, 1, &mut meters), Ok(1000));
        // With a ripple the instants vary and the counter averages them: over
        // whole periods the ripple adds nothing.
        let rippled =
            s("[[gpu]]\npower_w = 200.0\npower_ripple_w = 50.0\npower_ripple_period_ms = 400\n");
        let mut meters = EnergyMeters::default();
        let start = 10_000_000;
        let e0 = rippled.energy_mj(0, start, 0, &mut meters).expect("energy");
        let e1 = rippled
            .energy_mj(0, start + 4_000_000, 0, &mut meters)
            .expect("energy");
        assert_eq!(e1 - e0, 800_000, "4 s at a mean of 200 W");
        let instants: Vec<f64> = (0..4)
            .map(|i| rippled.power_at(start + 100_000 * i).expect("power"))
            .collect();
        assert_eq!(instants, [200.0, 250.0, 200.0, 150.0]);
        // A quarter period: 200 W x 0.1 s + 50 W x 0.4 s / 2 pi.
        let mut meters = EnergyMeters::default();
        rippled.energy_mj(0, start, 0, &mut meters).expect("energy");
        let q = rippled
            .energy_mj(0, start + 100_000, 0, &mut meters)
            .expect("energy");
        let expected = 20_000.0 + 50.0 * 0.4 / std::f64::consts::TAU * 1000.0;
        assert!((q as f64 - expected).abs() <= 1.0, "{q} vs {expected}");
    }
}
