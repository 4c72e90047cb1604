//! `CompiledPolicy::decide` must not allocate: it runs on every request on the device.

use edgewise_core::policy::{Network, Request, compile, spec::RoutingPolicySpec};

#[test]
fn decide_does_not_allocate() {
    let spec: RoutingPolicySpec =
        serde_yaml_ng::from_str(include_str!("../fixtures/policy-20-rules.yaml"))
            .expect("fixture parses");
    let policy = compile(&spec).expect("compiles");
    let attrs = [("tenant", "globex"), ("cohort", "beta")];
    let requests = [
        Request {
            task: Some("chat"),
            data_class: Some("public"),
            ..Request::default()
        },
        Request {
            task: Some("autocomplete"),
            ..Request::default()
        },
        Request {
            task: Some("reasoning"),
            network: Network::Offline,
            ..Request::default()
        },
        Request {
            task: Some("email"),
            attributes: &attrs,
            cloud_requests_today: 10_000,
            ..Request::default()
        },
        Request {
            request_id: "r-42",
            task: Some("poetry"),
            input_tokens: Some(9_000),
            ..Request::default()
        },
    ];
    let mut cloud = 0;
    let info = allocation_counter::measure(|| {
        for _ in 0..100 {
            for r in &requests {
                let d = policy.decide(r);
                cloud += usize::from(d.target.is_cloud()) + d.fallback().len();
            }
        }
    });
    assert!(cloud > 0, "decisions were made");
    // The counter itself works: an allocation inside `measure` is seen.
    let probe = allocation_counter::measure(|| drop(std::hint::black_box(vec![0u8; 16])));
    assert!(probe.count_total >= 1);
    assert_eq!(
        info.count_total, 0,
        "decide allocated {} times",
        info.count_total
    );
}
