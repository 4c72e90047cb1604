//! Routing attributes of a data-plane request: the body's `edgewise` object (SDKs send it
//! with `extra_body`) and `x-edgewise-*` headers, the header winning; what the app does not
//! say the agent fills in (input tokens, complexity) or leaves to its own view (network).

use axum::http::HeaderMap;
use edgewise_proto::router::{DecideRequest, Network};
use serde_json::Value;

use crate::openai::{ApiError, Request};
use crate::runtime::Prompt;

/// Known attributes: (body key, header suffix).
const KNOWN: &[(&str, &str)] = &[
    ("requestId", "request-id"),
    ("task", "task"),
    ("dataClass", "data-class"),
    ("latencyBudgetMs", "latency-budget-ms"),
    ("network", "network"),
    ("battery", "battery"),
    ("complexity", "complexity"),
];

/// Roughly four characters a token, for a model whose tokenizer is not on the device.
pub fn estimate_tokens(prompt: &Prompt) -> u32 {
    let chars: usize = match prompt {
        Prompt::Text(t) => t.chars().count(),
        Prompt::Chat(m) => m.iter().map(|m| m.content.chars().count() + 4).sum(),
    };
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

/// Complexity when the app gives none and no learned router is loaded: longer prompts are
/// harder, saturating at 2,000 tokens.
pub fn heuristic_complexity(input_tokens: u32) -> f32 {
    (input_tokens as f32 / 2000.0).min(1.0)
}

/// What the learned router reads of a request: the prompt, or the user's turns of a chat.
pub fn scored_text(prompt: &Prompt) -> String {
    match prompt {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(messages) => messages
            .iter()
            .filter(|m| m.role == "user")
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Whether the app gave the request's complexity itself (body or header).
pub fn gives_complexity(request: &Request, headers: &HeaderMap) -> bool {
    headers.contains_key("x-edgewise-complexity") || request.edgewise.contains_key("complexity")
}

/// What the agent knows of a request and its device, for what the app does not say.
#[derive(Clone, Copy, Debug, Default)]
pub struct Filled {
    /// Prompt tokens (the device model's tokenizer, else an estimate).
    pub input_tokens: u32,
    /// The learned router's complexity, if one is loaded.
    pub learned_complexity: Option<f32>,
    /// The device's battery, 0–1, if it has one.
    pub battery: Option<f32>,
}

/// The Decide request for `request`: the app's attributes, the rest from `filled`.
pub fn from_request(
    request: &Request,
    headers: &HeaderMap,
    filled: Filled,
) -> Result<DecideRequest, ApiError> {
    let Filled {
        input_tokens,
        learned_complexity: learned,
        battery: device_battery,
    } = filled;
    let get = |key: &str, suffix: &str| -> Option<String> {
        headers
            .get(format!("x-edgewise-{suffix}"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .or_else(|| request.edgewise.get(key).and_then(text))
    };
    let number = |v: Option<String>, field: &'static str| -> Result<Option<f64>, ApiError> {
        v.map(|s| {
            s.trim().parse::<f64>().map_err(|_| {
                ApiError::invalid(
                    format!("edgewise.{field} must be a number, not {s:?}"),
                    Some("edgewise"),
                )
            })
        })
        .transpose()
    };
    let request_id = get("requestId", "request-id")
        .unwrap_or_else(|| format!("req-{:016x}", rand::random::<u64>()));
    let task = get("task", "task");
    let data_class = get("dataClass", "data-class");
    let latency = number(
        get("latencyBudgetMs", "latency-budget-ms"),
        "latencyBudgetMs",
    )?;
    let battery = number(get("battery", "battery"), "battery")?;
    let complexity = number(get("complexity", "complexity"), "complexity")?;
    let network = match get("network", "network").as_deref() {
        None => Network::Unspecified,
        Some("online") => Network::Online,
        Some("offline") => Network::Offline,
        Some("metered") => Network::Metered,
        Some(other) => {
            return Err(ApiError::invalid(
                format!("edgewise.network must be online, offline or metered, not {other:?}"),
                Some("edgewise"),
            ));
        }
    };
    let mut attributes = std::collections::HashMap::new();
    if let Some(Value::Object(custom)) = request.edgewise.get("attributes") {
        for (k, v) in custom {
            if let Some(t) = text(v) {
                attributes.insert(k.clone(), t);
            }
        }
    }
    for (k, v) in &request.edgewise {
        if k != "attributes"
            && !KNOWN.iter().any(|(key, _)| key == k)
            && let Some(t) = text(v)
        {
            attributes.insert(k.clone(), t);
        }
    }
    for (name, value) in headers {
        if let Some(suffix) = name.as_str().strip_prefix("x-edgewise-")
            && !KNOWN.iter().any(|(_, s)| *s == suffix)
            && let Ok(v) = value.to_str()
        {
            attributes.insert(suffix.to_owned(), v.to_owned());
        }
    }
    Ok(DecideRequest {
        request_id,
        task,
        data_class,
        input_tokens: Some(input_tokens),
        latency_budget_ms: latency.map(|v| v.max(0.0) as u32),
        network: network as i32,
        battery: battery.map(|v| v as f32).or(device_battery),
        complexity: Some(complexity.map_or_else(
            || learned.unwrap_or_else(|| heuristic_complexity(input_tokens)),
            |v| v as f32,
        )),
        attributes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::{Endpoint, wire};

    fn filled(learned_complexity: Option<f32>, battery: Option<f32>) -> Filled {
        Filled {
            input_tokens: 12,
            learned_complexity,
            battery,
        }
    }

    #[test]
    fn headers_win_over_the_body_and_unknown_keys_become_attributes() {
        let req = wire::parse(
            Endpoint::Chat,
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],
                 "edgewise":{"task":"chat","dataClass":"public","tier":"gold","attributes":{"team":"x"}}}"#,
        )
        .expect("parses");
        let mut h = HeaderMap::new();
        h.insert("x-edgewise-data-class", "private".parse().expect("value"));
        h.insert("x-edgewise-region", "eu".parse().expect("value"));
        let d = from_request(&req, &h, filled(None, None)).expect("attributes");
        assert_eq!(d.task.as_deref(), Some("chat"));
        assert_eq!(d.data_class.as_deref(), Some("private"));
        assert_eq!(d.attributes["tier"], "gold");
        assert_eq!(d.attributes["team"], "x");
        assert_eq!(d.attributes["region"], "eu");
        assert_eq!(d.input_tokens, Some(12));
        assert!(d.complexity.is_some_and(|c| c < 0.01), "the heuristic");
        assert!(!gives_complexity(&req, &h));
        let learned = from_request(&req, &h, filled(Some(0.9), None)).expect("attributes");
        assert_eq!(learned.complexity, Some(0.9), "the learned router's score");
        h.insert("x-edgewise-complexity", "0.25".parse().expect("value"));
        assert!(gives_complexity(&req, &h));
        let given = from_request(&req, &h, filled(Some(0.9), None)).expect("attributes");
        assert_eq!(given.complexity, Some(0.25), "the app's own value wins");
        assert_eq!(given.battery, None, "no battery known");
        let device = from_request(&req, &h, filled(None, Some(0.4))).expect("attributes");
        assert_eq!(
            device.battery,
            Some(0.4),
            "the device's battery when the app says none"
        );
        h.insert("x-edgewise-battery", "0.9".parse().expect("value"));
        let app = from_request(&req, &h, filled(None, Some(0.4))).expect("attributes");
        assert_eq!(app.battery, Some(0.9), "the app's own value wins");
        h.insert("x-edgewise-network", "sideways".parse().expect("value"));
        let err = from_request(&req, &h, filled(None, None)).expect_err("refused");
        assert!(err.message.contains("network"), "{}", err.message);
    }
}
