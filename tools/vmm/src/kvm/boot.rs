//! Long mode, built by the VMM before the first entry: the GDT and TSS,
//! identity page tables with the user bit at every level, the guest program
//! in low memory, and the segment and control registers of 64-bit user mode.

use super::*;

/// Writes the GDT, TSS, identity-mapping page tables (2 MiB pages, user bit
/// at every level) and the guest program into low memory.
pub(super) fn write_tables(mem: &GuestMemory) -> Result<(), KvmError> {
    let size = mem.size_bytes();
    let mut low = vec![0u8; crate::usize_from(DATA_START)];
    let put = |b: &mut [u8], at: u64, v: u64| {
        let at = crate::usize_from(at);
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    };
    // GDT: null, kernel code, kernel data, user data, user code, TSS (16 B).
    let gdt: [u64; 5] = [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        put(&mut low, GDT + 8 * i as u64, *d);
    }
    let tss_limit = 0x67u64;
    let tss_lo = tss_limit | ((TSS & 0xff_ffff) << 16) | (0x8b << 40) | (((TSS >> 24) & 0xff) << 56);
    put(&mut low, GDT + 40, tss_lo);
    put(&mut low, GDT + 48, TSS >> 32);
    // Page tables: PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries map 2 MiB.
    const USER_RW_PRESENT: u64 = 0x7;
    const PAGE_2M: u64 = 0x80;
    put(&mut low, PML4, PDPT | USER_RW_PRESENT);
    let gib = size.div_ceil(1 << 30);
    for i in 0..gib {
        let pd = PD_BASE + i * 4096;
        put(&mut low, PDPT + 8 * i, pd | USER_RW_PRESENT);
        for j in 0..512 {
            let addr = (i << 30) | (j << 21);
            if addr < size {
                put(&mut low, pd + 8 * j, addr | PAGE_2M | USER_RW_PRESENT);
            }
        }
    }
    let code = crate::usize_from(CODE);
    low[code..code + GUEST_PROGRAM.len()].copy_from_slice(GUEST_PROGRAM);
    if !mem.write_pages(PageIndex(0), &low) {
        return Err(KvmError::Config("guest memory too small for the page tables".into()));
    }
    Ok(())
}

fn segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// System registers for 64-bit user mode with the tables of `write_tables`.
pub(super) fn long_mode_sregs(base: &kvm_bindings::kvm_sregs) -> kvm_bindings::kvm_sregs {
    let mut s = *base;
    s.cs = segment(SEL_USER_CODE, 0xb, 3, true);
    let data = segment(SEL_USER_DATA, 0x3, 3, false);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        unusable: 1,
        type_: 0x2,
        ..Default::default()
    };
    s.gdt.base = GDT;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    s.cr3 = PML4;
    s.cr4 = 0x620; // OSXMMEXCPT | OSFXSR | PAE
    s.efer = 0x500; // LMA | LME
    s
}
