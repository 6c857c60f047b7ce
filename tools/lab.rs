//! A whole control plane on loopback, for the demo and the tests: a lab PKI
//! in a temporary folder, the source domain's authentication and
//! authorization servers (mutual TLS), and a destination daemon's admission.
//! Every step is the real one; only the hosts share a machine.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_control::audit::{self, AuditLog};
use ferry_control::handshake::{
    self, Destination, DestinationConfig, DestinationSession, HandshakeError, Measurement, Offer, SourceSession,
};
use ferry_control::modes::GuestKind;
use ferry_control::pending::PendingLimits;
use ferry_control::pki::{self, Identity, Role};
use ferry_control::policy::Policy;
use ferry_control::replay::ReplayCache;
use ferry_control::servers::{self, AuthnServer, AuthzServer};
use ferry_control::ticket::{self, AuthzClaims, SignedTicket};
use ferry_control::tls;
use serde::Serialize;

/// Source and destination host names in the lab.
pub const SOURCE: &str = "src";
/// Destination host name.
pub const DEST: &str = "dst";
/// The source domain's audit log file, in the lab folder.
pub const SOURCE_AUDIT: &str = "audit-src.jsonl";

/// The VM the demo migrates.
pub const VM: &str = "demo-vm";

/// The lab's default policy: the operator may move `demo-*` from src to dst;
/// dst admits `demo-*` from src.
pub const POLICY: &str = r#"
[[allow]]
principal = "operator"
vms = ["demo-*"]
from = ["src"]
to = ["dst"]

[[incoming]]
from = ["src"]
vms = ["demo-*"]
"#;

/// One timed protocol step.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Step {
    /// What happened.
    pub name: String,
    /// How long it took, in milliseconds.
    pub ms: f64,
}

/// A lab folder that is removed when dropped.
#[derive(Debug)]
pub struct LabDir(PathBuf);

impl LabDir {
    /// A fresh folder under the system temp dir.
    pub fn new() -> std::io::Result<LabDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!("ferry-lab-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(LabDir(p))
    }
    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for LabDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Errors of the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// Setup failed.
    #[error("lab setup: {0}")]
    Setup(String),
    /// A server refused.
    #[error("{server} server refused: {reason}")]
    Denied {
        /// Which server.
        server: &'static str,
        /// Why.
        reason: String,
    },
    /// The migration request was not admitted.
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
}

fn setup<E: std::fmt::Display>(e: E) -> LabError {
    LabError::Setup(e.to_string())
}

/// The running control plane of the lab.
pub struct Lab {
    /// The PKI folder.
    pub dir: LabDir,
    /// Where the authentication server listens.
    pub authn_addr: SocketAddr,
    /// Where the authorization server listens.
    pub authz_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Timed steps so far.
    pub steps: Vec<Step>,
    /// The source domain's audit log (authz decisions, requests, commits).
    pub src_audit: Arc<AuditLog>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn timed<T>(steps: &mut Vec<Step>, name: &str, f: impl FnOnce() -> Result<T, LabError>) -> Result<T, LabError> {
    let t = Instant::now();
    let r = f()?;
    steps.push(Step {
        name: name.into(),
        ms: t.elapsed().as_secs_f64() * 1e3,
    });
    Ok(r)
}

impl Lab {
    /// Makes the PKI (CA; hosts src and dst; operator) and starts the source
    /// domain's authentication and authorization servers with `policy`.
    pub fn start(policy: &str) -> Result<Lab, LabError> {
        let dir = LabDir::new().map_err(setup)?;
        let mut steps = Vec::new();
        timed(&mut steps, "pki: CA, host and client certificates, server keys", || {
            pki::init(dir.path(), &[SOURCE.into(), DEST.into()]).map_err(setup)
        })?;
        let d = dir.path();
        let src = Identity::load(d, Role::Host, SOURCE).map_err(setup)?;
        let tls_cfg = tls::server_config_for(&src, d).map_err(setup)?;
        let stop = Arc::new(AtomicBool::new(false));
        let authn = Arc::new(AuthnServer::new(pki::signing_key(d, "authn").map_err(setup)?, 60));
        let src_audit = Arc::new(
            AuditLog::open(
                &d.join(SOURCE_AUDIT),
                "source domain",
                Identity::load(d, Role::Host, SOURCE).map_err(setup)?,
            )
            .map_err(setup)?,
        );
        let authz = Arc::new(
            AuthzServer::new(
                pki::signing_key(d, "authz").map_err(setup)?,
                pki::verify_key(d, "authn").map_err(setup)?,
                Policy::from_toml(policy).map_err(setup)?,
                300,
                SOURCE.into(),
                src.fingerprint(),
            )
            .with_audit(src_audit.clone()),
        );
        let l1 = TcpListener::bind("127.0.0.1:0").map_err(setup)?;
        let l2 = TcpListener::bind("127.0.0.1:0").map_err(setup)?;
        let (authn_addr, authz_addr) = (l1.local_addr().map_err(setup)?, l2.local_addr().map_err(setup)?);
        let limits = PendingLimits {
            per_peer: 64,
            total: 64,
        };
        servers::serve(l1, tls_cfg.clone(), servers::authn_handler(authn), stop.clone(), limits).map_err(setup)?;
        servers::serve(l2, tls_cfg, servers::authz_handler(authz), stop.clone(), limits).map_err(setup)?;
        Ok(Lab {
            dir,
            authn_addr,
            authz_addr,
            stop,
            steps,
            src_audit,
        })
    }

    /// The operator's steps 3 and 4: an authentication ticket, then an
    /// authorization ticket for `vm` to `dest`.
    pub fn tickets(&mut self, client: &str, vm: &str, dest: &str) -> Result<(SignedTicket, AuthzClaims), LabError> {
        let d = self.dir.path().to_path_buf();
        let op = Identity::load(&d, Role::Client, client).map_err(setup)?;
        let cfg = tls::client_config_for(&op, &d).map_err(setup)?;
        let (authn_addr, authz_addr) = (self.authn_addr, self.authz_addr);
        let authn = timed(
            &mut self.steps,
            "authn: client certificate checked, authentication ticket issued",
            || {
                crate::source::authn_ticket(cfg.clone(), authn_addr, SOURCE).map_err(|reason| LabError::Denied {
                    server: "authentication",
                    reason: reason.to_string(),
                })
            },
        )?;
        let tk = timed(
            &mut self.steps,
            "authz: ticket and policy checked, authorization ticket issued",
            || {
                crate::source::authz_ticket(cfg, authz_addr, SOURCE, authn, vm, dest).map_err(|reason| {
                    LabError::Denied {
                        server: "authorization",
                        reason: reason.to_string(),
                    }
                })
            },
        )?;
        // The source reads its ticket's claims with its domain's authz key.
        let claims: AuthzClaims =
            ticket::verify(&tk, "authz", &pki::verify_key(&d, "authz").map_err(setup)?).map_err(setup)?;
        Ok((tk, claims))
    }

    /// Where a source in this lab (host [`SOURCE`], client "operator", the
    /// lab's ticket servers) migrates to the destination [`DEST`] listening
    /// on `dest`: for [`crate::source::migrate`].
    pub fn endpoints(&self, dest: std::net::SocketAddr) -> crate::source::Endpoints<'_> {
        crate::source::Endpoints {
            pki: self.dir.path(),
            host: SOURCE,
            client: "operator",
            authn: self.authn_addr,
            authz: self.authz_addr,
            servers_name: SOURCE,
            dest,
            dest_host: DEST,
            audit: None,
            pinned: &[],
        }
    }

    /// A destination daemon for host `name` of this lab (its policy: the
    /// `[[incoming]]` rules of `policy`), with a replay cache file in the lab.
    pub fn destination(&self, name: &str, policy: &str, max_memory_bytes: u64) -> Result<Destination, LabError> {
        self.destination_with(name, policy, max_memory_bytes, |_| {})
    }

    /// [`destination`](Self::destination) with its configuration changed by
    /// `edit` (tests: fewer guest kinds, shorter timeouts).
    pub fn destination_with(
        &self,
        name: &str,
        policy: &str,
        max_memory_bytes: u64,
        edit: impl FnOnce(&mut DestinationConfig),
    ) -> Result<Destination, LabError> {
        let d = self.dir.path();
        let id = Identity::load(d, Role::Host, name).map_err(setup)?;
        let tls_cfg = tls::server_config_for(&id, d).map_err(setup)?;
        let mut cfg = DestinationConfig {
            name: name.into(),
            authz_keys: vec![pki::verify_key(d, "authz").map_err(setup)?],
            policy: Policy::from_toml(policy).map_err(setup)?,
            replay: ReplayCache::open(&d.join(format!("replay-{name}")), ferry_control::now_unix_s()).map_err(setup)?,
            max_concurrent: 4,
            max_memory_bytes,
            max_streams: 64,
            guests: vec![GuestKind::Kvm, GuestKind::Synthetic],
            measurement: Measurement::of_self(policy.as_bytes()).map_err(setup)?,
            io_timeout: Duration::from_secs(5),
        };
        edit(&mut cfg);
        let log = AuditLog::open(
            &d.join(format!("audit-{name}.jsonl")),
            &format!("destination {name}"),
            Identity::load(d, Role::Host, name).map_err(setup)?,
        )
        .map_err(setup)?;
        let decisions =
            ferry_control::decision::DecisionLog::open(&d.join(format!("decisions-{name}"))).map_err(setup)?;
        Ok(Destination::new(cfg, id, tls_cfg)
            .with_audit(Arc::new(log))
            .with_decisions(Arc::new(decisions)))
    }

    /// Verifies both audit logs (the source domain's and `dest`'s), each
    /// against its host certificate; returns the entries in each.
    pub fn verify_audit(&self, dest: &str) -> Result<(usize, usize), LabError> {
        let d = self.dir.path();
        let src = Identity::load(d, Role::Host, SOURCE).map_err(setup)?;
        let dst = Identity::load(d, Role::Host, dest).map_err(setup)?;
        let (a, _) = audit::verify_file(&d.join(SOURCE_AUDIT), src.cert()).map_err(setup)?;
        let (b, _) = audit::verify_file(&d.join(format!("audit-{dest}.jsonl")), dst.cert()).map_err(setup)?;
        Ok((a, b))
    }

    /// Steps 5-7 between the source host and a destination daemon listening
    /// on `control`: request, mutual authentication, admission, keys. Returns
    /// both sides' proofs.
    pub fn admit(
        &mut self,
        dest: &Destination,
        ticket: &SignedTicket,
        claims: &AuthzClaims,
        offer: Offer,
        data_port: u16,
    ) -> Result<(SourceSession, DestinationSession), LabError> {
        let d = self.dir.path().to_path_buf();
        let listener = TcpListener::bind("127.0.0.1:0").map_err(setup)?;
        let addr = listener.local_addr().map_err(setup)?;
        let src = Identity::load(&d, Role::Host, SOURCE).map_err(setup)?;
        let cfg = tls::client_config_for(&src, &d).map_err(setup)?;
        timed(
            &mut self.steps,
            "request: mutual TLS 1.3, ticket and policy checked, accepted, keys exported",
            || {
                std::thread::scope(|s| {
                    let server = s.spawn(|| {
                        // Bounded: a source that gives up before connecting must
                        // not leave this side waiting forever.
                        let sock = ferry_engine::transport::accept_streams(&listener, 1, Duration::from_secs(5))
                            .map_err(setup)?
                            .pop()
                            .ok_or_else(|| LabError::Setup("no control connection".into()))?;
                        dest.admit(sock, data_port).map_err(LabError::from)
                    });
                    let client = handshake::request(
                        addr,
                        &claims.dest_host,
                        &src,
                        cfg,
                        ticket,
                        claims,
                        offer,
                        &[],
                        Duration::from_secs(5),
                    );
                    let _ = handshake::audit_request(&self.src_audit, claims, &client);
                    let server = server
                        .join()
                        .unwrap_or_else(|_| Err(LabError::Setup("destination thread panicked".into())));
                    Ok((client?, server?))
                })
            },
        )
    }
}
