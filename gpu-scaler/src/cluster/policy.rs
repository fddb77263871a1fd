//! What a node that does not answer counts as.
//!
//! `average` (the default): when at least half of the workload's pods reported,
//! each pod that did not report counts as the average of the pods that did, so
//! one slow node neither scales the workload down (as a zero would) nor stalls
//! scaling; with fewer reports the answer is UNAVAILABLE. `fail`: any pod without
//! a report makes the answer UNAVAILABLE. KEDA keeps the last replica count while
//! a scaler is UNAVAILABLE.

use std::sync::{
    Arc, OnceLock,
    atomic::{AtomicU64, Ordering},
};

use super::{
    Error, Result,
    discovery::{PeerBook, PeerCensus},
};

/// `--missing-node-policy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MissingNodePolicy {
    /// Count missing pods as the average of the reported ones if at least half of
    /// the workload's pods reported; otherwise UNAVAILABLE.
    #[default]
    Average,
    /// Any missing pod makes the answer UNAVAILABLE.
    Fail,
}

impl MissingNodePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Average => "average",
            Self::Fail => "fail",
        }
    }

    /// Decides, from counts alone, whether an answer with `missing` of `total`
    /// pods unreported may be given. `Ok(n)`: count `n` pods as the average of the
    /// reported ones.
    pub fn admit(self, total: usize, missing: usize) -> Result<usize> {
        if missing == 0 {
            return Ok(0);
        }
        let reported = total - missing;
        match self {
            Self::Fail => Err(Error::Unavailable(format!(
                "{missing} of {total} pods of the workload have no report (--missing-node-policy fail)"
            ))),
            Self::Average if reported > 0 && reported * 2 >= total => Ok(missing),
            Self::Average => Err(Error::Unavailable(format!(
                "only {reported} of {total} pods of the workload reported, fewer than half \
                 (--missing-node-policy average)"
            ))),
        }
    }
}

/// Counters of the cluster path, for /metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Peer RPCs sent.
    pub peer_requests: AtomicU64,
    /// Peer RPCs that failed or timed out.
    pub peer_failures: AtomicU64,
    /// Fan-outs run (one per workload per cache period, however many queries).
    pub fanouts: AtomicU64,
    /// Queries answered from a fan-out that was running or cached.
    pub fanouts_shared: AtomicU64,
    /// Answers in which unreported pods were counted as the average.
    pub missing_averaged: AtomicU64,
    /// Answers refused as UNAVAILABLE because of unreported pods.
    pub missing_refused: AtomicU64,
    /// Latency of one peer RPC, failed ones included.
    pub peer_latency: Latency,
    /// Latency of one whole fan-out, slowest peer included.
    pub fanout_latency: Latency,
    /// The peer book the fan-out asks, for the peers gauge.
    pub peers: KnownPeers,
}

/// The cluster's peer book as /metrics reads it: set once by
/// [`super::start`], read at scrape time so the gauge is never stale.
#[derive(Default)]
pub struct KnownPeers(OnceLock<Arc<dyn PeerBook>>);

impl KnownPeers {
    /// Follows `book`; a second call keeps the first book.
    pub fn set(&self, book: Arc<dyn PeerBook>) {
        let _ = self.0.set(book);
    }

    /// The book's peers by readiness; `None` before [`Self::set`].
    pub fn census(&self) -> Option<PeerCensus> {
        self.0.get().map(|b| b.census())
    }
}

impl std::fmt::Debug for KnownPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("KnownPeers").field(&self.census()).finish()
    }
}

/// Upper bounds (seconds) of [`Latency`]'s buckets: 1 ms .. ~8 s.
pub const LATENCY_BOUNDS: [f64; 14] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192,
];

/// A latency histogram of atomics (lock-free to record, read for /metrics).
#[derive(Debug, Default)]
pub struct Latency {
    /// Per bucket of [`LATENCY_BOUNDS`], the last one for larger values.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

impl Latency {
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds, the
    /// last at +Inf), not cumulative.
    pub fn read(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let counts: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed)))
            .collect();
        let count = counts.iter().map(|(_, n)| n).sum();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, counts)
    }
}

impl Stats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets() {
        let l = Latency::default();
        l.observe(std::time::Duration::from_micros(500));
        l.observe(std::time::Duration::from_millis(3));
        l.observe(std::time::Duration::from_secs(60));
        let (sum, count, buckets) = l.read();
        assert_eq!(count, 3);
        assert!((sum - 60.0035).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets[2], (0.004, 1));
        assert_eq!(*buckets.last().expect("+Inf"), (f64::INFINITY, 1));
    }

    #[test]
    fn average_needs_half_the_pods() {
        let p = MissingNodePolicy::Average;
        assert_eq!(p.admit(4, 0).expect("all reported"), 0);
        assert_eq!(p.admit(4, 2).expect("half reported"), 2);
        assert_eq!(p.admit(3, 1).expect("two of three"), 1);
        let e = p.admit(3, 2).expect_err("one of three");
        assert!(e.to_string().contains("only 1 of 3"), "{e}");
        assert!(
            p.admit(2, 2).is_err(),
            "nothing reported is never an answer"
        );
    }

    #[test]
    fn fail_refuses_any_gap() {
        assert_eq!(MissingNodePolicy::Fail.admit(5, 0).expect("complete"), 0);
        let e = MissingNodePolicy::Fail.admit(5, 1).expect_err("gap");
        assert!(e.to_string().contains("1 of 5"), "{e}");
    }
}
