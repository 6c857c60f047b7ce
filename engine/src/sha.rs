//! SHA-256 of a frame's pages, one call per frame: ring's SHA-256 page by
//! page, or the `tape-sha256` crate's multi-buffer SHA-256, which hashes
//! several independent pages at once in SIMD lanes (AVX-512, AVX2) or
//! interleaved SHA-NI streams.
//!
//! ring stays the reference and the fallback. The backend is chosen once
//! per process ([`select`]): `auto` picks `tape` where the CPU has one of its
//! fast paths *and* it agrees with ring on a known-answer check run at that
//! moment, else ring; `ring` and `tape` force one. Both sides of a migration
//! may use different backends: digests are SHA-256 either way.
//!
//! Measured on an Intel Xeon with AVX-512 and SHA-NI (PERF.md): `tape` over
//! a frame of 32 random pages ran at ~1.87x ring's rate; under 4 pages at a
//! time it is no faster, so shorter batches go to ring.

use std::sync::atomic::{AtomicU8, Ordering};

use thiserror::Error;

use crate::memory::PAGE_SIZE;
use crate::wire::DIGEST_LEN;

/// Pages below which a batch goes to ring even with `tape` selected (its
/// lanes do not fill: measured no faster).
pub const MIN_BATCH_PAGES: usize = 4;

/// A SHA-256 implementation for page digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sha256Backend {
    /// ring's SHA-256, one page at a time (the reference).
    Ring,
    /// tape-sha256's multi-buffer SHA-256 over a frame's pages.
    Tape,
}

impl Sha256Backend {
    /// The name used in flags, reports and records.
    pub fn as_str(self) -> &'static str {
        match self {
            Sha256Backend::Ring => "ring",
            Sha256Backend::Tape => "tape",
        }
    }
}

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sha256Choice {
    /// The fastest backend this CPU runs correctly.
    #[default]
    Auto,
    /// Force a backend.
    Force(Sha256Backend),
}

/// A `--sha256` value that is none of `auto`, `ring`, `tape`.
#[derive(Debug, Error)]
#[error("unknown SHA-256 backend {0:?}: use auto, ring or tape")]
pub struct UnknownSha256(pub String);

impl std::str::FromStr for Sha256Choice {
    type Err = UnknownSha256;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Sha256Choice::Auto),
            "ring" => Ok(Sha256Choice::Force(Sha256Backend::Ring)),
            "tape" => Ok(Sha256Choice::Force(Sha256Backend::Tape)),
            other => Err(UnknownSha256(other.to_string())),
        }
    }
}

const UNSET: u8 = 0;
const RING: u8 = 1;
const TAPE: u8 = 2;
static SELECTED: AtomicU8 = AtomicU8::new(UNSET);

/// Sets the process's backend from `choice` and returns it. `Auto` (also
/// what an unset process gets on first use) runs the known-answer check
/// the first time.
pub fn select(choice: Sha256Choice) -> Sha256Backend {
    let b = match choice {
        Sha256Choice::Force(b) => b,
        Sha256Choice::Auto => auto(),
    };
    SELECTED.store(if b == Sha256Backend::Tape { TAPE } else { RING }, Ordering::Relaxed);
    b
}

/// What a migration's [`MigrationConfig::sha256`](crate::migrate::MigrationConfig)
/// does to the process's backend: a forced choice selects it; `Auto` keeps
/// the process's selection (a daemon's `--sha256`), or picks on first use.
pub fn apply(choice: Sha256Choice) {
    if let Sha256Choice::Force(_) = choice {
        select(choice);
    }
}

/// The process's backend (selecting `auto` on first use).
pub fn backend() -> Sha256Backend {
    match SELECTED.load(Ordering::Relaxed) {
        RING => Sha256Backend::Ring,
        TAPE => Sha256Backend::Tape,
        _ => select(Sha256Choice::Auto),
    }
}

/// Whether this CPU has one of tape-sha256's fast paths.
fn cpu_has_fast_path() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sha")
            || std::arch::is_x86_feature_detected!("avx2")
            || std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `auto`'s pick, decided once per process.
fn auto() -> Sha256Backend {
    static PICKED: std::sync::OnceLock<Sha256Backend> = std::sync::OnceLock::new();
    *PICKED.get_or_init(pick)
}

fn pick() -> Sha256Backend {
    if !cpu_has_fast_path() {
        return Sha256Backend::Ring;
    }
    if known_answers_agree() {
        Sha256Backend::Tape
    } else {
        tracing::warn!("tape-sha256 disagrees with ring on this CPU; page digests use ring");
        Sha256Backend::Ring
    }
}

/// tape against ring over every batch size up to a frame, pseudo-random
/// and all-zero pages.
fn known_answers_agree() -> bool {
    let pages = crate::wire::MAX_FRAME_PAGES as usize;
    let mut buf = vec![0u8; pages * PAGE_SIZE];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, b) in buf.iter_mut().enumerate() {
        if (i / PAGE_SIZE) % 5 == 3 {
            continue; // some all-zero pages
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x.to_le_bytes()[0];
    }
    let mut want = vec![[0u8; DIGEST_LEN]; pages];
    hash_with(Sha256Backend::Ring, &buf, &mut want);
    let mut got = vec![[0u8; DIGEST_LEN]; pages];
    [1, MIN_BATCH_PAGES, 7, 32, pages].iter().all(|&n| {
        tape(&buf[..n * PAGE_SIZE], &mut got[..n]);
        got[..n] == want[..n]
    })
}

/// SHA-256 of each 4 KiB page of `pages` into `out` (one digest per page),
/// with the process's backend.
///
/// # Panics
/// If `pages` is not `out.len()` whole pages (a caller bug).
#[inline]
pub fn hash_pages(pages: &[u8], out: &mut [[u8; DIGEST_LEN]]) {
    hash_with(backend(), pages, out);
}

/// [`hash_pages`] with a given backend (for tests and benchmarks).
pub fn hash_with(b: Sha256Backend, pages: &[u8], out: &mut [[u8; DIGEST_LEN]]) {
    assert_eq!(pages.len(), out.len() * PAGE_SIZE, "whole pages, one digest each");
    if b == Sha256Backend::Tape && out.len() >= MIN_BATCH_PAGES {
        tape(pages, out);
    } else {
        for (page, d) in pages.chunks_exact(PAGE_SIZE).zip(out.iter_mut()) {
            d.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, page).as_ref());
        }
    }
}

fn tape(pages: &[u8], out: &mut [[u8; DIGEST_LEN]]) {
    let mut msgs: [&[u8]; crate::wire::MAX_FRAME_PAGES as usize] = [&[]; crate::wire::MAX_FRAME_PAGES as usize];
    for chunk in out.chunks_mut(msgs.len()).zip(pages.chunks(msgs.len() * PAGE_SIZE)) {
        let (digests, bytes) = chunk;
        for (m, page) in msgs.iter_mut().zip(bytes.chunks_exact(PAGE_SIZE)) {
            *m = page;
        }
        tape_sha256::hash_many(&msgs[..digests.len()], digests);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ring_each(pages: &[u8]) -> Vec<[u8; DIGEST_LEN]> {
        pages
            .chunks_exact(PAGE_SIZE)
            .map(|p| {
                let mut d = [0u8; DIGEST_LEN];
                d.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, p).as_ref());
                d
            })
            .collect()
    }

    #[test]
    fn tape_matches_ring_at_every_batch_size_up_to_a_frame() {
        let max = crate::wire::MAX_FRAME_PAGES as usize;
        let mut buf = vec![0u8; (max + 3) * PAGE_SIZE];
        let rng = ring::rand::SystemRandom::new();
        ring::rand::SecureRandom::fill(&rng, &mut buf[PAGE_SIZE..]).unwrap();
        // Page 0 all zeros; page 5 all ones.
        buf[5 * PAGE_SIZE..6 * PAGE_SIZE].fill(0xff);
        let want = ring_each(&buf);
        for n in 1..=max + 3 {
            let mut got = vec![[0u8; DIGEST_LEN]; n];
            tape(&buf[..n * PAGE_SIZE], &mut got);
            assert_eq!(got, want[..n], "tape over {n} pages");
            let mut via = vec![[0u8; DIGEST_LEN]; n];
            hash_with(Sha256Backend::Tape, &buf[..n * PAGE_SIZE], &mut via);
            assert_eq!(via, want[..n]);
        }
        assert!(known_answers_agree());
    }

    #[test]
    fn choices_parse_and_force() {
        assert_eq!(
            "ring".parse::<Sha256Choice>().unwrap(),
            Sha256Choice::Force(Sha256Backend::Ring)
        );
        assert_eq!("auto".parse::<Sha256Choice>().unwrap(), Sha256Choice::Auto);
        assert!("sha3"
            .parse::<Sha256Choice>()
            .unwrap_err()
            .to_string()
            .contains("auto, ring or tape"));
    }

    proptest! {
        // ring is the oracle: any pages, any count.
        #[test]
        fn tape_agrees_with_ring(seed in any::<u64>(), n in 1usize..80, zero_every in 1usize..9) {
            let mut buf = vec![0u8; n * PAGE_SIZE];
            let mut x = seed | 1;
            for (i, b) in buf.iter_mut().enumerate() {
                if (i / PAGE_SIZE).is_multiple_of(zero_every) { continue; }
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                *b = x.to_le_bytes()[3];
            }
            let mut got = vec![[0u8; DIGEST_LEN]; n];
            hash_with(Sha256Backend::Tape, &buf, &mut got);
            prop_assert_eq!(got, ring_each(&buf));
        }
    }
}
