//! The `edgewise-agent` binary: bad configuration exits non-zero with a message naming the
//! problem, and `status` reads a data dir. (Also makes cargo build the binary that the
//! end-to-end crash tests run.)

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_edgewise-agent"))
}

/// `edgewise-agent run --config cfg`, which must fail: its stderr.
fn run_fails(cfg: &std::path::Path) -> String {
    let out = agent()
        .args(["run", "--config"])
        .arg(cfg)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_bad_config_exits_with_a_clear_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "gateway = \"http://127.0.0.1:1\"\ninsecure = true\nbootstrap_token_file = \"/nonexistent/token\"\ndata_dir = \"d\"\n")
        .expect("write");
    let stderr = run_fails(&cfg);
    assert!(stderr.contains("reading /nonexistent/token"), "{stderr}");

    std::fs::write(&cfg, "gateway = 7\n").expect("write");
    let stderr = run_fails(&cfg);
    assert!(
        stderr.contains("agent.toml") && stderr.contains("gateway"),
        "{stderr}"
    );
}

#[test]
fn status_of_a_data_dir_where_no_agent_ran_fails_plainly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = agent()
        .args(["status", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(!out.status.success(), "exit 1 when no agent has run there");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no agent has run with data dir"),
        "{stderr}"
    );
}

/// A config for an agent whose gateway is nowhere (nothing here needs one).
fn lonely_config(dir: &std::path::Path) -> std::path::PathBuf {
    std::fs::write(dir.join("token"), "t0k3n-0123456789").expect("token");
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "gateway = \"http://127.0.0.1:9\"\ninsecure = true\nbootstrap_token_file = \"{0}/token\"\ndata_dir = \"{0}/data\"\nprobe_network = false\n[sync]\nbackoff_initial_ms = 50\nbackoff_max_ms = 200\n",
            dir.display()
        ),
    )
    .expect("config");
    cfg
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn one_agent_per_data_dir_and_status_tells_live_from_saved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = lonely_config(dir.path());
    let mut first = agent()
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("starts");
    let socket = dir.path().join("data/router.sock");
    wait_for("the first agent's socket", || socket.exists());

    // A second agent on the same data dir refuses to start, naming the first, and leaves
    // the first one's socket alone.
    let stderr = run_fails(&cfg);
    assert!(
        stderr.contains(&format!("another agent (pid {})", first.id())),
        "{stderr}"
    );
    assert!(
        socket.exists(),
        "the second agent did not take or remove the socket"
    );

    let status = |extra: &[&str]| {
        let out = agent()
            .args(["status", "--config"])
            .arg(&cfg)
            .args(extra)
            .output()
            .expect("runs");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "status fails: {stderr}");
        stdout
    };
    wait_for("status.json", || {
        dir.path().join("data/status.json").exists()
    });
    let live = status(&[]);
    assert!(
        live.contains(&format!("agent       running (pid {})", first.id())),
        "{live}"
    );
    assert!(live.contains("gateway     http://127.0.0.1:9 ("), "{live}");
    let json: serde_json::Value =
        serde_json::from_str(&status(&["--output", "json"])).expect("json");
    assert_eq!(json["source"], "live");
    assert_eq!(json["status"]["pid"], first.id());

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status();
    assert!(first.wait().expect("exits").success());
    let saved = status(&[]);
    assert!(
        saved.contains("agent       not running; its last state, saved"),
        "{saved}"
    );
    assert!(
        saved.contains("was "),
        "the connection is in the past tense: {saved}"
    );
    let json: serde_json::Value = serde_json::from_str(&status(&["-o", "json"])).expect("json");
    assert_eq!(json["source"], "saved");
}

/// `[sockets]` narrows who may use the Router and data-plane sockets to listed uids and
/// gids, judged by the kernel's peer credentials: an unlisted process is hung up on before
/// a byte is read, a listed one is served.
#[test]
fn the_unix_sockets_serve_only_the_peers_the_config_allows() {
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    // The tempdir is ours: its owner and group are this process's uid and gid.
    let me = std::fs::metadata(dir.path()).expect("metadata");
    for (uids, admitted) in [(me.uid() + 1, false), (me.uid(), true)] {
        let cfg = lonely_config(dir.path());
        let mut text = std::fs::read_to_string(&cfg).expect("config");
        text.push_str(&format!(
            "[data_plane]\nlisten = \"127.0.0.1:0\"\nsocket = \"{}/openai.sock\"\n[sockets]\nallowed_uids = [{uids}]\nallowed_gids = [{}]\n",
            dir.path().display(),
            me.gid() + 1
        ));
        std::fs::write(&cfg, text).expect("config");
        let mut agent = Running(
            agent()
                .args(["run", "--config"])
                .arg(&cfg)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("starts"),
        );
        let sockets = [
            dir.path().join("openai.sock"),
            dir.path().join("data/router.sock"),
        ];
        wait_for("both sockets", || sockets.iter().all(|s| s.exists()));
        let mut client = std::os::unix::net::UnixStream::connect(&sockets[0]).expect("connects");
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        // Written before the verdict may be known; a refused peer's bytes are never read.
        let _ = client.write_all(b"GET /v1/models HTTP/1.1\r\nhost: agent\r\n\r\n");
        let mut answer = [0u8; 12];
        let got = client.read(&mut answer).map_or(0, |n| n);
        assert_eq!(
            String::from_utf8_lossy(&answer[..got]).starts_with("HTTP/1.1"),
            admitted,
            "uid list [{uids}], we are {}: {:?}",
            me.uid(),
            String::from_utf8_lossy(&answer[..got])
        );
        // The router socket: an admitted peer's preface is read (the connection stays open
        // waiting for more); a refused one is hung up on at once.
        let mut router = std::os::unix::net::UnixStream::connect(&sockets[1]).expect("connects");
        router
            .set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .expect("timeout");
        let hung_up = matches!(router.read(&mut answer), Ok(0));
        assert_eq!(hung_up, !admitted, "router socket, uid list [{uids}]");
        let _ = Command::new("kill")
            .args(["-TERM", &agent.0.id().to_string()])
            .status();
        assert!(agent.0.wait().expect("exits").success());
    }
}

/// An agent process, killed if a test fails before stopping it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
