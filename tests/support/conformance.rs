//! kubectl habits that must carry over between the dev API and a real cluster: each
//! scenario drives kubectl (the binary on the machine) through one group of API semantics
//! and asserts what kube-apiserver answers. `tests/kubectl_semantics.rs` runs them against
//! the dev API; `tests/cluster.rs` runs the same functions against a real cluster.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};

/// Where the scenarios run: a kubeconfig and a namespace of their own (created if absent).
#[derive(Clone, Debug)]
pub struct Cluster {
    /// The kubeconfig.
    pub kubeconfig: PathBuf,
    /// The namespace the scenarios write in.
    pub namespace: String,
    /// Scratch directory for manifests.
    pub scratch: PathBuf,
}

impl Cluster {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c
    }

    /// `kubectl args…`, which must succeed: its stdout.
    ///
    /// # Panics
    /// When kubectl fails.
    pub fn ok(&self, args: &[&str]) -> String {
        crate::stdout_of(&mut self.command(args))
    }

    /// `kubectl args…` with its exit status and both streams.
    ///
    /// # Panics
    /// When kubectl cannot start.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("kubectl runs")
    }

    /// `kubectl args…`, which must fail: its stderr.
    ///
    /// # Panics
    /// When kubectl succeeds.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "kubectl {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Writes `doc` to a scratch file and returns its path.
    ///
    /// # Panics
    /// When the scratch directory is not writable.
    pub fn manifest(&self, name: &str, doc: &Value) -> String {
        let path = self.scratch.join(format!("{name}.json"));
        std::fs::write(&path, doc.to_string()).expect("writes the manifest");
        path.display().to_string()
    }

    /// `kubectl apply -f` of `doc` in the scenario namespace.
    pub fn apply(&self, name: &str, doc: &Value) -> String {
        let file = self.manifest(name, doc);
        self.ok(&["apply", "-n", &self.namespace, "-f", &file])
    }

    fn get_json(&self, what: &[&str]) -> Value {
        let mut args = vec!["get", "-n", &self.namespace, "-o", "json"];
        args.extend_from_slice(what);
        serde_json::from_str(&self.ok(&args)).expect("json")
    }

    /// Creates the scenario namespace when absent.
    pub fn ensure_namespace(&self) {
        if !self
            .run(&["get", "namespace", &self.namespace])
            .status
            .success()
        {
            self.ok(&["create", "namespace", &self.namespace]);
        }
    }
}

/// A ModelRollout named `name` (no ModelVersion needed: nothing here waits for a controller).
#[must_use]
pub fn rollout(name: &str) -> Value {
    json!({
        "apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelRollout",
        "metadata": {"name": name},
        "spec": {"model": "assistant", "version": "2.1.0", "steps": [{"setPercent": 100}]}
    })
}

fn rv(obj: &Value) -> String {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `--dry-run=server` creates, patches and deletes nothing; `kubectl diff` shows a change
/// without making it.
pub fn dry_run_writes_nothing(c: &Cluster) {
    let ns = c.namespace.as_str();
    let file = c.manifest("dry", &rollout("dry"));
    let said = c.ok(&["create", "-n", ns, "-f", &file, "--dry-run=server"]);
    assert!(said.contains("(server dry run)"), "{said}");
    assert!(
        !c.run(&["get", "-n", ns, "mro", "dry"]).status.success(),
        "a dry-run create stored the object"
    );
    c.apply("dry", &rollout("dry"));
    let before = c.get_json(&["mro", "dry"]);
    c.ok(&[
        "patch",
        "-n",
        ns,
        "mro",
        "dry",
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
        "--dry-run=server",
    ]);
    c.ok(&["delete", "-n", ns, "mro", "dry", "--dry-run=server"]);
    let mut changed = rollout("dry");
    changed["spec"]["steps"] = json!([{"setPercent": 50}, {"setPercent": 100}]);
    let diff_file = c.manifest("dry-changed", &changed);
    let diff = c.run(&["diff", "-n", ns, "-f", &diff_file]);
    let shown = String::from_utf8_lossy(&diff.stdout);
    assert_eq!(
        diff.status.code(),
        Some(1),
        "diff exits 1 on a difference: {shown}"
    );
    assert!(shown.contains("+  - setPercent: 50"), "{shown}");
    let after = c.get_json(&["mro", "dry"]);
    assert_eq!(
        rv(&after),
        rv(&before),
        "dry runs and diff left the object alone"
    );
    assert_eq!(after["spec"], before["spec"]);
    c.ok(&["delete", "-n", ns, "mro", "dry"]);
}

/// Fields the schema does not declare are refused under `--validate=strict` (kubectl's
/// default) naming each, warned about under `warn`, and pruned from what is stored.
pub fn unknown_fields_are_refused_warned_or_pruned(c: &Cluster) {
    let ns = c.namespace.as_str();
    let mut typo = rollout("typo");
    typo["spec"]["colour"] = json!("red");
    typo["spec"]["pasued"] = json!(true);
    let file = c.manifest("typo", &typo);
    let err = c.fails(&["apply", "-n", ns, "-f", &file]);
    assert!(
        err.contains("unknown field \"spec.colour\"")
            && err.contains("unknown field \"spec.pasued\""),
        "{err}"
    );
    let out = c.run(&["apply", "-n", ns, "-f", &file, "--validate=warn"]);
    assert!(out.status.success());
    let warned = String::from_utf8_lossy(&out.stderr);
    assert!(warned.contains("unknown field \"spec.colour\""), "{warned}");
    let stored = c.get_json(&["mro", "typo"]);
    assert!(stored["spec"].get("colour").is_none(), "pruned: {stored}");
    assert!(stored["spec"].get("pasued").is_none(), "pruned: {stored}");
    c.ok(&["delete", "-n", ns, "mro", "typo"]);
}

/// Names and label keys are validated as the API server does, with the field named.
pub fn names_and_labels_are_validated(c: &Cluster) {
    let ns = c.namespace.as_str();
    let err = c.fails(&["create", "configmap", "-n", ns, "Bad_Name!"]);
    assert!(err.contains("metadata.name: Invalid value"), "{err}");
    let long = "a".repeat(300);
    let err = c.fails(&["create", "configmap", "-n", ns, &long]);
    assert!(err.contains("must be no more than 253 characters"), "{err}");
    let file = c.manifest("bad-name", &rollout("Bad_Name"));
    let err = c.fails(&["apply", "-n", ns, "-f", &file]);
    assert!(err.contains("metadata.name: Invalid value"), "{err}");
    c.ok(&["create", "configmap", "-n", ns, "labelled"]);
    let err = c.fails(&["label", "-n", ns, "cm", "labelled", "bad key!=x"]);
    assert!(err.contains("metadata.labels: Invalid value"), "{err}");
    let err = c.fails(&["label", "-n", ns, "cm", "labelled", &format!("k={long}")]);
    assert!(err.contains("must be no more than 63 characters"), "{err}");
    c.ok(&["delete", "-n", ns, "cm", "labelled"]);
}

/// Writing what is already there changes nothing: same resourceVersion, no watch event.
pub fn writes_that_change_nothing_are_no_ops(c: &Cluster) {
    let ns = c.namespace.as_str();
    c.apply("same", &rollout("same"));
    let before = c.get_json(&["mro", "same"]);
    let watch = c
        .command(&[
            "get",
            "-n",
            ns,
            "mro",
            "same",
            "--watch-only",
            "-o",
            "name",
            "--request-timeout=4s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl watches");
    std::thread::sleep(Duration::from_millis(800));
    let said = c.apply("same", &rollout("same"));
    assert!(said.contains("unchanged"), "{said}");
    c.ok(&["annotate", "-n", ns, "mro", "same", "note=x"]);
    let annotated = rv(&c.get_json(&["mro", "same"]));
    c.ok(&["annotate", "-n", ns, "mro", "same", "note=x", "--overwrite"]);
    let again = c.get_json(&["mro", "same"]);
    assert_eq!(
        rv(&again),
        annotated,
        "re-annotating with the same value wrote"
    );
    assert_ne!(
        annotated,
        rv(&before),
        "a real change moves the resourceVersion"
    );
    let events = watch.wait_with_output().expect("watch ends");
    let lines = String::from_utf8_lossy(&events.stdout).lines().count();
    assert_eq!(lines, 1, "exactly one watch event, for the one real change");
    c.ok(&["delete", "-n", ns, "mro", "same"]);
}

/// Events written through either API are read through both, with the field selectors
/// kubectl uses, and `describe` shows them.
pub fn events_read_through_both_apis(c: &Cluster) {
    let ns = c.namespace.as_str();
    c.apply("evented", &rollout("evented"));
    let uid = c.get_json(&["mro", "evented"])["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let regarding = json!({"apiVersion": "edgewise.dev/v1alpha1", "kind": "ModelRollout", "name": "evented", "namespace": ns, "uid": uid});
    let new_style = json!({
        "apiVersion": "events.k8s.io/v1", "kind": "Event",
        "metadata": {"name": "evented.new"},
        "eventTime": "2026-12-04T10:00:00.000000Z", "reportingController": "edgewise.dev/test",
        "reportingInstance": "test-0", "action": "Advance", "reason": "StepAdvanced",
        "note": "through events.k8s.io", "type": "Normal", "regarding": regarding
    });
    let old_style = json!({
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": "evented.old"},
        "involvedObject": regarding, "reason": "OldStyle", "message": "through core v1",
        "type": "Warning", "source": {"component": "test"},
        "firstTimestamp": "2026-12-04T10:00:01Z", "lastTimestamp": "2026-12-04T10:00:01Z", "count": 1
    });
    for (name, doc) in [("new", &new_style), ("old", &old_style)] {
        let file = c.manifest(&format!("event-{name}"), doc);
        c.ok(&["create", "-n", ns, "-f", &file]);
    }
    let events = |api: &str, selector: &str| {
        c.ok(&[
            "get",
            api,
            "-n",
            ns,
            "--field-selector",
            selector,
            "-o",
            "json",
        ])
    };
    let core = events(
        "events",
        "involvedObject.kind=ModelRollout,involvedObject.name=evented",
    );
    assert!(
        core.contains("through events.k8s.io") && core.contains("through core v1"),
        "{core}"
    );
    let newer = events("events.v1.events.k8s.io", "regarding.name=evented");
    assert!(
        newer.contains("\"note\": \"through core v1\"") && newer.contains("StepAdvanced"),
        "{newer}"
    );
    let described = c.ok(&["describe", "-n", ns, "mro", "evented"]);
    assert!(
        described.contains("StepAdvanced") && described.contains("OldStyle"),
        "{described}"
    );
    let listed = c.ok(&["events", "-n", ns, "--for", "modelrollout/evented"]);
    assert!(listed.contains("OldStyle"), "{listed}");
    c.ok(&["delete", "-n", ns, "mro", "evented"]);
}

/// `get crd`, `--sort-by` (rows carry their objects), a `kind: List` backup, and strategic
/// merge refused on a custom resource as a real server refuses it.
pub fn tables_lists_and_patch_types(c: &Cluster) {
    let ns = c.namespace.as_str();
    let crds = c.ok(&["get", "crd", "-o", "name"]);
    for crd in ["modelrollouts", "modelversions", "routingpolicies"] {
        assert!(crds.contains(&format!("{crd}.edgewise.dev")), "{crds}");
    }
    let items: Vec<Value> = [
        ("sort-b", "2.0.0"),
        ("sort-a", "3.0.0"),
        ("sort-c", "1.0.0"),
    ]
    .into_iter()
    .map(|(name, version)| {
        let mut r = rollout(name);
        r["spec"]["version"] = json!(version);
        r["metadata"]["namespace"] = json!(ns);
        r
    })
    .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let file = c.manifest("list", &list);
    let applied = c.ok(&["apply", "-f", &file]);
    assert_eq!(applied.matches("created").count(), 3, "{applied}");
    let sorted = c.ok(&[
        "get",
        "-n",
        ns,
        "mro",
        "--sort-by=.spec.version",
        "-o",
        "custom-columns=NAME:.metadata.name",
        "--no-headers",
    ]);
    let names: Vec<&str> = sorted.lines().filter(|l| l.starts_with("sort-")).collect();
    assert_eq!(names, ["sort-c", "sort-b", "sort-a"]);
    let err = c.fails(&[
        "patch",
        "-n",
        ns,
        "mro",
        "sort-a",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]);
    assert!(
        err.contains("strategic-merge-patch") && err.contains("not supported"),
        "{err}"
    );
    c.ok(&[
        "patch",
        "-n",
        ns,
        "mro",
        "sort-a",
        "--type=merge",
        "-p",
        r#"{"spec":{"paused":true}}"#,
    ]);
    c.ok(&["delete", "-f", &file]);
}

/// `kubectl create namespace|configmap|secret` (protobuf bodies), `auth can-i`, `get all`.
pub fn builtins_and_everyday_commands(c: &Cluster) {
    let ns = c.namespace.as_str();
    c.ok(&[
        "create",
        "configmap",
        "-n",
        ns,
        "settings",
        "--from-literal=mode=fast",
    ]);
    c.ok(&[
        "create",
        "secret",
        "generic",
        "-n",
        ns,
        "creds",
        "--from-literal=key=s3cr3t",
    ]);
    let data = c.ok(&[
        "get",
        "-n",
        ns,
        "secret",
        "creds",
        "-o",
        "jsonpath={.data.key}",
    ]);
    assert_eq!(data, "czNjcjN0", "base64 of the literal");
    // A manifest's `stringData` is stored as `data` (base64), never as itself.
    c.apply(
        "plain-secret",
        &serde_json::json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "plain"}, "stringData": {"token": "s3cr3t"}}),
    );
    let stored = c.get_json(&["secret", "plain"]);
    assert_eq!(stored["data"]["token"], "czNjcjN0", "{stored}");
    assert!(stored.get("stringData").is_none(), "{stored}");
    assert_eq!(stored["type"], "Opaque", "{stored}");
    let mode = c.ok(&[
        "get",
        "-n",
        ns,
        "cm",
        "settings",
        "-o",
        "jsonpath={.data.mode}",
    ]);
    assert_eq!(mode, "fast");
    assert_eq!(
        c.ok(&["auth", "can-i", "create", "modelrollouts", "-n", ns])
            .trim(),
        "yes"
    );
    c.apply("everyday", &rollout("everyday"));
    let all = c.ok(&["get", "all", "-n", ns]);
    assert!(all.contains("modelrollout.edgewise.dev/everyday"), "{all}");
    c.ok(&[
        "delete",
        "-n",
        ns,
        "cm/settings",
        "secret/creds",
        "mro/everyday",
    ]);
}

/// Deleting a namespace deletes what it holds, finalizers honoured; nothing new may be
/// created in it meanwhile.
pub fn deleting_a_namespace_deletes_its_objects(c: &Cluster, doomed: &str) {
    c.ok(&["create", "namespace", doomed]);
    let mut held = rollout("held");
    held["metadata"]["finalizers"] = json!(["edgewise.dev/test"]);
    c.ok(&["apply", "-n", doomed, "-f", &c.manifest("held", &held)]);
    c.ok(&[
        "apply",
        "-n",
        doomed,
        "-f",
        &c.manifest("free", &rollout("free")),
    ]);
    c.ok(&["delete", "namespace", doomed, "--wait=false"]);
    c.ok(&[
        "wait",
        "-n",
        doomed,
        "--for=delete",
        "mro/free",
        "--timeout=60s",
    ]);
    let phase = c.ok(&["get", "namespace", doomed, "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Terminating");
    let err = c.fails(&["create", "configmap", "-n", doomed, "late"]);
    assert!(err.contains("being terminated"), "{err}");
    c.ok(&[
        "patch",
        "-n",
        doomed,
        "mro",
        "held",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    c.ok(&[
        "wait",
        "--for=delete",
        &format!("namespace/{doomed}"),
        "--timeout=120s",
    ]);
}

/// Runs every scenario in order.
pub fn all(c: &Cluster) {
    c.ensure_namespace();
    dry_run_writes_nothing(c);
    unknown_fields_are_refused_warned_or_pruned(c);
    names_and_labels_are_validated(c);
    writes_that_change_nothing_are_no_ops(c);
    events_read_through_both_apis(c);
    tables_lists_and_patch_types(c);
    builtins_and_everyday_commands(c);
    deleting_a_namespace_deletes_its_objects(c, &format!("{}-doomed", c.namespace));
}
