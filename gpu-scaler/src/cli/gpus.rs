//! `gpu-scaler gpus`: devices, their processes, and the pods those belong to.

#[derive(Debug, clap::Args)]
pub struct GpusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(_args: GpusArgs) -> super::Result<()> {
    Err(super::Error::Usage("gpus is not implemented yet".into()))
}
