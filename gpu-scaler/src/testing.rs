//! The one set of test doubles and builders, for this crate's unit tests and
//! the integration tests and benchmarks in `tests/` (the `test-util` feature):
//! an attributor fed by the test, builders for GPU processes, devices and
//! pods, the path of the fake `libnvidia-ml.so`, and a plain HTTP GET.
//! Nothing here is compiled into the daemon.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::RwLock,
    time::Duration,
};

use crate::{
    attribution::{Attribution, Attributor, Backend, Owner, PodIdentity, QosClass},
    gpu::{DeviceCounters, GpuDevice, GpuProcess, ProcessKind},
    pods::Pod,
    snapshot::Reading,
};

/// An attributor whose pid -> owner table the test writes. A pid not in the
/// table has exited, unless the test said it is alive ([`Self::alive_unknown`],
/// [`Self::unknowns_alive`]).
#[derive(Debug, Default)]
pub struct Attributions {
    table: RwLock<HashMap<u32, Attribution>>,
    alive: RwLock<HashSet<u32>>,
    all_alive: bool,
}

impl Attributions {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fixed table.
    pub fn from_table(table: impl IntoIterator<Item = (u32, Attribution)>) -> Self {
        Self {
            table: RwLock::new(table.into_iter().collect()),
            ..Self::default()
        }
    }

    /// The same table, every pid not in it a live process no one can
    /// attribute.
    pub fn unknowns_alive(mut self) -> Self {
        self.all_alive = true;
        self
    }

    /// Sets `pid`'s attribution.
    pub fn insert(&self, pid: u32, attribution: Attribution) {
        self.table
            .write()
            .expect("attributor lock")
            .insert(pid, attribution);
    }

    /// Makes `pid` a process of the pod `pod_uid` (Burstable, systemd driver).
    pub fn assign(&self, pid: u32, pod_uid: &str) {
        self.insert(pid, pod_process(pod_uid));
    }

    /// Makes `pid` a host process (no pod).
    pub fn assign_host(&self, pid: u32) {
        self.insert(
            pid,
            Attribution {
                cgroup_id: None,
                cgroup_path: "/system.slice/x.service".into(),
                owner: Owner::Host,
                backend: Backend::Procfs,
            },
        );
    }

    /// Makes `pid` a live process no one can attribute (not in the table).
    pub fn alive_unknown(&self, pid: u32) {
        self.alive.write().expect("attributor lock").insert(pid);
    }
}

impl Attributor for Attributions {
    fn resolve(&self, pid: u32) -> Option<Attribution> {
        self.table
            .read()
            .expect("attributor lock")
            .get(&pid)
            .cloned()
    }

    fn unresolved_alive(&self, pid: u32) -> bool {
        self.all_alive || self.alive.read().expect("attributor lock").contains(&pid)
    }

    fn backend(&self) -> Backend {
        Backend::Procfs
    }
}

/// The attribution of a process of pod `pod_uid` (in no container the path
/// names: Burstable, systemd driver).
pub fn pod_process(pod_uid: &str) -> Attribution {
    Attribution {
        cgroup_id: None,
        cgroup_path: format!(
            "/kubepods.slice/kubepods-pod{}.slice",
            pod_uid.replace('-', "_")
        )
        .into(),
        owner: Owner::Pod(PodIdentity {
            pod_uid: pod_uid.to_owned(),
            container_id: None,
            runtime: None,
            qos: QosClass::Burstable,
            is_conmon: false,
        }),
        backend: Backend::Procfs,
    }
}

/// A compute process with SM %, memory-controller % and memory used.
pub fn process(pid: u32, sm: u32, mem: u32, used_mib: u64) -> GpuProcess {
    GpuProcess {
        pid,
        kind: ProcessKind::Compute,
        used_memory_mib: Reading::Ok(used_mib),
        sm_util: Reading::Ok(sm),
        mem_util: Reading::Ok(mem),
        gpu_instance_id: None,
    }
}

/// A GPU with 80 GiB, at `temp_c` and `power_w`, running `processes`: its SM
/// and memory use are their sums.
pub fn device(index: u32, temp_c: u32, power_w: f64, processes: Vec<GpuProcess>) -> GpuDevice {
    GpuDevice {
        index,
        uuid: format!("GPU-{index:08}"),
        name: "Test GPU".into(),
        sm_util: Reading::Ok(
            processes
                .iter()
                .filter_map(|p| p.sm_util.ok())
                .sum::<u32>()
                .min(100),
        ),
        mem_util: Reading::Ok(0),
        memory_used_mib: Reading::Ok(
            processes
                .iter()
                .filter_map(|p| p.used_memory_mib.ok())
                .sum(),
        ),
        memory_total_mib: Reading::Ok(81_920),
        temperature_c: Reading::Ok(temp_c),
        power_w: Reading::Ok(power_w),
        power_limit_w: Reading::Ok(700.0),
        mig_enabled: false,
        mig_instance: None,
        counters: DeviceCounters::default(),
        processes,
        processes_error: None,
    }
}

/// A running, ready pod in `namespace` with `labels`, on no particular node.
pub fn pod(namespace: &str, name: &str, uid: &str, labels: &[(&str, &str)]) -> Pod {
    Pod {
        uid: uid.to_owned(),
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        node_name: None,
        phase: Some("Running".into()),
        ready: true,
        ip: None,
        annotations: Default::default(),
        containers: Vec::new(),
    }
}

/// The `libfake_nvml.so` cargo built beside the running test or benchmark
/// (their package depends on `fake-nvml`, so cargo builds the cdylib into the
/// executable's `deps` directory and uplifts it one level up).
pub fn fake_nvml_library() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running executable");
    let deps = exe.parent().expect("the executable has a directory");
    [deps.to_path_buf(), deps.join("..")]
        .iter()
        .map(|dir| dir.join("libfake_nvml.so"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "libfake_nvml.so not found beside {}; `cargo build -p fake-nvml` builds it",
                exe.display()
            )
        })
}

/// GET `path` from `addr` with a plain HTTP/1.1 request (one connection,
/// closed after): (status code, body). An error when nothing answers within a
/// second or two, or the answer is not HTTP.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no HTTP status line"))?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .ok_or_else(|| bad("no end of the HTTP head"))?;
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_answers_and_unknown_pids_are_gone_unless_alive() {
        let a = Attributions::new();
        a.assign(1, "u-1");
        a.assign_host(2);
        a.alive_unknown(3);
        assert!(matches!(
            a.resolve(1).map(|x| x.owner),
            Some(Owner::Pod(PodIdentity { pod_uid, .. })) if pod_uid == "u-1"
        ));
        assert_eq!(a.resolve(2).map(|x| x.owner), Some(Owner::Host));
        assert!(a.resolve(3).is_none() && a.unresolved_alive(3));
        assert!(!a.unresolved_alive(4));
        assert!(Attributions::new().unknowns_alive().unresolved_alive(4));
    }

    #[test]
    fn a_device_sums_its_processes() {
        let d = device(
            3,
            50,
            100.0,
            vec![process(1, 70, 0, 10), process(2, 50, 0, 5)],
        );
        assert_eq!(d.sm_util, Reading::Ok(100), "capped at 100 %");
        assert_eq!(d.memory_used_mib, Reading::Ok(15));
        assert_eq!(d.uuid, "GPU-00000003");
    }
}
