//! The source side of a migration against real daemons, as a VMM embedding
//! ferry runs it: ask the authentication and authorization servers for
//! tickets, request admission from the destination, move the guest, then
//! exchange the signed manifest and receipt.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_control::handshake::{self, Manifest, Offer, Receipt};
use ferry_control::pki::{self, Identity, Role};
use ferry_control::servers::{self, ServerReply, ServerRequest};
use ferry_control::ticket::{self, AuthzClaims, SignedTicket};
use ferry_control::tls;
use ferry_engine::dirty::DirtyTracker;
use ferry_engine::guest::GuestControl;
use ferry_engine::migrate::{MigrationConfig, SourceReport};
use ferry_engine::progress::Hooks;
use ferry_engine::GuestMemory;
use rustls::ClientConfig;

use crate::lab::Step;

/// Why the source side did not migrate, or migrated without a receipt.
/// Until [`SourceError::Migrate`] the guest never left; see each variant.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// This host's or the client's credentials could not be loaded.
    #[error("loading credentials from {}: {source}", pki.display())]
    Credentials {
        /// The PKI folder.
        pki: std::path::PathBuf,
        /// Why.
        #[source]
        source: ferry_control::pki::PkiError,
    },
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[source] tls::TlsError),
    /// A ticket server could not be reached.
    #[error("{what} server at {addr}: {source}")]
    Server {
        /// "authentication" or "authorization".
        what: &'static str,
        /// Where.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: tls::TlsError,
    },
    /// A ticket server refused.
    #[error("the {what} server refused: {refusal}")]
    Refused {
        /// "authentication" or "authorization".
        what: &'static str,
        /// Its refusal, with code and blame.
        refusal: ferry_control::refusal::WireRefusal,
    },
    /// The authorization ticket does not verify here.
    #[error("the authorization ticket does not verify: {0}")]
    Ticket(#[source] ferry_control::ticket::TicketError),
    /// The destination did not admit the migration (or this side refused
    /// the destination).
    #[error("admission: {0}")]
    Admission(#[source] handshake::HandshakeError),
    /// The audit log could not record the request's outcome.
    #[error("audit log: {0}")]
    Audit(#[source] ferry_control::audit::AuditError),
    /// The migration failed; [`MigrateError`](ferry_engine::migrate::MigrateError)
    /// says where the guest is (before the commit point: running here).
    #[error(transparent)]
    Migrate(ferry_engine::migrate::MigrateError),
    /// Commit was sent, its confirmation never came, and the destination
    /// answered (signed) that it discarded the migration: the guest was
    /// resumed here (`resumed`: how that went).
    #[error("{cause}. The destination then answered, signed, that it DISCARDED migration {:x}: {}", .resolution.migration_id, match .resumed {
        Ok(()) => "the guest was resumed and runs here".to_string(),
        Err(e) => format!("resuming the guest here FAILED ({e}): it is paused here and runs nowhere"),
    })]
    Discarded {
        /// Why the confirmation did not come.
        cause: Box<ferry_engine::migrate::MigrateError>,
        /// The destination's signed answer.
        resolution: Box<handshake::Resolution>,
        /// Resuming the guest here.
        resumed: Result<(), ferry_engine::guest::GuestError>,
    },
    /// Commit was sent, its confirmation never came, and the destination
    /// answered (signed) that it committed: the guest runs there, not here.
    /// No manifest or receipt was exchanged.
    #[error("{cause}. The destination then answered, signed, that it COMMITTED migration {:x}: the guest runs there and not here (no manifest or receipt was exchanged)", .resolution.migration_id)]
    CommittedUnconfirmed {
        /// Why the confirmation did not come.
        cause: Box<ferry_engine::migrate::MigrateError>,
        /// The destination's signed answer.
        resolution: Box<handshake::Resolution>,
    },
    /// Commit was sent, its confirmation never came, and asking the
    /// destination what became of the migration gave no answer either: the
    /// guest stays paused here.
    #[error("{cause}. Asking the destination what became of migration {migration_id:x} failed too: {why}. The guest stays PAUSED here: when the destination is reachable, `ferry resolve --api SOCK` asks it again")]
    InDoubt {
        /// Why the confirmation did not come.
        cause: Box<ferry_engine::migrate::MigrateError>,
        /// The migration.
        migration_id: u64,
        /// Why asking failed (or "unknown").
        why: Unresolved,
    },
    /// The guest moved (the destination runs it), but the signed manifest
    /// and receipt exchange failed: non-repudiation is missing for this
    /// migration. The guest does **not** run here.
    #[error("the guest runs at the destination, but the manifest exchange failed: {source}")]
    Receipt {
        /// The engine's report of the completed migration.
        report: Box<SourceReport>,
        /// What failed.
        #[source]
        source: handshake::HandshakeError,
    },
}

/// Why a source in doubt could not learn the outcome.
#[derive(Debug, thiserror::Error)]
pub enum Unresolved {
    /// The destination could not be asked, or refused to answer.
    #[error("{0}")]
    Asking(#[source] handshake::HandshakeError),
    /// The destination has no record of the migration (another host at
    /// that address, or its state directory was lost): nothing can be
    /// concluded.
    #[error("the destination has no record of the migration (another host at that address, or its state directory was lost): check its audit log")]
    Unknown,
    /// This host's credentials could not be loaded.
    #[error("loading this host's credentials: {0}")]
    Credentials(#[source] ferry_control::pki::PkiError),
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(#[source] tls::TlsError),
    /// The source's audit log could not record the answer.
    #[error("recording the answer in the audit log: {0}")]
    Audit(#[source] ferry_control::audit::AuditError),
}

/// Times a source in doubt asks the destination before it stays in doubt
/// (then `ferry resolve` asks again).
pub const RESOLVE_ATTEMPTS: u32 = 5;
/// The pause between two of those attempts.
pub const RESOLVE_PAUSE: Duration = Duration::from_secs(1);

/// Asks the destination of `at` what became of migration `migration_id`,
/// as this source host, up to `attempts` times (a destination that cannot
/// be reached is retried; an answer is final); records the signed answer in
/// the source's audit log. Only a signed "committed" or "discarded" is
/// returned as `Ok`.
pub fn resolve(
    at: &Endpoints<'_>,
    migration_id: u64,
    timeout: Duration,
    attempts: u32,
) -> Result<handshake::Resolution, Unresolved> {
    let host = Identity::load(at.pki, Role::Host, at.host).map_err(Unresolved::Credentials)?;
    let hcfg = tls::client_config_for(&host, at.pki).map_err(Unresolved::Tls)?;
    let mut last = None;
    for attempt in 0..attempts.max(1) {
        if attempt > 0 {
            std::thread::sleep(RESOLVE_PAUSE);
        }
        match handshake::resolve(at.dest, at.dest_host, hcfg.clone(), migration_id, timeout) {
            Ok(r) => {
                if let Some(log) = at.audit {
                    log.append(
                        "resolved",
                        serde_json::json!({"migration_id": migration_id, "dest_host": at.dest_host,
                            "answer": r.answer.as_str(), "challenge": r.challenge, "destination_sig": r.sig}),
                    )
                    .map_err(Unresolved::Audit)?;
                }
                return match r.answer {
                    handshake::Answer::Unknown => Err(Unresolved::Unknown),
                    _ => Ok(r),
                };
            }
            Err(e) => {
                tracing::warn!(
                    migration = migration_id,
                    attempt,
                    "asking the destination what became of the migration: {e}"
                );
                last = Some(e);
            }
        }
    }
    Err(Unresolved::Asking(last.expect("at least one attempt")))
}

/// The engine left the guest paused in doubt (`cause`): asks the
/// destination, and resumes the guest here on a signed "discarded".
fn settle(
    at: &Endpoints<'_>,
    migration_id: u64,
    guest: &mut dyn GuestControl,
    cause: ferry_engine::migrate::MigrateError,
    timeout: Duration,
) -> SourceError {
    let cause = Box::new(cause);
    match resolve(at, migration_id, timeout, RESOLVE_ATTEMPTS) {
        Ok(resolution) if resolution.answer == handshake::Answer::Discarded => SourceError::Discarded {
            cause,
            resolution: Box::new(resolution),
            resumed: guest.resume(),
        },
        Ok(resolution) => SourceError::CommittedUnconfirmed {
            cause,
            resolution: Box::new(resolution),
        },
        Err(why) => SourceError::InDoubt {
            cause,
            migration_id,
            why,
        },
    }
}

fn ask(
    cfg: Arc<ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
    req: &ServerRequest,
    what: &'static str,
    on_connect: &dyn Fn(&std::net::TcpStream),
) -> Result<SignedTicket, SourceError> {
    let asked = servers::ask_observed(addr, server_name, cfg, req, TICKET_TIMEOUT, on_connect);
    match asked.map_err(|source| SourceError::Server { what, addr, source })? {
        ServerReply::Ticket { ticket } => Ok(ticket),
        ServerReply::Deny(refusal) => Err(SourceError::Refused { what, refusal }),
    }
}

/// Step 3: an authentication ticket for the client of `cfg`.
pub fn authn_ticket(cfg: Arc<ClientConfig>, addr: SocketAddr, server_name: &str) -> Result<SignedTicket, SourceError> {
    ask(cfg, addr, server_name, &ServerRequest::Authn, "authentication", &|_| {})
}

/// Each wait on a ticket server (its whole exchange gets three).
pub const TICKET_TIMEOUT: Duration = Duration::from_secs(5);

/// Step 4: an authorization ticket for `vm` to `dest_host`.
pub fn authz_ticket(
    cfg: Arc<ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
    authn: SignedTicket,
    vm: &str,
    dest_host: &str,
) -> Result<SignedTicket, SourceError> {
    ask(
        cfg,
        addr,
        server_name,
        &authz_request(authn, vm, dest_host),
        "authorization",
        &|_| {},
    )
}

fn authz_request(authn: SignedTicket, vm: &str, dest_host: &str) -> ServerRequest {
    ServerRequest::Authz {
        authn,
        vm: vm.into(),
        dest_host: dest_host.into(),
    }
}

/// Where the servers are and who is asking.
#[derive(Debug, Clone)]
pub struct Endpoints<'a> {
    /// The PKI folder (this host's and the client's credentials, the CA).
    pub pki: &'a Path,
    /// This (source) host's name.
    pub host: &'a str,
    /// The migration client's name (`clients/NAME`).
    pub client: &'a str,
    /// Authentication server.
    pub authn: SocketAddr,
    /// Authorization server.
    pub authz: SocketAddr,
    /// The name on the authn/authz servers' certificates.
    pub servers_name: &'a str,
    /// The destination daemon's control address.
    pub dest: SocketAddr,
    /// The destination's host name (its certificate must be for it).
    pub dest_host: &'a str,
    /// The source's audit log (the request's outcome is recorded there).
    pub audit: Option<&'a ferry_control::audit::AuditLog>,
    /// Destination measurements this source sends guests to; empty: any.
    /// Self-reported by the destination (see
    /// [`ferry_control::measurement`]): this catches a wrong build or
    /// policy, not a stolen destination key.
    pub pinned: &'a [ferry_control::handshake::Measurement],
}

/// What a finished migration leaves: the engine's report, the destination's
/// verified receipt, and the control plane's timed steps.
#[derive(Debug)]
pub struct Migrated {
    /// The engine's report.
    pub report: SourceReport,
    /// The destination's signed receipt of the manifest.
    pub receipt: Receipt,
    /// Each control-plane step and how long it took.
    pub steps: Vec<Step>,
    /// The migration id from the authorization ticket.
    pub migration_id: u64,
}

/// Migrates `vm` (memory `mem`, tracked by `tracker`, run by `guest`) to the
/// destination of `at`, reporting progress to and obeying a cancel from
/// `hooks`.
pub fn migrate(
    at: &Endpoints<'_>,
    vm: &str,
    mem: &GuestMemory,
    tracker: &mut dyn DirtyTracker,
    guest: &mut dyn GuestControl,
    cfg: &MigrationConfig,
    hooks: &Hooks,
) -> Result<Migrated, SourceError> {
    let creds = |source| SourceError::Credentials {
        pki: at.pki.to_path_buf(),
        source,
    };
    let mut steps = Vec::new();
    let mut t = Instant::now();
    let mut step = |name: &str| {
        steps.push(Step {
            name: name.into(),
            ms: t.elapsed().as_secs_f64() * 1e3,
        });
        t = Instant::now();
    };
    let client = Identity::load(at.pki, Role::Client, at.client).map_err(creds)?;
    let ccfg = tls::client_config_for(&client, at.pki).map_err(SourceError::Tls)?;
    // Until admitted, a cancel closes whatever socket the control plane
    // waits on (a slow or silent server cannot hold a cancelled migration).
    let cancellable = |s: &std::net::TcpStream| hooks.close_on_cancel(s);
    let authn = ask(
        ccfg.clone(),
        at.authn,
        at.servers_name,
        &ServerRequest::Authn,
        "authentication",
        &cancellable,
    )?;
    step("authentication ticket");
    let req = authz_request(authn, vm, at.dest_host);
    let ticket = ask(ccfg, at.authz, at.servers_name, &req, "authorization", &cancellable)?;
    step("authorization ticket");
    let claims: AuthzClaims = ticket::verify(&ticket, "authz", &pki::verify_key(at.pki, "authz").map_err(creds)?)
        .map_err(SourceError::Ticket)?;
    let host = Identity::load(at.pki, Role::Host, at.host).map_err(creds)?;
    let hcfg = tls::client_config_for(&host, at.pki).map_err(SourceError::Tls)?;
    let offer = Offer {
        vm: vm.into(),
        memory_bytes: mem.size_bytes(),
        streams: cfg.streams,
        integrity: cfg.integrity,
        guest: guest.kind(),
        vcpus: guest.vcpus(),
    };
    let requested = handshake::request_observed(
        at.dest,
        at.dest_host,
        &host,
        hcfg,
        &ticket,
        &claims,
        offer,
        at.pinned,
        cfg.io_timeout,
        &cancellable,
    );
    // Admitted or not, the control plane's waits are over: from here the
    // engine obeys a cancel (before its commit point only), and the control
    // channel must stay open for the manifest.
    hooks.forget_sockets();
    if let Some(log) = at.audit {
        handshake::audit_request(log, &claims, &requested).map_err(SourceError::Audit)?;
    }
    let mut admitted = requested.map_err(SourceError::Admission)?;
    step("request: mutual TLS 1.3, ticket and policies checked, admitted, keys exported");
    let started = std::time::SystemTime::now();
    let report = match ferry_engine::session::run_source(mem, tracker, guest, &admitted, at.dest.ip(), cfg, hooks) {
        Ok(r) => r,
        // Past the commit point without the destination's word: ask it.
        Err(cause @ ferry_engine::migrate::MigrateError::InDoubt(_)) => {
            return Err(settle(at, claims.migration_id, guest, cause, cfg.io_timeout))
        }
        Err(e) => return Err(SourceError::Migrate(e)),
    };
    t = Instant::now();
    let manifest = Manifest {
        migration_id: claims.migration_id,
        vm: vm.into(),
        memory_bytes: mem.size_bytes(),
        pages_sent: report.pages_sent,
        bytes_on_wire: report.bytes_on_wire,
        rounds: report.rounds.len() as u64,
        started_unix_ms: crate::record::unix_ms_at(started),
        finished_unix_ms: crate::record::unix_ms(),
        downtime_us: u64::try_from(report.downtime().as_micros()).unwrap_or(u64::MAX),
        transcript_root: ferry_control::hex(&report.transcript_root),
    };
    let receipt = match admitted.exchange_manifest(&host, &manifest) {
        Ok(r) => r,
        Err(source) => {
            return Err(SourceError::Receipt {
                report: Box::new(report),
                source,
            })
        }
    };
    steps.push(Step {
        name: "manifest signed, verified and receipted".into(),
        ms: t.elapsed().as_secs_f64() * 1e3,
    });
    Ok(Migrated {
        report,
        receipt,
        steps,
        migration_id: claims.migration_id,
    })
}
