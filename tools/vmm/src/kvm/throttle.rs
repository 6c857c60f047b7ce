//! Throttling the guest's vCPUs for migration (like QEMU's cpu-throttle):
//! every [`PERIOD`]·(1 − fraction) a thread kicks each running vCPU out of
//! the guest, and the vCPU's own thread then waits in the VMM for
//! fraction / (1 − fraction) of the time it ran since its last wait. The
//! ratio is kept by the vCPU thread from what it measured, so a late kick
//! (a busy host) makes the wait longer, not the share larger. The vCPUs'
//! state is untouched and the throttle is not part of it, so a guest that
//! moves runs unthrottled at the destination.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::vcpu::{Ctl, Shared, Want};

/// About how often a throttled vCPU is stopped.
pub(super) const PERIOD: Duration = Duration::from_millis(10);
/// The longest single throttle wait (the fraction is at most 0.99).
const MAX_WAIT: Duration = Duration::from_secs(1);

/// A vCPU's throttle state (in its `Ctl`).
#[derive(Debug, Default)]
pub(super) struct VcpuThrottle {
    /// Share of time taken away (0: none).
    pub(super) fraction: f64,
    /// Kicked out to wait its share.
    pub(super) due: bool,
    /// When it last started running under the throttle.
    pub(super) running_since: Option<Instant>,
    /// Time spent waiting its shares, in total (survives the throttle
    /// coming off, for [`super::KvmVm::throttle_waited`]).
    pub(super) waited: Duration,
}

/// Called by the vCPU thread with `c.throttle.due` set: waits its share,
/// waking early for a pause or stop or when the throttle is lifted.
pub(super) fn wait_share<'a>(sh: &'a Shared, mut c: std::sync::MutexGuard<'a, Ctl>) -> std::sync::MutexGuard<'a, Ctl> {
    c.throttle.due = false;
    let f = c.throttle.fraction.clamp(0.0, 0.99);
    let ran = c.throttle.running_since.map_or(PERIOD, |t| t.elapsed());
    let started = Instant::now();
    let until = started + ran.mul_f64(f / (1.0 - f)).min(MAX_WAIT);
    while c.want == Want::Run && c.throttle.fraction > 0.0 {
        let now = Instant::now();
        if now >= until {
            break;
        }
        c = sh
            .cv
            .wait_timeout(c, until - now)
            .map_or_else(|e| e.into_inner().0, |r| r.0);
    }
    let now = Instant::now();
    c.throttle.waited += now.saturating_duration_since(started);
    c.throttle.running_since = Some(now);
    c
}

/// The running throttle thread of a VM.
pub(super) struct Throttler {
    /// The fraction's f64 bits.
    fraction: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    vcpus: Vec<Arc<Shared>>,
}

impl Throttler {
    /// Starts throttling `vcpus` at `fraction` (0 < fraction < 1).
    pub(super) fn start(vcpus: Vec<Arc<Shared>>, fraction: f64) -> std::io::Result<Throttler> {
        let f = Arc::new(AtomicU64::new(fraction.to_bits()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut t = Throttler {
            fraction: f.clone(),
            stop: stop.clone(),
            thread: None,
            vcpus: vcpus.clone(),
        };
        t.set(fraction);
        // On failure `t` drops, and takes the throttle off again.
        t.thread = Some(
            std::thread::Builder::new()
                .name("ferry-throttle".into())
                .spawn(move || kicks(&vcpus, &f, &stop))?,
        );
        Ok(t)
    }

    /// Changes the fraction of a running throttle.
    pub(super) fn set(&self, fraction: f64) {
        self.fraction.store(fraction.to_bits(), Ordering::SeqCst);
        for v in &self.vcpus {
            let mut c = v.lock();
            if c.throttle.fraction == 0.0 {
                c.throttle.running_since = Some(Instant::now());
            }
            c.throttle.fraction = fraction;
        }
    }

    /// The fraction in force.
    pub(super) fn fraction(&self) -> f64 {
        f64::from_bits(self.fraction.load(Ordering::SeqCst))
    }
}

impl Drop for Throttler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Nothing stays held out of the guest.
        for v in &self.vcpus {
            let mut c = v.lock();
            c.throttle = VcpuThrottle {
                waited: c.throttle.waited,
                ..VcpuThrottle::default()
            };
            v.cv.notify_all();
        }
    }
}

fn kicks(vcpus: &[Arc<Shared>], fraction: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let f = f64::from_bits(fraction.load(Ordering::SeqCst)).clamp(0.0, 0.99);
        std::thread::sleep(PERIOD.mul_f64(1.0 - f));
        if stop.load(Ordering::SeqCst) {
            break;
        }
        for v in vcpus {
            let mut c = v.lock();
            if c.want == Want::Run && c.throttle.fraction > 0.0 && !c.throttle.due {
                c.throttle.due = true;
                v.kick(&mut c);
            }
        }
    }
}
