//! etcd, kube-apiserver, kube-controller-manager and KEDA (operator and metrics
//! API server) as processes, the way a kubeadm cluster configures them: the
//! test's certificates, RBAC on, ServiceAccount tokens signed by the API server,
//! the aggregation layer serving `external.metrics.k8s.io` from KEDA's metrics
//! server in a network namespace of its own (the API server reaches it through the
//! endpoint of its Service, `--enable-aggregator-routing`, as there is no
//! kube-proxy).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use base64::Engine as _;
use gpu_scaler_tests::serve::free_port;
use kube::{
    Client,
    api::{Api, DynamicObject, Patch, PatchParams, ValidationDirective},
    config::{KubeConfigOptions, Kubeconfig},
    core::{ApiResource, GroupVersionKind},
    discovery::{Scope, pinned_kind},
};
use serde_json::{Value, json};

use super::{
    certs::{Pair, Pki},
    network::{Netns, Network},
    process::Proc,
};

/// The field manager of everything the test applies.
pub const MANAGER: &str = "gpu-scaler-e2e";
/// How long a component may take to come up on a loaded CI machine.
const UP_WITHIN: Duration = Duration::from_secs(120);
/// The Service that fronts KEDA's metrics server (KEDA's own name for it).
const KEDA_NS: &str = "keda";
/// The KEDA operator's /etc/hosts before any Service name is added.
const HOSTS: &str = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n";
const METRICS_SERVICE: &str = "keda-metrics-apiserver";
/// Where KEDA's metrics server listens inside its namespace.
const METRICS_PORT: u16 = 6443;

/// The binaries `cargo xtask e2e` built and the manifests it rendered.
pub struct Inputs {
    pub bin: PathBuf,
    pub manifests: PathBuf,
}

impl Inputs {
    /// From `GPU_SCALER_E2E_BIN` / `GPU_SCALER_E2E_MANIFESTS`, which `cargo xtask e2e`
    /// sets; panics naming that command otherwise.
    pub fn from_env() -> Self {
        let var = |k: &str| {
            PathBuf::from(std::env::var_os(k).unwrap_or_else(|| {
                panic!("{k} is not set: run the end-to-end scenarios with `cargo xtask e2e`, which builds etcd, Kubernetes and KEDA first")
            }))
        };
        Self {
            bin: var("GPU_SCALER_E2E_BIN"),
            manifests: var("GPU_SCALER_E2E_MANIFESTS"),
        }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        let p = self.bin.join(name);
        assert!(
            p.is_file(),
            "{} missing: run `cargo xtask e2e`",
            p.display()
        );
        p
    }

    /// A JSON array of objects written by `cargo xtask e2e`.
    pub fn objects(&self, file: &str) -> Vec<Value> {
        let path = self.manifests.join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e} (run `cargo xtask e2e`)", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
    }
}

/// How a kubeconfig's user authenticates.
pub enum Auth<'a> {
    Cert(&'a Pair),
    Token(&'a str),
}

/// Writes a kubeconfig (JSON, which is YAML) for `server` trusting `ca`.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, auth: Auth<'_>) {
    let user = match auth {
        Auth::Cert(p) => json!({"client-certificate": p.cert, "client-key": p.key}),
        Auth::Token(t) => json!({"token": t}),
    };
    let kc = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "u"}}],
        "current-context": "e2e",
    });
    std::fs::write(
        path,
        serde_json::to_vec_pretty(&kc).expect("kubeconfig json"),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A kube client from a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    Client::try_from(cfg).expect("kube client")
}

pub struct ControlPlane {
    // Dropped first to last: KEDA, then the controllers, then the API server, then
    // etcd, then the network and files.
    pub keda_operator: Option<Proc>,
    pub keda_adapter: Option<Proc>,
    pub controller_manager: Proc,
    pub apiserver: Proc,
    pub etcd: Proc,
    pub net: Network,
    pub pki: Pki,
    /// https://<host ip>:<port>
    pub server: String,
    pub admin_kubeconfig: PathBuf,
    pub dir: PathBuf,
    pub logs: PathBuf,
    pub admin: Client,
    /// The KEDA operator's /etc/hosts (see [`ControlPlane::set_service_addresses`]).
    hosts: PathBuf,
    /// KEDA operator's metrics-service (gRPC) address, for its metrics server.
    keda_grpc: SocketAddr,
    keda_netns: Netns,
}

impl ControlPlane {
    /// Starts etcd, the API server and the controller manager, and waits until
    /// the API server is ready. `net` must have its bridge; KEDA's metrics server
    /// gets a namespace on it.
    pub async fn start(inputs: &Inputs, mut net: Network, dir: &Path) -> Self {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");
        let host = net.host_ip();
        let keda_netns = net.namespace("keda", 2).expect("KEDA's network namespace");
        let pki = Pki::create(&dir.join("pki"), host, &[host, keda_netns.ip]);

        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let (client_port, peer_port) = (free_port(local), free_port(local));
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd = Proc::spawn(
            "etcd",
            &inputs.bin("etcd"),
            [
                "--name=e2e".to_owned(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=e2e={peer_url}"),
                // A throw-away cluster: no fsync (the CI disk is slow and shared).
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            &[],
            None,
            &logs,
        );

        let port = free_port(IpAddr::V4(host));
        let server = format!("https://{host}:{port}");
        let p = |p: &Path| p.display().to_string();
        let apiserver = Proc::spawn(
            "kube-apiserver",
            &inputs.bin("kube-apiserver"),
            [
                format!("--etcd-servers={etcd_url}"),
                format!("--bind-address={host}"),
                format!("--advertise-address={host}"),
                format!("--secure-port={port}"),
                format!("--tls-cert-file={}", p(&pki.apiserver.cert)),
                format!("--tls-private-key-file={}", p(&pki.apiserver.key)),
                format!("--client-ca-file={}", p(&pki.ca)),
                "--authorization-mode=Node,RBAC".into(),
                "--service-cluster-ip-range=10.97.0.0/16".into(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", p(&pki.service_account_pub)),
                format!(
                    "--service-account-signing-key-file={}",
                    p(&pki.service_account_key)
                ),
                // The aggregation layer: the API server proxies to extension API
                // servers with this client certificate and the user in headers.
                format!("--requestheader-client-ca-file={}", p(&pki.front_proxy_ca)),
                "--requestheader-allowed-names=front-proxy-client".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                format!(
                    "--proxy-client-cert-file={}",
                    p(&pki.front_proxy_client.cert)
                ),
                format!("--proxy-client-key-file={}", p(&pki.front_proxy_client.key)),
                "--enable-aggregator-routing=true".into(),
                "--allow-privileged=true".into(),
                format!("--cert-dir={}", dir.join("apiserver-certs").display()),
                "--profiling=false".into(),
            ],
            &[],
            None,
            &logs,
        );
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        write_kubeconfig(&admin_kubeconfig, &server, &pki.ca, Auth::Cert(&pki.admin));
        let kcm_kubeconfig = dir.join("controller-manager.kubeconfig");
        write_kubeconfig(
            &kcm_kubeconfig,
            &server,
            &pki.ca,
            Auth::Cert(&pki.controller_manager),
        );
        let mut apiserver = apiserver;
        let admin = client(&admin_kubeconfig).await;
        // The controller manager reads the request-header CA from kube-system as
        // soon as it starts: only once the API server serves its bootstrap RBAC.
        let deadline = tokio::time::Instant::now() + UP_WITHIN;
        loop {
            apiserver.assert_running();
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .expect("request");
            match admin.request_text(req).await {
                Ok(t) if t.trim() == "ok" => break,
                other => assert!(
                    tokio::time::Instant::now() < deadline,
                    "kube-apiserver not ready within {UP_WITHIN:?}: {other:?}\n{}",
                    apiserver.tail(30)
                ),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut cp = Self {
            keda_operator: None,
            keda_adapter: None,
            controller_manager: Proc::spawn(
                "kube-controller-manager",
                &inputs.bin("kube-controller-manager"),
                [
                    format!("--kubeconfig={}", p(&kcm_kubeconfig)),
                    format!("--authentication-kubeconfig={}", p(&kcm_kubeconfig)),
                    format!("--authorization-kubeconfig={}", p(&kcm_kubeconfig)),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={}", free_port(local)),
                    "--use-service-account-credentials=true".into(),
                    format!(
                        "--service-account-private-key-file={}",
                        p(&pki.service_account_key)
                    ),
                    format!("--root-ca-file={}", p(&pki.ca)),
                    // No kubelets renew the nodes' leases here: the node lifecycle
                    // controller would mark the nodes unreachable and evict.
                    "--controllers=*,-node-lifecycle-controller".into(),
                    "--leader-elect=false".into(),
                    // The HPA's loop, 15 s by default: shorter, so the scenarios
                    // take minutes, not tens of minutes; its arithmetic is the same.
                    "--horizontal-pod-autoscaler-sync-period=2s".into(),
                ],
                &[],
                None,
                &logs,
            ),
            apiserver,
            etcd,
            net,
            pki,
            server,
            admin_kubeconfig,
            dir: dir.to_owned(),
            hosts: dir.join("keda-operator.hosts"),
            logs,
            admin,
            keda_grpc: SocketAddr::new(IpAddr::V4(host), free_port(IpAddr::V4(host))),
            keda_netns,
        };
        cp.wait_ready().await;
        cp
    }

    fn check_running(&mut self) {
        self.etcd.assert_running();
        self.apiserver.assert_running();
        self.controller_manager.assert_running();
        if let Some(p) = &mut self.keda_operator {
            p.assert_running();
        }
        if let Some(p) = &mut self.keda_adapter {
            p.assert_running();
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + UP_WITHIN;
        // The controller manager's first ServiceAccount: the cluster is usable.
        let sa: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.admin.clone(), "default");
        loop {
            self.check_running();
            if sa.get_opt("default").await.ok().flatten().is_some() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the controller manager created no default ServiceAccount within {UP_WITHIN:?}\n{}",
                self.controller_manager.tail(30)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Server-side applies every object (strict field validation: an unknown
    /// field is an error), waiting for kinds that CRDs just added to be served.
    pub async fn apply_all(&mut self, objects: &[Value]) {
        for o in objects {
            self.apply(o).await;
        }
    }

    pub async fn apply(&mut self, object: &Value) -> DynamicObject {
        let api_version = object["apiVersion"].as_str().expect("apiVersion");
        let kind = object["kind"].as_str().expect("kind");
        let name = object["metadata"]["name"].as_str().expect("metadata.name");
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, kind);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let (ar, caps) = loop {
            match pinned_kind(&self.admin, &gvk).await {
                Ok(found) => break found,
                Err(e) => {
                    self.check_running();
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{api_version} {kind} not served: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let api = self.api(&ar, caps.scope, object["metadata"]["namespace"].as_str());
        let mut params = PatchParams::apply(MANAGER).force();
        params.field_validation = Some(ValidationDirective::Strict);
        api.patch(name, &params, &Patch::Apply(object))
            .await
            .unwrap_or_else(|e| panic!("apply {kind} {name}: {e}"))
    }

    pub fn api(&self, ar: &ApiResource, scope: Scope, ns: Option<&str>) -> Api<DynamicObject> {
        match (scope, ns) {
            (Scope::Namespaced, Some(ns)) => Api::namespaced_with(self.admin.clone(), ns, ar),
            (Scope::Namespaced, None) => Api::default_namespaced_with(self.admin.clone(), ar),
            (Scope::Cluster, _) => Api::all_with(self.admin.clone(), ar),
        }
    }

    /// Makes `name` resolve to `addresses` for the KEDA operator, as cluster DNS
    /// resolves a Service's name (there is no kube-proxy, so no virtual IP: the
    /// endpoints themselves, in order; gRPC's pick_first takes the first that
    /// answers). The file is rewritten in place, so the bind mount sees it, and
    /// Go's resolver re-reads it when its modification time changes.
    pub fn set_service_addresses(&self, name: &str, addresses: &[std::net::Ipv4Addr]) {
        let mut text = HOSTS.to_owned();
        for a in addresses {
            text.push_str(&format!("{a} {name}\n"));
        }
        std::fs::write(&self.hosts, text).expect("write KEDA's hosts file");
    }

    /// KEDA: its CRDs, the operator on the host, its metrics server in its own
    /// network namespace behind the `v1beta1.external.metrics.k8s.io`
    /// APIService, and waits until the aggregation layer reports it Available.
    pub async fn start_keda(&mut self, inputs: &Inputs) {
        for crd in inputs.objects("keda-crds.json") {
            self.apply(&crd).await;
        }
        self.apply(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": KEDA_NS}}),
        )
        .await;
        // KEDA runs with the admin's identity here: its own RBAC manifests are
        // kustomize bases (issue 15 leaves them for later); gpu-scaler's
        // daemons, whose permissions this test is about, use their chart's.
        let env = vec![
            ("KUBECONFIG", self.admin_kubeconfig.display().to_string()),
            ("WATCH_NAMESPACE", String::new()),
            ("POD_NAMESPACE", KEDA_NS.to_owned()),
            ("KEDA_CLUSTER_OBJECT_NAMESPACE", KEDA_NS.to_owned()),
        ];
        let host = IpAddr::V4(self.net.host_ip());
        let certs = self.pki.keda_dir.display().to_string();
        // KEDA dials a trigger's scalerAddress by the name gpu-scaler's
        // certificate carries (a Service's); there is no cluster DNS, so the
        // operator gets an /etc/hosts of its own (set_service_addresses).
        std::fs::write(&self.hosts, HOSTS).expect("write KEDA's hosts file");
        self.keda_operator = Some(Proc::spawn_with_hosts(
            "keda-operator",
            &inputs.bin("keda-operator"),
            [
                format!("--cert-dir={certs}"),
                format!("--metrics-service-bind-address={}", self.keda_grpc),
                format!("--metrics-bind-address=127.0.0.1:{}", free_port(host)),
                format!("--health-probe-bind-address=127.0.0.1:{}", free_port(host)),
                "--enable-cert-rotation=false".into(),
                "--leader-elect=false".into(),
                "--zap-log-level=info".into(),
            ],
            &env,
            &self.hosts,
            &self.logs,
        ));
        let kubeconfig = self.admin_kubeconfig.display().to_string();
        self.keda_adapter = Some(Proc::spawn(
            "keda-metrics-apiserver",
            &inputs.bin("keda-adapter"),
            [
                format!("--cert-dir={certs}"),
                format!("--tls-cert-file={certs}/tls.crt"),
                format!("--tls-private-key-file={certs}/tls.key"),
                format!("--bind-address={}", self.keda_netns.ip),
                format!("--secure-port={METRICS_PORT}"),
                format!("--metrics-service-address={}", self.keda_grpc),
                format!("--lister-kubeconfig={kubeconfig}"),
                format!("--authentication-kubeconfig={kubeconfig}"),
                format!("--authorization-kubeconfig={kubeconfig}"),
                "--port=8080".into(),
            ],
            &env,
            Some(&self.keda_netns),
            &self.logs,
        ));
        let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&self.pki.keda_ca_pem);
        let ip = self.keda_netns.ip.to_string();
        for o in [
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": METRICS_SERVICE, "namespace": KEDA_NS},
                   "spec": {"ports": [{"name": "https", "port": 443, "targetPort": METRICS_PORT}]}}),
            // No selector: its one endpoint is the metrics server's namespace.
            json!({"apiVersion": "v1", "kind": "Endpoints",
                   "metadata": {"name": METRICS_SERVICE, "namespace": KEDA_NS},
                   "subsets": [{"addresses": [{"ip": ip}],
                                "ports": [{"name": "https", "port": METRICS_PORT}]}]}),
            json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
                   "metadata": {"name": "v1beta1.external.metrics.k8s.io"},
                   "spec": {"group": "external.metrics.k8s.io", "version": "v1beta1",
                            "groupPriorityMinimum": 100, "versionPriority": 100,
                            "caBundle": ca_bundle,
                            "service": {"name": METRICS_SERVICE, "namespace": KEDA_NS, "port": 443}}}),
        ] {
            self.apply(&o).await;
        }
        self.wait_apiservice_available().await;
    }

    async fn wait_apiservice_available(&mut self) {
        let ar = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
            "apiservices",
        );
        let api: Api<DynamicObject> = Api::all_with(self.admin.clone(), &ar);
        let deadline = tokio::time::Instant::now() + UP_WITHIN;
        let mut last = Value::Null;
        loop {
            self.check_running();
            if let Ok(svc) = api.get("v1beta1.external.metrics.k8s.io").await {
                last = svc.data["status"].clone();
                let available = last["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Available" && c["status"] == "True")
                });
                if available {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "external.metrics.k8s.io not Available within {UP_WITHIN:?}: {last}\n{}",
                self.keda_adapter
                    .as_ref()
                    .map(|p| p.tail(30))
                    .unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
