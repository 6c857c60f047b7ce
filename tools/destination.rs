//! The destination side of one admitted migration, as a daemon or a VMM
//! embedding ferry runs it: make the guest's memory and a guest that has
//! not run, receive the data streams into them (the guest runs here from the
//! commit on), then check the source's signed manifest and answer with a
//! signed receipt.
//!
//! Use it from [`ferry_control::handshake::serve_destination`]'s callback:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # fn demo(dest: Arc<ferry_control::handshake::Destination>, me: Arc<ferry_control::pki::Identity>,
//! #         listener: std::net::TcpListener) -> std::io::Result<()> {
//! use ferry_control::handshake::{serve_destination, OnAdmitted, ServeLimits};
//! use ferry_vmm::workload::SyntheticGuest;
//!
//! let on_admitted: OnAdmitted = Arc::new(move |session, data| {
//!     let got = ferry::destination::receive(session, &data, &me, std::time::Duration::from_secs(10), |_offer, mem| {
//!         Ok(SyntheticGuest::incoming(mem))
//!     });
//!     match got {
//!         // The guest runs here; keep `r.guest` and `r.reservation` alive.
//!         Ok(r) => println!("received, receipt: {:?}", r.receipt.is_ok()),
//!         Err(e) => eprintln!("not received (the guest never ran here): {e}"),
//!     }
//! });
//! serve_destination(listener, dest, ServeLimits::default(), on_admitted, Default::default())?;
//! # Ok(()) }
//! ```

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use ferry_control::handshake::{DestinationSession, HandshakeError, Manifest, MemoryReservation, Offer, Receipt};
use ferry_control::pki::Identity;
use ferry_engine::guest::{GuestControl, GuestError};
use ferry_engine::memory::MemoryError;
use ferry_engine::migrate::{DestReport, MigrateError, MigrationConfig};
use ferry_engine::progress::Hooks;
use ferry_engine::GuestMemory;

/// Why a migration was not received. In every case the guest never ran
/// here (the source keeps or resumes it); whatever was received is dropped.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The guest's memory could not be made.
    #[error("making {bytes} bytes of guest memory: {source}")]
    Memory {
        /// Size offered.
        bytes: u64,
        /// Why.
        #[source]
        source: MemoryError,
    },
    /// The receiving guest could not be made.
    #[error("making the receiving guest: {0}")]
    Guest(#[source] GuestError),
    /// The memory the embedder made is not the size the source offered.
    #[error(
        "the receiving guest's memory is {made} bytes but the source offered {offered}; \
         make memory of the offered size (the same region layout as the source's)"
    )]
    MemorySize {
        /// Bytes made.
        made: u64,
        /// Bytes offered.
        offered: u64,
    },
    /// The data plane failed before the guest ran here.
    #[error(transparent)]
    Migrate(MigrateError),
}

/// A received guest, running here.
pub struct Received<G> {
    /// The guest: it runs. Dropping it stops it — and it runs nowhere else.
    pub guest: G,
    /// Its memory.
    pub memory: Arc<GuestMemory>,
    /// What the data plane saw.
    pub report: DestReport,
    /// The source's signed manifest and this side's signed receipt; `Err`
    /// when that exchange failed *after* the guest started here (it keeps
    /// running: losing non-repudiation is no reason to lose the VM).
    pub receipt: Result<(Manifest, Receipt), HandshakeError>,
    /// The guest's memory, counted against the destination's limit while
    /// this lives (the concurrency slot is already given back).
    pub reservation: MemoryReservation,
}

impl<G> std::fmt::Debug for Received<G> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("report", &self.report)
            .field("receipt", &self.receipt.as_ref().map(|(_, r)| r))
            .finish_non_exhaustive()
    }
}

/// Receives the migration `session` admitted, over the data listener
/// `data`: `make_guest` gets the offer and fresh memory of its size and
/// returns a guest that has not run. `me` signs the receipt. Every network
/// wait is bounded by `io_timeout`.
pub fn receive<G: GuestControl>(
    session: DestinationSession,
    data: &TcpListener,
    me: &Identity,
    io_timeout: Duration,
    make_guest: impl FnOnce(&Offer, Arc<GuestMemory>) -> Result<G, GuestError>,
) -> Result<Received<G>, ReceiveError> {
    receive_into(session, data, me, io_timeout, |offer| {
        let memory = Arc::new(
            GuestMemory::new(offer.memory_bytes).map_err(|source| ReceiveError::Memory {
                bytes: offer.memory_bytes,
                source,
            })?,
        );
        let guest = make_guest(offer, memory.clone()).map_err(ReceiveError::Guest)?;
        Ok((memory, guest))
    })
}

/// [`receive`] into memory the embedder makes: `make` gets the offer and
/// returns the guest's memory (of `offer.memory_bytes`, in the source's
/// region layout: a VMM's own, e.g. `GuestMemory::from_vm_memory` of the
/// `GuestMemoryMmap` it will run the guest on) and a guest over it that has
/// not run.
pub fn receive_into<G: GuestControl>(
    session: DestinationSession,
    data: &TcpListener,
    me: &Identity,
    io_timeout: Duration,
    make: impl FnOnce(&Offer) -> Result<(Arc<GuestMemory>, G), ReceiveError>,
) -> Result<Received<G>, ReceiveError> {
    let mut session = session;
    let offer = session.offer().clone();
    let (memory, mut guest) = make(&offer)?;
    if memory.size_bytes() != offer.memory_bytes {
        return Err(ReceiveError::MemorySize {
            made: memory.size_bytes(),
            offered: offer.memory_bytes,
        });
    }
    // Fault the memory in off the receiver threads, as it arrives.
    let m2 = memory.clone();
    let prefault = std::thread::spawn(move || m2.prefault());
    let cfg = MigrationConfig {
        streams: offer.streams,
        integrity: offer.integrity,
        io_timeout,
        ..MigrationConfig::default()
    };
    let report = ferry_engine::session::run_destination(&memory, &mut guest, &session, data, &cfg, &Hooks::new());
    if let Err(e) = prefault.join().unwrap_or(Ok(())) {
        tracing::warn!("prefaulting the received guest's memory failed: {e}");
    }
    let report = report.map_err(ReceiveError::Migrate)?;
    // From here the guest runs: nothing below may drop it.
    let receipt = session.receive_manifest(me, &report.transcript_root);
    if let Err(e) = &receipt {
        tracing::error!("the guest runs here, but the manifest exchange failed: {e}");
    }
    Ok(Received {
        guest,
        memory,
        report,
        receipt,
        reservation: session.into_memory_reservation(),
    })
}
