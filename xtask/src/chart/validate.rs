//! Rendered objects against the Kubernetes schemas: kubernetes-validate (strict, for
//! the chart's `kubeVersion` floor and the newest schemas), a round trip through the
//! k8s-openapi types, and the CRD kinds against models generated from their CRDs
//! (`crd_check.py`).

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::tools::Tools;

const CRD_CHECK: &str = include_str!("crd_check.py");
/// The chart's `kubeVersion` floor and the newest schemas kubernetes-validate ships.
const KUBERNETES_VERSIONS: &[&str] = &["1.26.0", "1.37.0"];
/// Kinds from CRDs, which kubernetes-validate has no schema for: `crd_check.py`
/// validates them against models generated from their CRDs. Any other kind without a
/// schema is an error.
pub(super) const CRD_KINDS: &[&str] = &[
    "Certificate",
    "ServiceMonitor",
    "ScaledObject",
    "ScaledJob",
    "TriggerAuthentication",
    "ClusterTriggerAuthentication",
];

impl Tools {
    /// Validates every object of `yaml` against the Kubernetes schemas, strictly (no
    /// unknown fields). A kind without a schema is an error unless it is a known CRD.
    pub(super) fn validate(&self, yaml: &str, name: &str) -> Result<()> {
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
                bail!("{what}: {api_version} {kind} has no k8s-openapi type in xtask/src/chart/validate.rs")
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

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
}
