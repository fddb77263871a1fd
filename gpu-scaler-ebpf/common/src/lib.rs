//! Types shared by the eBPF program and user space. Every type is `#[repr(C)]` with
//! plain integer fields (no bool, Option or enum: the kernel writes raw bytes) and
//! its size is asserted at compile time so both sides agree on the layout.
#![no_std]

/// Capacity of the pid -> cgroup LRU map. Bounded so churn cannot grow kernel memory.
pub const MAX_TRACKED_PIDS: u32 = 65_536;
