//! `gpu-scaler ps`: every process with its cgroup and pod.

#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// One JSON object per process (per event with --watch).
    #[arg(long)]
    pub json: bool,
    /// Stream exec/exit events with their pod identity as they happen (eBPF).
    #[arg(long)]
    pub watch: bool,
}

pub async fn run(_args: PsArgs) -> super::Result<()> {
    Err(super::Error::Usage("ps is not implemented yet".into()))
}
