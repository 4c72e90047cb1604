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
    /// The CRD's OpenAPI schema (CRDs), for `kubectl explain`.
    pub schema: Option<Value>,
}

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

    /// Key in the store.
    #[must_use]
    pub fn key(&self) -> String {
        format!("{}/{}/{}", self.group, self.version, self.plural)
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
        }
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
        }
    }
}

/// Everything served.
#[must_use]
pub fn all() -> Vec<Resource> {
    let mut out = vec![
        Resource::builtin("", "v1", "Namespace", "namespaces", false, &["ns"]),
        Resource::builtin("", "v1", "Secret", "secrets", true, &[]),
        Resource::builtin("", "v1", "ConfigMap", "configmaps", true, &["cm"]),
        Resource::builtin("", "v1", "Event", "events", true, &["ev"]),
        Resource::builtin("events.k8s.io", "v1", "Event", "events", true, &["ev"]),
        Resource::builtin("coordination.k8s.io", "v1", "Lease", "leases", true, &[]),
        Resource::builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            &["crd"],
        ),
    ];
    out.extend(edgewise_operator::crd::all().iter().map(Resource::from_crd));
    out
}
