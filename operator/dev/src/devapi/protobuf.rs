//! Request bodies in Kubernetes' protobuf encoding. kubectl's typed clients (`kubectl
//! create namespace|configmap|secret`, `kubectl auth can-i`) send them; answers stay JSON,
//! which those clients accept. A body is the magic `k8s\0` and a `runtime.Unknown` holding
//! the object; the kinds decoded are the built-ins the dev API keeps.

use base64::Engine;
use k8s_pb::api::authorization::v1 as authz;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1::{DeleteOptions, ObjectMeta};
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::{Map, Value, json};

/// The media type.
pub(super) const MEDIA_TYPE: &str = "application/vnd.kubernetes.protobuf";
const MAGIC: &[u8] = b"k8s\0";

/// Why a body cannot be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum DecodeError {
    #[error("a protobuf body starts with the k8s envelope")]
    NoEnvelope,
    #[error("the protobuf body does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("protobuf bodies of kind {0} are not supported here; send JSON")]
    Unsupported(String),
}

fn base64(bytes: &[u8]) -> Value {
    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Inserts `value` unless it is empty, as JSON omits empty optional fields.
fn put(map: &mut Map<String, Value>, key: &str, value: Value) {
    let empty = match &value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    };
    if !empty {
        map.insert(key.to_owned(), value);
    }
}

fn metadata(m: Option<ObjectMeta>) -> Value {
    let m = m.unwrap_or_default();
    let mut out = Map::new();
    put(&mut out, "name", json!(m.name));
    put(&mut out, "generateName", json!(m.generate_name));
    put(&mut out, "namespace", json!(m.namespace));
    put(&mut out, "resourceVersion", json!(m.resource_version));
    put(&mut out, "labels", json!(m.labels));
    put(&mut out, "annotations", json!(m.annotations));
    put(&mut out, "finalizers", json!(m.finalizers));
    Value::Object(out)
}

fn object(api_version: &str, kind: &str, meta: Option<ObjectMeta>) -> Map<String, Value> {
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!(api_version));
    out.insert("kind".into(), json!(kind));
    out.insert("metadata".into(), metadata(meta));
    out
}

fn unwrap(body: &[u8]) -> Result<(String, Vec<u8>), DecodeError> {
    let rest = body.strip_prefix(MAGIC).ok_or(DecodeError::NoEnvelope)?;
    let u = Unknown::decode(rest)?;
    let kind = u.type_meta.and_then(|t| t.kind).unwrap_or_default();
    Ok((kind, u.raw.unwrap_or_default()))
}

/// An object body as the JSON the rest of the endpoint works on.
pub(super) fn decode_object(body: &[u8]) -> Result<Value, DecodeError> {
    let (kind, raw) = unwrap(body)?;
    let raw = raw.as_slice();
    let out = match kind.as_str() {
        "Namespace" => {
            let ns = core::Namespace::decode(raw)?;
            let mut o = object("v1", "Namespace", ns.metadata);
            let finalizers = ns.spec.map(|s| s.finalizers).unwrap_or_default();
            put(&mut o, "spec", json!({"finalizers": finalizers}));
            o
        }
        "ConfigMap" => {
            let cm = core::ConfigMap::decode(raw)?;
            let mut o = object("v1", "ConfigMap", cm.metadata);
            put(&mut o, "data", json!(cm.data));
            let binary: Map<String, Value> = cm
                .binary_data
                .iter()
                .map(|(k, v)| (k.clone(), base64(v)))
                .collect();
            put(&mut o, "binaryData", Value::Object(binary));
            put(&mut o, "immutable", json!(cm.immutable));
            o
        }
        "Secret" => {
            let s = core::Secret::decode(raw)?;
            let mut o = object("v1", "Secret", s.metadata);
            let data: Map<String, Value> =
                s.data.iter().map(|(k, v)| (k.clone(), base64(v))).collect();
            put(&mut o, "data", Value::Object(data));
            put(&mut o, "stringData", json!(s.string_data));
            put(&mut o, "type", json!(s.r#type));
            put(&mut o, "immutable", json!(s.immutable));
            o
        }
        "SelfSubjectAccessReview" => {
            let r = authz::SelfSubjectAccessReview::decode(raw)?;
            let mut o = object("authorization.k8s.io/v1", &kind, r.metadata);
            let spec = r.spec.unwrap_or_default();
            let resource = spec.resource_attributes.map(|a| {
                json!({"namespace": a.namespace, "verb": a.verb, "group": a.group,
                       "version": a.version, "resource": a.resource,
                       "subresource": a.subresource, "name": a.name})
            });
            let non_resource = spec
                .non_resource_attributes
                .map(|a| json!({"path": a.path, "verb": a.verb}));
            let mut s = Map::new();
            put(&mut s, "resourceAttributes", json!(resource));
            put(&mut s, "nonResourceAttributes", json!(non_resource));
            o.insert("spec".into(), Value::Object(s));
            o
        }
        "SelfSubjectRulesReview" => {
            let r = authz::SelfSubjectRulesReview::decode(raw)?;
            let mut o = object("authorization.k8s.io/v1", &kind, r.metadata);
            let ns = r.spec.and_then(|s| s.namespace);
            o.insert("spec".into(), json!({"namespace": ns}));
            o
        }
        other => return Err(DecodeError::Unsupported(other.to_owned())),
    };
    Ok(Value::Object(out))
}

/// A `DeleteOptions` body.
pub(super) fn decode_delete_options(body: &[u8]) -> Result<Value, DecodeError> {
    let (_, raw) = unwrap(body)?;
    let d = DeleteOptions::decode(raw.as_slice())?;
    let mut out = Map::new();
    put(&mut out, "dryRun", json!(d.dry_run));
    put(&mut out, "propagationPolicy", json!(d.propagation_policy));
    put(
        &mut out,
        "gracePeriodSeconds",
        json!(d.grace_period_seconds),
    );
    Ok(Value::Object(out))
}

/// `openapi_v2.Document` of gnostic (what `/openapi/v2` is in protobuf), with only the
/// fields the dev API fills.
#[derive(Clone, PartialEq, Message)]
struct OpenApiV2 {
    #[prost(string, tag = "1")]
    swagger: String,
    #[prost(message, optional, tag = "2")]
    info: Option<OpenApiInfo>,
}

#[derive(Clone, PartialEq, Message)]
struct OpenApiInfo {
    #[prost(string, tag = "1")]
    title: String,
    #[prost(string, tag = "2")]
    version: String,
}

/// The media type kubectl asks `/openapi/v2` for.
pub(super) const OPENAPI_V2_MEDIA_TYPE: &str =
    "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";

/// An OpenAPI v2 document with no definitions. kubectl reads v2 only to validate on the
/// client what the server cannot (a `kind: List` file); finding no definition for a kind it
/// skips that check and the server's own validation (`fieldValidation`, which the v3
/// documents advertise for every kind) applies to each item.
pub(super) fn openapi_v2() -> Vec<u8> {
    OpenApiV2 {
        swagger: "2.0".into(),
        info: Some(OpenApiInfo {
            title: "Edgewise dev API".into(),
            version: "v1.32.0".into(),
        }),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;

    fn envelope(kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some("v1".into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        [MAGIC.to_vec(), u.encode_to_vec()].concat()
    }

    #[test]
    fn a_secret_from_kubectl_create_decodes_to_its_json_form() {
        let secret = core::Secret {
            metadata: Some(ObjectMeta {
                name: Some("s1".into()),
                labels: [("a".to_owned(), "b".to_owned())].into(),
                ..ObjectMeta::default()
            }),
            data: [("k".to_owned(), b"v\xff".to_vec())].into(),
            r#type: Some("Opaque".into()),
            ..core::Secret::default()
        };
        let json = decode_object(&envelope("Secret", secret.encode_to_vec())).expect("decodes");
        assert_eq!(
            json,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "s1", "labels": {"a": "b"}},
                   "data": {"k": "dv8="}, "type": "Opaque"})
        );
    }

    #[test]
    fn bodies_without_the_envelope_or_of_other_kinds_are_refused() {
        assert!(matches!(decode_object(b"{}"), Err(DecodeError::NoEnvelope)));
        assert!(matches!(
            decode_object(&envelope("Pod", Vec::new())),
            Err(DecodeError::Unsupported(k)) if k == "Pod"
        ));
    }
}
