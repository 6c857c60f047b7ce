//! A migration in doubt at the source VMM: Commit was sent and the
//! destination's confirmation never came, so the guest stays paused here
//! until the destination says, signed, what became of it
//! ([`crate::source::resolve`]). The source asks on its own when the
//! confirmation is missing; `ferry resolve --api SOCK` (the API's
//! `resolve`) asks again later. On "committed" the guest is released (this
//! VM shuts down); on "discarded" it resumes here; anything else leaves it
//! paused and in doubt (`migrate` and `cancel` are refused meanwhile).

use ferry_control::handshake::{Answer, Resolution};
use ferry_engine::guest::GuestControl;

use super::*;

/// Where a migration past its commit point stands.
pub(super) enum Doubt {
    /// No answer from the destination: the migration id to ask about.
    Unresolved(u64),
    /// The destination's signed answer.
    Resolved(Resolution),
}

/// The migration in doubt, kept for `resolve`.
#[derive(Debug)]
pub(super) struct InDoubt {
    /// Its id.
    pub migration_id: u64,
    /// Where it went.
    pub to: MigrateTo,
    /// Its record so far (rewritten when it is resolved).
    pub record: Record,
}

/// How long an API client waits for a `resolve` (one attempt: a TLS
/// handshake and one exchange, each bounded by the I/O timeout).
const RESOLVE_WAIT: Duration = Duration::from_secs(120);

/// The API's `resolve`: hands the question to the main thread (which owns
/// the VM) and relays its answer.
pub(super) fn api_resolve(shared: &Mutex<Shared>, jobs: &Sender<Work>, send: &mut dyn FnMut(&Reply) -> bool) {
    let state = lock(shared).state;
    if state != "in-doubt" {
        send(&Reply::error(format!(
            "nothing is in doubt: the VM is {state} (resolve is for a migration whose Commit was not confirmed)"
        )));
        return;
    }
    let (tx, rx) = bounded::<Reply>(1);
    if jobs.try_send(Work::Resolve(tx)).is_err() {
        send(&Reply::error(
            "the VMM is busy with another request: try again in a moment",
        ));
        return;
    }
    match rx.recv_timeout(RESOLVE_WAIT) {
        Ok(line) => {
            send(&line);
        }
        Err(_) => {
            send(&Reply::error(
                "the VMM did not answer within 120 s: check `ferry status`",
            ));
        }
    }
}

/// On the main thread: asks the destination once about the migration in
/// doubt and acts on the answer. True when the guest left.
pub(super) fn run_resolve(
    o: &VmOptions,
    vm: &mut KvmVm,
    mon: &Monitor,
    shared: &Arc<Mutex<Shared>>,
    reply: &Sender<Reply>,
    metrics: &crate::metrics::Metrics,
) -> bool {
    let answer = |line: Reply| {
        let _ = reply.send_timeout(line, Duration::from_secs(2));
    };
    let (Some(h), Some(d)) = (&o.source, lock(shared).in_doubt.take()) else {
        answer(Reply::error("nothing is in doubt here"));
        return false;
    };
    let audit = match source_audit(h) {
        Ok(a) => a,
        Err(f) => {
            lock(shared).in_doubt = Some(d);
            answer(Reply::error(format!("still in doubt: {}", f.why)));
            return false;
        }
    };
    let at = endpoints(h, &d.to, audit.as_ref());
    match source::resolve(&at, d.migration_id, h.migration.io_timeout, 1) {
        Ok(r) => {
            let InDoubt { to, mut record, .. } = d;
            let why = format!(
                "asked again after the Commit went unconfirmed: the destination answered, signed, {}",
                r.answer.as_str()
            );
            let (mut last, left) = settled(vm, mon, shared, &mut record, why, &r);
            metrics.ended("source", &record.outcome);
            if let Some(path) = &to.record {
                match record.write(path) {
                    Ok(()) => set_record(&mut last, Some(path.display().to_string()), None),
                    Err(why) => tracing::warn!("{why}"),
                }
            }
            event(&serde_json::to_value(Reply::Api(last.clone())).unwrap_or_default());
            set_record(&mut last, None, Some(record));
            answer(Reply::Api(last));
            left
        }
        Err(why) => {
            lock(shared).in_doubt = Some(d);
            answer(Reply::Api(ApiReply::MigrationInDoubt(Box::new(api::Ended {
                reason: format!("still in doubt: {why}"),
                guest: "PAUSED here: try again when the destination is reachable".into(),
                heartbeat: mon.heartbeat(),
                record_file: None,
                record: None,
            }))));
            false
        }
    }
}

/// Acts on the destination's signed answer `r` about the migration in
/// doubt (`why` says how it came): "committed" shuts this VM down for good
/// (true: the guest left), "discarded" resumes it here.
pub(super) fn settled(
    vm: &mut KvmVm,
    mon: &Monitor,
    shared: &Mutex<Shared>,
    record: &mut Record,
    why: String,
    r: &Resolution,
) -> (ApiReply, bool) {
    record.migration_id = r.migration_id;
    record.error = Some(why.clone());
    let (guest, left) = if r.answer == Answer::Committed {
        record.outcome = "migrated-resolved".into();
        vm.shut_down();
        lock(shared).state = "migrated";
        (
            "runs at the destination (its signed answer: committed); it never runs here again".to_string(),
            true,
        )
    } else {
        record.outcome = "discarded".into();
        let resumed = if mon.paused() { vm.resume() } else { Ok(()) };
        let mut s = lock(shared);
        s.last_error = Some(why.clone());
        match resumed {
            Ok(()) => {
                s.state = "running";
                (
                    "running here (the destination's signed answer: discarded)".to_string(),
                    false,
                )
            }
            Err(e) => {
                s.state = "paused";
                (
                    format!(
                        "PAUSED here and runs nowhere: the destination discarded it, but resuming it here failed: {e}"
                    ),
                    false,
                )
            }
        }
    };
    let reply = ApiReply::MigrationResolved(Box::new(api::Resolved {
        migration_id: r.migration_id,
        answer: r.answer,
        destination_sig: r.sig.clone(),
        reason: why,
        guest,
        heartbeat: mon.heartbeat(),
        record_file: None,
        record: None,
    }));
    (reply, left)
}
