//! Which daemon serves which node.
//!
//! In a cluster the DaemonSet is behind a headless Service; its EndpointSlices
//! (label `kubernetes.io/service-name`) list one endpoint per daemon pod, and
//! each endpoint carries the `nodeName` it runs on. A watch keeps the map
//! current as daemons come and go. `--peers NODE=ADDR,...` is the static
//! alternative for setups without the API and for tests.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;

/// Name of the Service port that serves the peer protocol; a Service with a
/// single port may leave it unnamed.
pub const PEER_PORT_NAME: &str = "peer";

/// Node name -> the peer address of the daemon on it.
pub type PeerMap = BTreeMap<String, SocketAddr>;

/// How many nodes' daemons are known, by whether they can be asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCensus {
    /// Nodes with a daemon that can be asked (in [`PeerBook::all`]).
    pub ready: usize,
    /// Nodes whose daemons are all listed but not ready (starting, failing
    /// their readiness probe, terminating): their pods count as unreported.
    pub not_ready: usize,
}

/// Looks up the daemon of a node.
pub trait PeerBook: Send + Sync {
    fn address(&self, node: &str) -> Option<SocketAddr>;
    /// Every known peer.
    fn all(&self) -> Arc<PeerMap>;
    /// Known peers by readiness. A list without readiness (`--peers`) has every
    /// peer ready: the daemon asks each of them.
    fn census(&self) -> PeerCensus {
        PeerCensus {
            ready: self.all().len(),
            not_ready: 0,
        }
    }
}

/// A fixed list (`--peers`).
#[derive(Clone, Debug, Default)]
pub struct StaticPeers(Arc<PeerMap>);

impl StaticPeers {
    pub fn new(peers: impl IntoIterator<Item = (String, SocketAddr)>) -> Self {
        Self(Arc::new(peers.into_iter().collect()))
    }
}

impl PeerBook for StaticPeers {
    fn address(&self, node: &str) -> Option<SocketAddr> {
        self.0.get(node).copied()
    }
    fn all(&self) -> Arc<PeerMap> {
        self.0.clone()
    }
}

/// One `NODE=ADDR` of `--peers`.
pub fn parse_peer(s: &str) -> Result<(String, SocketAddr), String> {
    let (node, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected NODE=ADDR:PORT, e.g. gpu-node-1=10.0.0.5:6001"))?;
    let node = node.trim();
    if node.is_empty() {
        return Err(format!("{s:?}: the node name is empty"));
    }
    let addr: SocketAddr = addr
        .trim()
        .parse()
        .map_err(|e| format!("{s:?}: {addr:?} is not an IP:PORT address ({e})"))?;
    Ok((node.to_owned(), addr))
}

/// Peers from the EndpointSlices of a headless Service, kept current by a watch.
pub struct EndpointPeers {
    rx: watch::Receiver<Arc<PeerMap>>,
    census: watch::Receiver<PeerCensus>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EndpointPeers {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl EndpointPeers {
    pub fn start(client: Client, namespace: &str, service: &str) -> Self {
        let api: Api<EndpointSlice> = Api::namespaced(client, namespace);
        let config =
            watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
        let (tx, rx) = watch::channel(Arc::new(PeerMap::new()));
        let (census_tx, census) = watch::channel(PeerCensus::default());
        let what = format!("{namespace}/{service}");
        let task = tokio::spawn(async move {
            let mut stream = watcher(api, config).default_backoff().boxed();
            let mut slices: HashMap<String, Vec<Endpoint>> = HashMap::new();
            let mut relist: Option<HashMap<String, Vec<Endpoint>>> = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::Init) => relist = Some(HashMap::new()),
                    Ok(watcher::Event::InitApply(s)) => {
                        if let Some(buf) = relist.as_mut() {
                            buf.insert(s.metadata.name.clone().unwrap_or_default(), endpoints(&s));
                        }
                    }
                    Ok(watcher::Event::InitDone) => slices = relist.take().unwrap_or_default(),
                    Ok(watcher::Event::Apply(s)) => {
                        slices.insert(s.metadata.name.clone().unwrap_or_default(), endpoints(&s));
                    }
                    Ok(watcher::Event::Delete(s)) => {
                        slices.remove(s.metadata.name.as_deref().unwrap_or_default());
                    }
                    Err(e) => {
                        tracing::warn!(service = %what, error = %e, "EndpointSlice watch error; retrying");
                        continue;
                    }
                }
                if relist.is_some() {
                    continue;
                }
                let map: PeerMap = slices
                    .values()
                    .flatten()
                    .filter(|e| e.ready)
                    .map(|e| (e.node.clone(), e.addr))
                    .collect();
                // A node counts once: ready when any of its daemons is (a
                // rolling update lists the old pod and the new one).
                let not_ready: BTreeSet<&str> = slices
                    .values()
                    .flatten()
                    .filter(|e| !e.ready && !map.contains_key(&e.node))
                    .map(|e| e.node.as_str())
                    .collect();
                census_tx.send_if_modified(|c| {
                    let new = PeerCensus {
                        ready: map.len(),
                        not_ready: not_ready.len(),
                    };
                    std::mem::replace(c, new) != new
                });
                if **tx.borrow() != map {
                    tracing::info!(service = %what, peers = map.len(), "peer daemons changed");
                    tx.send_replace(Arc::new(map));
                }
            }
        });
        Self { rx, census, task }
    }

    /// A receiver that sees every change of the map.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PeerMap>> {
        self.rx.clone()
    }
}

impl PeerBook for EndpointPeers {
    fn address(&self, node: &str) -> Option<SocketAddr> {
        self.rx.borrow().get(node).copied()
    }
    fn all(&self) -> Arc<PeerMap> {
        self.rx.borrow().clone()
    }
    fn census(&self) -> PeerCensus {
        *self.census.borrow()
    }
}

/// One daemon listed in an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Endpoint {
    node: String,
    addr: SocketAddr,
    /// `conditions.ready`; unset means ready, as the EndpointSlice API says.
    ready: bool,
}

/// The endpoints of a slice that name their node and have an address.
fn endpoints(slice: &EndpointSlice) -> Vec<Endpoint> {
    let ports = slice.ports.as_deref().unwrap_or_default();
    let port = ports
        .iter()
        .find(|p| p.name.as_deref() == Some(PEER_PORT_NAME))
        .or(if ports.len() == 1 {
            ports.first()
        } else {
            None
        })
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok());
    let Some(port) = port else {
        tracing::warn!(
            slice = slice.metadata.name.as_deref().unwrap_or_default(),
            "EndpointSlice has no port named {PEER_PORT_NAME:?}; its daemons cannot be asked"
        );
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        .filter_map(|e| {
            let node = e.node_name.clone()?;
            let ip: IpAddr = e.addresses.first()?.parse().ok()?;
            Some(Endpoint {
                node,
                addr: SocketAddr::new(ip, port),
                ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_static_peers() {
        let (n, a) = parse_peer("gpu-1=127.0.0.2:6001").expect("valid");
        assert_eq!(n, "gpu-1");
        assert_eq!(a, "127.0.0.2:6001".parse().expect("addr"));
        assert!(parse_peer("gpu-1").expect_err("no =").contains("NODE=ADDR"));
        assert!(
            parse_peer("=1.2.3.4:1")
                .expect_err("no node")
                .contains("empty")
        );
        assert!(
            parse_peer("n=host:1")
                .expect_err("hostname")
                .contains("not an IP:PORT")
        );
    }

    #[test]
    fn endpoints_of_a_slice() {
        let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s1"},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "nodeName": "a", "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "nodeName": "b", "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["10.0.0.4"], "nodeName": "d"}
            ],
            "ports": [{"name": "metrics", "port": 9090}, {"name": "peer", "port": 6001}]
        }))
        .expect("valid slice");
        let ep = |node: &str, ip: &str, ready| Endpoint {
            node: node.to_owned(),
            addr: format!("{ip}:6001").parse().expect("addr"),
            ready,
        };
        assert_eq!(
            endpoints(&slice),
            vec![
                ep("a", "10.0.0.1", true),
                ep("b", "10.0.0.2", false),
                ep("d", "10.0.0.4", true),
            ]
        );
    }
}
