//! Pod metadata: which pods exist, where, and with which labels.

use std::collections::BTreeMap;

use serde::Serialize;

/// The fields of a Kubernetes Pod that scaling needs; everything else is dropped
/// at the edge so caches stay small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    /// metadata.uid, dashed form.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// spec.nodeName; `None` while unscheduled.
    pub node_name: Option<String>,
    /// status.phase (`Pending`, `Running`, ...).
    pub phase: Option<String>,
    /// The pod's Ready condition is True.
    pub ready: bool,
}
