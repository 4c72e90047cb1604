//! `kubectl auth can-i`: the access reviews, answered and never stored. The dev endpoint
//! has no authorization (it binds loopback and trusts its caller), so the answer is always
//! yes, and says why.

use serde_json::{Value, json};

/// Why every review is allowed.
pub(super) const REASON: &str =
    "the Edgewise dev API allows every request: it has no authorization (loopback only)";

/// The review with its `status` filled in.
pub(super) fn answer(mut review: Value) -> Value {
    review["status"] = if review["kind"] == "SelfSubjectRulesReview" {
        json!({
            "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
            "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            "incomplete": false,
            "evaluationError": REASON,
        })
    } else {
        json!({"allowed": true, "reason": REASON})
    };
    review
}
