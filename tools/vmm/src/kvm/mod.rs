//! A minimal KVM VMM: guest RAM from the engine's [`GuestMemory`], one or
//! more vCPUs running ferry's built-in guest program in 64-bit mode at
//! privilege level 3, the [`GuestControl`] the engine drives (pause, save
//! and load vCPU state, resume), and a dirty tracker on KVM's dirty log
//! ([`KvmDirtyTracker`]).
//!
//! Why CPL 3: on the hosts ferry targets, KVM runs guest code natively only
//! when it is 64-bit user-mode code; everything else is emulated. So the VMM
//! builds long mode itself (page tables with the user bit at every level, a
//! GDT and TSS, EFER.LME/LMA) and starts the guest directly in user mode with
//! IOPL 3, so that its `out` instructions exit to the VMM.
//!
//! The guest program (`guest.S`, embedded as `guest.bin`) fills its memory
//! with pseudo-random data, then writes a hot set at a set pace, beats a
//! heartbeat, and on request computes a checksum of its own memory (see the
//! source for the exact layout).
//!
//! Each vCPU runs on its own thread. Pausing sets `immediate_exit` in the
//! vCPU's `kvm_run` and sends the thread a signal, so a vCPU inside the
//! guest leaves at once and one about to enter does not enter.
//!
//! No in-kernel devices are created (no irqchip, no PIT): the vCPUs' state
//! is the whole device state.

mod boot;
mod check;
mod control;
mod dirty;
pub mod state;
mod throttle;
mod vcpu;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_segment, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use self::boot::{long_mode_sregs, write_tables};
pub use self::check::{GuestChecksum, MemoryCheck};
pub use self::dirty::KvmDirtyTracker;
use self::state::{VcpuState, VmState};
pub use self::vcpu::Monitor;
use self::vcpu::{install_kick_handler, vcpu_thread, Ctl, ImmediateExit, Shared, Vcpu, Want};
use ferry_engine::bitmap::AtomicBitmap;
use ferry_engine::guest::{GuestControl, GuestError};
use ferry_engine::memory::{GuestMemory, PageIndex, PAGE_SIZE_U64};

/// The guest program, assembled from `guest.S` (beside this file).
pub const GUEST_PROGRAM: &[u8] = include_bytes!("guest.bin");

/// Most vCPUs a ferry VM has.
pub const MAX_VCPUS: u32 = 16;

// Guest-physical layout (identity mapped). The low 2 MiB hold the VMM's
// tables, the mailbox and the program; the guest's data starts at 2 MiB.
const GDT: u64 = 0x0800;
const TSS: u64 = 0x0900;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
/// Guest-physical address of the mailbox: one 64-byte slot per vCPU.
pub const MAILBOX: u64 = 0x5000;
const PARAMS: u64 = 0x5800;
const CODE: u64 = 0x6000;
const PD_BASE: u64 = 0x10_0000;
/// Where the guest's data region (filled, written and checksummed) starts.
pub const DATA_START: u64 = 0x20_0000;
/// Largest guest: one page directory (1 GiB) per page between PD_BASE and
/// DATA_START.
pub const MAX_MEMORY_BYTES: u64 = (DATA_START - PD_BASE) / 4096 * (1 << 30);
/// Smallest guest.
pub const MIN_MEMORY_BYTES: u64 = 2 * DATA_START;

// Slot fields (see guest.S).
const S_HEARTBEAT: u64 = 0x00;
const S_REQUEST: u64 = 0x08;
const S_CHECKSUM: u64 = 0x18;
const S_FILLED: u64 = 0x20;
const S_WRITES: u64 = 0x30;

const PORT_HEARTBEAT: u16 = 0x10;
const PORT_CHECKSUM: u16 = 0x11;
const PORT_FILLED: u16 = 0x12;
const PORT_IDLE: u16 = 0x13;
/// Shorter idle waits are not worth a sleep (the timer's own slack is ~50 µs).
const MIN_IDLE_NS: u64 = 20_000;
/// Longest single idle sleep.
const MAX_IDLE_NS: u64 = 10_000_000;

const SEL_USER_DATA: u16 = 0x18 | 3;
const SEL_USER_CODE: u16 = 0x20 | 3;
const SEL_TSS: u16 = 0x28;

/// MSRs carried with the vCPU state (those the host supports): the TSC, so
/// the guest's clock goes on where it stopped, and the syscall/segment MSRs
/// a user-mode program's state can depend on.
const MSRS_TO_SAVE: [u32; 10] = [
    0x10,        // IA32_TSC
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x277,       // PAT
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
];

/// How the built-in guest program behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestProgram {
    /// Bytes of the hot set vCPU 0 keeps writing (from the start of the data
    /// region).
    pub hot_set_bytes: u64,
    /// Hot-set writes per second (one 8-byte word into one page each; 0:
    /// none).
    pub writes_per_s: u64,
    /// Heartbeats per second.
    pub heartbeat_hz: u64,
    /// Seed of the pseudo-random fill (non-zero).
    pub seed: u64,
}

impl Default for GuestProgram {
    fn default() -> Self {
        GuestProgram {
            hot_set_bytes: 64 << 20,
            writes_per_s: 20_000,
            heartbeat_hz: 1000,
            seed: 0x00f3_441e_d00d_5eed,
        }
    }
}

/// Errors of the VMM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// /dev/kvm or an ioctl failed.
    #[error("KVM: {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The kernel's error.
        source: kvm_ioctls::Error,
    },
    /// The configuration cannot work.
    #[error("VM configuration: {0}")]
    Config(String),
    /// The guest did not do what was asked in time, or crashed.
    #[error("guest: {0}")]
    Guest(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Kvm { what, source }
}

impl From<KvmError> for GuestError {
    fn from(e: KvmError) -> Self {
        GuestError::Control(e.to_string())
    }
}

/// Runs a KVM ioctl again when a signal interrupted it (KVM_CREATE_VM was
/// seen to fail with EINTR under load; nothing was created then).
fn retry_eintr<T>(mut f: impl FnMut() -> Result<T, kvm_ioctls::Error>) -> Result<T, kvm_ioctls::Error> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.errno() == libc::EINTR && tries < 100 => tries += 1,
            r => return r,
        }
    }
}

/// Whether this host can run ferry's KVM guests: /dev/kvm opens, a VM can be
/// made, and `immediate_exit` is supported.
pub fn available() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm unavailable ({e})"))?;
    let vm = retry_eintr(|| kvm.create_vm()).map_err(|e| format!("KVM cannot create a VM ({e})"))?;
    if !vm.check_extension(kvm_ioctls::Cap::ImmediateExit) {
        return Err("KVM lacks KVM_CAP_IMMEDIATE_EXIT (Linux >= 4.11)".into());
    }
    Ok(())
}

/// The VM fd and the memory it maps: the fd is dropped first, so KVM never
/// holds an address whose mapping is gone.
struct Core {
    vm: VmFd,
    mem: Arc<GuestMemory>,
}

impl Core {
    /// The 8-byte word of guest memory at `gpa` (8-aligned: the mailbox,
    /// the parameters, or a test's deliberate corruption), for atomic access
    /// shared with the guest.
    fn word(&self, gpa: u64) -> &AtomicU64 {
        assert!(gpa.is_multiple_of(8), "guest word at unaligned address {gpa:#x}");
        let page = self
            .mem
            .run_ptr(PageIndex(gpa / PAGE_SIZE_U64), 1)
            .expect("guest words are inside the checked guest memory");
        // SAFETY: `gpa` is 8-aligned and its page is inside a mapping (run_ptr
        // checked it) that lives as long as `self`; the guest accesses its
        // words with aligned 8-byte moves, so atomic access here is sound.
        unsafe { AtomicU64::from_ptr(page.add(crate::usize_from(gpa % PAGE_SIZE_U64)).cast::<u64>()) }
    }
}

/// One step of the guest's fill sequence (xorshift64, as in guest.S).
pub fn fill_step(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A running (or incoming) KVM virtual machine.
pub struct KvmVm {
    vcpus: Vec<Vcpu>,
    core: Arc<Core>,
    kvm: Kvm,
    vmm_writes: Arc<AtomicBitmap>,
    tsc_khz: u32,
    manual_protect: bool,
    checksum_seq: u64,
    /// On pause, first have vCPU 0 checksum its memory and stop right after
    /// (the engine's downtime starts when `pause` returns).
    pub checksum_at_pause: bool,
    /// On resume, have vCPU 0 checksum its memory before it does anything else.
    pub checksum_at_resume: bool,
    /// With `checksum_at_resume`: stop vCPU 0 again right after that
    /// checksum, so the caller can inspect the memory (then `resume`).
    pub park_after_resume_checksum: bool,
    paused: bool,
    stop_latency: Duration,
    pause_checksum: Option<u64>,
    heartbeat_at_pause: Option<u64>,
    /// The migration's throttle, while one is on.
    throttler: Option<throttle::Throttler>,
}

impl std::fmt::Debug for KvmVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVm")
            .field("vcpus", &self.vcpus.len())
            .field("memory_bytes", &self.core.mem.size_bytes())
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

fn check_memory(mem: &GuestMemory) -> Result<(), KvmError> {
    let size = mem.size_bytes();
    if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&size) || !size.is_multiple_of(DATA_START) {
        return Err(KvmError::Config(format!(
            "guest memory must be a multiple of 2 MiB between {} MiB and {} GiB, not {size} bytes",
            MIN_MEMORY_BYTES >> 20,
            MAX_MEMORY_BYTES >> 30
        )));
    }
    if mem.regions().first().map(|r| r.guest_base().0) != Some(0) {
        return Err(KvmError::Config(
            "guest memory must start at guest-physical address 0".into(),
        ));
    }
    Ok(())
}

impl KvmVm {
    fn create(mem: Arc<GuestMemory>, vcpus: u32, running: bool) -> Result<KvmVm, KvmError> {
        check_memory(&mem)?;
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(KvmError::Config(format!("vCPUs must be 1..={MAX_VCPUS}, not {vcpus}")));
        }
        install_kick_handler();
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = retry_eintr(|| kvm.create_vm()).map_err(kvm_err("create VM"))?;
        // Manual dirty-log protection: fetching the log does not re-protect
        // pages, clearing does, for exactly the pages the caller will send.
        let protect_modes = vm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        let manual_protect =
            u32::try_from(protect_modes).unwrap_or(0) & kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0;
        if manual_protect {
            let mut cap = kvm_bindings::kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            vm.enable_cap(&cap)
                .map_err(kvm_err("enable manual dirty-log protection"))?;
        }
        let core = Arc::new(Core { vm, mem });
        for (slot, r) in core.mem.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).map_err(|_| KvmError::Config("too many memory regions".into()))?,
                flags: 0,
                guest_phys_addr: r.guest_base().0,
                memory_size: r.len_bytes() as u64,
                userspace_addr: r.host_addr() as u64,
            };
            // SAFETY: the region is a live shared mapping of `len_bytes`
            // bytes owned by `core.mem`, which `Core` keeps alive for as long
            // as the VM fd (dropped first) exists.
            unsafe { core.vm.set_user_memory_region(region) }.map_err(kvm_err("map guest memory"))?;
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read supported CPUID"))?;
        let vmm_writes = Arc::new(AtomicBitmap::new(core.mem.pages()));
        let mut out = KvmVm {
            vcpus: Vec::new(),
            core,
            kvm,
            vmm_writes,
            tsc_khz: 0,
            manual_protect,
            checksum_seq: 0,
            checksum_at_pause: false,
            checksum_at_resume: false,
            park_after_resume_checksum: false,
            paused: !running,
            stop_latency: Duration::ZERO,
            pause_checksum: None,
            heartbeat_at_pause: None,
            throttler: None,
        };
        for id in 0..vcpus {
            let fd = retry_eintr(|| out.core.vm.create_vcpu(u64::from(id))).map_err(kvm_err("create vCPU"))?;
            fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
            if id == 0 {
                out.tsc_khz = fd.get_tsc_khz().map_err(kvm_err("read the TSC frequency"))?;
            }
            out.spawn(u8::try_from(id).unwrap_or(u8::MAX), fd, running);
        }
        Ok(out)
    }

    fn spawn(&mut self, id: u8, mut fd: VcpuFd, running: bool) {
        let ie: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
        let shared = Arc::new(Shared {
            id,
            ctl: Mutex::new(Ctl {
                want: if running { Want::Run } else { Want::Pause },
                parked: false,
                exited: false,
                error: None,
                runs: 0,
                tid: None,
                park_on_checksum: false,
                checksum: None,
                filled: false,
                parked_at: None,
                throttle: throttle::VcpuThrottle::default(),
            }),
            cv: Condvar::new(),
            heartbeat: AtomicU64::new(0),
            first_heartbeat: AtomicU64::new(0),
            tsc_khz: self.tsc_khz.max(1),
            // SAFETY: `ie` points into the kvm_run mapping, valid and
            // aligned for a byte; it is only ever accessed atomically
            // from now on (see `ImmediateExit`).
            immediate_exit: ImmediateExit(unsafe { AtomicU8::from_ptr(ie) }),
        });
        let fd = Arc::new(Mutex::new(fd));
        let (s2, fd2, core) = (shared.clone(), fd.clone(), self.core.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_thread(&s2, &fd2, &core))
            .ok();
        if thread.is_none() {
            let mut c = shared.lock();
            c.exited = true;
            c.error = Some("could not start the vCPU thread".into());
        }
        self.vcpus.push(Vcpu { shared, fd, thread });
    }

    /// Creates a VM over `mem`, writes the page tables, the guest program and
    /// its parameters into it, and starts `vcpus` vCPUs. vCPU 0 first fills
    /// the data region ([`KvmVm::wait_filled`]).
    pub fn boot(mem: Arc<GuestMemory>, vcpus: u32, program: &GuestProgram) -> Result<KvmVm, KvmError> {
        check_memory(&mem)?;
        if program.seed == 0 || program.heartbeat_hz == 0 {
            return Err(KvmError::Config(
                "the seed and the heartbeat rate must be non-zero".into(),
            ));
        }
        write_tables(&mem)?;
        // Registers are set before the vCPU threads start (they start parked).
        let mut vm = KvmVm::create(mem, vcpus, false)?;
        let size = vm.core.mem.size_bytes();
        let hot = program.hot_set_bytes.min(size - DATA_START) / PAGE_SIZE_U64;
        let tsc_hz = u64::from(vm.tsc_khz) * 1000;
        let params = [
            DATA_START,
            size,
            DATA_START,
            hot,
            if program.writes_per_s == 0 || hot == 0 {
                0
            } else {
                (tsc_hz / program.writes_per_s).max(1)
            },
            (tsc_hz / program.heartbeat_hz).max(1),
            program.seed,
        ];
        for (i, p) in params.iter().enumerate() {
            vm.write_u64(PARAMS + 8 * i as u64, *p);
        }
        for v in &vm.vcpus {
            let f = v.fd();
            f.set_sregs(&long_mode_sregs(&f.get_sregs().map_err(kvm_err("read sregs"))?))
                .map_err(kvm_err("set sregs"))?;
            let regs = kvm_bindings::kvm_regs {
                rip: CODE,
                rdi: u64::from(v.shared.id),
                rflags: 0x3002, // IOPL 3, reserved bit 1
                ..Default::default()
            };
            f.set_regs(&regs).map_err(kvm_err("set regs"))?;
        }
        vm.resume_all()?;
        vm.paused = false;
        Ok(vm)
    }

    /// Creates a VM over `mem` whose vCPUs wait for state from a migration:
    /// nothing runs until [`GuestControl::load_state`] and
    /// [`GuestControl::resume`].
    pub fn incoming(mem: Arc<GuestMemory>, vcpus: u32) -> Result<KvmVm, KvmError> {
        KvmVm::create(mem, vcpus, false)
    }

    /// The guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.core.mem
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// A dirty tracker on this VM's dirty log plus the VMM's own writes.
    pub fn dirty_tracker(&self) -> KvmDirtyTracker {
        KvmDirtyTracker::new(self.core.clone(), self.vmm_writes.clone(), self.manual_protect)
    }

    fn slot(id: u8) -> u64 {
        MAILBOX + 64 * u64::from(id)
    }

    fn read_u64(&self, gpa: u64) -> u64 {
        self.core.word(gpa).load(Ordering::SeqCst)
    }

    /// Feeds the guest's data region to `f` in order, 1 MiB at a time
    /// (address of the first byte, bytes).
    fn scan_data(&self, mut f: impl FnMut(u64, &[u8])) {
        let (mut at, end) = (self.read_u64(PARAMS), self.read_u64(PARAMS + 8));
        let mut buf = vec![0u8; 1 << 20];
        while at < end {
            let n = buf.len().min(crate::usize_from(end - at));
            self.core.mem.read_into(at, &mut buf[..n]);
            f(at, &buf[..n]);
            at += n as u64;
        }
    }

    /// Writes a word of guest memory as the VMM, marking its page dirty for
    /// the tracker (KVM's log does not see the VMM's writes).
    fn write_u64(&self, gpa: u64, v: u64) {
        self.core.word(gpa).store(v, Ordering::SeqCst);
        self.vmm_writes.mark(gpa / PAGE_SIZE_U64);
    }

    /// vCPU 0's heartbeat as it last reported it.
    pub fn heartbeat(&self) -> u64 {
        self.vcpus
            .first()
            .map_or(0, |v| v.shared.heartbeat.load(Ordering::SeqCst))
    }

    /// Checks that the guest's memory is intact: pauses the guest with a
    /// checksum of its own, computes the same on the host, checks that every
    /// page beyond the hot set still holds the fill sequence, and resumes
    /// the guest. For a guest that keeps running after a failed migration.
    pub fn check_memory(&mut self) -> Result<MemoryCheck, KvmError> {
        let was = std::mem::replace(&mut self.checksum_at_pause, true);
        let paused = GuestControl::pause(self);
        self.checksum_at_pause = was;
        paused.map_err(|e| KvmError::Guest(e.to_string()))?;
        let guest_checksum = self
            .pause_checksum
            .ok_or_else(|| KvmError::Guest("no checksum at pause".into()))?;
        let p = |i: u64| self.read_u64(PARAMS + 8 * i);
        let (start, end, hot_start, hot_pages, seed) = (p(0), p(1), p(2), p(3), p(6));
        let hot_end = hot_start + hot_pages * PAGE_SIZE_U64;
        let mut sum = GuestChecksum::default();
        let (mut x, mut fill_intact) = (seed, true);
        self.scan_data(|at, bytes| {
            sum.update(bytes);
            for (i, w) in bytes.chunks_exact(8).enumerate() {
                x = fill_step(x);
                if at + 8 * i as u64 >= hot_end && u64::from_le_bytes(w.try_into().unwrap_or([0; 8])) != x {
                    fill_intact = false;
                }
            }
        });
        let resumed = self.resume_all();
        resumed?;
        Ok(MemoryCheck {
            guest_checksum,
            host_checksum: sum.value(),
            fill_pages_checked: end.saturating_sub(hot_end.max(start)) / PAGE_SIZE_U64,
            fill_intact,
        })
    }

    /// A handle that reads the guest's heartbeat and write count from
    /// another thread (while the VM itself is being migrated).
    pub fn monitor(&self) -> Option<Monitor> {
        self.vcpus.first().map(|v| Monitor {
            vcpu0: v.shared.clone(),
            _fd: v.fd.clone(),
            core: self.core.clone(),
        })
    }

    /// The first heartbeat vCPU 0 beat in this VM (at a destination: the
    /// first after the migration).
    pub fn first_heartbeat(&self) -> Option<u64> {
        self.vcpus
            .first()
            .map(|v| v.shared.first_heartbeat.load(Ordering::SeqCst))
            .filter(|&h| h != 0)
    }

    /// Hot-set writes the guest has made.
    pub fn guest_writes(&self) -> u64 {
        self.read_u64(Self::slot(0) + S_WRITES)
    }

    /// KVM_RUN calls made so far, all vCPUs.
    pub fn runs(&self) -> u64 {
        self.vcpus.iter().map(|v| v.shared.lock().runs).sum()
    }

    /// Waits until vCPU 0 has filled its memory.
    pub fn wait_filled(&self, limit: Duration) -> Result<(), KvmError> {
        let v = self.vcpu0()?;
        if self.read_u64(Self::slot(0) + S_FILLED) != 0 {
            return Ok(());
        }
        v.shared.wait(limit, |c| c.filled).map(drop)
    }

    /// Waits until vCPU 0's heartbeat passes `beyond`; returns it.
    pub fn wait_heartbeat(&self, beyond: u64, limit: Duration) -> Result<u64, KvmError> {
        let v = self.vcpu0()?;
        let deadline = Instant::now() + limit;
        loop {
            let hb = self.heartbeat();
            if hb > beyond {
                return Ok(hb);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(KvmError::Guest(format!(
                    "no heartbeat beyond {beyond} within {limit:?} (vCPU 0 at {hb})"
                )));
            }
            // Woken by the next heartbeat (or any other vCPU event).
            let c = v.shared.lock();
            if c.exited {
                drop(c);
                return Err(v
                    .shared
                    .wait(Duration::ZERO, |_| false)
                    .err()
                    .unwrap_or_else(|| KvmError::Guest("vCPU 0 stopped".into())));
            }
            let _ = v.shared.cv.wait_timeout(c, left.min(Duration::from_millis(50)));
        }
    }

    fn vcpu0(&self) -> Result<&Vcpu, KvmError> {
        self.vcpus
            .first()
            .ok_or_else(|| KvmError::Config("the VM has no vCPU".into()))
    }

    /// Asks the running guest for a checksum of its data region, computed by
    /// the guest itself, and waits for it.
    pub fn request_checksum(&mut self, limit: Duration) -> Result<u64, KvmError> {
        let seq = self.post_checksum_request(false)?;
        let v = self.vcpu0()?;
        let c = v.shared.wait(limit, |c| c.checksum.is_some())?;
        c.checksum
            .ok_or_else(|| KvmError::Guest(format!("checksum request {seq} not answered")))
    }

    /// Bumps the request counter in vCPU 0's slot; the answer lands in
    /// `Ctl::checksum`.
    fn post_checksum_request(&mut self, park: bool) -> Result<u64, KvmError> {
        let slot = Self::slot(0);
        self.checksum_seq = self.read_u64(slot + S_REQUEST).max(self.checksum_seq) + 1;
        {
            let v = self.vcpu0()?;
            let mut c = v.shared.lock();
            c.checksum = None;
            c.park_on_checksum = park;
        }
        self.write_u64(slot + S_REQUEST, self.checksum_seq);
        // Wake vCPU 0 if it idles in the VMM, so it sees the request now.
        if let Some(v) = self.vcpus.first() {
            v.shared.cv.notify_all();
        }
        Ok(self.checksum_seq)
    }

    /// Posts a checksum request without waiting (tests of the VMM-write
    /// tracking).
    #[cfg(test)]
    fn request_checksum_async_for_test(&mut self) {
        let _ = self.post_checksum_request(false);
    }

    /// The guest's own checksum taken when it was paused for migration
    /// (with [`KvmVm::checksum_at_pause`]).
    pub fn checksum_at_pause_value(&self) -> Option<u64> {
        self.pause_checksum
    }

    /// vCPU 0's heartbeat when the guest was last paused.
    pub fn heartbeat_at_pause(&self) -> Option<u64> {
        self.heartbeat_at_pause
    }

    /// The guest program's checksum of the data region, computed by the VMM
    /// (for a guest that was paused without computing its own).
    pub fn host_checksum(&self) -> u64 {
        let mut sum = GuestChecksum::default();
        self.scan_data(|_, bytes| sum.update(bytes));
        sum.value()
    }

    /// The checksum vCPU 0 reported last, if any since the last request.
    pub fn last_checksum(&self) -> Option<u64> {
        self.vcpus.first().and_then(|v| v.shared.lock().checksum)
    }

    /// Waits for the checksum requested at resume (with
    /// [`KvmVm::checksum_at_resume`]); with
    /// [`KvmVm::park_after_resume_checksum`], vCPU 0 is parked when this
    /// returns.
    pub fn wait_resume_checksum(&self, limit: Duration) -> Result<u64, KvmError> {
        let park = self.park_after_resume_checksum;
        let v = self.vcpu0()?;
        let c = v.shared.wait(limit, |c| c.checksum.is_some() && (!park || c.parked))?;
        c.checksum.ok_or_else(|| KvmError::Guest("no checksum".into()))
    }

    fn kick(v: &Vcpu, c: &mut Ctl) {
        v.shared.kick(c);
    }

    fn pause_all(&mut self, limit: Duration) -> Result<(), KvmError> {
        for v in &self.vcpus {
            let mut c = v.shared.lock();
            if c.want == Want::Run {
                c.want = Want::Pause;
                Self::kick(v, &mut c);
                // A vCPU idling in the VMM wakes up too.
                v.shared.cv.notify_all();
            }
        }
        for v in &self.vcpus {
            drop(v.shared.wait(limit, |c| c.parked)?);
        }
        self.paused = true;
        Ok(())
    }

    fn resume_all(&mut self) -> Result<(), KvmError> {
        for v in &self.vcpus {
            let mut c = v.shared.lock();
            if c.exited {
                return Err(KvmError::Guest(format!(
                    "vCPU {} has stopped: {}",
                    v.shared.id,
                    c.error.as_deref().unwrap_or("shut down")
                )));
            }
            c.want = Want::Run;
            v.shared.cv.notify_all();
        }
        self.paused = false;
        Ok(())
    }

    /// Time vCPU 0 has spent held out of the guest by the throttle, in
    /// total: what the throttle took away, whatever the guest's work per
    /// unit of running time turns out to be on this host.
    pub fn throttle_waited(&self) -> Duration {
        self.vcpus
            .first()
            .map_or(Duration::ZERO, |v| v.shared.lock().throttle.waited)
    }

    /// The migration's throttle in force (0: none).
    pub fn throttle(&self) -> f64 {
        self.throttler.as_ref().map_or(0.0, throttle::Throttler::fraction)
    }

    /// Stops every vCPU thread for good (the VM can never run again) and
    /// returns the KVM_RUN calls they made.
    pub fn shut_down(&mut self) -> u64 {
        self.throttler = None;
        for v in &self.vcpus {
            let mut c = v.shared.lock();
            c.want = Want::Stop;
            Self::kick(v, &mut c);
            v.shared.cv.notify_all();
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                let _ = t.join();
            }
        }
        self.paused = true;
        self.runs()
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        self.shut_down();
    }
}

#[cfg(test)]
mod tests;
