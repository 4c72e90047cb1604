//! The resources the dev API serves: the three Edgewise CRDs and the built-ins the product
//! uses (Namespaces, Secrets, ConfigMaps, core and events.k8s.io Events, Leases, and
//! CustomResourceDefinitions, so installers that apply the CRDs work against it).

use std::sync::Arc;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceColumnDefinition, CustomResourceDefinition,
};
use serde_json::Value;

use crate::admission::SchemaValidator;

/// One served resource.
#[derive(Clone)]
pub struct Resource {
    /// API group ("" for core).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind.
    pub kind: String,
    /// Plural (URL segment).
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Short names.
    pub short_names: Vec<String>,
    /// Categories.
    pub categories: Vec<String>,
    /// Has a status subresource (spec and status written separately).
    pub status: bool,
    /// Printer columns (CRDs).
    pub columns: Vec<CustomResourceColumnDefinition>,
    /// Admission (CRDs).
    pub validator: Option<Arc<SchemaValidator>>,
    /// The CRD's OpenAPI schema (CRDs), for `kubectl explain` and pruning.
    pub schema: Option<Value>,
    /// How its objects are kept.
    pub form: Form,
    /// Fields a field selector may name besides `metadata.name` and `metadata.namespace`.
    pub selectable: &'static [&'static str],
    /// Verbs it serves (`create` only for the access reviews).
    pub verbs: &'static [&'static str],
}

/// How a resource's objects are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// As written.
    Own,
    /// Core `v1` Events: kept as `events.k8s.io/v1` Events, converted on the way in and out.
    CoreEvent,
    /// Access reviews: answered, never stored.
    Review,
}

const ALL_VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

impl std::fmt::Debug for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resource")
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Resource {
    /// `apiVersion` of its objects.
    #[must_use]
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `ModelRollout.edgewise.dev`, or `Namespace` for the core group, as error messages
    /// name a kind.
    #[must_use]
    pub fn qualified_kind(&self) -> String {
        if self.group.is_empty() {
            self.kind.clone()
        } else {
            format!("{}.{}", self.kind, self.group)
        }
    }

    /// Key in the store (shared by the two Event APIs).
    #[must_use]
    pub fn key(&self) -> String {
        match self.form {
            Form::CoreEvent => "events.k8s.io/v1/events".to_owned(),
            Form::Own | Form::Review => format!("{}/{}/{}", self.group, self.version, self.plural),
        }
    }

    /// A stored object as this resource shows it.
    #[must_use]
    pub fn show(&self, obj: Value) -> Value {
        match self.form {
            Form::CoreEvent => super::events::to_core(obj),
            Form::Own | Form::Review => obj,
        }
    }

    /// An object of this resource as it is stored.
    #[must_use]
    pub fn keep(&self, obj: Value) -> Value {
        match self.form {
            Form::CoreEvent => super::events::from_core(obj),
            Form::Own | Form::Review => obj,
        }
    }

    /// `metadata.name` rule: Namespaces are DNS labels, everything else DNS subdomains.
    ///
    /// # Errors
    /// The API server's words for each problem.
    pub fn check_name(&self, name: &str) -> Result<(), Vec<String>> {
        if self.kind == "Namespace" {
            edgewise_core::names::dns_label(name)
        } else {
            edgewise_core::names::dns_subdomain(name)
        }
    }

    /// Whether it is a custom resource (no strategic merge patch, pruning applies).
    #[must_use]
    pub fn is_custom(&self) -> bool {
        self.schema.is_some()
    }

    fn builtin(
        group: &'static str,
        version: &'static str,
        kind: &str,
        plural: &str,
        namespaced: bool,
        short: &[&str],
    ) -> Self {
        Resource {
            group,
            version,
            kind: kind.to_owned(),
            plural: plural.to_owned(),
            singular: kind.to_lowercase(),
            namespaced,
            short_names: short.iter().map(|s| (*s).to_owned()).collect(),
            categories: Vec::new(),
            status: false,
            columns: Vec::new(),
            validator: None,
            schema: None,
            form: Form::Own,
            selectable: &[],
            verbs: ALL_VERBS,
        }
    }

    fn with_form(mut self, form: Form) -> Self {
        self.form = form;
        self
    }

    fn selecting(mut self, fields: &'static [&'static str]) -> Self {
        self.selectable = fields;
        self
    }

    fn review(group: &'static str, kind: &str, plural: &str) -> Self {
        let mut r = Self::builtin(group, "v1", kind, plural, false, &[]).with_form(Form::Review);
        r.verbs = &["create"];
        r
    }

    fn from_crd(crd: &CustomResourceDefinition) -> Self {
        let names = &crd.spec.names;
        let version = &crd.spec.versions[0];
        let group: &'static str = if crd.spec.group == edgewise_operator::crd::GROUP {
            edgewise_operator::crd::GROUP
        } else {
            "unknown"
        };
        Resource {
            group,
            version: edgewise_operator::crd::VERSION,
            kind: names.kind.clone(),
            plural: names.plural.clone(),
            singular: names
                .singular
                .clone()
                .unwrap_or_else(|| names.kind.to_lowercase()),
            namespaced: crd.spec.scope == "Namespaced",
            short_names: names.short_names.clone().unwrap_or_default(),
            categories: names.categories.clone().unwrap_or_default(),
            status: version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            columns: version
                .additional_printer_columns
                .clone()
                .unwrap_or_default(),
            validator: SchemaValidator::for_crd(crd).ok().map(Arc::new),
            schema: version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .and_then(|s| serde_json::to_value(s).ok()),
            form: Form::Own,
            selectable: &[],
            verbs: ALL_VERBS,
        }
    }
}

/// Everything served.
#[must_use]
pub fn all() -> Vec<Resource> {
    let mut out = vec![
        Resource::builtin("", "v1", "Namespace", "namespaces", false, &["ns"])
            .selecting(&["status.phase"]),
        Resource::builtin("", "v1", "Secret", "secrets", true, &[]).selecting(&["type"]),
        Resource::builtin("", "v1", "ConfigMap", "configmaps", true, &["cm"]),
        Resource::builtin("", "v1", "Event", "events", true, &["ev"])
            .with_form(Form::CoreEvent)
            .selecting(super::events::CORE_FIELDS),
        Resource::builtin("events.k8s.io", "v1", "Event", "events", true, &["ev"])
            .selecting(super::events::EVENTS_FIELDS),
        Resource::builtin("coordination.k8s.io", "v1", "Lease", "leases", true, &[]),
        Resource::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            &["crd"],
        ),
        Resource::review(
            "authorization.k8s.io",
            "SelfSubjectAccessReview",
            "selfsubjectaccessreviews",
        ),
        Resource::review(
            "authorization.k8s.io",
            "SelfSubjectRulesReview",
            "selfsubjectrulesreviews",
        ),
    ];
    out.extend(edgewise_operator::crd::all().iter().map(Resource::from_crd));
    out
}
