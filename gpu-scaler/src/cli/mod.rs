//! The `gpu-scaler` command line: argument types and dispatch. `main.rs` parses
//! and calls [`run`]; each subcommand lives in its own module.

pub(crate) mod accounting;
pub(crate) mod gpu_source;
pub(crate) mod gpus;
pub(crate) mod local_attribution;
pub(crate) mod ps;
pub mod query;
pub(crate) mod serve;
pub mod top;

use clap::{Parser, Subcommand};

use crate::telemetry::LogFormat;

/// GPU-aware autoscaling for Kubernetes through KEDA.
#[derive(Debug, Parser)]
#[command(name = "gpu-scaler", version, about)]
pub struct Args {
    /// Log format on stderr.
    #[arg(
        long,
        env = "GPU_SCALER_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon: attribution, GPU sampling and the KEDA scaler.
    Serve(Box<serve::ServeArgs>),
    /// List every process with its cgroup and pod (diagnostics).
    Ps(ps::PsArgs),
    /// Print the GPUs, their processes and the pods they belong to.
    Gpus(gpus::GpusArgs),
    /// Ask a running scaler exactly as KEDA would.
    Query(query::QueryArgs),
    /// A live view of a node's pods on its GPUs (or of a running daemon's).
    Top(top::TopArgs),
}

/// Errors a subcommand can end with; shown to the user by `main`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Attribution(#[from] crate::attribution::Error),
    #[error(transparent)]
    Gpu(#[from] crate::gpu::Error),
    #[error(transparent)]
    Daemon(#[from] crate::daemon::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A call to a running scaler failed (`query`).
    #[error("{0}")]
    Rpc(String),
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Args {
    /// The log level when `RUST_LOG` is unset: quieter for one-shot commands whose
    /// stdout is the product.
    pub fn default_log_level(&self) -> &'static str {
        match self.command {
            Command::Serve(_) => "info",
            _ => "warn",
        }
    }
}

/// Runs the parsed command to completion.
pub async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Serve(a) => serve::run(*a).await,
        Command::Ps(a) => ps::run(a).await,
        Command::Gpus(a) => gpus::run(a).await,
        Command::Query(a) => query::run(a).await,
        Command::Top(a) => top::run(a).await,
    }
}
