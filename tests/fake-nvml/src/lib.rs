//! A fake `libnvidia-ml.so`: exports the NVML symbols gpu-scaler calls through
//! nvml-wrapper and answers them from a scenario file, the same format the
//! `mock` GPU source reads (see the README's "GPU scenario files"). Tests load it
//! with `--nvml-lib`, so the daemon's real NVML code runs without a GPU.
//!
//! The scenario file is `$FAKE_NVML_SCENARIO`, or else `fake-nvml.toml` next
//! to the loaded library file, which lets one test process load several copies
//! of the library, each with its own scenario and state. The file is read at
//! `nvmlInit_v2` and re-read on every `nvmlDeviceGetCount_v2` (once per sampling
//! pass) when its contents changed, so a test can change the load mid-run. A
//! malformed file is reported on stderr and the previous one stays in force.
//!
//! Device handles are `index + 1` cast to a pointer; a MIG instance's handle
//! adds `(slot + 1) << 16`. GPM samples are boxed [`GpmSampleData`].
//!
//! The fake is as unkind as a real driver (issue 11): the utilization size
//! query answers a fixed count (`utilization_size_query`, 100 by default),
//! MPS clients' samples carry the server's pid, MIG parent handles refuse
//! memory and process queries without `mig_monitor`, `late` processes appear
//! between a list's size query and its fill, `process_info_layout = "r535"`
//! writes 32-byte entries into a 24-byte array (bounded by the caller's
//! buffer, so garbled but never overrun), and `driver_reloads` makes handles
//! from an earlier init answer GPU_IS_LOST.

// The exported names and parameters are NVML's.
#![allow(non_snake_case)]
// Every export checks its pointers before writing through them.
#![allow(clippy::missing_safety_doc)]

// Some of its helpers serve only the mock source.
#[allow(dead_code)]
#[path = "../../../gpu-scaler/src/gpu/scenario.rs"]
mod scenario;

use std::{
    ffi::{CStr, c_char, c_int, c_uint, c_ulonglong, c_void},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use nvml_wrapper_sys::bindings::{
    NVML_VALUE_NOT_AVAILABLE, field_id, nvmlDevice_t, nvmlFieldValue_t,
    nvmlGpmMetricId_t_NVML_GPM_METRIC_SM_UTIL as GPM_SM_UTIL, nvmlGpmMetricsGet_t, nvmlGpmSample_t,
    nvmlGpmSupport_t, nvmlMemory_v2_t, nvmlPcieUtilCounter_enum_NVML_PCIE_UTIL_RX_BYTES as PCIE_RX,
    nvmlPcieUtilCounter_enum_NVML_PCIE_UTIL_TX_BYTES as PCIE_TX, nvmlProcessInfo_t,
    nvmlProcessUtilizationInfo_v1_t, nvmlProcessUtilizationSample_t,
    nvmlProcessesUtilizationInfo_t,
    nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED as DRIVER_NOT_LOADED,
    nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST as GPU_IS_LOST,
    nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE as INSUFFICIENT_SIZE,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT as INVALID_ARGUMENT,
    nvmlReturn_enum_NVML_ERROR_NOT_FOUND as NOT_FOUND,
    nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED as NOT_SUPPORTED,
    nvmlReturn_enum_NVML_ERROR_UNINITIALIZED as UNINITIALIZED,
    nvmlReturn_enum_NVML_ERROR_UNKNOWN as UNKNOWN, nvmlReturn_enum_NVML_SUCCESS as SUCCESS,
    nvmlReturn_t, nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU as TEMPERATURE_GPU,
    nvmlUtilization_t, nvmlValueType_enum_NVML_VALUE_TYPE_UNSIGNED_LONG_LONG as VALUE_U64,
};
use scenario::{
    Answer, EnergyMeters, Gpu, MigInstance, ProcessInfoLayout, ProcessKind, ProcessOut, Scenario,
    Session,
};

/// Environment variable naming the scenario file.
pub const SCENARIO_ENV: &str = "FAKE_NVML_SCENARIO";
/// File name looked for next to the library when [`SCENARIO_ENV`] is unset.
pub const SIBLING_SCENARIO: &str = "fake-nvml.toml";

/// NVML's "no MIG instance" id.
const NO_INSTANCE: u32 = 0xFFFF_FFFF;

struct Loaded {
    path: PathBuf,
    bytes: Vec<u8>,
    scenario: Scenario,
}

struct State {
    /// nvmlInit_v2 calls not yet matched by nvmlShutdown (NVML refcounts).
    inits: u32,
    loaded: Option<Loaded>,
    /// The scenario's `driver_reloads` when the library was first
    /// initialised (inits 0 -> 1): handles from then on are lost once it grows.
    generation: u32,
    session: Option<Session>,
    /// The energy counters: they count since the driver loaded, so they
    /// outlive sessions (and restart when `driver_reloads` grows).
    meters: Option<EnergyMeters>,
}

static STATE: Mutex<State> = Mutex::new(State {
    inits: 0,
    loaded: None,
    generation: 0,
    session: None,
    meters: None,
});

/// One GPM sample: what `nvmlGpmMigSampleGet` recorded.
#[derive(Clone, Copy, Debug, Default)]
pub struct GpmSampleData {
    /// SM activity % of the instance when the sample was taken.
    sm_util: Option<u32>,
    taken: bool,
}

fn state() -> MutexGuard<'static, State> {
    // A panic cannot cross the C ABI (it aborts), so poisoning is only ever
    // left by a test thread; the state itself is always consistent.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

fn code<T>(answer: Answer<T>) -> Result<T, nvmlReturn_t> {
    answer.map_err(|kind| kind.code())
}

fn ret(r: Result<(), nvmlReturn_t>) -> nvmlReturn_t {
    r.err().unwrap_or(SUCCESS)
}

/// The scenario file: `$FAKE_NVML_SCENARIO`, or `fake-nvml.toml` beside this library.
fn scenario_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(SCENARIO_ENV) {
        return Some(p.into());
    }
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address and fills `info`.
    // A private function's address: taking an exported one would make the
    // library reference its own symbol by name, which tests rename away.
    let found = unsafe { libc::dladdr(scenario_path as *const c_void, &mut info) };
    if found == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dladdr returned a NUL-terminated path owned by the loader.
    let lib = unsafe { CStr::from_ptr(info.dli_fname) };
    let lib = PathBuf::from(lib.to_string_lossy().into_owned());
    Some(lib.parent()?.join(SIBLING_SCENARIO))
}

fn load(path: PathBuf) -> Result<Loaded, String> {
    let bytes =
        std::fs::read(&path).map_err(|e| format!("reading scenario {}: {e}", path.display()))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| format!("scenario {}: not UTF-8: {e}", path.display()))?;
    let scenario =
        Scenario::parse(text).map_err(|e| format!("scenario {}: {e}", path.display()))?;
    Ok(Loaded {
        path,
        bytes,
        scenario,
    })
}

/// Re-reads the scenario if the file's contents changed; keeps the old one if
/// the new one is unreadable.
fn refresh(loaded: &mut Loaded) {
    let Ok(bytes) = std::fs::read(&loaded.path) else {
        return;
    };
    if bytes == loaded.bytes {
        return;
    }
    match load(loaded.path.clone()) {
        Ok(new) => *loaded = new,
        Err(e) => {
            eprintln!("fake-nvml: keeping the previous scenario: {e}");
            loaded.bytes = bytes;
        }
    }
}

/// Runs `f` on the initialized library's scenario.
fn with_scenario(f: impl FnOnce(&mut Loaded) -> Result<(), nvmlReturn_t>) -> nvmlReturn_t {
    let mut st = state();
    if st.inits == 0 {
        return UNINITIALIZED;
    }
    match st.loaded.as_mut() {
        Some(loaded) => ret(f(loaded)),
        None => UNINITIALIZED,
    }
}

/// What a device handle names.
struct Target<'a> {
    gpu: &'a Gpu,
    index: u32,
    /// The MIG instance, for an instance's handle.
    instance: Option<&'a MigInstance>,
}

impl Target<'_> {
    fn gi(&self) -> Option<u32> {
        self.instance.map(|i| i.gpu_instance_id)
    }
}

fn handle(index: u32, slot: Option<usize>) -> nvmlDevice_t {
    ((index as usize + 1) | slot.map_or(0, |s| (s + 1) << 16)) as nvmlDevice_t
}

/// Runs `f` on the GPU (or MIG instance) behind `device`, with the session.
fn with_device(
    device: nvmlDevice_t,
    f: impl FnOnce(&Target<'_>, &mut Session) -> Result<(), nvmlReturn_t>,
) -> nvmlReturn_t {
    with_device_metered(device, |t, session, _| f(t, session))
}

/// As [`with_device`], with the energy counters and the scenario's
/// `driver_reloads`.
fn with_device_metered(
    device: nvmlDevice_t,
    f: impl FnOnce(&Target<'_>, &mut Session, (&mut EnergyMeters, u32)) -> Result<(), nvmlReturn_t>,
) -> nvmlReturn_t {
    let mut st = state();
    if st.inits == 0 {
        return UNINITIALIZED;
    }
    let generation = st.generation;
    let State {
        loaded,
        session,
        meters,
        ..
    } = &mut *st;
    let meters = meters.get_or_insert_with(EnergyMeters::default);
    let (Some(loaded), Some(session)) = (loaded.as_ref(), session.as_mut()) else {
        return UNINITIALIZED;
    };
    let raw = device as usize;
    let index = (raw & 0xffff).checked_sub(1);
    let slot = (raw >> 16).checked_sub(1);
    let r = (|| {
        let index = index.ok_or(INVALID_ARGUMENT)?;
        let gpu = loaded.scenario.gpu.get(index).ok_or(INVALID_ARGUMENT)?;
        if loaded.scenario.driver_reloads != generation {
            // The kernel driver was reloaded under this handle.
            return Err(GPU_IS_LOST);
        }
        let instance = match slot {
            None => None,
            Some(slot) => Some(code(gpu.instances())?.get(slot).ok_or(INVALID_ARGUMENT)?),
        };
        let target = Target {
            gpu,
            index: u32::try_from(index).map_err(|_| INVALID_ARGUMENT)?,
            instance,
        };
        f(&target, session, (meters, loaded.scenario.driver_reloads))
    })();
    ret(r)
}

/// Runs `f` on the GPU behind `device` (not a MIG instance's handle).
fn with_gpu(
    device: nvmlDevice_t,
    f: impl FnOnce(&Gpu, u32) -> Result<(), nvmlReturn_t>,
) -> nvmlReturn_t {
    with_device(device, |t, _| f(t.gpu, t.index))
}

/// `*out = v`, after checking `out`.
fn put<T>(out: *mut T, v: T) -> Result<(), nvmlReturn_t> {
    if out.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    // SAFETY: non-null; NVML's contract makes it point to a T.
    unsafe { out.write(v) };
    Ok(())
}

/// Copies `s` and a NUL into `buf` of `len` bytes.
fn put_str(buf: *mut c_char, len: c_uint, s: &str) -> Result<(), nvmlReturn_t> {
    if buf.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    if s.len() + 1 > len as usize {
        return Err(INSUFFICIENT_SIZE);
    }
    // SAFETY: the caller's buffer holds `len` >= s.len() + 1 bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(s.as_ptr().cast::<c_char>(), buf, s.len());
        buf.add(s.len()).write(0);
    }
    Ok(())
}

/// NVML's two-call array protocol: with too small a buffer (or none) report
/// the size needed and INSUFFICIENT_SIZE; otherwise fill it.
fn put_array<T>(count: *mut c_uint, out: *mut T, items: Vec<T>) -> Result<(), nvmlReturn_t> {
    if count.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    let n = c_uint::try_from(items.len()).map_err(|_| UNKNOWN)?;
    // SAFETY: checked non-null above.
    let capacity = unsafe { count.read() };
    // SAFETY: as above.
    unsafe { count.write(n) };
    if n == 0 {
        return Ok(());
    }
    if out.is_null() || capacity < n {
        return Err(INSUFFICIENT_SIZE);
    }
    for (i, item) in items.into_iter().enumerate() {
        // SAFETY: the caller's array holds `capacity` >= n elements.
        unsafe { out.add(i).write(item) };
    }
    Ok(())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    init()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    init()
}

fn init() -> nvmlReturn_t {
    let mut st = state();
    let Some(path) = scenario_path() else {
        eprintln!("fake-nvml: no scenario: set {SCENARIO_ENV}");
        return DRIVER_NOT_LOADED;
    };
    let fresh = match st.loaded.take() {
        Some(mut loaded) if loaded.path == path => {
            refresh(&mut loaded);
            Ok(loaded)
        }
        _ => load(path),
    };
    match fresh {
        Ok(loaded) => {
            let r = code(loaded.scenario.init());
            let generation = loaded.scenario.driver_reloads;
            st.loaded = Some(loaded);
            if let Err(e) = r {
                return e;
            }
            if st.inits == 0 {
                st.generation = generation;
                st.session = Some(Session::default());
            }
            st.inits += 1;
            SUCCESS
        }
        Err(e) => {
            eprintln!("fake-nvml: {e}");
            if e.starts_with("reading") {
                DRIVER_NOT_LOADED
            } else {
                UNKNOWN
            }
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    let mut st = state();
    if st.inits == 0 {
        return UNINITIALIZED;
    }
    st.inits -= 1;
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let s: &'static CStr = match result {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        9 => c"Driver Not Loaded",
        13 => c"Function Not Found",
        15 => c"GPU is lost",
        18 => c"RM has detected an NVML/RM version mismatch",
        21 => c"No data",
        _ => c"Unknown Error",
    };
    s.as_ptr()
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_scenario(|loaded| {
        let v = loaded
            .scenario
            .driver_version
            .as_deref()
            .unwrap_or("999.99-fake");
        put_str(version, length, v)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(device_count: *mut c_uint) -> nvmlReturn_t {
    with_scenario(|loaded| {
        refresh(loaded);
        put(device_count, code(loaded.scenario.device_count())?)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let generation = state().generation;
    with_scenario(|loaded| {
        code(loaded.scenario.device(index))?;
        if loaded.scenario.driver_reloads != generation {
            return Err(GPU_IS_LOST);
        }
        put(device, handle(index, None))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        let u = match t.gi() {
            Some(gi) => code(t.gpu.instance_uuid(t.index, gi))?,
            None => code(t.gpu.uuid(t.index))?,
        };
        put_str(uuid, length, &u)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        let n = match t.gi() {
            Some(gi) => code(t.gpu.instance_name(gi))?,
            None => code(t.gpu.name())?,
        };
        put_str(name, length, &n)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        if t.instance.is_some() {
            return Err(NOT_SUPPORTED);
        }
        let (sm, mem) = code(t.gpu.utilization())?;
        put(
            utilization,
            nvmlUtilization_t {
                gpu: sm,
                memory: mem,
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        let (used, total) = match t.gi() {
            Some(gi) => code(t.gpu.instance_memory(gi))?,
            None => code(t.gpu.memory())?,
        };
        if memory.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        // SAFETY: non-null; the caller set `version` in it.
        let version = unsafe { (*memory).version };
        put(
            memory,
            nvmlMemory_v2_t {
                version,
                total,
                reserved: 0,
                free: total.saturating_sub(used),
                used,
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor: c_uint,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| {
        if sensor != TEMPERATURE_GPU {
            return Err(NOT_SUPPORTED);
        }
        put(temp, code(gpu.temperature())?)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| put(power, code(gpu.power_mw(now_us()))?))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetEnforcedPowerLimit(
    device: nvmlDevice_t,
    limit: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| put(limit, code(gpu.power_limit_mw())?))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current: *mut c_uint,
    pending: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| {
        let mode = c_uint::from(code(gpu.mig_enabled())?);
        put(current, mode)?;
        put(pending, mode)
    })
}

fn process_list(
    device: nvmlDevice_t,
    kind: ProcessKind,
    count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    let layout = {
        let st = state();
        st.loaded
            .as_ref()
            .map_or(ProcessInfoLayout::V3, |l| l.scenario.process_info_layout)
    };
    with_device(device, |t, session| {
        let size_query = infos.is_null();
        let list: Vec<nvmlProcessInfo_t> =
            code(
                t.gpu
                    .processes_seen(kind, t.index, t.gi(), size_query, session),
            )?
            .into_iter()
            .map(|p: ProcessOut| nvmlProcessInfo_t {
                pid: p.pid,
                // NVML's -1 "not available", as an unsigned long long.
                usedGpuMemory: p
                    .used_memory_bytes
                    .unwrap_or(NVML_VALUE_NOT_AVAILABLE as c_ulonglong),
                gpuInstanceId: p.gpu_instance_id.unwrap_or(NO_INSTANCE),
                computeInstanceId: p.gpu_instance_id.map_or(NO_INSTANCE, |_| 0),
            })
            .collect();
        match layout {
            ProcessInfoLayout::V3 => put_array(count, infos, list),
            ProcessInfoLayout::R535 => put_r535(count, infos, list),
        }
    })
}

/// The array protocol of drivers 535.43-535.86: 32-byte entries (an extra
/// `usedGpuCcProtectedMemory`) into the caller's array of 24-byte ones. The
/// real driver writes past the end of an exact-size array; the fake stops at
/// its end so the test process survives, and the entries are as garbled.
fn put_r535(
    count: *mut c_uint,
    out: *mut nvmlProcessInfo_t,
    items: Vec<nvmlProcessInfo_t>,
) -> Result<(), nvmlReturn_t> {
    if count.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    let n = c_uint::try_from(items.len()).map_err(|_| UNKNOWN)?;
    // SAFETY: checked non-null above.
    let capacity = unsafe { count.read() };
    // SAFETY: as above.
    unsafe { count.write(n) };
    if n == 0 {
        return Ok(());
    }
    if out.is_null() || capacity < n {
        return Err(INSUFFICIENT_SIZE);
    }
    let limit = capacity as usize * std::mem::size_of::<nvmlProcessInfo_t>();
    let mut bytes = Vec::with_capacity(items.len() * 32);
    for p in items {
        bytes.extend_from_slice(&p.pid.to_ne_bytes());
        bytes.extend_from_slice(&[0; 4]);
        bytes.extend_from_slice(&p.usedGpuMemory.to_ne_bytes());
        bytes.extend_from_slice(&p.gpuInstanceId.to_ne_bytes());
        bytes.extend_from_slice(&p.computeInstanceId.to_ne_bytes());
        bytes.extend_from_slice(&0u64.to_ne_bytes());
    }
    bytes.truncate(limit);
    // SAFETY: the caller's array holds `limit` bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast::<u8>(), bytes.len()) };
    Ok(())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    process_list(device, ProcessKind::Compute, info_count, infos)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGraphicsRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    process_list(device, ProcessKind::Graphics, info_count, infos)
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMPSComputeRunningProcesses_v3(
    device: nvmlDevice_t,
    info_count: *mut c_uint,
    infos: *mut nvmlProcessInfo_t,
) -> nvmlReturn_t {
    process_list(device, ProcessKind::Mps, info_count, infos)
}

/// The samples of one utilization fill call, counted as one query.
fn samples_for(
    t: &Target<'_>,
    session: &mut Session,
    last_seen: u64,
) -> Result<Vec<scenario::SampleOut>, nvmlReturn_t> {
    if t.instance.is_some() {
        return Err(NOT_SUPPORTED);
    }
    let query = session.next_query(t.index);
    code(t.gpu.process_samples(last_seen, now_us(), query))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    sample_count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    with_device(device, |t, session| {
        if sample_count.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        if utilization.is_null() {
            // The size query. Real drivers answer a fixed count whatever
            // there is, even when idle.
            code(t.gpu.errors.process_utilization.map_or(Ok(()), Err))?;
            if t.instance.is_some() || t.gpu.mig {
                return Err(NOT_SUPPORTED);
            }
            let n = t.gpu.utilization_size_query;
            if n > 0 {
                put(sample_count, n)?;
                return Err(INSUFFICIENT_SIZE);
            }
        }
        let samples = match samples_for(t, session, last_seen) {
            Ok(s) => s,
            Err(e) => {
                // NVML reports no samples with a zero count as well.
                put(sample_count, 0)?;
                return Err(e);
            }
        };
        let list = samples
            .into_iter()
            .map(|s| nvmlProcessUtilizationSample_t {
                pid: s.pid,
                timeStamp: s.timestamp_us,
                smUtil: s.sm_util,
                memUtil: s.mem_util,
                encUtil: 0,
                decUtil: 0,
            })
            .collect();
        put_array(sample_count, utilization, list)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessesUtilizationInfo(
    device: nvmlDevice_t,
    info: *mut nvmlProcessesUtilizationInfo_t,
) -> nvmlReturn_t {
    with_device(device, |t, session| {
        if info.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        if !t.gpu.processes_utilization_info {
            return Err(NOT_SUPPORTED);
        }
        // SAFETY: non-null; the caller owns the struct.
        let info = unsafe { &mut *info };
        if info.version != PROCESSES_UTILIZATION_INFO_V1 {
            return Err(25); // NVML_ERROR_ARGUMENT_VERSION_MISMATCH
        }
        if info.procUtilArray.is_null() {
            code(t.gpu.errors.process_utilization.map_or(Ok(()), Err))?;
            if t.instance.is_some() || t.gpu.mig {
                return Err(NOT_SUPPORTED);
            }
            let n = t.gpu.utilization_size_query;
            if n > 0 {
                info.processSamplesCount = n;
                return Err(INSUFFICIENT_SIZE);
            }
        }
        let samples = match samples_for(t, session, info.lastSeenTimeStamp) {
            Ok(s) => s,
            Err(e) => {
                info.processSamplesCount = 0;
                return Err(e);
            }
        };
        let list = samples
            .into_iter()
            .map(|s| nvmlProcessUtilizationInfo_v1_t {
                timeStamp: s.timestamp_us,
                pid: s.pid,
                smUtil: s.sm_util,
                memUtil: s.mem_util,
                encUtil: 0,
                decUtil: 0,
                jpgUtil: 0,
                ofaUtil: 0,
            })
            .collect();
        put_array(&mut info.processSamplesCount, info.procUtilArray, list)
    })
}

/// NVML_STRUCT_VERSION(ProcessesUtilizationInfo, 1).
const PROCESSES_UTILIZATION_INFO_V1: c_uint =
    std::mem::size_of::<nvmlProcessesUtilizationInfo_t>() as c_uint | (1 << 24);

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetProcessName(
    pid: c_uint,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_scenario(|loaded| put_str(name, length, &code(loaded.scenario.process_name(pid))?))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPcieThroughput(
    device: nvmlDevice_t,
    counter: c_uint,
    value: *mut c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| {
        let (tx, rx) = code(gpu.pcie_kbps())?;
        match counter {
            PCIE_TX => put(value, tx),
            PCIE_RX => put(value, rx),
            _ => Err(INVALID_ARGUMENT),
        }
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetFieldValues(
    device: nvmlDevice_t,
    values_count: c_int,
    values: *mut nvmlFieldValue_t,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| {
        let n = usize::try_from(values_count).map_err(|_| INVALID_ARGUMENT)?;
        if values.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        let now = now_us();
        // SAFETY: the caller's array holds `values_count` entries.
        let values = unsafe { std::slice::from_raw_parts_mut(values, n) };
        for v in values {
            v.timestamp = i64::try_from(now).unwrap_or(i64::MAX);
            v.latencyUsec = 0;
            let counters = gpu.nvlink_kib(now);
            let value = match v.fieldId {
                field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX => counters.map(|c| c.0),
                field_id::NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX => counters.map(|c| c.1),
                _ => Err(scenario::NvmlErrorKind::NotSupported),
            };
            match value {
                Ok(x) => {
                    v.nvmlReturn = SUCCESS;
                    v.valueType = VALUE_U64;
                    v.value.ullVal = x;
                }
                Err(e) => v.nvmlReturn = e.code(),
            }
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTotalEnergyConsumption(
    device: nvmlDevice_t,
    energy: *mut c_ulonglong,
) -> nvmlReturn_t {
    with_device_metered(device, |t, _, (meters, reloads)| {
        if t.instance.is_some() {
            // Like the real driver: the counter is the whole board's.
            return Err(NOT_SUPPORTED);
        }
        put(
            energy,
            code(t.gpu.energy_mj(t.index, now_us(), reloads, meters))?,
        )
    })
}

/// MIG slots per GPU, as an A100 or H100 has.
const MIG_SLOTS: c_uint = 7;

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        if t.instance.is_some() || !t.gpu.mig {
            return Err(NOT_SUPPORTED);
        }
        put(count, MIG_SLOTS)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig_device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        if t.instance.is_some() || !t.gpu.mig {
            return Err(NOT_SUPPORTED);
        }
        let instances = code(t.gpu.instances())?;
        let slot = index as usize;
        if slot >= instances.len() {
            return Err(NOT_FOUND);
        }
        put(mig_device, handle(t.index, Some(slot)))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    with_device(mig_device, |t, _| {
        if t.instance.is_none() {
            return Err(INVALID_ARGUMENT);
        }
        put(device, handle(t.index, None))
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        put(id, t.instance.ok_or(INVALID_ARGUMENT)?.gpu_instance_id)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        put(id, t.instance.ok_or(INVALID_ARGUMENT)?.compute_instance_id)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmQueryDeviceSupport(
    device: nvmlDevice_t,
    support: *mut nvmlGpmSupport_t,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        if support.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        // SAFETY: non-null; the caller set `version`.
        let version = unsafe { (*support).version };
        put(
            support,
            nvmlGpmSupport_t {
                version,
                isSupportedDevice: c_uint::from(t.gpu.gpm && t.instance.is_none()),
            },
        )
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleAlloc(sample: *mut nvmlGpmSample_t) -> nvmlReturn_t {
    let boxed = Box::into_raw(Box::new(GpmSampleData::default()));
    ret(put(sample, boxed.cast()))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmSampleFree(sample: nvmlGpmSample_t) -> nvmlReturn_t {
    if sample.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: allocated by nvmlGpmSampleAlloc and freed once, as NVML requires.
    drop(unsafe { Box::from_raw(sample.cast::<GpmSampleData>()) });
    SUCCESS
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMigSampleGet(
    device: nvmlDevice_t,
    gpu_instance_id: c_uint,
    sample: nvmlGpmSample_t,
) -> nvmlReturn_t {
    with_device(device, |t, _| {
        if sample.is_null() || t.instance.is_some() {
            return Err(INVALID_ARGUMENT);
        }
        let sm = code(t.gpu.gpm_sm_util(gpu_instance_id))?;
        // SAFETY: a sample from nvmlGpmSampleAlloc.
        unsafe {
            sample.cast::<GpmSampleData>().write(GpmSampleData {
                sm_util: Some(sm),
                taken: true,
            });
        }
        Ok(())
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlGpmMetricsGet(request: *mut nvmlGpmMetricsGet_t) -> nvmlReturn_t {
    if request.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: non-null; the caller owns the request.
    let request = unsafe { &mut *request };
    if request.sample1.is_null() || request.sample2.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: samples from nvmlGpmSampleAlloc.
    let (first, second) = unsafe {
        (
            *request.sample1.cast::<GpmSampleData>(),
            *request.sample2.cast::<GpmSampleData>(),
        )
    };
    if !first.taken || !second.taken {
        return INVALID_ARGUMENT;
    }
    let n = (request.numMetrics as usize).min(request.metrics.len());
    for m in &mut request.metrics[..n] {
        m.metricInfo.shortName = c"sm_util".as_ptr().cast_mut();
        m.metricInfo.longName = c"SM utilization".as_ptr().cast_mut();
        m.metricInfo.unit = c"%".as_ptr().cast_mut();
        match (m.metricId, second.sm_util) {
            (GPM_SM_UTIL, Some(sm)) => {
                m.nvmlReturn = SUCCESS;
                m.value = f64::from(sm);
            }
            _ => m.nvmlReturn = NOT_SUPPORTED,
        }
    }
    SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_protocol_reports_the_size_then_fills() {
        let mut count: c_uint = 0;
        assert_eq!(
            put_array(&mut count, std::ptr::null_mut(), vec![1u32, 2, 3]),
            Err(INSUFFICIENT_SIZE)
        );
        assert_eq!(count, 3);
        let mut buf = [0u32; 5];
        count = 5;
        assert_eq!(
            put_array(&mut count, buf.as_mut_ptr(), vec![1u32, 2, 3]),
            Ok(())
        );
        assert_eq!((count, &buf[..3]), (3, &[1, 2, 3][..]));
        count = 0;
        assert_eq!(
            put_array(&mut count, std::ptr::null_mut(), Vec::<u32>::new()),
            Ok(())
        );
    }

    #[test]
    fn strings_are_nul_terminated_and_bounded() {
        let mut buf = [0x7f as c_char; 4];
        assert_eq!(put_str(buf.as_mut_ptr(), 4, "abcd"), Err(INSUFFICIENT_SIZE));
        assert_eq!(put_str(buf.as_mut_ptr(), 4, "abc"), Ok(()));
        // SAFETY: put_str wrote a NUL inside the buffer.
        assert_eq!(unsafe { CStr::from_ptr(buf.as_ptr()) }, c"abc");
    }

    #[test]
    fn calls_before_init_are_uninitialized() {
        let mut n: c_uint = 0;
        // SAFETY: valid pointer; the fake is not initialized in this process.
        unsafe {
            assert_eq!(nvmlDeviceGetCount_v2(&mut n), UNINITIALIZED);
            assert_eq!(nvmlShutdown(), UNINITIALIZED);
        }
    }
}
