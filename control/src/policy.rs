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
        Self::from_toml(&text).map_err(|e| match e {
            PolicyError::Invalid(why) => PolicyError::Invalid(format!("{}: {why}", path.display())),
            other => other,
        })
    }

    /// Whether `principal` may migrate `vm` from `from` to `to` at `now`
    /// (Unix seconds); the error says why not.
    pub fn allows(&self, principal: &str, vm: &str, from: &str, to: &str, now: u64) -> Result<(), PolicyDenial> {
        if self
            .explain_allow(principal, vm, from, to, now)
            .iter()
            .any(|c| c.outcome == Outcome::Matches)
        {
            return Ok(());
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
            .explain_incoming(from, vm)
            .iter()
            .any(|c| c.outcome == Outcome::Matches)
        {
            return Ok(());
        }
        Err(PolicyDenial::NotAdmitted {
            vm: vm.into(),
            from: from.into(),
        })
    }

    /// Every `[[allow]]` rule, in order, against `principal` moving `vm`
    /// from `from` to `to` at `now` (Unix seconds): which matches, and for
    /// the others the first field that does not. The first match decides.
    pub fn explain_allow(&self, principal: &str, vm: &str, from: &str, to: &str, now: u64) -> Vec<RuleCheck> {
        let minute = (now % 86_400) / 60;
        let principal_globs = |r: &Rule| vec![r.principal.clone()];
        self.allow
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let fields: [(&'static str, Vec<String>, &str); 4] = [
                    ("principal", principal_globs(r), principal),
                    ("vms", r.vms.clone(), vm),
                    ("from", r.from.clone(), from),
                    ("to", r.to.clone(), to),
                ];
                let outcome = first_mismatch(&fields).unwrap_or_else(|| match r.window_utc.as_deref() {
                    Some(w) => match window(w) {
                        Some((a, b))
                            if (a <= b && (a..=b).contains(&minute)) || (a > b && (minute >= a || minute <= b)) =>
                        {
                            Outcome::Matches
                        }
                        _ => Outcome::OutsideWindow {
                            window_utc: w.into(),
                            now_utc: format!("{:02}:{:02}", minute / 60, minute % 60),
                        },
                    },
                    None => Outcome::Matches,
                });
                RuleCheck {
                    section: "allow",
                    index: i + 1,
                    outcome,
                }
            })
            .collect()
    }

    /// Every `[[incoming]]` rule, in order, against `vm` arriving from
    /// source host `from`.
    pub fn explain_incoming(&self, from: &str, vm: &str) -> Vec<RuleCheck> {
        self.incoming
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let fields: [(&'static str, Vec<String>, &str); 2] =
                    [("from", r.from.clone(), from), ("vms", r.vms.clone(), vm)];
                RuleCheck {
                    section: "incoming",
                    index: i + 1,
                    outcome: first_mismatch(&fields).unwrap_or(Outcome::Matches),
                }
            })
            .collect()
    }

    /// Rules that can never match anything (a field with no globs), as
    /// warnings for `ferry policy check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        for (i, r) in self.allow.iter().enumerate() {
            for (field, globs) in [("vms", &r.vms), ("from", &r.from), ("to", &r.to)] {
                if globs.is_empty() {
                    w.push(format!(
                        "[[allow]] #{}: `{field}` is empty, so the rule never matches",
                        i + 1
                    ));
                }
            }
        }
        for (i, r) in self.incoming.iter().enumerate() {
            for (field, globs) in [("from", &r.from), ("vms", &r.vms)] {
                if globs.is_empty() {
                    w.push(format!(
                        "[[incoming]] #{}: `{field}` is empty, so the rule never matches",
                        i + 1
                    ));
                }
            }
        }
        w
    }
}

/// How one rule fared against a question (see [`Policy::explain_allow`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCheck {
    /// `allow` or `incoming`.
    pub section: &'static str,
    /// The rule's place in its section, from 1, as in the file.
    pub index: usize,
    /// The verdict.
    pub outcome: Outcome,
}

/// One rule's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every field matches (and the window holds).
    Matches,
    /// `field`'s value matches none of its globs.
    Mismatch {
        /// The rule's field.
        field: &'static str,
        /// The value asked about.
        value: String,
        /// The field's globs.
        globs: Vec<String>,
    },
    /// Everything matches but the time of day is outside the window.
    OutsideWindow {
        /// The rule's window.
        window_utc: String,
        /// The time asked about, HH:MM UTC.
        now_utc: String,
    },
}

impl std::fmt::Display for RuleCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[[{}]] #{}: ", self.section, self.index)?;
        match &self.outcome {
            Outcome::Matches => write!(f, "matches"),
            Outcome::Mismatch { field, value, globs } => {
                write!(f, "no: {field} {value:?} matches none of {globs:?}")
            }
            Outcome::OutsideWindow { window_utc, now_utc } => {
                write!(f, "no: {now_utc} UTC is outside its window {window_utc}")
            }
        }
    }
}

fn first_mismatch(fields: &[(&'static str, Vec<String>, &str)]) -> Option<Outcome> {
    fields
        .iter()
        .find(|(_, globs, value)| !matches(globs, value))
        .map(|(field, globs, value)| Outcome::Mismatch {
            field,
            value: (*value).into(),
            globs: globs.clone(),
        })
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
    fn the_example_policy_parses_and_means_what_its_comments_say() {
        let p = Policy::from_toml(include_str!("../../policy.example.toml")).unwrap();
        assert!(p.warnings().is_empty(), "{:?}", p.warnings());
        assert!(p.allows("operator", "web-1", "src", "dst", 0).is_ok());
        assert!(p.allows("operator", "db-2", "src", "dst", 0).is_err());
        // 23:30 is inside 22:00-02:00 (wrapping midnight), 12:00 is not.
        assert!(p
            .allows("night-batch", "db-7", "rack1-a", "rack1-b", 23 * 3600 + 1800)
            .is_ok());
        assert!(p
            .allows("night-batch", "db-7", "rack1-a", "rack1-b", 12 * 3600)
            .is_err());
        assert!(p.admits("rack1-a", "anything").is_ok());
        assert!(p.admits("src", "db-2").is_err());
        // The explanation names the deciding rule and why the others fail.
        let e = p.explain_allow("night-batch", "db-7", "rack1-a", "rack1-b", 12 * 3600);
        assert_eq!(
            e[0].to_string(),
            r#"[[allow]] #1: no: principal "night-batch" matches none of ["operator"]"#
        );
        assert_eq!(
            e[1].to_string(),
            "[[allow]] #2: no: 12:00 UTC is outside its window 22:00-02:00"
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
