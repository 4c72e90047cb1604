//! `Decide` over a realistic 20-rule policy and a mix of realistic requests.
#![allow(missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use edgewise_core::policy::{Network, Request, compile, spec::RoutingPolicySpec};
use std::hint::black_box;

fn requests() -> Vec<Request<'static>> {
    const TENANT: &[(&str, &str)] = &[("tenant", "globex")];
    let base = Request {
        request_id: "7f3c2a90-1b7e-4d1a-9c55-0a1e2f3b4c5d",
        task: Some("chat"),
        data_class: Some("public"),
        input_tokens: Some(350),
        latency_budget_ms: Some(800),
        network: Network::Online,
        battery: Some(0.64),
        complexity: Some(0.3),
        model_version: Some("2.1.0"),
        attributes: TENANT,
        cloud_requests_today: 42,
        cloud_spend_today_usd: 0.08,
    };
    vec![
        Request {
            data_class: Some("private"),
            ..base
        },
        Request {
            task: Some("autocomplete"),
            input_tokens: Some(40),
            ..base
        },
        Request {
            task: Some("summarize"),
            input_tokens: Some(12_000),
            ..base
        },
        Request {
            task: Some("reasoning"),
            complexity: Some(0.9),
            ..base
        },
        Request {
            task: Some("translate"),
            input_tokens: Some(200),
            ..base
        },
        Request {
            task: Some("chat"),
            complexity: Some(0.7),
            ..base
        },
        Request {
            task: Some("chat"),
            ..base
        },
        Request {
            task: Some("poetry"),
            network: Network::Metered,
            ..base
        },
        Request {
            task: Some("ocr"),
            battery: Some(0.5),
            ..base
        },
        Request {
            network: Network::Offline,
            ..base
        },
        Request {
            task: Some("email"),
            ..base
        },
        Request {
            task: Some("summarize"),
            model_version: Some("1.0.1"),
            ..base
        },
    ]
}

fn bench(c: &mut Criterion) {
    let spec: RoutingPolicySpec =
        serde_yaml_ng::from_str(include_str!("../fixtures/policy-20-rules.yaml"))
            .expect("fixture parses");
    let policy = compile(&spec).expect("fixture compiles");
    let reqs = requests();
    let mut i = 0;
    c.bench_function("decide/20_rules_mixed", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            let d = policy.decide(black_box(&reqs[i]));
            black_box(d.target);
        })
    });
    let worst = Request {
        task: Some("email"),
        ..reqs[6]
    };
    c.bench_function("decide/20_rules_default_route", |b| {
        b.iter(|| black_box(policy.decide(black_box(&worst)).target))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
