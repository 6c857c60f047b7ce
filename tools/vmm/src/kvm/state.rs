//! The vCPU state blob that crosses the wire at the switchover: every
//! vCPU's registers, system registers, FPU/XSAVE, XCRs, pending events,
//! MP state, a fixed set of MSRs (the TSC among them) and its CPUID table.
//!
//! Format (little-endian): `b"FERRYKV1"`, the TSC frequency in kHz (u32) and
//! the vCPU count (u32); then for each vCPU a list of sections, each a tag
//! (u32), a length (u32) and the bytes of the kernel's struct as the
//! kvm-bindings type lays it out; a vCPU's list ends with tag 0. Decoding
//! checks every length against the struct it fills, so a truncated or
//! foreign blob is an error, never a half-loaded vCPU.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use zerocopy::{FromBytes, IntoBytes};

use ferry_engine::guest::GuestError;

const MAGIC: &[u8; 8] = b"FERRYKV1";

const END: u32 = 0;
const REGS: u32 = 1;
const SREGS: u32 = 2;
const FPU: u32 = 3;
const XSAVE: u32 = 4;
const XCRS: u32 = 5;
const EVENTS: u32 = 6;
const MP_STATE: u32 = 7;
const MSRS: u32 = 8;
const CPUID: u32 = 9;

/// Most CPUID entries or MSRs one vCPU may carry (the kernel's own limit
/// for CPUID is 256).
const MAX_ENTRIES: usize = 256;

/// One vCPU's state, as KVM reports it.
#[derive(Clone, Default)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// The 4 KiB XSAVE area (`kvm_xsave::region`).
    pub xsave: Option<[u32; 1024]>,
    /// Extended control registers, where the host has them.
    pub xcrs: Option<kvm_xcrs>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
    /// Run state (runnable, halted, ...).
    pub mp_state: kvm_mp_state,
    /// The model-specific registers the VMM saves.
    pub msrs: Vec<kvm_msr_entry>,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("cpuid", &self.cpuid.len())
            .finish_non_exhaustive()
    }
}

/// The whole VM's vCPU state.
#[derive(Debug, Clone, Default)]
pub struct VmState {
    /// The guest's TSC frequency.
    pub tsc_khz: u32,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
}

fn section(out: &mut Vec<u8>, tag: u32, bytes: &[u8]) {
    out.extend_from_slice(&tag.to_le_bytes());
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

impl VmState {
    /// The state as the blob the migration carries.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.vcpus.len() * 8192);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.tsc_khz.to_le_bytes());
        let n = u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&n.to_le_bytes());
        for v in &self.vcpus {
            section(&mut out, REGS, v.regs.as_bytes());
            section(&mut out, SREGS, v.sregs.as_bytes());
            section(&mut out, FPU, &fpu_bytes(&v.fpu));
            if let Some(x) = &v.xsave {
                section(&mut out, XSAVE, x.as_bytes());
            }
            if let Some(x) = &v.xcrs {
                section(&mut out, XCRS, x.as_bytes());
            }
            section(&mut out, EVENTS, v.events.as_bytes());
            section(&mut out, MP_STATE, v.mp_state.as_bytes());
            section(&mut out, MSRS, v.msrs.as_slice().as_bytes());
            section(&mut out, CPUID, v.cpuid.as_slice().as_bytes());
            section(&mut out, END, &[]);
        }
        out
    }

    /// Parses a blob from [`encode`](Self::encode). Any input — truncated,
    /// oversized, unknown sections — gives `GuestError::BadState`, never a
    /// panic (fuzzed by `fuzz/fuzz_targets/vm_state.rs`).
    pub fn decode(blob: &[u8]) -> Result<VmState, GuestError> {
        let bad = |m: String| GuestError::BadState(m);
        let mut r = Reader { b: blob, at: 0 };
        if r.take(8)? != MAGIC {
            return Err(bad("not a ferry KVM vCPU state (bad magic)".into()));
        }
        let tsc_khz = r.u32()?;
        let n = r.u32()?;
        if n == 0 || n > super::MAX_VCPUS {
            return Err(bad(format!("{n} vCPUs in the state: must be 1..={}", super::MAX_VCPUS)));
        }
        let mut vcpus = Vec::new();
        for i in 0..n {
            let mut v = VcpuState::default();
            let mut seen = 0u32;
            loop {
                let tag = r.u32()?;
                let len = crate::usize_from(u64::from(r.u32()?));
                let bytes = r.take(len)?;
                if tag == END {
                    break;
                }
                if tag > CPUID || seen & (1 << tag) != 0 {
                    return Err(bad(format!("vCPU {i}: unknown or repeated section {tag}")));
                }
                seen |= 1 << tag;
                let exact = |what: &str| bad(format!("vCPU {i}: {what} section has the wrong size ({len} bytes)"));
                match tag {
                    REGS => v.regs = kvm_regs::read_from_bytes(bytes).map_err(|_| exact("regs"))?,
                    SREGS => v.sregs = kvm_sregs::read_from_bytes(bytes).map_err(|_| exact("sregs"))?,
                    FPU => v.fpu = fpu_from(bytes).ok_or_else(|| exact("fpu"))?,
                    XSAVE => {
                        v.xsave = Some(<[u32; 1024]>::read_from_bytes(bytes).map_err(|_| exact("xsave"))?);
                    }
                    XCRS => v.xcrs = Some(kvm_xcrs::read_from_bytes(bytes).map_err(|_| exact("xcrs"))?),
                    EVENTS => v.events = kvm_vcpu_events::read_from_bytes(bytes).map_err(|_| exact("events"))?,
                    MP_STATE => v.mp_state = kvm_mp_state::read_from_bytes(bytes).map_err(|_| exact("mp_state"))?,
                    MSRS => v.msrs = entries(bytes).ok_or_else(|| exact("msrs"))?,
                    CPUID => v.cpuid = entries(bytes).ok_or_else(|| exact("cpuid"))?,
                    _ => unreachable!("tags above CPUID are refused"),
                }
            }
            for (tag, what) in [
                (REGS, "regs"),
                (SREGS, "sregs"),
                (FPU, "fpu"),
                (MP_STATE, "mp_state"),
                (CPUID, "cpuid"),
            ] {
                if seen & (1 << tag) == 0 {
                    return Err(bad(format!("vCPU {i}: the state has no {what}")));
                }
            }
            vcpus.push(v);
        }
        if r.at != blob.len() {
            return Err(bad(format!("{} bytes after the last vCPU", blob.len() - r.at)));
        }
        Ok(VmState { tsc_khz, vcpus })
    }
}

/// kvm_fpu has no byte view in kvm-bindings: its fields in order.
const FPU_LEN: usize = 8 * 16 + 2 + 2 + 1 + 1 + 2 + 8 + 8 + 16 * 16 + 4 + 4;

fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(FPU_LEN);
    f.fpr.iter().for_each(|r| b.extend_from_slice(r));
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.push(f.ftwx);
    b.push(f.pad1);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    f.xmm.iter().for_each(|r| b.extend_from_slice(r));
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&f.pad2.to_le_bytes());
    b
}

fn fpu_from(b: &[u8]) -> Option<kvm_fpu> {
    if b.len() != FPU_LEN {
        return None;
    }
    let mut r = Reader { b, at: 0 };
    let mut f = kvm_fpu::default();
    for reg in &mut f.fpr {
        reg.copy_from_slice(r.take(16).ok()?);
    }
    f.fcw = u16::read_from_bytes(r.take(2).ok()?).ok()?;
    f.fsw = u16::read_from_bytes(r.take(2).ok()?).ok()?;
    f.ftwx = r.take(1).ok()?[0];
    f.pad1 = r.take(1).ok()?[0];
    f.last_opcode = u16::read_from_bytes(r.take(2).ok()?).ok()?;
    f.last_ip = u64::read_from_bytes(r.take(8).ok()?).ok()?;
    f.last_dp = u64::read_from_bytes(r.take(8).ok()?).ok()?;
    for reg in &mut f.xmm {
        reg.copy_from_slice(r.take(16).ok()?);
    }
    f.mxcsr = r.u32().ok()?;
    f.pad2 = r.u32().ok()?;
    Some(f)
}

fn entries<T: FromBytes + IntoBytes + zerocopy::Immutable + Clone>(bytes: &[u8]) -> Option<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) || bytes.len() / size > MAX_ENTRIES {
        return None;
    }
    bytes.chunks_exact(size).map(|c| T::read_from_bytes(c).ok()).collect()
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GuestError> {
        let end =
            self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
                GuestError::BadState(format!("state truncated: wanted {n} bytes at offset {}", self.at))
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, GuestError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> VmState {
        let mut v = VcpuState::default();
        v.regs.rip = 0x6000;
        v.regs.rax = 42;
        v.sregs.cr3 = 0x1000;
        v.xsave = Some([7; 1024]);
        v.fpu.fcw = 0x37f;
        v.fpu.xmm[3][5] = 9;
        v.fpu.mxcsr = 0x1f80;
        v.xcrs = Some(kvm_xcrs::default());
        v.msrs = vec![kvm_msr_entry {
            index: 0x10,
            data: 12345,
            ..Default::default()
        }];
        v.cpuid = vec![kvm_cpuid_entry2::default(); 3];
        VmState {
            tsc_khz: 2_000_000,
            vcpus: vec![v.clone(), v],
        }
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let d = VmState::decode(&s.encode()).unwrap();
        assert_eq!(d.tsc_khz, 2_000_000);
        assert_eq!(d.vcpus.len(), 2);
        assert_eq!(d.vcpus[1].regs.rax, 42);
        assert_eq!(d.vcpus[1].sregs.cr3, 0x1000);
        assert_eq!(d.vcpus[0].msrs[0].data, 12345);
        assert_eq!(d.vcpus[0].cpuid.len(), 3);
        assert_eq!(d.vcpus[0].fpu.fcw, 0x37f);
        assert_eq!(d.vcpus[0].fpu.xmm[3][5], 9);
        assert_eq!(d.vcpus[0].xsave.unwrap()[1023], 7);
        assert_eq!(d.encode(), s.encode());
    }

    #[test]
    fn truncated_or_altered_blobs_are_refused() {
        let blob = sample().encode();
        for cut in [0, 7, 8, 15, 16, 100, blob.len() - 1] {
            assert!(VmState::decode(&blob[..cut]).is_err(), "cut at {cut}");
        }
        let mut b = blob.clone();
        b[0] ^= 1;
        assert!(VmState::decode(&b).unwrap_err().to_string().contains("magic"));
        let mut b = blob.clone();
        b.push(0);
        assert!(VmState::decode(&b).is_err());
        // A regs section one byte short.
        let mut b = blob[..16].to_vec();
        section(&mut b, REGS, &[0u8; std::mem::size_of::<kvm_regs>() - 1]);
        section(&mut b, END, &[]);
        assert!(VmState::decode(&b).unwrap_err().to_string().contains("wrong size"));
    }

    #[test]
    fn every_truncation_is_refused() {
        let blob = sample().encode();
        for cut in 0..blob.len() {
            assert!(
                VmState::decode(&blob[..cut]).is_err(),
                "a blob cut at {cut} bytes decoded"
            );
        }
    }

    proptest! {
        // The stable-toolchain stand-in for fuzz/fuzz_targets/vm_state.rs.
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = VmState::decode(&data);
        }

        #[test]
        fn altered_blobs_never_panic_and_what_decodes_re_encodes(at in any::<usize>(), xor in 1u8..) {
            let mut blob = sample().encode();
            let i = at % blob.len();
            blob[i] ^= xor;
            if let Ok(s) = VmState::decode(&blob) {
                let again = s.encode();
                prop_assert_eq!(VmState::decode(&again).map(|s| s.encode()).ok(), Some(again));
            }
        }
    }
}
