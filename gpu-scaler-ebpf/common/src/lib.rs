//! Types shared by the eBPF program and user space. Every type is `#[repr(C)]` with
//! plain integer fields (no bool, Option or enum: the kernel writes raw bytes) and
//! its size is asserted at compile time so both sides agree on the layout.
#![no_std]

/// Capacity of the pid -> cgroup LRU map. Bounded so churn cannot grow kernel memory.
pub const MAX_TRACKED_PIDS: u32 = 65_536;

/// Default size of the ring buffer that carries lifecycle events to user space (a
/// power of two multiple of the page size, as the kernel requires). The loader
/// may replace it (`serve --ebpf-ring-buffer-bytes`).
pub const RING_BUF_BYTES: u32 = 1 << 20;

/// Unread bytes in the ring buffer at which the probe wakes user space, for the
/// default ring. Below it events are submitted without a wakeup and user space
/// drains the buffer on a short timer: a fork storm then costs one wakeup per
/// batch, not one per event. The loader stores the threshold for the ring it
/// creates in the probe's `WAKEUP_AT` global ([`wakeup_bytes`]).
pub const WAKEUP_BYTES: u64 = 64 * 1024;

/// The wake-up threshold for a ring buffer of `ring_bytes`: [`WAKEUP_BYTES`], or a
/// quarter of a smaller ring, so that a small ring still wakes user space well
/// before it is full (a threshold above the ring's size would never be reached).
pub const fn wakeup_bytes(ring_bytes: u32) -> u64 {
    let quarter = ring_bytes as u64 / 4;
    if quarter < WAKEUP_BYTES {
        quarter
    } else {
        WAKEUP_BYTES
    }
}

/// Bytes of a cgroup path carried in a [`CgroupEvent`], NUL included. Kubelet paths
/// are about 230 bytes; a longer path arrives with `truncated = 1` and user space
/// finds it by walking the cgroup mount instead.
pub const CGROUP_PATH_BYTES: usize = 512;

/// The cgroup v2 hierarchy id as the `root` field of the `cgroup_*` tracepoints
/// reports it. The default hierarchy is set up first and always gets id 0 (the
/// `0::` line of /proc/<pid>/cgroup); v1 hierarchies get ids from 1.
pub const CGROUP2_HIERARCHY_ID: i32 = 0;

/// An offset in [`TracepointOffsets`] meaning "this kernel has no such field".
pub const FIELD_ABSENT: u32 = u32::MAX;

/// `kind` of a [`ProcessEvent`]: a task called execve. `pid` is the tgid after
/// exec, `aux` the tid before it (they differ when a non-leader thread execs).
pub const EVENT_EXEC: u32 = 1;
/// `kind` of a [`ProcessEvent`]: a task was forked or a thread cloned. `pid` is the
/// child's tid (equal to its tgid for a new process), `tgid` the parent's tgid.
pub const EVENT_FORK: u32 = 2;
/// `kind` of a [`ProcessEvent`]: a task exited. `pid` is its tid, `tgid` its
/// process, `aux` is 1 when the whole thread group is now dead.
pub const EVENT_EXIT: u32 = 3;
/// `kind` of a [`ProcessEvent`]: a task was moved to another cgroup v2 cgroup
/// (a write to `cgroup.procs`, no exec). `pid` is the moved task's tid,
/// `cgroup_id` its destination; `tgid` and `comm` are the mover's.
pub const EVENT_ATTACH: u32 = 6;
/// `kind` of a [`CgroupEvent`]: a cgroup v2 directory was created.
pub const EVENT_CGROUP_MKDIR: u32 = 4;
/// `kind` of a [`CgroupEvent`]: a cgroup v2 directory was removed.
pub const EVENT_CGROUP_RMDIR: u32 = 5;

/// Index in the `DROPS` per-CPU array: events lost because the ring buffer was full.
pub const DROP_RING_FULL: u32 = 0;
/// Index in the `DROPS` per-CPU array: pid map updates the kernel refused.
pub const DROP_MAP_UPDATE: u32 = 1;
/// Number of counters in the `DROPS` per-CPU array.
pub const DROP_COUNTERS: u32 = 2;

/// Offsets of the tracepoint fields the probe reads, parsed by user space from
/// `/sys/kernel/tracing/events/<category>/<name>/format` and written into the
/// program's read-only global `OFFSETS` before it loads. The probe never reads
/// kernel structs, only these records, so it needs no CO-RE.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointOffsets {
    /// `sched/sched_process_exec`: `pid_t old_pid`.
    pub exec_old_pid: u32,
    /// `sched/sched_process_fork`: `pid_t child_pid`.
    pub fork_child_pid: u32,
    /// `sched/sched_process_exit`: `bool group_dead`, or [`FIELD_ABSENT`] on kernels
    /// before it existed (the probe then treats a leader's exit as the group's).
    pub exit_group_dead: u32,
    /// `cgroup/cgroup_mkdir`: `int root`.
    pub mkdir_root: u32,
    /// `cgroup/cgroup_mkdir`: `int level`.
    pub mkdir_level: u32,
    /// `cgroup/cgroup_mkdir`: `u64 id`.
    pub mkdir_id: u32,
    /// `cgroup/cgroup_mkdir`: `__data_loc char[] path`.
    pub mkdir_path: u32,
    /// `cgroup/cgroup_rmdir`: `int root`.
    pub rmdir_root: u32,
    /// `cgroup/cgroup_rmdir`: `int level`.
    pub rmdir_level: u32,
    /// `cgroup/cgroup_rmdir`: `u64 id`.
    pub rmdir_id: u32,
    /// `cgroup/cgroup_rmdir`: `__data_loc char[] path`.
    pub rmdir_path: u32,
    /// `cgroup/cgroup_attach_task`: `int dst_root`.
    pub attach_dst_root: u32,
    /// `cgroup/cgroup_attach_task`: `u64 dst_id`.
    pub attach_dst_id: u32,
    /// `cgroup/cgroup_attach_task`: `int pid`.
    pub attach_pid: u32,
}

impl TracepointOffsets {
    /// Every field absent: what the object holds until user space overrides it.
    pub const UNSET: Self = Self {
        exec_old_pid: FIELD_ABSENT,
        fork_child_pid: FIELD_ABSENT,
        exit_group_dead: FIELD_ABSENT,
        mkdir_root: FIELD_ABSENT,
        mkdir_level: FIELD_ABSENT,
        mkdir_id: FIELD_ABSENT,
        mkdir_path: FIELD_ABSENT,
        rmdir_root: FIELD_ABSENT,
        rmdir_level: FIELD_ABSENT,
        rmdir_id: FIELD_ABSENT,
        rmdir_path: FIELD_ABSENT,
        attach_dst_root: FIELD_ABSENT,
        attach_dst_id: FIELD_ABSENT,
        attach_pid: FIELD_ABSENT,
    };
}

/// A process lifecycle event (exec, fork, exit, attach). See the `EVENT_*` constants for
/// what `pid`, `tgid` and `aux` mean per kind.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessEvent {
    pub kind: u32,
    pub pid: u32,
    pub tgid: u32,
    pub aux: u32,
    /// cgroup v2 id of the current task: the new image (exec), the parent, which
    /// the child inherits (fork), or the exiting task (exit).
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` at the event.
    pub ktime_ns: u64,
    /// `comm` of the current task, NUL-padded.
    pub comm: [u8; 16],
}

/// A cgroup v2 directory was created or removed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupEvent {
    pub kind: u32,
    /// Depth below the hierarchy root (the root is level 0).
    pub level: u32,
    /// cgroup id: the inode of the directory in the cgroup v2 mount.
    pub id: u64,
    /// Bytes of `path` before its NUL.
    pub path_len: u32,
    /// 1 when the kernel's path did not fit in `path`.
    pub truncated: u32,
    /// The path from the hierarchy root, as the kernel's `cgroup_path()` prints it.
    pub path: [u8; CGROUP_PATH_BYTES],
}

const _: () = assert!(core::mem::size_of::<TracepointOffsets>() == 56);
const _: () = assert!(core::mem::size_of::<ProcessEvent>() == 48);
const _: () = assert!(core::mem::size_of::<CgroupEvent>() == 24 + CGROUP_PATH_BYTES);
// Ring buffer records are 8-byte aligned; larger alignment cannot be honoured.
const _: () = assert!(core::mem::align_of::<ProcessEvent>() <= 8);
const _: () = assert!(core::mem::align_of::<CgroupEvent>() <= 8);
// The smallest ring the loader accepts is one page (4 KiB at least): the largest
// record, with the ring's 8-byte record header, must fit in it.
const _: () = assert!(core::mem::size_of::<CgroupEvent>() + 8 <= 4096);
const _: () = assert!(wakeup_bytes(RING_BUF_BYTES) == WAKEUP_BYTES);
const _: () = assert!(wakeup_bytes(4096) == 1024);

// SAFETY: all three are #[repr(C)] structs of plain integers with no padding
// (sizes asserted above), so every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for TracepointOffsets {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for ProcessEvent {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for CgroupEvent {}
