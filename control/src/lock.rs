//! One writer per state file: an exclusive advisory lock (`flock`) on a lock
//! file beside it, held for as long as the writer lives. Two daemons on one
//! `--state-dir` would each accept the same ticket (the replay cache is read
//! only at start) and fork the audit chain; with the lock the second one
//! refuses to start and names the first.
//!
//! The lock goes with the process: a crashed holder releases it, so there is
//! no stale lock to clean up by hand.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// A lock that cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (or another writer in this one) holds it.
    #[error(
        "{what} {path} is in use by {holder}: give each daemon its own state \
         directory or audit file, or stop the other one first"
    )]
    Held {
        /// What the lock guards ("replay cache", "audit log").
        what: &'static str,
        /// The guarded file.
        path: PathBuf,
        /// Who holds it, as far as its lock file says.
        holder: String,
    },
    /// The lock file cannot be opened or locked.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An exclusive lock on a state file, released on drop (or when the process
/// ends, however it ends).
#[derive(Debug)]
pub struct HeldLock {
    _file: File,
}

/// The lock file of `guarded`: its name with `.lock` appended.
pub fn lock_path(guarded: &Path) -> PathBuf {
    let mut name = guarded.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Takes the exclusive lock guarding `guarded` (described as `what`), or
/// says who has it. Never waits: a second writer is a configuration error,
/// not contention.
pub fn exclusive(guarded: &Path, what: &'static str) -> Result<HeldLock, LockError> {
    let path = lock_path(guarded);
    let io = |source| LockError::Io {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    match flock(&file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim() {
                "" => "another writer".to_string(),
                t => format!("process {}", t.chars().take(20).collect::<String>()),
            };
            return Err(LockError::Held {
                what,
                path: guarded.to_path_buf(),
                holder,
            });
        }
        Err(e) => return Err(io(e.into())),
    }
    // Holding it: say who, for the next one's error.
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    write!(file, "{}", std::process::id()).map_err(io)?;
    Ok(HeldLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_writer_is_refused_and_named_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("audit.jsonl");
        let first = exclusive(&f, "audit log").unwrap();
        match exclusive(&f, "audit log") {
            Err(LockError::Held { what, path, holder }) => {
                assert_eq!((what, path), ("audit log", f.clone()));
                assert_eq!(holder, format!("process {}", std::process::id()));
            }
            other => panic!("a second writer got the lock: {other:?}"),
        }
        drop(first);
        exclusive(&f, "audit log").unwrap();
        assert_eq!(lock_path(&f), dir.path().join("audit.jsonl.lock"));
    }
}
