use std::process::ExitCode;

use clap::Parser as _;
use gpu_scaler::cli;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Args::parse();
    gpu_scaler::telemetry::init(args.log_format, args.default_log_level());
    match cli::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "gpu-scaler failed");
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
