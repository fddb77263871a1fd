//! The ledger's flags (idle GPU holders), shared by `serve` and `top`.

use std::time::Duration;

use crate::accounting;

#[derive(Debug, Clone, clap::Args)]
pub struct AccountingArgs {
    /// A pod holding GPU memory counts as idle on that GPU while its SM
    /// utilization there is at most this, percent.
    #[arg(long, env = "GPU_SCALER_IDLE_SM_PERCENT", default_value_t = accounting::DEFAULT_IDLE_SM_PERCENT, value_parser = sm_percent)]
    pub idle_sm_percent: f64,

    /// Idle this long, a GPU holder is listed as idle (`top --idle`).
    #[arg(long, env = "GPU_SCALER_IDLE_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    pub idle_after: Duration,
}

fn sm_percent(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a percentage from 0 to 100")),
    }
}

impl AccountingArgs {
    pub fn config(&self) -> accounting::Config {
        accounting::Config {
            idle_sm_percent: self.idle_sm_percent,
            idle_after: self.idle_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_a_percentage() {
        assert_eq!(sm_percent("2.5"), Ok(2.5));
        assert!(sm_percent("101").is_err());
        assert!(sm_percent("-1").is_err());
        assert!(sm_percent("NaN").is_err());
    }
}
