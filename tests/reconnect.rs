//! A gateway restart: agents reconnect with backoff and full jitter and converge again,
//! without a stampede — their attempts spread over the backoff window.

use std::sync::atomic::Ordering;
use std::time::Duration;

use edgewise_agent::device::Connection;
use edgewise_operator::gateway::Change;
use edgewise_tests::proxy::{Behaviour, Proxy};
use edgewise_tests::*;

const AGENTS: usize = 50;

fn policy(default_fallback: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "targets": [
            {"name": "on-device", "device": {"model": "assistant"}},
            {"name": "cloud", "cloud": {"endpoint": "https://cloud.example.com/v1", "model": "big"}}
        ],
        "default": {"route": "on-device", "fallback": default_fallback}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reconnect_after_a_gateway_restart_without_a_stampede() {
    let mut h = Harness::start().await;
    h.apply([Change::ApplyPolicy(routing_policy("p", policy(&["cloud"])))]);
    // Agents reach the gateway through a proxy that records every connection attempt.
    let proxy = Proxy::start(h.gateway_addr, Behaviour::default()).await;
    let agents: Vec<TestAgent> = (0..AGENTS)
        .map(|i| {
            TestAgent::start(
                &h.dir.path().join(format!("agent-{i}")),
                // TLS end to end through the relay: the certificate names 127.0.0.1.
                &format!("https://{}", proxy.addr),
                facts("linux", "x86_64", 4096, &[]),
                None,
            )
        })
        .collect();
    let first = eventually(
        Duration::from_secs(30),
        "every agent to get the policy",
        || async {
            let versions: Vec<Option<String>> =
                agents.iter().map(|a| a.device.policy.version()).collect();
            versions
                .iter()
                .all(Option::is_some)
                .then(|| versions[0].clone())
                .flatten()
        },
    )
    .await;

    let before = proxy.accepted_at().len();
    let stopped_at = proxy.counters.accepted_at.lock().expect("lock").len();
    let outage_start = tokio::time::Instant::now();
    h.stop_gateway().await;
    let t0 = proxy_clock(&proxy).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    h.restart_gateway().await;
    let outage = outage_start.elapsed();

    eventually(
        Duration::from_secs(30),
        "every agent to reconnect",
        || async {
            agents
                .iter()
                .all(|a| *a.device.connection.borrow() == Connection::Connected)
                .then_some(())
        },
    )
    .await;
    // Converged: a policy change after the restart reaches everyone.
    h.apply([Change::ApplyPolicy(routing_policy("p", policy(&[])))]);
    eventually(
        Duration::from_secs(30),
        "the new policy everywhere",
        || async {
            agents
                .iter()
                .all(|a| a.device.policy.version().is_some_and(|v| v != first))
                .then_some(())
        },
    )
    .await;

    // The first attempts after the outage began, one per agent: spread, not a burst.
    let attempts: Vec<f64> = proxy.accepted_at()[stopped_at.max(before)..]
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0 - t0)
        .filter(|ms| *ms >= 0.0 && *ms <= outage.as_secs_f64() * 1000.0)
        .collect();
    assert!(
        attempts.len() >= AGENTS,
        "{} attempts during the outage",
        attempts.len()
    );
    let mut firsts = attempts[..AGENTS].to_vec();
    firsts.sort_by(f64::total_cmp);
    let span = firsts[AGENTS - 1] - firsts[0];
    let busiest_20ms = firsts
        .iter()
        .map(|start| {
            firsts
                .iter()
                .filter(|t| **t >= *start && **t < *start + 20.0)
                .count()
        })
        .max()
        .unwrap_or(0);
    eprintln!(
        "reconnect: first attempts span {span:.0} ms, busiest 20 ms window {busiest_20ms}, {:.1} attempts per agent",
        attempts.len() as f64 / AGENTS as f64
    );
    // Without jitter all 50 land within a few ms. With full jitter over a 100 ms floor the
    // 50 earliest attempts (fast agents' retries among them) span roughly 50–90 ms.
    assert!(
        span >= 25.0,
        "first reconnect attempts within {span:.1} ms: a stampede"
    );
    // A stampede puts all 50 in one 20 ms window; jittered, the busiest holds 10–25.
    assert!(
        busiest_20ms <= AGENTS * 2 / 3,
        "{busiest_20ms} of {AGENTS} first attempts in one 20 ms window"
    );
    // And no tight loop: with a 100 ms floor doubling to 2 s, a 3 s outage costs a handful
    // of attempts per agent.
    let per_agent = attempts.len() as f64 / AGENTS as f64;
    assert!(
        per_agent <= 10.0,
        "{per_agent:.1} attempts per agent during a 3 s outage"
    );
    let total_sync_attempts: u64 = agents
        .iter()
        .map(|a| a.device.stats.sync_attempts.load(Ordering::Relaxed))
        .sum();
    assert!(total_sync_attempts >= 2 * AGENTS as u64);
    for a in agents {
        a.stop().await;
    }
}

/// The proxy's clock now, in ms since it started.
async fn proxy_clock(proxy: &Proxy) -> f64 {
    // The proxy stamps accepts with its own start; connect once to read "now" on it.
    let n = proxy.accepted_at().len();
    let _ = tokio::net::TcpStream::connect(proxy.addr).await;
    eventually(Duration::from_secs(5), "probe connection", || async {
        let all = proxy.accepted_at();
        (all.len() > n).then(|| {
            all[n..]
                .iter()
                .map(|d| d.as_secs_f64() * 1000.0)
                .fold(f64::MAX, f64::min)
        })
    })
    .await
}

/// Recovery without a restart: a control plane restarted with its key kept lets agents
/// reconnect on the credentials they hold; one that comes back with a new key and new
/// tokens makes them re-enrol, with the token read again from its file once it is rotated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_recover_from_a_new_control_plane_key_and_a_rotated_token_without_restarting() {
    let mut h = Harness::start().await;
    h.apply([Change::ApplyPolicy(routing_policy("p", policy(&[])))]);
    let token_file = h.dir.path().join("bootstrap-token");
    std::fs::write(&token_file, TOKEN).expect("token");
    let agent = TestAgent::start_with_token(
        &h.dir.path().join("agent"),
        &h.gateway_url(),
        facts("linux", "x86_64", 4096, &[]),
        None,
        edgewise_agent::config::TokenSource::File(token_file.clone()),
    );
    let credential = |a: &TestAgent| {
        a.device
            .identity
            .lock()
            .expect("identity")
            .credential()
            .map(|c| c.token.clone())
    };
    let connected = |a: &TestAgent| *a.device.connection.borrow() == Connection::Connected;
    eventually(Duration::from_secs(20), "the agent to connect", || async {
        connected(&agent).then_some(())
    })
    .await;
    let first = credential(&agent).expect("enrolled");

    // Same key: the agent reconnects on the credential it has.
    h.restart_gateway().await;
    eventually(
        Duration::from_secs(20),
        "a reconnect after the restart",
        || async {
            (connected(&agent) && agent.device.stats.sync_attempts.load(Ordering::Relaxed) > 1)
                .then_some(())
        },
    )
    .await;
    assert_eq!(credential(&agent), Some(first.clone()), "no re-enrolment");

    // New key and new tokens: the credential is refused, the old token too, until the
    // token file holds the new one.
    let rotated = "rotated-bootstrap-token-0123456789";
    h.replace_gateway(
        edgewise_operator::gateway::keys::KeyRing::new(&[9; 32], &[]),
        vec![edgewise_operator::gateway::BootstrapToken {
            name: "rotated".into(),
            token: rotated.into(),
            labels: Default::default(),
            expires_at: None,
            max_devices: None,
        }],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !connected(&agent),
        "the old credential and token are refused"
    );
    std::fs::write(&token_file, rotated).expect("rotates");
    eventually(
        Duration::from_secs(20),
        "re-enrolment with the rotated token",
        || async { connected(&agent).then_some(()) },
    )
    .await;
    assert_ne!(credential(&agent), Some(first), "a new credential");
    agent.stop().await;
}
