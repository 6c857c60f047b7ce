//! The whole control-plane handshake on loopback, as the demo runs it:
//! authentication ticket (mutual TLS) → authorization ticket (mutual TLS,
//! policy) → migration request to the destination (mutual TLS 1.3, ticket,
//! signature, replay and policy checks) → accepted, keys exported.
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

criterion_group!(benches, handshake);
criterion_main!(benches);
