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
    /// The guest does not implement an optional control.
    #[error("this guest does not support {0}")]
    Unsupported(&'static str),
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
    /// Whether [`set_throttle`](Self::set_throttle) works. A guest that
    /// cannot be throttled makes the `throttle` convergence policy give up
    /// (and say why) instead of pretending.
    fn can_throttle(&self) -> bool {
        false
    }
    /// Takes `fraction` (0..1) of the guest's time away while it runs: the
    /// guest runs `1 - fraction` of each short period and is stopped for the
    /// rest. 0 removes the throttle. The engine raises it in steps during
    /// pre-copy and sets it back to 0 when the migration ends either way;
    /// it is never part of the device state, so the destination's guest
    /// runs unthrottled.
    fn set_throttle(&mut self, fraction: f64) -> Result<(), GuestError> {
        let _ = fraction;
        Err(GuestError::Unsupported("throttling"))
    }
    /// About how many bytes [`save_state`](Self::save_state) will return:
    /// the engine counts them in the expected downtime before it pauses.
    fn device_state_bytes_hint(&self) -> usize {
        0
    }
}
