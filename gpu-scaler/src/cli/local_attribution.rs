//! The attribution flag of the one-shot and inspection commands (`gpus`, `top`).

use crate::attribution;

#[derive(Debug, Clone, clap::Args)]
pub struct LocalAttributionArgs {
    /// How processes are mapped to pods. procfs by default: a look at the node
    /// needs no tracepoints (`serve` defaults to eBPF).
    #[arg(
        long,
        env = "GPU_SCALER_ATTRIBUTION",
        value_enum,
        default_value = "procfs"
    )]
    pub attribution: attribution::Mode,
}
