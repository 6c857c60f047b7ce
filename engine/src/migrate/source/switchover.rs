//! The source's commit point as types.
//!
//! ```text
//! Tracking ──pause()──▶ Paused ──ready(FinalAcked, ReadyFrame)──▶ ReadyToCommit ──commit()──▶ Committed
//!   drop: stop tracker    drop: RESUME guest, stop tracker          drop: RESUME guest         (guest stays paused)
//! ```
//!
//! Before the commit point the source owns the VM and must keep it running.
//! Holding that in a flag each error path must remember fails on the paths
//! nobody thought of — a panic in a worker unwinds past every `if`. Here the
//! paused guest is a value whose drop resumes it, so an early return, a `?`
//! or an unwinding panic all resume it. The only way past the commit point
//! is [`ReadyToCommit::commit`], and the only way to a [`ReadyToCommit`] is
//! an authenticated Ready from the destination ([`ReadyFrame`], made only
//! by a worker that opened one) together with proof that every frame of
//! the final round was acknowledged ([`FinalAcked`], made only by the
//! controller when every stream reported its final round done).

use crate::dirty::{DirtyError, DirtyTracker};
use crate::guest::{GuestControl, GuestError};

/// Dirty tracking under way; stops the tracker when dropped.
pub(super) struct Tracking<'a> {
    tracker: &'a mut dyn DirtyTracker,
}

impl<'a> Tracking<'a> {
    pub(super) fn start(tracker: &'a mut dyn DirtyTracker) -> Result<Tracking<'a>, DirtyError> {
        if let Err(e) = tracker.start() {
            let _ = tracker.stop();
            return Err(e);
        }
        Ok(Tracking { tracker })
    }

    pub(super) fn tracker(&mut self) -> &mut dyn DirtyTracker {
        &mut *self.tracker
    }

    /// Pauses the guest. If that fails the guest was not paused and keeps
    /// running; tracking stops.
    pub(super) fn pause(self, guest: &'a mut dyn GuestControl) -> Result<Paused<'a>, GuestError> {
        guest.pause()?;
        Ok(Paused {
            tracking: self,
            guest,
            armed: true,
        })
    }
}

impl Drop for Tracking<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.tracker.stop() {
            tracing::warn!("stopping the dirty tracker failed: {e}");
        }
    }
}

/// The guest is paused at the source and the source still owns it:
/// dropping this resumes it.
pub(super) struct Paused<'a> {
    // Dropped after `Drop::drop` ran: the guest resumes first, then
    // tracking stops.
    tracking: Tracking<'a>,
    guest: &'a mut dyn GuestControl,
    armed: bool,
}

impl<'a> Paused<'a> {
    pub(super) fn guest(&mut self) -> &mut dyn GuestControl {
        &mut *self.guest
    }

    pub(super) fn tracker(&mut self) -> &mut dyn DirtyTracker {
        self.tracking.tracker()
    }

    /// The destination has everything and says so: the migration may
    /// commit.
    pub(super) fn ready(self, _acked: FinalAcked, _ready: ReadyFrame) -> ReadyToCommit<'a> {
        ReadyToCommit(self)
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if std::thread::panicking() {
            tracing::error!("a panic before the commit point: resuming the source guest");
        } else {
            tracing::info!("the migration stopped before the commit point: resuming the source guest");
        }
        if let Err(e) = self.guest.resume() {
            tracing::error!(
                "resuming the source guest after a failed migration failed: {e}; it is paused and needs the operator"
            );
        }
    }
}

/// Every frame of the final round was acknowledged on every stream.
pub(super) struct FinalAcked(());

impl FinalAcked {
    /// Only the controller makes this, when every stream has reported its
    /// final round done (a worker reports that after its last frame is
    /// acknowledged).
    pub(super) fn every_stream_reported() -> FinalAcked {
        FinalAcked(())
    }
}

/// The destination's Ready, authenticated (it arrived through the stream's
/// AEAD like every frame).
#[derive(Debug)]
pub(crate) struct ReadyFrame(());

impl ReadyFrame {
    /// Only the stream-0 worker makes this, on an opened Ready frame.
    pub(super) fn opened() -> ReadyFrame {
        ReadyFrame(())
    }
}

/// May commit; dropping it without committing still resumes the guest.
pub(super) struct ReadyToCommit<'a>(Paused<'a>);

impl<'a> ReadyToCommit<'a> {
    /// The commit point: the source gives the VM up. The guest stays paused
    /// here whatever happens next.
    pub(super) fn commit(mut self) -> Committed<'a> {
        self.0.armed = false;
        Committed { _paused: self.0 }
    }
}

/// Past the commit point: the guest stays paused at the source; dropping
/// this only stops tracking.
pub(super) struct Committed<'a> {
    _paused: Paused<'a>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::DirtyBitmap;
    use std::time::Duration;

    #[derive(Default)]
    struct Guest {
        paused: bool,
        resumes: u32,
        fail_pause: bool,
    }

    impl GuestControl for Guest {
        fn pause(&mut self) -> Result<(), GuestError> {
            if self.fail_pause {
                return Err(GuestError::Control("refused".into()));
            }
            self.paused = true;
            Ok(())
        }
        fn resume(&mut self) -> Result<(), GuestError> {
            self.paused = false;
            self.resumes += 1;
            Ok(())
        }
        fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
            Ok(Vec::new())
        }
        fn load_state(&mut self, _: &[u8]) -> Result<(), GuestError> {
            Ok(())
        }
        fn kind(&self) -> crate::guest::GuestKind {
            crate::guest::GuestKind::Synthetic
        }
        fn stop_latency(&self) -> Duration {
            Duration::ZERO
        }
    }

    #[derive(Default)]
    struct Tracker {
        running: bool,
        stops: u32,
    }

    impl DirtyTracker for Tracker {
        fn start(&mut self) -> Result<(), DirtyError> {
            self.running = true;
            Ok(())
        }
        fn collect(&mut self, _: &mut DirtyBitmap) -> Result<(), DirtyError> {
            Ok(())
        }
        fn stop(&mut self) -> Result<(), DirtyError> {
            self.running = false;
            self.stops += 1;
            Ok(())
        }
        fn name(&self) -> &'static str {
            "test"
        }
    }

    #[test]
    fn dropping_a_paused_guest_resumes_it_and_stops_tracking() {
        let (mut g, mut t) = (Guest::default(), Tracker::default());
        {
            let tracking = Tracking::start(&mut t).unwrap();
            let paused = tracking.pause(&mut g).unwrap();
            drop(paused);
        }
        assert!(!g.paused);
        assert_eq!(g.resumes, 1);
        assert!(!t.running);
        assert_eq!(t.stops, 1);
    }

    #[test]
    fn a_panic_while_paused_resumes_the_guest() {
        let (mut g, mut t) = (Guest::default(), Tracker::default());
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let tracking = Tracking::start(&mut t).unwrap();
            let _paused = tracking.pause(&mut g).unwrap();
            panic!("a worker's assert");
        }));
        assert!(r.is_err());
        assert!(!g.paused, "the guest stayed paused after a panic");
        assert_eq!(g.resumes, 1);
        assert!(!t.running);
    }

    #[test]
    fn ready_but_not_committed_still_resumes() {
        let (mut g, mut t) = (Guest::default(), Tracker::default());
        {
            let paused = Tracking::start(&mut t).unwrap().pause(&mut g).unwrap();
            let _ready = paused.ready(FinalAcked::every_stream_reported(), ReadyFrame::opened());
        }
        assert!(!g.paused);
        assert_eq!(g.resumes, 1);
    }

    #[test]
    fn committing_keeps_the_guest_paused_and_stops_tracking() {
        let (mut g, mut t) = (Guest::default(), Tracker::default());
        {
            let paused = Tracking::start(&mut t).unwrap().pause(&mut g).unwrap();
            let committed = paused
                .ready(FinalAcked::every_stream_reported(), ReadyFrame::opened())
                .commit();
            drop(committed);
        }
        assert!(g.paused, "the source resumed a guest it had given up");
        assert_eq!(g.resumes, 0);
        assert_eq!(t.stops, 1);
    }

    #[test]
    fn a_failed_pause_leaves_the_guest_running_and_stops_tracking() {
        let mut g = Guest {
            fail_pause: true,
            ..Guest::default()
        };
        let mut t = Tracker::default();
        assert!(Tracking::start(&mut t).unwrap().pause(&mut g).is_err());
        assert!(!g.paused);
        assert_eq!(g.resumes, 0);
        assert_eq!(t.stops, 1);
    }
}
