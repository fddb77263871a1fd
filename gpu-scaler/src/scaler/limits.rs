//! Limits on what one ScaledObject reference may carry, checked before anything
//! that grows with the input is parsed or allocated (issue 13: a 3.9 MiB
//! podSelector took the daemon from 26 MiB to 401 MiB resident, over the chart's
//! memory limit; a namespace `ml/pods?x=` went into an API URL).
//!
//! The gRPC decode limit ([`super::server::MAX_DECODE_BYTES`]) bounds the whole
//! message first; these bound each part of it and check the names that end up in
//! Kubernetes API paths.

use std::collections::HashMap;

use super::proto::ScaledObjectRef;

/// Most metadata entries one trigger may have. KEDA passes the trigger's
/// metadata as written (plus resolved `xFromEnv` keys); the keys gpu-scaler
/// reads are a dozen.
pub const MAX_ENTRIES: usize = 64;
/// Longest metadata key. Kubernetes label keys (prefix + name) are at most 316
/// bytes; trigger metadata keys are short identifiers.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest metadata value: the longest selector ([`crate::pods::selector::MAX_BYTES`]).
pub const MAX_VALUE_BYTES: usize = crate::pods::selector::MAX_BYTES;

/// What a ScaledObject reference breaks.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the trigger has {count} metadata entries; at most {MAX_ENTRIES} are accepted")]
    TooManyEntries { count: usize },
    #[error(
        "a metadata key of {len} bytes (starting {start:?}); keys are at most {MAX_KEY_BYTES} bytes"
    )]
    KeyTooLong { len: usize, start: String },
    #[error(
        "metadata {key}: the value has {len} bytes; values are at most {MAX_VALUE_BYTES} bytes"
    )]
    ValueTooLong { key: String, len: usize },
    #[error("namespace {value:?} is not a Kubernetes namespace name: {why}")]
    Namespace { value: String, why: &'static str },
    #[error("ScaledObject name {value:?} is not a Kubernetes object name: {why}")]
    Name { value: String, why: &'static str },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The first characters of `s`, for messages about values too long to quote.
fn start(s: &str) -> String {
    s.chars().take(32).collect()
}

/// Checks the sizes of a trigger's metadata.
pub fn check_metadata(meta: &HashMap<String, String>) -> Result<()> {
    if meta.len() > MAX_ENTRIES {
        return Err(Error::TooManyEntries { count: meta.len() });
    }
    for (k, v) in meta {
        if k.len() > MAX_KEY_BYTES {
            return Err(Error::KeyTooLong {
                len: k.len(),
                start: start(k),
            });
        }
        if v.len() > MAX_VALUE_BYTES {
            return Err(Error::ValueTooLong {
                key: k.clone(),
                len: v.len(),
            });
        }
    }
    Ok(())
}

/// Why `s` is not a DNS-1123 label (a namespace name): at most 63 characters of
/// `[a-z0-9-]`, starting and ending alphanumeric.
pub fn dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > 63 {
        return Err("it is longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

/// Why `s` is not a DNS-1123 subdomain (an object name): at most 253 characters,
/// dot-separated labels of `[a-z0-9-]` each starting and ending alphanumeric.
pub fn dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err("it has an empty part between dots");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("only lower-case letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("each part must start and end with a letter or digit");
        }
    }
    Ok(())
}

/// Checks a ScaledObject reference: metadata sizes, the namespace and (when
/// given) the name. An empty namespace is left to the caller, which has its own
/// message for it.
pub fn check(r: &ScaledObjectRef) -> Result<()> {
    check_metadata(&r.scaler_metadata)?;
    if !r.namespace.is_empty() {
        dns1123_label(&r.namespace).map_err(|why| Error::Namespace {
            value: start(&r.namespace),
            why,
        })?;
    }
    if !r.name.is_empty() {
        dns1123_subdomain(&r.name).map_err(|why| Error::Name {
            value: start(&r.name),
            why,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn so(namespace: &str, name: &str, meta: &[(&str, &str)]) -> ScaledObjectRef {
        ScaledObjectRef {
            name: name.into(),
            namespace: namespace.into(),
            scaler_metadata: meta
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        }
    }

    #[test]
    fn namespaces_that_would_change_an_api_path_are_refused() {
        for bad in [
            "ml/pods?x=",
            "ml/../kube-system",
            "..",
            "ml?labelSelector=x",
            "ML",
            "-ml",
            "ml-",
            "ml.team",
            "ml%2F",
            "ml pods",
            &"a".repeat(64),
        ] {
            let e = check(&so(bad, "so", &[])).expect_err(bad);
            assert!(matches!(e, Error::Namespace { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("namespace"), "{e}");
        }
        for good in ["ml", "kube-system", "a", "team-1", &"a".repeat(63)] {
            check(&so(good, "so", &[])).expect(good);
        }
    }

    #[test]
    fn names_are_subdomains() {
        for bad in ["..", "a..b", "web/scale", "web?x", "Web", ".web", "web-"] {
            let e = check(&so("ml", bad, &[])).expect_err(bad);
            assert!(matches!(e, Error::Name { .. }), "{bad}: {e}");
        }
        for good in ["web", "web-so", "web.v2", "a1"] {
            check(&so("ml", good, &[])).expect(good);
        }
    }

    #[test]
    fn metadata_sizes() {
        let long_value = "a,".repeat(MAX_VALUE_BYTES);
        let e = check(&so("ml", "so", &[("podSelector", &long_value)])).expect_err("long value");
        assert_eq!(
            e,
            Error::ValueTooLong {
                key: "podSelector".into(),
                len: long_value.len()
            }
        );
        assert!(
            e.to_string().len() < 200,
            "the message does not quote the value"
        );
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        let e = check(&so("ml", "so", &[(&long_key, "v")])).expect_err("long key");
        assert!(matches!(e, Error::KeyTooLong { len, .. } if len == MAX_KEY_BYTES + 1));
        let many: Vec<(String, String)> = (0..=MAX_ENTRIES)
            .map(|i| (format!("k{i}"), "v".to_owned()))
            .collect();
        let r = ScaledObjectRef {
            name: "so".into(),
            namespace: "ml".into(),
            scaler_metadata: many.into_iter().collect(),
        };
        assert_eq!(
            check(&r),
            Err(Error::TooManyEntries {
                count: MAX_ENTRIES + 1
            })
        );
        let at_limit = "a".repeat(MAX_VALUE_BYTES);
        check(&so("ml", "so", &[("podSelector", &at_limit)])).expect("at the limit");
    }
}
