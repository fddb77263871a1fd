//! Helpers for the integration tests in this directory.

pub mod cluster;
pub mod fake_nvml;
pub mod kube_api;
pub mod scaler;
