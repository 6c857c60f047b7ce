//! The migration modes both planes name: the integrity mode and the kind of
//! guest. One definition, used by the offer (JSON names), the engine's
//! configuration and its Hello frame (the `#[repr(u8)]` value).

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A mode name this build does not know.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ModeError {
    /// Not an integrity mode.
    #[error("unknown integrity mode {0:?}: use aead+sha256 or aead")]
    Integrity(String),
    /// Not a guest kind.
    #[error("unknown guest kind {0:?}: use kvm or synthetic")]
    Guest(String),
}

/// What protects page contents in transit. The discriminant is the value
/// the data plane's Hello frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Integrity {
    /// AES-256-GCM, plus the SHA-256 of every page inside the ciphertext,
    /// checked by the destination (the paper's step 8).
    #[default]
    #[serde(rename = "aead+sha256")]
    AeadSha256 = 1,
    /// AES-256-GCM only (its tag already authenticates every byte).
    #[serde(rename = "aead")]
    Aead = 2,
}

impl Integrity {
    /// The name used on the command line, in offers and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Integrity::AeadSha256 => "aead+sha256",
            Integrity::Aead => "aead",
        }
    }

    /// The wire value.
    pub fn to_wire(self) -> u8 {
        self as u8
    }

    /// The mode a wire value stands for.
    pub fn from_wire(v: u8) -> Option<Integrity> {
        [Integrity::AeadSha256, Integrity::Aead]
            .into_iter()
            .find(|m| m.to_wire() == v)
    }

    /// Whether pages carry a SHA-256 digest each.
    pub fn digests(self) -> bool {
        self == Integrity::AeadSha256
    }
}

impl std::fmt::Display for Integrity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Integrity {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, ModeError> {
        match s {
            "aead+sha256" => Ok(Integrity::AeadSha256),
            "aead" => Ok(Integrity::Aead),
            other => Err(ModeError::Integrity(other.into())),
        }
    }
}

/// The kind of guest a migration carries: the destination makes a VM of
/// this kind to receive it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// ferry's synthetic guest (a thread writing guest memory).
    #[default]
    Synthetic,
    /// A KVM guest (ferry's minimal VMM, or an embedder's).
    Kvm,
}

impl GuestKind {
    /// The name used in offers and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Synthetic => "synthetic",
            GuestKind::Kvm => "kvm",
        }
    }
}

impl std::fmt::Display for GuestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for GuestKind {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, ModeError> {
        match s {
            "synthetic" => Ok(GuestKind::Synthetic),
            "kvm" => Ok(GuestKind::Kvm),
            other => Err(ModeError::Guest(other.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_and_names_round_trip() {
        for m in [Integrity::AeadSha256, Integrity::Aead] {
            assert_eq!(Integrity::from_wire(m.to_wire()), Some(m));
            assert_eq!(m.as_str().parse::<Integrity>(), Ok(m));
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.as_str()));
            assert_eq!(serde_json::from_str::<Integrity>(&json).unwrap(), m);
        }
        assert_eq!(Integrity::AeadSha256.to_wire(), 1);
        assert_eq!(Integrity::Aead.to_wire(), 2);
        for v in [0u8, 3, 255] {
            assert_eq!(Integrity::from_wire(v), None);
        }
        assert!("none".parse::<Integrity>().is_err());
        assert!(serde_json::from_str::<Integrity>("\"none\"").is_err());
        for g in [GuestKind::Synthetic, GuestKind::Kvm] {
            assert_eq!(g.as_str().parse::<GuestKind>(), Ok(g));
            assert_eq!(serde_json::to_string(&g).unwrap(), format!("\"{}\"", g.as_str()));
        }
        assert_eq!(
            "qemu".parse::<GuestKind>().unwrap_err().to_string(),
            "unknown guest kind \"qemu\": use kvm or synthetic"
        );
    }
}
