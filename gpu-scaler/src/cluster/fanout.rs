//! One workload's usage across the cluster: find its pods, ask only the nodes
//! that host them (concurrently, each within `--peer-timeout`), and join the
//! answers per pod.
//!
//! KEDA asks GetMetricSpec, GetMetrics and IsActive for every ScaledObject each
//! polling interval, and many ScaledObjects may share one workload. Queries for
//! the same (namespace, selector) therefore share one fan-out: while one runs,
//! others wait for it (single flight), and its result serves every query for
//! `cache_ttl` after it finished (set to the poll interval: nodes publish no newer
//! data sooner). Peer traffic is then at most one request per node per workload
//! per poll interval, whatever the number of ScaledObjects.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures::{FutureExt as _, future::Shared};

use super::{
    Error, Metrics, MissingNodePolicy, NoReport, Result,
    discovery::PeerBook,
    peer::{LocalUsage, PeerClients, proto},
    workload::PodDirectory,
};
use crate::{engine::EngineQuery, pods::Pod};

/// Fan-out settings.
#[derive(Clone, Debug)]
pub struct FanoutConfig {
    /// This daemon's node: its pods are answered locally (through the same code).
    pub node_name: String,
    /// How long a finished fan-out's result is reused (the poll interval).
    pub cache_ttl: Duration,
    pub policy: MissingNodePolicy,
}

/// One pod of the workload and what its node said about it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodReport {
    pub pod: Arc<Pod>,
    /// The pod's usage; `None` when its node did not answer for it, or (for an
    /// engine query) its engine could not be read: either way the pod is
    /// unreported and the missing-node policy decides.
    pub usage: Option<proto::PodUsage>,
}

/// The workload's pods at one moment, sorted by uid.
#[derive(Clone, Debug)]
pub struct WorkloadUsage {
    pub pods: Vec<PodReport>,
    /// Nodes that did not answer, with why.
    pub missing_nodes: BTreeMap<String, NoReport>,
    /// Pods whose engine could not be read (engine queries), with why.
    pub unreadable_pods: BTreeMap<String, String>,
    /// When the oldest snapshot in the answer was taken.
    pub sampled_at: SystemTime,
}

impl WorkloadUsage {
    /// Pods without a report.
    pub fn unreported(&self) -> usize {
        self.pods.iter().filter(|p| p.usage.is_none()).count()
    }
}

/// Whether a fan-out that finished `age` ago, over data of which the oldest
/// was taken at `sampled_at`, may answer a query at `now`: until `ttl` after
/// it finished, and no longer than until the oldest data's next poll is due
/// (`sampled_at + ttl`) — otherwise a result computed just before the nodes'
/// next poll would hide that poll's data for a whole extra interval (an
/// engine gauge's change would take two polls to reach KEDA). A result is
/// always kept for `ttl / 20`, so a burst of queries while a poll is landing
/// still shares one fan-out.
fn reusable(age: Duration, sampled_at: SystemTime, now: SystemTime, ttl: Duration) -> bool {
    if age >= ttl {
        return false;
    }
    if age < ttl / 20 {
        return true;
    }
    now < sampled_at + ttl
}

type Outcome = std::result::Result<(Instant, Arc<WorkloadUsage>), Arc<Error>>;
type Flight = Shared<futures::future::BoxFuture<'static, Outcome>>;
/// (namespace, selector, engine query) of a fan-out.
type FlightKey = (String, String, Option<String>);

/// Fans queries out to peers; shared by every gRPC handler.
pub struct Fanout {
    config: FanoutConfig,
    local: Arc<dyn LocalUsage>,
    peers: Arc<dyn PeerBook>,
    clients: PeerClients,
    pods: Arc<dyn PodDirectory>,
    metrics: Arc<Metrics>,
    flights: Mutex<HashMap<FlightKey, Flight>>,
}

/// Clock difference between nodes tolerated when a peer's snapshot age is
/// checked (NTP keeps nodes within milliseconds; this is for a bad day).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(2);

/// Phases of pods that are over: they use nothing and are not replicas.
fn finished(pod: &Pod) -> bool {
    matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed"))
}

impl Fanout {
    pub fn new(
        config: FanoutConfig,
        local: Arc<dyn LocalUsage>,
        peers: Arc<dyn PeerBook>,
        clients: PeerClients,
        pods: Arc<dyn PodDirectory>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        tracing::info!(
            node = %config.node_name,
            policy = config.policy.as_str(),
            cache_ttl = ?config.cache_ttl,
            "cluster fan-out ready; a node that does not answer counts per --missing-node-policy"
        );
        Arc::new(Self {
            config,
            local,
            peers,
            clients,
            pods,
            metrics,
            flights: Mutex::default(),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The usage of the pods `selector` selects in `namespace`, shared with every
    /// concurrent or recent identical query.
    pub async fn workload(
        self: &Arc<Self>,
        namespace: &str,
        selector: &str,
        engine: Option<&EngineQuery>,
    ) -> Result<Arc<WorkloadUsage>> {
        let key = (
            namespace.to_owned(),
            selector.trim().to_owned(),
            engine.map(EngineQuery::key),
        );
        let figures: Vec<proto::FigureRequest> = engine
            .map(super::usage::figure_request)
            .into_iter()
            .collect();
        let flight = {
            let mut flights = self.flights.lock().expect("flights lock");
            let ttl = self.config.cache_ttl;
            let now = SystemTime::now();
            let fresh = |f: &Flight| match f.peek() {
                None => true,
                Some(Ok((done, u))) => reusable(done.elapsed(), u.sampled_at, now, ttl),
                Some(Err(_)) => false,
            };
            flights.retain(|_, f| fresh(f));
            match flights.get(&key) {
                Some(f) => {
                    self.metrics.fanouts_shared.inc();
                    f.clone()
                }
                None => {
                    self.metrics.fanouts.inc();
                    let this = self.clone();
                    let (ns, sel, _) = key.clone();
                    let f = async move {
                        let started = Instant::now();
                        let r = this.run(&ns, &sel, figures).await;
                        this.metrics
                            .fanout_latency
                            .observe(started.elapsed().as_secs_f64());
                        r.map(|u| (Instant::now(), Arc::new(u))).map_err(Arc::new)
                    }
                    .boxed()
                    .shared();
                    flights.insert(key, f.clone());
                    f
                }
            }
        };
        flight.await.map(|(_, u)| u).map_err(Error::Shared)
    }

    /// Applies the missing-node policy to an answer: `Ok(n)` counts `n` unreported
    /// pods as the average of the reported ones; an error is UNAVAILABLE.
    pub fn admit(&self, usage: &WorkloadUsage, namespace: &str, selector: &str) -> Result<usize> {
        let missing = usage.unreported();
        let total = usage.pods.len();
        let decision = self.config.policy.admit(total, missing);
        // Counted per answer; logged at warn once per fan-out (in `run`), since
        // thousands of queries can share one.
        if missing > 0 {
            match &decision {
                Ok(_) => {
                    self.metrics.missing_node(true);
                    tracing::debug!(
                        namespace,
                        selector,
                        missing,
                        total,
                        "unreported pods count as the average"
                    );
                }
                Err(e) => {
                    self.metrics.missing_node(false);
                    tracing::debug!(namespace, selector, missing, total, error = %e, "answering UNAVAILABLE");
                }
            }
        }
        decision
    }

    async fn run(
        &self,
        namespace: &str,
        selector: &str,
        figures: Vec<proto::FigureRequest>,
    ) -> Result<WorkloadUsage> {
        let all = self.pods.workload_pods(namespace, selector).await?;
        // Channels to daemons that left the peer book are dropped.
        let book = self.peers.all();
        let known: std::collections::HashSet<_> = book.values().collect();
        self.clients.retain(|a| known.contains(a));
        // The directory is namespaced already; the check keeps it so whatever the
        // directory does.
        let pods: Vec<Arc<Pod>> = all
            .values()
            .filter(|p| p.namespace == namespace && !finished(p))
            .cloned()
            .collect();
        let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for p in &pods {
            if let Some(node) = p.node_name.as_deref() {
                by_node.entry(node).or_default().push(p.uid.clone());
            }
        }
        let figures = &figures;
        // A snapshot older than three polls (plus clock skew between nodes)
        // is stale, as for the node's own answers.
        let max_age = self.config.cache_ttl * 3 + MAX_CLOCK_SKEW;
        let asks = by_node.into_iter().map(|(node, uids)| async move {
            let asked: std::collections::HashSet<String> = uids.iter().cloned().collect();
            let answer = if node == self.config.node_name {
                self.local
                    .pod_usage(&uids, figures)
                    .await
                    .map_err(NoReport::from)
            } else {
                match self.peers.address(node) {
                    None => Err(NoReport::NoDaemon),
                    Some(addr) => {
                        let asked = Instant::now();
                        let r = self.clients.ask(addr, uids, figures.clone()).await;
                        self.metrics.peer_request(r.is_ok(), asked.elapsed());
                        r
                    }
                }
            };
            let answer = answer.and_then(|a| {
                if a.node_name == node {
                    super::usage::check_answer(a, &asked, SystemTime::now(), max_age)
                } else {
                    Err(NoReport::WrongNode(a.node_name))
                }
            });
            (node.to_owned(), answer)
        });
        let answers = futures::future::join_all(asks).await;

        let mut usage: HashMap<String, proto::PodUsage> = HashMap::new();
        let mut missing_nodes = BTreeMap::new();
        let mut unreadable_pods = BTreeMap::new();
        let mut sampled_at: Option<SystemTime> = None;
        for (node, answer) in answers {
            match answer {
                Ok(a) => {
                    let at = UNIX_EPOCH
                        + Duration::from_nanos(u64::try_from(a.snapshot_unix_nanos).unwrap_or(0));
                    sampled_at = Some(sampled_at.map_or(at, |s| s.min(at)));
                    for p in a.pods {
                        // Each asked engine figure must be there and readable;
                        // otherwise the pod is unreported, as if its node had
                        // not answered.
                        if !figures.is_empty() {
                            let unreadable = (0..figures.len())
                                .map(|i| super::usage::reading(p.figures.get(i)))
                                .find_map(|r| r.reason().map(str::to_owned));
                            if let Some(why) = unreadable {
                                unreadable_pods.insert(p.pod_uid.clone(), why);
                                continue;
                            }
                        }
                        usage.insert(p.pod_uid.clone(), p);
                    }
                    if !a.unknown_pod_uids.is_empty() {
                        missing_nodes.insert(node, NoReport::UnknownPods(a.unknown_pod_uids));
                    }
                }
                Err(reason) => {
                    tracing::debug!(node, %reason, "node did not answer");
                    missing_nodes.insert(node, reason);
                }
            }
        }
        if !missing_nodes.is_empty() || !unreadable_pods.is_empty() {
            let policy = self.config.policy;
            let verdict = match policy.admit(
                pods.len(),
                pods.iter()
                    .filter(|p| !usage.contains_key(&p.uid) && p.node_name.is_some())
                    .count(),
            ) {
                Ok(_) => "their pods count as the average of the reported ones".to_owned(),
                Err(e) => format!("answering UNAVAILABLE: {e}"),
            };
            tracing::warn!(namespace, selector, nodes = ?missing_nodes, engines = ?unreadable_pods,
                policy = policy.as_str(), verdict, "nodes or engines of the workload did not answer");
        }
        let pods = pods
            .into_iter()
            .map(|pod| {
                let usage = if pod.node_name.is_none() {
                    // Not scheduled: it runs nothing, on no GPU, queues nothing.
                    Some(proto::PodUsage {
                        pod_uid: pod.uid.clone(),
                        gpus: Vec::new(),
                        figures: figures
                            .iter()
                            .map(|_| {
                                super::usage::figure_reading(&crate::snapshot::Reading::Ok(0.0))
                            })
                            .collect(),
                    })
                } else {
                    usage.remove(&pod.uid)
                };
                PodReport { pod, usage }
            })
            .collect();
        Ok(WorkloadUsage {
            pods,
            missing_nodes,
            unreadable_pods,
            sampled_at: sampled_at.unwrap_or_else(SystemTime::now),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        net::SocketAddr,
        sync::atomic::{AtomicU64, Ordering},
    };

    use super::*;
    use crate::{
        cluster::{
            discovery::StaticPeers,
            peer::{self, PeerTls},
        },
        pods::kube::PodMap,
    };

    /// A node's usage, hand-fed: uid -> SM % on one GPU.
    pub(crate) struct FakeNode {
        pub name: String,
        pub sm: Mutex<HashMap<String, f64>>,
        pub calls: AtomicU64,
        pub down: Mutex<Option<Arc<str>>>,
    }

    impl FakeNode {
        pub(crate) fn new(name: &str, pods: &[(&str, f64)]) -> Arc<Self> {
            Arc::new(Self {
                name: name.into(),
                sm: Mutex::new(pods.iter().map(|(u, v)| ((*u).to_owned(), *v)).collect()),
                calls: AtomicU64::new(0),
                down: Mutex::new(None),
            })
        }
    }

    impl LocalUsage for FakeNode {
        fn node_name(&self) -> &str {
            &self.name
        }
        fn pod_usage<'a>(
            &'a self,
            uids: &'a [String],
            _figures: &'a [proto::FigureRequest],
        ) -> futures::future::BoxFuture<
            'a,
            std::result::Result<proto::GetPodUsageResponse, super::super::peer::LocalError>,
        > {
            Box::pin(async move { self.answer(uids) })
        }
    }

    impl FakeNode {
        fn answer(
            &self,
            uids: &[String],
        ) -> std::result::Result<proto::GetPodUsageResponse, super::super::peer::LocalError>
        {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if let Some(reason) = self.down.lock().expect("lock").clone() {
                return Err(crate::snapshot::Unfit::GpuDown(reason).into());
            }
            let sm = self.sm.lock().expect("lock");
            let mut resp = proto::GetPodUsageResponse {
                node_name: self.name.clone(),
                snapshot_unix_nanos: i64::try_from(
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .expect("after 1970")
                        .as_nanos(),
                )
                .expect("fits"),
                ..Default::default()
            };
            for uid in uids {
                match sm.get(uid) {
                    Some(v) => resp.pods.push(proto::PodUsage {
                        pod_uid: uid.clone(),
                        figures: Vec::new(),
                        gpus: vec![proto::GpuUsage {
                            gpu_uuid: format!("GPU-{}", self.name),
                            sm_util_percent: Some(*v),
                            ..Default::default()
                        }],
                    }),
                    None => resp.unknown_pod_uids.push(uid.clone()),
                }
            }
            Ok(resp)
        }
    }

    /// Pods from a fixed list.
    pub(crate) struct FixedPods(pub Mutex<PodMap>);

    impl PodDirectory for FixedPods {
        fn workload_pods<'a>(
            &'a self,
            namespace: &'a str,
            _selector: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<Arc<PodMap>>> {
            let pods: PodMap = self
                .0
                .lock()
                .expect("lock")
                .iter()
                .filter(|(_, p)| p.namespace == namespace)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            Box::pin(async move { Ok(Arc::new(pods)) })
        }
    }

    pub(crate) fn pod(uid: &str, ns: &str, node: Option<&str>, phase: &str) -> (String, Arc<Pod>) {
        (
            uid.to_owned(),
            Arc::new(Pod {
                uid: uid.into(),
                namespace: ns.into(),
                name: format!("pod-{uid}"),
                labels: [("app".to_owned(), "w".to_owned())].into(),
                node_name: node.map(Into::into),
                phase: Some(phase.into()),
                ready: true,
                ip: None,
                annotations: Default::default(),
                containers: Vec::new(),
            }),
        )
    }

    async fn serve_node(node: Arc<FakeNode>, tls: Option<PeerTls>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            peer::serve(listener, node, tls.as_ref(), std::future::pending())
                .await
                .expect("peer server");
        });
        addr
    }

    struct Cluster {
        nodes: Vec<Arc<FakeNode>>,
        fanout: Arc<Fanout>,
    }

    /// Node n0 is local; n1..n3 are served over gRPC; `extra` peers are added to
    /// the book as given.
    async fn cluster(
        policy: MissingNodePolicy,
        ttl: Duration,
        extra: &[(&str, SocketAddr)],
    ) -> Cluster {
        let nodes = vec![
            FakeNode::new("n0", &[("a", 10.0)]),
            FakeNode::new("n1", &[("b", 20.0), ("c", 30.0)]),
            FakeNode::new("n2", &[("d", 40.0)]),
            FakeNode::new("n3", &[]),
        ];
        let mut book = Vec::new();
        for n in &nodes[1..] {
            book.push((n.name.clone(), serve_node(n.clone(), None).await));
        }
        book.extend(extra.iter().map(|(n, a)| ((*n).to_owned(), *a)));
        let pods = FixedPods(Mutex::new(
            [
                pod("a", "ml", Some("n0"), "Running"),
                pod("b", "ml", Some("n1"), "Running"),
                pod("c", "ml", Some("n1"), "Running"),
                pod("d", "ml", Some("n2"), "Running"),
                pod("e", "ml", None, "Pending"),
                pod("f", "ml", Some("n3"), "Succeeded"),
                pod("x", "other", Some("n3"), "Running"),
            ]
            .into_iter()
            .collect(),
        ));
        let fanout = Fanout::new(
            FanoutConfig {
                node_name: "n0".into(),
                cache_ttl: ttl,
                policy,
            },
            nodes[0].clone(),
            Arc::new(StaticPeers::new(book)),
            PeerClients::new(None, PEER_TIMEOUT).expect("clients"),
            Arc::new(pods),
            Arc::default(),
        );
        Cluster { nodes, fanout }
    }

    fn sm(r: &PodReport) -> Option<f64> {
        r.usage
            .as_ref()
            .map(|u| u.gpus.iter().filter_map(|g| g.sm_util_percent).sum())
    }

    #[tokio::test]
    async fn asks_only_the_nodes_that_host_the_workload() {
        let c = cluster(MissingNodePolicy::Average, Duration::from_secs(60), &[]).await;
        let u = c
            .fanout
            .workload("ml", "app=w", None)
            .await
            .expect("answer");
        let got: Vec<(&str, Option<f64>)> =
            u.pods.iter().map(|p| (p.pod.uid.as_str(), sm(p))).collect();
        // e is unscheduled (0, no GPU); f is finished; x is another namespace.
        assert_eq!(
            got,
            [
                ("a", Some(10.0)),
                ("b", Some(20.0)),
                ("c", Some(30.0)),
                ("d", Some(40.0)),
                ("e", Some(0.0))
            ]
        );
        assert!(u.missing_nodes.is_empty(), "{:?}", u.missing_nodes);
        let calls: Vec<u64> = c
            .nodes
            .iter()
            .map(|n| n.calls.load(Ordering::SeqCst))
            .collect();
        assert_eq!(
            calls,
            [1, 1, 1, 0],
            "one request per hosting node, none to n3"
        );
        assert_eq!(c.fanout.admit(&u, "ml", "app=w").expect("complete"), 0);
    }

    #[tokio::test]
    async fn identical_queries_share_one_fan_out_per_ttl() {
        let c = cluster(MissingNodePolicy::Average, Duration::from_millis(300), &[]).await;
        let all =
            futures::future::join_all((0..100).map(|_| c.fanout.workload("ml", "app=w", None)))
                .await;
        let first = all[0].as_ref().expect("answer").clone();
        for a in &all {
            // One fan-out: every query got the very same answer.
            assert!(Arc::ptr_eq(a.as_ref().expect("answer"), &first));
        }
        c.fanout
            .workload("ml", "app=w", None)
            .await
            .expect("cached");
        assert_eq!(
            c.nodes[1].calls.load(Ordering::SeqCst),
            1,
            "101 queries, one peer request"
        );
        assert_eq!(c.fanout.metrics().fanouts.get(), 1);
        assert_eq!(c.fanout.metrics().fanouts_shared.get(), 100);
        tokio::time::sleep(Duration::from_millis(350)).await;
        c.fanout
            .workload("ml", "app=w", None)
            .await
            .expect("refreshed");
        assert_eq!(
            c.nodes[1].calls.load(Ordering::SeqCst),
            2,
            "a new fan-out after the TTL"
        );
    }

    #[test]
    fn a_cached_fan_out_is_reused_until_newer_data_is_due() {
        let ttl = Duration::from_secs(1);
        let now = SystemTime::now();
        let ms = Duration::from_millis;
        // Data taken just now: reused for the whole ttl.
        assert!(reusable(ms(900), now - ms(900), now, ttl));
        assert!(
            !reusable(ms(1000), now - ms(1000), now, ttl),
            "never past ttl"
        );
        // Computed just before the nodes' next poll: not reused past it.
        assert!(reusable(ms(100), now - ms(950), now, ttl));
        assert!(!reusable(ms(100), now - ms(1050), now, ttl));
        // ... but a burst right after the fan-out still shares it.
        assert!(reusable(ms(30), now - ms(3000), now, ttl));
        assert!(!reusable(ms(60), now - ms(3000), now, ttl));
    }

    /// The test clusters' peer timeout: long enough for an in-process peer to
    /// answer its first call under qemu-user (the aarch64 unit tests, issue 17,
    /// where 300 ms missed answering peers), short enough for the silent one.
    const PEER_TIMEOUT: Duration = Duration::from_millis(1500);

    #[tokio::test]
    async fn a_node_that_does_not_answer_follows_the_policy() {
        // A listener that never answers: the call must time out, not hang.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let silent_addr = silent.local_addr().expect("addr");
        let c = cluster(MissingNodePolicy::Average, Duration::ZERO, &[]).await;
        *c.nodes[2].down.lock().expect("lock") = Some("GPU source is down".into());
        let u = c
            .fanout
            .workload("ml", "app=w", None)
            .await
            .expect("answer");
        assert_eq!(u.unreported(), 1, "d on n2");
        assert!(
            u.missing_nodes["n2"]
                .to_string()
                .contains("GPU source is down"),
            "{:?}",
            u.missing_nodes
        );
        assert_eq!(
            c.fanout.admit(&u, "ml", "app=w").expect("4 of 5 reported"),
            1
        );
        assert_eq!(c.fanout.metrics().missing_nodes(true), 1);

        // n1 silent too: 2 of 5 reported -> UNAVAILABLE.
        let c2 = cluster(
            MissingNodePolicy::Average,
            Duration::ZERO,
            &[("n1", silent_addr)],
        )
        .await;
        *c2.nodes[2].down.lock().expect("lock") = Some("down".into());
        let started = Instant::now();
        let u = c2
            .fanout
            .workload("ml", "app=w", None)
            .await
            .expect("answer");
        assert!(
            started.elapsed() < PEER_TIMEOUT * 3,
            "per-peer timeout bounds the fan-out"
        );
        assert_eq!(u.unreported(), 3);
        let e = c2
            .fanout
            .admit(&u, "ml", "app=w")
            .expect_err("fewer than half");
        assert!(e.to_string().contains("only 2 of 5"), "{e}");
        assert_eq!(c2.fanout.metrics().missing_nodes(false), 1);
        drop(silent);

        // fail: any gap refuses.
        let c3 = cluster(MissingNodePolicy::Fail, Duration::ZERO, &[]).await;
        *c3.nodes[2].down.lock().expect("lock") = Some("down".into());
        let u = c3
            .fanout
            .workload("ml", "app=w", None)
            .await
            .expect("answer");
        assert!(c3.fanout.admit(&u, "ml", "app=w").is_err());
    }

    #[tokio::test]
    async fn unknown_pods_and_unknown_nodes_are_unreported() {
        let c = cluster(MissingNodePolicy::Average, Duration::ZERO, &[]).await;
        c.nodes[2].sm.lock().expect("lock").clear();
        let u = c
            .fanout
            .workload("ml", "app=w", None)
            .await
            .expect("answer");
        assert!(
            u.missing_nodes["n2"]
                .to_string()
                .contains("does not know pods d"),
            "{:?}",
            u.missing_nodes
        );
        assert_eq!(u.unreported(), 1);
        assert_eq!(c.nodes[2].calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_node_without_a_known_daemon_is_unreported() {
        let pods = FixedPods(Mutex::new(
            [
                pod("a", "ml", Some("n0"), "Running"),
                pod("g", "ml", Some("n9"), "Running"),
            ]
            .into_iter()
            .collect(),
        ));
        let fanout = Fanout::new(
            FanoutConfig {
                node_name: "n0".into(),
                cache_ttl: Duration::ZERO,
                policy: MissingNodePolicy::Average,
            },
            FakeNode::new("n0", &[("a", 10.0)]),
            Arc::new(StaticPeers::default()),
            PeerClients::new(None, Duration::from_millis(300)).expect("clients"),
            Arc::new(pods),
            Arc::default(),
        );
        let u = fanout.workload("ml", "app=w", None).await.expect("answer");
        assert!(
            u.missing_nodes["n9"]
                .to_string()
                .contains("no gpu-scaler daemon"),
            "{:?}",
            u.missing_nodes
        );
        assert_eq!(
            fanout
                .admit(&u, "ml", "app=w")
                .expect("1 of 2 reported is half"),
            1
        );
    }

    /// A CA, and a certificate for `gpu-scaler-peer` it signed, written to `dir`.
    pub(crate) fn write_certs(dir: &std::path::Path) -> PeerTls {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca");
        let key = KeyPair::generate().expect("leaf key");
        let leaf = CertificateParams::new(vec!["gpu-scaler-peer".to_owned()])
            .expect("leaf params")
            .signed_by(&key, &ca)
            .expect("leaf");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        std::fs::write(dir.join("cert.pem"), leaf.pem()).expect("write");
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).expect("write");
        PeerTls {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
            server_name: "gpu-scaler-peer".into(),
        }
    }

    #[tokio::test]
    async fn mtls_between_daemons() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tls = write_certs(dir.path());
        let node = FakeNode::new("n1", &[("b", 20.0)]);
        let addr = serve_node(node, Some(tls.clone())).await;

        let with_cert = PeerClients::new(Some(&tls), Duration::from_secs(2)).expect("clients");
        let r = with_cert
            .ask(addr, vec!["b".into()], Vec::new())
            .await
            .expect("mTLS call");
        assert_eq!(r.pods[0].gpus[0].sm_util_percent, Some(20.0));

        let plain = PeerClients::new(None, Duration::from_secs(2)).expect("clients");
        assert!(
            plain.ask(addr, vec!["b".into()], Vec::new()).await.is_err(),
            "plaintext refused"
        );

        // Trusting the CA but presenting no certificate: refused by the server.
        let ca = std::fs::read(&tls.ca).expect("ca");
        let no_identity = PeerClients::with_tls_config(
            Some(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                    .domain_name("gpu-scaler-peer"),
            ),
            Duration::from_secs(2),
        );
        let e = no_identity
            .ask(addr, vec!["b".into()], Vec::new())
            .await
            .expect_err("no client certificate");
        assert!(!e.to_string().is_empty(), "{e:?}");
    }
}
