//! The learned router: a tiny classifier that scores how hard a request is (`complexity`,
//! 0–1) from its text in microseconds, so policies can send hard requests to the cloud.
//! It ships as a ModelVersion like any model (format `edgewise-router`), rolled out and
//! gated the same way; `scripts/train-router` trains one.
//!
//! The format (`edgewise-router/v1`, JSON) is a logistic regression over hashed features:
//!
//! - words are maximal runs of ASCII letters and digits and of non-ASCII bytes, ASCII
//!   lowercased; a feature is the 64-bit FNV-1a hash of a word's bytes (and, with
//!   `bigrams`, of two neighbouring words joined by one space) modulo `buckets`;
//! - `x[h]` is the number of features hashing to `h` divided by the number of features, and
//!   one more input is `ln(1 + words)`;
//! - `complexity = sigmoid(bias + Σ weights[h]·x[h] + length_weight·ln(1 + words))`.
//!
//! Any trainer that produces those numbers makes a valid model; the hashing is simple enough
//! to repeat exactly in any language (the Python trainer does).

use serde::{Deserialize, Serialize};

/// The format name in the file.
pub const FORMAT: &str = "edgewise-router/v1";
/// The artifact format a ModelVersion gives a router model.
pub const ARTIFACT_FORMAT: &str = "edgewise-router";

/// Why a router model was refused.
#[derive(Debug, thiserror::Error)]
pub enum ComplexityError {
    /// Not JSON of this shape.
    #[error("not an {FORMAT} model: {0}")]
    Parse(#[source] serde_json::Error),
    /// A field's value is unusable.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// A loaded router model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComplexityModel {
    /// Always [`FORMAT`].
    pub format: String,
    /// Hash buckets: the length of `weights`.
    pub buckets: u32,
    /// Whether word pairs are features too.
    #[serde(default)]
    pub bigrams: bool,
    /// Weight per bucket.
    pub weights: Vec<f32>,
    /// Weight of `ln(1 + words)`.
    #[serde(default)]
    pub length_weight: f32,
    /// Intercept.
    pub bias: f32,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b >= 0x80
}

impl ComplexityModel {
    /// Parses and checks a model file.
    ///
    /// # Errors
    /// [`ComplexityError`] naming what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ComplexityError> {
        let m: ComplexityModel = serde_json::from_slice(bytes).map_err(ComplexityError::Parse)?;
        if m.format != FORMAT {
            return Err(ComplexityError::Invalid {
                field: "format",
                message: format!("{:?} is not {FORMAT:?}", m.format),
            });
        }
        if m.buckets == 0 || m.weights.len() != m.buckets as usize {
            return Err(ComplexityError::Invalid {
                field: "weights",
                message: format!(
                    "{} weights for {} buckets (they must be equal and non-zero)",
                    m.weights.len(),
                    m.buckets
                ),
            });
        }
        if !m.weights.iter().all(|w| w.is_finite())
            || !m.bias.is_finite()
            || !m.length_weight.is_finite()
        {
            return Err(ComplexityError::Invalid {
                field: "weights",
                message: "every weight must be a finite number".into(),
            });
        }
        Ok(m)
    }

    /// The request's complexity, 0–1. Allocation-free.
    #[must_use]
    pub fn score(&self, text: &str) -> f32 {
        let buckets = u64::from(self.buckets);
        let (mut sum, mut features, mut words) = (0f32, 0u32, 0u32);
        let mut previous: Option<&[u8]> = None;
        for word in text
            .as_bytes()
            .split(|b| !is_word_byte(*b))
            .filter(|w| !w.is_empty())
        {
            words += 1;
            sum += self.weights[(fnv(FNV_OFFSET, word) % buckets) as usize];
            features += 1;
            if self.bigrams
                && let Some(p) = previous
            {
                let h = fnv(fnv(fnv(FNV_OFFSET, p), b" "), word);
                sum += self.weights[(h % buckets) as usize];
                features += 1;
            }
            previous = Some(word);
        }
        let mean = if features == 0 {
            0.0
        } else {
            sum / features as f32
        };
        let z = self.bias + mean + self.length_weight * (1.0 + words as f32).ln();
        1.0 / (1.0 + (-z).exp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(weights: Vec<f32>, bias: f32, length_weight: f32) -> ComplexityModel {
        ComplexityModel {
            format: FORMAT.into(),
            buckets: weights.len() as u32,
            bigrams: false,
            weights,
            length_weight,
            bias,
        }
    }

    #[test]
    fn the_hash_is_fnv1a_over_lowercased_bytes() {
        // FNV-1a 64 of "a" and of "hello" (reference values).
        assert_eq!(fnv(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(FNV_OFFSET, b"hello"), 0xa430_d846_80aa_bd0b);
        assert_eq!(fnv(FNV_OFFSET, b"HeLLo"), fnv(FNV_OFFSET, b"hello"));
    }

    #[test]
    fn an_empty_model_scores_its_bias() {
        let m = model(vec![0.0; 8], 0.0, 0.0);
        assert!((m.score("anything at all") - 0.5).abs() < 1e-6);
        assert!((m.score("") - 0.5).abs() < 1e-6);
    }

    #[test]
    fn words_with_weight_raise_the_score_and_length_counts() {
        let mut weights = vec![0.0; 64];
        weights[(fnv(FNV_OFFSET, b"why") % 64) as usize] = 4.0;
        let m = model(weights, -1.0, 0.0);
        assert!(m.score("why is the sky blue") > m.score("the sky is blue"));
        let long = model(vec![0.0; 8], -2.0, 1.0);
        assert!(long.score(&"word ".repeat(200)) > long.score("word"));
    }

    #[test]
    fn bad_files_are_refused_naming_the_field() {
        let err =
            ComplexityModel::from_json(br#"{"format":"x","buckets":1,"weights":[0],"bias":0}"#)
                .expect_err("wrong format");
        assert!(err.to_string().starts_with("format:"), "{err}");
        let err = ComplexityModel::from_json(
            br#"{"format":"edgewise-router/v1","buckets":2,"weights":[0],"bias":0}"#,
        )
        .expect_err("short");
        assert!(err.to_string().starts_with("weights:"), "{err}");
        assert!(ComplexityModel::from_json(b"not json").is_err());
        let ok = ComplexityModel::from_json(
            br#"{"format":"edgewise-router/v1","buckets":2,"bigrams":true,"weights":[0.5,-0.5],"bias":0.1,"length_weight":0.2}"#,
        )
        .expect("valid");
        assert!((0.0..=1.0).contains(&ok.score("some words here")));
    }
}
