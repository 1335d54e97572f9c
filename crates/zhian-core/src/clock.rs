//! Whether the gateway clock can be trusted, and what an event stamped ahead of a trusted clock
//! counts at (contract: "Clocks"). Pure: the wall clock and what the devices stamp are passed in.
//!
//! A box without an RTC boots with a stale clock until NTP steps it. Its devices keep good time,
//! so when the recent events of most recently active devices (at least [`DEVICES_AHEAD`] of
//! them, and more than half of those active within [`EVIDENCE_MS`]) are ahead of the gateway
//! clock by more than `max_future_skew`, it is the gateway that is wrong: the committer then
//! holds its batch unacknowledged (intake pauses, the devices' messages wait in the broker) and
//! the Modbus input stamps nothing, until the wall clock catches up with what the devices said.
//! A few devices ahead while the rest agree with the gateway (two cameras with drifting clocks)
//! are those devices' clocks: their events are counted at the gateway's receive time
//! ([`ClockTrust::receive`]) and each such device is flagged `clock_skew` (one WARN per device
//! and run), never rejected and never a reason to stop the site.
//!
//! Two more witnesses: the store's latest record (a wall clock well behind it at start is a
//! stale boot on a box with history, untrusted until it passes it), and the calendar (a wall
//! clock before [`EARLIEST_PLAUSIBLE_MS`] was never set).
//!
//! [`StoreClock`] is the time the store and the windows run on. It never goes back: after a
//! step back it advances at the monotonic clock's pace until the wall clock catches up. A step
//! forward is held the same way (windows keep closing on the monotonic clock, none early) until
//! a device's event vouches for the new wall time; while devices contradict it, it stays held;
//! with no device evidence at all (a Modbus-only compound, a quiet night) it is taken after
//! [`UNWITNESSED_STEP_MS`].

use std::collections::{BTreeMap, HashMap};

/// At least this many distinct devices ahead of the gateway clock (and more than half of the
/// recently active ones) make the gateway clock the wrong one: never two.
pub const DEVICES_AHEAD: usize = 3;
/// How long a device's latest event counts as recent activity (committer monotonic ms).
pub const EVIDENCE_MS: i64 = 10 * 60 * 1000;
/// A wall clock this far behind the store's latest record at start is a stale boot.
pub const STALE_AT_START_MS: i64 = 5 * 60 * 1000;
/// A wall clock before 2026-01-01T00:00:00Z reads a date before this software was written: it
/// was never set (no RTC, NTP not synced yet), whatever the devices say.
pub const EARLIEST_PLAUSIBLE_MS: i64 = 1_767_225_600_000;
/// Recently active devices kept at most (a flood of invented device ids cannot grow it); the
/// longest-quiet go first.
pub const RECENT_MAX: usize = 10_000;

/// Why the clock is not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distrust {
    /// Most recently active devices' events are ahead of the gateway clock (`devices` of
    /// `active`): trusted again once the wall clock reaches `until_ms` (the earliest such
    /// event, less `max_future_skew`).
    DevicesAhead {
        devices: usize,
        active: usize,
        until_ms: i64,
    },
    /// The wall clock is behind the store's latest record (`until_ms`).
    BehindStore { until_ms: i64 },
    /// The wall clock reads a date before [`EARLIEST_PLAUSIBLE_MS`].
    NeverSet,
    /// `clock.require_sync` and the kernel does not report the clock synchronized.
    NotSynced,
}

impl Distrust {
    /// For the log and the page.
    pub fn describe(&self, wall_ms: i64) -> String {
        match *self {
            Distrust::DevicesAhead {
                devices,
                active,
                until_ms,
            } => format!(
                "{devices} of {active} recently active devices stamp their events {} s ahead of the gateway clock: the gateway clock is behind (no RTC, NTP not synced yet?)",
                (until_ms - wall_ms).max(0) / 1000
            ),
            Distrust::BehindStore { until_ms } => format!(
                "the gateway clock is {} s behind the latest time in the store (a stale clock at boot?)",
                (until_ms - wall_ms).max(0) / 1000
            ),
            Distrust::NeverSet => format!(
                "the gateway clock reads {} s since 1970, a date before this software was written: it was never set (no RTC, NTP not synced yet?)",
                wall_ms / 1000
            ),
            Distrust::NotSynced => {
                "clock.require_sync: the kernel does not report the clock synchronized".into()
            }
        }
    }
}

/// A device's latest event as evidence about the gateway clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// Monotonic ms of the observation.
    mono: i64,
    /// Its (earliest) time stamped beyond `max_future_skew`, while its events are.
    ahead_ts: Option<i64>,
}

/// A device whose events were stamped ahead of the trusted gateway clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Skew {
    flagged: bool,
}

/// How an event's device flag changed on [`ClockTrust::receive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// No change (still flagged with a new `ahead_ms`, or still fine).
    Same { ahead_ms: Option<i64> },
    /// The device is now flagged `clock_skew`, its event `ahead_ms` ahead; `warn` the first
    /// time this run (one WARN per device).
    Raised { ahead_ms: i64, warn: bool },
    /// An event within `max_future_skew`: the flag is lowered.
    Cleared,
}

/// What an event counts at while the gateway clock is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Receipt {
    /// The event's own time, or the gateway's receive time when it was stamped more than
    /// `max_future_skew` ahead.
    pub ts_ms: i64,
    pub flag: Flag,
}

/// The evidence about the gateway clock, and the devices flagged `clock_skew`. Devices are
/// keys the caller chooses ("kind\0device").
#[derive(Debug, Clone, Default)]
pub struct ClockTrust {
    /// Device -> its latest event, for the "most recently active devices" rule.
    recent: HashMap<String, Seen>,
    /// Devices whose events were stamped ahead of the trusted clock (flagged or not any more;
    /// kept so a device is warned about once). Bounded by the device table: forgotten devices
    /// are removed ([`ClockTrust::forget`]).
    skew: BTreeMap<String, Skew>,
    /// The store's latest record (wall ms), from start-up.
    store_high_ms: Option<i64>,
    /// The store had history, and the wall clock was not behind it: the clock agrees with what
    /// the box saw before, so devices stamping far ahead of it are the wrong ones.
    history: bool,
    pub max_future_skew_ms: i64,
}

/// With history in the store, events stamped further ahead than this are not evidence against
/// the gateway clock (found by a break-it run: two devices a year ahead, or a vendor source
/// reading milliseconds as seconds, paused a whole site's intake); they are counted at receipt.
pub const IMPLAUSIBLE_AHEAD_MS: i64 = 30 * 86_400_000;

impl ClockTrust {
    pub fn new(max_future_skew_ms: i64, store_high_ms: Option<i64>) -> Self {
        ClockTrust {
            recent: HashMap::new(),
            skew: BTreeMap::new(),
            history: store_high_ms.is_some(),
            store_high_ms,
            max_future_skew_ms,
        }
    }

    /// Note an event of `device` stamped `ts_ms`, seen at wall `wall_ms` and monotonic `mono_ms`:
    /// it makes the device recently active, ahead of the gateway clock or not.
    pub fn observe(&mut self, device: &str, ts_ms: i64, wall_ms: i64, mono_ms: i64) {
        let behind_store = self
            .store_high_ms
            .is_some_and(|h| wall_ms + STALE_AT_START_MS < h);
        let implausible = self.history && !behind_store && ts_ms - wall_ms > IMPLAUSIBLE_AHEAD_MS;
        let ahead = !implausible && ts_ms > wall_ms + self.max_future_skew_ms;
        if !self.recent.contains_key(device) && self.recent.len() >= RECENT_MAX {
            self.shed(mono_ms);
        }
        let e = self.recent.entry(device.to_string()).or_insert(Seen {
            mono: mono_ms,
            ahead_ts: None,
        });
        e.mono = mono_ms;
        e.ahead_ts = ahead.then(|| e.ahead_ts.map_or(ts_ms, |t| t.min(ts_ms)));
    }

    /// Make room in `recent`: forget stale evidence, then the longest-quiet tenth.
    fn shed(&mut self, mono_ms: i64) {
        self.recent.retain(|_, s| mono_ms - s.mono < EVIDENCE_MS);
        if self.recent.len() >= RECENT_MAX {
            let mut by_age: Vec<i64> = self.recent.values().map(|s| s.mono).collect();
            let cut = RECENT_MAX / 10;
            by_age.select_nth_unstable(cut);
            let below = by_age[cut];
            self.recent.retain(|_, s| s.mono > below);
        }
    }

    /// Whether the clock is trusted now; `synced` is the kernel's word when required.
    pub fn judge(&mut self, wall_ms: i64, mono_ms: i64, synced: Option<bool>) -> Option<Distrust> {
        if synced == Some(false) {
            return Some(Distrust::NotSynced);
        }
        if wall_ms < EARLIEST_PLAUSIBLE_MS {
            return Some(Distrust::NeverSet);
        }
        if let Some(high) = self.store_high_ms {
            if wall_ms + STALE_AT_START_MS < high {
                return Some(Distrust::BehindStore { until_ms: high });
            }
            // Caught up once: the store's witness is spent.
            self.store_high_ms = None;
        }
        let skew = self.max_future_skew_ms;
        // Forget old evidence; a device whose ahead events the clock has caught up with is
        // active, not ahead.
        self.recent.retain(|_, s| mono_ms - s.mono < EVIDENCE_MS);
        let mut ahead = 0;
        let mut until_ms = i64::MAX;
        for s in self.recent.values_mut() {
            s.ahead_ts = s.ahead_ts.filter(|ts| *ts > wall_ms + skew);
            if let Some(ts) = s.ahead_ts {
                ahead += 1;
                until_ms = until_ms.min(ts - skew);
            }
        }
        let active = self.recent.len();
        (ahead >= DEVICES_AHEAD && 2 * ahead > active).then_some(Distrust::DevicesAhead {
            devices: ahead,
            active,
            until_ms,
        })
    }

    /// An event of `device` stamped `ts_ms` is committed with the gateway clock trusted, at
    /// `now_ms`: stamped more than `max_future_skew` ahead, it counts at `now_ms` and the
    /// device is flagged `clock_skew`; within it, it counts at its own time and a flag is lowered.
    pub fn receive(&mut self, device: &str, ts_ms: i64, now_ms: i64) -> Receipt {
        let ahead_ms = ts_ms - now_ms;
        if ahead_ms > self.max_future_skew_ms {
            let flag = match self.skew.get_mut(device) {
                Some(s) if s.flagged => Flag::Same {
                    ahead_ms: Some(ahead_ms),
                },
                Some(s) => {
                    s.flagged = true;
                    Flag::Raised {
                        ahead_ms,
                        warn: false,
                    }
                }
                None => {
                    self.skew.insert(device.to_string(), Skew { flagged: true });
                    Flag::Raised {
                        ahead_ms,
                        warn: true,
                    }
                }
            };
            return Receipt {
                ts_ms: now_ms,
                flag,
            };
        }
        let flag = match self.skew.get_mut(device) {
            Some(s) if s.flagged => {
                s.flagged = false;
                Flag::Cleared
            }
            _ => Flag::Same { ahead_ms: None },
        };
        Receipt { ts_ms, flag }
    }

    /// Whether `device` is flagged `clock_skew`.
    pub fn flagged(&self, device: &str) -> bool {
        self.skew.get(device).is_some_and(|s| s.flagged)
    }

    /// `device` was forgotten (device table bound, a source change, the installer): its
    /// evidence and flag go with it.
    pub fn forget(&mut self, device: &str) {
        self.recent.remove(device);
        self.skew.remove(device);
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
    fn most_active_devices_ahead_distrust_the_gateway_until_it_catches_up() {
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
        assert_eq!(t.judge(stale, 5, None), None, "never because of two");
        t.observe("door-3", real + 20, stale, 6);
        let d = t.judge(stale, 6, None).unwrap();
        assert!(matches!(
            d,
            Distrust::DevicesAhead {
                devices: 3,
                active: 3,
                ..
            }
        ));
        assert!(d.describe(stale).contains("3 of 3 recently active devices"));
        // NTP steps the clock: trusted again.
        assert_eq!(t.judge(real, 10, None), None);
    }

    #[test]
    fn two_cameras_ahead_of_a_right_clock_never_pause_the_site() {
        let now = 1_800_000_000_000;
        let mut t = ClockTrust::new(30_000, None);
        for (i, d) in ["door-1", "door-2", "door-3", "door-4"].iter().enumerate() {
            t.observe(d, now - 1000, now, i as i64);
        }
        t.observe("cam-1", now + 120_000, now, 10);
        t.observe("cam-2", now + 120_000, now, 11);
        assert_eq!(t.judge(now, 12, None), None);
        // Three of seven ahead: still a minority.
        t.observe("cam-3", now + 120_000, now, 13);
        assert_eq!(t.judge(now, 14, None), None);
        // The doors fall quiet for longer than the evidence lasts; the cameras keep stamping
        // ahead: three of three recently active devices now agree.
        let later = EVIDENCE_MS + 20;
        for c in ["cam-1", "cam-2", "cam-3"] {
            t.observe(c, now + 120_000, now, later);
        }
        assert!(matches!(
            t.judge(now, later + 1, None),
            Some(Distrust::DevicesAhead {
                devices: 3,
                active: 3,
                ..
            })
        ));
        // Only two cameras active, both ahead: never because of two.
        let mut t = ClockTrust::new(30_000, None);
        t.observe("cam-1", now + 120_000, now, 0);
        t.observe("cam-2", now + 120_000, now, 1);
        assert_eq!(t.judge(now, 2, None), None);
    }

    #[test]
    fn an_event_ahead_of_a_trusted_clock_counts_at_receipt_and_flags_its_device_once() {
        let now = 1_800_000_000_000;
        let mut t = ClockTrust::new(30_000, None);
        let r = t.receive("camera\0cam-1", now + 120_000, now);
        assert_eq!(r.ts_ms, now, "counted at the gateway's receive time");
        assert_eq!(
            r.flag,
            Flag::Raised {
                ahead_ms: 120_000,
                warn: true
            }
        );
        assert!(t.flagged("camera\0cam-1"));
        let r = t.receive("camera\0cam-1", now + 121_000, now + 1000);
        assert_eq!(r.ts_ms, now + 1000);
        assert_eq!(
            r.flag,
            Flag::Same {
                ahead_ms: Some(120_000)
            }
        );
        // Within the skew: its own time, the flag lowered.
        let r = t.receive("camera\0cam-1", now + 2000 + 29_000, now + 2000);
        assert_eq!((r.ts_ms, r.flag), (now + 31_000, Flag::Cleared));
        assert!(!t.flagged("camera\0cam-1"));
        // Ahead again: flagged, not warned again this run.
        let r = t.receive("camera\0cam-1", now + 200_000, now + 3000);
        assert_eq!(
            r.flag,
            Flag::Raised {
                ahead_ms: 197_000,
                warn: false
            }
        );
        // Forgotten devices take their flag with them.
        t.forget("camera\0cam-1");
        assert!(!t.flagged("camera\0cam-1"));
        // A device behind is never touched.
        let r = t.receive("access\0door-1", now - 3_600_000, now);
        assert_eq!(
            (r.ts_ms, r.flag),
            (now - 3_600_000, Flag::Same { ahead_ms: None })
        );
    }

    #[test]
    fn devices_a_year_ahead_of_a_clock_the_store_confirms_do_not_pause_intake() {
        let now = 1_800_000_000_000;
        // The store saw events yesterday; the clock agrees with it.
        let mut t = ClockTrust::new(SKEW, Some(now - 86_400_000));
        let year = 366 * 86_400_000;
        for (i, c) in ["cam-6", "cam-7", "cam-8"].iter().enumerate() {
            t.observe(c, now + year, now, i as i64);
        }
        assert_eq!(
            t.judge(now, 3, None),
            None,
            "the three cameras are wrong, not the box"
        );
        // Days ahead are still evidence (a box that lost time while off).
        for (i, d) in ["door-1", "door-2", "door-3", "door-4"].iter().enumerate() {
            t.observe(d, now + DAY3, now, 4 + i as i64);
        }
        assert!(matches!(
            t.judge(now, 9, None),
            Some(Distrust::DevicesAhead {
                devices: 4,
                active: 7,
                ..
            })
        ));
        // Without history, any distance counts.
        let mut t = ClockTrust::new(SKEW, None);
        for (i, d) in ["d1", "d2", "d3"].iter().enumerate() {
            t.observe(d, now + year, now, i as i64);
        }
        assert!(t.judge(now, 3, None).is_some());
    }

    #[test]
    fn a_clock_that_was_never_set_is_not_trusted_whatever_the_devices_say() {
        let mut t = ClockTrust::new(SKEW, None);
        assert_eq!(t.judge(0, 0, None), Some(Distrust::NeverSet));
        assert!(Distrust::NeverSet.describe(0).contains("never set"));
        assert_eq!(t.judge(EARLIEST_PLAUSIBLE_MS, 1, None), None);
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
        t.observe("c", now + DAY3, now, EVIDENCE_MS + 1);
        assert_eq!(
            t.judge(now, EVIDENCE_MS + 2, None),
            None,
            "a's evidence is stale"
        );
    }

    #[test]
    fn invented_devices_cannot_grow_the_evidence() {
        let now = 1_800_000_000_000;
        let mut t = ClockTrust::new(SKEW, None);
        for i in 0..(RECENT_MAX as i64 * 2) {
            t.observe(&format!("fake-{i}"), now, now, i);
        }
        assert!(t.recent.len() <= RECENT_MAX);
        assert!(t
            .recent
            .contains_key(&format!("fake-{}", RECENT_MAX * 2 - 1)));
    }

    proptest::proptest! {
        /// The clock rule against a model: every event counts at its own time or, stamped beyond
        /// the skew, at receipt; a device is warned about at most once; intake pauses exactly
        /// when at least three recently active devices, more than half of them, are ahead,
        /// never because of two.
        #[test]
        fn the_clock_rule_agrees_with_its_model(
            events in proptest::collection::vec((0usize..8, -600_000i64..900_000, 0i64..120_000), 1..120)
        ) {
            const SK: i64 = 30_000;
            let now0 = 1_800_000_000_000i64;
            let mut t = ClockTrust::new(SK, None);
            let mut mono = 0i64;
            // Model: device -> (mono of its latest event, its earliest ts while ahead).
            let mut latest: BTreeMap<usize, (i64, Option<i64>)> = BTreeMap::new();
            let mut warned: BTreeMap<usize, u32> = BTreeMap::new();
            let mut flagged: BTreeMap<usize, bool> = BTreeMap::new();
            for (dev, off, dt) in events {
                mono += dt;
                let wall = now0 + mono;
                let ts = wall + off;
                let key = format!("d{dev}");
                t.observe(&key, ts, wall, mono);
                let e = latest.entry(dev).or_insert((mono, None));
                e.0 = mono;
                e.1 = (ts > wall + SK).then(|| e.1.map_or(ts, |p: i64| p.min(ts)));
                let judged = t.judge(wall, mono, None);
                latest.retain(|_, (m, _)| mono - *m < EVIDENCE_MS);
                for (_, a) in latest.values_mut() {
                    *a = a.filter(|ts| *ts > wall + SK);
                }
                let ahead = latest.values().filter(|(_, a)| a.is_some()).count();
                let active = latest.len();
                let model_pause = ahead >= 3 && 2 * ahead > active;
                proptest::prop_assert_eq!(judged.is_some(), model_pause, "{:?} ahead {} of {}", judged, ahead, active);
                if let Some(Distrust::DevicesAhead { devices, .. }) = judged {
                    proptest::prop_assert!(devices >= 3);
                }
                if judged.is_none() {
                    let r = t.receive(&key, ts, wall);
                    let expect_ts = if off > SK { wall } else { ts };
                    proptest::prop_assert_eq!(r.ts_ms, expect_ts);
                    let was = flagged.get(&dev).copied().unwrap_or(false);
                    flagged.insert(dev, off > SK);
                    match r.flag {
                        Flag::Raised { warn, .. } => {
                            proptest::prop_assert!(off > SK && !was);
                            if warn {
                                *warned.entry(dev).or_default() += 1;
                            }
                        }
                        Flag::Cleared => proptest::prop_assert!(off <= SK && was),
                        Flag::Same { ahead_ms } => {
                            proptest::prop_assert_eq!(was, off > SK);
                            proptest::prop_assert_eq!(ahead_ms.is_some(), off > SK);
                        }
                    }
                    proptest::prop_assert_eq!(t.flagged(&key), off > SK);
                }
            }
            proptest::prop_assert!(warned.values().all(|n| *n <= 1), "one WARN per device: {:?}", warned);
        }
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
