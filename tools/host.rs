//! What this host has to give incoming guests: its memory, read from
//! `/proc/meminfo`, and the default cap on guest memory committed to
//! incoming migrations that follows from it.

use std::path::PathBuf;

/// Where the kernel says how much memory there is.
pub const MEMINFO: &str = "/proc/meminfo";

/// The share of the available memory a destination keeps for the host (its
/// own processes, page cache, the migration's buffers) when `--max-memory`
/// is not given: one eighth.
pub const HOST_RESERVE_DIVISOR: u64 = 8;

/// The host's memory cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `/proc/meminfo` cannot be read.
    #[error("cannot read {path}: {source}; give --max-memory explicitly")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `/proc/meminfo` has no such field (a kernel before 3.14, or not Linux).
    #[error("{path} has no {field} line; give --max-memory explicitly")]
    NoField {
        /// The file.
        path: PathBuf,
        /// The field looked for.
        field: &'static str,
    },
}

/// The host's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// `MemTotal`.
    pub total_bytes: u64,
    /// `MemAvailable`: what can be given out without swapping.
    pub available_bytes: u64,
}

impl HostMemory {
    /// Reads this host's `/proc/meminfo`.
    pub fn read() -> Result<HostMemory, HostError> {
        let path = PathBuf::from(MEMINFO);
        let text = std::fs::read_to_string(&path).map_err(|source| HostError::Io {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|field| HostError::NoField { path, field })
    }

    /// Parses `/proc/meminfo` text; on failure, the missing field's name.
    pub fn parse(text: &str) -> Result<HostMemory, &'static str> {
        let field = |name: &'static str| {
            text.lines()
                .find_map(|l| {
                    let rest = l.strip_prefix(name)?.strip_prefix(':')?;
                    let kib = rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
                    kib.checked_mul(1024)
                })
                .ok_or(name)
        };
        Ok(HostMemory {
            total_bytes: field("MemTotal")?,
            available_bytes: field("MemAvailable")?,
        })
    }

    /// The default `--max-memory`: what is available now, less the host's
    /// reserve ([`HOST_RESERVE_DIVISOR`]).
    pub fn default_max_guest_bytes(&self) -> u64 {
        self.available_bytes - self.available_bytes / HOST_RESERVE_DIVISOR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "MemTotal:       24576000 kB\nMemFree:         1000000 kB\n\
                          MemAvailable:   16000000 kB\nBuffers:            1234 kB\n";

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let m = HostMemory::parse(SAMPLE).unwrap();
        assert_eq!(m.total_bytes, 24_576_000 * 1024);
        assert_eq!(m.available_bytes, 16_000_000 * 1024);
        assert_eq!(m.default_max_guest_bytes(), 14_000_000 * 1024);
    }

    #[test]
    fn a_missing_field_is_named() {
        assert_eq!(HostMemory::parse("MemTotal: 10 kB\n"), Err("MemAvailable"));
        // A field whose name only starts the same is not the field.
        assert_eq!(
            HostMemory::parse("MemTotalX: 10 kB\nMemAvailable: 5 kB\n"),
            Err("MemTotal")
        );
    }

    #[test]
    fn this_host_has_memory() {
        let m = HostMemory::read().unwrap();
        assert!(m.available_bytes > 0 && m.available_bytes <= m.total_bytes, "{m:?}");
    }
}
