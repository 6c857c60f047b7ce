//! What this host can do: tests and the CLI ask before using a kernel
//! feature, and say plainly what is missing.

/// This host's CPU, as `/proc/cpuinfo` names it ("model name"), for every
/// figure a benchmark or a report prints (the CPU kind differs between
/// machines; compare figures only within one).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1).map(|m| m.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Whether an io_uring can be created here.
pub fn io_uring() -> Result<(), String> {
    io_uring::IoUring::new(2)
        .map(drop)
        .map_err(|e| format!("io_uring unavailable ({e}); needs Linux >= 5.11 and sysctl kernel.io_uring_disabled=0"))
}

/// Whether userfaultfd async write-protect + PAGEMAP_SCAN works here.
pub fn uffd_wp() -> Result<(), String> {
    let mem = crate::GuestMemory::new(crate::memory::PAGE_SIZE_U64).map_err(|e| e.to_string())?;
    let mut t = crate::dirty::UffdWpTracker::new(&mem).map_err(|e| e.to_string())?;
    crate::dirty::DirtyTracker::start(&mut t).map_err(|e| e.to_string())
}

/// Whether /dev/kvm can be opened for reading and writing.
pub fn kvm() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm unavailable ({e})"))
}

/// Whether the kernel says the system clock is synchronized (NTP or PTP
/// keeping it): `adjtimex` in read-only mode, `TIME_ERROR` meaning not.
pub fn clock_synchronized() -> Result<bool, String> {
    // SAFETY: `timex` is plain data; all-zero (`modes` 0) asks adjtimex to
    // read the clock's state without changing anything, and the kernel
    // writes only into the struct we own for the duration of the call.
    let mut t: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, exclusively borrowed timex (see above).
    let state = unsafe { libc::adjtimex(&mut t) };
    if state < 0 {
        return Err(format!("adjtimex failed: {}", std::io::Error::last_os_error()));
    }
    Ok(state != libc::TIME_ERROR)
}
