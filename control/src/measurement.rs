//! The destination's platform measurement: SHA-256 of the ferry binary it
//! runs and of its effective configuration, signed into its Accept. A source
//! may pin the measurements it sends guests to.
//!
//! What it is worth: the measurement is **self-reported**. Whoever holds the
//! destination host's private key signs whatever measurement it likes; there
//! is no hardware root (TPM quote, SEV-SNP/TDX report) behind it. Pinning
//! catches a destination that runs another build or another policy by
//! mistake, or an operator who changed them without the source side knowing;
//! it does not stop an attacker who has the destination's key.

use serde::{Deserialize, Serialize};

/// What the destination runs: SHA-256 of its binary and of its effective config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurement {
    /// SHA-256 of the running ferry binary (hex).
    pub binary_sha256: String,
    /// SHA-256 of the effective configuration (hex).
    pub config_sha256: String,
}

/// A pinned measurement that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MeasurementError {
    /// Not `BINARY:CONFIG`, each 64 hex digits.
    #[error(
        "{0:?} is not a measurement: give BINARY_SHA256:CONFIG_SHA256, each 64 hex digits \
         (a destination prints its own in its listening event, \"measurement\")"
    )]
    Malformed(String),
}

impl Measurement {
    /// Measures this process: its executable and `config` bytes.
    pub fn of_self(config: &[u8]) -> std::io::Result<Measurement> {
        let exe = std::fs::read(std::env::current_exe()?)?;
        Ok(Measurement {
            binary_sha256: crate::hex(ring::digest::digest(&ring::digest::SHA256, &exe).as_ref()),
            config_sha256: crate::hex(ring::digest::digest(&ring::digest::SHA256, config).as_ref()),
        })
    }
}

impl std::fmt::Display for Measurement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.binary_sha256, self.config_sha256)
    }
}

impl std::str::FromStr for Measurement {
    type Err = MeasurementError;

    /// `BINARY_SHA256:CONFIG_SHA256`, as [`Display`](std::fmt::Display)
    /// writes it; hex in either case.
    fn from_str(s: &str) -> Result<Measurement, MeasurementError> {
        let digest =
            |h: &str| (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| h.to_ascii_lowercase());
        let bad = || MeasurementError::Malformed(s.chars().take(200).collect());
        let (b, c) = s.trim().split_once(':').ok_or_else(bad)?;
        Ok(Measurement {
            binary_sha256: digest(b).ok_or_else(bad)?,
            config_sha256: digest(c).ok_or_else(bad)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measurement_round_trips_through_its_text() {
        let m = Measurement::of_self(b"policy").unwrap();
        assert_eq!(m.to_string().parse::<Measurement>().unwrap(), m);
        let upper = m.to_string().to_ascii_uppercase();
        assert_eq!(upper.parse::<Measurement>().unwrap(), m);
    }

    #[test]
    fn malformed_pins_are_refused() {
        let h = "a".repeat(64);
        for bad in [
            String::new(),
            h.clone(),
            format!("{h}:"),
            format!("{h}:{}", "a".repeat(63)),
            format!("{h}:{}", "g".repeat(64)),
            format!("{h}:{h}:{h}"),
        ] {
            assert!(bad.parse::<Measurement>().is_err(), "{bad:?}");
        }
    }
}
