//! Frame reassembly: the receiving half both kinds of worker share.

use super::transcript::Transcript;
use super::MigrateError;
use crate::crypto::StreamCrypto;
use crate::io::Conn;
use crate::pipeline;
use crate::wire::{self, FrameHeader, HEADER_LEN};

/// The receiving half both kinds of worker share: a buffer of bytes read
/// from the stream, parsed into frames that are opened in place.
pub(crate) struct Inbox {
    pub(crate) transcript: Transcript,
    buf: Option<Vec<u8>>,
    fill: usize,
    pub(crate) next_seq: u64,
    crypto: StreamCrypto,
    pub(crate) bytes: u64,
}

impl Inbox {
    pub(crate) fn new(capacity: usize, crypto: StreamCrypto) -> Inbox {
        Inbox {
            transcript: Transcript::new(),
            buf: Some(vec![0u8; capacity]),
            fill: 0,
            next_seq: 0,
            crypto,
            bytes: 0,
        }
    }

    pub(crate) fn arm(&mut self, conn: &mut Conn, stream: u16, round: u32) -> Result<(), MigrateError> {
        if let Some(buf) = self.buf.take() {
            conn.start_recv(buf, self.fill)
                .map_err(MigrateError::io(stream, round, "arming a receive"))?;
        }
        Ok(())
    }

    /// Takes back the buffer of a completed receive and hands every complete
    /// frame, opened, to `handle`. Re-arms the receive unless `handle` says stop.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn on_received(
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
