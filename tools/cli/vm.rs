//! `ferry vm`: a KVM guest in ferry's VMM, migrated live (source) or
//! received (`--incoming`).

use super::*;

pub(crate) const VM_EXAMPLES: &str = "Examples:
  # a 1 GiB guest writing 20000 pages/s into a 64 MiB hot set, until killed
  ferry vm --memory 1GiB --hot-set 64MiB --dirty-rate 20000

  # destination host: receive a guest into a fresh VM and run it
  ferry vm --incoming --pki /etc/ferry/pki --name dst --listen 0.0.0.0:7700 \\
      --policy /etc/ferry/incoming.toml --state-dir /var/lib/ferry

  # source host: run a guest, migrate it to dst after 5 s
  ferry vm --memory 1GiB --pki /etc/ferry/pki --name src --authn 10.0.0.1:7701 --authz 10.0.0.1:7702 \\
      --migrate-to 10.0.0.2:7700 --dest-host dst --vm-id web-1 --migrate-after-s 5

  # source host: run a guest and wait for `ferry migrate --api /run/ferry/web-1.sock ...`
  ferry vm --memory 1GiB --pki /etc/ferry/pki --name src --authn 10.0.0.1:7701 --authz 10.0.0.1:7702 \\
      --vm-id web-1 --api /run/ferry/web-1.sock";

#[derive(Args)]
pub(crate) struct VmArgs {
    /// Guest memory (a multiple of 2 MiB, at least 4 MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    memory: u64,
    /// vCPUs (1..=16). vCPU 0 runs the workload, the others beat a heartbeat.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    vcpus: u32,
    /// Hot set the guest keeps writing.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    hot_set: u64,
    /// Guest writes per second (one page each; 0 = idle guest).
    #[arg(long, default_value_t = 20_000)]
    dirty_rate: u64,
    /// Print a heartbeat event this often (ms).
    #[arg(long, default_value_t = 1000)]
    heartbeat_every_ms: u64,
    /// Stop after this many seconds (default: until killed, or migrated).
    #[arg(long)]
    run_for_s: Option<f64>,
    /// Have the guest checksum its own memory at the switchover (source:
    /// when paused; destination: first thing after it resumes).
    #[arg(long)]
    verify: bool,
    /// Destination mode: receive a guest into a fresh VM (needs --listen,
    /// --policy, --state-dir, --pki, --name).
    #[arg(long)]
    incoming: bool,
    /// Destination: control address to listen on.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Destination: incoming policy (TOML, `[[incoming]]` rules).
    #[arg(long)]
    policy: Option<std::path::PathBuf>,
    /// Destination: folder for the replay cache and the audit log.
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// Destination: most guest memory to accept (default: the host's
    /// available memory at start, less an eighth for the host).
    #[arg(long, value_parser = parse_size)]
    max_memory: Option<u64>,
    /// Destination: ports for the data streams, FIRST-LAST (default: ephemeral).
    #[arg(long, value_name = "FIRST-LAST", value_parser = parse_port_range)]
    data_ports: Option<(u16, u16)>,
    /// PKI folder (see `ferry pki init`).
    #[arg(long)]
    pki: Option<std::path::PathBuf>,
    /// This host's name (its certificate `hosts/NAME`).
    #[arg(long)]
    name: Option<String>,
    /// Source: migrate to the destination daemon at this address.
    #[arg(long)]
    migrate_to: Option<std::net::SocketAddr>,
    /// Source: the destination's host name (its certificate must be for it).
    #[arg(long)]
    dest_host: Option<String>,
    /// Source: the authentication server.
    #[arg(long)]
    authn: Option<std::net::SocketAddr>,
    /// Source: the authorization server.
    #[arg(long)]
    authz: Option<std::net::SocketAddr>,
    /// Source: the name on the authn/authz servers' certificates (default: --name).
    #[arg(long)]
    servers_name: Option<String>,
    /// Source: the migration client credential (`clients/NAME`).
    #[arg(long, default_value = "operator")]
    client: String,
    /// Source: the VM's id, as tickets and policies name it.
    #[arg(long, default_value = "demo-vm")]
    vm_id: String,
    /// Source: seconds the guest runs before the migration starts.
    #[arg(long, default_value_t = 1.0)]
    migrate_after_s: f64,
    /// Source: audit log file for this host's side of the migration.
    #[arg(long)]
    audit: Option<std::path::PathBuf>,
    /// Source: send the guest only to a destination reporting this
    /// measurement, BINARY_SHA256:CONFIG_SHA256 (repeatable: any of them; a
    /// destination prints its own in its listening event). The destination
    /// reports it itself, signed with its host key: a pin catches a
    /// destination running another build or policy, not one whose key was
    /// stolen.
    #[arg(long, value_name = "BINARY_SHA256:CONFIG_SHA256")]
    pin_measurement: Vec<ferry_control::handshake::Measurement>,
    /// Source: serve the local API (JSON lines: migrate, status, cancel,
    /// resolve, ...) on this Unix socket, for `ferry migrate`, `ferry
    /// status`, `ferry cancel` and `ferry resolve`.
    #[arg(long, value_name = "PATH")]
    api: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics on GET /metrics here: a port (bound on
    /// 127.0.0.1) or an address (see `ferry::metrics` for the series).
    #[arg(long, value_name = "PORT|ADDR", value_parser = ferry::metrics::parse_addr)]
    metrics: Option<std::net::SocketAddr>,
    /// Source: with --migrate-to, write the migration's record here
    /// (default: STATE_DIR/runs/VM-TIME.json).
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Data streams.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    streams: u16,
    /// Page integrity: aead+sha256 or aead.
    #[arg(long, default_value = "aead+sha256")]
    integrity: Integrity,
    /// Downtime target in milliseconds.
    #[arg(long, default_value_t = 50)]
    downtime_ms_max: u64,
    #[command(flatten)]
    converge: ConvergeArgs,
    /// Seconds without network progress before a migration aborts.
    #[arg(long, default_value_t = 10)]
    io_timeout_s: u64,
    #[command(flatten)]
    sha: Sha256Arg,
}

impl VmArgs {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        let a = self;
        a.sha.select();
        let need = |what: &str, v: bool| if v { Ok(()) } else { Err(format!("ferry vm: {what}")) };
        let io_timeout = Duration::from_secs(a.io_timeout_s.max(1));
        if a.incoming {
            let (Some(pki), Some(name), Some(listen), Some(policy), Some(state_dir)) =
                (a.pki, a.name, a.listen, a.policy, a.state_dir)
            else {
                return Err("ferry vm --incoming needs --pki, --name, --listen, --policy and --state-dir".into());
            };
            need(
                "--migrate-to is for the source, not with --incoming",
                a.migrate_to.is_none(),
            )?;
            need(
                "--pin-measurement is for a source: it names the destinations it sends to",
                a.pin_measurement.is_empty(),
            )?;
            ferry_vmm::kvm::available().map_err(|why| format!("ferry vm needs KVM: {why}"))?;
            ferry::daemon::receive(&ferry::daemon::ReceiveOptions {
                pki,
                name,
                listen,
                policy,
                state_dir,
                max_memory_bytes: a.max_memory,
                max_concurrent: 1,
                io_timeout,
                guests: vec![ferry_control::modes::GuestKind::Kvm],
                verify_guest: a.verify,
                heartbeat_events: Some(Duration::from_millis(a.heartbeat_every_ms.max(10))),
                data_ports: a.data_ports,
                metrics: a.metrics,
            })?;
            return Ok(ExitCode::SUCCESS);
        }
        need(
            "--max-memory is for a destination (--incoming); a source's guest has --memory",
            a.max_memory.is_none(),
        )?;
        let source = match (a.pki, a.name, a.authn, a.authz) {
            (Some(pki), Some(host), Some(authn), Some(authz)) => Some(ferry::vm::SourceHost {
                servers_name: a.servers_name.unwrap_or_else(|| host.clone()),
                pki,
                host,
                client: a.client,
                authn,
                authz,
                audit: a.audit,
                pinned: a.pin_measurement,
                migration: {
                    let mut cfg = MigrationConfig {
                        streams: a.streams,
                        integrity: a.integrity,
                        downtime_ms_max: a.downtime_ms_max,
                        io_timeout,
                        ..MigrationConfig::default()
                    };
                    a.converge.apply(&mut cfg);
                    cfg
                },
            }),
            (None, None, None, None) => None,
            _ => return Err("a source that migrates needs all of --pki, --name, --authn and --authz".into()),
        };
        let migrate = match a.migrate_to {
            None => None,
            Some(dest) => {
                let (Some(_), Some(dest_host)) = (&source, a.dest_host) else {
                    return Err("ferry vm --migrate-to needs --pki, --name, --dest-host, --authn and --authz".into());
                };
                let record = a.record.unwrap_or_else(|| ferry::record::default_path(&a.vm_id));
                Some((
                    ferry::vm::MigrateTo {
                        dest,
                        dest_host,
                        tuning: ferry::api::Tuning::default(),
                        record: Some(record),
                    },
                    Duration::from_secs_f64(a.migrate_after_s.clamp(0.0, 86_400.0)),
                ))
            }
        };
        need(
            "--api serves a source VM's API (migrate, status, cancel); it needs --pki, --name, --authn and --authz to migrate",
            a.api.is_none() || source.is_some(),
        )?;
        ferry::vm::run(&ferry::vm::VmOptions {
            memory_bytes: a.memory,
            vcpus: a.vcpus,
            program: ferry_vmm::kvm::GuestProgram {
                hot_set_bytes: a.hot_set,
                writes_per_s: a.dirty_rate,
                ..Default::default()
            },
            vm_id: a.vm_id,
            heartbeat_every: Duration::from_millis(a.heartbeat_every_ms.max(10)),
            run_for: a.run_for_s.map(|s| Duration::from_secs_f64(s.clamp(0.0, 1e9))),
            verify: a.verify,
            source,
            migrate,
            api: a.api,
            metrics: a.metrics,
        })?;
        Ok(ExitCode::SUCCESS)
    }
}
