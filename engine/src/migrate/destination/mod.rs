//! The destination: the controller that loads the state and resumes the
//! guest on Commit, and one receiving worker per stream.

mod phase;
mod worker;

use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

use self::phase::Go;
use self::worker::RecvWorker;
use super::error::{settle_errors, SETTLE};
use super::transcript::transcript_root;
use super::{clone_all, pin, DestReport, MigrateError, MigrationConfig};
use crate::crypto::SessionKeys;
use crate::guest::GuestControl;
use crate::memory::GuestMemory;
use crate::progress::{Counters, Hooks, Progress, PROGRESS_EVERY};
use crate::transport::ProvenStream;
use ferry_control::decision::{CommitGate, Decision};

pub(crate) enum DstReply {
    Hello(u16),
    Final([u8; 32]),
    State(Vec<u8>),
    Commit,
    Done,
    Failed(MigrateError),
}

/// Receives a migration over `conns` (accepted and proven by
/// [`crate::transport::accept_proven`]) into `mem` (fresh, zeroed
/// memory of the source's size) and `guest` (not yet run). On `Ok` the guest
/// runs here. On `Err` the guest never ran and `mem` holds a partial image
/// that the caller must discard.
///
/// With a `gate` (the admitted session's
/// [`CommitGate`](ferry_control::decision::CommitGate)), the source's Commit
/// is recorded durably before the guest resumes, and not obeyed if the
/// migration was discarded first (its source, in doubt, asked); a failure
/// records the discard. Once the guest resumed, nothing the network does
/// makes this an `Err`: the guest runs here.
pub fn migrate_destination(
    mem: &GuestMemory,
    guest: &mut dyn GuestControl,
    conns: Vec<ProvenStream>,
    keys: &SessionKeys,
    cfg: &MigrationConfig,
    hooks: &Hooks,
    gate: Option<&CommitGate>,
) -> Result<DestReport, MigrateError> {
    cfg.validate_for(conns.len())?;
    crate::sha::apply(cfg.sha256);
    let socks = clone_all(conns.iter().map(ProvenStream::socket))?;
    let (reply_tx, reply_rx) = bounded::<(usize, DstReply)>(usize::from(cfg.streams) * 4);
    let counters = Counters::default();
    let stats: Vec<std::sync::Mutex<(u64, u64, u64)>> =
        (0..conns.len()).map(|_| std::sync::Mutex::new((0, 0, 0))).collect();
    let result = std::thread::scope(|scope| {
        let mut cmd_txs = Vec::new();
        // At most 64 connections (validated), so the index fits a u16.
        for (conn, sock) in (0u16..).zip(conns) {
            let i = usize::from(conn);
            let (tx, rx) = bounded::<Go>(2);
            cmd_txs.push(tx);
            let reply = reply_tx.clone();
            let slot = &stats[i];
            let counters = &counters;
            std::thread::Builder::new()
                .name(format!("ferry-recv-{i}"))
                .spawn_scoped(scope, move || {
                    pin(cfg, i + 1);
                    let r = RecvWorker::new(conn, mem, keys, cfg, sock, counters).and_then(|mut w| {
                        let r = w.run(&rx, &reply);
                        if let Ok(mut s) = slot.lock() {
                            *s = (w.frames, w.pages, w.inbox.bytes());
                        }
                        r
                    });
                    match r {
                        Ok(()) => {
                            let _ = reply.send((i, DstReply::Done));
                        }
                        Err(e) => {
                            let _ = reply.send((i, DstReply::Failed(e)));
                        }
                    }
                })
                .expect("spawning a receiver worker");
        }
        drop(reply_tx);
        let r = dest_drive(guest, &cmd_txs, &reply_rx, cfg, hooks, &counters, gate);
        if r.is_err() {
            if let Some(g) = gate {
                g.discard();
            }
            for s in &socks {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        drop(cmd_txs);
        r
    });
    let Resumed {
        at: resumed_at,
        transcript_root,
        commit_record_ms,
    } = result?;
    let (mut frames, mut pages, mut bytes) = (0, 0, 0);
    for s in &stats {
        // The guest runs: a worker that panicked still left its counts.
        let (f, p, b) = *s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        frames += f;
        pages += p;
        bytes += b;
    }
    Ok(DestReport {
        frames,
        pages,
        bytes_received: bytes,
        resumed_at,
        transcript_root,
        commit_record_ms,
    })
}

/// What the controller knows once the guest runs here.
#[derive(Clone, Copy)]
struct Resumed {
    at: Instant,
    transcript_root: [u8; 32],
    commit_record_ms: f64,
}

fn dest_drive(
    guest: &mut dyn GuestControl,
    cmd_txs: &[Sender<Go>],
    replies: &Receiver<(usize, DstReply)>,
    cfg: &MigrationConfig,
    hooks: &Hooks,
    counters: &Counters,
    gate: Option<&CommitGate>,
) -> Result<Resumed, MigrateError> {
    let started = Instant::now();
    let n = cmd_txs.len();
    let (mut hellos, mut finals, mut done) = (0, 0, 0);
    let mut stream_of_worker: Vec<Option<usize>> = vec![None; n];
    let mut transcripts: Vec<Option<[u8; 32]>> = vec![None; n];
    // Streams whose Hello arrived (streams <= 64, checked by validate()).
    let mut seen = 0u64;
    let mut state: Option<Vec<u8>> = None;
    let mut ready_sent = false;
    let mut resumed: Option<Resumed> = None;
    let mut zero_worker = None;
    let mut deadline = Instant::now() + cfg.io_timeout * 3;
    loop {
        if !ready_sent && hooks.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        let wait = PROGRESS_EVERY.min(deadline.saturating_duration_since(Instant::now()));
        let (i, r) = match replies.recv_timeout(wait) {
            Ok(r) => {
                deadline = Instant::now() + cfg.io_timeout * 3;
                r
            }
            Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                let (pages, bytes) = counters.get();
                hooks.emit(&Progress::Receiving { pages, bytes });
                continue;
            }
            // The guest runs here: a source gone quiet after Resumed changes
            // nothing.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) if resumed.is_some() => {
                tracing::warn!("destination: the streams did not all end after the guest resumed; it runs here");
                return resumed.ok_or(MigrateError::WorkersGone);
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(MigrateError::SourceSilent(cfg.io_timeout * 3));
            }
            Err(RecvTimeoutError::Disconnected) => return Err(MigrateError::WorkersGone),
        };
        match r {
            DstReply::Hello(stream) => {
                // Every stream exactly once: a connection that repeats another
                // stream (a copied or replayed connection) would otherwise
                // stand in for a stream that never arrived.
                let bit = 1u64 << stream;
                if seen & bit != 0 {
                    return Err(MigrateError::Protocol {
                        stream,
                        detail: format!("stream {stream} opened twice: a duplicated or replayed connection"),
                    });
                }
                seen |= bit;
                hellos += 1;
                stream_of_worker[i] = Some(usize::from(stream));
            }
            DstReply::Final(t) => {
                finals += 1;
                if let Some(slot) = transcripts.get_mut(stream_of_worker[i].unwrap_or(usize::MAX)) {
                    *slot = Some(t);
                }
            }
            DstReply::State(s) => {
                zero_worker = Some(i);
                state = Some(s);
            }
            DstReply::Commit => {
                // The source has given the VM up: record it, then run it
                // here (unless it was discarded first: see CommitGate).
                let root = transcript_root(&transcripts).ok_or(MigrateError::MissingTranscript)?;
                let recording = Instant::now();
                if let Some(g) = gate {
                    match g.commit().map_err(MigrateError::Decision)? {
                        Decision::Committed => {}
                        Decision::Discarded => return Err(MigrateError::DiscardedBeforeCommit),
                    }
                }
                let commit_record_ms = recording.elapsed().as_secs_f64() * 1e3;
                guest.resume()?;
                resumed = Some(Resumed {
                    at: Instant::now(),
                    transcript_root: root,
                    commit_record_ms,
                });
                hooks.emit(&Progress::Resumed {
                    elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                });
                let _ = cmd_txs[i].send(Go::SendResumed);
            }
            DstReply::Done => {
                done += 1;
                if done == n {
                    return resumed.ok_or(MigrateError::Protocol {
                        stream: 0,
                        detail: "streams ended without a commit".into(),
                    });
                }
            }
            DstReply::Failed(e) if resumed.is_some() => {
                tracing::warn!("destination: a stream failed after the guest resumed (it runs here): {e}");
                done += 1;
                if done == n {
                    return resumed.ok_or(MigrateError::WorkersGone);
                }
            }
            DstReply::Failed(e) => {
                return Err(settle_errors(e, || match replies.recv_timeout(SETTLE) {
                    Ok((_, DstReply::Failed(e))) => Some(Some(e)),
                    Ok(_) => Some(None),
                    Err(_) => None,
                }))
            }
        }
        if !ready_sent && finals == n && hellos == n {
            let (Some(s), Some(z)) = (state.as_ref(), zero_worker) else {
                return Err(MigrateError::Protocol {
                    stream: 0,
                    detail: "final round ended without device state".into(),
                });
            };
            guest.load_state(s)?;
            ready_sent = true;
            cmd_txs[z]
                .send(Go::SendReady)
                .map_err(|_| MigrateError::WorkerLost(0))?;
        }
    }
}
