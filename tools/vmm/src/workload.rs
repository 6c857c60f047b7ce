//! The synthetic guest: memory filled with pseudo-random data (a chosen
//! fraction of all-zero pages), then a writer thread that dirties a hot set
//! at a paced rate. It can be paused and resumed; its small state (PRNG
//! state, write counter) is the "device state" that moves at switchover.
//!
//! Its writes are a pure function of that state, so an image can be advanced
//! by replaying writes ([`replay`]): a verifier can check a destination that
//! kept running after the switchover against the source's frozen image.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_engine::bitmap::AtomicBitmap;
use ferry_engine::guest::{GuestControl, GuestError};
use ferry_engine::memory::{GuestMemory, PageIndex, PAGE_SIZE};

/// How the synthetic guest behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadConfig {
    /// Bytes of the hot set (the first pages of memory) the writer dirties.
    pub hot_set_bytes: u64,
    /// Pages written per second (0: an idle guest).
    pub dirty_rate_pages_per_s: u64,
    /// Fraction of pages left all-zero by the fill, 0..=1.
    pub zero_fraction: f64,
    /// PRNG seed for the fill and the writes.
    pub seed: u64,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        WorkloadConfig {
            hot_set_bytes: 64 << 20,
            dirty_rate_pages_per_s: 0,
            zero_fraction: 0.0,
            seed: 0x5eed,
        }
    }
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `mem` with pseudo-random pages, leaving about `zero_fraction` of
/// them all-zero, using every core.
pub fn fill(mem: &GuestMemory, seed: u64, zero_fraction: f64) {
    let pages = mem.pages();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let per = pages.div_ceil(threads.max(1));
    // The threshold below which a page's hash means "leave it zero".
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let zero_below = (zero_fraction.clamp(0.0, 1.0) * u64::MAX as f64) as u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut page = [0u64; PAGE_SIZE / 8];
                let end = ((t + 1) * per).min(pages);
                for p in t * per..end {
                    let mut h = seed ^ p.wrapping_mul(0xD6E8_FEB8_6659_FD93);
                    let pick = splitmix(&mut h);
                    if pick < zero_below || (zero_fraction >= 1.0) {
                        continue;
                    }
                    for w in page.iter_mut() {
                        *w = splitmix(&mut h);
                    }
                    // SAFETY: viewing a [u64; 512] as 4096 bytes is always valid.
                    let bytes = unsafe { std::slice::from_raw_parts(page.as_ptr().cast::<u8>(), PAGE_SIZE) };
                    mem.write_pages(PageIndex(p), bytes);
                }
            });
        }
    });
}

/// The writer's state: exactly what moves as device state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct WriterState {
    rng: u64,
    writes: u64,
    hot_pages: u64,
    rate: u64,
}

const STATE_MAGIC: &[u8; 4] = b"FSG1";
const STATE_LEN: usize = 4 + 8 * 5;

impl WriterState {
    fn encode(&self, pages: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(STATE_LEN);
        v.extend_from_slice(STATE_MAGIC);
        for x in [self.rng, self.writes, self.hot_pages, self.rate, pages] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        v
    }

    fn decode(b: &[u8], pages: u64) -> Result<WriterState, GuestError> {
        if b.len() != STATE_LEN || &b[..4] != STATE_MAGIC {
            return Err(GuestError::BadState(format!(
                "synthetic guest state must be {STATE_LEN} bytes starting FSG1"
            )));
        }
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[4 + 8 * i..12 + 8 * i]);
            u64::from_le_bytes(w)
        };
        if word(4) != pages {
            return Err(GuestError::BadState(format!(
                "state is for {} pages, this guest has {pages}",
                word(4)
            )));
        }
        if word(2) == 0 || word(2) > pages {
            return Err(GuestError::BadState("hot set out of range".into()));
        }
        Ok(WriterState {
            rng: word(0),
            writes: word(1),
            hot_pages: word(2),
            rate: word(3),
        })
    }

    /// One write: a fresh non-zero word into a hot page. Returns the page.
    fn step(&mut self, mem: &GuestMemory) -> u64 {
        let r = splitmix(&mut self.rng);
        let page = r % self.hot_pages;
        let word = ((r >> 40) % (PAGE_SIZE as u64 / 8)) as usize;
        self.writes += 1;
        let value = self.writes.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
        let p = mem.run_ptr(PageIndex(page), 1).expect("hot page inside memory");
        // SAFETY: `p` is a mapped, page-aligned page; `word < 512`, so the
        // u64 lies inside it and is aligned. Volatile: another thread reads
        // this memory concurrently (see memory module docs).
        unsafe { p.cast::<u64>().add(word).write_volatile(value) };
        page
    }
}

/// Advances `mem` (a frozen image with synthetic-guest `state`) by replaying
/// the guest's writes until its write counter reaches `writes_to`; returns
/// the guest state after them.
pub fn replay(mem: &GuestMemory, state: &[u8], writes_to: u64) -> Result<Vec<u8>, GuestError> {
    let mut s = WriterState::decode(state, mem.pages())?;
    if writes_to < s.writes {
        return Err(GuestError::BadState(format!(
            "cannot replay backwards from {} to {writes_to}",
            s.writes
        )));
    }
    while s.writes < writes_to {
        s.step(mem);
    }
    Ok(s.encode(mem.pages()))
}

struct Shared {
    mem: Arc<GuestMemory>,
    marks: Option<Arc<AtomicBitmap>>,
    ctl: Mutex<Ctl>,
    wake: Condvar,
}

struct Ctl {
    state: WriterState,
    paused: bool,
    stop: bool,
    /// Share of its rate the writer gives up (the migration's throttle);
    /// not part of the state, so a guest that moves runs at its full rate.
    throttle: f64,
}

/// Reads a synthetic guest's heartbeat (see [`SyntheticGuest::heartbeat_probe`]).
#[derive(Clone)]
pub struct HeartbeatProbe(Arc<Shared>);

impl std::fmt::Debug for HeartbeatProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("HeartbeatProbe").finish()
    }
}

impl HeartbeatProbe {
    /// Writes done so far.
    pub fn heartbeat(&self) -> u64 {
        self.0.ctl.lock().map_or(0, |c| c.state.writes)
    }
}

/// A running (or paused) synthetic guest.
pub struct SyntheticGuest {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for SyntheticGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticGuest")
            .field("heartbeat", &self.heartbeat())
            .finish()
    }
}

impl SyntheticGuest {
    /// Fills `mem` and starts writing (source side). With `marks`, every
    /// write is also marked there (the [`ferry_engine::dirty::BitmapTracker`] path).
    pub fn start(mem: Arc<GuestMemory>, cfg: WorkloadConfig, marks: Option<Arc<AtomicBitmap>>) -> SyntheticGuest {
        fill(&mem, cfg.seed, cfg.zero_fraction);
        let hot_pages = (cfg.hot_set_bytes / PAGE_SIZE as u64).clamp(1, mem.pages());
        let state = WriterState {
            rng: cfg.seed ^ 0xA5A5_A5A5,
            writes: 0,
            hot_pages,
            rate: cfg.dirty_rate_pages_per_s,
        };
        Self::spawn(mem, marks, state, false)
    }

    /// A guest that has not run: it waits for [`GuestControl::load_state`]
    /// and [`GuestControl::resume`] (destination side).
    pub fn incoming(mem: Arc<GuestMemory>) -> SyntheticGuest {
        let state = WriterState {
            rng: 0,
            writes: 0,
            hot_pages: 1,
            rate: 0,
        };
        Self::spawn(mem, None, state, true)
    }

    fn spawn(
        mem: Arc<GuestMemory>,
        marks: Option<Arc<AtomicBitmap>>,
        state: WriterState,
        paused: bool,
    ) -> SyntheticGuest {
        let shared = Arc::new(Shared {
            mem,
            marks,
            ctl: Mutex::new(Ctl {
                state,
                paused,
                stop: false,
                throttle: 0.0,
            }),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("synthetic-guest".into())
            .spawn(move || writer(&s))
            .expect("spawning the guest writer thread");
        SyntheticGuest {
            shared,
            thread: Some(thread),
        }
    }

    fn ctl(&self) -> MutexGuard<'_, Ctl> {
        // A poisoned lock means the writer panicked: a broken invariant, so
        // crash rather than migrate a guest in an unknown state.
        self.shared.ctl.lock().expect("synthetic guest writer panicked")
    }

    /// Writes done so far (the guest's heartbeat).
    pub fn heartbeat(&self) -> u64 {
        self.ctl().state.writes
    }

    /// A handle that reads the heartbeat from another thread while the
    /// guest is borrowed (by a migration, say).
    pub fn heartbeat_probe(&self) -> HeartbeatProbe {
        HeartbeatProbe(self.shared.clone())
    }

    /// The throttle in force (0: none).
    pub fn throttle(&self) -> f64 {
        self.ctl().throttle
    }

    /// Whether the guest is running.
    pub fn is_running(&self) -> bool {
        !self.ctl().paused
    }

    /// Waits until the heartbeat passes `beyond` or `limit` elapses; returns
    /// whether it did (a check that the guest really runs).
    pub fn wait_heartbeat(&self, beyond: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.heartbeat() > beyond {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

fn writer(s: &Shared) {
    const TICK: Duration = Duration::from_millis(1);
    const BATCH_MAX: u64 = 1024;
    let mut epoch = Instant::now();
    let mut done_in_epoch = 0u64;
    let mut was_paused = true;
    let mut throttle = 0.0;
    loop {
        let mut ctl = s.ctl.lock().expect("synthetic guest control lock");
        while ctl.paused && !ctl.stop {
            was_paused = true;
            ctl = s.wake.wait(ctl).expect("synthetic guest control lock");
        }
        if ctl.stop {
            return;
        }
        if was_paused || ctl.throttle != throttle {
            was_paused = false;
            throttle = ctl.throttle;
            epoch = Instant::now();
            done_in_epoch = 0;
        }
        let rate = ctl.state.rate as f64 * (1.0 - throttle);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let due = (epoch.elapsed().as_secs_f64() * rate) as u64;
        let n = due.saturating_sub(done_in_epoch).min(BATCH_MAX);
        // Writes happen with the lock held: `pause` takes the lock, so when
        // it returns no write is in progress.
        for _ in 0..n {
            let page = ctl.state.step(&s.mem);
            if let Some(m) = &s.marks {
                m.mark(page);
            }
        }
        done_in_epoch += n;
        drop(ctl);
        if n < BATCH_MAX {
            std::thread::sleep(TICK);
        }
    }
}

impl GuestControl for SyntheticGuest {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.ctl().paused = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.ctl().paused = false;
        self.shared.wake.notify_all();
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        let ctl = self.ctl();
        if !ctl.paused {
            return Err(GuestError::Control("save_state needs a paused guest".into()));
        }
        Ok(ctl.state.encode(self.shared.mem.pages()))
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let decoded = WriterState::decode(state, self.shared.mem.pages())?;
        let mut ctl = self.ctl();
        if !ctl.paused {
            return Err(GuestError::Control(
                "load_state needs a guest that is not running".into(),
            ));
        }
        ctl.state = decoded;
        Ok(())
    }

    fn kind(&self) -> ferry_engine::guest::GuestKind {
        ferry_engine::guest::GuestKind::Synthetic
    }

    fn can_throttle(&self) -> bool {
        true
    }

    fn set_throttle(&mut self, fraction: f64) -> Result<(), GuestError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(GuestError::Control(format!("throttle {fraction} outside 0..1")));
        }
        self.ctl().throttle = fraction;
        Ok(())
    }

    fn device_state_bytes_hint(&self) -> usize {
        STATE_LEN
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        if let Ok(mut c) = self.shared.ctl.lock() {
            c.stop = true;
        }
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_engine::memory::PAGE_SIZE_U64;

    #[test]
    fn fill_respects_zero_fraction() {
        let mem = GuestMemory::new(4096 * PAGE_SIZE_U64).unwrap();
        fill(&mem, 1, 0.5);
        let zeros = (0..mem.pages()).filter(|p| mem.page_is_zero(PageIndex(*p))).count();
        assert!((1700..2400).contains(&zeros), "{zeros} zero pages of 4096");
        let all = GuestMemory::new(64 * PAGE_SIZE_U64).unwrap();
        fill(&all, 1, 0.0);
        assert!((0..64).all(|p| !all.page_is_zero(PageIndex(p))));
    }

    #[test]
    fn writes_pause_and_state_moves_and_replays() {
        let mem = Arc::new(GuestMemory::new(256 * PAGE_SIZE_U64).unwrap());
        let cfg = WorkloadConfig {
            hot_set_bytes: 64 * PAGE_SIZE_U64,
            dirty_rate_pages_per_s: 50_000,
            zero_fraction: 0.0,
            seed: 3,
        };
        let mut g = SyntheticGuest::start(mem.clone(), cfg, None);
        assert!(g.wait_heartbeat(100, Duration::from_secs(5)));
        g.pause().unwrap();
        let frozen = g.heartbeat();
        let digest = mem.digest();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(g.heartbeat(), frozen, "no writes while paused");
        assert_eq!(mem.digest(), digest);
        let state = g.save_state().unwrap();

        // A copy of the frozen image, advanced by replay, equals the guest
        // that ran on from the same state.
        let copy = GuestMemory::new(mem.size_bytes()).unwrap();
        for p in 0..mem.pages() {
            let mut page = [0u8; PAGE_SIZE];
            mem.read_page(PageIndex(p), &mut page);
            copy.write_pages(PageIndex(p), &page);
        }
        let mut dst = SyntheticGuest::incoming(copy.into());
        dst.load_state(&state).unwrap();
        g.resume().unwrap();
        assert!(g.wait_heartbeat(frozen + 100, Duration::from_secs(5)));
        g.pause().unwrap();
        let later = g.heartbeat();
        let advanced = replay(&dst.shared.mem, &state, later).unwrap();
        assert_eq!(dst.shared.mem.digest(), mem.digest());
        assert_eq!(advanced, g.save_state().unwrap());
        assert!(WriterState::decode(&state[..10], 256).is_err());
        assert!(dst.load_state(&[0u8; STATE_LEN]).is_err());
    }
}
