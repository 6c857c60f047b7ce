//! Accept loops that neither spin nor give up on accept errors.
//!
//! A listener's `accept` fails for two kinds of reason. Some concern only
//! the connection at the head of the queue (the peer reset it before it was
//! accepted, a signal interrupted the call): the next accept may well work,
//! so retry at once. Others are the host running out of something —
//! descriptors (EMFILE, ENFILE), buffers, memory: the connection stays in
//! the queue, so every retry fails the same way at once, and a loop that
//! just `continue`s burns a core until the shortage ends. Those back off,
//! doubling from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`], and log once per
//! streak, not once per attempt.

use std::io;
use std::time::Duration;

/// The first sleep after a resource error.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest sleep between attempts while the shortage lasts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How an accept loop paces itself after errors.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    next: Option<Duration>,
    streak: u64,
}

impl AcceptBackoff {
    /// No errors yet.
    pub fn new() -> AcceptBackoff {
        AcceptBackoff::default()
    }

    /// An accept succeeded: the shortage, if any, is over.
    pub fn succeeded(&mut self, what: &str) {
        if self.streak > 0 {
            tracing::info!("{what}: accepting again after {} failed attempts", self.streak);
        }
        self.next = None;
        self.streak = 0;
    }

    /// An accept failed with `e`: how long to sleep before the next attempt
    /// (zero for an error that concerns only one connection).
    pub fn failed(&mut self, what: &str, e: &io::Error) -> Duration {
        if per_connection(e) {
            return Duration::ZERO;
        }
        self.streak += 1;
        if self.streak == 1 {
            tracing::warn!("{what}: accept failed: {e}; backing off until it works again (raise the descriptor limit, `ulimit -n`, if this repeats)");
        }
        let d = self.next.unwrap_or(FIRST_BACKOFF);
        self.next = Some((d * 2).min(MAX_BACKOFF));
        d
    }

    /// Failed attempts in the current streak.
    pub fn streak(&self) -> u64 {
        self.streak
    }
}

/// Errors that concern only the connection being accepted.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    ) || e.raw_os_error() == Some(EPROTO)
}

/// Linux's EPROTO ("protocol error"), which accept(2) may return for a
/// connection that failed before it was accepted.
const EPROTO: i32 = 71;

#[cfg(test)]
mod tests {
    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(24)
    }

    #[test]
    fn resource_errors_back_off_doubling_to_a_cap_and_reset_on_success() {
        let mut b = AcceptBackoff::new();
        let sleeps: Vec<Duration> = (0..10).map(|_| b.failed("test", &emfile())).collect();
        assert_eq!(sleeps[0], FIRST_BACKOFF);
        assert_eq!(sleeps[1], FIRST_BACKOFF * 2);
        assert_eq!(sleeps[2], FIRST_BACKOFF * 4);
        assert!(sleeps.windows(2).all(|w| w[1] >= w[0]));
        assert_eq!(*sleeps.last().unwrap(), MAX_BACKOFF);
        assert_eq!(b.streak(), 10);
        b.succeeded("test");
        assert_eq!(b.streak(), 0);
        assert_eq!(b.failed("test", &emfile()), FIRST_BACKOFF);
    }

    #[test]
    fn per_connection_errors_retry_at_once() {
        let mut b = AcceptBackoff::new();
        for e in [
            io::Error::from(io::ErrorKind::ConnectionAborted),
            io::Error::from(io::ErrorKind::Interrupted),
            io::Error::from_raw_os_error(EPROTO),
        ] {
            assert_eq!(b.failed("test", &e), Duration::ZERO, "{e}");
        }
        assert_eq!(b.streak(), 0);
    }
}
