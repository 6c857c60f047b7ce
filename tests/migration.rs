//! End to end on real sockets: the destination's image equals the source's
//! under a guest that keeps writing, across stream counts, zero-page
//! fractions and integrity modes; zero pages cost only headers.

mod common;

use ferry::demo::{self, TrackerKind};
use ferry_engine::pipeline::{Integrity, FRAME_OVERHEAD};
use ferry_engine::wire::DIGEST_LEN;
use ferry_engine::PAGE_SIZE;

fn run_case(streams: u16, zero_fraction: f64, integrity: Integrity) {
    let name = format!("migrate_{streams}_streams_{zero_fraction}_zero_{}", integrity.as_str());
    if !common::host_ready(&name) {
        return;
    }
    let mut o = common::small(64 << 20, streams);
    o.zero_fraction = zero_fraction;
    o.migration.integrity = integrity;
    let r = demo::run(&o, |_| {}).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert!(r.verified, "{name}: destination image differs from the source's");
    assert!(
        r.manifest_verified,
        "{name}: the signed manifest and receipt did not verify"
    );
    assert!(r.audit_verified, "{name}: the audit logs did not verify");
    assert!(r.guest_resumed, "{name}: guest did not run at the destination");
    assert!(r.source_stopped, "{name}: source guest still running after commit");
    assert!(
        r.guest_writes_during_migration > 0,
        "{name}: the guest did not write during the migration"
    );
    assert!(r.rounds >= 2, "{name}: expected pre-copy rounds plus the final one");
    assert!(r.round_detail.last().is_some_and(|l| l.is_final));
    assert_eq!(r.integrity, integrity);
    assert_eq!(r.streams, streams);
}

#[test]
fn one_stream_random_memory_sha256() {
    run_case(1, 0.0, Integrity::AeadSha256);
}

#[test]
fn one_stream_half_zero_aead() {
    run_case(1, 0.5, Integrity::Aead);
}

#[test]
fn two_streams_random_memory_aead() {
    run_case(2, 0.0, Integrity::Aead);
}

#[test]
fn two_streams_half_zero_sha256() {
    run_case(2, 0.5, Integrity::AeadSha256);
}

#[test]
fn one_stream_half_zero_sha256() {
    run_case(1, 0.5, Integrity::AeadSha256);
}

#[test]
fn two_streams_random_memory_sha256() {
    run_case(2, 0.0, Integrity::AeadSha256);
}

#[test]
fn guest_marked_bitmap_tracker_migrates_exactly() {
    if !common::host_ready("guest_marked_bitmap_tracker_migrates_exactly") {
        return;
    }
    let mut o = common::small(32 << 20, 2);
    o.tracker = TrackerKind::Bitmap;
    let r = demo::run(&o, |_| {}).expect("migration");
    assert!(r.verified);
    assert_eq!(r.tracker, "bitmap");
}

#[test]
fn zero_pages_cost_only_headers_on_the_wire() {
    if !common::host_ready("zero_pages_cost_only_headers_on_the_wire") {
        return;
    }
    let mut o = common::small(64 << 20, 2);
    o.zero_fraction = 0.5;
    o.dirty_rate_pages_per_s = 0;
    let r = demo::run(&o, |_| {}).expect("migration");
    assert!(r.verified);
    let pages = r.memory_bytes / PAGE_SIZE as u64;
    let zero = r.zero_pages;
    assert!(
        zero > pages * 2 / 5 && zero < pages * 3 / 5,
        "{zero} zero pages of {pages}"
    );
    // Every byte on the wire is accounted for by the non-zero pages, their
    // digests and one header + tag per frame; zero pages add nothing.
    let frames: u64 = r.round_detail.iter().map(|x| x.frames).sum();
    let data = (r.pages_sent - zero) * (PAGE_SIZE + DIGEST_LEN) as u64;
    let overhead = frames * FRAME_OVERHEAD as u64 + 4096;
    assert!(
        r.bytes_on_wire <= data + overhead,
        "{} bytes on the wire, expected at most {} (+{} frame overhead)",
        r.bytes_on_wire,
        data,
        overhead
    );
    assert!(r.bytes_on_wire < r.pages_sent * PAGE_SIZE as u64 * 3 / 5);
    // The zero pages of this guest were never written: sending them must not
    // have made the kernel allocate them at the source.
    assert_eq!(
        r.source_holes_filled, 0,
        "the migration allocated never-written source pages"
    );
}

/// Many short migrations in a row: the switchover's message ordering (a
/// stream's Ready may overtake another stream's final round report) must
/// never turn a good migration into a failure.
#[test]
fn many_small_migrations_all_commit() {
    if !common::host_ready("many_small_migrations_all_commit") {
        return;
    }
    for i in 0..60 {
        let mut o = common::small(4 << 20, 4);
        o.hot_set_bytes = 1 << 20;
        o.dirty_rate_pages_per_s = if i % 2 == 0 { 0 } else { 20_000 };
        let r = demo::run(&o, |_| {}).unwrap_or_else(|e| panic!("run {i}: {e}"));
        assert!(r.verified, "run {i} did not verify");
    }
}

#[test]
fn one_stream_random_memory_aead() {
    run_case(1, 0.0, Integrity::Aead);
}

#[test]
fn two_streams_half_zero_aead() {
    run_case(2, 0.5, Integrity::Aead);
}
