//! The demo's guests: which one runs, starting it with its tracker, and
//! what the demo asks of each at the source and the destination.

use super::*;
/// Resolves `Auto` to the KVM guest where /dev/kvm works.
pub(super) fn resolve_guest(opts: &DemoOptions) -> Result<(GuestKind, Option<String>), DemoError> {
    let kvm_ok = kvm::available();
    // The zero-page fraction and the uffd/bitmap trackers are the synthetic
    // guest's: asking for them picks it.
    let synthetic_only = opts.zero_fraction > 0.0 || opts.tracker != TrackerKind::Uffd;
    let kind = match (opts.guest, &kvm_ok) {
        (GuestKind::Auto, _) if synthetic_only => GuestKind::Synthetic,
        (GuestKind::Auto, Ok(())) | (GuestKind::Kvm, _) => GuestKind::Kvm,
        (GuestKind::Auto, Err(why)) => {
            return Ok((
                GuestKind::Synthetic,
                Some(format!("synthetic guest: KVM is not usable here ({why})")),
            ))
        }
        (GuestKind::Synthetic, _) => GuestKind::Synthetic,
    };
    if kind == GuestKind::Kvm {
        kvm_ok.map_err(|why| DemoError::Setup(format!("--guest kvm: {why}; use --guest synthetic on this host")))?;
        if opts.zero_fraction > 0.0 {
            return Err(DemoError::Setup(
                "--zero-fraction applies to the synthetic guest (the KVM guest fills all its memory); add --guest synthetic"
                    .into(),
            ));
        }
        if opts.tracker != TrackerKind::Uffd {
            return Err(DemoError::Setup(
                "--tracker applies to the synthetic guest (a KVM guest is tracked by KVM's dirty log); add --guest synthetic"
                    .into(),
            ));
        }
    }
    Ok((kind, None))
}

/// The source's guest.
pub(super) enum Source {
    Synthetic(SyntheticGuest),
    Kvm(KvmVm),
}

impl Source {
    pub(super) fn control(&mut self) -> &mut dyn GuestControl {
        match self {
            Source::Synthetic(g) => g,
            Source::Kvm(vm) => vm,
        }
    }

    pub(super) fn kind(&self) -> ferry_control::modes::GuestKind {
        match self {
            Source::Synthetic(g) => g.kind(),
            Source::Kvm(vm) => vm.kind(),
        }
    }

    /// Hot-set writes made so far.
    pub(super) fn writes(&self) -> u64 {
        match self {
            Source::Synthetic(g) => g.heartbeat(),
            Source::Kvm(vm) => vm.guest_writes(),
        }
    }

    /// Reads the heartbeat from another thread.
    pub(super) fn heartbeat_probe(&self) -> Box<dyn Fn() -> u64 + Send + Sync> {
        match self {
            Source::Synthetic(g) => {
                let p = g.heartbeat_probe();
                Box::new(move || p.heartbeat())
            }
            Source::Kvm(vm) => match vm.monitor() {
                Some(m) => Box::new(move || m.heartbeat()),
                None => Box::new(|| 0),
            },
        }
    }

    /// The migration's throttle still on the guest (0: none).
    pub(super) fn throttle(&self) -> f64 {
        match self {
            Source::Synthetic(g) => g.throttle(),
            Source::Kvm(vm) => vm.throttle(),
        }
    }

    /// After a failed migration: the guest runs at the source (its heartbeat
    /// moves on).
    pub(super) fn keeps_running(&self, dirty_rate: u64) -> bool {
        match self {
            Source::Synthetic(g) => {
                let hb = g.heartbeat();
                g.is_running() && (dirty_rate == 0 || g.wait_heartbeat(hb, Duration::from_secs(5)))
            }
            Source::Kvm(vm) => vm.wait_heartbeat(vm.heartbeat(), Duration::from_secs(5)).is_ok(),
        }
    }
}

/// The destination's guest.
pub(super) enum Dest {
    Synthetic(SyntheticGuest),
    Kvm(KvmVm),
}

impl Dest {
    pub(super) fn control(&mut self) -> &mut dyn GuestControl {
        match self {
            Dest::Synthetic(g) => g,
            Dest::Kvm(vm) => vm,
        }
    }

    /// Synthetic guest: its write rate here, measured over `over` (the
    /// throttle must not have moved with it).
    pub(super) fn write_rate(&self, over: Duration) -> Option<f64> {
        match self {
            Dest::Synthetic(g) => {
                let (t, hb) = (Instant::now(), g.heartbeat());
                std::thread::sleep(over);
                Some(g.heartbeat().saturating_sub(hb) as f64 / t.elapsed().as_secs_f64())
            }
            Dest::Kvm(_) => None,
        }
    }

    /// Whether the guest ever ran here.
    pub(super) fn ran(&self) -> bool {
        match self {
            Dest::Synthetic(g) => g.is_running(),
            Dest::Kvm(vm) => vm.runs() > 0,
        }
    }
}

/// Starts the source guest and its dirty tracker.
pub(super) fn start_source(
    opts: &DemoOptions,
    kind: GuestKind,
    mem: &Arc<GuestMemory>,
    t: Instant,
    say: &mut impl FnMut(&str),
) -> Result<(Source, Box<dyn DirtyTracker>), DemoError> {
    let setup = |e: &dyn std::fmt::Display| DemoError::Setup(e.to_string());
    let hot_set_bytes = opts.hot_set_bytes.min(opts.memory_bytes);
    if kind == GuestKind::Kvm {
        let program = GuestProgram {
            hot_set_bytes,
            writes_per_s: opts.dirty_rate_pages_per_s,
            ..GuestProgram::default()
        };
        let mut vm = KvmVm::boot(mem.clone(), opts.vcpus, &program).map_err(|e| setup(&e))?;
        vm.wait_filled(Duration::from_secs(300)).map_err(|e| setup(&e))?;
        let filled_ms = t.elapsed().as_secs_f64() * 1e3;
        let hb = vm.wait_heartbeat(2, Duration::from_secs(10)).map_err(|e| setup(&e))?;
        // The guest checksums its memory itself when it is paused.
        vm.checksum_at_pause = opts.guest_checksum_at_pause;
        let tracker = Box::new(vm.dirty_tracker());
        say(&format!(
            "source: KVM guest ({} vCPU, 64-bit user mode), {} of memory filled by the guest in {filled_ms:.0} ms; writing {} pages/s into a {} hot set; heartbeat {hb}",
            opts.vcpus,
            crate::size::human(opts.memory_bytes),
            opts.dirty_rate_pages_per_s,
            crate::size::human(hot_set_bytes),
        ));
        return Ok((Source::Kvm(vm), tracker));
    }
    let marks = (opts.tracker == TrackerKind::Bitmap).then(|| Arc::new(AtomicBitmap::new(mem.pages())));
    let wl = WorkloadConfig {
        hot_set_bytes,
        dirty_rate_pages_per_s: opts.dirty_rate_pages_per_s,
        zero_fraction: opts.zero_fraction,
        seed: 0x00f3_441e,
    };
    let guest = SyntheticGuest::start(mem.clone(), wl, marks.clone());
    say(&format!(
        "source: synthetic guest, {} of memory ({}% zero pages) filled in {:.0} ms; writing {} pages/s into a {} hot set",
        crate::size::human(opts.memory_bytes),
        (opts.zero_fraction * 100.0).round(),
        t.elapsed().as_secs_f64() * 1e3,
        opts.dirty_rate_pages_per_s,
        crate::size::human(wl.hot_set_bytes),
    ));
    let tracker: Box<dyn DirtyTracker> = match &marks {
        Some(m) => Box::new(BitmapTracker::new(m.clone())),
        None => Box::new(UffdWpTracker::new(mem).map_err(|e| setup(&e))?),
    };
    Ok((Source::Synthetic(guest), tracker))
}
