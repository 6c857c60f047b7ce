//! What the io_uring options of issue 13 item 2 cost on one TCP stream, per
//! side, in CPU time per GB (`CLOCK_THREAD_CPUTIME_ID`) and GB/s: the
//! engine's way today (one 1 MiB `SEND` with `MSG_WAITALL` in flight, one
//! `RECV` into a 2.3 MiB buffer) against deeper send chains, `SEND_ZC` with
//! and without registered buffers, and a multishot `RECV` from a provided
//! buffer ring. For PERF.md; the payload is a fixed pattern (the cost of the
//! transport alone, not of sealing).
//!
//! ```text
//! cargo run --release --example uring_modes -- [OPTIONS]
//!   --send send:D | zc:D | zcfixed:D   D buffers of 1 MiB in flight as one linked chain (default send:1)
//!   --recv recv[:KIB] | multi:N:KIB    one receive into KIB KiB (default 2.3 MiB), or multishot into N buffers of KIB KiB
//!   --gib G --runs R                   GiB per run (default 2), runs (default 5)
//!   --listen ADDR | --connect ADDR     one side only (two network namespaces); default: both on loopback
//! ```
//! `scripts/uring-veth.sh` runs both sides in two namespaces joined by a veth pair.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

const BUF: usize = 1 << 20;
const RECV_BUF: usize = 2_400_000;
const BGID: u16 = 7;
/// `IORING_SEND_ZC_REPORT_USAGE` and `IORING_NOTIF_USAGE_ZC_COPIED` of the
/// kernel's io_uring UAPI (the crate keeps its `sys` module private).
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

#[derive(Clone, Copy, Debug)]
enum Send {
    Plain(usize),
    Zc { depth: usize, fixed: bool },
}

#[derive(Clone, Copy, Debug)]
enum Recv {
    /// One receive in flight into a buffer of this many bytes.
    Plain(usize),
    Multi {
        bufs: u16,
        kib: usize,
    },
}

#[derive(Debug)]
struct SideResult {
    cpu_s: f64,
    wall_s: f64,
    /// `SEND_ZC` notifications that said the kernel copied after all.
    zc_copied: u64,
    zc_notifs: u64,
}

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn die(what: &str, res: i32) -> std::io::Error {
    std::io::Error::other(format!("{what}: {}", std::io::Error::from_raw_os_error(-res)))
}

fn send_side(s: TcpStream, bytes: u64, mode: Send) -> std::io::Result<SideResult> {
    s.set_nodelay(true)?;
    let depth = match mode {
        Send::Plain(d) | Send::Zc { depth: d, .. } => d.max(1),
    };
    let mut ring = IoUring::new(64)?;
    let bufs: Vec<Vec<u8>> = (0..depth).map(|i| vec![0x5a ^ i.to_le_bytes()[0]; BUF]).collect();
    if let Send::Zc { fixed: true, .. } = mode {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut _,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: the buffers outlive the ring (dropped after it, below) and
        // are not moved.
        unsafe { ring.submitter().register_buffers(&iov) }?;
    }
    let fd = types::Fd(s.as_raw_fd());
    let (t0, wall) = (thread_cpu_s(), Instant::now());
    let (mut sent, mut zc_copied, mut zc_notifs) = (0u64, 0u64, 0u64);
    while sent < bytes {
        // One chain of `depth` sends, linked so they go out in order.
        let n = usize::try_from((bytes - sent).div_ceil(BUF as u64)).map_or(depth, |left| depth.min(left));
        for (i, b) in bufs.iter().enumerate().take(n) {
            let len = u32::try_from(BUF).expect("a 1 MiB buffer");
            let mut e = match mode {
                Send::Plain(_) => opcode::Send::new(fd, b.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                    .build(),
                Send::Zc { fixed, .. } => {
                    let z = opcode::SendZc::new(fd, b.as_ptr(), len)
                        .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                        .zc_flags(SEND_ZC_REPORT_USAGE);
                    if fixed {
                        z.buf_index(Some(u16::try_from(i).expect("depth fits the registered table")))
                    } else {
                        z
                    }
                    .build()
                }
            }
            .user_data(i as u64);
            if i + 1 < n {
                e = e.flags(squeue::Flags::IO_LINK);
            }
            // SAFETY: the buffer lives in `bufs` and is not touched until
            // both its completion and (for SEND_ZC) its notification arrive.
            unsafe { ring.submission().push(&e) }.map_err(|_| std::io::Error::other("sq full"))?;
        }
        // Plain sends: one completion each. SEND_ZC: a completion with MORE,
        // then a notification once the kernel is done with the buffer.
        let mut left = match mode {
            Send::Plain(_) => n,
            Send::Zc { .. } => 2 * n,
        };
        while left > 0 {
            ring.submit_and_wait(1)?;
            for c in ring.completion() {
                let (res, flags) = (c.result(), c.flags());
                if cqueue::notif(flags) {
                    zc_notifs += 1;
                    if res.cast_unsigned() & NOTIF_USAGE_ZC_COPIED != 0 {
                        zc_copied += 1;
                    }
                    left -= 1;
                    continue;
                }
                if res < 0 {
                    return Err(die("send", res));
                }
                if usize::try_from(res) != Ok(BUF) {
                    return Err(std::io::Error::other(format!("short send of {res} bytes")));
                }
                sent += BUF as u64;
                left -= 1;
                if matches!(mode, Send::Zc { .. }) && !cqueue::more(flags) {
                    left -= 1; // no notification follows
                }
            }
        }
    }
    let r = SideResult {
        cpu_s: thread_cpu_s() - t0,
        wall_s: wall.elapsed().as_secs_f64(),
        zc_copied,
        zc_notifs,
    };
    drop(ring);
    drop(bufs);
    Ok(r)
}

/// Anonymous page-aligned memory for the provided buffer ring.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> std::io::Result<Mapping> {
        // SAFETY: an anonymous private mapping; no existing memory involved.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn recv_side(s: TcpStream, bytes: u64, mode: Recv) -> std::io::Result<SideResult> {
    let mut ring = IoUring::new(64)?;
    let fd = types::Fd(s.as_raw_fd());
    let (t0, wall) = (thread_cpu_s(), Instant::now());
    let mut got = 0u64;
    match mode {
        Recv::Plain(size) => {
            let mut buf = vec![0u8; size];
            while got < bytes {
                let e = opcode::Recv::new(
                    fd,
                    buf.as_mut_ptr(),
                    u32::try_from(size).expect("receive buffer under 4 GiB"),
                )
                .build();
                // SAFETY: `buf` outlives the operation: we wait for it below.
                unsafe { ring.submission().push(&e) }.map_err(|_| std::io::Error::other("sq full"))?;
                ring.submit_and_wait(1)?;
                let c = ring
                    .completion()
                    .next()
                    .ok_or_else(|| std::io::Error::other("no cqe"))?;
                match c.result() {
                    r if r < 0 => return Err(die("recv", r)),
                    0 => break,
                    r => got += u64::from(r.cast_unsigned()),
                }
            }
        }
        Recv::Multi { bufs, kib } => {
            assert!(bufs.is_power_of_two(), "the buffer ring needs a power-of-two size");
            let size = kib << 10;
            let entries = Mapping::new(usize::from(bufs) * std::mem::size_of::<types::BufRingEntry>())?;
            let data = Mapping::new(usize::from(bufs) * size)?;
            let base = entries.ptr.cast::<types::BufRingEntry>();
            // SAFETY: `entries` is page-aligned, holds `bufs` entries and
            // lives until after the ring is unregistered (end of scope).
            unsafe {
                ring.submitter()
                    .register_buf_ring_with_flags(base as u64, bufs, BGID, 0)
            }?;
            let mask = bufs - 1;
            let mut tail: u16 = 0;
            let give = |bid: u16, tail: &mut u16| {
                // SAFETY: entry index `tail & mask` is inside the ring; the
                // kernel reads entries only up to the tail published below.
                unsafe {
                    let e = &mut *base.add(usize::from(*tail & mask));
                    e.set_addr(data.ptr.add(usize::from(bid) * size) as u64);
                    e.set_len(u32::try_from(size).expect("ring buffer under 4 GiB"));
                    e.set_bid(bid);
                }
                *tail = tail.wrapping_add(1);
            };
            let publish = |tail: u16| {
                // SAFETY: the tail field of a registered ring; a release store
                // makes the entries written before it visible to the kernel.
                unsafe {
                    let t = types::BufRingEntry::tail(base).cast_mut();
                    std::sync::atomic::AtomicU16::from_ptr(t).store(tail, std::sync::atomic::Ordering::Release);
                }
            };
            for bid in 0..bufs {
                give(bid, &mut tail);
            }
            publish(tail);
            let arm = |ring: &mut IoUring| -> std::io::Result<()> {
                let e = opcode::RecvMulti::new(fd, BGID).build();
                // SAFETY: the multishot receive writes only into provided
                // buffers, which live in `data` until the end of scope.
                unsafe { ring.submission().push(&e) }.map_err(|_| std::io::Error::other("sq full"))
            };
            arm(&mut ring)?;
            // Until the sender's close ends the request: the provided buffers
            // must outlive an armed multishot receive.
            let mut armed = true;
            while armed {
                ring.submit_and_wait(1)?;
                let cqes: Vec<(i32, u32)> = ring.completion().map(|c| (c.result(), c.flags())).collect();
                for (res, flags) in cqes {
                    if !cqueue::more(flags) {
                        armed = false;
                    }
                    if res == -libc::ENOBUFS {
                        continue;
                    }
                    if res < 0 {
                        return Err(die("recv multishot", res));
                    }
                    if res == 0 {
                        if got < bytes {
                            return Err(std::io::Error::other(format!(
                                "peer closed after {got} of {bytes} bytes"
                            )));
                        }
                        continue;
                    }
                    got += u64::from(res.cast_unsigned());
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        give(bid, &mut tail);
                    }
                }
                publish(tail);
                if !armed && got < bytes {
                    arm(&mut ring)?;
                    armed = true;
                }
            }
            ring.submitter().unregister_buf_ring(BGID)?;
        }
    }
    Ok(SideResult {
        cpu_s: thread_cpu_s() - t0,
        wall_s: wall.elapsed().as_secs_f64(),
        zc_copied: 0,
        zc_notifs: 0,
    })
}

fn parse_send(s: &str) -> Option<Send> {
    let (k, d) = s.split_once(':').unwrap_or((s, "1"));
    let depth: usize = d.parse().ok().filter(|d| (1..=32).contains(d))?;
    match k {
        "send" => Some(Send::Plain(depth)),
        "zc" => Some(Send::Zc { depth, fixed: false }),
        "zcfixed" => Some(Send::Zc { depth, fixed: true }),
        _ => None,
    }
}

fn parse_recv(s: &str) -> Option<Recv> {
    if s == "recv" {
        return Some(Recv::Plain(RECV_BUF));
    }
    if let Some(kib) = s.strip_prefix("recv:") {
        return kib
            .parse::<usize>()
            .ok()
            .filter(|k| *k > 0)
            .map(|k| Recv::Plain(k << 10));
    }
    let mut p = s.strip_prefix("multi:")?.split(':');
    Some(Recv::Multi {
        bufs: p.next()?.parse().ok()?,
        kib: p.next()?.parse().ok()?,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> std::io::Result<()> {
    let (mut send, mut recv, mut gib, mut runs) = (Send::Plain(1), Recv::Plain(RECV_BUF), 2u64, 5usize);
    let (mut listen, mut connect): (Option<SocketAddr>, Option<SocketAddr>) = (None, None);
    let mut args = std::env::args().skip(1);
    let bad = |what: &str| std::io::Error::other(format!("bad or missing value for {what} (see the file's header)"));
    while let Some(a) = args.next() {
        let v = args.next().ok_or_else(|| bad(&a))?;
        match a.as_str() {
            "--send" => send = parse_send(&v).ok_or_else(|| bad(&a))?,
            "--recv" => recv = parse_recv(&v).ok_or_else(|| bad(&a))?,
            "--gib" => gib = v.parse().map_err(|_| bad(&a))?,
            "--runs" => runs = v.parse::<usize>().map_err(|_| bad(&a))?.max(1),
            "--listen" => listen = Some(v.parse().map_err(|_| bad(&a))?),
            "--connect" => connect = Some(v.parse().map_err(|_| bad(&a))?),
            _ => return Err(bad(&a)),
        }
    }
    let bytes = gib << 30;
    let gb = bytes as f64 / 1e9;
    let (mut s_cpu, mut r_cpu, mut rate, mut copied) = (Vec::new(), Vec::new(), Vec::new(), (0, 0));
    for _ in 0..runs {
        if let Some(addr) = listen {
            let l = TcpListener::bind(addr)?;
            let (s, _) = l.accept()?;
            let r = recv_side(s, bytes, recv)?;
            r_cpu.push(r.cpu_s / gb);
            rate.push(gb / r.wall_s);
            continue;
        }
        if let Some(addr) = connect {
            let s = connect_retry(addr)?;
            let r = send_side(s, bytes, send)?;
            s_cpu.push(r.cpu_s / gb);
            rate.push(gb / r.wall_s);
            copied = (copied.0 + r.zc_copied, copied.1 + r.zc_notifs);
            // Let the receiver bind again for the next run.
            std::thread::sleep(std::time::Duration::from_millis(300));
            continue;
        }
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let rx = std::thread::spawn(move || recv_side(l.accept()?.0, bytes, recv));
        let sr = send_side(TcpStream::connect(addr)?, bytes, send)?;
        let rr = rx.join().map_err(|_| std::io::Error::other("receiver panicked"))??;
        s_cpu.push(sr.cpu_s / gb);
        r_cpu.push(rr.cpu_s / gb);
        rate.push(gb / sr.wall_s.max(rr.wall_s));
        copied = (copied.0 + sr.zc_copied, copied.1 + sr.zc_notifs);
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let fmt = |v: &mut Vec<f64>| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.3}", median(v))
        }
    };
    println!(
        "{cpu}: send {send:?} recv {recv:?}: {} GB/s, CPU s/GB send {} recv {}, SEND_ZC copied {}/{} ({runs} runs of {gib} GiB, medians)",
        fmt(&mut rate),
        fmt(&mut s_cpu),
        fmt(&mut r_cpu),
        copied.0,
        copied.1
    );
    Ok(())
}

fn connect_retry(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}
