//! Child processes for the end-to-end tests that run `ferry` commands: a
//! process killed on drop whose JSON event lines arrive on a channel, and a
//! source domain (a lab PKI, a policy, and the authentication and
//! authorization servers as processes).
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A child process killed on drop; its stdout event lines arrive on a
/// channel (so a wait can time out).
pub struct Proc {
    pub child: Child,
    pub events: mpsc::Receiver<serde_json::Value>,
}

impl Proc {
    pub fn start(netns: Option<&str>, args: &[&str]) -> Proc {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferry")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_ferry")),
        };
        let mut child = cmd
            .args(args)
            // Migration records go here, not into the host's state.
            .env("FERRY_STATE_DIR", env!("CARGO_TARGET_TMPDIR"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let out: ChildStdout = child.stdout.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => panic!("not an event line ({e}): {line:?}"),
                }
            }
        });
        Proc { child, events }
    }

    /// The next event named `name` (others are skipped), within `limit`.
    pub fn wait_for(&self, name: &str, limit: Duration) -> serde_json::Value {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) if v["event"] == name => return v,
                Ok(_) => {}
                Err(e) => panic!("no {name:?} event within {limit:?}: {e}"),
            }
        }
    }

    pub fn listening(&self) -> SocketAddr {
        self.wait_for("listening", Duration::from_secs(20))["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `count` consecutive ports on loopback that are free now.
pub fn free_ports(count: u16) -> u16 {
    (20_000u16..60_000)
        .step_by(usize::from(count))
        .find(|&p| (p..p + count).all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()))
        .unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What a `ferry vm` test needs: io_uring and KVM.
pub fn ready(test: &str) -> bool {
    super::skip_unless(
        test,
        &[
            ("io_uring", ferry_engine::probe::io_uring()),
            ("KVM", ferry_vmm::kvm::available()),
        ],
    )
}

/// A temporary PKI and policy, and the source domain's authentication and
/// authorization servers running (in `ns`, listening on `ip`).
pub struct SourceDomain {
    // Declared first: the servers stop before their files go.
    _authn: Proc,
    _authz: Proc,
    pub authn_addr: String,
    pub authz_addr: String,
    pub pki: std::path::PathBuf,
    pub policy: std::path::PathBuf,
    pub dir: ferry::lab::LabDir,
}

impl SourceDomain {
    pub fn start(ns: Option<&str>, ip: &str) -> SourceDomain {
        let dir = ferry::lab::LabDir::new().unwrap();
        let d = dir.path();
        let pki = d.join("pki");
        let ok = Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["pki", "init", "--out", s(&pki), "--hosts", "src,dst"])
            .output()
            .unwrap();
        assert!(ok.status.success());
        let policy = d.join("policy.toml");
        std::fs::write(&policy, ferry::lab::POLICY).unwrap();
        let listen = format!("{ip}:0");
        let authn = Proc::start(
            ns,
            &["serve", "authn", "--pki", s(&pki), "--name", "src", "--listen", &listen],
        );
        let authz = Proc::start(
            ns,
            &[
                "serve",
                "authz",
                "--pki",
                s(&pki),
                "--name",
                "src",
                "--listen",
                &listen,
                "--policy",
                s(&policy),
                "--audit",
                s(&d.join("authz.jsonl")),
            ],
        );
        SourceDomain {
            authn_addr: authn.listening().to_string(),
            authz_addr: authz.listening().to_string(),
            _authn: authn,
            _authz: authz,
            pki,
            policy,
            dir,
        }
    }
}

impl SourceDomain {
    /// Where a source "src" of this domain, asked by client "operator",
    /// migrates to the destination "dst" at `dest`.
    pub fn endpoints(&self, dest: std::net::SocketAddr) -> ferry::source::Endpoints<'_> {
        ferry::source::Endpoints {
            pki: &self.pki,
            host: "src",
            client: "operator",
            authn: self.authn_addr.parse().unwrap(),
            authz: self.authz_addr.parse().unwrap(),
            servers_name: "src",
            dest,
            dest_host: "dst",
            audit: None,
            pinned: &[],
        }
    }

    /// `ferry vm` as this domain's source host "src" with a 64 MiB guest,
    /// asking the authentication server at `authn` (the domain's own, or a
    /// fake), then `extra` options.
    pub fn source_vm_args<'a>(&'a self, authn: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "vm",
            "--memory",
            "64MiB",
            "--pki",
            s(&self.pki),
            "--name",
            "src",
            "--authn",
            authn,
            "--authz",
            &self.authz_addr,
        ];
        args.extend_from_slice(extra);
        args
    }

    /// Asks the destination at `dest` to admit `offer`, with fresh tickets
    /// from this domain's servers, the source pinning `pinned` measurements.
    pub fn request(
        &self,
        dest: SocketAddr,
        offer: ferry_control::handshake::Offer,
        pinned: &[ferry_control::handshake::Measurement],
    ) -> Result<ferry_control::handshake::SourceSession, ferry_control::handshake::HandshakeError> {
        use ferry_control::pki::{self, Identity, Role};
        use ferry_control::{handshake, ticket, tls};
        let at = self.endpoints(dest);
        let roots = || pki::roots(at.pki).unwrap();
        let client = Identity::load(at.pki, Role::Client, at.client).unwrap();
        let ccfg = tls::client_config(&client, roots()).unwrap();
        let authn = ferry::source::authn_ticket(ccfg.clone(), at.authn, at.servers_name).unwrap();
        let t = ferry::source::authz_ticket(ccfg, at.authz, at.servers_name, authn, &offer.vm, at.dest_host).unwrap();
        let claims = ticket::verify(&t, "authz", &pki::verify_key(at.pki, "authz").unwrap()).unwrap();
        let host = Identity::load(at.pki, Role::Host, at.host).unwrap();
        let hcfg = tls::client_config(&host, roots()).unwrap();
        let timeout = Duration::from_secs(5);
        handshake::request(dest, at.dest_host, &host, hcfg, &t, &claims, offer, pinned, timeout)
    }

    /// A destination `ferry receive` named "dst" on loopback, with this
    /// domain's PKI and policy, its state under `dst-state/`, and `extra`
    /// options.
    pub fn receive(&self, extra: &[&str]) -> Proc {
        self.destination(&["receive"], "dst-state", extra)
    }

    /// `command` (a destination) named "dst" on loopback, with this
    /// domain's PKI and policy, its state under `state`, then `extra`.
    fn destination(&self, command: &[&str], state: &str, extra: &[&str]) -> Proc {
        let state = self.dir.path().join(state);
        let mut args = command.to_vec();
        args.extend_from_slice(&[
            "--pki",
            s(&self.pki),
            "--name",
            "dst",
            "--listen",
            "127.0.0.1:0",
            "--policy",
            s(&self.policy),
            "--state-dir",
            s(&state),
        ]);
        args.extend_from_slice(extra);
        Proc::start(None, &args)
    }

    /// The audit log of [`SourceDomain::receive`]'s destination.
    pub fn receive_audit_path(&self) -> std::path::PathBuf {
        self.dir.path().join("dst-state/audit.jsonl")
    }

    /// Its entries, parsed.
    pub fn receive_audit(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.receive_audit_path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A destination `ferry vm --incoming` named "dst" on loopback, with
    /// this domain's PKI and policy, its state under `dst/`, and `extra`
    /// options.
    pub fn incoming_vm(&self, extra: &[&str]) -> Proc {
        self.destination(&["vm", "--incoming"], "dst", extra)
    }
}

/// Migrates a small running synthetic guest to `dest` through the library;
/// the guest must be paused at the source afterwards (committed).
pub fn migrate_one(
    dom: &SourceDomain,
    dest: SocketAddr,
) -> Result<ferry::source::Migrated, ferry::source::SourceError> {
    migrate_one_with(dom, dest, |_| {})
}

/// [`migrate_one`] with the engine's settings changed by `edit`.
pub fn migrate_one_with(
    dom: &SourceDomain,
    dest: SocketAddr,
    edit: impl FnOnce(&mut ferry_engine::migrate::MigrationConfig),
) -> Result<ferry::source::Migrated, ferry::source::SourceError> {
    use ferry_engine::{dirty::UffdWpTracker, migrate::MigrationConfig, progress::Hooks, GuestMemory};
    use ferry_vmm::workload::{SyntheticGuest, WorkloadConfig};
    use std::sync::Arc;
    let mem = Arc::new(GuestMemory::new(8 << 20).unwrap());
    let wl = WorkloadConfig {
        hot_set_bytes: 1 << 20,
        dirty_rate_pages_per_s: 5_000,
        ..WorkloadConfig::default()
    };
    let mut guest = SyntheticGuest::start(mem.clone(), wl, None);
    let mut tracker = UffdWpTracker::new(&mem).unwrap();
    let at = dom.endpoints(dest);
    let mut cfg = MigrationConfig {
        io_timeout: Duration::from_secs(5),
        ..MigrationConfig::default()
    };
    edit(&mut cfg);
    let r = ferry::source::migrate(&at, "demo-vm", &mem, &mut tracker, &mut guest, &cfg, &Hooks::new());
    assert_eq!(
        guest.is_running(),
        r.is_err(),
        "the source guest runs on exactly when the migration failed"
    );
    r
}

/// Runs the `ferry` binary to completion, with the tests' state directory.
pub fn ferry(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env("FERRY_STATE_DIR", env!("CARGO_TARGET_TMPDIR"))
        .output()
        .unwrap()
}

/// A finished command's stdout and stderr, for messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
