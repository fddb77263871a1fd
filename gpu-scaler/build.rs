//! Builds the eBPF object (unless `GPU_SCALER_NO_EBPF=1`) and the protobuf code.

use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};

/// Set to `1` to build without the eBPF toolchain (nightly + rust-src + bpf-linker).
/// The resulting daemon has no probe embedded, says so at start-up and attributes
/// processes through /proc instead.
const NO_EBPF: &str = "GPU_SCALER_NO_EBPF";
/// The nightly that builds the probe, shared with `cargo xtask setup`.
const NIGHTLY: &str = include_str!("../gpu-scaler-ebpf/nightly-toolchain").trim_ascii();

fn main() -> anyhow::Result<()> {
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
        .with_context(|| {
            format!(
                "building the eBPF probe failed; run `cargo xtask setup` to install the \
                 toolchain, or set {NO_EBPF}=1 to build without it"
            )
        })?;
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
