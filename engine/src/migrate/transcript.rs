//! The running digest each side keeps of a stream, compared in the signed
//! manifest.

use crate::wire::{self, Kind};

/// A running SHA-256 over (sequence, kind, AEAD tag) of every frame a
/// stream carries from source to destination (Commit excepted), and, in
/// `aead+sha256` mode, over each `Pages` frame's chunk digest (the SHA-256 of
/// its per-page SHA-256 digests): both sides compute it independently, and
/// the signed manifest compares them.
#[derive(Clone)]
pub(super) struct Transcript(ring::digest::Context);

impl Transcript {
    pub(super) fn new() -> Transcript {
        Transcript(ring::digest::Context::new(&ring::digest::SHA256))
    }
    pub(super) fn add(&mut self, kind: Kind, seq: u64, tag: &[u8]) {
        self.0.update(&seq.to_le_bytes());
        self.0.update(&[kind as u8]);
        self.0.update(tag);
    }
    pub(super) fn add_chunk(&mut self, digest: &[u8; wire::DIGEST_LEN]) {
        self.0.update(digest);
    }
    pub(super) fn root(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.clone().finish().as_ref());
        out
    }
}

/// SHA-256 over the stream transcripts in stream order.
pub(super) fn transcript_root(streams: &[Option<[u8; 32]>]) -> Option<[u8; 32]> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for s in streams {
        ctx.update(s.as_ref()?);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Some(out)
}
