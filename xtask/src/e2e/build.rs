//! The real parts of the end-to-end cluster, built from their Go modules (issue 15).
//!
//! Each component has its own Go module under `xtask/e2e/<component>/` (their
//! dependency graphs conflict: KEDA v2.21 wants k8s.io/* v0.36, Kubernetes v1.35 its
//! own v0.35 staging modules), pinned by its go.mod and go.sum and built with
//! `-mod=readonly`, so nothing but those exact versions is fetched. The binaries go
//! to `target/e2e/bin/`; a component is rebuilt only when its go.mod or go.sum
//! changed since its last successful build (a stamp holds both). The Go module and
//! build caches are Go's own (`go env GOMODCACHE GOCACHE`, under the user's home),
//! as cargo's registry is: a fresh clone (CI's) relinks from them in a few minutes
//! instead of compiling ~20 CPU-minutes of Go again (docs/e2e.md has the figures).

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

/// Where the Go modules of the components are.
const MODULES: &str = "xtask/e2e";
/// The oldest Go that builds every component (etcd v3.7 and KEDA v2.21 say 1.26.0).
const GO_MIN: (u32, u32) = (1, 26);

/// Kubernetes' version, stamped into the binaries as its release build does
/// (`hack/lib/version.sh`): clients such as KEDA read it from /version.
pub const KUBERNETES_VERSION: &str = "v1.35.4";
pub const KEDA_VERSION: &str = "v2.21.0";

/// One Go module and the commands it builds: (package, binary name).
struct Component {
    name: &'static str,
    binaries: &'static [(&'static str, &'static str)],
    ldflags: fn() -> String,
}

const COMPONENTS: &[Component] = &[
    Component {
        name: "etcd",
        binaries: &[("go.etcd.io/etcd/server/v3", "etcd")],
        ldflags: String::new,
    },
    Component {
        name: "kubernetes",
        binaries: &[
            ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
            (
                "k8s.io/kubernetes/cmd/kube-controller-manager",
                "kube-controller-manager",
            ),
        ],
        ldflags: kubernetes_ldflags,
    },
    Component {
        name: "keda",
        binaries: &[
            ("github.com/kedacore/keda/v2/cmd/operator", "keda-operator"),
            ("github.com/kedacore/keda/v2/cmd/adapter", "keda-adapter"),
        ],
        ldflags: keda_ldflags,
    },
];

fn kubernetes_ldflags() -> String {
    let v = KUBERNETES_VERSION.trim_start_matches('v');
    let mut parts = v.split('.');
    let (major, minor) = (parts.next().unwrap_or("1"), parts.next().unwrap_or("0"));
    [
        format!("-X k8s.io/component-base/version.gitVersion={KUBERNETES_VERSION}"),
        format!("-X k8s.io/component-base/version.gitMajor={major}"),
        format!("-X k8s.io/component-base/version.gitMinor={minor}"),
        "-X k8s.io/component-base/version.gitTreeState=clean".into(),
    ]
    .join(" ")
}

fn keda_ldflags() -> String {
    format!("-X github.com/kedacore/keda/v2/version.Version={KEDA_VERSION}")
}

/// The built parts: binaries and the files taken from the module sources.
pub struct Parts {
    pub bin: PathBuf,
    /// KEDA's CRDs (`config/crd/bases/*.yaml` of the KEDA module).
    pub keda_crds: PathBuf,
}

/// Whether every component's binaries are in target/e2e/bin/ (possibly stale:
/// [`ensure`] checks the stamps).
pub fn built() -> bool {
    let bin = Path::new("target/e2e/bin");
    COMPONENTS
        .iter()
        .all(|c| c.binaries.iter().all(|(_, b)| bin.join(b).is_file()))
}

/// Builds what is missing or stale and returns where everything is.
pub fn ensure(target: &Path) -> Result<Parts> {
    let go = find_go()?;
    let bin = target.join("e2e/bin");
    fs::create_dir_all(&bin)?;
    let bin = bin.canonicalize()?;
    let env = GoEnv::new(&go);
    for c in COMPONENTS {
        build(&env, c, &bin)?;
    }
    let keda_crds = env
        .module_dir("keda", "github.com/kedacore/keda/v2")?
        .join("config/crd/bases");
    ensure!(
        keda_crds.is_dir(),
        "no {} in the KEDA module",
        keda_crds.display()
    );
    Ok(Parts { bin, keda_crds })
}

/// `go` from PATH, else Go's default install location; its version checked.
fn find_go() -> Result<PathBuf> {
    const HOW: &str = "cargo xtask e2e builds etcd, Kubernetes and KEDA from their Go \
        modules: install Go >= 1.26 (https://go.dev/dl/, e.g. unpacked to /usr/local/go) and \
        put its bin/ on PATH";
    let candidates = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("go"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/local/go/bin/go")]);
    for go in candidates {
        if !go.is_file() {
            continue;
        }
        let out = Command::new(&go)
            .args(["env", "GOVERSION"])
            .env("GOTOOLCHAIN", "local")
            .output()
            .with_context(|| format!("running {}", go.display()))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let parsed = version
            .strip_prefix("go")
            .and_then(|v| {
                let mut it = v.split(['.', '-', 'r', 'b']);
                Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
            })
            .with_context(|| format!("{}: unreadable version {version:?}", go.display()))?;
        ensure!(
            parsed >= GO_MIN,
            "{} is {version}, older than go{}.{}. {HOW}",
            go.display(),
            GO_MIN.0,
            GO_MIN.1
        );
        return Ok(go);
    }
    bail!("no Go toolchain found. {HOW}")
}

/// The environment every `go` command runs in: no toolchain download, read-only
/// go.mod, Go's own caches.
struct GoEnv {
    go: PathBuf,
    vars: Vec<(&'static str, String)>,
}

impl GoEnv {
    fn new(go: &Path) -> Self {
        Self {
            go: go.to_owned(),
            vars: vec![
                // The machine's own Go; a toolchain line never triggers a download.
                ("GOTOOLCHAIN", "local".into()),
                ("GOFLAGS", "-mod=readonly -trimpath -buildvcs=false".into()),
            ],
        }
    }

    fn command(&self, component: &str) -> Command {
        let mut cmd = Command::new(&self.go);
        cmd.current_dir(Path::new(MODULES).join(component));
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd
    }

    /// Where `module` (as the component's go.mod resolves it) is unpacked.
    fn module_dir(&self, component: &str, module: &str) -> Result<PathBuf> {
        let out = self
            .command(component)
            .args(["list", "-m", "-f", "{{.Dir}}", module])
            .output()
            .context("go list -m")?;
        ensure!(
            out.status.success(),
            "go list -m {module}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let dir = String::from_utf8(out.stdout)?.trim().to_owned();
        if dir.is_empty() {
            // Listed but not downloaded yet.
            crate::run(self.command(component).args(["mod", "download", module]))?;
            return self.module_dir(component, module);
        }
        Ok(PathBuf::from(dir))
    }
}

/// Builds `c` into `bin/` unless its stamp says the binaries there come from the
/// same go.mod and go.sum.
fn build(env: &GoEnv, c: &Component, bin: &Path) -> Result<()> {
    let dir = Path::new(MODULES).join(c.name);
    let pin = format!(
        "{}\n{}",
        fs::read_to_string(dir.join("go.mod"))?,
        fs::read_to_string(dir.join("go.sum"))?
    );
    let stamp = bin.join(format!(".{}.stamp", c.name));
    let present = c.binaries.iter().all(|(_, b)| bin.join(b).is_file());
    if present && fs::read_to_string(&stamp).is_ok_and(|s| s == pin) {
        eprintln!("xtask e2e: {} is built (skipping)", c.name);
        return Ok(());
    }
    let _ = fs::remove_file(&stamp);
    let started = Instant::now();
    for (package, name) in c.binaries {
        eprintln!("xtask e2e: building {name} ({package})");
        crate::run(
            env.command(c.name)
                .arg("build")
                .arg("-ldflags")
                .arg((c.ldflags)())
                .arg("-o")
                .arg(bin.join(name))
                .arg(package),
        )?;
    }
    fs::write(&stamp, pin)?;
    eprintln!(
        "xtask e2e: built {} in {:.0} s",
        c.name,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
