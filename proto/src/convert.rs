//! Conversions between wire messages and domain types, validating on the way in.
//!
//! Wire input is untrusted: every `TryFrom` here names the field at fault so the gateway
//! and agent can answer with an `INVALID_ARGUMENT` that says what to fix.

use edgewise_core::policy::{Decision, Network, Reroute, Target as CoreTarget, TargetKind};
use edgewise_core::variant::DeviceFacts;
use edgewise_core::version::parse_version;

use crate::{fleet, router};

/// Longest identifier or label the protocol accepts.
pub const MAX_FIELD_LEN: usize = 256;

/// A wire message that does not make a valid domain value.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is missing or empty.
    #[error("{0} is required")]
    Missing(&'static str),
    /// A field is longer than the protocol allows.
    #[error("{field} is {len} bytes; at most {max} are allowed")]
    TooLong {
        /// Field path.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field holds an invalid value.
    #[error("{field}: {message}")]
    Invalid {
        /// Field path.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// `Result` with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that a required string field is present and not oversized.
///
/// # Errors
/// [`Error::Missing`] or [`Error::TooLong`] naming `field`.
pub fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str> {
    if value.is_empty() {
        return Err(Error::Missing(field));
    }
    bounded(field, value)
}

/// Checks that a string field is not oversized.
///
/// # Errors
/// [`Error::TooLong`] naming `field`.
pub fn bounded<'a>(field: &'static str, value: &'a str) -> Result<&'a str> {
    if value.len() > MAX_FIELD_LEN {
        return Err(Error::TooLong {
            field,
            len: value.len(),
            max: MAX_FIELD_LEN,
        });
    }
    Ok(value)
}

impl TryFrom<&fleet::DeviceFacts> for DeviceFacts {
    type Error = Error;

    fn try_from(f: &fleet::DeviceFacts) -> Result<Self> {
        let agent_version = parse_version(required("facts.agent_version", &f.agent_version)?)
            .map_err(|e| Error::Invalid {
                field: "facts.agent_version",
                message: e.to_string(),
            })?;
        if f.accelerators.len() > 32 {
            return Err(Error::Invalid {
                field: "facts.accelerators",
                message: format!("{} entries; at most 32", f.accelerators.len()),
            });
        }
        for a in &f.accelerators {
            required("facts.accelerators[]", a)?;
        }
        Ok(DeviceFacts {
            os: required("facts.os", &f.os)?.to_ascii_lowercase(),
            arch: required("facts.arch", &f.arch)?.to_ascii_lowercase(),
            memory_mib: f.memory_mib,
            accelerators: f.accelerators.clone(),
            agent_version,
        })
    }
}

impl From<&DeviceFacts> for fleet::DeviceFacts {
    fn from(f: &DeviceFacts) -> Self {
        fleet::DeviceFacts {
            os: f.os.clone(),
            arch: f.arch.clone(),
            memory_mib: f.memory_mib,
            accelerators: f.accelerators.clone(),
            agent_version: f.agent_version.to_string(),
        }
    }
}

impl router::Network {
    /// The domain network state; `Unspecified` defers to the agent's own view.
    #[must_use]
    pub fn to_core(self, agent_view: Network) -> Network {
        match self {
            router::Network::Unspecified => agent_view,
            router::Network::Online => Network::Online,
            router::Network::Offline => Network::Offline,
            router::Network::Metered => Network::Metered,
        }
    }
}

impl From<Option<Reroute>> for router::Reroute {
    fn from(r: Option<Reroute>) -> Self {
        match r {
            None => router::Reroute::None,
            Some(Reroute::Offline) => router::Reroute::Offline,
            Some(Reroute::OverBudget) => router::Reroute::OverBudget,
        }
    }
}

/// Resolves an on-device model family to its installed version and path.
pub trait InstalledModels {
    /// `(version, path)` of the active install of `model`, if any.
    fn active(&self, model: &str) -> Option<(&str, &str)>;
}

/// Builds the wire target for a policy target, resolving on-device models.
pub fn target(t: &CoreTarget, installed: &impl InstalledModels) -> router::Target {
    let kind = match &t.kind {
        TargetKind::Device { model } => {
            let (version, path) = installed.active(model).unwrap_or(("", ""));
            router::target::Kind::Device(router::DeviceRoute {
                model: model.to_string(),
                version: version.to_owned(),
                path: path.to_owned(),
            })
        }
        TargetKind::Cloud {
            endpoint,
            model,
            cost_per_1k_tokens_usd,
            timeout_ms,
        } => router::target::Kind::Cloud(router::CloudRoute {
            endpoint: endpoint.to_string(),
            model: model.to_string(),
            cost_per_1k_tokens_usd: *cost_per_1k_tokens_usd,
            timeout_ms: *timeout_ms,
        }),
    };
    router::Target {
        name: t.name.to_string(),
        kind: Some(kind),
    }
}

/// Builds the wire answer to `Decide`.
pub fn decide_response(
    d: &Decision<'_>,
    installed: &impl InstalledModels,
) -> router::DecideResponse {
    router::DecideResponse {
        target: Some(target(d.target, installed)),
        fallback: d.fallback().map(|t| target(t, installed)).collect(),
        refine: d.refine.map(|t| target(t, installed)),
        shadow: d.shadow.map(|t| target(t, installed)),
        reprocess: d.reprocess.map(|t| target(t, installed)),
        rule: d.rule.to_owned(),
        policy_version: d.policy_version.to_owned(),
        reroute: router::Reroute::from(d.reroute).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn facts() -> fleet::DeviceFacts {
        fleet::DeviceFacts {
            os: "Android".into(),
            arch: "arm64".into(),
            memory_mib: 8192,
            accelerators: vec!["npu".into()],
            agent_version: "1.2.0".into(),
        }
    }

    #[test]
    fn facts_round_trip_through_the_wire() {
        let domain = DeviceFacts::try_from(&facts()).expect("valid");
        assert_eq!(domain.os, "android", "normalised to lowercase");
        let back = fleet::DeviceFacts::from(&domain);
        let bytes = back.encode_to_vec();
        let decoded = fleet::DeviceFacts::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(DeviceFacts::try_from(&decoded).expect("valid"), domain);
    }

    #[test]
    fn invalid_facts_name_the_field() {
        let mut f = facts();
        f.agent_version = "1.2".into();
        let err = DeviceFacts::try_from(&f)
            .expect_err("not semver")
            .to_string();
        assert!(err.starts_with("facts.agent_version:"), "{err}");
        let mut f = facts();
        f.os = String::new();
        assert_eq!(
            DeviceFacts::try_from(&f).expect_err("missing").to_string(),
            "facts.os is required"
        );
        let mut f = facts();
        f.arch = "x".repeat(MAX_FIELD_LEN + 1);
        assert!(
            DeviceFacts::try_from(&f)
                .expect_err("too long")
                .to_string()
                .starts_with("facts.arch is 257 bytes")
        );
    }

    struct OneModel;
    impl InstalledModels for OneModel {
        fn active(&self, model: &str) -> Option<(&str, &str)> {
            (model == "assistant").then_some(("2.0.0", "/data/store/sha256/ab"))
        }
    }

    #[test]
    fn decisions_resolve_device_targets_to_installed_models() {
        let spec = serde_json::json!({
            "targets": [
                {"name": "dev", "device": {"model": "assistant"}},
                {"name": "cloud", "cloud": {"endpoint": "https://x", "model": "big"}}
            ],
            "rules": [{"match": [{"attribute": "task", "eq": "hard"}], "route": "cloud", "fallback": ["dev"]}],
            "default": {"route": "dev"}
        });
        let policy = edgewise_core::policy::compile(&serde_json::from_value(spec).expect("spec"))
            .expect("compiles");
        let d = policy.decide(&edgewise_core::policy::Request {
            task: Some("hard"),
            ..Default::default()
        });
        let wire = decide_response(&d, &OneModel);
        assert_eq!(wire.rule, "rule-0");
        let Some(router::target::Kind::Device(dev)) = &wire.fallback[0].kind else {
            panic!("fallback should be the device: {wire:?}");
        };
        assert_eq!(
            (dev.version.as_str(), dev.path.as_str()),
            ("2.0.0", "/data/store/sha256/ab")
        );
        assert_eq!(wire.reroute, router::Reroute::None as i32);
    }
}
