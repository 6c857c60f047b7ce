//! A VMM's local API: JSON lines over a Unix socket.
//!
//! A client connects, writes one request line and reads reply lines until
//! the VMM closes the connection:
//!
//! ```text
//! {"op":"status"}                                  → {"event":"status","state":"running",...}
//! {"op":"cancel"}                                  → {"event":"cancel","cancelled":true}
//! {"op":"estimate","seconds":5,"bandwidth":1250000000}
//!                                                  → {"event":"estimate","converges":true,"rounds":3,...}
//! {"op":"set-bandwidth","max_bandwidth":200000000} → {"event":"bandwidth","max_bandwidth_bytes_per_s":200000000,...}
//! {"op":"migrate","to":"10.0.0.2:7700","dest_host":"dst"}
//!   (optional: "downtime_ms_max", "converge", "max_bandwidth", "max_bandwidth_paused", "timeout_s")
//!                                                  → {"event":"accepted",...}
//!                                                    {"event":"sending",...} {"event":"round",...} ...
//!                                                    {"event":"migrated",...,"record":{...}}
//!                                                    (or "migration-failed" / "migration-in-doubt")
//! ```
//!
//! Any error is one line `{"event":"error","error":"..."}`. Every line is a
//! [`Reply`], the one type the server writes and its clients read (no field
//! read with a default). `ferry vm`
//! serves it (`--api PATH`); `ferry migrate`, `ferry status` and `ferry
//! cancel` are its clients. The socket is created mode 0600: whoever can
//! open it can move the VM (within what the authorization server allows the
//! host's operator credential).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_engine::migrate::convergence::Converge;
use ferry_engine::migrate::{MigrationConfig, RoundStats};
use ferry_engine::progress::Progress;
use serde::{Deserialize, Serialize};

/// Longest request line.
pub const MAX_REQUEST_BYTES: u64 = 64 << 10;
/// Most API connections served at once.
pub const MAX_CLIENTS: usize = 16;
/// How long a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Migrate the VM to a destination daemon; the reply streams progress.
    Migrate {
        /// The destination daemon's control address.
        to: SocketAddr,
        /// The destination's host name (its certificate must be for it).
        dest_host: String,
        /// Downtime target in milliseconds (default: the VMM's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms_max: Option<u64>,
        /// What to do when the rest does not fit the target (default: the VMM's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        converge: Option<Converge>,
        /// Bandwidth cap of the live rounds, bytes/s (default: the VMM's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bandwidth: Option<u64>,
        /// Bandwidth cap of the paused round, bytes/s.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bandwidth_paused: Option<u64>,
        /// Total time limit in seconds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_s: Option<u64>,
    },
    /// Watch the guest's writes for `seconds` (nothing is sent) and predict
    /// pre-copy at `bandwidth` under the VMM's settings (or these).
    Estimate {
        /// How long to watch (0.2..=600).
        #[serde(default = "default_estimate_s")]
        seconds: f64,
        /// The link's bandwidth, bytes/s (default: the VMM's cap).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bandwidth: Option<u64>,
        /// Downtime target (default: the VMM's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms_max: Option<u64>,
        /// Policy (default: the VMM's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        converge: Option<Converge>,
    },
    /// Change the running migration's bandwidth caps.
    SetBandwidth {
        /// The live rounds' cap in bytes/s (null: unlimited).
        max_bandwidth: Option<u64>,
        /// The paused round's cap (absent: unchanged).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_bandwidth_paused: Option<u64>,
    },
    /// The VM's state and the migration's latest progress.
    Status,
    /// Stop the running migration if it has not reached its commit point.
    Cancel,
    /// A migration in doubt (Commit sent, no confirmation): ask its
    /// destination again what became of it, and act on the signed answer.
    Resolve,
}

/// One reply line: a migration's progress, or one of the API's own. The
/// server writes only these and its clients read only these, so a field
/// one side renames is a parse error, not a silent 0 or "".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    /// A progress event of the migration under way (`sending`, `round`,
    /// `paused`, `committed`, `resumed`).
    Progress(Progress),
    /// Everything else.
    Api(ApiReply),
}

/// The API's own replies (the `event` field names the kind).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ApiReply {
    /// The VM and its latest migration progress.
    Status(Box<Status>),
    /// A cancel was passed to the running migration.
    Cancel {
        /// Always true (a refused cancel is an `error`).
        cancelled: bool,
        /// What happens next.
        note: String,
    },
    /// What `estimate` predicts.
    Estimate(Box<ferry_engine::migrate::estimate::Prediction>),
    /// The running migration's caps, after a `set-bandwidth`.
    Bandwidth {
        /// The live rounds' cap, bytes/s (null: unlimited).
        max_bandwidth_bytes_per_s: Option<u64>,
        /// The paused round's cap.
        max_bandwidth_paused_bytes_per_s: Option<u64>,
    },
    /// The migration request was taken; tickets and admission come next.
    Accepted {
        /// The VM.
        vm: String,
        /// The destination daemon's address.
        to: String,
        /// The destination's host name.
        dest_host: String,
        /// The dirty tracker.
        tracker: String,
    },
    /// The guest runs at the destination.
    Migrated(Box<Migrated>),
    /// The migration failed before its commit point: the guest runs here.
    MigrationFailed(Box<Ended>),
    /// The migration was cancelled before its commit point: the guest runs here.
    MigrationCancelled(Box<Ended>),
    /// Past the commit point with no word from the destination.
    MigrationInDoubt(Box<Ended>),
    /// A migration in doubt ended on the destination's signed answer: the
    /// guest runs there (`committed`) or was resumed here (`discarded`).
    MigrationResolved(Box<Resolved>),
    /// The request was refused, or failed.
    Error {
        /// Why.
        error: String,
    },
}

/// `status`'s reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// The VM.
    pub vm: String,
    /// running, migrating, committed, migrated or in-doubt.
    pub state: String,
    /// Guest memory.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// The guest's heartbeat counter.
    pub heartbeat: u64,
    /// Pages the guest has written.
    pub guest_writes: u64,
    /// Whether the vCPUs are paused.
    pub paused: bool,
    /// The migration's latest progress event, if one runs or ran.
    pub progress: Option<Progress>,
    /// The last migration's error, if it failed.
    pub last_error: Option<String>,
}

/// `migrated`'s reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migrated {
    /// The VM.
    pub vm: String,
    /// Rounds, the final one included.
    pub rounds: usize,
    /// Pages sent over all rounds.
    pub pages_sent: u64,
    /// Bytes written to the data streams.
    pub bytes_on_wire: u64,
    /// From the pause to the destination's resume.
    pub downtime_ms: f64,
    /// From the start to the destination's resume.
    pub total_ms: f64,
    /// Size of the vCPU state sent.
    pub vcpu_state_bytes: usize,
    /// The guest's heartbeat when paused.
    pub heartbeat_before: Option<u64>,
    /// The guest's checksum of its memory when paused (with `--verify`).
    pub guest_checksum: Option<String>,
    /// The destination's receipt confirms the transcript.
    pub transcript_matches: bool,
    /// The guest moved but the signed manifest and receipt exchange failed:
    /// why (no receipt, so no non-repudiation for this migration).
    #[serde(default)]
    pub receipt_error: Option<String>,
    /// The control-plane steps and their times.
    pub steps: Vec<crate::lab::Step>,
    /// Every round.
    pub round_detail: Vec<RoundStats>,
    /// The downtime target, the policy, and what came of them.
    #[serde(default)]
    pub convergence: Option<crate::record::Convergence>,
    /// vCPU entries at the source after the commit (should be 0).
    #[serde(default)]
    pub runs_after_commit: Option<u64>,
    /// Where the VMM wrote the record, if asked to.
    #[serde(default)]
    pub record_file: Option<String>,
    /// The migration's record.
    #[serde(default)]
    pub record: Option<crate::record::Record>,
}

fn default_estimate_s() -> f64 {
    5.0
}

/// One migration's settings over the host's (`None`: the host's).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tuning {
    /// Downtime target in milliseconds.
    pub downtime_ms_max: Option<u64>,
    /// Convergence policy.
    pub converge: Option<Converge>,
    /// Live rounds' bandwidth cap, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Paused round's bandwidth cap, bytes/s.
    pub max_bandwidth_paused: Option<u64>,
    /// Total time limit, seconds.
    pub timeout_s: Option<u64>,
}

impl Tuning {
    /// `cfg` with these settings over it.
    pub fn apply(&self, cfg: &mut MigrationConfig) {
        if let Some(d) = self.downtime_ms_max {
            cfg.downtime_ms_max = d;
        }
        if let Some(c) = self.converge {
            cfg.converge = c;
        }
        if self.max_bandwidth.is_some() {
            cfg.max_bandwidth = self.max_bandwidth;
        }
        if self.max_bandwidth_paused.is_some() {
            cfg.max_bandwidth_paused = self.max_bandwidth_paused;
        }
        if let Some(t) = self.timeout_s {
            cfg.timeout = Some(Duration::from_secs(t));
        }
    }

    /// The migrate request carrying these settings.
    pub fn request(&self, to: SocketAddr, dest_host: String) -> Request {
        Request::Migrate {
            to,
            dest_host,
            downtime_ms_max: self.downtime_ms_max,
            converge: self.converge,
            max_bandwidth: self.max_bandwidth,
            max_bandwidth_paused: self.max_bandwidth_paused,
            timeout_s: self.timeout_s,
        }
    }
}

/// The last reply of a migration that did not complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ended {
    /// Why.
    pub reason: String,
    /// Where the guest is now.
    pub guest: String,
    /// The guest's heartbeat.
    pub heartbeat: u64,
    /// Where the VMM wrote the record, if asked to.
    #[serde(default)]
    pub record_file: Option<String>,
    /// The migration's record.
    #[serde(default)]
    pub record: Option<crate::record::Record>,
}

/// `migration-resolved`'s reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolved {
    /// The migration.
    pub migration_id: u64,
    /// The destination's answer.
    pub answer: ferry_control::handshake::Answer,
    /// Its signature (base64url ECDSA by the destination host key, over
    /// `ferry_control::handshake::resolution_message`).
    pub destination_sig: String,
    /// What happened.
    pub reason: String,
    /// Where the guest is now.
    pub guest: String,
    /// The guest's heartbeat.
    pub heartbeat: u64,
    /// Where the VMM wrote the record, if asked to.
    #[serde(default)]
    pub record_file: Option<String>,
    /// The migration's record.
    #[serde(default)]
    pub record: Option<crate::record::Record>,
}

impl Reply {
    /// An `error` reply.
    pub fn error(e: impl Into<String>) -> Reply {
        Reply::Api(ApiReply::Error { error: e.into() })
    }

    /// Whether this is a migration's last line.
    pub fn ends_migration(&self) -> bool {
        matches!(
            self,
            Reply::Api(
                ApiReply::Migrated(_)
                    | ApiReply::MigrationFailed(_)
                    | ApiReply::MigrationCancelled(_)
                    | ApiReply::MigrationInDoubt(_)
                    | ApiReply::MigrationResolved(_)
                    | ApiReply::Error { .. }
            )
        )
    }
}

/// What serves the requests: `handle` gets each parsed request and a sink
/// for its reply lines (the connection closes when `handle` returns).
pub type Handler = dyn Fn(Request, &mut dyn FnMut(&Reply) -> bool) + Send + Sync;

/// A bound API socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct ApiSocket {
    path: PathBuf,
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the socket inside a fresh 0700 directory, makes it 0600, then
/// links it to `path` (failing if anything appeared there meanwhile): the
/// socket is never reachable with the umask's permissions.
fn bind_private(path: &Path, dir: &Path) -> Result<UnixListener, String> {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let private = dir.join(format!(".ferry-api-{}-{nonce}", std::process::id()));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&private)
        .map_err(|e| format!("cannot create {}: {e}", private.display()))?;
    let tmp = private.join("sock");
    let bound = UnixListener::bind(&tmp)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))
        .and_then(|l| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
            std::fs::hard_link(&tmp, path).map_err(|e| format!("cannot put the socket at {}: {e}", path.display()))?;
            Ok(l)
        });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// Binds `path` (mode 0600; a stale socket file left by a dead VMM is
/// replaced, a live one is an error, anything else at the path is left
/// alone and refused) and serves requests on a thread.
pub fn serve(path: &Path, handler: Arc<Handler>) -> Result<ApiSocket, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // Only a stale socket is replaced: a regular file, a link or a
        // directory at the path is somebody's and stays.
        if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
            return Err(format!(
                "{} exists and is not a socket: ferry replaces only a stale socket; remove it or give another --api path",
                path.display()
            ));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "{} is already served by another process: give this VM its own --api path",
                path.display()
            ));
        }
        std::fs::remove_file(path).map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let listener = bind_private(path, dir)?;
    let clients = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ferry-api".into())
        .spawn(move || {
            let mut backoff = ferry_control::accept::AcceptBackoff::new();
            for conn in listener.incoming() {
                let mut conn = match conn {
                    Ok(c) => {
                        backoff.succeeded("VMM API");
                        c
                    }
                    Err(e) => {
                        std::thread::sleep(backoff.failed("VMM API", &e));
                        continue;
                    }
                };
                if clients.fetch_add(1, Ordering::SeqCst) >= MAX_CLIENTS {
                    clients.fetch_sub(1, Ordering::SeqCst);
                    let busy = serde_json::to_string(&Reply::error("too many API clients at once; try again"));
                    let _ = writeln!(conn, "{}", busy.unwrap_or_default());
                    continue;
                }
                let (handler, clients) = (handler.clone(), clients.clone());
                let spawned = std::thread::Builder::new()
                    .name("ferry-api-conn".into())
                    .spawn(move || {
                        serve_one(conn, handler.as_ref());
                        clients.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    tracing::warn!("cannot start a thread for an API client");
                }
            }
        })
        .map_err(|e| format!("cannot start the API thread: {e}"))?;
    Ok(ApiSocket {
        path: path.to_path_buf(),
    })
}

fn serve_one(conn: UnixStream, handler: &Handler) {
    let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(10)));
    let Ok(mut out) = conn.try_clone() else { return };
    let mut line = String::new();
    let read = BufReader::new(conn.take(MAX_REQUEST_BYTES)).read_line(&mut line);
    let mut send = |v: &Reply| {
        let Ok(line) = serde_json::to_string(v) else {
            return false;
        };
        writeln!(out, "{line}").and_then(|()| out.flush()).is_ok()
    };
    match read {
        Ok(0) => {}
        Ok(_) if !line.ends_with('\n') => {
            send(&Reply::error("request line too long or not ended by a newline"));
        }
        Ok(_) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => handler(req, &mut send),
            Err(e) => {
                send(&Reply::error(format!(
                    "bad request ({e}); send one JSON line: {{\"op\":\"status\"}}, {{\"op\":\"cancel\"}} or {{\"op\":\"migrate\",\"to\":\"ADDR\",\"dest_host\":\"NAME\"}}"
                )));
            }
        },
        Err(e) => {
            send(&Reply::error(format!(
                "no request line within {REQUEST_TIMEOUT:?}: {e}"
            )));
        }
    }
}

/// Sends `req` to the VMM at `path` and calls `each` with every reply line
/// until the VMM closes the connection or `each` returns false. `idle` bounds
/// the wait for each line.
pub fn call(path: &Path, req: &Request, idle: Duration, mut each: impl FnMut(Reply) -> bool) -> Result<(), String> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the VMM's API at {}: {e} (is `ferry vm --api {}` running, and may you open it?)",
            path.display(),
            path.display()
        )
    })?;
    conn.set_read_timeout(Some(idle)).map_err(|e| e.to_string())?;
    let line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    writeln!(conn, "{line}").map_err(|e| format!("sending the request: {e}"))?;
    for line in BufReader::new(conn).lines() {
        let line = line.map_err(|e| format!("the VMM went silent for {idle:?} or closed: {e}"))?;
        let v: Reply = serde_json::from_str(&line).map_err(|e| {
            format!("the VMM sent a line this ferry does not understand ({e}): {line}; are `ferry` and the VMM the same version?")
        })?;
        if !each(v) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let m = Tuning::default().request("127.0.0.1:7700".parse().unwrap(), "dst".into());
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(s, r#"{"op":"migrate","to":"127.0.0.1:7700","dest_host":"dst"}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), m);
        let tuned = Tuning {
            converge: Some(Converge::Throttle),
            max_bandwidth: Some(200_000_000),
            timeout_s: Some(30),
            ..Tuning::default()
        };
        let m = tuned.request("127.0.0.1:7700".parse().unwrap(), "dst".into());
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(
            s,
            r#"{"op":"migrate","to":"127.0.0.1:7700","dest_host":"dst","converge":"throttle","max_bandwidth":200000000,"timeout_s":30}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), m);
        let mut cfg = MigrationConfig::default();
        tuned.apply(&mut cfg);
        assert_eq!(
            (cfg.converge, cfg.max_bandwidth, cfg.timeout),
            (Converge::Throttle, Some(200_000_000), Some(Duration::from_secs(30)))
        );
        let b = Request::SetBandwidth {
            max_bandwidth: None,
            max_bandwidth_paused: None,
        };
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(s, r#"{"op":"set-bandwidth","max_bandwidth":null}"#);
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), b);
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"migrate","to":"127.0.0.1:1","dest_host":"d","force":true}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
    }

    #[test]
    fn replies_round_trip_and_a_renamed_field_is_an_error_not_a_default() {
        let p = Reply::Progress(Progress::Paused {
            round: 4,
            pages: 9,
            expected_downtime_ms: 1.5,
            downtime_target_ms: 50,
            exceeds_target: false,
        });
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(
            s,
            r#"{"event":"paused","round":4,"pages":9,"expected_downtime_ms":1.5,"downtime_target_ms":50,"exceeds_target":false}"#
        );
        assert!(matches!(
            serde_json::from_str::<Reply>(&s).unwrap(),
            Reply::Progress(Progress::Paused { round: 4, pages: 9, .. })
        ));
        let e = Reply::Api(ApiReply::MigrationFailed(Box::new(Ended {
            reason: "cut".into(),
            guest: "running here".into(),
            heartbeat: 7,
            record_file: None,
            record: None,
        })));
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.starts_with(r#"{"event":"migration-failed","reason":"cut""#), "{s}");
        assert!(matches!(
            serde_json::from_str::<Reply>(&s).unwrap(),
            Reply::Api(ApiReply::MigrationFailed(_))
        ));
        assert!(e.ends_migration() && !p.ends_migration());
        // A status whose field was renamed does not read as a VM with 0 bytes.
        let bad = r#"{"event":"status","vm":"v","state":"running","memory":1,"vcpus":1,"heartbeat":0,"guest_writes":0,"paused":false,"progress":null,"last_error":null}"#;
        assert!(serde_json::from_str::<Reply>(bad).is_err());
    }

    #[test]
    fn a_server_answers_refuses_garbage_and_replaces_a_stale_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // A stale socket file, as a killed VMM leaves it.
        drop(UnixListener::bind(&path).unwrap());
        let handler: Arc<Handler> = Arc::new(|req, send| {
            send(&Reply::Api(ApiReply::Cancel {
                cancelled: true,
                note: format!("{req:?}"),
            }));
        });
        let sock = serve(&path, handler.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(serve(&path, handler).unwrap_err().contains("already served"));
        let mut got = Vec::new();
        call(&path, &Request::Status, Duration::from_secs(5), |v| {
            got.push(v);
            true
        })
        .unwrap();
        assert!(
            matches!(&got[..], [Reply::Api(ApiReply::Cancel { note, .. })] if note == "Status"),
            "{got:?}"
        );
        let mut raw = UnixStream::connect(&path).unwrap();
        writeln!(raw, "not json").unwrap();
        let mut reply = String::new();
        BufReader::new(raw).read_line(&mut reply).unwrap();
        assert!(reply.contains("bad request"), "{reply}");
        assert!(matches!(
            serde_json::from_str::<Reply>(&reply),
            Ok(Reply::Api(ApiReply::Error { .. }))
        ));
        drop(sock);
        assert!(!path.exists());
    }
}
