//! Issue 15's rust-vmm adapter end to end: the VMM of
//! `examples/vm_memory_vmm.rs` (vm-memory guest memory, a KVM VM through
//! kvm-ioctls, a device writing through vm-memory) migrates its running
//! guest with ferry's library, verified; and without vm-memory's bitmap as
//! a tracker the device's writes are lost, which the same check catches.
#![allow(clippy::unwrap_used)]

#[path = "../examples/vm_memory_vmm.rs"]
#[allow(dead_code)] // the example's `main`
mod example;

fn kvm_or_skip(test: &str) -> bool {
    match ferry_vmm::kvm::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED {test}: needs /dev/kvm ({why})");
            false
        }
    }
}

#[test]
fn a_vm_memory_vmm_migrates_its_kvm_guest_verified() {
    if !kvm_or_skip("a_vm_memory_vmm_migrates_its_kvm_guest_verified") {
        return;
    }
    let s = example::run(true).unwrap();
    eprintln!("{s:?}");
    assert_eq!(
        s.source_digest, s.destination_digest,
        "the destination resumed on other memory than the source paused with"
    );
    assert!(
        s.transcript_matches,
        "the receipt does not match the source's transcript"
    );
    assert!(s.kvm_pages > 0, "KVM's dirty log reported no vCPU writes");
    assert!(s.vmm_pages > 0, "vm-memory's bitmap reported no device writes");
    assert!(
        s.destination_counter > s.source_counter,
        "the guest did not run on at the destination ({} -> {})",
        s.source_counter,
        s.destination_counter
    );
    assert!(
        s.destination_device_writes > 0,
        "the device did not run on at the destination"
    );
}

#[test]
fn without_vm_memorys_bitmap_the_devices_writes_are_lost_and_caught() {
    if !kvm_or_skip("without_vm_memorys_bitmap_the_devices_writes_are_lost_and_caught") {
        return;
    }
    let s = example::run(false).unwrap();
    assert_eq!(s.vmm_pages, 0);
    assert_ne!(
        s.source_digest, s.destination_digest,
        "KVM's dirty log alone saw the device's writes: the bitmap tracker would prove nothing"
    );
}
