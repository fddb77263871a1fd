//! What `deploy/Dockerfile` promises about the binary it ships, checked on the
//! binary this workspace builds. The image itself cannot be built here (no
//! container engine, and no registry to pull its base images from), so these
//! are the claims that can fail without one:
//!
//! - the runtime stage is glibc (`distroless/cc-debian12`) because NVML is a
//!   glibc library the daemon `dlopen()`s, and the binary needs nothing that
//!   image lacks;
//! - `libnvidia-ml` is not a link-time dependency (the NVIDIA container runtime
//!   injects it at start; a node without it must still start the daemon and
//!   say why NVML is missing);
//! - the eBPF probe is embedded (unless built with `GPU_SCALER_NO_EBPF=1`);
//! - the image runs as a non-root numeric user and its entrypoint is the
//!   binary the build stage produced;
//! - it builds for linux/amd64 and linux/arm64 by cross-compiling in a builder
//!   of the build machine's platform.
//!
//! The binary is the workspace's, or the one `GPU_SCALER_IMAGE_BINARY` names
//! with `GPU_SCALER_IMAGE_ARCH` its architecture: `cargo xtask test` runs these
//! tests again on the aarch64 binary it cross-builds (issue 17).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use gpu_scaler_tests::workspace_bin;
use object::{
    elf::{DT_NEEDED, EM_AARCH64, EM_BPF, EM_X86_64, FileHeader64},
    read::elf::FileHeader as _,
};

/// What distroless/cc-debian12 provides on every platform: Debian 12's libc6
/// (glibc and its split libraries) and libgcc-s1; its dynamic loader is per
/// architecture ([`Arch::loader`]).
const RUNTIME_LIBS: &[&str] = &[
    "libc.so.6",
    "libdl.so.2",
    "libgcc_s.so.1",
    "libm.so.6",
    "libpthread.so.0",
    "librt.so.1",
    "libutil.so.1",
];

fn dockerfile() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// An architecture the image is built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    fn from_name(name: &str) -> Self {
        match name {
            "x86_64" => Self::X86_64,
            "aarch64" => Self::Aarch64,
            other => panic!("GPU_SCALER_IMAGE_ARCH={other:?}: x86_64 or aarch64"),
        }
    }

    /// Its ELF `e_machine`.
    fn machine(self) -> u16 {
        match self {
            Self::X86_64 => EM_X86_64,
            Self::Aarch64 => EM_AARCH64,
        }
    }

    /// glibc's dynamic loader there, in distroless/cc-debian12 for that platform.
    fn loader(self) -> &'static str {
        match self {
            Self::X86_64 => "ld-linux-x86-64.so.2",
            Self::Aarch64 => "ld-linux-aarch64.so.1",
        }
    }
}

/// The binary to check and the architecture it must be for: the one
/// `GPU_SCALER_IMAGE_BINARY` names (`GPU_SCALER_IMAGE_ARCH` required with it),
/// else the workspace's, for this machine.
fn binary() -> (PathBuf, Arch) {
    match std::env::var_os("GPU_SCALER_IMAGE_BINARY") {
        Some(path) => {
            let arch = std::env::var("GPU_SCALER_IMAGE_ARCH")
                .expect("GPU_SCALER_IMAGE_ARCH names GPU_SCALER_IMAGE_BINARY's architecture");
            (PathBuf::from(path), Arch::from_name(&arch))
        }
        None => (
            workspace_bin("gpu-scaler"),
            Arch::from_name(std::env::consts::ARCH),
        ),
    }
}

/// The ELF `e_machine` of `binary`.
fn machine(binary: &[u8]) -> u16 {
    let elf = FileHeader64::<object::Endianness>::parse(binary).expect("the binary is ELF64");
    let endian = elf.endian().expect("ELF endianness");
    elf.e_machine.get(endian)
}

/// The shared libraries `binary` names as DT_NEEDED.
fn needed(binary: &[u8]) -> BTreeSet<String> {
    let elf = FileHeader64::<object::Endianness>::parse(binary).expect("the binary is ELF64");
    let endian = elf.endian().expect("ELF endianness");
    let sections = elf.sections(endian, binary).expect("section table");
    let table = sections
        .dynamic_table(endian, binary)
        .expect("dynamic table");
    assert!(
        !table.is_empty(),
        "the binary is dynamically linked (glibc)"
    );
    table
        .iter()
        .filter(|d| d.tag == DT_NEEDED)
        .map(|d| String::from_utf8_lossy(table.string(d).expect("DT_NEEDED name")).into_owned())
        .collect()
}

/// Whether `binary` carries an embedded ELF object for the BPF machine.
fn embeds_bpf_object(binary: &[u8]) -> bool {
    const MAGIC: &[u8] = b"\x7fELF\x02\x01"; // 64-bit, little endian
    binary.windows(MAGIC.len()).enumerate().any(|(at, w)| {
        w == MAGIC
            && binary
                .get(at + 18..at + 20)
                .is_some_and(|m| u16::from_le_bytes([m[0], m[1]]) == EM_BPF)
    })
}

#[test]
fn the_binary_needs_only_what_the_runtime_image_has() {
    let (bin, arch) = binary();
    let data = std::fs::read(&bin).expect("read the gpu-scaler binary");
    assert_eq!(
        machine(&data),
        arch.machine(),
        "{} must be an {arch:?} binary (ELF e_machine)",
        bin.display()
    );
    let needed = needed(&data);
    assert!(
        needed.contains("libc.so.6"),
        "links glibc, as the Dockerfile's runtime stage assumes: {needed:?}"
    );
    let missing: Vec<_> = needed
        .iter()
        .filter(|l| !RUNTIME_LIBS.contains(&l.as_str()) && *l != arch.loader())
        .collect();
    assert!(
        missing.is_empty(),
        "{} needs {missing:?}, which distroless/cc-debian12 for {arch:?} does not carry",
        bin.display()
    );
    assert!(
        !needed.iter().any(|l| l.contains("nvidia")),
        "NVML must be loaded at run time, never linked: {needed:?}"
    );
    // The same rule as gpu-scaler/build.rs: the binary was built in the same
    // cargo run, with the same environment, as this test.
    let expect_probe = !option_env!("GPU_SCALER_NO_EBPF")
        .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    assert_eq!(
        embeds_bpf_object(&data),
        expect_probe,
        "the eBPF probe is embedded unless built with GPU_SCALER_NO_EBPF=1"
    );
}

#[test]
fn the_dockerfile_ships_that_binary_on_glibc_as_non_root() {
    let d = dockerfile();
    let lines: Vec<&str> = d
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    // `ARG NAME=VALUE` before the first FROM: what `FROM ${NAME}` means.
    let args: std::collections::HashMap<&str, &str> = lines
        .iter()
        .take_while(|l| !l.starts_with("FROM "))
        .filter_map(|l| l.strip_prefix("ARG "))
        .filter_map(|a| a.split_once('='))
        .collect();
    let froms: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("FROM "))
        .map(|f| {
            let image = f
                .split_whitespace()
                .find(|w| !w.starts_with("--"))
                .expect("FROM image");
            match image.strip_prefix("${").and_then(|i| i.strip_suffix('}')) {
                Some(arg) => args
                    .get(arg)
                    .unwrap_or_else(|| panic!("FROM ${{{arg}}} without a default ARG"))
                    .to_string(),
                None => image.to_owned(),
            }
        })
        .collect();
    assert!(froms.len() >= 2, "multi-stage: {froms:?}");
    // Every base image pinned by digest (issue 13): a tag alone can move.
    for image in &froms {
        let digest = image
            .split_once("@sha256:")
            .map(|(_, d)| d)
            .unwrap_or_else(|| panic!("base image not pinned by digest: {image}"));
        assert!(
            digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
            "not a sha256 digest: {image}"
        );
    }
    let runtime = froms.last().expect("a runtime stage");
    assert!(
        runtime.contains("distroless/cc-debian12"),
        "runtime stage is the glibc distroless image RUNTIME_LIBS describes: {runtime}"
    );
    let final_stage = &lines[lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("FROM")..];
    // One builder, on the build machine's platform, cross-compiling for each
    // target platform: nothing emulated. `cargo xtask build --target` runs
    // `cargo build --release --locked --package gpu-scaler --target ...`.
    let builder = lines
        .iter()
        .find(|l| l.starts_with("FROM "))
        .expect("a builder stage");
    assert!(
        builder.contains("--platform=$BUILDPLATFORM"),
        "the builder runs on the build machine's platform: {builder}"
    );
    assert!(
        lines.contains(&"ARG TARGETARCH"),
        "the builder reads the platform it builds for"
    );
    for (arch, triple) in [
        ("amd64", "x86_64-unknown-linux-gnu"),
        ("arm64", "aarch64-unknown-linux-gnu"),
    ] {
        assert!(
            d.contains(&format!("{arch}) triple={triple}")),
            "TARGETARCH {arch} builds {triple}"
        );
    }
    assert!(
        d.contains("cargo xtask build --target \"${triple}\""),
        "the build stage builds the daemon for the target, from the lock file"
    );
    assert!(
        !final_stage.iter().any(|l| l.starts_with("RUN ")),
        "the runtime stage runs nothing at build time (it would need emulation)"
    );
    let copied = final_stage
        .iter()
        .find_map(|l| l.strip_prefix("COPY --from=builder "))
        .expect("the runtime stage copies the built binary");
    let dest = copied.split_whitespace().last().expect("COPY destination");
    let entrypoint = final_stage
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    assert_eq!(
        entrypoint,
        format!("[\"{dest}\"]"),
        "the entrypoint is the copied binary"
    );
    let user = final_stage
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("USER is numeric (Kubernetes runAsNonRoot checks it): {user}"));
    assert_ne!(uid, 0, "the image runs as non-root by default");
}
