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
use super::convergence::{self, Limits, Policy, RoundOutcome, Step, StopReason};
use super::error::{settle_errors, NoConvergence, SETTLE};
use super::report::gbps;
use super::transcript::transcript_root;
use super::{clone_all, pin, MigrateError, MigrationConfig, RoundStats, SourceReport};
use crate::bitmap::DirtyBitmap;
use crate::crypto::SessionKeys;
use crate::dirty::DirtyTracker;
use crate::guest::GuestControl;
use crate::memory::{GuestMemory, PAGE_SIZE_U64};
use crate::pace::Pacer;
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
    /// Tell the destination why the migration ends, then stop (sent only
    /// between rounds, when every worker waits for its next command).
    Abort(String),
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
    crate::sha::apply(cfg.sha256);
    let started_at = Instant::now();
    hooks.bandwidth_cap().init(cfg.max_bandwidth, cfg.max_bandwidth_paused);
    let pacer = Pacer::new(hooks.bandwidth_cap());
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
            let pacer = &pacer;
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-send-{stream}"))
                .spawn_scoped(scope, move || {
                    let _report = ReportPanic {
                        stream,
                        replies: &reply,
                    };
                    pin(cfg, usize::from(stream));
                    let r = SendWorker::new(stream, mem, keys, cfg, sock, boundaries, hooks, counters, pacer)
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
            deadline: cfg.timeout.map(|t| started_at + t),
            sending: None,
            cancellable: true,
            throttle_max: 0.0,
        };
        let r = ctl.drive(mem, tracker, guest);
        match &r {
            // Decided between rounds: every worker is idle and tells the
            // destination why, on its own stream, before it stops.
            Err(e @ MigrateError::WontConverge(_)) => ctl.tell_peer(&e.to_string()),
            Err(_) => ctl.abort(),
            Ok(_) => {}
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
    /// The total time limit (`cfg.timeout`), as an instant.
    deadline: Option<Instant>,
    /// The round under way, its page count and the page counter at its start.
    sending: Option<(u32, u64, u64)>,
    /// Until the commit point, a cancel or the time limit stops the
    /// migration.
    cancellable: bool,
    /// The highest throttle applied.
    throttle_max: f64,
}

/// The guest under the migration's throttle: dropping this (any return, a
/// panic) takes the throttle off again, so a migration that fails, is
/// cancelled or completes never leaves the guest slowed down.
struct Throttled<'g> {
    guest: &'g mut dyn GuestControl,
    throttle: f64,
}

impl<'g> Throttled<'g> {
    fn new(guest: &'g mut dyn GuestControl) -> Throttled<'g> {
        Throttled { guest, throttle: 0.0 }
    }

    fn set(&mut self, throttle: f64) -> Result<(), MigrateError> {
        self.guest.set_throttle(throttle)?;
        self.throttle = throttle;
        Ok(())
    }

    fn guest(&mut self) -> &mut dyn GuestControl {
        &mut *self.guest
    }
}

impl Drop for Throttled<'_> {
    fn drop(&mut self) {
        if self.throttle > 0.0 {
            if let Err(e) = self.guest.set_throttle(0.0) {
                tracing::error!(
                    "taking the throttle off the guest failed: {e}; it runs slowed down and needs the operator"
                );
            }
        }
    }
}

/// How pre-copy ended, for the paused round and the report.
struct PrecopyEnd {
    rounds: Vec<RoundStats>,
    last: DirtyBitmap,
    why: StopReason,
    expected_downtime_ms: f64,
    forced_past_target: bool,
}

impl SourceCtl<'_> {
    fn elapsed_ms(&self) -> f64 {
        self.started_at.elapsed().as_secs_f64() * 1e3
    }

    fn check_cancel(&self) -> Result<(), MigrateError> {
        if !self.cancellable {
            return Ok(());
        }
        if self.hooks.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        if let (Some(at), Some(limit)) = (self.deadline, self.cfg.timeout) {
            if Instant::now() >= at {
                return Err(MigrateError::TimedOut(limit));
            }
        }
        Ok(())
    }

    fn abort(&self) {
        for s in self.socks {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Has every (idle) worker send the destination an Abort with `reason`;
    /// shuts the streams down if a worker is gone or not idle (never
    /// blocks: a worker between rounds has an empty command queue).
    fn tell_peer(&self, reason: &str) {
        let told = self
            .cmd_txs
            .iter()
            .all(|tx| tx.try_send(SrcCmd::Abort(reason.to_string())).is_ok());
        if !told {
            self.abort();
        }
    }

    /// Waits for one reply; workers time out on their own network waits, so
    /// this bound (three I/O timeouts without a byte sent) is only a
    /// backstop. Meanwhile reports progress and watches the cancel switch
    /// and the time limit.
    fn reply(&self) -> Result<(u16, SrcReply), MigrateError> {
        let backstop = self.cfg.io_timeout * 3;
        let mut deadline = Instant::now() + backstop;
        let mut bytes_seen = self.counters.get().1;
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
                    let (pages, bytes) = self.counters.get();
                    if bytes != bytes_seen {
                        // A long round (a big guest, a low cap) is progress.
                        bytes_seen = bytes;
                        deadline = Instant::now() + backstop;
                    }
                    if let Some((round, pages_in_round, pages_at_start)) = self.sending {
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
            bandwidth_cap_bytes_per_s: self.hooks.bandwidth_cap().for_round(is_final),
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

    /// Live rounds until [`convergence::plan`] says switch over (or give
    /// up: then the guest was never paused). Raises the guest's throttle
    /// when the plan says so.
    fn precopy(
        &mut self,
        mem: &GuestMemory,
        tracking: &mut Tracking<'_>,
        guest: &mut Throttled<'_>,
    ) -> Result<PrecopyEnd, MigrateError> {
        let pages = mem.pages();
        // Never-written pages (memfd holes) go as zero pages without being
        // read: reading would make the kernel allocate them. Taken after
        // tracking started, so a hole written later is dirty in round 2.
        let mut holes = DirtyBitmap::new(pages);
        mem.holes_into(&mut holes)
            .map_err(|e| MigrateError::Config(format!("cannot map guest memory holes: {e}")))?;
        let mut holes = Some(Arc::new(holes));
        let mut rounds: Vec<RoundStats> = Vec::new();
        let mut outcomes: Vec<RoundOutcome> = Vec::new();
        let mut dirty = Arc::new(DirtyBitmap::full(pages));
        // Rounds run under the throttle in force (see Policy).
        let mut rounds_at_throttle = 0u32;
        loop {
            let round = u32::try_from(rounds.len() + 1).unwrap_or(u32::MAX);
            let throttle = guest.throttle;
            let (mut stats, _) = self.run_round(round, dirty, holes.take(), None, false)?;
            stats.throttle = throttle;
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
            rounds_at_throttle += 1;
            // Limits as they are now: the paused round's cap may have been
            // changed, and the guest's last stop measured.
            let limits = Limits::of(self.cfg, guest.guest(), self.hooks.bandwidth_cap().paused());
            stats.expected_downtime_ms = convergence::expected_downtime_ms(&outcomes, &limits);
            if stats.duration_ms > 0.0 {
                stats.dirty_rate_pages_per_s = stats.dirty_pages_after as f64 / (stats.duration_ms / 1e3);
            }
            let policy = Policy::of(self.cfg, guest.guest(), throttle, rounds_at_throttle);
            let step = convergence::plan(&outcomes, limits, policy);
            tracing::info!(
                round,
                pages = stats.pages,
                ms = stats.duration_ms,
                dirty_after = stats.dirty_pages_after,
                expected_downtime_ms = stats.expected_downtime_ms,
                throttle,
                ?step,
                "pre-copy round done"
            );
            self.hooks.emit(&Progress::Round {
                stats: stats.clone(),
                elapsed_ms: self.elapsed_ms(),
            });
            let expected_downtime_ms = stats.expected_downtime_ms;
            let dirty_rate = stats.dirty_rate_pages_per_s;
            rounds.push(stats);
            dirty = Arc::new(next);
            match step {
                Step::Another => {}
                Step::Throttle(t) => {
                    rounds_at_throttle = 0;
                    guest.set(t)?;
                    self.throttle_max = self.throttle_max.max(t);
                    tracing::info!(round, throttle = t, "the guest is throttled harder to converge");
                    self.hooks.emit(&Progress::Throttled { round, throttle: t });
                }
                Step::Switchover { why, exceeded } => {
                    if exceeded {
                        tracing::warn!(
                            expected_downtime_ms,
                            target_ms = self.cfg.downtime_ms_max,
                            "policy force: switching over although the paused round is expected to exceed the downtime target"
                        );
                    }
                    let last = Arc::try_unwrap(dirty).unwrap_or_else(|a| (*a).clone());
                    return Ok(PrecopyEnd {
                        rounds,
                        last,
                        why,
                        expected_downtime_ms,
                        forced_past_target: exceeded,
                    });
                }
                Step::GiveUp(why) => {
                    return Err(MigrateError::WontConverge(Box::new(NoConvergence {
                        why,
                        converge: self.cfg.converge,
                        dirty_rate_pages_per_s: dirty_rate,
                        bandwidth_bytes_per_s: convergence::bandwidth_bytes_per_s(&outcomes).unwrap_or(0.0),
                        expected_downtime_ms,
                        downtime_target_ms: self.cfg.downtime_ms_max,
                        throttle,
                        rounds,
                    })));
                }
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
        // Declared before `tracking`, so dropped after the guest resumed
        // (on a failure): the throttle comes off last.
        let mut guest = Throttled::new(guest);
        let mut tracking = Tracking::start(tracker)?;
        let PrecopyEnd {
            mut rounds,
            mut last,
            why: precopy_stop,
            expected_downtime_ms,
            forced_past_target,
        } = self.precopy(mem, &mut tracking, &mut guest)?;
        let round = u32::try_from(rounds.len() + 1).unwrap_or(u32::MAX);

        // Stop and copy (unless cancelled meanwhile). From here until the
        // commit, dropping `paused` — by any return or unwind — resumes the
        // guest.
        self.check_cancel()?;
        let mut paused: Paused<'_> = tracking.pause(guest.guest())?;
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
            expected_downtime_ms,
            downtime_target_ms: self.cfg.downtime_ms_max,
            exceeds_target: forced_past_target,
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
            converge: self.cfg.converge,
            downtime_target_ms: self.cfg.downtime_ms_max,
            expected_downtime_ms,
            forced_past_target,
            throttle_max: self.throttle_max,
            device_state_bytes,
            tracker: tracker_name,
            sha256: crate::sha::backend().as_str(),
            paused_at,
            committed_at,
            resumed_confirmed_at,
            started_at: self.started_at,
            transcript_root,
        })
    }
}
