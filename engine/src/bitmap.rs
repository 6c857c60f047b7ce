//! Page bitmaps: the plain bitmap a round works from, the atomic bitmap an
//! embedding VMM marks, and the chunker that turns a bitmap into bounded,
//! stream-striped page runs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Pages per stripe. Every page of a stripe always travels on the same
/// stream, so TCP's ordering guarantees a newer copy of a page is applied
/// after an older one, with no per-page bookkeeping at the destination.
pub const STRIPE_PAGES: u64 = 512;

/// The stream that carries `page` when there are `streams` streams.
#[inline]
pub fn stream_of(page: u64, streams: u16) -> u16 {
    // Truncation is impossible: the result is < streams <= u16::MAX.
    #[allow(clippy::cast_possible_truncation)]
    let s = ((page / STRIPE_PAGES) % u64::from(streams)) as u16;
    s
}

/// A fixed-size bitmap, one bit a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    bits: u64,
}

impl DirtyBitmap {
    /// An all-clear bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        DirtyBitmap {
            words: vec![0; crate::usize_from(bits.div_ceil(64))],
            bits,
        }
    }

    /// An all-set bitmap of `bits` bits.
    pub fn full(bits: u64) -> Self {
        let mut b = Self::new(bits);
        b.set_range(0, bits);
        b
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Sets bit `i`. Panics if `i` is out of range (a caller bug).
    #[inline]
    pub fn set(&mut self, i: u64) {
        assert!(i < self.bits, "bit {i} out of range {}", self.bits);
        self.words[crate::usize_from(i / 64)] |= 1 << (i % 64);
    }

    /// Sets bits `[start, start + len)`.
    pub fn set_range(&mut self, start: u64, len: u64) {
        assert!(start + len <= self.bits, "range out of bounds");
        let mut i = start;
        let end = start + len;
        while i < end {
            if i.is_multiple_of(64) && end - i >= 64 {
                self.words[crate::usize_from(i / 64)] = u64::MAX;
                i += 64;
            } else {
                self.set(i);
                i += 1;
            }
        }
    }

    /// Reads bit `i`.
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        i < self.bits && self.words[crate::usize_from(i / 64)] & (1 << (i % 64)) != 0
    }

    /// Bits `[first, first + count)` as a word (bit 0 = `first`); `count <= 64`.
    pub fn bits(&self, first: u64, count: u64) -> u64 {
        assert!(count <= 64 && first + count <= self.bits, "bit range out of bounds");
        if count == 0 {
            return 0;
        }
        let w = crate::usize_from(first / 64);
        let shift = first % 64;
        let mut v = self.words[w] >> shift;
        if shift != 0 && shift + count > 64 {
            v |= self.words[w + 1] << (64 - shift);
        }
        if count < 64 {
            v &= (1 << count) - 1;
        }
        v
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// ORs `other` into `self`. Both must have the same length.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        assert_eq!(self.bits, other.bits, "bitmap sizes differ");
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// ORs the first `count` bits of `words` (bit `j` is bit `j % 64` of
    /// `words[j / 64]`) into this bitmap's bits `first..first + count`: a
    /// region's own bitmap merged at the region's first page.
    ///
    /// # Panics
    /// If `first + count` is past the end or `words` holds fewer than
    /// `count` bits (a caller bug).
    pub fn or_bits_at(&mut self, first: u64, words: &[u64], count: u64) {
        assert!(first + count <= self.bits, "bits past the end of the bitmap");
        assert!(count <= words.len() as u64 * 64, "fewer source bits than asked for");
        let (base, shift) = (crate::usize_from(first / 64), first % 64);
        for (j, &w) in words.iter().enumerate() {
            let done = j as u64 * 64;
            if done >= count {
                break;
            }
            let left = count - done;
            let w = if left < 64 { w & ((1u64 << left) - 1) } else { w };
            if w == 0 {
                continue;
            }
            self.words[base + j] |= w << shift;
            if shift != 0 && w >> (64 - shift) != 0 {
                self.words[base + j + 1] |= w >> (64 - shift);
            }
        }
    }

    /// The raw words (bit `i` is bit `i % 64` of word `i / 64`).
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// The first set bit at or after `from`, below `end`.
    fn next_set(&self, from: u64, end: u64) -> Option<u64> {
        let mut i = from;
        while i < end {
            let w = self.words[crate::usize_from(i / 64)] >> (i % 64);
            if w != 0 {
                let found = i + u64::from(w.trailing_zeros());
                return (found < end).then_some(found);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// The first clear bit at or after `from`, or `end`.
    fn next_clear(&self, from: u64, end: u64) -> u64 {
        let mut i = from;
        while i < end {
            let w = !self.words[crate::usize_from(i / 64)] >> (i % 64);
            if w != 0 {
                return (i + u64::from(w.trailing_zeros())).min(end);
            }
            i = (i / 64 + 1) * 64;
        }
        end
    }

    /// Calls `f(first, count)` for each maximal run of set bits in
    /// `[start, end)`, in order.
    pub fn for_each_run(&self, start: u64, end: u64, mut f: impl FnMut(u64, u64)) {
        let end = end.min(self.bits);
        let mut i = start;
        while let Some(s) = self.next_set(i, end) {
            let e = self.next_clear(s, end);
            f(s, e - s);
            i = e;
        }
    }
}

/// Calls `f(first, count)` for every chunk of dirty pages that stream
/// `stream` (of `streams`) carries: runs of set bits split so that no chunk
/// has more than `max_pages` pages, crosses a stripe, or crosses one of the
/// `boundaries` (region starts, in page indices). Stops at the first error.
pub fn for_each_chunk<E>(
    bitmap: &DirtyBitmap,
    stream: u16,
    streams: u16,
    max_pages: u64,
    boundaries: &[u64],
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    assert!(max_pages > 0 && streams > 0 && stream < streams);
    let total = bitmap.len();
    let mut stripe_start = u64::from(stream) * STRIPE_PAGES;
    let step = u64::from(streams) * STRIPE_PAGES;
    while stripe_start < total {
        let stripe_end = (stripe_start + STRIPE_PAGES).min(total);
        let mut i = stripe_start;
        while let Some(first) = bitmap.next_set(i, stripe_end) {
            let end = bitmap.next_clear(first, stripe_end);
            let mut s = first;
            while s < end {
                // The next region boundary after `s`, if inside this run.
                let cut = boundaries.iter().copied().find(|&b| b > s && b < end).unwrap_or(end);
                let n = (cut - s).min(max_pages);
                f(s, n)?;
                s += n;
            }
            i = end;
        }
        stripe_start += step;
    }
    Ok(())
}

/// A bitmap that many threads mark concurrently and one thread drains
/// (get-and-reset): the dirty log an embedding VMM keeps itself.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    /// An all-clear bitmap of `bits` bits.
    pub fn new(bits: u64) -> Self {
        AtomicBitmap {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap has no bits at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Marks page `i` dirty. Out-of-range marks are ignored (and asserted in debug).
    #[inline]
    pub fn mark(&self, i: u64) {
        debug_assert!(i < self.bits);
        if let Some(w) = self.words.get(crate::usize_from(i / 64)) {
            w.fetch_or(1 << (i % 64), Ordering::Release);
        }
    }

    /// ORs every marked bit into `out` and clears it here, word by word
    /// (a mark racing with the drain lands in this drain or the next one,
    /// never in neither).
    pub fn drain_into(&self, out: &mut DirtyBitmap) {
        assert_eq!(self.bits, out.len(), "bitmap sizes differ");
        for (a, o) in self.words.iter().zip(out.words_mut()) {
            if a.load(Ordering::Relaxed) != 0 {
                *o |= a.swap(0, Ordering::Acquire);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn oracle_runs(set: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &i in set {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == i => *n += 1,
                _ => runs.push((i, 1)),
            }
        }
        runs
    }

    proptest! {
        #[test]
        fn runs_match_oracle(bits in 1u64..3000, idx in proptest::collection::vec(0u64..3000, 0..400)) {
            let set: BTreeSet<u64> = idx.into_iter().filter(|i| *i < bits).collect();
            let mut b = DirtyBitmap::new(bits);
            for &i in &set { b.set(i); }
            prop_assert_eq!(b.count(), set.len() as u64);
            let mut runs = Vec::new();
            b.for_each_run(0, bits, |s, n| runs.push((s, n)));
            prop_assert_eq!(runs, oracle_runs(&set));
        }

        #[test]
        fn or_bits_at_matches_bit_by_bit(
            bits in 1u64..700,
            first in 0u64..700,
            src in proptest::collection::vec(any::<u64>(), 0..8),
            count in 0u64..520,
        ) {
            let count = count.min(src.len() as u64 * 64).min(bits.saturating_sub(first));
            let first = first.min(bits - count);
            let mut got = DirtyBitmap::new(bits);
            got.set(0);
            let mut want = got.clone();
            got.or_bits_at(first, &src, count);
            for j in 0..count {
                if src[crate::usize_from(j / 64)] >> (j % 64) & 1 == 1 { want.set(first + j); }
            }
            prop_assert_eq!(got.count(), want.count());
            for i in 0..bits { prop_assert_eq!(got.get(i), want.get(i), "bit {}", i); }
        }

        #[test]
        fn chunks_cover_exactly_and_respect_limits(
            bits in 1u64..5000,
            ranges in proptest::collection::vec((0u64..5000, 1u64..300), 0..30),
            streams in 1u16..4,
            max_pages in 1u64..70,
            boundary in 0u64..5000,
        ) {
            let mut b = DirtyBitmap::new(bits);
            let mut set = BTreeSet::new();
            for (s, n) in ranges {
                for i in s..(s + n).min(bits) { b.set(i); set.insert(i); }
            }
            let boundaries = [boundary];
            let mut seen = BTreeSet::new();
            for stream in 0..streams {
                for_each_chunk(&b, stream, streams, max_pages, &boundaries, |s, n| {
                    assert!(n >= 1 && n <= max_pages);
                    assert_eq!(stream_of(s, streams), stream);
                    assert_eq!(stream_of(s + n - 1, streams), stream, "chunk crosses a stripe");
                    assert!(!(s < boundary && s + n > boundary), "chunk crosses a region boundary");
                    for i in s..s + n { assert!(seen.insert(i), "page {i} twice"); }
                    Ok::<(), ()>(())
                }).unwrap();
            }
            prop_assert_eq!(seen, set);
        }

        #[test]
        fn bits_match_get(bits in 1u64..700, idx in proptest::collection::vec(0u64..700, 0..200), first in 0u64..700, count in 0u64..=64) {
            let mut b = DirtyBitmap::new(bits);
            for &i in idx.iter().filter(|i| **i < bits) { b.set(i); }
            let first = first % bits;
            let count = count.min(bits - first);
            let w = b.bits(first, count);
            for k in 0..count { prop_assert_eq!(w >> k & 1 == 1, b.get(first + k)); }
            if count < 64 { prop_assert_eq!(w >> count, 0); }
        }

        #[test]
        fn atomic_drain_matches_marks(bits in 1u64..2000, idx in proptest::collection::vec(0u64..2000, 0..300)) {
            let a = AtomicBitmap::new(bits);
            let mut want = DirtyBitmap::new(bits);
            for &i in idx.iter().filter(|i| **i < bits) { a.mark(i); want.set(i); }
            let mut got = DirtyBitmap::new(bits);
            a.drain_into(&mut got);
            prop_assert_eq!(&got, &want);
            let mut again = DirtyBitmap::new(bits);
            a.drain_into(&mut again);
            prop_assert_eq!(again.count(), 0);
        }
    }

    #[test]
    fn full_and_set_range() {
        let b = DirtyBitmap::full(130);
        assert_eq!(b.count(), 130);
        assert!(b.get(129) && !b.get(130));
        let mut c = DirtyBitmap::new(200);
        c.set_range(60, 80);
        assert_eq!(c.count(), 80);
        assert!(c.get(60) && c.get(139) && !c.get(140) && !c.get(59));
    }
}
