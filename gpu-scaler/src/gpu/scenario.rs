//! The GPU scenario file format (TOML), read by the `mock` GPU source and by the
//! fake `libnvidia-ml.so` in `tests/fake-nvml`, which includes this file as a
//! module: it must depend on nothing but `serde`, `toml` and `thiserror`.
//!
//! A scenario describes what NVML would report. Both readers answer NVML's
//! questions from it through the same methods ([`Gpu::utilization`],
//! [`Gpu::process_samples`], ...), so the mock source and the real NVML code
//! running against the fake library see identical answers for one file. The
//! user-facing format is documented in the README ("GPU scenario files").

use serde::{Deserialize, Deserializer, de::Error as _};

/// A scenario file that could not be read: where, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

/// A whole scenario file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What `nvmlSystemGetDriverVersion` reports.
    pub driver_version: Option<String>,
    /// Test-only: errors of the library as a whole.
    #[serde(default)]
    pub errors: LibraryErrors,
    #[serde(default)]
    pub gpu: Vec<Gpu>,
}

/// Test-only: NVML errors of calls that are not about one device.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibraryErrors {
    /// `nvmlInit_v2`.
    pub init: Option<NvmlErrorKind>,
    /// `nvmlDeviceGetCount_v2`.
    pub device_count: Option<NvmlErrorKind>,
}

/// One GPU, in NVML index order.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub memory_total_mib: Option<u64>,
    /// Default: the sum of the processes' `used_memory_mib`.
    pub memory_used_mib: Option<u64>,
    /// SM %.
    pub utilization: Option<Percent>,
    /// Memory-controller %.
    pub memory_utilization: Option<Percent>,
    pub temperature_c: Option<u32>,
    pub power_w: Option<Watts>,
    pub power_limit_w: Option<Watts>,
    /// MIG mode enabled: NVML then reports no utilization, device-wide or per
    /// process, and processes carry their GPU instance.
    #[serde(default)]
    pub mig: bool,
    /// Test-only: return every process-utilization sample whatever `lastSeen`
    /// says, as some drivers do, so the reader's own filtering is exercised.
    #[serde(default)]
    pub ignore_last_seen: bool,
    /// Test-only: NVML errors per call.
    #[serde(default)]
    pub errors: GpuErrors,
    #[serde(default)]
    pub process: Vec<Process>,
}

/// One process on a GPU.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Process {
    pub pid: u32,
    #[serde(default)]
    pub kind: ProcessKind,
    /// SM % of the synthesized utilization sample (none when both are 0, as NVML
    /// reports no samples for an idle process). Ignored when `sample` is given.
    #[serde(default)]
    pub sm_util: Percent,
    #[serde(default)]
    pub mem_util: Percent,
    /// Absent: NVML's "not available" value.
    pub used_memory_mib: Option<u64>,
    /// MIG GPU instance (MIG devices only).
    pub gpu_instance_id: Option<u32>,
    /// Test-only: raw utilization samples with their timestamps (microseconds),
    /// returned when newer than the caller's `lastSeen`. Values over 100 are
    /// allowed here, to test how readers treat them.
    #[serde(default)]
    pub sample: Vec<Sample>,
}

/// Which NVML process list a process is in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessKind {
    #[default]
    Compute,
    Graphics,
    /// A client of the MPS server (`nvmlDeviceGetMPSComputeRunningProcesses_v3`).
    Mps,
}

/// A raw process-utilization sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub timestamp_us: u64,
    #[serde(default)]
    pub sm_util: u32,
    #[serde(default)]
    pub mem_util: u32,
}

/// A percentage, 0 to 100; anything else is rejected where it is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(pub u32);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v > 100 {
            return Err(D::Error::custom(format!(
                "{v} is not a percentage (0 to 100)"
            )));
        }
        Ok(Self(v))
    }
}

/// Watts: finite and not negative.
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd)]
pub struct Watts(pub f64);

impl<'de> Deserialize<'de> for Watts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = f64::deserialize(d)?;
        if !v.is_finite() || v < 0.0 || v * 1000.0 > f64::from(u32::MAX) {
            return Err(D::Error::custom(format!(
                "{v} is not a power in watts (0 to 4294967)"
            )));
        }
        Ok(Self(v))
    }
}

/// The NVML return codes a scenario can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum NvmlErrorKind {
    NotSupported,
    NoPermission,
    NotFound,
    DriverNotLoaded,
    GpuIsLost,
    Unknown,
}

impl NvmlErrorKind {
    /// The `nvmlReturn_t` value, from `nvml.h`.
    pub fn code(self) -> u32 {
        match self {
            Self::NotSupported => 3,
            Self::NoPermission => 4,
            Self::NotFound => 6,
            Self::DriverNotLoaded => 9,
            Self::GpuIsLost => 15,
            Self::Unknown => 999,
        }
    }
}

/// Test-only: the error each NVML device call returns; `all` applies to every
/// call the others leave unset (a lost GPU).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuErrors {
    pub all: Option<NvmlErrorKind>,
    pub handle: Option<NvmlErrorKind>,
    pub uuid: Option<NvmlErrorKind>,
    pub name: Option<NvmlErrorKind>,
    pub utilization: Option<NvmlErrorKind>,
    pub memory: Option<NvmlErrorKind>,
    pub temperature: Option<NvmlErrorKind>,
    pub power: Option<NvmlErrorKind>,
    pub power_limit: Option<NvmlErrorKind>,
    pub mig_mode: Option<NvmlErrorKind>,
    pub compute_processes: Option<NvmlErrorKind>,
    pub graphics_processes: Option<NvmlErrorKind>,
    pub mps_processes: Option<NvmlErrorKind>,
    pub process_utilization: Option<NvmlErrorKind>,
}

/// What one NVML call answers: a value or an NVML error.
pub type Answer<T> = Result<T, NvmlErrorKind>;

/// A utilization sample as NVML returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleOut {
    pub pid: u32,
    pub timestamp_us: u64,
    pub sm_util: u32,
    pub mem_util: u32,
}

/// A process-list entry as NVML returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessOut {
    pub pid: u32,
    /// `None`: NVML's "not available".
    pub used_memory_bytes: Option<u64>,
    pub gpu_instance_id: Option<u32>,
}

const MIB: u64 = 1024 * 1024;

impl Scenario {
    /// Parses a scenario; errors name the line and column.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((1, 1));
            ParseError {
                line,
                column,
                message: e.message().trim_end().to_owned(),
            }
        })
    }

    pub fn init(&self) -> Answer<()> {
        self.errors.init.map_or(Ok(()), Err)
    }

    pub fn device_count(&self) -> Answer<u32> {
        match self.errors.device_count {
            Some(e) => Err(e),
            None => Ok(u32::try_from(self.gpu.len()).unwrap_or(u32::MAX)),
        }
    }

    /// The GPU at `index`, if its handle can be had.
    pub fn device(&self, index: u32) -> Answer<&Gpu> {
        let gpu = usize::try_from(index)
            .ok()
            .and_then(|i| self.gpu.get(i))
            .ok_or(NvmlErrorKind::NotFound)?;
        gpu.check(gpu.errors.handle)?;
        Ok(gpu)
    }
}

impl Gpu {
    fn check(&self, specific: Option<NvmlErrorKind>) -> Answer<()> {
        specific.or(self.errors.all).map_or(Ok(()), Err)
    }

    pub fn uuid(&self, index: u32) -> Answer<String> {
        self.check(self.errors.uuid)?;
        Ok(self
            .uuid
            .clone()
            .unwrap_or_else(|| format!("GPU-00000000-0000-0000-0000-{index:012x}")))
    }

    pub fn name(&self) -> Answer<String> {
        self.check(self.errors.name)?;
        Ok(self
            .name
            .clone()
            .unwrap_or_else(|| "Scenario GPU".to_owned()))
    }

    /// (SM %, memory-controller %); NVML reads both in one call, so a file
    /// must give both. Not supported in MIG mode.
    pub fn utilization(&self) -> Answer<(u32, u32)> {
        self.check(self.errors.utilization)?;
        if self.mig {
            return Err(NvmlErrorKind::NotSupported);
        }
        match (self.utilization, self.memory_utilization) {
            (Some(sm), Some(mem)) => Ok((sm.0, mem.0)),
            _ => Err(NvmlErrorKind::NotSupported),
        }
    }

    /// (used, total) in bytes.
    pub fn memory(&self) -> Answer<(u64, u64)> {
        self.check(self.errors.memory)?;
        let total = self.memory_total_mib.ok_or(NvmlErrorKind::NotSupported)?;
        let used = self.memory_used_mib.unwrap_or_else(|| {
            // A process in several lists (compute and graphics) holds its
            // memory once.
            let mut per_process = std::collections::BTreeMap::new();
            for p in &self.process {
                let m = per_process.entry((p.pid, p.gpu_instance_id)).or_insert(0);
                *m = p.used_memory_mib.unwrap_or(0).max(*m);
            }
            per_process.values().sum::<u64>()
        });
        Ok((used.saturating_mul(MIB), total.saturating_mul(MIB)))
    }

    pub fn temperature(&self) -> Answer<u32> {
        self.check(self.errors.temperature)?;
        self.temperature_c.ok_or(NvmlErrorKind::NotSupported)
    }

    /// Milliwatts, as NVML reports them.
    pub fn power_mw(&self) -> Answer<u32> {
        self.check(self.errors.power)?;
        self.power_w
            .map(milliwatts)
            .ok_or(NvmlErrorKind::NotSupported)
    }

    pub fn power_limit_mw(&self) -> Answer<u32> {
        self.check(self.errors.power_limit)?;
        self.power_limit_w
            .map(milliwatts)
            .ok_or(NvmlErrorKind::NotSupported)
    }

    pub fn mig_enabled(&self) -> Answer<bool> {
        self.check(self.errors.mig_mode)?;
        Ok(self.mig)
    }

    /// The processes NVML lists for `kind`.
    pub fn processes(&self, kind: ProcessKind) -> Answer<Vec<ProcessOut>> {
        self.check(match kind {
            ProcessKind::Compute => self.errors.compute_processes,
            ProcessKind::Graphics => self.errors.graphics_processes,
            ProcessKind::Mps => self.errors.mps_processes,
        })?;
        Ok(self
            .process
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| ProcessOut {
                pid: p.pid,
                used_memory_bytes: p.used_memory_mib.map(|m| m.saturating_mul(MIB)),
                gpu_instance_id: p.gpu_instance_id.filter(|_| self.mig),
            })
            .collect())
    }

    /// Utilization samples newer than `last_seen_us` (all of them with
    /// `ignore_last_seen`). Processes without explicit samples get one taken at
    /// `now_us` when they are busy. NOT_FOUND when there are none, as in NVML.
    pub fn process_samples(&self, last_seen_us: u64, now_us: u64) -> Answer<Vec<SampleOut>> {
        self.check(self.errors.process_utilization)?;
        if self.mig {
            return Err(NvmlErrorKind::NotSupported);
        }
        let mut out = Vec::new();
        for p in &self.process {
            if p.sample.is_empty() {
                if p.sm_util.0 > 0 || p.mem_util.0 > 0 {
                    out.push(SampleOut {
                        pid: p.pid,
                        timestamp_us: now_us,
                        sm_util: p.sm_util.0,
                        mem_util: p.mem_util.0,
                    });
                }
                continue;
            }
            out.extend(
                p.sample
                    .iter()
                    .filter(|s| self.ignore_last_seen || s.timestamp_us > last_seen_us)
                    .map(|s| SampleOut {
                        pid: p.pid,
                        timestamp_us: s.timestamp_us,
                        sm_util: s.sm_util,
                        mem_util: s.mem_util,
                    }),
            );
        }
        if out.is_empty() {
            return Err(NvmlErrorKind::NotFound);
        }
        Ok(out)
    }
}

fn milliwatts(w: Watts) -> u32 {
    // Watts::deserialize bounds the value, so this cannot saturate.
    (w.0 * 1000.0).round() as u32
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
[[gpu]]
uuid = "GPU-5c1f0000-0000-0000-0000-000000000001"   # optional, default derived from index
name = "NVIDIA H100 80GB HBM3"                       # optional
memory_total_mib = 81559
utilization = 85            # SM %
memory_utilization = 40     # memory controller %
temperature_c = 62
power_w = 420.0
power_limit_w = 700.0

[[gpu.process]]
pid = 4242
sm_util = 60
mem_util = 25
used_memory_mib = 30000
"#;

    #[test]
    fn parses_the_documented_example() {
        let s = Scenario::parse(ISSUE_EXAMPLE).expect("example parses");
        assert_eq!(s.gpu.len(), 1);
        let g = &s.gpu[0];
        assert_eq!(
            g.uuid(0).expect("uuid"),
            "GPU-5c1f0000-0000-0000-0000-000000000001"
        );
        assert_eq!(g.utilization(), Ok((85, 40)));
        assert_eq!(g.memory(), Ok((30000 * MIB, 81559 * MIB)));
        assert_eq!(g.power_mw(), Ok(420_000));
        assert_eq!(g.power_limit_mw(), Ok(700_000));
        assert_eq!(g.temperature(), Ok(62));
        assert_eq!(g.mig_enabled(), Ok(false));
        assert_eq!(
            g.processes(ProcessKind::Compute).expect("processes"),
            vec![ProcessOut {
                pid: 4242,
                used_memory_bytes: Some(30000 * MIB),
                gpu_instance_id: None
            }]
        );
        assert_eq!(
            g.process_samples(0, 77).expect("samples"),
            vec![SampleOut {
                pid: 4242,
                timestamp_us: 77,
                sm_util: 60,
                mem_util: 25
            }]
        );
    }

    #[test]
    fn the_readme_examples_parse() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("## GPU scenario files")
            .expect("README has a GPU scenario files section");
        let section = &readme[start..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let blocks: Vec<&str> = section
            .split("```toml\n")
            .skip(1)
            .map(|b| b.split("```").next().expect("closed block"))
            .collect();
        assert_eq!(blocks.len(), 2, "the format and the test-only keys");
        for block in blocks {
            let s = Scenario::parse(block).unwrap_or_else(|e| panic!("{e}\n{block}"));
            assert!(!s.gpu.is_empty());
        }
    }

    #[test]
    fn defaults_are_derived_not_guessed() {
        let s = Scenario::parse("[[gpu]]\n[[gpu]]\n").expect("parses");
        assert_eq!(
            s.gpu[1].uuid(1).expect("uuid"),
            "GPU-00000000-0000-0000-0000-000000000001"
        );
        // Figures the file does not give are "not supported", never zero.
        assert_eq!(s.gpu[0].utilization(), Err(NvmlErrorKind::NotSupported));
        assert_eq!(s.gpu[0].memory(), Err(NvmlErrorKind::NotSupported));
        assert_eq!(s.gpu[0].power_mw(), Err(NvmlErrorKind::NotSupported));
        assert_eq!(s.gpu[0].process_samples(0, 1), Err(NvmlErrorKind::NotFound));
        assert_eq!(s.device_count(), Ok(2));
    }

    #[test]
    fn percent_over_100_names_its_line() {
        let err = Scenario::parse("[[gpu]]\nutilization = 50\n\n[[gpu]]\nutilization = 150\n")
            .expect_err("150 is not a percentage");
        assert_eq!(err.line, 5, "{err}");
        assert!(err.message.contains("150 is not a percentage"), "{err}");
    }

    #[test]
    fn syntax_errors_and_unknown_keys_name_their_line() {
        let err = Scenario::parse("[[gpu]]\nname = \"a\"\nutilisation = 3\n").expect_err("typo");
        assert_eq!(err.line, 3, "{err}");
        assert!(err.message.contains("utilisation"), "{err}");

        let err = Scenario::parse("[[gpu]]\n\n[[gpu.process]]\npid = = 1\n").expect_err("syntax");
        assert_eq!((err.line, err.column), (4, 7), "{err}");

        let err = Scenario::parse("[[gpu]]\npower_w = -3.0\n").expect_err("negative power");
        assert_eq!(err.line, 2, "{err}");
    }

    #[test]
    fn injected_errors_apply_per_call_and_all_covers_the_rest() {
        let s = Scenario::parse(
            "[[gpu]]\nutilization = 5\nmemory_utilization = 1\nmemory_total_mib = 10\n[gpu.errors]\nall = \"GPU_IS_LOST\"\nmemory = \"UNKNOWN\"\n",
        )
        .expect("parses");
        let g = &s.gpu[0];
        assert_eq!(g.utilization(), Err(NvmlErrorKind::GpuIsLost));
        assert_eq!(g.memory(), Err(NvmlErrorKind::Unknown));
        assert_eq!(s.device(0).err(), Some(NvmlErrorKind::GpuIsLost));
        assert_eq!(s.device(1).err(), Some(NvmlErrorKind::NotFound));
        assert_eq!(NvmlErrorKind::GpuIsLost.code(), 15);
    }

    #[test]
    fn samples_respect_last_seen_unless_told_not_to() {
        let text = "[[gpu]]\n[[gpu.process]]\npid = 7\nsample = [{ timestamp_us = 10, sm_util = 40 }, { timestamp_us = 20, sm_util = 160 }]\n";
        let s = Scenario::parse(text).expect("parses");
        let pids: Vec<u64> = s.gpu[0]
            .process_samples(10, 99)
            .expect("one newer sample")
            .iter()
            .map(|s| s.timestamp_us)
            .collect();
        assert_eq!(pids, vec![20]);
        assert_eq!(
            s.gpu[0].process_samples(20, 99),
            Err(NvmlErrorKind::NotFound)
        );

        let s = Scenario::parse(&text.replace("[[gpu]]\n", "[[gpu]]\nignore_last_seen = true\n"))
            .expect("parses");
        assert_eq!(s.gpu[0].process_samples(20, 99).expect("all").len(), 2);
    }

    #[test]
    fn mig_reports_instances_and_no_utilization() {
        let s = Scenario::parse(
            "[[gpu]]\nmig = true\nutilization = 50\n[[gpu.process]]\npid = 1\nsm_util = 10\ngpu_instance_id = 3\nused_memory_mib = 2\n",
        )
        .expect("parses");
        let g = &s.gpu[0];
        assert_eq!(g.utilization(), Err(NvmlErrorKind::NotSupported));
        assert_eq!(g.process_samples(0, 1), Err(NvmlErrorKind::NotSupported));
        assert_eq!(
            g.processes(ProcessKind::Compute).expect("list")[0].gpu_instance_id,
            Some(3)
        );
    }
}
