//! What several commands share: a daemon's identity and listener, and
//! value parsers.

use super::*;

/// Who a daemon is and where it listens.
#[derive(Args)]
pub(crate) struct HostArgs {
    /// PKI folder (see `ferry pki init`).
    #[arg(long)]
    pub(crate) pki: std::path::PathBuf,
    /// This host's name: its certificate `hosts/NAME` serves TLS.
    #[arg(long)]
    pub(crate) name: String,
    /// Address to listen on.
    #[arg(long)]
    pub(crate) listen: std::net::SocketAddr,
    /// Serve Prometheus metrics on GET /metrics here: a port (bound on
    /// 127.0.0.1) or an address (see `ferry::metrics` for the series).
    #[arg(long, value_name = "PORT|ADDR", value_parser = ferry::metrics::parse_addr)]
    pub(crate) metrics: Option<std::net::SocketAddr>,
}

/// Which SHA-256 implementation hashes the page digests.
#[derive(Args)]
pub(crate) struct Sha256Arg {
    /// SHA-256 of the page digests: auto (tape's multi-buffer hashing where
    /// this CPU runs it correctly, else ring), ring, or tape.
    #[arg(long, default_value = "auto")]
    pub(crate) sha256: Sha256Choice,
}

impl Sha256Arg {
    /// Selects it for this process (a daemon's migrations keep it).
    pub(crate) fn select(&self) {
        let sha = ferry_engine::sha::select(self.sha256);
        tracing::info!(sha256 = sha.as_str(), "page digests");
    }
}

pub(crate) fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    let (a, b) = (port(a)?, port(b)?);
    if a > b {
        return Err(format!("{s:?}: the first port must not be above the last"));
    }
    Ok((a, b))
}

pub(crate) fn parse_fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

/// The synthetic guest's size and writing, shared by `demo` and `workload`.
#[derive(Args)]
pub(crate) struct GuestShape {
    /// Guest memory size (e.g. 1GiB, 256MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub(crate) memory: u64,
    /// Hot set the guest keeps writing.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub(crate) hot_set: u64,
    /// Guest writes per second (pages/s; 0 = idle guest).
    #[arg(long, default_value_t = 20_000)]
    pub(crate) dirty_rate: u64,
    /// Fraction of all-zero pages in the synthetic guest's memory (0..1).
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    pub(crate) zero_fraction: f64,
}

/// What to do when the rest does not fit the downtime target, and the
/// limits around it: shared by `demo`, `vm` and `migrate` (where an absent
/// option keeps the VMM's setting).
#[derive(Args, Clone, Default)]
pub(crate) struct ConvergeArgs {
    /// When pre-copy cannot fit the rest in the downtime target: abort
    /// (give up before pausing; the guest never notices: the default),
    /// throttle (slow the guest's vCPUs down in steps until it fits), force
    /// (switch over anyway and report by how much the target was
    /// exceeded), postcopy (not available yet).
    #[arg(long, value_name = "POLICY")]
    pub(crate) converge: Option<ferry_engine::migrate::convergence::Converge>,
    /// The highest throttle `--converge throttle` may apply, as the share
    /// of time taken from the guest (0..=0.99).
    #[arg(long, value_parser = parse_fraction)]
    pub(crate) throttle_max: Option<f64>,
    /// Bandwidth cap of the live rounds, all streams together (10Gbit,
    /// 1.5GB/s, 800MiB/s, 200MB/s; at least 1MB/s).
    #[arg(long, value_name = "RATE", value_parser = ferry::size::parse_rate)]
    pub(crate) max_bandwidth: Option<u64>,
    /// Bandwidth cap of the paused round (default: the live cap).
    #[arg(long, value_name = "RATE", value_parser = ferry::size::parse_rate)]
    pub(crate) max_bandwidth_paused: Option<u64>,
    /// Give up if the migration has not reached its commit point after
    /// this many seconds (the guest keeps running at the source).
    #[arg(long, value_name = "SECONDS")]
    pub(crate) timeout_s: Option<u64>,
}

impl ConvergeArgs {
    /// These settings as an API request's.
    pub(crate) fn tuning(&self, downtime_ms_max: Option<u64>) -> ferry::api::Tuning {
        ferry::api::Tuning {
            downtime_ms_max,
            converge: self.converge,
            max_bandwidth: self.max_bandwidth,
            max_bandwidth_paused: self.max_bandwidth_paused,
            timeout_s: self.timeout_s,
        }
    }

    /// `cfg` with these settings over it.
    pub(crate) fn apply(&self, cfg: &mut MigrationConfig) {
        self.tuning(None).apply(cfg);
        if let Some(t) = self.throttle_max {
            cfg.throttle_max = t;
        }
    }
}
