//! The Helm chart, its rendered manifests and the deploy/ files that go with them:
//! the entry points, and the order in which [`check`] runs the checks.
//!
//! `cargo xtask manifests` regenerates `deploy/manifests/gpu-scaler.yaml` from the chart
//! with default values. `cargo xtask chart` (and `cargo xtask test`) runs [`check`]:
//! `helm lint`, `helm template` with default values and with every option set in
//! `deploy/helm/gpu-scaler/ci/`, every rendered object against the Kubernetes schemas
//! (`kubernetes-validate`), the ClusterRole against `deploy/rbac-calls.txt`, the
//! manifests against a fresh render, the examples and the Grafana dashboard.
//!
//! One concern per module: [`tools`] installs and runs helm and the Python tools,
//! [`validate`] checks objects against the Kubernetes schemas and the CRD models,
//! [`rbac`] compares the roles with `deploy/rbac-calls.txt`, [`scenarios`] asserts
//! what each render must hold, [`cli`] compares the flags the chart passes with those
//! the daemon declares, [`examples`] checks the KEDA shape of `deploy/examples/`
//! (their metadata goes through the scaler's own parser in `tests/examples.rs`), and
//! [`dashboard`] checks the Grafana dashboard against `docs/metrics.md`.

mod cli;
mod dashboard;
mod examples;
mod rbac;
mod scenarios;
mod tools;
mod validate;

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use self::{rbac::RbacCalls, tools::Tools};

const CHART: &str = "deploy/helm/gpu-scaler";
const CI_VALUES: &str = "deploy/helm/gpu-scaler/ci";
const MANIFESTS: &str = "deploy/manifests/gpu-scaler.yaml";
/// The daemon's sources: where its clap arguments are declared and its metrics named.
const DAEMON_SOURCES: &str = "gpu-scaler/src";

/// Release name and namespace of the rendered manifests (and of every test render).
const RELEASE: &str = "gpu-scaler";
const NAMESPACE: &str = "gpu-scaler";
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
        scenarios::assert_common(&objects).with_context(|| format!("scenario {name}"))?;
        scenarios::assert_scenario(&name, &objects, &calls)
            .with_context(|| format!("scenario {name}"))?;
        cli_used.extend(cli::cli_inputs(scenarios::container(&objects)?));
        if values.is_none() {
            default_caps =
                scenarios::container(&objects)?["securityContext"]["capabilities"]["add"]
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
    crate::privileges::check(&default_caps)?;
    cli::check_cli(
        &cli_used,
        &cli::declared_cli(Path::new(DAEMON_SOURCES))?,
        cli::PENDING_CLI,
    )?;
    scenarios::check_bad_values(&tools)?;

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

    examples::check_examples(&tools)?;
    dashboard::check_dashboard()?;
    eprintln!("xtask: chart checks passed ({} scenarios)", scenarios.len());
    Ok(())
}

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
