//! The Prometheus exposition on `--metrics-listen` (see docs/metrics.md).
//!
//! Two kinds of series. What accumulates between scrapes (counters,
//! histograms) belongs to the domain that records it (`join`, `scaler`,
//! `cluster`, `engine`), each registering its families once in the
//! [`registry`]. The snapshot's gauges are rendered at scrape time from the
//! newest published [`NodeSnapshot`] into a registry built for that one scrape,
//! so the sampling path does no metric work for them and a pod that is gone
//! from the snapshot is gone from the next scrape: label cardinality is bounded
//! by what the node runs now.

use std::{sync::atomic::AtomicU64, time::SystemTime};

use prometheus_client::{
    encoding::text::{encode_eof, encode_registry},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};

use crate::{
    attribution::{Backend, Stats as AttributionStats},
    snapshot::{GpuUsage, NodeSnapshot, Reading},
};

/// Label set of one series: (name, value) pairs.
type Labels = Vec<(&'static str, String)>;

/// A float gauge family.
type GaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;

/// A float counter family, filled at scrape time from accumulated values.
type CounterFamily = Family<Labels, Counter<f64, AtomicU64>>;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const MIB: f64 = 1024.0 * 1024.0;

/// The /metrics registry with what never changes (`gpu_scaler_build_info`);
/// each domain registers its own counters and histograms in it once, at start
/// (`join::Metrics`, `scaler::Metrics`, `cluster::Metrics`, `engine::Metrics`).
pub fn registry() -> Registry {
    let mut r = Registry::default();
    let build: Family<[(&'static str, &'static str); 1], Gauge> = Family::default();
    build
        .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
        .set(1);
    r.register(
        "gpu_scaler_build_info",
        "Always 1; carries the version",
        build,
    );
    r
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: f64) {
    registry.register(name, help, ConstGauge::new(value));
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    registry.register(name, help, ConstCounter::new(value));
}

fn set(family: &GaugeFamily, labels: Labels, value: f64) {
    family.get_or_create(&labels).set(value);
}

/// Sets `family{labels}` when the reading was taken; an unreadable figure has
/// no series (never a made-up zero).
fn set_reading<T: Copy + Into<f64>>(
    family: &GaugeFamily,
    labels: &Labels,
    reading: &Reading<T>,
    scale: f64,
) {
    if let Reading::Ok(v) = reading {
        set(family, labels.clone(), (*v).into() * scale);
    }
}

/// What a scrape renders besides the snapshot.
pub struct Sources<'a> {
    /// The counters and histograms the domains registered ([`registry`]).
    pub registry: &'a Registry,
    /// Whether the GPU poller's newest pass failed.
    pub gpu_up: bool,
    /// The attribution backend's table sizes and loss counters.
    pub attribution: Option<AttributionStats>,
    /// The engines read on this node and their figures.
    pub engines: Option<&'a crate::engine::EngineSnapshot>,
}

impl<'a> Sources<'a> {
    /// Only the node's own figures: no attribution counters, no engines, the
    /// GPU source answering. Set the other fields with `..`.
    pub fn node(registry: &'a Registry) -> Self {
        Self {
            registry,
            gpu_up: true,
            attribution: None,
            engines: None,
        }
    }
}

/// Renders the exposition for `snap` at `now` (OpenMetrics text, which
/// Prometheus reads; see [`CONTENT_TYPE`]): the snapshot's gauges, built for
/// this scrape, then the registered families.
pub fn render(snap: &NodeSnapshot, sources: &Sources<'_>, now: SystemTime) -> String {
    let mut r = Registry::default();
    devices(&mut r, snap);
    pods(&mut r, snap);
    unattributed(&mut r, snap);
    accounts(&mut r, snap);
    sampling(&mut r, snap, sources, now);
    if let Some(stats) = &sources.attribution {
        attribution(&mut r, snap, stats);
    }
    if let Some(e) = sources.engines {
        engines(&mut r, e);
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode_registry(&mut out, &r)
        .and_then(|()| encode_registry(&mut out, sources.registry))
        .and_then(|()| encode_eof(&mut out));
    out
}

/// Each read engine: whether its newest read worked, and every figure a live
/// query reads from it (an unreadable figure has no series).
fn engines(r: &mut Registry, snap: &crate::engine::EngineSnapshot) {
    let up = GaugeFamily::default();
    let figure = GaugeFamily::default();
    for p in &snap.pods {
        let labels: Labels = vec![
            ("namespace", p.namespace.clone()),
            ("pod", p.pod.clone()),
            ("endpoint", format!("{}{}", p.endpoint, p.path)),
        ];
        set(&up, labels.clone(), f64::from(u8::from(p.error.is_none())));
        for (name, reading) in &p.figures {
            let mut l = labels.clone();
            l.push(("figure", name.clone()));
            set_reading(&figure, &l, reading, 1.0);
        }
    }
    r.register(
        "gpu_scaler_pod_engine_up",
        "1 when the newest read of the pod's engine metrics worked, 0 when it failed",
        up,
    );
    r.register(
        "gpu_scaler_pod_engine_figure",
        "A pod's engine figure (queue depth, KV-cache use, ...) as a live query reads it",
        figure,
    );
}

fn devices(r: &mut Registry, snap: &NodeSnapshot) {
    let up = GaugeFamily::default();
    let info = GaugeFamily::default();
    let sm = GaugeFamily::default();
    let mem = GaugeFamily::default();
    let used = GaugeFamily::default();
    let total = GaugeFamily::default();
    let power = GaugeFamily::default();
    let power_avg = GaugeFamily::default();
    let energy: CounterFamily = Family::default();
    let temp = GaugeFamily::default();
    for g in &snap.gpus {
        let labels: Labels = vec![("gpu", g.index.to_string()), ("uuid", g.uuid.clone())];
        // A device NVML could not read has every figure unavailable (see
        // gpu::collector); one figure read means the device answered.
        let readable = g.sm_util.ok().is_some() || g.memory_used_mib.ok().is_some();
        set(
            &up,
            labels.clone(),
            f64::from(u8::from(readable && snap.gpu_error.is_none())),
        );
        let mut with_model = labels.clone();
        with_model.push(("model", g.name.clone()));
        set(&info, with_model, 1.0);
        set_reading(&sm, &labels, &g.sm_util, 1.0);
        set_reading(&mem, &labels, &g.mem_util, 1.0);
        set_reading(&used, &labels, &g.memory_used_mib.as_f64(), MIB);
        set_reading(&total, &labels, &g.memory_total_mib.as_f64(), MIB);
        set_reading(&power, &labels, &g.power_w, 1.0);
        set_reading(&temp, &labels, &g.temperature_c, 1.0);
        if let Reading::Ok(p) = &g.counters.energy_pass {
            set(&power_avg, labels.clone(), p.watts());
        }
        if let Reading::Ok(mj) = &g.counters.energy_mj {
            // Exact below 2^53 mJ (285 years at 1 kW).
            energy.get_or_create(&labels).inc_by(*mj as f64 / 1000.0);
        }
    }
    r.register(
        "gpu_scaler_device_up",
        "1 when the last poll read the device, 0 when it failed",
        up,
    );
    r.register(
        "gpu_scaler_device_info",
        "Always 1; carries the model name",
        info,
    );
    r.register(
        "gpu_scaler_device_sm_utilization_percent",
        "SM busy time over the last sample period, whole device",
        sm,
    );
    r.register(
        "gpu_scaler_device_memory_utilization_percent",
        "Memory-controller busy time, whole device",
        mem,
    );
    r.register(
        "gpu_scaler_device_memory_used_bytes",
        "Framebuffer memory in use",
        used,
    );
    r.register(
        "gpu_scaler_device_memory_total_bytes",
        "Framebuffer memory size",
        total,
    );
    r.register("gpu_scaler_device_power_watts", "Board power draw", power);
    r.register(
        "gpu_scaler_device_power_average_watts",
        "Mean board power over the last sampling pass, from the total-energy counter",
        power_avg,
    );
    r.register(
        "gpu_scaler_device_energy_joules",
        "The driver's total-energy counter (since the driver loaded)",
        energy,
    );
    r.register(
        "gpu_scaler_device_temperature_celsius",
        "Core temperature",
        temp,
    );
}

/// One usage's figures into the per-owner families.
struct UsageFamilies {
    sm: GaugeFamily,
    mem: GaugeFamily,
    used: GaugeFamily,
    power: GaugeFamily,
    procs: GaugeFamily,
}

impl UsageFamilies {
    fn new() -> Self {
        Self {
            sm: Family::default(),
            mem: Family::default(),
            used: Family::default(),
            power: Family::default(),
            procs: Family::default(),
        }
    }

    fn add(&self, labels: &Labels, u: &GpuUsage) {
        set_reading(&self.sm, labels, &u.sm_util, 1.0);
        set_reading(&self.mem, labels, &u.mem_util, 1.0);
        set_reading(&self.used, labels, &u.memory_used_mib.as_f64(), MIB);
        set_reading(&self.power, labels, &u.power_w, 1.0);
        set(&self.procs, labels.clone(), u.pids.len() as f64);
    }
}

/// Per pod, container and GPU: one series set per part of the pod the join
/// told apart (see `snapshot::ContainerRole::label`). Parts that share a label
/// (`""`: no container, or an unknown one) are summed into one series, so the
/// series of a pod and GPU sum over `container` to the pod's figure.
fn pods(r: &mut Registry, snap: &NodeSnapshot) {
    let f = UsageFamilies::new();
    for p in snap.pods.values() {
        let labels = |container: &str, gpu: u32| -> Labels {
            vec![
                ("namespace", p.pod.namespace.clone()),
                ("pod", p.pod.name.clone()),
                ("container", container.to_owned()),
                ("gpu", gpu.to_string()),
            ]
        };
        if p.containers.is_empty() {
            // A usage not split by container (the join always splits; a
            // snapshot from elsewhere may not): the pod total, container "".
            for u in &p.gpus {
                f.add(&labels("", u.gpu_index), u);
            }
            continue;
        }
        let mut series: std::collections::BTreeMap<Labels, GpuUsage> = Default::default();
        for c in &p.containers {
            for u in &c.gpus {
                match series.entry(labels(c.role.label(), u.gpu_index)) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(u.clone());
                    }
                    std::collections::btree_map::Entry::Occupied(mut e) => {
                        let sum = e.get_mut();
                        sum.pids.extend_from_slice(&u.pids);
                        sum.sm_util = sum.sm_util.plus(&u.sm_util);
                        sum.mem_util = sum.mem_util.plus(&u.mem_util);
                        sum.memory_used_mib = sum.memory_used_mib.plus(&u.memory_used_mib);
                        sum.power_w = sum.power_w.plus(&u.power_w);
                    }
                }
            }
        }
        for (labels, u) in &series {
            f.add(labels, u);
        }
    }
    r.register(
        "gpu_scaler_pod_sm_utilization_percent",
        "SM time of the container's processes on the GPU (sum over container: the pod's)",
        f.sm,
    );
    r.register(
        "gpu_scaler_pod_memory_utilization_percent",
        "Memory-controller time of the container's processes on the GPU",
        f.mem,
    );
    r.register(
        "gpu_scaler_pod_memory_used_bytes",
        "GPU memory the container's processes hold",
        f.used,
    );
    r.register(
        "gpu_scaler_pod_power_watts",
        "The device's power split over its processes by SM share",
        f.power,
    );
    r.register(
        "gpu_scaler_pod_processes",
        "The container's processes on the GPU",
        f.procs,
    );
}

fn unattributed(r: &mut Registry, snap: &NodeSnapshot) {
    let sm = GaugeFamily::default();
    let used = GaugeFamily::default();
    let procs = GaugeFamily::default();
    // Several reasons can share a GPU: sum them per GPU. Start every GPU of
    // the snapshot at zero so "nothing unattributed" reads as 0, not absent.
    let mut per_gpu: std::collections::BTreeMap<u32, (Option<f64>, Option<f64>, usize)> = snap
        .gpus
        .iter()
        .map(|g| (g.index, (Some(0.0), Some(0.0), 0)))
        .collect();
    for u in &snap.unowned {
        let e = per_gpu
            .entry(u.usage.gpu_index)
            .or_insert((Some(0.0), Some(0.0), 0));
        e.0 = e.0.zip(u.usage.sm_util.ok()).map(|(a, b)| a + b);
        e.1 =
            e.1.zip(u.usage.memory_used_mib.ok())
                .map(|(a, b)| a + b as f64);
        e.2 += u.usage.pids.len();
    }
    for (gpu, (s, m, n)) in per_gpu {
        let labels: Labels = vec![("gpu", gpu.to_string())];
        if let Some(s) = s {
            set(&sm, labels.clone(), s);
        }
        if let Some(m) = m {
            set(&used, labels.clone(), m * MIB);
        }
        set(&procs, labels, n as f64);
    }
    r.register(
        "gpu_scaler_unattributed_sm_utilization_percent",
        "SM time of processes attributed to no pod",
        sm,
    );
    r.register(
        "gpu_scaler_unattributed_memory_used_bytes",
        "GPU memory of processes attributed to no pod",
        used,
    );
    r.register(
        "gpu_scaler_unattributed_processes",
        "Processes on the GPU attributed to no pod",
        procs,
    );
}

/// What the sampler's ledger accumulated: energy per pod and unattributed
/// (per GPU board they add up to its counter's increase), idle GPU holders.
fn accounts(r: &mut Registry, snap: &NodeSnapshot) {
    let a = &snap.accounts;
    let pod_energy: CounterFamily = Family::default();
    for e in &a.pod_energy {
        pod_energy
            .get_or_create(&vec![
                ("namespace", e.namespace.clone()),
                ("pod", e.pod.clone()),
                ("container", e.container.clone()),
                ("gpu", e.gpu.to_string()),
            ])
            .inc_by(e.joules);
    }
    let unattributed: CounterFamily = Family::default();
    for e in &a.unattributed_energy {
        unattributed
            .get_or_create(&vec![
                ("gpu", e.gpu.to_string()),
                ("reason", e.reason.as_str().to_owned()),
            ])
            .inc_by(e.joules);
    }
    let idle = GaugeFamily::default();
    for h in &a.holders {
        set(
            &idle,
            vec![
                ("namespace", h.namespace.clone()),
                ("pod", h.pod.clone()),
                ("gpu", h.gpu.to_string()),
            ],
            h.idle_s,
        );
    }
    r.register(
        "gpu_scaler_pod_energy_joules",
        "Energy of the container's processes on the GPU since the pod appeared: each pass's increase of the GPU's energy counter split by SM share",
        pod_energy,
    );
    r.register(
        "gpu_scaler_unattributed_energy_joules",
        "Energy of the GPU booked to no pod, by reason (no_pod, no_process, unsplit)",
        unattributed,
    );
    r.register(
        "gpu_scaler_pod_gpu_idle_seconds",
        "How long the pod has held memory on the GPU at no more than the idle SM threshold (0 while busy)",
        idle,
    );
}

fn sampling(r: &mut Registry, snap: &NodeSnapshot, sources: &Sources<'_>, now: SystemTime) {
    gauge(
        r,
        "gpu_scaler_snapshot_age_seconds",
        "Age of the GPU samples in the newest snapshot (NaN before the first)",
        snap.samples_age(now).map_or(f64::NAN, |a| a.as_secs_f64()),
    );
    gauge(
        r,
        "gpu_scaler_local_pods",
        "Pods on this node known to the pods source",
        snap.pods.len() as f64,
    );
    gauge(
        r,
        "gpu_scaler_gpu_source_up",
        "1 when the GPU source answered its newest poll, else 0",
        f64::from(u8::from(sources.gpu_up && snap.gpu_error.is_none())),
    );
    gauge(
        r,
        "gpu_scaler_gpus",
        "GPUs in the newest snapshot",
        snap.gpus.len() as f64,
    );
    let mode = GaugeFamily::default();
    set(&mode, vec![("mode", snap.attribution.to_string())], 1.0);
    r.register(
        "gpu_scaler_attribution_mode",
        "1 for the active attribution backend",
        mode,
    );
}

fn attribution(r: &mut Registry, snap: &NodeSnapshot, s: &AttributionStats) {
    gauge(
        r,
        "gpu_scaler_tracked_processes",
        "Pids with a known cgroup, exited ones in their grace period included",
        s.tracked_pids as f64,
    );
    gauge(
        r,
        "gpu_scaler_tracked_exited_processes",
        "Of those, pids that have exited and are kept for their grace period",
        s.exited_pids as f64,
    );
    gauge(
        r,
        "gpu_scaler_attribution_cgroups",
        "cgroups known to attribution",
        s.cgroups as f64,
    );
    counter(
        r,
        "gpu_scaler_attribution_evicted",
        "Exited pids dropped before their grace period ended (table full)",
        s.evicted_early,
    );
    counter(
        r,
        "gpu_scaler_attribution_unknown_cgroups",
        "Events naming a cgroup that could not be found (already removed)",
        s.unknown_cgroups,
    );
    if snap.attribution == Backend::Ebpf {
        counter(
            r,
            "gpu_scaler_ebpf_events_dropped",
            "Events the probe could not put in the ring buffer",
            s.dropped_events,
        );
    }
    if let Some(e) = &s.ebpf {
        ebpf(r, e);
    }
}

/// The eBPF backend's events by kind, resyncs and map occupancy.
fn ebpf(r: &mut Registry, e: &crate::attribution::EbpfStats) {
    let events: Family<Labels, Counter> = Family::default();
    let ev = &e.events;
    for (kind, n) in [
        ("exec", ev.exec),
        ("fork", ev.fork),
        ("exit", ev.exit),
        ("attach", ev.attach),
        ("cgroup_mkdir", ev.cgroup_mkdir),
        ("cgroup_rmdir", ev.cgroup_rmdir),
    ] {
        events
            .get_or_create(&vec![("event", kind.to_owned())])
            .inc_by(n);
    }
    r.register(
        "gpu_scaler_ebpf_events",
        "Events read from the eBPF ring buffer, by kind",
        events,
    );
    counter(
        r,
        "gpu_scaler_ebpf_resyncs",
        "Resynchronisations from /proc after the probe lost events",
        e.resyncs,
    );
    counter(
        r,
        "gpu_scaler_ebpf_proc_lookups",
        "GPU processes the probe had not reported, resolved from /proc on the spot",
        e.proc_lookups,
    );
    let entries = GaugeFamily::default();
    if let Some(n) = e.pid_map_entries {
        set(&entries, vec![("map", "PID_CGROUP".to_owned())], n as f64);
    }
    r.register(
        "gpu_scaler_ebpf_map_entries",
        "Entries in the eBPF pid map, counted every few seconds",
        entries,
    );
    let capacity = GaugeFamily::default();
    set(
        &capacity,
        vec![("map", "PID_CGROUP".to_owned())],
        f64::from(e.pid_map_capacity),
    );
    set(
        &capacity,
        vec![("map", "EVENTS".to_owned())],
        f64::from(e.ring_buffer_bytes),
    );
    r.register(
        "gpu_scaler_ebpf_map_capacity",
        "max_entries of each eBPF map (the EVENTS ring buffer's size in bytes)",
        capacity,
    );
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::attribution::Backend;

    /// The /metrics registry as the daemon builds it, with the join's families
    /// (labelled `mock`).
    fn node_registry() -> (Registry, crate::join::Metrics) {
        let mut r = registry();
        let join = crate::join::Metrics::new("mock");
        join.register(&mut r);
        (r, join)
    }

    fn empty_snapshot() -> NodeSnapshot {
        NodeSnapshot {
            taken_at: SystemTime::now(),
            samples_taken_at: None,
            gpu_error: Some("no sample yet".into()),
            node_name: None,
            attribution: Backend::Procfs,
            gpus: Vec::new(),
            pods: BTreeMap::new(),
            unowned: Vec::new(),
            pods_error: None,
            energy: Vec::new(),
            accounts: Default::default(),
        }
    }

    #[test]
    fn cluster_counters_and_latencies() {
        let cluster = crate::cluster::Metrics::default();
        for ok in [true, true, true, false, false] {
            // One in the (0.002, 0.004] bucket, the others past it.
            let took = if ok && cluster.peer_requests_sent() == 0 {
                Duration::from_millis(3)
            } else {
                Duration::from_millis(700)
            };
            cluster.peer_request(ok, took);
        }
        cluster.missing_node(false);
        cluster
            .fanout_latency
            .observe(Duration::from_millis(20).as_secs_f64());
        // A static list has no readiness: every peer counts as ready.
        cluster.peers.set(std::sync::Arc::new(
            crate::cluster::discovery::StaticPeers::new([
                ("n1".to_owned(), "127.0.0.1:6001".parse().expect("addr")),
                ("n2".to_owned(), "127.0.0.2:6001".parse().expect("addr")),
            ]),
        ));
        let (mut registry, join) = node_registry();
        cluster.register(&mut registry);
        join.errors.get_or_create(&[("source", "mock")]).inc();
        let out = render(
            &empty_snapshot(),
            &Sources {
                registry: &registry,
                gpu_up: false,
                engines: None,
                attribution: Some(AttributionStats {
                    tracked_pids: 7,
                    dropped_events: 3,
                    ..AttributionStats::default()
                }),
            },
            SystemTime::now(),
        );
        for line in [
            "gpu_scaler_peer_requests_total{outcome=\"ok\"} 3",
            "gpu_scaler_peer_requests_total{outcome=\"error\"} 2",
            "gpu_scaler_missing_node_total{outcome=\"unavailable\"} 1",
            "gpu_scaler_peer_request_duration_seconds_bucket{le=\"0.002\"} 0",
            "gpu_scaler_peer_request_duration_seconds_bucket{le=\"0.004\"} 1",
            "gpu_scaler_fanout_duration_seconds_count 1",
            "gpu_scaler_peers{state=\"ready\"} 2",
            "gpu_scaler_peers{state=\"not_ready\"} 0",
            "gpu_scaler_sample_errors_total{source=\"mock\"} 1",
            "gpu_scaler_snapshot_age_seconds NaN",
            "gpu_scaler_gpu_source_up 0",
            "gpu_scaler_attribution_mode{mode=\"procfs\"} 1",
            "gpu_scaler_tracked_processes 7",
            "gpu_scaler_attribution_evicted_total 0",
        ] {
            assert!(out.contains(line), "{line:?} missing from:\n{out}");
        }
        assert!(out.ends_with("# EOF\n"), "{out}");
        assert!(
            !out.contains("gpu_scaler_ebpf_events_dropped_total"),
            "no eBPF series from the procfs backend: {out}"
        );
        for series in [
            "gpu_scaler_ebpf_events_total",
            "gpu_scaler_ebpf_resyncs_total",
            "gpu_scaler_ebpf_map_entries",
            "gpu_scaler_ebpf_map_capacity",
        ] {
            assert!(
                !out.contains(series),
                "{series} from the procfs backend: {out}"
            );
        }
    }

    #[test]
    fn ebpf_events_resyncs_and_maps() {
        use crate::attribution::{EbpfStats, EventCounts};
        let (registry, _join) = node_registry();
        let snap = NodeSnapshot {
            attribution: Backend::Ebpf,
            ..empty_snapshot()
        };
        let stats = |pid_map_entries| AttributionStats {
            dropped_events: 9,
            ebpf: Some(EbpfStats {
                events: EventCounts {
                    exec: 11,
                    fork: 12,
                    exit: 13,
                    attach: 14,
                    cgroup_mkdir: 15,
                    cgroup_rmdir: 16,
                },
                resyncs: 2,
                proc_lookups: 3,
                pid_map_entries,
                pid_map_capacity: 65536,
                ring_buffer_bytes: 4096,
            }),
            ..AttributionStats::default()
        };
        let render_with = |s| {
            render(
                &snap,
                &Sources {
                    attribution: Some(s),
                    ..Sources::node(&registry)
                },
                SystemTime::now(),
            )
        };
        let out = render_with(stats(Some(321)));
        for line in [
            "gpu_scaler_ebpf_events_dropped_total 9",
            "gpu_scaler_ebpf_events_total{event=\"exec\"} 11",
            "gpu_scaler_ebpf_events_total{event=\"fork\"} 12",
            "gpu_scaler_ebpf_events_total{event=\"exit\"} 13",
            "gpu_scaler_ebpf_events_total{event=\"attach\"} 14",
            "gpu_scaler_ebpf_events_total{event=\"cgroup_mkdir\"} 15",
            "gpu_scaler_ebpf_events_total{event=\"cgroup_rmdir\"} 16",
            "gpu_scaler_ebpf_resyncs_total 2",
            "gpu_scaler_ebpf_proc_lookups_total 3",
            "gpu_scaler_ebpf_map_entries{map=\"PID_CGROUP\"} 321",
            "gpu_scaler_ebpf_map_capacity{map=\"PID_CGROUP\"} 65536",
            "gpu_scaler_ebpf_map_capacity{map=\"EVENTS\"} 4096",
        ] {
            assert!(out.contains(line), "{line:?} missing from:\n{out}");
        }
        // Not counted yet: no series rather than a made-up zero.
        let out = render_with(stats(None));
        assert!(!out.contains("gpu_scaler_ebpf_map_entries{"), "{out}");
        assert!(out.contains("gpu_scaler_ebpf_resyncs_total 2"), "{out}");
    }

    fn usage(gpu: u32, pids: &[u32], sm: Reading<f64>, used: u64, power: f64) -> GpuUsage {
        GpuUsage {
            gpu_index: gpu,
            gpu_uuid: format!("GPU-{gpu}"),
            pids: pids.to_vec(),
            sm_util: sm,
            mem_util: Reading::Ok(1.0),
            memory_used_mib: Reading::Ok(used),
            memory_total_mib: Reading::Ok(80_000),
            temperature_c: Reading::Ok(50),
            power_w: Reading::Ok(power),
            pcie_tx_kbps: Reading::Ok(0.0),
            pcie_rx_kbps: Reading::Ok(0.0),
            nvlink_tx_mbps: Reading::Ok(0.0),
            nvlink_rx_mbps: Reading::Ok(0.0),
        }
    }

    #[test]
    fn pod_series_per_container() {
        use crate::{
            pods::{ContainerKind, Pod},
            snapshot::{ContainerRole, ContainerUsage, PodUsage},
        };
        use std::sync::Arc;
        let pod = |name: &str| {
            Arc::new(Pod {
                uid: name.into(),
                namespace: "ml".into(),
                name: name.into(),
                labels: BTreeMap::new(),
                node_name: None,
                phase: None,
                ready: true,
                ip: None,
                annotations: Default::default(),
                containers: Vec::new(),
            })
        };
        let part = |role: ContainerRole, gpus: Vec<GpuUsage>| ContainerUsage {
            role,
            container_ids: Vec::new(),
            gpus,
        };
        let mut snap = empty_snapshot();
        snap.pods.insert(
            "a".into(),
            Arc::new(PodUsage {
                pod: pod("a"),
                gpus: vec![usage(0, &[1, 2, 3, 4, 5], Reading::Ok(66.0), 3700, 200.0)],
                containers: vec![
                    part(
                        ContainerRole::Container {
                            name: "server".into(),
                            kind: ContainerKind::App,
                        },
                        vec![usage(0, &[1, 2], Reading::Ok(40.0), 3000, 120.0)],
                    ),
                    part(
                        ContainerRole::Sandbox,
                        vec![usage(0, &[3], Reading::Ok(6.0), 100, 20.0)],
                    ),
                    // Two parts with the label "": summed into one series.
                    part(
                        ContainerRole::PodCgroup,
                        vec![usage(0, &[4], Reading::Ok(15.0), 500, 50.0)],
                    ),
                    part(
                        ContainerRole::Unknown,
                        vec![usage(0, &[5], Reading::Ok(5.0), 100, 10.0)],
                    ),
                ],
            }),
        );
        // A pod whose split is unreadable on GPU 1: that container has no SM series.
        snap.pods.insert(
            "b".into(),
            Arc::new(PodUsage {
                pod: pod("b"),
                gpus: vec![usage(1, &[9], Reading::unavailable("MIG"), 10, 1.0)],
                containers: vec![part(
                    ContainerRole::Container {
                        name: "train".into(),
                        kind: ContainerKind::App,
                    },
                    vec![usage(1, &[9], Reading::unavailable("MIG"), 10, 1.0)],
                )],
            }),
        );
        // A usage from elsewhere, not split: the pod total under container "".
        snap.pods.insert(
            "c".into(),
            Arc::new(PodUsage {
                pod: pod("c"),
                gpus: vec![usage(2, &[7], Reading::Ok(12.0), 1, 2.0)],
                containers: Vec::new(),
            }),
        );
        let (registry, _join) = node_registry();
        let out = render(&snap, &Sources::node(&registry), SystemTime::now());
        let series = |name: &str, pod: &str, container: &str, gpu: u32| {
            format!(
                "{name}{{namespace=\"ml\",pod=\"{pod}\",container=\"{container}\",gpu=\"{gpu}\"}}"
            )
        };
        let sm = "gpu_scaler_pod_sm_utilization_percent";
        for (line, value) in [
            (series(sm, "a", "server", 0), "40.0"),
            (series(sm, "a", "POD", 0), "6.0"),
            (series(sm, "a", "", 0), "20.0"),
            (series("gpu_scaler_pod_processes", "a", "", 0), "2.0"),
            (series("gpu_scaler_pod_power_watts", "a", "", 0), "60.0"),
            (
                series("gpu_scaler_pod_memory_used_bytes", "a", "server", 0),
                "3145728000.0",
            ),
            (series("gpu_scaler_pod_processes", "b", "train", 1), "1.0"),
            (series(sm, "c", "", 2), "12.0"),
        ] {
            let want = format!("{line} {value}\n");
            assert!(out.contains(&want), "{want:?} missing from:\n{out}");
        }
        assert!(
            !out.contains(&series(sm, "b", "train", 1)),
            "an unreadable figure has no series: {out}"
        );
        assert_eq!(
            out.matches(&format!("{sm}{{namespace=\"ml\",pod=\"a\""))
                .count(),
            3,
            "one series per label: {out}"
        );
    }

    #[test]
    fn no_cluster_no_cluster_series() {
        let (mut registry, _join) = node_registry();
        crate::scaler::Metrics::default().register(&mut registry);
        let out = render(
            &empty_snapshot(),
            &Sources::node(&registry),
            SystemTime::now(),
        );
        assert!(!out.contains("gpu_scaler_peer_requests_total"), "{out}");
        assert!(out.contains("gpu_scaler_gpus 0"), "{out}");
        assert!(
            out.contains("gpu_scaler_grpc_streams{method=\"StreamIsActive\"} 0"),
            "{out}"
        );
    }

    #[test]
    fn engine_series_name_pod_endpoint_and_figure_and_skip_unreadable() {
        use crate::engine::scraper::PodEngine;
        let engines = crate::engine::EngineSnapshot {
            taken_at: None,
            pods: vec![
                PodEngine {
                    pod_uid: "u1".into(),
                    namespace: "ml".into(),
                    pod: "vllm-0".into(),
                    endpoint: "10.0.0.5:8000".into(),
                    path: "/metrics".into(),
                    error: None,
                    figures: [("vllm_queue_depth".to_owned(), Reading::Ok(7.0))].into(),
                },
                PodEngine {
                    pod_uid: "u2".into(),
                    namespace: "ml".into(),
                    pod: "vllm-1".into(),
                    endpoint: "10.0.0.6:8000".into(),
                    path: "/metrics".into(),
                    error: Some("refused".into()),
                    figures: [(
                        "vllm_queue_depth".to_owned(),
                        Reading::unavailable("refused"),
                    )]
                    .into(),
                },
            ],
        };
        let (mut registry, _join) = node_registry();
        let reader = crate::engine::Metrics::default();
        reader.reads.inc_by(5);
        reader.failures.inc();
        reader.register(&mut registry);
        let out = render(
            &empty_snapshot(),
            &Sources {
                engines: Some(&engines),
                ..Sources::node(&registry)
            },
            SystemTime::now(),
        );
        assert!(out.contains(
            "gpu_scaler_pod_engine_figure{namespace=\"ml\",pod=\"vllm-0\",endpoint=\"10.0.0.5:8000/metrics\",figure=\"vllm_queue_depth\"} 7.0"
        ), "{out}");
        assert!(
            !out.contains("pod=\"vllm-1\",endpoint=\"10.0.0.6:8000/metrics\",figure"),
            "{out}"
        );
        assert!(out.contains("gpu_scaler_pod_engine_up{namespace=\"ml\",pod=\"vllm-1\",endpoint=\"10.0.0.6:8000/metrics\"} 0"), "{out}");
        assert!(
            out.contains("gpu_scaler_engine_read_failures_total 1"),
            "{out}"
        );
    }

    #[test]
    fn energy_counters_add_up_and_idle_holders_have_a_gauge() {
        use crate::{
            accounting::{Config, Ledger},
            gpu::{DeviceCounters, EnergyPass},
            join::{
                join,
                tests::{device, pod, proc, status, table},
            },
            pods::PodSet,
        };
        let mut ledger = Ledger::new(Config {
            idle_sm_percent: 1.0,
            idle_after: Duration::from_secs(60),
        });
        let pods = PodSet::from_pods([pod("a"), pod("b")], None, "t");
        let pass = |mj: u64, at: u64| {
            // a (pids 10, 11) 30 + 10, b (20) idle with memory, host (30) 60.
            let mut d = device(
                0,
                100.0,
                vec![
                    proc(10, 30, 0, 1),
                    proc(11, 10, 0, 1),
                    proc(20, 0, 0, 512),
                    proc(30, 60, 0, 1),
                ],
            );
            d.counters = DeviceCounters {
                energy_mj: Reading::Ok(mj),
                energy_pass: Reading::Ok(EnergyPass {
                    joules: 250.0,
                    seconds: 1.0,
                }),
                ..DeviceCounters::default()
            };
            let mut st = status(vec![d]);
            if let Some(s) = st.last_good.as_mut() {
                std::sync::Arc::make_mut(s).taken_at =
                    SystemTime::UNIX_EPOCH + Duration::from_secs(at);
            }
            join(&st, &pods, &table(), SystemTime::UNIX_EPOCH)
        };
        let mut first = pass(7_000_000, 100);
        ledger.record(&mut first);
        let mut snap = pass(8_000_000, 190);
        ledger.record(&mut snap);
        let text = render(&snap, &Sources::node(&registry()), SystemTime::now());
        for line in [
            "gpu_scaler_device_energy_joules_total{gpu=\"0\",uuid=\"GPU-0\"} 8000.0",
            "gpu_scaler_device_power_average_watts{gpu=\"0\",uuid=\"GPU-0\"} 250.0",
            "gpu_scaler_pod_energy_joules_total{namespace=\"ml\",pod=\"a\",container=\"\",gpu=\"0\"} 400.0",
            "gpu_scaler_unattributed_energy_joules_total{gpu=\"0\",reason=\"no_pod\"} 600.0",
            "gpu_scaler_unattributed_energy_joules_total{gpu=\"0\",reason=\"unsplit\"} 0.0",
            "gpu_scaler_pod_gpu_idle_seconds{namespace=\"ml\",pod=\"b\",gpu=\"0\"} 90.0",
            "gpu_scaler_pod_gpu_idle_seconds{namespace=\"ml\",pod=\"a\",gpu=\"0\"} 0.0",
            "# TYPE gpu_scaler_pod_energy_joules counter",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // b used no SM: no share of the energy (the host's 60 % is not b's).
        assert!(
            text.contains("pod=\"b\",container=\"\",gpu=\"0\"} 0.0")
                || !text.contains("gpu_scaler_pod_energy_joules_total{namespace=\"ml\",pod=\"b\""),
            "{text}"
        );
    }
}
