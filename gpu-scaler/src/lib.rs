//! gpu-scaler: per-pod GPU usage on a Kubernetes node (eBPF attribution joined
//! with NVML), served to KEDA through its ExternalScaler gRPC contract.
//!
//! Dependencies point inward: `scaler`, `cluster` and `telemetry` read the
//! [`snapshot::NodeSnapshot`]s that `join` publishes from `attribution`, `gpu`
//! and `pods`; nothing outside `attribution` touches eBPF maps and nothing
//! outside `gpu` touches NVML. docs/architecture.md has the map.

pub mod accounting;
pub mod attribution;
pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod engine;
pub mod figures;
pub mod gpu;
pub mod join;
pub mod listener;
pub mod pods;
pub mod scaler;
pub mod snapshot;
pub mod telemetry;
pub mod tls;
pub mod top;
