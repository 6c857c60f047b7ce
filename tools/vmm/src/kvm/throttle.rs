//! Throttling the guest's vCPUs for migration (like QEMU's cpu-throttle):
//! a thread that, every [`PERIOD`], lets the vCPUs run `1 - fraction` of it
//! and holds them out of the guest for the rest (a kick, the same one a
//! pause uses, and a wait in the VMM). The vCPUs' state is untouched and
//! the throttle is not part of it, so a guest that moves runs unthrottled
//! at the destination.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::vcpu::{Shared, Want};

/// One duty cycle: the vCPUs run, then wait, within this.
pub(super) const PERIOD: Duration = Duration::from_millis(10);

/// The running throttle thread of a VM.
pub(super) struct Throttler {
    /// The fraction's f64 bits.
    fraction: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    vcpus: Vec<Arc<Shared>>,
}

impl Throttler {
    /// Starts duty-cycling `vcpus` at `fraction` (0 < fraction < 1).
    pub(super) fn start(vcpus: Vec<Arc<Shared>>, fraction: f64) -> std::io::Result<Throttler> {
        let f = Arc::new(AtomicU64::new(fraction.to_bits()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f2, stop2, v2) = (f.clone(), stop.clone(), vcpus.clone());
        let thread = std::thread::Builder::new()
            .name("ferry-throttle".into())
            .spawn(move || duty_cycle(&v2, &f2, &stop2))?;
        Ok(Throttler {
            fraction: f,
            stop,
            thread: Some(thread),
            vcpus,
        })
    }

    /// Changes the fraction of a running throttle.
    pub(super) fn set(&self, fraction: f64) {
        self.fraction.store(fraction.to_bits(), Ordering::SeqCst);
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
        hold(&self.vcpus, false);
    }
}

/// Holds every running vCPU out of the guest (`on`), or lets them go.
fn hold(vcpus: &[Arc<Shared>], on: bool) {
    for v in vcpus {
        let mut c = v.lock();
        if on {
            if c.want == Want::Run && !c.throttled {
                c.throttled = true;
                v.kick(&mut c);
            }
        } else if c.throttled {
            c.throttled = false;
            v.cv.notify_all();
        }
    }
}

fn duty_cycle(vcpus: &[Arc<Shared>], fraction: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let f = f64::from_bits(fraction.load(Ordering::SeqCst)).clamp(0.0, 1.0);
        std::thread::sleep(PERIOD.mul_f64(1.0 - f));
        if stop.load(Ordering::SeqCst) {
            break;
        }
        hold(vcpus, true);
        std::thread::sleep(PERIOD.mul_f64(f));
        hold(vcpus, false);
    }
}
