//! The per-frame hot path, with no I/O: build a sealed `Pages` frame from
//! guest memory, and open and apply one at the destination.
//!
//! Source, per frame: zero check (on guest memory, early exit) → copy the
//! non-zero pages into the worker's own buffer → SHA-256 of each copied page
//! → AES-256-GCM over the copy (header as AAD). Hashing and sealing the same
//! copy means the digest always matches what is sent, even when the guest
//! rewrites the page meanwhile (that page is dirty again and goes next round).
//!
//! Destination, per frame: AES-GCM open in the receive buffer → check each
//! page's SHA-256 → copy the pages into guest memory, zero the zero pages.
//!
//! Neither side allocates per frame: the caller's buffers have capacity
//! reserved up front.

use thiserror::Error;

use crate::crypto::{CryptoError, Sealer, StreamCrypto};
use crate::memory::{is_zero, GuestMemory, PageIndex, PAGE_SIZE};
use crate::wire::{self, FrameHeader, Kind, MigrationId, StreamId, DIGEST_LEN, FLAG_DIGESTS, HEADER_LEN, TAG_LEN};

pub use crate::wire::Integrity;

/// What one encoded frame held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encoded {
    /// Pages covered (zero and non-zero).
    pub pages: u32,
    /// Of those, all-zero pages (sent as a mask bit only).
    pub zero_pages: u32,
    /// Bytes appended to the output (the frame's size on the wire).
    pub wire_bytes: usize,
    /// The chunk's digest (see [`chunk_digest`]); `None` in `aead` mode.
    pub chunk_digest: Option<[u8; DIGEST_LEN]>,
}

/// A chunk's digest: SHA-256 over the per-page SHA-256 digests a `Pages`
/// frame carries (`aead+sha256` mode), in order. The source computes it from
/// the digests it seals, the destination from the digests it opens (and then
/// checks every page against); the manifest's root is over these.
fn digest_of_sums(sums: &[u8]) -> [u8; DIGEST_LEN] {
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, sums).as_ref());
    out
}

/// The chunk digest of an opened `Pages` frame (`plain` is its plaintext
/// payload), or `None` if the frame carries no page digests.
pub fn chunk_digest(header: &FrameHeader, plain: &[u8]) -> Option<[u8; DIGEST_LEN]> {
    if header.kind != Kind::Pages || header.flags & FLAG_DIGESTS == 0 {
        return None;
    }
    let data_pages = usize::try_from(header.page_count.checked_sub(header.zero_mask.count_ones())?).ok()?;
    plain.get(data_pages.checked_mul(PAGE_SIZE)?..).map(digest_of_sums)
}

/// The fixed part of the headers one stream sends.
#[derive(Debug, Clone, Copy)]
pub struct StreamHeader {
    /// Migration id.
    pub migration: MigrationId,
    /// Stream id.
    pub stream: StreamId,
}

/// Appends one sealed `Pages` frame for `count` pages from `first` to `out`.
/// Pages whose bit is set in `known_zero` (bit 0 = `first`) are sent as zero
/// pages without being read.
///
/// # Panics
/// If the run is not inside one memory region or `count` is 0 or above
/// [`wire::MAX_FRAME_PAGES`] (the chunker guarantees both).
#[allow(clippy::too_many_arguments)]
pub fn encode_pages(
    mem: &GuestMemory,
    first: PageIndex,
    count: u32,
    hdr: StreamHeader,
    round: u32,
    integrity: Integrity,
    known_zero: u64,
    sealer: &mut Sealer,
    out: &mut Vec<u8>,
) -> Encoded {
    let seq = sealer.next_seq();
    assert!(
        (1..=wire::MAX_FRAME_PAGES).contains(&count),
        "bad chunk of {count} pages"
    );
    let src = mem
        .run_ptr(first, u64::from(count))
        .expect("chunk must lie inside one region");
    let digests = integrity.digests();
    let most = HEADER_LEN + wire::pages_payload_len(count, 0, digests);
    out.reserve(most);
    let start = out.len();
    let body = start + HEADER_LEN;
    // Copy each page once into the buffer and check the *copy* for zeros (one
    // pass over guest memory, and the check and the bytes sent agree). A zero
    // page is overwritten by the next one: it costs a mask bit only.
    let mut zero_mask = 0u64;
    let mut at = 0usize;
    // Digests of the non-zero pages, appended after them.
    let mut sums = [[0u8; DIGEST_LEN]; wire::MAX_FRAME_PAGES as usize];
    // ring hashes each copy while it is hot in L1; a multi-buffer backend
    // hashes the frame's copies in one call after the loop (still in L2).
    let batched = digests && crate::sha::backend() == crate::sha::Sha256Backend::Tape;
    {
        let dst = &mut out.spare_capacity_mut()[HEADER_LEN..];
        for i in 0..count as usize {
            if known_zero & (1 << i) != 0 {
                zero_mask |= 1 << i;
                continue;
            }
            if i + 1 < count as usize {
                // SAFETY: page i + 1 is inside the run (run_ptr checked it).
                prefetch_page(unsafe { src.add((i + 1) * PAGE_SIZE) });
            }
            let d = dst[at..at + PAGE_SIZE].as_mut_ptr().cast::<u8>();
            // SAFETY: source: one mapped page inside the run (run_ptr);
            // destination: `reserve(most)` left room for the header plus
            // `count` pages, and `at + PAGE_SIZE <= count * PAGE_SIZE`.
            // Distinct allocations, so no overlap.
            unsafe { std::ptr::copy_nonoverlapping(src.add(i * PAGE_SIZE), d, PAGE_SIZE) };
            // SAFETY: the PAGE_SIZE bytes at `d` were just initialised and
            // nothing else refers to them while this slice lives.
            let bytes = unsafe { std::slice::from_raw_parts(d, PAGE_SIZE) };
            if is_zero(bytes) {
                zero_mask |= 1 << i;
            } else {
                if digests && !batched {
                    // Hash the copy while it is hot in L1.
                    let h = ring::digest::digest(&ring::digest::SHA256, bytes);
                    sums[at / PAGE_SIZE].copy_from_slice(h.as_ref());
                }
                at += PAGE_SIZE;
            }
        }
        if batched {
            // SAFETY: the first `at` bytes of `dst` were initialised by the
            // copies above; nothing else refers to them while this lives.
            let copies = unsafe { std::slice::from_raw_parts(dst.as_ptr().cast::<u8>(), at) };
            crate::sha::hash_pages(copies, &mut sums[..at / PAGE_SIZE]);
        }
    }
    let data_pages = at / PAGE_SIZE;
    let payload_len = wire::pages_payload_len(count, zero_mask, digests);
    let header = FrameHeader {
        kind: Kind::Pages,
        flags: if digests { FLAG_DIGESTS } else { 0 },
        migration: hdr.migration,
        stream: hdr.stream,
        round,
        seq,
        first_page: first.0,
        zero_mask,
        page_count: count,
        payload_len: u32::try_from(payload_len).expect("payload of <= 64 pages fits u32"),
    };
    out.extend_from_slice(&header.encode());
    // SAFETY: the `at` bytes after the header were initialised by the copies.
    unsafe { out.set_len(body + at) };
    let mut chunk = None;
    if digests {
        let sums_at = out.len();
        for sum in &sums[..data_pages] {
            out.extend_from_slice(sum);
        }
        chunk = Some(digest_of_sums(&out[sums_at..]));
    }
    let (head, payload) = out.split_at_mut(body);
    let head: &mut [u8; HEADER_LEN] = (&mut head[start..]).try_into().expect("one header");
    let (sealed, tag) = sealer.seal_next(head, payload);
    debug_assert_eq!(sealed, seq);
    out.extend_from_slice(&tag);
    debug_assert_eq!(out.len() - start, HEADER_LEN + payload_len);
    Encoded {
        pages: count,
        zero_pages: zero_mask.count_ones(),
        wire_bytes: out.len() - start,
        chunk_digest: chunk,
    }
}

/// Asks the CPU to start loading a page into cache: the hardware prefetcher
/// does not cross 4 KiB boundaries, so without this each page's copy starts
/// with a full memory-latency stall.
#[inline]
fn prefetch_page(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..PAGE_SIZE).step_by(64) {
        // SAFETY: prefetch is a hint: it never faults and has no effect on
        // program state, whatever the address.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(line).cast()) };
    }
}

/// Appends one sealed control frame (`kind`, plaintext `payload`) to `out`.
#[allow(clippy::too_many_arguments)]
pub fn encode_control(
    kind: Kind,
    flags: u8,
    hdr: StreamHeader,
    round: u32,
    payload: &[u8],
    sealer: &mut Sealer,
    out: &mut Vec<u8>,
) -> usize {
    assert!(payload.len() <= wire::MAX_DEVICE_STATE, "control payload too large");
    let seq = sealer.next_seq();
    let mut header = FrameHeader::control(kind, hdr.migration, hdr.stream, round, seq, payload.len());
    header.flags = flags;
    let start = out.len();
    out.extend_from_slice(&header.encode());
    let body = out.len();
    out.extend_from_slice(payload);
    let (head, p) = out.split_at_mut(body);
    let head: &mut [u8; HEADER_LEN] = (&mut head[start..]).try_into().expect("one header");
    let (sealed, tag) = sealer.seal_next(head, p);
    debug_assert_eq!(sealed, seq);
    out.extend_from_slice(&tag);
    out.len() - start
}

/// Why an incoming frame was rejected after its header decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    /// AEAD tag did not verify.
    #[error("AES-GCM tag mismatch")]
    Tag(#[from] CryptoError),
    /// A page's SHA-256 did not match (with a valid tag).
    #[error("SHA-256 mismatch for page {0}")]
    Digest(u64),
    /// Pages outside guest memory or across a region boundary.
    #[error("pages {first}..+{count} are outside guest memory")]
    OutOfRange {
        /// First page.
        first: u64,
        /// Page count.
        count: u32,
    },
    /// The frame's integrity mode differs from the negotiated one.
    #[error("frame integrity mode differs from the negotiated {0}")]
    IntegrityMode(&'static str),
}

/// Unmasks the header of a whole received `frame` (header, payload, tag) in
/// place with the mask of its tag (header protection: see [`crate::wire`])
/// and decodes it; then [`open_frame`] authenticates it.
pub fn unprotect(frame: &mut [u8], crypto: &StreamCrypto) -> Result<FrameHeader, wire::WireError> {
    if frame.len() < HEADER_LEN + TAG_LEN {
        return Err(wire::WireError::BadLength(format!("frame of {} bytes", frame.len())));
    }
    let (head, rest) = frame.split_at_mut(HEADER_LEN);
    let head: &mut [u8; HEADER_LEN] = head.try_into().expect("split at HEADER_LEN");
    let tag: &[u8; TAG_LEN] = rest[rest.len() - TAG_LEN..].try_into().expect("TAG_LEN bytes");
    crypto.unmask(head, tag);
    FrameHeader::decode(head)
}

/// Opens a frame in place: `frame` is the whole frame (header, unmasked by
/// [`unprotect`], + payload + tag). Returns the plaintext payload.
pub fn open_frame<'a>(
    header: &FrameHeader,
    frame: &'a mut [u8],
    crypto: &mut StreamCrypto,
) -> Result<&'a mut [u8], FrameError> {
    debug_assert_eq!(frame.len(), header.frame_len());
    let (head, payload) = frame.split_at_mut(HEADER_LEN);
    Ok(crypto.open(header.seq.0, head, payload)?)
}

/// Applies an opened `Pages` frame to guest memory: checks every page's
/// digest first, then writes. Zero pages are zeroed unless `fresh` says the
/// destination has never held them (its memory starts zeroed).
pub fn apply_pages(
    header: &FrameHeader,
    plain: &[u8],
    integrity: Integrity,
    mem: &GuestMemory,
    fresh: bool,
) -> Result<(), FrameError> {
    let count = header.page_count;
    let digests = header.flags & FLAG_DIGESTS != 0;
    if digests != integrity.digests() {
        return Err(FrameError::IntegrityMode(integrity.as_str()));
    }
    let first = header.first_page;
    if mem.run_ptr(PageIndex(first), u64::from(count)).is_none() {
        return Err(FrameError::OutOfRange { first, count });
    }
    let data_pages = (count - header.zero_mask.count_ones()) as usize;
    let (pages, sums) = plain.split_at(data_pages * PAGE_SIZE);
    if digests {
        // The wire decoder checked the length; still, a short digest list
        // must never leave a page unchecked.
        if sums.len() != data_pages * DIGEST_LEN {
            return Err(FrameError::Digest(first));
        }
        let mut got = [[0u8; DIGEST_LEN]; wire::MAX_FRAME_PAGES as usize];
        crate::sha::hash_pages(pages, &mut got[..data_pages]);
        for (j, (d, sum)) in got[..data_pages].iter().zip(sums.chunks_exact(DIGEST_LEN)).enumerate() {
            // Not secret: the digest only detects corruption, so a
            // non-constant-time compare leaks nothing.
            if d[..] != *sum {
                return Err(FrameError::Digest(first + nth_data_page(header.zero_mask, j)));
            }
        }
    }
    // Write runs of consecutive non-zero pages with one copy each.
    let mut j = 0usize;
    let mut i = 0u32;
    while i < count {
        let zero = header.zero_mask & (1 << i) != 0;
        let mut n = 1u32;
        while i + n < count && (header.zero_mask & (1 << (i + n)) != 0) == zero {
            n += 1;
        }
        let page = PageIndex(first + u64::from(i));
        if zero {
            if !fresh {
                mem.zero_pages(page, u64::from(n));
            }
        } else {
            let bytes = n as usize * PAGE_SIZE;
            mem.write_pages(page, &pages[j..j + bytes]);
            j += bytes;
        }
        i += n;
    }
    Ok(())
}

/// Offset within the frame of the `j`-th non-zero page.
fn nth_data_page(zero_mask: u64, j: usize) -> u64 {
    (0..64u64).filter(|i| zero_mask & (1 << i) == 0).nth(j).unwrap_or(0)
}

/// Size of the plaintext tag overhead, re-exported for accounting.
pub const FRAME_OVERHEAD: usize = HEADER_LEN + TAG_LEN;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{AeadBackend, Direction, SessionKeys};
    use crate::memory::PAGE_SIZE_U64;

    fn setup() -> (GuestMemory, SessionKeys) {
        let mem = GuestMemory::new(128 * PAGE_SIZE_U64).unwrap();
        for p in 0..128u64 {
            if p % 3 != 0 {
                let fill = [u8::try_from(p % 251).unwrap() + 1; PAGE_SIZE];
                mem.write_pages(PageIndex(p), &fill);
            }
        }
        (mem, SessionKeys::test_only_unauthenticated(MigrationId(5)).unwrap())
    }

    fn roundtrip(integrity: Integrity) {
        let (src, keys) = setup();
        let dst = GuestMemory::new(src.size_bytes()).unwrap();
        let hdr = StreamHeader {
            migration: MigrationId(5),
            stream: StreamId(0),
        };
        let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut rx = StreamCrypto::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut out = Vec::new();
        let mut sent_chunks = Vec::new();
        for first in (0..128u64).step_by(64) {
            let e = encode_pages(&src, PageIndex(first), 64, hdr, 1, integrity, 0, &mut tx, &mut out);
            assert_eq!(
                u64::from(e.zero_pages),
                (first..first + 64).filter(|p| p % 3 == 0).count() as u64
            );
            // The chunk digest, computed independently: SHA-256 over the
            // SHA-256 of each non-zero page, in order.
            let expected = (integrity == Integrity::AeadSha256).then(|| {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                for p in (first..first + 64).filter(|p| p % 3 != 0) {
                    let mut page = [0u8; PAGE_SIZE];
                    src.read_into(p * PAGE_SIZE_U64, &mut page);
                    ctx.update(ring::digest::digest(&ring::digest::SHA256, &page).as_ref());
                }
                <[u8; DIGEST_LEN]>::try_from(ctx.finish().as_ref()).unwrap()
            });
            assert_eq!(e.chunk_digest, expected);
            sent_chunks.push(e.chunk_digest);
        }
        let mut at = 0;
        let mut received_chunks = Vec::new();
        while at < out.len() {
            let len = wire::Outer::decode(out[at..at + HEADER_LEN].try_into().unwrap())
                .unwrap()
                .frame_len();
            let travelled: [u8; HEADER_LEN] = out[at..at + HEADER_LEN].try_into().unwrap();
            let h = unprotect(&mut out[at..at + len], &rx).unwrap();
            // The page fields travelled masked, the rest in the clear.
            assert_ne!(
                travelled[32..52],
                h.encode()[32..52],
                "first page, zero mask, count masked"
            );
            assert_ne!(travelled[20..24], h.encode()[20..24], "round masked");
            assert_eq!(travelled[..20], h.encode()[..20]);
            assert_eq!(travelled[24..32], h.encode()[24..32]);
            let plain = open_frame(&h, &mut out[at..at + len], &mut rx).unwrap();
            received_chunks.push(chunk_digest(&h, plain));
            apply_pages(&h, plain, integrity, &dst, false).unwrap();
            at += len;
        }
        assert_eq!(sent_chunks, received_chunks);
        assert_eq!(src.digest(), dst.digest());
    }

    #[test]
    fn a_changed_masked_header_byte_fails_the_tag() {
        let (src, keys) = setup();
        let hdr = StreamHeader {
            migration: MigrationId(5),
            stream: StreamId(0),
        };
        let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut rx = StreamCrypto::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut out = Vec::new();
        encode_pages(&src, PageIndex(0), 4, hdr, 3, Integrity::Aead, 0, &mut tx, &mut out);
        // The round, masked: still a well-formed header once unmasked, but
        // not the one the tag authenticates.
        out[21] ^= 1;
        let h = unprotect(&mut out, &rx).unwrap();
        assert_ne!(h.round, 3);
        assert!(matches!(open_frame(&h, &mut out, &mut rx), Err(FrameError::Tag(_))));
    }

    #[test]
    fn encode_apply_roundtrip_with_digests() {
        roundtrip(Integrity::AeadSha256);
    }

    #[test]
    fn encode_apply_roundtrip_aead_only() {
        roundtrip(Integrity::Aead);
    }

    #[test]
    fn zero_pages_cost_only_header_and_tag() {
        let mem = GuestMemory::new(64 * PAGE_SIZE_U64).unwrap();
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(1)).unwrap();
        let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let hdr = StreamHeader {
            migration: MigrationId(1),
            stream: StreamId(0),
        };
        let mut out = Vec::new();
        let e = encode_pages(
            &mem,
            PageIndex(0),
            64,
            hdr,
            1,
            Integrity::AeadSha256,
            0,
            &mut tx,
            &mut out,
        );
        assert_eq!(e.zero_pages, 64);
        assert_eq!(e.wire_bytes, FRAME_OVERHEAD);
    }

    #[test]
    fn a_wrong_digest_under_a_valid_tag_is_caught() {
        // A sender bug (or a compromised key) that seals a wrong digest:
        // the tag verifies, the SHA-256 check does not.
        let (src, keys) = setup();
        let dst = GuestMemory::new(src.size_bytes()).unwrap();
        let hdr = StreamHeader {
            migration: MigrationId(5),
            stream: StreamId(0),
        };
        let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut rx = StreamCrypto::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut plain = Vec::new();
        let mut scratch = Sealer::new(&keys, Direction::ToDestination, StreamId(9), AeadBackend::Ring);
        encode_pages(
            &src,
            PageIndex(1),
            2,
            hdr,
            1,
            Integrity::AeadSha256,
            0,
            &mut scratch,
            &mut plain,
        );
        // Rebuild the frame by hand: header, page bytes, a corrupted digest.
        let rx9 = StreamCrypto::new(&keys, Direction::ToDestination, StreamId(9), AeadBackend::Ring);
        let h = unprotect(&mut plain, &rx9).unwrap();
        let mut body = Vec::new();
        for p in [1u64, 2] {
            let mut page = [0u8; PAGE_SIZE];
            src.read_page(PageIndex(p), &mut page);
            body.extend_from_slice(&page);
        }
        for p in [1u64, 2] {
            let mut page = [0u8; PAGE_SIZE];
            src.read_page(PageIndex(p), &mut page);
            let mut d = ring::digest::digest(&ring::digest::SHA256, &page).as_ref().to_vec();
            if p == 2 {
                d[0] ^= 1;
            }
            body.extend_from_slice(&d);
        }
        let mut head = h.encode();
        let (_, tag) = tx.seal_next(&mut head, &mut body);
        let mut frame = head.to_vec();
        frame.extend_from_slice(&body);
        frame.extend_from_slice(&tag);
        let h = unprotect(&mut frame, &rx).unwrap();
        let p = open_frame(&h, &mut frame, &mut rx).unwrap();
        assert_eq!(
            apply_pages(&h, p, Integrity::AeadSha256, &dst, false),
            Err(FrameError::Digest(2))
        );
        assert_eq!(
            dst.digest(),
            GuestMemory::new(src.size_bytes()).unwrap().digest(),
            "nothing written"
        );
    }

    #[test]
    fn integrity_downgrade_is_refused() {
        let (src, keys) = setup();
        let dst = GuestMemory::new(src.size_bytes()).unwrap();
        let hdr = StreamHeader {
            migration: MigrationId(5),
            stream: StreamId(0),
        };
        let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut rx = StreamCrypto::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut out = Vec::new();
        encode_pages(&src, PageIndex(0), 4, hdr, 1, Integrity::Aead, 0, &mut tx, &mut out);
        let h = unprotect(&mut out, &rx).unwrap();
        let p = open_frame(&h, &mut out, &mut rx).unwrap();
        assert!(matches!(
            apply_pages(&h, p, Integrity::AeadSha256, &dst, false),
            Err(FrameError::IntegrityMode(_))
        ));
    }
}
