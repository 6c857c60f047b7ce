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

use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use thiserror::Error;

use crate::bitmap::{for_each_chunk, stream_of, DirtyBitmap};
use crate::crypto::{AeadBackend, Direction, SessionKeys, StreamCrypto};
use crate::dirty::{DirtyError, DirtyTracker};
use crate::guest::{GuestControl, GuestError};
pub use crate::io::IoError;
use crate::io::{Conn, Event};
use crate::memory::{GuestMemory, PageIndex, PAGE_SIZE_U64};
use crate::pipeline::{self, FrameError, Integrity, StreamHeader};
use crate::progress::{Counters, Hooks, Progress, PROGRESS_EVERY};
use crate::wire::{self, FrameHeader, Kind, Seq, StreamId, WireError, FLAG_FINAL, HEADER_LEN, MAX_FRAME};

/// Tunables of one migration. Both sides must agree on `streams` and
/// `integrity` (checked in the Hello).
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Data streams (TCP connections, one pinned worker each).
    pub streams: u16,
    /// Page integrity mode.
    pub integrity: Integrity,
    /// AES-GCM implementation.
    pub aead: AeadBackend,
    /// Most pages per frame (1..=64).
    pub chunk_pages: u32,
    /// Downtime target: stop iterating when the rest fits in it.
    pub downtime_ms_max: u64,
    /// Pre-copy rounds at most before the final one.
    pub max_rounds: u32,
    /// Longest wait for any network progress.
    pub io_timeout: Duration,
    /// Most frames a stream may have unacknowledged.
    pub window_frames: u64,
    /// The destination acknowledges at least every this many frames.
    pub ack_every: u64,
    /// Bytes gathered before one send is issued.
    pub batch_bytes: usize,
    /// Pin workers to cores.
    pub pin_workers: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            streams: 2,
            integrity: Integrity::AeadSha256,
            aead: AeadBackend::Ring,
            chunk_pages: 32,
            downtime_ms_max: 50,
            max_rounds: 30,
            io_timeout: Duration::from_secs(10),
            window_frames: 512,
            ack_every: 32,
            batch_bytes: 1 << 20,
            pin_workers: true,
        }
    }
}

impl MigrationConfig {
    fn validate(&self) -> Result<(), MigrateError> {
        let bad = |m: &str| Err(MigrateError::Config(m.into()));
        if self.streams == 0 || self.streams > 64 {
            return bad("streams must be 1..=64");
        }
        if self.chunk_pages == 0 || self.chunk_pages > wire::MAX_FRAME_PAGES {
            return bad("chunk_pages must be 1..=64");
        }
        if self.ack_every == 0 || self.window_frames < 2 * self.ack_every {
            return bad("window_frames must be at least twice ack_every (and ack_every > 0)");
        }
        if self.io_timeout.is_zero() {
            return bad("io_timeout must be positive");
        }
        if self.batch_bytes < 64 << 10 || self.batch_bytes > 64 << 20 {
            return bad("batch_bytes must be 64 KiB..=64 MiB");
        }
        Ok(())
    }
}

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
    /// The embedder called [`Hooks::cancel`] before the commit point: the
    /// source's guest keeps running there.
    #[error("cancelled before the commit point: the migration stopped and the guest keeps running at the source")]
    Cancelled,
    /// Commit was sent but the destination's confirmation never came.
    #[error("commit sent, but the destination did not confirm that the guest runs within {0:?}: the guest stays PAUSED at the source and is not resumed here; check the destination (`ferry status`) before resuming either copy")]
    InDoubt(Duration),
    /// A setting out of range, or the two sides disagree.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A worker thread vanished (a bug).
    #[error("worker for stream {0} stopped without a report (internal error)")]
    WorkerLost(u16),
}

impl MigrateError {
    fn io(stream: u16, round: u32, during: &'static str) -> impl FnOnce(IoError) -> MigrateError {
        move |source| MigrateError::Transport {
            stream,
            round,
            during,
            source,
        }
    }
}

/// What one pre-copy round did.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RoundStats {
    /// Round number (1-based); the last one is the final (paused) round.
    pub round: u32,
    /// Pages sent (zero pages included).
    pub pages: u64,
    /// All-zero pages among them.
    pub zero_pages: u64,
    /// Frames sent.
    pub frames: u64,
    /// Bytes written to the streams.
    pub bytes_on_wire: u64,
    /// From dispatch until every frame was acknowledged.
    pub duration_ms: f64,
    /// Pages found dirty when the round ended (what the next round sends).
    pub dirty_pages_after: u64,
    /// Guest bytes moved per second in this round.
    pub throughput_gbps: f64,
    /// Time to collect the dirty set after the round, in milliseconds.
    pub dirty_scan_ms: f64,
    /// Whether the guest was paused (the stop-and-copy round).
    pub is_final: bool,
    /// When the round started, in milliseconds since the migration started.
    pub started_ms: f64,
    /// Pages the guest dirtied per second during this round (pre-copy
    /// rounds: `dirty_pages_after` over the round's duration).
    pub dirty_rate_pages_per_s: f64,
    /// What the final round would take if it started now: the dirty bytes
    /// left over the best bandwidth seen so far (pre-copy rounds).
    pub expected_downtime_ms: f64,
    /// The stream's transcript (final round, per-stream reports only).
    #[serde(skip)]
    transcript: Option<[u8; 32]>,
}

/// What the source saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceReport {
    /// Every round, the final one last.
    pub rounds: Vec<RoundStats>,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Zero pages among them.
    pub zero_pages: u64,
    /// Bytes written to the data streams (frames, both kinds).
    pub bytes_on_wire: u64,
    /// Size of the device state sent.
    pub device_state_bytes: usize,
    /// Name of the dirty tracker.
    pub tracker: &'static str,
    /// When the guest was paused at the source.
    #[serde(skip)]
    pub paused_at: Instant,
    /// When the destination's Ready arrived (the commit point).
    #[serde(skip)]
    pub committed_at: Instant,
    /// When the destination confirmed the guest runs.
    #[serde(skip)]
    pub resumed_confirmed_at: Instant,
    /// When the migration started.
    #[serde(skip)]
    pub started_at: Instant,
    /// SHA-256 root over every stream's transcript of what was sent.
    #[serde(skip)]
    pub transcript_root: [u8; 32],
}

impl SourceReport {
    /// Guest downtime as the source sees it: from the pause until the
    /// destination confirmed the guest runs.
    pub fn downtime(&self) -> Duration {
        self.resumed_confirmed_at.saturating_duration_since(self.paused_at)
    }
    /// From the start until the destination confirmed the guest runs.
    pub fn total(&self) -> Duration {
        self.resumed_confirmed_at.saturating_duration_since(self.started_at)
    }
    /// When the guest was paused, counted from the start.
    pub fn paused_after(&self) -> Duration {
        self.paused_at.saturating_duration_since(self.started_at)
    }
}

/// What the destination saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DestReport {
    /// Frames received on all streams.
    pub frames: u64,
    /// Pages written (zero pages included).
    pub pages: u64,
    /// Bytes read from the data streams.
    pub bytes_received: u64,
    /// When the guest was resumed here.
    #[serde(skip)]
    pub resumed_at: Instant,
    /// SHA-256 root over every stream's transcript of what was received.
    #[serde(skip)]
    pub transcript_root: [u8; 32],
}

// ------------------------------------------------------------------ source

enum SrcCmd {
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

enum SrcReply {
    RoundDone { stats: RoundStats },
    Ready,
    Resumed,
    Failed(MigrateError),
}

/// Runs a migration from the source side over connected `conns` (one per
/// stream, in stream order). On `Ok`, the destination runs the guest and the
/// local guest is paused for good. On `Err` before the commit point the
/// local guest is running (resumed if it had been paused).
pub fn migrate_source(
    mem: &GuestMemory,
    tracker: &mut dyn DirtyTracker,
    guest: &mut dyn GuestControl,
    conns: Vec<TcpStream>,
    keys: &SessionKeys,
    cfg: &MigrationConfig,
    hooks: &Hooks,
) -> Result<SourceReport, MigrateError> {
    cfg.validate()?;
    if conns.len() != usize::from(cfg.streams) {
        return Err(MigrateError::Config(format!(
            "{} connections for {} streams",
            conns.len(),
            cfg.streams
        )));
    }
    let started_at = Instant::now();
    let mut paused = false;
    let mut committed = false;
    let result = source_inner(
        mem,
        tracker,
        guest,
        conns,
        keys,
        cfg,
        hooks,
        &mut paused,
        &mut committed,
        started_at,
    );
    if result.is_err() && paused && !committed {
        // Before the commit point the source still owns the VM: run it again.
        if let Err(e) = guest.resume() {
            tracing::error!("resuming the source guest after a failed migration failed: {e}");
        }
    }
    let _ = tracker.stop();
    result
}

#[allow(clippy::too_many_arguments)]
fn source_inner(
    mem: &GuestMemory,
    tracker: &mut dyn DirtyTracker,
    guest: &mut dyn GuestControl,
    conns: Vec<TcpStream>,
    keys: &SessionKeys,
    cfg: &MigrationConfig,
    hooks: &Hooks,
    paused: &mut bool,
    committed: &mut bool,
    started_at: Instant,
) -> Result<SourceReport, MigrateError> {
    let socks = clone_all(&conns)?;
    let counters = Counters::default();
    let boundaries: Vec<u64> = mem.regions().iter().map(|r| r.first_page().0).collect();
    let (reply_tx, reply_rx) = bounded::<(u16, SrcReply)>(usize::from(cfg.streams) * 4);
    std::thread::scope(|scope| {
        let mut cmd_txs = Vec::new();
        for (i, sock) in conns.into_iter().enumerate() {
            let stream = u16::try_from(i).expect("streams <= 64");
            let (tx, rx) = bounded::<SrcCmd>(2);
            cmd_txs.push(tx);
            let reply = reply_tx.clone();
            let boundaries = &boundaries;
            let counters = &counters;
            std::thread::Builder::new()
                .name(format!("ferry-send-{stream}"))
                .spawn_scoped(scope, move || {
                    pin(cfg, usize::from(stream));
                    let r = SendWorker::new(stream, mem, keys, cfg, sock, boundaries, hooks, counters)
                        .and_then(|mut w| w.run(&rx, &reply, stream));
                    if let Err(e) = r {
                        let _ = reply.send((stream, SrcReply::Failed(e)));
                    }
                })
                .expect("spawning a sender worker");
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
        let r = ctl.drive(mem, tracker, guest, paused, committed, started_at);
        if r.is_err() {
            ctl.abort();
        }
        // Dropping the command channels lets every worker finish.
        drop(ctl);
        r
    })
}

fn clone_all(conns: &[TcpStream]) -> Result<Vec<TcpStream>, MigrateError> {
    conns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            c.try_clone().map_err(|e| MigrateError::Setup {
                stream: u16::try_from(i).unwrap_or(u16::MAX),
                source: IoError::Setup(e),
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

struct SourceCtl<'a> {
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
                Err(_) => return Err(MigrateError::WorkerLost(u16::MAX)),
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
        let s = u16::try_from(stream).unwrap_or(u16::MAX);
        self.cmd_txs[stream]
            .send(cmd)
            .map_err(|_| MigrateError::WorkerLost(s))?;
        Ok(())
    }

    fn run_round(
        &mut self,
        round: u32,
        dirty: Arc<DirtyBitmap>,
        known_zero: Option<Arc<DirtyBitmap>>,
        state: Option<Arc<Vec<u8>>>,
        is_final: bool,
    ) -> Result<(RoundStats, bool), MigrateError> {
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
        let mut ready = false;
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
                (0, SrcReply::Ready) if is_final => ready = true,
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

    fn drive(
        &mut self,
        mem: &GuestMemory,
        tracker: &mut dyn DirtyTracker,
        guest: &mut dyn GuestControl,
        paused: &mut bool,
        committed: &mut bool,
        started_at: Instant,
    ) -> Result<SourceReport, MigrateError> {
        let pages = mem.pages();
        tracker.start()?;
        // Never-written pages (memfd holes) go as zero pages without being
        // read: reading would make the kernel allocate them. Taken after
        // tracking started, so a hole written later is dirty in round 2.
        let mut holes = DirtyBitmap::new(pages);
        mem.holes_into(&mut holes)
            .map_err(|e| MigrateError::Config(format!("cannot map guest memory holes: {e}")))?;
        let mut holes = Some(Arc::new(holes));
        let mut rounds: Vec<RoundStats> = Vec::new();
        let mut dirty = Arc::new(DirtyBitmap::full(pages));
        // Guest bytes per second, from the largest round so far.
        let mut bandwidth = 0.0f64;
        let mut largest = 0u64;
        let mut round = 1u32;
        loop {
            let (mut stats, _) = self.run_round(round, dirty, holes.take(), None, false)?;
            if stats.pages >= largest && stats.duration_ms > 0.0 {
                largest = stats.pages;
                bandwidth = stats.pages as f64 * PAGE_SIZE_U64 as f64 / (stats.duration_ms / 1e3);
            }
            let t = Instant::now();
            let mut next = DirtyBitmap::new(pages);
            tracker.collect(&mut next)?;
            stats.dirty_scan_ms = t.elapsed().as_secs_f64() * 1e3;
            stats.dirty_pages_after = next.count();
            let left_bytes = stats.dirty_pages_after as f64 * PAGE_SIZE_U64 as f64;
            let expected_ms = if bandwidth > 0.0 {
                left_bytes / bandwidth * 1e3
            } else {
                f64::INFINITY
            };
            tracing::info!(
                round,
                pages = stats.pages,
                ms = stats.duration_ms,
                dirty_after = stats.dirty_pages_after,
                expected_downtime_ms = expected_ms,
                "pre-copy round done"
            );
            stats.expected_downtime_ms = expected_ms;
            if stats.duration_ms > 0.0 {
                stats.dirty_rate_pages_per_s = stats.dirty_pages_after as f64 / (stats.duration_ms / 1e3);
            }
            self.hooks.emit(&Progress::Round {
                stats: stats.clone(),
                elapsed_ms: self.elapsed_ms(),
            });
            let stalled = rounds.len() >= 4
                && rounds[rounds.len() - 2..]
                    .iter()
                    .all(|r| stats.dirty_pages_after * 20 >= r.dirty_pages_after * 19);
            // Within the target, one more live round is still worth it while
            // it at least halves what the paused round must send and that is
            // more than about a millisecond of transfer.
            let within_target = expected_ms <= self.cfg.downtime_ms_max as f64;
            let worth_another = stats.dirty_pages_after * 2 <= stats.pages && expected_ms > 1.0;
            let converged = within_target && !worth_another;
            rounds.push(stats);
            dirty = Arc::new(next);
            if converged || round >= self.cfg.max_rounds || stalled {
                break;
            }
            round += 1;
        }

        // Stop and copy (unless cancelled meanwhile).
        self.check_cancel()?;
        guest.pause()?;
        *paused = true;
        // Downtime starts when the guest began to stop.
        let now = Instant::now();
        let paused_at = now.checked_sub(guest.stop_latency()).unwrap_or(now);
        let mut last = Arc::try_unwrap(dirty).unwrap_or_else(|a| (*a).clone());
        let t = Instant::now();
        tracker.collect(&mut last)?;
        let scan_ms = t.elapsed().as_secs_f64() * 1e3;
        let state = Arc::new(guest.save_state()?);
        let device_state_bytes = state.len();
        self.hooks.emit(&Progress::Paused {
            round: round + 1,
            pages: last.count(),
        });
        let (mut fin, ready) = self.run_round(round + 1, Arc::new(last), None, Some(state), true)?;
        fin.dirty_scan_ms = scan_ms;
        self.hooks.emit(&Progress::Round {
            stats: fin.clone(),
            elapsed_ms: self.elapsed_ms(),
        });
        rounds.push(fin);

        // Stream 0 reports the destination's Ready: the commit point.
        if !ready {
            match self.reply()? {
                (0, SrcReply::Ready) => {}
                (s, _) => {
                    return Err(MigrateError::Protocol {
                        stream: s,
                        detail: "expected Ready from the destination".into(),
                    })
                }
            }
        }
        *committed = true;
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
            device_state_bytes,
            tracker: tracker.name(),
            paused_at,
            committed_at,
            resumed_confirmed_at,
            started_at,
            transcript_root: transcript_root(&self.transcripts).ok_or(MigrateError::WorkerLost(u16::MAX))?,
        })
    }
}

/// A running SHA-256 over (sequence, kind, AEAD tag) of every frame a
/// stream carries from source to destination (Commit excepted), and, in
/// `aead+sha256` mode, over each `Pages` frame's chunk digest (the SHA-256 of
/// its per-page SHA-256 digests): both sides compute it independently, and
/// the signed manifest compares them.
#[derive(Clone)]
struct Transcript(ring::digest::Context);

impl Transcript {
    fn new() -> Transcript {
        Transcript(ring::digest::Context::new(&ring::digest::SHA256))
    }
    fn add(&mut self, kind: Kind, seq: u64, tag: &[u8]) {
        self.0.update(&seq.to_le_bytes());
        self.0.update(&[kind as u8]);
        self.0.update(tag);
    }
    fn add_chunk(&mut self, digest: &[u8; wire::DIGEST_LEN]) {
        self.0.update(digest);
    }
    fn root(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.clone().finish().as_ref());
        out
    }
}

/// SHA-256 over the stream transcripts in stream order.
fn transcript_root(streams: &[Option<[u8; 32]>]) -> Option<[u8; 32]> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for s in streams {
        ctx.update(s.as_ref()?);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Some(out)
}

/// How long a failing side waits for its other streams' reports.
const SETTLE: Duration = Duration::from_millis(250);

impl MigrateError {
    /// How much the error tells an operator: the peer's own reason first,
    /// then what was wrong with the data, then a stream that merely closed.
    fn rank(&self) -> u8 {
        match self {
            MigrateError::PeerAborted { .. } | MigrateError::Cancelled => 0,
            MigrateError::Transport { .. } | MigrateError::Setup { .. } | MigrateError::WorkerLost(_) => 2,
            _ => 1,
        }
    }
}

/// Keeps the best-ranked of `first` and the errors `next` yields
/// (`Some(Some(e))` an error, `Some(None)` another reply, `None` no more).
fn settle_errors(first: MigrateError, mut next: impl FnMut() -> Option<Option<MigrateError>>) -> MigrateError {
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

/// Guest bytes per second in GB/s.
fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

const HELLO_LEN: usize = 4;
/// Frames the destination sends are small; anything larger is refused.
const MAX_TO_SOURCE_FRAME: usize = HEADER_LEN + wire::MAX_REASON + wire::TAG_LEN;

fn hello_payload(cfg: &MigrationConfig) -> [u8; HELLO_LEN] {
    let s = cfg.streams.to_le_bytes();
    let i = match cfg.integrity {
        Integrity::AeadSha256 => 1,
        Integrity::Aead => 2,
    };
    [s[0], s[1], i, 0]
}

/// The receiving half both kinds of worker share: a buffer of bytes read
/// from the stream, parsed into frames that are opened in place.
struct Inbox {
    transcript: Transcript,
    buf: Option<Vec<u8>>,
    fill: usize,
    next_seq: u64,
    crypto: StreamCrypto,
    bytes: u64,
}

impl Inbox {
    fn new(capacity: usize, crypto: StreamCrypto) -> Inbox {
        Inbox {
            transcript: Transcript::new(),
            buf: Some(vec![0u8; capacity]),
            fill: 0,
            next_seq: 0,
            crypto,
            bytes: 0,
        }
    }

    fn arm(&mut self, conn: &mut Conn, stream: u16, round: u32) -> Result<(), MigrateError> {
        if let Some(buf) = self.buf.take() {
            conn.start_recv(buf, self.fill)
                .map_err(MigrateError::io(stream, round, "arming a receive"))?;
        }
        Ok(())
    }

    /// Takes back the buffer of a completed receive and hands every complete
    /// frame, opened, to `handle`. Re-arms the receive unless `handle` says stop.
    #[allow(clippy::too_many_arguments)]
    fn on_received(
        &mut self,
        conn: &mut Conn,
        mut buf: Vec<u8>,
        start: usize,
        n: usize,
        stream: u16,
        expected_migration: wire::MigrationId,
        max_frame: usize,
        mut handle: impl FnMut(&FrameHeader, &mut [u8]) -> Result<bool, MigrateError>,
    ) -> Result<(), MigrateError> {
        debug_assert_eq!(start, self.fill);
        self.fill = start + n;
        self.bytes += n as u64;
        let mut pos = 0;
        let mut keep_reading = true;
        while self.fill - pos >= HEADER_LEN {
            let hb: &[u8; HEADER_LEN] = buf[pos..pos + HEADER_LEN].try_into().expect("HEADER_LEN bytes");
            let h = FrameHeader::decode(hb).map_err(|source| MigrateError::Malformed {
                stream,
                after_seq: self.next_seq,
                source,
            })?;
            let len = h.frame_len();
            if len > max_frame {
                return Err(MigrateError::Protocol {
                    stream,
                    detail: format!("{:?} frame of {len} bytes exceeds the {max_frame}-byte limit", h.kind),
                });
            }
            if self.fill - pos < len {
                break;
            }
            if h.migration != expected_migration {
                return Err(MigrateError::Protocol {
                    stream,
                    detail: format!(
                        "frame for migration {:#x}, this is {:#x}",
                        h.migration.0, expected_migration.0
                    ),
                });
            }
            if h.seq.0 != self.next_seq {
                return Err(MigrateError::Sequence {
                    stream,
                    expected: self.next_seq,
                    got: h.seq.0,
                    round: h.round,
                });
            }
            let frame = &mut buf[pos..pos + len];
            self.transcript.add(h.kind, h.seq.0, &frame[len - wire::TAG_LEN..]);
            let plain_len = {
                let p =
                    pipeline::open_frame(&h, frame, &mut self.crypto).map_err(|detail| MigrateError::Integrity {
                        stream,
                        seq: h.seq.0,
                        round: h.round,
                        detail,
                    })?;
                if let Some(d) = pipeline::chunk_digest(&h, p) {
                    self.transcript.add_chunk(&d);
                }
                p.len()
            };
            self.next_seq += 1;
            pos += len;
            let plain = &mut frame[HEADER_LEN..HEADER_LEN + plain_len];
            if !handle(&h, plain)? {
                keep_reading = false;
                break;
            }
        }
        buf.copy_within(pos..self.fill, 0);
        self.fill -= pos;
        self.buf = Some(buf);
        if keep_reading {
            self.arm(conn, stream, 0)?;
        }
        Ok(())
    }
}

/// Sends `Abort(reason)` on a stream, best effort, within a short time.
fn send_abort(conn: &mut Conn, crypto: &mut StreamCrypto, hdr: StreamHeader, seq: u64, reason: &str) {
    let mut reason = reason.as_bytes();
    if reason.len() > wire::MAX_REASON {
        reason = &reason[..wire::MAX_REASON];
    }
    let mut out = Vec::with_capacity(HEADER_LEN + reason.len() + wire::TAG_LEN);
    pipeline::encode_control(Kind::Abort, 0, hdr, 0, Seq(seq), reason, crypto, &mut out);
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

struct SendWorker<'a> {
    stream: u16,
    mem: &'a GuestMemory,
    cfg: &'a MigrationConfig,
    boundaries: &'a [u64],
    conn: Conn,
    hdr: StreamHeader,
    tx: StreamCrypto,
    next_seq: u64,
    /// Frames the destination has acknowledged (its next expected sequence).
    acked: u64,
    cur: Vec<u8>,
    spare: Option<Vec<u8>>,
    inbox: Inbox,
    round: u32,
    ready: bool,
    resumed: bool,
    transcript: Transcript,
    hooks: &'a Hooks,
    counters: &'a Counters,
}

impl<'a> SendWorker<'a> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        stream: u16,
        mem: &'a GuestMemory,
        keys: &SessionKeys,
        cfg: &'a MigrationConfig,
        mut sock: TcpStream,
        boundaries: &'a [u64],
        hooks: &'a Hooks,
        counters: &'a Counters,
    ) -> Result<Self, MigrateError> {
        crate::transport::prove_stream(&mut sock, keys, stream, cfg.io_timeout).map_err(|e| MigrateError::Setup {
            stream,
            source: IoError::Preamble(e.to_string()),
        })?;
        let conn = Conn::new(sock, cfg.io_timeout).map_err(|source| MigrateError::Setup { stream, source })?;
        let id = StreamId(stream);
        Ok(SendWorker {
            stream,
            mem,
            cfg,
            boundaries,
            conn,
            hdr: StreamHeader {
                migration: keys.migration(),
                stream: id,
            },
            tx: StreamCrypto::new(keys, Direction::ToDestination, id, cfg.aead),
            next_seq: 0,
            acked: 0,
            cur: Vec::with_capacity(cfg.batch_bytes + MAX_FRAME),
            spare: None,
            inbox: Inbox::new(
                4 * MAX_TO_SOURCE_FRAME,
                StreamCrypto::new(keys, Direction::ToSource, id, cfg.aead),
            ),
            round: 0,
            ready: false,
            resumed: false,
            transcript: Transcript::new(),
            hooks,
            counters,
        })
    }

    fn run(
        &mut self,
        cmds: &Receiver<SrcCmd>,
        replies: &Sender<(u16, SrcReply)>,
        stream: u16,
    ) -> Result<(), MigrateError> {
        let r = self.run_inner(cmds, replies, stream);
        if let Err(e) = &r {
            if !matches!(e, MigrateError::PeerAborted { .. } | MigrateError::Transport { .. }) {
                let seq = self.next_seq;
                send_abort(&mut self.conn, &mut self.tx, self.hdr, seq, &e.to_string());
            }
        }
        r
    }

    fn run_inner(
        &mut self,
        cmds: &Receiver<SrcCmd>,
        replies: &Sender<(u16, SrcReply)>,
        stream: u16,
    ) -> Result<(), MigrateError> {
        let hello = hello_payload(self.cfg);
        self.push_control(Kind::Hello, 0, &hello)?;
        self.inbox.arm(&mut self.conn, stream, 0)?;
        // The controller drops the channel when the migration ends either way.
        while let Ok(cmd) = cmds.recv() {
            match cmd {
                SrcCmd::Round {
                    round,
                    dirty,
                    known_zero,
                    state,
                    is_final,
                } => {
                    self.round = round;
                    let stats = self.send_round(
                        &dirty,
                        known_zero.as_deref(),
                        state.as_deref().map(|v| v.as_slice()),
                        is_final,
                    )?;
                    let _ = replies.send((stream, SrcReply::RoundDone { stats }));
                    if is_final && stream == 0 {
                        while !self.ready {
                            self.wait_event("waiting for the destination's Ready")?;
                        }
                        let _ = replies.send((stream, SrcReply::Ready));
                    }
                }
                SrcCmd::Commit => {
                    self.push_control(Kind::Commit, 0, &[])?;
                    self.flush()?;
                    while !self.resumed {
                        self.wait_event("waiting for the destination's Resumed")?;
                    }
                    let _ = replies.send((stream, SrcReply::Resumed));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn send_round(
        &mut self,
        dirty: &DirtyBitmap,
        known_zero: Option<&DirtyBitmap>,
        state: Option<&[u8]>,
        is_final: bool,
    ) -> Result<RoundStats, MigrateError> {
        let mut stats = RoundStats {
            round: self.round,
            ..Default::default()
        };
        let seq0 = self.next_seq;
        let max_frame = HEADER_LEN + wire::pages_payload_len(self.cfg.chunk_pages, 0, true);
        for_each_chunk(
            dirty,
            self.stream,
            self.cfg.streams,
            u64::from(self.cfg.chunk_pages),
            self.boundaries,
            |first, count| -> Result<(), MigrateError> {
                self.reserve(max_frame)?;
                let zero_hint = known_zero.map_or(0, |z| z.bits(first, count));
                let e = pipeline::encode_pages(
                    self.mem,
                    PageIndex(first),
                    u32::try_from(count).expect("chunk <= 64 pages"),
                    self.hdr,
                    self.round,
                    Seq(self.next_seq),
                    self.cfg.integrity,
                    zero_hint,
                    &mut self.tx,
                    &mut self.cur,
                );
                let tag = &self.cur[self.cur.len() - wire::TAG_LEN..];
                self.transcript.add(Kind::Pages, self.next_seq, tag);
                if let Some(d) = &e.chunk_digest {
                    self.transcript.add_chunk(d);
                }
                self.next_seq += 1;
                stats.pages += u64::from(e.pages);
                stats.zero_pages += u64::from(e.zero_pages);
                stats.bytes_on_wire += e.wire_bytes as u64;
                self.counters.add(u64::from(e.pages), e.wire_bytes as u64);
                if self.cur.len() >= self.cfg.batch_bytes {
                    self.flush()?;
                }
                Ok(())
            },
        )?;
        if let Some(state) = state.filter(|_| self.stream == 0) {
            stats.bytes_on_wire += self.push_control(Kind::DeviceState, 0, state)? as u64;
        }
        let flags = if is_final { FLAG_FINAL } else { 0 };
        let count = stats.pages.to_le_bytes();
        stats.bytes_on_wire += self.push_control(Kind::RoundEnd, flags, &count)? as u64;
        self.flush()?;
        while self.acked < self.next_seq {
            self.wait_event("waiting for acknowledgements")?;
        }
        stats.frames = self.next_seq - seq0;
        if is_final {
            stats.transcript = Some(self.transcript.root());
        }
        Ok(stats)
    }

    /// Makes room for a frame of up to `len` bytes: respects the window of
    /// unacknowledged frames and the batch buffer's capacity.
    fn reserve(&mut self, len: usize) -> Result<(), MigrateError> {
        if self.next_seq - self.acked >= self.cfg.window_frames {
            // The destination cannot ack what it has not received.
            self.flush()?;
            while self.next_seq - self.acked >= self.cfg.window_frames {
                self.wait_event("waiting for acknowledgements (window full)")?;
            }
        }
        if self.cur.len() + len > self.cur.capacity() {
            self.flush()?;
        }
        Ok(())
    }

    fn push_control(&mut self, kind: Kind, flags: u8, payload: &[u8]) -> Result<usize, MigrateError> {
        self.reserve(HEADER_LEN + payload.len() + wire::TAG_LEN)?;
        let n = pipeline::encode_control(
            kind,
            flags,
            self.hdr,
            self.round,
            Seq(self.next_seq),
            payload,
            &mut self.tx,
            &mut self.cur,
        );
        if kind != Kind::Commit {
            let tag = &self.cur[self.cur.len() - wire::TAG_LEN..];
            self.transcript.add(kind, self.next_seq, tag);
        }
        self.next_seq += 1;
        Ok(n)
    }

    /// Hands the current batch to io_uring (waiting for the previous send).
    fn flush(&mut self) -> Result<(), MigrateError> {
        if self.cur.is_empty() {
            return Ok(());
        }
        // Checked once per batch; `run` tells the destination why it stops.
        if !self.ready && self.hooks.is_cancelled() {
            return Err(MigrateError::Cancelled);
        }
        while self.conn.send_busy() {
            self.wait_event("sending")?;
        }
        let next = self
            .spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(self.cfg.batch_bytes + MAX_FRAME));
        let batch = std::mem::replace(&mut self.cur, next);
        self.conn
            .start_send(batch)
            .map_err(MigrateError::io(self.stream, self.round, "sending"))
    }

    fn wait_event(&mut self, during: &'static str) -> Result<(), MigrateError> {
        let ev = self
            .conn
            .wait()
            .map_err(MigrateError::io(self.stream, self.round, during))?;
        match ev {
            Event::Sent(mut buf) => {
                buf.clear();
                self.spare = Some(buf);
            }
            Event::Received { buf, start, n } => {
                let stream = self.stream;
                let sent = self.next_seq;
                let (acked, ready, resumed) = (&mut self.acked, &mut self.ready, &mut self.resumed);
                self.inbox.on_received(
                    &mut self.conn,
                    buf,
                    start,
                    n,
                    stream,
                    self.hdr.migration,
                    MAX_TO_SOURCE_FRAME,
                    |h, plain| {
                        match h.kind {
                            Kind::Ack => {
                                let cum = u64::from_le_bytes(plain.try_into().map_err(|_| MigrateError::Protocol {
                                    stream,
                                    detail: "ack payload must be 8 bytes".into(),
                                })?);
                                if cum > sent || cum < *acked {
                                    return Err(MigrateError::Protocol {
                                        stream,
                                        detail: format!("ack {cum} outside [{}, {sent}]", *acked),
                                    });
                                }
                                *acked = cum;
                            }
                            Kind::Ready if stream == 0 => *ready = true,
                            Kind::Resumed if stream == 0 && *ready => {
                                *resumed = true;
                                return Ok(false);
                            }
                            Kind::Abort => {
                                return Err(MigrateError::PeerAborted {
                                    stream,
                                    reason: String::from_utf8_lossy(plain).into_owned(),
                                })
                            }
                            k => {
                                return Err(MigrateError::Protocol {
                                    stream,
                                    detail: format!("unexpected {k:?} frame from the destination"),
                                })
                            }
                        }
                        Ok(true)
                    },
                )?;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------- destination

enum DstCmd {
    SendReady,
    SendResumed,
}

enum DstReply {
    Hello(u16),
    Final([u8; 32]),
    State(Vec<u8>),
    Commit,
    Done,
    Failed(MigrateError),
}

/// Receives a migration over accepted `conns` into `mem` (fresh, zeroed
/// memory of the source's size) and `guest` (not yet run). On `Ok` the guest
/// runs here. On `Err` the guest never ran and `mem` holds a partial image
/// that the caller must discard.
pub fn migrate_destination(
    mem: &GuestMemory,
    guest: &mut dyn GuestControl,
    conns: Vec<TcpStream>,
    keys: &SessionKeys,
    cfg: &MigrationConfig,
    hooks: &Hooks,
) -> Result<DestReport, MigrateError> {
    cfg.validate()?;
    if conns.len() != usize::from(cfg.streams) {
        return Err(MigrateError::Config(format!(
            "{} connections for {} streams",
            conns.len(),
            cfg.streams
        )));
    }
    let socks = clone_all(&conns)?;
    let (reply_tx, reply_rx) = bounded::<(usize, DstReply)>(usize::from(cfg.streams) * 4);
    let counters = Counters::default();
    let stats: Vec<std::sync::Mutex<(u64, u64, u64)>> =
        (0..conns.len()).map(|_| std::sync::Mutex::new((0, 0, 0))).collect();
    let result = std::thread::scope(|scope| {
        let mut cmd_txs = Vec::new();
        for (i, sock) in conns.into_iter().enumerate() {
            let (tx, rx) = bounded::<DstCmd>(2);
            cmd_txs.push(tx);
            let reply = reply_tx.clone();
            let slot = &stats[i];
            let counters = &counters;
            std::thread::Builder::new()
                .name(format!("ferry-recv-{i}"))
                .spawn_scoped(scope, move || {
                    pin(cfg, i + 1);
                    let r = RecvWorker::new(i, mem, keys, cfg, sock, counters).and_then(|mut w| {
                        let r = w.run(&rx, &reply);
                        if let Ok(mut s) = slot.lock() {
                            *s = (w.frames, w.pages, w.inbox.bytes);
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
        let r = dest_drive(guest, &cmd_txs, &reply_rx, cfg, hooks, &counters);
        if r.is_err() {
            for s in &socks {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        drop(cmd_txs);
        r
    });
    let (resumed_at, transcript_root) = result?;
    let (mut frames, mut pages, mut bytes) = (0, 0, 0);
    for s in &stats {
        let (f, p, b) = *s.lock().map_err(|_| MigrateError::WorkerLost(u16::MAX))?;
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
    })
}

fn dest_drive(
    guest: &mut dyn GuestControl,
    cmd_txs: &[Sender<DstCmd>],
    replies: &Receiver<(usize, DstReply)>,
    cfg: &MigrationConfig,
    hooks: &Hooks,
    counters: &Counters,
) -> Result<(Instant, [u8; 32]), MigrateError> {
    let started = Instant::now();
    let n = cmd_txs.len();
    let (mut hellos, mut finals, mut done) = (0, 0, 0);
    let mut stream_of_worker: Vec<Option<usize>> = vec![None; n];
    let mut transcripts: Vec<Option<[u8; 32]>> = vec![None; n];
    // Streams whose Hello arrived (streams <= 64, checked by validate()).
    let mut seen = 0u64;
    let mut state: Option<Vec<u8>> = None;
    let mut ready_sent = false;
    let mut resumed_at = None;
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
            Err(RecvTimeoutError::Timeout) => {
                return Err(MigrateError::Transport {
                    stream: u16::MAX,
                    round: 0,
                    during: "waiting for the source",
                    source: IoError::Timeout(cfg.io_timeout * 3),
                })
            }
            Err(RecvTimeoutError::Disconnected) => return Err(MigrateError::WorkerLost(u16::MAX)),
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
                // The source has given the VM up: run it here.
                guest.resume()?;
                resumed_at = Some(Instant::now());
                hooks.emit(&Progress::Resumed {
                    elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                });
                let _ = cmd_txs[i].send(DstCmd::SendResumed);
            }
            DstReply::Done => {
                done += 1;
                if done == n {
                    let resumed_at = resumed_at.ok_or(MigrateError::Protocol {
                        stream: 0,
                        detail: "streams ended without a commit".into(),
                    })?;
                    let root = transcript_root(&transcripts).ok_or(MigrateError::WorkerLost(u16::MAX))?;
                    return Ok((resumed_at, root));
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
                .send(DstCmd::SendReady)
                .map_err(|_| MigrateError::WorkerLost(0))?;
        }
    }
}

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
enum RecvPhase {
    Rounds,
    /// Stream 0 after its final round: waits for the controller's go.
    AwaitGo,
    AwaitCommit,
    AwaitResumeGo,
    Finishing,
}

struct RecvWorker<'a> {
    index: usize,
    stream: u16,
    mem: &'a GuestMemory,
    cfg: &'a MigrationConfig,
    keys: &'a SessionKeys,
    conn: Conn,
    tx: StreamCrypto,
    tx_seq: u64,
    out_spare: Option<Vec<u8>>,
    inbox: Inbox,
    since_ack: u64,
    ack_due: bool,
    ready_due: bool,
    resumed_due: bool,
    phase: RecvPhase,
    /// Round of the last frame received (for error reports).
    round: u32,
    frames: u64,
    pages: u64,
    counters: &'a Counters,
}

impl<'a> RecvWorker<'a> {
    fn new(
        index: usize,
        mem: &'a GuestMemory,
        keys: &'a SessionKeys,
        cfg: &'a MigrationConfig,
        mut sock: TcpStream,
        counters: &'a Counters,
    ) -> Result<Self, MigrateError> {
        let s = u16::try_from(index).unwrap_or(u16::MAX);
        // Which stream this connection carries, proven with a MAC over a
        // fresh nonce under this session's key before any frame is read.
        let stream = crate::transport::verify_stream(&mut sock, keys, cfg.io_timeout).map_err(|e| match e {
            crate::transport::PreambleError::BadProof(st) => MigrateError::Protocol {
                stream: st,
                detail: e.to_string(),
            },
            other => MigrateError::Setup {
                stream: s,
                source: IoError::Preamble(other.to_string()),
            },
        })?;
        if stream >= cfg.streams {
            return Err(MigrateError::Protocol {
                stream,
                detail: format!("stream {stream} of {}", cfg.streams),
            });
        }
        let conn = Conn::new(sock, cfg.io_timeout).map_err(|source| MigrateError::Setup { stream, source })?;
        let id = StreamId(stream);
        let rx = StreamCrypto::new(keys, Direction::ToDestination, id, cfg.aead);
        Ok(RecvWorker {
            index,
            stream,
            mem,
            cfg,
            keys,
            conn,
            tx: StreamCrypto::new(keys, Direction::ToSource, id, cfg.aead),
            tx_seq: 0,
            out_spare: Some(Vec::with_capacity(MAX_TO_SOURCE_FRAME)),
            inbox: Inbox::new(2 * MAX_FRAME + (256 << 10), rx),
            since_ack: 0,
            ack_due: false,
            ready_due: false,
            resumed_due: false,
            phase: RecvPhase::Rounds,
            round: 0,
            frames: 0,
            pages: 0,
            counters,
        })
    }

    fn sid(&self) -> u16 {
        self.stream
    }

    fn run(&mut self, cmds: &Receiver<DstCmd>, replies: &Sender<(usize, DstReply)>) -> Result<(), MigrateError> {
        let r = self.run_inner(cmds, replies);
        if let Err(e) = &r {
            if !matches!(e, MigrateError::PeerAborted { .. } | MigrateError::Transport { .. }) {
                let hdr = StreamHeader {
                    migration: self.keys.migration(),
                    stream: StreamId(self.stream),
                };
                send_abort(&mut self.conn, &mut self.tx, hdr, self.tx_seq, &e.to_string());
            }
        }
        r
    }

    fn run_inner(&mut self, cmds: &Receiver<DstCmd>, replies: &Sender<(usize, DstReply)>) -> Result<(), MigrateError> {
        let sid = self.sid();
        self.inbox.arm(&mut self.conn, sid, 0)?;
        loop {
            self.pump_sends()?;
            match self.phase {
                RecvPhase::AwaitGo if !self.conn.send_busy() => {
                    match cmds.recv_timeout(self.cfg.io_timeout * 2) {
                        Ok(DstCmd::SendReady) => {
                            self.ready_due = true;
                            self.phase = RecvPhase::AwaitCommit;
                        }
                        _ => return Err(self.protocol("no go-ahead to send Ready")),
                    }
                    continue;
                }
                RecvPhase::AwaitResumeGo => {
                    match cmds.recv_timeout(self.cfg.io_timeout * 2) {
                        Ok(DstCmd::SendResumed) => {
                            self.resumed_due = true;
                            self.phase = RecvPhase::Finishing;
                        }
                        _ => return Err(self.protocol("guest did not resume")),
                    }
                    continue;
                }
                RecvPhase::Finishing if !self.conn.send_busy() && !self.ack_due && !self.resumed_due => return Ok(()),
                _ => {}
            }
            let during = match self.phase {
                RecvPhase::Rounds => "receiving pages",
                RecvPhase::AwaitCommit => "waiting for the source's Commit",
                _ => "sending",
            };
            let ev = self
                .conn
                .wait()
                .map_err(MigrateError::io(self.sid(), self.round, during))?;
            match ev {
                Event::Sent(mut b) => {
                    b.clear();
                    self.out_spare = Some(b);
                }
                Event::Received { buf, start, n } => {
                    let was_rounds = self.phase == RecvPhase::Rounds;
                    self.on_received(buf, start, n, replies)?;
                    if was_rounds && matches!(self.phase, RecvPhase::AwaitGo | RecvPhase::Finishing) {
                        // The final round ended: nothing before Commit follows.
                        let _ = replies.send((self.index, DstReply::Final(self.inbox.transcript.root())));
                    }
                }
            }
        }
    }

    fn protocol(&self, detail: &str) -> MigrateError {
        MigrateError::Protocol {
            stream: self.sid(),
            detail: detail.into(),
        }
    }

    fn on_received(
        &mut self,
        buf: Vec<u8>,
        start: usize,
        n: usize,
        replies: &Sender<(usize, DstReply)>,
    ) -> Result<(), MigrateError> {
        let stream = self.sid();
        let streams = self.cfg.streams;
        let integrity = self.cfg.integrity;
        let hello = hello_payload(self.cfg);
        let mem = self.mem;
        let index = self.index;
        let ack_every = self.cfg.ack_every;
        let counters = self.counters;
        let (phase, since_ack, ack_due, frames, pages, round) = (
            &mut self.phase,
            &mut self.since_ack,
            &mut self.ack_due,
            &mut self.frames,
            &mut self.pages,
            &mut self.round,
        );
        self.inbox.on_received(
            &mut self.conn,
            buf,
            start,
            n,
            stream,
            self.keys.migration(),
            MAX_FRAME,
            |h, plain| {
                *frames += 1;
                *since_ack += 1;
                *round = (*round).max(h.round);
                let proto = |d: String| MigrateError::Protocol { stream, detail: d };
                match (h.kind, *phase) {
                    (Kind::Hello, RecvPhase::Rounds) if h.seq.0 == 0 => {
                        if plain != hello {
                            return Err(MigrateError::Config(format!(
                                "source offers streams/integrity {:?}, this destination expects {:?} ({} streams, {})",
                                plain,
                                hello,
                                streams,
                                integrity.as_str()
                            )));
                        }
                        let _ = replies.send((index, DstReply::Hello(stream)));
                    }
                    (Kind::Pages, RecvPhase::Rounds) if h.seq.0 > 0 => {
                        if stream_of(h.first_page, streams) != stream {
                            return Err(proto(format!(
                                "page {} arrived on stream {stream}, not its own",
                                h.first_page
                            )));
                        }
                        pipeline::apply_pages(h, plain, integrity, mem, h.round == 1).map_err(
                            |detail| match detail {
                                FrameError::IntegrityMode(_) | FrameError::OutOfRange { .. } => {
                                    proto(detail.to_string())
                                }
                                d => MigrateError::Integrity {
                                    stream,
                                    seq: h.seq.0,
                                    round: h.round,
                                    detail: d,
                                },
                            },
                        )?;
                        *pages += u64::from(h.page_count);
                        counters.add(u64::from(h.page_count), h.frame_len() as u64);
                    }
                    (Kind::DeviceState, RecvPhase::Rounds) if stream == 0 => {
                        let _ = replies.send((index, DstReply::State(plain.to_vec())));
                    }
                    (Kind::RoundEnd, RecvPhase::Rounds) => {
                        *ack_due = true;
                        if h.flags & FLAG_FINAL != 0 {
                            *phase = if stream == 0 {
                                RecvPhase::AwaitGo
                            } else {
                                RecvPhase::Finishing
                            };
                            return Ok(stream == 0);
                        }
                    }
                    (Kind::Commit, RecvPhase::AwaitCommit) => {
                        let _ = replies.send((index, DstReply::Commit));
                        *phase = RecvPhase::AwaitResumeGo;
                        return Ok(false);
                    }
                    (Kind::Abort, _) => {
                        return Err(MigrateError::PeerAborted {
                            stream,
                            reason: String::from_utf8_lossy(plain).into_owned(),
                        })
                    }
                    (k, p) => return Err(proto(format!("unexpected {k:?} frame (phase {p:?})"))),
                }
                if *since_ack >= ack_every {
                    *ack_due = true;
                }
                Ok(true)
            },
        )
    }

    /// Sends what is due, one frame at a time: Resumed, Ready, then acks.
    fn pump_sends(&mut self) -> Result<(), MigrateError> {
        if self.conn.send_busy() {
            return Ok(());
        }
        let tx = &mut self.tx;
        let hdr = StreamHeader {
            migration: self.keys.migration(),
            stream: StreamId(self.stream),
        };
        let mut out = self
            .out_spare
            .take()
            .unwrap_or_else(|| Vec::with_capacity(MAX_TO_SOURCE_FRAME));
        if self.ack_due {
            let cum = self.inbox.next_seq.to_le_bytes();
            pipeline::encode_control(Kind::Ack, 0, hdr, 0, Seq(self.tx_seq), &cum, tx, &mut out);
            self.tx_seq += 1;
            self.ack_due = false;
            self.since_ack = 0;
        }
        if self.ready_due {
            pipeline::encode_control(Kind::Ready, 0, hdr, 0, Seq(self.tx_seq), &[], tx, &mut out);
            self.tx_seq += 1;
            self.ready_due = false;
        }
        if self.resumed_due {
            pipeline::encode_control(Kind::Resumed, 0, hdr, 0, Seq(self.tx_seq), &[], tx, &mut out);
            self.tx_seq += 1;
            self.resumed_due = false;
        }
        if out.is_empty() {
            self.out_spare = Some(out);
            return Ok(());
        }
        self.conn
            .start_send(out)
            .map_err(MigrateError::io(self.sid(), 0, "sending acknowledgements"))
    }
}
