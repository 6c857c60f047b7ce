//! The migration request and mutual authentication (paper steps 5-7).
//!
//! ```text
//! source host (TLS client, host cert)              destination daemon (TLS server, host cert)
//!   TLS 1.3, both certificates verified against the CA; ephemeral ECDHE
//!   MigrationRequest { authz ticket, offer, ECDSA sig by source host key } ──▶
//!       checks: peer cert fingerprint = ticket.source_fp; ticket signed by the
//!       trusted authz key, fresh, for this host; nonce never seen (durable);
//!       request signature by the peer's key; incoming policy; admission
//!   ◀── Accept { migration id, data port, signed platform measurement } | Deny { reason }
//!   source checks: the server certificate is for ticket.dest_host (rustls),
//!   the acceptance signature, the measurement against its pins
//!   both: keys = HKDF(TLS exporter("EXPORTER-ferry-data-v1", migration id))
//! ```
//! The data-plane keys exist only inside an [`Admitted`], which only these
//! functions construct, after every check has passed.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use rustls::{ClientConfig, ServerConfig};
use serde::{Deserialize, Serialize};

pub use crate::manifest::{Manifest, Receipt, SignedBlob};
pub use crate::measurement::Measurement;
pub use stages::{GUEST_PAGE_BYTES, MAX_KVM_VCPUS};

mod resolve;
mod stages;
pub use crate::modes::{GuestKind, Integrity};
use crate::refusal::{Refusal, WireRefusal};
pub use crate::serve::{serve_destination, OnAdmitted, ServeLimits};
pub use resolve::{resolution_message, resolve, Answer, Resolution, ResolveReply, ResolveRequest};
use thiserror::Error;

use crate::pki::Identity;
use crate::policy::Policy;
use crate::replay::ReplayCache;
use crate::ticket::{AuthzClaims, SignedTicket};
use crate::tls::{Channel, TlsError};

const EXPORTER_LABEL: &[u8] = b"EXPORTER-ferry-data-v1";

/// What the source proposes to send.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// VM id (must match the ticket).
    pub vm: String,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Data streams.
    pub streams: u16,
    /// Integrity mode (its name in JSON; an unknown name fails to parse).
    pub integrity: Integrity,
    /// The kind of guest: the destination makes a VM of this kind to
    /// receive it (an unknown kind fails to parse; absent means synthetic,
    /// as before the field existed).
    #[serde(default)]
    pub guest: GuestKind,
    /// vCPUs of the guest (a KVM guest's state carries this many).
    #[serde(default)]
    pub vcpus: u32,
}

/// The source's signed request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationRequest {
    /// The authorization ticket.
    pub ticket: SignedTicket,
    /// What will be sent.
    pub offer: Offer,
    /// base64url ECDSA P-256 signature by the source host key (non-repudiation).
    pub sig: String,
}

/// The destination's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum RequestReply {
    /// Admitted.
    Accept {
        /// The migration id (from the ticket).
        migration_id: u64,
        /// Where to connect the data streams.
        data_port: u16,
        /// What the destination runs.
        measurement: Measurement,
        /// base64url ECDSA signature by the destination host key over the above.
        sig: String,
    },
    /// Refused: the code, whose fault, and why.
    Deny(WireRefusal),
}

/// Why a migration was not admitted (either side).
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The TLS channel failed: includes a peer certificate that does not
    /// verify (other CA, expired, wrong name) and a missing client certificate.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The destination refused, with its code and reason.
    #[error("the destination refused the migration: {0}")]
    Denied(WireRefusal),
    /// This side refused the peer (or the caller's request), with the
    /// reason (also sent to the peer where there is one to tell).
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    /// The connection asked what became of a migration (and was answered)
    /// instead of requesting one: nothing was admitted.
    #[error("the peer asked about migration {migration_id:x} and was answered {}; it requested no migration", .answer.as_str())]
    Resolved {
        /// The migration asked about.
        migration_id: u64,
        /// The answer given.
        answer: Answer,
    },
}

fn request_message(ticket: &SignedTicket, offer: &Offer) -> Vec<u8> {
    let mut m = b"ferry-request-v1\n".to_vec();
    m.extend_from_slice(ticket.body.as_bytes());
    m.push(b'\n');
    m.extend_from_slice(&serde_json::to_vec(offer).expect("offer serialises"));
    m
}

fn accept_message(migration_id: u64, data_port: u16, m: &Measurement, request_sig: &str) -> Vec<u8> {
    let mut v = b"ferry-accept-v1\n".to_vec();
    v.extend_from_slice(&migration_id.to_be_bytes());
    v.extend_from_slice(&data_port.to_be_bytes());
    v.extend_from_slice(&serde_json::to_vec(m).expect("measurement serialises"));
    // Binds the acceptance to this very request.
    v.extend_from_slice(request_sig.as_bytes());
    v
}

fn keys(ch: &Channel, migration_id: u64) -> Result<KeyGrant, TlsError> {
    let secret = ch.export(EXPORTER_LABEL, &migration_id.to_be_bytes())?;
    Ok(KeyGrant { migration_id, secret })
}

/// The secret a migration's data plane derives its keys from: the RFC 8446
/// section 7.5 exporter output of the mutually authenticated control session,
/// under ferry's label and the migration id.
///
/// Only an [`Admitted`] holds one, and only a passed handshake makes an
/// `Admitted` (its fields are private to this crate, so no other code can
/// build either). The engine's `SessionKeys::from_grant` takes a
/// `&KeyGrant`: data-plane keys exist only for an authenticated, authorized,
/// fresh migration.
///
/// No code outside this crate can make one:
/// ```compile_fail,E0451
/// let forged = ferry_control::handshake::KeyGrant { migration_id: 1, secret: [0; 32] };
/// ```
pub struct KeyGrant {
    migration_id: u64,
    secret: [u8; 32],
}

impl KeyGrant {
    /// The migration this grant is for.
    pub fn migration_id(&self) -> u64 {
        self.migration_id
    }
    /// The exported secret, for the engine's key schedule (HKDF-SHA256).
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }
}

impl std::fmt::Debug for KeyGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyGrant")
            .field("migration_id", &self.migration_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Proof that a migration passed authentication, authorization, the ticket
/// and replay checks, both sides' policies and admission control. The only
/// way to the data plane's keys. Each side holds it inside its own session
/// type: [`SourceSession`] (from [`request`]) or [`DestinationSession`]
/// (from [`Destination::admit`]), which adds the admission slot.
#[derive(Debug)]
pub struct Admitted {
    keys: KeyGrant,
    offer: Offer,
    claims: AuthzClaims,
    data_port: u16,
    measurement: Measurement,
    channel: Channel,
}

/// The source's side of an admitted migration.
#[derive(Debug)]
pub struct SourceSession(Admitted);

impl SourceSession {
    pub(crate) fn channel_mut(&mut self) -> &mut Channel {
        &mut self.0.channel
    }
}

impl std::ops::Deref for SourceSession {
    type Target = Admitted;
    fn deref(&self) -> &Admitted {
        &self.0
    }
}

/// The destination's side of an admitted migration: it holds one of the
/// destination's concurrency slots and the guest's memory reservation
/// until dropped or turned into a [`MemoryReservation`].
#[derive(Debug)]
pub struct DestinationSession {
    admitted: Admitted,
    slot: Slot,
    /// The destination's audit log (its head goes into the receipt).
    pub(crate) audit: Option<Arc<crate::audit::AuditLog>>,
    /// Its place in the decision record (discards when dropped undecided).
    gate: crate::decision::CommitGate,
}

impl std::ops::Deref for DestinationSession {
    type Target = Admitted;
    fn deref(&self) -> &Admitted {
        &self.admitted
    }
}

impl DestinationSession {
    pub(crate) fn channel_mut(&mut self) -> &mut Channel {
        &mut self.admitted.channel
    }

    /// Where the data plane records the commit (before the guest resumes)
    /// or the discard; see [`crate::decision`].
    pub fn commit_gate(&self) -> &crate::decision::CommitGate {
        &self.gate
    }

    /// After a completed migration: gives up the migration's concurrency
    /// slot and its control channel, and keeps its memory reserved for as
    /// long as the returned value lives (the received guest runs here).
    pub fn into_memory_reservation(self) -> MemoryReservation {
        let mut slot = self.slot;
        slot.counters.active.fetch_sub(1, Ordering::AcqRel);
        slot.active = false;
        MemoryReservation { _slot: slot }
    }
}

impl Admitted {
    /// Whether the peer has closed the control connection (a source that
    /// refused this destination's acceptance, or was cancelled, just goes):
    /// a destination waiting for data streams stops waiting.
    pub fn peer_closed(&self) -> bool {
        self.channel.peer_closed()
    }

    /// The grant the data plane's keys come from
    /// (`ferry_engine::crypto::SessionKeys::from_grant`).
    pub fn key_grant(&self) -> &KeyGrant {
        &self.keys
    }
    /// What the source offered.
    pub fn offer(&self) -> &Offer {
        &self.offer
    }
    /// The authorization ticket's claims.
    pub fn claims(&self) -> &AuthzClaims {
        &self.claims
    }
    /// The destination's data port.
    pub fn data_port(&self) -> u16 {
        self.data_port
    }
    /// The destination's platform measurement.
    pub fn measurement(&self) -> &Measurement {
        &self.measurement
    }
}

/// Settings of a destination daemon.
#[derive(Debug)]
pub struct DestinationConfig {
    /// This host's name (tickets must name it).
    pub name: String,
    /// The trusted authorization servers' Ed25519 keys.
    pub authz_keys: Vec<Vec<u8>>,
    /// Incoming policy.
    pub policy: Policy,
    /// Durable replay cache.
    pub replay: ReplayCache,
    /// Most migrations received at once.
    pub max_concurrent: usize,
    /// Most guest memory committed to incoming migrations at once.
    pub max_memory_bytes: u64,
    /// Largest stream count accepted.
    pub max_streams: u16,
    /// Guest kinds this host can run.
    pub guests: Vec<GuestKind>,
    /// This daemon's measurement.
    pub measurement: Measurement,
    /// Timeout of every control read and write.
    pub io_timeout: Duration,
}

/// The audit event summarising failed, unauthenticated handshakes.
pub const UNAUTHENTICATED_EVENT: &str = "unauthenticated";

/// A destination daemon's admission logic.
#[derive(Debug)]
pub struct Destination {
    cfg: DestinationConfig,
    identity: Identity,
    tls: Arc<ServerConfig>,
    counters: Arc<Counters>,
    audit: Option<Arc<crate::audit::AuditLog>>,
    unauthenticated: crate::unauth::UnauthenticatedTally,
    /// What became of each admitted migration.
    decisions: Arc<crate::decision::DecisionLog>,
    /// Told of every handshake's outcome (metrics).
    observer: Option<Observer>,
}

/// Told of each handshake a destination completes: the audit event
/// (`admit`, `refuse` or `resolve`), the refusal code (empty otherwise),
/// and how long the handshake took.
#[derive(Clone)]
pub struct Observer(pub Arc<ObserveFn>);

/// What an [`Observer`] calls.
pub type ObserveFn = dyn Fn(&'static str, &str, Duration) + Send + Sync;

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}

#[derive(Debug, Default)]
struct Counters {
    active: AtomicUsize,
    memory: AtomicU64,
}

impl Drop for Destination {
    /// The failed handshakes counted since the last summary are not lost.
    fn drop(&mut self) {
        self.write_summary(self.unauthenticated.take());
    }
}

/// An admission slot (one of `max_concurrent`, and the offered memory),
/// released on drop.
#[derive(Debug)]
struct Slot {
    counters: Arc<Counters>,
    memory: u64,
    active: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.active {
            self.counters.active.fetch_sub(1, Ordering::AcqRel);
        }
        self.counters.memory.fetch_sub(self.memory, Ordering::AcqRel);
    }
}

/// Memory a destination keeps reserved for a received guest that runs here;
/// released when dropped (when the guest goes).
#[derive(Debug)]
pub struct MemoryReservation {
    _slot: Slot,
}

impl Destination {
    /// A destination with identity `identity` and TLS config `tls`
    /// (from [`crate::tls::server_config`]).
    pub fn new(cfg: DestinationConfig, identity: Identity, tls: Arc<ServerConfig>) -> Destination {
        Destination {
            cfg,
            identity,
            tls,
            counters: Arc::new(Counters::default()),
            audit: None,
            unauthenticated: crate::unauth::UnauthenticatedTally::default(),
            decisions: Arc::new(crate::decision::DecisionLog::in_memory()),
            observer: None,
        }
    }

    /// Tells `observer` of every handshake's outcome.
    pub fn with_observer(mut self, observer: Observer) -> Destination {
        self.observer = Some(observer);
        self
    }

    /// Ticket nonces in the replay cache.
    pub fn replay_entries(&self) -> usize {
        self.cfg.replay.len()
    }

    /// Records what became of each migration in `log` (a daemon's, in its
    /// state directory) instead of in memory only, so a source in doubt
    /// gets its answer from a restarted daemon too.
    pub fn with_decisions(mut self, log: Arc<crate::decision::DecisionLog>) -> Destination {
        self.decisions = log;
        self
    }

    /// Records every admission and refusal in `log`.
    pub fn with_audit(mut self, log: Arc<crate::audit::AuditLog>) -> Destination {
        self.audit = Some(log);
        self
    }

    /// Records an event of this daemon (e.g. a receipt) in its audit log,
    /// after the summary of failed handshakes counted so far, if any.
    pub fn record(&self, event: &str, detail: serde_json::Value) -> Result<(), crate::audit::AuditError> {
        match &self.audit {
            Some(log) => {
                if let Some(summary) = self.unauthenticated.take() {
                    log.append(UNAUTHENTICATED_EVENT, summary)?;
                }
                log.append(event, detail)
            }
            None => Ok(()),
        }
    }

    /// Writes the summary of failed, unauthenticated handshakes if its
    /// window is due (the accept loop calls this while idle, so a flood
    /// that stops is still recorded within [`crate::unauth::SUMMARY_EVERY`]).
    pub fn flush_unauthenticated(&self) {
        self.write_summary(self.unauthenticated.due_summary());
    }

    /// Counts a connection closed before its handshake because the
    /// handshake slots were full (see [`crate::unauth`]).
    pub fn note_crowded(&self, peer: std::net::IpAddr, why: &crate::pending::Crowded) {
        self.write_summary(self.unauthenticated.note_crowded(peer, why));
    }

    /// Counts a handshake that failed before the peer authenticated; writes
    /// the window's summary when due.
    fn note_unauthenticated(&self, peer: Option<SocketAddr>, e: &TlsError) {
        self.write_summary(self.unauthenticated.note(peer.map(|p| p.ip()), e));
    }

    /// Audits a summary of failed handshakes, if there is one; a failure is
    /// logged (nothing was admitted on it to fail closed).
    fn write_summary(&self, summary: Option<serde_json::Value>) {
        if let (Some(log), Some(summary)) = (&self.audit, summary) {
            if let Err(e) = log.append(UNAUTHENTICATED_EVENT, summary) {
                tracing::error!("destination audit log failed: {e}");
            }
        }
    }

    /// Takes one control connection through TLS and every check; on success
    /// answers Accept (data streams to `data_port`, which the caller already
    /// listens on) and returns the proof. Every outcome is audited.
    pub fn admit(&self, sock: TcpStream, data_port: u16) -> Result<DestinationSession, HandshakeError> {
        self.admit_listening(sock, || Ok((data_port, ()))).map(|(a, ())| a)
    }

    /// As [`Destination::admit`], but the data listener is opened by
    /// `listen` (its port, and whatever the caller keeps of it) only once
    /// every check has passed and the concurrency slot and memory are
    /// held, just before the nonce is spent and Accept sent: a connection
    /// that never authenticates holds no data port, and a port that cannot
    /// be opened is a refusal that leaves the ticket usable.
    pub fn admit_listening<L>(
        &self,
        sock: TcpStream,
        listen: impl FnOnce() -> Result<(u16, L), Refusal>,
    ) -> Result<(DestinationSession, L), HandshakeError> {
        let started = std::time::Instant::now();
        let peer = sock.peer_addr().ok();
        let peer_addr = peer.map(|a| a.to_string()).unwrap_or_default();
        // A peer that never authenticated is counted, not audited one by
        // one (see crate::unauth).
        let ch = match Channel::accept(sock, self.tls.clone(), self.cfg.io_timeout) {
            Ok(ch) => ch,
            Err(e) => {
                self.note_unauthenticated(peer, &e);
                return Err(e.into());
            }
        };
        let r = self.admit_inner(ch, listen);
        let detail = match &r {
            Ok((a, _)) => serde_json::json!({"peer": peer_addr, "vm": a.claims.vm, "source_host": a.claims.source_host,
                "migration_id": a.claims.migration_id, "nonce": a.claims.nonce, "data_port": a.data_port}),
            Err(HandshakeError::Resolved { migration_id, answer }) => serde_json::json!({"peer": peer_addr,
                "migration_id": migration_id, "answer": answer.as_str()}),
            Err(e) => serde_json::json!({"peer": peer_addr, "reason": e.to_string(), "code": match e {
                HandshakeError::Refused(r) => r.code(),
                HandshakeError::Tls(_) => "tls",
                HandshakeError::Denied(_) => "denied",
                HandshakeError::Resolved { .. } => "resolved",
            }}),
        };
        let event = match &r {
            Ok(_) => "admit",
            Err(HandshakeError::Resolved { .. }) => "resolve",
            Err(_) => "refuse",
        };
        if let Some(o) = &self.observer {
            (o.0)(event, detail["code"].as_str().unwrap_or(""), started.elapsed());
        }
        if let Err(e) = self.record(event, detail) {
            tracing::error!("destination audit log failed: {e}");
            if r.is_ok() {
                // Unrecorded admissions are not allowed: fail closed.
                return Err(HandshakeError::Refused(Refusal::Audit(e)));
            }
        }
        r
    }

    /// [`Destination::admit`] without the audit record.
    fn admit_inner<L>(
        &self,
        mut ch: Channel,
        listen: impl FnOnce() -> Result<(u16, L), Refusal>,
    ) -> Result<(DestinationSession, L), HandshakeError> {
        let peer = ch
            .peer_cert()
            .map(<[u8]>::to_vec)
            .ok_or_else(|| TlsError::Config("no client certificate".into()))?;
        // The first message: a migration request, or a source in doubt
        // asking what became of one (see `resolve`).
        let first = ch.recv::<serde_json::Value>().and_then(|v| {
            if v.get("resolve").is_some() {
                serde_json::from_value(v).map(First::Resolve)
            } else {
                serde_json::from_value(v).map(First::Migrate)
            }
            .map_err(|e| TlsError::Malformed(e.to_string().into()))
        });
        let req: MigrationRequest = match first {
            Ok(First::Migrate(r)) => r,
            Ok(First::Resolve(q)) => {
                let answer = self.answer_resolve(&mut ch, &peer, &q)?;
                return Err(HandshakeError::Resolved {
                    migration_id: q.resolve,
                    answer,
                });
            }
            Err(e) => {
                let refusal = Refusal::Malformed(e.to_string().into());
                let _ = ch.send(&RequestReply::Deny(refusal.to_wire()));
                return Err(HandshakeError::Refused(refusal));
            }
        };
        match self.check(&peer, &req, listen) {
            Ok((claims, slot, (data_port, listening))) => {
                let migration_id = claims.migration_id;
                // Durable before the source can send anything to commit.
                if let Err(e) = self.decisions.admitted(migration_id, &claims.source_fp) {
                    let refusal = Refusal::Decision(e);
                    let _ = ch.send(&RequestReply::Deny(refusal.to_wire()));
                    return Err(HandshakeError::Refused(refusal));
                }
                let gate = crate::decision::CommitGate::new(self.decisions.clone(), migration_id);
                let sig = self
                    .identity
                    .sign(&accept_message(
                        migration_id,
                        data_port,
                        &self.cfg.measurement,
                        &req.sig,
                    ))
                    .map_err(|_| Refusal::Internal("signing the acceptance"))?;
                ch.send(&RequestReply::Accept {
                    migration_id,
                    data_port,
                    measurement: self.cfg.measurement.clone(),
                    sig: B64.encode(sig),
                })?;
                tracing::info!(vm = %claims.vm, from = %claims.source_host, migration = migration_id, "destination: admitted");
                let session = DestinationSession {
                    admitted: Admitted {
                        keys: keys(&ch, migration_id)?,
                        offer: req.offer,
                        claims,
                        data_port,
                        measurement: self.cfg.measurement.clone(),
                        channel: ch,
                    },
                    slot,
                    audit: self.audit.clone(),
                    gate,
                };
                Ok((session, listening))
            }
            Err(refusal) => {
                tracing::warn!(code = refusal.code(), "destination: refused: {refusal}");
                let _ = ch.send(&RequestReply::Deny(refusal.to_wire()));
                Err(HandshakeError::Refused(refusal))
            }
        }
    }

    /// Every check, in order; each stage is a value only the one before it
    /// makes, so no check can be skipped or reordered by accident.
    fn check<L>(
        &self,
        peer: &[u8],
        req: &MigrationRequest,
        listen: impl FnOnce() -> Result<(u16, L), Refusal>,
    ) -> Result<(AuthzClaims, Slot, (u16, L)), Refusal> {
        let now = crate::now_unix_s();
        let fresh = stages::TicketChecked::verify(&self.cfg, req, now)?
            .bind(&self.cfg, peer, req)?
            .admit(&self.cfg, req)?
            .reserve(&self.cfg, &self.counters, req)?
            .listen(listen)?
            .spend_nonce(&self.cfg, now)?;
        Ok((fresh.claims, fresh.slot, fresh.data))
    }
}

/// The first message on a destination's port.
enum First {
    Migrate(MigrationRequest),
    Resolve(ResolveRequest),
}

/// The source's half: requests the migration from the destination at
/// `addr`, which must present a certificate for `dest_host` (the ticket's);
/// with non-empty `pinned`, its measurement must be one of them.
#[allow(clippy::too_many_arguments)]
pub fn request(
    addr: SocketAddr,
    dest_host: &str,
    source: &Identity,
    cfg: Arc<ClientConfig>,
    ticket: &SignedTicket,
    claims: &AuthzClaims,
    offer: Offer,
    pinned: &[Measurement],
    timeout: Duration,
) -> Result<SourceSession, HandshakeError> {
    let none = |_: &TcpStream| {};
    request_observed(
        addr, dest_host, source, cfg, ticket, claims, offer, pinned, timeout, &none,
    )
}

/// [`request`], showing `on_connect` the control socket before the
/// handshake (to close it from another thread: a cancel).
#[allow(clippy::too_many_arguments)]
pub fn request_observed(
    addr: SocketAddr,
    dest_host: &str,
    source: &Identity,
    cfg: Arc<ClientConfig>,
    ticket: &SignedTicket,
    claims: &AuthzClaims,
    offer: Offer,
    pinned: &[Measurement],
    timeout: Duration,
    on_connect: &dyn Fn(&TcpStream),
) -> Result<SourceSession, HandshakeError> {
    if claims.dest_host != dest_host {
        return Err(HandshakeError::Refused(Refusal::TicketNotForDestination {
            ticket: claims.dest_host.as_str().into(),
            asked: dest_host.into(),
        }));
    }
    let mut ch = Channel::connect_observed(addr, dest_host, cfg, timeout, on_connect)?;
    let sig = source
        .sign(&request_message(ticket, &offer))
        .map_err(|_| Refusal::Internal("signing the request"))?;
    let req = MigrationRequest {
        ticket: ticket.clone(),
        offer: offer.clone(),
        sig: B64.encode(&sig),
    };
    ch.send(&req)?;
    match ch.recv::<RequestReply>()? {
        RequestReply::Deny(refusal) => Err(HandshakeError::Denied(refusal)),
        RequestReply::Accept {
            migration_id,
            data_port,
            measurement,
            sig: accept_sig,
        } => {
            if migration_id != claims.migration_id {
                return Err(Refusal::Mismatch("the acceptance names another migration").into());
            }
            let peer = ch.peer_cert().ok_or(Refusal::NoPeerCertificate)?;
            let s = B64
                .decode(&accept_sig)
                .map_err(|_| Refusal::BadPeerSignature { what: "acceptance" })?;
            if !crate::pki::verify_by_cert(
                peer,
                &accept_message(migration_id, data_port, &measurement, &req.sig),
                &s,
            ) {
                return Err(Refusal::BadPeerSignature { what: "acceptance" }.into());
            }
            if !pinned.is_empty() && !pinned.contains(&measurement) {
                return Err(Refusal::Unpinned {
                    binary_sha256: measurement.binary_sha256,
                    config_sha256: measurement.config_sha256,
                }
                .into());
            }
            Ok(SourceSession(Admitted {
                keys: keys(&ch, migration_id)?,
                offer,
                claims: claims.clone(),
                data_port,
                measurement,
                channel: ch,
            }))
        }
    }
}

/// Records the outcome of a [`request`] in the source's audit log: admitted
/// (with the destination's measurement) or refused, and why.
pub fn audit_request(
    log: &crate::audit::AuditLog,
    claims: &AuthzClaims,
    result: &Result<SourceSession, HandshakeError>,
) -> Result<(), crate::audit::AuditError> {
    match result {
        Ok(a) => log.append(
            "request-admitted",
            serde_json::json!({"migration_id": claims.migration_id, "vm": claims.vm, "dest_host": claims.dest_host,
                "measurement": a.measurement}),
        ),
        Err(e) => log.append(
            "request-refused",
            serde_json::json!({"migration_id": claims.migration_id, "vm": claims.vm, "dest_host": claims.dest_host,
                "reason": e.to_string()}),
        ),
    }
}
