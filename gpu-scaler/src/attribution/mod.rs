//! Which pod and container every process on the node belongs to.
//!
//! Two backends answer the same question: `ebpf` (tracepoints keep a pid -> cgroup
//! map current as processes exec, fork and exit) and `procfs` (reads
//! `/proc/<pid>/cgroup` on demand; the fallback when BPF cannot load, and the oracle
//! the eBPF backend is tested against). Both map a cgroup path to an [`Owner`]
//! with [`cgroup_path::parse`].

pub mod cgroup_path;
pub mod cgroup_tree;
pub mod ebpf;
pub mod procfs;
pub mod tracefs;
pub mod tracker;

pub use ebpf::{EbpfStats, EventCounts, RingBufferSize};
pub use tracker::Stats;

use std::{fmt, sync::Arc};

use serde::Serialize;

/// Container runtime named by the cgroup scope or directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    Podman,
    /// A cgroupfs-driver container directory, which does not name its runtime.
    Unknown,
}

/// Kubernetes QoS class, from the kubepods hierarchy level.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// The pod side of a cgroup path.
///
/// The path cannot tell whether its container is the pod's sandbox (pause)
/// container: both are `<runtime>-<id>` scopes side by side. Only the pod's
/// container statuses can, so that is decided where pods and identities meet,
/// the join (`join::container_role`, carried as
/// `snapshot::ContainerRole` on each `snapshot::ContainerUsage`),
/// never here.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PodIdentity {
    /// Pod UID in its canonical dashed form (`_` from the systemd driver replaced).
    pub pod_uid: String,
    /// Container id (64 hex chars for the usual runtimes); `None` for a process
    /// directly in the pod-level cgroup.
    pub container_id: Option<String>,
    pub runtime: Option<Runtime>,
    pub qos: QosClass,
    /// Whether this is the CRI-O `crio-conmon-` monitor, which belongs to the pod
    /// but is not one of its containers' workloads.
    pub is_conmon: bool,
}

/// Who owns a cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Owner {
    /// Not a pod: system services, the kubelet, a login shell.
    Host,
    Pod(PodIdentity),
}

/// Which backend resolved a pid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Ebpf,
    Procfs,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ebpf => "ebpf",
            Self::Procfs => "procfs",
        })
    }
}

/// What a pid resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attribution {
    /// cgroup v2 id (the inode of the cgroup directory), when known.
    pub cgroup_id: Option<u64>,
    /// Path relative to the cgroup v2 mount, starting with `/`.
    pub cgroup_path: Arc<str>,
    pub owner: Owner,
    pub backend: Backend,
}

/// Resolves pids to their owners. Implementations must answer from memory: the
/// sampler calls this for every GPU process on every poll.
pub trait Attributor: Send + Sync + 'static {
    /// The owner of `pid`, or `None` if the pid is unknown (never seen, or exited
    /// longer ago than the grace period).
    fn resolve(&self, pid: u32) -> Option<Attribution>;

    /// Whether `pid`, which [`Attributor::resolve`] does not know, is a live
    /// process: its GPU use may then be any pod's. A pid that is gone is no
    /// one's: NVML goes on listing a process for a while after it exits, and
    /// after the exit grace period those samples count for no pod. Called only
    /// for the few GPU processes no one could attribute.
    fn unresolved_alive(&self, pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    }

    fn backend(&self) -> Backend;

    /// Table sizes and loss counters, for diagnostics and benchmarks.
    fn stats(&self) -> Option<Stats> {
        None
    }
}

/// Which attribution backend `serve` uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// eBPF when it loads, otherwise procfs with a warning.
    #[default]
    Auto,
    /// eBPF only; fail if it cannot load.
    Ebpf,
    /// Read /proc/<pid>/cgroup on demand.
    Procfs,
}

/// Attribution settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub mode: Mode,
    /// How long an exited pid stays resolvable, so GPU samples that arrive after
    /// the process exited still count for its pod.
    pub exit_grace: std::time::Duration,
    /// Size of the eBPF backend's event ring buffer. Too small and bursts of
    /// process churn overflow it (the engine then resynchronises from /proc).
    pub ebpf_ring_buffer: RingBufferSize,
}

/// Errors of the attribution domain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No probe to load (a `GPU_SCALER_NO_EBPF=1` build).
    #[error("eBPF attribution is not available: {0}")]
    EbpfUnavailable(String),
    /// The probe object lacks a program or map the loader expects, or has one of
    /// another type: a probe and daemon from different builds.
    #[error("eBPF attribution is not available: probe object: {0}")]
    ProbeObject(String),
    /// The kernel (or aya) refused the probe object.
    #[error("eBPF attribution is not available: loading the probe: {source}")]
    Load {
        #[source]
        source: aya::EbpfError,
    },
    /// A program of the probe could not be loaded or attached to its tracepoint.
    #[error("eBPF attribution is not available: {action} {program}: {source}")]
    Program {
        /// `"loading"` or `"attaching"`.
        action: &'static str,
        /// The program's name in the object (that of its tracepoint too).
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map of the probe could not be opened as its type or queried.
    #[error("eBPF attribution is not available: map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    /// A blocking start-up step panicked or was cancelled.
    #[error("eBPF attribution is not available: {what}: {source}")]
    Task {
        what: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("tracefs: {0}")]
    Tracefs(String),
    #[error("eBPF ring buffer size: {0}")]
    RingBufferSize(String),
    #[error("no cgroup v2 filesystem in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Starts the attribution engine chosen by `config.mode`. Must be called inside a
/// tokio runtime (the eBPF backend follows its ring buffer on a task).
///
/// `Auto` tries eBPF and falls back to procfs with a warning; `Ebpf` fails if the
/// probe cannot load; `Procfs` never touches BPF.
pub async fn start(config: Config) -> Result<Arc<dyn Attributor>> {
    match config.mode {
        Mode::Procfs => Ok(start_procfs(&config)),
        Mode::Ebpf => Ok(ebpf::EbpfAttributor::start_with(
            config.exit_grace,
            config.ebpf_ring_buffer,
        )
        .await?),
        Mode::Auto => {
            if !ebpf::probe_embedded() {
                tracing::warn!(
                    "this binary was built with GPU_SCALER_NO_EBPF=1: no eBPF probe, \
                     attributing processes through /proc"
                );
                return Ok(start_procfs(&config));
            }
            match ebpf::EbpfAttributor::start_with(config.exit_grace, config.ebpf_ring_buffer).await
            {
                Ok(a) => Ok(a),
                Err(error) => {
                    tracing::warn!(%error, "eBPF attribution unavailable, falling back to /proc");
                    Ok(start_procfs(&config))
                }
            }
        }
    }
}

fn start_procfs(config: &Config) -> Arc<dyn Attributor> {
    tracing::info!(grace = ?config.exit_grace, "procfs attribution");
    Arc::new(procfs::ProcfsAttributor::new(config.exit_grace))
}
