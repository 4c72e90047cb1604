//! Reads and writes: get, list, create, replace (object or status) and delete, with the
//! rules an API server enforces on each (names, namespaces, resourceVersion, generation,
//! the status split, finalizers) and admission against the CRD's schema and CEL rules.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::error::{ApiError, ApiResult, json_response};
use super::resources::Form;
use super::selectors::{FieldSelector, LabelSelector};
use super::store::{Change, Store};
use super::table::IncludeObject;
use super::{Api, Resource, Target};

/// Now, as `metadata.creationTimestamp` spells it.
pub(super) fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// A random `metadata.uid` in the UUID form.
pub(super) fn uid() -> String {
    let h = format!("{:032x}", rand::random::<u128>());
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A Namespace object as the API server creates it.
pub(super) fn new_namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": uid(), "creationTimestamp": now()},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}
    })
}

/// Marks a written CRD established, as a real API server does once it serves it. The dev API
/// serves the Edgewise CRDs from the start, so applying them here (what
/// `edgewise-dev --kubeconfig` and installers do) is accepted and they are ready at once.
/// An update keeps the conditions it had, so re-applying a CRD changes nothing.
pub(super) fn established(r: &Resource, obj: &mut Value, old: Option<&Value>) {
    if r.kind == "CustomResourceDefinition" {
        if let Some(old) = old.filter(|o| !o["status"].is_null()) {
            obj["status"] = old["status"].clone();
            return;
        }
        obj["status"] = json!({"conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now()},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now()},
        ]});
    }
}

/// A request body: JSON, YAML or Kubernetes protobuf, as the content type says.
pub(super) fn parse_body(body: &Bytes, content_type: &str) -> Result<Value, ApiError> {
    if content_type.starts_with(super::protobuf::MEDIA_TYPE) {
        return super::protobuf::decode_object(body)
            .map_err(|e| ApiError::unsupported_media_type(e.to_string()));
    }
    let parsed = if content_type.contains("yaml") {
        serde_yaml_ng::from_slice(body).map_err(|e| e.to_string())
    } else {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| ApiError::bad_request(format!("the body is not a valid object: {e}")))
}

/// The label and field selectors of a list or watch.
pub(super) fn selectors(
    r: &Resource,
    q: &BTreeMap<String, String>,
) -> Result<(LabelSelector, FieldSelector), ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(
        q.get("fieldSelector").map_or("", String::as_str),
        r.selectable,
    )?;
    Ok((labels, fields))
}

/// `fieldValidation`: what to do with fields the schema does not declare.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum FieldValidation {
    /// Drop them silently.
    Ignore,
    /// Drop them and say so in a `Warning` header (the server's default).
    #[default]
    Warn,
    /// Refuse the request, naming each (what kubectl sends by default).
    Strict,
}

/// How a write is carried out, from its query string.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct WriteOptions {
    /// `dryRun=All`: everything but storing.
    pub dry_run: bool,
    pub validation: FieldValidation,
}

impl WriteOptions {
    /// A delete's options may also come in its body (`DeleteOptions`, as client-go and
    /// kube-rs send `dryRun`).
    ///
    /// # Errors
    /// `400` for a body that is not `DeleteOptions`, or a `dryRun` other than `All`.
    pub(super) fn with_delete_body(
        mut self,
        body: &Bytes,
        content_type: &str,
    ) -> Result<Self, ApiError> {
        if body.is_empty() {
            return Ok(self);
        }
        let options = if content_type.starts_with(super::protobuf::MEDIA_TYPE) {
            super::protobuf::decode_delete_options(body)
                .map_err(|e| ApiError::bad_request(e.to_string()))?
        } else {
            parse_body(body, content_type)?
        };
        for mode in options["dryRun"].as_array().into_iter().flatten() {
            match mode.as_str() {
                Some("All") => self.dry_run = true,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "dryRun: Unsupported value: {:?}: supported values: \"All\"",
                        other.unwrap_or_default()
                    )));
                }
            }
        }
        Ok(self)
    }

    /// # Errors
    /// `400` for a `dryRun` or `fieldValidation` value the API server does not know.
    pub(super) fn from_query(q: &BTreeMap<String, String>) -> Result<Self, ApiError> {
        let dry_run = match q.get("dryRun").map(String::as_str) {
            None | Some("") => false,
            Some("All") => true,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "dryRun: Unsupported value: \"{other}\": supported values: \"All\""
                )));
            }
        };
        let validation = match q.get("fieldValidation").map(String::as_str) {
            None | Some("") | Some("Warn") => FieldValidation::Warn,
            Some("Ignore") => FieldValidation::Ignore,
            Some("Strict") => FieldValidation::Strict,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "fieldValidation: Unsupported value: \"{other}\": supported values: \"Ignore\", \"Strict\", \"Warn\""
                )));
            }
        };
        Ok(WriteOptions {
            dry_run,
            validation,
        })
    }
}

/// A successful write: the object as stored (or, dry-run, as it would be) and the warnings
/// for the `Warning` header.
pub(super) struct Written {
    code: StatusCode,
    object: Value,
    warnings: Vec<String>,
}

impl Written {
    pub(super) fn into_response(self) -> axum::response::Response {
        let mut response = json_response(self.code, &self.object);
        for w in self.warnings {
            // RFC 7234 warn-code 299 with agent "-", as the API server sends them.
            let text = format!("299 - \"{}\"", w.replace('\\', "\\\\").replace('"', "\\\""));
            if let Ok(v) = axum::http::HeaderValue::from_str(&text) {
                response.headers_mut().append("Warning", v);
            }
        }
        response
    }
}

/// `metadata.name: Invalid value: "x": …` for each problem, as a 422.
fn invalid_field(
    r: &Resource,
    name: &str,
    field: &str,
    value: &str,
    problems: &[String],
) -> ApiError {
    let causes: Vec<Value> = problems
        .iter()
        .map(|p| json!({"reason": "FieldValueInvalid", "message": format!("Invalid value: {value:?}: {p}"), "field": field}))
        .collect();
    let summary: Vec<String> = problems
        .iter()
        .map(|p| format!("{field}: Invalid value: {value:?}: {p}"))
        .collect();
    ApiError::invalid(
        format!(
            "{} \"{name}\" is invalid: {}",
            r.qualified_kind(),
            summary.join(", ")
        ),
        json!({"name": name, "group": r.group, "kind": r.kind, "causes": causes}),
    )
}

/// Names, label keys and values, and annotation keys, as the API server validates them.
fn check_metadata(r: &Resource, obj: &Value) -> Result<(), ApiError> {
    let meta = &obj["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    if let Err(p) = r.check_name(name) {
        return Err(invalid_field(r, name, "metadata.name", name, &p));
    }
    for (k, v) in meta["labels"].as_object().into_iter().flatten() {
        if let Err(p) = edgewise_core::names::qualified_name(k) {
            return Err(invalid_field(r, name, "metadata.labels", k, &p));
        }
        let value = v.as_str().unwrap_or_default();
        if let Err(p) = edgewise_core::names::label_value(value) {
            return Err(invalid_field(
                r,
                name,
                &format!("metadata.labels[{k}]"),
                value,
                &p,
            ));
        }
    }
    for k in meta["annotations"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k)
    {
        if let Err(p) = edgewise_core::names::qualified_name(k) {
            return Err(invalid_field(r, name, "metadata.annotations", k, &p));
        }
    }
    Ok(())
}

/// Two versions of an object that differ at most in what the server stamps on every write.
fn unchanged(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("managedFields");
        }
        v
    };
    strip(old) == strip(new)
}

impl Api {
    pub(super) fn get(
        &self,
        t: &Target<'_>,
        name: &str,
        table: Option<IncludeObject>,
    ) -> ApiResult {
        let store = self.store()?;
        let obj = store
            .get(&t.resource.key(), &t.namespace, name)
            .cloned()
            .map(|o| t.resource.show(o))
            .ok_or_else(|| ApiError::not_found(t.resource, name))?;
        let body = match table {
            Some(include) => {
                self.table(t.resource, std::slice::from_ref(&obj), store.rv(), include)
            }
            None => obj,
        };
        Ok(json_response(StatusCode::OK, &body))
    }

    pub(super) fn list(
        &self,
        t: &Target<'_>,
        q: &BTreeMap<String, String>,
        table: Option<IncludeObject>,
    ) -> ApiResult {
        let r = t.resource;
        let (labels, fields) = selectors(r, q)?;
        let store = self.store()?;
        let ns = (!t.namespace.is_empty()).then_some(t.namespace.as_str());
        let items: Vec<Value> = store
            .list(&r.key(), ns)
            .map(|o| r.show(o.clone()))
            .filter(|o| labels.matches(o) && fields.matches(o))
            .collect();
        let body = match table {
            Some(include) => self.table(r, &items, store.rv(), include),
            None => json!({
                "kind": format!("{}List", r.kind), "apiVersion": r.api_version(),
                "metadata": {"resourceVersion": store.rv().to_string()}, "items": items
            }),
        };
        Ok(json_response(StatusCode::OK, &body))
    }

    /// Admission as an API server runs it: names and labels, pruning of undeclared fields
    /// (refused or warned about as `fieldValidation` says), then the OpenAPI schema and CEL
    /// with `oldSelf` on updates. Returns the warnings.
    fn admit(
        r: &Resource,
        obj: &mut Value,
        old: Option<&Value>,
        opts: WriteOptions,
    ) -> Result<Vec<String>, ApiError> {
        check_metadata(r, obj)?;
        if r.group.is_empty() && r.kind == "Secret" {
            fold_string_data(obj);
        }
        let mut warnings = Vec::new();
        if let Some(schema) = &r.schema {
            let unknown: Vec<String> = crate::admission::prune(schema, obj)
                .into_iter()
                .map(|f| format!("unknown field \"{f}\""))
                .collect();
            match opts.validation {
                FieldValidation::Strict if !unknown.is_empty() => {
                    return Err(ApiError::bad_request(format!(
                        "{kind} in version \"{v}\" cannot be handled as a {kind}: strict decoding error: {}",
                        unknown.join(", "),
                        kind = r.kind,
                        v = r.version
                    )));
                }
                FieldValidation::Warn => warnings = unknown,
                _ => {}
            }
        }
        let Some(v) = &r.validator else {
            return Ok(warnings);
        };
        v.validate(obj, old).map_err(|errors| {
            let name = obj["metadata"]["name"].as_str().unwrap_or_default();
            let causes: Vec<Value> = errors
                .iter()
                .map(|e| json!({"reason": "FieldValueInvalid", "message": e.message, "field": e.field}))
                .collect();
            let summary: Vec<String> = errors.iter().map(ToString::to_string).collect();
            ApiError::invalid(
                format!("{} \"{name}\" is invalid: {}", r.qualified_kind(), summary.join(", ")),
                json!({"name": name, "group": r.group, "kind": r.kind, "causes": causes}),
            )
        })?;
        Ok(warnings)
    }

    /// Stores `new` in place of `old` (or only answers what would be stored, dry-run). A
    /// write that changes nothing is answered with the object as it is: same
    /// resourceVersion, nothing written, no watch event.
    #[allow(clippy::too_many_arguments)]
    fn commit(
        store: &mut Store,
        r: &Resource,
        namespace: &str,
        name: &str,
        new: Value,
        old: Option<&Value>,
        change: Change,
        opts: WriteOptions,
    ) -> Result<Value, ApiError> {
        if let Some(old) = old
            && change == Change::Modified
            && unchanged(old, &new)
        {
            return Ok(old.clone());
        }
        if opts.dry_run {
            let mut preview = new;
            match old.and_then(|o| o["metadata"]["resourceVersion"].as_str()) {
                Some(rv) => preview["metadata"]["resourceVersion"] = json!(rv),
                None => {
                    if let Some(m) = preview["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                }
            }
            return Ok(preview);
        }
        let written = store.write(&r.key(), namespace, name, r.keep(new), change)?;
        Ok(r.show(written))
    }

    pub(super) fn create(
        &self,
        t: &Target<'_>,
        mut obj: Value,
        opts: WriteOptions,
    ) -> Result<Written, ApiError> {
        let r = t.resource;
        if obj["kind"].as_str().is_some_and(|k| k != r.kind) {
            return Err(ApiError::bad_request(format!(
                "kind {} does not match {}",
                obj["kind"], r.kind
            )));
        }
        obj["kind"] = json!(r.kind);
        obj["apiVersion"] = json!(r.api_version());
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        if r.form == Form::Review {
            return Ok(Written {
                code: StatusCode::CREATED,
                object: super::review::answer(obj),
                warnings: Vec::new(),
            });
        }
        if obj["metadata"]["name"].as_str().is_none_or(str::is_empty) {
            let Some(prefix) = obj["metadata"]["generateName"].as_str() else {
                return Err(ApiError::invalid(
                    format!(
                        "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                        r.qualified_kind()
                    ),
                    json!({"kind": r.kind, "causes": [{"reason": "FieldValueRequired", "message": "Required value: name or generateName is required", "field": "metadata.name"}]}),
                ));
            };
            obj["metadata"]["name"] = json!(format!("{prefix}{}", &uid()[..5]));
        }
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if r.namespaced {
            match obj["metadata"]["namespace"].as_str() {
                Some(ns) if !ns.is_empty() && ns != t.namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the object does not match the namespace on the request",
                    ));
                }
                _ => obj["metadata"]["namespace"] = json!(t.namespace),
            }
        }
        obj["metadata"]["uid"] = json!(uid());
        obj["metadata"]["creationTimestamp"] = json!(now());
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            m.remove("deletionTimestamp");
        }
        if r.status {
            obj["metadata"]["generation"] = json!(1);
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        if r.kind == "Namespace" {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            obj["status"] = json!({"phase": "Active"});
        }
        established(r, &mut obj, None);
        let warnings = Self::admit(r, &mut obj, None, opts)?;
        let mut store = self.store()?;
        if r.namespaced {
            match store.get("/v1/namespaces", "", &t.namespace) {
                None => return Err(ApiError::namespace_not_found(&t.namespace)),
                Some(ns) if !ns["metadata"]["deletionTimestamp"].is_null() => {
                    return Err(ApiError::namespace_terminating(&t.namespace));
                }
                Some(_) => {}
            }
        }
        if store.get(&r.key(), &t.namespace, &name).is_some() {
            return Err(ApiError::already_exists(r, &name));
        }
        let created = Self::commit(
            &mut store,
            r,
            &t.namespace,
            &name,
            obj,
            None,
            Change::Added,
            opts,
        )?;
        Ok(Written {
            code: StatusCode::CREATED,
            object: created,
            warnings,
        })
    }

    /// Replaces an object (or its status), enforcing resourceVersion, generation and the
    /// status-subresource split.
    pub(super) fn update(
        &self,
        t: &Target<'_>,
        name: &str,
        obj: Value,
        from_patch: bool,
        opts: WriteOptions,
    ) -> Result<Written, ApiError> {
        let r = t.resource;
        let mut store = self.store()?;
        let Some(old) = store
            .get(&r.key(), &t.namespace, name)
            .cloned()
            .map(|o| r.show(o))
        else {
            return Err(ApiError::not_found(r, name));
        };
        if let Some(rv) = obj["metadata"]["resourceVersion"].as_str()
            && !rv.is_empty()
            && Some(rv) != old["metadata"]["resourceVersion"].as_str()
            && !from_patch
        {
            return Err(ApiError::conflict(r, name));
        }
        let status_only = t.subresource.as_deref() == Some("status");
        let mut new = if status_only {
            let mut n = old.clone();
            n["status"] = obj["status"].clone();
            n
        } else {
            let mut n = obj;
            if r.status {
                n["status"] = old["status"].clone();
                if n["status"].is_null()
                    && let Some(o) = n.as_object_mut()
                {
                    o.remove("status");
                }
            }
            n
        };
        new["kind"] = json!(r.kind);
        new["apiVersion"] = json!(r.api_version());
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        for keep in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "resourceVersion",
        ] {
            if old["metadata"][keep].is_null() {
                if let Some(m) = new["metadata"].as_object_mut() {
                    m.remove(keep);
                }
            } else {
                new["metadata"][keep] = old["metadata"][keep].clone();
            }
        }
        established(r, &mut new, Some(&old));
        let warnings = Self::admit(r, &mut new, Some(&old), opts)?;
        // After pruning: a field that was dropped changed nothing.
        if r.status {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
            let changed = new["spec"] != old["spec"];
            new["metadata"]["generation"] =
                json!(if changed { generation + 1 } else { generation });
        }
        let finalized = !new["metadata"]["deletionTimestamp"].is_null()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty);
        let change = if finalized {
            Change::Deleted
        } else {
            Change::Modified
        };
        let written = Self::commit(
            &mut store,
            r,
            &t.namespace,
            name,
            new,
            Some(&old),
            change,
            opts,
        )?;
        if finalized && !opts.dry_run {
            self.finish_namespace(&mut store, &t.namespace)?;
        }
        Ok(Written {
            code: StatusCode::OK,
            object: written,
            warnings,
        })
    }

    /// Deletes an object, or marks it for deletion while finalizers remain. A Namespace
    /// takes what it holds with it: its objects are deleted (finalizers honoured) and it
    /// stays `Terminating` until the last is gone.
    pub(super) fn delete(&self, t: &Target<'_>, name: &str, opts: WriteOptions) -> ApiResult {
        let r = t.resource;
        let mut store = self.store()?;
        let Some(mut obj) = store
            .get(&r.key(), &t.namespace, name)
            .cloned()
            .map(|o| r.show(o))
        else {
            return Err(ApiError::not_found(r, name));
        };
        let old = obj.clone();
        if r.kind == "Namespace" {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
            }
            obj["status"]["phase"] = json!("Terminating");
            let written = Self::commit(
                &mut store,
                r,
                "",
                name,
                obj,
                Some(&old),
                Change::Modified,
                opts,
            )?;
            if opts.dry_run {
                return Ok(json_response(StatusCode::OK, &written));
            }
            self.empty_namespace(&mut store, name)?;
            let after = store.get(&r.key(), "", name).cloned().unwrap_or(written);
            return Ok(json_response(StatusCode::OK, &after));
        }
        let has_finalizers = obj["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        let change = if has_finalizers {
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["metadata"]["deletionTimestamp"] = json!(now());
            }
            Change::Modified
        } else {
            Change::Deleted
        };
        let written = Self::commit(
            &mut store,
            r,
            &t.namespace,
            name,
            obj,
            Some(&old),
            change,
            opts,
        )?;
        if change == Change::Deleted && !opts.dry_run {
            self.finish_namespace(&mut store, &t.namespace)?;
        }
        Ok(json_response(StatusCode::OK, &written))
    }

    /// Deletes every object in a terminating namespace, then the namespace if nothing is
    /// left (objects with finalizers stay until their controllers remove them).
    fn empty_namespace(&self, store: &mut Store, namespace: &str) -> Result<(), ApiError> {
        let mut keys: Vec<String> = self
            .resources
            .iter()
            .filter(|r| r.namespaced && r.form != Form::Review)
            .map(Resource::key)
            .collect();
        keys.dedup();
        for key in keys {
            let inside: Vec<Value> = store.list(&key, Some(namespace)).cloned().collect();
            for mut obj in inside {
                let name = obj["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let held = obj["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if held {
                    if obj["metadata"]["deletionTimestamp"].is_null() {
                        obj["metadata"]["deletionTimestamp"] = json!(now());
                        store.write(&key, namespace, &name, obj, Change::Modified)?;
                    }
                } else {
                    store.write(&key, namespace, &name, obj, Change::Deleted)?;
                }
            }
        }
        self.finish_namespace(store, namespace)
    }

    /// Removes a terminating namespace once it holds nothing.
    fn finish_namespace(&self, store: &mut Store, namespace: &str) -> Result<(), ApiError> {
        if namespace.is_empty() {
            return Ok(());
        }
        let terminating = store
            .get("/v1/namespaces", "", namespace)
            .is_some_and(|ns| !ns["metadata"]["deletionTimestamp"].is_null());
        if !terminating {
            return Ok(());
        }
        let occupied = self
            .resources
            .iter()
            .filter(|r| r.namespaced && r.form != Form::Review)
            .any(|r| store.list(&r.key(), Some(namespace)).next().is_some());
        if !occupied && let Some(ns) = store.get("/v1/namespaces", "", namespace).cloned() {
            store.write("/v1/namespaces", "", namespace, ns, Change::Deleted)?;
        }
        Ok(())
    }
}

/// As the API server stores a Secret: `stringData` (write-only, plain text) merged into
/// `data` as base64, winning over a `data` key of the same name, and never stored itself;
/// `type` defaults to `Opaque`.
fn fold_string_data(secret: &mut Value) {
    use base64::Engine as _;
    let Some(obj) = secret.as_object_mut() else {
        return;
    };
    if let Some(Value::Object(plain)) = obj.remove("stringData") {
        let data = obj
            .entry("data")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if let Some(data) = data.as_object_mut() {
            for (k, v) in plain {
                let text = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                data.insert(
                    k,
                    Value::String(base64::engine::general_purpose::STANDARD.encode(text)),
                );
            }
        }
    }
    obj.entry("type")
        .or_insert_with(|| Value::String("Opaque".into()));
}
