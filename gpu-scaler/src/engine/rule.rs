//! How one pod's engine figure is computed from its scrapes.
//!
//! Gauges come from the newest scrape. Counters and histograms need two: the
//! previous sample of each is kept per pod, a counter's first sample is "not
//! yet available" (never 0), and a counter that went down (the engine
//! restarted) counts its new value as the increase since the restart, never a
//! negative rate.

use std::{
    collections::{HashMap, HashSet},
    time::Instant,
};

use super::{
    exposition::Kind,
    series::{Buckets, Extract, SeriesSelector},
};
use crate::snapshot::Reading;

/// A pod's figure from its scrapes.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// The first family of `alternatives` the exposition has (newer name
    /// first): the sum of its series, or their mean (`mean`, e.g. a KV-cache
    /// fraction per data-parallel engine).
    Gauge {
        alternatives: Vec<SeriesSelector>,
        mean: bool,
        /// Multiplies the result (100 for a 0-1 fraction read as a percentage).
        scale: f64,
    },
    /// Per-second increase of the sum of the counters `series` (each present
    /// one), over the window between the last two scrapes.
    Rate { series: Vec<SeriesSelector> },
    /// Increase of `num` over the increase of the sum of `den`, times `scale`;
    /// 0 when `den` did not move (nothing happened in the window).
    DeltaRatio {
        num: SeriesSelector,
        den: Vec<SeriesSelector>,
        scale: f64,
    },
    /// Decided by the family's `# TYPE`: gauge or untyped, the sum; counter,
    /// the per-second rate; histogram, over the window: the `quantile` (as
    /// PromQL's histogram_quantile interpolates it), or the mean (increase of
    /// `_sum` over increase of `_count`; 0 when nothing was observed).
    Auto {
        series: SeriesSelector,
        quantile: Option<f64>,
    },
}

/// One scrape's extracts, when it was taken.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub at: Instant,
    /// The selectors this scrape extracted (an absent extract of one of them
    /// means the family is absent; a selector not in here was not looked for).
    pub asked: HashSet<SeriesSelector>,
    pub extracts: HashMap<SeriesSelector, Extract>,
}

impl Scrape {
    /// Extracts `selectors` from one exposition.
    pub fn new(
        at: Instant,
        text: &str,
        selectors: &[&SeriesSelector],
    ) -> Result<Self, super::exposition::ParseError> {
        Ok(Self {
            at,
            asked: selectors.iter().map(|s| (*s).clone()).collect(),
            extracts: super::series::extract(text, selectors)?,
        })
    }

    fn covers(&self, rule: &Rule) -> bool {
        rule.selectors().iter().all(|s| self.asked.contains(*s))
    }
}

impl Rule {
    /// Every selector the rule reads (what a scrape must extract).
    pub fn selectors(&self) -> Vec<&SeriesSelector> {
        match self {
            Self::Gauge { alternatives, .. } => alternatives.iter().collect(),
            Self::Rate { series } => series.iter().collect(),
            Self::DeltaRatio { num, den, .. } => std::iter::once(num).chain(den).collect(),
            Self::Auto { series, .. } => vec![series],
        }
    }

    /// The figure from the newest scrape `cur` and the one before it.
    pub fn reading(&self, prev: Option<&Scrape>, cur: &Scrape) -> Reading<f64> {
        if !cur.covers(self) {
            return Reading::unavailable("not read yet: the engine is read from the next poll on");
        }
        // A previous scrape that did not look for these series is no window.
        let prev = prev.filter(|p| p.covers(self));
        match self.compute(prev, cur) {
            Ok(v) if v.is_finite() => Reading::Ok(v),
            Ok(v) => Reading::unavailable(format!("the engine reported {v}")),
            Err(reason) => Reading::unavailable(reason),
        }
    }

    fn compute(&self, prev: Option<&Scrape>, cur: &Scrape) -> Result<f64, String> {
        let absent = |s: &SeriesSelector| format!("family {s} is absent from the engine's metrics");
        match self {
            Self::Gauge {
                alternatives,
                mean,
                scale,
            } => {
                let Some(x) = alternatives.iter().find_map(|s| cur.extracts.get(s)) else {
                    let names: Vec<String> = alternatives.iter().map(ToString::to_string).collect();
                    return Err(format!(
                        "family {} is absent from the engine's metrics",
                        names.join(" (or ") + &")".repeat(names.len().saturating_sub(1))
                    ));
                };
                if *mean {
                    if x.series == 0 {
                        return Err(format!("{} has no series yet", alternatives[0]));
                    }
                    Ok(x.sum / f64::from(x.series) * scale)
                } else {
                    Ok(x.sum * scale)
                }
            }
            Self::Rate { series } => {
                let (prev, dt) = window(prev, cur)?;
                let mut any = false;
                let mut inc = 0.0;
                for s in series {
                    if let Some(c) = cur.extracts.get(s) {
                        any = true;
                        inc += increase(prev.extracts.get(s).map(|p| p.sum), c.sum);
                    }
                }
                if !any {
                    return Err(absent(&series[0]));
                }
                Ok(inc / dt)
            }
            Self::DeltaRatio { num, den, scale } => {
                let (prev, _) = window(prev, cur)?;
                let n = cur.extracts.get(num).ok_or_else(|| absent(num))?;
                let mut d = 0.0;
                let mut any = false;
                for s in den {
                    if let Some(c) = cur.extracts.get(s) {
                        any = true;
                        d += increase(prev.extracts.get(s).map(|p| p.sum), c.sum);
                    }
                }
                if !any {
                    return Err(absent(&den[0]));
                }
                if d <= 0.0 {
                    return Ok(0.0);
                }
                Ok(increase(prev.extracts.get(num).map(|p| p.sum), n.sum) / d * scale)
            }
            Self::Auto { series, quantile } => {
                let x = cur.extracts.get(series).ok_or_else(|| absent(series))?;
                match x.kind {
                    Kind::Gauge | Kind::Untyped => Ok(x.sum),
                    Kind::Counter => Self::Rate {
                        series: vec![series.clone()],
                    }
                    .compute(prev, cur),
                    Kind::Histogram => histogram(series, *quantile, prev, cur),
                    Kind::GaugeHistogram => Ok(mean_or_quantile(
                        x.buckets.as_ref().ok_or_else(|| absent(series))?,
                        *quantile,
                    )),
                    other => Err(format!(
                        "family {series} is a {other}; gauges, counters and histograms can be read"
                    )),
                }
            }
        }
    }
}

/// The previous scrape and the seconds since it, or why there is none.
fn window<'a>(prev: Option<&'a Scrape>, cur: &Scrape) -> Result<(&'a Scrape, f64), String> {
    let prev = prev.ok_or("a rate needs two scrapes; the first one was just taken")?;
    let dt = cur.at.saturating_duration_since(prev.at).as_secs_f64();
    if dt <= 0.0 {
        return Err("two scrapes at the same instant".into());
    }
    Ok((prev, dt))
}

/// A counter's increase; a decrease is a restart, after which it counted `cur`.
fn increase(prev: Option<f64>, cur: f64) -> f64 {
    match prev {
        Some(p) if cur >= p => cur - p,
        // Reset (engine restart), or a series new since the last scrape.
        _ => cur,
    }
}

fn histogram(
    series: &SeriesSelector,
    quantile: Option<f64>,
    prev: Option<&Scrape>,
    cur: &Scrape,
) -> Result<f64, String> {
    let absent = || format!("family {series} is absent from the engine's metrics");
    let c = cur
        .extracts
        .get(series)
        .ok_or_else(absent)?
        .buckets
        .as_ref()
        .ok_or_else(|| format!("family {series} has no histogram samples"))?;
    let (prev, _) = window(prev, cur)?;
    let p = prev.extracts.get(series).and_then(|x| x.buckets.as_ref());
    // A reset (count went down) means the whole current histogram is new.
    let delta = match p {
        Some(p) if c.count >= p.count => Buckets {
            le: c
                .le
                .iter()
                .map(|(le, n)| {
                    let before = p.le.iter().find(|(b, _)| b == le).map_or(0.0, |(_, m)| *m);
                    (*le, (n - before).max(0.0))
                })
                .collect(),
            sum: c.sum - p.sum,
            count: c.count - p.count,
        },
        _ => c.clone(),
    };
    Ok(mean_or_quantile(&delta, quantile))
}

/// The mean, or the quantile with linear interpolation inside the bucket (the
/// lowest bucket starts at 0; a quantile in the `+Inf` bucket is the highest
/// finite bound). Nothing observed: 0 (nobody waited).
fn mean_or_quantile(b: &Buckets, quantile: Option<f64>) -> f64 {
    if b.count <= 0.0 {
        return 0.0;
    }
    let Some(q) = quantile else {
        return b.sum / b.count;
    };
    let total = b.le.last().map_or(b.count, |(_, n)| *n);
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for (le, n) in &b.le {
        if *n >= rank {
            if le.is_infinite() {
                return lower_bound;
            }
            let in_bucket = n - lower_count;
            if in_bucket <= 0.0 {
                return *le;
            }
            return lower_bound + (le - lower_bound) * (rank - lower_count) / in_bucket;
        }
        lower_bound = *le;
        lower_count = *n;
    }
    lower_bound
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn scrape(at: Instant, text: &str, rule: &Rule) -> Scrape {
        Scrape::new(at, text, &rule.selectors()).expect("parses")
    }

    fn sel(s: &str) -> SeriesSelector {
        SeriesSelector::parse(s).expect("selector")
    }

    #[test]
    fn gauges_sum_mean_and_fall_back_to_the_old_name() {
        let rule = Rule::Gauge {
            alternatives: vec![
                sel("vllm:kv_cache_usage_perc"),
                sel("vllm:gpu_cache_usage_perc"),
            ],
            mean: true,
            scale: 1.0,
        };
        let t0 = Instant::now();
        let new = "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine=\"0\"} 0.5\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.7\n";
        assert_eq!(rule.reading(None, &scrape(t0, new, &rule)).ok(), Some(0.6));
        let old = "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.25\n";
        assert_eq!(rule.reading(None, &scrape(t0, old, &rule)).ok(), Some(0.25));
        let none = rule.reading(None, &scrape(t0, "other 1\n", &rule));
        let reason = none.reason().expect("absent").to_string();
        assert!(
            reason.contains("absent") && reason.contains("gpu_cache"),
            "{reason}"
        );
    }

    #[test]
    fn rates_need_two_scrapes_and_survive_a_restart() {
        let rule = Rule::Rate {
            series: vec![
                sel("nv_inference_request_success"),
                sel("nv_inference_request_failure"),
            ],
        };
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let a = scrape(
            t0,
            "nv_inference_request_success{model=\"a\"} 100\nnv_inference_request_failure{model=\"a\",reason=\"x\"} 4\n",
            &rule,
        );
        assert!(rule.reading(None, &a).reason().is_some(), "first sample");
        let b = scrape(
            t1,
            "nv_inference_request_success{model=\"a\"} 150\nnv_inference_request_failure{model=\"a\",reason=\"x\"} 6\n",
            &rule,
        );
        assert_eq!(rule.reading(Some(&a), &b).ok(), Some(26.0));
        // Restart: the counters start again from 0.
        let c = scrape(
            t1 + Duration::from_secs(2),
            "nv_inference_request_success{model=\"a\"} 10\nnv_inference_request_failure{model=\"a\",reason=\"x\"} 0\n",
            &rule,
        );
        assert_eq!(rule.reading(Some(&b), &c).ok(), Some(5.0));
    }

    #[test]
    fn triton_queue_wait_is_per_request_not_per_batch_item() {
        let rule = Rule::DeltaRatio {
            num: sel("nv_inference_queue_duration_us"),
            den: vec![
                sel("nv_inference_request_success"),
                sel("nv_inference_request_failure"),
            ],
            scale: 1e-3,
        };
        let t0 = Instant::now();
        let text = |q: u64, s: u64, f: u64, items: u64| {
            format!(
                "# TYPE nv_inference_queue_duration_us counter\nnv_inference_queue_duration_us{{model=\"a\",version=\"1\"}} {q}\n\
                 nv_inference_request_success{{model=\"a\",version=\"1\"}} {s}\n\
                 nv_inference_request_failure{{model=\"a\",reason=\"REJECTED\",version=\"1\"}} {f}\n\
                 nv_inference_count{{model=\"a\",version=\"1\"}} {items}\n"
            )
        };
        let a = scrape(t0, &text(1_000_000, 100, 0, 800), &rule);
        let b = scrape(
            t0 + Duration::from_secs(1),
            &text(1_500_000, 108, 2, 880),
            &rule,
        );
        // 500 ms of queue over 10 requests = 50 ms each (not 500/80 per item).
        assert_eq!(rule.reading(Some(&a), &b).ok(), Some(50.0));
        let c = scrape(
            t0 + Duration::from_secs(2),
            &text(1_500_000, 108, 2, 880),
            &rule,
        );
        assert_eq!(
            rule.reading(Some(&b), &c).ok(),
            Some(0.0),
            "no request: no wait"
        );
    }

    #[test]
    fn histograms_mean_and_quantile_over_the_window() {
        let h = |b1: u64, b2: u64, inf: u64, sum: f64| {
            format!(
                "# TYPE q histogram\nq_bucket{{le=\"0.1\"}} {b1}\nq_bucket{{le=\"1\"}} {b2}\nq_bucket{{le=\"+Inf\"}} {inf}\nq_sum {sum}\nq_count {inf}\n"
            )
        };
        let mean = Rule::Auto {
            series: sel("q"),
            quantile: None,
        };
        let p50 = Rule::Auto {
            series: sel("q"),
            quantile: Some(0.5),
        };
        let t0 = Instant::now();
        let a = scrape(t0, &h(10, 10, 10, 0.5), &mean);
        let b = scrape(t0 + Duration::from_secs(1), &h(10, 20, 20, 5.5), &mean);
        assert_eq!(mean.reading(Some(&a), &b).ok(), Some(0.5));
        // 10 new observations, all in (0.1, 1]: the median interpolates to 0.55.
        assert_eq!(p50.reading(Some(&a), &b).ok(), Some(0.55));
        let g = Rule::Auto {
            series: sel("q"),
            quantile: None,
        };
        let s = scrape(t0, "# TYPE q summary\nq{quantile=\"0.5\"} 1\n", &g);
        assert!(
            g.reading(None, &s)
                .reason()
                .is_some_and(|r| r.contains("summary"))
        );
    }
}
