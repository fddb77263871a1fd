//! The cgroup v2 hierarchy: where it is mounted, and cgroup id -> path -> owner.
//!
//! A cgroup v2 id (what `bpf_get_current_cgroup_id()` returns and the
//! `cgroup_mkdir` tracepoint reports) is the inode number of the cgroup's
//! directory, so walking the mount once gives every existing id; mkdir/rmdir
//! events keep the map current afterwards.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
};

use super::{Error, Owner, Result, cgroup_path};

/// The cgroup v2 filesystem as this process sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    /// Where it is mounted: `/sys/fs/cgroup` on a pure v2 host,
    /// `/sys/fs/cgroup/unified` on a hybrid one.
    pub mount_point: PathBuf,
    /// The hierarchy path of the mount's root (mountinfo's 4th field): `/` unless
    /// a subtree was bind-mounted. Paths are reported from the hierarchy root, as
    /// the kernel's tracepoints and /proc/<pid>/cgroup print them.
    pub root: String,
}

impl Cgroup2Mount {
    /// Finds the cgroup v2 mount in /proc/self/mountinfo.
    pub fn discover() -> Result<Self> {
        let path = "/proc/self/mountinfo";
        let text = fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.into(),
            source,
        })?;
        Self::from_mountinfo(&text)
    }

    /// The first `cgroup2` mount in the text of a mountinfo file.
    pub fn from_mountinfo(text: &str) -> Result<Self> {
        for line in text.lines() {
            // id parent major:minor root mount_point options [optional...] - fstype source super
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            if right.split_whitespace().next() != Some("cgroup2") {
                continue;
            }
            let fields: Vec<&str> = left.split_whitespace().collect();
            let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
                continue;
            };
            let root = unescape(root);
            // A root outside this mount namespace's view shows as `/..`-prefixed;
            // the ids are still right, only the prefix is unknowable.
            let root = if root.starts_with("/..") {
                "/".into()
            } else {
                root
            };
            return Ok(Self {
                mount_point: PathBuf::from(unescape(mount_point)),
                root,
            });
        }
        Err(Error::NoCgroup2)
    }

    /// The hierarchy path of a directory below the mount point.
    fn hierarchy_path(&self, dir: &Path) -> Option<String> {
        let rel = dir.strip_prefix(&self.mount_point).ok()?.to_str()?;
        let root = self.root.trim_end_matches('/');
        Some(if rel.is_empty() {
            if root.is_empty() {
                "/".into()
            } else {
                root.into()
            }
        } else {
            format!("{root}/{rel}")
        })
    }

    /// The directory of a cgroup given its hierarchy path, if it is below this mount.
    pub fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let root = self.root.trim_end_matches('/');
        let rel = path.strip_prefix(root)?;
        if !(rel.is_empty() || rel.starts_with('/')) {
            return None;
        }
        Some(self.mount_point.join(rel.trim_start_matches('/')))
    }

    /// Every cgroup under the mount as (id, hierarchy path). Directories that
    /// vanish during the walk are skipped: cgroups come and go all the time.
    pub fn walk(&self) -> Result<Vec<(u64, String)>> {
        let meta = fs::metadata(&self.mount_point).map_err(|source| Error::Io {
            path: self.mount_point.display().to_string(),
            source,
        })?;
        let mut out = Vec::new();
        let mut stack = vec![(self.mount_point.clone(), meta.ino())];
        while let Some((dir, ino)) = stack.pop() {
            if let Some(p) = self.hierarchy_path(&dir) {
                out.push((ino, p));
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                if !ft.is_dir() {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                stack.push((entry.path(), meta.ino()));
            }
        }
        Ok(out)
    }

    /// The id (inode) of the cgroup at hierarchy path `path`, from the filesystem.
    pub fn id_of(&self, path: &str) -> Option<u64> {
        fs::metadata(self.dir_of(path)?).ok().map(|m| m.ino())
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            if let Ok(byte) = u8::try_from(v) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One cgroup and who owns it, shared by every pid in it (and kept alive by the
/// pids that reference it after the directory is removed).
#[derive(Debug, PartialEq, Eq)]
pub struct CgroupInfo {
    pub id: u64,
    pub path: Arc<str>,
    pub owner: Owner,
}

impl CgroupInfo {
    /// Parses the owner of `path`; a pod-shaped path that does not parse is logged
    /// and counted as the host's, since no pod can be named for it.
    pub fn new(id: u64, path: &str) -> Self {
        let owner = match cgroup_path::parse(path) {
            Ok(owner) => owner,
            Err(error) => {
                tracing::warn!(cgroup_id = id, %error, "unreadable pod cgroup path, counted as host");
                Owner::Host
            }
        };
        Self {
            id,
            path: Arc::from(path),
            owner,
        }
    }
}

/// cgroup id -> [`CgroupInfo`] for the live cgroups.
#[derive(Debug, Default)]
pub struct CgroupTree {
    by_id: HashMap<u64, Arc<CgroupInfo>>,
    by_path: HashMap<Arc<str>, u64>,
}

impl CgroupTree {
    /// A tree holding exactly `cgroups`.
    pub fn from_walk(cgroups: Vec<(u64, String)>) -> Self {
        let mut tree = Self::default();
        for (id, path) in cgroups {
            tree.insert(id, &path);
        }
        tree
    }

    /// Adds (or renames) a cgroup.
    pub fn insert(&mut self, id: u64, path: &str) -> Arc<CgroupInfo> {
        if let Some(old) = self.by_id.get(&id) {
            if &*old.path == path {
                return old.clone();
            }
            self.by_path.remove(&old.path);
        }
        let info = Arc::new(CgroupInfo::new(id, path));
        self.by_path.insert(info.path.clone(), id);
        self.by_id.insert(id, info.clone());
        info
    }

    /// Adds what a fresh walk found that is missing; returns how many were new.
    pub fn merge(&mut self, cgroups: Vec<(u64, String)>) -> usize {
        let mut added = 0;
        for (id, path) in cgroups {
            if !self.by_id.contains_key(&id) {
                added += 1;
            }
            self.insert(id, &path);
        }
        added
    }

    pub fn remove(&mut self, id: u64) {
        if let Some(info) = self.by_id.remove(&id) {
            self.by_path.remove(&info.path);
        }
    }

    pub fn get(&self, id: u64) -> Option<&Arc<CgroupInfo>> {
        self.by_id.get(&id)
    }

    pub fn by_path(&self, path: &str) -> Option<&Arc<CgroupInfo>> {
        self.by_path.get(path).and_then(|id| self.by_id.get(id))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_host_finds_unified() {
        let m = Cgroup2Mount::from_mountinfo(HYBRID).unwrap();
        assert_eq!(m.mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m.root, "/");
    }

    #[test]
    fn pure_v2_host_with_optional_fields() {
        let text = "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let m = Cgroup2Mount::from_mountinfo(text).unwrap();
        assert_eq!(m.mount_point, Path::new("/sys/fs/cgroup"));
    }

    #[test]
    fn escaped_mount_point_and_subtree_root() {
        let text = "50 23 0:26 /kubepods.slice /host\\040cgroup rw - cgroup2 cgroup2 rw\n";
        let m = Cgroup2Mount::from_mountinfo(text).unwrap();
        assert_eq!(m.mount_point, Path::new("/host cgroup"));
        assert_eq!(m.root, "/kubepods.slice");
        assert_eq!(
            m.hierarchy_path(Path::new("/host cgroup/a/b")).as_deref(),
            Some("/kubepods.slice/a/b")
        );
        assert_eq!(
            m.hierarchy_path(Path::new("/host cgroup")).as_deref(),
            Some("/kubepods.slice")
        );
        assert_eq!(
            m.dir_of("/kubepods.slice/a"),
            Some(PathBuf::from("/host cgroup/a"))
        );
        assert_eq!(m.dir_of("/kubepods.slicex/a"), None);
        assert_eq!(m.dir_of("/system.slice"), None);
    }

    #[test]
    fn no_cgroup2_is_an_error() {
        let only_v1 = HYBRID.lines().take(3).collect::<Vec<_>>().join("\n");
        assert!(matches!(
            Cgroup2Mount::from_mountinfo(&only_v1),
            Err(Error::NoCgroup2)
        ));
        assert!(matches!(
            Cgroup2Mount::from_mountinfo(""),
            Err(Error::NoCgroup2)
        ));
        assert!(matches!(
            Cgroup2Mount::from_mountinfo("garbage - cgroup2\n1 2 3 - cgroup2 x y"),
            Err(Error::NoCgroup2)
        ));
    }

    #[test]
    fn tree_insert_rename_remove() {
        let mut t = CgroupTree::default();
        t.insert(7, "/a");
        assert_eq!(&*t.get(7).unwrap().path, "/a");
        t.insert(7, "/b");
        assert!(t.by_path("/a").is_none());
        assert_eq!(t.by_path("/b").unwrap().id, 7);
        assert_eq!(t.merge(vec![(7, "/b".into()), (8, "/c".into())]), 1);
        t.remove(7);
        assert!(t.get(7).is_none() && t.by_path("/b").is_none());
        assert_eq!(t.len(), 1);
    }

    /// The real mount of this machine: ids are inodes, and the root is there.
    #[test]
    fn walk_this_machine() {
        let m = Cgroup2Mount::discover().expect("this machine has a cgroup v2 mount");
        let all = m.walk().expect("walk");
        let root_ino = fs::metadata(&m.mount_point).unwrap().ino();
        assert!(all.iter().any(|(id, p)| *id == root_ino && p == &m.root));
        for (id, p) in all.iter().take(20) {
            assert_eq!(m.id_of(p), Some(*id), "{p}");
        }
    }
}
