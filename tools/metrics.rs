//! Prometheus metrics (`--metrics ADDR` on `ferry receive`, `ferry vm` and
//! `ferry serve authn|authz`): the OpenMetrics text format from
//! `prometheus-client`, served on `GET /metrics` by `tiny_http`, bound to
//! 127.0.0.1 unless an address says otherwise.
//!
//! Every daemon registers the same series (those that do not apply to it
//! stay at zero), units in their names:
//!
//! | series | type | labels |
//! |---|---|---|
//! | `ferry_migrations_total` | counter | `role` (source, destination), `outcome` |
//! | `ferry_migrations_active` | gauge | `role` |
//! | `ferry_migration_sent_bytes_total` | counter | |
//! | `ferry_migration_received_bytes_total` | counter | |
//! | `ferry_migration_downtime_seconds` | histogram | |
//! | `ferry_migration_duration_seconds` | histogram | |
//! | `ferry_migration_rounds` | histogram | |
//! | `ferry_migration_throttle_ratio` | gauge | (the last migration's highest) |
//! | `ferry_handshake_duration_seconds` | histogram | |
//! | `ferry_admissions_total` | counter | `result` (admit, refuse, resolve), `code` |
//! | `ferry_tickets_total` | counter | `server` (authn, authz), `result` (issued, denied), `code` |
//! | `ferry_replay_cache_entries` | gauge | |
//!
//! A source's migration that ends in doubt counts as `in-doubt`, and again
//! with its outcome when `ferry resolve` settles it.

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Why the metrics endpoint did not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("metrics endpoint {addr}: {why}: choose another --metrics address")]
    Bind {
        /// Where.
        addr: SocketAddr,
        /// Why.
        why: String,
    },
}

/// `role`/`outcome` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// source or destination.
    pub role: String,
    /// What became of the migration (the record's outcome).
    pub outcome: String,
}

/// `role` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Role {
    /// source or destination.
    pub role: String,
}

/// `result`/`code` labels of an admission.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Admission {
    /// admit, refuse or resolve.
    pub result: String,
    /// The refusal code (empty unless refused).
    pub code: String,
}

/// `server`/`result`/`code` labels of a ticket request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Ticket {
    /// authn or authz.
    pub server: String,
    /// issued or denied.
    pub result: String,
    /// The refusal code (empty when issued).
    pub code: String,
}

/// One daemon's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Migrations ended.
    pub migrations: Family<Outcome, Counter>,
    /// Migrations under way.
    pub active: Family<Role, Gauge>,
    /// Bytes a source wrote to its data streams.
    pub sent_bytes: Counter,
    /// Bytes a destination read from its data streams.
    pub received_bytes: Counter,
    /// Downtime of each completed migration (source's measure).
    pub downtime_seconds: Histogram,
    /// Start to resume of each completed migration.
    pub duration_seconds: Histogram,
    /// Rounds of each completed migration.
    pub rounds: Histogram,
    /// The last migration's highest throttle (0..1).
    pub throttle_ratio: Gauge<f64, AtomicU64>,
    /// A destination's handshakes, accept to answer.
    pub handshake_seconds: Histogram,
    /// A destination's handshake outcomes.
    pub admissions: Family<Admission, Counter>,
    /// A ticket server's answers.
    pub tickets: Family<Ticket, Counter>,
    /// A destination's replay cache size.
    pub replay_entries: Gauge,
}

impl Metrics {
    /// Every series, registered.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("ferry");
        let m = Metrics {
            migrations: Family::default(),
            active: Family::default(),
            sent_bytes: Counter::default(),
            received_bytes: Counter::default(),
            // 0.25 ms .. ~4 s.
            downtime_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 15)),
            // 50 ms .. ~14 min.
            duration_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 15)),
            rounds: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            throttle_ratio: Gauge::default(),
            // 1 ms .. ~16 s.
            handshake_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            admissions: Family::default(),
            tickets: Family::default(),
            replay_entries: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "migrations",
            "Migrations ended, by role and outcome",
            m.migrations.clone(),
        );
        registry.register("migrations_active", "Migrations under way", m.active.clone());
        registry.register_with_unit(
            "migration_sent",
            "Bytes written to data streams",
            Unit::Bytes,
            m.sent_bytes.clone(),
        );
        registry.register_with_unit(
            "migration_received",
            "Bytes read from data streams",
            Unit::Bytes,
            m.received_bytes.clone(),
        );
        registry.register_with_unit(
            "migration_downtime",
            "Guest downtime of completed migrations",
            Unit::Seconds,
            m.downtime_seconds.clone(),
        );
        registry.register_with_unit(
            "migration_duration",
            "Start to resume of completed migrations",
            Unit::Seconds,
            m.duration_seconds.clone(),
        );
        registry.register("migration_rounds", "Rounds of completed migrations", m.rounds.clone());
        registry.register_with_unit(
            "migration_throttle",
            "The last migration's highest vCPU throttle",
            Unit::Other("ratio".into()),
            m.throttle_ratio.clone(),
        );
        registry.register_with_unit(
            "handshake_duration",
            "Destination handshakes, accept to answer",
            Unit::Seconds,
            m.handshake_seconds.clone(),
        );
        registry.register("admissions", "Destination handshakes by outcome", m.admissions.clone());
        registry.register("tickets", "Ticket server answers", m.tickets.clone());
        registry.register(
            "replay_cache_entries",
            "Ticket nonces in the destination's replay cache",
            m.replay_entries.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// The OpenMetrics text of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a migration that ended with `outcome` in `role`.
    pub fn ended(&self, role: &str, outcome: &str) {
        self.migrations
            .get_or_create(&Outcome {
                role: role.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The gauge of migrations under way in `role`.
    pub fn active(&self, role: &str) -> Gauge {
        self.active.get_or_create(&Role { role: role.into() }).clone()
    }

    /// Serves `GET /metrics` on `addr` from a thread of its own.
    pub fn serve(self: &Arc<Self>, addr: SocketAddr) -> Result<SocketAddr, MetricsError> {
        let server = tiny_http::Server::http(addr).map_err(|e| MetricsError::Bind {
            addr,
            why: e.to_string(),
        })?;
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let me = self.clone();
        std::thread::Builder::new()
            .name("ferry-metrics".into())
            .spawn(move || {
                for req in server.incoming_requests() {
                    let resp = if req.method() == &tiny_http::Method::Get && req.url() == "/metrics" {
                        let ct = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                        )
                        .expect("a valid header");
                        tiny_http::Response::from_string(me.encode()).with_header(ct)
                    } else {
                        tiny_http::Response::from_string("ferry serves GET /metrics only\n").with_status_code(404)
                    };
                    let _ = req.respond(resp);
                }
            })
            .map_err(|e| MetricsError::Bind {
                addr,
                why: e.to_string(),
            })?;
        Ok(bound)
    }
}

/// `--metrics`: a port (bound on 127.0.0.1) or an address.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?}: give a port (bound on 127.0.0.1) or an address such as 127.0.0.1:9750"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_their_units_and_labels() {
        let m = Metrics::new();
        m.ended("destination", "received");
        m.received_bytes.inc_by(4096);
        m.downtime_seconds.observe(0.002);
        let text = m.encode();
        for want in [
            "ferry_migrations_total{role=\"destination\",outcome=\"received\"} 1",
            "ferry_migration_received_bytes_total 4096",
            "ferry_migration_downtime_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        assert_eq!(parse_addr("9750").unwrap().to_string(), "127.0.0.1:9750");
        assert!(parse_addr("0.0.0.0:9750").is_ok());
        assert!(parse_addr("nine").is_err());
    }
}
