//! The destination stream's phases, and every transition in one function.
//!
//! ```text
//!            Hello, Pages, DeviceState (stream 0), RoundEnd
//!           ┌────┐
//!           ▼    │  RoundEnd(final), stream 0            go (controller)         Commit
//!        Rounds ─┴──────────────────────────▶ AwaitGo ─────────────▶ AwaitCommit ───────▶ AwaitResumeGo
//!           │ RoundEnd(final), other streams                                                  │ go (guest resumed)
//!           └───────────────────────────────▶ Finishing ◀──────────────────────────────────────┘
//! ```
//!
//! Abort is accepted in every phase (it ends the migration with the peer's
//! reason); anything else a phase does not list is a protocol violation.

use crate::wire::Kind;

/// Where one destination stream is.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) enum RecvPhase {
    /// Pre-copy and final rounds: pages arrive.
    Rounds,
    /// Stream 0 after its final round: waits for the controller's go (every
    /// stream done, state loaded) to send Ready.
    AwaitGo,
    /// Stream 0 after Ready: waits for the source's Commit.
    AwaitCommit,
    /// Stream 0 after Commit: waits for the controller to resume the guest.
    AwaitResumeGo,
    /// Nothing more to receive; sends what is due and ends.
    Finishing,
}

/// What a frame asks of the worker, once its phase allows it.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) enum Action {
    /// Check the Hello's offer against this side's configuration.
    Hello,
    /// Write the frame's pages into guest memory.
    Pages,
    /// Hand the device state to the controller.
    DeviceState,
    /// A round ended: acknowledge. `keep_reading` is false after the final
    /// round of a stream that expects nothing more before it acts.
    RoundEnd {
        /// Whether to re-arm the receive.
        keep_reading: bool,
    },
    /// The source committed: tell the controller to resume the guest.
    Commit,
    /// The source aborted, with its reason in the payload.
    Abort,
}

/// The frame's facts the transition depends on.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) struct Seen {
    pub kind: Kind,
    /// The frame's sequence number (Hello must be the first, 0).
    pub seq: u64,
    /// `RoundEnd` carries the final-round flag.
    pub is_final: bool,
}

/// A frame the phase does not allow.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) struct Unexpected {
    pub kind: Kind,
    pub phase: RecvPhase,
}

impl std::fmt::Display for Unexpected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "unexpected {:?} frame (phase {:?})", self.kind, self.phase)
    }
}

/// The one place the destination's stream protocol lives: given where the
/// stream is and what arrived, where it goes and what to do.
pub(crate) fn on_frame(phase: RecvPhase, stream0: bool, f: Seen) -> Result<(RecvPhase, Action), Unexpected> {
    use RecvPhase::*;
    let next = match (f.kind, phase) {
        (Kind::Abort, p) => (p, Action::Abort),
        (Kind::Hello, Rounds) if f.seq == 0 => (Rounds, Action::Hello),
        (Kind::Pages, Rounds) if f.seq > 0 => (Rounds, Action::Pages),
        (Kind::DeviceState, Rounds) if stream0 => (Rounds, Action::DeviceState),
        (Kind::RoundEnd, Rounds) if !f.is_final => (Rounds, Action::RoundEnd { keep_reading: true }),
        // Stream 0 keeps reading (for Commit); the others have nothing more.
        (Kind::RoundEnd, Rounds) if stream0 => (AwaitGo, Action::RoundEnd { keep_reading: true }),
        (Kind::RoundEnd, Rounds) => (Finishing, Action::RoundEnd { keep_reading: false }),
        (Kind::Commit, AwaitCommit) => (AwaitResumeGo, Action::Commit),
        (kind, phase) => return Err(Unexpected { kind, phase }),
    };
    Ok(next)
}

/// The controller's go-ahead, in the phases that wait for one.
#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) enum Go {
    /// Send Ready (every stream finished, the state is loaded).
    SendReady,
    /// Send Resumed (the guest runs).
    SendResumed,
}

/// The phase after the controller's go-ahead, or `None` if it does not fit.
pub(crate) fn on_go(phase: RecvPhase, go: Go) -> Option<RecvPhase> {
    match (phase, go) {
        (RecvPhase::AwaitGo, Go::SendReady) => Some(RecvPhase::AwaitCommit),
        (RecvPhase::AwaitResumeGo, Go::SendResumed) => Some(RecvPhase::Finishing),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RecvPhase::*;

    fn seen(kind: Kind, seq: u64, is_final: bool) -> Seen {
        Seen { kind, seq, is_final }
    }

    #[test]
    fn every_allowed_transition() {
        let cases = [
            (Rounds, true, seen(Kind::Hello, 0, false), Rounds, Action::Hello),
            (Rounds, false, seen(Kind::Hello, 0, false), Rounds, Action::Hello),
            (Rounds, true, seen(Kind::Pages, 1, false), Rounds, Action::Pages),
            (
                Rounds,
                true,
                seen(Kind::DeviceState, 9, false),
                Rounds,
                Action::DeviceState,
            ),
            (
                Rounds,
                false,
                seen(Kind::RoundEnd, 5, false),
                Rounds,
                Action::RoundEnd { keep_reading: true },
            ),
            (
                Rounds,
                true,
                seen(Kind::RoundEnd, 5, true),
                AwaitGo,
                Action::RoundEnd { keep_reading: true },
            ),
            (
                Rounds,
                false,
                seen(Kind::RoundEnd, 5, true),
                Finishing,
                Action::RoundEnd { keep_reading: false },
            ),
            (
                AwaitCommit,
                true,
                seen(Kind::Commit, 7, false),
                AwaitResumeGo,
                Action::Commit,
            ),
        ];
        for (from, stream0, f, to, action) in cases {
            assert_eq!(on_frame(from, stream0, f), Ok((to, action)), "{from:?} + {f:?}");
        }
    }

    #[test]
    fn abort_is_accepted_in_every_phase_and_changes_nothing() {
        for p in [Rounds, AwaitGo, AwaitCommit, AwaitResumeGo, Finishing] {
            for stream0 in [true, false] {
                assert_eq!(
                    on_frame(p, stream0, seen(Kind::Abort, 3, false)),
                    Ok((p, Action::Abort))
                );
            }
        }
    }

    #[test]
    fn everything_else_is_a_violation() {
        let refused = [
            // A Hello that is not the stream's first frame: replayed or spliced.
            (Rounds, true, seen(Kind::Hello, 1, false)),
            // Pages before the Hello.
            (Rounds, true, seen(Kind::Pages, 0, false)),
            // Device state on a stream other than 0.
            (Rounds, false, seen(Kind::DeviceState, 4, false)),
            // Commit before Ready was sent: the source cannot know the
            // destination is ready.
            (Rounds, true, seen(Kind::Commit, 4, false)),
            (AwaitGo, true, seen(Kind::Commit, 4, false)),
            // A second Commit.
            (AwaitResumeGo, true, seen(Kind::Commit, 8, false)),
            // Pages after the final round.
            (AwaitGo, true, seen(Kind::Pages, 4, false)),
            (AwaitCommit, true, seen(Kind::Pages, 4, false)),
            (Finishing, false, seen(Kind::Pages, 4, false)),
            // Frames only the destination sends.
            (Rounds, true, seen(Kind::Ack, 4, false)),
            (AwaitCommit, true, seen(Kind::Ready, 4, false)),
            (AwaitCommit, true, seen(Kind::Resumed, 4, false)),
        ];
        for (p, stream0, f) in refused {
            assert_eq!(
                on_frame(p, stream0, f),
                Err(Unexpected { kind: f.kind, phase: p }),
                "{p:?} accepted {f:?}"
            );
        }
    }

    #[test]
    fn go_ahead_only_where_awaited() {
        assert_eq!(on_go(AwaitGo, Go::SendReady), Some(AwaitCommit));
        assert_eq!(on_go(AwaitResumeGo, Go::SendResumed), Some(Finishing));
        for p in [Rounds, AwaitCommit, Finishing] {
            assert_eq!(on_go(p, Go::SendReady), None);
            assert_eq!(on_go(p, Go::SendResumed), None);
        }
        assert_eq!(on_go(AwaitGo, Go::SendResumed), None);
        assert_eq!(on_go(AwaitResumeGo, Go::SendReady), None);
    }
}
