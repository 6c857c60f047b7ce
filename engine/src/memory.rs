//! Guest memory: a table of page-aligned regions, each an mmap of its own memfd.
//!
//! memfd-backed by default, so that a VMM in another process could map the
//! same pages. Pages are numbered contiguously across regions ([`PageIndex`]);
//! each region also has a guest-physical base address ([`GuestAddress`]).
//!
//! Guest memory is written concurrently by the guest (another thread, or a
//! vCPU) while the engine reads it. Like every VMM, the engine copies pages
//! with raw-pointer copies and never forms a Rust reference to guest memory
//! that outlives a single copy; a page read while it is being written may be
//! torn, which is harmless because the dirty tracker reports that page again
//! and the final round runs with the guest paused.

use std::fs::File;
use std::os::fd::FromRawFd;

use memmap2::{MmapOptions, MmapRaw};
use thiserror::Error;

/// Size of a guest page in bytes. ferry tracks and moves 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;
/// `PAGE_SIZE` as a `u64`, for address arithmetic.
pub const PAGE_SIZE_U64: u64 = 4096;

/// A guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestAddress(pub u64);

/// The index of a page in the guest memory's region table (pages numbered
/// contiguously across regions, starting at 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIndex(pub u64);

/// Errors of guest memory setup.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// A region size that is zero or not a multiple of the page size.
    #[error("region size {0} bytes is not a positive multiple of {PAGE_SIZE}")]
    BadSize(u64),
    /// Regions that overlap in guest-physical space, or a base that is not page aligned.
    #[error("region at guest address {0:#x} is unaligned or overlaps another region")]
    BadLayout(u64),
    /// memfd_create, ftruncate or mmap failed.
    #[error("cannot create guest memory ({what}): {source}")]
    Os {
        /// The call that failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One region: a memfd and its shared mapping.
#[derive(Debug)]
pub struct Region {
    guest_base: GuestAddress,
    first_page: PageIndex,
    pages: u64,
    map: MmapRaw,
    file: File,
}

impl Region {
    /// Guest-physical address of the region's first byte.
    pub fn guest_base(&self) -> GuestAddress {
        self.guest_base
    }
    /// Index of the region's first page in the region table.
    pub fn first_page(&self) -> PageIndex {
        self.first_page
    }
    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// Host virtual address of the region's first byte.
    pub fn host_addr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
    /// Size of the region in bytes.
    pub fn len_bytes(&self) -> usize {
        self.map.len()
    }
    /// The memfd behind the region (to share it with another process).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// Guest memory: a table of regions.
#[derive(Debug)]
pub struct GuestMemory {
    regions: Vec<Region>,
    pages: u64,
}

impl GuestMemory {
    /// One memfd-backed region of `size_bytes` at guest address 0.
    pub fn new(size_bytes: u64) -> Result<Self, MemoryError> {
        Self::with_layout(&[(GuestAddress(0), size_bytes)])
    }

    /// Memfd-backed regions at the given guest addresses and sizes.
    pub fn with_layout(layout: &[(GuestAddress, u64)]) -> Result<Self, MemoryError> {
        let mut sorted = layout.to_vec();
        sorted.sort_by_key(|(base, _)| *base);
        let mut regions = Vec::with_capacity(sorted.len());
        let mut pages = 0u64;
        let mut end = 0u64;
        for (i, &(base, size)) in sorted.iter().enumerate() {
            if size == 0 || size % PAGE_SIZE_U64 != 0 {
                return Err(MemoryError::BadSize(size));
            }
            if base.0 % PAGE_SIZE_U64 != 0 || (i > 0 && base.0 < end) {
                return Err(MemoryError::BadLayout(base.0));
            }
            end = base.0.checked_add(size).ok_or(MemoryError::BadLayout(base.0))?;
            let file = memfd(size)?;
            let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
            let map = MmapOptions::new()
                .len(len)
                .map_raw(&file)
                .map_err(|source| MemoryError::Os { what: "mmap", source })?;
            regions.push(Region {
                guest_base: base,
                first_page: PageIndex(pages),
                pages: size / PAGE_SIZE_U64,
                map,
                file,
            });
            pages += size / PAGE_SIZE_U64;
        }
        Ok(GuestMemory { regions, pages })
    }

    /// The region table, in guest-address order.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// Total number of pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Total size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.pages * PAGE_SIZE_U64
    }

    /// The region holding `page`, or `None` past the end.
    pub fn region_of(&self, page: PageIndex) -> Option<&Region> {
        let i = self.regions.partition_point(|r| r.first_page.0 + r.pages <= page.0);
        self.regions.get(i).filter(|r| r.first_page.0 <= page.0)
    }

    /// Pointer to the first byte of `count` pages starting at `first`, if that
    /// run lies inside one region.
    pub fn run_ptr(&self, first: PageIndex, count: u64) -> Option<*mut u8> {
        let r = self.region_of(first)?;
        let off = first.0 - r.first_page.0;
        if count == 0 || off + count > r.pages {
            return None;
        }
        let off_bytes = usize::try_from(off * PAGE_SIZE_U64).ok()?;
        // SAFETY: `off + count <= r.pages`, so the offset stays inside the
        // mapping of `r.map.len()` bytes; no reference is created.
        Some(unsafe { r.host_addr().add(off_bytes) })
    }

    /// Copies page `page` into `out` (a racy read, see the module docs).
    ///
    /// # Panics
    /// If `page` is out of range (a caller bug: indices are validated at the edges).
    pub fn read_page(&self, page: PageIndex, out: &mut [u8; PAGE_SIZE]) {
        let src = self.run_ptr(page, 1).expect("page index out of range");
        // SAFETY: `src` points at PAGE_SIZE mapped bytes (run_ptr checked the
        // range); `out` is a distinct local buffer, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), PAGE_SIZE) };
    }

    /// Copies guest memory from guest-physical `at` into `out` (across
    /// regions; panics if the range is outside guest memory).
    pub fn read_into(&self, at: u64, out: &mut [u8]) {
        let mut done = 0usize;
        while done < out.len() {
            let gpa = at + done as u64;
            let r = self
                .regions
                .iter()
                .find(|r| gpa >= r.guest_base().0 && gpa < r.guest_base().0 + r.len_bytes() as u64)
                .expect("read outside guest memory");
            let off = crate::usize_from(gpa - r.guest_base().0);
            let n = (r.len_bytes() - off).min(out.len() - done);
            // SAFETY: `off + n <= len_bytes`, inside the region's mapping;
            // `out` is ordinary memory, not guest memory.
            unsafe { std::ptr::copy_nonoverlapping(r.host_addr().add(off), out[done..].as_mut_ptr(), n) };
            done += n;
        }
    }

    /// Writes `data` (whole pages) starting at page `first`. Returns `false`
    /// (and writes nothing) if the run is not inside one region.
    pub fn write_pages(&self, first: PageIndex, data: &[u8]) -> bool {
        let count = (data.len() / PAGE_SIZE) as u64;
        if data.len() % PAGE_SIZE != 0 {
            return false;
        }
        let Some(dst) = self.run_ptr(first, count) else {
            return false;
        };
        // SAFETY: run_ptr checked that `count` pages from `dst` are mapped;
        // `data` is ordinary memory of the same length, not guest memory.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        true
    }

    /// Fills `count` pages from `first` with zeros. Returns `false` if the run
    /// is not inside one region.
    pub fn zero_pages(&self, first: PageIndex, count: u64) -> bool {
        let Some(dst) = self.run_ptr(first, count) else {
            return false;
        };
        // SAFETY: run_ptr checked that `count` pages from `dst` are mapped.
        unsafe { std::ptr::write_bytes(dst, 0, crate::usize_from(count) * PAGE_SIZE) };
        true
    }

    /// Whether page `page` is all zeros (racy read, see the module docs).
    pub fn page_is_zero(&self, page: PageIndex) -> bool {
        let src = self.run_ptr(page, 1).expect("page index out of range");
        // SAFETY: PAGE_SIZE bytes at `src` are mapped (run_ptr); the slice
        // lives only for this check (racy read, see the module docs).
        let bytes = unsafe { std::slice::from_raw_parts(src, PAGE_SIZE) };
        is_zero(bytes)
    }

    /// Faults every page in ahead of use (MADV_POPULATE_WRITE), so that a
    /// receiver does not pay first-touch faults on its hot path.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        for r in &self.regions {
            // SAFETY: the range is exactly one live mapping owned by `r`.
            let rc = unsafe { libc::madvise(r.host_addr().cast(), r.len_bytes(), libc::MADV_POPULATE_WRITE) };
            if rc != 0 {
                return Err(MemoryError::Os {
                    what: "madvise(MADV_POPULATE_WRITE)",
                    source: std::io::Error::last_os_error(),
                });
            }
        }
        Ok(())
    }

    /// Sets in `out` the bit of every page that is a hole in its memfd: never
    /// written, so all zeros. Reading such a page would make the kernel
    /// allocate it; a sender that knows it is a hole sends it as a zero page
    /// without touching it.
    pub fn holes_into(&self, out: &mut crate::bitmap::DirtyBitmap) -> Result<(), MemoryError> {
        use std::os::fd::AsRawFd;
        let os = |what| MemoryError::Os {
            what,
            source: std::io::Error::last_os_error(),
        };
        for r in &self.regions {
            let fd = r.file.as_raw_fd();
            let len = i64::try_from(r.len_bytes()).map_err(|_| MemoryError::BadSize(r.len_bytes() as u64))?;
            let mut off = 0i64;
            while off < len {
                // SAFETY: lseek on an fd we own; no memory is passed.
                let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
                if hole < 0 {
                    return Err(os("lseek(SEEK_HOLE)"));
                }
                if hole >= len {
                    break;
                }
                // SAFETY: as above.
                let data = unsafe { libc::lseek(fd, hole, libc::SEEK_DATA) };
                let end = if data < 0 {
                    if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                        len
                    } else {
                        return Err(os("lseek(SEEK_DATA)"));
                    }
                } else {
                    data
                };
                let first = hole.unsigned_abs().div_ceil(PAGE_SIZE_U64);
                let last = end.unsigned_abs() / PAGE_SIZE_U64;
                if last > first {
                    out.set_range(r.first_page.0 + first, last - first);
                }
                off = end;
            }
        }
        Ok(())
    }

    /// SHA-256 over the whole image, page by page in index order.
    pub fn digest(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 1 << 20];
        for r in &self.regions {
            let mut off = 0usize;
            while off < r.len_bytes() {
                let n = buf.len().min(r.len_bytes() - off);
                // SAFETY: `off + n <= len`, inside the mapping; `buf` is a
                // separate heap buffer.
                unsafe { std::ptr::copy_nonoverlapping(r.host_addr().add(off), buf.as_mut_ptr(), n) };
                ctx.update(&buf[..n]);
                off += n;
            }
        }
        let d = ctx.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// Whether every byte is zero; early exit on the first non-zero 64-byte
/// block (a random page exits after one block).
#[inline]
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    for b in &mut blocks {
        if b.iter().fold(0u8, |a, x| a | x) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|x| *x == 0)
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a NUL-terminated literal; memfd_create has no other
    // preconditions.
    let fd = unsafe { libc::memfd_create(c"ferry-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Os {
            what: "memfd_create",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(|source| MemoryError::Os {
        what: "ftruncate",
        source,
    })?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_page_lookup() {
        let m = GuestMemory::with_layout(&[
            (GuestAddress(0x10_0000), 8 * PAGE_SIZE_U64),
            (GuestAddress(0), 4 * PAGE_SIZE_U64),
        ])
        .unwrap();
        assert_eq!(m.pages(), 12);
        assert_eq!(m.regions()[0].guest_base(), GuestAddress(0));
        assert_eq!(m.region_of(PageIndex(3)).unwrap().first_page(), PageIndex(0));
        assert_eq!(m.region_of(PageIndex(4)).unwrap().first_page(), PageIndex(4));
        assert!(m.region_of(PageIndex(12)).is_none());
        // A run may not cross a region boundary.
        assert!(m.run_ptr(PageIndex(3), 2).is_none());
        assert!(m.run_ptr(PageIndex(4), 8).is_some());
    }

    #[test]
    fn holes_are_the_never_written_pages() {
        let m = GuestMemory::with_layout(&[
            (GuestAddress(0), 8 * PAGE_SIZE_U64),
            (GuestAddress(1 << 20), 4 * PAGE_SIZE_U64),
        ])
        .unwrap();
        for p in [2u64, 3, 9] {
            assert!(
                m.write_pages(PageIndex(p), &[0u8; PAGE_SIZE]),
                "zeros written still allocate"
            );
        }
        let mut holes = crate::bitmap::DirtyBitmap::new(m.pages());
        m.holes_into(&mut holes).unwrap();
        let got: Vec<u64> = (0..m.pages()).filter(|p| holes.get(*p)).collect();
        assert_eq!(got, vec![0, 1, 4, 5, 6, 7, 8, 10, 11]);
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(GuestMemory::new(100).is_err());
        assert!(GuestMemory::with_layout(&[
            (GuestAddress(0), 2 * PAGE_SIZE_U64),
            (GuestAddress(PAGE_SIZE_U64), PAGE_SIZE_U64)
        ])
        .is_err());
    }

    #[test]
    fn write_read_zero_digest() {
        let m = GuestMemory::new(4 * PAGE_SIZE_U64).unwrap();
        let zero_digest = m.digest();
        assert!(m.page_is_zero(PageIndex(2)));
        let page = [7u8; PAGE_SIZE];
        assert!(m.write_pages(PageIndex(2), &page));
        assert!(!m.page_is_zero(PageIndex(2)));
        let mut out = [0u8; PAGE_SIZE];
        m.read_page(PageIndex(2), &mut out);
        assert_eq!(out, page);
        assert_ne!(m.digest(), zero_digest);
        assert!(m.zero_pages(PageIndex(2), 1));
        assert_eq!(m.digest(), zero_digest);
        assert!(!m.write_pages(PageIndex(4), &page));
        m.prefault().unwrap();
    }
}
