//! The demo's pods: each a real process in a fresh kubelet-style cgroup, listed
//! in the PodList file the daemon reads. A vLLM replica's process is this xtask
//! binary serving a vLLM exposition on the pod's own IP (127.10.0.x, as a pod
//! network gives each pod an address), so the daemon reads its engine exactly
//! as it reads a real one: at `status.podIP`, on the `prometheus.io/port` port.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use super::model::ReplicaLoad;
use crate::host::write_atomic;

pub const NAMESPACE: &str = "demo";
pub const NODE: &str = "demo-node";
/// Where vLLM serves /metrics (its default port).
pub const ENGINE_PORT: u16 = 8000;
/// The mock node's GPUs: one per vLLM replica, the last for the embedder.
pub const GPUS: u32 = 8;
const EMBEDDER_GPU: u32 = GPUS - 1;
/// A pod's engine must listen within this long, or it failed to start.
const READY_WITHIN: Duration = Duration::from_secs(5);

/// One demo pod: a namespace/name with labels, one container, one process.
pub struct DemoPod {
    pub name: String,
    pub app: &'static str,
    pub uid: String,
    container_id: String,
    /// GPU index the process runs on.
    pub gpu: u32,
    /// The pod's cgroup directories under the demo base, pod level first
    /// (removed, deepest first, when it stops).
    cgroups: Vec<PathBuf>,
    /// status.podIP; engine pods listen on it.
    pub ip: Ipv4Addr,
    /// Whether it serves a vLLM exposition (and so has a figures file).
    engine: bool,
    pub pid: u32,
    child: Child,
}

/// The demo's pods and where they live.
pub struct Fleet {
    /// The demo's cgroup directory, or none (not root and not delegated).
    base: Option<PathBuf>,
    work: PathBuf,
    pods_file: PathBuf,
    pub pods: Vec<DemoPod>,
    /// Pods started so far: names, uids and IPs are never reused, as a
    /// ReplicaSet never reuses a pod's name.
    started: u32,
    /// Keeps uids and pod IPs apart from another demo's (`--instance`).
    instance: u8,
}

impl Fleet {
    pub fn new(base: Option<PathBuf>, work: &Path, instance: u8) -> Result<Self> {
        let figures = work.join("pods");
        fs::create_dir_all(&figures).with_context(|| format!("creating {}", figures.display()))?;
        Ok(Self {
            base,
            work: work.to_owned(),
            pods_file: work.join("pods.json"),
            pods: Vec::new(),
            started: 0,
            instance,
        })
    }

    pub fn pods_file(&self) -> &Path {
        &self.pods_file
    }

    /// vLLM replicas running.
    pub fn replicas(&self) -> u32 {
        self.pods.iter().filter(|p| p.engine).count() as u32
    }

    /// The embedder: a steady GPU user of another app on the same node, which
    /// the vLLM trigger must not count.
    pub fn start_embedder(&mut self) -> Result<()> {
        self.start("embedder", false, EMBEDDER_GPU)?;
        self.write_pod_list()
    }

    /// Starts or stops vLLM replicas until there are `n`, newest stopped first
    /// (as a ReplicaSet picks the youngest), and rewrites the PodList.
    pub fn scale_to(&mut self, n: u32) -> Result<()> {
        while self.replicas() < n {
            let Some(gpu) = (0..EMBEDDER_GPU).find(|g| !self.pods.iter().any(|p| p.gpu == *g))
            else {
                bail!("no free mock GPU for another replica (at most {EMBEDDER_GPU})");
            };
            self.start("vllm", true, gpu)?;
        }
        let mut stopping = Vec::new();
        while self.replicas() > n {
            let newest = self
                .pods
                .iter()
                .rposition(|p| p.engine)
                .context("no replica to stop")?;
            stopping.push(self.pods.remove(newest));
        }
        // Off the PodList first, then killed: the daemon stops counting a pod
        // as it is deleted, as an endpoint leaves a Service before SIGTERM.
        self.write_pod_list()?;
        for pod in stopping {
            self.stop(pod);
        }
        Ok(())
    }

    /// Writes what each replica's engine exposes (its process reads the file on
    /// every scrape).
    pub fn set_load(&self, load: &ReplicaLoad) -> Result<()> {
        for p in self.pods.iter().filter(|p| p.engine) {
            let line = format!("{} {} {:.4}\n", load.running, load.waiting, load.kv_cache);
            write_atomic(&self.figures_file(&p.name), line.as_bytes())?;
        }
        Ok(())
    }

    fn figures_file(&self, name: &str) -> PathBuf {
        self.work.join("pods").join(format!("{name}.load"))
    }

    fn start(&mut self, app: &'static str, engine: bool, gpu: u32) -> Result<()> {
        let i = self.started;
        self.started += 1;
        let n = self.instance;
        let uid = format!("de{n:02x}{i:04x}-1111-4222-8333-{:012x}", 0xabc000 + i);
        let container_id = format!("{n:02x}{:062x}", 0xc0ffee00u64 + u64::from(i));
        // Both kubelet cgroup drivers, as real nodes have them.
        let cgroups = if i.is_multiple_of(2) {
            let qos = "burstable";
            let pod = format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{}.slice",
                uid.replace('-', "_")
            );
            let container = format!("{pod}/cri-containerd-{container_id}.scope");
            vec![PathBuf::from(pod), PathBuf::from(container)]
        } else {
            let pod = format!("kubepods/besteffort/pod{uid}");
            let container = format!("{pod}/{container_id}");
            vec![PathBuf::from(pod), PathBuf::from(container)]
        };
        let ip = Ipv4Addr::new(127, 10 + n, (i / 250) as u8, (i % 250 + 1) as u8);
        let name = format!("{app}-{i}");
        let dir = self.base.as_ref().map(|b| b.join(&cgroups[1]));
        if let Some(dir) = &dir {
            fs::create_dir_all(dir)
                .with_context(|| format!("creating cgroup {}", dir.display()))?;
        }
        let figures = self.figures_file(&name);
        let child = if engine {
            write_atomic(&figures, b"0 0 0\n")?;
            let exe = std::env::current_exe().context("locating the xtask binary")?;
            let listen = SocketAddrV4::new(ip, ENGINE_PORT);
            spawn_in(
                dir.as_deref(),
                &name,
                &format!(
                    "'{}' demo-pod --listen {listen} --figures '{}'",
                    exe.display(),
                    figures.display()
                ),
            )?
        } else {
            spawn_in(dir.as_deref(), &name, "sleep infinity")?
        };
        let mut pod = DemoPod {
            name,
            app,
            uid,
            container_id,
            gpu,
            cgroups,
            ip,
            engine,
            pid: child.id(),
            child,
        };
        // Ready once its engine answers, as a readiness probe would say: before
        // that the daemon would read it as unavailable.
        if engine {
            let addr = SocketAddr::from((ip, ENGINE_PORT));
            let deadline = Instant::now() + READY_WITHIN;
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if Instant::now() > deadline || pod.child.try_wait().ok().flatten().is_some() {
                    let name = pod.name.clone();
                    self.stop(pod);
                    bail!("demo pod {name}: its engine did not listen on {addr}");
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        self.pods.push(pod);
        Ok(())
    }

    /// Kills the pod's process and removes its cgroups and figures file.
    fn stop(&self, mut pod: DemoPod) {
        let _ = pod.child.kill();
        let _ = pod.child.wait();
        let _ = fs::remove_file(self.figures_file(&pod.name));
        let Some(base) = &self.base else { return };
        for dir in pod.cgroups.iter().rev() {
            // A cgroup whose last process was just reaped can be busy for a
            // moment longer.
            let dir = base.join(dir);
            for _ in 0..50 {
                if fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn write_pod_list(&self) -> Result<()> {
        write_atomic(
            &self.pods_file,
            &serde_json::to_vec_pretty(&pod_list(&self.pods))?,
        )
    }
}

impl Drop for Fleet {
    /// Also when the demo fails half-way: no process or cgroup is left behind.
    fn drop(&mut self) {
        for pod in std::mem::take(&mut self.pods) {
            self.stop(pod);
        }
        let Some(base) = &self.base else { return };
        // The shared QoS levels (kubepods.slice/..., kubepods/besteffort), deepest first.
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut stack = vec![base.clone()];
        while let Some(d) = stack.pop() {
            if let Ok(entries) = fs::read_dir(&d) {
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
            }
            dirs.push(d);
        }
        dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in dirs {
            let _ = fs::remove_dir(&d);
        }
    }
}

/// Starts `command` moved into `cgroup` before it execs (the way a container
/// runtime starts a container), named after the pod so `gpu-scaler ps` reads well.
fn spawn_in(cgroup: Option<&Path>, name: &str, command: &str) -> Result<Child> {
    let join = cgroup.map_or(String::new(), |d| {
        format!("echo $$ > '{}/cgroup.procs' && ", d.display())
    });
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &format!("{join}exec -a demo-pod-{name} {command}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: prctl is async-signal-safe. A demo killed without unwinding
    // (SIGKILL) takes its pods with it instead of leaving them running.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("starting demo pod {name}"))
}

/// The pods as `kubectl get pods -A -o json` prints them.
fn pod_list(pods: &[DemoPod]) -> Value {
    let items: Vec<Value> = pods
        .iter()
        .map(|p| {
            let mut annotations = json!({});
            if p.engine {
                annotations = json!({
                    "prometheus.io/scrape": "true",
                    "prometheus.io/port": ENGINE_PORT.to_string(),
                    "prometheus.io/path": "/metrics",
                });
            }
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": p.name, "namespace": NAMESPACE, "uid": p.uid,
                    "labels": {"app": p.app}, "annotations": annotations,
                },
                "spec": {"nodeName": NODE, "containers": [{"name": p.app, "image": format!("demo/{}:latest", p.app)}]},
                "status": {
                    "phase": "Running",
                    "podIP": p.ip.to_string(),
                    "conditions": [{"type": "Ready", "status": "True"}],
                    "containerStatuses": [{"name": p.app, "ready": true, "containerID": format!("containerd://{}", p.container_id)}]
                }
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}})
}

/// `xtask demo-pod`: a vLLM replica's engine, serving `/metrics` on `listen`
/// with the figures the demo last wrote to `figures` (`running waiting kv`).
/// HTTP/1.1 keep-alive, as vLLM's uvicorn does: the daemon reuses its connection.
pub fn serve_engine(listen: SocketAddr, figures: &Path) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let figures = figures.to_owned();
        thread::spawn(move || answer(conn, &figures));
    }
    Ok(())
}

fn answer(mut s: TcpStream, figures: &Path) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if head.len() > 16 << 10 {
                return;
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        };
        let request: Vec<u8> = head.drain(..end).collect();
        let request = String::from_utf8_lossy(&request);
        let close = request
            .lines()
            .any(|l| l.eq_ignore_ascii_case("connection: close"));
        let path = request.split_whitespace().nth(1).unwrap_or("");
        let (status, body) = if path == "/metrics" {
            match fs::read_to_string(figures)
                .ok()
                .as_deref()
                .and_then(parse_figures)
            {
                Some((running, waiting, kv)) => ("200 OK", vllm_exposition(running, waiting, kv)),
                None => (
                    "503 Service Unavailable",
                    "engine figures unreadable\n".to_owned(),
                ),
            }
        } else {
            ("404 Not Found", "not found\n".to_owned())
        };
        let reply = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\n\
             content-length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if s.write_all(reply.as_bytes()).is_err() || close {
            return;
        }
    }
}

fn parse_figures(text: &str) -> Option<(f64, f64, f64)> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some((it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?))
}

/// The families vLLM (0.12 and later) exposes that the demo moves, in its
/// exact format: one engine, one model.
fn vllm_exposition(running: f64, waiting: f64, kv: f64) -> String {
    let model = "meta-llama/Llama-3.1-8B-Instruct";
    let mut s = String::new();
    for (name, help, v) in [
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            running,
        ),
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            waiting,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            kv,
        ),
    ] {
        s.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{engine=\"0\",model_name=\"{model}\"}} {v:?}\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_is_vllms_format() {
        let text = vllm_exposition(8.0, 5.0, 0.95);
        assert!(text.contains(
            "vllm:num_requests_waiting{engine=\"0\",model_name=\"meta-llama/Llama-3.1-8B-Instruct\"} 5.0\n"
        ));
        assert!(text.contains("# TYPE vllm:kv_cache_usage_perc gauge\n"));
        assert_eq!(parse_figures("8 5 0.9500\n"), Some((8.0, 5.0, 0.95)));
        assert_eq!(parse_figures("8 x"), None);
    }
}
