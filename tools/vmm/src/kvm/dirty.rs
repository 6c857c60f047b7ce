//! Dirty tracking from KVM's dirty log, merged with the VMM's own writes
//! (which KVM does not log).
//!
//! With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (the default where the kernel has
//! it), fetching the log (KVM_GET_DIRTY_LOG) does not write-protect pages
//! again; the tracker then clears (KVM_CLEAR_DIRTY_LOG) exactly the pages it
//! fetched, which re-protects only those, before the engine reads them. A
//! guest write after the clear is in the next fetch. Without the capability,
//! KVM_GET_DIRTY_LOG fetches and re-protects in one call.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};

use super::Core;
use ferry_engine::bitmap::{AtomicBitmap, DirtyBitmap};
use ferry_engine::dirty::{DirtyError, DirtyTracker};

const BACKEND: &str = "kvm-dirty-log";

fn os(what: &'static str, source: std::io::Error) -> DirtyError {
    DirtyError::Os {
        backend: BACKEND,
        what,
        source,
    }
}

const KVMIO: u32 = 0xAE;

/// `_IOW(KVMIO, 0x42, struct kvm_dirty_log)` (16 bytes).
const KVM_GET_DIRTY_LOG: libc::c_ulong = ((1 << 30) | (16 << 16) | (KVMIO << 8) | 0x42) as libc::c_ulong;
/// `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)` (24 bytes).
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = ((3 << 30) | (24 << 16) | (KVMIO << 8) | 0xc0) as libc::c_ulong;

#[repr(C)]
struct DirtyLog {
    slot: u32,
    _pad: u32,
    bitmap: *mut u64,
}

#[repr(C)]
struct ClearDirtyLog {
    slot: u32,
    num_pages: u32,
    first_page: u64,
    bitmap: *mut u64,
}

struct Slot {
    id: u32,
    first_page: u64,
    pages: u64,
    region: kvm_userspace_memory_region,
}

/// A [`DirtyTracker`] over a [`super::KvmVm`]'s memory slots.
pub struct KvmDirtyTracker {
    core: Arc<Core>,
    slots: Vec<Slot>,
    vmm_writes: Arc<AtomicBitmap>,
    manual_protect: bool,
    /// One slot's log, reused every round (one bit per page).
    buf: Vec<u64>,
    logging: bool,
    /// Time of the last fetch and clear, for reports.
    pub last_fetch_us: u64,
    /// Time of the last clear (re-protection), for reports.
    pub last_clear_us: u64,
}

impl std::fmt::Debug for KvmDirtyTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmDirtyTracker")
            .field("slots", &self.slots.len())
            .field("manual_protect", &self.manual_protect)
            .field("logging", &self.logging)
            .finish_non_exhaustive()
    }
}

impl KvmDirtyTracker {
    pub(super) fn new(core: Arc<Core>, vmm_writes: Arc<AtomicBitmap>, manual_protect: bool) -> Self {
        let slots: Vec<Slot> = core
            .mem
            .regions()
            .iter()
            .enumerate()
            .map(|(i, r)| Slot {
                id: u32::try_from(i).unwrap_or(u32::MAX),
                first_page: r.first_page().0,
                pages: r.pages(),
                region: kvm_userspace_memory_region {
                    slot: u32::try_from(i).unwrap_or(u32::MAX),
                    flags: 0,
                    guest_phys_addr: r.guest_base().0,
                    memory_size: r.len_bytes() as u64,
                    userspace_addr: r.host_addr() as u64,
                },
            })
            .collect();
        let words = slots.iter().map(|s| s.pages.div_ceil(64)).max().unwrap_or(0);
        KvmDirtyTracker {
            core,
            slots,
            vmm_writes,
            manual_protect,
            buf: vec![0; crate::usize_from(words)],
            logging: false,
            last_fetch_us: 0,
            last_clear_us: 0,
        }
    }

    fn set_logging(&mut self, on: bool) -> Result<(), DirtyError> {
        for s in &self.slots {
            let mut r = s.region;
            r.flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            // SAFETY: the same live mapping the VM was created with (owned by
            // `core`, which outlives the VM fd); only the flags change.
            unsafe { self.core.vm.set_user_memory_region(r) }.map_err(|e| {
                os(
                    "KVM_SET_USER_MEMORY_REGION (dirty logging flag)",
                    std::io::Error::from_raw_os_error(e.errno()),
                )
            })?;
        }
        self.logging = on;
        Ok(())
    }

    /// Whether fetches leave pages writable until cleared (manual protect).
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }
}

impl DirtyTracker for KvmDirtyTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        // Enabling the log write-protects every page (no INITIALLY_SET):
        // from here on each guest write is logged. Round 1 sends everything,
        // so earlier VMM writes are forgotten.
        self.set_logging(true)?;
        let mut scratch = DirtyBitmap::new(self.vmm_writes.len());
        self.vmm_writes.drain_into(&mut scratch);
        Ok(())
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyError> {
        if out.len() != self.vmm_writes.len() {
            return Err(DirtyError::SizeMismatch {
                want: self.vmm_writes.len(),
                got: out.len(),
            });
        }
        if !self.logging {
            return Err(DirtyError::Unsupported {
                backend: BACKEND,
                why: "collect called before start".into(),
            });
        }
        let fd = self.core.vm.as_raw_fd();
        let (mut fetch_us, mut clear_us) = (0u64, 0u64);
        for s in &self.slots {
            let words = crate::usize_from(s.pages.div_ceil(64));
            let buf = &mut self.buf[..words];
            buf.fill(0);
            let t = std::time::Instant::now();
            let log = DirtyLog {
                slot: s.id,
                _pad: 0,
                bitmap: buf.as_mut_ptr(),
            };
            // SAFETY: `fd` is the VM; `log.bitmap` points to `words` u64s,
            // one bit per page of the slot, which the kernel fills.
            if unsafe { libc::ioctl(fd, KVM_GET_DIRTY_LOG, &log) } != 0 {
                return Err(os("KVM_GET_DIRTY_LOG", std::io::Error::last_os_error()));
            }
            fetch_us += u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            if self.manual_protect && buf.iter().any(|&w| w != 0) {
                let t = std::time::Instant::now();
                let clear = ClearDirtyLog {
                    slot: s.id,
                    num_pages: u32::try_from(s.pages).map_err(|_| DirtyError::Unsupported {
                        backend: BACKEND,
                        why: "a memory slot beyond 2^32 pages".into(),
                    })?,
                    first_page: 0,
                    bitmap: buf.as_mut_ptr(),
                };
                // SAFETY: as above; the kernel reads the bitmap (the pages to
                // clear and re-protect: exactly those just fetched).
                if unsafe { libc::ioctl(fd, KVM_CLEAR_DIRTY_LOG, &clear) } != 0 {
                    return Err(os("KVM_CLEAR_DIRTY_LOG", std::io::Error::last_os_error()));
                }
                clear_us += u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
            }
            out.or_bits_at(s.first_page, buf, s.pages);
        }
        self.vmm_writes.drain_into(out);
        self.last_fetch_us = fetch_us;
        self.last_clear_us = clear_us;
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        if self.logging {
            self.set_logging(false)?;
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        if self.manual_protect {
            "kvm-dirty-log (manual protect)"
        } else {
            "kvm-dirty-log"
        }
    }
}

impl Drop for KvmDirtyTracker {
    fn drop(&mut self) {
        // A guest that keeps running (a failed migration) should not pay for
        // write-protection faults any longer.
        let _ = self.stop();
    }
}
