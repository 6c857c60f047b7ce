//! What a running migration tells its embedder, and how the embedder stops
//! it: [`Hooks`] (a progress callback and a cancel switch) go with every
//! [`crate::migrate::migrate_source`] and
//! [`crate::migrate::migrate_destination`] call.
//!
//! Progress events come from the migration's controller thread, a few times
//! a second and at every round's end, never from the per-frame hot path: the
//! workers only add to two shared counters once per frame. A callback must
//! return quickly (hand the event to a channel with `try_send`, say); the
//! migration waits for it.
//!
//! [`Hooks::cancel`] stops a migration that has not reached its commit
//! point: the source's workers abort their streams (the destination is told
//! why and discards what it got) and the source's guest runs on, as after
//! any failure before the commit. A cancel after the commit point does
//! nothing: the guest already belongs to the destination.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::migrate::RoundStats;
use crate::pace::BandwidthCap;

/// How often the controller reports `Sending` while a round runs.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// One progress event.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Progress {
    /// A round is under way (every [`PROGRESS_EVERY`]).
    Sending {
        /// Round number (1-based).
        round: u32,
        /// Pages of this round sent so far.
        pages_sent: u64,
        /// Pages this round sends.
        pages_in_round: u64,
        /// Bytes written to the streams since the migration started.
        bytes_on_wire: u64,
        /// Milliseconds since the migration started.
        elapsed_ms: f64,
    },
    /// A round ended (the final one too).
    Round {
        /// What the round did.
        #[serde(flatten)]
        stats: RoundStats,
        /// Milliseconds since the migration started.
        elapsed_ms: f64,
    },
    /// The source paused its guest for the final round.
    Paused {
        /// The final round's number.
        round: u32,
        /// Pages the final round sends.
        pages: u64,
        /// What the paused round was expected to take when pre-copy ended.
        expected_downtime_ms: f64,
        /// The operator's downtime target.
        downtime_target_ms: u64,
        /// The expected downtime is over the target (only under the
        /// `force` policy, which switches over anyway).
        exceeds_target: bool,
    },
    /// The source raised its guest's throttle (policy `throttle`).
    Throttled {
        /// The round just finished.
        round: u32,
        /// Share of time taken from the guest from now on (0..1).
        throttle: f64,
    },
    /// The destination said Ready and the source committed: the guest now
    /// belongs to the destination and a cancel has no effect.
    Committed {
        /// Milliseconds since the migration started.
        elapsed_ms: f64,
    },
    /// The guest runs at the destination (source: confirmed by it;
    /// destination: resumed here).
    Resumed {
        /// Milliseconds since the migration started (source) or since the
        /// first stream arrived (destination).
        elapsed_ms: f64,
    },
    /// Destination: the data received so far (every [`PROGRESS_EVERY`]).
    Receiving {
        /// Pages written into guest memory so far.
        pages: u64,
        /// Bytes read from the streams so far.
        bytes: u64,
    },
}

type Callback = dyn Fn(&Progress) + Send + Sync;

/// A migration's progress callback and cancel switch. Cloning shares both:
/// keep a clone to cancel from another thread.
#[derive(Clone, Default)]
pub struct Hooks {
    progress: Option<Arc<Callback>>,
    cancel: Arc<AtomicBool>,
    cap: Arc<BandwidthCap>,
    /// Sockets a cancel closes: the control plane's, while it waits on a
    /// peer (a ticket server, the destination's admission), so a cancel
    /// ends a wait on a slow or silent peer at once.
    closers: Arc<Mutex<Vec<std::net::TcpStream>>>,
    /// Fault injection for tests: the stream whose worker panics in the
    /// final round.
    #[cfg(feature = "fault-injection")]
    panic_in_final_round: Option<u16>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("progress", &self.progress.is_some())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Hooks {
    /// No callback, not cancelled.
    pub fn new() -> Hooks {
        Hooks::default()
    }

    /// Calls `f` with every progress event (on the controller thread).
    #[must_use]
    pub fn on_progress(mut self, f: impl Fn(&Progress) + Send + Sync + 'static) -> Hooks {
        self.progress = Some(Arc::new(f));
        self
    }

    /// Asks the migration to stop. Before the commit point it ends with
    /// [`crate::migrate::MigrateError::Cancelled`] and the source's guest
    /// keeps running; after it, nothing happens.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        let mut closers = self.closers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in closers.drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Has a cancel close `sock` (until [`Hooks::forget_sockets`]); closes
    /// it now if the migration is cancelled already.
    pub fn close_on_cancel(&self, sock: &std::net::TcpStream) {
        let Ok(clone) = sock.try_clone() else {
            return;
        };
        let mut closers = self.closers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.is_cancelled() {
            let _ = clone.shutdown(std::net::Shutdown::Both);
        } else {
            closers.push(clone);
        }
    }

    /// Stops closing the sockets given to [`Hooks::close_on_cancel`]
    /// (admitted: from here the engine obeys a cancel itself, and only
    /// before its commit point).
    pub fn forget_sockets(&self) {
        self.closers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Whether [`Hooks::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Changes the bandwidth cap of the live rounds (`None`: unlimited) and,
    /// with `paused: Some(..)`, of the paused round, in bytes per second; a
    /// running migration obeys it from its next batch (within a round). Set
    /// before the migration starts, it replaces the configuration's caps.
    /// A cap below [`crate::pace::MIN_CAP_BYTES_PER_S`] is refused and
    /// changes nothing.
    pub fn set_max_bandwidth(
        &self,
        live: Option<u64>,
        paused: Option<Option<u64>>,
    ) -> Result<(), crate::pace::CapTooLow> {
        crate::pace::check_cap(live)?;
        crate::pace::check_cap(paused.flatten())?;
        self.cap.set(live, paused);
        Ok(())
    }

    /// The caps in force.
    pub fn bandwidth_cap(&self) -> &BandwidthCap {
        &self.cap
    }

    /// Fault injection (tests only, feature `fault-injection`): the sending
    /// worker of `stream` panics when it starts the final round, after the
    /// source guest was paused — the case the switchover guard exists for.
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    #[must_use]
    pub fn inject_panic_in_final_round(mut self, stream: u16) -> Hooks {
        self.panic_in_final_round = Some(stream);
        self
    }

    pub(crate) fn injected_panic_in_final_round(&self, _stream: u16) -> bool {
        #[cfg(feature = "fault-injection")]
        {
            self.panic_in_final_round == Some(_stream)
        }
        #[cfg(not(feature = "fault-injection"))]
        {
            false
        }
    }

    pub(crate) fn emit(&self, p: &Progress) {
        if let Some(f) = &self.progress {
            f(p);
        }
    }
}

/// Pages and bytes sent by all workers, bumped once per frame.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) pages: AtomicU64,
    pub(crate) bytes: AtomicU64,
}

impl Counters {
    pub(crate) fn add(&self, pages: u64, bytes: u64) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub(crate) fn get(&self) -> (u64, u64) {
        (self.pages.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn clones_share_the_cancel_switch_and_the_callback() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hooks = Hooks::new().on_progress(move |p| s.lock().unwrap().push(serde_json::to_string(p).unwrap()));
        let other = hooks.clone();
        assert!(!hooks.is_cancelled());
        other.cancel();
        assert!(hooks.is_cancelled());
        // Clones share the caps too; one too low is refused and changes nothing.
        other.set_max_bandwidth(Some(5_000_000), None).unwrap();
        assert_eq!(hooks.bandwidth_cap().live(), Some(5_000_000));
        assert!(other.set_max_bandwidth(Some(10), None).is_err());
        assert!(other.set_max_bandwidth(None, Some(Some(10))).is_err());
        assert_eq!(hooks.bandwidth_cap().live(), Some(5_000_000));
        other.emit(&Progress::Committed { elapsed_ms: 1.5 });
        assert_eq!(
            *seen.lock().unwrap(),
            vec![r#"{"event":"committed","elapsed_ms":1.5}"#.to_string()]
        );
    }
}
