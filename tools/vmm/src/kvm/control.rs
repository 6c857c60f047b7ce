//! What the engine drives: [`GuestControl`] for ferry's KVM VM (pause and
//! resume through the vCPU threads, vCPU state out and in, the migration's
//! throttle), and the vCPU state's save and load.

use super::*;

impl GuestControl for KvmVm {
    fn pause(&mut self) -> Result<(), GuestError> {
        if self.checksum_at_pause {
            // vCPU 0 checksums its memory and stops right after reporting,
            // before it writes anything again; the others are kicked.
            self.post_checksum_request(true)?;
            let v = self.vcpu0()?;
            let sum = v
                .shared
                .wait(Duration::from_secs(120), |c| c.parked && c.checksum.is_some())?
                .checksum;
            self.pause_checksum = sum;
        }
        // The guest began to stop at the kick, or, with a checksum first,
        // when vCPU 0 stopped itself right after reporting it.
        let mut t = Instant::now();
        if self.checksum_at_pause {
            if let Some(at) = self.vcpu0()?.shared.lock().parked_at {
                t = t.min(at);
            }
        }
        self.pause_all(Duration::from_secs(10))?;
        self.stop_latency = t.elapsed();
        self.heartbeat_at_pause = Some(self.read_u64(Self::slot(0) + S_HEARTBEAT));
        Ok(())
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        if self.checksum_at_resume {
            self.post_checksum_request(self.park_after_resume_checksum)?;
        }
        Ok(self.resume_all()?)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, GuestError> {
        if !self.paused {
            return Err(GuestError::Control("vCPU state can only be saved while paused".into()));
        }
        Ok(self.save()?.encode())
    }

    fn load_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        if self.runs() != 0 {
            return Err(GuestError::Control(
                "state can only be loaded into a VM that has not run".into(),
            ));
        }
        let s = VmState::decode(state)?;
        self.load(&s)?;
        // The heartbeat the guest had, so `heartbeat()` goes on from there.
        if let Some(v) = self.vcpus.first() {
            v.shared
                .heartbeat
                .store(self.read_u64(Self::slot(0) + S_HEARTBEAT), Ordering::SeqCst);
        }
        Ok(())
    }

    fn kind(&self) -> ferry_engine::guest::GuestKind {
        ferry_engine::guest::GuestKind::Kvm
    }

    fn vcpus(&self) -> u32 {
        u32::try_from(self.vcpus.len()).unwrap_or(u32::MAX)
    }

    fn stop_latency(&self) -> Duration {
        self.stop_latency
    }

    fn can_throttle(&self) -> bool {
        true
    }

    fn set_throttle(&mut self, fraction: f64) -> Result<(), GuestError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(GuestError::Control(format!("throttle {fraction} outside 0..1")));
        }
        if fraction == 0.0 {
            self.throttler = None;
            return Ok(());
        }
        match &self.throttler {
            Some(t) => t.set(fraction),
            None => {
                let shared = self.vcpus.iter().map(|v| v.shared.clone()).collect();
                let t = throttle::Throttler::start(shared, fraction)
                    .map_err(|e| GuestError::Control(format!("starting the throttle thread: {e}")))?;
                self.throttler = Some(t);
            }
        }
        Ok(())
    }

    fn device_state_bytes_hint(&self) -> usize {
        // The encoder's own estimate (MSRs, CPUID and XSAVE dominate).
        16 + self.vcpus.len() * 8192
    }
}

impl KvmVm {
    fn save(&self) -> Result<VmState, KvmError> {
        let supported = self.kvm.get_msr_index_list().map_err(kvm_err("list MSRs"))?;
        let wanted: Vec<kvm_msr_entry> = MSRS_TO_SAVE
            .iter()
            .filter(|i| supported.as_slice().contains(i))
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut out = VmState {
            tsc_khz: self.tsc_khz,
            vcpus: Vec::new(),
        };
        for v in &self.vcpus {
            let f = v.fd();
            let mut msrs = Msrs::from_entries(&wanted).map_err(|e| KvmError::Config(format!("MSR list: {e:?}")))?;
            let n = f.get_msrs(&mut msrs).map_err(kvm_err("read MSRs"))?;
            out.vcpus.push(VcpuState {
                regs: f.get_regs().map_err(kvm_err("read regs"))?,
                sregs: f.get_sregs().map_err(kvm_err("read sregs"))?,
                fpu: f.get_fpu().map_err(kvm_err("read FPU"))?,
                // Where the host has XSAVE, its state is required (it holds
                // the SSE/AVX registers); without it the FPU state is all.
                xsave: if self.kvm.check_extension(kvm_ioctls::Cap::Xsave) {
                    Some(f.get_xsave().map_err(kvm_err("read XSAVE state"))?.region)
                } else {
                    None
                },
                xcrs: if self.kvm.check_extension(kvm_ioctls::Cap::Xcrs) {
                    Some(f.get_xcrs().map_err(kvm_err("read XCRs"))?)
                } else {
                    None
                },
                events: f.get_vcpu_events().map_err(kvm_err("read vCPU events"))?,
                mp_state: f.get_mp_state().map_err(kvm_err("read MP state"))?,
                msrs: msrs.as_slice()[..n.min(wanted.len())].to_vec(),
                cpuid: f
                    .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("read CPUID"))?
                    .as_slice()
                    .to_vec(),
            });
        }
        Ok(out)
    }

    fn load(&self, s: &VmState) -> Result<(), KvmError> {
        if s.vcpus.len() != self.vcpus.len() {
            return Err(KvmError::Config(format!(
                "the state has {} vCPUs, this VM {}: start the destination with --vcpus {}",
                s.vcpus.len(),
                self.vcpus.len(),
                s.vcpus.len()
            )));
        }
        for (v, st) in self.vcpus.iter().zip(&s.vcpus) {
            let f = v.fd();
            if s.tsc_khz != 0 && s.tsc_khz != self.tsc_khz {
                // Keep the guest's clock rate if the host can scale it.
                if let Err(e) = f.set_tsc_khz(s.tsc_khz) {
                    tracing::warn!(
                        "guest TSC ran at {} kHz, this host's at {} kHz and cannot scale ({e})",
                        s.tsc_khz,
                        self.tsc_khz
                    );
                }
            }
            let cpuid = kvm_bindings::CpuId::from_entries(&st.cpuid)
                .map_err(|e| KvmError::Config(format!("CPUID table: {e:?}")))?;
            f.set_cpuid2(&cpuid).map_err(kvm_err(
                "set the source's CPUID (does this host's CPU have its features?)",
            ))?;
            f.set_sregs(&st.sregs).map_err(kvm_err("set sregs"))?;
            f.set_regs(&st.regs).map_err(kvm_err("set regs"))?;
            f.set_fpu(&st.fpu).map_err(kvm_err("set FPU"))?;
            if let Some(region) = st.xsave {
                let x = kvm_bindings::kvm_xsave {
                    region,
                    ..Default::default()
                };
                // SAFETY: `x` is a plain 4 KiB kvm_xsave with no trailing
                // extension, which is exactly what KVM_SET_XSAVE reads.
                unsafe { f.set_xsave(&x) }.map_err(kvm_err("set XSAVE"))?;
            }
            if let Some(x) = &st.xcrs {
                f.set_xcrs(x).map_err(kvm_err("set XCRs"))?;
            }
            let msrs = Msrs::from_entries(&st.msrs).map_err(|e| KvmError::Config(format!("MSR list: {e:?}")))?;
            let n = f.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
            if n != st.msrs.len() {
                let idx = st.msrs.get(n).map_or(0, |m| m.index);
                return Err(KvmError::Config(format!(
                    "this host refused MSR {idx:#x} of the source's vCPU"
                )));
            }
            f.set_vcpu_events(&st.events).map_err(kvm_err("set vCPU events"))?;
            f.set_mp_state(st.mp_state).map_err(kvm_err("set MP state"))?;
        }
        Ok(())
    }
}
