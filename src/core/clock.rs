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
//!
//! [`StoreClock`] is the time the store and the windows run on. It never goes back: after a
//! step back it advances at the monotonic clock's pace until the wall clock catches up. A step
//! forward is held the same way (windows keep closing on the monotonic clock, none early) until
//! a device's event vouches for the new wall time; while devices contradict it, it stays held;
//! with no device evidence at all (a Modbus-only compound, a quiet night) it is taken after
//! [`UNWITNESSED_STEP_MS`].

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
    /// The store had history, and the wall clock was not behind it: the clock agrees with what
    /// the box saw before, so devices stamping far ahead of it are the wrong ones.
    history: bool,
    pub max_future_skew_ms: i64,
}

/// With history in the store, events stamped further ahead than this are not evidence against
/// the gateway clock (they are rejected `too_far_future`): found by a break-it run, two devices a
/// year ahead (or a vendor source reading milliseconds as seconds) paused a whole site's intake.
pub const IMPLAUSIBLE_AHEAD_MS: i64 = 30 * 86_400_000;

impl ClockTrust {
    pub fn new(max_future_skew_ms: i64, store_high_ms: Option<i64>) -> Self {
        ClockTrust {
            ahead: BTreeMap::new(),
            history: store_high_ms.is_some(),
            store_high_ms,
            max_future_skew_ms,
        }
    }

    /// Note an event of `device` stamped `ts_ms`, seen at wall `wall_ms` and monotonic `mono_ms`.
    pub fn observe(&mut self, device: &str, ts_ms: i64, wall_ms: i64, mono_ms: i64) {
        let behind_store = self
            .store_high_ms
            .is_some_and(|h| wall_ms + STALE_AT_START_MS < h);
        if self.history && !behind_store && ts_ms - wall_ms > IMPLAUSIBLE_AHEAD_MS {
            return;
        }
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

/// A move of the wall clock this much beyond the monotonic clock's progress is a step (NTP
/// slews at most 0.5 ms/s; chrony's `makestep` default threshold is 1 s).
pub const STEP_MS: i64 = 2_000;
/// A held forward step that no device's event confirms or contradicts is taken after this long
/// (monotonic ms): a Modbus-only compound has no other witness.
pub const UNWITNESSED_STEP_MS: i64 = 120_000;

/// A forward step of the wall clock not believed yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeldStep {
    /// Monotonic ms when it was seen.
    since_mono: i64,
    /// A device's event sided with the old time.
    contradicted: bool,
}

/// What the store clock did on a call of [`StoreClock::now`], for the log and the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing special: the wall clock is used.
    None,
    /// The wall clock went back by more than [`STEP_MS`] (or is still that far behind): the
    /// store clock carries on at the monotonic pace, `by_ms` ahead of the wall.
    Back { by_ms: i64 },
    /// The wall clock jumped forward by `by_ms` and is not believed yet.
    ForwardHeld { by_ms: i64 },
}

/// The clock windows and records run on (ms since the Unix epoch). Pure: the wall and monotonic
/// times are passed in. See the module for the rules.
#[derive(Debug, Clone)]
pub struct StoreClock {
    /// The last time handed over and the monotonic ms it was handed over at.
    last: Option<(i64, i64)>,
    held: Option<HeldStep>,
    max_future_skew_ms: i64,
}

impl StoreClock {
    pub fn new(max_future_skew_ms: i64) -> Self {
        StoreClock {
            last: None,
            held: None,
            max_future_skew_ms,
        }
    }

    /// The last handed-over time carried forward to `mono_ms` at the monotonic pace.
    fn carried(&self, mono_ms: i64) -> Option<i64> {
        self.last.map(|(t, m)| t + (mono_ms - m))
    }

    /// An event stamped `ts_ms` arrived: while a forward step is held, it is evidence. An event
    /// closer to the new wall time (and not beyond it by more than `max_future_skew`) vouches
    /// for it; one closer to the old time (and not a late replay from before it) contradicts it.
    pub fn witness(&mut self, ts_ms: i64, wall_ms: i64, mono_ms: i64) {
        let (Some(held), Some(carried)) = (self.held, self.carried(mono_ms)) else {
            return;
        };
        if wall_ms <= carried {
            return;
        }
        let mid = carried + (wall_ms - carried) / 2;
        if ts_ms >= mid && ts_ms <= wall_ms + self.max_future_skew_ms {
            self.last = Some((wall_ms, mono_ms));
            self.held = None;
        } else if ts_ms < mid && ts_ms >= carried - self.max_future_skew_ms {
            self.held = Some(HeldStep {
                contradicted: true,
                ..held
            });
        }
    }

    /// The store's time at wall `wall_ms`, monotonic `mono_ms`, and what it did about a step.
    pub fn now(&mut self, wall_ms: i64, mono_ms: i64) -> (i64, Step) {
        let Some(carried) = self.carried(mono_ms) else {
            self.last = Some((wall_ms, mono_ms));
            return (wall_ms, Step::None);
        };
        let (t, step) = if wall_ms <= carried {
            self.held = None;
            let by_ms = carried - wall_ms;
            (
                carried,
                if by_ms > STEP_MS {
                    Step::Back { by_ms }
                } else {
                    Step::None
                },
            )
        } else if wall_ms - carried <= STEP_MS {
            self.held = None;
            (wall_ms, Step::None)
        } else {
            let held = *self.held.get_or_insert(HeldStep {
                since_mono: mono_ms,
                contradicted: false,
            });
            if !held.contradicted && mono_ms - held.since_mono >= UNWITNESSED_STEP_MS {
                self.held = None;
                (wall_ms, Step::None)
            } else {
                (
                    carried,
                    Step::ForwardHeld {
                        by_ms: wall_ms - carried,
                    },
                )
            }
        };
        self.last = Some((t, mono_ms));
        (t, step)
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
    fn devices_a_year_ahead_of_a_clock_the_store_confirms_do_not_pause_intake() {
        let now = 1_800_000_000_000;
        // The store saw events yesterday; the clock agrees with it.
        let mut t = ClockTrust::new(SKEW, Some(now - 86_400_000));
        let year = 366 * 86_400_000;
        t.observe("cam-7", now + year, now, 0);
        t.observe("cam-8", now + year, now, 1);
        assert_eq!(
            t.judge(now, 2, None),
            None,
            "the two cameras are wrong, not the box"
        );
        // Days ahead are still evidence (a box that lost time while off).
        t.observe("door-1", now + DAY3, now, 3);
        t.observe("door-2", now + DAY3, now, 4);
        assert!(matches!(
            t.judge(now, 5, None),
            Some(Distrust::DevicesAhead { devices: 2, .. })
        ));
        // Without history (a first boot at 1970), any distance counts.
        let mut t = ClockTrust::new(SKEW, None);
        t.observe("d1", now, 0, 0);
        t.observe("d2", now, 0, 1);
        assert!(t.judge(0, 2, None).is_some());
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

    const T0: i64 = 1_800_000_000_000;
    const H2: i64 = 2 * 3_600_000;

    #[test]
    fn a_step_back_carries_on_at_the_monotonic_pace_until_the_wall_catches_up() {
        let mut c = StoreClock::new(SKEW);
        assert_eq!(c.now(T0, 0), (T0, Step::None));
        assert_eq!(
            c.now(T0 - H2 + 1000, 1000),
            (T0 + 1000, Step::Back { by_ms: H2 })
        );
        assert_eq!(c.now(T0 + 5000, 5000).0, T0 + 5000);
    }

    #[test]
    fn a_forward_step_devices_contradict_stays_held() {
        let mut c = StoreClock::new(SKEW);
        c.now(T0, 0);
        assert_eq!(
            c.now(T0 + H2 + 1000, 1000),
            (T0 + 1000, Step::ForwardHeld { by_ms: H2 })
        );
        // A device stamps the old time: the wall is wrong.
        c.witness(T0 + 1500, T0 + H2 + 1500, 1500);
        let later = UNWITNESSED_STEP_MS * 10;
        assert_eq!(c.now(T0 + H2 + later, later).0, T0 + later);
        // A late replay from long before says nothing either way; the wall steps back: done.
        c.witness(T0 - 10 * H2, T0 + H2 + later, later);
        assert_eq!(
            c.now(T0 + later + 10, later + 10),
            (T0 + later + 10, Step::None)
        );
    }

    #[test]
    fn a_forward_step_a_device_vouches_for_is_taken_at_once() {
        let mut c = StoreClock::new(SKEW);
        c.now(T0 - 3 * 86_400_000, 0);
        c.now(T0, 10);
        c.witness(T0 + 5, T0 + 20, 20);
        assert_eq!(c.now(T0 + 30, 30), (T0 + 30, Step::None));
    }

    #[test]
    fn an_unwitnessed_forward_step_is_taken_after_a_while() {
        let mut c = StoreClock::new(SKEW);
        c.now(T0, 0);
        assert!(matches!(c.now(T0 + H2, 1).1, Step::ForwardHeld { .. }));
        let t = UNWITNESSED_STEP_MS + 1;
        assert_eq!(c.now(T0 + H2 + t, t), (T0 + H2 + t, Step::None));
    }

    proptest::proptest! {
        /// Whatever the wall clock does, the store clock never goes back, and it is behind the
        /// wall only by following the monotonic pace.
        #[test]
        fn the_store_clock_never_goes_back(
            steps in proptest::collection::vec((-10 * H2..10 * H2, 0i64..5_000, proptest::option::of(-H2..H2)), 1..60)
        ) {
            let mut c = StoreClock::new(SKEW);
            let (mut wall_off, mut mono) = (0i64, 0i64);
            let mut last = c.now(T0, 0).0;
            for (jump, dt, ev) in steps {
                mono += dt;
                wall_off += jump / 8;
                let wall = T0 + mono + wall_off;
                if let Some(e) = ev {
                    c.witness(T0 + mono + e, wall, mono);
                }
                let (t, _) = c.now(wall, mono);
                proptest::prop_assert!(t >= last, "went back: {t} < {last}");
                proptest::prop_assert!(t >= wall || t - last <= dt, "ran ahead of the monotonic pace");
                last = t;
            }
        }
    }
}
