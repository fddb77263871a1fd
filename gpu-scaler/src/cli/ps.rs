//! `gpu-scaler ps`: every process with its cgroup and pod.

use std::{
    io::{self, Write as _},
    time::Duration,
};

use crate::attribution::{self, Attribution, Owner, ebpf::EbpfAttributor, procfs};

#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// One JSON object per process (per event with --watch).
    #[arg(long)]
    pub json: bool,
    /// Stream exec/exit events with their pod identity as they happen (eBPF).
    #[arg(long)]
    pub watch: bool,
    /// Which backend resolves the processes (`--watch` needs eBPF).
    #[arg(long, value_enum, default_value_t)]
    pub attribution: attribution::Mode,
}

/// One row of `ps`.
#[derive(Debug, serde::Serialize)]
struct Row {
    pid: u32,
    comm: String,
    #[serde(flatten)]
    attribution: Option<Attribution>,
}

pub async fn run(args: PsArgs) -> super::Result<()> {
    let result = if args.watch {
        watch(args).await
    } else {
        list(args).await
    };
    match result {
        // `gpu-scaler ps | head` is a normal way to stop reading.
        Err(super::Error::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

async fn list(args: PsArgs) -> super::Result<()> {
    let attributor = attribution::start(attribution::Config {
        mode: args.attribution,
        exit_grace: Duration::from_secs(30),
        ebpf_ring_buffer: attribution::RingBufferSize::DEFAULT,
    })
    .await?;
    let mut rows = Vec::new();
    for pid in procfs::pids()? {
        let Some(comm) = procfs::comm(pid) else {
            continue; // exited since the listing
        };
        rows.push(Row {
            pid,
            comm,
            attribution: attributor.resolve(pid),
        });
    }
    rows.sort_by_key(|r| r.pid);
    let mut out = io::stdout().lock();
    if args.json {
        for row in &rows {
            writeln!(out, "{}", json(row)?)?;
        }
    } else {
        writeln!(
            out,
            "{:>7}  {:<16} {:<7} {:<10} {:<36}  {:<12}  CGROUP",
            "PID", "COMM", "BACKEND", "RUNTIME", "POD UID", "CONTAINER"
        )?;
        for row in &rows {
            writeln!(
                out,
                "{}",
                table_line(row.pid, &row.comm, row.attribution.as_ref())
            )?;
        }
    }
    Ok(())
}

async fn watch(args: PsArgs) -> super::Result<()> {
    if args.attribution == attribution::Mode::Procfs {
        return Err(super::Error::Usage(
            "--watch streams events from the eBPF probe; it cannot use --attribution procfs".into(),
        ));
    }
    let engine = EbpfAttributor::start(Duration::from_secs(30)).await?;
    let mut events = engine.subscribe();
    let mut out = io::stdout();
    if !args.json {
        writeln!(
            out,
            "{:<5} {:>7}  {:<16} {:<7} {:<10} {:<36}  {:<12}  CGROUP",
            "EVENT", "PID", "COMM", "BACKEND", "RUNTIME", "POD UID", "CONTAINER"
        )?;
        out.flush()?;
    }
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tokio::signal::ctrl_c() => return Ok(()),
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "ps --watch fell behind; events skipped");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
        };
        let line = if args.json {
            json(&ev)?
        } else {
            let kind = match ev.event {
                attribution::ebpf::WatchKind::Exec => "exec",
                attribution::ebpf::WatchKind::Exit => "exit",
            };
            format!(
                "{kind:<5} {}",
                table_line(ev.pid, &ev.comm, ev.attribution.as_ref())
            )
        };
        writeln!(out, "{line}")?;
        // Line by line even into a pipe: watchers read it as it happens.
        out.flush()?;
    }
}

fn json(v: &impl serde::Serialize) -> super::Result<String> {
    serde_json::to_string(v).map_err(|e| super::Error::Io(io::Error::other(e)))
}

fn table_line(pid: u32, comm: &str, a: Option<&Attribution>) -> String {
    let Some(a) = a else {
        return format!(
            "{pid:>7}  {comm:<16} {:<7} (unknown: exited or no cgroup v2)",
            "-"
        );
    };
    let (runtime, uid, container) = match &a.owner {
        Owner::Host => ("host".to_string(), "-".to_string(), "-".to_string()),
        Owner::Pod(p) => (
            match (p.runtime, p.is_conmon) {
                (Some(r), true) => format!("{r}-conmon"),
                (Some(r), false) => r.to_string(),
                (None, _) => "-".into(),
            },
            p.pod_uid.clone(),
            p.container_id
                .as_deref()
                .map(|c| c.chars().take(12).collect())
                .unwrap_or_else(|| "-".into()),
        ),
    };
    format!(
        "{pid:>7}  {comm:<16} {:<7} {runtime:<10} {uid:<36}  {container:<12}  {}",
        a.backend.to_string(),
        a.cgroup_path
    )
}
