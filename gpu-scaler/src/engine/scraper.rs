//! Reads local pods' engines: one HTTP GET per endpoint per poll, concurrent,
//! keep-alive, no redirects, a per-request timeout and a body limit.
//!
//! What is read is driven by live queries: [`Scraper::readings`] registers
//! (pod, port, path, series) as wanted and answers from the newest scrapes; the
//! poll loop reads every wanted endpoint of a pod still on this node, and
//! forgets what no query asked for within `interest_ttl`. A query's first
//! request reads its endpoints at once (within the timeout) instead of waiting
//! for the next poll.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde::Serialize;
use tokio::sync::watch;

use super::{EngineQuery, rule::Scrape, series::SeriesSelector};
use crate::{
    pods::{Pod, PodsReceiver},
    snapshot::Reading,
};

/// Scraping settings.
#[derive(Clone, Debug)]
pub struct ScrapeConfig {
    /// How often wanted endpoints are read (the poll interval).
    pub interval: Duration,
    /// Per request, connection included; well under the interval.
    pub timeout: Duration,
    /// Largest body read; a larger one is an error.
    pub body_limit: usize,
    /// What no query asked for within this long is no longer read.
    pub interest_ttl: Duration,
    /// Most endpoints read at once (bounds memory and sockets under load).
    pub max_endpoints: usize,
}

impl Default for ScrapeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            body_limit: 4 << 20,
            interest_ttl: Duration::from_secs(300),
            max_endpoints: 4096,
        }
    }
}

/// Most distinct series read from one engine (each query adds its own; they
/// expire with `interest_ttl`): bounds the work of one read whatever callers ask.
pub const MAX_SERIES_PER_ENDPOINT: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EndpointKey {
    pod_uid: String,
    addr: SocketAddr,
    path: String,
}

#[derive(Debug)]
struct Endpoint {
    pod: Arc<Pod>,
    /// Series wanted, with when a query last asked for each.
    wanted: HashMap<SeriesSelector, Instant>,
    /// Queries that asked, for the per-pod view (/metrics, top).
    queries: HashMap<String, (EngineQuery, Instant)>,
    prev: Option<Scrape>,
    cur: Option<Scrape>,
    /// Why the newest attempt failed; cleared by a good read.
    error: Option<Arc<str>>,
    /// When the newest attempt (good or not) finished.
    attempted: Option<Instant>,
}

/// One pod's engine figures at one moment (for /metrics, /v1/snapshot, top).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodEngine {
    pub pod_uid: String,
    pub namespace: String,
    pub pod: String,
    /// `ip:port` and path read.
    pub endpoint: String,
    pub path: String,
    /// Why the newest read failed.
    pub error: Option<Arc<str>>,
    /// Each live query's figure: (metric name or the query's text, reading).
    pub figures: BTreeMap<String, Reading<f64>>,
}

/// Every read engine on this node, published after each poll.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EngineSnapshot {
    #[serde(skip)]
    pub taken_at: Option<SystemTime>,
    pub pods: Vec<PodEngine>,
}

/// The engine reader's metric families, owned here and registered once
/// ([`Metrics::register`]).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Reads done since start.
    pub reads: Counter,
    /// Reads that failed (refused, timeout, not 200, unparsable).
    pub failures: Counter,
}

impl Metrics {
    /// Registers the families in `registry` (the /metrics registry, once).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "gpu_scaler_engine_reads",
            "Engine metrics reads since start",
            self.reads.clone(),
        );
        registry.register(
            "gpu_scaler_engine_read_failures",
            "Engine metrics reads that failed (refused, timeout, not 200, unparsable)",
            self.failures.clone(),
        );
    }
}

struct Inner {
    config: ScrapeConfig,
    client: Client<HttpConnector, Empty<Bytes>>,
    pods: PodsReceiver,
    endpoints: Mutex<BTreeMap<EndpointKey, Endpoint>>,
    published: watch::Sender<Arc<EngineSnapshot>>,
    metrics: Arc<Metrics>,
}

/// A query's figures for a list of pods.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Readings {
    /// One per pod, in the order asked.
    pub values: Vec<Reading<f64>>,
    /// When the oldest engine read behind `values` was taken (none read: no
    /// time). An answer is as old as its oldest part: the fan-out's cache
    /// reuses it only until newer reads are due.
    pub oldest_read: Option<SystemTime>,
}

/// Reads engines; cheap to clone.
#[derive(Clone)]
pub struct Scraper {
    inner: Arc<Inner>,
}

/// Why one read failed.
async fn get(
    client: &Client<HttpConnector, Empty<Bytes>>,
    addr: SocketAddr,
    path: &str,
    limit: usize,
) -> Result<Bytes, String> {
    let uri: http::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| format!("bad URL: {e}"))?;
    let req = http::Request::get(uri)
        // The text format; protobuf is not read.
        .header(
            http::header::ACCEPT,
            "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;version=1.0.0;q=0.8,*/*;q=0.1",
        )
        .header(http::header::ACCEPT_ENCODING, "identity")
        .header(http::header::USER_AGENT, "gpu-scaler")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {}", error_chain(&e)))?;
    let status = resp.status();
    if status.is_redirection() {
        return Err(format!(
            "{addr}{path} answered {status}: redirects are not followed"
        ));
    }
    if status != http::StatusCode::OK {
        return Err(format!("{addr}{path} answered {status}"));
    }
    let declared = resp
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared
        && len > limit
    {
        return Err(format!(
            "{addr}{path}: body of {len} bytes is over the {limit}-byte limit"
        ));
    }
    // Frames straight into one buffer of the declared size: collecting them
    // and then joining copied every body twice and allocated it twice.
    let mut body = Limited::new(resp.into_body(), limit);
    let mut buf = Vec::with_capacity(declared.unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("{addr}{path}: reading the body: {e}"))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Scraper {
    /// A scraper reading the pods of `pods` (this node's).
    pub fn new(config: ScrapeConfig, pods: PodsReceiver) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(config.interval * 5)
            .pool_max_idle_per_host(1)
            .build(connector);
        let (published, _) = watch::channel(Arc::new(EngineSnapshot::default()));
        Self {
            inner: Arc::new(Inner {
                config,
                client,
                pods,
                endpoints: Mutex::default(),
                published,
                metrics: Arc::default(),
            }),
        }
    }

    /// The reader's metric families.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The newest per-pod view, after each poll.
    pub fn subscribe(&self) -> watch::Receiver<Arc<EngineSnapshot>> {
        self.inner.published.subscribe()
    }

    /// `query`'s figure for each of `pods` (this node's), in order. Registers
    /// what it needs; endpoints never read for these series are read now.
    pub async fn readings(&self, pods: &[Arc<Pod>], query: &EngineQuery) -> Readings {
        let now = Instant::now();
        let key = query.key();
        let selectors = query.rule.selectors();
        let mut keys: Vec<Result<EndpointKey, Reading<f64>>> = Vec::with_capacity(pods.len());
        let mut read_now = Vec::new();
        {
            let mut endpoints = self.inner.endpoints.lock().expect("endpoints lock");
            for pod in pods {
                // A pod that is not Running and Ready is out of its Services'
                // endpoints: it holds no queue and no cache, so it is 0, as an
                // unscheduled pod is. Counting it as missing (the average of
                // the others) would inflate the total by every replica the HPA
                // just added and feed back into more replicas.
                if pod.phase.as_deref() != Some("Running") || !pod.ready {
                    keys.push(Err(Reading::Ok(0.0)));
                    continue;
                }
                let (addr, path) = match query.endpoint(pod) {
                    Ok(x) => x,
                    Err(why) => {
                        keys.push(Err(Reading::unavailable(why)));
                        continue;
                    }
                };
                let k = EndpointKey {
                    pod_uid: pod.uid.clone(),
                    addr,
                    path,
                };
                if !endpoints.contains_key(&k) && endpoints.len() >= self.inner.config.max_endpoints
                {
                    keys.push(Err(Reading::unavailable(format!(
                        "this node reads at most {} engine endpoints",
                        self.inner.config.max_endpoints
                    ))));
                    continue;
                }
                if endpoints.get(&k).is_some_and(|e| {
                    e.wanted.len() + selectors.len() > MAX_SERIES_PER_ENDPOINT
                        && selectors.iter().any(|s| !e.wanted.contains_key(*s))
                }) {
                    keys.push(Err(Reading::unavailable(format!(
                        "queries want more than {MAX_SERIES_PER_ENDPOINT} series of this engine"
                    ))));
                    continue;
                }
                let e = endpoints.entry(k.clone()).or_insert_with(|| Endpoint {
                    pod: pod.clone(),
                    wanted: HashMap::new(),
                    queries: HashMap::new(),
                    prev: None,
                    cur: None,
                    error: None,
                    attempted: None,
                });
                e.pod = pod.clone();
                let mut new_series = false;
                for s in &selectors {
                    new_series |= e.wanted.insert((*s).clone(), now).is_none();
                }
                e.queries.insert(key.clone(), (query.clone(), now));
                if new_series || e.attempted.is_none() {
                    read_now.push(k.clone());
                }
                keys.push(Ok(k));
            }
        }
        if !read_now.is_empty() {
            self.read(read_now).await;
        }
        let endpoints = self.inner.endpoints.lock().expect("endpoints lock");
        let mut oldest: Option<Instant> = None;
        let values = keys
            .into_iter()
            .map(|k| match k {
                Err(r) => r,
                Ok(k) => match endpoints.get(&k) {
                    None => Reading::unavailable("the endpoint was forgotten"),
                    Some(e) => {
                        let r = self.reading(e, query);
                        if let (Reading::Ok(_), Some(cur)) = (&r, &e.cur) {
                            oldest = Some(oldest.map_or(cur.at, |o| o.min(cur.at)));
                        }
                        r
                    }
                },
            })
            .collect();
        Readings {
            values,
            oldest_read: oldest.map(|at| SystemTime::now() - at.elapsed()),
        }
    }

    fn reading(&self, e: &Endpoint, query: &EngineQuery) -> Reading<f64> {
        if let Some(err) = &e.error {
            return Reading::Unavailable(err.clone());
        }
        let Some(cur) = &e.cur else {
            return Reading::unavailable("the engine has not been read yet");
        };
        // Older than three polls: the loop is not keeping up, or the pod went.
        let limit = self.inner.config.interval * 3;
        let age = cur.at.elapsed();
        if age > limit {
            return Reading::unavailable(format!(
                "the newest read of the engine is {age:.1?} old (limit {limit:?})"
            ));
        }
        query.rule.reading(e.prev.as_ref(), cur)
    }

    /// Reads `keys` concurrently and stores the results.
    async fn read(&self, keys: Vec<EndpointKey>) {
        let jobs: Vec<(EndpointKey, Vec<SeriesSelector>)> = {
            let endpoints = self.inner.endpoints.lock().expect("endpoints lock");
            keys.into_iter()
                .filter_map(|k| {
                    let wanted = endpoints.get(&k)?.wanted.keys().cloned().collect();
                    Some((k, wanted))
                })
                .collect()
        };
        let config = &self.inner.config;
        let reads = jobs.into_iter().map(|(k, wanted)| async move {
            let r = tokio::time::timeout(
                config.timeout,
                get(&self.inner.client, k.addr, &k.path, config.body_limit),
            )
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{}{}: no answer within {:?}",
                    k.addr, k.path, config.timeout
                ))
            });
            let at = Instant::now();
            let result = r.and_then(|body| {
                // SIMD validation: a 100 KB body checked with std's was 2 % of
                // the daemon's time with 100 engines.
                let text = simdutf8::basic::from_utf8(&body)
                    .map_err(|e| format!("{}{}: not UTF-8 text: {e}", k.addr, k.path))?;
                let sel: Vec<&SeriesSelector> = wanted.iter().collect();
                Scrape::new(at, text, &sel)
                    .map_err(|e| format!("{}{}: unparsable metrics: {e}", k.addr, k.path))
            });
            // Stored as soon as it is parsed, not when the slowest of the
            // poll's reads is done: one slow engine must not delay the
            // freshness of every other pod's figure.
            let failed = result.is_err();
            let mut endpoints = self.inner.endpoints.lock().expect("endpoints lock");
            if let Some(e) = endpoints.get_mut(&k) {
                e.attempted = Some(at);
                match result {
                    Ok(scrape) => {
                        e.prev = e.cur.take();
                        e.cur = Some(scrape);
                        e.error = None;
                    }
                    Err(why) => {
                        tracing::debug!(pod = %e.pod.name, namespace = %e.pod.namespace, error = %why, "engine read failed");
                        e.error = Some(why.into());
                    }
                }
            }
            failed
        });
        let results = futures::future::join_all(reads).await;
        let failures = results.iter().filter(|f| **f).count() as u64;
        self.inner.metrics.reads.inc_by(results.len() as u64);
        self.inner.metrics.failures.inc_by(failures);
    }

    /// One poll: forget what is no longer wanted or no longer here, read the
    /// rest, publish the per-pod view.
    pub async fn poll(&self) {
        let now = Instant::now();
        let ttl = self.inner.config.interest_ttl;
        let local = self.inner.pods.borrow().clone();
        let keys: Vec<EndpointKey> = {
            let mut endpoints = self.inner.endpoints.lock().expect("endpoints lock");
            endpoints.retain(|k, e| {
                e.wanted.retain(|_, at| now.duration_since(*at) < ttl);
                e.queries.retain(|_, (_, at)| now.duration_since(*at) < ttl);
                // Still on this node, running, at the same IP.
                let here = local.pods.get(&k.pod_uid).is_some_and(|p| {
                    p.phase.as_deref() == Some("Running") && p.ready && p.ip == Some(k.addr.ip())
                });
                if let Some(p) = local.pods.get(&k.pod_uid) {
                    e.pod = p.clone();
                }
                here && !e.wanted.is_empty()
            });
            endpoints.keys().cloned().collect()
        };
        if !keys.is_empty() {
            self.read(keys).await;
        }
        self.publish();
    }

    fn publish(&self) {
        let endpoints = self.inner.endpoints.lock().expect("endpoints lock");
        let pods = endpoints
            .iter()
            .map(|(k, e)| PodEngine {
                pod_uid: k.pod_uid.clone(),
                namespace: e.pod.namespace.clone(),
                pod: e.pod.name.clone(),
                endpoint: k.addr.to_string(),
                path: k.path.clone(),
                error: e.error.clone(),
                figures: e
                    .queries
                    .iter()
                    .map(|(name, (q, _))| {
                        let label = if q.engine_metric.is_some() {
                            name.clone()
                        } else {
                            q.name.to_owned()
                        };
                        (label, self.reading(e, q))
                    })
                    .collect(),
            })
            .collect();
        self.inner.published.send_replace(Arc::new(EngineSnapshot {
            taken_at: Some(SystemTime::now()),
            pods,
        }));
    }

    /// Polls every interval until `shutdown` is cancelled.
    pub async fn run(self, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.inner.config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.poll().await,
            }
        }
    }
}
