//! KEDA's ExternalScaler: ScaledObject metadata -> query -> one number.

/// Code generated from `proto/externalscaler.proto` by build.rs.
pub mod proto {
    tonic::include_proto!("externalscaler");
}
