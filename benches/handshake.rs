//! The whole control-plane handshake on loopback, as the demo runs it:
//! authentication ticket (mutual TLS) → authorization ticket (mutual TLS,
//! policy) → migration request to the destination (mutual TLS 1.3, ticket,
//! signature, replay and policy checks) → accepted, keys exported.
//!
//! Also the destination's decision record on the commit path: the durable
//! "committed" line written (and fdatasync'd) between the source's Commit
//! and the guest's resume, so it is inside the downtime.
//!
//! Run: `cargo bench --bench handshake`.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use ferry::lab::{Lab, DEST, POLICY, VM};
use ferry_control::handshake::Offer;

fn handshake(c: &mut Criterion) {
    let mut lab = Lab::start(POLICY).expect("lab");
    let dest = lab.destination(DEST, POLICY, 1 << 50).expect("destination");
    let offer = Offer {
        vm: VM.into(),
        memory_bytes: 1 << 30,
        streams: 2,
        integrity: ferry_control::modes::Integrity::AeadSha256,
        guest: ferry_control::modes::GuestKind::Synthetic,
        vcpus: 1,
    };
    let mut g = c.benchmark_group("control");
    g.sample_size(50).measurement_time(Duration::from_secs(10));
    g.bench_function("authn+authz+request+accept", |b| {
        b.iter(|| {
            let (t, claims) = lab.tickets("operator", VM, DEST).expect("tickets");
            let admitted = lab.admit(&dest, &t, &claims, offer.clone(), 9).expect("admitted");
            lab.steps.clear();
            admitted
        })
    });
    g.finish();
}

fn decision(c: &mut Criterion) {
    use ferry_control::decision::{Decision, DecisionLog};
    let dir = ferry::lab::LabDir::new().expect("temp dir");
    let log = DecisionLog::open(&dir.path().join("decisions")).expect("decision record");
    let mut id = 0u64;
    let mut g = c.benchmark_group("control");
    g.sample_size(200).measurement_time(Duration::from_secs(5));
    // Admission (not timed) writes the "admitted" line; the commit is timed.
    g.bench_function("decision record: commit (fdatasync)", |b| {
        b.iter_batched(
            || {
                id += 1;
                log.admitted(id, "fp").expect("admitted");
                id
            },
            |id| log.decide(id, Decision::Committed).expect("decided"),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, handshake, decision);
criterion_main!(benches);
