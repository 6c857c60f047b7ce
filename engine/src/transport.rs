//! Opening the data streams: N TCP connections from source to destination,
//! each with a deadline (no wait is unbounded).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

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
