//! The driver gate: NVIDIA driver versions whose process-list structs do not
//! match what nvml-wrapper binds are refused with a clear error instead of
//! read as garbage.
//!
//! nvml-wrapper 0.13 calls `nvmlDeviceGet*RunningProcesses_v3` with the
//! 24-byte `nvmlProcessInfo_t`. Drivers 535.43-535.86 take a 32-byte struct
//! under that name (an extra `usedGpuCcProtectedMemory`): every entry after
//! the first is garbled and the exact-count MPS buffer overruns. 535.98 drops
//! `_v3`, and drivers before 510 do not have it at all (gpustat#161,
//! go-nvml#75, nvitop#88/#89; issue 11).

/// A driver version that cannot be sampled correctly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "NVIDIA driver {version}: drivers 535.43 to 535.98 lay out NVML's process list \
         differently from the `_v3` binding gpu-scaler uses (per-process figures would be \
         garbage); upgrade the driver to 535.104 or later (or any 545+)"
    )]
    R535Layout { version: String },
    #[error(
        "NVIDIA driver {version}: drivers before 510 lack the `_v3` process-list calls \
         gpu-scaler needs; upgrade the driver to 510 or later"
    )]
    TooOld { version: String },
}

/// (major, minor) of a version string such as "535.54.03"; `None` when it is
/// not in that form (the gate then lets it through: an unknown format is not
/// a known-bad driver).
fn parse(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim().split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next().map_or(Some(0), |m| {
        let digits: String = m.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    })?;
    Some((major, minor))
}

/// Whether `version` (as `nvmlSystemGetDriverVersion` reports it) can be
/// sampled. Unparseable versions pass, with a warning logged by the caller.
pub fn check(version: &str) -> Result<(), Error> {
    let Some((major, minor)) = parse(version) else {
        return Ok(());
    };
    if major < 510 {
        return Err(Error::TooOld {
            version: version.to_owned(),
        });
    }
    if major == 535 && (43..=98).contains(&minor) {
        return Err(Error::R535Layout {
            version: version.to_owned(),
        });
    }
    Ok(())
}

/// Whether `version` is in a form [`check`] understands.
pub fn is_known_format(version: &str) -> bool {
    parse(version).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_bad_ranges_are_refused_with_what_to_do() {
        for v in ["535.43.02", "535.54.03", "535.86.10", "535.98"] {
            let err = check(v).expect_err(v).to_string();
            assert!(err.contains(v) && err.contains("upgrade"), "{err}");
        }
        for v in ["470.223.02", "418.87.01", "509.99"] {
            let err = check(v).expect_err(v).to_string();
            assert!(err.contains("before 510") && err.contains(v), "{err}");
        }
    }

    #[test]
    fn good_drivers_and_unknown_formats_pass() {
        for v in [
            "510.47.03",
            "535.42.01",
            "535.104.05",
            "550.54.15",
            "570.86.10",
            "999.99-fake",
        ] {
            assert_eq!(check(v), Ok(()), "{v}");
        }
        assert!(!is_known_format("fake"));
        assert_eq!(check("fake"), Ok(()));
    }
}
