//! gpu-scaler: per-pod GPU usage on a Kubernetes node (eBPF attribution joined
//! with NVML), served to KEDA through its ExternalScaler gRPC contract.
//!
//! Dependencies point inward: `scaler`, `cluster` and `telemetry` read the
//! [`snapshot::NodeSnapshot`]s that `join` publishes from `attribution`, `gpu`
//! and `pods`; nothing outside `attribution` touches eBPF maps and nothing
//! outside `gpu` touches NVML. docs/architecture.md has the map.

pub(crate) mod accounting;
pub mod attribution;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod engine;
pub(crate) mod figures;
pub mod gpu;
pub mod join;
pub(crate) mod listener;
pub mod pods;
pub mod scaler;
pub mod snapshot;
pub mod telemetry;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub(crate) mod tls;
pub(crate) mod top;
