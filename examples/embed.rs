//! Embedding ferry's engine in a VMM: the two entry points, with progress
//! events and a cancel switch.
//!
//! ```sh
//! cargo run --release --example embed
//! cargo run --release --example embed -- --cancel-after-ms 100
//! ```
//!
//! A VMM brings three things per side: its guest memory (`GuestMemory`,
//! memfd-backed, which it maps into its VM), a dirty tracker
//! (`DirtyTracker`: KVM's dirty log in `ferry_vmm::kvm`, or the
//! write-protect and bitmap trackers of `ferry_engine::dirty`), and a
//! `GuestControl` (pause, resume, save and load the device state). Here
//! a synthetic guest (a thread writing a hot set) stands in for the VM, and
//! both sides run in one process on loopback.
//!
//! **Keys.** This example uses `SessionKeys::test_only_unauthenticated`,
//! which exists only with the `insecure-test-keys` feature. A real VMM gets
//! its keys from the control plane: `ferry_control::handshake::request`
//! (source) or `serve_destination` (destination) yields an `Admitted`, and
//! `ferry_engine::session::run_source` / `run_destination` take that session
//! instead of connections and keys (`SessionKeys::from_grant` is the only
//! other way to make keys) — see `tools/source.rs` in the ferry repository
//! for the whole source side (tickets, admission, migration, manifest and
//! receipt).

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::bitmap::AtomicBitmap;
use ferry_engine::crypto::SessionKeys;
use ferry_engine::dirty::BitmapTracker;
use ferry_engine::migrate::{migrate_destination, migrate_source, MigrateError, MigrationConfig};
use ferry_engine::progress::{Hooks, Progress};
use ferry_engine::transport::{accept_streams, connect_streams};
use ferry_engine::wire::MigrationId;
use ferry_engine::GuestMemory;
use ferry_vmm::workload::{SyntheticGuest, WorkloadConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cancel_after = std::env::args()
        .skip_while(|a| a != "--cancel-after-ms")
        .nth(1)
        .map(|v| v.parse::<u64>().map(Duration::from_millis))
        .transpose()?;

    // The source VM: 256 MiB of guest memory, a guest writing 20k pages/s
    // into a 16 MiB hot set, and a tracker of the pages it writes.
    let mem = Arc::new(GuestMemory::new(256 << 20)?);
    let marks = Arc::new(AtomicBitmap::new(mem.pages()));
    let workload = WorkloadConfig {
        hot_set_bytes: 16 << 20,
        dirty_rate_pages_per_s: 20_000,
        ..WorkloadConfig::default()
    };
    let mut guest = SyntheticGuest::start(mem.clone(), workload, Some(marks.clone()));
    let mut tracker = BitmapTracker::new(marks);

    // The destination VM: the same size, empty until the migration fills it.
    let dst_mem = Arc::new(GuestMemory::new(mem.size_bytes())?);
    let mut dst_guest = SyntheticGuest::incoming(dst_mem.clone());

    let cfg = MigrationConfig {
        pin_workers: false,
        ..MigrationConfig::default()
    };
    let keys = SessionKeys::test_only_unauthenticated(MigrationId(1))?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;

    // Progress events arrive on the migration's controller thread; keep the
    // callback short.
    let rounds = Arc::new(AtomicUsize::new(0));
    let seen = rounds.clone();
    let started = Instant::now();
    let hooks = Hooks::new().on_progress(move |p| match p {
        Progress::Sending {
            round,
            pages_sent,
            pages_in_round,
            ..
        } => println!("  round {round}: {pages_sent}/{pages_in_round} pages sent"),
        Progress::Round { stats, .. } => {
            seen.fetch_add(1, Ordering::Relaxed);
            println!(
                "round {} done: {} pages in {:.1} ms, {} dirty after, expected downtime {:.2} ms",
                stats.round, stats.pages, stats.duration_ms, stats.dirty_pages_after, stats.expected_downtime_ms
            );
        }
        other => println!("{other:?}"),
    });
    if let Some(after) = cancel_after {
        // Any clone of the hooks cancels: a VMM's API thread keeps one.
        let h = hooks.clone();
        std::thread::spawn(move || {
            std::thread::sleep(after);
            println!("cancelling");
            h.cancel();
        });
    }

    let (src, dst) = std::thread::scope(|s| {
        let dest = s.spawn(|| {
            let conns = accept_streams(&listener, cfg.streams, cfg.io_timeout).map_err(|e| e.to_string())?;
            migrate_destination(&dst_mem, &mut dst_guest, conns, &keys, &cfg, &Hooks::new()).map_err(|e| e.to_string())
        });
        let src = connect_streams(addr, cfg.streams, cfg.io_timeout)
            .map_err(|e| e.to_string())
            .and_then(|conns| {
                migrate_source(&mem, &mut tracker, &mut guest, conns, &keys, &cfg, &hooks).map_err(|e| match e {
                    MigrateError::Cancelled => "cancelled before the commit point".to_string(),
                    e => e.to_string(),
                })
            });
        (
            src,
            dest.join()
                .unwrap_or_else(|_| Err("destination thread panicked".into())),
        )
    });
    match (src, dst) {
        (Ok(s), Ok(_)) => {
            let downtime = s.downtime();
            println!(
                "migrated in {:.0} ms, {} rounds, downtime {:.2} ms; the guest runs at the destination: {}",
                started.elapsed().as_secs_f64() * 1e3,
                rounds.load(Ordering::Relaxed),
                downtime.as_secs_f64() * 1e3,
                dst_guest.is_running()
            );
        }
        (Err(why), _) => {
            // Before the commit point a failed or cancelled migration leaves
            // the source guest running.
            println!("source: {why}; the guest runs at the source: {}", guest.is_running());
        }
        (Ok(_), Err(why)) => println!("destination: {why}"),
    }
    Ok(())
}
