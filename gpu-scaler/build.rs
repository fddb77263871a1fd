//! Builds the eBPF object (unless `GPU_SCALER_NO_EBPF=1`) and the protobuf code.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, anyhow};

/// Set to `1` to build without the eBPF toolchain (nightly + rust-src + bpf-linker).
/// The resulting daemon has no probe embedded, says so at start-up and attributes
/// processes through /proc instead.
const NO_EBPF: &str = "GPU_SCALER_NO_EBPF";
/// The nightly that builds the probe, shared with `cargo xtask setup`.
const NIGHTLY: &str = include_str!("../gpu-scaler-ebpf/nightly-toolchain").trim_ascii();

/// Set on the build script's own child (see [`build_ebpf_quietly`]): that run only
/// builds the probe.
const EBPF_CHILD: &str = "GPU_SCALER_BUILD_SCRIPT_EBPF_CHILD";

fn main() -> anyhow::Result<()> {
    if env::var_os(EBPF_CHILD).is_some() {
        return build_ebpf(&env::var(EBPF_CHILD)?);
    }
    println!("cargo::rustc-check-cfg=cfg(gpu_scaler_no_ebpf)");
    println!("cargo:rerun-if-env-changed={NO_EBPF}");
    println!("cargo:rerun-if-changed=../gpu-scaler-ebpf/nightly-toolchain");
    let skip_ebpf = env::var(NO_EBPF).is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip_ebpf {
        println!("cargo:warning={NO_EBPF}=1: building without the eBPF probe");
        println!("cargo:rustc-cfg=gpu_scaler_no_ebpf");
    } else {
        let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
        let ebpf_dir = manifest_dir
            .parent()
            .ok_or_else(|| anyhow!("manifest dir has no parent"))?
            .join("gpu-scaler-ebpf");
        let ebpf_dir = ebpf_dir
            .to_str()
            .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
        build_ebpf_quietly(ebpf_dir)?;
    }

    // Protobuf: protox parses in pure Rust so no protoc is needed anywhere.
    let proto_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?)
        .parent()
        .ok_or_else(|| anyhow!("manifest dir has no parent"))?
        .join("proto");
    let files = ["externalscaler.proto", "gpuscaler_peer_v1.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={}", proto_dir.join(f).display());
    }
    let fds = protox::compile(files, [&proto_dir]).context("parsing proto/")?;
    tonic_prost_build::configure()
        // Small per-RPC buffers: see gpu-scaler/src/scaler/codec.rs.
        .codec_path("crate::scaler::codec::SmallCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .context("generating gRPC code")?;
    Ok(())
}

fn build_ebpf(ebpf_dir: &str) -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "gpu-scaler-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        // Pinned: bpf-linker must link the LLVM major version rustc uses
        // (see xtask/src/toolchain.rs).
        aya_build::Toolchain::Custom(NIGHTLY),
    )
}

/// Builds the probe in a child run of this build script and keeps its output
/// unless the build fails. aya-build turns every line the nested cargo prints
/// (`Compiling core ...` for each crate of the BPF target's std build) into a
/// `cargo:warning`, which cargo shows for a workspace member: a first build read
/// as if something were wrong. It has no switch for that, and it prints from its
/// own threads, so the output is captured at the process boundary. The full log
/// stays in OUT_DIR/ebpf-build.log either way.
fn build_ebpf_quietly(ebpf_dir: &str) -> anyhow::Result<()> {
    let exe = env::current_exe().context("locating the build script")?;
    let out = Command::new(&exe)
        .env(EBPF_CHILD, ebpf_dir)
        .output()
        .with_context(|| format!("running {} to build the eBPF probe", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let log = PathBuf::from(env::var("OUT_DIR")?).join("ebpf-build.log");
    // Best effort: the log is for reading later, the build does not need it.
    let _ = fs::write(&log, format!("{stdout}{stderr}"));
    for line in stdout.lines() {
        // Directives (rerun-if-changed, ...) always; aya-build's warnings only
        // when they explain a failure.
        let warning = line.starts_with("cargo:warning=") || line.starts_with("cargo::warning=");
        if !warning || !out.status.success() {
            println!("{line}");
        }
    }
    if !out.status.success() {
        eprint!("{stderr}");
        anyhow::bail!(
            "building the eBPF probe failed ({}; log: {}); run `cargo xtask setup` to install \
             the toolchain, or set {NO_EBPF}=1 to build without it",
            out.status,
            log.display()
        );
    }
    Ok(())
}
