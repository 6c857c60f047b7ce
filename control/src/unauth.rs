//! Connections that never authenticated (their TLS handshake failed: junk,
//! silence, a certificate from another CA, a plain port scan) are counted,
//! not audited one by one: a single junk client made ~450 signed, fsync'd
//! audit entries a second. They are written as one `unauthenticated` summary
//! per [`SUMMARY_EVERY`] (with the connections closed unheard because the
//! handshake slots were full, class `crowded`): how many, why (by class), from where (the
//! busiest [`MAX_PEERS_LISTED`] addresses), and the last reason. Refusals of
//! authenticated peers are still audited one by one by their callers.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::tls::TlsError;

/// The longest a window of failures waits for its summary.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// Addresses named in one summary (the others are counted together).
pub const MAX_PEERS_LISTED: usize = 16;

/// Distinct addresses tracked per window; more are counted as `other`.
const MAX_PEERS_TRACKED: usize = 1024;

/// Characters kept of the last failure's reason.
const REASON_CHARS: usize = 200;

/// The failed handshakes of one window.
#[derive(Debug, Default)]
struct Window {
    since_unix_s: u64,
    count: u64,
    by_class: BTreeMap<&'static str, u64>,
    by_peer: BTreeMap<IpAddr, u64>,
    other_peers: u64,
    last_reason: String,
}

/// Failed, unauthenticated handshakes, summarised.
#[derive(Debug)]
pub struct UnauthenticatedTally {
    window: Mutex<(Window, Instant)>,
    every: Duration,
}

impl Default for UnauthenticatedTally {
    fn default() -> Self {
        Self::with_interval(SUMMARY_EVERY)
    }
}

/// The class of a failed handshake, for the summary.
pub fn class(e: &TlsError) -> &'static str {
    use std::io::ErrorKind as K;
    match e {
        TlsError::Io(io) => match io.kind() {
            K::TimedOut | K::WouldBlock => "timeout",
            K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => "closed",
            // rustls reports protocol and certificate failures as
            // InvalidData.
            K::InvalidData => "rejected",
            _ => "io",
        },
        TlsError::Malformed(_) => "malformed",
        TlsError::Config(_) => "config",
    }
}

impl UnauthenticatedTally {
    /// A tally that summarises at most every `every`.
    pub fn with_interval(every: Duration) -> Self {
        UnauthenticatedTally {
            window: Mutex::new((Window::default(), Instant::now())),
            every,
        }
    }

    /// Counts one failed handshake from `peer`; returns a summary to audit
    /// when the window is due.
    pub fn note(&self, peer: Option<IpAddr>, e: &TlsError) -> Option<serde_json::Value> {
        self.note_as(peer, class(e), &e.to_string())
    }

    /// Counts one connection from `peer` closed before its handshake
    /// because the handshake slots were full (`why`: which cap).
    pub fn note_crowded(&self, peer: IpAddr, why: &crate::pending::Crowded) -> Option<serde_json::Value> {
        self.note_as(Some(peer), "crowded", &format!("closed before its handshake: {why}"))
    }

    fn note_as(&self, peer: Option<IpAddr>, class: &'static str, reason: &str) -> Option<serde_json::Value> {
        let mut g = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (w, _) = &mut *g;
        if w.count == 0 {
            w.since_unix_s = crate::now_unix_s();
        }
        w.count += 1;
        *w.by_class.entry(class).or_default() += 1;
        match peer {
            Some(ip) if w.by_peer.len() < MAX_PEERS_TRACKED || w.by_peer.contains_key(&ip) => {
                *w.by_peer.entry(ip).or_default() += 1;
            }
            _ => w.other_peers += 1,
        }
        w.last_reason = reason.chars().take(REASON_CHARS).collect();
        Self::due(&mut g, self.every)
    }

    /// The summary of the window so far if it is due (its interval has
    /// passed and it counted something).
    pub fn due_summary(&self) -> Option<serde_json::Value> {
        let mut g = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::due(&mut g, self.every)
    }

    /// The summary of the window so far, due or not (before another audit
    /// entry, so the log stays in time order; at shutdown).
    pub fn take(&self) -> Option<serde_json::Value> {
        let mut g = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Self::due(&mut g, Duration::ZERO)
    }

    fn due(g: &mut (Window, Instant), every: Duration) -> Option<serde_json::Value> {
        let (w, started) = g;
        if w.count == 0 || started.elapsed() < every {
            return None;
        }
        let w = std::mem::take(w);
        *started = Instant::now();
        let mut peers: Vec<(IpAddr, u64)> = w.by_peer.into_iter().collect();
        peers.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let unlisted: u64 = peers.iter().skip(MAX_PEERS_LISTED).map(|p| p.1).sum::<u64>() + w.other_peers;
        let listed: serde_json::Map<String, serde_json::Value> = peers
            .into_iter()
            .take(MAX_PEERS_LISTED)
            .map(|(ip, n)| (ip.to_string(), n.into()))
            .collect();
        Some(serde_json::json!({
            "count": w.count,
            "since": w.since_unix_s,
            "until": crate::now_unix_s(),
            "by_class": w.by_class,
            "peers": listed,
            "other_peers": unlisted,
            "last_reason": w.last_reason,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eof() -> TlsError {
        TlsError::Io(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof"))
    }

    #[test]
    fn failures_become_one_summary_per_window() {
        let t = UnauthenticatedTally::with_interval(Duration::from_secs(3600));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..500 {
            assert!(t.note(Some(a), &eof()).is_none(), "a summary before its window ended");
        }
        let timeout = TlsError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "slow"));
        assert!(t.note(None, &timeout).is_none());
        let s = t.take().unwrap();
        assert_eq!(s["count"], 501);
        assert_eq!(s["by_class"]["closed"], 500);
        assert_eq!(s["by_class"]["timeout"], 1);
        assert_eq!(s["peers"]["10.0.0.1"], 500);
        assert_eq!(s["other_peers"], 1);
        assert!(s["last_reason"].as_str().unwrap().contains("slow"));
        // Taken: nothing left until the next failure.
        assert!(t.take().is_none());
    }

    #[test]
    fn a_due_window_is_summarised_by_the_failure_that_ends_it() {
        let t = UnauthenticatedTally::with_interval(Duration::ZERO);
        let s = t.note(None, &eof()).unwrap();
        assert_eq!(s["count"], 1);
        assert!(t.due_summary().is_none());
    }

    #[test]
    fn many_addresses_are_bounded_in_memory_and_in_the_entry() {
        let t = UnauthenticatedTally::with_interval(Duration::from_secs(3600));
        for i in 0..2000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            t.note(Some(ip), &eof());
        }
        let s = t.take().unwrap();
        assert_eq!(s["count"], 2000);
        assert_eq!(s["peers"].as_object().unwrap().len(), MAX_PEERS_LISTED);
        assert_eq!(s["other_peers"], 2000 - MAX_PEERS_LISTED as u64);
    }
}
