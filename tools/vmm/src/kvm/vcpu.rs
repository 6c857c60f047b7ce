//! A vCPU's thread: enter the guest, serve its port writes (heartbeat,
//! checksum, fill done, idle), and park when the VMM asks it to pause or
//! stop.

use super::*;

/// A byte of a vCPU's `kvm_run` mapping that other threads set.
#[derive(Clone, Copy)]
pub(super) struct ImmediateExit(pub(super) *const AtomicU8);

// SAFETY: the pointer is into the vCPU's kvm_run mapping, which lives as
// long as its VcpuFd; everything that holds the vCPU's `Shared` (its `Vcpu`,
// its thread, a `Monitor`) also holds an `Arc` of that VcpuFd, and the byte
// is only touched atomically.
unsafe impl Send for ImmediateExit {}
// SAFETY: as above; all access is through atomic operations.
unsafe impl Sync for ImmediateExit {}

impl ImmediateExit {
    pub(super) fn set(self, v: u8) {
        // SAFETY: see the Send impl: the mapping outlives every use, and the
        // kernel reads the byte only at KVM_RUN entry.
        unsafe { (*self.0).store(v, Ordering::SeqCst) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    Run,
    Pause,
    Stop,
}

#[derive(Debug)]
pub(super) struct Ctl {
    pub(super) want: Want,
    pub(super) parked: bool,
    pub(super) exited: bool,
    pub(super) error: Option<String>,
    /// KVM_RUN calls made.
    pub(super) runs: u64,
    pub(super) tid: Option<libc::pthread_t>,
    /// Park when the guest reports its next checksum.
    pub(super) park_on_checksum: bool,
    pub(super) checksum: Option<u64>,
    pub(super) filled: bool,
    /// When the vCPU last parked.
    pub(super) parked_at: Option<Instant>,
    /// The migration's throttle (a wait is not a pause: not parked).
    pub(super) throttle: super::throttle::VcpuThrottle,
}

pub(super) struct Shared {
    pub(super) id: u8,
    pub(super) ctl: Mutex<Ctl>,
    pub(super) cv: Condvar,
    pub(super) heartbeat: AtomicU64,
    /// The first heartbeat this VM saw (0: none yet).
    pub(super) first_heartbeat: AtomicU64,
    /// The guest's TSC rate, to turn its idle hints into sleeps.
    pub(super) tsc_khz: u32,
    pub(super) immediate_exit: ImmediateExit,
}

impl Shared {
    /// Makes the vCPU leave the guest now (or not enter it): sets
    /// `immediate_exit` and signals its thread.
    pub(super) fn kick(&self, c: &mut Ctl) {
        self.immediate_exit.set(1);
        if let (Some(tid), false) = (c.tid, c.exited) {
            // SAFETY: `tid` is the live vCPU thread (it sets `exited` under
            // this lock before it returns); the signal's handler is
            // installed and does nothing.
            unsafe { libc::pthread_kill(tid, kick_signal()) };
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until `done` holds, the vCPU thread has exited, or `limit`.
    pub(super) fn wait(&self, limit: Duration, done: impl Fn(&Ctl) -> bool) -> Result<MutexGuard<'_, Ctl>, KvmError> {
        let deadline = Instant::now() + limit;
        let mut c = self.lock();
        loop {
            if done(&c) {
                return Ok(c);
            }
            if c.exited {
                return Err(KvmError::Guest(format!(
                    "vCPU {} has stopped: {}",
                    self.id,
                    c.error.as_deref().unwrap_or("the VM was shut down")
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(KvmError::Guest(format!(
                    "vCPU {} did not respond within {limit:?}",
                    self.id
                )));
            }
            c = self
                .cv
                .wait_timeout(c, deadline - now)
                .map_or_else(|e| e.into_inner().0, |r| r.0);
        }
    }
}

pub(super) struct Vcpu {
    pub(super) shared: Arc<Shared>,
    pub(super) fd: Arc<Mutex<VcpuFd>>,
    pub(super) thread: Option<JoinHandle<()>>,
}

impl Vcpu {
    pub(super) fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

pub(super) fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the (empty) handler of the kick signal once per process, without
/// SA_RESTART, so a blocked KVM_RUN returns EINTR.
pub(super) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler is an extern "C" fn that does nothing, which is
        // async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as libc::sighandler_t;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Reads a running guest's progress without owning its VM.
#[derive(Clone)]
pub struct Monitor {
    pub(super) vcpu0: Arc<Shared>,
    /// Keeps vCPU 0's kvm_run mapping (which `vcpu0.immediate_exit` points
    /// into) alive as long as this handle.
    pub(super) _fd: Arc<Mutex<VcpuFd>>,
    pub(super) core: Arc<Core>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("heartbeat", &self.heartbeat()).finish()
    }
}

impl Monitor {
    /// vCPU 0's heartbeat as it last reported it.
    pub fn heartbeat(&self) -> u64 {
        self.vcpu0.heartbeat.load(Ordering::SeqCst)
    }

    /// Hot-set writes the guest has made.
    pub fn guest_writes(&self) -> u64 {
        self.core.word(KvmVm::slot(0) + S_WRITES).load(Ordering::SeqCst)
    }

    /// Whether vCPU 0 is paused, or being paused (the VMM does not want it
    /// to run).
    pub fn paused(&self) -> bool {
        self.vcpu0.lock().want != Want::Run
    }
}

pub(super) fn vcpu_thread(sh: &Shared, fd: &Mutex<VcpuFd>, core: &Core) {
    let fail = |why: String| {
        let mut c = sh.lock();
        c.error = Some(why);
        c.exited = true;
        sh.cv.notify_all();
    };
    // SAFETY: pthread_self has no preconditions.
    sh.lock().tid = Some(unsafe { libc::pthread_self() });
    let slot = KvmVm::slot(sh.id);
    let read = |off: u64| core.word(slot + off).load(Ordering::SeqCst);
    loop {
        {
            let mut c = sh.lock();
            loop {
                match c.want {
                    Want::Stop => {
                        c.exited = true;
                        c.parked = false;
                        sh.cv.notify_all();
                        return;
                    }
                    Want::Pause => {
                        if !c.parked {
                            c.parked = true;
                            c.parked_at = Some(Instant::now());
                            sh.cv.notify_all();
                        }
                        c = sh.cv.wait(c).unwrap_or_else(std::sync::PoisonError::into_inner);
                    }
                    // Kicked by the throttle: wait its share in the VMM.
                    Want::Run if c.throttle.due => c = super::throttle::wait_share(sh, c),
                    Want::Run => break,
                }
            }
            c.parked = false;
            // Under the lock: a pause after this point sets it again.
            sh.immediate_exit.set(0);
            c.runs += 1;
        }
        let mut f = fd.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let exit = match f.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let mut v = [0u8; 4];
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                Ok(Exit::Out(port, u32::from_le_bytes(v)))
            }
            Ok(VcpuExit::Intr) => Ok(Exit::Again),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(Exit::Again),
            Ok(VcpuExit::Shutdown) => Err("guest crashed (triple fault, shutdown exit)".to_string()),
            Ok(other) => Err(format!("unexpected exit {other:?}")),
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            Ok(Exit::Again) => {}
            Ok(Exit::Out(PORT_IDLE, ticks)) => {
                // Like a HLT with a timer: sleep until the guest's next
                // deadline, waking early for a pause or stop.
                drop(f);
                let ns = u64::from(ticks) * 1_000_000 / u64::from(sh.tsc_khz);
                if ns >= MIN_IDLE_NS {
                    let c = sh.lock();
                    if c.want == Want::Run {
                        let _ = sh.cv.wait_timeout(c, Duration::from_nanos(ns.min(MAX_IDLE_NS)));
                    }
                }
            }
            Ok(Exit::Out(PORT_HEARTBEAT, _)) => {
                let hb = read(S_HEARTBEAT);
                sh.heartbeat.store(hb, Ordering::SeqCst);
                let _ = sh
                    .first_heartbeat
                    .compare_exchange(0, hb, Ordering::SeqCst, Ordering::SeqCst);
                sh.cv.notify_all();
            }
            Ok(Exit::Out(PORT_CHECKSUM, _)) => {
                let mut c = sh.lock();
                c.checksum = Some(read(S_CHECKSUM));
                if std::mem::take(&mut c.park_on_checksum) && c.want == Want::Run {
                    c.want = Want::Pause;
                }
                sh.cv.notify_all();
            }
            Ok(Exit::Out(PORT_FILLED, _)) => {
                sh.lock().filled = true;
                sh.cv.notify_all();
            }
            Ok(Exit::Out(port, _)) => {
                let rip = f.get_regs().map_or(0, |r| r.rip);
                return fail(format!("guest wrote to unknown port {port:#x} at rip {rip:#x}"));
            }
            Err(why) => {
                let rip = f.get_regs().map_or(0, |r| r.rip);
                return fail(format!("{why} at rip {rip:#x}"));
            }
        }
    }
}

enum Exit {
    Out(u16, u32),
    Again,
}
