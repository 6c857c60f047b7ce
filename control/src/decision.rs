//! The destination's durable record of what it did with each migration it
//! admitted: **committed** (it ran the guest) or **discarded** (it never
//! will). Written, and synced to disk, before the guest resumes and before
//! an answer about it leaves this host; decided once (the first decision
//! stands), so a Commit that arrives after a discard is not obeyed.
//!
//! It is what ends "in doubt": a source that sent Commit but never heard
//! that the guest resumed asks the destination over a fresh mutually
//! authenticated channel ([`crate::handshake::resolve`]), and resumes its
//! paused copy only on a signed "discarded". Asked about a migration it
//! admitted but has not decided, the destination decides "discarded" then
//! and there (the source, still holding the paused guest, is asking
//! because it will not go on). An admitted migration left undecided by a
//! process that died is discarded when the next one opens the record: the
//! guest lived in that process (the lock of [`crate::lock`] makes sure no
//! other process still holds it).
//!
//! File: one line per event, `admitted ID SOURCE_FP`, `committed ID` or
//! `discarded ID` (ID in hex), appended and fdatasync'd. Only whole lines
//! count: a torn last one (a crash mid-write; "committed 2" cut from
//! "committed 2f") is not trusted and is cut off at the next open.
//! (Overwriting preallocated zeros instead of appending, to spare the
//! filesystem a metadata commit inside the downtime, measured no faster on
//! these machines: the device flush is the cost; see PERF.md.) When the file passes
//! [`COMPACT_AFTER_LINES`], opening it rewrites the latest [`KEEP`]
//! migrations (atomically: a new file renamed over the old).

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What the destination did with a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The guest resumed here (or was about to: the record is written first).
    Committed,
    /// The guest never ran here and never will.
    Discarded,
}

impl Decision {
    /// Its name on disk and on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Committed => "committed",
            Decision::Discarded => "discarded",
        }
    }
}

/// Migrations remembered after compaction.
pub const KEEP: usize = 65_536;
/// Lines after which opening the file compacts it.
pub const COMPACT_AFTER_LINES: usize = 4 * KEEP;

/// Why the record failed.
#[derive(Debug, thiserror::Error)]
pub enum DecisionError {
    /// The file could not be read, written or synced: nothing was decided
    /// (a Commit is not obeyed without its record).
    #[error(
        "decision record {path}: {source}: fix the disk or the state directory; until then no migration commits here"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another daemon uses this state directory.
    #[error(transparent)]
    Locked(#[from] crate::lock::LockError),
}

#[derive(Debug, Clone)]
struct Entry {
    source_fp: String,
    decision: Option<Decision>,
}

#[derive(Debug)]
struct Inner {
    entries: HashMap<u64, Entry>,
    /// Admission order, for compaction.
    order: VecDeque<u64>,
    file: Option<File>,
}

/// The record (one per destination daemon; see the module docs).
#[derive(Debug)]
pub struct DecisionLog {
    path: PathBuf,
    inner: Mutex<Inner>,
    _lock: Option<crate::lock::HeldLock>,
}

/// What the record says about one migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The source host's certificate fingerprint (from the ticket).
    pub source_fp: String,
    /// The decision, if one was made.
    pub decision: Option<Decision>,
}

fn parse(line: &str) -> Option<(u64, &str, Option<&str>)> {
    let mut it = line.split(' ');
    let kind = it.next()?;
    let id = u64::from_str_radix(it.next()?, 16).ok()?;
    let fp = it.next();
    if it.next().is_some() {
        return None;
    }
    Some((id, kind, fp))
}

impl DecisionLog {
    /// A record kept only in memory (tests and embedders without a state
    /// directory: a restart forgets it).
    pub fn in_memory() -> DecisionLog {
        DecisionLog {
            path: PathBuf::from("(memory)"),
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: VecDeque::new(),
                file: None,
            }),
            _lock: None,
        }
    }

    /// Opens (or creates) the record at `path`, locked for this process;
    /// migrations a previous process admitted and never decided are
    /// recorded as discarded (that process, and the guest it held, is gone).
    pub fn open(path: &Path) -> Result<DecisionLog, DecisionError> {
        let lock = crate::lock::exclusive(path, "decision record")?;
        let err = |source| DecisionError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(err(e)),
        };
        // Only whole lines count: a torn last one is not trusted.
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut entries: HashMap<u64, Entry> = HashMap::new();
        let mut order = VecDeque::new();
        let mut lines = 0usize;
        for line in bytes[..complete].split(|&b| b == b'\n') {
            lines += 1;
            let Some((id, kind, fp)) = std::str::from_utf8(line).ok().and_then(parse) else {
                continue;
            };
            match (kind, fp) {
                ("admitted", Some(fp)) => {
                    order.push_back(id);
                    entries.insert(
                        id,
                        Entry {
                            source_fp: fp.into(),
                            decision: None,
                        },
                    );
                }
                ("committed" | "discarded", None) => {
                    if let Some(e) = entries.get_mut(&id) {
                        if e.decision.is_none() {
                            e.decision = Some(if kind == "committed" {
                                Decision::Committed
                            } else {
                                Decision::Discarded
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        let orphans: Vec<u64> = order
            .iter()
            .copied()
            .filter(|id| entries.get(id).is_some_and(|e| e.decision.is_none()))
            .collect();
        let compact = lines > COMPACT_AFTER_LINES;
        if compact {
            for id in &orphans {
                if let Some(e) = entries.get_mut(id) {
                    e.decision = Some(Decision::Discarded);
                }
            }
            while order.len() > KEEP {
                if let Some(id) = order.pop_front() {
                    entries.remove(&id);
                }
            }
            Self::rewrite(path, &order, &entries).map_err(err)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(err)?;
        if !compact && bytes.len() > complete {
            // A torn record is cut off, so the next one starts a whole line.
            file.set_len(complete as u64).map_err(err)?;
            file.sync_data().map_err(err)?;
        }
        let log = DecisionLog {
            path: path.to_path_buf(),
            inner: Mutex::new(Inner {
                entries,
                order,
                file: Some(file),
            }),
            _lock: Some(lock),
        };
        {
            let mut inner = log.lock();
            for id in &orphans {
                log.decide_locked(&mut inner, *id, Decision::Discarded)?;
            }
        }
        if !orphans.is_empty() {
            tracing::warn!(
                count = orphans.len(),
                "decision record: migrations admitted by a previous process and never decided are discarded"
            );
        }
        Ok(log)
    }

    fn rewrite(path: &Path, order: &VecDeque<u64>, entries: &HashMap<u64, Entry>) -> std::io::Result<()> {
        let tmp = path.with_extension("compacting");
        let mut f = File::create(&tmp)?;
        let mut text = String::new();
        for id in order {
            if let Some(e) = entries.get(id) {
                text.push_str(&format!("admitted {id:x} {}\n", e.source_fp));
                if let Some(d) = e.decision {
                    text.push_str(&format!("{} {id:x}\n", d.as_str()));
                }
            }
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends one record line and syncs it (no-op in memory).
    fn append(&self, inner: &mut Inner, line: &str) -> Result<(), DecisionError> {
        if let Some(f) = inner.file.as_mut() {
            let err = |source| DecisionError::Io {
                path: self.path.clone(),
                source,
            };
            f.write_all(line.as_bytes()).map_err(err)?;
            f.sync_data().map_err(err)?;
        }
        Ok(())
    }

    /// Records that migration `id` from the source with certificate
    /// fingerprint `source_fp` was admitted (before the acceptance is sent).
    pub fn admitted(&self, id: u64, source_fp: &str) -> Result<(), DecisionError> {
        let mut inner = self.lock();
        self.append(&mut inner, &format!("admitted {id:x} {source_fp}\n"))?;
        inner.order.push_back(id);
        inner.entries.insert(
            id,
            Entry {
                source_fp: source_fp.into(),
                decision: None,
            },
        );
        Ok(())
    }

    /// Decides migration `id` as `want` unless it was decided already;
    /// returns the decision that stands, on disk before this returns. An id
    /// never admitted here is left alone (`None`).
    pub fn decide(&self, id: u64, want: Decision) -> Result<Option<Decision>, DecisionError> {
        let mut inner = self.lock();
        self.decide_locked(&mut inner, id, want)
    }

    fn decide_locked(&self, inner: &mut Inner, id: u64, want: Decision) -> Result<Option<Decision>, DecisionError> {
        match inner.entries.get(&id).map(|e| e.decision) {
            None => Ok(None),
            Some(Some(d)) => Ok(Some(d)),
            Some(None) => {
                self.append(inner, &format!("{} {id:x}\n", want.as_str()))?;
                if let Some(e) = inner.entries.get_mut(&id) {
                    e.decision = Some(want);
                }
                Ok(Some(want))
            }
        }
    }

    /// What the record says about migration `id`.
    pub fn lookup(&self, id: u64) -> Option<Known> {
        self.lock().entries.get(&id).map(|e| Known {
            source_fp: e.source_fp.clone(),
            decision: e.decision,
        })
    }
}

/// One admitted migration's place in the record, held by its
/// [`crate::handshake::DestinationSession`]: the data plane calls
/// [`CommitGate::commit`] when the source's Commit arrives (the guest
/// resumes only on `Committed`); dropped undecided — any failure, any
/// return, a panic — it decides "discarded".
#[derive(Debug)]
pub struct CommitGate {
    log: Arc<DecisionLog>,
    id: u64,
}

impl CommitGate {
    pub(crate) fn new(log: Arc<DecisionLog>, id: u64) -> CommitGate {
        CommitGate { log, id }
    }

    /// The source's Commit arrived: records "committed" unless the
    /// migration was discarded first (a source's resolve came earlier);
    /// returns the decision that stands. Resume the guest only on
    /// `Committed`.
    pub fn commit(&self) -> Result<Decision, DecisionError> {
        Ok(self
            .log
            .decide(self.id, Decision::Committed)?
            .unwrap_or(Decision::Committed))
    }

    /// The migration failed here: records "discarded" unless decided.
    pub fn discard(&self) {
        if let Err(e) = self.log.decide(self.id, Decision::Discarded) {
            tracing::error!(migration = self.id, "recording the discard failed: {e}");
        }
    }
}

impl Drop for CommitGate {
    fn drop(&mut self) {
        self.discard();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-decision-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d.join("decisions")
    }

    #[test]
    fn the_first_decision_stands_and_survives_a_restart() {
        let p = temp("first");
        {
            let log = Arc::new(DecisionLog::open(&p).unwrap());
            log.admitted(7, "aa").unwrap();
            log.admitted(8, "bb").unwrap();
            assert_eq!(log.decide(7, Decision::Discarded).unwrap(), Some(Decision::Discarded));
            // A Commit after the discard is not obeyed.
            let gate = CommitGate::new(log.clone(), 7);
            assert_eq!(gate.commit().unwrap(), Decision::Discarded);
            let gate8 = CommitGate::new(log.clone(), 8);
            assert_eq!(gate8.commit().unwrap(), Decision::Committed);
            drop(gate8); // decided: the drop changes nothing
            assert_eq!(log.decide(8, Decision::Discarded).unwrap(), Some(Decision::Committed));
            assert_eq!(log.decide(9, Decision::Discarded).unwrap(), None, "never admitted");
        }
        let log = DecisionLog::open(&p).unwrap();
        assert_eq!(log.lookup(7).unwrap().decision, Some(Decision::Discarded));
        assert_eq!(
            log.lookup(8),
            Some(Known {
                source_fp: "bb".into(),
                decision: Some(Decision::Committed)
            })
        );
        assert_eq!(log.lookup(9), None);
    }

    #[test]
    fn a_dropped_gate_discards_and_a_dead_process_leaves_no_undecided_migration() {
        let p = temp("orphan");
        {
            let log = Arc::new(DecisionLog::open(&p).unwrap());
            log.admitted(1, "aa").unwrap();
            log.admitted(2, "aa").unwrap();
            drop(CommitGate::new(log.clone(), 1));
            assert_eq!(log.lookup(1).unwrap().decision, Some(Decision::Discarded));
            // 2 stays undecided, as if the process died with it.
            assert_eq!(log.lookup(2).unwrap().decision, None);
        }
        // A torn record from a crash mid-write ("committed 2" cut short
        // would name migration 0x2 as well as 0x2f) is not trusted.
        let records = |p: &Path| std::fs::read_to_string(p).unwrap();
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"committed 2").unwrap();
        drop(f);
        let log = DecisionLog::open(&p).unwrap();
        assert_eq!(log.lookup(2).unwrap().decision, Some(Decision::Discarded));
        drop(log);
        // ... and the discard was written over the torn bytes, not just assumed.
        let text = records(&p);
        assert!(text.ends_with("discarded 2\n"), "{text:?}");
        assert!(!text.contains("committed 2"), "{text:?}");
    }

    #[test]
    fn a_second_process_on_the_same_record_is_refused() {
        let p = temp("locked");
        let _first = DecisionLog::open(&p).unwrap();
        assert!(matches!(DecisionLog::open(&p), Err(DecisionError::Locked(_))));
    }

    #[test]
    fn compaction_keeps_the_latest_migrations() {
        let p = temp("compact");
        let mut text = String::new();
        for id in 0..(COMPACT_AFTER_LINES as u64 / 2 + 10) {
            text.push_str(&format!("admitted {id:x} fp\ncommitted {id:x}\n"));
        }
        std::fs::write(&p, text).unwrap();
        let log = DecisionLog::open(&p).unwrap();
        let last = COMPACT_AFTER_LINES as u64 / 2 + 9;
        assert_eq!(log.lookup(last).unwrap().decision, Some(Decision::Committed));
        assert_eq!(log.lookup(0), None);
        drop(log);
        let lines = std::fs::read_to_string(&p).unwrap().lines().count();
        assert_eq!(lines, 2 * KEEP);
    }
}
