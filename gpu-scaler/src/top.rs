//! The view behind `gpu-scaler top`: per pod its GPUs, SM %, memory and
//! power; per device the totals, sorted and rendered as a table or JSON.
//!
//! A [`View`] is built from a node snapshot's JSON (the daemon's
//! `/v1/snapshot`, or a local [`NodeSnapshot`] serialized the same way), so the
//! local and remote views cannot drift apart. A figure that could not be read
//! is `None` (`null` in JSON, `n/a` in the table), never zero.

use std::{fmt::Write as _, time::SystemTime};

use serde::{Deserialize as _, Serialize};
use serde_json::Value;

use crate::snapshot::{NodeSnapshot, Reading};

/// Errors building a view.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the snapshot is not what a gpu-scaler daemon serves: {0}")]
    Shape(String),
    #[error("serializing the view: {0}")]
    Json(#[from] serde_json::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the pod rows are ordered by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SortKey {
    /// SM utilization, highest first.
    #[default]
    Sm,
    /// GPU memory used, largest first.
    Memory,
    /// Attributed power, highest first.
    Power,
    /// namespace/name, alphabetical.
    Name,
}

impl SortKey {
    /// The next key, for the live view's cycle key.
    pub fn next(self) -> Self {
        match self {
            Self::Sm => Self::Memory,
            Self::Memory => Self::Power,
            Self::Power => Self::Name,
            Self::Name => Self::Sm,
        }
    }
}

/// One pod's use of the node's GPUs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodRow {
    pub namespace: String,
    pub pod: String,
    pub uid: String,
    /// Indexes of the GPUs its processes run on.
    pub gpus: Vec<u32>,
    /// Summed over its GPUs.
    pub sm_percent: Option<f64>,
    pub memory_used_mib: Option<u64>,
    pub power_w: Option<f64>,
    /// Energy booked to it since it appeared (the daemon's ledger), J; `None`
    /// while none was.
    pub energy_j: Option<f64>,
    pub processes: usize,
    /// The parts of the pod its GPU processes run in: container names,
    /// `(sandbox)`, `(no container)`, or `?` when the daemon could not tell.
    pub containers: Vec<String>,
}

/// One GPU's totals.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceRow {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub sm_percent: Option<f64>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    pub power_w: Option<f64>,
    pub temperature_c: Option<u64>,
    /// Pods with processes on it.
    pub pods: usize,
    /// Processes on it that belong to no known pod.
    pub unattributed_processes: usize,
}

/// A pod holding memory on a GPU, and how long it has sat idle there.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HolderRow {
    pub namespace: String,
    pub pod: String,
    pub gpu: u32,
    pub memory_used_mib: u64,
    pub sm_percent: f64,
    /// Seconds at or below the idle SM threshold (0 while busy).
    pub idle_s: f64,
    /// Idle for the daemon's `--idle-after` or longer.
    pub idle: bool,
}

/// One pod's engine as the daemon reads it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EngineRow {
    pub namespace: String,
    pub pod: String,
    /// `ip:port/path` read.
    pub endpoint: String,
    /// Why the newest read failed.
    pub error: Option<String>,
    /// Each live query's figure; `None` while it cannot be read.
    pub figures: Vec<(String, Option<f64>)>,
}

/// A node as `top` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct View {
    pub node: Option<String>,
    pub attribution: String,
    /// Age of the GPU samples when the view was built, in milliseconds.
    pub samples_age_ms: Option<u128>,
    pub gpu_error: Option<String>,
    pub sort: SortKey,
    pub devices: Vec<DeviceRow>,
    /// Pods that run GPU processes; the others are left out.
    pub pods: Vec<PodRow>,
    /// Engines a live query reads (queue, running, KV cache...).
    pub engines: Vec<EngineRow>,
    /// Pods holding GPU memory whose SM utilization is known, most idle first.
    pub holders: Vec<HolderRow>,
    /// The daemon's idle settings (`None` from a daemon without them).
    pub idle_sm_percent: Option<f64>,
    pub idle_after_s: Option<f64>,
}

/// The node snapshot as the daemon serves it (`/v1/snapshot`: a
/// [`NodeSnapshot`] with the engines beside it), the parts `top` shows. A part
/// a daemon of another version does not send is `None` or empty, never zero.
mod served {
    use std::{collections::BTreeMap, time::SystemTime};

    use serde::Deserialize;

    use crate::snapshot::Reading;

    /// A figure some daemons do not send.
    pub type Figure<T> = Option<Reading<T>>;

    #[derive(Deserialize)]
    pub struct Node {
        pub samples_taken_at: Option<SystemTime>,
        pub gpu_error: Option<String>,
        pub node_name: Option<String>,
        pub attribution: Option<String>,
        pub gpus: Vec<Gpu>,
        pub pods: Vec<PodEntry>,
        pub unowned: Vec<Unowned>,
        pub accounts: Option<Accounts>,
        /// Only a daemon's /v1/snapshot has engines (a local view reads none).
        #[serde(default)]
        pub engines: Vec<Engine>,
    }

    #[derive(Deserialize)]
    pub struct Gpu {
        pub index: u32,
        pub uuid: String,
        pub name: String,
        #[serde(default)]
        pub sm_util: Figure<f64>,
        #[serde(default)]
        pub memory_used_mib: Figure<u64>,
        #[serde(default)]
        pub memory_total_mib: Figure<u64>,
        #[serde(default)]
        pub power_w: Figure<f64>,
        #[serde(default)]
        pub temperature_c: Figure<u64>,
    }

    #[derive(Deserialize)]
    pub struct PodEntry {
        pub pod: Pod,
        pub gpus: Vec<Usage>,
        /// A daemon from before the split sends none.
        #[serde(default)]
        pub containers: Vec<Container>,
    }

    #[derive(Deserialize)]
    pub struct Pod {
        pub uid: String,
        pub namespace: String,
        pub name: String,
    }

    #[derive(Deserialize)]
    pub struct Usage {
        pub gpu_index: u32,
        #[serde(default)]
        pub pids: Vec<u32>,
        #[serde(default)]
        pub sm_util: Figure<f64>,
        #[serde(default)]
        pub memory_used_mib: Figure<u64>,
        #[serde(default)]
        pub power_w: Figure<f64>,
    }

    /// A `ContainerUsage`: its role, and its name for a container.
    #[derive(Deserialize)]
    pub struct Container {
        pub role: Option<String>,
        pub name: Option<String>,
    }

    #[derive(Deserialize)]
    pub struct Unowned {
        pub usage: Usage,
    }

    #[derive(Deserialize)]
    pub struct Accounts {
        #[serde(default)]
        pub pod_energy: Vec<PodEnergy>,
        #[serde(default)]
        pub holders: Vec<Holder>,
        pub idle_sm_percent: Option<f64>,
        pub idle_after_s: Option<f64>,
    }

    #[derive(Deserialize)]
    pub struct PodEnergy {
        pub pod_uid: String,
        pub joules: f64,
    }

    #[derive(Deserialize)]
    pub struct Holder {
        pub namespace: String,
        pub pod: String,
        pub gpu: u32,
        pub memory_used_mib: u64,
        pub sm_percent: f64,
        pub idle_s: f64,
        pub idle: bool,
    }

    #[derive(Deserialize)]
    pub struct Engine {
        pub namespace: String,
        pub pod: String,
        pub endpoint: String,
        pub path: String,
        pub error: Option<String>,
        #[serde(default)]
        pub figures: BTreeMap<String, Reading<f64>>,
    }
}

/// The figure of a reading some daemons do not send; `None` when it is
/// missing or was not read.
fn figure<T: Copy>(r: &served::Figure<T>) -> Option<T> {
    r.as_ref().and_then(Reading::ok)
}

/// Sums a figure over usages: `None` as soon as one is unknown.
fn total<T: Copy + std::ops::Add<Output = T>>(
    usages: &[served::Usage],
    f: impl Fn(&served::Usage) -> &served::Figure<T>,
) -> Option<T> {
    let mut sum = None;
    for u in usages {
        let r = f(u)
            .clone()
            .unwrap_or_else(|| Reading::unavailable("not sent"));
        Reading::accumulate(&mut sum, &r);
    }
    sum.and_then(|s| s.ok())
}

impl View {
    /// The view of a snapshot as the daemon serializes it, at `now`.
    pub fn from_json(snap: &Value, sort: SortKey, now: SystemTime) -> Result<Self> {
        let snap = served::Node::deserialize(snap).map_err(|e| Error::Shape(e.to_string()))?;
        let samples_age_ms = snap
            .samples_taken_at
            .map(|t| now.duration_since(t).unwrap_or_default().as_millis());
        let mut devices: Vec<DeviceRow> = snap
            .gpus
            .iter()
            .map(|g| DeviceRow {
                index: g.index,
                uuid: g.uuid.clone(),
                name: g.name.clone(),
                sm_percent: figure(&g.sm_util),
                memory_used_mib: figure(&g.memory_used_mib),
                memory_total_mib: figure(&g.memory_total_mib),
                power_w: figure(&g.power_w),
                temperature_c: figure(&g.temperature_c),
                pods: 0,
                unattributed_processes: 0,
            })
            .collect();
        let mut pods = Vec::new();
        for p in &snap.pods {
            if p.gpus.is_empty() {
                continue;
            }
            let mut gpus: Vec<u32> = p.gpus.iter().map(|u| u.gpu_index).collect();
            for u in &p.gpus {
                if let Some(d) = devices.iter_mut().find(|d| d.index == u.gpu_index) {
                    d.pods += 1;
                }
            }
            gpus.sort_unstable();
            pods.push(PodRow {
                namespace: p.pod.namespace.clone(),
                pod: p.pod.name.clone(),
                uid: p.pod.uid.clone(),
                gpus,
                sm_percent: total(&p.gpus, |u| &u.sm_util),
                memory_used_mib: total(&p.gpus, |u| &u.memory_used_mib),
                power_w: total(&p.gpus, |u| &u.power_w),
                energy_j: None,
                processes: p.gpus.iter().map(|u| u.pids.len()).sum(),
                containers: p
                    .containers
                    .iter()
                    .map(|c| {
                        match c.role.as_deref() {
                            Some("container") => c.name.as_deref().unwrap_or("?"),
                            Some("sandbox") => "(sandbox)",
                            Some("pod_cgroup") => "(no container)",
                            _ => "?",
                        }
                        .to_owned()
                    })
                    .collect(),
            });
        }
        for u in &snap.unowned {
            if let Some(d) = devices.iter_mut().find(|d| d.index == u.usage.gpu_index) {
                d.unattributed_processes += u.usage.pids.len();
            }
        }
        let accounts = snap.accounts.as_ref();
        for e in accounts.map_or(&[][..], |a| &a.pod_energy) {
            if let Some(row) = pods.iter_mut().find(|p| p.uid == e.pod_uid) {
                row.energy_j = Some(row.energy_j.unwrap_or(0.0) + e.joules);
            }
        }
        let mut holders: Vec<HolderRow> = accounts
            .map_or(&[][..], |a| &a.holders)
            .iter()
            .map(|h| HolderRow {
                namespace: h.namespace.clone(),
                pod: h.pod.clone(),
                gpu: h.gpu,
                memory_used_mib: h.memory_used_mib,
                sm_percent: h.sm_percent,
                idle_s: h.idle_s,
                idle: h.idle,
            })
            .collect();
        holders.sort_by(|a, b| {
            b.idle_s
                .total_cmp(&a.idle_s)
                .then_with(|| (&a.namespace, &a.pod, a.gpu).cmp(&(&b.namespace, &b.pod, b.gpu)))
        });
        let engines = snap
            .engines
            .iter()
            .map(|e| EngineRow {
                namespace: e.namespace.clone(),
                pod: e.pod.clone(),
                endpoint: format!("{}{}", e.endpoint, e.path),
                error: e.error.clone(),
                figures: e.figures.iter().map(|(k, v)| (k.clone(), v.ok())).collect(),
            })
            .collect();
        let mut view = View {
            engines,
            node: snap.node_name,
            attribution: snap.attribution.unwrap_or_else(|| "unknown".to_owned()),
            samples_age_ms,
            gpu_error: snap.gpu_error,
            sort,
            devices,
            pods,
            holders,
            idle_sm_percent: accounts.and_then(|a| a.idle_sm_percent),
            idle_after_s: accounts.and_then(|a| a.idle_after_s),
        };
        view.sort_by(sort);
        Ok(view)
    }

    /// The view of a local snapshot.
    pub fn from_snapshot(snap: &NodeSnapshot, sort: SortKey, now: SystemTime) -> Result<Self> {
        Self::from_json(&serde_json::to_value(snap)?, sort, now)
    }

    /// Orders the pod rows by `key`; unreadable figures go last, ties by name.
    pub fn sort_by(&mut self, key: SortKey) {
        fn desc<T: PartialOrd>(a: Option<T>, b: Option<T>) -> std::cmp::Ordering {
            use std::cmp::Ordering::*;
            match (a, b) {
                (Some(a), Some(b)) => b.partial_cmp(&a).unwrap_or(Equal),
                (Some(_), None) => Less,
                (None, Some(_)) => Greater,
                (None, None) => Equal,
            }
        }
        self.sort = key;
        self.pods.sort_by(|a, b| {
            let by = match key {
                SortKey::Sm => desc(a.sm_percent, b.sm_percent),
                SortKey::Memory => desc(a.memory_used_mib, b.memory_used_mib),
                SortKey::Power => desc(a.power_w, b.power_w),
                SortKey::Name => std::cmp::Ordering::Equal,
            };
            by.then_with(|| (&a.namespace, &a.pod).cmp(&(&b.namespace, &b.pod)))
        });
    }

    /// The view as pretty JSON, one document.
    pub fn to_json(&self) -> Result<String> {
        let mut s = serde_json::to_string_pretty(self)?;
        s.push('\n');
        Ok(s)
    }

    /// Only the idle GPU holders, as JSON (`top --idle --json`).
    pub fn idle_json(&self) -> Result<String> {
        let idle: Vec<&HolderRow> = self.holders.iter().filter(|h| h.idle).collect();
        let mut s = serde_json::to_string_pretty(&serde_json::json!({
            "node": self.node,
            "idle_sm_percent": self.idle_sm_percent,
            "idle_after_s": self.idle_after_s,
            "idle": idle,
        }))?;
        s.push('\n');
        Ok(s)
    }

    /// Only the idle GPU holders, as a table (`top --idle`): the GPUs a
    /// platform team would reclaim first.
    pub fn render_idle(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "node {}  idle GPU holders: memory held at <= {} % SM for {} or more",
            self.node.as_deref().unwrap_or("(unnamed)"),
            opt(self.idle_sm_percent, |v| format!("{v}")),
            opt(self.idle_after_s, |v| humantime::format_duration(
                std::time::Duration::from_secs_f64(v.max(0.0))
            )
            .to_string()),
        );
        let _ = writeln!(
            out,
            "\n{:<44} {:>4} {:>11} {:>6} {:>12}",
            "NAMESPACE/POD", "GPU", "MEMORY MiB", "SM%", "IDLE FOR"
        );
        let mut any = false;
        for h in self.holders.iter().filter(|h| h.idle) {
            any = true;
            let _ = writeln!(
                out,
                "{:<44} {:>4} {:>11} {:>6} {:>12}",
                truncate(&format!("{}/{}", h.namespace, h.pod), 44),
                h.gpu,
                h.memory_used_mib,
                format!("{:.0}", h.sm_percent),
                humantime::format_duration(std::time::Duration::from_secs(h.idle_s as u64))
                    .to_string(),
            );
        }
        if !any {
            out.push_str("  no idle GPU holder\n");
        }
        out
    }

    /// The view as a table for a terminal.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let age = self
            .samples_age_ms
            .map_or("no samples yet".to_owned(), |a| {
                format!("samples {a} ms old")
            });
        let _ = writeln!(
            out,
            "node {}  attribution {}  {}  sorted by {}",
            self.node.as_deref().unwrap_or("(unnamed)"),
            self.attribution,
            age,
            sort_name(self.sort),
        );
        if let Some(e) = &self.gpu_error {
            let _ = writeln!(out, "GPU source: {e}");
        }
        let _ = writeln!(
            out,
            "\n{:>4}  {:<24} {:>6} {:>19} {:>8} {:>5} {:>5} {:>8}",
            "GPU", "MODEL", "SM%", "MEMORY MiB", "POWER W", "TEMP", "PODS", "NO-POD"
        );
        for d in &self.devices {
            let mem = format!(
                "{}/{}",
                opt(d.memory_used_mib, |v| v.to_string()),
                opt(d.memory_total_mib, |v| v.to_string())
            );
            let _ = writeln!(
                out,
                "{:>4}  {:<24} {:>6} {:>19} {:>8} {:>5} {:>5} {:>8}",
                d.index,
                truncate(&d.name, 24),
                opt(d.sm_percent, |v| format!("{v:.0}")),
                mem,
                opt(d.power_w, |v| format!("{v:.1}")),
                opt(d.temperature_c, |v| v.to_string()),
                d.pods,
                d.unattributed_processes,
            );
        }
        if self.devices.is_empty() {
            out.push_str("  no GPUs\n");
        }
        let _ = writeln!(
            out,
            "\n{:<44} {:<10} {:>6} {:>11} {:>8} {:>10} {:>5}  CONTAINERS",
            "NAMESPACE/POD", "GPUS", "SM%", "MEMORY MiB", "POWER W", "ENERGY J", "PROCS"
        );
        for p in &self.pods {
            let gpus = p
                .gpus
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(
                out,
                "{:<44} {:<10} {:>6} {:>11} {:>8} {:>10} {:>5}  {}",
                truncate(&format!("{}/{}", p.namespace, p.pod), 44),
                truncate(&gpus, 10),
                opt(p.sm_percent, |v| format!("{v:.0}")),
                opt(p.memory_used_mib, |v| v.to_string()),
                opt(p.power_w, |v| format!("{v:.1}")),
                opt(p.energy_j, |v| format!("{v:.0}")),
                p.processes,
                truncate(&p.containers.join(","), 32),
            );
        }
        if self.pods.is_empty() {
            out.push_str("  no pod runs on a GPU\n");
        }
        let idle = self.holders.iter().filter(|h| h.idle).count();
        if idle > 0 {
            let _ = writeln!(
                out,
                "\n{idle} idle GPU holder(s): see `gpu-scaler top --idle`"
            );
        }
        if !self.engines.is_empty() {
            let _ = writeln!(out, "\n{:<44} {:<28} FIGURES", "NAMESPACE/POD", "ENGINE");
            for e in &self.engines {
                let figures = match &e.error {
                    Some(err) => format!("n/a: {err}"),
                    None => e
                        .figures
                        .iter()
                        .map(|(k, v)| format!("{k}={}", opt(*v, |v| format!("{v:.3}"))))
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                let _ = writeln!(
                    out,
                    "{:<44} {:<28} {}",
                    truncate(&format!("{}/{}", e.namespace, e.pod), 44),
                    truncate(&e.endpoint, 28),
                    figures
                );
            }
        }
        out
    }
}

fn sort_name(k: SortKey) -> &'static str {
    match k {
        SortKey::Sm => "sm",
        SortKey::Memory => "memory",
        SortKey::Power => "power",
        SortKey::Name => "name",
    }
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map_or_else(|| "n/a".to_owned(), f)
}

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;

    fn usage(gpu: u32, sm: Value, mem: u64, power: f64, pids: &[u32]) -> Value {
        json!({"gpu_index": gpu, "gpu_uuid": format!("GPU-{gpu}"), "pids": pids,
               "sm_util": sm, "mem_util": {"ok": 0.0},
               "memory_used_mib": {"ok": mem}, "memory_total_mib": {"ok": 81920},
               "temperature_c": {"ok": 50}, "power_w": {"ok": power}})
    }

    fn snapshot(now: SystemTime) -> Value {
        let taken = serde_json::to_value(now - Duration::from_millis(250)).expect("time");
        json!({
            "taken_at": taken, "samples_taken_at": taken, "gpu_error": null,
            "node_name": "n1", "attribution": "procfs",
            "gpus": [
                {"index": 0, "uuid": "GPU-0", "name": "H100", "sm_util": {"ok": 90},
                 "mem_util": {"ok": 10}, "memory_used_mib": {"ok": 30000},
                 "memory_total_mib": {"ok": 81920}, "temperature_c": {"ok": 61},
                 "power_w": {"ok": 400.0}, "mig_enabled": false, "processes_error": null},
                {"index": 1, "uuid": "GPU-1", "name": "H100",
                 "sm_util": {"unavailable": "fell off the bus"},
                 "mem_util": {"unavailable": "x"}, "memory_used_mib": {"unavailable": "x"},
                 "memory_total_mib": {"unavailable": "x"}, "temperature_c": {"unavailable": "x"},
                 "power_w": {"unavailable": "x"}, "mig_enabled": false, "processes_error": "x"}
            ],
            "pods": [
                {"pod": {"uid": "a", "namespace": "ml", "name": "big"},
                 "gpus": [usage(0, json!({"ok": 60.0}), 20000, 250.0, &[10, 11])],
                 "containers": [
                    {"role": "container", "name": "server", "kind": "app", "container_ids": ["c1"],
                     "gpus": [usage(0, json!({"ok": 50.0}), 19000, 200.0, &[10])]},
                    {"role": "sandbox", "container_ids": ["c0"],
                     "gpus": [usage(0, json!({"ok": 10.0}), 1000, 50.0, &[11])]}]},
                {"pod": {"uid": "b", "namespace": "ml", "name": "small"},
                 "gpus": [usage(0, json!({"ok": 20.0}), 8000, 100.0, &[12])]},
                {"pod": {"uid": "c", "namespace": "ml", "name": "mig"},
                 "gpus": [usage(0, json!({"unavailable": "MIG"}), 30000, 50.0, &[13])]},
                {"pod": {"uid": "d", "namespace": "web", "name": "idle"}, "gpus": []}
            ],
            "unowned": [{"why": {"kind": "host"}, "usage": usage(0, json!({"ok": 10.0}), 2000, 50.0, &[1, 2])}],
            "pods_error": null
        })
    }

    #[test]
    fn pods_and_devices_from_the_snapshot() {
        let now = SystemTime::now();
        let v = View::from_json(&snapshot(now), SortKey::Sm, now).expect("view");
        assert_eq!(v.node.as_deref(), Some("n1"));
        assert_eq!(v.samples_age_ms, Some(250));
        // The pod with no GPU process is left out.
        let names: Vec<&str> = v.pods.iter().map(|p| p.pod.as_str()).collect();
        assert_eq!(names, ["big", "small", "mig"], "by SM, unreadable last");
        let big = &v.pods[0];
        assert_eq!(big.gpus, [0]);
        assert_eq!(big.sm_percent, Some(60.0));
        assert_eq!(big.memory_used_mib, Some(20000));
        assert_eq!(big.power_w, Some(250.0));
        assert_eq!(big.processes, 2);
        assert_eq!(big.containers, ["server", "(sandbox)"]);
        assert!(v.pods[1].containers.is_empty(), "not split: none shown");
        assert_eq!(v.pods[2].sm_percent, None, "MIG: no number made up");
        assert_eq!(v.devices[0].pods, 3);
        assert_eq!(v.devices[0].unattributed_processes, 2);
        assert_eq!(v.devices[1].sm_percent, None);
        assert_eq!(v.devices[1].memory_total_mib, None);
    }

    #[test]
    fn sort_keys() {
        let now = SystemTime::now();
        let mut v = View::from_json(&snapshot(now), SortKey::Memory, now).expect("view");
        let order = |v: &View| v.pods.iter().map(|p| p.pod.clone()).collect::<Vec<_>>();
        assert_eq!(order(&v), ["mig", "big", "small"]);
        v.sort_by(SortKey::Power);
        assert_eq!(order(&v), ["big", "small", "mig"]);
        v.sort_by(SortKey::Name);
        assert_eq!(order(&v), ["big", "mig", "small"]);
        assert_eq!(SortKey::Name.next(), SortKey::Sm);
    }

    #[test]
    fn table_and_json() {
        let now = SystemTime::now();
        let v = View::from_json(&snapshot(now), SortKey::Sm, now).expect("view");
        let t = v.render_table();
        assert!(t.contains("ml/big"), "{t}");
        assert!(t.contains("250.0"), "{t}");
        assert!(t.contains("  server,(sandbox)\n"), "{t}");
        assert!(t.contains("n/a"), "unreadable figures print n/a: {t}");
        assert!(!t.contains("web/idle"), "{t}");
        let j: Value = serde_json::from_str(&v.to_json().expect("json")).expect("parses");
        assert_eq!(j["pods"][0]["pod"], "big");
        assert_eq!(j["pods"][0]["containers"], json!(["server", "(sandbox)"]));
        assert_eq!(j["pods"][2]["sm_percent"], Value::Null);
        assert_eq!(j["sort"], "sm");
    }

    #[test]
    fn engines_beside_the_gpu_use() {
        let now = SystemTime::now();
        let mut snap = snapshot(now);
        snap["engines"] = json!([
            {"pod_uid": "a", "namespace": "ml", "pod": "big", "endpoint": "10.0.0.5:8000",
             "path": "/metrics", "error": null,
             "figures": {"vllm_queue_depth": {"ok": 7.0}, "vllm_kv_cache_usage": {"ok": 0.61}}},
            {"pod_uid": "b", "namespace": "ml", "pod": "small", "endpoint": "10.0.0.6:8000",
             "path": "/metrics", "error": "10.0.0.6:8000/metrics answered 503",
             "figures": {"vllm_queue_depth": {"unavailable": "503"}}}
        ]);
        let v = View::from_json(&snap, SortKey::Sm, now).expect("view");
        assert_eq!(v.engines.len(), 2);
        assert_eq!(
            v.engines[0].figures[0],
            ("vllm_kv_cache_usage".to_owned(), Some(0.61))
        );
        assert_eq!(v.engines[1].figures[0].1, None, "unreadable: no number");
        let t = v.render_table();
        assert!(
            t.contains("vllm_kv_cache_usage=0.610 vllm_queue_depth=7.000"),
            "{t}"
        );
        assert!(t.contains("n/a: 10.0.0.6:8000/metrics answered 503"), "{t}");
        let old = View::from_json(&snapshot(now), SortKey::Sm, now).expect("view");
        assert!(old.engines.is_empty() && !old.render_table().contains("ENGINE"));
    }

    #[test]
    fn a_foreign_document_is_an_error() {
        let now = SystemTime::now();
        let err = View::from_json(&json!({"hello": 1}), SortKey::Sm, now).expect_err("shape");
        assert!(err.to_string().contains("gpus"), "{err}");
    }

    #[test]
    fn energy_per_pod_and_idle_holders() {
        let now = SystemTime::now();
        let mut snap = snapshot(now);
        snap["accounts"] = json!({
            "pod_energy": [
                {"pod_uid": "a", "namespace": "ml", "pod": "big", "container": "server", "gpu": 0, "joules": 1500.0},
                {"pod_uid": "a", "namespace": "ml", "pod": "big", "container": "POD", "gpu": 0, "joules": 100.0},
                {"pod_uid": "b", "namespace": "ml", "pod": "small", "container": "", "gpu": 0, "joules": 0.0}
            ],
            "unattributed_energy": [], "device_energy": [],
            "holders": [
                {"pod_uid": "b", "namespace": "ml", "pod": "small", "gpu": 0, "memory_used_mib": 8000,
                 "sm_percent": 0.0, "idle_s": 4000.0, "idle": true},
                {"pod_uid": "a", "namespace": "ml", "pod": "big", "gpu": 0, "memory_used_mib": 20000,
                 "sm_percent": 60.0, "idle_s": 0.0, "idle": false}
            ],
            "idle_sm_percent": 1.0, "idle_after_s": 600.0
        });
        let v = View::from_json(&snap, SortKey::Sm, now).expect("view");
        let energy: Vec<Option<f64>> = v.pods.iter().map(|p| p.energy_j).collect();
        assert_eq!(
            energy,
            [Some(1600.0), Some(0.0), None],
            "big, small, mig (none booked)"
        );
        let t = v.render_table();
        assert!(t.contains("ENERGY J") && t.contains("1600"), "{t}");
        assert!(t.contains("1 idle GPU holder(s)"), "{t}");
        let idle = v.render_idle();
        assert!(idle.contains("<= 1 % SM for 10m"), "{idle}");
        assert!(
            idle.contains("ml/small") && idle.contains("1h 6m 40s"),
            "{idle}"
        );
        assert!(
            !idle.contains("ml/big"),
            "busy holders are not idle: {idle}"
        );
        let j: Value = serde_json::from_str(&v.idle_json().expect("json")).expect("parses");
        assert_eq!(j["idle"].as_array().map(Vec::len), Some(1));
        assert_eq!(j["idle"][0]["pod"], "small");
        assert_eq!(j["idle_after_s"], 600.0);
        // A daemon without a ledger: no energy, no holders, nothing invented.
        let old = View::from_json(&snapshot(now), SortKey::Sm, now).expect("view");
        assert!(old.pods.iter().all(|p| p.energy_j.is_none()));
        assert!(old.render_idle().contains("no idle GPU holder"));
    }
}
