//! `ferry workload`: the synthetic guest alone, and the dirty rate the
//! tracker sees.

use super::*;

#[derive(Args)]
pub(crate) struct WorkloadArgs {
    #[command(flatten)]
    shape: GuestShape,
    /// How long to run.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
}

impl WorkloadArgs {
    /// Runs the command.
    pub(crate) fn run(self) -> Result<ExitCode, CliError> {
        let a = self;
        let mem = Arc::new(GuestMemory::new(a.shape.memory).map_err(|e| e.to_string())?);
        let cfg = WorkloadConfig {
            hot_set_bytes: a.shape.hot_set.min(a.shape.memory),
            dirty_rate_pages_per_s: a.shape.dirty_rate,
            zero_fraction: a.shape.zero_fraction,
            ..WorkloadConfig::default()
        };
        let mut tracker = UffdWpTracker::new(&mem).map_err(|e| e.to_string())?;
        let guest = SyntheticGuest::start(mem.clone(), cfg, None);
        tracker.start().map_err(|e| e.to_string())?;
        println!(
            "synthetic guest: {} memory, {} hot set, target {} pages/s",
            human(a.shape.memory),
            human(cfg.hot_set_bytes),
            a.shape.dirty_rate
        );
        for s in 1..=a.seconds {
            let t = Instant::now();
            let before = guest.heartbeat();
            std::thread::sleep(Duration::from_secs(1));
            let mut dirty = DirtyBitmap::new(mem.pages());
            let scan = Instant::now();
            tracker.collect(&mut dirty).map_err(|e| e.to_string())?;
            println!(
                "second {s}: {} writes, {} distinct dirty pages seen by uffd-wp (scan {:.2} ms), over {:.2} s",
                guest.heartbeat() - before,
                dirty.count(),
                scan.elapsed().as_secs_f64() * 1e3,
                t.elapsed().as_secs_f64()
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}
