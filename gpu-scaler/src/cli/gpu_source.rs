//! The GPU source flags, shared by `serve`, `gpus` and `top` so the three read
//! GPUs the same way from the same flags and environment.

use std::{path::PathBuf, time::Duration};

use crate::gpu;

#[derive(Debug, Clone, clap::Args)]
pub struct GpuSourceArgs {
    /// Where GPU figures come from.
    #[arg(long, env = "GPU_SCALER_GPU", value_enum, default_value_t)]
    pub gpu: gpu::SourceKind,

    /// Path of libnvidia-ml.so (default: the system's).
    #[arg(long, env = "GPU_SCALER_NVML_LIB")]
    pub nvml_lib: Option<PathBuf>,

    /// Scenario file for `--gpu mock` (format in README.md).
    #[arg(long, env = "GPU_SCALER_GPU_SCENARIO", required_if_eq("gpu", "mock"))]
    pub gpu_scenario: Option<PathBuf>,
}

impl GpuSourceArgs {
    /// The GPU configuration these flags describe, polled every `poll_interval`.
    pub fn config(&self, poll_interval: Duration) -> gpu::Config {
        gpu::Config {
            source: self.gpu,
            nvml_lib: self.nvml_lib.clone(),
            scenario: self.gpu_scenario.clone(),
            poll_interval,
        }
    }
}
