//! A rollout's segment as one snapshot: the devices its selector targets, summarised into
//! the device counts, the version-skew table and the cohort buckets the step machine uses,
//! so the printer columns, `skew` and the analysis all describe the same devices.

use std::collections::BTreeMap;

use edgewise_proto::fleet::ModelState;

use crate::crd::{DeviceCounts, SkewEntry};

/// One targeted device.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SegmentDevice {
    /// Its cohort bucket for this rollout.
    pub bucket: u16,
    /// The version of the model it runs, if any.
    pub running: Option<String>,
    /// The version it last reported working on and how far it got, when known.
    pub reported: Option<(String, ModelState)>,
    /// Whether one of `spec.version`'s variants fits it (true when unknown).
    pub eligible: bool,
}

/// What the status shows of the segment.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Summary {
    /// Counts against the version the rollout is delivering.
    pub counts: DeviceCounts,
    /// Devices per running version.
    pub skew: Vec<SkewEntry>,
}

/// Summarises `devices` against `target`: the canary while one runs, else the stable
/// version. `installed` counts devices running it, the same number `skew` shows for it.
pub(crate) fn summarize(devices: &[SegmentDevice], target: Option<&str>) -> Summary {
    let mut counts = DeviceCounts {
        targeted: devices.len() as u64,
        ..DeviceCounts::default()
    };
    let mut skew: BTreeMap<&str, u64> = BTreeMap::new();
    for d in devices {
        if let Some(v) = d.running.as_deref() {
            *skew.entry(v).or_default() += 1;
        }
        let Some(target) = target else { continue };
        if d.running.as_deref() == Some(target) {
            counts.installed += 1;
        }
        match &d.reported {
            Some((v, state)) if v == target => {
                counts.assigned += 1;
                match state {
                    ModelState::Downloading => counts.downloading += 1,
                    ModelState::Failed | ModelState::Unsupported => counts.failed += 1,
                    ModelState::Active | ModelState::Installed | ModelState::Unspecified => {}
                }
            }
            // Without a report (counts from ClickHouse) a device running it was assigned it.
            None if d.running.as_deref() == Some(target) => counts.assigned += 1,
            _ => {}
        }
    }
    Summary {
        counts,
        skew: skew
            .into_iter()
            .map(|(version, devices)| SkewEntry {
                version: version.to_owned(),
                devices,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(running: Option<&str>, reported: Option<(&str, ModelState)>) -> SegmentDevice {
        SegmentDevice {
            bucket: 0,
            running: running.map(str::to_owned),
            reported: reported.map(|(v, s)| (v.to_owned(), s)),
            eligible: true,
        }
    }

    #[test]
    fn installed_and_skew_count_the_same_devices() {
        let devices = vec![
            device(Some("1.0.0"), Some(("1.0.0", ModelState::Active))),
            device(Some("1.0.0"), Some(("1.0.0", ModelState::Active))),
            device(Some("2.0.0"), Some(("2.0.0", ModelState::Active))),
            device(Some("1.0.0"), Some(("2.0.0", ModelState::Downloading))),
            device(None, Some(("2.0.0", ModelState::Unsupported))),
        ];
        let canary = summarize(&devices, Some("2.0.0"));
        assert_eq!(
            canary.counts,
            DeviceCounts {
                targeted: 5,
                assigned: 3,
                downloading: 1,
                installed: 1,
                failed: 1,
            }
        );
        let stable = summarize(&devices, Some("1.0.0"));
        assert_eq!(
            stable.counts.installed, 3,
            "after success: devices on stable"
        );
        let on = |s: &Summary, v: &str| s.skew.iter().find(|e| e.version == v).map(|e| e.devices);
        assert_eq!(on(&stable, "1.0.0"), Some(stable.counts.installed));
        assert_eq!(on(&canary, "2.0.0"), Some(canary.counts.installed));
    }

    #[test]
    fn without_reports_running_devices_count_as_assigned() {
        let devices = vec![device(Some("2.0.0"), None), device(Some("1.0.0"), None)];
        let s = summarize(&devices, Some("2.0.0"));
        assert_eq!((s.counts.assigned, s.counts.installed), (1, 1));
    }
}
