//! A minimal VMM on rust-vmm's crates (vm-memory for guest memory,
//! kvm-ioctls for the VM) that migrates its running guest with ferry's
//! library, source and destination, on loopback, and checks the result.
//!
//! ```sh
//! cargo run --release --example vm_memory_vmm
//! ```
//!
//! What a VMM author brings, and where it is here:
//! - guest memory as a vm-memory `GuestMemoryMmap<AtomicBitmap>` (two
//!   regions with a gap), handed to ferry with
//!   `ferry_engine::GuestMemory::from_vm_memory`: shared, not copied;
//! - a dirty tracker: KVM's dirty log for the vCPU's writes (`KvmLog`,
//!   through kvm-ioctls), joined with `VmMemoryTracker`, which drains
//!   vm-memory's own bitmap: the pages the VMM's "device" thread writes
//!   through vm-memory (as a virtio device would), which KVM never sees;
//! - a `GuestControl`: pause, resume, and the vCPU's registers as device
//!   state (`Vmm`).
//!
//! The guest is a few bytes of 32-bit code: it counts in a word at
//! `COUNTER` and writes the count into one page of a 16 MiB hot set per
//! step, then exits to the VMM through an `out` (where the VMM can pause
//! it). The check: the destination's memory when it resumes the guest is
//! the source's memory at the pause, byte for byte (SHA-256 of both), and
//! afterwards the guest and the device run on there from where they
//! stopped. `tests/vm_memory.rs` runs this.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry::lab::{Lab, DEST, POLICY, VM};
use ferry_control::handshake::{serve_destination, OnAdmitted, ServeLimits};
use ferry_control::pki::{Identity, Role};
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::dirty::{DirtyError, DirtyTracker, Union};
use ferry_engine::guest::{GuestControl, GuestError, GuestKind};
use ferry_engine::migrate::MigrationConfig;
use ferry_engine::progress::Hooks;
use ferry_engine::vm_memory::VmMemoryTracker;
use ferry_engine::GuestMemory;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The VMM's guest memory type: vm-memory's mmap regions with its dirty bitmap.
type Memory = GuestMemoryMmap<AtomicBitmap>;

const MIB: usize = 1 << 20;
/// Guest-physical layout: 32 MiB at 0 (code, counter, hot set) and 16 MiB
/// at 64 MiB (the device's pages), a gap between.
const LAYOUT: [(u64, usize); 2] = [(0, 32 * MIB), (0x400_0000, 16 * MIB)];
const CODE: u64 = 0x1000;
const COUNTER: u64 = 0x500;
const HOT_BASE: u64 = 0x10_0000;
const DEVICE_BASE: u64 = 0x400_0000;
/// Pages the device cycles through.
const DEVICE_PAGES: u64 = 1024;
const PORT_STEP: u16 = 0x10;
/// Busy-loop iterations between two steps (about a microsecond; the exit
/// to the VMM after each step costs more, much more under nested KVM).
const SPIN: u32 = 500;
/// How long a pause may take (the guest exits every few microseconds).
const PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// The guest program, 32-bit protected mode, flat segments, no paging.
fn guest_code() -> Vec<u8> {
    let counter = u32::try_from(COUNTER).unwrap_or(0).to_le_bytes();
    let hot = u32::try_from(HOT_BASE).unwrap_or(0).to_le_bytes();
    let mut c = Vec::new();
    c.push(0xA1); // 00: mov eax, [COUNTER]
    c.extend_from_slice(&counter);
    c.push(0x40); // 05: inc eax
    c.push(0xA3); // 06: mov [COUNTER], eax
    c.extend_from_slice(&counter);
    c.extend_from_slice(&[0x89, 0xC2]); // 0b: mov edx, eax
    c.extend_from_slice(&[0x81, 0xE2, 0xFF, 0x0F, 0x00, 0x00]); // 0d: and edx, 4095 (16 MiB hot set)
    c.extend_from_slice(&[0xC1, 0xE2, 0x0C]); // 13: shl edx, 12
    c.extend_from_slice(&[0x89, 0x82]); // 16: mov [edx + HOT_BASE], eax
    c.extend_from_slice(&hot);
    c.push(0xB9); // 1c: mov ecx, SPIN
    c.extend_from_slice(&SPIN.to_le_bytes());
    c.extend_from_slice(&[0xE2, 0xFE]); // 21: loop 21
    c.extend_from_slice(&[0xE6, 0x10]); // 23: out PORT_STEP, al
    c.extend_from_slice(&[0xEB, 0xD9]); // 25: jmp 00
    debug_assert_eq!(c.len(), 0x27);
    c
}

/// What a run saw, for the test and the printout.
#[derive(Debug)]
pub struct Summary {
    /// SHA-256 of the source's guest memory once it was paused for good.
    pub source_digest: [u8; 32],
    /// SHA-256 of the destination's guest memory just before its guest ran.
    pub destination_digest: [u8; 32],
    /// The guest's count at the source when it stopped.
    pub source_counter: u32,
    /// The guest's count at the destination a while after it resumed.
    pub destination_counter: u32,
    /// Device writes at the destination after it resumed.
    pub destination_device_writes: u64,
    /// Pages KVM's dirty log and vm-memory's bitmap reported during pre-copy.
    pub kvm_pages: u64,
    /// Pages vm-memory's bitmap reported (the device's).
    pub vmm_pages: u64,
    /// The source's downtime.
    pub downtime_ms: f64,
    /// Of which the destination spent this long on the example's own
    /// checksum of guest memory before resuming the guest.
    pub checksum_ms: f64,
    /// The destination's receipt matched the source's transcript.
    pub transcript_matches: bool,
    /// Pre-copy rounds.
    pub rounds: usize,
}

/// The run's errors (the example's own: a VMM has its own error type).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), Error> {
    if let Err(why) = ferry_vmm::kvm::available() {
        return Err(format!("this example needs KVM: {why}").into());
    }
    let s = run(true)?;
    println!(
        "migrated: {} pre-copy rounds, downtime {:.2} ms ({:.2} ms of it the check below); tracked {} vCPU pages (KVM dirty log) and {} device pages (vm-memory bitmap)",
        s.rounds, s.downtime_ms, s.checksum_ms, s.kvm_pages, s.vmm_pages
    );
    println!(
        "memory at resume = memory at pause: {} (sha256 {}); receipt matches the transcript: {}",
        s.source_digest == s.destination_digest,
        hex(&s.destination_digest[..8]),
        s.transcript_matches
    );
    println!(
        "the guest counted to {} at the source and goes on at the destination: {}; device writes there: {}",
        s.source_counter, s.destination_counter, s.destination_device_writes
    );
    if s.source_digest != s.destination_digest || s.destination_counter <= s.source_counter {
        return Err("the migrated guest does not match".into());
    }
    Ok(())
}

/// Boots the guest, migrates it to a destination in this process, and
/// reports what both sides saw. `track_vmm_writes: false` leaves out
/// vm-memory's bitmap (only KVM's dirty log): the device's later writes are
/// then lost, which `tests/vm_memory.rs` shows the check catches.
pub fn run(track_vmm_writes: bool) -> Result<Summary, Error> {
    let lab = Lab::start(POLICY)?;

    // Destination: each admitted migration goes into fresh vm-memory memory
    // of the same layout and a VM whose vCPU waits for its registers.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let dest_addr = listener.local_addr()?;
    let dest = Arc::new(lab.destination(DEST, POLICY, 1 << 30)?);
    let me = Arc::new(Identity::load(lab.dir.path(), Role::Host, DEST)?);
    let (received_tx, received_rx) = mpsc::channel();
    let on_admitted: OnAdmitted = Arc::new(move |session, data| {
        let got = ferry::destination::receive_into(session, &data, &me, Duration::from_secs(10), |_offer| {
            let fail = |e: Error| ferry::destination::ReceiveError::Guest(GuestError::Control(e.to_string()));
            let vmm_mem = new_memory().map_err(fail)?;
            let mem = GuestMemory::from_vm_memory(vmm_mem.clone()).map_err(|e| fail(e.into()))?;
            let vmm = Vmm::new(vmm_mem, false).map_err(fail)?;
            Ok((Arc::new(mem), vmm))
        });
        let _ = received_tx.send(got);
    });
    let stop = Arc::new(AtomicBool::new(false));
    let daemon = serve_destination(listener, dest, ServeLimits::default(), on_admitted, stop.clone())?;

    // Source: boot the guest and let it and the device write for a while.
    let vmm_mem = new_memory()?;
    vmm_mem.write_slice(&guest_code(), GuestAddress(CODE))?;
    let mut vmm = Vmm::new(vmm_mem.clone(), true)?;
    std::thread::sleep(Duration::from_millis(300));
    let mem = GuestMemory::from_vm_memory(vmm_mem.clone())?;
    let kvm = Counted::new(KvmLog::new(vmm.vm.clone(), &vmm_mem));
    let vmm_side = Counted::new(VmMemoryTracker::new(vmm_mem.clone())?);
    let (kvm_pages, vmm_pages) = (kvm.pages.clone(), vmm_side.pages.clone());
    let mut tracker = if track_vmm_writes {
        Union::new(
            vec![Box::new(kvm), Box::new(vmm_side)],
            "kvm-dirty-log+vm-memory-bitmap",
        )
    } else {
        Union::new(vec![Box::new(kvm)], "kvm-dirty-log")
    };

    let at = lab.endpoints(dest_addr);
    let cfg = MigrationConfig {
        pin_workers: false,
        ..MigrationConfig::default()
    };
    let migrated = ferry::source::migrate(&at, VM, &mem, &mut tracker, &mut vmm, &cfg, &Hooks::new());
    stop.store(true, Ordering::SeqCst);
    let done = migrated?;
    // The source's guest is paused for good: its memory is final.
    let source_digest = mem.digest();
    let source_counter: u32 = vmm_mem.read_obj(GuestAddress(COUNTER))?;
    drop(vmm);

    let received = received_rx.recv_timeout(Duration::from_secs(10))??;
    let _ = daemon.join();
    let there = &received.guest;
    std::thread::sleep(Duration::from_millis(200));
    let destination_counter: u32 = there.mem.read_obj(GuestAddress(COUNTER))?;
    let (destination_digest, checksum) = there.resumed_digest()?;
    let destination_device_writes = there.lock().device_writes;
    Ok(Summary {
        source_digest,
        destination_digest,
        source_counter,
        destination_counter,
        destination_device_writes,
        kvm_pages: kvm_pages.load(Ordering::Relaxed),
        vmm_pages: vmm_pages.load(Ordering::Relaxed),
        downtime_ms: done.report.downtime().as_secs_f64() * 1e3,
        checksum_ms: checksum.as_secs_f64() * 1e3,
        transcript_matches: done.receipt.transcript_matches,
        rounds: done.report.rounds.len(),
    })
}

fn new_memory() -> Result<Arc<Memory>, Error> {
    let ranges: Vec<(GuestAddress, usize)> = LAYOUT.iter().map(|&(a, n)| (GuestAddress(a), n)).collect();
    Ok(Arc::new(Memory::from_ranges(&ranges)?))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What the vCPU and device threads and the control calls share.
#[derive(Debug, Default)]
struct Ctl {
    run: bool,
    stop: bool,
    vcpu_parked: bool,
    device_writes: u64,
    error: Option<String>,
    /// SHA-256 of guest memory taken when the guest first resumed here,
    /// and how long it took (inside the downtime).
    resumed_digest: Option<([u8; 32], Duration)>,
}

/// The VMM: one VM, one vCPU thread, one device thread.
/// (Fields drop in order: the vCPU and the VM before the memory they map.)
struct Vmm {
    vcpu: Arc<Mutex<VcpuFd>>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    ctl: Arc<(Mutex<Ctl>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
    incoming: bool,
    mem: Arc<Memory>,
}

impl Vmm {
    /// A VM over `mem`: running the guest program from `CODE` (`boot`), or
    /// waiting for a migration's registers.
    fn new(mem: Arc<Memory>, boot: bool) -> Result<Vmm, Error> {
        let kvm = Kvm::new()?;
        let vm = Arc::new(kvm.create_vm()?);
        for (slot, r) in (0u32..).zip(mem.iter()) {
            // SAFETY: the region is a live mapping of `r.len()` bytes owned by
            // `mem`, which this VMM keeps (and the VM fd is dropped first).
            unsafe { vm.set_user_memory_region(slot_of(slot, r, 0))? };
        }
        let vcpu = vm.create_vcpu(0)?;
        if boot {
            let mut s = vcpu.get_sregs()?;
            protected_mode(&mut s);
            vcpu.set_sregs(&s)?;
            vcpu.set_regs(&kvm_regs {
                rip: CODE,
                rflags: 0x2,
                ..Default::default()
            })?;
        }
        let mut vmm = Vmm {
            vcpu: Arc::new(Mutex::new(vcpu)),
            vm,
            _kvm: kvm,
            ctl: Arc::new((Mutex::new(Ctl::default()), Condvar::new())),
            threads: Vec::new(),
            incoming: !boot,
            mem,
        };
        let (ctl, vcpu) = (vmm.ctl.clone(), vmm.vcpu.clone());
        vmm.threads.push(std::thread::spawn(move || vcpu_thread(&ctl, &vcpu)));
        let (ctl, mem) = (vmm.ctl.clone(), vmm.mem.clone());
        vmm.threads.push(std::thread::spawn(move || device_thread(&ctl, &mem)));
        if boot {
            vmm.resume()?;
        }
        Ok(vmm)
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn resumed_digest(&self) -> Result<([u8; 32], Duration), Error> {
        self.lock()
            .resumed_digest
            .ok_or_else(|| "the guest never resumed here".into())
    }
}

fn slot_of(slot: u32, r: &vm_memory::GuestRegionMmap<AtomicBitmap>, flags: u32) -> kvm_userspace_memory_region {
    kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: r.start_addr().0,
        memory_size: r.len(),
        userspace_addr: r.as_ptr() as u64,
    }
}

/// Flat 32-bit protected mode, paging off: no descriptor tables needed as
/// long as the guest loads no segment.
fn protected_mode(s: &mut kvm_sregs) {
    let seg = |selector, type_| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        ..Default::default()
    };
    s.cs = seg(0x8, 0xb);
    let data = seg(0x10, 0x3);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.cr0 |= 1; // PE
}

fn vcpu_thread(ctl: &(Mutex<Ctl>, Condvar), vcpu: &Mutex<VcpuFd>) {
    let (m, cv) = ctl;
    loop {
        {
            let mut c = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while !c.run || c.stop {
                c.vcpu_parked = true;
                cv.notify_all();
                if c.stop {
                    return;
                }
                c = cv.wait(c).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            c.vcpu_parked = false;
        }
        let mut fd = vcpu.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let failed = match fd.run() {
            Ok(VcpuExit::IoOut(PORT_STEP, _)) => None,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Ok(other) => Some(format!("unexpected vCPU exit {other:?}")),
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        drop(fd);
        if let Some(why) = failed {
            let mut c = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            c.error = Some(why);
            c.run = false;
            c.vcpu_parked = true;
            cv.notify_all();
            return;
        }
    }
}

/// The VMM's device: writes a sequence number into one of its pages through
/// vm-memory (which marks the page in the region's bitmap) every 100 µs
/// while the guest runs, under the control lock, so a pause stops it too.
fn device_thread(ctl: &(Mutex<Ctl>, Condvar), mem: &Memory) {
    let (m, cv) = ctl;
    loop {
        {
            let mut c = m.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            while !c.run && !c.stop {
                c = cv.wait(c).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if c.stop {
                return;
            }
            c.device_writes += 1;
            let n = c.device_writes;
            let at = GuestAddress(DEVICE_BASE + (n % DEVICE_PAGES) * 4096 + (n % 500) * 8);
            if let Err(e) = mem.write_obj(n, at) {
                c.error = Some(format!("device write: {e}"));
                return;
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn control(e: impl std::fmt::Display) -> GuestError {
    GuestError::Control(e.to_string())
}

impl GuestControl for Vmm {
    fn pause(&mut self) -> Result<(), GuestError> {
        let (_, cv) = &*self.ctl;
        let mut c = self.lock();
        c.run = false;
        cv.notify_all();
        let deadline = Instant::now() + PAUSE_LIMIT;
        while !c.vcpu_parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GuestError::Control("the vCPU did not stop within 5 s".into()));
            }
            c = cv
                .wait_timeout(c, left)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        match c.error.take() {
            Some(why) => Err(GuestError::Control(why)),
            None => Ok(()),
        }
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        let first_here = self.incoming && self.lock().resumed_digest.is_none();
        if first_here {
            // The example's check, not a VMM's job: what the guest is about
            // to run on. It is counted in the downtime (`checksum_ms`).
            let at = Instant::now();
            let mem = GuestMemory::from_vm_memory(self.mem.clone()).map_err(control)?;
            let digest = mem.digest();
            self.lock().resumed_digest = Some((digest, at.elapsed()));
        }
        let (_, cv) = &*self.ctl;
        let mut c = self.lock();
        if let Some(why) = c.error.take() {
            return Err(GuestError::Control(why));
        }
        c.run = true;
        cv.notify_all();
        Ok(())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        let fd = self.vcpu.lock().map_err(control)?;
        let state = (fd.get_regs().map_err(control)?, fd.get_sregs().map_err(control)?);
        serde_json::to_vec(&state).map_err(control)
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let (regs, sregs): (kvm_regs, kvm_sregs) =
            serde_json::from_slice(state).map_err(|e| GuestError::BadState(e.to_string()))?;
        let fd = self.vcpu.lock().map_err(control)?;
        fd.set_sregs(&sregs).map_err(control)?;
        fd.set_regs(&regs).map_err(control)
    }

    fn kind(&self) -> GuestKind {
        GuestKind::Kvm
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        {
            let mut c = self.lock();
            c.stop = true;
            self.ctl.1.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// KVM's dirty log through kvm-ioctls: the pages the vCPU wrote.
struct KvmLog {
    vm: Arc<VmFd>,
    /// Each slot's region and its first page in ferry's numbering.
    slots: Vec<(kvm_userspace_memory_region, u64)>,
}

impl KvmLog {
    fn new(vm: Arc<VmFd>, mem: &Memory) -> KvmLog {
        let mut first = 0;
        let mut slots = Vec::new();
        for (slot, r) in (0u32..).zip(mem.iter()) {
            slots.push((slot_of(slot, r, 0), first));
            first += r.len() / 4096;
        }
        KvmLog { vm, slots }
    }

    fn set_logging(&self, on: bool) -> Result<(), DirtyError> {
        for (region, _) in &self.slots {
            let mut r = *region;
            r.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            // SAFETY: the same live mapping the VM was created with; only
            // the flags change.
            unsafe { self.vm.set_user_memory_region(r) }.map_err(|e| os("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }
}

fn os(what: &'static str, e: kvm_ioctls::Error) -> DirtyError {
    DirtyError::Os {
        backend: "kvm-dirty-log",
        what,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

impl DirtyTracker for KvmLog {
    fn start(&mut self) -> Result<(), DirtyError> {
        self.set_logging(true)
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyError> {
        for (r, first) in &self.slots {
            let size = usize::try_from(r.memory_size).unwrap_or(usize::MAX);
            let words = self
                .vm
                .get_dirty_log(r.slot, size)
                .map_err(|e| os("KVM_GET_DIRTY_LOG", e))?;
            out.or_bits_at(*first, &words, r.memory_size / 4096);
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        self.set_logging(false)
    }

    fn name(&self) -> &'static str {
        "kvm-dirty-log"
    }
}

/// A tracker that counts the pages it reports (to show both were needed).
struct Counted<T> {
    inner: T,
    pages: Arc<AtomicU64>,
}

impl<T> Counted<T> {
    fn new(inner: T) -> Counted<T> {
        Counted {
            inner,
            pages: Arc::default(),
        }
    }
}

impl<T: DirtyTracker> DirtyTracker for Counted<T> {
    fn start(&mut self) -> Result<(), DirtyError> {
        self.inner.start()
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyError> {
        let mut mine = DirtyBitmap::new(out.len());
        self.inner.collect(&mut mine)?;
        self.pages.fetch_add(mine.count(), Ordering::Relaxed);
        out.merge(&mine);
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        self.inner.stop()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}
