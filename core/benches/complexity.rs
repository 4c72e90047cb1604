//! The learned router's score per request (`ComplexityModel::score`), on a 4,096-bucket
//! model with word pairs, for a short chat turn and a 1,000-word document.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use edgewise_core::complexity::{ComplexityModel, FORMAT};
use std::hint::black_box;

fn model() -> ComplexityModel {
    let buckets = 4096u32;
    ComplexityModel {
        format: FORMAT.into(),
        buckets,
        bigrams: true,
        // Deterministic, varied weights: the score's cost does not depend on their values.
        weights: (0..buckets)
            .map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0)
            .collect(),
        length_weight: 0.3,
        bias: -0.5,
    }
}

fn complexity(c: &mut Criterion) {
    let m = model();
    let short = "why does the model answer on the device when the network is metered?";
    let long = "explain the cost of the cloud and the latency of the network today ".repeat(80);
    let mut g = c.benchmark_group("complexity");
    g.bench_function("chat_turn_13_words", |b| {
        b.iter(|| m.score(black_box(short)))
    });
    g.bench_function("document_1040_words", |b| {
        b.iter(|| m.score(black_box(&long)))
    });
    g.finish();
}

criterion_group!(benches, complexity);
criterion_main!(benches);
