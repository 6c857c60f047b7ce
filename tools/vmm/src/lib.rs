//! ferry-vmm: the guests ferry's own programs migrate, kept out of the
//! engine so that `ferry-engine` carries no KVM code.
//!
//! - [`kvm`]: a minimal KVM VMM on kvm-ioctls (guest RAM is the engine's
//!   [`GuestMemory`](ferry_engine::GuestMemory), a built-in 64-bit guest
//!   program, vCPU state save/load in [`kvm::state`], and a dirty tracker on
//!   KVM's dirty log);
//! - [`workload`]: the synthetic guest (a thread writing guest memory at a
//!   paced rate), for hosts without /dev/kvm and for measurements;
//! - [`alloc`]: a counting global allocator for reporting heap use.
//!
//! Both guests implement the engine's
//! [`GuestControl`](ferry_engine::guest::GuestControl); what they offer to
//! check a migration (checksums, heartbeats, replay) are their own methods,
//! not part of that trait.
#![warn(missing_docs)]

pub mod alloc;
pub mod kvm;
pub mod workload;

/// A u64 count or offset as a usize (lossless on the 64-bit Linux targets
/// the engine builds for: it refuses to compile anywhere else).
#[inline]
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn usize_from(v: u64) -> usize {
    v as usize
}
