//! The `nvml` source: the NVIDIA driver's NVML library through nvml-wrapper,
//! loaded at run time (no link-time dependency), from `--nvml-lib` when given.
//! Calls nvml-wrapper 0.13 does not wrap (`nvmlDeviceGetProcessesUtilizationInfo`,
//! the MIG instance ids) go through its `nvml-wrapper-sys` function table.

use std::{
    cell::RefCell,
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nvml_wrapper::{
    Device, Nvml,
    enum_wrappers::device::{PcieUtilCounter, TemperatureSensor},
    enums::{device::SampleValue, gpm::GpmMetricId},
    error::NvmlError,
    gpm::{GpmSample, gpm_metrics_get},
    struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample},
    structs::device::FieldId,
    sys_exports::field_id::{
        NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX,
    },
};
use nvml_wrapper_sys::bindings::{
    nvmlGpmSample_t, nvmlProcessUtilizationInfo_v1_t, nvmlProcessesUtilizationInfo_t,
};

use super::{
    Error, GpuSnapshot, GpuSource, ProcessKind, Result,
    collector::{Collector, Driver, DriverDevice, NvResult, Samples},
};

/// nvml-wrapper's default on Linux.
const DEFAULT_LIB: &str = "libnvidia-ml.so.1";

/// `nvmlDeviceGetMigMode`'s NVML_DEVICE_MIG_ENABLE.
const MIG_ENABLE: u32 = 1;

/// NVML_STRUCT_VERSION(ProcessesUtilizationInfo, 1): the struct's size with
/// the version in the top byte.
const PROCESSES_UTILIZATION_INFO_V1: u32 =
    std::mem::size_of::<nvmlProcessesUtilizationInfo_t>() as u32 | (1 << 24);

/// NVML_ERROR_INSUFFICIENT_SIZE, NVML_ERROR_NOT_SUPPORTED,
/// NVML_ERROR_FUNCTION_NOT_FOUND, NVML_ERROR_ARGUMENT_VERSION_MISMATCH.
const INSUFFICIENT_SIZE: u32 = 7;
const NOT_SUPPORTED: u32 = 3;
const FUNCTION_NOT_FOUND: u32 = 13;
const ARGUMENT_VERSION_MISMATCH: u32 = 25;

/// After a lost GPU or a driver reload NVML is initialised again at once, and
/// then at most this often while the loss lasts (an init can take a second on
/// a machine without persistence mode).
const REINIT_EVERY: Duration = Duration::from_secs(30);

/// Samples NVML. Loading the library is retried on every poll until it works,
/// and after a pass fails as a whole (the driver went away), a GPU is lost or
/// the driver was reloaded, it is initialised anew, so the source recovers by
/// itself.
pub struct NvmlSource {
    lib_path: Option<PathBuf>,
    nvml: Option<Nvml>,
    collector: Collector,
    /// When NVML was last initialised again after a loss.
    last_reinit: Option<Instant>,
    /// The previous GPM sample of each MIG instance (by UUID), allocated by
    /// the current `nvml` and freed before it is dropped.
    gpm: RefCell<HashMap<String, nvmlGpmSample_t>>,
}

// SAFETY: the raw GPM sample handles are owned by this source alone and used
// only through its `nvml`, from whichever thread holds the source.
unsafe impl Send for NvmlSource {}

impl NvmlSource {
    /// Loads nothing yet: the first [`GpuSource::poll`] does.
    pub fn new(lib_path: Option<PathBuf>) -> Self {
        Self {
            lib_path,
            nvml: None,
            collector: Collector::default(),
            last_reinit: None,
            gpm: RefCell::new(HashMap::new()),
        }
    }

    /// Keeps a process's last sample for
    /// [`HOLD_INTERVALS`](super::collector::HOLD_INTERVALS) of `interval`.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.collector = Collector::new(interval);
        self
    }

    /// Forgets a GPU no longer enumerated after `after` (default 10 minutes).
    pub fn forget_lost_after(mut self, after: Duration) -> Self {
        self.collector.set_forget_after(after);
        self
    }

    fn init(&self) -> Result<Nvml> {
        let mut builder = Nvml::builder();
        if let Some(path) = &self.lib_path {
            builder.lib_path(path.as_os_str());
        }
        builder.init().map_err(|source| Error::Init {
            lib: self
                .lib_path
                .as_ref()
                .map_or_else(|| DEFAULT_LIB.to_owned(), |p| p.display().to_string()),
            source,
        })
    }

    /// Drops the library (nvmlShutdown), freeing what was allocated with it.
    fn release(&mut self, nvml: Nvml) {
        for (_, handle) in self.gpm.borrow_mut().drain() {
            // SAFETY: allocated through this `nvml` and not freed yet.
            let _ = unsafe { GpmSample::from_handle(&nvml, handle) }.free();
        }
        drop(nvml);
    }
}

impl Drop for NvmlSource {
    fn drop(&mut self) {
        if let Some(nvml) = self.nvml.take() {
            self.release(nvml);
        }
    }
}

impl GpuSource for NvmlSource {
    fn poll(&mut self) -> Result<GpuSnapshot> {
        if self.collector.take_reinit()
            && let Some(nvml) = self.nvml.take()
        {
            if self
                .last_reinit
                .is_some_and(|at| at.elapsed() < REINIT_EVERY)
            {
                self.nvml = Some(nvml);
            } else {
                tracing::warn!("a GPU is lost or the driver was reloaded: initialising NVML again");
                self.release(nvml);
                self.last_reinit = Some(Instant::now());
            }
        }
        let nvml = match self.nvml.take() {
            Some(nvml) => nvml,
            None => {
                let nvml = self.init()?;
                tracing::info!(lib = ?self.lib_path, "NVML loaded");
                self.collector.reinitialised();
                nvml
            }
        };
        let now_us = unix_us();
        let result = self.collector.pass(
            &NvmlDriver {
                nvml: &nvml,
                gpm: &self.gpm,
            },
            now_us,
        );
        if result.is_ok() {
            self.nvml = Some(nvml);
        } else {
            self.release(nvml);
        }
        result
    }
}

struct NvmlDriver<'a> {
    nvml: &'a Nvml,
    gpm: &'a RefCell<HashMap<String, nvmlGpmSample_t>>,
}

impl Driver for NvmlDriver<'_> {
    fn driver_version(&self) -> NvResult<String> {
        self.nvml.sys_driver_version()
    }

    fn device_count(&self) -> NvResult<u32> {
        self.nvml.device_count()
    }

    fn device(&self, index: u32) -> NvResult<Box<dyn DriverDevice + '_>> {
        Ok(Box::new(NvmlDevice {
            dev: self.nvml.device_by_index(index)?,
            driver: self,
        }))
    }

    fn process_name(&self, pid: u32) -> NvResult<String> {
        self.nvml.sys_process_name(pid, 256)
    }
}

struct NvmlDevice<'a> {
    dev: Device<'a>,
    driver: &'a NvmlDriver<'a>,
}

impl NvmlDevice<'_> {
    /// `nvmlDeviceGetProcessesUtilizationInfo` (R550+); `None` when the
    /// driver does not have it, so the legacy call is used.
    fn processes_utilization_info(
        &self,
        last_seen_us: u64,
    ) -> Option<NvResult<Vec<ProcessUtilizationSample>>> {
        let lib = self.driver.nvml.lib();
        let sym = lib.nvmlDeviceGetProcessesUtilizationInfo.as_ref().ok()?;
        // SAFETY: a handle nvml-wrapper got from this library.
        let handle = unsafe { self.dev.handle() };
        let mut info = nvmlProcessesUtilizationInfo_t {
            version: PROCESSES_UTILIZATION_INFO_V1,
            processSamplesCount: 0,
            lastSeenTimeStamp: last_seen_us,
            procUtilArray: std::ptr::null_mut(),
        };
        // SAFETY: a NULL array with count 0 is NVML's size query.
        let r = unsafe { sym(handle, &mut info) };
        match r {
            // Nothing buffered at all.
            0 => return Some(Err(NvmlError::NotFound)),
            INSUFFICIENT_SIZE => {}
            NOT_SUPPORTED | FUNCTION_NOT_FOUND | ARGUMENT_VERSION_MISMATCH => return None,
            other => return Some(Err(NvmlError::from(other))),
        }
        // The count can grow between the size query and the fill.
        for _ in 0..3 {
            let zero = nvmlProcessUtilizationInfo_v1_t {
                timeStamp: 0,
                pid: 0,
                smUtil: 0,
                memUtil: 0,
                encUtil: 0,
                decUtil: 0,
                jpgUtil: 0,
                ofaUtil: 0,
            };
            let mut buf = vec![zero; info.processSamplesCount as usize];
            info.procUtilArray = buf.as_mut_ptr();
            // SAFETY: `buf` holds processSamplesCount entries and lives
            // across the call.
            let r = unsafe { sym(handle, &mut info) };
            match r {
                0 => {
                    buf.truncate(info.processSamplesCount as usize);
                    return Some(Ok(buf
                        .into_iter()
                        .map(|s| ProcessUtilizationSample {
                            pid: s.pid,
                            timestamp: s.timeStamp,
                            sm_util: s.smUtil,
                            mem_util: s.memUtil,
                            enc_util: s.encUtil,
                            dec_util: s.decUtil,
                        })
                        .collect()));
                }
                INSUFFICIENT_SIZE => continue,
                other => return Some(Err(NvmlError::from(other))),
            }
        }
        Some(Err(NvmlError::InsufficientSize(Some(
            info.processSamplesCount as usize,
        ))))
    }

    fn instance_id(
        &self,
        f: impl FnOnce(&nvml_wrapper_sys::bindings::NvmlLib) -> Option<NvResult<u32>>,
    ) -> NvResult<u32> {
        let lib = self.driver.nvml.lib();
        f(lib).unwrap_or(Err(NvmlError::FunctionNotFound))
    }
}

impl DriverDevice for NvmlDevice<'_> {
    fn uuid(&self) -> NvResult<String> {
        self.dev.uuid()
    }

    fn name(&self) -> NvResult<String> {
        self.dev.name()
    }

    fn utilization(&self) -> NvResult<(u32, u32)> {
        self.dev.utilization_rates().map(|u| (u.gpu, u.memory))
    }

    fn memory(&self) -> NvResult<(u64, u64)> {
        self.dev.memory_info().map(|m| (m.used, m.total))
    }

    fn temperature(&self) -> NvResult<u32> {
        self.dev.temperature(TemperatureSensor::Gpu)
    }

    fn power_mw(&self) -> NvResult<u32> {
        self.dev.power_usage()
    }

    fn power_limit_mw(&self) -> NvResult<u32> {
        self.dev.enforced_power_limit()
    }

    fn mig_enabled(&self) -> NvResult<bool> {
        self.dev.mig_mode().map(|m| m.current == MIG_ENABLE)
    }

    fn processes(&self, kind: ProcessKind) -> NvResult<Vec<ProcessInfo>> {
        match kind {
            ProcessKind::Compute => self.dev.running_compute_processes(),
            ProcessKind::Graphics => self.dev.running_graphics_processes(),
            ProcessKind::Mps => self.dev.mps_running_compute_processes(),
        }
    }

    fn samples(&self, last_seen_us: u64) -> Samples {
        if let Some(samples) = self.processes_utilization_info(last_seen_us) {
            return Samples {
                call: "nvmlDeviceGetProcessesUtilizationInfo",
                samples,
            };
        }
        Samples {
            call: "nvmlDeviceGetProcessUtilization",
            samples: self.dev.process_utilization_stats(last_seen_us),
        }
    }

    fn pcie_kbps(&self) -> NvResult<(u32, u32)> {
        Ok((
            self.dev.pcie_throughput(PcieUtilCounter::Send)?,
            self.dev.pcie_throughput(PcieUtilCounter::Receive)?,
        ))
    }

    fn nvlink_kib(&self) -> NvResult<(u64, u64, u64)> {
        // Scope 0, as NVIDIA's own samples query these totals.
        let values = self.dev.field_values_for(&[
            FieldId(NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX),
            FieldId(NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX),
        ])?;
        let mut out = [(0u64, 0u64); 2];
        for (slot, v) in out.iter_mut().zip(values) {
            let v = v?;
            let value = match v.value? {
                SampleValue::U64(x) => x,
                SampleValue::U32(x) => u64::from(x),
                SampleValue::I64(x) => u64::try_from(x).map_err(|_| NvmlError::Unknown)?,
                SampleValue::F64(_) => return Err(NvmlError::Unknown),
            };
            *slot = (value, u64::try_from(v.timestamp).unwrap_or(0));
        }
        Ok((out[0].0, out[1].0, out[0].1.max(out[1].1)))
    }

    fn energy_mj(&self) -> NvResult<(u64, u64)> {
        // Timed at the read, not at the pass's start: the mean power divides
        // by the time between two reads, and later GPUs of a pass are read
        // later. The driver samples its counter somewhere inside the call
        // (an ioctl that can sleep): the midpoint is off by at most half the
        // call, where a time taken after it carries the whole call, and any
        // preemption inside it, into the mean.
        let before = unix_us();
        let mj = self.dev.total_energy_consumption()?;
        let after = unix_us();
        Ok((mj, before + after.saturating_sub(before) / 2))
    }

    fn mig_instances(&self) -> NvResult<Vec<Box<dyn DriverDevice + '_>>> {
        let max = self.dev.mig_device_count()?;
        let mut out: Vec<Box<dyn DriverDevice + '_>> = Vec::new();
        for i in 0..max {
            match self.dev.mig_device_by_index(i) {
                Ok(dev) => out.push(Box::new(NvmlDevice {
                    dev,
                    driver: self.driver,
                })),
                // Slots without an instance.
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn instance_ids(&self) -> NvResult<(u32, u32)> {
        // SAFETY: a handle nvml-wrapper got from this library.
        let handle = unsafe { self.dev.handle() };
        let gi = self.instance_id(|lib| {
            let sym = lib.nvmlDeviceGetGpuInstanceId.as_ref().ok()?;
            let mut id = 0;
            // SAFETY: writes one unsigned int.
            Some(nvml_result(unsafe { sym(handle, &mut id) }).map(|()| id))
        })?;
        let ci = self.instance_id(|lib| {
            let sym = lib.nvmlDeviceGetComputeInstanceId.as_ref().ok()?;
            let mut id = 0;
            // SAFETY: writes one unsigned int.
            Some(nvml_result(unsafe { sym(handle, &mut id) }).map(|()| id))
        })?;
        Ok((gi, ci))
    }

    fn gpm_sm_util(&self) -> NvResult<u32> {
        let parent = self.dev.mig_parent_device()?;
        if !parent.gpm_support()? {
            return Err(NvmlError::NotSupported);
        }
        let (gi, _) = self.instance_ids()?;
        let uuid = self.dev.uuid()?;
        let current = parent.gpm_mig_sample(gi)?;
        let previous = self.driver.gpm.borrow_mut().remove(&uuid);
        let Some(previous) = previous else {
            self.driver
                .gpm
                .borrow_mut()
                .insert(uuid, current.into_handle());
            return Err(NvmlError::NoData);
        };
        // SAFETY: allocated through this library by an earlier pass.
        let previous = unsafe { GpmSample::from_handle(self.driver.nvml, previous) };
        let metrics = gpm_metrics_get(
            self.driver.nvml,
            &previous,
            &current,
            &[GpmMetricId::SmUtil],
        );
        self.driver
            .gpm
            .borrow_mut()
            .insert(uuid, current.into_handle());
        let _ = previous.free();
        let value = metrics?
            .into_iter()
            .next()
            .ok_or(NvmlError::Unknown)??
            .value;
        if !value.is_finite() || value < 0.0 {
            return Err(NvmlError::Unknown);
        }
        Ok(value.round() as u32)
    }
}

fn nvml_result(code: u32) -> NvResult<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(NvmlError::from(code))
    }
}

/// The wall clock in µs since the epoch, NVML's own time base for samples (0
/// when the clock reads before the epoch).
fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}
