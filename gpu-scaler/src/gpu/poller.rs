//! The sampling loop behind [`super::start`].

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;

use super::{GpuSnapshot, GpuSource, GpuStatus};

/// Polls `source` every `interval` and publishes each outcome on `tx` until
/// every receiver is gone.
///
/// Runs on its own OS thread, not a tokio task: NVML calls block, and on a GPU
/// that is falling off the bus they can block for seconds.
pub(super) fn run(
    mut source: Box<dyn GpuSource>,
    interval: Duration,
    tx: watch::Sender<Arc<GpuStatus>>,
) {
    let mut last_good: Option<Arc<GpuSnapshot>> = None;
    let mut last_error: Option<Arc<str>> = None;
    let mut next = Instant::now();
    loop {
        let error = match source.poll() {
            Ok(snapshot) => {
                last_good = Some(Arc::new(snapshot));
                None
            }
            Err(e) => Some(Arc::<str>::from(e.to_string())),
        };
        match (&last_error, &error) {
            (None, Some(e)) => tracing::warn!(error = %e, "GPU sampling failed"),
            (Some(old), Some(e)) if old != e => tracing::warn!(error = %e, "GPU sampling failed"),
            (Some(_), None) => tracing::info!("GPU sampling recovered"),
            _ => {}
        }
        last_error = error.clone();
        let status = GpuStatus {
            last_good: last_good.clone(),
            error,
            updated_at: SystemTime::now(),
        };
        if tx.send(Arc::new(status)).is_err() {
            tracing::debug!("every GPU status reader is gone; sampling stops");
            return;
        }
        // Fixed rate; after an overrun start again from now rather than
        // catching up with a burst.
        next += interval;
        let now = Instant::now();
        if next <= now {
            next = now;
        } else {
            std::thread::sleep(next - now);
        }
    }
}
