//! The device's battery, for the `battery` routing attribute when an app does not give one:
//! read from the kernel's power-supply class (`/sys/class/power_supply/*/capacity` of the
//! supplies whose `type` is `Battery`), at most every 30 seconds.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a reading is used before the files are read again.
const FRESH_FOR: Duration = Duration::from_secs(30);

/// The battery level as the kernel reports it.
#[derive(Debug)]
pub struct Battery {
    root: PathBuf,
    last: Mutex<Option<(Instant, Option<f32>)>>,
}

impl Default for Battery {
    fn default() -> Self {
        Battery::at("/sys/class/power_supply")
    }
}

impl Battery {
    /// Reads the power-supply class under `root` (a directory of supplies).
    #[must_use]
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Battery {
            root: root.into(),
            last: Mutex::new(None),
        }
    }

    /// The charge, 0–1 (the lowest of the batteries), or `None` on a device without one.
    pub fn level(&self) -> Option<f32> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, level)) = *last
            && at.elapsed() < FRESH_FOR
        {
            return level;
        }
        let level = read(&self.root);
        *last = Some((Instant::now(), level));
        level
    }
}

fn read(root: &Path) -> Option<f32> {
    let supplies = std::fs::read_dir(root).ok()?;
    supplies
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| std::fs::read_to_string(p.join("type")).is_ok_and(|t| t.trim() == "Battery"))
        .filter_map(|p| std::fs::read_to_string(p.join("capacity")).ok())
        .filter_map(|c| c.trim().parse::<f32>().ok())
        .map(|percent| (percent / 100.0).clamp(0.0, 1.0))
        .reduce(f32::min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(root: &Path, name: &str, kind: &str, capacity: Option<&str>) {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("type"), format!("{kind}\n")).expect("type");
        if let Some(c) = capacity {
            std::fs::write(dir.join("capacity"), format!("{c}\n")).expect("capacity");
        }
    }

    #[test]
    fn the_lowest_battery_counts_and_mains_are_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        supply(dir.path(), "AC", "Mains", None);
        supply(dir.path(), "BAT0", "Battery", Some("64"));
        supply(dir.path(), "BAT1", "Battery", Some("31"));
        assert_eq!(Battery::at(dir.path()).level(), Some(0.31));
    }

    #[test]
    fn a_device_without_a_battery_has_no_level() {
        let dir = tempfile::tempdir().expect("tempdir");
        supply(dir.path(), "AC", "Mains", None);
        assert_eq!(Battery::at(dir.path()).level(), None);
        assert_eq!(Battery::at(dir.path().join("missing")).level(), None);
    }

    #[test]
    fn a_reading_is_reused_while_fresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        supply(dir.path(), "BAT0", "Battery", Some("80"));
        let b = Battery::at(dir.path());
        assert_eq!(b.level(), Some(0.8));
        supply(dir.path(), "BAT0", "Battery", Some("10"));
        assert_eq!(b.level(), Some(0.8), "not read again within 30 s");
    }
}
