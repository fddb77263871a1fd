//! The `nvml` source: the NVIDIA driver's NVML library through nvml-wrapper,
//! loaded at run time (no link-time dependency), from `--nvml-lib` when given.

use std::path::PathBuf;

use nvml_wrapper::{
    Device, Nvml,
    enum_wrappers::device::TemperatureSensor,
    struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample},
};

use super::{
    Error, GpuSnapshot, GpuSource, ProcessKind, Result,
    collector::{Collector, Driver, DriverDevice, NvResult},
};

/// nvml-wrapper's default on Linux.
const DEFAULT_LIB: &str = "libnvidia-ml.so.1";

/// `nvmlDeviceGetMigMode`'s NVML_DEVICE_MIG_ENABLE.
const MIG_ENABLE: u32 = 1;

/// Samples NVML. Loading the library is retried on every poll until it works,
/// and after a pass fails as a whole (the driver went away) it is loaded anew,
/// so the source recovers by itself.
pub struct NvmlSource {
    lib_path: Option<PathBuf>,
    nvml: Option<Nvml>,
    collector: Collector,
}

impl NvmlSource {
    /// Loads nothing yet: the first [`GpuSource::poll`] does.
    pub fn new(lib_path: Option<PathBuf>) -> Self {
        Self {
            lib_path,
            nvml: None,
            collector: Collector::default(),
        }
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
}

impl GpuSource for NvmlSource {
    fn poll(&mut self) -> Result<GpuSnapshot> {
        let nvml = match self.nvml.take() {
            Some(nvml) => nvml,
            None => {
                let nvml = self.init()?;
                tracing::info!(lib = ?self.lib_path, "NVML loaded");
                nvml
            }
        };
        let result = self.collector.pass(&mut NvmlDriver(&nvml));
        if result.is_ok() {
            self.nvml = Some(nvml);
        }
        result
    }
}

struct NvmlDriver<'a>(&'a Nvml);

impl Driver for NvmlDriver<'_> {
    fn device_count(&mut self) -> NvResult<u32> {
        self.0.device_count()
    }

    fn device(&self, index: u32) -> NvResult<Box<dyn DriverDevice + '_>> {
        Ok(Box::new(self.0.device_by_index(index)?))
    }
}

impl DriverDevice for Device<'_> {
    fn uuid(&self) -> NvResult<String> {
        Device::uuid(self)
    }

    fn name(&self) -> NvResult<String> {
        Device::name(self)
    }

    fn utilization(&self) -> NvResult<(u32, u32)> {
        self.utilization_rates().map(|u| (u.gpu, u.memory))
    }

    fn memory(&self) -> NvResult<(u64, u64)> {
        self.memory_info().map(|m| (m.used, m.total))
    }

    fn temperature(&self) -> NvResult<u32> {
        Device::temperature(self, TemperatureSensor::Gpu)
    }

    fn power_mw(&self) -> NvResult<u32> {
        self.power_usage()
    }

    fn power_limit_mw(&self) -> NvResult<u32> {
        self.enforced_power_limit()
    }

    fn mig_enabled(&self) -> NvResult<bool> {
        self.mig_mode().map(|m| m.current == MIG_ENABLE)
    }

    fn processes(&self, kind: ProcessKind) -> NvResult<Vec<ProcessInfo>> {
        match kind {
            ProcessKind::Compute => self.running_compute_processes(),
            ProcessKind::Graphics => self.running_graphics_processes(),
            ProcessKind::Mps => self.mps_running_compute_processes(),
        }
    }

    fn samples(&self, last_seen_us: u64) -> NvResult<Vec<ProcessUtilizationSample>> {
        self.process_utilization_stats(last_seen_us)
    }
}
