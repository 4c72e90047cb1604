//! Every file in `examples/` parses into the Rust types and passes admission (OpenAPI schema
//! and CEL rules) exactly as an API server would run it; malformed variants are rejected
//! with a message naming the field.

use std::path::PathBuf;

use edgewise_dev::admission::{FieldError, SchemaValidator};
use edgewise_operator::crd::{self, ModelRollout, ModelVersion, RoutingPolicy};
use kube::CustomResourceExt;
use serde_json::{Value, json};

fn example(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn validator_for(kind: &str) -> SchemaValidator {
    let c = crd::all()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .expect("known kind");
    SchemaValidator::for_crd(&c).expect("schema compiles")
}

fn rejected(kind: &str, object: &Value, old: Option<&Value>) -> Vec<FieldError> {
    validator_for(kind)
        .validate(object, old)
        .expect_err("must be rejected")
}

fn assert_rejects(errors: &[FieldError], field: &str, words: &str) {
    assert!(
        errors
            .iter()
            .any(|e| e.field == field && e.message.contains(words)),
        "expected {field}: …{words}… in {errors:#?}"
    );
}

#[test]
fn every_example_parses_into_the_rust_types_and_passes_admission() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(dir).expect("examples/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("reads");
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).expect("yaml");
            let kind = value["kind"].as_str().expect("kind").to_owned();
            match kind.as_str() {
                "ModelVersion" => drop(
                    serde_json::from_value::<ModelVersion>(value.clone()).expect("ModelVersion"),
                ),
                "ModelRollout" => drop(
                    serde_json::from_value::<ModelRollout>(value.clone()).expect("ModelRollout"),
                ),
                "RoutingPolicy" => {
                    let rp = serde_json::from_value::<RoutingPolicy>(value.clone())
                        .expect("RoutingPolicy");
                    edgewise_core::policy::compile(&rp.spec.policy)
                        .expect("example policy compiles");
                }
                other => panic!("{}: unexpected kind {other}", path.display()),
            }
            if let Err(errors) = validator_for(&kind).validate(&value, None) {
                panic!("{} is rejected: {errors:#?}", path.display());
            }
            kinds.push(kind);
        }
    }
    kinds.sort();
    assert_eq!(kinds, ["ModelRollout", "ModelVersion", "RoutingPolicy"]);
}

#[test]
fn a_wrong_length_sha256_is_rejected_naming_the_field() {
    let mut mv = example("modelversion.yaml");
    mv["spec"]["variants"][0]["artifact"]["sha256"] = json!("abc123");
    let errors = rejected("ModelVersion", &mv, None);
    assert_rejects(
        &errors,
        "spec.variants[0].artifact.sha256",
        "does not match",
    );
}

#[test]
fn a_non_s3_uri_and_a_bad_semver_are_rejected() {
    let mut mv = example("modelversion.yaml");
    mv["spec"]["variants"][1]["artifact"]["uri"] = json!("https://example.com/model.onnx");
    mv["spec"]["version"] = json!("2.1");
    let errors = rejected("ModelVersion", &mv, None);
    assert_rejects(&errors, "spec.variants[1].artifact.uri", "does not match");
    assert_rejects(&errors, "spec.version", "does not match");
}

#[test]
fn an_unknown_format_is_rejected() {
    let mut mv = example("modelversion.yaml");
    mv["spec"]["variants"][0]["format"] = json!("pickle");
    assert_rejects(
        &rejected("ModelVersion", &mv, None),
        "spec.variants[0].format",
        "pickle",
    );
}

#[test]
fn model_version_spec_is_immutable_but_deprecation_is_allowed() {
    let old = example("modelversion.yaml");
    let mut changed = old.clone();
    changed["spec"]["variants"][0]["artifact"]["sizeBytes"] = json!(1);
    let errors = rejected("ModelVersion", &changed, Some(&old));
    assert_rejects(&errors, "spec", "immutable");

    let mut deprecated = old.clone();
    deprecated["spec"]["deprecated"] =
        json!({"reason": "accuracy regression", "removeAfter": "2027-03-01"});
    validator_for("ModelVersion")
        .validate(&deprecated, Some(&old))
        .expect("deprecating is allowed");
}

#[test]
fn duplicate_variant_names_are_rejected() {
    let mut mv = example("modelversion.yaml");
    mv["spec"]["variants"][1]["name"] = json!("npu-gguf-q4");
    assert_rejects(
        &rejected("ModelVersion", &mv, None),
        "spec.variants",
        "unique",
    );
}

#[test]
fn percent_120_is_rejected_naming_the_field() {
    let mut mro = example("modelrollout.yaml");
    mro["spec"]["steps"][2]["setPercent"] = json!(120);
    assert_rejects(
        &rejected("ModelRollout", &mro, None),
        "spec.steps[2].setPercent",
        "maximum of 100",
    );
}

#[test]
fn decreasing_steps_are_rejected_naming_the_field() {
    let mut mro = example("modelrollout.yaml");
    mro["spec"]["steps"] =
        json!([{"setPercent": 50}, {"pause": {"duration": "10m"}}, {"setPercent": 20}]);
    assert_rejects(
        &rejected("ModelRollout", &mro, None),
        "spec.steps",
        "never decrease",
    );
}

#[test]
fn empty_steps_and_ambiguous_steps_are_rejected() {
    let mut mro = example("modelrollout.yaml");
    mro["spec"]["steps"] = json!([]);
    assert_rejects(
        &rejected("ModelRollout", &mro, None),
        "spec.steps",
        "less than 1 item",
    );

    let mut mro = example("modelrollout.yaml");
    mro["spec"]["steps"][0] = json!({"setPercent": 5, "pause": {}});
    assert_rejects(
        &rejected("ModelRollout", &mro, None),
        "spec.steps[0]",
        "exactly one of",
    );
}

#[test]
fn analysis_steps_need_gates_and_gates_need_bounds() {
    let mut mro = example("modelrollout.yaml");
    mro["spec"]
        .as_object_mut()
        .expect("object")
        .remove("analysis");
    assert_rejects(
        &rejected("ModelRollout", &mro, None),
        "spec.analysis",
        "need spec.analysis",
    );

    let mut mro = example("modelrollout.yaml");
    mro["spec"]["analysis"]["gates"][1] = json!({"metric": "error_rate"});
    assert_rejects(
        &rejected("ModelRollout", &mro, None),
        "spec.analysis.gates[1]",
        "max or min",
    );

    let mut mro = example("modelrollout.yaml");
    mro["spec"]["analysis"]["gates"][1] = json!({"metric": "error_rate", "max": 5});
    assert_rejects(
        &rejected("ModelRollout", &mro, None),
        "spec.analysis.gates[1]",
        "between 0 and 1",
    );

    let mut mro = example("modelrollout.yaml");
    mro["spec"]["analysis"]["gates"][0]["metric"] = json!("vibes");
    assert_rejects(
        &rejected("ModelRollout", &mro, None),
        "spec.analysis.gates[0].metric",
        "vibes",
    );
}

#[test]
fn rule_operators_must_fit_the_attribute_type() {
    let mut rp = example("routingpolicy.yaml");
    rp["spec"]["rules"][3]["match"][0] = json!({"attribute": "inputTokens", "in": ["8000"]});
    assert_rejects(
        &rejected("RoutingPolicy", &rp, None),
        "spec.rules[3].match[0]",
        "number attributes",
    );

    let mut rp = example("routingpolicy.yaml");
    rp["spec"]["rules"][0]["match"][0] = json!({"attribute": "dataClass", "gt": 3});
    assert_rejects(
        &rejected("RoutingPolicy", &rp, None),
        "spec.rules[0].match[0]",
        "string attributes",
    );

    let mut rp = example("routingpolicy.yaml");
    rp["spec"]["rules"][1]["match"][0] = json!({"attribute": "network", "eq": "wifi"});
    assert_rejects(
        &rejected("RoutingPolicy", &rp, None),
        "spec.rules[1].match[0]",
        "online, offline, metered",
    );

    let mut rp = example("routingpolicy.yaml");
    rp["spec"]["rules"][1]["match"][0] = json!({"attribute": "network"});
    assert_rejects(
        &rejected("RoutingPolicy", &rp, None),
        "spec.rules[1].match[0]",
        "at least one operator",
    );
}

#[test]
fn routes_must_name_targets_and_shadows_must_be_cloud() {
    let mut rp = example("routingpolicy.yaml");
    rp["spec"]["rules"][2]["route"] = json!("nowhere");
    rp["spec"]["shadow"]["target"] = json!("on-device");
    let errors = rejected("RoutingPolicy", &rp, None);
    assert_rejects(&errors, "spec.rules", "must name a target");
    assert_rejects(&errors, "spec.shadow.target", "cloud target");

    let mut rp = example("routingpolicy.yaml");
    rp["spec"]["shadow"]["sampleRate"] = json!(1.5);
    assert_rejects(
        &rejected("RoutingPolicy", &rp, None),
        "spec.shadow.sampleRate",
        "maximum of 1",
    );
}

#[test]
fn a_target_must_be_exactly_one_kind() {
    let mut rp = example("routingpolicy.yaml");
    rp["spec"]["targets"][0]["cloud"] = json!({"endpoint": "https://x", "model": "m"});
    assert_rejects(
        &rejected("RoutingPolicy", &rp, None),
        "spec.targets[0]",
        "exactly one of device or cloud",
    );
}

#[test]
fn crd_helpers_name_every_kind() {
    assert_eq!(ModelVersion::crd_name(), "modelversions.edgewise.dev");
    assert_eq!(ModelRollout::crd_name(), "modelrollouts.edgewise.dev");
    assert_eq!(RoutingPolicy::crd_name(), "routingpolicies.edgewise.dev");
}

#[test]
fn platforms_are_oci_names_with_older_spellings_accepted_and_others_refused_with_the_list() {
    let validator = validator_for("ModelVersion");
    for ok in [
        "linux/amd64",
        "linux/x86_64",
        "linux/arm/v7",
        "darwin/arm64",
        "android/*",
        "*/arm64",
    ] {
        let mut mv = example("modelversion.yaml");
        mv["spec"]["variants"][0]["requires"]["platforms"] = json!([ok]);
        assert!(validator.validate(&mv, None).is_ok(), "{ok} is accepted");
    }
    let mut mv = example("modelversion.yaml");
    mv["spec"]["variants"][0]["requires"]["platforms"] = json!(["linux/amd64", "linux/x86-64"]);
    assert_rejects(
        &rejected("ModelVersion", &mv, None),
        "spec.variants[0].requires.platforms",
        "arch one of amd64, arm64, arm/v7",
    );
}

#[test]
fn the_example_policy_has_no_compiler_warnings() {
    let rp: RoutingPolicy =
        serde_json::from_value(example("routingpolicy.yaml")).expect("RoutingPolicy");
    let warnings = edgewise_core::policy::lint(&rp.spec.policy);
    assert!(warnings.is_empty(), "{warnings:?}");
}
