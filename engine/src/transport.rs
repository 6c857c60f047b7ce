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
    /// A proven connection for a stream that is already open.
    #[error("data connection for stream {0}: the stream is already open (a duplicated connection)")]
    Duplicate(u16),
    /// A proven connection for a stream the migration does not have.
    #[error("data connection for stream {stream}: the migration has {streams} streams")]
    OutOfRange {
        /// The stream named.
        stream: u16,
        /// Streams of the migration.
        streams: u16,
    },
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
        // Never zero: a zero socket timeout is refused by the kernel.
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
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
        let wait = match try_accept(listener, &mut backoff, &mut last_error) {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(OpenError::Listener)?;
                s.set_nodelay(true).map_err(OpenError::Listener)?;
                out.push(s);
                continue;
            }
            Err(wait) => wait,
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(OpenError::AcceptTimeout {
                got: u16::try_from(out.len()).unwrap_or(n),
                want: n,
                timeout,
                last_error,
                rejected: 0,
                last_rejection: None,
            });
        }
        std::thread::sleep(wait.min(deadline - now));
    }
    Ok(out)
}

/// One non-blocking accept on `listener`: a connection, or how long to wait
/// before the next try (an accept error is kept in `last_error`, and backed
/// off from).
fn try_accept(
    listener: &TcpListener,
    backoff: &mut ferry_control::accept::AcceptBackoff,
    last_error: &mut Option<io::Error>,
) -> Result<(TcpStream, SocketAddr), Duration> {
    match listener.accept() {
        Ok(x) => {
            backoff.succeeded("data streams");
            Ok(x)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(Duration::from_millis(1)),
        Err(e) => {
            let d = backoff.failed("data streams", &e);
            *last_error = Some(e);
            Err(d)
        }
    }
}

/// Most data connections whose session proof is checked at once; one more
/// closes the oldest (a flood of silent connections holds at most this many
/// threads and descriptors, and each only until newer ones push it out).
pub const MAX_PENDING_PROOFS: usize = 16;

/// A data connection that proved, under the session's key and a fresh
/// nonce, that it belongs to this migration; and the stream it carries.
/// Only [`accept_proven`] makes one.
#[derive(Debug)]
pub struct ProvenStream {
    stream: u16,
    sock: TcpStream,
}

impl ProvenStream {
    /// The stream the connection carries (below the stream count).
    pub fn stream(&self) -> u16 {
        self.stream
    }
    /// The connection, with its preamble consumed.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }
    /// The connection, with its preamble consumed.
    pub fn into_socket(self) -> TcpStream {
        self.sock
    }
}

/// What came of one data connection's preamble.
type Verdict = Result<(u16, TcpStream), PreambleError>;

/// Destination side: accepts connections on `listener` until `n` of them,
/// one per stream `0..n`, have proven they belong to the session of
/// `keys`, within `timeout` in all. A connection that fails its proof (junk,
/// another session, a stream out of range or already open) is dropped and
/// accepting goes on, so connections from anyone who can reach the port
/// cannot abort an admitted migration; they can only delay it to the
/// deadline. Proofs are checked concurrently, at most
/// [`MAX_PENDING_PROOFS`] at once, each within what is left of `timeout`;
/// one more evicts the oldest; when the streams are complete, the
/// connections still proving are closed.
///
/// `abandoned` is asked every [`ABANDON_CHECK_EVERY`] while waiting: when it
/// says the source is gone (its control connection closed: it refused this
/// destination's acceptance, or was cancelled), this stops at once instead
/// of holding the admission until the deadline.
pub fn accept_proven(
    listener: &TcpListener,
    keys: &SessionKeys,
    n: u16,
    timeout: Duration,
    abandoned: &dyn Fn() -> bool,
) -> Result<Vec<ProvenStream>, OpenError> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true).map_err(OpenError::Listener)?;
    let r = prove_until(listener, keys, n, deadline, timeout, abandoned);
    listener.set_nonblocking(false).map_err(OpenError::Listener)?;
    r
}

/// How often [`accept_proven`] asks whether the source is still there.
pub const ABANDON_CHECK_EVERY: Duration = Duration::from_millis(20);

/// Why [`prove_until`] stopped short.
enum Stop {
    Deadline,
    Abandoned,
}

fn prove_until(
    listener: &TcpListener,
    keys: &SessionKeys,
    n: u16,
    deadline: Instant,
    timeout: Duration,
    abandoned: &dyn Fn() -> bool,
) -> Result<Vec<ProvenStream>, OpenError> {
    let mut checked = Instant::now();
    let mut proven: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut rejected = Rejected::default();
    let mut last_error = None;
    let (tx, rx) = crossbeam_channel::bounded::<(u64, Verdict)>(MAX_PENDING_PROOFS);
    // The connections being proven, by a number of their own: a clone of
    // each, to close it when the streams are complete or the time is up.
    let mut pending: Vec<(u64, TcpStream)> = Vec::with_capacity(MAX_PENDING_PROOFS);
    let mut next_id = 0u64;
    let mut backoff = ferry_control::accept::AcceptBackoff::new();
    let r = std::thread::scope(|scope| {
        let r = loop {
            while let Ok((id, verdict)) = rx.try_recv() {
                let was_pending = pending.iter().position(|(p, _)| *p == id).map(|i| pending.remove(i));
                match verdict {
                    Ok((stream, sock)) => match proven.get_mut(usize::from(stream)) {
                        Some(slot @ None) => *slot = Some(sock),
                        Some(Some(_)) => rejected.note(PreambleError::Duplicate(stream)),
                        None => rejected.note(PreambleError::OutOfRange { stream, streams: n }),
                    },
                    // An evicted connection's failure was counted when
                    // it was evicted.
                    Err(e) if was_pending.is_some() => rejected.note(e),
                    Err(_) => {}
                }
            }
            if proven.iter().all(Option::is_some) {
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Stop::Deadline);
            }
            if now.duration_since(checked) >= ABANDON_CHECK_EVERY {
                checked = now;
                if abandoned() {
                    break Err(Stop::Abandoned);
                }
            }
            let wait = match try_accept(listener, &mut backoff, &mut last_error) {
                Ok((sock, peer)) => {
                    if pending.len() >= MAX_PENDING_PROOFS {
                        // The oldest has had the longest to answer; a real
                        // source answers within a round trip, so a flood of
                        // silent connections evicts itself, not the streams.
                        let (_, oldest) = pending.remove(0);
                        let _ = oldest.shutdown(std::net::Shutdown::Both);
                        tracing::debug!(%peer, "data streams: {MAX_PENDING_PROOFS} proofs pending; the oldest closed");
                        rejected.crowded += 1;
                    }
                    // Never zero: a zero socket timeout is refused by the kernel.
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(1));
                    let (id, tx) = (next_id, tx.clone());
                    next_id += 1;
                    let started = sock.try_clone().and_then(|clone| {
                        sock.set_nonblocking(false)?;
                        sock.set_nodelay(true)?;
                        std::thread::Builder::new()
                            .name("ferry-proof".into())
                            .spawn_scoped(scope, move || {
                                let mut sock = sock;
                                let v = verify_stream(&mut sock, keys, left).map(|stream| (stream, sock));
                                // Waits only while the accepting loop drains
                                // the channel; fails once it has ended.
                                let _ = tx.send((id, v));
                            })?;
                        Ok(clone)
                    });
                    match started {
                        Ok(clone) => pending.push((id, clone)),
                        Err(e) => tracing::warn!(%peer, "data streams: cannot check a connection's proof: {e}"),
                    }
                    continue;
                }
                Err(wait) => wait,
            };
            let now = Instant::now();
            if now >= deadline {
                break Err(Stop::Deadline);
            }
            std::thread::sleep(wait.min(deadline - now).min(ABANDON_CHECK_EVERY));
        };
        // Whatever is still proving is not needed (or too late): close it,
        // so its thread ends now instead of at its deadline (the scope
        // waits for it).
        for (_, sock) in &pending {
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        // Proofs that finish now find no receiver instead of a full channel.
        drop(rx);
        r
    });
    rejected.log();
    match r {
        Ok(()) => Ok((0u16..)
            .zip(proven)
            .filter_map(|(stream, sock)| sock.map(|sock| ProvenStream { stream, sock }))
            .collect()),
        Err(Stop::Abandoned) => Err(OpenError::Abandoned {
            got: u16::try_from(proven.iter().filter(|s| s.is_some()).count()).unwrap_or(n),
            want: n,
        }),
        Err(Stop::Deadline) => Err(OpenError::AcceptTimeout {
            got: u16::try_from(proven.iter().filter(|s| s.is_some()).count()).unwrap_or(n),
            want: n,
            timeout,
            last_error,
            rejected: rejected.count + rejected.crowded,
            last_rejection: rejected.last,
        }),
    }
}

/// Connections dropped before they carried a stream.
#[derive(Debug, Default)]
struct Rejected {
    /// Failed their proof (or were out of range, or a second copy).
    count: u64,
    /// Closed before they answered: too many proofs were pending and
    /// they were the oldest.
    crowded: u64,
    last: Option<PreambleError>,
}

impl Rejected {
    fn note(&mut self, e: PreambleError) {
        tracing::debug!("data streams: a connection dropped: {e}");
        self.count += 1;
        self.last = Some(e);
    }

    fn log(&self) {
        if self.count + self.crowded > 0 {
            tracing::warn!(
                failed_proof = self.count,
                evicted = self.crowded,
                "data streams: connections that did not belong to this migration were dropped{}",
                self.last.as_ref().map(|e| format!(" (last: {e})")).unwrap_or_default()
            );
        }
    }
}

fn rejection(rejected: u64, last: Option<&PreambleError>) -> String {
    match (rejected, last) {
        (0, _) => String::new(),
        (n, Some(e)) => format!("; {n} other connections were dropped (last: {e})"),
        (n, None) => format!("; {n} other connections were closed before they answered"),
    }
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
    #[error("only {got} of {want} data streams connected within {timeout:?}{}{}: the source stopped, or the network drops its connections", last_error.as_ref().map(|e| format!(" (last accept error: {e})")).unwrap_or_default(), rejection(*.rejected, .last_rejection.as_ref()))]
    AcceptTimeout {
        /// Streams accepted (and proven, where proofs are checked).
        got: u16,
        /// Streams wanted.
        want: u16,
        /// The deadline.
        timeout: Duration,
        /// The last accept error, if accepting failed (not just nothing came).
        last_error: Option<io::Error>,
        /// Connections dropped because they did not prove they belong to
        /// the migration (0 where proofs are not checked).
        rejected: u64,
        /// Why the last of them was dropped.
        last_rejection: Option<PreambleError>,
    },
    /// The source went away (closed its control connection) before its
    /// streams were all there.
    #[error("the source closed its control connection with {got} of {want} data streams connected: it refused this destination's acceptance (a pinned measurement, a bad signature) or was cancelled; see the source's log")]
    Abandoned {
        /// Streams accepted and proven by then.
        got: u16,
        /// Streams wanted.
        want: u16,
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

    /// Connects to `addr` and answers the nonce for `stream` under `keys`.
    fn prove_to(addr: SocketAddr, keys: &SessionKeys, stream: u16) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        prove_stream(&mut s, keys, stream, Duration::from_secs(10)).unwrap();
        s
    }

    /// Connects to `addr` and answers the nonce with junk of the right length.
    fn junk_to(addr: SocketAddr) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut nonce = [0u8; NONCE_LEN];
        s.read_exact(&mut nonce).unwrap();
        s.write_all(&[0x5a; PROOF_LEN]).unwrap();
        s
    }

    #[test]
    fn junk_silent_and_foreign_connections_do_not_stand_in_for_streams() {
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let other = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let k = keys.clone();
        let t = std::thread::spawn(move || {
            // More silent connections than proofs are checked at once: the
            // oldest are pushed out, the streams after them still get in.
            let silent: Vec<_> = (0..MAX_PENDING_PROOFS + 4)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            let junk = junk_to(addr);
            let foreign = std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let _ = prove_stream(&mut s, &other, 0, Duration::from_secs(10));
                s
            });
            let real = [prove_to(addr, &k, 1), prove_to(addr, &k, 0)];
            (silent, junk, foreign.join().unwrap(), real)
        });
        // Long enough that returning before it shows the silent ones were
        // closed rather than waited out.
        let timeout = Duration::from_secs(60);
        let started = Instant::now();
        let got = accept_proven(&l, &keys, 2, timeout, &|| false).unwrap();
        assert!(started.elapsed() < timeout / 2, "waited for the silent connections");
        assert_eq!(got.iter().map(ProvenStream::stream).collect::<Vec<_>>(), [0, 1]);
        let (silent, _junk, _foreign, _real) = t.join().unwrap();
        // The last silent connections were closed when the streams were
        // complete: each reads the nonce and then the end.
        let mut last = &silent[silent.len() - 1];
        let mut buf = [0u8; NONCE_LEN + 1];
        last.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut read = 0;
        loop {
            match last.read(&mut buf[read..]).unwrap() {
                0 => break,
                n => read += n,
            }
        }
        assert_eq!(read, NONCE_LEN, "a closed proof reads its nonce and the end");
    }

    #[test]
    fn a_source_that_goes_away_ends_the_wait_before_the_deadline() {
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let asked = std::sync::atomic::AtomicU32::new(0);
        // Gone at the third question: the wait ends with Abandoned, not
        // with the (hour-long) deadline's AcceptTimeout.
        let gone = || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 2;
        let e = accept_proven(&l, &keys, 2, Duration::from_secs(3600), &gone).unwrap_err();
        assert!(matches!(e, OpenError::Abandoned { got: 0, want: 2 }), "{e:?}");
        assert_eq!(asked.into_inner(), 3);
    }

    #[test]
    fn a_timeout_says_how_many_connections_were_dropped_and_why() {
        let keys = SessionKeys::test_only_unauthenticated(MigrationId(9)).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || [junk_to(addr), junk_to(addr)]);
        let e = accept_proven(&l, &keys, 1, Duration::from_millis(1500), &|| false).unwrap_err();
        drop(t.join().unwrap());
        assert!(
            matches!(
                e,
                OpenError::AcceptTimeout {
                    got: 0,
                    want: 1,
                    rejected: 2,
                    ..
                }
            ),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(text.contains("2 other connections were dropped"), "{text}");
        assert!(text.contains("failed its session proof"), "{text}");
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
