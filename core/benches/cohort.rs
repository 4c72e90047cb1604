//! Cohort bucketing cost: one SHA-256 over salt ‖ device id per device.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use edgewise_core::cohort::{bucket, in_cohort};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let ids: Vec<String> = (0..1024)
        .map(|i| format!("device-{i:08x}-3f9a-4c1e"))
        .collect();
    let mut i = 0;
    c.bench_function("cohort/bucket", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            bucket(black_box("default/assistant-eu"), black_box(&ids[i]))
        })
    });
    c.bench_function("cohort/in_cohort_25pct", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            in_cohort(
                black_box("default/assistant-eu"),
                black_box(&ids[i]),
                black_box(25),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
