//! A hash-chained, signed audit log (JSON lines). Each entry carries the
//! SHA-256 of the previous line and an ECDSA signature by the host's key
//! over the entry itself; the first entry names the signing certificate's
//! fingerprint. [`verify_file`] (`ferry audit verify`) checks the chain and
//! every signature and says at which line it breaks.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::pki::Identity;

mod head;
pub use head::{head_path, AuditHead};

/// Longest line accepted when reading a log; [`AuditLog::append`] never
/// writes a longer one.
const MAX_LINE: usize = 64 << 10;

/// Longest string kept in an entry's detail, in characters: longer ones
/// (which only a peer can make) are cut, saying how much was cut.
const DETAIL_STR_MAX_CHARS: usize = 512;

/// Most members of one object or array kept in an entry's detail.
const DETAIL_MEMBERS_MAX: usize = 64;

/// Deepest nesting kept in an entry's detail.
const DETAIL_DEPTH_MAX: usize = 8;

/// `v` with every string cut to [`DETAIL_STR_MAX_CHARS`], every object and
/// array to [`DETAIL_MEMBERS_MAX`] members and nesting to
/// [`DETAIL_DEPTH_MAX`]: what a peer put into a detail cannot make the line
/// grow without bound. (JSON escaping keeps newlines and quotes inside the
/// line; strings meant for a terminal are escaped by their makers, see
/// [`crate::peer::PeerText`].)
fn bounded(v: serde_json::Value, depth: usize) -> serde_json::Value {
    use serde_json::Value;
    let cut = |s: &str| -> String {
        match s.char_indices().nth(DETAIL_STR_MAX_CHARS) {
            Some((at, _)) => format!("{}...(+{} bytes)", &s[..at], s.len() - at),
            None => s.to_string(),
        }
    };
    if depth >= DETAIL_DEPTH_MAX {
        return Value::String("...(nested too deep)".into());
    }
    match v {
        Value::String(s) if s.len() > DETAIL_STR_MAX_CHARS => Value::String(cut(&s)),
        Value::Array(a) => {
            let n = a.len();
            let mut out: Vec<Value> = a
                .into_iter()
                .take(DETAIL_MEMBERS_MAX)
                .map(|x| bounded(x, depth + 1))
                .collect();
            if n > DETAIL_MEMBERS_MAX {
                out.push(Value::String(format!("...(+{} more)", n - DETAIL_MEMBERS_MAX)));
            }
            Value::Array(out)
        }
        Value::Object(o) => {
            let n = o.len();
            let mut out: serde_json::Map<String, Value> = o
                .into_iter()
                .take(DETAIL_MEMBERS_MAX)
                .map(|(k, x)| (cut(&k), bounded(x, depth + 1)))
                .collect();
            if n > DETAIL_MEMBERS_MAX {
                out.insert("...".into(), Value::from(n - DETAIL_MEMBERS_MAX));
            }
            Value::Object(out)
        }
        other => other,
    }
}

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// 0-based position in the log.
    pub seq: u64,
    /// Unix seconds.
    pub time: u64,
    /// Who acted ("authz", "destination dst", "source src", ...).
    pub actor: String,
    /// What happened ("allow", "deny", "admit", "refuse", "commit", ...).
    pub event: String,
    /// Details (reason, VM, migration id, ...).
    pub detail: serde_json::Value,
    /// SHA-256 (hex) of the previous line; 64 zeros for the first.
    pub prev: String,
    /// base64url ECDSA P-256 signature over this entry with `sig` empty.
    pub sig: String,
}

/// Audit errors.
#[derive(Debug, Error)]
pub enum AuditError {
    /// The log file failed.
    #[error("audit log {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// The log does not verify.
    #[error("audit log {path}, line {line}: {what}")]
    Broken {
        /// File.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        what: String,
    },
    /// Another writer has the log.
    #[error(transparent)]
    Locked(#[from] crate::lock::LockError),
    /// The log ends before its signed head: entries were cut off the end
    /// (or the whole log was replaced by an older copy).
    #[error(
        "audit log {path} has {entries} entries but its signed head says it reached entry {}: \
         entries were removed from its end. Keep the log and its head for investigation; to \
         start a new chain, move both aside", head.seq
    )]
    Truncated {
        /// File.
        path: PathBuf,
        /// Entries found.
        entries: u64,
        /// The head it should reach.
        head: AuditHead,
    },
    /// The log's entry at its head's sequence number is another entry: the
    /// log was rewritten from there (rolled back and appended to).
    #[error(
        "audit log {path}: entry {} is not the one its signed head names ({}): the log was \
         rewritten from there. Keep the log and its head for investigation; to start a new \
         chain, move both aside", head.seq, head.hash
    )]
    Diverged {
        /// File.
        path: PathBuf,
        /// The head it should reach.
        head: AuditHead,
    },
    /// A head file that cannot be used.
    #[error("audit head {path}: {what}")]
    BadHead {
        /// File.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

fn line_hash(line: &[u8]) -> String {
    crate::hex(ring::digest::digest(&ring::digest::SHA256, line).as_ref())
}

fn unsigned_bytes(e: &Entry) -> Vec<u8> {
    let mut u = e.clone();
    u.sig = String::new();
    serde_json::to_vec(&u).expect("entries serialise")
}

/// The bytes a stored line was signed over: the line itself with its `sig`
/// value blanked. Taken from the raw bytes, never by re-serialising the
/// parsed entry (a JSON round trip need not reproduce the same bytes, e.g.
/// for floats). `sig` is the last field and base64url has no quotes, so the
/// last `,"sig":"` is the field itself (quotes inside strings are escaped).
fn signed_bytes_of_line(line: &[u8]) -> Option<Vec<u8>> {
    const KEY: &[u8] = b",\"sig\":\"";
    let at = line.windows(KEY.len()).rposition(|w| w == KEY)?;
    let rest = &line[at + KEY.len()..];
    let sig_len = rest.iter().position(|b| *b == b'"')?;
    if &rest[sig_len..] != b"\"}" {
        return None;
    }
    let mut v = line[..at + KEY.len()].to_vec();
    v.extend_from_slice(b"\"}");
    Some(v)
}

struct State {
    file: File,
    prev: String,
    seq: u64,
}

/// An append-only audit log signed by one identity.
pub struct AuditLog {
    path: PathBuf,
    actor: String,
    signer: Identity,
    sealed: Option<Sealed>,
    state: Mutex<State>,
    _lock: crate::lock::HeldLock,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// A log that did not verify when it was opened, kept aside read-only
/// under a new name; the new segment's first entry names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Its new file name, beside the log.
    pub file: String,
    /// SHA-256 (hex) of its bytes as found: any later change shows.
    pub sha256: String,
    /// The entries before the first broken line (those verified).
    pub entries_verified: usize,
    /// What was wrong, as `ferry audit verify` says it.
    pub broken: String,
}

/// Moves the damaged log at `path` aside (`NAME.damaged-UNIXSECONDS`, made
/// read-only) so that a new segment can start in its place.
fn seal(path: &Path, line: usize, what: &str) -> Result<Sealed, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let sha256 = file_sha256(path)?;
    let name = path
        .file_name()
        .map_or_else(|| "audit".into(), |n| n.to_string_lossy().into_owned());
    let stamp = crate::now_unix_s();
    let mut aside = path.with_file_name(format!("{name}.damaged-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        aside = path.with_file_name(format!("{name}.damaged-{stamp}-{n}"));
        n += 1;
    }
    std::fs::rename(path, &aside).map_err(io)?;
    // Its head goes with it (the new segment starts a head of its own).
    let head = head_path(path);
    if head.exists() {
        std::fs::rename(&head, head_path(&aside)).map_err(io)?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&aside, std::fs::Permissions::from_mode(0o400)).map_err(io)?;
    }
    Ok(Sealed {
        file: aside
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        sha256,
        entries_verified: line.saturating_sub(1),
        broken: format!("line {line}: {what}"),
    })
}

/// SHA-256 (hex) of the file at `path`, hashed as it is read (a log may be
/// larger than memory allows).
fn file_sha256(path: &Path) -> Result<String, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut f = File::open(path).map_err(io)?;
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut chunk).map_err(io)?;
        if n == 0 {
            break;
        }
        hash.update(&chunk[..n]);
    }
    Ok(crate::hex(hash.finish().as_ref()))
}

/// The sealed segment a (verified) log at `path` names in its first entry,
/// if any, and whether that file is still beside it as it was sealed:
/// `Some(true)` intact, `Some(false)` changed since, `None` not found.
pub fn previous_segment(path: &Path) -> Result<Option<(Sealed, Option<bool>)>, AuditError> {
    let f = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut first = Vec::new();
    Read::by_ref(&mut BufReader::new(f))
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut first)
        .map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let Ok(e) = serde_json::from_slice::<Entry>(first.trim_ascii_end()) else {
        return Ok(None);
    };
    let Some(prev) = e.detail.get("previous_segment") else {
        return Ok(None);
    };
    let Ok(sealed) = serde_json::from_value::<Sealed>(prev.clone()) else {
        return Ok(None);
    };
    // Only a plain file name beside the log (the writer puts nothing else).
    if sealed.file.is_empty() || sealed.file.contains('/') || sealed.file == ".." {
        return Ok(Some((sealed, None)));
    }
    let aside = path.with_file_name(&sealed.file);
    let intact = match file_sha256(&aside) {
        Ok(h) => Some(h == sealed.sha256),
        Err(_) => None,
    };
    Ok(Some((sealed, intact)))
}

impl AuditLog {
    /// Opens (or starts) the log at `path`, appending as `actor`, signing
    /// with `signer`. An existing log is verified first; one that does not
    /// verify (edited, cut, or by another signer) is sealed aside
    /// ([`Sealed`]) and a new segment starts whose first entry names it,
    /// so a damaged log costs its operator an investigation, never the
    /// daemon. Failing to read or write the files is still an error.
    pub fn open(path: &Path, actor: &str, signer: Identity) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        };
        // One writer per log: a second one would fork the chain.
        let lock = crate::lock::exclusive(path, "audit log")?;
        let mut sealed = None;
        // How far the log went, by its signed head: a log that ends
        // before it was cut, and is not appended to.
        let heads: Vec<AuditHead> = head::read(path, &head_path(path), signer.cert())?.into_iter().collect();
        if !path.exists() {
            if let Some(h) = heads.first() {
                return Err(AuditError::Truncated {
                    path: path.to_path_buf(),
                    entries: 0,
                    head: h.clone(),
                });
            }
        }
        let (prev, seq) = if path.exists() {
            match verify_against(path, signer.cert(), &heads) {
                Ok((n, last)) => (last, n as u64),
                Err(AuditError::Broken { line, what, .. }) => {
                    let s = seal(path, line, &what)?;
                    tracing::error!(
                        "audit log {} does not verify (line {line}: {what}); sealed it as {} and \
                         started a new segment naming it. Investigate the sealed file: \
                         ferry audit verify shows where it breaks",
                        path.display(),
                        s.file
                    );
                    sealed = Some(s);
                    ("0".repeat(64), 0)
                }
                Err(e) => return Err(e),
            }
        } else {
            ("0".repeat(64), 0)
        };
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        let log = AuditLog {
            path: path.to_path_buf(),
            actor: actor.into(),
            signer,
            sealed,
            state: Mutex::new(State { file, prev, seq }),
            _lock: lock,
        };
        if seq == 0 {
            let fp = log.signer.fingerprint();
            let mut detail = serde_json::json!({ "signer_fingerprint": fp });
            if let Some(s) = &log.sealed {
                detail["previous_segment"] = serde_json::json!(s);
            }
            log.append("open", detail)?;
        }
        Ok(log)
    }

    /// The last entry written (`None` before the first).
    pub fn head(&self) -> Option<AuditHead> {
        let st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.seq.checked_sub(1).map(|seq| AuditHead {
            seq,
            hash: st.prev.clone(),
        })
    }

    /// Appends a signed entry; durable when this returns.
    pub fn append(&self, event: &str, detail: serde_json::Value) -> Result<(), AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut e = Entry {
            seq: st.seq,
            time: crate::now_unix_s(),
            actor: self.actor.clone(),
            event: event.into(),
            detail: bounded(detail, 0),
            prev: st.prev.clone(),
            sig: String::new(),
        };
        let line = self.signed_line(&mut e)?;
        // Bounded details cannot reach the limit with the entries ferry
        // writes; should one still, the detail gives way, never the line:
        // the writer must not produce what its own verifier rejects.
        let line = if line.len() >= MAX_LINE {
            e.detail = serde_json::json!({ "detail_too_large_bytes": line.len() });
            self.signed_line(&mut e)?
        } else {
            line
        };
        st.file.write_all(&line).map_err(io)?;
        st.file.write_all(b"\n").map_err(io)?;
        st.file.sync_data().map_err(io)?;
        st.prev = line_hash(&line);
        let now = AuditHead {
            seq: st.seq,
            hash: st.prev.clone(),
        };
        st.seq += 1;
        head::write(&self.path, &now, &self.signer)
    }

    /// `e` signed, as its line (without the newline).
    fn signed_line(&self, e: &mut Entry) -> Result<Vec<u8>, AuditError> {
        e.sig = String::new();
        let sig = self.signer.sign(&unsigned_bytes(e)).map_err(|err| AuditError::Broken {
            path: self.path.clone(),
            line: 0,
            what: err.to_string(),
        })?;
        e.sig = B64.encode(sig);
        Ok(serde_json::to_vec(e).expect("entries serialise"))
    }

    /// The damaged log this one replaced when it was opened, if it did.
    pub fn sealed(&self) -> Option<&Sealed> {
        self.sealed.as_ref()
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Checks every line of the log at `path`: JSON shape, sequence, the hash
/// chain, the signer named in the first entry (must be `cert_der`) and every
/// signature. Returns the number of entries and the hash of the last line.
pub fn verify_file(path: &Path, cert_der: &[u8]) -> Result<(usize, String), AuditError> {
    verify_lines(path, cert_der, None)
}

/// [`verify_file`], and then against a signed head: the one in
/// `head_file` (default: the log's own, [`head_path`]; none there, no
/// check) and `expect` (one kept elsewhere, e.g. from a receipt). Returns
/// the entries, the last hash, and the heads checked.
pub fn verify_with_head(
    path: &Path,
    cert_der: &[u8],
    head_file: Option<&Path>,
    expect: Option<&AuditHead>,
) -> Result<(usize, String, Vec<AuditHead>), AuditError> {
    let own = head_file.map_or_else(|| head_path(path), Path::to_path_buf);
    let mut heads: Vec<AuditHead> = head::read(path, &own, cert_der)?.into_iter().collect();
    if head_file.is_some() && heads.is_empty() {
        return Err(AuditError::BadHead {
            path: own,
            what: "no such file".into(),
        });
    }
    heads.extend(expect.cloned());
    let (n, last) = verify_against(path, cert_der, &heads)?;
    Ok((n, last, heads))
}

/// Verifies the log and checks it against every one of `heads`.
fn verify_against(path: &Path, cert_der: &[u8], heads: &[AuditHead]) -> Result<(usize, String), AuditError> {
    let mut hashes: Vec<Option<String>> = vec![None; heads.len()];
    let (n, last) = verify_lines(
        path,
        cert_der,
        Some(&mut |seq, hash| {
            for (h, got) in heads.iter().zip(hashes.iter_mut()) {
                if h.seq == seq {
                    *got = Some(hash.to_string());
                }
            }
        }),
    )?;
    for (h, got) in heads.iter().zip(&hashes) {
        head::check(path, n as u64, got.as_deref(), h)?;
    }
    Ok((n, last))
}

/// The hash of each verified line, by sequence number.
type OnLine<'a> = &'a mut dyn FnMut(u64, &str);

fn verify_lines(path: &Path, cert_der: &[u8], mut on_line: Option<OnLine<'_>>) -> Result<(usize, String), AuditError> {
    let broken = |line: usize, what: String| AuditError::Broken {
        path: path.to_path_buf(),
        line,
        what,
    };
    let f = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut prev = "0".repeat(64);
    let mut n = 0usize;
    let mut reader = BufReader::new(f);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let read = Read::by_ref(&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| AuditError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if read == 0 {
            break;
        }
        let line_no = n + 1;
        if buf.last() != Some(&b'\n') {
            return Err(broken(line_no, "truncated line (no newline) or line too long".into()));
        }
        buf.pop();
        let e: Entry =
            serde_json::from_slice(&buf).map_err(|err| broken(line_no, format!("not an audit entry: {err}")))?;
        if e.seq != n as u64 {
            return Err(broken(
                line_no,
                format!("sequence {} where {n} was expected (entry removed or reordered)", e.seq),
            ));
        }
        if e.prev != prev {
            return Err(broken(
                line_no,
                "hash chain broken: the previous line was changed, removed or reordered".into(),
            ));
        }
        if n == 0 {
            let named = e
                .detail
                .get("signer_fingerprint")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            if named != crate::fingerprint(cert_der) {
                return Err(broken(
                    line_no,
                    "the log was started by another signer than the certificate given".into(),
                ));
            }
        }
        let sig = B64
            .decode(&e.sig)
            .map_err(|_| broken(line_no, "signature is not base64url".into()))?;
        let signed =
            signed_bytes_of_line(&buf).ok_or_else(|| broken(line_no, "no signature field at the end".into()))?;
        if !crate::pki::verify_by_cert(cert_der, &signed, &sig) {
            return Err(broken(
                line_no,
                "signature does not verify: the entry was altered".into(),
            ));
        }
        prev = line_hash(&buf);
        if let Some(f) = on_line.as_mut() {
            f(n as u64, &prev);
        }
        n += 1;
    }
    Ok((n, prev))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, Role};

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        pki::init(d.path(), &["h".into()]).unwrap();
        let p = d.path().join("audit.jsonl");
        (d, p)
    }

    #[test]
    fn appends_verify_and_survive_reopen() {
        let (d, p) = setup();
        let id = || Identity::load(d.path(), Role::Host, "h").unwrap();
        let log = AuditLog::open(&p, "test", id()).unwrap();
        log.append("allow", serde_json::json!({"vm": "a"})).unwrap();
        drop(log);
        let log = AuditLog::open(&p, "test", id()).unwrap();
        log.append(
            "deny",
            serde_json::json!({"why": "policy \"sig\":\"x\"", "ms": 1.4234567891234567}),
        )
        .unwrap();
        let (n, _) = verify_file(&p, id().cert()).unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn entries_with_floats_verify() {
        // serde_json does not round-trip every float to the same text, so a
        // verifier that re-serialises parsed entries would reject these.
        let (d, p) = setup();
        let id = Identity::load(d.path(), Role::Host, "h").unwrap();
        let cert = id.cert().clone();
        let log = AuditLog::open(&p, "test", id).unwrap();
        let mut x = 0x1234_5678_9abc_def0_u64;
        for i in 0..300u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // ~7% of such values print differently after a parse (seen with serde_json 1).
            let f = f64::from_bits((x >> 2) | 0x3ff0_0000_0000_0000) * (f64::from(i) + 0.001);
            log.append("commit", serde_json::json!({ "downtime_ms": f })).unwrap();
        }
        assert_eq!(verify_file(&p, &cert).unwrap().0, 301);
    }

    #[test]
    fn tampering_is_found_and_located() {
        let (d, p) = setup();
        let id = Identity::load(d.path(), Role::Host, "h").unwrap();
        let cert = id.cert().clone();
        let log = AuditLog::open(&p, "test", id).unwrap();
        for i in 0..4 {
            log.append("e", serde_json::json!({ "i": i })).unwrap();
        }
        drop(log);
        let good = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = good.lines().collect();
        let check = |text: String, line: usize, what: &str| {
            std::fs::write(&p, text).unwrap();
            match verify_file(&p, &cert) {
                Err(AuditError::Broken { line: l, what: w, .. }) => {
                    assert_eq!(l, line, "{w}");
                    assert!(w.contains(what), "{w}");
                }
                other => panic!("expected a break at line {line}, got {other:?}"),
            }
        };
        // An edited detail (signature fails on that line).
        check(good.replace("{\"i\":2}", "{\"i\":7}"), 4, "signature");
        // A removed line.
        let mut v = lines.clone();
        v.remove(2);
        check(v.join("\n") + "\n", 3, "sequence");
        // Two lines swapped.
        let mut v = lines.clone();
        v.swap(1, 2);
        check(v.join("\n") + "\n", 2, "sequence");
        // A truncated tail.
        check(good[..good.len() - 5].to_string(), 5, "truncated");
        // Another signer's certificate.
        std::fs::write(&p, &good).unwrap();
        pki::issue(d.path(), "other", Role::Host, pki::Validity::days(1)).unwrap();
        let other = Identity::load(d.path(), Role::Host, "other").unwrap();
        assert!(verify_file(&p, other.cert()).is_err());
        assert_eq!(verify_file(&p, &cert).unwrap().0, 5);
    }

    #[test]
    fn no_detail_makes_a_line_the_verifier_rejects() {
        let (d, p) = setup();
        let id = Identity::load(d.path(), Role::Host, "h").unwrap();
        let cert = id.cert().clone();
        let log = AuditLog::open(&p, "test", id).unwrap();
        // The attack's strings, escaped twice by JSON: 30,000 quotes.
        log.append(
            "refuse",
            serde_json::json!({ "reason": "\"".repeat(30_000), "vm": "v".repeat(40_000) }),
        )
        .unwrap();
        // Many members, each below the string bound.
        let wide: serde_json::Map<String, serde_json::Value> = (0..10_000)
            .map(|i| (format!("k{i}"), serde_json::json!("\"".repeat(500))))
            .collect();
        log.append("wide", serde_json::Value::Object(wide)).unwrap();
        // Deep nesting.
        let mut deep = serde_json::json!("x");
        for _ in 0..100 {
            deep = serde_json::json!([deep]);
        }
        log.append("deep", deep).unwrap();
        // Bounded members that still add up past the line limit.
        let big: Vec<serde_json::Value> = (0..64).map(|_| serde_json::json!("\"".repeat(512))).collect();
        let many: Vec<serde_json::Value> = (0..64).map(|_| serde_json::json!(big.clone())).collect();
        log.append("many", serde_json::json!(many)).unwrap();
        assert_eq!(verify_file(&p, &cert).unwrap().0, 5);
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.iter().all(|l| l.len() < MAX_LINE));
        assert!(lines[1].contains("...(+29488 bytes)"), "{}", &lines[1][..300]);
        assert!(lines[4].contains("detail_too_large_bytes"));
    }

    #[test]
    fn a_damaged_log_is_sealed_and_a_linked_segment_starts() {
        let (d, p) = setup();
        let id = || Identity::load(d.path(), Role::Host, "h").unwrap();
        let log = AuditLog::open(&p, "test", id()).unwrap();
        for i in 0..3 {
            log.append("e", serde_json::json!({ "i": i })).unwrap();
        }
        assert!(log.sealed().is_none());
        drop(log);
        let good = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, good.replace("{\"i\":1}", "{\"i\":9}")).unwrap();
        let damaged = std::fs::read(&p).unwrap();
        let log = AuditLog::open(&p, "test", id()).unwrap();
        let s = log.sealed().unwrap().clone();
        assert_eq!(s.entries_verified, 2, "{s:?}");
        assert!(s.broken.contains("line 3") && s.broken.contains("signature"), "{s:?}");
        assert_eq!(s.sha256, line_hash(&damaged));
        // Kept aside, read-only, byte for byte.
        let aside = d.path().join(&s.file);
        assert_eq!(std::fs::read(&aside).unwrap(), damaged);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&aside).unwrap().permissions().mode() & 0o777, 0o400);
        // The new segment verifies, and its first entry names the old one.
        log.append("e", serde_json::json!({ "i": 10 })).unwrap();
        drop(log);
        assert_eq!(verify_file(&p, id().cert()).unwrap().0, 2);
        let first: Entry = serde_json::from_str(std::fs::read_to_string(&p).unwrap().lines().next().unwrap()).unwrap();
        let named: Sealed = serde_json::from_value(first.detail["previous_segment"].clone()).unwrap();
        assert_eq!(named, s);
        // A second damage gets its own name.
        std::fs::write(&p, "junk\n").unwrap();
        let log = AuditLog::open(&p, "test", id()).unwrap();
        assert_ne!(log.sealed().unwrap().file, s.file);
    }
}
