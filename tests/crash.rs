//! SIGKILL of a real `edgewise-agent run` process during download and during activation,
//! repeated: after every restart exactly one complete version is active.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use edgewise_agent::store::ModelsFile;
use edgewise_core::variant::Requirements;
use edgewise_operator::gateway::Change;
use edgewise_tests::proxy::{Behaviour, Proxy};
use edgewise_tests::*;
use sha2::{Digest, Sha256};

fn spawn_agent(config: &Path) -> Child {
    Command::new(workspace_binary("edgewise-agent"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("agent starts")
}

fn kill(mut child: Child) {
    // SIGKILL: no chance to clean up.
    child.kill().expect("kill");
    child.wait().expect("reap");
}

/// Exactly one complete version is active: the state file parses, names one install per
/// model, and that install's file is complete and hashes to its digest.
fn assert_one_complete_version(data: &Path, allowed: &[&str]) -> String {
    let text = std::fs::read_to_string(data.join("models.json")).expect("models.json exists");
    let state: ModelsFile = serde_json::from_str(&text).expect("models.json is never torn");
    let slots = state.models.get("m").expect("a version is active");
    let active = &slots.active;
    assert!(
        allowed.contains(&active.version.as_str()),
        "active {}",
        active.version
    );
    let bytes = std::fs::read(&active.path).expect("active artifact exists");
    assert_eq!(
        bytes.len() as u64,
        active.size_bytes,
        "active artifact is complete"
    );
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        active.sha256,
        "active artifact is intact"
    );
    active.version.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_download_and_activation_always_leaves_one_complete_version() {
    let h = Harness::start().await;
    const SIZE: usize = 2 * 1024 * 1024;
    const ROUNDS: usize = 8;
    // Throttled so a download takes about a second and kills land inside it.
    let proxy = Proxy::start(
        h.s3.addr(),
        Behaviour {
            bytes_per_sec: Some(2 * 1024 * 1024),
            ..Behaviour::default()
        },
    )
    .await;
    let (gateway, gateway_url, stop) = h.extra_gateway(&proxy.url()).await;
    let any = Requirements::default();
    // 1.0.0 is small; every round then rolls out a new large version, so each round has a
    // download and an activation in flight when the process dies.
    let mut artifacts = Vec::new();
    for i in 0..=ROUNDS {
        let version = format!("{}.0.0", i + 1);
        let size = if i == 0 { 100 * 1024 } else { SIZE };
        let artifact = h
            .put_artifact(
                &format!("m/{version}/model.bin"),
                artifact_bytes(size, i as u8),
            )
            .await;
        gateway
            .snapshots()
            .apply([Change::ApplyVersion(model_version(
                "m",
                &version,
                vec![variant("cpu", artifact.clone(), any.clone())],
            ))]);
        artifacts.push((version, artifact));
    }
    let set_version = |v: &str| {
        gateway
            .snapshots()
            .apply([Change::ApplyRollout(rollout("m").stable(v).build())])
    };
    set_version("1.0.0");

    let dir = h.dir.path().join("agent");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("token"), TOKEN).expect("token");
    let config = dir.join("agent.toml");
    // The data plane on any free port: 8088 may be taken where the tests run.
    std::fs::write(
        &config,
        format!(
            "gateway = \"{gateway_url}\"\nbootstrap_token_file = \"{}\"\ndata_dir = \"{}\"\n[tls]\nca_file = \"{}\"\n[hardware]\nmemory_mib = 4096\n[sync]\nbackoff_initial_ms = 50\nbackoff_max_ms = 500\n[data_plane]\nlisten = \"127.0.0.1:0\"\n",
            dir.join("token").display(),
            dir.join("data").display(),
            test_pki().ca.display()
        ),
    )
    .expect("config");
    let data = dir.join("data");
    let has_active = |version: String| {
        let path = data.join("models.json");
        async move {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|t| serde_json::from_str::<ModelsFile>(&t).ok())
                .filter(|s| {
                    s.models
                        .get("m")
                        .is_some_and(|m| m.active.version == version)
                })
                .map(|_| ())
        }
    };

    let first = spawn_agent(&config);
    eventually(Duration::from_secs(30), "1.0.0 active", || {
        has_active("1.0.0".into())
    })
    .await;
    kill(first);
    assert_eq!(assert_one_complete_version(&data, &["1.0.0"]), "1.0.0");

    let mut seen = vec!["1.0.0".to_owned()];
    let mut kills_during_activation = 0;
    for (round, (version, artifact)) in artifacts.iter().enumerate().skip(1) {
        set_version(version);
        seen.push(version.clone());
        let partial = data.join("store/partial").join(&artifact.sha256);
        let blob = data.join("store/sha256").join(&artifact.sha256);
        let child = spawn_agent(&config);
        if round % 2 == 1 {
            // During the download, at a point that moves through it round by round.
            tokio::time::sleep(Duration::from_millis(200 + 100 * round as u64)).await;
        } else {
            // During activation: as soon as the last bytes land (verify, rename, switch).
            let reached = tokio::time::timeout(Duration::from_secs(20), async {
                loop {
                    let full = std::fs::metadata(&partial)
                        .is_ok_and(|m| m.len() as usize >= SIZE - 64 * 1024);
                    if full || blob.exists() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            kills_during_activation += usize::from(reached.is_ok());
        }
        kill(child);
        let allowed: Vec<&str> = seen.iter().map(String::as_str).collect();
        assert_one_complete_version(&data, &allowed);
    }
    assert!(
        kills_during_activation >= ROUNDS / 2 - 1,
        "kills landed at activation {kills_during_activation} times"
    );

    // A final restart finishes the last rollout from whatever the crashes left.
    let (last_version, _) = &artifacts[ROUNDS];
    let last = spawn_agent(&config);
    eventually(
        Duration::from_secs(30),
        "the last version active after the crashes",
        || has_active(last_version.clone()),
    )
    .await;
    kill(last);
    assert_eq!(
        assert_one_complete_version(&data, &[last_version.as_str()]),
        *last_version
    );
    let state: ModelsFile =
        serde_json::from_str(&std::fs::read_to_string(data.join("models.json")).expect("read"))
            .expect("json");
    assert!(
        state.models["m"].previous.is_some(),
        "the previous version is kept for rollback"
    );
    stop.cancel();
}
