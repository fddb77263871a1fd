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
//! Device handles are `index + 1` cast to a pointer.

// The exported names and parameters are NVML's.
#![allow(non_snake_case)]
// Every export checks its pointers before writing through them.
#![allow(clippy::missing_safety_doc)]

#[path = "../../../gpu-scaler/src/gpu/scenario.rs"]
mod scenario;

use std::{
    ffi::{CStr, c_char, c_uint, c_ulonglong, c_void},
    path::PathBuf,
    sync::{Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use nvml_wrapper_sys::bindings::{
    NVML_VALUE_NOT_AVAILABLE, nvmlDevice_t, nvmlMemory_v2_t, nvmlProcessInfo_t,
    nvmlProcessUtilizationSample_t,
    nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED as DRIVER_NOT_LOADED,
    nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE as INSUFFICIENT_SIZE,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT as INVALID_ARGUMENT,
    nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED as NOT_SUPPORTED,
    nvmlReturn_enum_NVML_ERROR_UNINITIALIZED as UNINITIALIZED,
    nvmlReturn_enum_NVML_ERROR_UNKNOWN as UNKNOWN, nvmlReturn_enum_NVML_SUCCESS as SUCCESS,
    nvmlReturn_t, nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU as TEMPERATURE_GPU,
    nvmlUtilization_t,
};
use scenario::{Answer, Gpu, ProcessKind, ProcessOut, Scenario};

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
}

static STATE: Mutex<State> = Mutex::new(State {
    inits: 0,
    loaded: None,
});

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

/// Runs `f` on the GPU behind `device`.
fn with_gpu(
    device: nvmlDevice_t,
    f: impl FnOnce(&Gpu, u32) -> Result<(), nvmlReturn_t>,
) -> nvmlReturn_t {
    with_scenario(|loaded| {
        let index = (device as usize).checked_sub(1).ok_or(INVALID_ARGUMENT)?;
        let gpu = loaded.scenario.gpu.get(index).ok_or(INVALID_ARGUMENT)?;
        f(gpu, u32::try_from(index).map_err(|_| INVALID_ARGUMENT)?)
    })
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
            st.loaded = Some(loaded);
            if let Err(e) = r {
                return e;
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
        15 => c"GPU is lost",
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
    with_scenario(|loaded| {
        code(loaded.scenario.device(index))?;
        put(device, (index as usize + 1) as nvmlDevice_t)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, index| {
        put_str(uuid, length, &code(gpu.uuid(index))?)
    })
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| put_str(name, length, &code(gpu.name())?))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| {
        let (sm, mem) = code(gpu.utilization())?;
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
    with_gpu(device, |gpu, _| {
        let (used, total) = code(gpu.memory())?;
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
    with_gpu(device, |gpu, _| put(power, code(gpu.power_mw())?))
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
    with_gpu(device, |gpu, _| {
        let list = code(gpu.processes(kind))?
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
        put_array(count, infos, list)
    })
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

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetProcessUtilization(
    device: nvmlDevice_t,
    utilization: *mut nvmlProcessUtilizationSample_t,
    sample_count: *mut c_uint,
    last_seen: c_ulonglong,
) -> nvmlReturn_t {
    with_gpu(device, |gpu, _| {
        let samples = gpu.process_samples(last_seen, now_us());
        let samples = match samples {
            Ok(s) => s,
            Err(e) => {
                // NVML reports no samples with a zero count as well.
                put(sample_count, 0)?;
                return Err(e.code());
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
