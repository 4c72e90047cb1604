//! The Helm chart lints cleanly (strict) and renders, with the Helm v4 SDK: CRDs, both
//! Deployments with arguments the binary accepts (also with a TLS Secret), RBAC, the Service,
//! the schema migration Job, a PodDisruptionBudget and an ingress NetworkPolicy for each
//! Deployment, and one dashboard ConfigMap per dashboard; nothing random, so two renders
//! are the same (the credential keys are made in the cluster by the controller).

use std::path::PathBuf;
use std::process::Command;

use clap::Parser;

#[test]
fn the_chart_lints_and_renders_what_the_operator_needs() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("fixtures/helm_check.py"))
        .arg(root.join("../charts/edgewise"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "helm check failed (the test command installs helm-python-sdk): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["lint_errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["crds"], 3);
    let docs = report["docs"].as_array().expect("docs");
    let mut kinds: Vec<&str> = docs
        .iter()
        .map(|d| d["kind"].as_str().expect("kind"))
        .collect();
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ConfigMap",
            "ConfigMap",
            "ConfigMap",
            "ConfigMap",
            "Deployment",
            "Deployment",
            "Job",
            "NetworkPolicy",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "ServiceAccount"
        ]
    );
    // The gateway's identity reads, and writes nothing but ConfigMaps in its namespace
    // (capped tokens' enrolled devices); the controller's writes.
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role")
    {
        let name = d["name"].as_str().expect("name");
        let verbs = &d["verbs"];
        if name.ends_with("-gateway") && d["kind"] == "ClusterRole" {
            assert_eq!(
                verbs,
                &serde_json::json!(["get", "list", "watch"]),
                "{name}"
            );
        } else if name.ends_with("-gateway") {
            assert_eq!(d["writes"], serde_json::json!(["configmaps"]), "{name}");
        } else {
            assert!(name.ends_with("-controller"), "{name}");
            if d["kind"] == "Role" {
                assert_eq!(
                    verbs,
                    &serde_json::json!(["create", "get", "list", "patch", "update", "watch"]),
                    "{name}: its Lease, and the credential key Secret made once"
                );
            }
            assert!(
                verbs
                    .as_array()
                    .expect("verbs")
                    .contains(&serde_json::json!("patch")),
                "{name}"
            );
        }
    }
    let with_tls = serde_json::json!({"name": "gateway with TLS", "args": report["tls_args"]});
    for d in docs
        .iter()
        .filter(|d| d["kind"] == "Deployment")
        .chain([&with_tls])
    {
        let args: Vec<String> = d["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("str").to_owned())
            .collect();
        let mut argv = vec!["edgewise-operator".to_owned()];
        argv.extend(args);
        if let Err(e) = edgewise_operator::cli::Cli::try_parse_from(&argv) {
            panic!(
                "{}: the binary refuses its chart arguments {argv:?}: {e}",
                d["name"]
            );
        }
    }
    assert!(
        with_tls["args"]
            .as_array()
            .is_some_and(|a| a.contains(&serde_json::json!(
                "--tls-cert-file=/etc/edgewise/tls/tls.crt"
            ))),
        "{report}"
    );
    assert_eq!(report["tls_secret"], serde_json::json!(["gateway-tls"]));
    assert_eq!(report["deterministic"], true, "two renders differ");
    assert_eq!(
        report["certificates"],
        serde_json::json!([{"secretName": "gateway-tls", "issuer": "letsencrypt",
                            "dnsNames": ["gateway.example.com"]}]),
        "cert-manager issues into the Secret the gateway mounts"
    );
}
