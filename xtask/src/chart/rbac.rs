//! The roles the chart renders against `deploy/rbac-calls.txt`, the list of the API
//! calls the daemon makes: parsing the list, expanding a role's rules, and comparing
//! the two both ways.

use std::{collections::BTreeSet, fmt, fs};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

const RBAC_CALLS: &str = "deploy/rbac-calls.txt";

/// One API call: group ("" for core), resource[/subresource], verb.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Call {
    pub(super) group: String,
    pub(super) resource: String,
    pub(super) verb: String,
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {} {}", self.group, self.resource, self.verb)
    }
}

/// The calls listed in `deploy/rbac-calls.txt`, by scope: `cluster` calls need the
/// ClusterRole, `namespace` calls (the daemon's own namespace) the Role.
pub(super) struct RbacCalls {
    pub(super) cluster: BTreeSet<Call>,
    pub(super) namespace: BTreeSet<Call>,
}

impl RbacCalls {
    pub(super) fn load() -> Result<Self> {
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
pub(super) fn granted(role: &Value) -> Result<BTreeSet<Call>> {
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
pub(super) fn compare_rbac(granted: &BTreeSet<Call>, needed: &BTreeSet<Call>) -> Result<()> {
    let missing: Vec<String> = needed.difference(granted).map(Call::to_string).collect();
    let unused: Vec<String> = granted.difference(needed).map(Call::to_string).collect();
    ensure!(
        missing.is_empty() && unused.is_empty(),
        "ClusterRole differs from {RBAC_CALLS}: calls the role lacks {missing:?}; rules no call uses {unused:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

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
}
