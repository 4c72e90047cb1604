//! Gate metrics from per-device telemetry: devices are weighed, not samples.
//!
//! Each device's window is first reduced to its own values (its latency quantiles, its error
//! rate…). A metric's fleet value is then the mean of the devices' values after the most
//! extreme devices on each side are set aside: ⌈5 %⌉ of them, and at least one once three
//! devices report. So one device, whatever it sends and however much, moves a gate no more
//! than any other device's one value — and not at all when it is the most extreme — while a
//! regression on a group of devices larger than the trimmed share still shows. With one or
//! two devices there is nothing to compare against and the mean of both is taken.

use std::collections::BTreeMap;

use super::spec::Metric;

/// One device's on-device inference in a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceInference {
    /// Samples.
    pub samples: u64,
    /// Its median latency, ms.
    pub p50: f64,
    /// Its 95th percentile latency, ms.
    pub p95: f64,
    /// Its 99th percentile latency, ms.
    pub p99: f64,
    /// Failed requests.
    pub errors: u64,
    /// Requests that used a fallback.
    pub fallbacks: u64,
    /// Shadow requests whose answers agreed.
    pub agreements: u64,
    /// Shadow requests.
    pub shadows: u64,
}

/// One device's install outcomes in a window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInstalls {
    /// Failed installs.
    pub failed: u64,
    /// Installs attempted (failed or activated).
    pub attempts: u64,
}

/// Devices set aside on each side of `n`.
#[must_use]
pub fn trimmed_per_side(n: usize) -> usize {
    if n < 3 { 0 } else { n.div_ceil(20).max(1) }
}

/// The fleet's value from one value per device (see the module), `None` for none.
#[must_use]
pub fn across_devices(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let k = trimmed_per_side(values.len());
    let kept = &values[k..values.len() - k];
    Some(kept.iter().sum::<f64>() / kept.len() as f64)
}

fn rate(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

/// The inference metrics of a version from its devices' windows; a metric no device has
/// data for is absent.
#[must_use]
pub fn inference_values(devices: &[DeviceInference]) -> BTreeMap<Metric, f64> {
    let with_samples: Vec<&DeviceInference> = devices.iter().filter(|d| d.samples > 0).collect();
    let of = |f: &dyn Fn(&DeviceInference) -> Option<f64>| {
        across_devices(with_samples.iter().filter_map(|d| f(d)).collect())
    };
    let mut values = BTreeMap::new();
    for (metric, value) in [
        (Metric::LatencyP50Ms, of(&|d| Some(d.p50))),
        (Metric::LatencyP95Ms, of(&|d| Some(d.p95))),
        (Metric::LatencyP99Ms, of(&|d| Some(d.p99))),
        (Metric::ErrorRate, of(&|d| rate(d.errors, d.samples))),
        (Metric::FallbackRate, of(&|d| rate(d.fallbacks, d.samples))),
        (
            Metric::CloudAgreementRate,
            of(&|d| rate(d.agreements, d.shadows)),
        ),
    ] {
        if let Some(v) = value {
            values.insert(metric, v);
        }
    }
    values
}

/// The install failure rate of a version from its devices' windows.
#[must_use]
pub fn install_failure_rate(devices: &[DeviceInstalls]) -> Option<f64> {
    across_devices(
        devices
            .iter()
            .filter_map(|d| rate(d.failed, d.attempts))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn device(p95: f64, errors: u64, samples: u64) -> DeviceInference {
        DeviceInference {
            samples,
            p50: p95 / 2.0,
            p95,
            p99: p95,
            errors,
            ..DeviceInference::default()
        }
    }

    #[test]
    fn the_most_extreme_devices_are_set_aside() {
        assert_eq!(trimmed_per_side(1), 0);
        assert_eq!(trimmed_per_side(2), 0);
        assert_eq!(trimmed_per_side(3), 1);
        assert_eq!(trimmed_per_side(20), 1);
        assert_eq!(trimmed_per_side(21), 2);
        assert_eq!(trimmed_per_side(100), 5);
        assert_eq!(across_devices(vec![]), None);
        assert_eq!(across_devices(vec![4.0, 8.0]), Some(6.0));
        assert_eq!(across_devices(vec![1.0, 2.0, 9_000.0]), Some(2.0));
        assert_eq!(
            across_devices(vec![f64::NAN, 1.0, 3.0]),
            Some(2.0),
            "a NaN is no value"
        );
    }

    #[test]
    fn one_hostile_device_neither_fails_a_good_version_nor_passes_a_bad_one() {
        // Nine honest devices at ~100 ms and no errors; one sends 10,000 samples of 10 s,
        // all failed.
        let mut good: Vec<DeviceInference> = (0..9)
            .map(|i| device(100.0 + f64::from(i), 0, 50))
            .collect();
        good.push(device(10_000.0, 10_000, 10_000));
        let v = inference_values(&good);
        assert!(v[&Metric::LatencyP95Ms] < 110.0, "{v:?}");
        assert_eq!(v[&Metric::ErrorRate], 0.0);
        // Nine honest devices at ~900 ms failing a fifth of requests; one reports perfect.
        let mut bad: Vec<DeviceInference> = (0..9)
            .map(|i| device(900.0 + f64::from(i), 10, 50))
            .collect();
        bad.push(device(1.0, 0, 10_000));
        let v = inference_values(&bad);
        assert!(v[&Metric::LatencyP95Ms] > 900.0, "{v:?}");
        assert!((v[&Metric::ErrorRate] - 0.2).abs() < 1e-9, "{v:?}");
    }

    #[test]
    fn a_regression_on_a_group_of_devices_still_shows() {
        // Three of ten devices fail every install: trimming one leaves two of eight.
        let mut devices = vec![
            DeviceInstalls {
                failed: 0,
                attempts: 1
            };
            7
        ];
        devices.extend(
            [DeviceInstalls {
                failed: 1,
                attempts: 1,
            }; 3],
        );
        assert_eq!(install_failure_rate(&devices), Some(0.25));
        // A metric no device has data for is absent.
        assert!(!inference_values(&[device(1.0, 0, 3)]).contains_key(&Metric::CloudAgreementRate));
    }

    proptest! {
        /// However extreme one device's value, the fleet value of three or more devices
        /// stays within the range of the others.
        #[test]
        fn one_device_cannot_move_the_value_outside_the_others(
            honest in prop::collection::vec(0.0f64..1_000.0, 2..40),
            hostile in prop_oneof![Just(-1e12), Just(1e12), 0.0f64..1_000.0],
        ) {
            let (lo, hi) = honest.iter().fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
            let mut all = honest.clone();
            all.push(hostile);
            let v = across_devices(all).expect("a value");
            prop_assert!(v >= lo - 1e-9 && v <= hi + 1e-9, "{v} outside [{lo}, {hi}]");
        }
    }
}
