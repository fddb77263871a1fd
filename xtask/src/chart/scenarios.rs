//! What the rendered objects must hold: in every render ([`assert_common`]), for each
//! values file of `ci/` ([`assert_scenario`]: secure defaults, generated TLS, the
//! trigger authentication, ...), and the values that must not render at all
//! ([`check_bad_values`]).

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{
    CI_VALUES, NAMESPACE, RELEASE,
    rbac::{Call, RbacCalls, compare_rbac, granted},
    tools::Tools,
};

/// Values that must not render, and what the error must say.
const BAD_VALUES: &[(&[&str], &str)] = &[
    // values.schema.json
    (
        &["securityContext.privilegd=true"],
        "additional properties 'privilegd' not allowed",
    ),
    (&["tls.source=vault"], "at '/tls/source'"),
    (&["daemon.pollInterval=fast"], "at '/daemon/pollInterval'"),
    (
        &["daemon.missingNodePolicy=zero"],
        "at '/daemon/missingNodePolicy'",
    ),
    (&["daemon.attribution=guess"], "at '/daemon/attribution'"),
    (&["ports.scaler=70000"], "at '/ports/scaler'"),
    // the templates' own checks (_helpers.tpl), for what a schema cannot say
    (
        &["tls.enabled=true", "tls.source=certManager"],
        "needs tls.certManager.issuerRef.name",
    ),
    (
        &[
            "tls.enabled=true",
            "tls.source=certManager",
            "tls.certManager.issuerRef.name=ca",
            "tls.certManager.issuerRef.kind=Issuer",
        ],
        "needs issuerRef.kind=ClusterIssuer",
    ),
    (&["daemon.gpu=mock"], "needs daemon.mockScenario"),
];

/// Every value set of [`BAD_VALUES`] fails to render, saying what it must.
pub(super) fn check_bad_values(tools: &Tools) -> Result<()> {
    for (set, expected) in BAD_VALUES {
        let err = match tools.template(None, set) {
            Ok(_) => {
                bail!("helm template --set {set:?} rendered; expected it to fail with {expected:?}")
            }
            Err(e) => format!("{e:#}"),
        };
        ensure!(
            err.contains(expected),
            "helm template --set {set:?} failed without saying {expected:?}: {err}"
        );
    }
    Ok(())
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} rendered"))
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

pub(super) fn container(objects: &[Value]) -> Result<&Value> {
    let ds = find(objects, "DaemonSet", RELEASE)?;
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("DaemonSet without containers")?;
    ensure!(
        containers.len() == 1,
        "expected one container, got {}",
        containers.len()
    );
    Ok(&containers[0])
}

fn env<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

fn volume<'a>(objects: &'a [Value], name: &str) -> Option<&'a Value> {
    let ds = find(objects, "DaemonSet", RELEASE).ok()?;
    ds["spec"]["template"]["spec"]["volumes"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == name)
}

/// What every render must have, whatever the options.
pub(super) fn assert_common(objects: &[Value]) -> Result<()> {
    let ds = find(objects, "DaemonSet", RELEASE)?;
    let pod = &ds["spec"]["template"]["spec"];
    ensure!(pod["hostPID"] == true, "hostPID must be true (NVML pids)");
    ensure!(
        pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault",
        "seccomp must default to RuntimeDefault"
    );
    let c = container(objects)?;
    ensure!(c["args"][0] == "serve", "the container must run `serve`");
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let e = env(c, name).with_context(|| format!("no {name} env"))?;
        ensure!(
            e["valueFrom"]["fieldRef"]["fieldPath"] == field,
            "{name} must come from {field}"
        );
    }
    // The image's default user is 65532; the daemon needs uid 0 (docs/security.md),
    // privileged or not: a privileged non-root process has no effective capabilities.
    ensure!(
        c["securityContext"]["runAsUser"] == 0,
        "the daemon must run as uid 0"
    );
    ensure!(
        c["securityContext"]["readOnlyRootFilesystem"] == true,
        "the root filesystem must be read-only"
    );
    for mount in c["volumeMounts"].as_array().context("no volumeMounts")? {
        let host = volume(objects, mount["name"].as_str().unwrap_or_default())
            .is_some_and(|v| v.get("hostPath").is_some());
        ensure!(
            !host || mount["readOnly"] == true,
            "host mount {mount} must be read-only"
        );
    }
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        ensure!(
            c[probe]["httpGet"]["path"] == path,
            "{probe} must ask {path}"
        );
        ensure!(
            c[probe]["httpGet"]["port"] == "metrics",
            "{probe} must use the metrics port"
        );
    }
    let ports: Vec<(String, i64)> = c["ports"]
        .as_array()
        .context("no ports")?
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_owned(),
                p["containerPort"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    for expected in [("scaler", 6000), ("peer", 6001), ("metrics", 9090)] {
        ensure!(
            ports
                .iter()
                .any(|(n, p)| n == expected.0 && *p == expected.1),
            "container port {expected:?} missing from {ports:?}"
        );
    }
    let peers = find(objects, "Service", &format!("{RELEASE}-peers"))?;
    ensure!(
        peers["spec"]["clusterIP"] == "None",
        "the peers Service must be headless"
    );
    ensure!(
        env(c, "GPU_SCALER_PEER_SERVICE").is_some_and(|e| e["value"] == format!("{RELEASE}-peers")),
        "GPU_SCALER_PEER_SERVICE must name the headless Service"
    );
    // The daemons find each other's address by the port named `peer` in the
    // EndpointSlices (gpu_scaler::cluster::discovery::PEER_PORT_NAME).
    let peer_port = &peers["spec"]["ports"][0];
    ensure!(
        peer_port["name"] == "peer" && peer_port["port"] == 6001,
        "the headless Service's port must be named `peer` (6001): {peer_port}"
    );
    let scaler = find(objects, "Service", RELEASE)?;
    ensure!(
        scaler["spec"]["ports"][0]["port"] == 6000,
        "KEDA's Service must listen on 6000"
    );
    find(objects, "Service", &format!("{RELEASE}-metrics"))?;
    for (kind, role) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let binding = find(objects, kind, RELEASE)?;
        ensure!(
            binding["subjects"][0]["name"] == pod["serviceAccountName"]
                && binding["subjects"][0]["namespace"] == NAMESPACE
                && binding["roleRef"]["kind"] == role
                && binding["roleRef"]["name"] == RELEASE,
            "the {kind} must bind the DaemonSet's ServiceAccount to the {role}"
        );
    }
    Ok(())
}

/// What each option set in `ci/` must change.
pub(super) fn assert_scenario(name: &str, objects: &[Value], calls: &RbacCalls) -> Result<()> {
    let c = container(objects)?;
    let caps = &c["securityContext"]["capabilities"];
    let cluster_role = granted(find(objects, "ClusterRole", RELEASE)?)?;
    let mut needed = calls.cluster.clone();
    if name == "scale-targets-values" {
        needed.insert(Call {
            group: "argoproj.io".into(),
            resource: "rollouts/scale".into(),
            verb: "get".into(),
        });
    }
    compare_rbac(&cluster_role, &needed).context("ClusterRole")?;
    let role = find(objects, "Role", RELEASE)?;
    ensure!(
        role["metadata"]["namespace"] == NAMESPACE,
        "the Role must be in the release's namespace"
    );
    compare_rbac(&granted(role)?, &calls.namespace).context("Role")?;

    let count = |kind: &str| objects.iter().filter(|o| o["kind"] == kind).count();
    let tls_env = env(c, "GPU_SCALER_TLS_CERT").is_some();
    match name {
        "default" => {
            ensure!(
                c["securityContext"]["privileged"] == false,
                "privileged by default"
            );
            ensure!(
                c["securityContext"]["allowPrivilegeEscalation"] == false,
                "escalation allowed"
            );
            ensure!(
                caps["drop"] == serde_json::json!(["ALL"]),
                "capabilities not dropped: {caps}"
            );
            ensure!(
                caps["add"] == serde_json::json!(["BPF", "PERFMON"]),
                "capabilities {caps}"
            );
            assert_secure_defaults(objects, c)?;
            for kind in ["ServiceMonitor", "Certificate", "ConfigMap"] {
                ensure!(
                    count(kind) == 0,
                    "{kind} rendered by default: {:?}",
                    kinds(objects)
                );
            }
            let pod = &find(objects, "DaemonSet", RELEASE)?["spec"]["template"]["spec"];
            ensure!(pod["runtimeClassName"] == "nvidia", "runtimeClassName");
            ensure!(
                pod["nodeSelector"]["nvidia.com/gpu.present"] == "true",
                "nodeSelector"
            );
            ensure!(
                pod["priorityClassName"] == "system-node-critical",
                "priorityClassName"
            );
            ensure!(
                env(c, "NVIDIA_VISIBLE_DEVICES").is_some_and(|e| e["value"] == "all"),
                "NVIDIA_VISIBLE_DEVICES"
            );
            ensure!(
                env(c, "NVIDIA_DRIVER_CAPABILITIES").is_some_and(|e| e["value"] == "utility"),
                "NVIDIA_DRIVER_CAPABILITIES"
            );
        }
        "privileged-values" => {
            ensure!(c["securityContext"]["privileged"] == true, "not privileged");
            ensure!(
                c["securityContext"].get("capabilities").is_none(),
                "capabilities with privileged"
            );
        }
        "tls-secret-values" => {
            ensure!(tls_env, "no GPU_SCALER_TLS_CERT");
            ensure!(
                env(c, "GPU_SCALER_TLS_CLIENT_CA").is_some(),
                "mTLS without GPU_SCALER_TLS_CLIENT_CA"
            );
            ensure!(
                env(c, "GPU_SCALER_PEER_TLS_CA")
                    .is_some_and(|e| e["value"] == "/etc/gpu-scaler/tls/peer/ca.crt"),
                "no peer mTLS CA"
            );
            ensure!(
                env(c, "GPU_SCALER_PEER_TLS_SERVER_NAME")
                    .is_some_and(|e| e["value"] == format!("{RELEASE}-peers")),
                "peer TLS server name must be the headless Service's name"
            );
            let scaler = volume(objects, "scaler-tls").context("no scaler-tls volume")?;
            ensure!(
                scaler["secret"]["secretName"] == "my-scaler-tls",
                "scaler secret {scaler}"
            );
            let peer = volume(objects, "peer-tls").context("no peer-tls volume")?;
            ensure!(
                peer["secret"]["secretName"] == "my-peer-tls",
                "peer secret {peer}"
            );
            ensure!(
                count("Certificate") == 0,
                "Certificates without cert-manager"
            );
            ensure!(count("Secret") == 0, "secrets generated for `secret`");
            ensure!(
                env(c, "GPU_SCALER_TLS_CLIENT_NAMES").is_none(),
                "a client name pinned for a certificate the chart does not know"
            );
            assert_trigger_authentication(objects, "gpu-scaler-keda-client", true)?;
        }
        "tls-server-only-values" => {
            ensure!(tls_env, "no GPU_SCALER_TLS_CERT");
            ensure!(
                env(c, "GPU_SCALER_TLS_CLIENT_CA").is_none(),
                "client CA although not required"
            );
            ensure!(
                volume(objects, "peer-tls").is_none(),
                "peer TLS although disabled"
            );
            ensure!(
                env(c, "GPU_SCALER_PEER_TLS_CERT").is_none(),
                "peer TLS variables although disabled"
            );
            // Generated: the server certificate and KEDA's (CA only is used).
            assert_generated_tls(objects, false)?;
            assert_trigger_authentication(objects, "gpu-scaler-keda-client", false)?;
        }
        "cert-manager-values" => {
            ensure!(
                count("Certificate") == 3,
                "expected 3 Certificates: {:?}",
                kinds(objects)
            );
            let scaler = find(objects, "Certificate", &format!("{RELEASE}-scaler"))?;
            ensure!(
                scaler["spec"]["secretName"] == format!("{RELEASE}-scaler-tls"),
                "scaler secret"
            );
            ensure!(
                scaler["spec"]["dnsNames"].as_array().is_some_and(|d| d
                    .iter()
                    .any(|n| n == format!("{RELEASE}.{NAMESPACE}.svc").as_str())),
                "the scaler certificate must name the Service KEDA dials"
            );
            let peer = find(objects, "Certificate", &format!("{RELEASE}-peer"))?;
            let server_name = env(c, "GPU_SCALER_PEER_TLS_SERVER_NAME")
                .and_then(|e| e["value"].as_str())
                .context("no GPU_SCALER_PEER_TLS_SERVER_NAME")?;
            ensure!(
                peer["spec"]["dnsNames"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|n| n == server_name)),
                "the peer certificate must carry the name peers check ({server_name})"
            );
            let client = find(objects, "Certificate", &format!("{RELEASE}-keda-client"))?;
            ensure!(
                client["metadata"]["namespace"] == "keda",
                "KEDA's client certificate namespace"
            );
            let pinned = env(c, "GPU_SCALER_TLS_CLIENT_NAMES")
                .and_then(|e| e["value"].as_str())
                .context("no GPU_SCALER_TLS_CLIENT_NAMES with cert-manager")?;
            ensure!(
                client["spec"]["dnsNames"]
                    .as_array()
                    .is_some_and(|d| d.iter().any(|n| n == pinned)),
                "the pinned client name {pinned:?} is not KEDA's certificate's SAN"
            );
            ensure!(
                count("Secret") == 0,
                "generated secrets alongside cert-manager: {:?}",
                kinds(objects)
            );
            assert_trigger_authentication(objects, "gpu-scaler-keda-client", true)?;
            for cert in objects.iter().filter(|o| o["kind"] == "Certificate") {
                ensure!(
                    cert["spec"]["issuerRef"]["name"] == "gpu-scaler-ca",
                    "issuerRef of {cert}"
                );
            }
            let volume = volume(objects, "scaler-tls").context("no scaler-tls volume")?;
            ensure!(
                volume["secret"]["secretName"] == format!("{RELEASE}-scaler-tls"),
                "{volume}"
            );
        }
        "network-policy-values" => {
            let np = find(objects, "NetworkPolicy", RELEASE)?;
            let rules = np["spec"]["ingress"]
                .as_array()
                .context("no ingress rules")?;
            let rule_for = |port: i64| rules.iter().find(|r| r["ports"][0]["port"] == port);
            let keda = rule_for(6000).context("no rule for 6000")?;
            ensure!(
                keda["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                    == "keda",
                "6000 must be open to KEDA's namespace only: {keda}"
            );
            ensure!(
                keda["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                    == "keda-operator",
                "kedaPodSelector ignored: {keda}"
            );
            let peer = rule_for(6001).context("no rule for 6001")?;
            ensure!(
                peer["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"]
                    == RELEASE
                    && peer["from"][0].get("namespaceSelector").is_none(),
                "6001 must be open to the daemons only: {peer}"
            );
            let metrics = rule_for(9090).context("no rule for 9090")?;
            ensure!(
                metrics["from"].as_array().is_some_and(|f| f.len() == 2),
                "monitoringNamespace + metricsFrom: {metrics}"
            );
        }
        "service-monitor-values" => {
            let sm = find(objects, "ServiceMonitor", RELEASE)?;
            ensure!(
                sm["spec"]["endpoints"][0]["port"] == "metrics",
                "ServiceMonitor port"
            );
            ensure!(
                sm["metadata"]["labels"]["release"] == "kube-prometheus-stack",
                "ServiceMonitor labels"
            );
            let svc = find(objects, "Service", &format!("{RELEASE}-metrics"))?;
            for (k, v) in sm["spec"]["selector"]["matchLabels"]
                .as_object()
                .context("selector")?
            {
                ensure!(
                    &svc["metadata"]["labels"][k] == v,
                    "ServiceMonitor selects {k}={v}, Service lacks it"
                );
            }
        }
        "scale-targets-values" => {} // the RBAC comparison above is the check
        "mock-values" => {
            ensure!(
                env(c, "GPU_SCALER_GPU").is_some_and(|e| e["value"] == "mock"),
                "GPU_SCALER_GPU"
            );
            ensure!(
                env(c, "GPU_SCALER_GPU_SCENARIO").is_some(),
                "no scenario path"
            );
            ensure!(count("ConfigMap") == 1, "no scenario ConfigMap");
            let pod = &find(objects, "DaemonSet", RELEASE)?["spec"]["template"]["spec"];
            ensure!(
                pod.get("runtimeClassName").is_none(),
                "runtimeClassName \"\" must be omitted"
            );
            ensure!(
                volume(objects, "bpffs").is_none(),
                "bpffs disabled but mounted"
            );
        }
        "arm64-fleet-values" => {
            let pod = &find(objects, "DaemonSet", RELEASE)?["spec"]["template"]["spec"];
            ensure!(
                pod["nodeSelector"]
                    == serde_json::json!({
                        "nvidia.com/gpu.present": "true",
                        "kubernetes.io/arch": "arm64",
                    }),
                "GPU nodes of one architecture: {}",
                pod["nodeSelector"]
            );
        }
        other => {
            bail!("{CI_VALUES}/{other}.yaml has no assertions in xtask/src/chart/scenarios.rs")
        }
    }
    Ok(())
}

/// The defaults issue 13 asks for: NetworkPolicy on, mTLS from generated
/// certificates with KEDA's identity pinned, /v1/snapshot off.
fn assert_secure_defaults(objects: &[Value], c: &Value) -> Result<()> {
    let np = find(objects, "NetworkPolicy", RELEASE).context("NetworkPolicy off by default")?;
    let rules = np["spec"]["ingress"]
        .as_array()
        .context("no ingress rules")?;
    ensure!(rules.len() == 3, "one rule per port: {np}");
    let rule_for = |port: i64| rules.iter().find(|r| r["ports"][0]["port"] == port);
    let ns_of = |rule: &Value| {
        rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"].clone()
    };
    ensure!(
        rule_for(6000).is_some_and(|r| ns_of(r) == "keda"),
        "6000 only from KEDA's namespace: {np}"
    );
    let peer = rule_for(6001).context("no rule for 6001")?;
    ensure!(
        peer["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
            && peer["from"].as_array().is_some_and(|f| f.len() == 1),
        "6001 only from the daemons: {peer}"
    );
    ensure!(
        rule_for(9090).is_some_and(|r| ns_of(r) == "monitoring"),
        "9090 only from the monitoring namespace: {np}"
    );
    ensure!(
        env(c, "GPU_SCALER_SNAPSHOT").is_some_and(|e| e["value"] == "off"),
        "/v1/snapshot must be off by default"
    );
    for name in [
        "GPU_SCALER_TLS_CERT",
        "GPU_SCALER_TLS_CLIENT_CA",
        "GPU_SCALER_PEER_TLS_CERT",
    ] {
        ensure!(env(c, name).is_some(), "{name} unset: mTLS off by default");
    }
    ensure!(
        env(c, "GPU_SCALER_TLS_CLIENT_NAMES")
            .is_some_and(|e| e["value"] == "keda-operator.keda.svc"),
        "KEDA's client identity not pinned by default"
    );
    assert_generated_tls(objects, true)?;
    assert_trigger_authentication(objects, "gpu-scaler-keda-client", true)
}

/// The certificates the chart generates (`tls.source` auto without cert-manager):
/// a CA, the scaler's server certificate, the peers' (when `peer`) and KEDA's
/// client certificate in KEDA's namespace, each carrying the names the other
/// side checks, all from the one CA.
fn assert_generated_tls(objects: &[Value], peer: bool) -> Result<()> {
    let secret = |name: &str, ns: &str| -> Result<&Value> {
        let s = objects
            .iter()
            .find(|o| {
                o["kind"] == "Secret"
                    && o["metadata"]["name"] == name
                    && o["metadata"]["namespace"] == ns
            })
            .with_context(|| format!("no generated Secret {ns}/{name}: {:?}", kinds(objects)))?;
        ensure!(
            s["type"] == "kubernetes.io/tls",
            "{name}: type {}",
            s["type"]
        );
        Ok(s)
    };
    let ca = secret(&format!("{RELEASE}-ca"), NAMESPACE)?;
    let ca_crt = ca["data"]["tls.crt"]
        .as_str()
        .context("CA without tls.crt")?;
    let mut wanted = vec![
        (
            format!("{RELEASE}-scaler-tls"),
            NAMESPACE,
            format!("{RELEASE}.{NAMESPACE}.svc"),
        ),
        (
            "gpu-scaler-keda-client".to_owned(),
            "keda",
            "keda-operator.keda.svc".to_owned(),
        ),
    ];
    if peer {
        wanted.push((
            format!("{RELEASE}-peer-tls"),
            NAMESPACE,
            format!("{RELEASE}-peers"),
        ));
    }
    for (name, ns, dns) in wanted {
        let s = secret(&name, ns)?;
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            ensure!(s["data"][key].is_string(), "{name} without {key}");
        }
        ensure!(
            s["data"]["ca.crt"] == ca_crt,
            "{name} is not from the chart's CA"
        );
        let der = pem_der(s["data"]["tls.crt"].as_str().unwrap_or_default())
            .with_context(|| format!("{name}: tls.crt"))?;
        // A DNS SAN is an IA5String in the DER: its bytes appear as they are.
        ensure!(
            der.windows(dns.len()).any(|w| w == dns.as_bytes()),
            "{name}: the certificate does not carry {dns:?}"
        );
    }
    let peer_secret = objects
        .iter()
        .any(|o| o["kind"] == "Secret" && o["metadata"]["name"] == format!("{RELEASE}-peer-tls"));
    ensure!(
        peer_secret == peer,
        "peer certificate generated: {peer_secret}, expected {peer}"
    );
    Ok(())
}

/// The ClusterTriggerAuthentication triggers reference: KEDA's secret, the CA
/// always and the client pair with mTLS.
fn assert_trigger_authentication(objects: &[Value], secret: &str, mtls: bool) -> Result<()> {
    let cta = find(objects, "ClusterTriggerAuthentication", RELEASE)?;
    let refs = cta["spec"]["secretTargetRef"]
        .as_array()
        .context("no secretTargetRef")?;
    let mut params: Vec<&str> = refs
        .iter()
        .map(|r| {
            ensure!(r["name"] == secret, "{r} does not read {secret}");
            r["parameter"].as_str().context("parameter")
        })
        .collect::<Result<_>>()?;
    params.sort_unstable();
    let expected: &[&str] = if mtls {
        &["caCert", "tlsClientCert", "tlsClientKey"]
    } else {
        &["caCert"]
    };
    ensure!(
        params == expected,
        "ClusterTriggerAuthentication parameters {params:?}"
    );
    Ok(())
}

/// The DER of a base64-encoded PEM certificate (a Secret's `tls.crt`).
fn pem_der(b64_pem: &str) -> Result<Vec<u8>> {
    let pem = String::from_utf8(base64_decode(b64_pem)?)?;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64_decode(&body)
}

/// Standard base64 (padding optional, whitespace ignored).
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
    {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {:?}", b as char),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("aGVsbG8=").expect("b64"), b"hello");
        assert_eq!(base64_decode("aGVsbG8").expect("b64"), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8h").expect("b64"), b"hello!");
        assert!(base64_decode("a$b").is_err());
    }
}
