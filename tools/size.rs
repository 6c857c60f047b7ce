//! Human sizes (`1GiB`, `64MiB`, `4096`, `512K`) and rates (`10Gbit`,
//! `1.5GB/s`, `800MiB/s`).

/// Parses a size in bytes: a number with an optional binary suffix
/// (K/KiB, M/MiB, G/GiB, T/TiB; case-insensitive) or B.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (try 1GiB, 64MiB, 4096)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {s:?} (use KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Formats bytes with a binary unit, for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A rate that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// No number in front.
    #[error("{0:?} is not a rate: try 10Gbit, 1.5GB/s, 800MiB/s or 200MB/s")]
    NotARate(String),
    /// A unit ferry does not know.
    #[error("unknown rate unit {unit:?} in {input:?}: use bit, kbit, Mbit, Gbit (or Mbps, Gbps), B, KB, MB, GB (10^n bytes), or KiB, MiB, GiB (2^n bytes), each optionally followed by /s")]
    Unit {
        /// The unit given.
        unit: String,
        /// The whole input.
        input: String,
    },
    /// Zero, negative, or too large.
    #[error("{0:?} is out of range: a rate must be positive and below 2^64 bytes/s")]
    Range(String),
}

/// Parses a rate into bytes per second. The units people use for links and
/// disks: bits (`bit`, `kbit`, `Mbit`, `Gbit`, `Tbit`, also `Mbps`/`Gbps`
/// and `Mb`/`Gb`, powers of 10), bytes in powers of 10 (`B`, `KB`, `MB`,
/// `GB`, `TB`) or of 2 (`KiB`, `MiB`, `GiB`, `TiB`), each with an optional
/// `/s`. A bare number is bytes per second. Bits and bytes differ by case
/// (`Gb` bits, `GB` bytes), as on every datasheet.
pub fn parse_rate(s: &str) -> Result<u64, RateError> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| RateError::NotARate(s.into()))?;
    let unit = unit.trim();
    let unit = unit.strip_suffix("/s").unwrap_or(unit).trim();
    let bits = |mult: f64| mult / 8.0;
    let per_byte: f64 = match unit {
        "" | "B" => 1.0,
        "bit" | "b" | "bps" => bits(1.0),
        "kbit" | "Kbit" | "kb" | "Kb" | "kbps" | "Kbps" => bits(1e3),
        "Mbit" | "Mb" | "Mbps" | "mbit" => bits(1e6),
        "Gbit" | "Gb" | "Gbps" | "gbit" => bits(1e9),
        "Tbit" | "Tb" | "Tbps" | "tbit" => bits(1e12),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KiB" | "K" | "k" => 1024.0,
        "MiB" | "M" => 1024.0 * 1024.0,
        "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
        "TiB" | "T" => 1024.0f64.powi(4),
        other => {
            return Err(RateError::Unit {
                unit: other.into(),
                input: s.into(),
            })
        }
    };
    let v = (n * per_byte).round();
    if !(v >= 1.0 && v < u64::MAX as f64) {
        return Err(RateError::Range(s.into()));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(v as u64)
}

/// `label` and the throttle as a percentage (`", throttle 80 %"`), or
/// nothing when there was none.
pub fn throttle_note(label: &str, throttle: f64) -> String {
    if throttle > 0.0 {
        format!("{label}{:.0} %", throttle * 100.0)
    } else {
        String::new()
    }
}

/// A rate for people: `1.50 GB/s (12.0 Gbit/s)`.
pub fn human_rate(bytes_per_s: u64) -> String {
    let b = bytes_per_s as f64;
    let (v, u) = if b >= 1e9 {
        (b / 1e9, "GB/s")
    } else if b >= 1e6 {
        (b / 1e6, "MB/s")
    } else {
        (b / 1e3, "kB/s")
    };
    format!("{v:.2} {u} ({:.2} Gbit/s)", b * 8.0 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10Gbit"), Ok(1_250_000_000));
        assert_eq!(parse_rate("10Gbit/s"), Ok(1_250_000_000));
        assert_eq!(parse_rate("25Gbps"), Ok(3_125_000_000));
        assert_eq!(parse_rate("1.5GB/s"), Ok(1_500_000_000));
        assert_eq!(parse_rate("800MiB/s"), Ok(800 << 20));
        assert_eq!(parse_rate("200MB/s"), Ok(200_000_000));
        assert_eq!(parse_rate("200 MB/s"), Ok(200_000_000));
        assert_eq!(parse_rate("100Mbit"), Ok(12_500_000));
        assert_eq!(parse_rate("5000000"), Ok(5_000_000));
        assert!(matches!(parse_rate("fast"), Err(RateError::NotARate(_))));
        assert!(matches!(parse_rate("10 furlongs"), Err(RateError::Unit { .. })));
        assert!(matches!(parse_rate("0GB/s"), Err(RateError::Range(_))));
        assert!(matches!(parse_rate("1e30"), Err(RateError::Unit { .. })));
        assert_eq!(human_rate(1_500_000_000), "1.50 GB/s (12.00 Gbit/s)");
        assert_eq!(human_rate(200_000_000), "200.00 MB/s (1.60 Gbit/s)");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1 parsec").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(human(1 << 30), "1.0 GiB");
        assert_eq!(human(12), "12 B");
    }
}
