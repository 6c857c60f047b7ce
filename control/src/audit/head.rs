//! The log's signed head: its last entry's sequence number and line hash,
//! signed by the log's signer and kept in a file of its own
//! (`NAME.head`), rewritten (atomically) after every append.
//!
//! A hash chain shows an edited, removed or reordered entry, but not a cut
//! end: a log whose last entries were deleted is still a valid chain. The
//! head remembers how far the log went, so a log shorter than its head, or
//! one whose entry at the head's sequence number is another, is a log that
//! was cut (or rolled back). [`super::AuditLog::open`] refuses to append to
//! such a log, and `ferry audit verify` checks a log against its head, or
//! against a head the operator kept elsewhere (`--expect SEQ:HASH`, e.g.
//! from a destination's receipt).
//!
//! What the head cannot do alone: whoever can delete entries can also put
//! back an older head file (each is validly signed). Keep a copy apart —
//! another disk, the log shipper, the receipts a source keeps — and check
//! against it.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::AuditError;
use crate::pki::Identity;

/// How far a log went: its last entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// The last entry's sequence number.
    pub seq: u64,
    /// SHA-256 (hex) of the last entry's line.
    pub hash: String,
}

impl std::fmt::Display for AuditHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl std::str::FromStr for AuditHead {
    type Err = AuditError;

    /// `SEQ:HASH`, as [`Display`](std::fmt::Display) writes it.
    fn from_str(s: &str) -> Result<AuditHead, AuditError> {
        let bad = || AuditError::BadHead {
            path: PathBuf::new(),
            what: format!(
                "{:?} is not SEQ:HASH (a sequence number and 64 hex digits)",
                s.chars().take(100).collect::<String>()
            ),
        };
        let (seq, hash) = s.trim().split_once(':').ok_or_else(bad)?;
        let seq = seq.parse().map_err(|_| bad())?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        Ok(AuditHead {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// The head file as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SignedHead {
    /// The log's file name (a head of one log is no head of another).
    log: String,
    seq: u64,
    hash: String,
    /// base64url ECDSA signature by the log's signer.
    sig: String,
}

/// Where the head of the log at `log` lives: `NAME.head` beside it.
pub fn head_path(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

fn log_name(log: &Path) -> String {
    log.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn signed_message(log: &str, seq: u64, hash: &str) -> Vec<u8> {
    format!("ferry-audit-head-v1\0{log}\0{seq}\0{hash}").into_bytes()
}

/// Writes the signed head of the log at `log`: to a temporary file, synced,
/// then renamed over the old head (a crash leaves the old or the new one).
pub(super) fn write(log: &Path, head: &AuditHead, signer: &Identity) -> Result<(), AuditError> {
    let path = head_path(log);
    let io = |source| AuditError::Io {
        path: path.clone(),
        source,
    };
    let name = log_name(log);
    let sig = signer
        .sign(&signed_message(&name, head.seq, &head.hash))
        .map_err(|e| AuditError::BadHead {
            path: path.clone(),
            what: format!("cannot sign it: {e}"),
        })?;
    let stored = SignedHead {
        log: name,
        seq: head.seq,
        hash: head.hash.clone(),
        sig: B64.encode(sig),
    };
    let tmp = path.with_extension("head.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        serde_json::to_writer(&mut f, &stored).map_err(|e| io(e.into()))?;
        f.write_all(b"\n").map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)
}

/// The head of the log at `log` from `path`, its signature checked against
/// `cert_der`; `None` if there is no such file.
pub fn read(log: &Path, path: &Path, cert_der: &[u8]) -> Result<Option<AuditHead>, AuditError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(AuditError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let bad = |what: String| AuditError::BadHead {
        path: path.to_path_buf(),
        what,
    };
    if text.len() > 4096 {
        return Err(bad("larger than a head can be".into()));
    }
    let h: SignedHead = serde_json::from_slice(&text).map_err(|e| bad(format!("not a head: {e}")))?;
    if h.log != log_name(log) {
        return Err(bad(format!("it is the head of {:?}, not of this log", h.log)));
    }
    let sig = B64
        .decode(&h.sig)
        .map_err(|_| bad("signature is not base64url".into()))?;
    if !crate::pki::verify_by_cert(cert_der, &signed_message(&h.log, h.seq, &h.hash), &sig) {
        return Err(bad("its signature does not verify under the log's certificate".into()));
    }
    Ok(Some(AuditHead {
        seq: h.seq,
        hash: h.hash,
    }))
}

/// Checks a verified log (`entries` lines, `hash_at(seq)` the hash of the
/// line with that sequence number) against `head`.
pub(super) fn check(log: &Path, entries: u64, hash_at: Option<&str>, head: &AuditHead) -> Result<(), AuditError> {
    if entries <= head.seq {
        return Err(AuditError::Truncated {
            path: log.to_path_buf(),
            entries,
            head: head.clone(),
        });
    }
    if hash_at != Some(head.hash.as_str()) {
        return Err(AuditError::Diverged {
            path: log.to_path_buf(),
            head: head.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{verify_with_head, AuditLog};
    use super::*;
    use crate::pki::{self, Role};

    /// A log of `n` entries (open + n-1 appends) in a fresh PKI.
    fn log_of(n: usize) -> (tempfile::TempDir, PathBuf, impl Fn() -> Identity) {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path(), &["h".into()]).unwrap();
        let p = d.path().join("audit.jsonl");
        let dir = d.path().to_path_buf();
        let id = move || Identity::load(&dir, Role::Host, "h").unwrap();
        let log = AuditLog::open(&p, "test", id()).unwrap();
        for i in 1..n {
            log.append("allow", serde_json::json!({ "i": i })).unwrap();
        }
        (d, p, id)
    }

    fn keep_lines(p: &Path, n: usize) {
        let text = std::fs::read_to_string(p).unwrap();
        let kept: String = text.lines().take(n).map(|l| format!("{l}\n")).collect();
        std::fs::write(p, kept).unwrap();
    }

    #[test]
    fn cutting_the_end_of_a_log_is_found_and_not_appended_to() {
        for cut in [1, 3, 5] {
            let (_d, p, id) = log_of(5);
            keep_lines(&p, 5 - cut);
            // The chain alone still verifies...
            assert_eq!(super::super::verify_file(&p, id().cert()).unwrap().0, 5 - cut);
            // ...its head does not.
            match verify_with_head(&p, id().cert(), None, None) {
                Err(AuditError::Truncated { entries, head, .. }) => {
                    assert_eq!((entries, head.seq), ((5 - cut) as u64, 4));
                }
                other => panic!("cut {cut}: {other:?}"),
            }
            let e = AuditLog::open(&p, "test", id()).unwrap_err();
            assert!(matches!(e, AuditError::Truncated { .. }), "cut {cut}: {e}");
            assert!(e.to_string().contains("entries were removed"), "{e}");
        }
    }

    #[test]
    fn a_deleted_log_with_its_head_left_is_found() {
        let (_d, p, id) = log_of(3);
        std::fs::remove_file(&p).unwrap();
        let e = AuditLog::open(&p, "test", id()).unwrap_err();
        assert!(matches!(e, AuditError::Truncated { entries: 0, .. }), "{e}");
    }

    #[test]
    fn a_log_rewritten_from_an_old_point_diverges_from_a_head_kept_apart() {
        let (_d, p, id) = log_of(5);
        let kept = read(&p, &head_path(&p), id().cert()).unwrap().unwrap();
        // Cut two entries, remove the head, let the writer go on: a valid
        // chain of five again, but not the one the kept head names.
        keep_lines(&p, 3);
        std::fs::remove_file(head_path(&p)).unwrap();
        let log = AuditLog::open(&p, "test", id()).unwrap();
        log.append("allow", serde_json::json!({"forged": 1})).unwrap();
        log.append("allow", serde_json::json!({"forged": 2})).unwrap();
        drop(log);
        assert!(verify_with_head(&p, id().cert(), None, None).is_ok());
        let e = verify_with_head(&p, id().cert(), None, Some(&kept)).unwrap_err();
        assert!(matches!(e, AuditError::Diverged { .. }), "{e}");
        // The expected head also travels as text.
        assert_eq!(kept.to_string().parse::<AuditHead>().unwrap(), kept);
    }

    #[test]
    fn a_head_of_another_log_or_signer_is_refused() {
        let (_d, p, id) = log_of(2);
        let other = p.with_file_name("other.jsonl");
        std::fs::copy(head_path(&p), head_path(&other)).unwrap();
        let e = read(&other, &head_path(&other), id().cert()).unwrap_err();
        assert!(e.to_string().contains("not of this log"), "{e}");
        let mut h: serde_json::Value = serde_json::from_slice(&std::fs::read(head_path(&p)).unwrap()).unwrap();
        h["seq"] = 99.into();
        std::fs::write(head_path(&p), h.to_string()).unwrap();
        let e = read(&p, &head_path(&p), id().cert()).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
    }
}
