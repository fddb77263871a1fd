//! The cluster end to end with real processes, as root on the real kernel:
//! `gpu-scaler serve` processes on 127.0.0.1-4, each with its own node name and
//! mock GPU scenario, attributing with eBPF; the GPU processes of the scenarios
//! are real processes in kubelet-layout pod cgroups. Pods, the peers'
//! EndpointSlices, the ScaledObjects and the Deployment's scale subresource come
//! from the fake Kubernetes API server (support/kube_api.rs) through a
//! kubeconfig file, so every cluster flag of `serve` is on the path:
//! `--node-name`, `--peer-listen`, `--peer-service` + `--namespace` (four
//! daemons, `--missing-node-policy average`) or `--peers` (two daemons,
//! `--missing-node-policy fail`), `--kubeconfig`, `--peer-timeout`. Nodes are
//! lost by SIGKILL and come back as new processes on the same addresses.
//!
//! tests/cluster.rs runs the same story in-process with hand-fed GPUs and a
//! table attributor; this one checks that the binary and the kernel agree
//! with it. Every expected value is computed by hand from the loads below.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use gpu_scaler::{
    attribution::ebpf::EbpfAttributor, scaler::proto::external_scaler_client::ExternalScalerClient,
};
use gpu_scaler_tests::{
    cgroup::TestTree,
    kernel,
    kube_api::{
        FakeKube, Kubeconfig, ResourceType, peer_endpoint_slice, running_pod, scaled_object,
        workload,
    },
    pod::{Layout, RealPod, cgroupfs_guaranteed, systemd_containerd, systemd_crio},
    scaler::metric_value,
    serve::{ServeProcess, free_port, http_get},
    wait_for,
};

/// The daemons' namespace and headless Service (`--namespace`, `--peer-service`).
const DAEMON_NS: &str = "gpu-scaler";
const PEER_SERVICE: &str = "gpu-scaler-peers";
const POLL: &str = "250ms";
/// Long enough for a loaded CI machine, short enough that a killed node costs
/// little (a refused connection fails at once anyway).
const PEER_TIMEOUT: &str = "500ms";
/// How long a whole cluster may take to agree on a new state.
const SETTLE: Duration = Duration::from_secs(20);
const LLM: &[(&str, &str)] = &[("app", "llm")];

/// One GPU process of a node's scenario: (pod, SM %, MiB), the pod's first
/// process.
type Load<'a> = (&'a RealPod, u32, u64);

/// A node's mock GPU scenario: one GPU running `loads`.
fn scenario(loads: &[Load<'_>]) -> String {
    let busy: u32 = loads.iter().map(|l| l.1).sum();
    let mut s = format!(
        "[[gpu]]\nname = \"Fake H100\"\nmemory_total_mib = 81920\nutilization = {}\n\
         memory_utilization = 10\ntemperature_c = 60\npower_w = 300.0\npower_limit_w = 700.0\n",
        busy.min(100)
    );
    for (pod, sm, mib) in loads {
        s.push_str(&format!(
            "\n[[gpu.process]]\npid = {}\nsm_util = {sm}\nmem_util = 5\nused_memory_mib = {mib}\n",
            pod.pid(0)
        ));
    }
    s
}

/// Writes `text` to `path` through a rename, so the daemon polling the file
/// never reads half of it.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write scenario");
    std::fs::rename(&tmp, path).expect("rename scenario");
}

/// Where one node's daemon listens and what it reads; the same across restarts.
struct Node {
    name: String,
    grpc: SocketAddr,
    http: SocketAddr,
    peer: SocketAddr,
    scenario: PathBuf,
    log: PathBuf,
}

impl Node {
    fn new(n: u8, dir: &Path) -> Self {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, n));
        let name = format!("gpu-node-{n}");
        Self {
            grpc: SocketAddr::new(ip, free_port(ip)),
            http: SocketAddr::new(ip, free_port(ip)),
            peer: SocketAddr::new(ip, free_port(ip)),
            scenario: dir.join(format!("{name}.toml")),
            log: dir.join(format!("{name}.log")),
            name,
        }
    }

    /// Starts `gpu-scaler serve` for this node with the cluster's `flags`
    /// (peers, policy), not waiting for it.
    fn spawn(&self, kubeconfig: &Path, flags: &[String]) -> ServeProcess {
        let mut args: Vec<String> = vec!["--node-name".into(), self.name.clone()];
        for (flag, value) in [
            ("--attribution", "ebpf"),
            ("--exit-grace", "2s"),
            ("--gpu", "mock"),
            ("--poll-interval", POLL),
            ("--peer-timeout", PEER_TIMEOUT),
        ] {
            args.extend([flag.into(), value.into()]);
        }
        for (flag, value) in [
            ("--gpu-scenario", self.scenario.to_str()),
            ("--kubeconfig", kubeconfig.to_str()),
        ] {
            args.extend([flag.into(), value.expect("utf-8 path").into()]);
        }
        for (flag, addr) in [
            ("--listen", self.grpc),
            ("--metrics-listen", self.http),
            ("--peer-listen", self.peer),
        ] {
            args.extend([flag.into(), addr.to_string()]);
        }
        args.extend(flags.iter().cloned());
        ServeProcess::spawn(&self.name, args, &self.log)
    }
}

/// GetMetrics exactly as KEDA sends it, to `grpc`.
async fn get_metrics(
    grpc: SocketAddr,
    namespace: &str,
    name: &str,
    meta: &[(&str, &str)],
) -> Result<f64, tonic::Status> {
    let mut c = ExternalScalerClient::connect(format!("http://{grpc}"))
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connect {grpc}: {e}")))?;
    metric_value(&mut c, namespace, name, meta).await
}

/// The test's world: the fake API server (on `rt`), the nodes and their
/// daemons, and the real pods' cgroups.
struct Cluster {
    /// `daemons[i]` runs `nodes[i]`; `None` while killed. First, so the
    /// daemons die before the API server they watch and the files they read.
    daemons: Vec<Option<ServeProcess>>,
    nodes: Vec<Node>,
    /// Cluster flags every daemon gets (peers, missing-node policy).
    flags: Vec<String>,
    fake: FakeKube,
    kubeconfig: Kubeconfig,
    /// Scenarios and logs.
    _dir: tempfile::TempDir,
    tree: TestTree,
    rt: tokio::runtime::Runtime,
}

impl Cluster {
    /// `n` nodes on 127.0.0.1..n with no daemon started yet, or `None` (a
    /// skip) where the kernel lacks what the daemons need.
    fn new(n: u8) -> Option<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        if !kernel_ready(&rt) {
            return None;
        }
        let tree = TestTree::new("cluster").expect("cgroup tree");
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = rt.block_on(FakeKube::start());
        Some(Self {
            daemons: (1..=n).map(|_| None).collect(),
            nodes: (1..=n).map(|i| Node::new(i, dir.path())).collect(),
            flags: Vec::new(),
            kubeconfig: fake.kubeconfig(),
            fake,
            _dir: dir,
            tree,
            rt,
        })
    }

    /// Starts pod `n`'s process in new cgroups laid out by `layout`.
    fn pod(&self, n: u32, layout: Layout) -> RealPod {
        RealPod::start(&self.tree, n, layout, 1)
    }

    /// Tells the API server that `pod` runs on node `node` as `ns/name`.
    fn place(&self, ns: &str, name: &str, pod: &RealPod, labels: &[(&str, &str)], node: usize) {
        self.fake.apply(
            &ResourceType::pods(),
            running_pod(ns, name, &pod.uid, labels, &self.nodes[node].name),
        );
    }

    /// Node `node`'s GPU from now on.
    fn set_load(&self, node: usize, loads: &[Load<'_>]) {
        write_atomically(&self.nodes[node].scenario, &scenario(loads));
    }

    fn query(
        &self,
        node: usize,
        ns: &str,
        name: &str,
        meta: &[(&str, &str)],
    ) -> Result<f64, String> {
        self.rt
            .block_on(get_metrics(self.nodes[node].grpc, ns, name, meta))
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    }

    /// Waits until every running daemon answers exactly `want` (the daemons
    /// see pods, peers and GPU files change on their own clocks).
    #[track_caller]
    fn all_answer(&self, ns: &str, name: &str, meta: &[(&str, &str)], want: f64) {
        let mut last = Vec::new();
        let agreed = wait_for(SETTLE, || {
            last = self
                .running()
                .map(|i| (self.nodes[i].name.as_str(), self.query(i, ns, name, meta)))
                .collect();
            last.iter()
                .all(|(_, v)| v.as_ref().is_ok_and(|v| *v == want))
                .then_some(())
        });
        assert!(
            agreed.is_some(),
            "{ns}/{name} {meta:?}: want {want} from every daemon, got {last:?}"
        );
    }

    /// Waits until node `node` answers UNAVAILABLE (answers cached within
    /// the poll interval may come first) and returns the message.
    #[track_caller]
    fn refused(&self, node: usize, ns: &str, name: &str, meta: &[(&str, &str)]) -> String {
        let mut last = None;
        let refused = wait_for(SETTLE, || {
            last = Some(self.query(node, ns, name, meta));
            match &last {
                Some(Err(e)) if e.starts_with("Unavailable") => Some(e.clone()),
                _ => None,
            }
        });
        refused.unwrap_or_else(|| {
            panic!(
                "{} kept answering {last:?}, want UNAVAILABLE",
                self.nodes[node].name
            )
        })
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.daemons[*i].is_some())
    }

    /// Starts (or restarts) the daemons of `which` and waits until all are ready.
    fn start(&mut self, which: &[usize]) {
        for &i in which {
            assert!(
                self.daemons[i].is_none(),
                "{} runs already",
                self.nodes[i].name
            );
            self.daemons[i] = Some(self.nodes[i].spawn(&self.kubeconfig.path, &self.flags));
        }
        for &i in which {
            let serve = self.daemons[i].as_mut().expect("just started");
            serve.wait_ready(self.nodes[i].http);
        }
    }

    fn kill(&mut self, i: usize) {
        self.daemons[i].take().expect("running").kill();
    }

    /// The value of `gpu_scaler_missing_node_total{outcome=...}` on node `i`.
    fn missing_node_count(&self, i: usize, outcome: &str) -> u64 {
        let (code, body) = http_get(self.nodes[i].http, "/metrics").expect("scrape /metrics");
        assert_eq!(code, 200, "{body}");
        let series = format!("gpu_scaler_missing_node_total{{outcome=\"{outcome}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
            .trim()
            .parse()
            .expect("a counter value")
    }
}

/// Probes what the daemons need, so a machine without it skips (or, under
/// GPU_SCALER_REQUIRE_KERNEL=1, fails) with the reason, instead of daemons
/// that exit at start-up.
fn kernel_ready(rt: &tokio::runtime::Runtime) -> bool {
    kernel::require("root", kernel::probe_root())
        && kernel::require("cgroup v2", TestTree::new("probe").map(drop))
        && kernel::require(
            "eBPF attribution",
            rt.block_on(EbpfAttributor::start(Duration::from_secs(1)))
                .map(drop),
        )
}

#[test]
fn four_daemon_processes_answer_for_a_workload_over_three_nodes() {
    let Some(mut c) = Cluster::new(4) else {
        return;
    };
    c.flags = ["--namespace", DAEMON_NS, "--peer-service", PEER_SERVICE]
        .into_iter()
        .chain(["--missing-node-policy", "average"])
        .map(String::from)
        .collect();

    // The pods' processes. Workload ml/llm (Deployment, 4 replicas) on nodes
    // 1-3; ml/web and the same-labelled other/llm pods beside them.
    let llm1 = c.pod(1, systemd_containerd);
    let llm2 = c.pod(2, cgroupfs_guaranteed);
    let llm3 = c.pod(3, systemd_crio);
    let llm4 = c.pod(4, systemd_containerd);
    let web = c.pod(5, systemd_containerd);
    let other1 = c.pod(6, cgroupfs_guaranteed);
    let other2 = c.pod(7, systemd_crio);
    // | node | pods (SM %, MiB)                                  |
    // |------|---------------------------------------------------|
    // | 1    | ml/llm-1 (30, 4096) · other/llm-o1 (50, 1024)     |
    // | 2    | ml/llm-2 (45, 8192)                               |
    // | 3    | ml/llm-3 (20, 2048) · ml/llm-4 (25, 2048)         |
    // | 4    | ml/web-1 (60, 1024) · other/llm-o2 (15, 512)      |
    c.set_load(0, &[(&llm1, 30, 4096), (&other1, 50, 1024)]);
    c.set_load(1, &[(&llm2, 45, 8192)]);
    c.set_load(2, &[(&llm3, 20, 2048), (&llm4, 25, 2048)]);
    c.set_load(3, &[(&web, 60, 1024), (&other2, 15, 512)]);
    c.place("ml", "llm-1", &llm1, LLM, 0);
    c.place("ml", "llm-2", &llm2, LLM, 1);
    c.place("ml", "llm-3", &llm3, LLM, 2);
    c.place("ml", "llm-4", &llm4, LLM, 2);
    c.place("ml", "web-1", &web, &[("app", "web")], 3);
    c.place("other", "llm-o1", &other1, LLM, 0);
    c.place("other", "llm-o2", &other2, LLM, 3);
    c.fake
        .apply(&ResourceType::deployments(), workload("ml", "llm", 4, LLM));
    c.fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "llm-so", (None, None, "llm")),
    );
    for n in &c.nodes {
        c.fake.apply(
            &ResourceType::endpoint_slices(),
            peer_endpoint_slice(DAEMON_NS, PEER_SERVICE, &n.name, n.peer),
        );
    }
    c.start(&[0, 1, 2, 3]);

    // Through any daemon, node 4 (no workload pod) included: the sum over the
    // four replicas on three nodes. gpu_utilization = 30 + 45 + 20 + 25.
    let by_selector: &[(&str, &str)] = &[("podSelector", "app=llm")];
    c.all_answer("ml", "llm-so", by_selector, 120.0);
    // memory_used_mib = 4096 + 8192 + 2048 + 2048.
    c.all_answer(
        "ml",
        "llm-so",
        &[("podSelector", "app=llm"), ("metric", "memory_used_mib")],
        16384.0,
    );
    // Without podSelector: ScaledObject ml/llm-so -> Deployment llm -> its
    // scale subresource's selector (app=llm).
    c.all_answer("ml", "llm-so", &[], 120.0);
    // Namespaces never mix: the same labels in `other` are only its two pods,
    // one beside llm-1 on node 1 (50) and one on node 4 (15).
    c.all_answer("other", "any", by_selector, 65.0);
    // A ScaledObject whose target does not exist: a clear error, never a number.
    c.fake.apply(
        &ResourceType::scaled_objects(),
        scaled_object("ml", "ghost-so", (None, None, "ghost")),
    );
    let e = c.query(3, "ml", "ghost-so", &[]).expect_err("no target");
    assert!(
        e.starts_with("FailedPrecondition") && e.contains("Deployment ghost"),
        "{e}"
    );

    // Node 2's daemon is lost (SIGKILL). 3 of 4 pods reported, so llm-2 counts
    // as their mean, (30 + 20 + 25) / 3 = 25: 30 + 25 + 20 + 25 = 100.
    c.kill(1);
    c.all_answer("ml", "llm-so", by_selector, 100.0);
    assert!(
        c.missing_node_count(3, "averaged") > 0,
        "the policy was applied and counted on /metrics"
    );
    // Node 3's too: 1 of 4 reported, fewer than half: UNAVAILABLE.
    c.kill(2);
    let refused = c.refused(0, "ml", "llm-so", by_selector);
    assert!(refused.contains("only 1 of 4"), "{refused}");
    assert!(
        c.missing_node_count(0, "unavailable") > 0,
        "refusal counted"
    );

    // Both restarted (their eBPF attribution seeds the running pods from
    // /proc): exact again, everywhere.
    c.start(&[1, 2]);
    c.all_answer("ml", "llm-so", by_selector, 120.0);

    // llm-4 is rescheduled from node 3 to node 4: the old pod is deleted (its
    // process killed, its cgroup gone), a new pod with a new uid starts on
    // node 4 and its process uses node 4's GPU: 30 + 45 + 20 + 35 = 130.
    c.set_load(2, &[(&llm3, 20, 2048)]);
    c.fake.delete(&ResourceType::pods(), "ml", "llm-4");
    llm4.remove();
    let llm4b = c.pod(8, cgroupfs_guaranteed);
    c.place("ml", "llm-4b", &llm4b, LLM, 3);
    c.set_load(
        3,
        &[(&web, 60, 1024), (&other2, 15, 512), (&llm4b, 35, 3072)],
    );
    c.all_answer("ml", "llm-so", by_selector, 130.0);
    c.all_answer("ml", "llm-so", &[], 130.0);
    // memory_used_mib = 4096 + 8192 + 2048 + 3072.
    c.all_answer(
        "ml",
        "llm-so",
        &[("podSelector", "app=llm"), ("metric", "memory_used_mib")],
        17408.0,
    );
    c.all_answer("other", "any", by_selector, 65.0);
}

/// The other way to find peers and the other policy: a static `--peers` list
/// (no EndpointSlices) and `--missing-node-policy fail`, where one node that
/// does not answer makes the answer UNAVAILABLE.
#[test]
fn static_peers_with_the_fail_policy() {
    let Some(mut c) = Cluster::new(2) else {
        return;
    };
    let peers: Vec<String> = c
        .nodes
        .iter()
        .map(|n| format!("{}={}", n.name, n.peer))
        .collect();
    c.flags = vec![
        "--peers".into(),
        peers.join(","),
        "--missing-node-policy".into(),
        "fail".into(),
    ];
    let llm1 = c.pod(1, systemd_containerd);
    let llm2 = c.pod(2, cgroupfs_guaranteed);
    let llm3 = c.pod(3, systemd_crio);
    c.set_load(0, &[(&llm1, 30, 4096), (&llm3, 5, 1024)]);
    c.set_load(1, &[(&llm2, 45, 8192)]);
    c.place("ml", "llm-1", &llm1, LLM, 0);
    c.place("ml", "llm-2", &llm2, LLM, 1);
    c.place("ml", "llm-3", &llm3, LLM, 0);
    c.start(&[0, 1]);
    let by_selector: &[(&str, &str)] = &[("podSelector", "app=llm")];
    // 30 + 45 + 5.
    c.all_answer("ml", "llm-so", by_selector, 80.0);

    // Node 2 is lost: 1 of 3 pods unreported. `average` would answer with 2
    // of 3 reported; `fail` refuses.
    c.kill(1);
    let refused = c.refused(0, "ml", "llm-so", by_selector);
    assert!(
        refused.contains("1 of 3") && refused.contains("--missing-node-policy fail"),
        "{refused}"
    );
    assert!(
        c.missing_node_count(0, "unavailable") > 0,
        "refusal counted"
    );
    c.start(&[1]);
    c.all_answer("ml", "llm-so", by_selector, 80.0);
}
