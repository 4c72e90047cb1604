//! `Decide` over a realistic 20-rule policy and a mix of realistic requests, side by side
//! with the same policy written in Rego (evaluated by `regorus`, the engine reused) and as
//! one CEL expression (`cel-interpreter`, compiled once): the engines a platform team might
//! route with instead. All three must agree on every request before anything is timed.
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

    // The peers, on the same requests (inputs built once, outside the timing, as ours are).
    let inputs: Vec<serde_json::Value> = reqs.iter().map(as_json).collect();
    let mut rego = regorus::Engine::new();
    rego.add_policy(
        "policy-20-rules.rego".into(),
        include_str!("peers/policy-20-rules.rego").into(),
    )
    .expect("Rego policy parses");
    let rego_inputs: Vec<regorus::Value> = inputs
        .iter()
        .map(|j| regorus::Value::from_json_str(&j.to_string()).expect("input"))
        .collect();
    let cel = cel_interpreter::Program::compile(include_str!("peers/policy-20-rules.cel"))
        .expect("CEL compiles");
    let cel_contexts: Vec<cel_interpreter::Context> = inputs
        .iter()
        .map(|j| {
            let mut ctx = cel_interpreter::Context::default();
            ctx.add_variable("r", j.clone()).expect("CEL variable");
            ctx
        })
        .collect();
    let mut rego_route = |i: usize| {
        rego.set_input(rego_inputs[i].clone());
        rego.eval_rule("data.edgewise.route".into())
            .expect("evaluates")
    };
    for (i, r) in reqs.iter().enumerate() {
        let ours = policy.decide(r).target.name.to_string();
        let theirs = rego_route(i);
        assert_eq!(
            theirs.as_string().map(|s| s.to_string()).ok(),
            Some(ours.clone()),
            "Rego, request {i}"
        );
        let cel_said = cel.execute(&cel_contexts[i]).expect("CEL runs");
        assert_eq!(
            cel_said,
            cel_interpreter::Value::String(ours.into()),
            "CEL, request {i}"
        );
    }
    let mut i = 0;
    c.bench_function("decide/20_rules_mixed/regorus", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(rego_route(black_box(i)))
        })
    });
    let mut i = 0;
    c.bench_function("decide/20_rules_mixed/cel-interpreter", |b| {
        b.iter(|| {
            i = (i + 1) % reqs.len();
            black_box(cel.execute(black_box(&cel_contexts[i])).expect("CEL runs"))
        })
    });
}

/// A request as the JSON document the Rego and CEL policies read.
fn as_json(r: &Request<'_>) -> serde_json::Value {
    let attributes: serde_json::Map<String, serde_json::Value> = r
        .attributes
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).into()))
        .collect();
    serde_json::json!({
        "requestId": r.request_id,
        "task": r.task,
        "dataClass": r.data_class,
        "inputTokens": r.input_tokens,
        "latencyBudgetMs": r.latency_budget_ms,
        "network": match r.network {
            Network::Online => "online",
            Network::Offline => "offline",
            Network::Metered => "metered",
        },
        "battery": r.battery,
        "complexity": r.complexity,
        "modelVersion": r.model_version,
        "attributes": attributes,
    })
}

criterion_group!(benches, bench);
criterion_main!(benches);
