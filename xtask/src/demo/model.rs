//! The demo's load and its autoscaler: the demand curve, what one replica does
//! with its share of it, and the HPA's rule with its scale-down stabilization
//! window. Pure functions and small state, unit-tested here; the closed loop in
//! `mod.rs` feeds them what the daemon measured.

use std::collections::VecDeque;

use anyhow::{Result, bail};

/// Requests one replica runs at once (its batch slots); the rest wait.
pub const BATCH_SLOTS: f64 = 8.0;
/// SM use of a replica whose batch is full. A little under 100 so that two
/// signals (SM and queue) tell different stories: SM saturates, the queue grows.
pub const FULL_BATCH_SM: f64 = 90.0;
/// Share of a busy replica's requests waiting for their prefill at any moment:
/// a continuously batching engine admits new requests once per scheduler step.
const PREFILL_WAITING: f64 = 0.25;
/// GPU memory of a replica: vLLM pre-allocates its KV cache at start, so memory
/// is flat whatever the load (why memory is no scaling signal for it).
pub const REPLICA_MEMORY_MIB: u64 = 71_000;

/// Concurrent requests offered by the clients, over time: steps `(from_s, requests)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Demand {
    steps: Vec<(f64, f64)>,
    /// Repeats with this period (the default curve does; a given one holds its
    /// last step).
    period: Option<f64>,
}

impl Demand {
    /// Quiet, a burst that needs twice the replicas, a lull, a middle level:
    /// a scale-up, a scale-down after the window, and a second scale-up each
    /// 3.5-minute cycle.
    pub fn default_cycle() -> Self {
        Self {
            steps: vec![(0.0, 10.0), (30.0, 32.0), (90.0, 12.0), (150.0, 24.0)],
            period: Some(210.0),
        }
    }

    /// `T:N,T:N,...`: N concurrent requests from second T on (T ascending, the
    /// first 0).
    pub fn parse(spec: &str) -> Result<Self> {
        let mut steps = Vec::new();
        for part in spec.split(',') {
            let Some((t, n)) = part.trim().split_once(':') else {
                bail!("--demand: {part:?} is not SECONDS:REQUESTS (e.g. 0:10,30:32)");
            };
            let (Ok(t), Ok(n)) = (t.trim().parse::<f64>(), n.trim().parse::<f64>()) else {
                bail!("--demand: {part:?}: SECONDS and REQUESTS must be numbers");
            };
            if !(t.is_finite() && n.is_finite() && t >= 0.0 && (0.0..=10_000.0).contains(&n)) {
                bail!("--demand: {part:?}: need SECONDS >= 0 and 0 <= REQUESTS <= 10000");
            }
            if steps.last().is_some_and(|&(prev, _)| t <= prev) {
                bail!("--demand: times must increase ({part:?})");
            }
            steps.push((t, n));
        }
        if steps.first().is_none_or(|&(t, _)| t != 0.0) {
            bail!("--demand: the first step must start at 0 (e.g. 0:10,30:32)");
        }
        Ok(Self {
            steps,
            period: None,
        })
    }

    /// Concurrent requests at `t` seconds.
    pub fn at(&self, t: f64) -> f64 {
        let t = self.period.map_or(t, |p| t.rem_euclid(p));
        self.steps
            .iter()
            .take_while(|&&(from, _)| from <= t)
            .last()
            .map_or(0.0, |&(_, n)| n)
    }
}

/// What one replica is doing with its share of the demand: the figures its
/// engine exposes and the mock GPU reports for its process.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ReplicaLoad {
    /// `vllm:num_requests_running`.
    pub running: u32,
    /// `vllm:num_requests_waiting`: prefill waits, plus all that overflow the batch.
    pub waiting: u32,
    /// `vllm:kv_cache_usage_perc` (0-1): follows the batch.
    pub kv_cache: f64,
    /// SM % of its process.
    pub sm: u32,
}

/// The load of each of `replicas` replicas when the clients keep `demand`
/// requests in flight (a Service spreads them evenly).
pub fn replica_load(demand: f64, replicas: u32) -> ReplicaLoad {
    if replicas == 0 {
        return ReplicaLoad {
            running: 0,
            waiting: 0,
            kv_cache: 0.0,
            sm: 0,
        };
    }
    let share = demand / f64::from(replicas);
    let running = share.min(BATCH_SLOTS);
    let waiting = PREFILL_WAITING * running + (share - BATCH_SLOTS).max(0.0);
    ReplicaLoad {
        running: running.round() as u32,
        waiting: waiting.round() as u32,
        kv_cache: (running / BATCH_SLOTS * 0.95).min(1.0),
        sm: (FULL_BATCH_SM * running / BATCH_SLOTS).round() as u32,
    }
}

/// The HPA's scale-down stabilization: it scales down only to the highest
/// recommendation of the last `window` seconds, so a dip does not remove
/// replicas that a moment later are needed again (`behavior.scaleDown.
/// stabilizationWindowSeconds`, 300 s by default). Scale-up has no window by
/// default and follows a recommendation at once.
#[derive(Debug)]
pub struct Stabilizer {
    window: f64,
    /// (time, recommendation), oldest first, none older than `window`.
    recent: VecDeque<(f64, u32)>,
}

impl Stabilizer {
    /// Starts at `t` with `current` replicas, which count as a recommendation:
    /// a workload is not scaled down the moment its autoscaler appears.
    pub fn new(window_s: f64, t: f64, current: u32) -> Self {
        Self {
            window: window_s,
            recent: VecDeque::from([(t, current)]),
        }
    }

    /// The replicas to set at `t`, from `current`, given this evaluation's
    /// recommendation (the HPA's rule applied to the metric).
    pub fn decide(&mut self, t: f64, current: u32, recommendation: u32) -> u32 {
        while self
            .recent
            .front()
            .is_some_and(|&(at, _)| at <= t - self.window)
        {
            self.recent.pop_front();
        }
        self.recent.push_back((t, recommendation));
        if recommendation >= current {
            return recommendation;
        }
        let highest = self
            .recent
            .iter()
            .map(|&(_, r)| r)
            .max()
            .unwrap_or(recommendation);
        highest.min(current)
    }
}

/// One character per sample, its height the replicas relative to `max`.
pub fn sparkline(samples: impl IntoIterator<Item = u32>, max: u32) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    samples
        .into_iter()
        .map(|r| {
            if r == 0 {
                ' '
            } else {
                let i = (u64::from(r) * 8).div_ceil(u64::from(max.max(1))) as usize;
                BARS[i.clamp(1, 8) - 1]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_steps_and_cycle() {
        let d = Demand::parse("0:10, 12:32,25:8").expect("parses");
        assert_eq!(d.at(0.0), 10.0);
        assert_eq!(d.at(11.9), 10.0);
        assert_eq!(d.at(12.0), 32.0);
        assert_eq!(d.at(1000.0), 8.0, "a given curve holds its last step");
        let c = Demand::default_cycle();
        assert_eq!(c.at(31.0), 32.0);
        assert_eq!(c.at(210.0 + 31.0), 32.0, "the default curve repeats");
    }

    #[test]
    fn bad_demand_is_a_clear_error() {
        for (spec, says) in [
            ("", "SECONDS:REQUESTS"),
            ("0:10,x:3", "numbers"),
            ("5:10", "start at 0"),
            ("0:10,5:3,5:4", "increase"),
            ("0:-1", "REQUESTS"),
            ("0:NaN", "REQUESTS"),
        ] {
            let e = Demand::parse(spec).expect_err(spec).to_string();
            assert!(e.contains(says), "{spec:?}: {e}");
        }
    }

    #[test]
    fn load_splits_and_overflows() {
        // 32 requests on 3 replicas: 10.7 each, 8 run, 2.7 overflow + 2 prefill.
        let l = replica_load(32.0, 3);
        assert_eq!((l.running, l.waiting, l.sm), (8, 5, 90));
        // On 6 replicas: 5.3 each, nothing overflows.
        let l = replica_load(32.0, 6);
        assert_eq!((l.running, l.waiting, l.sm), (5, 1, 60));
        assert_eq!(replica_load(32.0, 0).running, 0);
    }

    #[test]
    fn scale_down_waits_for_the_window() {
        let mut s = Stabilizer::new(10.0, 0.0, 3);
        assert_eq!(s.decide(0.0, 3, 6), 6, "scale-up at once");
        assert_eq!(s.decide(1.0, 6, 6), 6);
        // Recommendations drop to 2 from t=2: held at 6 while 6 is in the window.
        for t in 2..=10 {
            assert_eq!(s.decide(f64::from(t), 6, 2), 6, "t={t}");
        }
        // t=11: the last 6 (t=1) has left the window.
        assert_eq!(s.decide(11.0, 6, 2), 2);
        // A dip to 1 is held at the highest recommendation still in the window.
        let mut s = Stabilizer::new(10.0, 0.0, 4);
        s.decide(1.0, 4, 3);
        assert_eq!(s.decide(10.5, 4, 1), 3, "t=1's 3 is still within 10 s");
        // The starting replicas count: no scale-down before a window has passed.
        let mut s = Stabilizer::new(10.0, 0.0, 3);
        assert_eq!(s.decide(1.0, 3, 1), 3);
        assert_eq!(s.decide(10.0, 3, 1), 1);
    }

    #[test]
    fn sparkline_heights() {
        assert_eq!(sparkline([1, 4, 8, 0], 8), "▁▄█ ");
        assert_eq!(sparkline([7, 7], 7), "██");
    }
}
