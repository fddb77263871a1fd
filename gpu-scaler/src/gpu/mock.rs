//! The `mock` source: GPUs described by a scenario file (see [`super::scenario`]),
//! re-read whenever its contents change, so a load curve can be scripted by
//! rewriting the file. Answers go through the same collector as NVML's.

use std::{
    cell::RefCell,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use nvml_wrapper::{
    enums::device::UsedGpuMemory,
    error::NvmlError,
    struct_wrappers::device::{ProcessInfo, ProcessUtilizationSample},
};

use super::{
    Error, GpuSnapshot, GpuSource, ProcessKind, Result,
    collector::{Collector, Driver, DriverDevice, NvResult, Samples},
    scenario::{self, Answer, EnergyMeters, Gpu, MigInstance, ParseError, Scenario, Session},
};

/// Serves a scenario file. A file that does not parse is an error for every
/// poll until it is fixed; the poller keeps the last good snapshot meanwhile.
pub struct MockSource {
    path: PathBuf,
    /// The file's bytes as last read, and what they parsed to.
    loaded: Option<(Vec<u8>, std::result::Result<Scenario, ParseError>)>,
    collector: Collector,
    /// The scenario's `driver_reloads` when the mock "initialised NVML": as
    /// with the real library, handles from before a reload are lost until the
    /// source initialises again.
    generation: Option<u32>,
    session: RefCell<Session>,
    /// The energy counters, which outlive NVML sessions as a driver's do.
    meters: RefCell<EnergyMeters>,
}

impl MockSource {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            loaded: None,
            collector: Collector::default(),
            generation: None,
            session: RefCell::new(Session::default()),
            meters: RefCell::new(EnergyMeters::default()),
        }
    }

    /// Keeps a process's last sample for [`super::collector::HOLD_INTERVALS`]
    /// of `interval`.
    pub fn with_poll_interval(mut self, interval: std::time::Duration) -> Self {
        self.collector = Collector::new(interval);
        self
    }

    /// Reads the file and parses it if it changed. Reading a small file every
    /// poll is cheaper than it sounds and, unlike mtimes, never misses a change.
    fn refresh(&mut self) -> Result<()> {
        let bytes = std::fs::read(&self.path).map_err(|source| Error::ScenarioIo {
            path: self.path.display().to_string(),
            source,
        })?;
        if self.loaded.as_ref().is_some_and(|(old, _)| *old == bytes) {
            return Ok(());
        }
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| ParseError {
                line: 1,
                column: 1,
                message: format!("not UTF-8: {e}"),
            })
            .and_then(Scenario::parse);
        match &parsed {
            Ok(s) => {
                tracing::info!(path = %self.path.display(), gpus = s.gpu.len(), "GPU scenario loaded");
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "GPU scenario rejected");
            }
        }
        self.loaded = Some((bytes, parsed));
        Ok(())
    }
}

impl GpuSource for MockSource {
    fn poll(&mut self) -> Result<GpuSnapshot> {
        self.refresh()?;
        match &self.loaded {
            Some((_, Ok(scenario))) => {
                if self.collector.take_reinit() || self.generation.is_none() {
                    nv(scenario.init()).map_err(|source| Error::Init {
                        lib: format!("mock scenario {}", self.path.display()),
                        source,
                    })?;
                    if self.generation.is_some() {
                        tracing::info!("mock NVML initialised again");
                    }
                    self.generation = Some(scenario.driver_reloads);
                    *self.session.borrow_mut() = Session::default();
                    self.collector.reinitialised();
                }
                let now = now_us();
                self.collector.pass(
                    &ScenarioDriver {
                        scenario,
                        now_us: now,
                        stale: self.generation != Some(scenario.driver_reloads),
                        session: &self.session,
                        meters: &self.meters,
                    },
                    now,
                )
            }
            Some((_, Err(e))) => Err(Error::Scenario {
                path: self.path.display().to_string(),
                source: e.clone(),
            }),
            None => Err(Error::Unavailable("scenario file not read yet".into())),
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The scenario's answer as the NVML error nvml-wrapper would have made of it.
fn nv<T>(answer: Answer<T>) -> NvResult<T> {
    answer.map_err(|kind| NvmlError::from(kind.code()))
}

struct ScenarioDriver<'a> {
    scenario: &'a Scenario,
    now_us: u64,
    /// The driver was reloaded since the mock initialised: handles are lost.
    stale: bool,
    session: &'a RefCell<Session>,
    meters: &'a RefCell<EnergyMeters>,
}

impl Driver for ScenarioDriver<'_> {
    fn driver_version(&self) -> NvResult<String> {
        Ok(self
            .scenario
            .driver_version
            .clone()
            .unwrap_or_else(|| "999.99-mock".to_owned()))
    }

    fn device_count(&self) -> NvResult<u32> {
        nv(self.scenario.device_count())
    }

    fn device(&self, index: u32) -> NvResult<Box<dyn DriverDevice + '_>> {
        if self.stale {
            return Err(NvmlError::GpuLost);
        }
        let gpu = nv(self.scenario.device(index))?;
        Ok(Box::new(ScenarioDevice {
            gpu,
            index,
            instance: None,
            driver: self,
        }))
    }

    fn process_name(&self, pid: u32) -> NvResult<String> {
        nv(self.scenario.process_name(pid))
    }
}

struct ScenarioDevice<'a> {
    gpu: &'a Gpu,
    index: u32,
    /// The MIG GPU instance this handle is for.
    instance: Option<&'a MigInstance>,
    driver: &'a ScenarioDriver<'a>,
}

impl ScenarioDevice<'_> {
    fn gi(&self) -> Option<u32> {
        self.instance.map(|i| i.gpu_instance_id)
    }
}

/// The headroom nvml-wrapper 0.13 adds to the size query's count before the
/// fill: 5 for the compute and graphics lists, none for the MPS list.
fn headroom(kind: ProcessKind) -> usize {
    match kind {
        ProcessKind::Mps => 0,
        _ => 5,
    }
}

impl DriverDevice for ScenarioDevice<'_> {
    fn uuid(&self) -> NvResult<String> {
        match self.gi() {
            Some(gi) => nv(self.gpu.instance_uuid(self.index, gi)),
            None => nv(self.gpu.uuid(self.index)),
        }
    }

    fn name(&self) -> NvResult<String> {
        match self.gi() {
            Some(gi) => nv(self.gpu.instance_name(gi)),
            None => nv(self.gpu.name()),
        }
    }

    fn utilization(&self) -> NvResult<(u32, u32)> {
        nv(self.gpu.utilization())
    }

    fn memory(&self) -> NvResult<(u64, u64)> {
        match self.gi() {
            Some(gi) => nv(self.gpu.instance_memory(gi)),
            None => nv(self.gpu.memory()),
        }
    }

    fn temperature(&self) -> NvResult<u32> {
        nv(self.gpu.temperature())
    }

    fn power_mw(&self) -> NvResult<u32> {
        nv(self.gpu.power_mw(self.driver.now_us))
    }

    fn power_limit_mw(&self) -> NvResult<u32> {
        nv(self.gpu.power_limit_mw())
    }

    fn mig_enabled(&self) -> NvResult<bool> {
        nv(self.gpu.mig_enabled())
    }

    fn processes(&self, kind: ProcessKind) -> NvResult<Vec<ProcessInfo>> {
        let skind = match kind {
            ProcessKind::Compute => scenario::ProcessKind::Compute,
            ProcessKind::Graphics => scenario::ProcessKind::Graphics,
            ProcessKind::Mps => scenario::ProcessKind::Mps,
        };
        let mut session = self.driver.session.borrow_mut();
        // nvml-wrapper's two calls: the size query, then a fill with headroom.
        let sized = nv(self
            .gpu
            .processes_seen(skind, self.index, self.gi(), true, &mut session))?
        .len();
        if sized == 0 {
            // nvml-wrapper makes no fill call for an empty list.
            return Ok(Vec::new());
        }
        let all = nv(self
            .gpu
            .processes_seen(skind, self.index, self.gi(), false, &mut session))?;
        if all.len() > sized + headroom(kind) {
            return Err(NvmlError::InsufficientSize(Some(all.len())));
        }
        Ok(all
            .into_iter()
            .map(|p| ProcessInfo {
                pid: p.pid,
                used_gpu_memory: p
                    .used_memory_bytes
                    .map_or(UsedGpuMemory::Unavailable, UsedGpuMemory::Used),
                gpu_instance_id: p.gpu_instance_id,
                compute_instance_id: p.gpu_instance_id.map(|_| 0),
            })
            .collect())
    }

    fn samples(&self, last_seen_us: u64) -> Samples {
        let query = self.driver.session.borrow_mut().next_query(self.index);
        let samples = nv(self
            .gpu
            .process_samples(last_seen_us, self.driver.now_us, query))
        .map(|samples| {
            samples
                .into_iter()
                .map(|s| ProcessUtilizationSample {
                    pid: s.pid,
                    timestamp: s.timestamp_us,
                    sm_util: s.sm_util,
                    mem_util: s.mem_util,
                    enc_util: 0,
                    dec_util: 0,
                })
                .collect()
        });
        Samples {
            call: if self.gpu.processes_utilization_info {
                "nvmlDeviceGetProcessesUtilizationInfo"
            } else {
                "nvmlDeviceGetProcessUtilization"
            },
            samples,
        }
    }

    fn pcie_kbps(&self) -> NvResult<(u32, u32)> {
        nv(self.gpu.pcie_kbps())
    }

    fn nvlink_kib(&self) -> NvResult<(u64, u64, u64)> {
        let now = self.driver.now_us;
        nv(self.gpu.nvlink_kib(now)).map(|(tx, rx)| (tx, rx, now))
    }

    fn energy_mj(&self) -> NvResult<(u64, u64)> {
        let now = self.driver.now_us;
        nv(self.gpu.energy_mj(
            self.index,
            now,
            self.driver.scenario.driver_reloads,
            &mut self.driver.meters.borrow_mut(),
        ))
        .map(|mj| (mj, now))
    }

    fn mig_instances(&self) -> NvResult<Vec<Box<dyn DriverDevice + '_>>> {
        Ok(nv(self.gpu.instances())?
            .iter()
            .map(|i| {
                Box::new(ScenarioDevice {
                    gpu: self.gpu,
                    index: self.index,
                    instance: Some(i),
                    driver: self.driver,
                }) as Box<dyn DriverDevice + '_>
            })
            .collect())
    }

    fn instance_ids(&self) -> NvResult<(u32, u32)> {
        self.instance
            .map(|i| (i.gpu_instance_id, i.compute_instance_id))
            .ok_or(NvmlError::InvalidArg)
    }

    fn gpm_sm_util(&self) -> NvResult<u32> {
        let gi = self.gi().ok_or(NvmlError::InvalidArg)?;
        let sm = nv(self.gpu.gpm_sm_util(gi))?;
        // A GPM figure is the difference of two samples.
        if !self
            .driver
            .session
            .borrow_mut()
            .gpm_sampled_before(self.index, gi)
        {
            return Err(NvmlError::NoData);
        }
        Ok(sm)
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, sync::Arc, time::Duration};

    use super::*;
    use crate::{
        gpu::{self, GpuStatus},
        snapshot::Reading,
    };

    fn scenario(util: u32) -> String {
        format!(
            "[[gpu]]\nutilization = {util}\nmemory_utilization = 1\n\
             [[gpu.process]]\npid = 10\nsm_util = {util}\nused_memory_mib = 5\n"
        )
    }

    /// Replaces the file atomically, as an editor or a script should.
    fn write(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write scenario");
        std::fs::rename(&tmp, path).expect("install scenario");
    }

    fn start(path: &Path, interval: Duration) -> tokio::sync::watch::Receiver<Arc<GpuStatus>> {
        gpu::start(gpu::Config {
            source: gpu::SourceKind::Mock,
            nvml_lib: None,
            scenario: Some(path.to_path_buf()),
            poll_interval: interval,
        })
    }

    /// The next status published after the current one.
    async fn next(rx: &mut tokio::sync::watch::Receiver<Arc<GpuStatus>>) -> Arc<GpuStatus> {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .expect("a status within 10 s")
            .expect("poller alive");
        rx.borrow_and_update().clone()
    }

    /// The first status from now on that satisfies `done`, within 100 passes.
    async fn until(
        rx: &mut tokio::sync::watch::Receiver<Arc<GpuStatus>>,
        what: &str,
        done: impl Fn(&GpuStatus) -> bool,
    ) -> Arc<GpuStatus> {
        for _ in 0..100 {
            let status = next(rx).await;
            if done(&status) {
                return status;
            }
        }
        panic!("no status with {what} in 100 passes: {:?}", rx.borrow());
    }

    fn device_util(status: &GpuStatus) -> Option<u32> {
        status.last_good.as_ref()?.devices.first()?.sm_util.ok()
    }

    #[tokio::test]
    async fn a_changed_scenario_is_picked_up_by_the_next_pass() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.toml");
        write(&path, &scenario(10));
        let interval = Duration::from_millis(100);
        let mut rx = start(&path, interval);
        until(&mut rx, "the first scenario", |s| {
            device_util(s) == Some(10)
        })
        .await;

        write(&path, &scenario(75));
        // Statuses from before the write are not the question.
        rx.borrow_and_update();
        // A pass may have been running while the file was replaced; the one
        // after it starts later and must read the new file: at most two
        // passes, so within one poll interval of the next pass.
        let first = next(&mut rx).await;
        let second = if device_util(&first) == Some(75) {
            first
        } else {
            next(&mut rx).await
        };
        assert_eq!(device_util(&second), Some(75), "{second:?}");
        let p = &second.last_good.as_ref().expect("snapshot").devices[0].processes[0];
        assert_eq!(p.sm_util, Reading::Ok(75));
    }

    #[tokio::test]
    async fn a_malformed_scenario_keeps_the_last_good_snapshot_marked_stale() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.toml");
        write(&path, &scenario(30));
        let mut rx = start(&path, Duration::from_millis(50));
        until(&mut rx, "a good pass", |s| s.error.is_none()).await;

        write(
            &path,
            "[[gpu]]\nutilization = 30\nmemory_utilization = 1\ntemperature_c = hot\n",
        );
        let bad = until(&mut rx, "the parse error", |s| s.error.is_some()).await;
        let error = bad.error.as_deref().expect("error");
        assert!(
            error.contains("s.toml") && error.contains("line 4"),
            "{error}"
        );
        let kept = bad.last_good.as_ref().expect("last good kept");
        assert_eq!(device_util(&bad), Some(30), "the good file's figures");
        // Stays the very same snapshot while the file is bad.
        let still_bad = next(&mut rx).await;
        assert!(still_bad.error.is_some());
        assert!(
            still_bad
                .last_good
                .as_ref()
                .is_some_and(|s| Arc::ptr_eq(s, kept)),
            "the last good snapshot, unchanged"
        );

        write(&path, &scenario(40));
        let fixed = until(&mut rx, "recovery", |s| s.error.is_none()).await;
        assert_eq!(device_util(&fixed), Some(40));
    }

    fn mock(dir: &Path, text: &str) -> MockSource {
        let path = dir.join("s.toml");
        write(&path, text);
        MockSource::new(path)
    }

    #[test]
    fn the_mock_gates_drivers_and_recovers_from_a_reload_as_nvml_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = mock(
            dir.path(),
            &format!("driver_version = \"535.86.05\"\n{}", scenario(10)),
        )
        .poll()
        .expect_err("a driver with the R535 layout")
        .to_string();
        assert!(
            err.contains("535.86.05") && err.contains("upgrade"),
            "{err}"
        );

        let err = mock(
            dir.path(),
            &format!(
                "[errors]\ninit = \"LIB_RM_VERSION_MISMATCH\"\n{}",
                scenario(10)
            ),
        )
        .poll()
        .expect_err("library and module differ")
        .to_string();
        assert!(err.contains("reboot the node"), "{err}");

        let mut src = mock(dir.path(), &scenario(10));
        assert_eq!(
            src.poll().expect("pass").devices[0].sm_util,
            Reading::Ok(10)
        );
        write(
            &dir.path().join("s.toml"),
            &format!("driver_reloads = 1\n{}", scenario(10)),
        );
        let lost = src.poll().expect("pass");
        assert!(
            matches!(&lost.devices[0].sm_util, Reading::Unavailable(r) if r.contains("fell off the bus")),
            "{lost:?}"
        );
        let back = src.poll().expect("pass after initialising again");
        assert_eq!(back.devices[0].sm_util, Reading::Ok(10));
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let mut source = MockSource::new("/nonexistent/gpu-scenario.toml".into());
        let err = source.poll().expect_err("no file").to_string();
        assert!(err.contains("/nonexistent/gpu-scenario.toml"), "{err}");
    }

    #[test]
    fn mock_without_a_scenario_is_a_configuration_error() {
        let err = gpu::source(&gpu::Config {
            source: gpu::SourceKind::Mock,
            nvml_lib: None,
            scenario: None,
            poll_interval: Duration::from_secs(1),
        })
        .err()
        .expect("needs a scenario")
        .to_string();
        assert!(err.contains("--gpu-scenario"), "{err}");
    }
}
