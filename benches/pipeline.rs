//! Criterion benches of the data plane's hot path, with no network:
//! - `seal`: zero check + copy + SHA-256 + AES-256-GCM of guest pages into a
//!   null sink (one worker), per integrity mode, AEAD implementation and
//!   SHA-256 backend (ring page by page, tape multi-buffer per frame);
//! - `open`: the destination's half (AES-GCM open + SHA-256 check + write);
//! - `stage`: each remaining stage alone (zero check, copy out, install,
//!   AES-GCM open), for the cost per GB of each;
//! - `huge`: the seal path and the receiver's prefault on 2 MiB huge pages
//!   against 4 KiB ones (needs `sysctl vm.nr_hugepages=600`);
//! - `dirty_scan`: one uffd-wp PAGEMAP_SCAN collect over 1 GiB.
//!
//! Run: `cargo bench --bench pipeline` (add `--features rustcrypto-aead` to
//! compare the RustCrypto AEAD).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_engine::bitmap::DirtyBitmap;
use ferry_engine::crypto::{AeadBackend, Direction, Sealer, SessionKeys, StreamCrypto};
use ferry_engine::dirty::{DirtyTracker, UffdWpTracker};
use ferry_engine::pipeline::{self, Integrity, StreamHeader};
use ferry_engine::sha::{self, Sha256Backend, Sha256Choice};
use ferry_engine::wire::{MigrationId, Outer, StreamId, HEADER_LEN};
use ferry_engine::{GuestMemory, PageIndex, PAGE_SIZE};
use ferry_vmm::workload;

const MEM: u64 = 64 << 20;
const CHUNK: u32 = 32;

/// Seals every page of `mem` into `out` as CHUNK-page frames, continuing
/// `tx`'s sequence; with `flush_at`, clears `out` whenever it passes that
/// size (a null sink).
fn seal_image(mem: &GuestMemory, integrity: Integrity, tx: &mut Sealer, out: &mut Vec<u8>, flush_at: Option<usize>) {
    let hdr = StreamHeader {
        migration: MigrationId(1),
        stream: StreamId(0),
    };
    let mut first = 0;
    while first < mem.pages() {
        pipeline::encode_pages(mem, PageIndex(first), CHUNK, hdr, 1, integrity, 0, tx, out);
        first += u64::from(CHUNK);
        if flush_at.is_some_and(|n| out.len() >= n) {
            black_box(&*out);
            out.clear();
        }
    }
}

fn backends() -> Vec<AeadBackend> {
    let mut v = vec![AeadBackend::Ring];
    if cfg!(feature = "rustcrypto-aead") {
        v.push(AeadBackend::RustCrypto);
    }
    v
}

fn label(i: Integrity, b: AeadBackend) -> String {
    format!(
        "{}/{}",
        i.as_str(),
        if b == AeadBackend::Ring { "ring" } else { "rustcrypto" }
    )
}

fn seal(c: &mut Criterion) {
    let mem = GuestMemory::new(MEM).expect("guest memory");
    workload::fill(&mem, 7, 0.0);
    let keys = SessionKeys::test_only_unauthenticated(MigrationId(1)).expect("keys");
    let mut g = c.benchmark_group("seal");
    g.throughput(Throughput::Bytes(MEM));
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for integrity in [Integrity::AeadSha256, Integrity::Aead] {
        for backend in backends() {
            for sha in sha_backends(integrity) {
                sha::select(Sha256Choice::Force(sha));
                let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), backend);
                let mut out: Vec<u8> = Vec::with_capacity(2 << 20);
                g.bench_function(BenchmarkId::from_parameter(label_sha(integrity, backend, sha)), |b| {
                    b.iter(|| seal_image(&mem, integrity, &mut tx, &mut out, Some(1 << 20)))
                });
            }
        }
    }
    sha::select(Sha256Choice::Auto);
    // Scaling: the same image sealed by two workers at once, half each (one
    // core each on a 2-core host), against one worker above.
    for integrity in [Integrity::AeadSha256, Integrity::Aead] {
        let halves = [
            GuestMemory::new(MEM / 2).expect("guest memory"),
            GuestMemory::new(MEM / 2).expect("guest memory"),
        ];
        for (i, h) in halves.iter().enumerate() {
            workload::fill(h, 7 + i as u64, 0.0);
        }
        let mut state: Vec<(Sealer, Vec<u8>)> = (0..2u16)
            .map(|i| {
                (
                    Sealer::new(&keys, Direction::ToDestination, StreamId(i), AeadBackend::Ring),
                    Vec::with_capacity(2 << 20),
                )
            })
            .collect();
        g.bench_function(
            BenchmarkId::from_parameter(format!("{}/2_workers", integrity.as_str())),
            |b| {
                b.iter(|| {
                    std::thread::scope(|sc| {
                        for (h, (tx, out)) in halves.iter().zip(state.iter_mut()) {
                            sc.spawn(move || seal_image(h, integrity, tx, out, Some(1 << 20)));
                        }
                    })
                })
            },
        );
    }
    g.finish();
}

/// The SHA-256 backends worth comparing in `integrity` mode.
fn sha_backends(integrity: Integrity) -> Vec<Sha256Backend> {
    if integrity == Integrity::AeadSha256 {
        vec![Sha256Backend::Ring, Sha256Backend::Tape]
    } else {
        vec![Sha256Backend::Ring]
    }
}

fn label_sha(i: Integrity, b: AeadBackend, sha: Sha256Backend) -> String {
    if i == Integrity::AeadSha256 {
        format!("{}/sha-{}", label(i, b), sha.as_str())
    } else {
        label(i, b)
    }
}

/// What the parts cost alone on this machine, in the same run, so the
/// pipeline's figures can be read as a fraction of the attainable:
/// SHA-256 of 4 KiB pages, AES-256-GCM seal, both, on a cache-hot buffer.
fn ceiling(c: &mut Criterion) {
    let keys = SessionKeys::test_only_unauthenticated(MigrationId(1)).expect("keys");
    let mut buf: Vec<u8> = (0..128 << 10)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut g = c.benchmark_group("ceiling");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    g.bench_function("sha256_per_4KiB_page", |b| {
        b.iter(|| {
            for p in buf.chunks_exact(PAGE_SIZE) {
                black_box(ring::digest::digest(&ring::digest::SHA256, p));
            }
        })
    });
    let mut digests = [[0u8; 32]; 32];
    g.bench_function("sha256_multibuffer_32_pages", |b| {
        b.iter(|| sha::hash_with(Sha256Backend::Tape, black_box(&buf), &mut digests))
    });
    let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
    g.bench_function("aes256gcm_seal_128KiB", |b| {
        b.iter(|| {
            black_box(tx.seal_next(&mut [0u8; HEADER_LEN], &mut buf));
        })
    });
    g.finish();
    // Header protection's own cost, once per frame (a frame carries up to
    // 64 pages): the mask of one tag.
    let rx = StreamCrypto::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
    let mut g = c.benchmark_group("ceiling");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    let mut tag = [7u8; ferry_engine::wire::TAG_LEN];
    g.bench_function("header_mask_per_frame", |b| {
        b.iter(|| {
            tag[0] = tag[0].wrapping_add(1);
            black_box(rx.header_mask(black_box(&tag)))
        })
    });
    g.finish();
}

fn open(c: &mut Criterion) {
    let mem = GuestMemory::new(MEM).expect("guest memory");
    workload::fill(&mem, 7, 0.0);
    let dst = GuestMemory::new(MEM).expect("guest memory");
    dst.prefault().expect("prefault");
    let keys = SessionKeys::test_only_unauthenticated(MigrationId(1)).expect("keys");
    let mut g = c.benchmark_group("open");
    g.throughput(Throughput::Bytes(MEM));
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for (integrity, sha) in [
        (Integrity::AeadSha256, Sha256Backend::Ring),
        (Integrity::AeadSha256, Sha256Backend::Tape),
        (Integrity::Aead, Sha256Backend::Ring),
    ] {
        sha::select(Sha256Choice::Force(sha));
        // Seal the whole image once; each iteration opens a fresh copy.
        let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut sealed = Vec::new();
        seal_image(&mem, integrity, &mut tx, &mut sealed, None);
        let name = if integrity == Integrity::AeadSha256 {
            format!("{}/sha-{}", integrity.as_str(), sha.as_str())
        } else {
            integrity.as_str().to_string()
        };
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            // A fresh copy of the sealed frames per iteration, made outside
            // the timed part (opening is in place).
            b.iter_batched_ref(
                || sealed.clone(),
                |work| {
                    let mut rx = StreamCrypto::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
                    let mut at = 0;
                    while at < work.len() {
                        let len = Outer::decode(work[at..at + HEADER_LEN].try_into().expect("header"))
                            .expect("valid")
                            .frame_len();
                        let h = pipeline::unprotect(&mut work[at..at + len], &rx).expect("valid");
                        let plain = pipeline::open_frame(&h, &mut work[at..at + len], &mut rx).expect("authentic");
                        pipeline::apply_pages(&h, plain, integrity, &dst, false).expect("digests match");
                        at += len;
                    }
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    sha::select(Sha256Choice::Auto);
    g.finish();
    black_box(PAGE_SIZE);
}

fn dirty_scan(c: &mut Criterion) {
    if let Err(why) = ferry_engine::probe::uffd_wp() {
        eprintln!("SKIPPED dirty_scan bench: {why}");
        return;
    }
    let mem = GuestMemory::new(1 << 30).expect("guest memory");
    workload::fill(&mem, 7, 0.0);
    let mut t = UffdWpTracker::new(&mem).expect("tracker");
    t.start().expect("start");
    let mut g = c.benchmark_group("dirty_scan_1GiB");
    g.sample_size(20);
    for pct in [0u64, 1, 10] {
        let step = 100u64.checked_div(pct).unwrap_or(u64::MAX);
        g.bench_function(BenchmarkId::from_parameter(format!("{pct}pct_dirty")), |bch| {
            bch.iter_batched(
                || {
                    if pct > 0 {
                        let mut p = 0;
                        while p < mem.pages() {
                            mem.write_pages(PageIndex(p), &[1u8; PAGE_SIZE]);
                            p += step;
                        }
                    }
                    DirtyBitmap::new(mem.pages())
                },
                |mut b| {
                    t.collect(&mut b).expect("collect");
                    b
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// Each stage of the hot path alone, one core, for the cost per GB of each
/// (PERF.md, "the way to 100GbE"): stages on guest memory run over a 64 MiB
/// image (beyond the caches), the rest over a 128 KiB frame-sized buffer as
/// in the pipeline. SHA-256 and the AES-GCM seal are in `ceiling`.
fn stage(c: &mut Criterion) {
    let image = GuestMemory::new(MEM).expect("guest memory");
    workload::fill(&image, 7, 0.0);
    let zeros = GuestMemory::new(MEM).expect("guest memory");
    zeros.prefault().expect("prefault");
    let dst = GuestMemory::new(MEM).expect("guest memory");
    dst.prefault().expect("prefault");
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Bytes(MEM));
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    // A zero page is the zero check's worst case: all 4 KiB read.
    g.bench_function("zero_check_zero_pages_64MiB", |b| {
        b.iter(|| (0..zeros.pages()).filter(|p| zeros.page_is_zero(PageIndex(*p))).count())
    });
    let mut buf = vec![0u8; 1 << 20];
    g.bench_function("copy_out_64MiB", |b| {
        b.iter(|| {
            let mut at = 0usize;
            for p in 0..image.pages() {
                let page: &mut [u8; PAGE_SIZE] = (&mut buf[at..at + PAGE_SIZE]).try_into().expect("a page");
                image.read_page(PageIndex(p), page);
                at = (at + PAGE_SIZE) % buf.len();
            }
            black_box(&buf);
        })
    });
    image.read_into(0, &mut buf);
    g.bench_function("install_64MiB", |b| {
        b.iter(|| {
            let per = (buf.len() / PAGE_SIZE) as u64;
            let mut p = 0;
            while p < dst.pages() {
                dst.write_pages(PageIndex(p), &buf);
                p += per;
            }
        })
    });
    g.finish();
    let keys = SessionKeys::test_only_unauthenticated(MigrationId(1)).expect("keys");
    let frame: Vec<u8> = (0..128 << 10)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Bytes(frame.len() as u64));
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    g.bench_function("aes256gcm_open_128KiB", |b| {
        let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        let mut rx = StreamCrypto::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
        b.iter_batched_ref(
            || {
                // The AAD is the header before masking: all zeros here.
                let mut masked = [0u8; HEADER_LEN];
                let mut body = frame.clone();
                let (seq, tag) = tx.seal_next(&mut masked, &mut body);
                body.extend_from_slice(&tag);
                (seq.0, body)
            },
            |(seq, body)| {
                black_box(rx.open(*seq, &[0u8; HEADER_LEN], body).expect("authentic").len());
            },
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// 2 MiB huge pages against 4 KiB ones: the seal path over the same random
/// image, and the receiver's prefault of fresh memory. Needs the hugetlb
/// pool (`sysctl vm.nr_hugepages=600` for the 1 GiB prefault); SKIPPED
/// without it.
fn huge(c: &mut Criterion) {
    use ferry_engine::memory::{GuestAddress, PageBacking};
    let on = |backing, bytes| GuestMemory::with_layout_on(&[(GuestAddress(0), bytes)], backing);
    if let Err(e) = on(PageBacking::Huge2M, MEM) {
        eprintln!("SKIPPED huge bench: {e}");
        return;
    }
    let keys = SessionKeys::test_only_unauthenticated(MigrationId(1)).expect("keys");
    let mut g = c.benchmark_group("huge");
    g.throughput(Throughput::Bytes(MEM));
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    for (name, backing) in [("4KiB", PageBacking::Small), ("2MiB", PageBacking::Huge2M)] {
        let mem = on(backing, MEM).expect("guest memory");
        workload::fill(&mem, 7, 0.0);
        for integrity in [Integrity::AeadSha256, Integrity::Aead] {
            let mut tx = Sealer::new(&keys, Direction::ToDestination, StreamId(0), AeadBackend::Ring);
            let mut out: Vec<u8> = Vec::with_capacity(2 << 20);
            g.bench_function(format!("seal/{}/{name}", integrity.as_str()), |b| {
                b.iter(|| seal_image(&mem, integrity, &mut tx, &mut out, Some(1 << 20)))
            });
        }
    }
    g.finish();
    const PREFAULT: u64 = 1 << 30;
    let mut g = c.benchmark_group("huge");
    g.throughput(Throughput::Bytes(PREFAULT));
    g.sample_size(10).measurement_time(Duration::from_secs(6));
    for (name, backing) in [("4KiB", PageBacking::Small), ("2MiB", PageBacking::Huge2M)] {
        if on(backing, PREFAULT).is_err() {
            eprintln!("SKIPPED huge/prefault_1GiB/{name}: not enough huge pages for 1 GiB");
            continue;
        }
        g.bench_function(format!("prefault_1GiB/{name}"), |b| {
            b.iter_batched(
                || on(backing, PREFAULT).expect("guest memory"),
                |m| {
                    m.prefault().expect("prefault");
                    m
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, ceiling, seal, open, stage, huge, dirty_scan);
criterion_main!(benches);
