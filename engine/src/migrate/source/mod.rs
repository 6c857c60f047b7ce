//! The source: the round controller that decides, pauses and commits, and
//! one sending worker per stream.

mod switchover;
mod worker;

use std::net::TcpStream;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};

pub(crate) use self::switchover::ReadyFrame;
use self::switchover::{FinalAcked, Paused, Tracking};
use self::worker::SendWorker;
use super::convergence::{self, Decision, Limits, RoundOutcome, StopReason};
use super::error::{settle_errors, SETTLE};
use super::report::gbps;
use super::transcript::transcript_root;
use super::{clone_all, pin, MigrateError, MigrationConfig, RoundStats, SourceReport};
use crate::bitmap::DirtyBitmap;
use crate::crypto::SessionKeys;
use crate::dirty::DirtyTracker;
use crate::guest::GuestControl;
use crate::memory::{GuestMemory, PAGE_SIZE_U64};
use crate::progress::{Counters, Hooks, Progress, PROGRESS_EVERY};

pub(crate) enum SrcCmd {
    Round {
        round: u32,
        dirty: Arc<DirtyBitmap>,
        /// Pages known to be all zero without reading them (memfd holes).
        known_zero: Option<Arc<DirtyBitmap>>,
        state: Option<Arc<Vec<u8>>>,
        is_final: bool,
    },
    Commit,
}

pub(crate) enum SrcReply {
    RoundDone { stats: RoundStats },
    Ready(ReadyFrame),
    Resumed,
    Failed(MigrateError),
}

/// Sends `Failed(WorkerPanicked)` for its stream if the worker thread
/// unwinds, so the controller stops at once instead of at its backstop
/// timeout.
struct ReportPanic<'a> {
    stream: u16,
    replies: &'a Sender<(u16, SrcReply)>,
}

impl Drop for ReportPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Never block while unwinding: with the channel full the
            // controller is not waiting on it, and it finds the worker gone
            // when it joins.
            let _ = self
                .replies
                .try_send((self.stream, SrcReply::Failed(MigrateError::WorkerPanicked(self.stream))));
        }
    }
}

/// Runs a migration from the source side over connected `conns` (one per
/// stream, in stream order). On `Ok`, the destination runs the guest and the
/// local guest is paused for good. On `Err` before the commit point — any
/// error, or a panic in a worker — the local guest is running (resumed if it
/// had been paused): see the `switchover` module for how that holds by
/// construction. After the commit point the only error is
/// [`MigrateError::InDoubt`], and the guest stays paused here.
pub fn migrate_source(
    mem: &GuestMemory,
    tracker: &mut dyn DirtyTracker,
    guest: &mut dyn GuestControl,
    conns: Vec<TcpStream>,
    keys: &SessionKeys,
    cfg: &MigrationConfig,
    hooks: &Hooks,
) -> Result<SourceReport, MigrateError> {
    cfg.validate_for(conns.len())?;
    let started_at = Instant::now();
    let socks = clone_all(&conns)?;
    let counters = Counters::default();
    let boundaries: Vec<u64> = mem.regions().iter().map(|r| r.first_page().0).collect();
    let (reply_tx, reply_rx) = bounded::<(u16, SrcReply)>(usize::from(cfg.streams) * 4);
    std::thread::scope(|scope| {
        let mut cmd_txs = Vec::new();
        let mut workers = Vec::new();
        for (i, sock) in conns.into_iter().enumerate() {
            let stream = u16::try_from(i).map_err(|_| MigrateError::Config("more than 64 streams".into()))?;
            let (tx, rx) = bounded::<SrcCmd>(2);
            cmd_txs.push(tx);
            let reply = reply_tx.clone();
            let boundaries = &boundaries;
            let counters = &counters;
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-send-{stream}"))
                .spawn_scoped(scope, move || {
                    let _report = ReportPanic {
                        stream,
                        replies: &reply,
                    };
                    pin(cfg, usize::from(stream));
                    let r = SendWorker::new(stream, mem, keys, cfg, sock, boundaries, hooks, counters)
                        .and_then(|mut w| w.run(&rx, &reply, stream));
                    if let Err(e) = r {
                        let _ = reply.send((stream, SrcReply::Failed(e)));
                    }
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    for s in &socks {
                        let _ = s.shutdown(std::net::Shutdown::Both);
                    }
                    return Err(MigrateError::Spawn { stream, source: e });
                }
            }
        }
        drop(reply_tx);
        let mut ctl = SourceCtl {
            transcripts: vec![None; usize::from(cfg.streams)],
            cmd_txs,
            replies: reply_rx,
            socks: &socks,
            cfg,
            hooks,
            counters: &counters,
            started_at,
            sending: None,
            cancellable: true,
        };
        let r = ctl.drive(mem, tracker, guest);
        if r.is_err() {
            ctl.abort();
        }
        // Dropping the command channels lets every worker finish.
        drop(ctl);
        // Joined here, so a worker's panic is this migration's error (the
        // guest was resumed when `drive` returned) and not the caller's.
        let mut panicked = None;
        for (i, w) in workers.into_iter().enumerate() {
            if w.join().is_err() && panicked.is_none() {
                panicked = u16::try_from(i).ok();
            }
        }
        if let (Ok(_), Some(stream)) = (&r, panicked) {
            // The destination confirmed the guest runs there, then a worker
            // died on its way out: the migration is done and its report
            // true, but this is a bug to report. (Before that point the
            // panic reached `drive` as `WorkerPanicked`, and the guest was
            // resumed when it returned.)
            tracing::error!(
                "the worker for stream {stream} panicked after the destination confirmed the guest runs (a bug in ferry; the migration itself completed)"
            );
        }
        r
    })
}

pub(crate) struct SourceCtl<'a> {
    /// Per-stream transcripts, reported with the final round.
    transcripts: Vec<Option<[u8; 32]>>,
    cmd_txs: Vec<Sender<SrcCmd>>,
    replies: Receiver<(u16, SrcReply)>,
    socks: &'a [TcpStream],
    cfg: &'a MigrationConfig,
    hooks: &'a Hooks,
    counters: &'a Counters,
    started_at: Instant,
    /// The round under way, its page count and the page counter at its start.
    sending: Option<(u32, u64, u64)>,
    /// Until the commit point, a cancel stops the migration.
    cancellable: bool,
}

impl SourceCtl<'_> {
    fn elapsed_ms(&self) -> f64 {
        self.started_at.elapsed().as_secs_f64() * 1e3
    }

    fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.cancellable && self.hooks.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        Ok(())
    }

    fn abort(&self) {
        for s in self.socks {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits for one reply; workers time out on their own network waits, so
    /// this bound is only a backstop.
    /// Meanwhile reports progress and watches the cancel switch.
    fn reply(&self) -> Result<(u16, SrcReply), MigrateError> {
        let deadline = Instant::now() + self.cfg.io_timeout * 3;
        loop {
            self.check_cancel()?;
            let wait = PROGRESS_EVERY.min(deadline.saturating_duration_since(Instant::now()));
            match self.replies.recv_timeout(wait) {
                Ok((s, SrcReply::Failed(e))) => {
                    tracing::debug!("stream {s} failed: {e}");
                    return Err(self.settle(e));
                }
                Ok(r) => return Ok(r),
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Some((round, pages_in_round, pages_at_start)) = self.sending {
                        let (pages, bytes) = self.counters.get();
                        self.hooks.emit(&Progress::Sending {
                            round,
                            pages_sent: pages.saturating_sub(pages_at_start).min(pages_in_round),
                            pages_in_round,
                            bytes_on_wire: bytes,
                            elapsed_ms: self.elapsed_ms(),
                        });
                    }
                }
                Err(_) => return Err(MigrateError::WorkersGone),
            }
        }
    }

    /// One stream failing often makes the others fail too (the peer closes
    /// everything after it says why on one stream). Gives the other streams
    /// a moment to report and keeps the most telling error.
    fn settle(&self, first: MigrateError) -> MigrateError {
        settle_errors(first, || match self.replies.recv_timeout(SETTLE) {
            Ok((_, SrcReply::Failed(e))) => Some(Some(e)),
            Ok(_) => Some(None),
            Err(_) => None,
        })
    }

    fn send(&self, stream: usize, cmd: SrcCmd) -> Result<(), MigrateError> {
        let lost = || u16::try_from(stream).map_or(MigrateError::WorkersGone, MigrateError::WorkerLost);
        self.cmd_txs.get(stream).ok_or_else(lost)?.send(cmd).map_err(|_| lost())
    }

    fn run_round(
        &mut self,
        round: u32,
        dirty: Arc<DirtyBitmap>,
        known_zero: Option<Arc<DirtyBitmap>>,
        state: Option<Arc<Vec<u8>>>,
        is_final: bool,
    ) -> Result<(RoundStats, Option<ReadyFrame>), MigrateError> {
        let t0 = Instant::now();
        self.check_cancel()?;
        self.sending = Some((round, dirty.count(), self.counters.get().0));
        for i in 0..self.cmd_txs.len() {
            self.send(
                i,
                SrcCmd::Round {
                    round,
                    dirty: dirty.clone(),
                    known_zero: known_zero.clone(),
                    state: state.clone(),
                    is_final,
                },
            )?;
        }
        let mut total = RoundStats {
            round,
            is_final,
            started_ms: t0.saturating_duration_since(self.started_at).as_secs_f64() * 1e3,
            ..Default::default()
        };
        let mut done = 0;
        let mut ready = None;
        while done < self.cmd_txs.len() {
            match self.reply()? {
                (s, SrcReply::RoundDone { stats }) => {
                    if let Some(t) = stats.transcript {
                        if let Some(slot) = self.transcripts.get_mut(usize::from(s)) {
                            *slot = Some(t);
                        }
                    }
                    total.pages += stats.pages;
                    total.zero_pages += stats.zero_pages;
                    total.frames += stats.frames;
                    total.bytes_on_wire += stats.bytes_on_wire;
                    done += 1;
                }
                // Stream 0 may see the destination's Ready before the other
                // streams report their final round done.
                (0, SrcReply::Ready(r)) if is_final => ready = Some(r),
                (s, _) => {
                    return Err(MigrateError::Protocol {
                        stream: s,
                        detail: "unexpected worker reply during a round".into(),
                    })
                }
            }
        }
        self.sending = None;
        let secs = t0.elapsed().as_secs_f64();
        total.duration_ms = secs * 1e3;
        total.throughput_gbps = gbps(total.pages * PAGE_SIZE_U64, secs);
        Ok((total, ready))
    }

    /// Live rounds until [`convergence::decide`] says stop. Returns the
    /// rounds, the dirty set the paused round sends and why pre-copy ended.
    fn precopy(
        &mut self,
        mem: &GuestMemory,
        tracking: &mut Tracking<'_>,
    ) -> Result<(Vec<RoundStats>, DirtyBitmap, StopReason), MigrateError> {
        let pages = mem.pages();
        // Never-written pages (memfd holes) go as zero pages without being
        // read: reading would make the kernel allocate them. Taken after
        // tracking started, so a hole written later is dirty in round 2.
        let mut holes = DirtyBitmap::new(pages);
        mem.holes_into(&mut holes)
            .map_err(|e| MigrateError::Config(format!("cannot map guest memory holes: {e}")))?;
        let mut holes = Some(Arc::new(holes));
        let limits = Limits {
            downtime_ms_max: self.cfg.downtime_ms_max,
            max_rounds: self.cfg.max_rounds,
        };
        let mut rounds: Vec<RoundStats> = Vec::new();
        let mut outcomes: Vec<RoundOutcome> = Vec::new();
        let mut dirty = Arc::new(DirtyBitmap::full(pages));
        loop {
            let round = u32::try_from(rounds.len() + 1).unwrap_or(u32::MAX);
            let (mut stats, _) = self.run_round(round, dirty, holes.take(), None, false)?;
            let t = Instant::now();
            let mut next = DirtyBitmap::new(pages);
            tracking.tracker().collect(&mut next)?;
            stats.dirty_scan_ms = t.elapsed().as_secs_f64() * 1e3;
            stats.dirty_pages_after = next.count();
            outcomes.push(RoundOutcome {
                pages_sent: stats.pages,
                duration_ms: stats.duration_ms,
                dirty_pages_after: stats.dirty_pages_after,
            });
            stats.expected_downtime_ms = convergence::expected_downtime_ms(&outcomes);
            if stats.duration_ms > 0.0 {
                stats.dirty_rate_pages_per_s = stats.dirty_pages_after as f64 / (stats.duration_ms / 1e3);
            }
            let decision = convergence::decide(&outcomes, limits);
            tracing::info!(
                round,
                pages = stats.pages,
                ms = stats.duration_ms,
                dirty_after = stats.dirty_pages_after,
                expected_downtime_ms = stats.expected_downtime_ms,
                ?decision,
                "pre-copy round done"
            );
            self.hooks.emit(&Progress::Round {
                stats: stats.clone(),
                elapsed_ms: self.elapsed_ms(),
            });
            rounds.push(stats);
            dirty = Arc::new(next);
            if let Decision::Stop(why) = decision {
                let last = Arc::try_unwrap(dirty).unwrap_or_else(|a| (*a).clone());
                return Ok((rounds, last, why));
            }
        }
    }

    fn drive(
        &mut self,
        mem: &GuestMemory,
        tracker: &mut dyn DirtyTracker,
        guest: &mut dyn GuestControl,
    ) -> Result<SourceReport, MigrateError> {
        let tracker_name = tracker.name();
        let mut tracking = Tracking::start(tracker)?;
        let (mut rounds, mut last, precopy_stop) = self.precopy(mem, &mut tracking)?;
        let round = u32::try_from(rounds.len() + 1).unwrap_or(u32::MAX);

        // Stop and copy (unless cancelled meanwhile). From here until the
        // commit, dropping `paused` — by any return or unwind — resumes the
        // guest.
        self.check_cancel()?;
        let mut paused: Paused<'_> = tracking.pause(guest)?;
        // Downtime starts when the guest began to stop.
        let now = Instant::now();
        let paused_at = now.checked_sub(paused.guest().stop_latency()).unwrap_or(now);
        let t = Instant::now();
        paused.tracker().collect(&mut last)?;
        let scan_ms = t.elapsed().as_secs_f64() * 1e3;
        let state = Arc::new(paused.guest().save_state()?);
        let device_state_bytes = state.len();
        self.hooks.emit(&Progress::Paused {
            round,
            pages: last.count(),
        });
        let (mut fin, ready) = self.run_round(round, Arc::new(last), None, Some(state), true)?;
        // Every stream reported its final round done: each had every frame
        // acknowledged first.
        let acked = FinalAcked::every_stream_reported();
        fin.dirty_scan_ms = scan_ms;
        self.hooks.emit(&Progress::Round {
            stats: fin.clone(),
            elapsed_ms: self.elapsed_ms(),
        });
        rounds.push(fin);

        // Stream 0 reports the destination's Ready: the commit point.
        let ready = match ready {
            Some(r) => r,
            None => match self.reply()? {
                (0, SrcReply::Ready(r)) => r,
                (s, _) => {
                    return Err(MigrateError::Protocol {
                        stream: s,
                        detail: "expected Ready from the destination".into(),
                    })
                }
            },
        };
        let transcript_root = transcript_root(&self.transcripts).ok_or(MigrateError::MissingTranscript)?;
        let _committed = paused.ready(acked, ready).commit();
        self.cancellable = false;
        let committed_at = Instant::now();
        self.hooks.emit(&Progress::Committed {
            elapsed_ms: self.elapsed_ms(),
        });
        tracing::info!("destination ready: commit point passed, the source gives the VM up");
        self.send(0, SrcCmd::Commit)
            .map_err(|_| MigrateError::InDoubt(self.cfg.io_timeout))?;
        let resumed_confirmed_at = match self.reply() {
            Ok((0, SrcReply::Resumed)) => Instant::now(),
            Ok(_) | Err(_) => return Err(MigrateError::InDoubt(self.cfg.io_timeout)),
        };
        self.hooks.emit(&Progress::Resumed {
            elapsed_ms: self.elapsed_ms(),
        });
        Ok(SourceReport {
            pages_sent: rounds.iter().map(|r| r.pages).sum(),
            zero_pages: rounds.iter().map(|r| r.zero_pages).sum(),
            bytes_on_wire: rounds.iter().map(|r| r.bytes_on_wire).sum(),
            rounds,
            precopy_stop,
            device_state_bytes,
            tracker: tracker_name,
            paused_at,
            committed_at,
            resumed_confirmed_at,
            started_at: self.started_at,
            transcript_root,
        })
    }
}
