//! Loading the probe: the object embedded by build.rs, loaded with this kernel's
//! tracepoint offsets (from tracefs) and the chosen ring buffer size, its
//! programs attached to their tracepoints, and its maps taken out with the sizes
//! the kernel reports. Nothing here reads events or touches the tracker.

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};

use super::{
    super::{Error, Result, tracefs},
    RingBufferSize,
};

/// The probe object built by gpu-scaler/build.rs; absent in a
/// `GPU_SCALER_NO_EBPF=1` build.
#[cfg(not(gpu_scaler_no_ebpf))]
static PROBE: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/gpu-scaler-probe"
)));
#[cfg(gpu_scaler_no_ebpf)]
static PROBE: Option<&[u8]> = None;

/// Capacity of the probe's pid -> cgroup LRU map.
pub const PID_MAP_CAPACITY: u32 = gpu_scaler_common::MAX_TRACKED_PIDS;

/// Whether this binary has the probe embedded.
pub fn probe_embedded() -> bool {
    PROBE.is_some()
}

/// (program name in the object, tracepoint category, tracepoint name)
pub(super) const PROGRAMS: [(&str, &str, &str); 6] = [
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("cgroup_mkdir", "cgroup", "cgroup_mkdir"),
    ("cgroup_rmdir", "cgroup", "cgroup_rmdir"),
    // Not enough alone (it misses clone3(CLONE_INTO_CGROUP), which runc and crun
    // use), but it catches moves without exec, which the other events miss.
    ("cgroup_attach_task", "cgroup", "cgroup_attach_task"),
];

/// The kernel's pid -> cgroup id map.
pub(super) type PidMap = BpfHashMap<MapData, u32, u64>;

/// The attached probe and the maps user space reads.
pub(super) struct Loaded {
    /// Holds the programs (and their links): dropping it detaches the probe.
    pub ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    /// The ring's size as the kernel reports it.
    pub ring_buffer_bytes: u32,
    pub pid_map: PidMap,
    /// The pid map's max_entries as the kernel reports it.
    pub pid_map_capacity: u32,
    /// Per-CPU loss counters, indexed by `DROP_*`.
    pub drops: PerCpuArray<MapData, u64>,
}

/// Loads the embedded probe with an event ring buffer of `ring` bytes and
/// attaches every program in [`PROGRAMS`].
pub(super) fn load(ring: RingBufferSize) -> Result<Loaded> {
    let Some(probe) = PROBE else {
        return Err(Error::EbpfUnavailable(
            "this binary was built with GPU_SCALER_NO_EBPF=1 and has no probe embedded".into(),
        ));
    };
    raise_memlock_limit();
    let tracefs = tracefs::ensure_mounted()?;
    let offsets = tracefs::Formats::read(&tracefs)?.offsets()?;
    tracing::debug!(?offsets, tracefs = %tracefs.display(), "tracepoint offsets");
    let wakeup_at = gpu_scaler_common::wakeup_bytes(ring.bytes());
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &offsets, true)
        .override_global("WAKEUP_AT", &wakeup_at, true)
        .map_max_entries("EVENTS", ring.bytes())
        .load(probe)
        .map_err(|source| Error::Load { source })?;
    for (program, category, name) in PROGRAMS {
        let tp: &mut TracePoint = ebpf
            .program_mut(program)
            .ok_or_else(|| Error::ProbeObject(format!("no program {program}")))?
            .try_into()
            .map_err(program_err("loading", program))?;
        tp.load().map_err(program_err("loading", program))?;
        tp.attach(category, name)
            .map_err(program_err("attaching", program))?;
    }
    let ring = take_map(&mut ebpf, "EVENTS")?;
    let ring_buffer_bytes = max_entries("EVENTS", &ring)?;
    let ring = RingBuf::try_from(ring).map_err(map_err("EVENTS"))?;
    let pid_map = take_map(&mut ebpf, "PID_CGROUP")?;
    let pid_map_capacity = max_entries("PID_CGROUP", &pid_map)?;
    let pid_map: PidMap = BpfHashMap::try_from(pid_map).map_err(map_err("PID_CGROUP"))?;
    let drops = PerCpuArray::try_from(take_map(&mut ebpf, "DROPS")?).map_err(map_err("DROPS"))?;
    Ok(Loaded {
        ebpf,
        ring,
        ring_buffer_bytes,
        pid_map,
        pid_map_capacity,
        drops,
    })
}

/// Per program in [`PROGRAMS`]: (name, runs, total time in the program).
pub(super) fn program_stats(ebpf: &Ebpf) -> Vec<(&'static str, u64, std::time::Duration)> {
    PROGRAMS
        .iter()
        .filter_map(|(name, _, _)| {
            let info = ebpf.program(name)?.info().ok()?;
            Some((*name, info.run_count(), info.run_time()))
        })
        .collect()
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .ok_or_else(|| Error::ProbeObject(format!("no {name} map")))
}

/// Keeps aya's error as the source: its Display has the verifier log, its
/// type the cause (an operator's `{:#}` and a test's downcast both see it).
fn program_err(
    action: &'static str,
    program: &'static str,
) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| Error::Program {
        action,
        program,
        source,
    }
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// max_entries of the map `name`, as the kernel reports it (a ring buffer's is
/// its size in bytes).
fn max_entries(name: &'static str, map: &Map) -> Result<u32> {
    let data = match map {
        Map::LruHashMap(d) | Map::HashMap(d) | Map::RingBuf(d) => d,
        other => return Err(Error::ProbeObject(format!("unexpected map {other:?}"))),
    };
    data.info().map(|i| i.max_entries()).map_err(map_err(name))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the
/// memory cgroup); raising it is harmless where it no longer matters.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not raise RLIMIT_MEMLOCK");
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use aya::{maps::MapError, programs::ProgramError};

    use super::*;

    #[test]
    fn a_program_error_names_the_step_and_keeps_ayas_error_as_its_source() {
        let e = program_err("attaching", "sched_process_fork")(ProgramError::AlreadyAttached);
        assert_eq!(
            e.to_string(),
            "eBPF attribution is not available: attaching sched_process_fork: \
             the program was already attached"
        );
        let source = e
            .source()
            .and_then(|s| s.downcast_ref::<ProgramError>())
            .expect("aya's ProgramError is the source");
        assert!(
            matches!(source, ProgramError::AlreadyAttached),
            "{source:?}"
        );
    }

    #[test]
    fn a_map_error_names_the_map_and_keeps_ayas_error_as_its_source() {
        let e = map_err("PID_CGROUP")(MapError::InvalidMapType { map_type: 99 });
        assert_eq!(
            e.to_string(),
            "eBPF attribution is not available: map PID_CGROUP: invalid map type 99"
        );
        let source = e
            .source()
            .and_then(|s| s.downcast_ref::<MapError>())
            .expect("aya's MapError is the source");
        assert!(
            matches!(source, MapError::InvalidMapType { map_type: 99 }),
            "{source:?}"
        );
    }
}
