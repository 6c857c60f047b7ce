//! The operator's commands against a running VMM: `ferry migrate`,
//! `status`, `cancel`, and `ferry report` for a record.

use super::*;

pub(crate) const MIGRATE_EXAMPLES: &str = "Examples:
  # live progress on a terminal, one line per round on a pipe
  ferry migrate --api /run/ferry/web-1.sock --to 10.0.0.2:7700 --dest-host dst

  # a busy guest: slow it down until the rest fits 20 ms, on at most 10 Gbit/s
  ferry migrate --api /run/ferry/web-1.sock --to 10.0.0.2:7700 --dest-host dst \\
      --downtime-ms-max 20 --converge throttle --max-bandwidth 10Gbit

  # every event as a JSON line, the record in a chosen file
  ferry migrate --api /run/ferry/web-1.sock --to 10.0.0.2:7700 --dest-host dst --json --record web-1.json

Exit status: 0 migrated; 1 failed or cancelled (the guest runs at the source);
3 in doubt (commit sent, no confirmation, and the destination could not be
asked: the guest stays paused; `ferry resolve` asks again);
4 migrated without the destination's signed receipt.
The migration runs in the VMM: stopping `ferry migrate` does not stop it;
`ferry cancel` does (before the commit point).";

/// Which VMM to talk to.
#[derive(Args)]
pub(crate) struct ApiArgs {
    /// The VMM's API socket (`ferry vm --api PATH`).
    #[arg(long, value_name = "PATH")]
    pub(crate) api: std::path::PathBuf,
    /// Print the VMM's JSON reply as is.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct MigrateArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The destination daemon's control address (`ferry vm --incoming` or `ferry receive`).
    #[arg(long)]
    to: std::net::SocketAddr,
    /// The destination's host name: its certificate must be for it.
    #[arg(long)]
    dest_host: String,
    /// Downtime target in milliseconds (default: the VMM's).
    #[arg(long)]
    downtime_ms_max: Option<u64>,
    #[command(flatten)]
    converge: ConvergeArgs,
    /// Write the migration's record here (default: STATE_DIR/runs/VM-TIME.json,
    /// STATE_DIR being $FERRY_STATE_DIR, /var/lib/ferry for root, or ~/.local/state/ferry).
    #[arg(long, value_name = "FILE")]
    record: Option<std::path::PathBuf>,
    /// Give up waiting for the VMM after this many silent seconds.
    #[arg(long, default_value_t = 120)]
    idle_timeout_s: u64,
}

/// `ferry estimate`'s arguments.
#[derive(Args)]
pub(crate) struct EstimateArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// How long to watch the guest's writes.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// The link's bandwidth (10Gbit, 1.5GB/s; default: the VMM's cap).
    #[arg(long, value_name = "RATE", value_parser = ferry::size::parse_rate)]
    bandwidth: Option<u64>,
    /// Downtime target in milliseconds (default: the VMM's).
    #[arg(long)]
    downtime_ms_max: Option<u64>,
    /// Policy to predict for (default: the VMM's).
    #[arg(long, value_name = "POLICY")]
    converge: Option<ferry_engine::migrate::convergence::Converge>,
}

impl EstimateArgs {
    /// Runs `ferry estimate`.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        let req = ferry::api::Request::Estimate {
            seconds: self.seconds,
            bandwidth: self.bandwidth,
            downtime_ms_max: self.downtime_ms_max,
            converge: self.converge,
        };
        Ok(ferry::ops::estimate(&self.api.api, &req, self.seconds, self.api.json)?)
    }
}

/// `ferry set-bandwidth`'s arguments.
#[derive(Args)]
pub(crate) struct SetBandwidthArgs {
    #[command(flatten)]
    api: ApiArgs,
    /// The live rounds' new cap (10Gbit, 1.5GB/s, 800MiB/s), or `unlimited`.
    #[arg(long, value_name = "RATE")]
    max_bandwidth: String,
    /// The paused round's new cap (default: unchanged).
    #[arg(long, value_name = "RATE", value_parser = ferry::size::parse_rate)]
    max_bandwidth_paused: Option<u64>,
}

impl SetBandwidthArgs {
    /// Runs `ferry set-bandwidth`.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        let live = match self.max_bandwidth.as_str() {
            "unlimited" | "none" => None,
            r => Some(ferry::size::parse_rate(r).map_err(|e| e.to_string())?),
        };
        Ok(ferry::ops::set_bandwidth(
            &self.api.api,
            live,
            self.max_bandwidth_paused,
            self.api.json,
        )?)
    }
}

/// `ferry report`'s arguments.
#[derive(Args)]
pub(crate) struct ReportArgs {
    /// The record (`ferry migrate --record`, `ferry demo --record`).
    record: std::path::PathBuf,
    /// Draw bytes per round, dirty rate, bandwidth and the downtime window here.
    #[arg(long, value_name = "OUT.svg")]
    svg: Option<std::path::PathBuf>,
}

impl MigrateArgs {
    /// Runs `ferry migrate`.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        let a = self;
        if a.converge.throttle_max.is_some() {
            return Err("--throttle-max is the VMM's setting: give it to `ferry vm`".into());
        }
        Ok(ferry::ops::migrate(&ferry::ops::MigrateOptions {
            api: a.api.api,
            json: a.api.json,
            to: a.to,
            dest_host: a.dest_host,
            tuning: a.converge.tuning(a.downtime_ms_max),
            record: a.record,
            idle_timeout: Duration::from_secs(a.idle_timeout_s.max(1)),
        })?)
    }
}

impl ApiArgs {
    /// Runs `ferry status`.
    pub(crate) fn status(self) -> Result<ExitCode, CliError> {
        Ok(ferry::ops::status(&self.api, self.json)?)
    }

    /// Runs `ferry cancel`.
    pub(crate) fn cancel(self) -> Result<ExitCode, CliError> {
        Ok(ferry::ops::cancel(&self.api, self.json)?)
    }

    /// Runs `ferry resolve`.
    pub(crate) fn resolve(self) -> Result<ExitCode, CliError> {
        Ok(ferry::ops::resolve(&self.api, self.json)?)
    }
}

impl ReportArgs {
    /// Runs `ferry report`.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        Ok(ferry::ops::report(&self.record, self.svg.as_deref())?)
    }
}
