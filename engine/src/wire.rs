//! The data-plane wire format, version 1.
//!
//! Every message on a data stream is a *frame*: a fixed 56-byte header,
//! authenticated as AES-GCM associated data, then the ciphertext of the
//! payload and its 16-byte tag.
//!
//! ```text
//!  0      4   5    6     7    8              16       18    20      24             32
//!  +------+---+----+-----+----+--------------+--------+-----+-------+--------------+
//!  |"FRYM"|ver|kind|flags|rsvd| migration id | stream |rsvd | round |   sequence   |
//!  +------+---+----+-----+----+--------------+--------+-----+-------+--------------+
//!  32             40             48          52           56
//!  +--------------+--------------+-----------+------------+---------------------+-----+
//!  |  first page  |  zero mask   | page count| payload len| ciphertext ...      | tag |
//!  +--------------+--------------+-----------+------------+---------------------+-----+
//! ```
//!
//! **Header protection** (version 2): `round`, `first page`, `zero mask` and
//! `page count` (bytes 20..24 and 32..52, [`MASK_LEN`] in all) travel XORed
//! with a per-frame mask, so a passive observer does not learn the guest's
//! zero-page map or which pages each round rewrites. As in QUIC (RFC 9001,
//! section 5.4), the mask comes from a sample of the sealed frame: it is the
//! AES-256-CTR keystream (ring's AES-GCM sealing zeros) under a header key of
//! the stream and direction, with the first 12 bytes of the frame's tag as
//! the nonce ([`crate::crypto::StreamCrypto::header_mask`]). The AEAD
//! authenticates the *unmasked* header, so a changed masked byte fails the
//! tag. What stays in the clear: kind, flags, migration id, stream,
//! sequence and the payload length (which says how many non-zero pages a
//! frame carries, not where they are).
//!
//! All integers are little-endian. `kind` 0 is reserved as invalid, so a
//! zeroed header never decodes. `sequence` counts frames per stream and
//! direction from 0; the receiver accepts only the next one, which makes a
//! replayed, reordered or dropped frame an error. The AES-GCM nonce is the
//! sequence number, under a key unique to (migration, direction, stream,
//! epoch), so a nonce never repeats under one key.
//!
//! A `Pages` frame covers pages `first_page .. first_page + page_count`
//! (at most [`MAX_FRAME_PAGES`]); bit `i` of `zero_mask` says page
//! `first_page + i` is all zeros and carries no bytes. Its plaintext is the
//! non-zero pages in order, followed (flag [`FLAG_DIGESTS`]) by the SHA-256
//! of each of them.
//!
//! ```text
//!  source                                   destination
//!    | Hello (each stream)                      |
//!    | Pages ... RoundEnd (each stream, round r)|
//!    |<------------------------- Ack(cum seq) --|   batched
//!    |   ... guest paused ...                   |
//!    | Pages ... DeviceState (stream 0)         |
//!    | RoundEnd FINAL (each stream)             |
//!    |<--------------------------- Ready -------|   all verified, state loaded
//!    | Commit  (the source gives the VM up) --->|
//!    |<--------------------------- Resumed -----|   guest runs at destination
//! ```
//! Either side may send `Abort` (with a reason) instead, before the commit.

use thiserror::Error;

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"FRYM";
/// Wire format version this build speaks (2: header protection).
pub const VERSION: u8 = 2;
/// Header size in bytes.
pub const HEADER_LEN: usize = 56;
/// AES-GCM tag size in bytes.
pub const TAG_LEN: usize = 16;
/// SHA-256 digest size in bytes.
pub const DIGEST_LEN: usize = 32;
/// Most pages one frame may carry (the zero mask has 64 bits).
pub const MAX_FRAME_PAGES: u32 = 64;
/// Largest device-state blob accepted.
pub const MAX_DEVICE_STATE: usize = 1 << 20;
/// Largest abort reason accepted.
pub const MAX_REASON: usize = 1024;
/// Largest payload (ciphertext + tag) any frame may have: checked before
/// anything is allocated or indexed.
pub const MAX_PAYLOAD: usize = MAX_DEVICE_STATE + TAG_LEN;
/// Largest whole frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;

/// Flag: the plaintext of a `Pages` frame ends with one SHA-256 per page sent.
pub const FLAG_DIGESTS: u8 = 1 << 0;
/// Flag: this `RoundEnd` closes the final (stop-and-copy) round.
pub const FLAG_FINAL: u8 = 1 << 1;
const KNOWN_FLAGS: u8 = FLAG_DIGESTS | FLAG_FINAL;

/// Bytes of header masked by header protection (see the module docs).
pub const MASK_LEN: usize = 24;
/// The masked ranges of the header: round, then first page, zero mask and
/// page count.
const MASKED: [(usize, usize); 2] = [(20, 24), (32, 52)];

/// XORs `mask` into the protected fields of `header` (masks or unmasks).
pub fn apply_mask(header: &mut [u8; HEADER_LEN], mask: &[u8; MASK_LEN]) {
    let mut m = mask.iter();
    for (from, to) in MASKED {
        for (b, k) in header[from..to].iter_mut().zip(&mut m) {
            *b ^= k;
        }
    }
}

/// The clear part of a (masked) header: enough to frame the stream before
/// the frame is whole and its mask can be computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    /// Frame kind.
    pub kind: Kind,
    /// Stream it travels on.
    pub stream: StreamId,
    /// Sequence number.
    pub seq: Seq,
    /// Ciphertext + tag length (bounded by [`MAX_PAYLOAD`]).
    pub payload_len: u32,
}

impl Outer {
    /// Checks magic, version, kind and the payload length's bounds.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Outer, WireError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if b[4] != VERSION {
            return Err(WireError::BadVersion(b[4]));
        }
        let kind = Kind::from_u8(b[5]).ok_or(WireError::BadKind(b[5]))?;
        let payload_len = u32_at(b, 52);
        if !(TAG_LEN..=MAX_PAYLOAD).contains(&(payload_len as usize)) {
            return Err(WireError::BadLength(format!("payload {payload_len} bytes")));
        }
        Ok(Outer {
            kind,
            stream: StreamId(u16_at(b, 16)),
            seq: Seq(u64_at(b, 24)),
            payload_len,
        })
    }

    /// Whole frame length on the wire.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Identifies one migration; bound into every frame and every key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct MigrationId(pub u64);

/// A data stream (one TCP connection) of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u16);

/// Per-stream, per-direction frame sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Seq(pub u64);

/// The integrity mode; its `#[repr(u8)]` value is what the Hello carries.
pub use ferry_control::modes::Integrity;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Reserved: a zeroed header is never valid.
    Invalid = 0,
    /// First frame on each stream: stream count and integrity mode.
    Hello = 1,
    /// A run of guest pages.
    Pages = 2,
    /// End of a round on this stream (`FLAG_FINAL` for the last one).
    RoundEnd = 3,
    /// The guest's device state (stream 0, final round).
    DeviceState = 4,
    /// Destination: every stream verified, state loaded; ready to commit.
    Ready = 5,
    /// Source: the commit point; the destination owns the VM now.
    Commit = 6,
    /// Destination: the guest is running here.
    Resumed = 7,
    /// Destination: cumulative acknowledgement.
    Ack = 8,
    /// Either side: the migration is aborted, with a reason.
    Abort = 9,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Pages,
            3 => Kind::RoundEnd,
            4 => Kind::DeviceState,
            5 => Kind::Ready,
            6 => Kind::Commit,
            7 => Kind::Resumed,
            8 => Kind::Ack,
            9 => Kind::Abort,
            _ => return None,
        })
    }
}

/// Why a header was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WireError {
    /// Not a ferry frame at all.
    #[error("bad frame magic {0:02x?}: not a ferry data stream")]
    BadMagic([u8; 4]),
    /// A version this build does not speak.
    #[error("unsupported wire version {0} (this build speaks {VERSION}); upgrade the older side")]
    BadVersion(u8),
    /// Kind 0 or unknown.
    #[error("invalid frame kind {0}")]
    BadKind(u8),
    /// Unknown flag bits or non-zero reserved fields.
    #[error("reserved bits set in frame header (flags {0:#x})")]
    Reserved(u8),
    /// A length beyond the limits, or inconsistent with the page count.
    #[error("frame length out of bounds: {0}")]
    BadLength(String),
    /// A control payload that does not decode.
    #[error("malformed {kind:?} payload: {what}")]
    BadPayload {
        /// The frame's kind.
        kind: Kind,
        /// What was wrong.
        what: &'static str,
    },
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind.
    pub kind: Kind,
    /// Flag bits (`FLAG_*`).
    pub flags: u8,
    /// Migration this frame belongs to.
    pub migration: MigrationId,
    /// Stream it travels on.
    pub stream: StreamId,
    /// Pre-copy round (1-based; 0 outside rounds).
    pub round: u32,
    /// Sequence number on this stream and direction.
    pub seq: Seq,
    /// First page (Pages frames).
    pub first_page: u64,
    /// Zero-page mask (Pages frames).
    pub zero_mask: u64,
    /// Number of pages (Pages frames).
    pub page_count: u32,
    /// Ciphertext + tag length.
    pub payload_len: u32,
}

fn u64_at(b: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}
fn u32_at(b: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}
fn u16_at(b: &[u8; HEADER_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl FrameHeader {
    /// A header for a frame of `kind` with no pages.
    pub fn control(
        kind: Kind,
        migration: MigrationId,
        stream: StreamId,
        round: u32,
        seq: Seq,
        payload_plain: usize,
    ) -> Self {
        FrameHeader {
            kind,
            flags: 0,
            migration,
            stream,
            round,
            seq,
            first_page: 0,
            zero_mask: 0,
            page_count: 0,
            payload_len: u32::try_from(payload_plain + TAG_LEN).expect("control payload bounded by MAX_PAYLOAD"),
        }
    }

    /// The 56 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.kind as u8;
        b[6] = self.flags;
        b[8..16].copy_from_slice(&self.migration.0.to_le_bytes());
        b[16..18].copy_from_slice(&self.stream.0.to_le_bytes());
        b[20..24].copy_from_slice(&self.round.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_page.to_le_bytes());
        b[40..48].copy_from_slice(&self.zero_mask.to_le_bytes());
        b[48..52].copy_from_slice(&self.page_count.to_le_bytes());
        b[52..56].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Decodes and checks an *unmasked* header: magic, version, kind,
    /// reserved bits, and every length against its limit. Says nothing of
    /// authenticity: that is the AEAD's job, with these bytes as associated
    /// data.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<FrameHeader, WireError> {
        let kind = Outer::decode(b)?.kind;
        let flags = b[6];
        if flags & !KNOWN_FLAGS != 0 || b[7] != 0 || u16_at(b, 18) != 0 {
            return Err(WireError::Reserved(flags));
        }
        let h = FrameHeader {
            kind,
            flags,
            migration: MigrationId(u64_at(b, 8)),
            stream: StreamId(u16_at(b, 16)),
            round: u32_at(b, 20),
            seq: Seq(u64_at(b, 24)),
            first_page: u64_at(b, 32),
            zero_mask: u64_at(b, 40),
            page_count: u32_at(b, 48),
            payload_len: u32_at(b, 52),
        };
        // In bounds: Outer::decode checked it.
        let payload = h.payload_len as usize;
        if kind == Kind::Pages {
            if h.page_count == 0 || h.page_count > MAX_FRAME_PAGES {
                return Err(WireError::BadLength(format!("{} pages", h.page_count)));
            }
            if h.page_count < 64 && h.zero_mask >> h.page_count != 0 {
                return Err(WireError::BadLength("zero mask beyond page count".into()));
            }
            let want = pages_payload_len(h.page_count, h.zero_mask, h.flags & FLAG_DIGESTS != 0);
            if payload != want {
                return Err(WireError::BadLength(format!(
                    "payload {payload} bytes, {} pages need {want}",
                    h.page_count
                )));
            }
        } else if h.page_count != 0 || h.zero_mask != 0 || h.first_page != 0 {
            return Err(WireError::BadLength("page fields set on a control frame".into()));
        }
        Ok(h)
    }

    /// Whole frame length on the wire.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Ciphertext + tag length of a Pages frame.
pub fn pages_payload_len(page_count: u32, zero_mask: u64, digests: bool) -> usize {
    let data = (page_count - zero_mask.count_ones()) as usize;
    data * crate::memory::PAGE_SIZE + if digests { data * DIGEST_LEN } else { 0 } + TAG_LEN
}

/// Bytes of a [`Hello`] payload.
pub const HELLO_LEN: usize = 4;

/// Every stream's first frame: what the source will send, which the
/// destination checks against its own configuration before any page.
///
/// ```text
/// 0      2          3          4
/// ┌──────┬──────────┬──────────┐
/// │streams│integrity │ reserved │   streams: u16 LE; integrity: Integrity's repr(u8); reserved: 0
/// └──────┴──────────┴──────────┘
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Data streams of the migration.
    pub streams: u16,
    /// Page integrity mode.
    pub integrity: Integrity,
}

impl Hello {
    /// The payload bytes.
    pub fn encode(self) -> [u8; HELLO_LEN] {
        let s = self.streams.to_le_bytes();
        [s[0], s[1], self.integrity.to_wire(), 0]
    }

    /// Parses a payload from [`encode`](Self::encode).
    pub fn decode(b: &[u8]) -> Result<Hello, WireError> {
        let bad = |what| WireError::BadPayload {
            kind: Kind::Hello,
            what,
        };
        let b: [u8; HELLO_LEN] = b.try_into().map_err(|_| bad("not 4 bytes"))?;
        if b[3] != 0 {
            return Err(bad("reserved byte set"));
        }
        let integrity = Integrity::from_wire(b[2]).ok_or(bad("unknown integrity mode"))?;
        Ok(Hello {
            streams: u16::from_le_bytes([b[0], b[1]]),
            integrity,
        })
    }
}

/// Bytes of an [`Ack`] payload.
pub const ACK_LEN: usize = 8;

/// The destination's cumulative acknowledgement: every frame below
/// `next_seq` on this stream arrived and was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The next sequence the destination expects.
    pub next_seq: u64,
}

impl Ack {
    /// The payload bytes (u64 LE).
    pub fn encode(self) -> [u8; ACK_LEN] {
        self.next_seq.to_le_bytes()
    }

    /// Parses a payload from [`encode`](Self::encode).
    pub fn decode(b: &[u8]) -> Result<Ack, WireError> {
        let b: [u8; ACK_LEN] = b.try_into().map_err(|_| WireError::BadPayload {
            kind: Kind::Ack,
            what: "not 8 bytes",
        })?;
        Ok(Ack {
            next_seq: u64::from_le_bytes(b),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn hello_and_ack_round_trip_and_refuse_garbage() {
        for h in [
            Hello {
                streams: 2,
                integrity: Integrity::AeadSha256,
            },
            Hello {
                streams: 64,
                integrity: Integrity::Aead,
            },
        ] {
            assert_eq!(Hello::decode(&h.encode()), Ok(h));
        }
        assert_eq!(
            Hello {
                streams: 2,
                integrity: Integrity::AeadSha256
            }
            .encode(),
            [2, 0, 1, 0]
        );
        for bad in [
            &[2u8, 0, 1][..],
            &[2, 0, 1, 0, 0],
            &[2, 0, 3, 0],
            &[2, 0, 0, 0],
            &[2, 0, 1, 9],
        ] {
            assert!(
                matches!(Hello::decode(bad), Err(WireError::BadPayload { kind: Kind::Hello, .. })),
                "{bad:?}"
            );
        }
        let a = Ack { next_seq: 77 };
        assert_eq!(Ack::decode(&a.encode()), Ok(a));
        assert!(Ack::decode(&[0; 7]).is_err());
        assert!(Ack::decode(&[0; 9]).is_err());
    }

    proptest! {
        /// Arbitrary bytes never panic the decoder, and whatever it accepts
        /// is within the limits and re-encodes to the same bytes.
        #[test]
        fn decode_is_total_and_bounded(bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN)) {
            let b: [u8; HEADER_LEN] = bytes.try_into().unwrap();
            if let Ok(h) = FrameHeader::decode(&b) {
                prop_assert!(h.frame_len() <= MAX_FRAME);
                prop_assert!(h.page_count <= MAX_FRAME_PAGES);
                prop_assert_eq!(h.encode(), b);
            }
        }

        /// Valid magic and version with random fields: same properties.
        #[test]
        fn decode_random_fields(kind in 0u8..12, flags in any::<u8>(), pages in any::<u32>(), mask in any::<u64>(), len in any::<u32>()) {
            let mut b = [0u8; HEADER_LEN];
            b[0..4].copy_from_slice(&MAGIC);
            b[4] = VERSION;
            b[5] = kind;
            b[6] = flags;
            b[40..48].copy_from_slice(&mask.to_le_bytes());
            b[48..52].copy_from_slice(&pages.to_le_bytes());
            b[52..56].copy_from_slice(&len.to_le_bytes());
            if let Ok(h) = FrameHeader::decode(&b) {
                prop_assert!(h.frame_len() <= MAX_FRAME);
                if h.kind == Kind::Pages {
                    prop_assert_eq!(h.payload_len as usize, pages_payload_len(h.page_count, h.zero_mask, h.flags & FLAG_DIGESTS != 0));
                }
            }
        }
    }

    fn pages_header() -> FrameHeader {
        FrameHeader {
            kind: Kind::Pages,
            flags: FLAG_DIGESTS,
            migration: MigrationId(7),
            stream: StreamId(1),
            round: 2,
            seq: Seq(99),
            first_page: 4096,
            zero_mask: 0b101,
            page_count: 4,
            payload_len: u32::try_from(pages_payload_len(4, 0b101, true)).unwrap(),
        }
    }

    #[test]
    fn roundtrip() {
        let h = pages_header();
        assert_eq!(FrameHeader::decode(&h.encode()).unwrap(), h);
        let c = FrameHeader::control(Kind::Ack, MigrationId(1), StreamId(0), 0, Seq(3), 8);
        assert_eq!(FrameHeader::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn a_mask_applied_twice_is_undone_and_touches_only_the_page_fields() {
        let h = pages_header().encode();
        let mut b = h;
        apply_mask(&mut b, &[0xff; MASK_LEN]);
        for (i, (x, y)) in h.iter().zip(&b).enumerate() {
            let masked = (20..24).contains(&i) || (32..52).contains(&i);
            assert_eq!(x != y, masked, "byte {i}");
        }
        // The clear fields still frame the stream.
        let o = Outer::decode(&b).unwrap();
        assert_eq!((o.kind, o.frame_len()), (Kind::Pages, pages_header().frame_len()));
        apply_mask(&mut b, &[0xff; MASK_LEN]);
        assert_eq!(b, h);
    }

    #[test]
    fn rejects_malformed_headers() {
        assert!(matches!(
            FrameHeader::decode(&[0; HEADER_LEN]),
            Err(WireError::BadMagic(_))
        ));
        let good = pages_header().encode();
        let mut b = good;
        b[4] = 1; // version 1: headers in the clear, not spoken any more
        assert_eq!(FrameHeader::decode(&b), Err(WireError::BadVersion(1)));
        assert_eq!(Outer::decode(&b), Err(WireError::BadVersion(1)));
        let mut b = good;
        b[5] = 0;
        assert_eq!(FrameHeader::decode(&b), Err(WireError::BadKind(0)));
        let mut b = good;
        b[6] |= 0x80;
        assert!(matches!(FrameHeader::decode(&b), Err(WireError::Reserved(_))));
        let mut b = good;
        b[48] = 65; // 65 pages
        assert!(matches!(FrameHeader::decode(&b), Err(WireError::BadLength(_))));
        let mut b = good;
        b[52..56].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(FrameHeader::decode(&b), Err(WireError::BadLength(_))));
        let mut b = good;
        b[40] = 0b1_0000; // zero bit beyond page_count
        assert!(matches!(FrameHeader::decode(&b), Err(WireError::BadLength(_))));
    }
}
