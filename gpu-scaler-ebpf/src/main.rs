//! The gpu-scaler probe. Built for the BPF target by gpu-scaler/build.rs; on the
//! host it compiles to an empty program so `cargo clippy --workspace` works.
//!
//! It keeps `PID_CGROUP` (task id -> cgroup v2 id) current from the scheduler's
//! exec/fork/exit tracepoints and streams those events, plus cgroup v2 mkdir/rmdir,
//! to user space through the `EVENTS` ring buffer. Tracepoint fields are read at
//! offsets user space parsed from tracefs and stored in `OFFSETS` before loading:
//! aya's Rust eBPF has no CO-RE, so the probe never reads a kernel struct.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod probe {
    use aya_ebpf::{
        EbpfContext as _,
        bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
        helpers::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
            bpf_ktime_get_ns, generated::bpf_probe_read_kernel_str,
        },
        macros::{map, tracepoint},
        maps::{LruHashMap, PerCpuArray, RingBuf},
        programs::TracePointContext,
    };
    use gpu_scaler_common::{
        CGROUP_PATH_BYTES, CGROUP2_HIERARCHY_ID, CgroupEvent, DROP_COUNTERS, DROP_MAP_UPDATE,
        DROP_RING_FULL, EVENT_ATTACH, EVENT_CGROUP_MKDIR, EVENT_CGROUP_RMDIR, EVENT_EXEC,
        EVENT_EXIT, EVENT_FORK, FIELD_ABSENT, MAX_TRACKED_PIDS, ProcessEvent, RING_BUF_BYTES,
        TracepointOffsets, WAKEUP_BYTES,
    };

    /// Overridden by the loader with the offsets of this kernel's tracepoint records.
    #[unsafe(no_mangle)]
    static OFFSETS: TracepointOffsets = TracepointOffsets::UNSET;

    /// Task id -> cgroup v2 id. Keys are tids: a thread's fork cannot be told apart
    /// from a process's in the tracepoint record, so threads get entries too, and
    /// each is removed when its task exits (a tgid key when its group dies).
    #[map]
    static PID_CGROUP: LruHashMap<u32, u64> = LruHashMap::with_max_entries(MAX_TRACKED_PIDS, 0);

    /// Overridden by the loader with `wakeup_bytes(size of EVENTS)`: the loader
    /// may resize the ring buffer (its max_entries) before creating it.
    #[unsafe(no_mangle)]
    static WAKEUP_AT: u64 = WAKEUP_BYTES;

    /// Default size; the loader sets the real one with `map_max_entries`.
    #[map]
    static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUF_BYTES, 0);

    /// Counters user space reads to report losses (`DROP_*` indices).
    #[map]
    static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DROP_COUNTERS, 0);

    #[inline(always)]
    fn offsets() -> TracepointOffsets {
        // Volatile: the value is patched into .rodata after compilation, so the
        // compiler must not fold the UNSET initialiser into the code.
        unsafe { core::ptr::read_volatile(&OFFSETS) }
    }

    #[inline(always)]
    fn count_drop(index: u32) {
        if let Some(counter) = DROPS.get_ptr_mut(index) {
            // Per-CPU slot, and tracepoint programs do not nest on one CPU.
            unsafe { *counter += 1 };
        }
    }

    /// Wake user space only once a batch has built up (see WAKEUP_BYTES).
    #[inline(always)]
    fn submit_flags() -> u64 {
        // Volatile for the same reason as OFFSETS.
        let wakeup_at = unsafe { core::ptr::read_volatile(&WAKEUP_AT) };
        if EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= wakeup_at {
            BPF_RB_FORCE_WAKEUP.into()
        } else {
            BPF_RB_NO_WAKEUP.into()
        }
    }

    #[inline(always)]
    fn track(pid: u32, cgroup_id: u64) {
        if PID_CGROUP.insert(pid, cgroup_id, 0).is_err() {
            count_drop(DROP_MAP_UPDATE);
        }
    }

    #[inline(always)]
    fn emit_process(kind: u32, pid: u32, tgid: u32, aux: u32, cgroup_id: u64) {
        let Some(mut entry) = EVENTS.reserve::<ProcessEvent>(0) else {
            count_drop(DROP_RING_FULL);
            return;
        };
        let comm = bpf_get_current_comm().unwrap_or([0; 16]);
        entry.write(ProcessEvent {
            kind,
            pid,
            tgid,
            aux,
            cgroup_id,
            ktime_ns: unsafe { bpf_ktime_get_ns() },
            comm,
        });
        entry.submit(submit_flags());
    }

    #[inline(always)]
    fn read_u32(ctx: &TracePointContext, offset: u32) -> Option<u32> {
        if offset == FIELD_ABSENT {
            return None;
        }
        unsafe { ctx.read_at::<u32>(offset as usize) }.ok()
    }

    #[tracepoint]
    pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tgid = (pid_tgid >> 32) as u32;
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        let old_pid = read_u32(&ctx, offsets().exec_old_pid).unwrap_or(tgid);
        if old_pid != tgid {
            // A non-leader thread exec'd and took over the group's id (de_thread).
            let _ = PID_CGROUP.remove(old_pid);
        }
        track(tgid, cgroup_id);
        emit_process(EVENT_EXEC, tgid, tgid, old_pid, cgroup_id);
        0
    }

    #[tracepoint]
    pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
        let Some(child) = read_u32(&ctx, offsets().fork_child_pid) else {
            return 0;
        };
        let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        // The child starts in its parent's cgroup. clone3(CLONE_INTO_CGROUP) is the
        // exception; the runtimes that use it exec the workload next, and the exec
        // event records the right cgroup.
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        track(child, cgroup_id);
        emit_process(EVENT_FORK, child, parent_tgid, 0, cgroup_id);
        0
    }

    #[tracepoint]
    pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
        let pid_tgid = bpf_get_current_pid_tgid();
        let tid = pid_tgid as u32;
        let tgid = (pid_tgid >> 32) as u32;
        let group_dead = match offsets().exit_group_dead {
            FIELD_ABSENT => tid == tgid,
            off => unsafe { ctx.read_at::<u8>(off as usize) }.unwrap_or(0) != 0,
        };
        if tid != tgid {
            let _ = PID_CGROUP.remove(tid);
        }
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        if group_dead {
            let _ = PID_CGROUP.remove(tgid);
            emit_process(EVENT_EXIT, tid, tgid, 1, cgroup_id);
        } else if tid != tgid {
            // A thread ended; its process lives on. User space drops the thread's
            // own entry (its fork made one).
            emit_process(EVENT_EXIT, tid, tgid, 0, cgroup_id);
        }
        // else: the leader ended before its threads; the tgid stays valid.
        0
    }

    #[inline(always)]
    fn cgroup_event(
        ctx: &TracePointContext,
        kind: u32,
        root: u32,
        level: u32,
        id: u32,
        path: u32,
    ) -> u32 {
        let Some(root) = read_u32(ctx, root) else {
            return 0;
        };
        if root as i32 != CGROUP2_HIERARCHY_ID {
            return 0; // a cgroup v1 hierarchy on a hybrid host
        }
        let (Some(level), Some(loc)) = (read_u32(ctx, level), read_u32(ctx, path)) else {
            return 0;
        };
        if id == FIELD_ABSENT {
            return 0;
        }
        let Ok(cgroup_id) = (unsafe { ctx.read_at::<u64>(id as usize) }) else {
            return 0;
        };
        let Some(mut entry) = EVENTS.reserve::<CgroupEvent>(0) else {
            count_drop(DROP_RING_FULL);
            return 0;
        };
        let ev = entry.as_mut_ptr();
        // __data_loc: low 16 bits are the string's offset in the record, high 16
        // bits its length including the NUL.
        let str_off = (loc & 0xffff) as usize;
        let str_len = loc >> 16;
        unsafe {
            (*ev).kind = kind;
            (*ev).level = level;
            (*ev).id = cgroup_id;
            let src = (ctx.as_ptr() as *const u8).add(str_off);
            let n = bpf_probe_read_kernel_str(
                (*ev).path.as_mut_ptr().cast(),
                CGROUP_PATH_BYTES as u32,
                src.cast(),
            );
            let copied = if n > 0 { n as u32 - 1 } else { 0 };
            (*ev).path_len = copied;
            (*ev).truncated = (n < 0 || str_len as usize > CGROUP_PATH_BYTES) as u32;
        }
        entry.submit(submit_flags());
        0
    }

    /// A task moved between cgroups without exec'ing (exec and fork events cannot
    /// see that): follow it, so a pid never keeps the cgroup it left.
    #[tracepoint]
    pub fn cgroup_attach_task(ctx: TracePointContext) -> u32 {
        let o = offsets();
        let Some(root) = read_u32(&ctx, o.attach_dst_root) else {
            return 0;
        };
        if root as i32 != CGROUP2_HIERARCHY_ID || o.attach_dst_id == FIELD_ABSENT {
            return 0;
        }
        let (Some(pid), Ok(cgroup_id)) = (read_u32(&ctx, o.attach_pid), unsafe {
            ctx.read_at::<u64>(o.attach_dst_id as usize)
        }) else {
            return 0;
        };
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        track(pid, cgroup_id);
        emit_process(EVENT_ATTACH, pid, tgid, 0, cgroup_id);
        0
    }

    #[tracepoint]
    pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
        let o = offsets();
        cgroup_event(
            &ctx,
            EVENT_CGROUP_MKDIR,
            o.mkdir_root,
            o.mkdir_level,
            o.mkdir_id,
            o.mkdir_path,
        )
    }

    #[tracepoint]
    pub fn cgroup_rmdir(ctx: TracePointContext) -> u32 {
        let o = offsets();
        cgroup_event(
            &ctx,
            EVENT_CGROUP_RMDIR,
            o.rmdir_root,
            o.rmdir_level,
            o.rmdir_id,
            o.rmdir_path,
        )
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 4] = *b"GPL\0";
}
