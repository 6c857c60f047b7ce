//! Opening the data streams: N TCP connections from source to destination,
//! each with a deadline (no wait is unbounded).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ring::rand::SecureRandom;

use crate::crypto::SessionKeys;

/// Preamble: the destination's fresh nonce, then the source's stream id and
/// HMAC-SHA256(connection key, "ferry v1 conn" || nonce || stream).
pub const NONCE_LEN: usize = 32;

fn proof_input(nonce: &[u8; NONCE_LEN], stream: u16) -> Vec<u8> {
    let mut m = Vec::with_capacity(13 + NONCE_LEN + 2);
    m.extend_from_slice(b"ferry v1 conn");
    m.extend_from_slice(nonce);
    m.extend_from_slice(&stream.to_be_bytes());
    m
}

/// Why a data connection was refused before any frame.
#[derive(Debug, thiserror::Error)]
pub enum PreambleError {
    /// The socket failed or timed out.
    #[error("data connection preamble: {0}")]
    Io(#[from] io::Error),
    /// The MAC did not verify: the connection does not belong to this
    /// control session (an older session, or no session at all).
    #[error("data connection for stream {0} failed its session proof: not from this control session")]
    BadProof(u16),
    /// An answer of the wrong length.
    #[error("data connection preamble: an answer of {0} bytes, not {PROOF_LEN}")]
    Short(usize),
}

/// Bytes of the source's answer: the stream id and the HMAC.
pub const PROOF_LEN: usize = 2 + 32;

/// The answer the source sends for `stream` on a connection that got
/// `nonce`.
pub fn proof(keys: &SessionKeys, nonce: &[u8; NONCE_LEN], stream: u16) -> [u8; PROOF_LEN] {
    let tag = ring::hmac::sign(&keys.connection_key(), &proof_input(nonce, stream));
    let mut out = [0u8; PROOF_LEN];
    out[..2].copy_from_slice(&stream.to_be_bytes());
    out[2..].copy_from_slice(tag.as_ref());
    out
}

/// Checks an answer to `nonce`: the stream the connection carries, or
/// [`PreambleError::BadProof`] (or [`PreambleError::Short`] for a wrong
/// length). Fuzzed by `fuzz/fuzz_targets/preamble.rs`.
pub fn check_proof(keys: &SessionKeys, nonce: &[u8; NONCE_LEN], answer: &[u8]) -> Result<u16, PreambleError> {
    let answer: &[u8; PROOF_LEN] = answer.try_into().map_err(|_| PreambleError::Short(answer.len()))?;
    let stream = u16::from_be_bytes([answer[0], answer[1]]);
    ring::hmac::verify(&keys.connection_key(), &proof_input(nonce, stream), &answer[2..])
        .map_err(|_| PreambleError::BadProof(stream))?;
    Ok(stream)
}

/// Reads exactly `buf.len()` bytes, each read waiting at most what is left
/// until `deadline` (a peer dripping bytes cannot stretch the preamble).
fn read_exact_by(sock: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    let mut at = 0;
    while at < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection preamble took too long",
            ));
        }
        sock.set_read_timeout(Some(left))?;
        match sock.read(&mut buf[at..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Source side: answers the destination's nonce with a proof that this
/// connection belongs to the session of `keys`, for stream `stream`; the
/// whole exchange within `timeout`.
pub fn prove_stream(
    sock: &mut TcpStream,
    keys: &SessionKeys,
    stream: u16,
    timeout: Duration,
) -> Result<(), PreambleError> {
    let deadline = Instant::now() + timeout;
    sock.set_write_timeout(Some(timeout))?;
    let mut nonce = [0u8; NONCE_LEN];
    read_exact_by(sock, &mut nonce, deadline)?;
    sock.write_all(&proof(keys, &nonce, stream))?;
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    Ok(())
}

/// Destination side: sends a fresh nonce, checks the proof, and returns the
/// stream the connection carries; the whole exchange within `timeout`.
/// Nothing else is read before this passes.
pub fn verify_stream(sock: &mut TcpStream, keys: &SessionKeys, timeout: Duration) -> Result<u16, PreambleError> {
    let deadline = Instant::now() + timeout;
    sock.set_write_timeout(Some(timeout))?;
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| io::Error::other("system random generator failed"))?;
    sock.write_all(&nonce)?;
    let mut answer = [0u8; PROOF_LEN];
    read_exact_by(sock, &mut answer, deadline)?;
    let stream = check_proof(keys, &nonce, &answer)?;
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    Ok(stream)
}

/// Connects `n` streams to `addr`, one after another, each within `timeout`.
pub fn connect_streams(addr: SocketAddr, n: u16, timeout: Duration) -> Result<Vec<TcpStream>, OpenError> {
    (0..n)
        .map(|stream| {
            let err = |source| OpenError::Connect {
                stream,
                streams: n,
                addr,
                source,
            };
            let s = TcpStream::connect_timeout(&addr, timeout).map_err(err)?;
            s.set_nodelay(true).map_err(err)?;
            Ok(s)
        })
        .collect()
}

/// Accepts `n` streams on `listener` within `timeout` in all. Accept errors
/// (out of descriptors, say) are retried with a backoff until the deadline,
/// never in a tight loop.
pub fn accept_streams(listener: &TcpListener, n: u16, timeout: Duration) -> Result<Vec<TcpStream>, OpenError> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(OpenError::Listener)?;
    let r = accept_until(listener, n, deadline, timeout);
    listener.set_nonblocking(false).map_err(OpenError::Listener)?;
    r
}

fn accept_until(
    listener: &TcpListener,
    n: u16,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<TcpStream>, OpenError> {
    let mut out = Vec::with_capacity(usize::from(n));
    let mut backoff = ferry_control::accept::AcceptBackoff::new();
    let mut last_error = None;
    while out.len() < usize::from(n) {
        let wait = match listener.accept() {
            Ok((s, _)) => {
                backoff.succeeded("data streams");
                s.set_nonblocking(false).map_err(OpenError::Listener)?;
                s.set_nodelay(true).map_err(OpenError::Listener)?;
                out.push(s);
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Duration::from_millis(1),
            Err(e) => {
                let d = backoff.failed("data streams", &e);
                last_error = Some(e);
                d
            }
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(OpenError::AcceptTimeout {
                got: u16::try_from(out.len()).unwrap_or(n),
                want: n,
                timeout,
                last_error,
            });
        }
        std::thread::sleep(wait.min(deadline - now));
    }
    Ok(out)
}

/// Why the data streams could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The source could not connect a stream.
    #[error("connecting data stream {stream} (of {streams}) to {addr}: {source}; check that the destination's data port is reachable (firewall, route) and that it still waits for this migration")]
    Connect {
        /// The stream (0-based).
        stream: u16,
        /// Streams wanted.
        streams: u16,
        /// Where.
        addr: SocketAddr,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The destination did not get every stream in time.
    #[error("only {got} of {want} data streams connected within {timeout:?}{}: the source stopped, or the network drops its connections", last_error.as_ref().map(|e| format!(" (last accept error: {e})")).unwrap_or_default())]
    AcceptTimeout {
        /// Streams accepted.
        got: u16,
        /// Streams wanted.
        want: u16,
        /// The deadline.
        timeout: Duration,
        /// The last accept error, if accepting failed (not just nothing came).
        last_error: Option<io::Error>,
    },
    /// The listener or an accepted socket could not be configured.
    #[error("configuring a data socket: {0}")]
    Listener(#[source] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MigrationId;

    use crate::testutil::tcp_pair as pair;

    /// A port on loopback with nothing listening.
    fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    }

    #[test]
    fn a_refused_connect_names_the_stream_and_the_address_not_io_uring() {
        let addr = closed_port();
        let e = connect_streams(addr, 2, Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(
                e,
                OpenError::Connect {
                    stream: 0,
                    streams: 2,
                    ..
                }
            ),
            "{e:?}"
        );
        let text = crate::migrate::MigrateError::from(e).to_string();
        assert!(text.contains("connecting data stream 0 (of 2)"), "{text}");
        assert!(text.contains(&addr.to_string()), "{text}");
        assert!(
            !text.contains("io_uring"),
            "sends the operator to the wrong fix: {text}"
        );
    }

    #[test]
    fn accepting_too_few_streams_times_out_with_the_count() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let _one = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let e = accept_streams(&l, 2, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, OpenError::AcceptTimeout { got: 1, want: 2, .. }), "{e:?}");
        assert!(e.to_string().contains("only 1 of 2 data streams"), "{e}");
        assert!(!e.to_string().contains("io_uring"), "{e}");
    }

    #[test]
    fn only_the_right_mac_for_the_nonce_passes() {
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let other = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let nonce = [5u8; NONCE_LEN];
        let good = proof(&keys, &nonce, 3);
        assert_eq!(check_proof(&keys, &nonce, &good).unwrap(), 3);
        assert!(matches!(
            check_proof(&other, &nonce, &good),
            Err(PreambleError::BadProof(3))
        ));
        assert!(matches!(
            check_proof(&keys, &[6u8; NONCE_LEN], &good),
            Err(PreambleError::BadProof(3))
        ));
        let mut renamed = good;
        renamed[1] = 4;
        assert!(matches!(
            check_proof(&keys, &nonce, &renamed),
            Err(PreambleError::BadProof(4))
        ));
        assert!(matches!(
            check_proof(&keys, &nonce, &good[..10]),
            Err(PreambleError::Short(10))
        ));
    }

    #[test]
    fn a_dripped_preamble_is_cut_at_its_deadline() {
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let (mut src, mut dst) = pair();
        let t = std::thread::spawn(move || {
            let mut nonce = [0u8; NONCE_LEN];
            src.read_exact(&mut nonce).unwrap();
            // One byte every 100 ms: each read of the other side gets one in
            // time, the whole answer would take 3.4 s.
            for _ in 0..PROOF_LEN {
                if src.write_all(&[0]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let started = Instant::now();
        let e = verify_stream(&mut dst, &keys, Duration::from_millis(500)).unwrap_err();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "the preamble took {took:?}: {e}");
        drop(dst);
        t.join().unwrap();
    }

    #[test]
    fn a_failed_preamble_keeps_its_cause() {
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let (mut src, dst) = pair();
        drop(dst);
        let e = prove_stream(&mut src, &keys, 0, Duration::from_secs(2)).unwrap_err();
        let e = crate::migrate::MigrateError::Setup {
            stream: 0,
            source: crate::io::IoError::Preamble(e),
        };
        // The chain reaches the OS error (it used to end in a string).
        let mut cause: &dyn std::error::Error = &e;
        let mut found = false;
        while let Some(next) = cause.source() {
            found |= next.downcast_ref::<io::Error>().is_some();
            cause = next;
        }
        assert!(found, "no io::Error in the cause chain of {e}");
    }

    #[test]
    fn a_connection_proves_its_session_and_stream() {
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let (mut src, mut dst) = pair();
        let k = keys.clone();
        let t = std::thread::spawn(move || prove_stream(&mut src, &k, 3, Duration::from_secs(2)));
        assert_eq!(verify_stream(&mut dst, &keys, Duration::from_secs(2)).unwrap(), 3);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn a_connection_from_an_older_session_is_refused() {
        let old = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let new = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let (mut src, mut dst) = pair();
        let t = std::thread::spawn(move || prove_stream(&mut src, &old, 0, Duration::from_secs(2)));
        assert!(matches!(
            verify_stream(&mut dst, &new, Duration::from_secs(2)),
            Err(PreambleError::BadProof(0))
        ));
        let _ = t.join();
    }

    #[test]
    fn a_silent_connection_times_out() {
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let (_src, mut dst) = pair();
        assert!(matches!(
            verify_stream(&mut dst, &keys, Duration::from_millis(100)),
            Err(PreambleError::Io(_))
        ));
    }
}
