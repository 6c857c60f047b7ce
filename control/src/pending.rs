//! Handshakes in progress on a daemon's control port, capped per peer and in
//! total, and shared fairly.
//!
//! Every connection holds a slot from accept until its first exchange is
//! over (a deadline bounds that: [`crate::tls::EXCHANGE_TIMEOUTS`]). One peer
//! holds at most `per_peer`. When all `total` slots are taken, a newcomer
//! does not simply get turned away (32 addresses × 8 slow handshakes filled
//! 256 slots and blocked every migration): it takes the oldest slot of the
//! peer holding the most, if that peer holds at least two more than the
//! newcomer would. Slots so tend to an equal share per peer, a few
//! addresses cannot starve the rest, and a peer that holds one slot is never
//! pushed out by one that holds more.
//!
//! A peer is its IPv4 address, or its IPv6 /64 (one host's share of
//! addresses; counting v6 addresses one by one would give a single host
//! billions of peers).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, TcpStream};
use std::sync::{Arc, Mutex};

/// Caps on handshakes in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    /// From one peer at most; more are closed at once.
    pub per_peer: usize,
    /// In all; when full, the busiest peer's oldest makes room (see the
    /// module documentation).
    pub total: usize,
}

impl Default for PendingLimits {
    fn default() -> Self {
        PendingLimits {
            per_peer: 8,
            total: 256,
        }
    }
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Crowded {
    /// Its peer holds `per_peer` already.
    #[error("{0} handshakes from this peer in progress already")]
    Peer(usize),
    /// Every slot is taken by peers holding no more than this one would.
    #[error("all {0} handshake slots are taken, shared evenly")]
    Total(usize),
}

/// The peer a connection from `ip` counts against.
pub fn peer_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Default)]
struct State {
    /// Per peer, its connections in arrival order: (slot id, a handle to
    /// close it by, if the descriptor could be duplicated).
    by_peer: HashMap<IpAddr, Vec<(u64, Option<TcpStream>)>>,
    total: usize,
    next_id: u64,
}

/// The handshakes in progress of one listener.
#[derive(Debug)]
pub struct Pending {
    limits: PendingLimits,
    state: Mutex<State>,
}

/// One connection's slot, released on drop.
#[derive(Debug)]
pub struct PendingSlot {
    pending: Arc<Pending>,
    peer: IpAddr,
    id: u64,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut st = self.pending.lock();
        // Gone already if it was evicted.
        if remove(&mut st, self.peer, self.id) {
            st.total -= 1;
        }
    }
}

fn remove(st: &mut State, peer: IpAddr, id: u64) -> bool {
    let Some(list) = st.by_peer.get_mut(&peer) else {
        return false;
    };
    let Some(i) = list.iter().position(|(x, _)| *x == id) else {
        return false;
    };
    list.remove(i);
    if list.is_empty() {
        st.by_peer.remove(&peer);
    }
    true
}

impl Pending {
    /// No handshakes yet.
    pub fn new(limits: PendingLimits) -> Arc<Pending> {
        Arc::new(Pending {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Handshakes in progress now.
    pub fn len(&self) -> usize {
        self.lock().total
    }

    /// Whether none is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A slot for `sock`, accepted from `ip`; making room by closing the
    /// busiest peer's oldest handshake when all are taken.
    pub fn admit(self: &Arc<Self>, sock: &TcpStream, ip: IpAddr) -> Result<PendingSlot, Crowded> {
        let peer = peer_of(ip);
        let handle = sock.try_clone().ok();
        let mut st = self.lock();
        let mine = st.by_peer.get(&peer).map_or(0, Vec::len);
        if mine >= self.limits.per_peer {
            return Err(Crowded::Peer(self.limits.per_peer));
        }
        if st.total >= self.limits.total {
            let busiest = st
                .by_peer
                .iter()
                .max_by_key(|(_, list)| list.len())
                .map(|(p, list)| (*p, list.len()));
            // The busiest peer's oldest handshake that can be closed.
            let evicted = busiest.filter(|&(_, held)| held >= mine + 2).and_then(|(victim, _)| {
                let list = st.by_peer.get_mut(&victim)?;
                let i = list.iter().position(|(_, h)| h.is_some())?;
                let (_, oldest) = list.remove(i);
                if let Some(s) = oldest {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                if list.is_empty() {
                    st.by_peer.remove(&victim);
                }
                Some(victim)
            });
            match evicted {
                Some(victim) => {
                    st.total -= 1;
                    tracing::debug!(%victim, "handshakes: all slots taken; the busiest peer's oldest closed");
                }
                None => return Err(Crowded::Total(self.limits.total)),
            }
        }
        let id = st.next_id;
        st.next_id += 1;
        st.total += 1;
        // Without a handle (out of descriptors) the slot still counts and
        // is released on drop; only closing it early is not possible.
        st.by_peer.entry(peer).or_default().push((id, handle));
        Ok(PendingSlot {
            pending: self.clone(),
            peer,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// A connected pair: (client end, server end).
    fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, s)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_peer_is_capped_and_a_full_table_makes_room_for_a_newcomer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = Pending::new(PendingLimits { per_peer: 3, total: 6 });
        let mut held = Vec::new();
        // Two attackers fill the table, three each.
        for a in ["10.0.0.1", "10.0.0.2"] {
            for _ in 0..3 {
                let (c, s) = pair(&l);
                held.push((c, p.admit(&s, ip(a)).unwrap(), s));
            }
        }
        let (_c, s) = pair(&l);
        assert_eq!(p.admit(&s, ip("10.0.0.1")).unwrap_err(), Crowded::Peer(3));
        // A newcomer gets in: an attacker's oldest is closed for it.
        let (_c2, s2) = pair(&l);
        let newcomer = p.admit(&s2, ip("192.0.2.7")).unwrap();
        assert_eq!(p.len(), 6);
        let mut buf = [0u8; 1];
        let mut evicted = 0;
        for (c, _, _) in &mut held {
            c.set_read_timeout(Some(std::time::Duration::from_millis(50))).unwrap();
            evicted += usize::from(matches!(c.read(&mut buf), Ok(0)));
        }
        assert_eq!(evicted, 1, "exactly one attacker connection was closed");
        // The attacker that lost one cannot take it back from the other
        // (3 is not 2 more than its 2), nor from the newcomer.
        let (_c3, s3) = pair(&l);
        let loser = if p.lock().by_peer[&ip("10.0.0.1")].len() == 2 {
            "10.0.0.1"
        } else {
            "10.0.0.2"
        };
        assert_eq!(p.admit(&s3, ip(loser)).unwrap_err(), Crowded::Total(6));
        // Slots come back when their handshakes end, evicted ones included.
        drop(newcomer);
        drop(held);
        assert!(p.is_empty());
    }

    #[test]
    fn ipv6_peers_are_counted_by_their_64_prefix() {
        assert_eq!(peer_of(ip("2001:db8:1:2:aaaa::1")), peer_of(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(peer_of(ip("2001:db8:1:2::1")), peer_of(ip("2001:db8:1:3::1")));
        assert_eq!(peer_of(ip("::ffff:10.1.2.3")), ip("10.1.2.3"));
    }
}
