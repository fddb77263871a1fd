//! The gpu-scaler probe. Built for the BPF target by gpu-scaler/build.rs; on the
//! host it compiles to an empty program so `cargo clippy --workspace` works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::{map, tracepoint},
    maps::LruHashMap,
    programs::TracePointContext,
};
use gpu_scaler_common::MAX_TRACKED_PIDS;

/// tgid -> cgroup v2 id of every process seen since load.
#[map]
static PID_CGROUP: LruHashMap<u32, u64> = LruHashMap::with_max_entries(MAX_TRACKED_PIDS, 0);

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let cgid = unsafe { bpf_get_current_cgroup_id() };
    let _ = PID_CGROUP.insert(tgid, cgid, 0);
    0
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
