//! Shared pieces of the end-to-end tests: host capability checks and a
//! frame-aware TCP relay that can attack the source→destination direction.
#![allow(dead_code)]

pub mod control;
pub mod procs;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry::demo::{DemoOptions, GuestKind, Interpose};
use ferry_engine::migrate::MigrationConfig;
use ferry_engine::wire::{Kind, Outer, HEADER_LEN};

/// Returns false, after printing a loud SKIPPED line naming what is
/// missing, unless every probe in `needs` (what, its probe's result) passed.
pub fn skip_unless(test: &str, needs: &[(&str, Result<(), String>)]) -> bool {
    for (what, r) in needs {
        if let Err(why) = r {
            eprintln!("SKIPPED {test}: {what} missing on this host: {why}");
            return false;
        }
    }
    true
}

/// Whether the program `name` runs here (`name --version` starts).
pub fn program(name: &str) -> Result<(), String> {
    std::process::Command::new(name)
        .arg("--version")
        .output()
        .map(|_| ())
        .map_err(|e| format!("`{name}` cannot be run: {e}"))
}

/// The data plane's needs: io_uring and userfaultfd write-protect.
pub fn host_ready(test: &str) -> bool {
    skip_unless(
        test,
        &[
            ("io_uring", ferry_engine::probe::io_uring()),
            ("userfaultfd write-protect", ferry_engine::probe::uffd_wp()),
        ],
    )
}

/// Small, fast migration settings for tests.
pub fn small(memory_bytes: u64, streams: u16) -> DemoOptions {
    DemoOptions {
        // The data-plane tests run on the synthetic guest (fast, and its
        // writes replay exactly); tests/kvm.rs runs the KVM guest.
        guest: GuestKind::Synthetic,
        memory_bytes,
        hot_set_bytes: 8 << 20,
        dirty_rate_pages_per_s: 20_000,
        zero_fraction: 0.0,
        prefault_destination: false,
        migration: MigrationConfig {
            streams,
            io_timeout: Duration::from_secs(5),
            ..MigrationConfig::default()
        },
        ..DemoOptions::default()
    }
}

/// Bytes of the data connection's session proof (stream id + HMAC).
pub const PREAMBLE_LEN: usize = 2 + 32;

/// What the relay does to the frames of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// Flip one bit in the payload of frame `n`.
    FlipBit,
    /// Send frame `n` twice.
    Replay,
    /// Send frame `n + 1` before frame `n`.
    Reorder,
    /// Send the first half of frame `n`, then close.
    Truncate,
    /// Close both directions before frame `n`.
    Cut,
    /// Stop forwarding anything from frame `n` on, keeping the connection open.
    Blackhole,
    /// Drop everything of stream `stream` and send a copy of another
    /// stream's frames on its connection instead (`frame` is ignored).
    Duplicate,
    /// Close both directions before the first frame of round `frame`.
    CutInRound,
    /// Close both directions before the device state (stream 0, in the
    /// final round, after the final round's pages).
    CutAtDeviceState,
    /// Destination to source: close both directions before the
    /// destination's Ready (its acknowledgement of the final round)
    /// reaches the source.
    CutBeforeReady,
    /// Drop the source's Commit frame (stream 0), forward the rest.
    DropCommit,
    /// Destination to source: drop the destination's Resumed frame
    /// (stream 0), forward the rest.
    DropResumed,
    /// A passive observer: forward everything, keeping a copy of every
    /// source→destination frame header in [`OBSERVED`].
    Observe,
}

/// The frame headers an [`Attack::Observe`] relay saw, as they travelled.
pub static OBSERVED: Mutex<Vec<[u8; HEADER_LEN]>> = Mutex::new(Vec::new());

/// Where the attack strikes: a stream (by the id in its frames) and the
/// index of a frame on it (0 is the Hello).
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub attack: Attack,
    pub stream: u16,
    pub frame: u64,
}

/// An `Interpose` hook that starts a relay in front of the destination,
/// attacking `target` (or just relaying when `None`).
pub fn relay(target: Option<Target>, streams: u16) -> Interpose {
    Arc::new(move |dest: SocketAddr| {
        let l = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let addr = l.local_addr().expect("relay addr");
        spawn_relay(l, dest, target, streams);
        addr
    })
}

/// Relays the first `streams` data connections to `l` on to `dest`,
/// attacking `target` (or just relaying when `None`).
pub fn spawn_relay(l: TcpListener, dest: SocketAddr, target: Option<Target>, streams: u16) {
    // For Attack::Duplicate: the victim connection's writer and the
    // frames another stream sent before the victim connected.
    let victim: Arc<Mutex<Copying>> = Arc::new(Mutex::new(Copying::default()));
    std::thread::spawn(move || {
        for _ in 0..streams {
            let Ok((src, _)) = l.accept() else { return };
            let Ok(dst) = TcpStream::connect(dest) else { return };
            for s in [&src, &dst] {
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                s.set_nodelay(true).ok();
            }
            let (src2, dst2) = (src.try_clone().expect("clone"), dst.try_clone().expect("clone"));
            // Destination → source: a plain copy, unless the attack is
            // on that direction.
            match target.map(|t| t.attack) {
                Some(a @ (Attack::CutBeforeReady | Attack::DropResumed)) => {
                    std::thread::spawn(move || backwards(dst2, src2, a));
                }
                _ => {
                    std::thread::spawn(move || pipe(dst2, src2));
                }
            }
            // Source → destination: frame by frame.
            let victim = victim.clone();
            std::thread::spawn(move || frames(src, dst, target, &victim));
        }
    });
}

/// A plain TCP relay from `l` to `dest` for control connections: the first
/// one always goes through; later ones only while `open` is set (otherwise
/// they are closed at once, as by a network partition).
pub fn control_relay(l: TcpListener, dest: SocketAddr, open: Arc<std::sync::atomic::AtomicBool>) {
    std::thread::spawn(move || {
        for (n, conn) in l.incoming().enumerate() {
            let Ok(src) = conn else { return };
            if n > 0 && !open.load(std::sync::atomic::Ordering::SeqCst) {
                drop(src);
                continue;
            }
            let Ok(dst) = TcpStream::connect(dest) else { return };
            let (src2, dst2) = (src.try_clone().expect("clone"), dst.try_clone().expect("clone"));
            std::thread::spawn(move || pipe(dst2, src2));
            std::thread::spawn(move || pipe(src, dst));
        }
    });
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Bytes of the destination's connection nonce, which precedes its frames.
pub const NONCE_LEN: usize = 32;

/// Destination to source, frame by frame: `CutBeforeReady` closes both
/// directions at the Ready, `DropResumed` drops the Resumed.
fn backwards(mut from: TcpStream, mut to: TcpStream, attack: Attack) {
    let mut nonce = [0u8; NONCE_LEN];
    if from.read_exact(&mut nonce).is_err() || to.write_all(&nonce).is_err() {
        return;
    }
    while let Some(f) = read_frame(&mut from) {
        let h = Outer::decode(f[..HEADER_LEN].try_into().expect("header")).expect("decoded once");
        if attack == Attack::DropResumed && h.kind == Kind::Resumed {
            continue;
        }
        if (attack == Attack::CutBeforeReady && h.kind == Kind::Ready) || to.write_all(&f).is_err() {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn read_frame(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut hb = [0u8; HEADER_LEN];
    from.read_exact(&mut hb).ok()?;
    // Only the clear fields: the relay has no keys (round, pages and zero
    // mask travel masked).
    let h = Outer::decode(&hb).ok()?;
    let mut f = vec![0u8; h.frame_len()];
    f[..HEADER_LEN].copy_from_slice(&hb);
    from.read_exact(&mut f[HEADER_LEN..]).ok()?;
    Some(f)
}

/// Attack::Duplicate's shared state: where the copy goes, and what to replay
/// there first.
#[derive(Default)]
pub struct Copying {
    to: Option<TcpStream>,
    history: Vec<Vec<u8>>,
}

fn frames(mut from: TcpStream, mut to: TcpStream, target: Option<Target>, victim: &Mutex<Copying>) {
    let close = |a: &TcpStream, b: &TcpStream| {
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    // The session proof (stream id + MAC) precedes the frames; it travels
    // with the Hello as the first unit (for Duplicate, it is copied too).
    let mut first = vec![0u8; PREAMBLE_LEN];
    if from.read_exact(&mut first).is_err() {
        close(&from, &to);
        return;
    }
    let Some(hello) = read_frame(&mut from) else {
        close(&from, &to);
        return;
    };
    let h = Outer::decode(hello[..HEADER_LEN].try_into().expect("header")).expect("decoded once");
    let stream = Some(h.stream.0);
    // The round a frame belongs to, as an observer can tell it: one more
    // than the RoundEnds seen on the stream.
    let mut round = 1u32;
    first.extend_from_slice(&hello);
    let mut next = Some(first);
    let mut index = 0u64;
    while let Some(mut f) = next.take().or_else(|| read_frame(&mut from)) {
        if let Some(t) = target.filter(|t| t.attack == Attack::Duplicate) {
            let mut c = victim.lock().expect("copy lock");
            if Some(t.stream) == stream {
                // The victim: its own frames are dropped; its connection to
                // the destination carries the other stream's frames instead.
                if index == 0 {
                    let mut v = to.try_clone().expect("clone");
                    for old in c.history.drain(..) {
                        let _ = v.write_all(&old);
                    }
                    c.to = Some(v);
                }
                index += 1;
                continue;
            }
            match c.to.as_mut() {
                Some(v) => {
                    let _ = v.write_all(&f);
                }
                None => c.history.push(f.clone()),
            }
        }
        // The first unit carries the session proof before its frame.
        let at = if index == 0 { PREAMBLE_LEN } else { 0 };
        let raw: [u8; HEADER_LEN] = f[at..at + HEADER_LEN].try_into().expect("header");
        let header = Outer::decode(&raw).expect("decoded once");
        if target.is_some_and(|t| t.attack == Attack::Observe) {
            OBSERVED.lock().expect("observer lock").push(raw);
        }
        let this_round = round;
        if header.kind == Kind::RoundEnd {
            round += 1;
        }
        let hit = target.filter(|t| {
            Some(t.stream) == stream
                && match t.attack {
                    Attack::CutInRound => {
                        this_round == u32::try_from(t.frame).unwrap_or(u32::MAX)
                            && matches!(header.kind, Kind::Pages | Kind::RoundEnd)
                    }
                    Attack::CutAtDeviceState => header.kind == Kind::DeviceState,
                    Attack::DropCommit => header.kind == Kind::Commit,
                    Attack::CutBeforeReady | Attack::DropResumed | Attack::Observe => false,
                    _ => t.frame == index,
                }
        });
        index += 1;
        let ok = match hit.map(|t| t.attack) {
            None | Some(Attack::Duplicate) => to.write_all(&f).is_ok(),
            Some(Attack::FlipBit) => {
                let at = HEADER_LEN + (f.len() - HEADER_LEN) / 2;
                f[at] ^= 0x10;
                to.write_all(&f).is_ok()
            }
            Some(Attack::Replay) => to.write_all(&f).is_ok() && to.write_all(&f).is_ok(),
            Some(Attack::Reorder) => match read_frame(&mut from) {
                Some(next) => {
                    index += 1;
                    to.write_all(&next).is_ok() && to.write_all(&f).is_ok()
                }
                None => false,
            },
            Some(Attack::Truncate) => {
                let _ = to.write_all(&f[..f.len() / 2]);
                false
            }
            Some(Attack::Cut | Attack::CutInRound | Attack::CutAtDeviceState) => false,
            Some(Attack::CutBeforeReady | Attack::DropResumed | Attack::Observe) => to.write_all(&f).is_ok(),
            Some(Attack::DropCommit) => true,
            Some(Attack::Blackhole) => {
                // Keep both sockets open, forward nothing, until the peers give up.
                let mut sink = vec![0u8; 64 << 10];
                while matches!(from.read(&mut sink), Ok(n) if n > 0) {}
                false
            }
        };
        if !ok {
            close(&from, &to);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
