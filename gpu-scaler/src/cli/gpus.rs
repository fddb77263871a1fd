//! `gpu-scaler gpus`: devices, their processes, and the pods those belong to.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use crate::{
    attribution::{self, Attribution, Attributor, Owner},
    gpu::{self, GpuDevice, GpuSnapshot, ProcessKind},
    snapshot::Reading,
};

#[derive(Debug, clap::Args)]
pub struct GpusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub gpu_source: super::gpu_source::GpuSourceArgs,

    #[command(flatten)]
    pub local_attribution: super::local_attribution::LocalAttributionArgs,
}

pub async fn run(args: GpusArgs) -> super::Result<()> {
    let mut source = gpu::source(&args.gpu_source.config(Duration::from_secs(1)))?;
    // One short pass; blocking this one-shot command's runtime is harmless.
    let snapshot = source.poll()?;
    let attributor = attribution::start(attribution::Config {
        mode: args.local_attribution.attribution,
        exit_grace: Duration::from_secs(30),
        ebpf_ring_buffer: attribution::RingBufferSize::DEFAULT,
    })
    .await;
    let (attributor, note) = match attributor {
        Ok(a) => (Some(a), None),
        Err(e) => (None, Some(format!("processes are shown without pods: {e}"))),
    };
    let out = if args.json {
        render_json(&snapshot, attributor.as_deref(), note.as_deref())
    } else {
        render_table(&snapshot, attributor.as_deref())
    };
    print!("{out}");
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    Ok(())
}

/// The snapshot as JSON: every device with its processes, each process with
/// its `attribution` (null when the pid is unknown or attribution is down).
pub fn render_json(
    snapshot: &GpuSnapshot,
    attributor: Option<&dyn Attributor>,
    attribution_error: Option<&str>,
) -> String {
    let devices: Vec<serde_json::Value> = snapshot
        .devices
        .iter()
        .map(|d| {
            let mut value = serde_json::to_value(d).unwrap_or_default();
            let processes: Vec<serde_json::Value> = d
                .processes
                .iter()
                .map(|p| {
                    let mut pv = serde_json::to_value(p).unwrap_or_default();
                    pv["attribution"] =
                        serde_json::to_value(attributor.and_then(|a| a.resolve(p.pid)))
                            .unwrap_or_default();
                    pv
                })
                .collect();
            value["processes"] = processes.into();
            value
        })
        .collect();
    let taken_at_ms = snapshot
        .taken_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let doc = serde_json::json!({
        "taken_at_unix_ms": taken_at_ms,
        "devices": devices,
        "attribution_error": attribution_error,
    });
    let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
    s.push('\n');
    s
}

/// The snapshot as a table for people. Figures that could not be read print
/// as `n/a` with the reasons listed under their device.
pub fn render_table(snapshot: &GpuSnapshot, attributor: Option<&dyn Attributor>) -> String {
    let mut out = String::new();
    if snapshot.devices.is_empty() {
        out.push_str("no GPUs\n");
    }
    for d in &snapshot.devices {
        render_device(&mut out, d, attributor);
    }
    out
}

fn render_device(out: &mut String, d: &GpuDevice, attributor: Option<&dyn Attributor>) {
    let mut reasons: Vec<Arc<str>> = Vec::new();
    let mut show = |r: &Reading<String>| -> String {
        match r {
            Reading::Ok(v) => v.clone(),
            Reading::Unavailable(why) => {
                if !reasons.contains(why) {
                    reasons.push(why.clone());
                }
                "n/a".into()
            }
        }
    };
    let _ = writeln!(out, "GPU {}  {}  {}", d.index, d.name, d.uuid);
    let _ = writeln!(
        out,
        "  SM {} %  MEM {} %  memory {} / {} MiB  {} C  {} / {} W  MIG {}",
        show(&text(&d.sm_util)),
        show(&text(&d.mem_util)),
        show(&text(&d.memory_used_mib)),
        show(&text(&d.memory_total_mib)),
        show(&text(&d.temperature_c)),
        show(&watts(&d.power_w)),
        show(&watts(&d.power_limit_w)),
        if d.mig_enabled { "on" } else { "off" },
    );
    if let Some(err) = &d.processes_error {
        let _ = writeln!(out, "  processes: unavailable: {err}");
    } else if d.processes.is_empty() {
        let _ = writeln!(out, "  no processes");
    } else {
        let _ = writeln!(
            out,
            "  {:>8}  {:<8}  {:>4}  {:>5}  {:>10}  {:>3}  {:<36}  {:<12}",
            "PID", "KIND", "SM%", "MEM%", "MEMORY MiB", "GI", "POD", "CONTAINER"
        );
        for p in &d.processes {
            let (pod, container) = owner(attributor.map(|a| a.resolve(p.pid)));
            let kind = match p.kind {
                ProcessKind::Compute => "compute",
                ProcessKind::Graphics => "graphics",
                ProcessKind::Mps => "mps",
            };
            let _ = writeln!(
                out,
                "  {:>8}  {:<8}  {:>4}  {:>5}  {:>10}  {:>3}  {:<36}  {:<12}",
                p.pid,
                kind,
                show(&text(&p.sm_util)),
                show(&text(&p.mem_util)),
                show(&text(&p.used_memory_mib)),
                p.gpu_instance_id
                    .map_or_else(|| "-".into(), |g| g.to_string()),
                pod,
                container,
            );
        }
    }
    for why in reasons {
        let _ = writeln!(out, "  n/a: {why}");
    }
}

/// (pod, container) columns for a pid: `-` without attribution, `?` for a pid
/// the attribution engine does not know.
fn owner(resolved: Option<Option<Attribution>>) -> (String, String) {
    match resolved {
        None => ("-".into(), "-".into()),
        Some(None) => ("?".into(), "?".into()),
        Some(Some(a)) => match a.owner {
            Owner::Host => ("(host)".into(), "-".into()),
            Owner::Pod(pod) => (
                pod.pod_uid,
                pod.container_id
                    .map_or_else(|| "-".into(), |c| c.chars().take(12).collect()),
            ),
        },
    }
}

fn text<T: ToString>(r: &Reading<T>) -> Reading<String> {
    match r {
        Reading::Ok(v) => Reading::Ok(v.to_string()),
        Reading::Unavailable(why) => Reading::Unavailable(why.clone()),
    }
}

fn watts(r: &Reading<f64>) -> Reading<String> {
    match r {
        Reading::Ok(v) => Reading::Ok(format!("{v:.1}")),
        Reading::Unavailable(why) => Reading::Unavailable(why.clone()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{
        attribution::{Backend, PodIdentity, QosClass, Runtime},
        gpu::GpuProcess,
    };

    /// pid 4242 in a containerd container of one pod; no other process.
    fn one_pod() -> crate::testing::Attributions {
        crate::testing::Attributions::from_table([(
            4242,
            Attribution {
                cgroup_id: Some(7),
                cgroup_path: "/kubepods.slice/x".into(),
                owner: Owner::Pod(PodIdentity {
                    pod_uid: "0d6c2a4e-1111-2222-3333-444455556666".into(),
                    container_id: Some("3f2a1b9c0d12aaaabbbbcccc".into()),
                    runtime: Some(Runtime::Containerd),
                    qos: QosClass::Burstable,
                    is_conmon: false,
                }),
                backend: Backend::Procfs,
            },
        )])
    }

    fn snapshot() -> GpuSnapshot {
        let lost: Arc<str> = "nvmlDeviceGetTemperature: device fell off the bus".into();
        GpuSnapshot {
            taken_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1500),
            devices: vec![GpuDevice {
                index: 0,
                uuid: "GPU-1".into(),
                name: "NVIDIA H100".into(),
                sm_util: Reading::Ok(85),
                mem_util: Reading::Ok(40),
                memory_used_mib: Reading::Ok(30000),
                memory_total_mib: Reading::Ok(81559),
                temperature_c: Reading::Unavailable(lost),
                power_w: Reading::Ok(420.5),
                power_limit_w: Reading::Ok(700.0),
                mig_enabled: false,
                mig_instance: None,
                counters: crate::gpu::DeviceCounters::default(),
                processes: [4242, 99]
                    .into_iter()
                    .map(|pid| GpuProcess {
                        pid,
                        kind: ProcessKind::Compute,
                        used_memory_mib: Reading::Ok(100),
                        sm_util: Reading::Ok(60),
                        mem_util: Reading::Ok(25),
                        gpu_instance_id: None,
                    })
                    .collect(),
                processes_error: None,
            }],
        }
    }

    #[test]
    fn table_shows_figures_pods_and_why_a_figure_is_missing() {
        let table = render_table(&snapshot(), Some(&one_pod()));
        assert!(table.contains("GPU 0  NVIDIA H100  GPU-1"), "{table}");
        assert!(
            table.contains(
                "SM 85 %  MEM 40 %  memory 30000 / 81559 MiB  n/a C  420.5 / 700.0 W  MIG off"
            ),
            "{table}"
        );
        let row = table
            .lines()
            .find(|l| l.contains("4242"))
            .expect("row of 4242");
        assert!(
            row.contains("0d6c2a4e-1111-2222-3333-444455556666"),
            "{row}"
        );
        assert!(
            row.contains("3f2a1b9c0d12") && !row.contains("aaaa"),
            "{row}"
        );
        let unknown = table
            .lines()
            .find(|l| l.contains("   99 "))
            .expect("row of 99");
        assert!(unknown.contains(" ? "), "{unknown}");
        assert!(table.contains("n/a: nvmlDeviceGetTemperature: device fell off the bus"));

        let without = render_table(&snapshot(), None);
        let row = without.lines().find(|l| l.contains("4242")).expect("row");
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[cols.len() - 2..], ["-", "-"], "{row}");
    }

    #[test]
    fn json_carries_each_process_attribution() {
        let json = render_json(&snapshot(), Some(&one_pod()), None);
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["taken_at_unix_ms"], 1500);
        let procs = &v["devices"][0]["processes"];
        assert_eq!(
            procs[0]["attribution"]["owner"]["pod_uid"],
            "0d6c2a4e-1111-2222-3333-444455556666"
        );
        assert!(procs[1]["attribution"].is_null());
        assert_eq!(procs[0]["sm_util"]["ok"], 60);
        assert_eq!(
            v["devices"][0]["temperature_c"]["unavailable"],
            "nvmlDeviceGetTemperature: device fell off the bus"
        );

        let json = render_json(&snapshot(), None, Some("eBPF failed"));
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["attribution_error"], "eBPF failed");
    }
}
