//! `gpu-scaler query`: call a running scaler the way KEDA does.

#[derive(Debug, clap::Args)]
pub struct QueryArgs {
    /// The scaler's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:6000")]
    pub address: String,
    /// The ScaledObject's namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Scaler metadata as KEY=VALUE pairs, as in the ScaledObject's trigger.
    pub metadata: Vec<String>,
}

pub async fn run(_args: QueryArgs) -> super::Result<()> {
    Err(super::Error::Usage("query is not implemented yet".into()))
}
