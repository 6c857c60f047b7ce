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
const PROOF_LEN: usize = 2 + 32;

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
}

/// Source side: answers the destination's nonce with a proof that this
/// connection belongs to the session of `keys`, for stream `stream`.
pub fn prove_stream(
    sock: &mut TcpStream,
    keys: &SessionKeys,
    stream: u16,
    timeout: Duration,
) -> Result<(), PreambleError> {
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut nonce = [0u8; NONCE_LEN];
    sock.read_exact(&mut nonce)?;
    let tag = ring::hmac::sign(&keys.connection_key(), &proof_input(&nonce, stream));
    let mut out = [0u8; PROOF_LEN];
    out[..2].copy_from_slice(&stream.to_be_bytes());
    out[2..].copy_from_slice(tag.as_ref());
    sock.write_all(&out)?;
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    Ok(())
}

/// Destination side: sends a fresh nonce, checks the proof, and returns the
/// stream the connection carries. Nothing else is read before this passes.
pub fn verify_stream(sock: &mut TcpStream, keys: &SessionKeys, timeout: Duration) -> Result<u16, PreambleError> {
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| io::Error::other("system random generator failed"))?;
    sock.write_all(&nonce)?;
    let mut proof = [0u8; PROOF_LEN];
    sock.read_exact(&mut proof)?;
    let stream = u16::from_be_bytes([proof[0], proof[1]]);
    ring::hmac::verify(&keys.connection_key(), &proof_input(&nonce, stream), &proof[2..])
        .map_err(|_| PreambleError::BadProof(stream))?;
    sock.set_read_timeout(None)?;
    sock.set_write_timeout(None)?;
    Ok(stream)
}

/// Connects `n` streams to `addr`, one after another, each within `timeout`.
pub fn connect_streams(addr: SocketAddr, n: u16, timeout: Duration) -> io::Result<Vec<TcpStream>> {
    (0..n)
        .map(|_| {
            let s = TcpStream::connect_timeout(&addr, timeout)?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .collect()
}

/// Accepts `n` streams on `listener` within `timeout` in all.
pub fn accept_streams(listener: &TcpListener, n: u16, timeout: Duration) -> io::Result<Vec<TcpStream>> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true)?;
    let mut out = Vec::with_capacity(usize::from(n));
    while out.len() < usize::from(n) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                out.push(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    listener.set_nonblocking(false)?;
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("only {} of {n} data streams connected within {timeout:?}", out.len()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    listener.set_nonblocking(false)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MigrationId;

    use crate::testutil::tcp_pair as pair;

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
