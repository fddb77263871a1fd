//! The KEDA shape of `deploy/examples/`: ScaledObjects and ScaledJobs whose
//! gpu-scaler triggers are `external` or `external-push`, dial the chart's Service and
//! authenticate with the chart's ClusterTriggerAuthentication (or a
//! TriggerAuthentication), ScaledJob triggers with AverageValue targets, and every
//! object against the schemas. What the metadata says (keys, metrics, profiles, values)
//! is the scaler's to judge: `tests/examples.rs` runs it through the scaler's own
//! parser, which xtask cannot link (it runs before the eBPF toolchain the daemon's
//! build needs is installed).

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, ensure};
use serde_json::Value;

use super::{NAMESPACE, RELEASE, tools::Tools};

const EXAMPLES: &str = "deploy/examples";

/// Examples: built-in kinds against the schemas; every gpu-scaler trigger points at
/// the chart's Service, with the chart's authentication; among them a trigger without
/// podSelector, an external-push one and a ScaledJob.
pub(super) fn check_examples(tools: &Tools) -> Result<()> {
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

/// A gpu-scaler trigger's KEDA shape: its type, its authentication and its address;
/// metadata values are strings (KEDA's map of strings).
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
    for (key, value) in metadata {
        ensure!(value.is_string(), "{key}: metadata values are strings");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The metadata's vocabulary (keys, metrics, profiles, values) is checked by
    /// tests/examples.rs through the scaler's parser; here only the KEDA shape.
    #[test]
    fn triggers_are_checked_for_their_keda_shape() {
        let good = json!({"type": "external", "metadata": {
            "scalerAddress": "gpu-scaler.gpu-scaler.svc:6000", "podSelector": "app=vllm",
            "profile": "vllm-inference", "targetValue": "75", "aggregation": "sum"},
            "authenticationRef": {"name": "gpu-scaler", "kind": "ClusterTriggerAuthentication"}});
        check_trigger(&good).expect("a good trigger passes");
        let mut from_env = good.clone();
        from_env["metadata"]["podSelectorFromEnv"] = json!("SELECTOR");
        from_env["metadata"]["gpuIndex"] = json!("0");
        check_trigger(&from_env).expect("FromEnv keys and gpuIndex pass");
        let mut namespaced = good.clone();
        namespaced["authenticationRef"] = json!({"name": "mine", "kind": "TriggerAuthentication"});
        check_trigger(&namespaced).expect("a TriggerAuthentication passes");
        let mut plain = good.clone();
        plain
            .as_object_mut()
            .expect("object")
            .remove("authenticationRef");
        assert!(
            check_trigger(&plain).is_err(),
            "no authenticationRef accepted"
        );
        let mut other_cta = good.clone();
        other_cta["authenticationRef"]["name"] = json!("keda");
        assert!(
            check_trigger(&other_cta).is_err(),
            "another ClusterTriggerAuthentication accepted"
        );
        let mut cpu = good.clone();
        cpu["type"] = json!("cpu");
        assert!(check_trigger(&cpu).is_err(), "trigger type cpu accepted");
        let mut number = good.clone();
        number["metadata"]["targetValue"] = json!(75);
        assert!(
            check_trigger(&number).is_err(),
            "a number in metadata accepted"
        );
        for address in [
            "keda-gpu-scaler:6000",
            "gpu-scaler:6000",
            "gpu-scaler.gpu-scaler.svc:6001",
        ] {
            let mut bad = good.clone();
            bad["metadata"]["scalerAddress"] = json!(address);
            assert!(
                check_trigger(&bad).is_err(),
                "scalerAddress={address} accepted"
            );
        }
    }
}
