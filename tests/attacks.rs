//! Attacks on the data plane, on real sockets through a relay that tampers
//! with the source→destination stream. Each must fail closed: the
//! destination never runs the guest, the source's guest keeps running, and
//! the error names what happened (stream, sequence, round).

mod common;

use std::time::{Duration, Instant};

use common::{relay, Attack, Target, OBSERVED};
use ferry::demo::{self, DemoError, Failure};
use ferry_engine::migrate::{IoError, MigrateError};

fn attack(name: &str, target: Target) -> Option<Box<Failure>> {
    if !common::host_ready(name) {
        return None;
    }
    let mut o = common::small(32 << 20, 2);
    o.migration.io_timeout = Duration::from_secs(2);
    o.interpose = Some(relay(Some(target), 2));
    match demo::run(&o, |_| {}) {
        Ok(r) => panic!(
            "{name}: the migration succeeded despite the attack (verified={})",
            r.verified
        ),
        Err(DemoError::Failed(f)) => {
            eprintln!("{name}: {f}");
            assert!(f.source_guest_running, "{name}: the source guest is not running: {f}");
            assert!(
                !f.destination_guest_ran,
                "{name}: the destination started the guest: {f}"
            );
            assert!(f.source_error.is_some(), "{name}: the source did not notice: {f}");
            Some(f)
        }
        Err(e) => panic!("{name}: setup failed: {e}"),
    }
}

fn at(attack: Attack, stream: u16, frame: u64) -> Target {
    Target { attack, stream, frame }
}

#[test]
fn flipped_bit_is_an_integrity_error_naming_stream_and_sequence() {
    let Some(f) = attack("flipped_bit", at(Attack::FlipBit, 1, 7)) else {
        return;
    };
    match &f.destination_error {
        Some(MigrateError::Integrity {
            stream: 1,
            seq: 7,
            round: 1,
            ..
        }) => {}
        other => panic!("expected an integrity error on stream 1 at sequence 7, got {other:?}"),
    }
    // The destination told the source why.
    let src = f.source_error.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(
        src.contains("integrity check failed on stream 1 at sequence 7"),
        "source saw: {src}"
    );
}

#[test]
fn replayed_frame_is_a_sequence_error() {
    let Some(f) = attack("replayed_frame", at(Attack::Replay, 0, 5)) else {
        return;
    };
    match &f.destination_error {
        Some(MigrateError::Sequence {
            stream: 0,
            expected: 6,
            got: 5,
            ..
        }) => {}
        other => panic!("expected a sequence error (expected 6, got 5), got {other:?}"),
    }
}

#[test]
fn reordered_frames_are_a_sequence_error() {
    let Some(f) = attack("reordered_frames", at(Attack::Reorder, 1, 3)) else {
        return;
    };
    match &f.destination_error {
        Some(MigrateError::Sequence {
            stream: 1,
            expected: 3,
            got: 4,
            ..
        }) => {}
        other => panic!("expected a sequence error (expected 3, got 4), got {other:?}"),
    }
}

#[test]
fn truncated_frame_aborts() {
    let Some(f) = attack("truncated_frame", at(Attack::Truncate, 0, 9)) else {
        return;
    };
    match &f.destination_error {
        Some(MigrateError::Transport {
            stream: 0,
            source: IoError::Closed,
            ..
        }) => {}
        other => panic!("expected the destination to see stream 0 closed mid-frame, got {other:?}"),
    }
}

#[test]
fn connection_cut_mid_round_aborts() {
    let Some(f) = attack("connection_cut", at(Attack::Cut, 1, 40)) else {
        return;
    };
    assert!(f.destination_error.is_some(), "destination did not notice the cut");
}

#[test]
fn dead_peer_times_out_and_the_source_keeps_the_guest() {
    let t = Instant::now();
    let Some(f) = attack("dead_peer", at(Attack::Blackhole, 0, 12)) else {
        return;
    };
    let text = f.to_string();
    assert!(text.contains("no progress") || text.contains("closed"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(30), "aborting took {:?}", t.elapsed());
}

#[test]
fn a_duplicated_stream_cannot_stand_in_for_a_missing_one() {
    // A man in the middle copies stream 0's (authentic) frames onto the
    // connection of stream 1 and drops stream 1: the destination must not
    // take two copies of stream 0 for a complete migration.
    let Some(f) = attack("duplicated_stream", at(Attack::Duplicate, 1, 0)) else {
        return;
    };
    let dst = f
        .destination_error
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    // The copied session proof was made for another connection's nonce, so
    // the destination refuses the copy before reading a frame; the check
    // that every stream opens once is the second line of defence.
    assert!(
        dst.contains("failed its session proof") || dst.contains("stream 0 opened twice"),
        "destination saw: {dst}"
    );
}

#[test]
fn plain_relay_does_not_disturb_a_migration() {
    if !common::host_ready("plain_relay") {
        return;
    }
    let mut o = common::small(32 << 20, 2);
    o.interpose = Some(relay(None, 2));
    let r = demo::run(&o, |_| {}).expect("migration through an honest relay");
    assert!(r.verified);
}

#[test]
fn a_passive_observer_sees_neither_page_numbers_nor_zero_masks_nor_rounds() {
    use ferry_engine::wire::Kind;
    if !common::host_ready("a_passive_observer") {
        return;
    }
    // Half the guest's pages are zero: in the clear, every Pages header
    // would say which (zero mask), where (first page) and in which round.
    let mut o = common::small(32 << 20, 1);
    o.zero_fraction = 0.5;
    o.interpose = Some(relay(Some(at(Attack::Observe, 0, 0)), 1));
    let r = demo::run(&o, |_| {}).expect("migration through an observing relay");
    assert!(r.verified);
    let guest_pages = (32u64 << 20) / 4096;
    let seen = OBSERVED.lock().unwrap().clone();
    let pages: Vec<_> = seen.iter().filter(|h| h[5] == Kind::Pages as u8).collect();
    assert!(pages.len() >= 100, "{} Pages frames seen", pages.len());
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
    let le32 = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
    // Masked, the fields are uniformly random: a value that would be
    // plausible in the clear is a 1-in-billions coincidence.
    let plausible_first = pages.iter().filter(|h| le64(&h[32..40]) < guest_pages).count();
    let plausible_count = pages.iter().filter(|h| (1..=64).contains(&le32(&h[48..52]))).count();
    let plausible_round = pages.iter().filter(|h| le32(&h[20..24]) < 1000).count();
    let distinct_masks: std::collections::HashSet<u64> = pages.iter().map(|h| le64(&h[40..48])).collect();
    assert!(
        plausible_first <= 1 && plausible_count <= 1 && plausible_round <= 1,
        "page fields in the clear: first page {plausible_first}, count {plausible_count}, round {plausible_round} of {}",
        pages.len()
    );
    // In the clear, half-zero memory repeats a few zero masks; masked, each
    // frame's is its own.
    assert!(
        distinct_masks.len() * 100 >= pages.len() * 99,
        "{} distinct zero masks in {} frames",
        distinct_masks.len(),
        pages.len()
    );
}
