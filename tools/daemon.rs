//! `ferry serve authn|authz` and `ferry receive`: the control-plane servers
//! and the destination daemon as processes. Each prints one JSON line per
//! event on stdout (first: where it listens), so scripts and tests can
//! follow it; logs go to stderr.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_control::audit::AuditLog;
use ferry_control::handshake::{self, Destination, DestinationConfig, Measurement, ServeLimits};
use ferry_control::modes::GuestKind;
use ferry_control::pki::{self, Identity, Role};
use ferry_control::policy::Policy;
use ferry_control::replay::ReplayCache;
use ferry_control::servers::{self, AuthnServer, AuthzServer, ServerReply};
use ferry_control::tls;
use ferry_engine::guest::{GuestControl, GuestError};
use ferry_vmm::kvm::KvmVm;
use ferry_vmm::workload::SyntheticGuest;

use crate::metrics::Metrics;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// Prints one event line (JSON) on stdout.
pub fn event(v: &serde_json::Value) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn bind(listen: SocketAddr) -> Result<TcpListener, String> {
    TcpListener::bind(listen).map_err(|x| format!("cannot listen on {listen}: {x}"))
}

fn park_forever() -> ! {
    loop {
        std::thread::park();
    }
}

/// Starts the metrics endpoint at `addr`, if asked: the metrics and the
/// address it is bound to.
fn start_metrics(addr: Option<SocketAddr>) -> Result<(Arc<Metrics>, Option<String>), String> {
    let m = Metrics::new();
    let bound = match addr {
        Some(a) => Some(m.serve(a).map_err(e)?.to_string()),
        None => None,
    };
    Ok((m, bound))
}

/// Serves `handler` over mutual TLS as host `name` on `listen` until
/// killed, counting its answers in metrics served at `metrics`.
fn serve_as(
    pki_dir: &Path,
    name: &str,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    label: &'static str,
    handler: servers::Handler,
) -> Result<(), String> {
    let id = Identity::load(pki_dir, Role::Host, name).map_err(e)?;
    let cfg = tls::server_config_for(&id, pki_dir).map_err(e)?;
    let l = bind(listen)?;
    let addr = l.local_addr().map_err(e)?;
    let (m, metrics_addr) = start_metrics(metrics)?;
    let counted: servers::Handler = Arc::new(move |peer, req| {
        let reply = handler(peer, req);
        let (result, code) = match &reply {
            ServerReply::Ticket { .. } => ("issued", String::new()),
            ServerReply::Deny(r) => ("denied", r.code.clone()),
        };
        m.tickets
            .get_or_create(&crate::metrics::Ticket {
                server: label.into(),
                result: result.into(),
                code,
            })
            .inc();
        reply
    });
    servers::serve(l, cfg, counted, Arc::new(AtomicBool::new(false)), Default::default()).map_err(e)?;
    event(
        &serde_json::json!({"event": "listening", "server": label, "addr": addr.to_string(), "metrics": metrics_addr}),
    );
    park_forever()
}

/// `ferry serve authn`: issues authentication tickets to clients whose
/// certificates chain to the CA under `pki`.
pub fn serve_authn(
    pki_dir: &Path,
    name: &str,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    ttl_s: u64,
) -> Result<(), String> {
    let server = Arc::new(AuthnServer::new(pki::signing_key(pki_dir, "authn").map_err(e)?, ttl_s));
    serve_as(pki_dir, name, listen, metrics, "authn", servers::authn_handler(server))
}

/// `ferry serve authz`: issues authorization tickets under `policy` for
/// migrations from host `name`, auditing every decision in `audit`.
pub fn serve_authz(
    pki_dir: &Path,
    name: &str,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    policy: &Path,
    audit: &Path,
    ttl_s: u64,
) -> Result<(), String> {
    let id = Identity::load(pki_dir, Role::Host, name).map_err(e)?;
    let fingerprint = id.fingerprint();
    let log = AuditLog::open(audit, "authz", id).map_err(e)?;
    let server = Arc::new(
        AuthzServer::new(
            pki::signing_key(pki_dir, "authz").map_err(e)?,
            pki::verify_key(pki_dir, "authn").map_err(e)?,
            Policy::load(policy).map_err(e)?,
            ttl_s,
            name.into(),
            fingerprint,
        )
        .with_audit(Arc::new(log)),
    );
    serve_as(pki_dir, name, listen, metrics, "authz", servers::authz_handler(server))
}

/// Settings of `ferry receive`.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// PKI folder.
    pub pki: PathBuf,
    /// This host's name.
    pub name: String,
    /// Control address.
    pub listen: SocketAddr,
    /// Incoming policy file.
    pub policy: PathBuf,
    /// Where the replay cache and the audit log live.
    pub state_dir: PathBuf,
    /// Most guest memory committed to incoming migrations at once; `None`:
    /// what the host has available at start, less its reserve
    /// ([`crate::host::HostMemory::default_max_guest_bytes`]).
    pub max_memory_bytes: Option<u64>,
    /// Most incoming migrations at once.
    pub max_concurrent: usize,
    /// Timeout of every network wait.
    pub io_timeout: Duration,
    /// Guest kinds received here ("kvm", "synthetic"); a request offering
    /// another is refused at admission.
    pub guests: Vec<GuestKind>,
    /// Have a received KVM guest checksum its memory as its first act, and
    /// report it (to compare with the source's checksum at pause).
    pub verify_guest: bool,
    /// Print a `heartbeat` event for every running KVM guest this often.
    pub heartbeat_events: Option<Duration>,
    /// Ports for data listeners (first, last); `None`: ephemeral.
    pub data_ports: Option<(u16, u16)>,
    /// Serve Prometheus metrics here.
    pub metrics: Option<SocketAddr>,
}

/// The guest kinds this host can run: KVM where /dev/kvm works, and the
/// synthetic guest.
pub fn local_guests() -> Vec<GuestKind> {
    let mut g = Vec::new();
    match ferry_vmm::kvm::available() {
        Ok(()) => g.push(GuestKind::Kvm),
        Err(why) => tracing::warn!("KVM guests cannot be received here: {why}"),
    }
    g.push(GuestKind::Synthetic);
    g
}

/// A guest received here, running in this process.
enum Incoming {
    Synthetic(SyntheticGuest),
    Kvm(KvmVm),
}

impl Incoming {
    fn control(&mut self) -> &mut dyn GuestControl {
        match self {
            Incoming::Synthetic(g) => g,
            Incoming::Kvm(vm) => vm,
        }
    }
    fn get(&self) -> &dyn GuestControl {
        match self {
            Incoming::Synthetic(g) => g,
            Incoming::Kvm(vm) => vm,
        }
    }
}

impl GuestControl for Incoming {
    fn pause(&mut self) -> Result<(), GuestError> {
        self.control().pause()
    }
    fn resume(&mut self) -> Result<(), GuestError> {
        self.control().resume()
    }
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        self.control().save_state()
    }
    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        self.control().load_state(state)
    }
    fn kind(&self) -> GuestKind {
        self.get().kind()
    }
    fn stop_latency(&self) -> Duration {
        self.get().stop_latency()
    }
    fn vcpus(&self) -> u32 {
        self.get().vcpus()
    }
}

/// `ferry receive`: admits migrations that pass every check and receives
/// their guests (a fresh KVM VM for a KVM guest), which then run in this
/// daemon.
pub fn receive(o: &ReceiveOptions) -> Result<(), String> {
    std::fs::create_dir_all(&o.state_dir).map_err(|x| format!("{}: {x}", o.state_dir.display()))?;
    let id = || Identity::load(&o.pki, Role::Host, &o.name).map_err(e);
    let policy_text = std::fs::read_to_string(&o.policy).map_err(|x| format!("{}: {x}", o.policy.display()))?;
    let host = crate::host::HostMemory::read();
    let (max_memory_bytes, max_memory_from) = match (o.max_memory_bytes, &host) {
        (Some(max), Ok(h)) if max > h.total_bytes => {
            event(&serde_json::json!({"event": "warning", "what": "max_memory_above_host",
                "max_memory_bytes": max, "host_total_bytes": h.total_bytes,
                "hint": "--max-memory is more than this host has: a migration that fits it may not fit the host; lower it"}));
            (max, "option")
        }
        (Some(max), _) => (max, "option"),
        (None, Ok(h)) => (h.default_max_guest_bytes(), "host"),
        (None, Err(why)) => return Err(why.to_string()),
    };
    // What this daemon reports in every Accept (printed at start, for
    // sources that pin it).
    let measurement = Measurement::of_self(policy_text.as_bytes()).map_err(e)?;
    let cfg = DestinationConfig {
        name: o.name.clone(),
        authz_keys: vec![pki::verify_key(&o.pki, "authz").map_err(e)?],
        policy: Policy::from_toml(&policy_text).map_err(e)?,
        replay: ReplayCache::open(&o.state_dir.join("replay"), ferry_control::now_unix_s()).map_err(e)?,
        max_concurrent: o.max_concurrent,
        max_memory_bytes,
        max_streams: 64,
        guests: o.guests.clone(),
        measurement: measurement.clone(),
        io_timeout: o.io_timeout,
    };
    let tls_cfg = tls::server_config_for(&id()?, &o.pki).map_err(e)?;
    let audit = Arc::new(
        AuditLog::open(
            &o.state_dir.join("audit.jsonl"),
            &format!("destination {}", o.name),
            id()?,
        )
        .map_err(e)?,
    );
    // What became of each migration admitted here, for sources in doubt.
    let decisions = ferry_control::decision::DecisionLog::open(&o.state_dir.join("decisions")).map_err(e)?;
    let (metrics, metrics_addr) = start_metrics(o.metrics)?;
    let observed = {
        let m = metrics.clone();
        handshake::Observer(Arc::new(move |result, code, took| {
            m.admissions
                .get_or_create(&crate::metrics::Admission {
                    result: result.into(),
                    code: code.into(),
                })
                .inc();
            m.handshake_seconds.observe(took.as_secs_f64());
        }))
    };
    let dest = Arc::new(
        Destination::new(cfg, id()?, tls_cfg)
            .with_audit(audit.clone())
            .with_decisions(Arc::new(decisions))
            .with_observer(observed),
    );
    let replay_entries = |d: &Destination| i64::try_from(d.replay_entries()).unwrap_or(i64::MAX);
    metrics.replay_entries.set(replay_entries(&dest));
    let l = bind(o.listen)?;
    let addr = l.local_addr().map_err(e)?;
    // Received guests keep running here until the daemon exits.
    type Resident = (String, Incoming, handshake::MemoryReservation);
    let running: Arc<Mutex<Vec<Resident>>> = Arc::new(Mutex::new(Vec::new()));
    if let Some(every) = o.heartbeat_events {
        let running = running.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(every);
            if let Ok(r) = running.lock() {
                for (vm_id, g, _) in r.iter() {
                    if let Incoming::Kvm(vm) = g {
                        event(
                            &serde_json::json!({"event": "heartbeat", "vm": vm_id, "heartbeat": vm.heartbeat(),
                            "writes": vm.guest_writes()}),
                        );
                    }
                }
            }
        });
    }
    let verify_guest = o.verify_guest;
    let me = id()?;
    let io_timeout = o.io_timeout;
    let audit2 = audit.clone();
    let (m, dest2) = (metrics.clone(), dest.clone());
    let on_admitted: handshake::OnAdmitted = Arc::new(move |session, data| {
        let claims = session.claims().clone();
        // A nonce was spent on this admission.
        m.replay_entries.set(replay_entries(&dest2));
        let active = m.active("destination");
        active.inc();
        let received = crate::destination::receive(session, &data, &me, io_timeout, |offer, mem| {
            Ok(match offer.guest {
                GuestKind::Kvm => {
                    let mut vm = KvmVm::incoming(mem, offer.vcpus).map_err(GuestError::from)?;
                    vm.checksum_at_resume = verify_guest;
                    Incoming::Kvm(vm)
                }
                GuestKind::Synthetic => Incoming::Synthetic(SyntheticGuest::incoming(mem)),
            })
        });
        let result = received.map_err(e).map(|r| {
            let guest_kind = r.guest.kind();
            let (transcript_matches, manifest, receipt_error) = match &r.receipt {
                Ok((m, rc)) => (rc.transcript_matches, serde_json::to_value(m).unwrap_or_default(), None),
                Err(why) => (false, serde_json::Value::Null, Some(why.to_string())),
            };
            m.received_bytes.inc_by(r.report.bytes_received);
            let mut line = serde_json::json!({"event": "received", "migration_id": claims.migration_id,
                "vm": claims.vm, "source_host": claims.source_host, "guest": guest_kind, "pages": r.report.pages,
                "frames": r.report.frames, "bytes_received": r.report.bytes_received,
                "transcript_matches": transcript_matches, "manifest": manifest, "receipt_error": receipt_error});
            if let Incoming::Kvm(vm) = &r.guest {
                // The guest's first heartbeat here (its last at the source + 1
                // when it went on where it stopped) and, if asked, its checksum.
                let first = vm
                    .wait_heartbeat(vm.heartbeat(), Duration::from_secs(10))
                    .ok()
                    .and(vm.first_heartbeat());
                line["heartbeat_first_after"] = serde_json::json!(first);
                if verify_guest {
                    let sum = vm.wait_resume_checksum(Duration::from_secs(120)).ok();
                    line["guest_checksum"] = serde_json::json!(sum.map(|c| format!("{c:016x}")));
                }
            }
            // The guest runs here now, with or without a receipt: its memory
            // stays committed (it counts against --max-memory) until the
            // daemon lets it go.
            if let Ok(mut running) = running.lock() {
                running.push((claims.vm.clone(), r.guest, r.reservation));
            }
            line
        });
        let (name, line) = match result {
            Ok(v) => ("received", v),
            Err(why) => (
                "aborted",
                serde_json::json!({"event": "aborted", "migration_id": claims.migration_id, "vm": claims.vm, "reason": why}),
            ),
        };
        let _ = audit2.append(name, line.clone());
        m.ended("destination", name);
        active.dec();
        event(&line);
    });
    handshake::serve_destination(
        l,
        dest,
        ServeLimits {
            data_ports: o.data_ports,
            ..ServeLimits::default()
        },
        on_admitted,
        Arc::new(AtomicBool::new(false)),
    )
    .map_err(e)?;
    event(
        &serde_json::json!({"event": "listening", "server": "receive", "addr": addr.to_string(), "name": o.name,
        "max_memory_bytes": max_memory_bytes, "max_memory_from": max_memory_from,
        "measurement": measurement.to_string(), "metrics": metrics_addr}),
    );
    park_forever()
}
