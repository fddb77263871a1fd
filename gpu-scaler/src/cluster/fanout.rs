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
    Error, MissingNodePolicy, Result, Stats,
    discovery::PeerBook,
    peer::{LocalUsage, PeerClients, proto},
    workload::PodDirectory,
};
use crate::pods::Pod;

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
    /// The pod's usage; `None` when its node did not answer for it.
    pub usage: Option<proto::PodUsage>,
}

/// The workload's pods at one moment, sorted by uid.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkloadUsage {
    pub pods: Vec<PodReport>,
    /// Nodes that did not answer, with why.
    pub missing_nodes: BTreeMap<String, String>,
    /// When the oldest snapshot in the answer was taken.
    pub sampled_at: SystemTime,
}

impl WorkloadUsage {
    /// Pods without a report.
    pub fn unreported(&self) -> usize {
        self.pods.iter().filter(|p| p.usage.is_none()).count()
    }
}

type Outcome = std::result::Result<(Instant, Arc<WorkloadUsage>), Arc<Error>>;
type Flight = Shared<futures::future::BoxFuture<'static, Outcome>>;

/// Fans queries out to peers; shared by every gRPC handler.
pub struct Fanout {
    config: FanoutConfig,
    local: Arc<dyn LocalUsage>,
    peers: Arc<dyn PeerBook>,
    clients: PeerClients,
    pods: Arc<dyn PodDirectory>,
    stats: Arc<Stats>,
    flights: Mutex<HashMap<(String, String), Flight>>,
}

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
        stats: Arc<Stats>,
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
            stats,
            flights: Mutex::default(),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn policy(&self) -> MissingNodePolicy {
        self.config.policy
    }

    /// The usage of the pods `selector` selects in `namespace`, shared with every
    /// concurrent or recent identical query.
    pub async fn workload(
        self: &Arc<Self>,
        namespace: &str,
        selector: &str,
    ) -> Result<Arc<WorkloadUsage>> {
        let key = (namespace.to_owned(), selector.trim().to_owned());
        let flight = {
            let mut flights = self.flights.lock().expect("flights lock");
            let ttl = self.config.cache_ttl;
            let fresh = |f: &Flight| match f.peek() {
                None => true,
                Some(Ok((done, _))) => done.elapsed() < ttl,
                Some(Err(_)) => false,
            };
            flights.retain(|_, f| fresh(f));
            match flights.get(&key) {
                Some(f) => {
                    Stats::inc(&self.stats.fanouts_shared);
                    f.clone()
                }
                None => {
                    Stats::inc(&self.stats.fanouts);
                    let this = self.clone();
                    let (ns, sel) = key.clone();
                    let f = async move {
                        this.run(&ns, &sel)
                            .await
                            .map(|u| (Instant::now(), Arc::new(u)))
                            .map_err(Arc::new)
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
        if missing > 0 {
            let nodes: Vec<&str> = usage.missing_nodes.keys().map(String::as_str).collect();
            match &decision {
                Ok(_) => {
                    Stats::inc(&self.stats.missing_averaged);
                    tracing::warn!(namespace, selector, missing, total, ?nodes, reasons = ?usage.missing_nodes,
                        policy = self.config.policy.as_str(),
                        "pods without a report count as the average of the reported ones");
                }
                Err(e) => {
                    Stats::inc(&self.stats.missing_refused);
                    tracing::warn!(namespace, selector, missing, total, ?nodes, reasons = ?usage.missing_nodes,
                        policy = self.config.policy.as_str(), error = %e, "answering UNAVAILABLE");
                }
            }
        }
        decision
    }

    async fn run(&self, namespace: &str, selector: &str) -> Result<WorkloadUsage> {
        let all = self.pods.workload_pods(namespace, selector).await?;
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
        let asks = by_node.into_iter().map(|(node, uids)| async move {
            let answer = if node == self.config.node_name {
                self.local.pod_usage(&uids)
            } else {
                match self.peers.address(node) {
                    None => Err("no gpu-scaler daemon is known on this node".to_owned()),
                    Some(addr) => {
                        Stats::inc(&self.stats.peer_requests);
                        let r = self.clients.ask(addr, uids).await;
                        if r.is_err() {
                            Stats::inc(&self.stats.peer_failures);
                        }
                        r.map_err(|e| format!("{addr}: {e}"))
                    }
                }
            };
            let answer = answer.and_then(|a| {
                if a.node_name == node {
                    Ok(a)
                } else {
                    Err(format!(
                        "the daemon asked answered for node {:?}",
                        a.node_name
                    ))
                }
            });
            (node.to_owned(), answer)
        });
        let answers = futures::future::join_all(asks).await;

        let mut usage: HashMap<String, proto::PodUsage> = HashMap::new();
        let mut missing_nodes = BTreeMap::new();
        let mut sampled_at: Option<SystemTime> = None;
        for (node, answer) in answers {
            match answer {
                Ok(a) => {
                    let at = UNIX_EPOCH
                        + Duration::from_nanos(u64::try_from(a.snapshot_unix_nanos).unwrap_or(0));
                    sampled_at = Some(sampled_at.map_or(at, |s| s.min(at)));
                    for p in a.pods {
                        usage.insert(p.pod_uid.clone(), p);
                    }
                    if !a.unknown_pod_uids.is_empty() {
                        missing_nodes.insert(
                            node,
                            format!("does not know pods {}", a.unknown_pod_uids.join(", ")),
                        );
                    }
                }
                Err(reason) => {
                    tracing::debug!(node, reason, "node did not answer");
                    missing_nodes.insert(node, reason);
                }
            }
        }
        let pods = pods
            .into_iter()
            .map(|pod| {
                let usage = if pod.node_name.is_none() {
                    // Not scheduled: it runs nothing, on no GPU.
                    Some(proto::PodUsage {
                        pod_uid: pod.uid.clone(),
                        gpus: Vec::new(),
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
            sampled_at: sampled_at.unwrap_or_else(SystemTime::now),
        })
    }
}
