//! Dirty-page tracking behind one trait, with real backends:
//!
//! - [`UffdWpTracker`]: userfaultfd write-protection in asynchronous mode
//!   (the kernel resolves write faults itself and records them) read back
//!   with the `PAGEMAP_SCAN` ioctl, which also re-protects what it reports.
//!   It tracks writes made by *this process* to guest memory (kernel >= 6.7).
//! - [`BitmapTracker`]: an [`AtomicBitmap`] that the embedding VMM (or the
//!   synthetic guest) marks itself on every write.
//!
//! KVM's dirty log is a third backend, added with the KVM guest.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use thiserror::Error;

use crate::bitmap::{AtomicBitmap, DirtyBitmap};
use crate::memory::{GuestMemory, PAGE_SIZE_U64};

/// Errors of dirty tracking.
#[derive(Debug, Error)]
pub enum DirtyError {
    /// The kernel lacks a feature the backend needs.
    #[error("dirty tracker {backend} is not available here: {why}")]
    Unsupported {
        /// Backend name.
        backend: &'static str,
        /// What is missing, and what to do.
        why: String,
    },
    /// A system call failed while tracking.
    #[error("dirty tracker {backend}: {what} failed: {source}")]
    Os {
        /// Backend name.
        backend: &'static str,
        /// The call that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The bitmap passed in does not match the guest memory's page count.
    #[error("dirty bitmap has {got} bits, guest memory has {want} pages")]
    SizeMismatch {
        /// Pages in guest memory.
        want: u64,
        /// Bits in the bitmap.
        got: u64,
    },
}

/// A source of "which pages were written since I last asked".
pub trait DirtyTracker: Send {
    /// Starts tracking: every write after this returns is reported by a later
    /// [`collect`](Self::collect).
    fn start(&mut self) -> Result<(), DirtyError>;
    /// ORs the pages written since `start` or the previous `collect` into
    /// `out`, and resets that record.
    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyError>;
    /// Stops tracking (also done on drop).
    fn stop(&mut self) -> Result<(), DirtyError> {
        Ok(())
    }
    /// A short name for reports ("uffd-wp", "bitmap", "kvm-dirty-log").
    fn name(&self) -> &'static str;
}

/// The tracker an embedding VMM feeds by marking an [`AtomicBitmap`].
#[derive(Debug, Clone)]
pub struct BitmapTracker {
    marks: Arc<AtomicBitmap>,
}

impl BitmapTracker {
    /// A tracker that drains `marks`.
    pub fn new(marks: Arc<AtomicBitmap>) -> Self {
        BitmapTracker { marks }
    }
}

impl DirtyTracker for BitmapTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        // Forget marks made before tracking started: round 1 sends everything.
        let mut scratch = DirtyBitmap::new(self.marks.len());
        self.marks.drain_into(&mut scratch);
        Ok(())
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyError> {
        if out.len() != self.marks.len() {
            return Err(DirtyError::SizeMismatch {
                want: self.marks.len(),
                got: out.len(),
            });
        }
        self.marks.drain_into(out);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "bitmap"
    }
}

/// Several trackers as one: each page any of them reports. A VMM pairs the
/// tracker of its vCPUs' writes (KVM's dirty log) with the tracker of its own
/// (its devices' writes through vm-memory or an [`AtomicBitmap`]).
pub struct Union {
    parts: Vec<Box<dyn DirtyTracker>>,
    name: &'static str,
}

impl std::fmt::Debug for Union {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.parts.iter().map(|p| p.name()).collect();
        f.debug_struct("Union").field("parts", &names).finish()
    }
}

impl Union {
    /// The union of `parts`, reported as `name` (e.g.
    /// "kvm-dirty-log+vm-memory-bitmap").
    pub fn new(parts: Vec<Box<dyn DirtyTracker>>, name: &'static str) -> Union {
        Union { parts, name }
    }
}

impl DirtyTracker for Union {
    fn start(&mut self) -> Result<(), DirtyError> {
        for i in 0..self.parts.len() {
            if let Err(e) = self.parts[i].start() {
                // Leave none half started.
                for p in &mut self.parts[..i] {
                    let _ = p.stop();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyError> {
        for p in &mut self.parts {
            p.collect(out)?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<(), DirtyError> {
        let mut first = Ok(());
        for p in &mut self.parts {
            let r = p.stop();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    fn name(&self) -> &'static str {
        self.name
    }
}

// ---- userfaultfd + PAGEMAP_SCAN (uapi: linux/userfaultfd.h, linux/fs.h) ----

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;

/// `_IOWR(type, nr, size)` from the kernel's ioctl.h (sizes here are < 2^14).
#[allow(clippy::cast_possible_truncation)]
const fn iowr(ty: u8, nr: u8, size: usize) -> libc::c_ulong {
    ((3 << 30) | ((size as u32) << 16) | ((ty as u32) << 8) | nr as u32) as libc::c_ulong
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

const UFFDIO_API_IOCTL: libc::c_ulong = iowr(0xAA, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER_IOCTL: libc::c_ulong = iowr(0xAA, 0x00, std::mem::size_of::<UffdioRegister>());
const PAGEMAP_SCAN_IOCTL: libc::c_ulong = iowr(b'f', 16, std::mem::size_of::<PmScanArg>());
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

/// Regions returned per PAGEMAP_SCAN call; the walk is resumed from
/// `walk_end` until the whole range is covered, so this bounds memory, not
/// correctness.
const SCAN_VEC_LEN: usize = 4096;

/// Userfaultfd write-protect (async) + `PAGEMAP_SCAN` tracker for writes made
/// by this process to guest memory.
#[derive(Debug)]
pub struct UffdWpTracker {
    uffd: OwnedFd,
    pagemap: File,
    /// (host start, host end, first page index) of each region.
    ranges: Vec<(u64, u64, u64)>,
    pages: u64,
    scan: Vec<PageRegion>,
}

impl std::fmt::Debug for PageRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}..{:#x}", self.start, self.end)
    }
}

impl UffdWpTracker {
    /// Registers every region of `mem` for asynchronous write-protect tracking.
    ///
    /// The tracker must not outlive `mem`'s mappings: keep both in the same
    /// owner (the engine drops the tracker first).
    pub fn new(mem: &GuestMemory) -> Result<Self, DirtyError> {
        const B: &str = "uffd-wp";
        let os = |what, source| DirtyError::Os {
            backend: B,
            what,
            source,
        };
        // SAFETY: plain syscall with integer flags; returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(DirtyError::Unsupported {
                backend: B,
                why: format!(
                    "userfaultfd(2) failed ({e}); run as root or set vm.unprivileged_userfaultfd=1, or use --tracker bitmap"
                ),
            });
        }
        let fd = i32::try_from(fd).map_err(|_| DirtyError::Unsupported {
            backend: B,
            why: "userfaultfd returned an out-of-range fd".into(),
        })?;
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
        let want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: want,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes exactly one `UffdioApi`, which
        // lives for the duration of the call.
        if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API_IOCTL, &mut api) } != 0 {
            return Err(DirtyError::Unsupported {
                backend: B,
                why: format!(
                    "UFFDIO_API with WP_ASYNC|WP_UNPOPULATED|WP_HUGETLBFS_SHMEM refused ({}); needs Linux >= 6.7",
                    std::io::Error::last_os_error()
                ),
            });
        }
        let mut ranges = Vec::new();
        for r in mem.regions() {
            let start = r.host_addr() as u64;
            let len = r.len_bytes() as u64;
            let mut reg = UffdioRegister {
                range: UffdioRange { start, len },
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            // SAFETY: UFFDIO_REGISTER reads/writes one `UffdioRegister`; the
            // range is a live mapping owned by `mem`.
            if unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_REGISTER_IOCTL, &mut reg) } != 0 {
                return Err(os("UFFDIO_REGISTER(WP)", std::io::Error::last_os_error()));
            }
            ranges.push((start, start + len, r.first_page().0));
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(|e| os("open /proc/self/pagemap", e))?;
        Ok(UffdWpTracker {
            uffd,
            pagemap,
            ranges,
            pages: mem.pages(),
            scan: vec![PageRegion::default(); SCAN_VEC_LEN],
        })
    }

    /// Scans every region: reports written pages into `out` (if given) and
    /// write-protects them again, in the same ioctl.
    fn scan(&mut self, mut out: Option<&mut DirtyBitmap>) -> Result<(), DirtyError> {
        for &(start, end, first_page) in &self.ranges {
            let mut cursor = start;
            // Each call makes progress (walk_end > start) or we stop: the loop
            // is bounded by the number of pages.
            while cursor < end {
                let mut arg = PmScanArg {
                    size: std::mem::size_of::<PmScanArg>() as u64,
                    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    start: cursor,
                    end,
                    vec: self.scan.as_mut_ptr() as u64,
                    vec_len: self.scan.len() as u64,
                    category_mask: PAGE_IS_WRITTEN,
                    return_mask: PAGE_IS_WRITTEN,
                    ..Default::default()
                };
                // SAFETY: PAGEMAP_SCAN reads `arg` and writes at most
                // `vec_len` PageRegions into `self.scan`, which is that long
                // and outlives the call.
                let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN_IOCTL, &mut arg) };
                if n < 0 {
                    return Err(DirtyError::Os {
                        backend: "uffd-wp",
                        what: "PAGEMAP_SCAN",
                        source: std::io::Error::last_os_error(),
                    });
                }
                if let Some(out) = out.as_deref_mut() {
                    for r in &self.scan[..n.unsigned_abs() as usize] {
                        let first = first_page + (r.start - start) / PAGE_SIZE_U64;
                        let count = (r.end - r.start) / PAGE_SIZE_U64;
                        out.set_range(first, count);
                    }
                }
                if arg.walk_end <= cursor {
                    return Err(DirtyError::Os {
                        backend: "uffd-wp",
                        what: "PAGEMAP_SCAN (no progress)",
                        source: std::io::Error::other(format!("walk_end {:#x}", arg.walk_end)),
                    });
                }
                cursor = arg.walk_end;
            }
        }
        Ok(())
    }
}

impl DirtyTracker for UffdWpTracker {
    fn start(&mut self) -> Result<(), DirtyError> {
        // Every populated page reads as "written" after registration: one
        // scan protects them all; pages not yet populated count as protected
        // (WP_UNPOPULATED).
        self.scan(None)
    }

    fn collect(&mut self, out: &mut DirtyBitmap) -> Result<(), DirtyError> {
        if out.len() != self.pages {
            return Err(DirtyError::SizeMismatch {
                want: self.pages,
                got: out.len(),
            });
        }
        self.scan(Some(out))
    }

    fn name(&self) -> &'static str {
        "uffd-wp"
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        // Closing the userfaultfd unregisters the ranges and drops the
        // write-protection; nothing else to undo.
        let _ = self.uffd.as_raw_fd();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{PageIndex, PAGE_SIZE};

    fn pages_of(b: &DirtyBitmap) -> Vec<u64> {
        let mut v = Vec::new();
        b.for_each_run(0, b.len(), |s, n| v.extend(s..s + n));
        v
    }

    #[test]
    fn a_union_reports_what_any_part_reports() {
        let (a, b) = (Arc::new(AtomicBitmap::new(200)), Arc::new(AtomicBitmap::new(200)));
        let mut u = Union::new(
            vec![
                Box::new(BitmapTracker::new(a.clone())),
                Box::new(BitmapTracker::new(b.clone())),
            ],
            "a+b",
        );
        u.start().unwrap();
        a.mark(3);
        b.mark(3);
        b.mark(150);
        let mut out = DirtyBitmap::new(200);
        u.collect(&mut out).unwrap();
        assert_eq!(pages_of(&out), vec![3, 150]);
        assert_eq!(u.name(), "a+b");
        assert!(
            u.collect(&mut DirtyBitmap::new(7)).is_err(),
            "a part's error is the union's"
        );
    }

    #[test]
    fn uffd_wp_reports_exactly_the_written_pages() {
        let mem = GuestMemory::new(1024 * PAGE_SIZE_U64).unwrap();
        // Populate half the pages first, leave the rest unpopulated.
        for p in 0..512 {
            assert!(mem.write_pages(PageIndex(p), &[1u8; PAGE_SIZE]));
        }
        let mut t = match UffdWpTracker::new(&mem) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIPPED uffd_wp_reports_exactly_the_written_pages: {e}");
                return;
            }
        };
        t.start().unwrap();
        let mut b = DirtyBitmap::new(mem.pages());
        t.collect(&mut b).unwrap();
        assert_eq!(b.count(), 0, "nothing written since start");
        // Populated and unpopulated pages, one and many.
        for p in [3u64, 4, 100, 511, 512, 700, 1023] {
            assert!(mem.write_pages(PageIndex(p), &[2u8; PAGE_SIZE]));
        }
        t.collect(&mut b).unwrap();
        assert_eq!(pages_of(&b), vec![3, 4, 100, 511, 512, 700, 1023]);
        // Reset: a second collect sees only new writes.
        let mut b2 = DirtyBitmap::new(mem.pages());
        assert!(mem.write_pages(PageIndex(100), &[3u8; PAGE_SIZE]));
        t.collect(&mut b2).unwrap();
        assert_eq!(pages_of(&b2), vec![100]);
    }

    #[test]
    fn uffd_wp_spans_regions() {
        use crate::memory::GuestAddress;
        let mem = GuestMemory::with_layout(&[
            (GuestAddress(0), 64 * PAGE_SIZE_U64),
            (GuestAddress(1 << 30), 64 * PAGE_SIZE_U64),
        ])
        .unwrap();
        let mut t = match UffdWpTracker::new(&mem) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("SKIPPED uffd_wp_spans_regions: {e}");
                return;
            }
        };
        t.start().unwrap();
        assert!(mem.write_pages(PageIndex(63), &[1u8; PAGE_SIZE]));
        assert!(mem.write_pages(PageIndex(64), &[1u8; PAGE_SIZE]));
        let mut b = DirtyBitmap::new(mem.pages());
        t.collect(&mut b).unwrap();
        assert_eq!(pages_of(&b), vec![63, 64]);
    }

    #[test]
    fn bitmap_tracker_drains_marks() {
        let marks = Arc::new(AtomicBitmap::new(100));
        marks.mark(5);
        let mut t = BitmapTracker::new(marks.clone());
        t.start().unwrap();
        marks.mark(7);
        let mut b = DirtyBitmap::new(100);
        t.collect(&mut b).unwrap();
        assert_eq!(pages_of(&b), vec![7]);
        assert!(t.collect(&mut DirtyBitmap::new(5)).is_err());
    }
}
