//! Loading the fake `libnvidia-ml.so` (`tests/fake-nvml`) in tests.
//!
//! Each [`FakeNvml`] is a private copy of the library in its own temporary
//! directory, with its scenario beside it as `fake-nvml.toml` (where the fake
//! looks when `FAKE_NVML_SCENARIO` is unset). The dynamic loader treats every
//! copy as a different library, so tests running in parallel in one process
//! each get their own NVML state and scenario.

use std::path::{Path, PathBuf};

/// The scenario file name the fake looks for beside itself.
const SCENARIO: &str = "fake-nvml.toml";

/// Path of the `libfake_nvml.so` cargo built for this test binary
/// ([`gpu_scaler::testing::fake_nvml_library`]).
pub fn library() -> PathBuf {
    gpu_scaler::testing::fake_nvml_library()
}

/// A private copy of the fake library and its scenario.
pub struct FakeNvml {
    dir: tempfile::TempDir,
    lib: PathBuf,
}

impl FakeNvml {
    /// A copy of the fake library serving `scenario` (TOML, README format).
    pub fn new(scenario: &str) -> Self {
        Self::with_library(
            scenario,
            &std::fs::read(library()).expect("read libfake_nvml.so"),
        )
    }

    /// Like [`FakeNvml::new`], but the copy lacks the exported symbol `symbol`,
    /// as an older driver would: its name is overwritten in the file's string
    /// tables, so the dynamic loader's lookup finds nothing.
    pub fn without_symbol(scenario: &str, symbol: &str) -> Self {
        let mut bytes = std::fs::read(library()).expect("read libfake_nvml.so");
        let needle: Vec<u8> = [symbol.as_bytes(), b"\0"].concat();
        let mut hits = 0;
        let mut i = 0;
        while let Some(pos) = find(&bytes[i..], &needle) {
            let at = i + pos;
            // Only whole names: the byte before is a string-table separator.
            if at > 0 && bytes[at - 1] == 0 {
                bytes[at] = b'X';
                hits += 1;
            }
            i = at + needle.len();
        }
        assert!(hits > 0, "{symbol} is not a symbol of libfake_nvml.so");
        Self::with_library(scenario, &bytes)
    }

    fn with_library(scenario: &str, bytes: &[u8]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::write(&lib, bytes).expect("copy the fake library");
        let fake = Self { dir, lib };
        fake.set_scenario(scenario);
        fake
    }

    /// What `--nvml-lib` should point at.
    pub fn lib_path(&self) -> &Path {
        &self.lib
    }

    /// Replaces the scenario atomically (write, then rename), so the fake never
    /// reads half a file; it takes effect at the next sampling pass.
    pub fn set_scenario(&self, scenario: &str) {
        let tmp = self.dir.path().join(".scenario.tmp");
        std::fs::write(&tmp, scenario).expect("write scenario");
        std::fs::rename(&tmp, self.dir.path().join(SCENARIO)).expect("install scenario");
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
