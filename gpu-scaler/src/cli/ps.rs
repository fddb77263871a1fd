//! `gpu-scaler ps`: every process with its cgroup and pod.

use std::{
    collections::HashMap,
    io::{self, Write as _},
    path::PathBuf,
    time::Duration,
};

use crate::{
    attribution::{self, Attribution, Owner, ebpf::EbpfAttributor, procfs},
    join::container_role,
    pods::{self, Pod},
    snapshot::ContainerRole,
};

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
    /// A PodList JSON file (`kubectl get pods -A -o json`), read once: names
    /// each pod process's pod and container, and tells the pod's sandbox
    /// (pause) container from its containers by their statuses.
    #[arg(long)]
    pub pods_file: Option<PathBuf>,
}

/// One row of `ps`.
#[derive(Debug, serde::Serialize)]
struct Row {
    pid: u32,
    comm: String,
    #[serde(flatten)]
    attribution: Option<Attribution>,
    /// With `--pods-file`, for a process of a pod the file lists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<PodColumn>,
}

/// A process's pod as the pods file names it.
#[derive(Debug, serde::Serialize)]
struct PodColumn {
    namespace: String,
    name: String,
    container: ContainerRole,
    /// Whether the process is in the pod's sandbox (pause) container; `null`
    /// when the pod's statuses do not say (pending pod).
    is_sandbox: Option<bool>,
}

/// The pods of `--pods-file`, by UID.
struct Pods(HashMap<String, Pod>);

impl Pods {
    fn load(path: Option<&std::path::Path>) -> super::Result<Option<Self>> {
        let Some(path) = path else { return Ok(None) };
        let pods = pods::file::load(path).map_err(|e| super::Error::Usage(e.to_string()))?;
        Ok(Some(Self(
            pods.into_iter().map(|p| (p.uid.clone(), p)).collect(),
        )))
    }

    fn column(&self, a: Option<&Attribution>) -> Option<PodColumn> {
        let Owner::Pod(id) = &a?.owner else {
            return None;
        };
        let pod = self.0.get(&id.pod_uid)?;
        let container = container_role(pod, id);
        Some(PodColumn {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            is_sandbox: container.is_sandbox(),
            container,
        })
    }

    /// The table's POD/CONTAINER cell.
    fn cell(&self, a: Option<&Attribution>) -> String {
        let in_pod = a.is_some_and(|a| matches!(a.owner, Owner::Pod(_)));
        match self.column(a) {
            Some(c) => {
                let container = match &c.container {
                    ContainerRole::Container { name, .. } => name.as_str(),
                    ContainerRole::Sandbox => "(sandbox)",
                    ContainerRole::PodCgroup => "(no container)",
                    ContainerRole::Unknown => "(unknown container)",
                };
                format!("{}/{}/{container}", c.namespace, c.name)
            }
            None if in_pod => "(not in pods file)".into(),
            None => "-".into(),
        }
    }
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
    let pods = Pods::load(args.pods_file.as_deref())?;
    let mut rows = Vec::new();
    for pid in procfs::pids()? {
        let Some(comm) = procfs::comm(pid) else {
            continue; // exited since the listing
        };
        let attribution = attributor.resolve(pid);
        rows.push(Row {
            pid,
            comm,
            pod: pods.as_ref().and_then(|p| p.column(attribution.as_ref())),
            attribution,
        });
    }
    rows.sort_by_key(|r| r.pid);
    let mut out = io::stdout().lock();
    if args.json {
        for row in &rows {
            writeln!(out, "{}", json(row)?)?;
        }
    } else {
        writeln!(out, "{:>7}  {}", "PID", header(pods.as_ref()))?;
        for row in &rows {
            writeln!(
                out,
                "{}",
                table_line(row.pid, &row.comm, row.attribution.as_ref(), pods.as_ref())
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
    let pods = Pods::load(args.pods_file.as_deref())?;
    let engine = EbpfAttributor::start(Duration::from_secs(30)).await?;
    let mut events = engine.subscribe();
    let mut out = io::stdout();
    if !args.json {
        writeln!(
            out,
            "{:<5} {:>7}  {}",
            "EVENT",
            "PID",
            header(pods.as_ref())
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
            #[derive(serde::Serialize)]
            struct WithPod<'a> {
                #[serde(flatten)]
                event: &'a attribution::ebpf::WatchEvent,
                #[serde(skip_serializing_if = "Option::is_none")]
                pod: Option<PodColumn>,
            }
            json(&WithPod {
                pod: pods
                    .as_ref()
                    .and_then(|p| p.column(ev.attribution.as_ref())),
                event: &ev,
            })?
        } else {
            let kind = match ev.event {
                attribution::ebpf::WatchKind::Exec => "exec",
                attribution::ebpf::WatchKind::Exit => "exit",
            };
            format!(
                "{kind:<5} {}",
                table_line(ev.pid, &ev.comm, ev.attribution.as_ref(), pods.as_ref())
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

/// The table's header after PID.
fn header(pods: Option<&Pods>) -> String {
    format!(
        "{:<16} {:<7} {:<10} {:<36}  {:<12}  {}CGROUP",
        "COMM",
        "BACKEND",
        "RUNTIME",
        "POD UID",
        "CONTAINER",
        if pods.is_some() {
            format!("{:<32}  ", "POD/CONTAINER")
        } else {
            String::new()
        }
    )
}

fn table_line(pid: u32, comm: &str, a: Option<&Attribution>, pods: Option<&Pods>) -> String {
    let named = pods.map_or(String::new(), |p| format!("{:<32}  ", p.cell(a)));
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
        "{pid:>7}  {comm:<16} {:<7} {runtime:<10} {uid:<36}  {container:<12}  {named}{}",
        a.backend.to_string(),
        a.cgroup_path
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        attribution::{Backend, PodIdentity, QosClass, Runtime},
        pods::{Container, ContainerKind},
    };

    fn in_pod(uid: &str, cid: &str) -> Attribution {
        Attribution {
            cgroup_id: None,
            cgroup_path: "/kubepods/x".into(),
            owner: Owner::Pod(PodIdentity {
                pod_uid: uid.into(),
                container_id: Some(cid.into()),
                runtime: Some(Runtime::Containerd),
                qos: QosClass::Burstable,
                is_conmon: false,
            }),
            backend: Backend::Procfs,
        }
    }

    fn pods() -> Pods {
        let pod = |uid: &str, containers: Vec<Container>| Pod {
            uid: uid.into(),
            namespace: "ml".into(),
            name: format!("pod-{uid}"),
            labels: Default::default(),
            node_name: None,
            phase: None,
            ready: true,
            containers,
            ..Default::default()
        };
        Pods(HashMap::from([
            (
                "u1".to_string(),
                pod(
                    "u1",
                    vec![Container {
                        name: "server".into(),
                        id: Some("c1".into()),
                        previous_id: None,
                        kind: ContainerKind::App,
                    }],
                ),
            ),
            ("u2".to_string(), pod("u2", Vec::new())),
        ]))
    }

    #[test]
    fn names_containers_and_the_sandbox() {
        let p = pods();
        let cell = |a: Option<Attribution>| p.cell(a.as_ref());
        assert_eq!(cell(Some(in_pod("u1", "c1"))), "ml/pod-u1/server");
        assert_eq!(cell(Some(in_pod("u1", "pause"))), "ml/pod-u1/(sandbox)");
        assert_eq!(
            cell(Some(in_pod("u2", "c9"))),
            "ml/pod-u2/(unknown container)"
        );
        assert_eq!(cell(Some(in_pod("gone", "c1"))), "(not in pods file)");
        assert_eq!(cell(None), "-");

        let row = Row {
            pid: 7,
            comm: "pause".into(),
            pod: p.column(Some(&in_pod("u1", "pause"))),
            attribution: Some(in_pod("u1", "pause")),
        };
        let v = serde_json::to_value(&row).expect("serializes");
        assert_eq!(v["pod"]["name"], "pod-u1");
        assert_eq!(v["pod"]["container"]["role"], "sandbox");
        assert_eq!(v["pod"]["is_sandbox"], true);
        assert_eq!(v["owner"]["container_id"], "pause");
        let unknown = p.column(Some(&in_pod("u2", "c9"))).expect("listed pod");
        let v = serde_json::to_value(&unknown).expect("serializes");
        assert_eq!(v["is_sandbox"], serde_json::Value::Null);
        let line = table_line(7, "srv", Some(&in_pod("u1", "c1")), Some(&p));
        assert!(line.contains("ml/pod-u1/server"), "{line}");
        assert!(header(Some(&p)).contains("POD/CONTAINER"));
        assert!(!header(None).contains("POD/CONTAINER"));
    }

    #[test]
    fn a_bad_pods_file_is_a_usage_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pods.json");
        std::fs::write(
            &path,
            r#"{"kind": "List", "items": [{"metadata": {"name": "a", "namespace": "b", "uid": "u"},
            "status": {"containerStatuses": [{"name": "c", "containerID": "nope"}]}}]}"#,
        )
        .expect("write");
        let err = Pods::load(Some(&path))
            .err()
            .expect("malformed containerID");
        assert!(err.to_string().contains("no runtime scheme"), "{err}");
        assert!(Pods::load(None).expect("no file").is_none());
    }
}
