//! Pods on the real kernel: a pod cgroup in a kubelet layout below a
//! [`TestTree`], with real processes started in its container cgroup the way a
//! container runtime starts them (moved in before exec).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use super::{
    cgroup::{self, TestTree},
    process,
};

/// A kubelet cgroup layout: the container's cgroup path for (pod uid, container
/// id), relative to the test tree (which plays a nested host's prefix).
pub type Layout = fn(&str, &str) -> String;

/// systemd cgroup driver, Burstable QoS, containerd.
pub fn systemd_containerd(uid: &str, cid: &str) -> String {
    let u = uid.replace('-', "_");
    format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{cid}.scope"
    )
}

/// cgroupfs driver, Guaranteed QoS (no QoS level), any runtime.
pub fn cgroupfs_guaranteed(uid: &str, cid: &str) -> String {
    format!("kubepods/pod{uid}/{cid}")
}

/// systemd cgroup driver, BestEffort QoS, CRI-O.
pub fn systemd_crio(uid: &str, cid: &str) -> String {
    let u = uid.replace('-', "_");
    format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{cid}.scope"
    )
}

/// A pod's cgroups and its running processes (`sleep`s standing for GPU
/// processes). Dropping it kills and reaps the processes; [`RealPod::remove`]
/// also removes its cgroups, as when the pod is deleted.
pub struct RealPod {
    /// A fresh pod UID (dashed form), unique to this run.
    pub uid: String,
    /// Its container's runtime id, as the cgroup names it: the id
    /// `kube_api::pod` reports in the pod's status for this uid
    /// ([`super::kube_api::container_id_of`]), so pods served by the fake API
    /// server and PodList files ([`RealPod::container_status`]) both name it.
    pub container_id: String,
    /// The container's cgroup directory.
    pub container_dir: PathBuf,
    pub processes: Vec<Child>,
}

impl RealPod {
    /// Creates pod `n`'s cgroups in `layout` and starts `processes` processes
    /// in its container.
    pub fn start(tree: &TestTree, n: u32, layout: Layout, processes: usize) -> Self {
        let uid = cgroup::pod_uid(n);
        let container_id = super::kube_api::container_id_of(&uid);
        let cg = tree.create(&layout(&uid, &container_id));
        let processes = (0..processes)
            .map(|_| {
                process::spawn_in(
                    &cg.dir,
                    Command::new("sleep").arg("300").stdin(Stdio::null()),
                )
                .expect("start a pod process in its cgroup")
            })
            .collect();
        Self {
            uid,
            container_id,
            container_dir: cg.dir,
            processes,
        }
    }

    /// The status of its container, named `name`, as the kubelet reports it
    /// (`containerID` with the scheme of the runtime its cgroup names:
    /// `cri-o://`, `docker://`, else `containerd://`).
    pub fn container_status(&self, name: &str) -> serde_json::Value {
        let dir = self
            .container_dir
            .file_name()
            .and_then(|d| d.to_str())
            .unwrap_or_default();
        let runtime = if dir.starts_with("crio-") {
            "cri-o"
        } else if dir.starts_with("docker-") {
            "docker"
        } else {
            "containerd"
        };
        serde_json::json!({"name": name, "ready": true, "restartCount": 0, "image": "x", "imageID": "",
                           "containerID": format!("{runtime}://{}", self.container_id)})
    }

    /// The pid of process `i`.
    pub fn pid(&self, i: usize) -> u32 {
        self.processes[i].id()
    }

    /// Deletes the pod: its processes are killed and its cgroups (the
    /// container's and the pod's) removed.
    pub fn remove(mut self) {
        self.kill();
        if let Some(pod_dir) = self.container_dir.parent() {
            cgroup::remove_tree(pod_dir);
        }
    }

    fn kill(&mut self) {
        for p in &mut self.processes {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

impl Drop for RealPod {
    fn drop(&mut self) {
        self.kill();
    }
}
