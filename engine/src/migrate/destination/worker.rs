//! A receiving worker: one stream's frames into guest memory, and its
//! acknowledgements, Ready and Resumed back.

use crossbeam_channel::{Receiver, Sender};

use super::phase::{self, Action, Go, RecvPhase, Seen};
use super::DstReply;
use crate::bitmap::stream_of;
use crate::crypto::{Direction, Sealer, SessionKeys, StreamCrypto};
use crate::io::{Conn, Event};
use crate::memory::GuestMemory;
use crate::migrate::inbox::Inbox;
use crate::migrate::{hello_of, send_abort, MigrateError, MigrationConfig, MAX_TO_SOURCE_FRAME};
use crate::pipeline::{self, FrameError, StreamHeader};
use crate::progress::Counters;
use crate::transport::ProvenStream;
use crate::wire::{Ack, Hello, Kind, StreamId, FLAG_FINAL, MAX_FRAME};

pub(crate) struct RecvWorker<'a> {
    index: usize,
    stream: u16,
    mem: &'a GuestMemory,
    cfg: &'a MigrationConfig,
    keys: &'a SessionKeys,
    conn: Conn,
    tx: Sealer,
    out_spare: Option<Vec<u8>>,
    pub(super) inbox: Inbox,
    since_ack: u64,
    ack_due: bool,
    ready_due: bool,
    resumed_due: bool,
    phase: RecvPhase,
    /// Round of the last frame received (for error reports).
    round: u32,
    pub(super) frames: u64,
    pub(super) pages: u64,
    counters: &'a Counters,
}

impl<'a> RecvWorker<'a> {
    pub(super) fn new(
        connection: u16,
        mem: &'a GuestMemory,
        keys: &'a SessionKeys,
        cfg: &'a MigrationConfig,
        proven: ProvenStream,
        counters: &'a Counters,
    ) -> Result<Self, MigrateError> {
        // Which stream this connection carries was proven with a MAC over a
        // fresh nonce under this session's key before any frame is read
        // (`transport::accept_proven`).
        let stream = proven.stream();
        if stream >= cfg.streams {
            return Err(MigrateError::Protocol {
                stream,
                detail: format!("stream {stream} of {}", cfg.streams),
            });
        }
        let sock = proven.into_socket();
        let conn = Conn::new(sock, cfg.io_timeout).map_err(|source| MigrateError::Setup { stream, source })?;
        let id = StreamId(stream);
        let rx = StreamCrypto::new(keys, Direction::ToDestination, id, cfg.aead);
        Ok(RecvWorker {
            index: usize::from(connection),
            stream,
            mem,
            cfg,
            keys,
            conn,
            tx: Sealer::new(keys, Direction::ToSource, id, cfg.aead),
            out_spare: Some(Vec::with_capacity(MAX_TO_SOURCE_FRAME)),
            inbox: Inbox::new(rx, stream, keys.migration(), MAX_FRAME, 2 * MAX_FRAME + (256 << 10)),
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

    pub(super) fn run(&mut self, cmds: &Receiver<Go>, replies: &Sender<(usize, DstReply)>) -> Result<(), MigrateError> {
        let r = self.run_inner(cmds, replies);
        if let Err(e) = &r {
            if !matches!(e, MigrateError::PeerAborted { .. } | MigrateError::Transport { .. }) {
                let hdr = StreamHeader {
                    migration: self.keys.migration(),
                    stream: StreamId(self.stream),
                };
                send_abort(&mut self.conn, &mut self.tx, hdr, &e.to_string());
            }
        }
        r
    }

    fn run_inner(&mut self, cmds: &Receiver<Go>, replies: &Sender<(usize, DstReply)>) -> Result<(), MigrateError> {
        self.inbox.arm(&mut self.conn, 0)?;
        loop {
            self.pump_sends()?;
            let awaiting = match self.phase {
                RecvPhase::AwaitGo if !self.conn.send_busy() => Some("no go-ahead to send Ready"),
                RecvPhase::AwaitResumeGo => Some("guest did not resume"),
                _ => None,
            };
            if let Some(why) = awaiting {
                let go = cmds.recv_timeout(self.cfg.io_timeout * 2).ok();
                match go.and_then(|g| phase::on_go(self.phase, g).map(|p| (g, p))) {
                    Some((g, next)) => {
                        match g {
                            Go::SendReady => self.ready_due = true,
                            Go::SendResumed => self.resumed_due = true,
                        }
                        self.phase = next;
                    }
                    None => return Err(self.protocol(why)),
                }
                continue;
            }
            if self.phase == RecvPhase::Finishing && !self.conn.send_busy() && !self.ack_due && !self.resumed_due {
                return Ok(());
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
                        let _ = replies.send((self.index, DstReply::Final(self.inbox.transcript_root())));
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
        let hello = hello_of(self.cfg);
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
            |h, plain| {
                *frames += 1;
                *since_ack += 1;
                *round = (*round).max(h.round);
                let proto = |d: String| MigrateError::Protocol { stream, detail: d };
                let seen = Seen {
                    kind: h.kind,
                    seq: h.seq.0,
                    is_final: h.flags & FLAG_FINAL != 0,
                };
                let (next, action) = phase::on_frame(*phase, stream == 0, seen).map_err(|u| proto(u.to_string()))?;
                *phase = next;
                match action {
                    Action::Hello => {
                        let offered = Hello::decode(plain).map_err(|e| proto(e.to_string()))?;
                        if offered != hello {
                            return Err(MigrateError::Config(format!(
                                "the source sends {} streams with {} integrity, this destination expects {} streams with {}: start both sides with the same settings",
                                offered.streams, offered.integrity, hello.streams, hello.integrity
                            )));
                        }
                        let _ = replies.send((index, DstReply::Hello(stream)));
                    }
                    Action::Pages => {
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
                    Action::DeviceState => {
                        let _ = replies.send((index, DstReply::State(plain.to_vec())));
                    }
                    Action::RoundEnd { keep_reading } => {
                        *ack_due = true;
                        if !keep_reading || seen.is_final {
                            return Ok(keep_reading);
                        }
                    }
                    Action::Commit => {
                        let _ = replies.send((index, DstReply::Commit));
                        return Ok(false);
                    }
                    Action::Abort => {
                        return Err(MigrateError::PeerAborted {
                            stream,
                            reason: String::from_utf8_lossy(plain).into_owned(),
                        })
                    }
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
            let ack = Ack {
                next_seq: self.inbox.next_seq(),
            }
            .encode();
            pipeline::encode_control(Kind::Ack, 0, hdr, 0, &ack, tx, &mut out);
            self.ack_due = false;
            self.since_ack = 0;
        }
        if self.ready_due {
            pipeline::encode_control(Kind::Ready, 0, hdr, 0, &[], tx, &mut out);
            self.ready_due = false;
        }
        if self.resumed_due {
            pipeline::encode_control(Kind::Resumed, 0, hdr, 0, &[], tx, &mut out);
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
