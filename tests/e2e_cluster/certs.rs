//! The cluster's certificates, made by the test (rcgen): the cluster CA with the API
//! server's serving certificate and the client certificates of the admin and the
//! controller manager; the front-proxy CA and the aggregator's client certificate
//! (the aggregation layer's request-header authentication); KEDA's CA with the one
//! certificate its operator and metrics server share (mTLS between them, as KEDA's
//! own cert rotation issues it); and the service-account signing key.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// A certificate and key as PEM files.
#[derive(Clone, Debug)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Every file the control plane's processes are given.
pub struct Pki {
    pub ca: PathBuf,
    pub apiserver: Pair,
    pub admin: Pair,
    pub controller_manager: Pair,
    pub front_proxy_ca: PathBuf,
    pub front_proxy_client: Pair,
    /// `ca.crt`, `tls.crt`, `tls.key`: the layout KEDA's `--cert-dir` reads.
    pub keda_dir: PathBuf,
    pub keda_ca_pem: String,
    /// ECDSA P-256 key that signs SA tokens, and its public half that verifies them.
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

fn ca(cn: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, cn);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA cert")
}

/// A leaf signed by `issuer`: `sans` (IPs parse as IP SANs), subject CN and O,
/// the extended key usages given.
fn leaf(
    issuer: &CertifiedIssuer<'_, KeyPair>,
    cn: &str,
    org: Option<&str>,
    sans: &[String],
    usages: &[ExtendedKeyUsagePurpose],
) -> (String, String) {
    let key = KeyPair::generate().expect("leaf key");
    let mut params = CertificateParams::new(sans.to_vec()).expect("leaf params");
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    params.extended_key_usages = usages.to_vec();
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn write_pair(dir: &Path, name: &str, (cert, key): (String, String)) -> Pair {
    Pair {
        cert: write(dir, &format!("{name}.crt"), &cert),
        key: write(dir, &format!("{name}.key"), &key),
    }
}

impl Pki {
    /// Writes everything into `dir`. `apiserver_ip` and `keda_ips` are the
    /// addresses their serving certificates must name.
    pub fn create(dir: &Path, apiserver_ip: Ipv4Addr, keda_ips: &[Ipv4Addr]) -> Self {
        use ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        fs::create_dir_all(dir).expect("pki dir");
        let cluster = ca("gpu-scaler e2e cluster CA");
        let apiserver_sans: Vec<String> = [
            apiserver_ip.to_string(),
            "127.0.0.1".into(),
            // The first address of --service-cluster-ip-range: the `kubernetes`
            // Service.
            "10.97.0.1".into(),
            "localhost".into(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
        ]
        .into();
        let front = ca("gpu-scaler e2e front-proxy CA");
        let keda = ca("KEDA");
        let keda_sans: Vec<String> = keda_ips
            .iter()
            .map(ToString::to_string)
            .chain(
                [
                    "keda-operator",
                    "keda-operator.keda.svc",
                    "keda-metrics-apiserver",
                    "keda-metrics-apiserver.keda.svc",
                ]
                .map(String::from),
            )
            .collect();
        let keda_dir = dir.join("keda");
        fs::create_dir_all(&keda_dir).expect("keda cert dir");
        let (keda_cert, keda_key) = leaf(
            &keda,
            "keda-operator",
            Some("KEDAORG"),
            &keda_sans,
            &[ServerAuth, ClientAuth],
        );
        write(&keda_dir, "ca.crt", &keda.pem());
        write(&keda_dir, "tls.crt", &keda_cert);
        write(&keda_dir, "tls.key", &keda_key);
        let sa = KeyPair::generate().expect("service account key");
        Self {
            ca: write(dir, "ca.crt", &cluster.pem()),
            apiserver: write_pair(
                dir,
                "apiserver",
                leaf(
                    &cluster,
                    "kube-apiserver",
                    None,
                    &apiserver_sans,
                    &[ServerAuth],
                ),
            ),
            admin: write_pair(
                dir,
                "admin",
                leaf(
                    &cluster,
                    "e2e-admin",
                    Some("system:masters"),
                    &[],
                    &[ClientAuth],
                ),
            ),
            // Its own identity, bound by the bootstrap RBAC policy; each controller
            // then runs with its own ServiceAccount (--use-service-account-credentials).
            controller_manager: write_pair(
                dir,
                "controller-manager",
                leaf(
                    &cluster,
                    "system:kube-controller-manager",
                    None,
                    &[],
                    &[ClientAuth],
                ),
            ),
            front_proxy_ca: write(dir, "front-proxy-ca.crt", &front.pem()),
            front_proxy_client: write_pair(
                dir,
                "front-proxy-client",
                leaf(&front, "front-proxy-client", None, &[], &[ClientAuth]),
            ),
            keda_dir,
            keda_ca_pem: keda.pem(),
            service_account_key: write(dir, "sa.key", &sa.serialize_pem()),
            service_account_pub: write(dir, "sa.pub", &sa.public_key_pem()),
        }
    }
}
