//! cgroup v2 directories for tests.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use gpu_scaler::attribution::cgroup_tree::Cgroup2Mount;

/// A tree of cgroup v2 directories under a prefix unique to this test run
/// (`/gpu-scaler-test-<pid>-<n>`). The prefix plays a nested host: the parser
/// accepts pod layouts below any host prefix. Dropping it kills every process
/// inside and removes the directories.
pub struct TestTree {
    mount: Cgroup2Mount,
    /// Hierarchy path of the prefix, e.g. `/gpu-scaler-test-123-0`.
    prefix: String,
}

/// A cgroup created by [`TestTree::create`].
#[derive(Clone, Debug)]
pub struct Cgroup {
    /// Directory in the mounted filesystem.
    pub dir: PathBuf,
    /// Path from the hierarchy root, as /proc/<pid>/cgroup prints it.
    pub path: String,
}

impl TestTree {
    /// Creates the prefix directory. Errors (no cgroup v2, not root) are
    /// returned as text for [`super::kernel::require`].
    pub fn new(tag: &str) -> Result<Self, String> {
        let mount = Cgroup2Mount::discover().map_err(|e| e.to_string())?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("gpu-scaler-test-{}-{tag}-{n}", std::process::id());
        let root = mount.root.trim_end_matches('/');
        let prefix = format!("{root}/{name}");
        let dir = mount.mount_point.join(&name);
        fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        Ok(Self { mount, prefix })
    }

    /// The cgroup v2 mount in use.
    pub fn mount(&self) -> &Cgroup2Mount {
        &self.mount
    }

    /// Creates `rel` (e.g. `kubepods/burstable/pod<uid>/<id>`) and its parents
    /// below the prefix.
    pub fn create(&self, rel: &str) -> Cgroup {
        let path = format!("{}/{}", self.prefix, rel.trim_matches('/'));
        let dir = self
            .mount
            .dir_of(&path)
            .unwrap_or_else(|| panic!("{path} is outside the cgroup mount"));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", dir.display()));
        Cgroup { dir, path }
    }

    fn prefix_dir(&self) -> PathBuf {
        self.mount
            .dir_of(&self.prefix)
            .expect("prefix is below the mount")
    }
}

impl Drop for TestTree {
    fn drop(&mut self) {
        remove_tree(&self.prefix_dir());
    }
}

/// Kills everything in `dir` and below, then removes the directories,
/// deepest first.
pub fn remove_tree(dir: &Path) {
    let mut dirs = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        dirs.push(d);
    }
    // cgroup.kill (5.14+) kills the whole subtree at once.
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    for d in dirs.iter().rev() {
        while fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
            let _ = fs::write(d.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A random-looking pod UID unique to this run, in the API's dashed form.
pub fn pod_uid(n: u32) -> String {
    let salt = std::process::id();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        salt,
        n & 0xffff,
        (t >> 8) & 0xfff,
        (t >> 20) & 0xfff,
        t & 0xffff_ffff_ffff
    )
}

/// A 64-hex-digit container id unique to this run.
pub fn container_id(n: u32) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:016x}{:016x}{:032x}", std::process::id(), n, t)
}
