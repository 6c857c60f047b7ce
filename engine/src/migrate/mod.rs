//! Pre-copy live migration: the source's round controller and stream
//! workers, the destination's mirror, and the two-phase switchover.
//!
//! ```text
//! source controller                 workers (one per stream, pinned)        destination
//!  round 1: every page      ──Round──▶ chunks of my stripes → frames ──▶ open, verify, write
//!  round r: dirty pages     ◀─Done────  wait until every frame acked ◀── Ack (batched)
//!  converged? (dirty bytes / bandwidth <= downtime target)
//!  pause guest, last dirty set, device state ──▶ final frames + state ──▶ load state
//!                                          ◀── Ready (stream 0)
//!  COMMIT POINT: the source gives the VM up ──▶ Commit ──────────────▶ resume guest
//!                                          ◀── Resumed
//! ```
//!
//! Before the source receives `Ready`, any failure (a bad frame, a dead or
//! silent peer, an abort) shuts every stream down and the source resumes its
//! guest: the destination discards what it got, never having run it. After
//! `Ready` the source never resumes; if `Resumed` does not come back it
//! reports [`MigrateError::InDoubt`] and keeps its paused copy untouched,
//! so the VM runs in at most one place and its state is never lost.

mod config;
pub mod convergence;
mod destination;
mod error;
pub mod estimate;
pub mod inbox;
mod report;
mod source;
mod transcript;

use std::net::TcpStream;
use std::time::{Duration, Instant};

pub use self::config::MigrationConfig;
pub use self::destination::migrate_destination;
pub use self::error::{MigrateError, NoConvergence};
pub use self::report::{DestReport, RoundStats, SourceReport};
pub use self::source::migrate_source;
use crate::crypto::Sealer;
use crate::io::Conn;
pub use crate::io::IoError;
use crate::pipeline::{self, StreamHeader};
use crate::wire::{self, Kind, HEADER_LEN};

fn clone_all<'a>(conns: impl IntoIterator<Item = &'a TcpStream>) -> Result<Vec<TcpStream>, MigrateError> {
    // At most 64 connections (validated), so the index fits a u16.
    (0u16..)
        .zip(conns)
        .map(|(stream, c)| {
            c.try_clone().map_err(|e| MigrateError::Setup {
                stream,
                source: IoError::Socket { op: "clone", source: e },
            })
        })
        .collect()
}

fn pin(cfg: &MigrationConfig, index: usize) {
    if !cfg.pin_workers {
        return;
    }
    if let Some(ids) = core_affinity::get_core_ids() {
        if !ids.is_empty() {
            core_affinity::set_for_current(ids[index % ids.len()]);
        }
    }
}

/// Frames the destination sends are small; anything larger is refused.
pub(crate) const MAX_TO_SOURCE_FRAME: usize = HEADER_LEN + wire::MAX_REASON + wire::TAG_LEN;

/// The Hello a side with `cfg` sends (source) or expects (destination).
pub(crate) fn hello_of(cfg: &MigrationConfig) -> wire::Hello {
    wire::Hello {
        streams: cfg.streams,
        integrity: cfg.integrity,
    }
}

/// Sends `Abort(reason)` on a stream, best effort, within a short time.
pub(crate) fn send_abort(conn: &mut Conn, sealer: &mut Sealer, hdr: StreamHeader, reason: &str) {
    let mut reason = reason.as_bytes();
    if reason.len() > wire::MAX_REASON {
        reason = &reason[..wire::MAX_REASON];
    }
    let mut out = Vec::with_capacity(HEADER_LEN + reason.len() + wire::TAG_LEN);
    pipeline::encode_control(Kind::Abort, 0, hdr, 0, reason, sealer, &mut out);
    if conn.send_busy() || conn.start_send(out).is_err() {
        return;
    }
    let limit = Duration::from_millis(500).min(conn.timeout());
    let deadline = Instant::now() + limit;
    while conn.send_busy() && Instant::now() < deadline {
        if conn.wait_for(limit).is_err() {
            return;
        }
    }
}
