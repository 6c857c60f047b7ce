//! The policy parser and evaluator on arbitrary text.
#![no_main]

use ferry_control::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(p) = Policy::from_toml(text) {
            let _ = p.allows("operator", "vm", "src", "dst", 12_345);
            let _ = p.admits("src", "vm");
        }
    }
});
