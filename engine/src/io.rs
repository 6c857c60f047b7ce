//! One TCP stream driven through its own io_uring.
//!
//! At most one send and one receive are in flight. An operation owns its
//! buffer until it completes (the buffer is moved into [`Conn`] and handed
//! back in the [`Event`]), so the kernel never writes into freed memory.
//! Short sends are resubmitted from where they stopped. Every wait has a
//! timeout: no completion within it is an error.

use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

const UD_SEND: u64 = 1;
const UD_RECV: u64 = 2;
const UD_CANCEL: u64 = 3;

/// Transport errors of one stream.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// io_uring could not be set up.
    #[error(
        "io_uring setup failed: {0}; needs Linux >= 5.11 with io_uring enabled (sysctl kernel.io_uring_disabled=0)"
    )]
    Setup(#[source] std::io::Error),
    /// A data socket could not be duplicated or configured.
    #[error("data socket {op} failed: {source}")]
    Socket {
        /// What was done ("clone").
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The data connection's session proof could not be exchanged.
    #[error(transparent)]
    Preamble(#[from] crate::transport::PreambleError),
    /// A send or receive failed (reset, broken pipe...).
    #[error("{op} failed: {source}")]
    Op {
        /// "send" or "recv".
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The peer closed the connection.
    #[error("peer closed the connection")]
    Closed,
    /// No completion within the timeout.
    #[error("no progress for {0:?} (peer dead or stalled)")]
    Timeout(Duration),
}

/// A completed operation, with its buffer given back.
#[derive(Debug)]
pub(crate) enum Event {
    /// The whole buffer was sent.
    Sent(Vec<u8>),
    /// `n` bytes were received at `buf[start..start + n]`.
    Received { buf: Vec<u8>, start: usize, n: usize },
}

struct InSend {
    buf: Vec<u8>,
    done: usize,
}

struct InRecv {
    buf: Vec<u8>,
    start: usize,
}

/// A TCP stream and its io_uring.
pub(crate) struct Conn {
    ring: IoUring,
    sock: TcpStream,
    timeout: Duration,
    send: Option<InSend>,
    recv: Option<InRecv>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("sock", &self.sock).finish()
    }
}

impl Conn {
    pub(crate) fn new(sock: TcpStream, timeout: Duration) -> Result<Conn, IoError> {
        let ring = IoUring::new(8).map_err(IoError::Setup)?;
        Ok(Conn {
            ring,
            sock,
            timeout,
            send: None,
            recv: None,
        })
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub(crate) fn send_busy(&self) -> bool {
        self.send.is_some()
    }

    /// Queues the rest of the send in flight. If the ring refuses it, the
    /// send is dropped (the kernel never saw its buffer), so the connection
    /// is not left "busy" with nothing in flight.
    fn push_send(&mut self) -> Result<(), IoError> {
        let r = self.try_push_send();
        if r.is_err() {
            self.send = None;
        }
        r
    }

    fn try_push_send(&mut self) -> Result<(), IoError> {
        let Some(s) = self.send.as_ref() else {
            return Ok(());
        };
        let rest = &s.buf[s.done..];
        let len = u32::try_from(rest.len()).expect("send buffers are far below 4 GiB");
        let sqe = opcode::Send::new(types::Fd(self.sock.as_raw_fd()), rest.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
            .build()
            .user_data(UD_SEND);
        // SAFETY: the buffer is owned by `self.send` and neither moved nor
        // freed until its completion is reaped (Drop waits or leaks it).
        unsafe { self.ring.submission().push(&sqe) }.map_err(|_| IoError::Op {
            op: "send",
            source: std::io::Error::other("submission queue full"),
        })
    }

    /// Starts sending all of `buf`. Only one send may be in flight.
    pub(crate) fn start_send(&mut self, buf: Vec<u8>) -> Result<(), IoError> {
        assert!(self.send.is_none(), "one send in flight at a time");
        assert!(!buf.is_empty());
        self.send = Some(InSend { buf, done: 0 });
        self.push_send()
    }

    /// Starts receiving into `buf[start..]`. Only one receive may be in flight.
    pub(crate) fn start_recv(&mut self, mut buf: Vec<u8>, start: usize) -> Result<(), IoError> {
        assert!(self.recv.is_none(), "one receive in flight at a time");
        assert!(start < buf.len(), "no room to receive");
        let len = u32::try_from(buf.len() - start).expect("receive buffers are far below 4 GiB");
        // SAFETY: `start < buf.len()`, so the pointer is inside the buffer.
        let ptr = unsafe { buf.as_mut_ptr().add(start) };
        let sqe = opcode::Recv::new(types::Fd(self.sock.as_raw_fd()), ptr, len)
            .build()
            .user_data(UD_RECV);
        self.recv = Some(InRecv { buf, start });
        // SAFETY: the buffer now lives in `self.recv` until the completion is
        // reaped; `ptr..ptr+len` lies inside it.
        let pushed = unsafe { self.ring.submission().push(&sqe) };
        if pushed.is_err() {
            // Never queued: the kernel has no reference to the buffer.
            self.recv = None;
            return Err(IoError::Op {
                op: "recv",
                source: std::io::Error::other("submission queue full"),
            });
        }
        Ok(())
    }

    /// Whether a receive is in flight.
    #[cfg(test)]
    pub(crate) fn recv_busy(&self) -> bool {
        self.recv.is_some()
    }

    /// Waits for the next completed operation, at most the timeout.
    pub(crate) fn wait(&mut self) -> Result<Event, IoError> {
        self.wait_for(self.timeout)
    }

    /// Waits for the next completed operation, at most `limit`.
    pub(crate) fn wait_for(&mut self, limit: Duration) -> Result<Event, IoError> {
        assert!(
            self.send.is_some() || self.recv.is_some(),
            "waiting with nothing in flight"
        );
        let deadline = Instant::now() + limit;
        loop {
            let next = self.ring.completion().next().map(|c| (c.user_data(), c.result()));
            if let Some((ud, res)) = next {
                if let Some(ev) = self.complete(ud, res)? {
                    return Ok(ev);
                }
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(IoError::Timeout(limit));
            }
            let ts = types::Timespec::from(left);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    return Err(IoError::Op {
                        op: "io_uring_enter",
                        source: e,
                    })
                }
            }
        }
    }

    fn complete(&mut self, ud: u64, res: i32) -> Result<Option<Event>, IoError> {
        match ud {
            UD_SEND => {
                if res < 0 {
                    self.send = None;
                    return Err(IoError::Op {
                        op: "send",
                        source: std::io::Error::from_raw_os_error(-res),
                    });
                }
                if res == 0 {
                    self.send = None;
                    return Err(IoError::Closed);
                }
                let s = self.send.as_mut().expect("send completion with a send in flight");
                s.done += res.unsigned_abs() as usize;
                if s.done < s.buf.len() {
                    self.push_send()?;
                    return Ok(None);
                }
                let s = self.send.take().expect("checked above");
                Ok(Some(Event::Sent(s.buf)))
            }
            UD_RECV => {
                let r = self.recv.take().expect("recv completion with a recv in flight");
                if res < 0 {
                    return Err(IoError::Op {
                        op: "recv",
                        source: std::io::Error::from_raw_os_error(-res),
                    });
                }
                if res == 0 {
                    return Err(IoError::Closed);
                }
                Ok(Some(Event::Received {
                    buf: r.buf,
                    start: r.start,
                    n: res.unsigned_abs() as usize,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Shuts the socket down both ways (wakes any operation in flight).
    pub(crate) fn shutdown(&self) {
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.send.is_none() && self.recv.is_none() {
            return;
        }
        // Operations in flight still own kernel references to their buffers:
        // cancel them and reap their completions before the buffers go.
        self.shutdown();
        for ud in [UD_SEND, UD_RECV] {
            let sqe = opcode::AsyncCancel::new(ud).build().user_data(UD_CANCEL);
            // SAFETY: a cancel request references no memory of ours.
            let _ = unsafe { self.ring.submission().push(&sqe) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while (self.send.is_some() || self.recv.is_some()) && Instant::now() < deadline {
            let ts = types::Timespec::from(Duration::from_millis(50));
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            while let Some(cqe) = self.ring.completion().next() {
                match cqe.user_data() {
                    UD_SEND => self.send = None,
                    UD_RECV => self.recv = None,
                    _ => {}
                }
            }
        }
        // Still not reaped: leak the buffers rather than free memory the
        // kernel may write to.
        if let Some(s) = self.send.take() {
            std::mem::forget(s.buf);
        }
        if let Some(r) = self.recv.take() {
            std::mem::forget(r.buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    use crate::testutil::tcp_pair as pair;

    /// False, with a loud SKIPPED line, where io_uring is unavailable.
    fn io_uring_here(test: &str) -> bool {
        match crate::probe::io_uring() {
            Ok(()) => true,
            Err(why) => {
                eprintln!("SKIPPED {test}: {why}");
                false
            }
        }
    }

    #[test]
    fn send_and_receive_through_io_uring() {
        if !io_uring_here("send_and_receive_through_io_uring") {
            return;
        }
        let (a, mut b) = pair();
        let mut c = Conn::new(a, Duration::from_secs(5)).unwrap();
        let data: Vec<u8> = (0..4_000_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; expect.len()];
            b.read_exact(&mut got).unwrap();
            assert_eq!(got, expect);
            b.write_all(b"pong").unwrap();
        });
        c.start_send(data).unwrap();
        c.start_recv(vec![0u8; 16], 0).unwrap();
        let mut sent = false;
        let mut got = Vec::new();
        while !sent || got.len() < 4 {
            match c.wait().unwrap() {
                Event::Sent(_) => sent = true,
                Event::Received { buf, start, n } => {
                    got.extend_from_slice(&buf[start..start + n]);
                    if got.len() < 4 {
                        c.start_recv(buf, 0).unwrap();
                    }
                }
            }
        }
        assert_eq!(got, b"pong");
        reader.join().unwrap();
    }

    #[test]
    fn silent_peer_times_out_and_closed_peer_is_reported() {
        if !io_uring_here("silent_peer_times_out_and_closed_peer_is_reported") {
            return;
        }
        let (a, b) = pair();
        let mut c = Conn::new(a, Duration::from_millis(100)).unwrap();
        c.start_recv(vec![0u8; 16], 0).unwrap();
        assert!(matches!(c.wait(), Err(IoError::Timeout(_))));
        drop(b);
        assert!(matches!(c.wait(), Err(IoError::Closed)));
    }

    /// Fills the submission queue with no-ops (never submitted), so the next
    /// push fails.
    fn fill_queue(c: &mut Conn) {
        let nop = opcode::Nop::new().build().user_data(UD_CANCEL);
        // SAFETY: a no-op references no memory.
        while unsafe { c.ring.submission().push(&nop) }.is_ok() {}
    }

    #[test]
    fn a_refused_push_leaves_the_connection_idle_not_busy() {
        if !io_uring_here("a_refused_push_leaves_the_connection_idle_not_busy") {
            return;
        }
        let (a, mut b) = pair();
        let mut c = Conn::new(a, Duration::from_secs(2)).unwrap();
        fill_queue(&mut c);
        assert!(c.start_send(vec![7u8; 100]).is_err());
        assert!(!c.send_busy(), "a send that was never queued left the connection busy");
        assert!(c.start_recv(vec![0u8; 100], 0).is_err());
        assert!(
            !c.recv_busy(),
            "a receive that was never queued left the connection busy"
        );
        // Drain the no-ops; the connection works again.
        c.ring.submitter().submit().unwrap();
        while c.ring.completion().next().is_some() {}
        c.start_send(vec![7u8; 100]).unwrap();
        assert!(matches!(c.wait().unwrap(), Event::Sent(_)));
        let mut got = [0u8; 100];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, [7u8; 100]);
    }

    #[test]
    fn drop_with_recv_in_flight_is_safe() {
        if !io_uring_here("drop_with_recv_in_flight_is_safe") {
            return;
        }
        let (a, _b) = pair();
        let mut c = Conn::new(a, Duration::from_secs(1)).unwrap();
        c.start_recv(vec![0u8; 1 << 16], 0).unwrap();
        drop(c);
    }
}
