//! `ferry doctor`: this host against what ferry needs, each miss with the
//! command or setting that fixes it. The checks use ferry's own probes (an
//! io_uring is created, a userfaultfd write-protects a page, a KVM VM is
//! made), so "pass" means the feature works here, not that a version
//! number looks right.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry_control::pki::{self, Role};
use serde::Serialize;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Pass,
    /// Works, but worth changing.
    Warn,
    /// ferry (or this configuration) cannot work until fixed.
    Fail,
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status: Status::Pass,
            detail: detail.into(),
            fix: None,
        }
    }
    fn miss(status: Status, name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// What to check besides the host itself.
#[derive(Debug, Clone, Default)]
pub struct DoctorOptions {
    /// The PKI folder: the CA, and certificates with their keys.
    pub pki: Option<PathBuf>,
    /// Only this host's credential (default: every host and client in the PKI).
    pub name: Option<String>,
    /// Addresses daemons will listen on: each must be free.
    pub listen: Vec<SocketAddr>,
    /// A policy file that must parse.
    pub policy: Option<PathBuf>,
    /// A state directory that must be writable.
    pub state_dir: Option<PathBuf>,
}

/// Days before expiry from which a certificate is a warning.
pub const EXPIRY_WARN_DAYS: i64 = 14;
/// Open files below which the limit is a warning: every migration takes a
/// control and one data connection per stream, every pending handshake one
/// (256 at most), plus the daemon's own files.
pub const MIN_OPEN_FILES: u64 = 4096;

/// Runs every check.
pub fn run(o: &DoctorOptions) -> Vec<Check> {
    let mut out = vec![
        kernel(),
        probe(
            "io_uring",
            ferry_engine::probe::io_uring(),
            "sysctl -w kernel.io_uring_disabled=0 (and Linux >= 5.11)",
        ),
        probe(
            "userfaultfd write-protect (dirty tracking)",
            ferry_engine::probe::uffd_wp(),
            "Linux >= 6.7 (UFFD_FEATURE_WP_ASYNC, PAGEMAP_SCAN); not root: sysctl -w vm.unprivileged_userfaultfd=1",
        ),
        probe(
            "KVM",
            ferry_vmm::kvm::available(),
            "enable virtualization in the firmware, modprobe kvm_intel or kvm_amd, and give the user rw on /dev/kvm (group kvm)",
        ),
        open_files(),
        locked_memory(),
        hugepages(),
        sha256(),
        clock(),
    ];
    out.extend(o.listen.iter().map(|a| port(*a)));
    if let Some(dir) = &o.pki {
        out.extend(credentials(dir, o.name.as_deref()));
    }
    if let Some(p) = &o.policy {
        out.push(policy(p));
    }
    if let Some(d) = &o.state_dir {
        out.push(state_dir(d));
    }
    out
}

fn probe(name: &str, r: Result<(), String>, fix: &str) -> Check {
    match r {
        Ok(()) => Check::pass(name, "works here"),
        Err(why) => Check::miss(Status::Fail, name, why, fix),
    }
}

fn kernel() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Check::pass("kernel", format!("Linux {}", release.trim()))
}

/// A soft limit from /proc/self/limits (`None`: unlimited or unreadable).
fn limit(name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    line[name.len()..].split_whitespace().next()?.parse().ok()
}

fn open_files() -> Check {
    match limit("Max open files") {
        Some(n) if n < MIN_OPEN_FILES => Check::miss(
            Status::Warn,
            "open files",
            format!(
                "soft limit {n}: a busy destination (256 pending handshakes, migrations of many streams) can run out"
            ),
            format!("ulimit -n 65536 before starting, or LimitNOFILE=65536 in the unit (at least {MIN_OPEN_FILES})"),
        ),
        Some(n) => Check::pass("open files", format!("soft limit {n}")),
        None => Check::pass("open files", "unlimited"),
    }
}

fn locked_memory() -> Check {
    let detail = match limit("Max locked memory") {
        Some(n) => format!("soft limit {} KiB", n / 1024),
        None => "unlimited".into(),
    };
    // ferry locks no memory, and io_uring has charged its rings to the
    // memory cgroup instead of this limit since Linux 5.12 (the io_uring
    // check above creates one).
    Check::pass("locked memory", format!("{detail} (ferry locks no memory)"))
}

fn hugepages() -> Check {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let mode = thp
        .split_whitespace()
        .find(|w| w.starts_with('['))
        .map_or("unknown", |w| w.trim_matches(|c| c == '[' || c == ']'));
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Total:"))
                .and_then(|l| l.split_whitespace().nth(1).map(String::from))
        })
        .unwrap_or_else(|| "?".into());
    Check::pass(
        "huge pages",
        format!(
            "transparent huge pages: {mode}; {total} preallocated huge pages (ferry tracks 4 KiB pages either way)"
        ),
    )
}

fn sha256() -> Check {
    let cpu = ferry_engine::probe::cpu_model();
    let detail = match ferry_engine::sha::select(ferry_engine::sha::Sha256Choice::Auto) {
        ferry_engine::sha::Sha256Backend::Tape => {
            format!("page digests by tape-sha256's multi-buffer SHA-256 (agrees with ring here) on {cpu}")
        }
        ferry_engine::sha::Sha256Backend::Ring => format!(
            "page digests by ring, page by page, on {cpu} (no multi-buffer fast path, or it disagreed with ring)"
        ),
    };
    Check::pass("SHA-256", detail)
}

fn clock() -> Check {
    match ferry_engine::probe::clock_synchronized() {
        Ok(true) => Check::pass("clock", "synchronized (tickets live 60-300 s, so the hosts' clocks must agree)"),
        Ok(false) => Check::miss(
            Status::Warn,
            "clock",
            "the kernel says the clock is not synchronized: tickets live 60-300 s, so a host whose clock drifts by more refuses or issues tickets the others refuse",
            "run an NTP client (chrony or systemd-timesyncd) on every host",
        ),
        Err(why) => Check::miss(Status::Warn, "clock", why, "check the clock by hand (date -u on every host)"),
    }
}

fn port(addr: SocketAddr) -> Check {
    let name = format!("listen {addr}");
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Check::pass(name, "free"),
        Err(e) => Check::miss(
            Status::Fail,
            name,
            format!("cannot listen: {e}"),
            format!(
                "stop what holds it (ss -ltnp 'sport = :{}') or give the daemon another --listen",
                addr.port()
            ),
        ),
    }
}

/// Every credential to check: `name`'s host one, or all under `dir`.
fn credentials(dir: &Path, name: Option<&str>) -> Vec<Check> {
    let mut out = Vec::new();
    match pki::cert_from_pem_file(&dir.join("ca/cert.pem")) {
        Ok(ca) => out.push(certificate("CA certificate", &dir.join("ca/cert.pem"), &ca, None)),
        Err(e) => {
            out.push(Check::miss(
                Status::Fail,
                "CA certificate",
                e.to_string(),
                format!(
                    "copy the CA's cert.pem to {}/ca/ (or make a PKI: ferry pki init --out {})",
                    dir.display(),
                    dir.display()
                ),
            ));
            return out;
        }
    }
    let mut who: Vec<(Role, String)> = Vec::new();
    match name {
        Some(n) => who.push((Role::Host, n.into())),
        None => {
            for (role, folder) in [(Role::Host, "hosts"), (Role::Client, "clients")] {
                let mut names: Vec<String> = std::fs::read_dir(dir.join(folder))
                    .map(|rd| rd.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect())
                    .unwrap_or_default();
                names.sort();
                who.extend(names.into_iter().map(|n| (role, n)));
            }
        }
    }
    for (role, n) in who {
        let folder = dir.join(role.folder()).join(&n);
        let what = format!("{} {n}", if role == Role::Host { "host" } else { "client" });
        let cert_path = folder.join("cert.pem");
        match pki::cert_from_pem_file(&cert_path) {
            Ok(der) => {
                let renew = match role {
                    Role::Host => format!("ferry pki renew --pki {} --host {n}", dir.display()),
                    Role::Client => format!("ferry pki renew --pki {} --client {n}", dir.display()),
                };
                out.push(certificate(
                    &format!("{what} certificate"),
                    &cert_path,
                    &der,
                    Some(&renew),
                ));
            }
            Err(e) => out.push(Check::miss(
                Status::Fail,
                format!("{what} certificate"),
                e.to_string(),
                format!(
                    "issue it: ferry pki renew --pki {} --host {n} (on the CA's host)",
                    dir.display()
                ),
            )),
        }
        out.push(private_key(&format!("{what} key"), &folder.join("key.pem")));
    }
    out
}

fn certificate(name: &str, path: &Path, der: &[u8], renew: Option<&str>) -> Check {
    let now = i64::try_from(ferry_control::now_unix_s()).unwrap_or(i64::MAX);
    let Some((not_before, not_after)) = pki::cert_validity(der) else {
        return Check::miss(
            Status::Fail,
            name,
            format!("{} does not parse as an X.509 certificate", path.display()),
            "replace it with the PEM the CA issued",
        );
    };
    let days_left = (not_after - now).div_euclid(86_400);
    let renew = renew.map_or_else(
        || "make a new CA and reissue every certificate".to_string(),
        String::from,
    );
    if now > not_after {
        Check::miss(
            Status::Fail,
            name,
            format!(
                "{} EXPIRED {} day(s) ago: every peer refuses it",
                path.display(),
                -days_left
            ),
            renew,
        )
    } else if now < not_before {
        Check::miss(
            Status::Fail,
            name,
            format!("{} is not valid before {not_before} (Unix s): this host's clock is behind, or the certificate is from the future", path.display()),
            "fix the clock (run an NTP client), or reissue the certificate",
        )
    } else if days_left < EXPIRY_WARN_DAYS {
        Check::miss(
            Status::Warn,
            name,
            format!("{} expires in {days_left} day(s)", path.display()),
            renew,
        )
    } else {
        Check::pass(name, format!("valid, {days_left} day(s) left"))
    }
}

fn private_key(name: &str, path: &Path) -> Check {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => Check::miss(
            Status::Fail,
            name,
            format!(
                "{} is readable by others (mode {:o}): anyone on this host could impersonate it",
                path.display(),
                m.permissions().mode() & 0o777
            ),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(_) => match std::fs::read(path) {
            Ok(_) => Check::pass(name, "readable by its owner only"),
            Err(e) => Check::miss(
                Status::Fail,
                name,
                format!("{}: {e}", path.display()),
                "run ferry as the key's owner",
            ),
        },
        Err(e) => Check::miss(
            Status::Fail,
            name,
            format!("{}: {e}", path.display()),
            "put the credential's key.pem beside its cert.pem (ferry pki init or renew writes both)",
        ),
    }
}

fn policy(path: &Path) -> Check {
    match ferry_control::policy::Policy::load(path) {
        Ok(p) => {
            let w = p.warnings();
            if w.is_empty() {
                Check::pass(
                    "policy",
                    format!(
                        "{}: {} allow and {} incoming rule(s)",
                        path.display(),
                        p.allow.len(),
                        p.incoming.len()
                    ),
                )
            } else {
                Check::miss(
                    Status::Warn,
                    "policy",
                    w.join("; "),
                    format!("ferry policy check {} (see policy.example.toml)", path.display()),
                )
            }
        }
        Err(e) => Check::miss(
            Status::Fail,
            "policy",
            e.to_string(),
            "fix the file (policy.example.toml documents every rule and field)",
        ),
    }
}

fn state_dir(dir: &Path) -> Check {
    let probe = dir.join(format!(".ferry-doctor-{}", std::process::id()));
    match std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&probe, b"ok")) {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            Check::pass("state directory", format!("{} is writable", dir.display()))
        }
        Err(e) => Check::miss(
            Status::Fail,
            "state directory",
            format!("{}: {e}", dir.display()),
            "create it, owned by the user the daemon runs as (mode 0700)",
        ),
    }
}
