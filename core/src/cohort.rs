//! Stable, stateless canary cohorts.
//!
//! Every gateway replica, the kubectl plugin and the tests must put a device in the same
//! cohort bit for bit, with no per-device state. The formula is:
//!
//! ```text
//! digest = SHA-256(salt_bytes ‖ device_id_bytes)        (UTF-8, no separator)
//! bucket = u64::from_be_bytes(digest[0..8]) mod 10000   (0 ≤ bucket < 10000)
//! in canary cohort ⇔ bucket < percent × 100             (percent is an integer 0..=100)
//! ```
//!
//! The salt is per rollout (by default `<namespace>/<name>` of the ModelRollout), so two
//! rollouts pick independent cohorts. Raising the percentage only adds devices, because the
//! threshold grows while each device's bucket never changes.

use sha2::{Digest, Sha256};

/// Number of buckets; one bucket is 0.01 % of the fleet.
pub const BUCKETS: u16 = 10_000;

/// The cohort bucket of a device for a salt, in `0..BUCKETS`.
#[must_use]
pub fn bucket(salt: &str, device_id: &str) -> u16 {
    let mut hasher = Sha256::new();
    hasher.update(salt.as_bytes());
    hasher.update(device_id.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    // The remainder is < 10000, so it fits a u16.
    (u64::from_be_bytes(first) % u64::from(BUCKETS)) as u16
}

/// Whether a bucket falls in the canary cohort at `percent` (clamped to 100).
#[must_use]
pub fn bucket_in_cohort(bucket: u16, percent: u32) -> bool {
    u32::from(bucket) < percent.min(100) * 100
}

/// Whether a device is in the canary cohort of the rollout salted with `salt` at `percent`.
#[must_use]
pub fn in_cohort(salt: &str, device_id: &str, percent: u32) -> bool {
    bucket_in_cohort(bucket(salt, device_id), percent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bucket_matches_the_documented_formula() {
        // Pins byte order (big-endian), width (8 bytes) and modulus against a plain digest.
        let digest = Sha256::digest(b"saltdevice-1");
        let expected = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) % 10_000;
        assert_eq!(u64::from(bucket("salt", "device-1")), expected);
    }

    #[test]
    fn known_vector_is_stable_across_releases() {
        // Pinned so that a change of hash, byte order or separator fails loudly: gateways of
        // different versions must agree during an upgrade.
        assert_eq!(bucket("default/assistant", "device-0001"), KNOWN_BUCKET);
    }
    // python3: int.from_bytes(sha256(b"default/assistantdevice-0001").digest()[:8], "big") % 10000
    const KNOWN_BUCKET: u16 = 1_920;

    #[test]
    fn zero_percent_is_nobody_and_hundred_is_everybody() {
        for i in 0..1_000 {
            let id = format!("dev-{i}");
            assert!(!in_cohort("s", &id, 0));
            assert!(in_cohort("s", &id, 100));
        }
    }

    #[test]
    fn percent_above_hundred_is_clamped() {
        assert!(bucket_in_cohort(9_999, 250));
    }

    #[test]
    fn buckets_are_uniform_by_chi_square_over_100k_ids() {
        // 100 classes of 100 buckets each; 100k ids ⇒ expected 1000 per class.
        const CLASSES: usize = 100;
        const IDS: usize = 100_000;
        let mut counts = [0u32; CLASSES];
        for i in 0..IDS {
            let b = bucket("default/rollout", &format!("device-{i:08}"));
            counts[usize::from(b) / (usize::from(BUCKETS) / CLASSES)] += 1;
        }
        let expected = (IDS / CLASSES) as f64;
        let chi2: f64 = counts
            .iter()
            .map(|&c| (f64::from(c) - expected).powi(2) / expected)
            .sum();
        // 99 degrees of freedom: the 0.999 quantile is ≈ 148.2.
        assert!(
            chi2 < 148.2,
            "chi-square {chi2} says buckets are not uniform"
        );
    }

    proptest! {
        #[test]
        fn raising_percent_never_removes_a_device(
            salt in "[a-z/-]{0,20}",
            id in "[a-zA-Z0-9-]{1,40}",
            low in 0u32..=100,
            raise in 0u32..=100,
        ) {
            let high = (low + raise).min(100);
            if in_cohort(&salt, &id, low) {
                prop_assert!(in_cohort(&salt, &id, high));
            }
        }

        #[test]
        fn bucket_is_always_below_bucket_count(salt in ".{0,16}", id in ".{0,64}") {
            prop_assert!(bucket(&salt, &id) < BUCKETS);
        }
    }
}
