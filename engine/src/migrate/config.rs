//! The tunables of one migration and their limits.

use std::time::Duration;

use super::convergence::{Converge, THROTTLE_CEILING};
use super::MigrateError;
use crate::crypto::AeadBackend;
use crate::pace::check_cap;
use crate::pipeline::Integrity;
use crate::wire;

/// Tunables of one migration. Both sides must agree on `streams` and
/// `integrity` (checked in the Hello).
#[derive(Debug, Clone)]
pub struct MigrationConfig {
    /// Data streams (TCP connections, one pinned worker each).
    pub streams: u16,
    /// Page integrity mode.
    pub integrity: Integrity,
    /// AES-GCM implementation.
    pub aead: AeadBackend,
    /// SHA-256 implementation of the page digests (`aead+sha256`): `auto`
    /// picks tape-sha256's multi-buffer hashing where this CPU runs it
    /// correctly, else ring. The backend is process-wide (see
    /// [`crate::sha`]): a forced choice here selects it for the process;
    /// `Auto` keeps what the process selected (`sha::select`).
    pub sha256: crate::sha::Sha256Choice,
    /// Most pages per frame (1..=64).
    pub chunk_pages: u32,
    /// Downtime target: stop iterating when the rest fits in it.
    pub downtime_ms_max: u64,
    /// Pre-copy rounds at most before the final one.
    pub max_rounds: u32,
    /// What to do when the rest does not fit in the downtime target.
    pub converge: Converge,
    /// The highest throttle the `throttle` policy may apply (0..=0.99).
    pub throttle_max: f64,
    /// The whole migration must reach its commit point within this, or it
    /// ends (the guest keeps running at the source). `None`: no limit.
    pub timeout: Option<Duration>,
    /// Bandwidth cap of the live rounds, all streams together, in bytes per
    /// second of data-stream traffic (`None`: unlimited). Changeable while
    /// the migration runs through [`crate::progress::Hooks::set_max_bandwidth`].
    pub max_bandwidth: Option<u64>,
    /// Bandwidth cap of the paused round (`None`: as the live rounds').
    pub max_bandwidth_paused: Option<u64>,
    /// Longest wait for any network progress.
    pub io_timeout: Duration,
    /// Most frames a stream may have unacknowledged.
    pub window_frames: u64,
    /// The destination acknowledges at least every this many frames.
    pub ack_every: u64,
    /// Bytes gathered before one send is issued.
    pub batch_bytes: usize,
    /// Pin workers to cores.
    pub pin_workers: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            streams: 2,
            integrity: Integrity::AeadSha256,
            aead: AeadBackend::Ring,
            sha256: crate::sha::Sha256Choice::Auto,
            chunk_pages: 32,
            downtime_ms_max: 50,
            max_rounds: 30,
            converge: Converge::default(),
            throttle_max: THROTTLE_CEILING,
            timeout: None,
            max_bandwidth: None,
            max_bandwidth_paused: None,
            io_timeout: Duration::from_secs(10),
            window_frames: 512,
            ack_every: 32,
            batch_bytes: 1 << 20,
            pin_workers: true,
        }
    }
}

impl MigrationConfig {
    /// [`validate`](Self::validate), and that there is one connection per
    /// stream.
    pub(super) fn validate_for(&self, conns: usize) -> Result<(), MigrateError> {
        self.validate()?;
        if conns != usize::from(self.streams) {
            return Err(MigrateError::Config(format!(
                "{conns} connections for {} streams",
                self.streams
            )));
        }
        Ok(())
    }

    /// Checks every setting's range, and refuses what this version cannot
    /// do (`converge: postcopy`). Migrations call it first; a front end may
    /// call it early to fail before any setup.
    pub fn validate(&self) -> Result<(), MigrateError> {
        let bad = |m: &str| Err(MigrateError::Config(m.into()));
        if self.streams == 0 || self.streams > 64 {
            return bad("streams must be 1..=64");
        }
        if self.chunk_pages == 0 || self.chunk_pages > wire::MAX_FRAME_PAGES {
            return bad("chunk_pages must be 1..=64");
        }
        if self.ack_every == 0 || self.window_frames < 2 * self.ack_every {
            return bad("window_frames must be at least twice ack_every (and ack_every > 0)");
        }
        if self.io_timeout.is_zero() {
            return bad("io_timeout must be positive");
        }
        if self.batch_bytes < 64 << 10 || self.batch_bytes > 64 << 20 {
            return bad("batch_bytes must be 64 KiB..=64 MiB");
        }
        if self.converge == Converge::Postcopy {
            return Err(MigrateError::PostcopyUnavailable);
        }
        if !(0.0..=THROTTLE_CEILING).contains(&self.throttle_max) {
            return bad("throttle_max must be 0..=0.99");
        }
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return bad("timeout must be positive (or none)");
        }
        for cap in [self.max_bandwidth, self.max_bandwidth_paused] {
            check_cap(cap).map_err(|e| MigrateError::Config(e.to_string()))?;
        }
        Ok(())
    }
}
