//! What the engine needs from the guest it migrates: pause, resume, and its
//! small non-memory state. The synthetic guest and the KVM VMM implement it.

use thiserror::Error;

pub use ferry_control::modes::GuestKind;

/// Errors the guest side reports.
#[derive(Debug, Error)]
pub enum GuestError {
    /// The device state blob is malformed or for another guest.
    #[error("invalid device state: {0}")]
    BadState(String),
    /// The guest could not be paused or resumed.
    #[error("guest control failed: {0}")]
    Control(String),
}

/// Control of a guest's execution and device state.
pub trait GuestControl: Send {
    /// Stops the guest: when this returns, the guest writes no more memory.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Lets the guest run again.
    fn resume(&mut self) -> Result<(), GuestError>;
    /// The guest's device state (vCPU registers, devices), taken while paused.
    fn save_state(&mut self) -> Result<Vec<u8>, GuestError>;
    /// Loads device state into a guest that has not run yet (destination).
    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError>;
    /// What kind of guest this is: the destination makes a VM of this kind
    /// to receive it.
    fn kind(&self) -> GuestKind;
    /// How long the last [`pause`](Self::pause) took from asking the guest
    /// to stop executing until it had stopped: the engine counts it in the
    /// downtime. (Work the guest did on request before that, such as a
    /// checksum while still running, is not downtime.)
    fn stop_latency(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
    /// Virtual CPUs (the destination makes a VM with as many).
    fn vcpus(&self) -> u32 {
        1
    }
}
