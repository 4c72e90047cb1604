//! Kubernetes name and label rules, as the API server applies them, so that the CRD
//! schemas, the dev API and the plugin reject the same strings with the same words.
//!
//! The messages follow `k8s.io/apimachinery/pkg/util/validation`, which is what kubectl
//! users have learnt to read.

use schemars::{Schema, SchemaGenerator, json_schema};

/// The RFC 1123 label pattern: names of targets, variants and model families.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Longest RFC 1123 label.
pub const DNS_LABEL_MAX: usize = 63;
/// Longest RFC 1123 subdomain (object names of most kinds).
pub const DNS_SUBDOMAIN_MAX: usize = 253;
/// Longest label value and label-key name part.
pub const LABEL_MAX: usize = 63;

/// The JSON schema of a DNS label field, for `#[schemars(schema_with = ...)]`.
pub fn dns_label_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": DNS_LABEL_MAX,
        "pattern": DNS_LABEL_PATTERN,
    })
}

fn alnum_lower(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

/// Checks an RFC 1123 label (`my-name`); `Err` holds every problem, as the API server lists them.
pub fn dns_label(s: &str) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    if s.len() > DNS_LABEL_MAX {
        errs.push(format!("must be no more than {DNS_LABEL_MAX} characters"));
    }
    if !is_label_shaped(s) {
        errs.push(
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or \
             '-', and must start and end with an alphanumeric character (e.g. 'my-name', or \
             '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
                .to_owned(),
        );
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

fn is_label_shaped(s: &str) -> bool {
    let (Some(first), Some(last)) = (s.chars().next(), s.chars().last()) else {
        return false;
    };
    alnum_lower(first) && alnum_lower(last) && s.chars().all(|c| alnum_lower(c) || c == '-')
}

/// Checks an RFC 1123 subdomain (`example.com`), the rule for most object names.
pub fn dns_subdomain(s: &str) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    if s.len() > DNS_SUBDOMAIN_MAX {
        errs.push(format!(
            "must be no more than {DNS_SUBDOMAIN_MAX} characters"
        ));
    }
    if !s.split('.').all(is_label_shaped) {
        errs.push(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, \
             '-' or '.', and must start and end with an alphanumeric character (e.g. \
             'example.com', regex used for validation is \
             '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
                .to_owned(),
        );
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

fn is_qualified_name_part(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric();
    let (Some(first), Some(last)) = (s.chars().next(), s.chars().last()) else {
        return false;
    };
    ok(first) && ok(last) && s.chars().all(|c| ok(c) || matches!(c, '-' | '_' | '.'))
}

const QUALIFIED_NAME_SHAPE: &str = "name part must consist of alphanumeric characters, '-', '_' \
     or '.', and must start and end with an alphanumeric character (e.g. 'MyName', or \
     'my.name', or '123-abc', regex used for validation is \
     '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

/// Checks a label or annotation key: an optional DNS-subdomain prefix and `/`, then a name.
pub fn qualified_name(key: &str) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() {
                errs.push("prefix part must be non-empty".to_owned());
            } else if let Err(e) = dns_subdomain(prefix) {
                errs.extend(e.into_iter().map(|m| format!("prefix part {m}")));
            }
            if name.contains('/') {
                errs.push(
                    "a qualified name must consist of a name part and an optional prefix \
                     separated by '/'"
                        .to_owned(),
                );
            }
            name
        }
        None => key,
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".to_owned());
    } else {
        if name.len() > LABEL_MAX {
            errs.push(format!(
                "name part must be no more than {LABEL_MAX} characters"
            ));
        }
        if !is_qualified_name_part(name) {
            errs.push(QUALIFIED_NAME_SHAPE.to_owned());
        }
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

/// Checks a label value: empty, or at most 63 characters shaped like a qualified name part.
pub fn label_value(v: &str) -> Result<(), Vec<String>> {
    let mut errs = Vec::new();
    if v.len() > LABEL_MAX {
        errs.push(format!("must be no more than {LABEL_MAX} characters"));
    }
    if !v.is_empty() && !is_qualified_name_part(v) {
        errs.push(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', \
             '_' or '.', and must start and end with an alphanumeric character (e.g. \
             'MyValue', or 'my_value', or '12345', regex used for validation is \
             '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
                .to_owned(),
        );
    }
    if errs.is_empty() { Ok(()) } else { Err(errs) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_rfc_1123() {
        for ok in ["a", "my-name", "123-abc", &"a".repeat(63)] {
            assert!(dns_label(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(dns_label(bad).is_err(), "{bad}");
        }
        assert_eq!(dns_label(&"a".repeat(64)).expect_err("invalid").len(), 1);
        assert_eq!(dns_label("Bad_Name!").expect_err("invalid").len(), 1);
    }

    #[test]
    fn subdomains_allow_dots_and_253_characters() {
        assert!(dns_subdomain("assistant-2.1.0").is_ok());
        assert!(dns_subdomain("example.com").is_ok());
        assert!(dns_subdomain(&format!("{}.b", "a".repeat(251))).is_ok());
        for bad in ["", "a..b", ".a", "a.", "Bad_Name!", &"a".repeat(254)] {
            assert!(dns_subdomain(bad).is_err(), "{bad}");
        }
        let long = dns_subdomain(&"a".repeat(300)).expect_err("invalid");
        assert!(long[0].contains("253"), "{long:?}");
    }

    #[test]
    fn label_keys_have_an_optional_subdomain_prefix() {
        for ok in ["app", "edgewise.dev/tier", "a_b.c-D", "k8s.io/x"] {
            assert!(qualified_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/x",
            "a/",
            "a/b/c",
            "Bad_Prefix/x",
            "-x",
            "x-",
            &"a".repeat(64),
        ] {
            assert!(qualified_name(bad).is_err(), "{bad}");
        }
        assert!(qualified_name("Bad/x").expect_err("invalid")[0].starts_with("prefix part"));
    }

    #[test]
    fn label_values_may_be_empty() {
        for ok in ["", "gold", "v1.2_3", &"a".repeat(63)] {
            assert!(label_value(ok).is_ok(), "{ok}");
        }
        for bad in ["-a", "a b", "ü", &"a".repeat(64)] {
            assert!(label_value(bad).is_err(), "{bad}");
        }
    }
}
