//! One conformance suite every `DirtyTracker` backend runs: uffd-wp +
//! PAGEMAP_SCAN, the guest-marked bitmap, and KVM's dirty log. Each is
//! driven by the guest it serves (the synthetic guest writing from a host
//! thread; a real KVM vCPU writing from inside the guest), and judged
//! against the memory itself: every page whose bytes changed between two
//! collects must be reported, nothing is reported twice without a write in
//! between, and tracking survives a stop and a new start.
//!
//! Each backend prints a SKIPPED line and passes where its kernel feature
//! is missing.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod common;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::bitmap::{AtomicBitmap, DirtyBitmap};
use ferry_engine::dirty::{BitmapTracker, DirtyTracker, UffdWpTracker};
use ferry_engine::guest::GuestControl;
use ferry_engine::{GuestMemory, PageIndex, PAGE_SIZE};
use ferry_vmm::kvm::{GuestProgram, KvmVm};
use ferry_vmm::workload::{SyntheticGuest, WorkloadConfig};

const MEM: u64 = 32 << 20;

/// A tracker with the guest whose writes it tracks.
struct Subject {
    mem: Arc<GuestMemory>,
    guest: Box<dyn GuestControl>,
    tracker: Box<dyn DirtyTracker>,
}

impl Subject {
    /// Lets the (paused) guest write for a while, then pauses it again:
    /// when this returns, no write is in progress.
    fn write_some(&mut self) {
        self.guest.resume().unwrap();
        std::thread::sleep(Duration::from_millis(40));
        self.guest.pause().unwrap();
    }
}

fn page_hashes(mem: &GuestMemory) -> Vec<u64> {
    let mut page = Box::new([0u8; PAGE_SIZE]);
    (0..mem.pages())
        .map(|p| {
            mem.read_page(PageIndex(p), &mut page);
            let mut h = DefaultHasher::new();
            page.hash(&mut h);
            h.finish()
        })
        .collect()
}

fn collect(s: &mut Subject) -> DirtyBitmap {
    let mut b = DirtyBitmap::new(s.mem.pages());
    s.tracker.collect(&mut b).unwrap();
    b
}

/// One round: the pages the guest changed are all reported.
fn changed_pages_are_reported(name: &str, s: &mut Subject, round: &str) -> u64 {
    let before = page_hashes(&s.mem);
    s.write_some();
    let dirty = collect(s);
    let after = page_hashes(&s.mem);
    let changed: Vec<u64> = (0u64..)
        .zip(before.iter().zip(&after))
        .filter(|(_, (b, a))| b != a)
        .map(|(p, _)| p)
        .collect();
    assert!(
        !changed.is_empty(),
        "{name} {round}: the guest changed no page (test broken)"
    );
    let missed: Vec<u64> = changed.iter().copied().filter(|&p| !dirty.get(p)).collect();
    assert!(
        missed.is_empty(),
        "{name} {round}: {} of {} changed pages not reported, first {:?}",
        missed.len(),
        changed.len(),
        &missed[..missed.len().min(8)]
    );
    assert!(
        dirty.count() < s.mem.pages(),
        "{name} {round}: every page reported dirty after a few writes"
    );
    eprintln!(
        "{name} {round}: {} pages changed, {} reported",
        changed.len(),
        dirty.count()
    );
    changed.len() as u64
}

fn conformance(name: &str, mut s: Subject) {
    s.guest.pause().unwrap();
    s.tracker.start().unwrap();
    // Whatever happened before is drained; a paused guest then adds nothing.
    let _ = collect(&mut s);
    assert_eq!(collect(&mut s).count(), 0, "{name}: dirty pages without a write");
    changed_pages_are_reported(name, &mut s, "first round");
    assert_eq!(
        collect(&mut s).count(),
        0,
        "{name}: a collect without writes reported pages"
    );
    changed_pages_are_reported(name, &mut s, "second round");
    // Stop, start again: tracking works from the new start.
    s.tracker.stop().unwrap();
    s.tracker.start().unwrap();
    let _ = collect(&mut s);
    changed_pages_are_reported(name, &mut s, "after a restart");
    s.tracker.stop().unwrap();
}

fn writes() -> WorkloadConfig {
    WorkloadConfig {
        hot_set_bytes: 4 << 20,
        dirty_rate_pages_per_s: 50_000,
        ..WorkloadConfig::default()
    }
}

#[test]
fn uffd_wp_tracker_conforms() {
    let name = "uffd_wp_tracker_conforms";
    if !common::skip_unless(name, &[("userfaultfd write-protect", ferry_engine::probe::uffd_wp())]) {
        return;
    }
    let mem = Arc::new(GuestMemory::new(MEM).unwrap());
    ferry_vmm::workload::fill(&mem, 3, 0.0);
    let tracker = UffdWpTracker::new(&mem).unwrap();
    let guest = SyntheticGuest::start(mem.clone(), writes(), None);
    conformance(
        name,
        Subject {
            mem,
            guest: Box::new(guest),
            tracker: Box::new(tracker),
        },
    );
}

#[test]
fn guest_marked_bitmap_tracker_conforms() {
    let mem = Arc::new(GuestMemory::new(MEM).unwrap());
    ferry_vmm::workload::fill(&mem, 3, 0.0);
    let marks = Arc::new(AtomicBitmap::new(mem.pages()));
    let guest = SyntheticGuest::start(mem.clone(), writes(), Some(marks.clone()));
    conformance(
        "guest_marked_bitmap_tracker_conforms",
        Subject {
            mem,
            guest: Box::new(guest),
            tracker: Box::new(BitmapTracker::new(marks)),
        },
    );
}

#[test]
fn kvm_dirty_log_tracker_conforms() {
    let name = "kvm_dirty_log_tracker_conforms";
    if !common::skip_unless(name, &[("KVM", ferry_vmm::kvm::available())]) {
        return;
    }
    let mem = Arc::new(GuestMemory::new(MEM).unwrap());
    let vm = KvmVm::boot(
        mem.clone(),
        1,
        &GuestProgram {
            hot_set_bytes: 4 << 20,
            writes_per_s: 50_000,
            ..GuestProgram::default()
        },
    )
    .unwrap();
    vm.wait_filled(Duration::from_secs(10)).unwrap();
    let tracker = vm.dirty_tracker();
    conformance(
        name,
        Subject {
            mem,
            guest: Box::new(vm),
            tracker: Box::new(tracker),
        },
    );
}
