//! GPU devices and the processes on them, from NVML or a mock scenario.
//!
//! A [`GpuSource`] is polled on its own thread; each pass becomes an immutable
//! [`GpuSnapshot`] published to readers, which never call NVML themselves.
//! Figures that could not be read are [`Reading::Unavailable`] with the reason,
//! never zero: a wrong zero scales a workload away.

mod collector;
pub(crate) mod driver_version;
pub mod mock;
pub mod nvml;
mod poller;
pub(crate) mod scenario;

use std::{sync::Arc, time::SystemTime};

use serde::Serialize;

use crate::snapshot::Reading;

/// How a process uses a GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    Compute,
    Graphics,
    /// A client of the MPS server (listed by NVML's MPS list, memory only:
    /// NVML credits its SM time to the server).
    Mps,
}

/// One process on one GPU in one sampling pass.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuProcess {
    /// In the daemon's pid namespace (the host's, with `hostPID: true`).
    pub pid: u32,
    pub kind: ProcessKind,
    pub used_memory_mib: Reading<u64>,
    /// SM utilization % over the samples since the previous pass; the last
    /// sample while it is younger than a few poll intervals; 0 when NVML had
    /// no sample for it and the sampled processes account for the GPU's
    /// utilization (it was idle). Unavailable otherwise: a busy GPU whose
    /// processes have no sample, MIG devices, MPS clients and the MPS server
    /// (see `collector`).
    pub sm_util: Reading<u32>,
    /// Memory-controller utilization %, as `sm_util`.
    pub mem_util: Reading<u32>,
    /// MIG GPU instance the memory is reported against.
    pub gpu_instance_id: Option<u32>,
}

/// One GPU in one sampling pass.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuDevice {
    /// NVML index. A device reported lost because NVML stopped enumerating it
    /// keeps the index it last had, which another device may hold now: key by
    /// `uuid`.
    pub index: u32,
    /// As NVML last reported it; empty only for a device lost before its first
    /// successful read.
    pub uuid: String,
    pub name: String,
    pub sm_util: Reading<u32>,
    pub mem_util: Reading<u32>,
    pub memory_used_mib: Reading<u64>,
    pub memory_total_mib: Reading<u64>,
    pub temperature_c: Reading<u32>,
    pub power_w: Reading<f64>,
    pub power_limit_w: Reading<f64>,
    pub mig_enabled: bool,
    /// Set when this device is one MIG instance of a GPU (its `index` is the
    /// parent's, its `uuid` the instance's `MIG-...`, its memory the
    /// instance's own). The instance's processes are listed here, not on the
    /// parent.
    pub mig_instance: Option<MigInstance>,
    /// PCIe, NVLink and energy counters of the device.
    pub counters: DeviceCounters,
    /// Processes on this GPU. If the process list itself could not be read this
    /// is empty and `processes_error` says why.
    pub processes: Vec<GpuProcess>,
    pub processes_error: Option<Arc<str>>,
}

/// Which MIG instance a [`GpuDevice`] is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MigInstance {
    pub parent_uuid: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
}

/// Device-level throughput and energy, as NVML reports them (whole GPU: a MIG
/// instance reports them unavailable).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceCounters {
    /// `nvmlDeviceGetPcieThroughput(TX_BYTES)`: KB/s over the driver's 20 ms window.
    pub pcie_tx_kbps: Reading<u32>,
    /// `nvmlDeviceGetPcieThroughput(RX_BYTES)`.
    pub pcie_rx_kbps: Reading<u32>,
    /// NVLink data sent, MB/s over all links, from the delta of
    /// `NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX` (KiB) since the previous pass;
    /// unavailable on the first pass and on GPUs without NVLink.
    pub nvlink_tx_mbps: Reading<f64>,
    /// As `nvlink_tx_mbps`, received (`..._DATA_RX`).
    pub nvlink_rx_mbps: Reading<f64>,
    /// `nvmlDeviceGetTotalEnergyConsumption`: mJ since the driver was loaded.
    pub energy_mj: Reading<u64>,
    /// The energy counter's increase since the previous pass: unavailable on
    /// the first pass, after the counter went backwards (driver reloaded) and
    /// where the device has no counter.
    pub energy_pass: Reading<EnergyPass>,
}

/// What the total-energy counter says about the time since the previous pass.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EnergyPass {
    /// Increase of the counter, joules.
    pub joules: f64,
    /// Between the two reads, seconds (the pass clock: the wall-clock
    /// microseconds NVML stamps samples with).
    pub seconds: f64,
}

impl EnergyPass {
    /// The mean power over the interval: what the board drew on average, where
    /// `nvmlDeviceGetPowerUsage` is one instant (and on GA100 and older, a
    /// 1 s average that lags).
    pub fn watts(&self) -> f64 {
        self.joules / self.seconds
    }
}

impl Default for DeviceCounters {
    /// Everything unavailable ("not read"): for devices built by hand.
    fn default() -> Self {
        let r: Arc<str> = "not read".into();
        Self {
            pcie_tx_kbps: Reading::Unavailable(r.clone()),
            pcie_rx_kbps: Reading::Unavailable(r.clone()),
            nvlink_tx_mbps: Reading::Unavailable(r.clone()),
            nvlink_rx_mbps: Reading::Unavailable(r.clone()),
            energy_mj: Reading::Unavailable(r.clone()),
            energy_pass: Reading::Unavailable(r),
        }
    }
}

/// Everything one sampling pass saw.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GpuSnapshot {
    pub taken_at: SystemTime,
    pub devices: Vec<GpuDevice>,
}

/// What the GPU poller publishes after every pass (on a `tokio::sync::watch`).
#[derive(Clone, Debug, Serialize)]
pub struct GpuStatus {
    /// The newest snapshot that was read successfully, if any.
    pub last_good: Option<Arc<GpuSnapshot>>,
    /// Why the newest pass failed (no driver, NVML error); `None` when `last_good`
    /// is the newest pass. While this is set, `last_good` is stale.
    pub error: Option<Arc<str>>,
    /// When the newest pass finished.
    pub updated_at: SystemTime,
}

/// Which GPU source `serve` uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// The NVIDIA driver's NVML library, loaded at run time.
    #[default]
    Nvml,
    /// A scenario file (see README), re-read when it changes.
    Mock,
}

/// GPU sampling settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceKind,
    /// Overrides where libnvidia-ml.so is loaded from.
    pub nvml_lib: Option<std::path::PathBuf>,
    /// Scenario file for the mock source.
    pub scenario: Option<std::path::PathBuf>,
    pub poll_interval: std::time::Duration,
}

/// Errors of the GPU domain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("GPU source is not available: {0}")]
    Unavailable(String),
    #[error("loading NVML from {lib}: {source}{}", init_hint(.source))]
    Init {
        lib: String,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error("{call}: {source}")]
    Nvml {
        call: &'static str,
        #[source]
        source: nvml_wrapper::error::NvmlError,
    },
    #[error(transparent)]
    DriverVersion(#[from] driver_version::Error),
    #[error("GPU scenario {path}: {source}")]
    Scenario {
        path: String,
        #[source]
        source: scenario::ParseError,
    },
    #[error("reading GPU scenario {path}: {source}")]
    ScenarioIo {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to do about an `nvmlInit_v2` failure, where the error says.
fn init_hint(e: &nvml_wrapper::error::NvmlError) -> &'static str {
    use nvml_wrapper::error::NvmlError;
    match e {
        NvmlError::LibRmVersionMismatch => {
            " (the NVML library and the loaded nvidia kernel module are from different driver \
             versions, as after a driver upgrade without a reboot: reboot the node, or reload \
             the nvidia kernel modules, then restart gpu-scaler)"
        }
        NvmlError::DriverNotLoaded => " (is the NVIDIA driver installed and its module loaded?)",
        NvmlError::NoPermission => " (the daemon needs read access to /dev/nvidia*)",
        _ => "",
    }
}

/// Where GPU figures come from. One call of [`GpuSource::poll`] is one sampling
/// pass; implementations keep what must survive between passes (NVML's
/// lastSeen, the loaded library, the last scenario read).
pub trait GpuSource: Send {
    /// Samples every device once.
    fn poll(&mut self) -> Result<GpuSnapshot>;
}

/// The source `config` asks for. Nothing is loaded or read until the first poll.
pub fn source(config: &Config) -> Result<Box<dyn GpuSource>> {
    match config.source {
        SourceKind::Nvml => Ok(Box::new(
            nvml::NvmlSource::new(config.nvml_lib.clone()).with_poll_interval(config.poll_interval),
        )),
        SourceKind::Mock => match &config.scenario {
            Some(path) => Ok(Box::new(
                mock::MockSource::new(path.clone()).with_poll_interval(config.poll_interval),
            )),
            None => Err(Error::Unavailable(
                "the mock GPU source needs a scenario file (--gpu-scenario)".into(),
            )),
        },
    }
}

/// A source that cannot be built from its configuration: every poll says why.
struct Misconfigured(String);

impl GpuSource for Misconfigured {
    fn poll(&mut self) -> Result<GpuSnapshot> {
        Err(Error::Unavailable(self.0.clone()))
    }
}

/// Starts polling the configured source on its own thread and returns the
/// channel it publishes to after every pass. A source that cannot start (no
/// driver) still returns: the published status carries the error and the
/// poller keeps retrying, so it recovers by itself. Polling stops when every
/// receiver has been dropped.
pub fn start(config: Config) -> tokio::sync::watch::Receiver<Arc<GpuStatus>> {
    let pending = GpuStatus {
        last_good: None,
        error: Some("GPU source has not been polled yet".into()),
        updated_at: SystemTime::now(),
    };
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(pending));
    let source = source(&config).unwrap_or_else(|e| Box::new(Misconfigured(e.to_string())));
    let spawned = std::thread::Builder::new()
        .name("gpu-poller".into())
        .spawn(move || poller::run(source, config.poll_interval, tx));
    if let Err(e) = spawned {
        // The sender went down with the closure; hand out a channel that says why.
        let failed = GpuStatus {
            last_good: None,
            error: Some(format!("cannot start the GPU poller thread: {e}").into()),
            updated_at: SystemTime::now(),
        };
        return tokio::sync::watch::channel(Arc::new(failed)).1;
    }
    rx
}
