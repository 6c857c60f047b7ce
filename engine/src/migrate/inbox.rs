//! Frame reassembly: bytes from one stream, in whatever pieces the network
//! delivers them, into whole frames — header checked, sequence checked,
//! AEAD opened in place, added to the stream's transcript — handed one by
//! one to the worker. Both kinds of worker use it; everything that reaches
//! a handler passed every check.
//!
//! The parsing does not touch the connection, so it is tested and fuzzed
//! (`fuzz/fuzz_targets/frame_reassembly.rs`) with bytes alone; the workers
//! receive straight into its buffer (`Inbox::on_received`).

use super::transcript::Transcript;
use super::MigrateError;
use crate::crypto::StreamCrypto;
use crate::io::Conn;
use crate::pipeline;
use crate::wire::{self, FrameHeader, MigrationId, Outer, HEADER_LEN};

/// One stream's receiving half.
pub struct Inbox {
    transcript: Transcript,
    /// `None` while a receive into it is in flight.
    buf: Option<Vec<u8>>,
    /// Where the received, not yet parsed bytes start in `buf`.
    head: usize,
    /// Where they end (the next receive lands here).
    fill: usize,
    next_seq: u64,
    opener: StreamCrypto,
    bytes: u64,
    stream: u16,
    migration: MigrationId,
    max_frame: usize,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("stream", &self.stream)
            .field("next_seq", &self.next_seq)
            .field("head", &self.head)
            .field("fill", &self.fill)
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// An inbox for `stream` of `migration`, opening frames with `opener`,
    /// refusing frames over `max_frame` bytes, with a buffer of `capacity`
    /// bytes (at least two of the largest frames: more lets one receive
    /// take more at once).
    pub fn new(opener: StreamCrypto, stream: u16, migration: MigrationId, max_frame: usize, capacity: usize) -> Inbox {
        let capacity = capacity.max(2 * max_frame.max(HEADER_LEN + wire::TAG_LEN));
        Inbox {
            transcript: Transcript::new(),
            buf: Some(vec![0u8; capacity]),
            head: 0,
            fill: 0,
            next_seq: 0,
            opener,
            bytes: 0,
            stream,
            migration,
            max_frame,
        }
    }

    /// The sequence the next frame must carry (frames accepted so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The stream's transcript of what was received so far.
    pub(crate) fn transcript_root(&self) -> [u8; 32] {
        self.transcript.root()
    }

    /// Feeds bytes that arrived (copied in; the workers receive in place
    /// instead). Returns `false` once `handle` said stop; bytes after that
    /// frame stay buffered.
    pub fn feed(
        &mut self,
        mut bytes: &[u8],
        mut handle: impl FnMut(&FrameHeader, &mut [u8]) -> Result<bool, MigrateError>,
    ) -> Result<bool, MigrateError> {
        let Some(mut buf) = self.buf.take() else {
            return Err(MigrateError::Protocol {
                stream: self.stream,
                detail: "bytes fed while a receive into the buffer is in flight".into(),
            });
        };
        // At least one pass, so frames left buffered by a stop are parsed
        // even when nothing new came.
        let r = loop {
            self.make_room(&mut buf);
            let room = buf.len() - self.fill;
            let n = room.min(bytes.len());
            buf[self.fill..self.fill + n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            let r = self.take_frames(&mut buf, n, &mut handle);
            if !matches!(r, Ok(true)) || bytes.is_empty() {
                break r;
            }
        };
        self.buf = Some(buf);
        r
    }

    /// Starts a receive into the free part of the buffer (unless one is in
    /// flight).
    pub(crate) fn arm(&mut self, conn: &mut Conn, round: u32) -> Result<(), MigrateError> {
        if let Some(mut buf) = self.buf.take() {
            self.make_room(&mut buf);
            conn.start_recv(buf, self.fill)
                .map_err(MigrateError::io(self.stream, round, "arming a receive"))?;
        }
        Ok(())
    }

    /// Takes back the buffer of a completed receive (`n` bytes at `start`)
    /// and hands every complete frame, opened, to `handle`. Re-arms the
    /// receive unless `handle` says stop.
    pub(crate) fn on_received(
        &mut self,
        conn: &mut Conn,
        mut buf: Vec<u8>,
        start: usize,
        n: usize,
        handle: impl FnMut(&FrameHeader, &mut [u8]) -> Result<bool, MigrateError>,
    ) -> Result<(), MigrateError> {
        debug_assert_eq!(start, self.fill);
        let r = self.take_frames(&mut buf, n, handle);
        self.buf = Some(buf);
        if r? {
            self.arm(conn, 0)?;
        }
        Ok(())
    }

    /// Moves the unparsed bytes (at most an incomplete frame) to the front
    /// of the buffer, but only once less than a largest frame's room is left
    /// after them: moving the tail after every receive copied up to a frame
    /// per receive (measured: a third of the destination's copying in
    /// `aead` mode). The buffer holds two largest frames, so after a move
    /// there is room for at least one.
    fn make_room(&mut self, buf: &mut [u8]) {
        if self.head == self.fill {
            self.head = 0;
            self.fill = 0;
        } else if buf.len() - self.fill < self.max_frame.max(HEADER_LEN + wire::TAG_LEN) {
            buf.copy_within(self.head..self.fill, 0);
            self.fill -= self.head;
            self.head = 0;
        }
    }

    /// `n` new bytes follow the unparsed ones at `head..fill` in `buf`:
    /// parses every complete frame and leaves what is left of an incomplete
    /// one where it is.
    fn take_frames(
        &mut self,
        buf: &mut [u8],
        n: usize,
        mut handle: impl FnMut(&FrameHeader, &mut [u8]) -> Result<bool, MigrateError>,
    ) -> Result<bool, MigrateError> {
        let stream = self.stream;
        self.fill += n;
        self.bytes += n as u64;
        let mut pos = self.head;
        let mut keep_reading = true;
        while self.fill - pos >= HEADER_LEN {
            let hb: &[u8; HEADER_LEN] = buf[pos..pos + HEADER_LEN].try_into().expect("one header");
            let after_seq = self.next_seq;
            let malformed = |source| MigrateError::Malformed {
                stream,
                after_seq,
                source,
            };
            // Only the clear fields until the whole frame is here.
            let outer = Outer::decode(hb).map_err(malformed)?;
            let len = outer.frame_len();
            if len > self.max_frame {
                return Err(MigrateError::Protocol {
                    stream,
                    detail: format!(
                        "{:?} frame of {len} bytes exceeds the {}-byte limit",
                        outer.kind, self.max_frame
                    ),
                });
            }
            if self.fill - pos < len {
                break;
            }
            // The whole frame is here: unmask its header (what the tag
            // authenticates) and decode all of it.
            let h = pipeline::unprotect(&mut buf[pos..pos + len], &self.opener).map_err(malformed)?;
            if h.migration != self.migration {
                return Err(MigrateError::Protocol {
                    stream,
                    detail: format!(
                        "frame for migration {:#x}, this is {:#x}",
                        h.migration.0, self.migration.0
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
                    pipeline::open_frame(&h, frame, &mut self.opener).map_err(|detail| MigrateError::Integrity {
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
        self.head = pos;
        Ok(keep_reading)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{AeadBackend, Direction, Sealer, SessionKeys};
    use crate::pipeline::StreamHeader;
    use crate::wire::{Kind, StreamId};
    use proptest::prelude::*;

    const MIG: MigrationId = MigrationId(42);

    /// One session's keys for the whole test binary (each call of the
    /// constructor draws a fresh secret).
    fn keys() -> SessionKeys {
        static KEYS: std::sync::OnceLock<SessionKeys> = std::sync::OnceLock::new();
        KEYS.get_or_init(|| SessionKeys::test_only_unauthenticated(MIG).unwrap())
            .clone()
    }

    /// `count` sealed control frames with distinct payloads, and the payloads.
    fn frames(count: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let k = keys();
        let mut tx = Sealer::new(&k, Direction::ToSource, StreamId(0), AeadBackend::Ring);
        let hdr = StreamHeader {
            migration: MIG,
            stream: StreamId(0),
        };
        let mut out = Vec::new();
        let mut payloads = Vec::new();
        for i in 0..count {
            let p: Vec<u8> = (0..(i * 37) % 300)
                .map(|j| u8::try_from((i + j) % 256).unwrap())
                .collect();
            pipeline::encode_control(Kind::Abort, 0, hdr, 0, &p, &mut tx, &mut out);
            payloads.push(p);
        }
        (out, payloads)
    }

    fn inbox() -> Inbox {
        let k = keys();
        let rx = StreamCrypto::new(&k, Direction::ToSource, StreamId(0), AeadBackend::Ring);
        Inbox::new(rx, 0, MIG, HEADER_LEN + wire::MAX_REASON + wire::TAG_LEN, 0)
    }

    /// Feeds `bytes` split at `cuts`; returns the payloads delivered and the
    /// result.
    fn deliver(bytes: &[u8], cuts: &[usize]) -> (Vec<Vec<u8>>, Result<bool, MigrateError>) {
        let mut ib = inbox();
        let mut got = Vec::new();
        let mut at = 0;
        let mut r = Ok(true);
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.sort_unstable();
        points.push(bytes.len());
        for p in points {
            r = ib.feed(&bytes[at..p.max(at)], |h, plain| {
                assert_eq!(h.seq.0, got.len() as u64, "a frame out of order reached the handler");
                got.push(plain.to_vec());
                Ok(true)
            });
            at = p.max(at);
            if r.is_err() {
                break;
            }
        }
        (got, r)
    }

    #[test]
    fn byte_at_a_time_delivers_every_frame_in_order() {
        let (bytes, payloads) = frames(5);
        let cuts: Vec<usize> = (0..bytes.len()).collect();
        let (got, r) = deliver(&bytes, &cuts);
        assert!(r.unwrap());
        assert_eq!(got, payloads);
    }

    #[test]
    fn a_stop_keeps_the_rest_buffered() {
        let (bytes, payloads) = frames(3);
        let mut ib = inbox();
        let mut got = Vec::new();
        let more = ib
            .feed(&bytes, |_, p| {
                got.push(p.to_vec());
                Ok(false)
            })
            .unwrap();
        assert!(!more);
        assert_eq!(got, payloads[..1]);
        assert_eq!(ib.next_seq(), 1);
        // The next feed (of nothing new) parses what stayed buffered.
        let more = ib
            .feed(&[], |_, p| {
                got.push(p.to_vec());
                Ok(true)
            })
            .unwrap();
        assert!(more);
        assert_eq!(got, payloads);
    }

    #[test]
    fn replayed_and_foreign_frames_are_refused() {
        let (bytes, _) = frames(2);
        let first_len = wire::Outer::decode(bytes[..HEADER_LEN].try_into().unwrap())
            .unwrap()
            .frame_len();
        // The first frame twice: a replay.
        let mut replay = bytes[..first_len].to_vec();
        replay.extend_from_slice(&bytes[..first_len]);
        let (got, r) = deliver(&replay, &[]);
        assert_eq!(got.len(), 1);
        assert!(
            matches!(
                r,
                Err(MigrateError::Sequence {
                    expected: 1,
                    got: 0,
                    ..
                })
            ),
            "{r:?}"
        );
        // Another migration's frame.
        let mut other = inbox();
        other.migration = MigrationId(7);
        let r = other.feed(&bytes, |_, _| Ok(true));
        assert!(matches!(r, Err(MigrateError::Protocol { .. })), "{r:?}");
    }

    proptest! {
        // The stable-toolchain stand-in for the frame_reassembly fuzz target.
        #[test]
        fn any_split_delivers_the_same_frames(cuts in proptest::collection::vec(any::<usize>(), 0..40)) {
            let (bytes, payloads) = frames(6);
            let (got, r) = deliver(&bytes, &cuts);
            prop_assert!(r.is_ok());
            prop_assert_eq!(got, payloads);
        }

        /// Ten times the buffer's capacity through it: the unparsed tail is
        /// moved to the front many times, at every kind of boundary.
        #[test]
        fn a_stream_longer_than_the_buffer_delivers_every_frame(
            cuts in proptest::collection::vec(any::<usize>(), 0..80)
        ) {
            let (bytes, payloads) = frames(64);
            prop_assert!(bytes.len() > 4 * 2 * (HEADER_LEN + wire::MAX_REASON + wire::TAG_LEN));
            let (got, r) = deliver(&bytes, &cuts);
            prop_assert!(r.is_ok());
            prop_assert_eq!(got, payloads);
        }

        #[test]
        fn a_flipped_byte_never_delivers_an_altered_frame(
            at in any::<usize>(), xor in 1u8.., cuts in proptest::collection::vec(any::<usize>(), 0..10)
        ) {
            let (mut bytes, payloads) = frames(6);
            let i = at % bytes.len();
            bytes[i] ^= xor;
            let (got, r) = deliver(&bytes, &cuts);
            // Whatever was delivered is a prefix of what was sent, and the
            // stream cannot end cleanly with every frame.
            prop_assert!(got.len() < payloads.len() || r.is_err());
            prop_assert_eq!(&got[..], &payloads[..got.len()]);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let (got, _) = deliver(&data, &[data.len() / 2]);
            prop_assert!(got.is_empty());
        }
    }
}
