//! The KVM VMM's vCPU state decoder (a blob the migration carries from the
//! source): never panics, and what it accepts re-encodes to a blob that
//! decodes to the same encoding.
#![no_main]

use ferry_vmm::kvm::state::VmState;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = VmState::decode(data) {
        let blob = state.encode();
        let again = VmState::decode(&blob).expect("an encoded state decodes");
        assert_eq!(again.encode(), blob);
    }
});
