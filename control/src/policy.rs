//! Migration policy (TOML): who may migrate which VMs from where to where,
//! and, at a destination, which source hosts may send which VMs here.
//!
//! ```toml
//! [[allow]]                       # the source domain's authorization server
//! principal = "operator"          # glob over the authenticated client name
//! vms = ["web-*", "db-1"]         # globs over VM ids
//! from = ["src"]                  # source host names (globs)
//! to = ["dst", "dst-*"]           # destination host names (globs)
//! window_utc = "00:00-23:59"      # optional, HH:MM-HH:MM (may wrap midnight)
//!
//! [[incoming]]                    # a destination's own admission policy
//! from = ["src"]
//! vms = ["*"]
//! ```
//! Nothing is allowed unless a rule allows it.

use std::path::Path;

use glob::Pattern;
use serde::Deserialize;
use thiserror::Error;

/// A policy file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Outgoing rules (authorization server).
    #[serde(default)]
    pub allow: Vec<Rule>,
    /// Incoming rules (destination).
    #[serde(default)]
    pub incoming: Vec<IncomingRule>,
}

/// One outgoing rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Glob over principals.
    pub principal: String,
    /// Globs over VM ids.
    pub vms: Vec<String>,
    /// Globs over source hosts.
    pub from: Vec<String>,
    /// Globs over destination hosts.
    pub to: Vec<String>,
    /// Optional daily window, UTC, "HH:MM-HH:MM".
    pub window_utc: Option<String>,
}

/// One incoming rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingRule {
    /// Globs over source hosts.
    pub from: Vec<String>,
    /// Globs over VM ids.
    pub vms: Vec<String>,
}

/// Why the policy refuses a migration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyDenial {
    /// No `[[allow]]` rule of the source domain allows it now.
    #[error("no rule allows {principal:?} to migrate VM {vm:?} from {from:?} to {to:?} now")]
    NotAllowed {
        /// Who asked.
        principal: String,
        /// The VM.
        vm: String,
        /// Source host.
        from: String,
        /// Destination host.
        to: String,
    },
    /// No `[[incoming]]` rule of this destination admits it.
    #[error("incoming policy does not admit VM {vm:?} from host {from:?}")]
    NotAdmitted {
        /// The VM.
        vm: String,
        /// Source host.
        from: String,
    },
}

/// Policy errors.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("policy {path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML of the policy's shape, or a bad glob or window.
    #[error("policy: {0}")]
    Invalid(String),
}

fn matches(globs: &[String], value: &str) -> bool {
    globs.iter().any(|g| Pattern::new(g).is_ok_and(|p| p.matches(value)))
}

fn minutes(hhmm: &str) -> Option<u64> {
    let (h, m) = hhmm.trim().split_once(':')?;
    let (h, m): (u64, u64) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

fn window(w: &str) -> Option<(u64, u64)> {
    let (a, b) = w.split_once('-')?;
    Some((minutes(a)?, minutes(b)?))
}

impl Policy {
    /// Parses and checks a policy (every glob and window must be valid).
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(|e| PolicyError::Invalid(e.to_string()))?;
        let globs = p
            .allow
            .iter()
            .flat_map(|r| std::iter::once(&r.principal).chain(&r.vms).chain(&r.from).chain(&r.to))
            .chain(p.incoming.iter().flat_map(|r| r.from.iter().chain(&r.vms)));
        for g in globs {
            Pattern::new(g).map_err(|e| PolicyError::Invalid(format!("bad glob {g:?}: {e}")))?;
        }
        for r in &p.allow {
            if let Some(w) = &r.window_utc {
                window(w).ok_or_else(|| PolicyError::Invalid(format!("bad window {w:?}: use HH:MM-HH:MM")))?;
            }
        }
        Ok(p)
    }

    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Whether `principal` may migrate `vm` from `from` to `to` at `now`
    /// (Unix seconds); the error says why not.
    pub fn allows(&self, principal: &str, vm: &str, from: &str, to: &str, now: u64) -> Result<(), PolicyDenial> {
        let minute = (now % 86_400) / 60;
        for r in &self.allow {
            if !(Pattern::new(&r.principal).is_ok_and(|p| p.matches(principal))
                && matches(&r.vms, vm)
                && matches(&r.from, from)
                && matches(&r.to, to))
            {
                continue;
            }
            match r.window_utc.as_deref().and_then(window) {
                None => return Ok(()),
                Some((a, b)) if (a <= b && (a..=b).contains(&minute)) || (a > b && (minute >= a || minute <= b)) => {
                    return Ok(())
                }
                Some(_) => {}
            }
        }
        Err(PolicyDenial::NotAllowed {
            principal: principal.into(),
            vm: vm.into(),
            from: from.into(),
            to: to.into(),
        })
    }

    /// Whether this destination admits `vm` from source host `from`.
    pub fn admits(&self, from: &str, vm: &str) -> Result<(), PolicyDenial> {
        if self
            .incoming
            .iter()
            .any(|r| matches(&r.from, from) && matches(&r.vms, vm))
        {
            Ok(())
        } else {
            Err(PolicyDenial::NotAdmitted {
                vm: vm.into(),
                from: from.into(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = r#"
[[allow]]
principal = "operator"
vms = ["web-*"]
from = ["src"]
to = ["dst*"]

[[allow]]
principal = "night-*"
vms = ["*"]
from = ["*"]
to = ["*"]
window_utc = "22:00-02:00"

[[incoming]]
from = ["src"]
vms = ["web-*"]
"#;

    #[test]
    fn rules_globs_and_windows() {
        let p = Policy::from_toml(P).unwrap();
        assert!(p.allows("operator", "web-1", "src", "dst", 0).is_ok());
        assert!(p.allows("operator", "db-1", "src", "dst", 0).is_err());
        assert!(p.allows("operator", "web-1", "other", "dst", 0).is_err());
        assert!(p.allows("mallory", "web-1", "src", "dst", 0).is_err());
        // 23:00 is inside 22:00-02:00, 12:00 is not.
        assert!(p.allows("night-ops", "x", "a", "b", 23 * 3600).is_ok());
        assert!(p.allows("night-ops", "x", "a", "b", 12 * 3600).is_err());
        assert!(p.admits("src", "web-9").is_ok());
        assert!(p.admits("src", "db-1").is_err());
        assert!(p.admits("evil", "web-9").is_err());
        assert!(
            Policy::default().allows("operator", "web-1", "src", "dst", 0).is_err(),
            "default deny"
        );
    }

    #[test]
    fn rejects_bad_policies() {
        assert!(Policy::from_toml("[[allow]]\nprincipal = 1").is_err());
        assert!(Policy::from_toml("[[allow]]\nprincipal='a'\nvms=['[']\nfrom=[]\nto=[]").is_err());
        assert!(
            Policy::from_toml("[[allow]]\nprincipal='a'\nvms=[]\nfrom=[]\nto=[]\nwindow_utc='25:00-01:00'").is_err()
        );
        assert!(Policy::from_toml("surprise = true").is_err());
    }
}
