//! A sending worker: one stream's frames, window and acknowledgements.

use std::net::TcpStream;

use crossbeam_channel::{Receiver, Sender};

use super::switchover::ReadyFrame;
use super::{SrcCmd, SrcReply};
use crate::bitmap::{for_each_chunk, DirtyBitmap};
use crate::crypto::{Direction, Sealer, SessionKeys, StreamCrypto};
use crate::io::{Conn, Event, IoError};
use crate::memory::{GuestMemory, PageIndex};
use crate::migrate::inbox::Inbox;
use crate::migrate::transcript::Transcript;
use crate::migrate::{hello_of, send_abort, MigrateError, MigrationConfig, RoundStats, MAX_TO_SOURCE_FRAME};
use crate::pace::Pacer;
use crate::pipeline::{self, StreamHeader};
use crate::progress::{Counters, Hooks};
use crate::wire::{self, Ack, Kind, StreamId, FLAG_FINAL, HEADER_LEN, MAX_FRAME};

pub(crate) struct SendWorker<'a> {
    stream: u16,
    mem: &'a GuestMemory,
    cfg: &'a MigrationConfig,
    boundaries: &'a [u64],
    conn: Conn,
    hdr: StreamHeader,
    tx: Sealer,
    /// Frames the destination has acknowledged (its next expected sequence).
    acked: u64,
    cur: Vec<u8>,
    spare: Option<Vec<u8>>,
    pub(super) inbox: Inbox,
    round: u32,
    ready: bool,
    resumed: bool,
    transcript: Transcript,
    hooks: &'a Hooks,
    counters: &'a Counters,
    pacer: &'a Pacer<'a>,
    /// The round under way is the paused one (its own bandwidth cap).
    final_round: bool,
}

impl<'a> SendWorker<'a> {
    /// Frames sealed so far on this stream (the next frame's sequence).
    fn sent(&self) -> u64 {
        self.tx.next_seq().0
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        stream: u16,
        mem: &'a GuestMemory,
        keys: &SessionKeys,
        cfg: &'a MigrationConfig,
        mut sock: TcpStream,
        boundaries: &'a [u64],
        hooks: &'a Hooks,
        counters: &'a Counters,
        pacer: &'a Pacer<'a>,
    ) -> Result<Self, MigrateError> {
        crate::transport::prove_stream(&mut sock, keys, stream, cfg.io_timeout).map_err(|e| MigrateError::Setup {
            stream,
            source: IoError::Preamble(e),
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
            tx: Sealer::new(keys, Direction::ToDestination, id, cfg.aead),
            acked: 0,
            cur: Vec::with_capacity(cfg.batch_bytes + MAX_FRAME),
            spare: None,
            inbox: Inbox::new(
                StreamCrypto::new(keys, Direction::ToSource, id, cfg.aead),
                stream,
                keys.migration(),
                MAX_TO_SOURCE_FRAME,
                4 * MAX_TO_SOURCE_FRAME,
            ),
            round: 0,
            ready: false,
            resumed: false,
            transcript: Transcript::new(),
            hooks,
            counters,
            pacer,
            final_round: false,
        })
    }

    pub(super) fn run(
        &mut self,
        cmds: &Receiver<SrcCmd>,
        replies: &Sender<(u16, SrcReply)>,
        stream: u16,
    ) -> Result<(), MigrateError> {
        let r = self.run_inner(cmds, replies, stream);
        if let Err(e) = &r {
            if !matches!(e, MigrateError::PeerAborted { .. } | MigrateError::Transport { .. }) {
                send_abort(&mut self.conn, &mut self.tx, self.hdr, &e.to_string());
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
        let hello = hello_of(self.cfg).encode();
        self.push_control(Kind::Hello, 0, &hello)?;
        self.inbox.arm(&mut self.conn, 0)?;
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
                    self.final_round = is_final;
                    if is_final && self.hooks.injected_panic_in_final_round(stream) {
                        panic!("injected fault: stream {stream}'s worker panics in the final round, after the pause");
                    }
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
                        let _ = replies.send((stream, SrcReply::Ready(ReadyFrame::opened())));
                    }
                }
                SrcCmd::Abort(reason) => {
                    send_abort(&mut self.conn, &mut self.tx, self.hdr, &reason);
                    return Ok(());
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
        let seq0 = self.sent();
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
                let seq = self.tx.next_seq();
                let e = pipeline::encode_pages(
                    self.mem,
                    PageIndex(first),
                    u32::try_from(count).expect("chunk <= 64 pages"),
                    self.hdr,
                    self.round,
                    self.cfg.integrity,
                    zero_hint,
                    &mut self.tx,
                    &mut self.cur,
                );
                let tag = &self.cur[self.cur.len() - wire::TAG_LEN..];
                self.transcript.add(Kind::Pages, seq.0, tag);
                if let Some(d) = &e.chunk_digest {
                    self.transcript.add_chunk(d);
                }
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
        while self.acked < self.sent() {
            self.wait_event("waiting for acknowledgements")?;
        }
        stats.frames = self.sent() - seq0;
        if is_final {
            stats.transcript = Some(self.transcript.root());
        }
        Ok(stats)
    }

    /// Makes room for a frame of up to `len` bytes: respects the window of
    /// unacknowledged frames and the batch buffer's capacity.
    fn reserve(&mut self, len: usize) -> Result<(), MigrateError> {
        if self.sent() - self.acked >= self.cfg.window_frames {
            // The destination cannot ack what it has not received.
            self.flush()?;
            while self.sent() - self.acked >= self.cfg.window_frames {
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
        let seq = self.tx.next_seq();
        let n = pipeline::encode_control(kind, flags, self.hdr, self.round, payload, &mut self.tx, &mut self.cur);
        if kind != Kind::Commit {
            let tag = &self.cur[self.cur.len() - wire::TAG_LEN..];
            self.transcript.add(kind, seq.0, tag);
        }
        Ok(n)
    }

    /// Hands the current batch to io_uring (waiting for the previous send).
    fn flush(&mut self) -> Result<(), MigrateError> {
        if self.cur.is_empty() {
            return Ok(());
        }
        // Under a bandwidth cap, wait for this batch's slot (a cancel ends
        // the wait).
        let hooks = self.hooks;
        self.pacer
            .take(self.cur.len(), self.final_round, || hooks.is_cancelled());
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
                let sent = self.sent();
                let (acked, ready, resumed) = (&mut self.acked, &mut self.ready, &mut self.resumed);
                self.inbox.on_received(&mut self.conn, buf, start, n, |h, plain| {
                    match h.kind {
                        Kind::Ack => {
                            let cum = Ack::decode(plain)
                                .map_err(|e| MigrateError::Protocol {
                                    stream,
                                    detail: e.to_string(),
                                })?
                                .next_seq;
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
                })?;
            }
        }
        Ok(())
    }
}
