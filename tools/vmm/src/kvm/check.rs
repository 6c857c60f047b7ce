//! The guest's checksum of its own memory, and the VMM's check of that
//! memory against it.

/// The guest program's checksum (guest.S, label `sum`), computed on the
/// host over the same bytes: two lanes of xor-multiply-rotate over 16-byte
/// blocks. Feed it whole 16-byte blocks in order.
#[derive(Debug, Clone, Copy)]
pub struct GuestChecksum {
    a: u64,
    b: u64,
}

const SUM_MUL: u64 = 0xff51_afd7_ed55_8ccd;

impl Default for GuestChecksum {
    fn default() -> Self {
        GuestChecksum {
            a: 0x9e37_79b9_7f4a_7c15,
            b: 0x7f4a_7c15_9e37_79b9,
        }
    }
}

impl GuestChecksum {
    /// Adds `data` (a multiple of 16 bytes; a shorter tail is ignored).
    pub fn update(&mut self, data: &[u8]) {
        for c in data.chunks_exact(16) {
            let (lo, hi) = c.split_at(8);
            let w = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
            self.a = (self.a ^ w(lo)).wrapping_mul(SUM_MUL).rotate_left(31);
            self.b = (self.b ^ w(hi)).wrapping_mul(SUM_MUL).rotate_left(29);
        }
    }

    /// The checksum so far.
    pub fn value(&self) -> u64 {
        self.a.wrapping_add(self.b.wrapping_mul(SUM_MUL))
    }
}

/// What [`KvmVm::check_memory`](super::KvmVm::check_memory) found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryCheck {
    /// The checksum the guest computed of its data region.
    pub guest_checksum: u64,
    /// The same, computed by the VMM over the same bytes.
    pub host_checksum: u64,
    /// Pages beyond the hot set (never written after the fill) checked
    /// against the guest's fill sequence.
    pub fill_pages_checked: u64,
    /// Those pages hold exactly the fill sequence.
    pub fill_intact: bool,
}

impl MemoryCheck {
    /// The guest and the VMM agree on the memory, and nothing but the hot
    /// set was changed since the fill.
    pub fn ok(&self) -> bool {
        self.guest_checksum == self.host_checksum && self.fill_intact
    }
}
