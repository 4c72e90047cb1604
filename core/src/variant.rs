//! Model variants and which one a device gets.
//!
//! One model version ships in several variants (formats, quantisations, accelerators).
//! Variants are tried in order and a device gets the first whose requirements its facts
//! satisfy; when none fits, the answer says why for each variant.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::version::{AtLeast, Version, parse_version};

/// One deployable build of a model version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Variant {
    /// Unique name within the model version, e.g. `cpu-int8`.
    #[schemars(schema_with = "crate::names::dns_label_schema")]
    pub name: String,
    /// Where the bytes are and what they must hash to.
    pub artifact: Artifact,
    /// File format of the artifact.
    pub format: ModelFormat,
    /// What a device needs to run this variant.
    #[serde(default)]
    pub requires: Requirements,
}

/// An artifact in S3-compatible storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// `s3://bucket/key`.
    #[schemars(regex(pattern = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.+$"))]
    pub uri: String,
    /// Lowercase hex SHA-256 of the object's bytes.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// Object size in bytes.
    #[schemars(range(min = 1))]
    pub size_bytes: u64,
    /// Base64 ed25519 signature by the publisher over
    /// `edgewise-artifact-v1\n<model>\n<version>\n<variant>\n<sha256 hex>`, if signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

impl Artifact {
    /// Bucket and key of `uri`.
    ///
    /// # Errors
    /// [`BadArtifactUri`] when `uri` is not `s3://bucket/key` with both parts present.
    pub fn location(&self) -> Result<(&str, &str), BadArtifactUri> {
        self.uri
            .strip_prefix("s3://")
            .and_then(|rest| rest.split_once('/'))
            .filter(|(bucket, key)| !bucket.is_empty() && !key.is_empty())
            .ok_or_else(|| BadArtifactUri(self.uri.clone()))
    }
}

/// An artifact URI that is not `s3://bucket/key`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("artifact uri {0:?} is not s3://bucket/key")]
pub struct BadArtifactUri(pub String);

/// Model file formats the agents know how to install.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    /// ONNX.
    Onnx,
    /// GGUF (llama.cpp).
    Gguf,
    /// TensorFlow Lite / LiteRT.
    Tflite,
    /// Core ML package.
    Coreml,
    /// safetensors weights.
    Safetensors,
    /// ExecuTorch `.pte`.
    Executorch,
    /// The learned router's request classifier (`edgewise_core::complexity`).
    #[serde(rename = "edgewise-router")]
    EdgewiseRouter,
}

impl ModelFormat {
    /// The name used in specs and on the wire.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Onnx => "onnx",
            ModelFormat::Gguf => "gguf",
            ModelFormat::Tflite => "tflite",
            ModelFormat::Coreml => "coreml",
            ModelFormat::Safetensors => "safetensors",
            ModelFormat::Executorch => "executorch",
            ModelFormat::EdgewiseRouter => crate::complexity::ARTIFACT_FORMAT,
        }
    }
}

/// Operating systems, by their OCI platform name.
pub const OSES: &[&str] = &["linux", "android", "darwin", "ios", "windows"];
/// CPU architectures, by their OCI platform name (`arm` takes a variant: `arm/v7`).
pub const ARCHES: &[&str] = &["amd64", "arm64", "arm/v7", "arm/v6", "386", "riscv64"];

/// The OCI name of an operating system, accepting the older spellings (`macos`).
#[must_use]
pub fn oci_os(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    Some(match lower.as_str() {
        "linux" => "linux",
        "android" => "android",
        "darwin" | "macos" | "osx" => "darwin",
        "ios" => "ios",
        "windows" => "windows",
        _ => return None,
    })
}

/// The OCI name of an architecture, accepting the older spellings (`x86_64`, `aarch64`,
/// `armv7`, `i386`) that kernels and Rust's `std::env::consts::ARCH` use.
#[must_use]
pub fn oci_arch(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    Some(match lower.as_str() {
        "amd64" | "x86_64" | "x64" => "amd64",
        "arm64" | "aarch64" | "arm64/v8" => "arm64",
        "arm/v7" | "armv7" | "armv7l" | "arm" => "arm/v7",
        "arm/v6" | "armv6" | "armv6l" => "arm/v6",
        "386" | "i386" | "i686" | "x86" => "386",
        "riscv64" => "riscv64",
        _ => return None,
    })
}

/// Requirements a device must meet for a variant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.platforms) || self.platforms.all(p, p.matches('^(linux|android|darwin|macos|ios|windows|[*])/(amd64|x86_64|arm64|arm64/v8|aarch64|arm/v7|armv7|arm/v6|armv6|arm|386|i386|riscv64|[*])$'))",
     "message": "platforms are OCI os/arch names: os one of linux, android, darwin, ios, windows or *; arch one of amd64, arm64, arm/v7, arm/v6, 386, riscv64 or * (x86_64, aarch64, armv7, macos and i386 are accepted as aliases)",
     "fieldPath": ".platforms"}
]))]
pub struct Requirements {
    /// OCI `os/arch` names (`linux/amd64`, `linux/arm64`, `linux/arm/v7`, `darwin/arm64`,
    /// `windows/amd64`, `android/*`, `*/arm64`); empty means any. Older spellings
    /// (`x86_64`, `aarch64`, `armv7`, `macos`) are accepted as aliases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// Minimum device memory in MiB (spelt `minMemoryMiB`, not camel case's `minMemoryMib`).
    #[serde(rename = "minMemoryMiB")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_mib: Option<u64>,
    /// The device needs at least one of these accelerators (`npu`, `gpu`, `ane`, …); empty
    /// means none needed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accelerators: Vec<String>,
    /// Minimum agent version (semver) that can run this variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(
        pattern = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$"
    ))]
    pub min_agent_version: Option<String>,
}

/// What a device reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Operating system, lowercase (`linux`, `android`, `ios`, `macos`, `windows`).
    pub os: String,
    /// CPU architecture (`arm64`, `x86_64`).
    pub arch: String,
    /// Physical memory in MiB.
    pub memory_mib: u64,
    /// Accelerators present.
    pub accelerators: Vec<String>,
    /// Version of the agent.
    pub agent_version: Version,
}

/// Why one variant does not fit a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unmet {
    /// The device's `os/arch` is not in the variant's platforms.
    Platform {
        /// The device's `os/arch`.
        device: String,
    },
    /// Not enough memory.
    Memory {
        /// MiB needed.
        need: u64,
        /// MiB the device has.
        have: u64,
    },
    /// None of the accelerators.
    Accelerator {
        /// Accepted accelerators.
        any_of: Vec<String>,
    },
    /// Agent too old.
    AgentVersion {
        /// Minimum version.
        need: String,
        /// The device's agent version.
        have: String,
    },
    /// The variant's own minimum agent version is not semver (a spec error).
    InvalidRequirement(String),
}

impl fmt::Display for Unmet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unmet::Platform { device } => write!(f, "platform {device} not supported"),
            Unmet::Memory { need, have } => {
                write!(f, "needs {need} MiB memory, device has {have} MiB")
            }
            Unmet::Accelerator { any_of } => {
                write!(f, "needs one of accelerators [{}]", any_of.join(", "))
            }
            Unmet::AgentVersion { need, have } => {
                write!(f, "needs agent >= {need}, device runs {have}")
            }
            Unmet::InvalidRequirement(why) => write!(f, "invalid requirement: {why}"),
        }
    }
}

/// No variant fits; one reason per variant, in spec order.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no variant fits this device: {}", self.summary())]
pub struct NoVariantFits {
    /// `(variant name, first unmet requirement)` for every variant.
    pub rejections: Vec<(String, Unmet)>,
}

impl NoVariantFits {
    fn summary(&self) -> String {
        if self.rejections.is_empty() {
            return "the model version has no variants".to_owned();
        }
        self.rejections
            .iter()
            .map(|(name, why)| format!("{name}: {why}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl Requirements {
    /// The first requirement the device does not meet, if any.
    #[must_use]
    pub fn unmet(&self, facts: &DeviceFacts) -> Option<Unmet> {
        if !self.platforms.is_empty() && !self.platforms.iter().any(|p| platform_matches(p, facts))
        {
            return Some(Unmet::Platform {
                device: format!("{}/{}", facts.os, facts.arch),
            });
        }
        if let Some(need) = self.min_memory_mib
            && facts.memory_mib < need
        {
            return Some(Unmet::Memory {
                need,
                have: facts.memory_mib,
            });
        }
        if !self.accelerators.is_empty()
            && !self.accelerators.iter().any(|a| {
                facts
                    .accelerators
                    .iter()
                    .any(|have| have.eq_ignore_ascii_case(a))
            })
        {
            return Some(Unmet::Accelerator {
                any_of: self.accelerators.clone(),
            });
        }
        if let Some(min) = &self.min_agent_version {
            match parse_version(min) {
                Ok(v) => {
                    if !AtLeast(v).admits(&facts.agent_version) {
                        return Some(Unmet::AgentVersion {
                            need: min.clone(),
                            have: facts.agent_version.to_string(),
                        });
                    }
                }
                Err(e) => return Some(Unmet::InvalidRequirement(e.to_string())),
            }
        }
        None
    }
}

/// Whether a platform pattern admits the device, both sides in OCI names (a device that
/// reports `x86_64` is `amd64`).
fn platform_matches(pattern: &str, facts: &DeviceFacts) -> bool {
    let (os, arch) = pattern.split_once('/').unwrap_or((pattern, "*"));
    let same = |want: &str, have: &str, canon: fn(&str) -> Option<&'static str>| {
        want == "*"
            || match (canon(want), canon(have)) {
                (Some(w), Some(h)) => w == h,
                _ => want.eq_ignore_ascii_case(have),
            }
    };
    same(os, &facts.os, oci_os) && same(arch, &facts.arch, oci_arch)
}

/// The index of the first variant the device satisfies.
///
/// # Errors
/// [`NoVariantFits`] with each variant's first unmet requirement.
pub fn choose_variant(variants: &[Variant], facts: &DeviceFacts) -> Result<usize, NoVariantFits> {
    let mut rejections = Vec::new();
    for (i, v) in variants.iter().enumerate() {
        match v.requires.unmet(facts) {
            None => return Ok(i),
            Some(why) => rejections.push((v.name.clone(), why)),
        }
    }
    Err(NoVariantFits { rejections })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_match_by_oci_name_whatever_spelling_either_side_uses() {
        let device = |os: &str, arch: &str| DeviceFacts {
            os: os.into(),
            arch: arch.into(),
            memory_mib: 1024,
            accelerators: Vec::new(),
            agent_version: Version::new(1, 0, 0),
        };
        for (pattern, os, arch) in [
            ("linux/amd64", "linux", "x86_64"),
            ("linux/x86_64", "linux", "amd64"),
            ("linux/arm64", "linux", "aarch64"),
            ("linux/arm/v7", "linux", "armv7l"),
            ("darwin/arm64", "macos", "aarch64"),
            ("*/arm64", "android", "arm64"),
            ("android/*", "android", "riscv64"),
        ] {
            assert!(
                platform_matches(pattern, &device(os, arch)),
                "{pattern} vs {os}/{arch}"
            );
        }
        assert!(!platform_matches(
            "linux/amd64",
            &device("linux", "aarch64")
        ));
        assert!(!platform_matches(
            "linux/arm/v7",
            &device("linux", "armv6l")
        ));
        assert_eq!(oci_arch("sparc"), None);
    }

    fn facts(os: &str, arch: &str, mem: u64, acc: &[&str]) -> DeviceFacts {
        DeviceFacts {
            os: os.into(),
            arch: arch.into(),
            memory_mib: mem,
            accelerators: acc.iter().map(|s| (*s).to_owned()).collect(),
            agent_version: Version::new(1, 2, 0),
        }
    }

    fn variant(name: &str, requires: Requirements) -> Variant {
        Variant {
            name: name.into(),
            artifact: Artifact {
                uri: format!("s3://models/{name}"),
                sha256: "0".repeat(64),
                size_bytes: 1,
                signature: None,
            },
            format: ModelFormat::Onnx,
            requires,
        }
    }

    fn variants() -> Vec<Variant> {
        vec![
            variant(
                "npu-gguf",
                Requirements {
                    platforms: vec!["android/arm64".into(), "linux/*".into()],
                    min_memory_mib: Some(6144),
                    accelerators: vec!["npu".into()],
                    min_agent_version: Some("1.1.0".into()),
                },
            ),
            variant(
                "cpu-onnx",
                Requirements {
                    min_memory_mib: Some(2048),
                    ..Requirements::default()
                },
            ),
        ]
    }

    #[test]
    fn first_satisfied_variant_wins() {
        assert_eq!(
            choose_variant(&variants(), &facts("android", "arm64", 8192, &["NPU"])),
            Ok(0)
        );
        assert_eq!(
            choose_variant(&variants(), &facts("linux", "x86_64", 8192, &["npu"])),
            Ok(0)
        );
        assert_eq!(
            choose_variant(&variants(), &facts("android", "arm64", 8192, &[])),
            Ok(1)
        );
        assert_eq!(
            choose_variant(&variants(), &facts("ios", "arm64", 8192, &["npu"])),
            Ok(1)
        );
    }

    #[test]
    fn no_fit_reports_each_variants_reason() {
        let err = choose_variant(&variants(), &facts("android", "arm64", 1024, &["npu"]))
            .expect_err("too small");
        assert_eq!(
            err.rejections,
            vec![
                (
                    "npu-gguf".to_owned(),
                    Unmet::Memory {
                        need: 6144,
                        have: 1024
                    }
                ),
                (
                    "cpu-onnx".to_owned(),
                    Unmet::Memory {
                        need: 2048,
                        have: 1024
                    }
                ),
            ]
        );
        assert!(
            err.to_string()
                .contains("cpu-onnx: needs 2048 MiB memory, device has 1024 MiB")
        );
    }

    #[test]
    fn old_agent_is_told_which_version_it_needs() {
        let mut f = facts("linux", "arm64", 8192, &["npu"]);
        f.agent_version = Version::new(1, 0, 9);
        let only_npu = &variants()[..1];
        let err = choose_variant(only_npu, &f).expect_err("old agent");
        assert_eq!(
            err.rejections[0].1,
            Unmet::AgentVersion {
                need: "1.1.0".into(),
                have: "1.0.9".into()
            }
        );
    }

    #[test]
    fn artifact_uris_split_into_bucket_and_key() {
        let mut a = variant("x", Requirements::default()).artifact;
        a.uri = "s3://models/assistant/2.0.0/model.gguf".into();
        assert_eq!(a.location(), Ok(("models", "assistant/2.0.0/model.gguf")));
        for bad in ["s3://models", "s3:///key", "https://x/y", "s3://b/"] {
            a.uri = bad.into();
            assert!(a.location().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_version_with_no_variants_says_so() {
        let err = choose_variant(&[], &facts("linux", "arm64", 1, &[])).expect_err("empty");
        assert!(err.to_string().contains("no variants"));
    }
}
