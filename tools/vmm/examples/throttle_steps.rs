//! The throttle's effect on ferry's KVM guest: its write rate at each step
//! the `throttle` policy takes (PERF.md, issue 11). Needs /dev/kvm.
//!
//! `cargo run --release -p ferry-vmm --example throttle_steps`

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_engine::guest::GuestControl;
use ferry_engine::migrate::convergence::{next_throttle, THROTTLE_CEILING};
use ferry_engine::GuestMemory;
use ferry_vmm::kvm::{self, GuestProgram, KvmVm};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    kvm::available().map_err(|why| format!("needs KVM: {why}"))?;
    let mem = Arc::new(GuestMemory::new(64 << 20)?);
    let program = GuestProgram {
        hot_set_bytes: 16 << 20,
        writes_per_s: 10_000_000,
        ..Default::default()
    };
    let mut vm = KvmVm::boot(mem, 1, &program)?;
    vm.wait_filled(Duration::from_secs(30))?;
    let cpu = ferry_engine::probe::cpu_model();
    println!("cpu: {cpu}; KVM guest, 1 vCPU, 16 MiB hot set written flat out; 3 x 1 s per step, median");
    let mut steps = vec![0.0];
    while let Some(t) = next_throttle(*steps.last().unwrap_or(&0.0), THROTTLE_CEILING) {
        steps.push(t);
    }
    let mut free = 0.0;
    for t in steps {
        vm.set_throttle(t)?;
        std::thread::sleep(Duration::from_millis(200));
        let mut rates = Vec::new();
        for _ in 0..3 {
            let (w, at) = (vm.guest_writes(), Instant::now());
            std::thread::sleep(Duration::from_secs(1));
            rates.push((vm.guest_writes() - w) as f64 / at.elapsed().as_secs_f64());
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[1];
        if t == 0.0 {
            free = median;
        }
        println!(
            "throttle {:>3.0} %: {:>9.0} writes/s ({:>5.1} % of unthrottled; ideal {:>5.1} %)",
            t * 100.0,
            median,
            median / free * 100.0,
            (1.0 - t) * 100.0
        );
    }
    vm.set_throttle(0.0)?;
    Ok(())
}
