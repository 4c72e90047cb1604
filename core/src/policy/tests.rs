use proptest::prelude::*;

use super::spec::{Condition, RouteSpec, RoutingPolicySpec, RuleSpec};
use super::*;

const TWENTY_RULES: &str = include_str!("../../fixtures/policy-20-rules.yaml");

fn spec(yaml: &str) -> RoutingPolicySpec {
    serde_yaml_ng::from_str(yaml).expect("policy yaml parses")
}

fn twenty() -> CompiledPolicy {
    compile(&spec(TWENTY_RULES)).expect("fixture compiles")
}

fn request(task: &str) -> Request<'_> {
    Request {
        request_id: "req-1",
        task: Some(task),
        data_class: Some("public"),
        ..Request::default()
    }
}

fn issues(yaml: &str) -> Vec<String> {
    compile(&spec(yaml))
        .expect_err("policy must not compile")
        .issues
        .iter()
        .map(ToString::to_string)
        .collect()
}

const TARGETS: &str = r#"
targets:
  - {name: dev, device: {model: m}}
  - {name: cloud, cloud: {endpoint: "https://x", model: big, costPer1kTokensUsd: 0.01}}
"#;

#[test]
fn first_matching_rule_wins() {
    let p = twenty();
    let d = p.decide(&Request {
        data_class: Some("private"),
        ..request("reasoning")
    });
    assert_eq!(d.rule, "private-stays-on-device");
    assert_eq!(d.rule_index, Some(0));
    assert_eq!(&*d.target.name, "on-device");
    assert_eq!(d.fallback().len(), 0);

    let d = p.decide(&request("reasoning"));
    assert_eq!(d.rule, "deep-reasoning");
    assert_eq!(&*d.target.name, "cloud-large");
    assert_eq!(
        d.fallback().map(|t| &*t.name).collect::<Vec<_>>(),
        ["on-device"]
    );
}

#[test]
fn numeric_conditions_and_conjunctions() {
    let p = twenty();
    let long = Request {
        input_tokens: Some(9000),
        ..request("summarize")
    };
    assert_eq!(p.decide(&long).rule, "long-context");
    let short_translate = Request {
        input_tokens: Some(512),
        ..request("translate")
    };
    assert_eq!(p.decide(&short_translate).rule, "translate-short");
    let long_translate = Request {
        input_tokens: Some(513),
        ..request("translate")
    };
    assert_eq!(p.decide(&long_translate).rule, "translate-long");
    let low_battery_metered = Request {
        battery: Some(0.1),
        network: Network::Metered,
        ..request("chat")
    };
    assert_eq!(p.decide(&low_battery_metered).rule, "low-battery-metered");
}

#[test]
fn free_form_attributes_and_absent_values() {
    let p = twenty();
    let attrs = [("tenant", "acme-bank")];
    let d = p.decide(&Request {
        attributes: &attrs,
        ..request("chat")
    });
    assert_eq!(d.rule, "enterprise-tenant-pinned");
    let no_task = Request {
        task: None,
        ..request("")
    };
    assert_eq!(p.decide(&no_task).rule, "unknown-task");
    assert_eq!(p.decide(&request("poetry")).rule, "default");
    assert_eq!(p.decide(&request("poetry")).rule_index, None);
}

#[test]
fn offline_cloud_route_falls_back_to_the_device() {
    let p = compile(&spec(&format!(
        "{TARGETS}rules:\n  - {{match: [{{attribute: task, eq: big}}], route: cloud, fallback: [dev]}}\ndefault: {{route: dev}}"
    )))
    .expect("compiles");
    let online = p.decide(&request("big"));
    assert_eq!(&*online.target.name, "cloud");
    let offline = p.decide(&Request {
        network: Network::Offline,
        ..request("big")
    });
    assert_eq!(&*offline.target.name, "dev");
    assert_eq!(offline.reroute, Some(Reroute::Offline));
    assert_eq!(offline.fallback().len(), 0);
}

#[test]
fn reprocess_is_asked_only_for_offline_answers_of_a_reprocessing_rule() {
    let p = compile(&spec(&format!(
        "{TARGETS}rules:\n  - {{name: later, match: [{{attribute: task, eq: big}}], route: cloud, fallback: [dev], reprocess: true}}\n  - {{match: [{{attribute: task, eq: now}}], route: cloud, fallback: [dev]}}\ndefault: {{route: dev}}"
    )))
    .expect("compiles");
    let offline = |task| {
        p.decide(&Request {
            network: Network::Offline,
            ..request(task)
        })
    };
    let d = offline("big");
    assert_eq!(&*d.target.name, "dev");
    assert_eq!(d.reprocess.map(|t| &*t.name), Some("cloud"));
    // Online it runs in the cloud at once; a rule without the flag is not kept.
    assert!(p.decide(&request("big")).reprocess.is_none());
    assert!(offline("now").reprocess.is_none());
    // Over budget is not offline: the device answer is final.
    let spent = compile(&spec(&format!(
        "{TARGETS}rules:\n  - {{match: [{{attribute: task, eq: big}}], route: cloud, fallback: [dev], reprocess: true}}\ndefault: {{route: dev}}\nbudgets: {{cloudRequestsPerDevicePerDay: 0}}"
    )))
    .expect("compiles");
    assert!(spent.decide(&request("big")).reprocess.is_none());
}

#[test]
fn reprocess_needs_a_cloud_route_that_may_fall_back() {
    let found = issues(&format!(
        "{TARGETS}rules:\n  - {{route: dev, fallback: [cloud], reprocess: true}}\n  - {{route: cloud, reprocess: true}}\ndefault: {{route: dev}}"
    ));
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with("rules[0].reprocess: only a cloud route"),
        "{found:?}"
    );
    assert!(
        found[1].starts_with("rules[1].reprocess: a pinned route"),
        "{found:?}"
    );
}

#[test]
fn over_budget_uses_the_device() {
    let p = twenty();
    let spent = Request {
        cloud_requests_today: 500,
        ..request("reasoning")
    };
    let d = p.decide(&spent);
    assert_eq!(&*d.target.name, "on-device");
    assert_eq!(d.reroute, Some(Reroute::OverBudget));
    let within = Request {
        cloud_requests_today: 499,
        ..request("reasoning")
    };
    assert_eq!(&*p.decide(&within).target.name, "cloud-large");
}

#[test]
fn refine_is_offered_only_when_the_cloud_is_usable() {
    let p = twenty();
    let d = p.decide(&request("autocomplete"));
    assert_eq!(d.refine.map(|t| &*t.name), Some("cloud-small"));
    let offline = p.decide(&Request {
        network: Network::Offline,
        ..request("autocomplete")
    });
    // The offline rule comes first and pins the request to the device.
    assert_eq!(offline.rule, "offline-on-device");
    assert!(offline.refine.is_none());
}

#[test]
fn shadow_sampling_is_deterministic_and_near_the_rate() {
    let p = twenty();
    let ids: Vec<String> = (0..20_000).map(|i| format!("req-{i}")).collect();
    let sampled = |p: &CompiledPolicy| {
        ids.iter()
            .filter(|id| {
                p.decide(&Request {
                    request_id: id,
                    ..request("chat")
                })
                .shadow
                .is_some()
            })
            .count()
    };
    let first = sampled(&p);
    assert_eq!(first, sampled(&p), "same ids, same sample");
    // 2 % of 20,000 = 400; allow generous binomial slack.
    assert!((300..=500).contains(&first), "sampled {first}");
    // Pinned rules never shadow, even at the same ids.
    let private_shadowed = ids.iter().any(|id| {
        p.decide(&Request {
            request_id: id,
            data_class: Some("private"),
            ..request("chat")
        })
        .shadow
        .is_some()
    });
    assert!(!private_shadowed);
}

#[test]
fn version_is_a_content_hash() {
    let a = twenty();
    let b = twenty();
    assert_eq!(a.version(), b.version());
    assert_eq!(a.version().len(), 16);
    let mut changed = spec(TWENTY_RULES);
    changed.rules.swap(0, 1);
    assert_ne!(compile(&changed).expect("compiles").version(), a.version());
}

#[test]
fn every_error_is_reported_with_its_rule_index_and_field() {
    let found = issues(&format!(
        r#"{TARGETS}rules:
  - match: [{{attribute: inputTokens, in: ["5"]}}]
    route: dev
  - match: [{{attribute: colour, eq: red}}]
    route: nowhere
  - match: [{{attribute: task, gt: 3}}]
    route: dev
    fallback: [cloud, cloud]
  - match: [{{attribute: complexity, gt: 0.9, lt: 0.2}}]
    route: dev
    refine: cloud
  - match: [{{attribute: battery}}]
    route: dev
default: {{route: dev}}
shadow: {{sampleRate: 1.5, target: dev}}"#
    ));
    let expect = [
        "rules[0].match[0].in: inputTokens is a number",
        "rules[1].match[0].attribute: unknown attribute \"colour\"",
        "rules[1].route: no target named \"nowhere\"",
        "rules[2].match[0].gt: task is a string",
        "rules[2].fallback[1]: \"cloud\" is already the route or an earlier fallback",
        "rules[3].match[0]: the numeric bounds leave no value",
        "rules[3].refine: a pinned route (empty fallback) never leaves its target",
        "rules[4].match[0]: a condition needs at least one operator",
        "shadow.sampleRate: must be between 0 and 1",
        "shadow.target: \"dev\" is not a cloud target",
    ];
    for e in expect {
        assert!(
            found.iter().any(|f| f.starts_with(e)),
            "missing {e:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expect.len(), "{found:#?}");
}

#[test]
fn network_values_are_checked() {
    let found = issues(&format!(
        "{TARGETS}rules:\n  - {{match: [{{attribute: network, in: [wifi]}}], route: dev}}\ndefault: {{route: dev}}"
    ));
    assert_eq!(
        found,
        ["rules[0].match[0]: network \"wifi\" is not one of online, offline, metered"]
    );
}

#[test]
fn targets_must_be_exactly_one_kind_and_uniquely_named() {
    let found = issues(
        r#"
targets:
  - {name: a, device: {model: m}, cloud: {endpoint: "https://x", model: y}}
  - {name: a}
  - {name: c, cloud: {endpoint: "ftp://x", model: y, timeoutMs: 0}}
default: {route: a}"#,
    );
    assert_eq!(
        found,
        [
            "targets[0]: a target is exactly one of device or cloud",
            "targets[1].name: duplicate target name \"a\"",
            "targets[1]: a target is exactly one of device or cloud",
            "targets[2].cloud.timeoutMs: must be greater than 0",
            "targets[2].cloud.endpoint: must be an http(s) URL",
        ]
    );
}

// ---- properties ----

fn arb_condition() -> impl Strategy<Value = Condition> {
    prop_oneof![
        prop::sample::subsequence(vec!["chat", "reasoning", "autocomplete", "translate"], 1..3)
            .prop_map(|v| {
                Condition {
                    attribute: "task".into(),
                    in_: Some(v.into_iter().map(String::from).collect()),
                    ..Condition::default()
                }
            }),
        prop::sample::select(vec!["public", "private", "internal"]).prop_map(|v| Condition {
            attribute: "dataClass".into(),
            eq: Some(v.into()),
            ..Condition::default()
        }),
        (0u32..20_000).prop_map(|n| Condition {
            attribute: "inputTokens".into(),
            gt: Some(f64::from(n)),
            ..Condition::default()
        }),
        prop::sample::select(vec!["online", "offline", "metered"]).prop_map(|v| Condition {
            attribute: "network".into(),
            not_in: Some(vec![v.into()]),
            ..Condition::default()
        }),
        (0.0f64..=1.0).prop_map(|c| Condition {
            attribute: "complexity".into(),
            lte: Some(c),
            ..Condition::default()
        }),
    ]
}

const NAMES: [&str; 3] = ["dev", "cloud", "cloud2"];

fn arb_route() -> impl Strategy<Value = RouteSpec> {
    (
        0usize..3,
        prop::collection::vec(0usize..3, 0..3),
        prop::option::of(0usize..3),
        any::<bool>(),
    )
        .prop_map(|(r, fb, refine, reprocess)| {
            let mut fallback: Vec<String> = Vec::new();
            for f in fb {
                if f != r && !fallback.iter().any(|x| x == NAMES[f]) {
                    fallback.push(NAMES[f].into());
                }
            }
            // Keep generated policies valid: refine differs from route, and a pinned route may
            // only refine on the device.
            let refine = refine
                .filter(|&x| x != r && (!fallback.is_empty() || NAMES[x] == "dev"))
                .map(|x| NAMES[x].into());
            // Only a cloud route that may fall back is reprocessed.
            let reprocess = reprocess && NAMES[r] != "dev" && !fallback.is_empty();
            RouteSpec {
                route: NAMES[r].into(),
                fallback,
                refine,
                reprocess,
            }
        })
}

fn arb_policy() -> impl Strategy<Value = RoutingPolicySpec> {
    (
        prop::collection::vec((prop::collection::vec(arb_condition(), 0..3), arb_route()), 0..8),
        arb_route(),
        prop::option::of(0u32..5),
        0.0f64..=1.0,
    )
        .prop_map(|(rules, default, budget, shadow_rate)| {
            let mut spec = spec(&format!(
                "{TARGETS}  - {{name: cloud2, cloud: {{endpoint: \"https://y\", model: small}}}}\ndefault: {{route: dev}}\nshadow: {{sampleRate: {shadow_rate}, target: cloud}}"
            ));
            spec.rules = rules
                .into_iter()
                .map(|(conditions, route)| RuleSpec {
                    name: None,
                    conditions,
                    route,
                })
                .collect();
            spec.default = default;
            spec.budgets = budget.map(|b| spec::Budgets {
                cloud_requests_per_device_per_day: Some(b),
                cloud_spend_per_device_per_day_usd: None,
            });
            spec
        })
}

fn arb_request_parts() -> impl Strategy<Value = (u8, u8, u32, u8, f32, u32, u32)> {
    (
        0u8..5,
        0u8..3,
        0u32..20_000,
        0u8..3,
        0.0f32..=1.0,
        0u32..8,
        0u32..1_000_000,
    )
}

fn build_request<'a>(parts: (u8, u8, u32, u8, f32, u32, u32), id: &'a str) -> Request<'a> {
    let (task, class, tokens, net, complexity, used, _) = parts;
    Request {
        request_id: id,
        task: ["chat", "reasoning", "autocomplete", "translate", "ocr"]
            .get(usize::from(task))
            .copied(),
        data_class: ["public", "private", "internal"]
            .get(usize::from(class))
            .copied(),
        input_tokens: Some(tokens),
        network: [Network::Online, Network::Offline, Network::Metered][usize::from(net)],
        complexity: Some(complexity),
        cloud_requests_today: used,
        ..Request::default()
    }
}

proptest! {
    #[test]
    fn a_rule_with_an_empty_fallback_never_yields_another_target(
        policy in arb_policy(),
        parts in arb_request_parts(),
    ) {
        let compiled = compile(&policy).expect("generated policies are valid");
        let id = parts.6.to_string();
        let d = compiled.decide(&build_request(parts, &id));
        let route = match d.rule_index {
            Some(i) => &policy.rules[i].route,
            None => &policy.default,
        };
        if route.fallback.is_empty() {
            prop_assert_eq!(&*d.target.name, route.route.as_str());
            prop_assert_eq!(d.fallback().len(), 0);
            prop_assert!(d.shadow.is_none());
            prop_assert!(d.refine.is_none_or(|t| !t.is_cloud()));
            prop_assert!(d.reprocess.is_none());
        }
        // Reprocessing is asked only of device answers given offline, on the rule's cloud
        // route.
        if let Some(t) = d.reprocess {
            prop_assert!(t.is_cloud() && !d.target.is_cloud());
            prop_assert_eq!(d.reroute, Some(Reroute::Offline));
            prop_assert!(route.reprocess);
            prop_assert_eq!(&*t.name, route.route.as_str());
        }
    }

    #[test]
    fn a_private_rule_pinned_to_the_device_never_yields_a_cloud_target(
        mut policy in arb_policy(),
        parts in arb_request_parts(),
    ) {
        policy.rules.insert(0, RuleSpec {
            name: Some("private".into()),
            conditions: vec![Condition {
                attribute: "dataClass".into(),
                in_: Some(vec!["private".into()]),
                ..Condition::default()
            }],
            route: RouteSpec { route: "dev".into(), fallback: vec![], refine: None, reprocess: false },
        });
        let compiled = compile(&policy).expect("valid");
        let id = parts.6.to_string();
        let mut req = build_request(parts, &id);
        req.data_class = Some("private");
        let d = compiled.decide(&req);
        prop_assert!(!d.target.is_cloud());
        prop_assert!(d.fallback().all(|t| !t.is_cloud()));
        prop_assert!(d.refine.is_none_or(|t| !t.is_cloud()));
        prop_assert!(d.shadow.is_none());
    }

    #[test]
    fn offline_decisions_never_pick_the_cloud_when_a_device_target_can_serve(
        policy in arb_policy(),
        parts in arb_request_parts(),
    ) {
        let compiled = compile(&policy).expect("valid");
        let id = parts.6.to_string();
        let mut req = build_request(parts, &id);
        req.network = Network::Offline;
        let d = compiled.decide(&req);
        let pinned = match d.rule_index {
            Some(i) => policy.rules[i].route.fallback.is_empty(),
            None => policy.default.fallback.is_empty(),
        };
        if !pinned {
            prop_assert!(!d.target.is_cloud());
        }
        prop_assert!(d.shadow.is_none());
    }
}

#[test]
fn a_policy_says_which_costly_attributes_it_reads() {
    let p = twenty();
    assert!(p.reads_input_tokens(), "the fixture routes long prompts");
    let only_task = compile(&spec(&format!(
        "{TARGETS}rules:\n  - {{name: r, match: [{{attribute: task, eq: chat}}], route: cloud, fallback: [dev]}}\ndefault: {{route: dev, fallback: [cloud]}}\n"
    )))
    .expect("compiles");
    assert!(!only_task.reads_input_tokens());
    assert!(!only_task.reads_complexity());
    let by_complexity = compile(&spec(&format!(
        "{TARGETS}rules:\n  - {{name: r, match: [{{attribute: complexity, gte: 0.5}}], route: cloud, fallback: [dev]}}\ndefault: {{route: dev, fallback: [cloud]}}\n"
    )))
    .expect("compiles");
    assert!(by_complexity.reads_complexity());
    assert!(!by_complexity.reads_input_tokens());
}
