//! Semantic versions of models and agents, and constraints over them.

use std::fmt;

pub use semver::{Version, VersionReq};

/// A version string that is not strict semver (`MAJOR.MINOR.PATCH[-pre][+build]`).
#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not a semantic version (MAJOR.MINOR.PATCH): {source}")]
pub struct VersionError {
    /// The rejected text.
    pub value: String,
    /// What semver found wrong.
    #[source]
    pub source: semver::Error,
}

/// Parses a strict semantic version, as `spec.version` and agent versions must be.
///
/// # Errors
/// [`VersionError`] naming the text when it is not `MAJOR.MINOR.PATCH[-pre][+build]`.
pub fn parse_version(value: &str) -> Result<Version, VersionError> {
    Version::parse(value).map_err(|source| VersionError {
        value: value.to_owned(),
        source,
    })
}

/// A minimum version: "at least this", the only constraint the CRDs express.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AtLeast(pub Version);

impl AtLeast {
    /// Whether `version` meets the minimum. Pre-releases of the minimum's own
    /// `MAJOR.MINOR.PATCH` are below it, as semver orders them.
    #[must_use]
    pub fn admits(&self, version: &Version) -> bool {
        version >= &self.0
    }
}

impl fmt::Display for AtLeast {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, ">= {}", self.0)
    }
}

/// Regex (ECMA, as CRD schemas use) for strict semver, from semver.org.
pub const SEMVER_PATTERN: &str = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_semver_is_required() {
        assert!(parse_version("1.2.3").is_ok());
        assert!(parse_version("1.2.3-rc.1+build.5").is_ok());
        let err = parse_version("1.2").expect_err("two components");
        assert!(err.to_string().contains("\"1.2\""), "{err}");
        assert!(parse_version("v1.2.3").is_err());
    }

    #[test]
    fn at_least_orders_prereleases_below_the_release() {
        let min = AtLeast(parse_version("1.4.0").expect("valid"));
        assert!(min.admits(&parse_version("1.4.0").expect("valid")));
        assert!(min.admits(&parse_version("2.0.0").expect("valid")));
        assert!(!min.admits(&parse_version("1.4.0-beta.1").expect("valid")));
        assert!(!min.admits(&parse_version("1.3.9").expect("valid")));
    }
}
