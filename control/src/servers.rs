//! The authentication server (checks the migration client's certificate,
//! issues an authentication ticket) and the authorization server (checks
//! that ticket and the policy, issues an authorization ticket). Each can be
//! embedded (call [`AuthnServer::issue`] / [`AuthzServer::authorize`] with
//! the certificate that authenticated a TLS session) or served over mutual
//! TLS with [`serve`] (`ferry serve authn|authz`).

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ring::signature::Ed25519KeyPair;
use rustls::{ClientConfig, ServerConfig};
use serde::{Deserialize, Serialize};

use crate::peer::{check_name, PeerText};
use crate::policy::Policy;
use crate::refusal::{Refusal, WireRefusal};
use crate::ticket::{self, AuthnClaims, AuthzClaims, SignedTicket};
use crate::tls::{Channel, TlsError};

/// Audience of authentication tickets.
pub const AUTHZ_AUDIENCE: &str = "ferry-authz";
/// Longest an authorization ticket may live.
pub const AUTHZ_TTL_MAX_S: u64 = 300;

/// A request to either server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerRequest {
    /// Authenticate me (by my TLS client certificate).
    Authn,
    /// Authorize this migration (with my authentication ticket).
    Authz {
        /// The authentication ticket.
        authn: SignedTicket,
        /// VM to migrate.
        vm: String,
        /// Destination host.
        dest_host: String,
    },
}

/// Either server's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ServerReply {
    /// Granted.
    Ticket {
        /// The ticket.
        ticket: SignedTicket,
    },
    /// Refused: the code, whose fault, and why.
    Deny(WireRefusal),
}

/// The authentication server.
pub struct AuthnServer {
    key: Ed25519KeyPair,
    ttl_s: u64,
}

impl std::fmt::Debug for AuthnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthnServer")
            .field("ttl_s", &self.ttl_s)
            .finish_non_exhaustive()
    }
}

impl AuthnServer {
    /// A server signing with `key`, tickets valid `ttl_s` seconds (default 60).
    pub fn new(key: Ed25519KeyPair, ttl_s: u64) -> AuthnServer {
        AuthnServer { key, ttl_s }
    }

    /// Issues an authentication ticket for the client whose certificate
    /// (already verified by the TLS handshake) is `client_cert`.
    pub fn issue(&self, client_cert: &[u8], now: u64) -> Result<SignedTicket, Refusal> {
        let client = crate::pki::cert_names(client_cert)
            .into_iter()
            .next()
            .ok_or(Refusal::Malformed("the client certificate names nobody".into()))?;
        let claims = AuthnClaims {
            client,
            client_fp: crate::fingerprint(client_cert),
            nonce: crate::random_hex(16).map_err(|_| Refusal::Internal("the random generator"))?,
            iat: now,
            exp: now + self.ttl_s,
            aud: AUTHZ_AUDIENCE.into(),
        };
        tracing::info!(client = %claims.client, "authn: ticket issued");
        Ok(ticket::sign("authn", &claims, &self.key))
    }
}

/// The authorization server of a source domain.
pub struct AuthzServer {
    key: Ed25519KeyPair,
    authn_key: Vec<u8>,
    policy: Policy,
    ttl_s: u64,
    source_host: String,
    source_fp: String,
    audit: Option<Arc<crate::audit::AuditLog>>,
}

impl std::fmt::Debug for AuthzServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzServer")
            .field("source_host", &self.source_host)
            .finish_non_exhaustive()
    }
}

impl AuthzServer {
    /// A server for source host `source_host` (certificate fingerprint
    /// `source_fp`), trusting authentication tickets under `authn_key`.
    pub fn new(
        key: Ed25519KeyPair,
        authn_key: Vec<u8>,
        policy: Policy,
        ttl_s: u64,
        source_host: String,
        source_fp: String,
    ) -> AuthzServer {
        AuthzServer {
            key,
            authn_key,
            policy,
            ttl_s: ttl_s.min(AUTHZ_TTL_MAX_S),
            source_host,
            source_fp,
            audit: None,
        }
    }

    /// Records every decision in `log` (a decision that cannot be recorded
    /// is a deny).
    pub fn with_audit(mut self, log: Arc<crate::audit::AuditLog>) -> AuthzServer {
        self.audit = Some(log);
        self
    }

    /// Checks the authentication ticket (signature, audience, time, and that
    /// it is presented by the client it names) and the policy; issues an
    /// authorization ticket bound to the VM, the source certificate, the
    /// destination and a fresh migration id. Every decision is logged.
    pub fn authorize(
        &self,
        presenter_cert: &[u8],
        authn: &SignedTicket,
        vm: &str,
        dest_host: &str,
        now: u64,
    ) -> Result<(SignedTicket, AuthzClaims), Refusal> {
        let r = self.decide(presenter_cert, authn, vm, dest_host, now);
        let presenter = crate::fingerprint(presenter_cert);
        // What the peer sent, as it may be shown (a refused name may be
        // anything).
        let (vm, dest_host) = (PeerText::new(vm), PeerText::new(dest_host));
        let (vm, dest_host) = (vm.as_str(), dest_host.as_str());
        let (event, detail) = match &r {
            Ok((_, c)) => {
                tracing::info!(principal = %c.principal, vm, dest_host, migration = c.migration_id, "authz: allow");
                (
                    "allow",
                    serde_json::json!({"principal": c.principal, "vm": vm, "dest_host": dest_host,
                        "migration_id": c.migration_id, "nonce": c.nonce, "presenter": presenter}),
                )
            }
            Err(why) => {
                tracing::warn!(vm, dest_host, "authz: deny: {why}");
                (
                    "deny",
                    serde_json::json!({"vm": vm, "dest_host": dest_host, "reason": why.to_string(),
                        "code": why.code(), "presenter": presenter}),
                )
            }
        };
        if let Some(log) = &self.audit {
            if let Err(e) = log.append(event, detail) {
                return Err(Refusal::Audit(e));
            }
        }
        r
    }

    fn decide(
        &self,
        presenter_cert: &[u8],
        authn: &SignedTicket,
        vm: &str,
        dest_host: &str,
        now: u64,
    ) -> Result<(SignedTicket, AuthzClaims), Refusal> {
        check_name("VM id", vm)?;
        check_name("host name", dest_host)?;
        let a = ticket::verify_at::<AuthnClaims>(authn, "authn", &self.authn_key, now)
            .map_err(|source| Refusal::Ticket {
                what: "authentication",
                source,
            })?
            .into_claims();
        if a.aud != AUTHZ_AUDIENCE {
            return Err(Refusal::WrongAudience { audience: a.aud.into() });
        }
        if a.client_fp != crate::fingerprint(presenter_cert) {
            return Err(Refusal::WrongPresenter { what: "authentication" });
        }
        self.policy.allows(&a.client, vm, &self.source_host, dest_host, now)?;
        let claims = AuthzClaims {
            principal: a.client,
            vm: vm.into(),
            source_host: self.source_host.clone(),
            source_fp: self.source_fp.clone(),
            dest_host: dest_host.into(),
            migration_id: crate::random_u64().map_err(|_| Refusal::Internal("the random generator"))?,
            nonce: crate::random_hex(16).map_err(|_| Refusal::Internal("the random generator"))?,
            iat: now,
            exp: now + self.ttl_s,
        };
        Ok((ticket::sign("authz", &claims, &self.key), claims))
    }
}

/// Handles one request: the peer's verified certificate and its request.
pub type Handler = Arc<dyn Fn(&[u8], ServerRequest) -> ServerReply + Send + Sync>;

/// Serves `handler` over mutual TLS on `listener` until `stop` is set; at
/// most `max_conns` connections at once (more are closed at once).
pub fn serve(
    listener: TcpListener,
    cfg: Arc<ServerConfig>,
    handler: Handler,
    stop: Arc<AtomicBool>,
    limits: crate::pending::PendingLimits,
) -> std::io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let pending = crate::pending::Pending::new(limits);
    std::thread::Builder::new().name("ferry-serve".into()).spawn(move || {
        let mut backoff = crate::accept::AcceptBackoff::new();
        while !stop.load(Ordering::Relaxed) {
            let (sock, peer) = match listener.accept() {
                Ok(x) => {
                    backoff.succeeded("ticket server");
                    x
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => {
                    std::thread::sleep(backoff.failed("ticket server", &e));
                    continue;
                }
            };
            // Released when the connection's thread ends (or never starts).
            let slot = match pending.admit(&sock, peer.ip()) {
                Ok(slot) if sock.set_nonblocking(false).is_ok() => slot,
                Ok(_) => continue,
                Err(why) => {
                    tracing::debug!(%peer, "ticket server: connection closed: {why}");
                    continue; // dropped: closed at once
                }
            };
            let (cfg, handler) = (cfg.clone(), handler.clone());
            let spawned = std::thread::Builder::new()
                .name("ferry-serve-conn".into())
                .spawn(move || {
                    if let Ok(mut ch) = Channel::accept(sock, cfg, Duration::from_secs(10)) {
                        if let (Some(peer), Ok(req)) = (ch.peer_cert().map(<[u8]>::to_vec), ch.recv::<ServerRequest>())
                        {
                            let _ = ch.send(&handler(&peer, req));
                        }
                    }
                    drop(slot);
                });
            if spawned.is_err() {
                // The closure (and its slot) was dropped unrun.
                tracing::warn!("serve: could not spawn a connection thread");
            }
        }
    })
}

/// A handler for an authentication server.
pub fn authn_handler(server: Arc<AuthnServer>) -> Handler {
    Arc::new(move |peer, req| match req {
        ServerRequest::Authn => match server.issue(peer, crate::now_unix_s()) {
            Ok(ticket) => ServerReply::Ticket { ticket },
            Err(r) => ServerReply::Deny(r.to_wire()),
        },
        ServerRequest::Authz { .. } => ServerReply::Deny(Refusal::WrongServer("an authentication server").to_wire()),
    })
}

/// A handler for an authorization server.
pub fn authz_handler(server: Arc<AuthzServer>) -> Handler {
    Arc::new(move |peer, req| match req {
        ServerRequest::Authz { authn, vm, dest_host } => {
            match server.authorize(peer, &authn, &vm, &dest_host, crate::now_unix_s()) {
                Ok((ticket, _)) => ServerReply::Ticket { ticket },
                Err(r) => ServerReply::Deny(r.to_wire()),
            }
        }
        ServerRequest::Authn => ServerReply::Deny(Refusal::WrongServer("an authorization server").to_wire()),
    })
}

/// Asks a server over mutual TLS.
pub fn ask(
    addr: SocketAddr,
    server_name: &str,
    cfg: Arc<ClientConfig>,
    req: &ServerRequest,
    timeout: Duration,
) -> Result<ServerReply, TlsError> {
    ask_observed(addr, server_name, cfg, req, timeout, &|_| {})
}

/// [`ask`], showing `on_connect` the socket (to close it on a cancel).
pub fn ask_observed(
    addr: SocketAddr,
    server_name: &str,
    cfg: Arc<ClientConfig>,
    req: &ServerRequest,
    timeout: Duration,
    on_connect: &dyn Fn(&std::net::TcpStream),
) -> Result<ServerReply, TlsError> {
    let mut ch = Channel::connect_observed(addr, server_name, cfg, timeout, on_connect)?;
    ch.send(req)?;
    ch.recv()
}
