//! A destination daemon's accept loop: handshakes in progress capped per
//! peer and in total, each on a thread of its own; a data listener only
//! for a request that passed every check.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::handshake::{Destination, DestinationSession};
use crate::pending::{Pending, PendingLimits};
use crate::refusal::Refusal;

/// A data listener on `ip`: on the first free port of `range`, or an
/// ephemeral one; and its port.
fn bind_data(ip: IpAddr, range: Option<(u16, u16)>) -> Result<(u16, std::net::TcpListener), Refusal> {
    let bound = |l: std::net::TcpListener| Some((l.local_addr().ok()?.port(), l));
    let Some((first, last)) = range else {
        return std::net::TcpListener::bind((ip, 0))
            .ok()
            .and_then(bound)
            .ok_or(Refusal::Internal("opening a data listener"));
    };
    let found = (first..=last).find_map(|port| std::net::TcpListener::bind((ip, port)).ok().and_then(bound));
    if found.is_none() {
        tracing::warn!(
            "receive: every data port {first}-{last} is in use: widen --data-ports or lower --max-concurrent"
        );
    }
    found.ok_or(Refusal::NoDataPort { first, last })
}

/// Limits of a destination's accept loop.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeLimits {
    /// Handshakes in progress, per peer and in all (shared fairly: see
    /// [`crate::pending`]).
    pub pending: PendingLimits,
    /// The ports data listeners may use (first, last), for firewalls; `None`
    /// takes an ephemeral port. A port is taken only by a request that
    /// passed every check; one that finds every port of the range taken is
    /// refused as busy (and logged), its ticket still unspent.
    pub data_ports: Option<(u16, u16)>,
}

/// Called with each admitted migration and the listener its data streams
/// will connect to (already announced in the acceptance).
pub type OnAdmitted = Arc<dyn Fn(DestinationSession, std::net::TcpListener) + Send + Sync>;

/// A destination daemon's accept loop: each control connection gets a
/// thread, and an admitted one a data listener; handshakes in progress are capped
/// per peer address and in total (a flood is refused at once, and a peer
/// that connects and stays silent holds only its own slots until the
/// handshake times out). Runs until `stop` is set.
pub fn serve_destination(
    listener: std::net::TcpListener,
    dest: Arc<Destination>,
    limits: ServeLimits,
    on_admitted: OnAdmitted,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let data_ip = listener.local_addr()?.ip();
    let pending = Pending::new(limits.pending);
    std::thread::Builder::new().name("ferry-receive".into()).spawn(move || {
        let mut backoff = crate::accept::AcceptBackoff::new();
        while !stop.load(Ordering::Relaxed) {
            let (sock, peer) = match listener.accept() {
                Ok(x) => {
                    backoff.succeeded("receive");
                    x
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    dest.flush_unauthenticated();
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(e) => {
                    std::thread::sleep(backoff.failed("receive", &e));
                    continue;
                }
            };
            // Released on drop: after the handshake, or if the thread never starts.
            let slot = match pending.admit(&sock, peer.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    tracing::debug!(%peer, "receive: connection closed: {why}");
                    dest.note_crowded(peer.ip(), &why);
                    continue; // `sock` dropped: closed at once
                }
            };
            let (dest, on_admitted) = (dest.clone(), on_admitted.clone());
            let spawned = std::thread::Builder::new().name("ferry-admit".into()).spawn(move || {
                let admitted = sock.set_nonblocking(false).ok().and_then(|()| {
                    let a = dest.admit_listening(sock, || bind_data(data_ip, limits.data_ports));
                    match &a {
                        Err(e @ crate::handshake::HandshakeError::Resolved { .. }) => {
                            tracing::info!(%peer, "receive: {e}");
                        }
                        Err(e) => tracing::info!(%peer, "receive: not admitted: {e}"),
                        Ok(_) => {}
                    }
                    a.ok()
                });
                // The handshake is over: free the slot before the transfer.
                drop(slot);
                if let Some((a, data)) = admitted {
                    on_admitted(a, data);
                }
            });
            if spawned.is_err() {
                tracing::error!("receive: cannot spawn a handshake thread");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn data_listeners_stay_inside_the_configured_port_range() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        // Find two free consecutive ports, hold the first: the second is taken.
        let (held, port) = (20_000u16..60_000)
            .find_map(|p| {
                let a = std::net::TcpListener::bind((ip, p)).ok()?;
                std::net::TcpListener::bind((ip, p + 1)).ok().map(|b| {
                    drop(b);
                    (a, p)
                })
            })
            .unwrap();
        let (got, l) = bind_data(ip, Some((port, port + 1))).unwrap();
        assert_eq!(l.local_addr().unwrap().port(), port + 1);
        assert_eq!(got, port + 1);
        // Both taken now: no listener, the request is refused as busy.
        let e = bind_data(ip, Some((port, port + 1))).unwrap_err();
        assert_eq!(e.code(), "no_data_port");
        assert_eq!(e.blame(), crate::refusal::Blame::Busy);
        drop((held, l));
        assert!(bind_data(ip, None).is_ok());
    }
}
