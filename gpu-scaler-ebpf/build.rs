//! Re-runs the BPF build when bpf-linker changes. Must not fail when bpf-linker is
//! absent: this crate is also compiled for the host as a build-dependency of
//! gpu-scaler, including on machines built with GPU_SCALER_NO_EBPF=1.
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
