//! `crds/` is generated from the Rust types; these tests fail when it is stale and check
//! that `edgewise-operator crds` prints exactly the same documents.
//!
//! Regenerate with `EDGEWISE_UPDATE_CRDS=1 cargo test -p edgewise-operator --test crds`.

use std::path::PathBuf;
use std::process::Command;

use edgewise_operator::crd;

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

#[test]
fn crds_dir_matches_the_rust_types() {
    let update = std::env::var_os("EDGEWISE_UPDATE_CRDS").is_some();
    // crds/ and the Helm chart's crds/ hold the same files.
    let chart = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../charts/edgewise/crds");
    for c in crd::all() {
        let expected = crd::to_yaml(std::slice::from_ref(&c)).expect("renders");
        for dir in [crds_dir(), chart.clone()] {
            let path = dir.join(crd::file_name(&c));
            if update {
                std::fs::write(&path, &expected).expect("writes crds/");
            }
            let actual = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                actual == expected,
                "{} is stale: run EDGEWISE_UPDATE_CRDS=1 cargo test -p edgewise-operator --test crds",
                path.display()
            );
        }
    }
    let mut files: Vec<String> = std::fs::read_dir(crds_dir())
        .expect("crds/ exists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "modelrollouts.edgewise.dev.yaml",
            "modelversions.edgewise.dev.yaml",
            "routingpolicies.edgewise.dev.yaml"
        ],
        "crds/ holds exactly the three CRDs"
    );
}

#[test]
fn crds_command_prints_the_crds_dir_in_order() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgewise-operator"))
        .arg("crds")
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let on_disk: String = ["modelrollouts", "modelversions", "routingpolicies"]
        .iter()
        .map(|p| {
            std::fs::read_to_string(crds_dir().join(format!("{p}.edgewise.dev.yaml")))
                .expect("reads")
        })
        .collect();
    assert_eq!(printed, on_disk);
}

#[test]
fn crds_have_the_names_columns_and_subresources_kubectl_relies_on() {
    for c in crd::all() {
        let names = &c.spec.names;
        assert_eq!(c.spec.group, "edgewise.dev");
        assert_eq!(c.spec.scope, "Namespaced");
        assert_eq!(
            names.categories.as_deref(),
            Some(&["edgewise".to_owned(), "all".to_owned()][..]),
            "kubectl get edgewise and kubectl get all list them"
        );
        let v = &c.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(
            v.subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{} has status",
            names.kind
        );
        let columns: Vec<&str> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|col| col.name.as_str())
            .collect();
        let (short, must) = match names.kind.as_str() {
            "ModelVersion" => ("mv", vec!["Version", "Phase", "Devices", "Age"]),
            "ModelRollout" => (
                "mro",
                vec![
                    "Phase",
                    "Stable",
                    "Canary",
                    "Percent",
                    "Installed",
                    "Targeted",
                    "Age",
                ],
            ),
            "RoutingPolicy" => (
                "rp",
                vec!["Priority", "Version", "Acked", "Rejected", "Age"],
            ),
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(names.short_names.as_deref(), Some(&[short.to_owned()][..]));
        for m in must {
            assert!(
                columns.contains(&m),
                "{} lacks column {m}: {columns:?}",
                names.kind
            );
        }
    }
}
