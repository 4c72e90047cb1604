//! Label and field selectors, as the API server parses them from query strings.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<Req>);

/// Splits on commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn set(values: &str) -> Vec<String> {
    values
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

/// A selector that does not parse; the message is the API server's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A label requirement that does not parse.
    #[error("unable to parse requirement: {0:?}")]
    Requirement(String),
    /// A field requirement with no operator.
    #[error("invalid field selector {0:?}")]
    Field(String),
    /// A field custom resources cannot be selected on.
    #[error("field label not supported: {0}")]
    UnsupportedField(String),
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
    ///
    /// # Errors
    /// [`SelectorError::Requirement`] naming the requirement that does not parse.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let req = if let Some((k, v)) = part.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once(" notin ") {
                Req::NotIn(k.trim().into(), set(v))
            } else if let Some((k, v)) = part.split_once(" in ") {
                Req::In(k.trim().into(), set(v))
            } else if let Some(k) = part.strip_prefix('!') {
                Req::NotExists(k.trim().into())
            } else if part
                .chars()
                .all(|c| c.is_alphanumeric() || "-_./".contains(c))
            {
                Req::Exists(part.into())
            } else {
                return Err(SelectorError::Requirement(part.to_owned()));
            };
            reqs.push(req);
        }
        Ok(LabelSelector(reqs))
    }

    /// Whether an object's labels satisfy the selector.
    #[must_use]
    pub fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => get(k) == Some(v.as_str()),
            Req::Ne(k, v) => get(k) != Some(v.as_str()),
            Req::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            Req::Exists(k) => get(k).is_some(),
            Req::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed field selector: `metadata.name` and `metadata.namespace` on every kind, as
/// custom resources support, and the fields a kind adds (`involvedObject.name` on Events).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses `metadata.name=x,metadata.namespace!=y`, allowing `extra` fields too.
    ///
    /// # Errors
    /// [`SelectorError`] naming the requirement or the unsupported field.
    pub fn parse(s: &str, extra: &[&str]) -> Result<Self, SelectorError> {
        let mut out = Vec::new();
        for part in split_top(s) {
            let (field, eq, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, true, v)
            } else {
                return Err(SelectorError::Field(part.to_owned()));
            };
            let field = field.trim();
            if !["metadata.name", "metadata.namespace"].contains(&field) && !extra.contains(&field)
            {
                return Err(SelectorError::UnsupportedField(field.to_owned()));
            }
            out.push((field.to_owned(), eq, value.trim().to_owned()));
        }
        Ok(FieldSelector(out))
    }

    /// Whether an object matches; an absent field is the empty string, as on a server.
    #[must_use]
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|(field, eq, value)| {
            let actual = field.split('.').try_fold(object, |v, k| v.get(k)).map_or(
                String::new(),
                |v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                },
            );
            (actual == *value) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_parse_and_match() {
        let obj = serde_json::json!({"metadata": {"labels": {"app": "x", "tier": "beta"}}});
        for (sel, want) in [
            ("app=x", true),
            ("app==x,tier=beta", true),
            ("app!=x", false),
            ("tier in (beta, ga)", true),
            ("tier notin (beta)", false),
            ("app", true),
            ("!app", false),
            ("!missing,app in (x)", true),
        ] {
            assert_eq!(
                LabelSelector::parse(sel).expect("parses").matches(&obj),
                want,
                "{sel}"
            );
        }
        assert!(LabelSelector::parse("a b c").is_err());
    }

    #[test]
    fn field_selectors_support_name_and_namespace() {
        let obj = serde_json::json!({"metadata": {"name": "a", "namespace": "ns"}, "involvedObject": {"name": "r"}});
        let matches = |sel: &str, extra: &[&str]| {
            FieldSelector::parse(sel, extra)
                .expect("parses")
                .matches(&obj)
        };
        assert!(matches("metadata.name=a", &[]));
        assert!(!matches("metadata.namespace!=ns", &[]));
        assert!(FieldSelector::parse("spec.x=1", &[]).is_err());
        assert!(matches("involvedObject.name=r", &["involvedObject.name"]));
        assert!(!matches("involvedObject.name=s", &["involvedObject.name"]));
        assert!(matches("involvedObject.uid=", &["involvedObject.uid"]));
    }
}
