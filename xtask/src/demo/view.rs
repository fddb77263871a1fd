//! What the demo shows each refresh: a redrawn screen, or one JSON object per
//! line (`--json`).

use std::{fmt::Write as _, io::Write as _};

use serde_json::{Value, json};

use super::{
    NAMESPACE, NODE, RunArgs, Signal, Tick, engine_figure,
    model::{self, BATCH_SLOTS},
    pod_containers, pod_figure,
    pods::Fleet,
};

/// Seconds of replica history the screen shows.
const HISTORY_S: usize = 60;

fn value_of(tick: &Tick, key: &str) -> Option<f64> {
    tick.query.as_ref().ok()?.get(key)?.as_f64()
}

/// One refresh as one JSON object: what the clients offered, what each pod was
/// set to and what the daemon measured, what KEDA got, and what the HPA did.
pub fn json_line(tick: &Tick, fleet: &Fleet, args: &RunArgs) -> Value {
    let snap = tick.snapshot.as_ref().ok();
    let pods: Vec<Value> = fleet
        .pods
        .iter()
        .map(|p| {
            json!({
                "name": p.name, "app": p.app, "uid": p.uid, "pid": p.pid,
                "ip": p.ip.to_string(), "gpu": p.gpu,
                "measured_sm": snap.and_then(|s| pod_figure(s, &p.uid, "sm_util")),
                "measured_memory_mib": snap.and_then(|s| pod_figure(s, &p.uid, "memory_used_mib")),
                "measured_queue": snap.and_then(|s| engine_figure(s, &p.uid, "vllm_queue_depth")),
            })
        })
        .collect();
    json!({
        "t": tick.t.round(),
        "signal": args.signal.name(),
        "trigger": args.signal.trigger(),
        "demand": tick.demand,
        "replicas": tick.replicas,
        "replica_load": tick.load,
        "value": value_of(tick, "value"),
        "target": value_of(tick, "target"),
        "recommended": tick.recommended,
        "scaled_to": tick.scaled_to,
        "min_replicas": args.min_replicas,
        "max_replicas": args.max_replicas,
        "scale_down_window_s": args.scale_down_window,
        "pods": pods,
        "snapshot": snap,
        "query": tick.query.as_ref().ok(),
        "query_error": tick.query.as_ref().err().map(|e| format!("{e:#}")),
    })
}

pub fn render(tick: &Tick, fleet: &Fleet, args: &RunArgs, history: &[u32]) {
    let snap = tick.snapshot.as_ref().ok();
    let mut out = String::from("\x1b[2J\x1b[H");
    let _ = writeln!(
        out,
        "gpu-scaler demo  t={:>4.0}s  signal={}  namespace={NAMESPACE}  node={NODE}\n",
        tick.t,
        args.signal.name()
    );
    let per = if tick.replicas > 0 {
        tick.demand / f64::from(tick.replicas)
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "Demand: {:.0} requests in flight, {per:.1} per replica ({BATCH_SLOTS:.0} batch slots \
         each: {} running, {} waiting, SM {}%)\n",
        tick.demand, tick.load.running, tick.load.waiting, tick.load.sm
    );
    let _ = writeln!(
        out,
        "{:<12} {:<9} {:<14} {:>8} {:>4} {:>9} {:>10} {:>7} {:>8}  CONTAINER",
        "POD", "APP", "POD IP", "PID", "GPU", "SM% SET", "SM% MEAS", "MEM GiB", "WAITING",
    );
    for p in &fleet.pods {
        let fig = |f: &str| snap.and_then(|s| pod_figure(s, &p.uid, f));
        let set = if p.app == "vllm" { tick.load.sm } else { 25 };
        let queue = snap
            .and_then(|s| engine_figure(s, &p.uid, "vllm_queue_depth"))
            .map_or("-".into(), |v| format!("{v:.0}"));
        let _ = writeln!(
            out,
            "{:<12} {:<9} {:<14} {:>8} {:>4} {:>9} {:>10} {:>7} {:>8}  {}",
            p.name,
            p.app,
            p.ip,
            p.pid,
            p.gpu,
            set,
            fig("sm_util").map_or("-".into(), |v| format!("{v:.0}")),
            fig("memory_used_mib").map_or("-".into(), |v| format!("{:.1}", v / 1024.0)),
            queue,
            snap.and_then(|s| pod_containers(s, &p.uid))
                .unwrap_or_else(|| "-".into()),
        );
    }
    let _ = writeln!(
        out,
        "\nScaledObject trigger: {}  (AverageValue, min {}, max {})",
        args.signal.trigger().join(" "),
        args.min_replicas,
        args.max_replicas
    );
    match &tick.query {
        Ok(q) => {
            let value = value_of(tick, "value").unwrap_or(f64::NAN);
            let target = value_of(tick, "target").unwrap_or(f64::NAN);
            let ratio = value / (target * f64::from(tick.replicas.max(1)));
            let _ = writeln!(
                out,
                "KEDA GetMetrics value: {value:.1}   IsActive: {}   usage ratio {ratio:.2} \
                 (tolerance 0.10)   HPA recommends: {}",
                q.get("active").map_or("?".into(), Value::to_string),
                tick.recommended
                    .map_or("?".into(), |r| if (ratio - 1.0).abs() <= 0.1 {
                        format!("{r} (within tolerance: stays)")
                    } else {
                        format!("{r} (ceil({value:.1} / {target}), within min/max)")
                    }),
            );
        }
        Err(e) => {
            let _ = writeln!(out, "KEDA query: {e:#}   (the HPA keeps the replicas)");
        }
    }
    let action = match tick.scaled_to.cmp(&tick.replicas) {
        std::cmp::Ordering::Greater => "scaling up: starting pods".to_owned(),
        std::cmp::Ordering::Less => "scaling down: stopping the newest pods".to_owned(),
        std::cmp::Ordering::Equal if tick.recommended.is_some_and(|r| r < tick.replicas) => {
            format!(
                "holding: scale-down waits until the last {} s recommend fewer",
                args.scale_down_window
            )
        }
        std::cmp::Ordering::Equal => "steady".to_owned(),
    };
    let _ = writeln!(
        out,
        "Replicas: {} -> {}   {action}",
        tick.replicas, tick.scaled_to
    );
    let recent = &history[history.len().saturating_sub(HISTORY_S)..];
    let _ = writeln!(
        out,
        "History (1 s each, last {HISTORY_S} s): {}",
        model::sparkline(recent.iter().copied(), args.max_replicas)
    );
    let _ = writeln!(
        out,
        "\nThe demo evaluates every 1 s with a {} s scale-down window; the real HPA \
         evaluates every 15 s and its default window is 300 s.",
        args.scale_down_window
    );
    if args.signal == Signal::Gpu {
        let _ = writeln!(
            out,
            "`--signal engine` scales on the engines' queue instead."
        );
    }
    let _ = writeln!(out, "Ctrl-C to stop.");
    print!("{out}");
    let _ = std::io::stdout().flush();
}
