//! The destination's replay cache: every authorization ticket nonce it has
//! accepted, until the ticket expires. Kept in a file (append + fsync before
//! the nonce is honoured), so a restarted daemon still refuses a replay.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use thiserror::Error;

/// Most live nonces kept; beyond it new tickets are refused (fail closed).
pub const MAX_ENTRIES: usize = 100_000;

/// Replay cache errors.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The nonce was seen before.
    #[error("ticket nonce {0} was already used: a replayed ticket")]
    Replayed(String),
    /// Too many live entries.
    #[error("replay cache full ({MAX_ENTRIES} live tickets); refusing until some expire")]
    Full,
    /// The file failed.
    #[error("replay cache {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// Another destination uses this cache.
    #[error(transparent)]
    Locked(#[from] crate::lock::LockError),
}

/// Seen nonces and their expiry.
#[derive(Debug)]
pub struct ReplayCache {
    path: Option<PathBuf>,
    inner: Mutex<(HashMap<String, u64>, Option<File>)>,
    _lock: Option<crate::lock::HeldLock>,
}

impl ReplayCache {
    /// A cache that lives only in memory (tests).
    pub fn in_memory() -> ReplayCache {
        ReplayCache {
            path: None,
            inner: Mutex::new((HashMap::new(), None)),
            _lock: None,
        }
    }

    /// Opens (or creates) the cache file, dropping expired entries.
    pub fn open(path: &Path, now: u64) -> Result<ReplayCache, ReplayError> {
        let err = |source| ReplayError::Io {
            path: path.to_path_buf(),
            source,
        };
        // One destination per cache: a second one, reading it only at its
        // start, would admit a ticket the first has just spent.
        let lock = crate::lock::exclusive(path, "replay cache")?;
        let mut seen = HashMap::new();
        if path.exists() {
            let f = File::open(path).map_err(err)?;
            for line in BufReader::new(f).lines() {
                let line = line.map_err(err)?;
                if let Some((n, e)) = line.split_once(' ') {
                    if let Ok(exp) = e.trim().parse::<u64>() {
                        if exp >= now {
                            seen.insert(n.to_string(), exp);
                        }
                    }
                }
            }
        }
        // Rewrite without the expired entries, then append from there.
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp).map_err(err)?;
            for (n, e) in &seen {
                writeln!(f, "{n} {e}").map_err(err)?;
            }
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)?;
        let file = OpenOptions::new().append(true).open(path).map_err(err)?;
        Ok(ReplayCache {
            path: Some(path.to_path_buf()),
            inner: Mutex::new((seen, Some(file))),
            _lock: Some(lock),
        })
    }

    /// Nonces held (live, and expired ones not yet dropped).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .len()
    }

    /// Whether it holds no nonce.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records `nonce` (valid until `exp`) or refuses it if seen before.
    /// The record is durable before this returns `Ok`.
    pub fn check_and_insert(&self, nonce: &str, exp: u64, now: u64) -> Result<(), ReplayError> {
        let mut g = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (seen, file) = &mut *g;
        if seen.contains_key(nonce) {
            return Err(ReplayError::Replayed(nonce.into()));
        }
        if seen.len() >= MAX_ENTRIES {
            seen.retain(|_, e| *e >= now);
            if seen.len() >= MAX_ENTRIES {
                return Err(ReplayError::Full);
            }
        }
        if let (Some(f), Some(path)) = (file.as_mut(), self.path.as_ref()) {
            let err = |source| ReplayError::Io {
                path: path.clone(),
                source,
            };
            writeln!(f, "{nonce} {exp}").map_err(err)?;
            f.sync_data().map_err(err)?;
        }
        seen.insert(nonce.into(), exp);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_replays_across_a_restart_and_forgets_expired() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("replay");
        let c = ReplayCache::open(&p, 100).unwrap();
        c.check_and_insert("aa", 200, 100).unwrap();
        c.check_and_insert("bb", 150, 100).unwrap();
        assert!(matches!(
            c.check_and_insert("aa", 200, 101),
            Err(ReplayError::Replayed(_))
        ));
        drop(c);
        let c = ReplayCache::open(&p, 160).unwrap();
        assert!(matches!(
            c.check_and_insert("aa", 200, 160),
            Err(ReplayError::Replayed(_))
        ));
        c.check_and_insert("bb", 300, 160).unwrap(); // expired entry forgotten
    }
}
