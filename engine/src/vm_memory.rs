//! rust-vmm guest memory: migrate the [`GuestMemoryMmap`] a VMM built with
//! `vm-memory` (the memory crate of Cloud Hypervisor, Firecracker and
//! Dragonball) without copying it into ferry's type, and use its
//! [`AtomicBitmap`] as the tracker of the VMM's own writes.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use vm_memory::{bitmap::AtomicBitmap, GuestAddress, GuestMemoryMmap};
//! use ferry_engine::vm_memory::VmMemoryTracker;
//!
//! // The VMM's memory, as it already has it: every write it makes through
//! // vm-memory (`write_slice`, `write_obj`, a virtio queue) marks the bitmap.
//! let vmm_mem: Arc<GuestMemoryMmap<AtomicBitmap>> =
//!     Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)])?);
//! // The same pages, as the engine migrates them (no copy).
//! let mem = ferry_engine::GuestMemory::from_vm_memory(vmm_mem.clone())?;
//! // The VMM's writes; KVM's dirty log covers the vCPUs' (join both with
//! // `ferry_engine::dirty::Union`).
//! let vmm_writes = VmMemoryTracker::new(vmm_mem)?;
//! # Ok(()) }
//! ```
//!
//! What the adapter relies on, checked where it can be: each region is one
//! readable and writable mapping (refused otherwise: [`VmMemoryError::NotWritable`]),
//! and it stays mapped while the `Arc<GuestMemoryMmap>` the adapter holds
//! lives: vm-memory unmaps a region only when the last reference to it
//! drops, and a `GuestMemoryMmap` never changes its regions (a VMM that hot
//! plugs memory builds a new one; migrate the one that was current when the
//! migration started, and plug nothing during it). Page order and guest
//! addresses are vm-memory's (regions sorted by guest address, pages
//! numbered across them); a destination must build the same layout.
//!
//! The engine reads and writes the mapping directly, as KVM does, so its
//! writes at the destination do not mark the destination's bitmap (nothing
//! tracks there), and it never forms a Rust reference to guest memory.

use std::sync::Arc;

use thiserror::Error;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use crate::bitmap::DirtyBitmap;
use crate::dirty::{DirtyError, DirtyTracker};
use crate::memory::{BorrowedRegion, GuestMemory, MemoryError, PAGE_SIZE_U64};

/// Errors of adapting vm-memory guest memory.
#[derive(Debug, Error)]
pub enum VmMemoryError {
    /// A region is mapped without read and write access.
    #[error(
        "vm-memory region at guest address {guest_base:#x} is not mapped readable and writable \
         (prot {prot:#x}); map guest memory PROT_READ | PROT_WRITE to migrate it"
    )]
    NotWritable {
        /// The region's guest-physical base.
        guest_base: u64,
        /// Its protection flags.
        prot: i32,
    },
    /// A region's dirty bitmap does not have one bit per 4 KiB page.
    #[error(
        "the dirty bitmap of the vm-memory region at guest address {guest_base:#x} has {bits} bits \
         for {pages} pages of 4 KiB; build the AtomicBitmap with a 4 KiB page size"
    )]
    BitmapPageSize {
        /// The region's guest-physical base.
        guest_base: u64,
        /// Bits in its bitmap.
        bits: usize,
        /// 4 KiB pages in the region.
        pages: u64,
    },
    /// The regions do not form a layout the engine migrates (unaligned,
    /// overlapping, or not whole pages).
    #[error(transparent)]
    Layout(#[from] MemoryError),
}

impl GuestMemory {
    /// The guest memory of `vmm_mem`, shared, not copied: what the VMM's
    /// vCPUs and devices write is what the engine sends, and what the engine
    /// receives is what they read. The engine keeps `vmm_mem` alive while
    /// this lives. Works for anonymous and file-backed regions (shared file
    /// mappings also tell the sender which pages were never written).
    pub fn from_vm_memory<B>(vmm_mem: Arc<GuestMemoryMmap<B>>) -> Result<GuestMemory, VmMemoryError>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let mut parts = Vec::new();
        for r in vmm_mem.iter() {
            let guest_base = r.start_addr().0;
            let want = libc::PROT_READ | libc::PROT_WRITE;
            if r.prot() & want != want {
                return Err(VmMemoryError::NotWritable {
                    guest_base,
                    prot: r.prot(),
                });
            }
            let shared = r.flags() & libc::MAP_SHARED != 0;
            parts.push(BorrowedRegion {
                guest_base: crate::GuestAddress(guest_base),
                host: r.as_ptr(),
                len: r.size(),
                file: r.file_offset().filter(|_| shared).map(|f| (f.arc().clone(), f.start())),
            });
        }
        let owner: Arc<dyn Send + Sync> = vmm_mem;
        // SAFETY: every part is one of `owner`'s regions, mapped readable and
        // writable (checked above) at `as_ptr()` for `size()` bytes; vm-memory
        // unmaps a region only when its `MmapRegion` drops, which `owner`
        // (held by every region of the result) prevents, and a
        // `GuestMemoryMmap` never swaps or shrinks its regions.
        Ok(unsafe { GuestMemory::from_borrowed(parts, owner) }?)
    }
}

/// The tracker of the VMM's own writes to vm-memory guest memory: drains
/// each region's [`AtomicBitmap`] (which vm-memory marks on every write
/// through its API) into the engine's bitmap. vCPU writes do not pass
/// through vm-memory: pair it with KVM's dirty log in a
/// [`Union`](crate::dirty::Union).
#[derive(Debug)]
pub struct VmMemoryTracker {
    mem: Arc<GuestMemoryMmap<AtomicBitmap>>,
    /// Each region's first page in the engine's numbering, and its pages.
    regions: Vec<(u64, u64)>,
    pages: u64,
}

impl VmMemoryTracker {
    /// A tracker over `mem`'s bitmaps (checked: one bit per 4 KiB page).
    pub fn new(mem: Arc<GuestMemoryMmap<AtomicBitmap>>) -> Result<VmMemoryTracker, VmMemoryError> {
        let mut regions = Vec::new();
        let mut pages = 0u64;
        for r in mem.iter() {
            let n = r.len() / PAGE_SIZE_U64;
            let bits = marks(r).len();
            if bits as u64 != n || r.len() % PAGE_SIZE_U64 != 0 {
                return Err(VmMemoryError::BitmapPageSize {
                    guest_base: r.start_addr().0,
                    bits,
                    pages: n,
                });
            }
            regions.push((pages, n));
            pages += n;
        }
        Ok(VmMemoryTracker { mem, regions, pages })
    }
}

/// A region's whole bitmap (the trait's `bitmap()` is a slice of it).
fn marks(r: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    vm_memory::MmapRegion::bitmap(r)
}

impl DirtyTracker for VmMemoryTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        // Marks made before tracking started do not matter: round 1 sends
        // every page.
        for r in self.mem.iter() {
            marks(r).reset();
        }
        Ok(())
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyError> {
        if out.len() != self.pages {
            return Err(DirtyError::SizeMismatch {
                want: self.pages,
                got: out.len(),
            });
        }
        for (r, &(first, pages)) in self.mem.iter().zip(&self.regions) {
            // One atomic swap per word: a write racing with the drain lands
            // in this collect or the next, never in neither.
            let words = marks(r).get_and_reset();
            out.or_bits_at(first, &words, pages);
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "vm-memory-bitmap"
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, FileOffset, GuestAddress};

    use super::*;
    use crate::memory::{PageIndex, PAGE_SIZE};

    const MIB: usize = 1 << 20;

    fn two_regions() -> Arc<GuestMemoryMmap<AtomicBitmap>> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MIB), (GuestAddress(0x10_0000), 2 * MIB)])
                .expect("anonymous vm-memory regions"),
        )
    }

    #[test]
    fn the_engine_sees_the_vmms_pages_and_the_vmm_sees_the_engines() {
        let vmm = two_regions();
        let mem = GuestMemory::from_vm_memory(vmm.clone()).unwrap();
        assert_eq!(mem.pages(), 3 * 256);
        assert_eq!(mem.regions()[1].guest_base().0, 0x10_0000);
        assert_eq!(mem.regions()[1].first_page(), PageIndex(256));
        assert!(mem.regions()[0].file().is_none(), "anonymous memory has no file");
        // A VMM write lands in the engine's page of the same guest address.
        vmm.write_obj(0xdead_beef_u64, GuestAddress(0x10_0000 + 5 * 4096 + 8))
            .unwrap();
        let mut page = [0u8; PAGE_SIZE];
        mem.read_page(PageIndex(256 + 5), &mut page);
        assert_eq!(u64::from_le_bytes(page[8..16].try_into().unwrap()), 0xdead_beef);
        // An engine write (a received page) is what the VMM reads.
        assert!(mem.write_pages(PageIndex(3), &[0x5a; PAGE_SIZE]));
        let got: u32 = vmm.read_obj(GuestAddress(3 * 4096 + 100)).unwrap();
        assert_eq!(got, 0x5a5a_5a5a);
        // The engine keeps the VMM's memory alive on its own.
        drop(vmm);
        assert!(!mem.page_is_zero(PageIndex(3)));
    }

    #[test]
    fn the_bitmap_tracker_reports_exactly_the_vmms_writes() {
        let vmm = two_regions();
        let mem = GuestMemory::from_vm_memory(vmm.clone()).unwrap();
        let mut t = VmMemoryTracker::new(vmm.clone()).unwrap();
        vmm.write_obj(1u8, GuestAddress(0)).unwrap();
        t.start().unwrap();
        // Page 1 of region 0; pages 0..=1 of region 1 (a write across a
        // page boundary); the last page of guest memory.
        vmm.write_obj(7u64, GuestAddress(4096 + 64)).unwrap();
        vmm.write_slice(&[9u8; 16], GuestAddress(0x10_0000 + 4096 - 8)).unwrap();
        vmm.write_obj(3u8, GuestAddress(0x10_0000 + 2 * MIB as u64 - 1))
            .unwrap();
        let mut out = DirtyBitmap::new(mem.pages());
        t.collect(&mut out).unwrap();
        let got: Vec<u64> = (0..out.len()).filter(|p| out.get(*p)).collect();
        assert_eq!(
            got,
            vec![1, 256, 257, 3 * 256 - 1],
            "the write before start is not reported"
        );
        let mut again = DirtyBitmap::new(mem.pages());
        t.collect(&mut again).unwrap();
        assert_eq!(again.count(), 0, "a collect resets what it reported");
        assert!(matches!(
            t.collect(&mut DirtyBitmap::new(7)),
            Err(DirtyError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn a_shared_file_region_reports_its_never_written_pages_as_holes() {
        let mut f = tempfile_in_memfd();
        f.write_all(&[0u8; 0]).unwrap();
        f.set_len(2 * MIB as u64).unwrap();
        let f = Arc::new(f);
        let vmm: Arc<GuestMemoryMmap<AtomicBitmap>> = Arc::new(
            GuestMemoryMmap::from_ranges_with_files([
                (GuestAddress(0), MIB, Some(FileOffset::from_arc(f.clone(), MIB as u64))),
                (GuestAddress(0x40_0000), MIB, None),
            ])
            .unwrap(),
        );
        vmm.write_obj(1u8, GuestAddress(2 * 4096)).unwrap();
        let mem = GuestMemory::from_vm_memory(vmm).unwrap();
        assert_eq!(mem.regions()[0].file().map(|(_, off)| off), Some(MIB as u64));
        let mut holes = DirtyBitmap::new(mem.pages());
        mem.holes_into(&mut holes).unwrap();
        // The file region: every page but page 2 is a hole; the anonymous
        // region reports none (every page is read).
        let got: Vec<u64> = (0..mem.pages()).filter(|p| holes.get(*p)).collect();
        let want: Vec<u64> = (0..256).filter(|p| *p != 2).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_private_file_region_reports_no_holes() {
        // Its written pages live in anonymous copies; the file keeps its
        // holes, which must not make the sender skip those pages.
        let f = tempfile_in_memfd();
        f.set_len(MIB as u64).unwrap();
        let private = vm_memory::MmapRegion::<()>::build(
            Some(FileOffset::new(f, 0)),
            MIB,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
        )
        .unwrap();
        let region = vm_memory::GuestRegionMmap::new(private, GuestAddress(0)).unwrap();
        let vmm = Arc::new(GuestMemoryMmap::from_regions(vec![region]).unwrap());
        vmm.write_obj(1u8, GuestAddress(4096)).unwrap();
        let mem = GuestMemory::from_vm_memory(vmm).unwrap();
        assert!(mem.regions()[0].file().is_none());
        let mut holes = DirtyBitmap::new(mem.pages());
        mem.holes_into(&mut holes).unwrap();
        assert_eq!(holes.count(), 0);
        assert!(!mem.page_is_zero(PageIndex(1)));
    }

    #[test]
    fn a_read_only_region_is_refused_with_the_fix() {
        let ro =
            vm_memory::MmapRegion::<()>::build(None, MIB, libc::PROT_READ, libc::MAP_ANONYMOUS | libc::MAP_PRIVATE)
                .unwrap();
        let region = vm_memory::GuestRegionMmap::new(ro, GuestAddress(0)).unwrap();
        let vmm = Arc::new(GuestMemoryMmap::from_regions(vec![region]).unwrap());
        let e = GuestMemory::from_vm_memory(vmm).unwrap_err();
        assert!(matches!(e, VmMemoryError::NotWritable { guest_base: 0, .. }), "{e}");
        assert!(e.to_string().contains("PROT_READ | PROT_WRITE"));
    }

    fn tempfile_in_memfd() -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: a NUL-terminated literal name; no other preconditions.
        let fd = unsafe { libc::memfd_create(c"ferry-vm-memory-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { std::fs::File::from_raw_fd(fd) }
    }
}
