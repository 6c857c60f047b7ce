//! The demo's checks of a migration's result: the destination's image
//! against the source's frozen one (synthetic guest: after replaying its
//! writes; KVM guest: the guest's own checksums and a byte compare).

use super::*;
/// What the checks after a successful migration found.
pub(super) struct Verification {
    pub(super) verified: bool,
    pub(super) summary: String,
    pub(super) writes_at_pause: u64,
    pub(super) heartbeat_before: u64,
    pub(super) heartbeat_first_after: u64,
    pub(super) heartbeat_after: u64,
    /// (source at pause, destination after resume), KVM guest only.
    pub(super) checksums: Option<(u64, u64)>,
    pub(super) guest_resumed: bool,
    pub(super) source_stopped: bool,
}

/// Synthetic guest: let the destination run a moment, pause it, replay its
/// writes onto the source's frozen image, and compare the two images byte
/// for byte (by SHA-256) and the guest states.
pub(super) fn verify_synthetic(
    src_guest: &mut SyntheticGuest,
    dst_guest: &mut SyntheticGuest,
    src_mem: &GuestMemory,
    dst_mem: &GuestMemory,
    dirty_rate: u64,
) -> Result<Verification, DemoError> {
    let setup = |e: &dyn std::fmt::Display| DemoError::Setup(e.to_string());
    let heartbeat_before = src_guest.heartbeat();
    let guest_resumed = if dirty_rate > 0 {
        dst_guest.wait_heartbeat(heartbeat_before, Duration::from_secs(5))
    } else {
        dst_guest.is_running()
    };
    dst_guest.pause().map_err(|e| setup(&e))?;
    let heartbeat_after = dst_guest.heartbeat();
    let source_stopped = !src_guest.is_running() && src_guest.heartbeat() == heartbeat_before;
    let frozen_state = src_guest.save_state().map_err(|e| setup(&e))?;
    let replayed_state = workload::replay(src_mem, &frozen_state, heartbeat_after).map_err(|e| setup(&e))?;
    let images_equal = src_mem.digest() == dst_mem.digest();
    let state_equal = dst_guest.save_state().map_err(|e| setup(&e))? == replayed_state;
    Ok(Verification {
        verified: images_equal && state_equal && source_stopped && guest_resumed,
        summary: format!(
            "destination image {} the source's frozen image (+{} replayed guest writes), guest state {}, source {}",
            if images_equal { "EQUALS" } else { "DIFFERS FROM" },
            heartbeat_after - heartbeat_before,
            if state_equal { "equal" } else { "DIFFERENT" },
            if source_stopped { "stopped" } else { "STILL RUNNING" },
        ),
        writes_at_pause: heartbeat_before,
        heartbeat_before,
        heartbeat_first_after: 0,
        heartbeat_after,
        checksums: None,
        guest_resumed,
        source_stopped,
    })
}

/// KVM guest: the guest's own checksum at the destination (its first act
/// after resuming) equals the one it computed when paused at the source;
/// with vCPU 0 stopped right after it, the destination's memory equals the
/// source's frozen memory byte for byte (but for the mailbox page the VMMs
/// and the checksum itself write); the heartbeat goes on from where it
/// stopped; the source VM never enters the guest again.
pub(super) fn verify_kvm(
    src_vm: &mut KvmVm,
    dst_vm: &mut KvmVm,
    src_mem: &GuestMemory,
    dst_mem: &GuestMemory,
    hot_set_bytes: u64,
) -> Result<Verification, DemoError> {
    let setup = |e: &dyn std::fmt::Display| DemoError::Setup(e.to_string());
    let heartbeat_before = src_vm.heartbeat_at_pause().unwrap_or(0);
    let writes_at_pause = src_vm.guest_writes();
    let runs_at_commit = src_vm.runs();
    let by_guest = src_vm.checksum_at_pause_value().is_some();
    let sum_src = src_vm
        .checksum_at_pause_value()
        .unwrap_or_else(|| src_vm.host_checksum());
    let sum_dst = dst_vm.wait_resume_checksum(Duration::from_secs(120)).ok();
    // vCPU 0 is parked right after that checksum: compare the memories.
    let dst_writes = dst_vm.guest_writes();
    let diffs = differing_words(src_mem, dst_mem, kvm::MAILBOX / ferry_engine::memory::PAGE_SIZE_U64, 8);
    let (images_equal, checksums_equal, memory_note) = if by_guest {
        // The guest stopped itself right after its checksum at the source
        // and does nothing before the next one here.
        let (eq, sums) = (diffs.is_empty(), Some(sum_src) == sum_dst);
        let note = format!(
            "guest's own checksum {} (source {:016x}, destination {:016x}); destination memory {} the source's frozen memory",
            if sums { "EQUAL" } else { "DIFFERENT" },
            sum_src,
            sum_dst.unwrap_or(0),
            if eq { "EQUALS" } else { "DIFFERS FROM" },
        );
        (eq, sums, note)
    } else {
        // Kicked at any instruction: after resuming, the guest may finish
        // the hot-set write it was in (and only that) before its checksum.
        let completed = dst_writes.saturating_sub(writes_at_pause);
        let hot = kvm::DATA_START..kvm::DATA_START + hot_set_bytes;
        // (Kicked between its store and its count, the write is in the
        // frozen memory and only the count happens here.)
        let consistent = completed <= 1 && diffs.len() as u64 <= completed && diffs.iter().all(|d| hot.contains(&d.0));
        let (sums, against) = if diffs.is_empty() {
            (Some(sum_src) == sum_dst, "the VMM's of the source's frozen memory")
        } else {
            (
                sum_dst == Some(dst_vm.host_checksum()),
                "the VMM's of that memory (the source's frozen memory differs by the finished write)",
            )
        };
        let note = format!(
            "vCPUs kicked at the source; destination memory {} the source's frozen memory but for {} hot-set write(s) the guest finished after resuming ({} counted by the guest); the guest's checksum at the destination ({:016x}) {} {against}",
            if consistent { "EQUALS" } else { "DIFFERS FROM" },
            diffs.len(),
            completed,
            sum_dst.unwrap_or(0),
            if sums { "EQUALS" } else { "DIFFERS FROM" },
        );
        (consistent, sums, note)
    };
    // Let it run on.
    dst_vm.checksum_at_resume = false;
    dst_vm.park_after_resume_checksum = false;
    dst_vm.resume().map_err(|e| setup(&e))?;
    let guest_resumed = dst_vm.wait_heartbeat(heartbeat_before, Duration::from_secs(5)).is_ok();
    std::thread::sleep(Duration::from_millis(20));
    let heartbeat_after = dst_vm.heartbeat();
    let heartbeat_first_after = dst_vm.first_heartbeat().unwrap_or(0);
    let runs_after = src_vm.shut_down();
    let source_stopped = runs_after == runs_at_commit && src_vm.heartbeat_at_pause() == Some(heartbeat_before);
    // The guest goes on where it stopped: its first beat here is the next
    // one, or, if it was stopped between counting a beat and reporting it,
    // that beat's report.
    let reported_at_source = src_vm.heartbeat();
    let continued = heartbeat_first_after == heartbeat_before + 1
        || (heartbeat_first_after == heartbeat_before && reported_at_source < heartbeat_before);
    Ok(Verification {
        verified: images_equal && checksums_equal && source_stopped && guest_resumed && continued,
        summary: format!(
            "{memory_note}; heartbeat {heartbeat_before} at the source, {heartbeat_first_after} first at the destination{}; source VM {}",
            if continued { " (went on where it stopped)" } else { " (DID NOT go on where it stopped)" },
            if source_stopped {
                "never ran again"
            } else {
                "RAN AGAIN"
            },
        ),
        writes_at_pause,
        heartbeat_before,
        heartbeat_first_after,
        heartbeat_after,
        checksums: sum_dst.map(|d| (sum_src, d)),
        guest_resumed,
        source_stopped,
    })
}

/// The 8-byte words (address, value in `a`, value in `b`) where `a` and
/// `b` differ, outside page `skip_page`; at most `cap` of them.
pub(super) fn differing_words(a: &GuestMemory, b: &GuestMemory, skip_page: u64, cap: usize) -> Vec<(u64, u64, u64)> {
    const CHUNK: usize = 1 << 20;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut out = Vec::new();
    let size = a.size_bytes().min(b.size_bytes());
    let skip = skip_page * ferry_engine::memory::PAGE_SIZE_U64..(skip_page + 1) * ferry_engine::memory::PAGE_SIZE_U64;
    let mut at = 0u64;
    while at < size && out.len() < cap {
        let n = CHUNK.min(usize::try_from(size - at).unwrap_or(CHUNK));
        a.read_into(at, &mut x[..n]);
        b.read_into(at, &mut y[..n]);
        if x[..n] != y[..n] {
            for (i, (p, q)) in x[..n].chunks_exact(8).zip(y[..n].chunks_exact(8)).enumerate() {
                let addr = at + 8 * i as u64;
                if p != q && !skip.contains(&addr) && out.len() < cap {
                    let w = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
                    out.push((addr, w(p), w(q)));
                }
            }
        }
        at += n as u64;
    }
    out
}
