//! The size of the probe's event ring buffer: [`RingBufferSize`], a byte count
//! the kernel accepts for a `BPF_MAP_TYPE_RINGBUF` (a power-of-two multiple of
//! this machine's page size), parsed from `serve --ebpf-ring-buffer-bytes`
//! with binary units and printed back in them.

use super::super::{Error, Result};

/// Size of the probe's event ring buffer in bytes.
///
/// The kernel only creates a `BPF_MAP_TYPE_RINGBUF` whose size is a power of two
/// and a multiple of the page size (`ringbuf_map_alloc` in kernel/bpf/ringbuf.c
/// returns EINVAL otherwise): [`RingBufferSize::new`] checks that up front, so a
/// bad value is a clear error naming the nearest valid sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingBufferSize(u32);

impl RingBufferSize {
    /// 1 MiB: about 18,000 process events (56 bytes each in the ring).
    pub const DEFAULT: Self = Self(gpu_scaler_common::RING_BUF_BYTES);

    /// `bytes`, if this machine's kernel accepts it as a ring buffer size.
    pub fn new(bytes: u64) -> Result<Self> {
        Self::with_page_size(bytes, page_size())
    }

    /// The smallest ring the kernel accepts: one page.
    pub fn one_page() -> Self {
        Self(page_size() as u32)
    }

    /// [`RingBufferSize::new`] for a machine with pages of `page` bytes (a power
    /// of two).
    pub fn with_page_size(bytes: u64, page: u64) -> Result<Self> {
        let max = 1u64 << 31; // the largest power of two a u32 max_entries holds
        if bytes >= page && bytes <= max && bytes.is_power_of_two() {
            return Ok(Self(bytes as u32));
        }
        let hint = if bytes < page {
            format!("the smallest is one page, {}", human(page))
        } else if bytes > max {
            format!("the largest is {}", human(max))
        } else {
            let below = 1u64 << bytes.ilog2();
            format!("the nearest are {} and {}", human(below), human(below * 2))
        };
        Err(Error::RingBufferSize(format!(
            "{bytes} bytes is not a power-of-two multiple of the page size ({page} bytes); {hint}"
        )))
    }

    pub fn bytes(self) -> u32 {
        self.0
    }
}

impl Default for RingBufferSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Display for RingBufferSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&human(u64::from(self.0)))
    }
}

/// Parses a byte count with an optional binary unit: `4096`, `64KiB`, `1MiB`,
/// `2M`, `1 GiB` (K, Ki, KiB, M, Mi, MiB, G, Gi, GiB, any case), then checks it
/// with [`RingBufferSize::new`].
impl std::str::FromStr for RingBufferSize {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "ki" | "kib" => 10,
            "m" | "mi" | "mib" => 20,
            "g" | "gi" | "gib" => 30,
            _ => {
                return Err(Error::RingBufferSize(format!(
                    "{s:?}: unknown unit {unit:?} (use bytes, KiB, MiB or GiB)"
                )));
            }
        };
        let n: u64 = digits.parse().map_err(|_| {
            Error::RingBufferSize(format!(
                "{s:?} is not a size in bytes (e.g. 4096, 64KiB, 1MiB)"
            ))
        })?;
        let bytes = n
            .checked_mul(1 << shift)
            .ok_or_else(|| Error::RingBufferSize(format!("{s:?} is too large")))?;
        Self::new(bytes)
    }
}

/// `bytes` in the largest binary unit that divides it.
fn human(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}")
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as u64,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_sizes_are_power_of_two_pages() {
        let ok = |b| RingBufferSize::with_page_size(b, 4096).map(RingBufferSize::bytes);
        assert_eq!(ok(4096).unwrap(), 4096);
        assert_eq!(ok(1 << 20).unwrap(), 1 << 20);
        assert_eq!(ok(1 << 31).unwrap(), 1 << 31);
        for bad in [0, 1, 2048, 4095, 4097, 12288, 3 << 20, 1 << 32] {
            let e = ok(bad).expect_err("invalid size").to_string();
            assert!(e.contains("power-of-two multiple"), "{bad}: {e}");
        }
        let e = ok(12288).unwrap_err().to_string();
        assert!(e.contains("8KiB and 16KiB"), "{e}");
        let e = ok(2048).unwrap_err().to_string();
        assert!(e.contains("smallest is one page, 4KiB"), "{e}");
        // 64 KiB pages (arm64, ppc64): 4 KiB is too small there.
        assert!(RingBufferSize::with_page_size(4096, 65536).is_err());
        assert!(RingBufferSize::with_page_size(65536, 65536).is_ok());
    }

    #[test]
    fn ring_buffer_sizes_parse_with_binary_units() {
        let p = |s: &str| s.parse::<RingBufferSize>().map(RingBufferSize::bytes);
        assert_eq!(p("1048576").unwrap(), 1 << 20);
        assert_eq!(p("1MiB").unwrap(), 1 << 20);
        assert_eq!(p("1 M").unwrap(), 1 << 20);
        assert_eq!(p("64kib").unwrap(), 64 << 10);
        assert_eq!(p("1GiB").unwrap(), 1 << 30);
        assert_eq!(RingBufferSize::DEFAULT.to_string(), "1MiB");
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "-4096",
            "4096 bytes",
            "1MB",
            "99999999999GiB",
        ] {
            assert!(p(bad).is_err(), "{bad:?} accepted");
        }
    }
}
