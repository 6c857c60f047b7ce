//! What loopback TCP costs per GB on each side, in CPU time: one thread
//! sends 1 MiB writes, one receives into a 2.3 MiB buffer (the engine's
//! receive buffer size), each timing its own CPU use
//! (`CLOCK_THREAD_CPUTIME_ID`). For PERF.md's "way to 100GbE"; loopback has
//! no NIC, so this is the kernel's TCP/copy cost, not a wire's.
//!
//! `cargo run --release --example tcp_cost -- [GiB per run, default 4] [runs, default 5]`

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let gib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(4);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5).max(1);
    let bytes = gib << 30;
    let (mut send_s, mut recv_s, mut rate) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?;
        let rx = std::thread::spawn(move || -> std::io::Result<f64> {
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 2_400_000];
            let (t0, mut got) = (thread_cpu_s(), 0u64);
            while got < bytes {
                match s.read(&mut buf)? {
                    0 => break,
                    n => got += n as u64,
                }
            }
            Ok(thread_cpu_s() - t0)
        });
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let buf = vec![0x5au8; 1 << 20];
        let (t0, wall) = (thread_cpu_s(), Instant::now());
        let mut sent = 0u64;
        while sent < bytes {
            s.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        let cpu = thread_cpu_s() - t0;
        let recv = rx.join().map_err(|_| std::io::Error::other("receiver panicked"))??;
        let gb = bytes as f64 / 1e9;
        rate.push(gb / wall.elapsed().as_secs_f64());
        send_s.push(cpu / gb);
        recv_s.push(recv / gb);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let cpu = ferry_engine::probe::cpu_model();
    println!(
        "cpu: {cpu}; loopback TCP, {gib} GiB x {runs} runs, medians: {:.2} GB/s; CPU per GB: send {:.3} s, receive {:.3} s",
        median(&mut rate),
        median(&mut send_s),
        median(&mut recv_s)
    );
    Ok(())
}
