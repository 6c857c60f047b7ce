//! Embedding ferry in a VMM: both sides of a secure live migration through
//! the `ferry` library, on loopback, with progress events and a cancel
//! switch.
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
//! `GuestControl` (pause, resume, save and load the device state). Here a
//! synthetic guest (a thread writing a hot set) stands in for the VM.
//!
//! The source calls [`ferry::source::migrate`]: tickets from the
//! authentication and authorization servers, the mutually authenticated
//! request, the data plane, the signed manifest and the destination's
//! receipt. The destination serves requests with
//! `ferry_control::handshake::serve_destination` and receives each admitted
//! migration with [`ferry::destination::receive`]. The certificates, the
//! policy and the two ticket servers come from `ferry::lab` (a temporary
//! PKI, servers in this process); a deployment has its own.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferry::lab::{Lab, DEST, POLICY, VM};
use ferry::source::SourceError;
use ferry_control::handshake::{serve_destination, OnAdmitted, ServeLimits};
use ferry_control::pki::{Identity, Role};
use ferry_engine::bitmap::AtomicBitmap;
use ferry_engine::dirty::BitmapTracker;
use ferry_engine::migrate::{MigrateError, MigrationConfig};
use ferry_engine::progress::{Hooks, Progress};
use ferry_engine::GuestMemory;
use ferry_vmm::workload::{SyntheticGuest, WorkloadConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cancel_after = std::env::args()
        .skip_while(|a| a != "--cancel-after-ms")
        .nth(1)
        .map(|v| v.parse::<u64>().map(Duration::from_millis))
        .transpose()?;

    // A temporary PKI, policy, and the source domain's ticket servers.
    let lab = Lab::start(POLICY)?;

    // The destination: a daemon's accept loop; each admitted migration is
    // received into fresh memory and a guest that has not run.
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let dest_addr = listener.local_addr()?;
    let dest = Arc::new(lab.destination(DEST, POLICY, 1 << 40)?);
    let me = Arc::new(Identity::load(lab.dir.path(), Role::Host, DEST)?);
    let (received_tx, received_rx) = mpsc::channel();
    let on_admitted: OnAdmitted = Arc::new(move |session, data| {
        let got = ferry::destination::receive(session, &data, &me, Duration::from_secs(10), |_offer, mem| {
            Ok(SyntheticGuest::incoming(mem))
        });
        let _ = received_tx.send(got);
    });
    let stop = Arc::new(AtomicBool::new(false));
    let daemon = serve_destination(listener, dest, ServeLimits::default(), on_admitted, stop.clone())?;

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

    let at = lab.endpoints(dest_addr);
    let cfg = MigrationConfig {
        pin_workers: false,
        ..MigrationConfig::default()
    };
    match ferry::source::migrate(&at, VM, &mem, &mut tracker, &mut guest, &cfg, &hooks) {
        Ok(done) => {
            let received = received_rx.recv_timeout(Duration::from_secs(10))?;
            let runs_there = received.as_ref().is_ok_and(|r| r.guest.is_running());
            println!(
                "migrated in {:.0} ms, {} rounds, downtime {:.2} ms, receipt: transcript matches = {}; the guest runs at the destination: {runs_there}",
                started.elapsed().as_secs_f64() * 1e3,
                rounds.load(Ordering::Relaxed),
                done.report.downtime().as_secs_f64() * 1e3,
                done.receipt.transcript_matches,
            );
        }
        Err(SourceError::Migrate(MigrateError::Cancelled)) => {
            println!(
                "cancelled before the commit point; the guest runs at the source: {}",
                guest.is_running()
            );
        }
        Err(e) => {
            // Before the commit point a failed migration leaves the source
            // guest running; SourceError says which step failed.
            println!("source: {e}; the guest runs at the source: {}", guest.is_running());
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = daemon.join();
    Ok(())
}
