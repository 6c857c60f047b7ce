//! The destination stream's phases.

#[derive(PartialEq, Eq, Clone, Copy, Debug)]
pub(crate) enum RecvPhase {
    Rounds,
    /// Stream 0 after its final round: waits for the controller's go.
    AwaitGo,
    AwaitCommit,
    AwaitResumeGo,
    Finishing,
}
