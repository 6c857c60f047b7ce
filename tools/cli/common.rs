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
