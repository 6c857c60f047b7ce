//! Bandwidth caps: one pacer shared by every stream of a migration.
//!
//! A cap is a rate in bytes per second (the bytes written to the data
//! streams, headers and tags included). The live rounds and the paused round
//! may have different caps (a link shared with other traffic during the
//! long live phase, all of it for the few milliseconds the guest is paused).
//! The caps are atomics the embedder may change while the migration runs
//! ([`crate::progress::Hooks::set_max_bandwidth`]); the next batch a worker
//! sends obeys the new value.
//!
//! The pacer is a virtual-clock token bucket: one atomic "theoretical
//! arrival time". A worker about to send `n` bytes reserves the next
//! `n / rate` seconds of the schedule with one compare-and-swap and sleeps
//! until its slot starts. Workers reserve once per batch (about 1 MiB), not
//! per frame, and never take a lock. An idle period gives no credit: the
//! schedule restarts at "now", so the rate over any window is at most the
//! cap plus one batch per stream.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The lowest cap accepted, in bytes per second: below it a single batch
/// takes seconds and the peer's silence timeouts would fire.
pub const MIN_CAP_BYTES_PER_S: u64 = 1_000_000;

/// A cap below [`MIN_CAP_BYTES_PER_S`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a bandwidth cap must be at least {MIN_CAP_BYTES_PER_S} B/s (1 MB/s), not {0} B/s; use none for unlimited")]
pub struct CapTooLow(pub u64);

/// Checks a cap (`None`: unlimited, always fine).
pub fn check_cap(cap: Option<u64>) -> Result<(), CapTooLow> {
    match cap {
        Some(c) if c < MIN_CAP_BYTES_PER_S => Err(CapTooLow(c)),
        _ => Ok(()),
    }
}

/// Longest single sleep while waiting for a slot: cancels are seen within it.
const SLEEP_SLICE: Duration = Duration::from_millis(20);

/// No cap.
const UNLIMITED: u64 = 0;
/// The paused round has no cap of its own: the live cap applies.
const SAME_AS_LIVE: u64 = u64::MAX;

/// The caps in force (shared by a migration and its embedder).
#[derive(Debug)]
pub struct BandwidthCap {
    live: AtomicU64,
    paused: AtomicU64,
    /// Set by the embedder: the configuration's initial caps do not apply.
    overridden: AtomicBool,
}

impl Default for BandwidthCap {
    fn default() -> Self {
        BandwidthCap {
            live: AtomicU64::new(UNLIMITED),
            paused: AtomicU64::new(SAME_AS_LIVE),
            overridden: AtomicBool::new(false),
        }
    }
}

fn encode(cap: Option<u64>) -> u64 {
    // 0 and u64::MAX are reserved; validation keeps caps far from both.
    cap.map_or(UNLIMITED, |c| c.clamp(1, u64::MAX - 1))
}

fn decode(v: u64) -> Option<u64> {
    (v != UNLIMITED).then_some(v)
}

impl BandwidthCap {
    /// Sets the live rounds' cap (`None`: unlimited) and, with
    /// `paused: Some(..)`, the paused round's (`Some(None)`: the paused round
    /// is unlimited; `None`: it keeps its setting). Checked by the caller
    /// ([`crate::progress::Hooks::set_max_bandwidth`]).
    pub(crate) fn set(&self, live: Option<u64>, paused: Option<Option<u64>>) {
        self.overridden.store(true, Ordering::SeqCst);
        self.live.store(encode(live), Ordering::SeqCst);
        if let Some(p) = paused {
            self.paused.store(encode(p), Ordering::SeqCst);
        }
    }

    /// The configuration's caps, unless the embedder already set some.
    pub(crate) fn init(&self, live: Option<u64>, paused: Option<u64>) {
        if self.overridden.load(Ordering::SeqCst) {
            return;
        }
        self.live.store(encode(live), Ordering::SeqCst);
        self.paused
            .store(paused.map_or(SAME_AS_LIVE, |p| encode(Some(p))), Ordering::SeqCst);
    }

    /// The live rounds' cap.
    pub fn live(&self) -> Option<u64> {
        decode(self.live.load(Ordering::Relaxed))
    }

    /// The paused round's cap (the live cap unless it has its own).
    pub fn paused(&self) -> Option<u64> {
        match self.paused.load(Ordering::Relaxed) {
            SAME_AS_LIVE => self.live(),
            v => decode(v),
        }
    }

    /// The cap for a round.
    pub fn for_round(&self, paused: bool) -> Option<u64> {
        if paused {
            self.paused()
        } else {
            self.live()
        }
    }
}

/// A migration's schedule of sends under a [`BandwidthCap`].
#[derive(Debug)]
pub(crate) struct Pacer<'a> {
    cap: &'a BandwidthCap,
    epoch: Instant,
    /// When the next reservation may start, in ns since `epoch`.
    next_ns: AtomicU64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<'a> Pacer<'a> {
    pub(crate) fn new(cap: &'a BandwidthCap) -> Pacer<'a> {
        Pacer {
            cap,
            epoch: Instant::now(),
            next_ns: AtomicU64::new(0),
        }
    }

    /// Reserves `bytes` of the schedule and sleeps until the slot starts,
    /// waking every [`SLEEP_SLICE`] to check `stop` (returns early when it
    /// says so). No cap: returns at once.
    pub(crate) fn take(&self, bytes: usize, paused: bool, stop: impl Fn() -> bool) {
        let Some(rate) = self.cap.for_round(paused) else {
            return;
        };
        let cost_ns = u64::try_from((bytes as u128 * 1_000_000_000) / u128::from(rate.max(1))).unwrap_or(u64::MAX);
        let now = ns(self.epoch.elapsed());
        let mut start = 0;
        let _ = self.next_ns.fetch_update(Ordering::AcqRel, Ordering::Acquire, |next| {
            start = next.max(now);
            Some(start.saturating_add(cost_ns))
        });
        loop {
            let now = ns(self.epoch.elapsed());
            if now >= start || stop() {
                return;
            }
            std::thread::sleep(Duration::from_nanos(start - now).min(SLEEP_SLICE));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_default_to_unlimited_and_the_paused_cap_follows_the_live_one() {
        let c = BandwidthCap::default();
        assert_eq!((c.live(), c.paused()), (None, None));
        c.init(Some(5_000_000), None);
        assert_eq!((c.live(), c.paused()), (Some(5_000_000), Some(5_000_000)));
        c.init(Some(5_000_000), Some(9_000_000));
        assert_eq!(c.for_round(false), Some(5_000_000));
        assert_eq!(c.for_round(true), Some(9_000_000));
        // The embedder's setting wins over the configuration's.
        c.set(Some(2_000_000), Some(None));
        c.init(Some(5_000_000), Some(9_000_000));
        assert_eq!((c.live(), c.paused()), (Some(2_000_000), None));
        c.set(None, None);
        assert_eq!((c.live(), c.paused()), (None, None));
    }

    #[test]
    fn threads_sharing_a_pacer_stay_under_the_cap() {
        // 4 threads x 10 batches of 100 kB at 20 MB/s: 4 MB take at least
        // 4e6 / 20e6 = 0.2 s minus the one slot the schedule starts with.
        let cap = BandwidthCap::default();
        cap.init(Some(20_000_000), None);
        let pacer = Pacer::new(&cap);
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10 {
                        pacer.take(100_000, false, || false);
                    }
                });
            }
        });
        let secs = t.elapsed().as_secs_f64();
        assert!(secs >= 0.2 - 0.005 - 0.001, "4 MB at 20 MB/s in {secs} s");
    }

    #[test]
    fn a_stop_ends_the_wait() {
        let cap = BandwidthCap::default();
        cap.init(Some(MIN_CAP_BYTES_PER_S), None);
        let pacer = Pacer::new(&cap);
        pacer.take(1_000_000, false, || false);
        let t = Instant::now();
        // The next megabyte's slot starts a second from now.
        pacer.take(1_000_000, false, || true);
        assert!(t.elapsed() < Duration::from_millis(500));
    }
}
