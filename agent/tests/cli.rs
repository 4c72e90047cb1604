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
    std::fs::write(&cfg, "gateway = \"http://127.0.0.1:1\"\nbootstrap_token_file = \"/nonexistent/token\"\ndata_dir = \"d\"\n")
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
fn status_reports_an_empty_data_dir_plainly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = agent()
        .args(["status", "--data-dir"])
        .arg(dir.path())
        .output()
        .expect("runs");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("the agent has not run here"), "{stdout}");
    assert!(stdout.contains("MODEL"), "{stdout}");
}
