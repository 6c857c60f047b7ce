//! ferry-engine: the data plane of ferry, a secure live VM migration engine.
//!
//! The engine moves guest memory from a source to a destination over TCP:
//! pre-copy rounds driven by a dirty-page tracker, each page range encrypted
//! with AES-256-GCM (per-stream keys, counter nonces) with the SHA-256 of
//! every page inside the ciphertext, sent by pinned workers through io_uring,
//! acknowledged in batches, and finished by a two-phase switchover (the
//! destination says *ready*, the source *commits*, the destination resumes).
//!
//! The engine never parses certificates or policies: from the control plane
//! it takes one `ferry_control::handshake::KeyGrant` (which only an admitted
//! migration has) and derives its [`crypto::SessionKeys`] from it; no other
//! constructor exists outside tests and the `insecure-test-keys` feature.
//!
//! Entry points: [`session::run_source`] and [`session::run_destination`]
//! (from an admitted control session), built on [`migrate::migrate_source`]
//! and [`migrate::migrate_destination`] (from connected streams and keys);
//! [`progress::Hooks`] carry progress events and a cancel switch.
//! A VMM provides the guest through [`guest::GuestControl`] and a
//! [`dirty::DirtyTracker`]; the `ferry-vmm` crate (under `tools/vmm`) holds
//! a minimal KVM VMM and a synthetic guest that do both.
#![warn(missing_docs)]

pub mod bitmap;
pub mod crypto;
pub mod dirty;
pub mod guest;
mod io;
pub mod memory;
pub mod migrate;
pub mod pace;
pub mod pipeline;
pub mod probe;
pub mod progress;
pub mod session;
pub mod sha;
pub mod transport;
#[cfg(feature = "vm-memory")]
pub mod vm_memory;
pub mod wire;

pub use memory::{GuestAddress, GuestMemory, PageIndex, PAGE_SIZE};

// ferry runs on 64-bit Linux (io_uring, userfaultfd, KVM): a u64 page count
// or byte offset always fits a usize.
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
compile_error!("ferry-engine supports 64-bit Linux only");

/// A u64 count or offset as a usize (lossless on the 64-bit targets ferry
/// builds for; see the compile_error above).
#[inline]
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn usize_from(v: u64) -> usize {
    v as usize
}

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use std::net::{TcpListener, TcpStream};

    /// A connected pair of TCP streams on loopback.
    pub(crate) fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }
}
