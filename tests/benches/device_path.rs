//! Device-path benchmarks (a bench binary, not timed tests). Run all with
//!
//! ```text
//! cargo bench -p edgewise-tests --bench device_path
//! ```
//!
//! or one with `-- unary`, `-- fanout 10000`, `-- fanout-peers 10000` (needs `mosquitto` and
//! `nats-server`, which `scripts/bench` installs), `-- decide-uds`, `-- download`, `-- download-bounds`,
//! `-- hash-locality`, `-- agent-rss`.
//! Results go to stdout; `docs/benchmarks.md` records them.
#![allow(missing_docs, clippy::unwrap_used)]

mod brokers;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use edgewise_agent::config::Backoff;
use edgewise_agent::simulate::{SimConfig, SimFleet};
use edgewise_core::policy::policy_version;
use edgewise_core::variant::{Artifact, Requirements};
use edgewise_operator::gateway::{BootstrapToken, Change, Gateway, GatewayConfig};
use edgewise_proto::router::DecideRequest;
use edgewise_tests::*;
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;

fn policy(fallback: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "targets": [
            {"name": "on-device", "device": {"model": "assistant"}},
            {"name": "cloud", "cloud": {"endpoint": "https://cloud.example.com/v1", "model": "big"}}
        ],
        "rules": [{"name": "private", "match": [{"attribute": "dataClass", "eq": "private"}], "route": "on-device"}],
        "default": {"route": "on-device", "fallback": fallback}
    })
}

/// The gateway in its own process, so its memory can be measured apart from the fleet.
async fn gateway_child() {
    let s3 =
        edgewise_operator::s3::S3Settings::with_endpoint("http://127.0.0.1:9", "x", "y").client();
    let gateway = Gateway::new(
        GatewayConfig {
            credential_keys: credential_keys(),
            ..GatewayConfig::default()
        },
        s3,
    );
    gateway.auth().set_bootstrap_tokens(vec![BootstrapToken {
        name: "bench".into(),
        token: TOKEN.into(),
        labels: BTreeMap::new(),
        expires_at: None,
        max_devices: None,
    }]);
    gateway
        .snapshots()
        .apply([Change::ApplyPolicy(routing_policy("p", policy(&["cloud"])))]);
    let stop = CancellationToken::new();
    let (addr, _task) = gateway.spawn(loopback(), stop.clone()).await.unwrap();
    println!("{addr}");
    let mut usr1 =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1()).unwrap();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    loop {
        tokio::select! {
            _ = usr1.recv() => gateway.snapshots().apply([Change::ApplyPolicy(routing_policy("p", policy(&[])))]),
            _ = term.recv() => break,
        }
    }
    stop.cancel();
}

/// [`gateway_child`] started from this bench binary: the process and its address.
async fn spawn_gateway_child() -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .arg("gateway-child")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = lines.next_line().await.unwrap().unwrap();
    (child, addr)
}

/// What one run of our fan-out measured.
struct Fanout {
    connect: Duration,
    change_to_last_ack: Duration,
    bytes_per_device: f64,
    /// CPU time the gateway and the simulated fleet spent from the change to the last ACK.
    gateway_cpu: Duration,
    fleet_cpu: Duration,
}

/// CPU time (user + system) process `pid` has used.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

async fn fanout(n: usize) {
    let m = fanout_run(n, 100).await;
    println!(
        "fanout n={n}: connect+enroll+first policy {:.2} s; policy change -> last ACK {:.1} ms (CPU: gateway {} ms, fleet {} ms); {:.1} KiB gateway RSS per idle device",
        m.connect.as_secs_f64(),
        m.change_to_last_ack.as_secs_f64() * 1000.0,
        m.gateway_cpu.as_millis(),
        m.fleet_cpu.as_millis(),
        m.bytes_per_device / 1024.0
    );
}

/// `n` simulated agents, `per_connection` of them sharing each HTTP/2 connection, against
/// a gateway in its own process.
async fn fanout_run(n: usize, per_connection: usize) -> Fanout {
    let (mut child, addr) = spawn_gateway_child().await;
    let pid = child.id().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = proc_status_kib(pid, "VmRSS:");
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let fleet = SimFleet::start(&SimConfig {
        devices: n,
        gateway: format!("http://{addr}"),
        tls: tls_for(&format!("http://{addr}")),
        bootstrap_tokens: vec![TOKEN.into()],
        data_dir: dir.path().to_owned(),
        backoff: Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(5),
        },
        devices_per_connection: per_connection,
        telemetry: false,
        traffic: None,
        runtime: false,
    })
    .unwrap();
    let first: edgewise_core::policy::spec::RoutingPolicySpec =
        serde_json::from_value(policy(&["cloud"])).unwrap();
    let second: edgewise_core::policy::spec::RoutingPolicySpec =
        serde_json::from_value(policy(&[])).unwrap();
    let (v1, v2) = (policy_version(&first), policy_version(&second));
    let all_on = |v: &str| {
        fleet
            .devices()
            .iter()
            .all(|d| d.policy.version().as_deref() == Some(v))
    };
    while !all_on(&v1) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = proc_status_kib(pid, "VmRSS:");

    // Policy change → last ACK: the device applies and ACKs in the same step, so the time
    // the last device runs the new version is the time of its ACK (± one poll).
    let (gateway_before, fleet_before) = (cpu_time(pid), cpu_time(std::process::id()));
    let t0 = Instant::now();
    Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .unwrap();
    while !all_on(&v2) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let change_to_last_ack = t0.elapsed();
    let gateway_cpu = cpu_time(pid).saturating_sub(gateway_before);
    let fleet_cpu = cpu_time(std::process::id()).saturating_sub(fleet_before);
    fleet.stop().await;
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait().await;
    Fanout {
        connect,
        change_to_last_ack,
        bytes_per_device: (loaded.saturating_sub(baseline) * 1024) as f64 / n as f64,
        gateway_cpu,
        fleet_cpu,
    }
}

/// The fan-out side by side with Mosquitto and nats-server delivering the same policy bytes
/// to as many subscribers, each on its own connection (issue 17). Ours runs twice: with
/// 100 simulated devices per HTTP/2 connection (the simulator's default) and with one
/// connection per device, as the brokers' subscribers have.
async fn fanout_peers(n: usize) {
    let payload = serde_json::to_vec(&policy(&[])).unwrap();
    let ours_shared = fanout_run(n, 100).await;
    let ours = fanout_run(n, 1).await;
    let mosquitto = brokers::fanout(brokers::Kind::Mosquitto, n, &payload).await;
    let nats = brokers::fanout(brokers::Kind::Nats, n, &payload).await;
    println!("fanout-peers n={n}, policy {} bytes", payload.len());
    println!("| System | Connect all | Change -> last ACK | Memory per connection |");
    println!("|---|---|---|---|");
    let row = |name: &str, connect: Duration, fanout: Duration, bytes: f64| {
        println!(
            "| {name} | {:.2} s | {:.1} ms | {:.1} KiB |",
            connect.as_secs_f64(),
            fanout.as_secs_f64() * 1000.0,
            bytes / 1024.0
        );
    };
    row(
        "Edgewise gateway, 1 device per connection",
        ours.connect,
        ours.change_to_last_ack,
        ours.bytes_per_device,
    );
    row(
        "Edgewise gateway, 100 devices per connection",
        ours_shared.connect,
        ours_shared.change_to_last_ack,
        ours_shared.bytes_per_device,
    );
    for (kind, m) in [
        (brokers::Kind::Mosquitto, &mosquitto),
        (brokers::Kind::Nats, &nats),
    ] {
        row(kind.name(), m.connect, m.fanout, m.bytes_per_connection);
    }
    for (what, m) in [
        ("1 per connection", &ours),
        ("100 per connection", &ours_shared),
    ] {
        println!(
            "ours, {what}: CPU from change to last ACK: gateway {} ms, simulated fleet {} ms",
            m.gateway_cpu.as_millis(),
            m.fleet_cpu.as_millis()
        );
    }
    for (kind, m) in [
        (brokers::Kind::Mosquitto, &mosquitto),
        (brokers::Kind::Nats, &nats),
    ] {
        println!(
            "ratio {}: change -> last ACK {:.2}x ours (1 per connection), memory per connection {:.2}x ours",
            kind.name(),
            m.fanout.as_secs_f64() / ours.change_to_last_ack.as_secs_f64(),
            m.bytes_per_connection / ours.bytes_per_device
        );
    }
}

/// Round trips a user feels one at a time, the kind a ~40 ms Nagle/delayed-ACK stall
/// would dominate (issue 17 found one): sequential Enroll calls on one HTTP/2 connection,
/// and from a Sync stream's Hello to its first message, against the gateway in its own
/// process.
async fn unary() {
    use edgewise_proto::fleet::fleet_client::FleetClient;
    use edgewise_proto::fleet::{AgentMessage, Hello, agent_message};
    let (mut child, addr) = spawn_gateway_child().await;
    let url = format!("http://{addr}");
    let mut fleet = FleetClient::new(fleet_channel(&url));
    let facts = edgewise_tests::facts("linux", "arm64", 1024, &[]);
    let mut enrolls = Vec::new();
    let mut credentials = Vec::new();
    for i in 0..220 {
        let id = edgewise_agent::identity::Identity::ephemeral();
        let request = id.enroll_request(TOKEN, &facts, &BTreeMap::new());
        let t = Instant::now();
        let response = fleet.enroll(request).await.unwrap().into_inner();
        // The first calls warm the connection and the gateway up.
        if i >= 20 {
            enrolls.push(t.elapsed());
        }
        credentials.push((id.device_id().to_owned(), response.credential));
    }
    let mut first_messages = Vec::new();
    for (device, credential) in credentials.iter().take(100) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(AgentMessage {
            kind: Some(agent_message::Kind::Hello(Hello {
                device_id: device.clone(),
                agent_version: "0.1.0".into(),
                facts: Some((&facts).into()),
                ..Hello::default()
            })),
        })
        .await
        .unwrap();
        let t = Instant::now();
        let mut stream = fleet
            .sync(with_credential(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                credential,
            ))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().expect("a first message");
        first_messages.push(t.elapsed());
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort_unstable();
        v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1000.0
    };
    println!(
        "unary: Enroll p50 {:.2} ms p99 {:.2} ms; Sync Hello -> first message p50 {:.2} ms p99 {:.2} ms (a Nagle stall would put them near 40 ms)",
        pct(&mut enrolls, 0.5),
        pct(&mut enrolls, 0.99),
        pct(&mut first_messages, 0.5),
        pct(&mut first_messages, 0.99)
    );
    let _ = child.kill().await;
}

/// An app asking a real `edgewise-agent run` process over its Unix socket, as apps do. The
/// agent starts offline with a persisted 20-rule policy.
async fn decide_uds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let spec: edgewise_core::policy::spec::RoutingPolicySpec =
        serde_yaml_like(include_str!("../../core/fixtures/policy-20-rules.yaml"));
    let file =
        serde_json::json!({"version": policy_version(&spec), "source": "bench/p", "spec": spec});
    std::fs::write(data.join("policy.json"), serde_json::to_vec(&file).unwrap()).unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let socket = dir.path().join("router.sock");
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "gateway = \"http://127.0.0.1:9\"\ninsecure = true\nbootstrap_token_file = \"{}\"\ndata_dir = \"{}\"\nrouter_socket = \"{}\"\n",
            dir.path().join("token").display(),
            data.display(),
            socket.display()
        ),
    )
    .unwrap();
    let mut agent = Command::new(workspace_binary("edgewise-agent"))
        .args(["run", "--config"])
        .arg(dir.path().join("agent.toml"))
        .env("RUST_LOG", "error")
        .spawn()
        .unwrap();
    while tokio::net::UnixStream::connect(&socket).await.is_err() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The app side on one thread, as a typical app client would run.
    let socket2 = socket.clone();
    let (grpc, lane) = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut grpc = router_client(socket2.clone()).await;
            let mut grpc_samples = Vec::with_capacity(20_000);
            for i in 0..22_000 {
                let req = decide_request(i);
                let t = Instant::now();
                grpc.decide(req).await.unwrap();
                if i >= 2_000 {
                    grpc_samples.push(t.elapsed());
                }
            }
            // The lane as shipped (the client polls for its answer), a client that never
            // polls, and calls 1 ms apart (the agent's poll has ended: both sides sleep).
            let mut lanes = Vec::new();
            for (poll, gap) in [
                (edgewise_agent::router::lane::DEFAULT_POLL, None),
                (Duration::ZERO, None),
                (
                    edgewise_agent::router::lane::DEFAULT_POLL,
                    Some(Duration::from_millis(1)),
                ),
            ] {
                let mut lane = edgewise_agent::router::lane::LaneClient::connect(&socket2)
                    .await
                    .unwrap()
                    .with_poll(poll);
                let calls = if gap.is_some() { 3_000 } else { 22_000 };
                let mut samples = Vec::with_capacity(calls);
                for i in 0..calls {
                    if let Some(gap) = gap {
                        tokio::time::sleep(gap).await;
                    }
                    let req = decide_request(i);
                    let t = Instant::now();
                    lane.decide(&req).await.unwrap();
                    if i >= calls / 10 {
                        samples.push(t.elapsed());
                    }
                }
                lanes.push(samples);
            }
            (grpc_samples, lanes)
        })
    })
    .join()
    .unwrap();
    let mut lanes = lane.into_iter();
    let runs = [
        ("gRPC, back to back", grpc),
        ("framed lane, back to back", lanes.next().unwrap()),
        ("framed lane, client not polling", lanes.next().unwrap()),
        ("framed lane, calls 1 ms apart", lanes.next().unwrap()),
    ];
    for (what, mut samples) in runs {
        samples.sort();
        let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1e6;
        println!(
            "decide over Unix socket, {what} (app process -> edgewise-agent process, 20-rule policy, {} calls): p50 {:.1} us, p99 {:.1} us",
            samples.len(),
            pct(0.50),
            pct(0.99)
        );
    }
    let _ = agent.kill();
    let _ = agent.wait();
}

/// The `i`-th of a rotation of realistic requests.
fn decide_request(i: usize) -> DecideRequest {
    let tasks = [
        "chat",
        "autocomplete",
        "reasoning",
        "translate",
        "summarize",
        "poetry",
    ];
    DecideRequest {
        request_id: format!("req-{i}"),
        task: Some(tasks[i % tasks.len()].into()),
        data_class: Some(
            if i.is_multiple_of(7) {
                "private"
            } else {
                "public"
            }
            .into(),
        ),
        input_tokens: Some((i as u32 * 37) % 12_000),
        ..Default::default()
    }
}

fn serde_yaml_like(text: &str) -> edgewise_core::policy::spec::RoutingPolicySpec {
    serde_yaml_ng::from_str(text).unwrap()
}

/// Uploads `size` bytes of pseudo-random data as `bucket/key`.
async fn put_large(h: &Harness, key: &str, size: u64) -> Artifact {
    let path = h.dir.path().join("upload.bin");
    let artifact = write_file(&path, key, size);
    h.s3_client
        .put_object()
        .bucket(BUCKET)
        .key(key)
        .body(
            aws_sdk_s3::primitives::ByteStream::from_path(&path)
                .await
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    artifact
}

/// Writes `size` bytes of pseudo-random data to `path`.
fn write_file(path: &Path, key: &str, size: u64) -> Artifact {
    use sha2::Digest;
    use std::io::Write;
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut hasher = sha2::Sha256::new();
    let mut block = [0u8; 1 << 16];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut written = 0;
    while written < size {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes());
        }
        let n = (size - written).min(block.len() as u64) as usize;
        file.write_all(&block[..n]).unwrap();
        hasher.update(&block[..n]);
        written += n as u64;
    }
    file.flush().unwrap();
    Artifact {
        uri: format!("s3://{BUCKET}/{key}"),
        sha256: hex::encode(hasher.finalize()),
        size_bytes: size,
        signature: None,
    }
}

const GIB: u64 = 1 << 30;

/// Uploads 1 GiB to the loopback S3 server, syncs it to disk and presigns a GET for it.
async fn presigned_gib(h: &Harness) -> (Artifact, String) {
    let artifact = put_large(h, "bench/1gib.bin", GIB).await;
    // The upload leaves a gigabyte of dirty pages: written back now, not during the download.
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    assert!(synced, "sync ran");
    let presigner = edgewise_operator::gateway::presign::Presigner::new(
        h.s3_client.clone(),
        Duration::from_secs(3600),
    );
    let url = presigner.url(&artifact).await.unwrap().url;
    (artifact, url)
}

/// GB/s of the agent's own download (`download::fetch`) into a fresh store.
async fn agent_fetch(
    h: &Harness,
    http: &reqwest::Client,
    url: &str,
    artifact: &Artifact,
    durable: bool,
) -> f64 {
    let dir = h.dir.path().join(format!("agent-store-{durable}"));
    let store = edgewise_agent::store::ContentStore::open(&dir, durable).unwrap();
    let counter = std::sync::atomic::AtomicU64::new(0);
    let t = Instant::now();
    edgewise_agent::download::fetch(
        http,
        &store,
        edgewise_agent::download::Fetch {
            url,
            sha256: &artifact.sha256,
            size: artifact.size_bytes,
            signature: None,
            signed_as: ("bench", "1.0.0", "cpu"),
            publisher: None,
        },
        |_, _| {},
        &counter,
    )
    .await
    .unwrap();
    let rate = gbps(t);
    std::fs::remove_dir_all(&dir).unwrap();
    rate
}

fn gbps(since: Instant) -> f64 {
    GIB as f64 / since.elapsed().as_secs_f64() / 1e9
}

/// `openssl speed -evp sha256` over 16 KiB blocks, in GB/s.
fn openssl_sha256() -> f64 {
    let out = Command::new("openssl")
        .args([
            "speed", "-evp", "sha256", "-bytes", "16384", "-seconds", "3",
        ])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find(|l| l.starts_with("sha256"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.trim_end_matches('k').parse::<f64>().ok())
        .map_or(0.0, |kbps| kbps * 1000.0 / 1e9);
    assert!(rate > 0.0, "openssl speed reported a rate: {text}");
    rate
}

async fn download() {
    let h = Harness::start().await;
    let (artifact, url) = presigned_gib(&h).await;
    let http = edgewise_agent::artifact_client().unwrap();
    let ours = agent_fetch(&h, &http, &url, &artifact, true).await;
    let ours_no_fsync = agent_fetch(&h, &http, &url, &artifact, false).await;

    let t = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("curl -s '{url}' | sha256sum"))
        .output()
        .unwrap();
    let curl = gbps(t);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&artifact.sha256),
        "curl saw the same bytes"
    );
    // The bound (issue 17): a bare socket read hashed in place, same URL, same run.
    let bound = socket_hash(&url, &artifact.sha256).await;
    let openssl = openssl_sha256();
    println!(
        "download+verify 1 GiB from loopback S3: edgewise {ours:.2} GB/s (non-durable store, as the simulator uses: {ours_no_fsync:.2} GB/s), curl|sha256sum {curl:.2} GB/s, bare socket + hash {bound:.2} GB/s, openssl sha256 {openssl:.2} GB/s (ratio to openssl {:.2}; non-durable {:.2})",
        ours / openssl,
        ours_no_fsync / openssl
    );
    println!(
        "ratio download: {:.2}x the bare-socket bound, {:.2}x curl|sha256sum",
        ours / bound,
        ours / curl
    );
}

/// Upper bounds for download + verify on this machine, side by side in one run: what the
/// same bytes cost with less and less of the product's work, against the openssl hash rate.
/// - `socket`: a bare HTTP/1.1 GET read from a blocking socket into one 1 MiB buffer and
///   hashed there: the kernel's copy and SHA-256 on one core, with no HTTP client and no disk.
/// - `client`: the agent's HTTP client, each chunk copied into a 1 MiB buffer and hashed
///   there, as `download::fetch` does, but nothing written.
/// - `client + disk`: the same while an unrelated thread writes 1 GiB with `O_DIRECT` from
///   one buffer it never touches, so the disk's own cost shows without the download waiting
///   on it.
/// - `agent`: the agent's durable download itself.
async fn download_bounds() {
    let h = Harness::start().await;
    let (artifact, url) = presigned_gib(&h).await;
    let http = edgewise_agent::artifact_client().unwrap();
    for round in 1..=3 {
        let socket = socket_hash(&url, &artifact.sha256).await;
        let client = client_copy_hash(&http, &url, &artifact.sha256).await;
        let writer = background_direct_writer(h.dir.path().join("unrelated.bin"));
        let client_disk = client_copy_hash(&http, &url, &artifact.sha256).await;
        let still_writing = !writer.is_finished();
        writer.join().unwrap();
        let agent = agent_fetch(&h, &http, &url, &artifact, true).await;
        let openssl = openssl_sha256();
        let ratio = |r: f64| r / openssl;
        println!(
            "round {round}: socket+hash {socket:.2} GB/s ({:.2}x openssl), client+copy+hash {client:.2} ({:.2}x), with disk writes alongside {client_disk:.2} ({:.2}x{}), agent durable {agent:.2} ({:.2}x), openssl {openssl:.2}",
            ratio(socket),
            ratio(client),
            ratio(client_disk),
            if still_writing {
                ""
            } else {
                ", writer finished first"
            },
            ratio(agent),
        );
    }
}

/// A bare HTTP/1.1 GET on a blocking socket: body read into one 1 MiB buffer, hashed there.
async fn socket_hash(url: &str, sha256: &str) -> f64 {
    use sha2::Digest;
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let (host, path, sha256) = (host.to_owned(), path.to_owned(), sha256.to_owned());
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let mut socket = std::net::TcpStream::connect(&host).unwrap();
        write!(socket, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut head = Vec::new();
        let mut digest = sha2::Sha256::new();
        let mut body = 0u64;
        while body == 0 {
            let n = socket.read(&mut buf).unwrap();
            assert!(n > 0, "the server answered");
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
                assert!(text.starts_with("http/1.1 200"), "{text}");
                assert!(text.contains(&format!("content-length: {GIB}")), "{text}");
                digest.update(&head[end + 4..]);
                body = (head.len() - end - 4) as u64;
            }
        }
        while body < GIB {
            let n = socket.read(&mut buf).unwrap();
            assert!(n > 0, "the body is complete");
            digest.update(&buf[..n]);
            body += n as u64;
        }
        assert_eq!(hex::encode(digest.finalize()), sha256);
        gbps(t)
    })
    .await
    .unwrap()
}

/// The agent's HTTP client; each chunk copied into a 1 MiB buffer and hashed from it.
async fn client_copy_hash(http: &reqwest::Client, url: &str, sha256: &str) -> f64 {
    use futures_util::StreamExt;
    use sha2::Digest;
    let t = Instant::now();
    let mut body = http.get(url).send().await.unwrap().bytes_stream();
    let mut buffer: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut digest = sha2::Sha256::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        if buffer.len() + chunk.len() > buffer.capacity() {
            buffer.clear();
        }
        let at = buffer.len();
        buffer.extend_from_slice(&chunk);
        digest.update(&buffer[at..]);
    }
    assert_eq!(hex::encode(digest.finalize()), sha256);
    gbps(t)
}

/// Writes 1 GiB to `path` with `O_DIRECT` from one aligned buffer, then removes it.
fn background_direct_writer(path: std::path::PathBuf) -> std::thread::JoinHandle<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    std::thread::spawn(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        let raw = vec![7u8; (1 << 20) + 4096];
        let start = raw.as_ptr().align_offset(4096);
        for i in 0..GIB >> 20 {
            file.write_all_at(&raw[start..start + (1 << 20)], i << 20)
                .unwrap();
        }
        drop(file);
        std::fs::remove_file(&path).unwrap();
    })
}

/// SHA-256 over a 1 GiB buffer, which no cache holds, against 1 GiB from a 1 MiB buffer the
/// core keeps in cache: why the download hashes each piece right after copying it.
fn hash_locality() {
    use sha2::Digest;
    const MIB: usize = 1 << 20;
    let far: Vec<u8> = (0..GIB as usize).map(|i| (i % 251) as u8).collect();
    let near = far[..MIB].to_vec();
    let rate = |hash: &dyn Fn(&mut sha2::Sha256)| {
        let mut digest = sha2::Sha256::new();
        let t = Instant::now();
        hash(&mut digest);
        std::hint::black_box(digest.finalize());
        gbps(t)
    };
    let cached = rate(&|d| (0..far.len() / MIB).for_each(|_| d.update(&near)));
    let uncached = rate(&|d| d.update(&far));
    println!(
        "SHA-256 over 1 GiB: from a cached 1 MiB buffer {cached:.2} GB/s, from memory no cache holds {uncached:.2} GB/s"
    );
}

async fn agent_rss() {
    let h = Harness::start().await;
    let artifact = put_large(&h, "bench/model.bin", GIB).await;
    h.apply([
        Change::ApplyPolicy(routing_policy("p", policy(&["cloud"]))),
        Change::ApplyVersion(model_version(
            "m",
            "1.0.0",
            vec![variant("cpu", artifact, Requirements::default())],
        )),
    ]);
    let dir = h.dir.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    std::fs::write(
        dir.join("agent.toml"),
        format!(
            "gateway = \"{}\"\nbootstrap_token_file = \"{}\"\ndata_dir = \"{}\"\n[tls]\nca_file = \"{}\"\n",
            h.gateway_url(),
            dir.join("token").display(),
            dir.join("data").display(),
            test_pki().ca.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(workspace_binary("edgewise-agent"))
        .args(["run", "--config"])
        .arg(dir.join("agent.toml"))
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let pid = child.id();
    while !dir.join("data/policy.json").exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = proc_status_kib(pid, "VmRSS:");
    let idle_peak = proc_status_kib(pid, "VmHWM:");
    h.apply([Change::ApplyRollout(rollout("m").build())]);
    let t = Instant::now();
    let mut peak = 0;
    while !std::fs::read_to_string(dir.join("data/models.json"))
        .unwrap_or_default()
        .contains("1.0.0")
    {
        peak = peak.max(proc_status_kib(pid, "VmRSS:"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "download did not finish"
        );
    }
    let hwm = proc_status_kib(pid, "VmHWM:");
    println!(
        "agent RSS: idle {:.1} MiB (peak so far {:.1} MiB); while downloading 1 GiB: max sampled {:.1} MiB, VmHWM {:.1} MiB; download+activate {:.1} s",
        idle as f64 / 1024.0,
        idle_peak as f64 / 1024.0,
        peak as f64 / 1024.0,
        hwm as f64 / 1024.0,
        t.elapsed().as_secs_f64()
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn main() {
    bench_main(|args| async move {
        match args.first().map(String::as_str) {
            Some("gateway-child") => gateway_child().await,
            Some("fanout") => {
                fanout(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1000)).await
            }
            Some("fanout-peers") => {
                fanout_peers(args.get(1).and_then(|n| n.parse().ok()).unwrap_or(10_000)).await
            }
            Some("unary") => unary().await,
            Some("decide-uds") => decide_uds().await,
            Some("download") => download().await,
            Some("download-bounds") => download_bounds().await,
            Some("hash-locality") => hash_locality(),
            Some("agent-rss") => agent_rss().await,
            _ => {
                unary().await;
                decide_uds().await;
                fanout(1_000).await;
                fanout(10_000).await;
                download().await;
                download_bounds().await;
                hash_locality();
                agent_rss().await;
            }
        }
    });
}
