//! Empty on purpose: the program lives in `main.rs` (the `gpu-scaler` BPF binary).
//! This target exists so `gpu-scaler` can depend on the crate at build time.
#![no_std]
