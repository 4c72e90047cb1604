//! Whether two answers to the same request agree: the comparison behind shadow traffic and
//! offline reprocessing, and so behind the `cloud_agreement_rate` rollout gate.
//!
//! The measure is the bag-of-words F1 score used by SQuAD: both answers are split into
//! lowercase words (runs of letters and digits), and F1 is the harmonic mean of the share of
//! each answer's words found in the other, counting repeats. Two answers agree when F1 is at
//! least [`AGREEMENT_THRESHOLD`]. It is cheap, needs no model, and is insensitive to
//! punctuation, case and word order; it does not see meaning (a negation flips nothing), which
//! is acceptable for a fleet-wide rate compared against a baseline version.

use std::collections::HashMap;

/// F1 at or above which two answers agree.
pub const AGREEMENT_THRESHOLD: f64 = 0.5;

/// How two answers compare.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// Bag-of-words F1, 0–1.
    pub f1: f64,
    /// `f1 >= AGREEMENT_THRESHOLD`.
    pub agree: bool,
}

/// Compares two answers (see the module docs).
#[must_use]
pub fn compare(a: &str, b: &str) -> Agreement {
    let f1 = word_f1(a, b);
    Agreement {
        f1,
        agree: f1 >= AGREEMENT_THRESHOLD,
    }
}

/// SQuAD-style F1 over lowercase words; two empty answers score 1, one empty answer 0.
#[must_use]
pub fn word_f1(a: &str, b: &str) -> f64 {
    let (wa, wb) = (words(a), words(b));
    if wa.is_empty() || wb.is_empty() {
        return if wa.is_empty() && wb.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &wa {
        *counts.entry(w.as_str()).or_default() += 1;
    }
    let mut common = 0usize;
    for w in &wb {
        if let Some(n) = counts.get_mut(w.as_str())
            && *n > 0
        {
            *n -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / wb.len() as f64;
    let recall = common as f64 / wa.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_answers_agree_whatever_their_case_and_punctuation() {
        let c = compare("The device is fast.", "the device, is FAST");
        assert!((c.f1 - 1.0).abs() < 1e-9);
        assert!(c.agree);
    }

    #[test]
    fn unrelated_answers_disagree() {
        let c = compare("paris is the capital", "bananas grow on trees");
        assert_eq!(c.f1, 0.0);
        assert!(!c.agree);
    }

    #[test]
    fn partial_overlap_scores_between() {
        // 2 common of 4 and 4 words: precision = recall = 0.5.
        let c = compare("a b c d", "a b x y");
        assert!((c.f1 - 0.5).abs() < 1e-9, "{c:?}");
        assert!(c.agree, "the threshold is inclusive");
        assert!(!compare("a b c d", "a x y z").agree);
    }

    #[test]
    fn repeats_count_once_each() {
        // "a a a" against "a": one common word, precision 1, recall 1/3.
        let f1 = word_f1("a a a", "a");
        assert!((f1 - 0.5).abs() < 1e-9, "{f1}");
    }

    #[test]
    fn empty_answers() {
        assert_eq!(word_f1("", "..."), 1.0);
        assert_eq!(word_f1("", "word"), 0.0);
    }

    #[test]
    fn the_score_is_symmetric_and_bounded() {
        let samples = [
            "",
            "a",
            "a b",
            "b a c",
            "x y z a",
            "the the cat",
            "Cat, the!",
        ];
        for a in samples {
            for b in samples {
                let (ab, ba) = (word_f1(a, b), word_f1(b, a));
                assert!((ab - ba).abs() < 1e-12, "{a:?} {b:?}");
                assert!((0.0..=1.0).contains(&ab), "{a:?} {b:?} {ab}");
            }
        }
    }
}
