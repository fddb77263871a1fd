//! The cluster path's metric families (peer RPCs, fan-outs, the missing-node
//! policy, known peers), owned here and registered once ([`Metrics::register`]).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use super::discovery::{PeerBook, PeerCensus};

/// One label: (name, value).
type Label = [(&'static str, &'static str); 1];

/// 1 ms .. ~8 s: a peer on the same network answers in a few milliseconds, one
/// at its timeout in seconds.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

/// Counters and histograms of the cluster path. Cheap to record into (atomics).
#[derive(Debug)]
pub struct Metrics {
    /// Peer RPCs by outcome (`ok`, `error`: failed or timed out).
    pub peer_requests: Family<Label, Counter>,
    /// Fan-outs run (one per workload per cache period, however many queries).
    pub fanouts: Counter,
    /// Queries answered from a fan-out that was running or cached.
    pub fanouts_shared: Counter,
    /// Answers with unreported pods, by what the policy did (`averaged`,
    /// `unavailable`).
    pub missing: Family<Label, Counter>,
    /// Latency of one peer RPC, failed ones included.
    pub peer_latency: Histogram,
    /// Latency of one whole fan-out, slowest peer included.
    pub fanout_latency: Histogram,
    /// The peer book the fan-out asks, for the peers gauge.
    pub peers: Arc<KnownPeers>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            peer_requests: Family::default(),
            fanouts: Counter::default(),
            fanouts_shared: Counter::default(),
            missing: Family::default(),
            peer_latency: latency(),
            fanout_latency: latency(),
            peers: Arc::default(),
        }
    }
}

impl Metrics {
    /// Registers the families in `registry` (the /metrics registry, once).
    pub fn register(&self, registry: &mut Registry) {
        // Every outcome has a series from the start, 0 until it happens (as
        // before the families were registered: a rate over them needs both).
        for outcome in ["ok", "error"] {
            let _ = self.peer_requests.get_or_create(&[("outcome", outcome)]);
        }
        for outcome in ["averaged", "unavailable"] {
            let _ = self.missing.get_or_create(&[("outcome", outcome)]);
        }
        registry.register(
            "gpu_scaler_peer_requests",
            "Node-to-node requests by outcome (error includes timeouts)",
            self.peer_requests.clone(),
        );
        registry.register(
            "gpu_scaler_fanouts",
            "Fan-outs run (one per workload per cache period)",
            self.fanouts.clone(),
        );
        registry.register(
            "gpu_scaler_fanout_coalesced",
            "Queries answered by an in-flight or cached fan-out",
            self.fanouts_shared.clone(),
        );
        registry.register(
            "gpu_scaler_peer_request_duration_seconds",
            "Latency of one peer request",
            self.peer_latency.clone(),
        );
        registry.register(
            "gpu_scaler_fanout_duration_seconds",
            "One query's whole fan-out, slowest peer included",
            self.fanout_latency.clone(),
        );
        registry.register(
            "gpu_scaler_missing_node",
            "Queries where a node did not answer, by what the policy did",
            self.missing.clone(),
        );
        registry.register_collector(Box::new(self.peers.clone()));
    }

    /// Records one peer RPC.
    pub fn peer_request(&self, ok: bool, took: Duration) {
        let outcome = if ok { "ok" } else { "error" };
        self.peer_requests
            .get_or_create(&[("outcome", outcome)])
            .inc();
        self.peer_latency.observe(took.as_secs_f64());
    }

    /// Peer RPCs sent so far, whatever their outcome.
    pub fn peer_requests_sent(&self) -> u64 {
        ["ok", "error"]
            .iter()
            .map(|o| self.peer_requests.get_or_create(&[("outcome", *o)]).get())
            .sum()
    }

    /// Records what the policy did with an answer that has unreported pods.
    pub fn missing_node(&self, averaged: bool) {
        let outcome = if averaged { "averaged" } else { "unavailable" };
        self.missing.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Answers so far in which the policy `averaged` unreported pods (or, with
    /// `false`, refused them).
    pub fn missing_nodes(&self, averaged: bool) -> u64 {
        let outcome = if averaged { "averaged" } else { "unavailable" };
        self.missing.get_or_create(&[("outcome", outcome)]).get()
    }
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

/// `gpu_scaler_peers`, read from the book at scrape time (absent before the
/// book is set).
impl Collector for KnownPeers {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(census) = self.census() else {
            return Ok(());
        };
        let peers: Family<Label, Gauge> = Family::default();
        for (state, n) in [("ready", census.ready), ("not_ready", census.not_ready)] {
            peers
                .get_or_create(&[("state", state)])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let metric = encoder.encode_descriptor(
            "gpu_scaler_peers",
            "Nodes with a daemon known to peer discovery, by readiness (--peers: all ready)",
            None,
            peers.metric_type(),
        )?;
        peers.encode(metric)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_requests_by_outcome() {
        let m = Metrics::default();
        m.peer_request(true, Duration::from_millis(3));
        m.peer_request(false, Duration::from_secs(60));
        m.peer_request(true, Duration::from_micros(500));
        assert_eq!(m.peer_requests_sent(), 3);
        let mut r = Registry::default();
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).expect("encodes");
        assert!(
            out.contains(r#"gpu_scaler_peer_requests_total{outcome="ok"} 2"#),
            "{out}"
        );
        assert!(
            out.contains(r#"gpu_scaler_peer_requests_total{outcome="error"} 1"#),
            "{out}"
        );
        assert!(
            out.contains(r#"gpu_scaler_peer_request_duration_seconds_bucket{le="0.001"} 1"#),
            "{out}"
        );
        assert!(
            out.contains("gpu_scaler_peer_request_duration_seconds_count 3"),
            "{out}"
        );
        assert!(
            out.contains(r#"gpu_scaler_missing_node_total{outcome="averaged"} 0"#),
            "every outcome has a series: {out}"
        );
        assert!(!out.contains("gpu_scaler_peers"), "no book yet: {out}");
    }
}
