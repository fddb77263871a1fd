//! Installs the eBPF toolchain, only what is missing: a pinned nightly with rust-src,
//! Debian's LLVM 22 development packages, and bpf-linker built against them. The
//! nightly is pinned (gpu-scaler-ebpf/nightly-toolchain, also read by
//! gpu-scaler/build.rs) because bpf-linker must link the same LLVM major version as
//! rustc: nightly-2026-05-19 has LLVM 22.1.4, and a newer nightly may bring LLVM 23.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

pub const NIGHTLY: &str = include_str!("../../gpu-scaler-ebpf/nightly-toolchain").trim_ascii();
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Ensures every part of the toolchain is present, installing the missing ones.
pub fn ensure() -> Result<()> {
    if std::env::var("GPU_SCALER_NO_EBPF").is_ok_and(|v| v == "1") {
        eprintln!("xtask: GPU_SCALER_NO_EBPF=1, not checking the eBPF toolchain");
        return Ok(());
    }
    ensure_nightly()?;
    ensure_debian_packages()?;
    ensure_bpf_linker()?;
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF probe")?;
    if !toolchains.lines().any(|l| {
        l.strip_prefix(NIGHTLY)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['-', ' ']))
    }) {
        eprintln!(
            "xtask: installing the {NIGHTLY} toolchain (builds the eBPF probe; \
             a minute or two)"
        );
        super::run(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!(
            "xtask: adding rust-src to {NIGHTLY} (the probe builds core from it; under a minute)"
        );
        super::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            NIGHTLY,
        ]))?;
    }
    Ok(())
}

fn ensure_debian_packages() -> Result<()> {
    ensure_debian(DEBIAN_PACKAGES, "LLVM 22 for bpf-linker")
}

/// Installs the Debian `packages` that are missing (root only; otherwise says
/// what to install); `why` is what the user is told they are for.
pub(crate) fn ensure_debian(packages: &[&str], why: &str) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !debian_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; install them with `sudo apt-get install {}` \
             or run this command as root",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {missing:?} from Debian ({why}; a minute or two)");
    super::run(Command::new("apt-get").arg("update").arg("-qq"))?;
    super::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn ensure_bpf_linker() -> Result<()> {
    if let Ok(version) = output(Command::new("bpf-linker").arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (links the eBPF \
         probe; about 3-5 minutes on 2 cores, once)"
    );
    let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
    super::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                // Its own Cargo.lock, not whatever its dependencies resolve to
                // today (issue 13: supply chain).
                "--locked",
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path),
    )
}

fn debian_installed(package: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|s| s.contains("install ok installed"))
}

pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs a command and returns its stdout; a non-zero exit is an error.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
