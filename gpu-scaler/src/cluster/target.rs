//! A ScaledObject's pods without `podSelector`: the ScaledObject names its scale
//! target (`spec.scaleTargetRef`), and the target's `scale` subresource carries
//! the label selector of its pods in `status.selector`, which is what the HPA
//! itself uses. This works for Deployments, StatefulSets and every custom
//! resource with a scale subresource; the resource's plural comes from API
//! discovery (`/apis/{group}/{version}`), cached per apiVersion and kind.
//!
//! KEDA sends a ScaledJob's name in the same field as a ScaledObject's, and
//! nothing says which it is. So the name is looked up as a ScaledObject first,
//! then as a ScaledJob. A ScaledJob's pods are those of the Jobs KEDA creates
//! for it: KEDA labels their pod template `scaledjob.keda.sh/name=<name>`
//! (kedacore/keda pkg/scaling/executor/scale_jobs.go `generateJobs`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    discovery::{ApiCapabilities, pinned_kind},
};

use super::{Error, Result};

/// KEDA's default when `scaleTargetRef` leaves them out.
const DEFAULT_API_VERSION: &str = "apps/v1";
const DEFAULT_KIND: &str = "Deployment";

/// How long a resolved selector is reused. A workload's selector is immutable in
/// practice (Deployments reject changes to it); the TTL only bounds how long an
/// edited ScaledObject keeps its old target.
pub const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// What a ScaledObject scales.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleTarget {
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

impl std::fmt::Display for ScaleTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({})", self.kind, self.name, self.api_version)
    }
}

/// The label KEDA puts on the pod template of a ScaledJob's Jobs.
pub const SCALED_JOB_LABEL: &str = "scaledjob.keda.sh/name";

/// A ScaledObject (or ScaledJob) resolved to the selector of its pods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The scale target; for a ScaledJob, the ScaledJob itself.
    pub target: ScaleTarget,
    /// The scale subresource's `status.selector`, label selector syntax; for a
    /// ScaledJob, [`SCALED_JOB_LABEL`]`=<name>`.
    pub selector: String,
    /// A ScaledJob's external triggers with `metricType: Value`: their metadata.
    pub value_triggers: Vec<BTreeMap<String, String>>,
}

impl Resolved {
    /// Whether `metadata` (as KEDA sent it) is one of the ScaledJob's triggers
    /// with `metricType: Value`. KEDA sends `xFromEnv` keys with the resolved
    /// value (and leaves them out when unresolved), so only the other keys must
    /// match, and every key sent must be the trigger's.
    pub fn is_value_trigger(&self, metadata: &HashMap<String, String>) -> bool {
        self.value_triggers.iter().any(|t| {
            metadata.keys().all(|k| t.contains_key(k))
                && t.iter()
                    .filter(|(k, _)| !k.ends_with("FromEnv"))
                    .all(|(k, v)| metadata.get(k) == Some(v))
        })
    }
}

/// The metadata of a ScaledJob's `external`/`external-push` triggers whose
/// `metricType` is `Value`.
pub fn value_triggers(scaled_job: &serde_json::Value) -> Vec<BTreeMap<String, String>> {
    let Some(triggers) = scaled_job["spec"]["triggers"].as_array() else {
        return Vec::new();
    };
    triggers
        .iter()
        .filter(|t| matches!(t["type"].as_str(), Some("external" | "external-push")))
        .filter(|t| t["metricType"].as_str() == Some("Value"))
        .map(|t| {
            t["metadata"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect()
}

/// How long a failed resolution is remembered (issue 13: failed lookups were not
/// cached, so a ScaledObject that does not exist cost GETs on every call). Short,
/// so a ScaledObject created after its first query is found soon.
pub const FAILED_TTL: Duration = Duration::from_secs(10);

/// Most remembered resolutions, good and failed. Names come from callers, so
/// the cache must not grow with whatever they send: past this, expired entries
/// go, then nothing new is remembered until some expire.
pub const MAX_CACHED: usize = 4096;

/// (namespace, ScaledObject name) -> when resolved, and to what (or why not).
type ResolvedCache = HashMap<(String, String), (Instant, Result<Arc<Resolved>, Arc<Error>>)>;

/// Resolves ScaledObjects to pod selectors, with caching.
pub struct TargetResolver {
    client: Client,
    ttl: Duration,
    kinds: Mutex<HashMap<(String, String), (ApiResource, ApiCapabilities)>>,
    resolved: Mutex<ResolvedCache>,
}

impl TargetResolver {
    pub fn new(client: Client, ttl: Duration) -> Self {
        Self {
            client,
            ttl,
            kinds: Mutex::default(),
            resolved: Mutex::default(),
        }
    }

    /// The pod selector of ScaledObject `namespace/name`. Errors name what is
    /// missing: the ScaledObject, its target, the target's scale subresource, or
    /// the selector in it.
    pub async fn resolve(&self, namespace: &str, name: &str) -> Result<Arc<Resolved>> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some((at, r)) = self.resolved.lock().expect("resolver lock").get(&key) {
            let ttl = if r.is_ok() { self.ttl } else { FAILED_TTL };
            if at.elapsed() < ttl {
                return r.clone().map_err(Error::Shared);
            }
        }
        let resolved = match self.resolve_uncached(namespace, name).await {
            Ok(r) => Ok(Arc::new(r)),
            // Only answers about the objects are remembered; a transport error
            // or an API server that is down is retried at the next call.
            Err(e) if e.is_user_error() => Err(Arc::new(e)),
            Err(e) => return Err(e),
        };
        let mut cache = self.resolved.lock().expect("resolver lock");
        if cache.len() >= MAX_CACHED {
            let ttl = self.ttl;
            cache.retain(|_, (at, r)| at.elapsed() < if r.is_ok() { ttl } else { FAILED_TTL });
        }
        if cache.len() < MAX_CACHED {
            cache.insert(key, (Instant::now(), resolved.clone()));
        }
        resolved.map_err(Error::Shared)
    }

    async fn resolve_uncached(&self, namespace: &str, name: &str) -> Result<Resolved> {
        let so_res = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
            "scaledobjects",
        );
        let scaled_objects: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &so_res);
        let so = match scaled_objects.get(name).await {
            Ok(so) => so,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                return self.resolve_scaled_job(namespace, name).await;
            }
            Err(e) => return Err(Error::Kube(e)),
        };
        let target = scale_target(&so.data).map_err(|reason| Error::ScaledObjectInvalid {
            namespace: namespace.into(),
            name: name.into(),
            reason,
        })?;
        let (ar, caps) = self.kind(&target).await?;
        if !caps.supports_operation("get")
            || !caps.subresources.iter().any(|(s, _)| s.plural == "scale")
        {
            return Err(Error::NoScaleSubresource {
                namespace: namespace.into(),
                target,
            });
        }
        let targets: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &ar);
        let scale = targets.get_scale(&target.name).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => Error::TargetNotFound {
                namespace: namespace.into(),
                scaled_object: name.into(),
                target: target.clone(),
            },
            e => Error::Kube(e),
        })?;
        let selector = scale
            .status
            .and_then(|s| s.selector)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| Error::NoSelector {
                namespace: namespace.into(),
                target: target.clone(),
            })?;
        tracing::debug!(namespace, scaled_object = name, %target, selector, "resolved scale target");
        Ok(Resolved {
            target,
            selector,
            value_triggers: Vec::new(),
        })
    }

    /// `namespace/name` as a ScaledJob: the pods of its Jobs.
    async fn resolve_scaled_job(&self, namespace: &str, name: &str) -> Result<Resolved> {
        let sj_res = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledJob"),
            "scaledjobs",
        );
        let scaled_jobs: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &sj_res);
        let sj = scaled_jobs.get(name).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => Error::ScaledObjectNotFound {
                namespace: namespace.into(),
                name: name.into(),
            },
            e => Error::Kube(e),
        })?;
        let selector = format!("{SCALED_JOB_LABEL}={name}");
        tracing::debug!(
            namespace,
            scaled_job = name,
            selector,
            "resolved a ScaledJob's pods"
        );
        Ok(Resolved {
            target: ScaleTarget {
                api_version: "keda.sh/v1alpha1".into(),
                kind: "ScaledJob".into(),
                name: name.into(),
            },
            selector,
            value_triggers: value_triggers(&sj.data),
        })
    }

    /// API discovery of the target's kind, cached: the plural and whether it has a
    /// scale subresource.
    async fn kind(&self, target: &ScaleTarget) -> Result<(ApiResource, ApiCapabilities)> {
        let key = (target.api_version.clone(), target.kind.clone());
        if let Some(found) = self.kinds.lock().expect("kinds lock").get(&key) {
            return Ok(found.clone());
        }
        let (group, version) = match target.api_version.split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", target.api_version.as_str()),
        };
        let gvk = GroupVersionKind::gvk(group, version, &target.kind);
        let found = pinned_kind(&self.client, &gvk).await.map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => Error::UnknownKind(target.clone()),
            kube::Error::Discovery(_) => Error::UnknownKind(target.clone()),
            e => Error::Kube(e),
        })?;
        self.kinds
            .lock()
            .expect("kinds lock")
            .insert(key, found.clone());
        Ok(found)
    }
}

/// `spec.scaleTargetRef` of a ScaledObject, with KEDA's defaults.
pub fn scale_target(data: &serde_json::Value) -> std::result::Result<ScaleTarget, String> {
    let r = &data["spec"]["scaleTargetRef"];
    if r.is_null() {
        return Err("spec.scaleTargetRef is missing".into());
    }
    let text = |key: &str, default: &str| -> std::result::Result<String, String> {
        match &r[key] {
            serde_json::Value::Null => Ok(default.to_owned()),
            serde_json::Value::String(s) if s.is_empty() => Ok(default.to_owned()),
            serde_json::Value::String(s) => Ok(s.clone()),
            other => Err(format!(
                "spec.scaleTargetRef.{key} is not a string: {other}"
            )),
        }
    };
    let name = text("name", "")?;
    if name.is_empty() {
        return Err("spec.scaleTargetRef.name is missing".into());
    }
    Ok(ScaleTarget {
        api_version: text("apiVersion", DEFAULT_API_VERSION)?,
        kind: text("kind", DEFAULT_KIND)?,
        name,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn scale_target_defaults_to_deployment() {
        let t = scale_target(&json!({"spec": {"scaleTargetRef": {"name": "web"}}})).expect("valid");
        assert_eq!(
            t,
            ScaleTarget {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: "web".into()
            }
        );
    }

    #[test]
    fn scale_target_honours_api_version_and_kind() {
        let t = scale_target(&json!({"spec": {"scaleTargetRef":
            {"apiVersion": "serving.example.com/v1", "kind": "InferenceService", "name": "llm"}}}))
        .expect("valid");
        assert_eq!(t.api_version, "serving.example.com/v1");
        assert_eq!(t.kind, "InferenceService");
    }

    #[test]
    fn scaled_job_value_triggers() {
        let sj = json!({"spec": {"triggers": [
            {"type": "external", "metricType": "Value",
             "metadata": {"scalerAddress": "s:6000", "podSelectorFromEnv": "SEL", "targetValue": "5"}},
            {"type": "external", "metadata": {"scalerAddress": "s:6000", "targetValue": "6"}},
            {"type": "prometheus", "metricType": "Value", "metadata": {"query": "up"}},
        ]}});
        let v = value_triggers(&sj);
        assert_eq!(v.len(), 1);
        let r = Resolved {
            target: ScaleTarget {
                api_version: "keda.sh/v1alpha1".into(),
                kind: "ScaledJob".into(),
                name: "j".into(),
            },
            selector: "scaledjob.keda.sh/name=j".into(),
            value_triggers: v,
        };
        let meta = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // KEDA resolved the FromEnv key, or left it out.
        assert!(r.is_value_trigger(&meta(&[
            ("scalerAddress", "s:6000"),
            ("podSelectorFromEnv", "app=q"),
            ("targetValue", "5"),
        ])));
        assert!(r.is_value_trigger(&meta(&[("scalerAddress", "s:6000"), ("targetValue", "5")])));
        assert!(!r.is_value_trigger(&meta(&[("scalerAddress", "s:6000"), ("targetValue", "6")])));
        assert!(!r.is_value_trigger(&meta(&[
            ("scalerAddress", "s:6000"),
            ("targetValue", "5"),
            ("metric", "power_draw"),
        ])));
    }

    #[test]
    fn scale_target_errors_are_clear() {
        let e = scale_target(&json!({"spec": {}})).expect_err("no ref");
        assert!(e.contains("scaleTargetRef is missing"), "{e}");
        let e = scale_target(&json!({"spec": {"scaleTargetRef": {"kind": "Deployment"}}}))
            .expect_err("no name");
        assert!(e.contains("name is missing"), "{e}");
        let e =
            scale_target(&json!({"spec": {"scaleTargetRef": {"name": 3}}})).expect_err("bad name");
        assert!(e.contains("not a string"), "{e}");
    }
}
