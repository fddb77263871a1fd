//! deploy/examples/ through the scaler's own metadata parser: every gpu-scaler
//! trigger of every ScaledObject and ScaledJob there must be metadata the daemon
//! accepts, read as the daemon reads it (the size limits, then
//! [`metadata::parse`], with `podSelector` optional as in a cluster, where the
//! pods can come from the scale target).
//!
//! This is the vocabulary half of the examples check; the KEDA shape (trigger types,
//! the chart's Service and authentication, ScaledJob targets, the schemas) is
//! `cargo xtask chart`'s (xtask/src/chart/examples.rs), which cannot link the daemon.
//!
//! `<key>FromEnv` keys name an environment variable of the scale target: KEDA sends
//! the parser the variable's value, which an example does not have. Their names are
//! checked (a known key, no typo, by the parser's own key reading); they are left out
//! of the parse, as KEDA leaves out a variable that is unset.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use gpu_scaler::scaler::{
    limits,
    metadata::{self, Metadata, keys},
};
use serde_json::Value;

/// KEDA's own keys in the examples' metadata: KEDA reads them, the parser ignores them.
const KEDA_KEYS: &[&str] = &["scalerAddress"];

/// gpu-scaler triggers in deploy/examples/ when this test was written (vllm-engine.yaml
/// has two); fewer means the walk below stopped finding them.
const MIN_TRIGGERS: usize = 12;

/// One gpu-scaler trigger of an example, and where it is.
struct Trigger {
    file: String,
    /// `ScaledObject inference/vllm-qwen, trigger 0`.
    object: String,
    metadata: HashMap<String, String>,
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// Every trigger whose `scalerAddress` starts with `gpu-scaler`, of every
/// ScaledObject and ScaledJob in deploy/examples/*.yaml.
fn example_triggers() -> Vec<Trigger> {
    let dir = examples_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    let mut out = Vec::new();
    for path in files {
        let file = format!(
            "deploy/examples/{}",
            path.file_name().expect("a file name").to_string_lossy()
        );
        let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {file}: {e}"));
        let objects: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|e| panic!("{file} is not YAML: {e}"));
        for object in objects {
            let kind = object["kind"].as_str().unwrap_or_default();
            if kind != "ScaledObject" && kind != "ScaledJob" {
                continue;
            }
            let name = format!(
                "{kind} {}/{}",
                object["metadata"]["namespace"].as_str().unwrap_or("?"),
                object["metadata"]["name"].as_str().unwrap_or("?")
            );
            let triggers = object["spec"]["triggers"]
                .as_array()
                .unwrap_or_else(|| panic!("{file}: {name} has no triggers"));
            for (i, trigger) in triggers.iter().enumerate() {
                let ours = trigger["metadata"]["scalerAddress"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("gpu-scaler"));
                if !ours {
                    continue;
                }
                let metadata = trigger["metadata"]
                    .as_object()
                    .expect("metadata with a scalerAddress is a map")
                    .iter()
                    .map(|(k, v)| {
                        let v = v.as_str().unwrap_or_else(|| {
                            panic!("{file}: {name}, trigger {i}: {k} is not a string: {v}")
                        });
                        (k.clone(), v.to_owned())
                    })
                    .collect();
                out.push(Trigger {
                    file: file.clone(),
                    object: format!("{name}, trigger {i}"),
                    metadata,
                });
            }
        }
    }
    out
}

/// The metadata as the daemon reads it in a cluster, `xFromEnv` keys checked by name
/// only. Every key must be the scaler's or KEDA's: the parser ignores other keys (they
/// may be another scaler's), but in an example one is a mistake.
fn read(meta: &HashMap<String, String>) -> Result<metadata::Query, String> {
    limits::check_metadata(meta).map_err(|e| e.to_string())?;
    let mut sorted: Vec<&String> = meta.keys().collect();
    sorted.sort();
    for key in sorted {
        let base = key.strip_suffix(keys::FROM_ENV).unwrap_or(key);
        let known = keys::ALL.contains(&base) || (base == key && KEDA_KEYS.contains(&base));
        if !known {
            return Err(format!(
                "unknown metadata key {key:?} (gpu-scaler's keys: {:?}, each also as \
                 <key>{}; KEDA's: {KEDA_KEYS:?})",
                keys::ALL,
                keys::FROM_ENV
            ));
        }
    }
    // The parser's own key reading, FromEnv keys included: a misspelt one is refused.
    Metadata::read(meta).map_err(|e| e.to_string())?;
    let resolved: HashMap<String, String> = meta
        .iter()
        .filter(|(k, _)| !k.ends_with(keys::FROM_ENV))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata::parse(&resolved, metadata::PodSelector::Optional).map_err(|e| e.to_string())
}

#[test]
fn every_example_trigger_is_metadata_the_scaler_accepts() {
    let triggers = example_triggers();
    let refused: Vec<String> = triggers
        .iter()
        .filter_map(|t| {
            read(&t.metadata)
                .err()
                .map(|e| format!("{}: {}: {e}", t.file, t.object))
        })
        .collect();
    assert!(
        refused.is_empty(),
        "example triggers the scaler refuses:\n{}",
        refused.join("\n")
    );
    assert!(
        triggers.len() >= MIN_TRIGGERS,
        "checked {} gpu-scaler triggers in deploy/examples/, expected at least {MIN_TRIGGERS}",
        triggers.len()
    );
    // The examples cover the metadata's main shapes.
    let has = |key: &str| triggers.iter().any(|t| t.metadata.contains_key(key));
    assert!(
        triggers
            .iter()
            .any(|t| !t.metadata.contains_key(keys::POD_SELECTOR)),
        "no example resolves pods through scaleTargetRef"
    );
    for key in [keys::PROFILE, keys::METRIC, keys::ACTIVATION_POD_SELECTOR] {
        assert!(has(key), "no example sets {key}");
    }
}

/// The same reading refuses what an example must not say: the parser is strict about
/// values and misspelt keys, and the key check about keys nobody reads.
#[test]
fn the_reading_refuses_bad_metadata() {
    let good: HashMap<String, String> = [
        ("scalerAddress", "gpu-scaler.gpu-scaler.svc:6000"),
        ("podSelector", "app=vllm"),
        ("profile", "vllm-inference"),
        ("targetValue", "75"),
        ("aggregation", "sum"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    read(&good).expect("good metadata is read");
    let mut from_env = good.clone();
    from_env.insert("podSelectorFromEnv".into(), "SELECTOR".into());
    from_env.insert("metricFromEnv".into(), "METRIC".into());
    from_env.insert("gpuIndex".into(), "0".into());
    read(&from_env).expect("FromEnv keys and gpuIndex are read");
    let mut scale_target = good.clone();
    scale_target.remove("podSelector");
    read(&scale_target).expect("without podSelector, in a cluster");

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
        ("podSelector", "app in x"),
    ] {
        let mut bad = good.clone();
        bad.insert(key.to_owned(), value.to_owned());
        // The parser itself refuses it, naming the key as sent...
        let e = metadata::parse(&bad, metadata::PodSelector::Optional)
            .expect_err(&format!("the parser accepted {key}={value}"));
        assert_eq!(e.key, key, "{key}={value}: {e}");
        // ...and so does the test's reading.
        let e = read(&bad).expect_err(&format!("{key}={value} read"));
        assert!(e.contains(key), "{key}={value}: {e}");
    }

    // A made-up key is ignored by the parser (another scaler's, perhaps) but refused
    // in an example; so is a FromEnv key of a key nobody reads.
    for key in ["madeUpKey", "madeUpKeyFromEnv", "scalerAddressFromEnv"] {
        let mut bad = good.clone();
        bad.insert(key.to_owned(), "x".to_owned());
        metadata::parse(&bad, metadata::PodSelector::Optional)
            .expect("the parser ignores a key it does not know");
        let e = read(&bad).expect_err(&format!("{key} read"));
        assert!(e.contains("unknown metadata key"), "{key}: {e}");
    }
}
