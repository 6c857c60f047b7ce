//! The destination's checks of a migration request, as typed stages: each
//! stage is a value only the one before it makes (ticket verified → bound to
//! this request and peer → admissible by policy and capabilities → slot and
//! memory reserved → data listener open → nonce spent), so no check can be
//! skipped or reordered by accident.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;

use super::{request_message, Counters, DestinationConfig, MigrationRequest, Offer, Slot};
use crate::modes::GuestKind;
use crate::refusal::Refusal;
use crate::ticket::{self, AuthzClaims, TicketError};

/// Stage 1: the authorization ticket verified under a trusted key, within
/// its validity window, and no longer-lived than servers issue.
pub(super) struct TicketChecked {
    claims: AuthzClaims,
}

/// Stage 2: ... for this destination, presented by the source it names,
/// for the VM offered, and the request signed by that source.
pub(super) struct RequestBound {
    claims: AuthzClaims,
}

/// Stage 3: ... admitted by this destination's policy and capabilities.
pub(super) struct Admissible {
    claims: AuthzClaims,
}

/// Stage 4: ... holding a concurrency slot and the guest's memory.
pub(super) struct Reserved {
    claims: AuthzClaims,
    slot: Slot,
}

/// Stage 5: ... with a data listener open (only now, so a connection that
/// never gets this far holds no data port).
pub(super) struct Listening<L> {
    claims: AuthzClaims,
    slot: Slot,
    data: (u16, L),
}

/// Stage 6: ... and its nonce spent (last, so only a request that passed
/// everything else uses it up): the admitted session is built from this.
pub(super) struct Fresh<L> {
    pub(super) claims: AuthzClaims,
    pub(super) slot: Slot,
    pub(super) data: (u16, L),
}

impl TicketChecked {
    pub(super) fn verify(cfg: &DestinationConfig, req: &MigrationRequest, now: u64) -> Result<TicketChecked, Refusal> {
        // A ticket is checked under each trusted key; the refusal that says
        // most wins (a time or shape error under the right key over a bad
        // signature under another). With no key configured, nothing can be
        // checked at all.
        let mut refusal: Option<TicketError> = None;
        let claims: AuthzClaims = cfg
            .authz_keys
            .iter()
            .find_map(
                |k| match ticket::verify_at::<AuthzClaims>(&req.ticket, "authz", k, now) {
                    Ok(v) => Some(v.into_claims()),
                    Err(e) => {
                        if refusal
                            .as_ref()
                            .is_none_or(|r| matches!(r, TicketError::BadSignature(_)))
                        {
                            refusal = Some(e);
                        }
                        None
                    }
                },
            )
            .ok_or_else(|| {
                refusal.map_or(Refusal::NoAuthzKey, |source| Refusal::Ticket {
                    what: "authorization",
                    source,
                })
            })?;
        if claims.exp > claims.iat + crate::servers::AUTHZ_TTL_MAX_S {
            return Err(Refusal::TicketTooLong {
                max_s: crate::servers::AUTHZ_TTL_MAX_S,
            });
        }
        Ok(TicketChecked { claims })
    }

    pub(super) fn bind(
        self,
        cfg: &DestinationConfig,
        peer: &[u8],
        req: &MigrationRequest,
    ) -> Result<RequestBound, Refusal> {
        let claims = self.claims;
        if claims.dest_host != cfg.name {
            return Err(Refusal::WrongDestination {
                ticket: claims.dest_host.into(),
                this: cfg.name.clone(),
            });
        }
        if crate::fingerprint(peer) != claims.source_fp {
            return Err(Refusal::NotTicketSource);
        }
        if req.offer.vm != claims.vm {
            return Err(Refusal::WrongVm {
                ticket: claims.vm.into(),
                offered: req.offer.vm.as_str().into(),
            });
        }
        let sig = B64.decode(&req.sig).map_err(|_| Refusal::BadSignature)?;
        if !crate::pki::verify_by_cert(peer, &request_message(&req.ticket, &req.offer), &sig) {
            return Err(Refusal::BadSignature);
        }
        Ok(RequestBound { claims })
    }
}

impl RequestBound {
    pub(super) fn admit(self, cfg: &DestinationConfig, req: &MigrationRequest) -> Result<Admissible, Refusal> {
        crate::peer::check_name("VM id", &self.claims.vm)?;
        cfg.policy.admits(&self.claims.source_host, &self.claims.vm)?;
        if req.offer.streams == 0 || req.offer.streams > cfg.max_streams {
            return Err(Refusal::TooManyStreams {
                offered: req.offer.streams,
                max: cfg.max_streams,
            });
        }
        if !cfg.guests.contains(&req.offer.guest) {
            return Err(Refusal::UnsupportedGuest {
                offered: req.offer.guest,
                runs: cfg.guests.clone(),
            });
        }
        runnable(&req.offer)?;
        Ok(Admissible { claims: self.claims })
    }
}

/// Guest pages are this size; guest memory is a whole number of them.
pub const GUEST_PAGE_BYTES: u64 = 4096;

/// Most vCPUs an offered KVM guest may have (KVM's own x86 limit): more
/// is refused before Accept instead of failing after it.
pub const MAX_KVM_VCPUS: u32 = 1024;

/// An offer a guest can be made of: memory, a whole number of pages, and a
/// KVM guest's vCPUs. Checked before Accept, so a source that offers what
/// cannot run gets a refusal, not a signed acceptance and a failure after.
fn runnable(o: &Offer) -> Result<(), Refusal> {
    let bad = |what, value| Err(Refusal::Unrunnable { what, value });
    if o.memory_bytes == 0 {
        return bad("guest memory of 0 bytes", 0);
    }
    if !o.memory_bytes.is_multiple_of(GUEST_PAGE_BYTES) {
        return bad("guest memory not a whole number of 4 KiB pages", o.memory_bytes);
    }
    if o.guest == GuestKind::Kvm && o.vcpus == 0 {
        return bad("a KVM guest with no vCPU", 0);
    }
    if o.guest == GuestKind::Kvm && o.vcpus > MAX_KVM_VCPUS {
        return bad("more vCPUs than KVM runs (1024)", u64::from(o.vcpus));
    }
    Ok(())
}

impl Admissible {
    /// Count and memory, reserved atomically; released if a later stage
    /// refuses (the slot's drop).
    pub(super) fn reserve(
        self,
        cfg: &DestinationConfig,
        c: &Arc<Counters>,
        req: &MigrationRequest,
    ) -> Result<Reserved, Refusal> {
        if c.active.fetch_add(1, Ordering::AcqRel) >= cfg.max_concurrent {
            c.active.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Busy {
                max: cfg.max_concurrent,
            });
        }
        let mem = req.offer.memory_bytes;
        let before = c.memory.fetch_add(mem, Ordering::AcqRel);
        let slot = Slot {
            counters: c.clone(),
            memory: mem,
            active: true,
        };
        if before.saturating_add(mem) > cfg.max_memory_bytes {
            return Err(Refusal::NoMemory {
                offered: mem,
                committed: before,
                max: cfg.max_memory_bytes,
            });
        }
        Ok(Reserved {
            claims: self.claims,
            slot,
        })
    }
}

impl Reserved {
    pub(super) fn listen<L>(self, listen: impl FnOnce() -> Result<(u16, L), Refusal>) -> Result<Listening<L>, Refusal> {
        Ok(Listening {
            data: listen()?,
            claims: self.claims,
            slot: self.slot,
        })
    }
}

impl<L> Listening<L> {
    pub(super) fn spend_nonce(self, cfg: &DestinationConfig, now: u64) -> Result<Fresh<L>, Refusal> {
        cfg.replay
            .check_and_insert(&self.claims.nonce, self.claims.exp, now)
            .map_err(Refusal::Replay)?;
        Ok(Fresh {
            claims: self.claims,
            slot: self.slot,
            data: self.data,
        })
    }
}
