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

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use rustls::{ClientConfig, ServerConfig};
use serde::{Deserialize, Serialize};

pub use crate::modes::{GuestKind, Integrity};
use crate::refusal::{Refusal, WireRefusal};
use thiserror::Error;

use crate::pki::Identity;
use crate::policy::Policy;
use crate::replay::ReplayCache;
use crate::ticket::{self, AuthzClaims, SignedTicket, TicketError};
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

/// What the destination runs: SHA-256 of its binary and of its effective config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurement {
    /// SHA-256 of the running ferry binary (hex).
    pub binary_sha256: String,
    /// SHA-256 of the effective configuration (hex).
    pub config_sha256: String,
}

impl Measurement {
    /// Measures this process: its executable and `config` bytes.
    pub fn of_self(config: &[u8]) -> std::io::Result<Measurement> {
        let exe = std::fs::read(std::env::current_exe()?)?;
        Ok(Measurement {
            binary_sha256: crate::hex(ring::digest::digest(&ring::digest::SHA256, &exe).as_ref()),
            config_sha256: crate::hex(ring::digest::digest(&ring::digest::SHA256, config).as_ref()),
        })
    }
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
}

impl std::ops::Deref for DestinationSession {
    type Target = Admitted;
    fn deref(&self) -> &Admitted {
        &self.admitted
    }
}

impl DestinationSession {
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

/// A destination daemon's admission logic.
#[derive(Debug)]
pub struct Destination {
    cfg: DestinationConfig,
    identity: Identity,
    tls: Arc<ServerConfig>,
    counters: Arc<Counters>,
    audit: Option<Arc<crate::audit::AuditLog>>,
}

#[derive(Debug, Default)]
struct Counters {
    active: AtomicUsize,
    memory: AtomicU64,
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
        }
    }

    /// Records every admission and refusal in `log`.
    pub fn with_audit(mut self, log: Arc<crate::audit::AuditLog>) -> Destination {
        self.audit = Some(log);
        self
    }

    /// Records an event of this daemon (e.g. a receipt) in its audit log.
    pub fn record(&self, event: &str, detail: serde_json::Value) -> Result<(), String> {
        match &self.audit {
            Some(log) => log.append(event, detail).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Takes one control connection through TLS and every check; on success
    /// answers Accept (data streams to `data_port`) and returns the proof.
    /// Every outcome is audited.
    pub fn admit(&self, sock: TcpStream, data_port: u16) -> Result<DestinationSession, HandshakeError> {
        let peer_addr = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        let r = self.admit_inner(sock, data_port);
        let detail = match &r {
            Ok(a) => serde_json::json!({"peer": peer_addr, "vm": a.claims.vm, "source_host": a.claims.source_host,
                "migration_id": a.claims.migration_id, "nonce": a.claims.nonce}),
            Err(e) => serde_json::json!({"peer": peer_addr, "reason": e.to_string(), "code": match e {
                HandshakeError::Refused(r) => r.code(),
                HandshakeError::Tls(_) => "tls",
                HandshakeError::Denied(_) => "denied",
            }}),
        };
        let event = if r.is_ok() { "admit" } else { "refuse" };
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
    fn admit_inner(&self, sock: TcpStream, data_port: u16) -> Result<DestinationSession, HandshakeError> {
        let mut ch = Channel::accept(sock, self.tls.clone(), self.cfg.io_timeout)?;
        let peer = ch
            .peer_cert()
            .map(<[u8]>::to_vec)
            .ok_or_else(|| TlsError::Config("no client certificate".into()))?;
        let req: MigrationRequest = match ch.recv() {
            Ok(r) => r,
            Err(e) => {
                let refusal = Refusal::Malformed(e.to_string());
                let _ = ch.send(&RequestReply::Deny(refusal.to_wire()));
                return Err(HandshakeError::Refused(refusal));
            }
        };
        match self.check(&peer, &req) {
            Ok((claims, slot)) => {
                let migration_id = claims.migration_id;
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
                Ok(DestinationSession {
                    admitted: Admitted {
                        keys: keys(&ch, migration_id)?,
                        offer: req.offer,
                        claims,
                        data_port,
                        measurement: self.cfg.measurement.clone(),
                        channel: ch,
                    },
                    slot,
                })
            }
            Err(refusal) => {
                tracing::warn!(code = refusal.code(), "destination: refused: {refusal}");
                let _ = ch.send(&RequestReply::Deny(refusal.to_wire()));
                Err(HandshakeError::Refused(refusal))
            }
        }
    }

    fn check(&self, peer: &[u8], req: &MigrationRequest) -> Result<(AuthzClaims, Slot), Refusal> {
        let now = crate::now_unix_s();
        // A ticket is checked under each trusted key; the refusal that says
        // most wins (a time or shape error under the right key over a bad
        // signature under another). With no key configured, nothing can be
        // checked at all.
        let mut refusal: Option<TicketError> = None;
        let claims: AuthzClaims = self
            .cfg
            .authz_keys
            .iter()
            .find_map(
                |k| match ticket::verify_at::<AuthzClaims>(&req.ticket, "authz", k, now) {
                    Ok(v) => Some(v.into_claims()),
                    Err(e) => {
                        if refusal
                            .as_ref()
                            .map_or(true, |r| matches!(r, TicketError::BadSignature(_)))
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
        if claims.dest_host != self.cfg.name {
            return Err(Refusal::WrongDestination {
                ticket: claims.dest_host,
                this: self.cfg.name.clone(),
            });
        }
        if crate::fingerprint(peer) != claims.source_fp {
            return Err(Refusal::NotTicketSource);
        }
        if req.offer.vm != claims.vm {
            return Err(Refusal::WrongVm {
                ticket: claims.vm,
                offered: req.offer.vm.clone(),
            });
        }
        let sig = B64.decode(&req.sig).map_err(|_| Refusal::BadSignature)?;
        if !crate::pki::verify_by_cert(peer, &request_message(&req.ticket, &req.offer), &sig) {
            return Err(Refusal::BadSignature);
        }
        self.cfg.policy.admits(&claims.source_host, &claims.vm)?;
        if req.offer.streams == 0 || req.offer.streams > self.cfg.max_streams {
            return Err(Refusal::TooManyStreams {
                offered: req.offer.streams,
                max: self.cfg.max_streams,
            });
        }
        if !self.cfg.guests.contains(&req.offer.guest) {
            return Err(Refusal::UnsupportedGuest {
                offered: req.offer.guest,
                runs: self.cfg.guests.clone(),
            });
        }
        // Admission: count and memory, reserved atomically.
        let c = &self.counters;
        if c.active.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_concurrent {
            c.active.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Busy {
                max: self.cfg.max_concurrent,
            });
        }
        let mem = req.offer.memory_bytes;
        let before = c.memory.fetch_add(mem, Ordering::AcqRel);
        let slot = Slot {
            counters: c.clone(),
            memory: mem,
            active: true,
        };
        if before.saturating_add(mem) > self.cfg.max_memory_bytes {
            return Err(Refusal::NoMemory {
                offered: mem,
                committed: before,
                max: self.cfg.max_memory_bytes,
            });
        }
        // Last: spend the nonce only for a request that passed everything else.
        self.cfg
            .replay
            .check_and_insert(&claims.nonce, claims.exp, now)
            .map_err(|e| Refusal::Replay(e.to_string()))?;
        Ok((claims, slot))
    }
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
    if claims.dest_host != dest_host {
        return Err(HandshakeError::Refused(Refusal::TicketNotForDestination {
            ticket: claims.dest_host.clone(),
            asked: dest_host.into(),
        }));
    }
    let mut ch = Channel::connect(addr, dest_host, cfg, timeout)?;
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

/// JSON bytes signed by a host key, carried as they were signed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedBlob {
    /// "manifest" or "receipt".
    pub kind: String,
    /// base64url of the JSON that was signed.
    pub body: String,
    /// base64url ECDSA P-256 signature over `kind || 0 || body`.
    pub sig: String,
}

fn blob_message(kind: &str, body: &str) -> Vec<u8> {
    let mut m = kind.as_bytes().to_vec();
    m.push(0);
    m.extend_from_slice(body.as_bytes());
    m
}

fn sign_blob<T: Serialize>(kind: &str, value: &T, id: &Identity) -> Result<SignedBlob, HandshakeError> {
    let body = B64.encode(serde_json::to_vec(value).expect("serialises"));
    let sig = id
        .sign(&blob_message(kind, &body))
        .map_err(|_| Refusal::Internal("signing"))?;
    Ok(SignedBlob {
        kind: kind.into(),
        body,
        sig: B64.encode(sig),
    })
}

fn open_blob<T: serde::de::DeserializeOwned>(b: &SignedBlob, kind: &'static str, cert: &[u8]) -> Result<T, Refusal> {
    if b.kind != kind || b.body.len() > crate::tls::MAX_MESSAGE {
        return Err(Refusal::Malformed(format!("expected a {kind}")));
    }
    let bad_sig = || Refusal::BadPeerSignature { what: kind };
    let sig = B64.decode(&b.sig).map_err(|_| bad_sig())?;
    if !crate::pki::verify_by_cert(cert, &blob_message(kind, &b.body), &sig) {
        return Err(bad_sig());
    }
    let json = B64
        .decode(&b.body)
        .map_err(|_| Refusal::Malformed(format!("the {kind}'s body is not base64url")))?;
    serde_json::from_slice(&json).map_err(|e| Refusal::Malformed(format!("malformed {kind}: {e}")))
}

/// What the source says it sent, signed with its host key (non-repudiation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Migration id.
    pub migration_id: u64,
    /// VM id.
    pub vm: String,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Bytes written to the data streams.
    pub bytes_on_wire: u64,
    /// Rounds, the final one included.
    pub rounds: u64,
    /// Start and end of the transfer (Unix milliseconds).
    pub started_unix_ms: u64,
    /// End of the transfer.
    pub finished_unix_ms: u64,
    /// Guest downtime in microseconds.
    pub downtime_us: u64,
    /// SHA-256 root (hex) over every stream's transcript: each frame's
    /// sequence, kind and AES-GCM tag and, in `aead+sha256` mode, each chunk's
    /// digest (SHA-256 over the chunk's per-page SHA-256 digests).
    pub transcript_root: String,
}

/// The destination's signed acknowledgement of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// Migration id.
    pub migration_id: u64,
    /// SHA-256 (hex) of the manifest body as signed by the source.
    pub manifest_sha256: String,
    /// Whether the destination's own transcript root equals the manifest's.
    pub transcript_matches: bool,
    /// When (Unix seconds).
    pub time: u64,
}

impl SourceSession {
    /// Signs and sends `manifest`; returns the destination's
    /// verified receipt (an error if it does not confirm the transcript).
    pub fn exchange_manifest(&mut self, source: &Identity, manifest: &Manifest) -> Result<Receipt, HandshakeError> {
        let blob = sign_blob("manifest", manifest, source)?;
        self.0.channel.begin_exchange();
        let manifest_sha256 = crate::hex(ring::digest::digest(&ring::digest::SHA256, blob.body.as_bytes()).as_ref());
        self.0.channel.send(&blob)?;
        let reply: SignedBlob = self.0.channel.recv()?;
        let peer = self.0.channel.peer_cert().ok_or(Refusal::NoPeerCertificate)?;
        let receipt: Receipt = open_blob(&reply, "receipt", peer)?;
        if receipt.migration_id != manifest.migration_id || receipt.manifest_sha256 != manifest_sha256 {
            return Err(Refusal::Mismatch("the receipt is for another manifest").into());
        }
        if !receipt.transcript_matches {
            return Err(Refusal::TranscriptMismatch(
                "the destination's transcript of the transfer differs from the manifest",
            )
            .into());
        }
        Ok(receipt)
    }
}

impl DestinationSession {
    /// Receives the source's manifest, checks its signature
    /// (the source's certificate), its migration id and its transcript root
    /// against `own_root`, and answers with a signed receipt.
    pub fn receive_manifest(
        &mut self,
        dest: &Identity,
        own_root: &[u8; 32],
    ) -> Result<(Manifest, Receipt), HandshakeError> {
        self.admitted.channel.begin_exchange();
        let blob: SignedBlob = self.admitted.channel.recv()?;
        let peer = self
            .admitted
            .channel
            .peer_cert()
            .ok_or(Refusal::NoPeerCertificate)?
            .to_vec();
        let manifest: Manifest = open_blob(&blob, "manifest", &peer)?;
        if manifest.migration_id != self.claims.migration_id || manifest.vm != self.claims.vm {
            return Err(Refusal::Mismatch("the manifest is for another migration").into());
        }
        let receipt = Receipt {
            migration_id: manifest.migration_id,
            manifest_sha256: crate::hex(ring::digest::digest(&ring::digest::SHA256, blob.body.as_bytes()).as_ref()),
            transcript_matches: manifest.transcript_root == crate::hex(own_root),
            time: crate::now_unix_s(),
        };
        self.admitted.channel.send(&sign_blob("receipt", &receipt, dest)?)?;
        if !receipt.transcript_matches {
            return Err(Refusal::TranscriptMismatch(
                "the manifest's transcript root differs from what this destination received",
            )
            .into());
        }
        Ok((manifest, receipt))
    }
}

/// A data listener on `ip`: on the first free port of `range`, or an
/// ephemeral one.
fn bind_data(ip: IpAddr, range: Option<(u16, u16)>) -> Option<std::net::TcpListener> {
    let Some((first, last)) = range else {
        return std::net::TcpListener::bind((ip, 0)).ok();
    };
    let found = (first..=last).find_map(|port| std::net::TcpListener::bind((ip, port)).ok());
    if found.is_none() {
        tracing::warn!(
            "receive: every data port {first}-{last} is in use: widen --data-ports or lower --max-concurrent"
        );
    }
    found
}

/// Handshakes in progress: per peer address, and in all.
type Pending = Mutex<(HashMap<IpAddr, usize>, usize)>;

/// One handshake's claim on the pending counts, released on drop.
struct PendingSlot {
    pending: Arc<Pending>,
    ip: IpAddr,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut g = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (per, total) = &mut *g;
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
        *total -= 1;
    }
}

/// Limits of a destination's accept loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Handshakes in progress from one peer address at most; more are
    /// closed at once.
    pub pending_per_peer: usize,
    /// Handshakes in progress in all.
    pub pending_total: usize,
    /// The ports data listeners may use (first, last), for firewalls; `None`
    /// takes an ephemeral port. A handshake that finds every port of the
    /// range taken is closed (and logged).
    pub data_ports: Option<(u16, u16)>,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            pending_per_peer: 8,
            pending_total: 256,
            data_ports: None,
        }
    }
}

/// Called with each admitted migration and the listener its data streams
/// will connect to (already announced in the acceptance).
pub type OnAdmitted = Arc<dyn Fn(DestinationSession, std::net::TcpListener) + Send + Sync>;

/// A destination daemon's accept loop: each control connection gets a
/// thread and a data listener of its own; handshakes in progress are capped
/// per peer address and in total (a flood is refused at once, and a peer
/// that connects and stays silent holds only its own slots until the
/// handshake times out). Runs until `stop` is set.
pub fn serve_destination(
    listener: std::net::TcpListener,
    dest: Arc<Destination>,
    limits: ServeLimits,
    on_admitted: OnAdmitted,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let data_ip = listener.local_addr()?.ip();
    let pending: Arc<Pending> = Arc::new(Mutex::new((HashMap::new(), 0)));
    std::thread::Builder::new().name("ferry-receive".into()).spawn(move || {
        let mut backoff = crate::accept::AcceptBackoff::new();
        while !stop.load(Ordering::Relaxed) {
            let (sock, peer) = match listener.accept() {
                Ok(x) => {
                    backoff.succeeded("receive");
                    x
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => {
                    std::thread::sleep(backoff.failed("receive", &e));
                    continue;
                }
            };
            let ip = peer.ip();
            {
                let mut g = pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let (per, total) = &mut *g;
                let mine = per.entry(ip).or_insert(0);
                if *mine >= limits.pending_per_peer || *total >= limits.pending_total {
                    drop(g);
                    tracing::warn!(%peer, "receive: too many handshakes in progress; connection refused");
                    continue; // `sock` dropped: closed at once
                }
                *mine += 1;
                *total += 1;
            }
            // Released on drop: after the handshake, or if the thread never starts.
            let slot = PendingSlot {
                pending: pending.clone(),
                ip,
            };
            let (dest, on_admitted) = (dest.clone(), on_admitted.clone());
            let spawned = std::thread::Builder::new().name("ferry-admit".into()).spawn(move || {
                let admitted = sock
                    .set_nonblocking(false)
                    .ok()
                    .and_then(|()| bind_data(data_ip, limits.data_ports))
                    .and_then(|data| {
                        let port = data.local_addr().ok()?.port();
                        let a = dest.admit(sock, port);
                        if let Err(e) = &a {
                            tracing::info!(%peer, "receive: not admitted: {e}");
                        }
                        a.ok().map(|a| (a, data))
                    });
                // The handshake is over: free the slot before the transfer.
                drop(slot);
                if let Some((a, data)) = admitted {
                    on_admitted(a, data);
                }
            });
            if spawned.is_err() {
                tracing::error!("receive: cannot spawn a handshake thread");
            }
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_listeners_stay_inside_the_configured_port_range() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Find two free consecutive ports, hold the first: the second is taken.
        let (held, port) = (20_000u16..60_000)
            .find_map(|p| {
                let a = std::net::TcpListener::bind((ip, p)).ok()?;
                std::net::TcpListener::bind((ip, p + 1)).ok().map(|b| {
                    drop(b);
                    (a, p)
                })
            })
            .unwrap();
        let l = bind_data(ip, Some((port, port + 1))).unwrap();
        assert_eq!(l.local_addr().unwrap().port(), port + 1);
        // Both taken now: no listener, the handshake is refused.
        assert!(bind_data(ip, Some((port, port + 1))).is_none());
        drop((held, l));
        assert!(bind_data(ip, None).is_some());
    }
}
