//! `cargo xtask build --target TRIPLE` (issue 17): the daemon, its eBPF probe
//! embedded, for x86_64 or aarch64 Linux, from either. What is missing of a cross
//! toolchain is installed: the target's std through rustup, the target's GCC and
//! glibc from Debian (`gcc-aarch64-linux-gnu`, `libc6-dev-arm64-cross`: the
//! compiler only recommends the glibc, and recommends are not installed).
//! The linker (and qemu-user as the test runner) are given to cargo in its
//! `CARGO_TARGET_<TRIPLE>_*` variables, only when cross-building: in
//! `.cargo/config.toml` they would apply to a native build on such a machine too,
//! where that compiler may be called otherwise (Fedora's is not
//! `aarch64-linux-gnu-gcc`). cc-rs (ring's C code) finds `<prefix>-gcc` by itself.
//!
//! The probe itself is target-neutral: BPF bytecode for `bpfel`, built once by
//! gpu-scaler/build.rs whatever the daemon's target. What differs by architecture
//! is handled at load time on the node: tracepoint field offsets are read from
//! tracefs (`attribution::tracefs`), and the ring buffer's size is checked against
//! the running kernel's page size (`RingBufferSize`: 4 KiB on x86_64, 4, 16 or 64
//! KiB on arm64 kernels). The probe attaches to sched and cgroup tracepoints only,
//! no syscall tracepoints or kprobes, so no syscall numbers or pt_regs layouts.
//!
//! `cargo xtask test` runs the daemon's unit tests built for aarch64 under
//! qemu-user (Debian's `qemu-user-static`) and
//! checks the aarch64 binary as tests/image.rs checks the host's ([`test`]).

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// A Linux target the daemon is built for: its Rust triple, what Debian calls
/// its cross GCC, and the ELF machine its binaries have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub triple: &'static str,
    /// Debian's cross compiler for it (unused when it is the host).
    gcc_package: &'static str,
    /// That compiler, which links for it too.
    gcc: &'static str,
    /// Debian's glibc headers and libraries for it, to link against.
    libc_package: &'static str,
    /// `uname -m` of its machines (`std::env::consts::ARCH`).
    arch: &'static str,
}

const TARGETS: &[Target] = &[
    Target {
        triple: "x86_64-unknown-linux-gnu",
        gcc_package: "gcc-x86-64-linux-gnu",
        gcc: "x86_64-linux-gnu-gcc",
        libc_package: "libc6-dev-amd64-cross",
        arch: "x86_64",
    },
    Target {
        triple: "aarch64-unknown-linux-gnu",
        gcc_package: "gcc-aarch64-linux-gnu",
        gcc: "aarch64-linux-gnu-gcc",
        libc_package: "libc6-dev-arm64-cross",
        arch: "aarch64",
    },
];

/// The target the daemon's unit tests are also run for, under qemu-user.
pub const AARCH64: &str = "aarch64-unknown-linux-gnu";
/// Integration tests of tests/ that run under qemu-user in one process
/// ([`test`] says why not the others).
const QEMU_TESTS: &[&str] = &["scaler", "keda", "cluster", "kube", "examples"];
/// Those that start the aarch64 daemon as a process: the kernel runs the child
/// through qemu by binfmt_misc ([`ensure_binfmt`]).
const QEMU_PROCESS_TESTS: &[&str] = &["limits", "engine", "telemetry", "cli_gpus", "cli_top"];
const BINFMT: &str = "/proc/sys/fs/binfmt_misc";

impl Target {
    pub fn parse(triple: &str) -> Result<Self> {
        TARGETS
            .iter()
            .copied()
            .find(|t| t.triple == triple)
            .with_context(|| {
                format!(
                    "--target {triple:?}: one of {}",
                    TARGETS
                        .iter()
                        .map(|t| t.triple)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    /// This machine's own target.
    pub fn host() -> Result<Self> {
        TARGETS
            .iter()
            .copied()
            .find(|t| t.is_host())
            .with_context(|| format!("no target for this machine ({})", std::env::consts::ARCH))
    }

    fn is_host(self) -> bool {
        self.arch == std::env::consts::ARCH
    }

    /// The cross glibc's root, where qemu-user finds the target's loader.
    fn sysroot(self) -> String {
        format!("/usr/{}", self.gcc.trim_end_matches("-gcc"))
    }

    /// `cargo ARGS` building for this target: its linker when cross-building
    /// and, for tests, qemu-user with the cross glibc as the runner (and, for
    /// the daemons tests start through binfmt_misc, `QEMU_LD_PREFIX`).
    fn cargo(self, args: &[&str]) -> Result<()> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        // Before a `--`: what follows it is the test binaries'.
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        cmd.args(&args[..split])
            .args(["--target", self.triple])
            .args(&args[split..]);
        if !self.is_host() {
            let var = self.triple.to_uppercase().replace('-', "_");
            cmd.env(format!("CARGO_TARGET_{var}_LINKER"), self.gcc)
                .env(
                    format!("CARGO_TARGET_{var}_RUNNER"),
                    format!("qemu-{}-static -L {}", self.arch, self.sysroot()),
                )
                .env("QEMU_LD_PREFIX", self.sysroot());
        }
        super::run(&mut cmd)
    }
}

/// Installs what building for `target` lacks: the rustup target, the Debian
/// cross GCC (nothing for the host's own target).
pub fn ensure(target: Target) -> Result<()> {
    if target.is_host() {
        return Ok(());
    }
    let installed =
        super::toolchain::output(Command::new("rustup").args(["target", "list", "--installed"]))
            .context("rustup is needed to add the target's standard library")?;
    if !installed.lines().any(|l| l.trim() == target.triple) {
        eprintln!(
            "xtask: adding the {} target to the Rust toolchain (its std; under a minute)",
            target.triple
        );
        super::run(Command::new("rustup").args(["target", "add", target.triple]))?;
    }
    super::toolchain::ensure_debian(
        &[target.gcc_package, target.libc_package],
        &format!("the cross compiler and glibc for {}", target.triple),
    )
}

/// `cargo xtask build --target`: a release build of the daemon for `target`,
/// its probe embedded; returns the binary's path.
pub fn build(target: Target) -> Result<std::path::PathBuf> {
    super::toolchain::ensure()?;
    ensure(target)?;
    target.cargo(&["build", "--release", "--locked", "--package", "gpu-scaler"])?;
    let bin = std::path::Path::new("target")
        .join(target.triple)
        .join("release/gpu-scaler");
    if !bin.is_file() {
        bail!("cargo built no {}", bin.display());
    }
    eprintln!("xtask: built {}", bin.display());
    Ok(bin)
}

/// The aarch64 step of `cargo xtask test`: built for aarch64 and run under
/// qemu-user, the unit tests of the daemon, the shared types (their size
/// asserts compile for aarch64's ABI), the fake driver and the test support
/// library, the integration tests that need no kernel
/// ([`QEMU_TESTS`], and [`QEMU_PROCESS_TESTS`], which start the aarch64 daemon
/// as a process, where binfmt_misc can run it); then tests/image.rs on the
/// aarch64 binary (its ELF machine, its libraries against the arm64 runtime
/// image, the probe inside). Debug builds: the same code as release, half the
/// build time.
///
/// tests/nvml.rs (the real nvml-wrapper on the aarch64 fake driver) runs there
/// one test at a time: its tests each dlopen a private copy of the fake and
/// drop it again, and with several at once under qemu-user, a poller thread's
/// first thread-local access in the copy it has just loaded (std's hash keys,
/// in `nvmlInit_v2`) sometimes gets an address of 0x40 and faults: 2 runs of 6
/// in parallel, none of 8 serially, never on x86_64. The daemon loads one NVML.
///
/// Not under qemu: tests that need the kernel (tests/attribution.rs, e2e*.rs,
/// cluster_processes.rs: qemu-user emulates the CPU, not BPF for a foreign
/// binary).
pub fn test() -> Result<()> {
    let target = Target::parse(AARCH64)?;
    if target.is_host() {
        eprintln!("xtask test: the host is aarch64; its tests above are the aarch64 ones");
        return Ok(());
    }
    ensure(target)?;
    super::toolchain::ensure_debian(&["qemu-user-static"], "qemu-user, to run aarch64 tests")?;
    target.cargo(&[
        "test",
        "--locked",
        "--package",
        "gpu-scaler",
        "--package",
        "gpu-scaler-common",
        // The fake driver is the aarch64 NVML's double: its C calls (array
        // sizes, bounded strings) are what nvml-wrapper reads there.
        "--package",
        "fake-nvml",
        "--package",
        "gpu-scaler-tests",
        "--lib",
    ])?;
    // The daemon first: the process tests start it (cargo builds only the
    // tests package's own binaries for them).
    target.cargo(&["build", "--locked", "--package", "gpu-scaler"])?;
    let mut tests = vec!["test", "--locked", "--package", "gpu-scaler-tests"];
    for t in QEMU_TESTS {
        tests.extend(["--test", t]);
    }
    if ensure_binfmt(target)? {
        for t in QEMU_PROCESS_TESTS {
            tests.extend(["--test", t]);
        }
    }
    target.cargo(&tests)?;
    target.cargo(&[
        "test",
        "--locked",
        "--package",
        "gpu-scaler-tests",
        "--test",
        "nvml",
        "--",
        "--test-threads=1",
    ])?;
    let bin = std::path::Path::new("target")
        .join(target.triple)
        .join("debug/gpu-scaler")
        .canonicalize()
        .context("the aarch64 gpu-scaler binary")?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    super::run(
        Command::new(cargo)
            .args([
                "test",
                "--locked",
                // As `cargo xtask test` built it: nothing is rebuilt.
                "--workspace",
                "--test",
                "image",
            ])
            .env("GPU_SCALER_IMAGE_BINARY", &bin)
            .env("GPU_SCALER_IMAGE_ARCH", target.arch),
    )
}

/// Makes the kernel run `target`'s binaries through qemu-user (binfmt_misc, as
/// Debian's qemu-user-binfmt would): mounts binfmt_misc if it is not, and
/// registers qemu's handler from `/usr/lib/binfmt.d/qemu-<arch>.conf` (shipped
/// by qemu-user-static) if it is missing. The handler stays registered until
/// reboot, as with that package. Without root or binfmt_misc the process tests
/// are skipped with a message, or fail under GPU_SCALER_REQUIRE_KERNEL=1.
fn ensure_binfmt(target: Target) -> Result<bool> {
    let dir = std::path::Path::new(BINFMT);
    if dir.join(format!("qemu-{}", target.arch)).exists() {
        return Ok(true);
    }
    let attempt = || -> Result<()> {
        if !super::toolchain::is_root() {
            bail!("registering a binfmt_misc handler needs root");
        }
        if !dir.join("register").exists() {
            super::run(Command::new("mount").args(["-t", "binfmt_misc", "binfmt_misc", BINFMT]))?;
        }
        let conf = format!("/usr/lib/binfmt.d/qemu-{}.conf", target.arch);
        let line = std::fs::read_to_string(&conf).with_context(|| format!("reading {conf}"))?;
        eprintln!(
            "xtask: registering qemu-{} with binfmt_misc (tests start the {} daemon as a \
             process; until reboot)",
            target.arch, target.arch
        );
        std::fs::write(dir.join("register"), line.trim())
            .with_context(|| format!("registering {conf} in {BINFMT}/register"))?;
        Ok(())
    };
    match attempt() {
        Ok(()) => Ok(true),
        Err(e) if std::env::var_os("GPU_SCALER_REQUIRE_KERNEL").is_some() => {
            Err(e.context("GPU_SCALER_REQUIRE_KERNEL=1: binfmt_misc for the aarch64 tests"))
        }
        Err(e) => {
            eprintln!(
                "xtask test: skipping the aarch64 tests that start the daemon ({}): {e:#}",
                QEMU_PROCESS_TESTS.join(", ")
            );
            Ok(false)
        }
    }
}
