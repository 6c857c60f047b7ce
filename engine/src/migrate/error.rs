//! Why a migration failed, and which of several failures tells most.

use std::time::Duration;

use thiserror::Error;

use super::convergence::{Converge, GiveUp};
use crate::dirty::DirtyError;
use crate::guest::GuestError;
use crate::io::IoError;
use crate::pipeline::FrameError;
use crate::wire::WireError;

/// Why a migration failed. Each names the stream, and where it applies the
/// sequence and round, of what went wrong.
#[derive(Debug, Error)]
pub enum MigrateError {
    /// The connection failed, closed or went silent.
    #[error("stream {stream}, round {round}, {during}: {source}")]
    Transport {
        /// Stream.
        stream: u16,
        /// Round in progress.
        round: u32,
        /// What the stream was doing.
        during: &'static str,
        /// What happened.
        #[source]
        source: IoError,
    },
    /// A frame failed authentication or its page digest.
    #[error("integrity check failed on stream {stream} at sequence {seq} (round {round}): {detail}; the frame was altered in transit or sealed under other keys")]
    Integrity {
        /// Stream.
        stream: u16,
        /// Sequence of the bad frame.
        seq: u64,
        /// Round the frame claims.
        round: u32,
        /// Tag or digest.
        detail: FrameError,
    },
    /// A frame out of order: replayed, reordered or dropped.
    #[error("stream {stream}: expected frame sequence {expected}, got {got} (round {round}): a replayed, reordered or dropped frame")]
    Sequence {
        /// Stream.
        stream: u16,
        /// Sequence expected.
        expected: u64,
        /// Sequence received.
        got: u64,
        /// Round the frame claims.
        round: u32,
    },
    /// A header that does not decode.
    #[error("stream {stream}: malformed frame after sequence {after_seq}: {source}")]
    Malformed {
        /// Stream.
        stream: u16,
        /// Last good sequence + 1.
        after_seq: u64,
        /// Decoding error.
        #[source]
        source: WireError,
    },
    /// A well-formed frame that breaks the protocol.
    #[error("stream {stream}: protocol violation: {detail}")]
    Protocol {
        /// Stream.
        stream: u16,
        /// What was wrong.
        detail: String,
    },
    /// The other side aborted, with its reason.
    #[error("the peer aborted the migration (stream {stream}): {reason}")]
    PeerAborted {
        /// Stream the abort arrived on.
        stream: u16,
        /// The peer's reason.
        reason: String,
    },
    /// Pausing, resuming or (de)serialising the guest failed.
    #[error("guest: {0}")]
    Guest(#[from] GuestError),
    /// The dirty tracker failed.
    #[error("{0}")]
    Tracker(#[from] DirtyError),
    /// Setting a stream up failed.
    #[error("setting up stream {stream}: {source}")]
    Setup {
        /// Stream (or connection index).
        stream: u16,
        /// What failed.
        #[source]
        source: IoError,
    },
    /// The embedder called [`Hooks::cancel`](crate::progress::Hooks::cancel) before the commit point: the
    /// source's guest keeps running there.
    #[error("cancelled before the commit point: the migration stopped and the guest keeps running at the source")]
    Cancelled,
    /// Commit was sent but the destination's confirmation never came.
    #[error("commit sent, but the destination did not confirm that the guest runs within {0:?}: the guest stays PAUSED at the source until the destination says, signed, what became of the migration (ferry's source asks it: `ferry resolve`); its audit log says it too (this migration id's `received` entry: the guest runs there, `aborted`: it was discarded)")]
    InDoubt(Duration),
    /// The source's Commit arrived after this destination had recorded the
    /// migration as discarded (its source, in doubt, had asked): the guest
    /// does not run here; the source resumes it on the signed answer.
    #[error("the source's Commit came after this destination had discarded the migration (its source asked, in doubt): the guest does not run here and the source resumes it")]
    DiscardedBeforeCommit,
    /// The destination's decision record failed: the guest is not resumed
    /// here without it.
    #[error("{0}; the guest was not resumed here and the source keeps it paused until it learns the outcome")]
    Decision(#[source] ferry_control::decision::DecisionError),
    /// Pre-copy cannot fit the rest in the downtime target and the policy
    /// said to give up: the guest was never paused and keeps running.
    #[error("{0}")]
    WontConverge(Box<NoConvergence>),
    /// The migration's total time limit ran out before the commit point:
    /// the guest keeps running at the source.
    #[error("the migration did not reach its commit point within its time limit of {0:?} (--timeout-s); it stopped and the guest keeps running at the source. Raise the limit, cap less, or see `ferry estimate`")]
    TimedOut(Duration),
    /// The `postcopy` policy was asked for.
    #[error("--converge postcopy is not available yet in this version of ferry; use throttle (slow the guest until it fits), abort (give up before pausing) or force (switch over past the target)")]
    PostcopyUnavailable,
    /// A setting out of range, or the two sides disagree.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A worker thread vanished (a bug).
    #[error("worker for stream {0} stopped without a report (internal error)")]
    WorkerLost(u16),
    /// Every worker thread stopped without a report (a bug).
    #[error("every stream worker stopped without a report (internal error)")]
    WorkersGone,
    /// A worker thread panicked before the commit point (a bug; the panic
    /// message is in the log): the source guest was resumed. (After the
    /// commit point a panic shows as [`MigrateError::InDoubt`].)
    #[error("the worker for stream {0} panicked (a bug in ferry: its message is in the log above); the migration stopped before its commit point and the guest runs at the source again")]
    WorkerPanicked(u16),
    /// A stream's final transcript is missing (a bug).
    #[error("a stream reported its final round without its transcript (internal error)")]
    MissingTranscript,
    /// No stream from the source made progress in time (destination).
    #[error("nothing arrived from the source for {0:?}: it is dead, stalled or cut off; the guest never ran here")]
    SourceSilent(Duration),
    /// The data streams could not be opened (connect or accept).
    #[error(transparent)]
    Open(#[from] crate::transport::OpenError),
    /// A worker thread could not be started.
    #[error("starting the worker thread for stream {stream}: {source}; the host is out of threads or memory")]
    Spawn {
        /// Stream.
        stream: u16,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// What pre-copy measured when it gave up: the numbers an operator needs to
/// decide what to try next.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NoConvergence {
    /// Why it gave up.
    pub why: GiveUp,
    /// The policy in force.
    pub converge: Converge,
    /// Pages the guest dirtied per second in the last round.
    pub dirty_rate_pages_per_s: f64,
    /// The bandwidth the rounds measured, bytes per second.
    pub bandwidth_bytes_per_s: f64,
    /// What the paused round would have taken.
    pub expected_downtime_ms: f64,
    /// The operator's downtime target.
    pub downtime_target_ms: u64,
    /// The throttle in force when it gave up (0..1).
    pub throttle: f64,
    /// The live rounds that ran.
    pub rounds: Vec<super::RoundStats>,
}

impl std::fmt::Display for NoConvergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mb = |bytes_per_s: f64| bytes_per_s / 1e6;
        write!(
            f,
            "won't converge: the guest dirtied {:.0} distinct pages/s ({:.0} MB/s) and the link carried {:.0} MB/s, so the paused round would take {:.0} ms against a target of {} ms ({}, after {} live rounds",
            self.dirty_rate_pages_per_s,
            mb(self.dirty_rate_pages_per_s * crate::memory::PAGE_SIZE_U64 as f64),
            mb(self.bandwidth_bytes_per_s),
            self.expected_downtime_ms,
            self.downtime_target_ms,
            self.why.as_str(),
            self.rounds.len()
        )?;
        if self.throttle > 0.0 {
            write!(
                f,
                ", guest throttled to {:.0} % of its time",
                (1.0 - self.throttle) * 100.0
            )?;
        }
        write!(
            f,
            "). The guest was never paused and keeps running at the source. Try: "
        )?;
        f.write_str(match (self.converge, self.why) {
            (_, GiveUp::CannotThrottle) => {
                "--converge force (switch over past the target), a higher --downtime-ms-max, more bandwidth, or a VMM that supports throttling"
            }
            (Converge::Throttle, _) => {
                "a higher --throttle-max or --downtime-ms-max, more bandwidth, --converge force, or migrating when the guest writes less"
            }
            _ => {
                "--converge throttle (slow the guest until it fits), a higher --downtime-ms-max, more bandwidth (or a higher --max-bandwidth), --converge force, or migrating when the guest writes less"
            }
        })
    }
}

impl MigrateError {
    pub(super) fn io(stream: u16, round: u32, during: &'static str) -> impl FnOnce(IoError) -> MigrateError {
        move |source| MigrateError::Transport {
            stream,
            round,
            during,
            source,
        }
    }
}

/// How long a failing side waits for its other streams' reports.
pub(super) const SETTLE: Duration = Duration::from_millis(250);

impl MigrateError {
    /// How much the error tells an operator: the peer's own reason first,
    /// then what was wrong with the data, then a stream that merely closed.
    fn rank(&self) -> u8 {
        match self {
            MigrateError::PeerAborted { .. } | MigrateError::Cancelled => 0,
            MigrateError::Transport { .. }
            | MigrateError::Setup { .. }
            | MigrateError::WorkerLost(_)
            | MigrateError::WorkersGone
            | MigrateError::Open(_)
            | MigrateError::SourceSilent(_) => 2,
            _ => 1,
        }
    }
}

/// Keeps the best-ranked of `first` and the errors `next` yields
/// (`Some(Some(e))` an error, `Some(None)` another reply, `None` no more).
pub(super) fn settle_errors(
    first: MigrateError,
    mut next: impl FnMut() -> Option<Option<MigrateError>>,
) -> MigrateError {
    let mut best = first;
    if best.rank() == 0 {
        return best;
    }
    while let Some(r) = next() {
        if let Some(e) = r {
            if e.rank() < best.rank() {
                best = e;
                if best.rank() == 0 {
                    break;
                }
            }
        }
    }
    best
}
