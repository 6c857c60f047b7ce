//! One migration attempt of `ferry vm` as a source: the source domain's
//! endpoints, the library's [`crate::source::migrate`], and what its result
//! means for the record and the API (migrated, failed, in doubt).

use super::*;

/// The caps in force.
pub(super) fn caps(hooks: &Hooks) -> (Option<u64>, Option<u64>) {
    (hooks.bandwidth_cap().live(), hooks.bandwidth_cap().paused())
}

/// A migration that did not complete, as the record needs it.
pub(super) struct Failed {
    pub(super) why: String,
    pub(super) convergence: Option<Box<crate::record::Convergence>>,
    /// Given up before pausing: it would not converge.
    pub(super) aborted: bool,
    /// Past the commit point without the destination's confirmation.
    pub(super) doubt: Option<Doubt>,
}

impl Failed {
    pub(super) fn plain(why: impl std::fmt::Display) -> Failed {
        Failed {
            why: why.to_string(),
            convergence: None,
            aborted: false,
            doubt: None,
        }
    }
}

/// Opens the source's audit log of `h`, if it has one.
pub(super) fn source_audit(h: &SourceHost) -> Result<Option<AuditLog>, Failed> {
    match &h.audit {
        Some(path) => {
            let id = Identity::load(&h.pki, Role::Host, &h.host).map_err(Failed::plain)?;
            Ok(Some(
                AuditLog::open(path, &format!("source {}", h.host), id).map_err(Failed::plain)?,
            ))
        }
        None => Ok(None),
    }
}

/// Where the servers and the destination of `to` are, for host `h`.
pub(super) fn endpoints<'a>(h: &'a SourceHost, to: &'a MigrateTo, audit: Option<&'a AuditLog>) -> Endpoints<'a> {
    Endpoints {
        pki: &h.pki,
        host: &h.host,
        client: &h.client,
        authn: h.authn,
        authz: h.authz,
        servers_name: &h.servers_name,
        dest: to.dest,
        dest_host: &to.dest_host,
        audit,
        pinned: &h.pinned,
    }
}

pub(super) fn migrate(
    vm: &mut KvmVm,
    mem: &GuestMemory,
    h: &SourceHost,
    vm_id: &str,
    to: &MigrateTo,
    hooks: &Hooks,
) -> Result<(Box<api::Migrated>, Option<source::Migrated>), Failed> {
    let audit = source_audit(h)?;
    let at = endpoints(h, to, audit.as_ref());
    let mut cfg = h.migration.clone();
    to.tuning.apply(&mut cfg);
    let mut tracker = vm.dirty_tracker();
    let (done, receipt_error) = match source::migrate(&at, vm_id, mem, &mut tracker, vm, &cfg, hooks) {
        Ok(done) => (done, None),
        // The guest moved; only the manifest and receipt did not: report it
        // as migrated, loudly without its receipt.
        Err(source::SourceError::Receipt { report, source }) => {
            return Ok((
                migrated_line(
                    vm,
                    vm_id,
                    &report,
                    false,
                    Vec::new(),
                    Some(source.to_string()),
                    caps(hooks),
                ),
                None,
            ));
        }
        Err(source::SourceError::Migrate(err)) => {
            return Err(Failed {
                why: err.to_string(),
                convergence: Some(Box::new(crate::record::Convergence::of_failure(
                    &cfg,
                    &err,
                    caps(hooks),
                ))),
                aborted: matches!(err, ferry_engine::migrate::MigrateError::WontConverge(_)),
                doubt: None,
            });
        }
        Err(e) => {
            let doubt = match &e {
                source::SourceError::InDoubt { migration_id, .. } => Some(Doubt::Unresolved(*migration_id)),
                source::SourceError::Discarded { resolution, .. }
                | source::SourceError::CommittedUnconfirmed { resolution, .. } => {
                    Some(Doubt::Resolved((**resolution).clone()))
                }
                _ => None,
            };
            return Err(Failed {
                doubt,
                ..Failed::plain(e)
            });
        }
    };
    let line = migrated_line(
        vm,
        vm_id,
        &done.report,
        done.receipt.transcript_matches,
        done.steps.clone(),
        receipt_error,
        caps(hooks),
    );
    Ok((line, Some(done)))
}

fn migrated_line(
    vm: &KvmVm,
    vm_id: &str,
    report: &ferry_engine::migrate::SourceReport,
    transcript_matches: bool,
    steps: Vec<crate::lab::Step>,
    receipt_error: Option<String>,
    caps: (Option<u64>, Option<u64>),
) -> Box<api::Migrated> {
    Box::new(api::Migrated {
        vm: vm_id.into(),
        rounds: report.rounds.len(),
        pages_sent: report.pages_sent,
        bytes_on_wire: report.bytes_on_wire,
        downtime_ms: report.downtime().as_secs_f64() * 1e3,
        total_ms: report.total().as_secs_f64() * 1e3,
        vcpu_state_bytes: report.device_state_bytes,
        heartbeat_before: vm.heartbeat_at_pause(),
        guest_checksum: vm.checksum_at_pause_value().map(|c| format!("{c:016x}")),
        transcript_matches,
        receipt_error,
        steps,
        round_detail: report.rounds.clone(),
        convergence: Some(crate::record::Convergence::of_report(
            report,
            report.downtime().as_secs_f64() * 1e3,
            caps,
        )),
        runs_after_commit: None,
        record_file: None,
        record: None,
    })
}
