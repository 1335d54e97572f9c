//! Whether the gateway clock can be trusted (contract: "Clocks"). Pure: the wall clock and
//! what the devices stamp are passed in.
//!
//! A box without an RTC boots with a stale clock until NTP steps it. Its devices keep good time,
//! so when the events of several devices are ahead of the gateway clock by more than
//! `max_future_skew`, it is the gateway that is wrong: rejecting those events `too_far_future`
//! would throw a compound's data away. The committer then holds its batch unacknowledged
//! (intake pauses, the devices' messages wait in the broker) and the Modbus input stamps
//! nothing, until the wall clock catches up with what the devices said. One device ahead on its
//! own is that device's clock: its events are rejected as before.
//!
//! The store gives a second witness: the latest time it recorded. A wall clock well behind it
//! at start (a stale boot on a box with history) is untrusted until it passes it.

use std::collections::BTreeMap;

/// How many distinct devices ahead of the gateway clock make the gateway clock the wrong one.
pub const DEVICES_AHEAD: usize = 2;
/// How long a device's "ahead" observation counts as recent (committer monotonic ms).
pub const EVIDENCE_MS: i64 = 10 * 60 * 1000;
/// A wall clock this far behind the store's latest record at start is a stale boot.
pub const STALE_AT_START_MS: i64 = 5 * 60 * 1000;

/// Why the clock is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distrust {
    /// Devices' events are ahead of the gateway clock: trusted again once the wall clock
    /// reaches `until_ms` (the earliest such event, less `max_future_skew`).
    DevicesAhead { devices: usize, until_ms: i64 },
    /// The wall clock is behind the store's latest record (`until_ms`).
    BehindStore { until_ms: i64 },
    /// `clock.require_sync` and the kernel does not report the clock synchronized.
    NotSynced,
}

impl Distrust {
    /// For the log and the page.
    pub fn describe(&self, wall_ms: i64) -> String {
        match *self {
            Distrust::DevicesAhead { devices, until_ms } => format!(
                "{devices} devices stamp their events {} s ahead of the gateway clock: the gateway clock is behind (no RTC, NTP not synced yet?)",
                (until_ms - wall_ms).max(0) / 1000
            ),
            Distrust::BehindStore { until_ms } => format!(
                "the gateway clock is {} s behind the latest time in the store (a stale clock at boot?)",
                (until_ms - wall_ms).max(0) / 1000
            ),
            Distrust::NotSynced => {
                "clock.require_sync: the kernel does not report the clock synchronized".into()
            }
        }
    }
}

/// The evidence about the gateway clock.
#[derive(Debug, Clone, Default)]
pub struct ClockTrust {
    /// Device -> (monotonic ms of the observation, the event's ts) for events stamped ahead.
    ahead: BTreeMap<String, (i64, i64)>,
    /// The store's latest record (wall ms), from start-up.
    store_high_ms: Option<i64>,
    pub max_future_skew_ms: i64,
}

impl ClockTrust {
    pub fn new(max_future_skew_ms: i64, store_high_ms: Option<i64>) -> Self {
        ClockTrust {
            ahead: BTreeMap::new(),
            store_high_ms,
            max_future_skew_ms,
        }
    }

    /// Note an event of `device` stamped `ts_ms`, seen at wall `wall_ms` and monotonic `mono_ms`.
    pub fn observe(&mut self, device: &str, ts_ms: i64, wall_ms: i64, mono_ms: i64) {
        if ts_ms > wall_ms + self.max_future_skew_ms {
            let e = self
                .ahead
                .entry(device.to_string())
                .or_insert((mono_ms, ts_ms));
            *e = (mono_ms, e.1.min(ts_ms));
        }
    }

    /// Whether the clock is trusted now; `synced` is the kernel's word when required.
    pub fn judge(&mut self, wall_ms: i64, mono_ms: i64, synced: Option<bool>) -> Option<Distrust> {
        if synced == Some(false) {
            return Some(Distrust::NotSynced);
        }
        if let Some(high) = self.store_high_ms {
            if wall_ms + STALE_AT_START_MS < high {
                return Some(Distrust::BehindStore { until_ms: high });
            }
            // Caught up once: the store's witness is spent.
            self.store_high_ms = None;
        }
        let skew = self.max_future_skew_ms;
        // Forget old evidence, and devices whose ahead events the clock has caught up with.
        self.ahead
            .retain(|_, (seen, ts)| mono_ms - *seen < EVIDENCE_MS && *ts > wall_ms + skew);
        if self.ahead.len() >= DEVICES_AHEAD {
            let until_ms = self
                .ahead
                .values()
                .map(|(_, ts)| ts - skew)
                .min()
                .unwrap_or(wall_ms);
            return Some(Distrust::DevicesAhead {
                devices: self.ahead.len(),
                until_ms,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SKEW: i64 = 300_000;
    const DAY3: i64 = 3 * 86_400_000;

    #[test]
    fn several_devices_ahead_distrust_the_gateway_until_it_catches_up() {
        let real = 1_800_000_000_000;
        let stale = real - DAY3;
        let mut t = ClockTrust::new(SKEW, None);
        t.observe("door-1", real, stale, 0);
        assert_eq!(
            t.judge(stale, 0, None),
            None,
            "one device ahead is that device's clock"
        );
        t.observe("door-2", real + 10, stale, 5);
        let d = t.judge(stale, 5, None).unwrap();
        assert!(matches!(d, Distrust::DevicesAhead { devices: 2, .. }));
        assert!(d.describe(stale).contains("ahead"));
        // NTP steps the clock: trusted again.
        assert_eq!(t.judge(real, 10, None), None);
    }

    #[test]
    fn a_stale_boot_behind_the_store_is_distrusted_and_kernel_sync_can_be_required() {
        let high = 1_800_000_000_000;
        let mut t = ClockTrust::new(SKEW, Some(high));
        assert_eq!(
            t.judge(high - DAY3, 0, None),
            Some(Distrust::BehindStore { until_ms: high })
        );
        assert_eq!(
            t.judge(high - 60_000, 1, None),
            None,
            "a minute behind is fine"
        );
        // Once caught up, a later step back is not a stale boot.
        assert_eq!(t.judge(high - DAY3, 2, None), None);
        assert_eq!(t.judge(high, 3, Some(false)), Some(Distrust::NotSynced));
    }

    #[test]
    fn old_evidence_expires() {
        let now = 1_800_000_000_000;
        let mut t = ClockTrust::new(SKEW, None);
        t.observe("a", now + DAY3, now, 0);
        t.observe("b", now + DAY3, now, EVIDENCE_MS + 1);
        assert_eq!(
            t.judge(now, EVIDENCE_MS + 2, None),
            None,
            "a's evidence is stale"
        );
    }
}
