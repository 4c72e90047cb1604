//! The production crate stays production: what `edgewise-operator` links is checked against
//! the dev stack's dependencies, so a stray `use` of the agent or the embedded servers fails
//! here rather than in an image scan.

use std::process::Command;

/// Crates only the dev stack (`operator/dev`) may link.
const DEV_ONLY: [&str; 6] = [
    "edgewise-agent",
    "edgewise-dev",
    "s3s",
    "redb",
    "jsonschema",
    "kube-cel",
];

#[test]
fn the_production_crate_links_no_dev_stack_dependency() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "-p", "edgewise-operator", "-e", "normal"])
        .args(["--prefix", "none", "--locked", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let linked: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| DEV_ONLY.contains(name))
        .collect();
    assert!(
        tree.lines().count() > 50,
        "the tree lists the operator's dependencies:\n{tree}"
    );
    assert!(
        linked.is_empty(),
        "edgewise-operator links dev-only crates {linked:?}"
    );
}
