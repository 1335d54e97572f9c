//! Vehicles inside (实有车辆, contract: "Vehicles inside"): the set of vehicles in the compound
//! now, from the vehicle gates' `entry` and `exit` events, keyed by a presence pseudonym (a
//! 16-byte keyed hash of the plate under a key of its own that never rotates, so a stay across
//! midnight keeps its key). Pure: `now` is passed in; the store keeps [`Presence`] on disk and
//! applies each batch's steps in the batch's transaction.
//!
//! Rules, per vehicle (per pseudonym), by **event time**, so the order events arrive in does
//! not matter:
//! - The vehicle's newest event decides: inside after an `entry`, outside after an `exit`. An
//!   event older than the newest one of that vehicle changes nothing (an exit delivered before
//!   its entry leaves the vehicle outside), nor does a second one at the same time; at the
//!   same millisecond an exit counts as after an entry.
//! - A duplicate (the same event again) changes nothing: dedup drops it before, and a replayed
//!   one is no newer than itself.
//! - An `entry` for a vehicle already inside refreshes its stay (entry time and gate); an `exit`
//!   removes the stay.
//! - An `exit` of a vehicle with no known entry is counted (`unmatched_exits`), never
//!   subtracted. If its entry arrives later (older than the exit), the exit is matched after all
//!   and the count goes back down.
//! - An event whose `result` is `denied` moves nothing (the barrier stayed down).
//! - A stay older than `max_stay` is a missed exit (a plate the exit camera did not read): the
//!   stay is dropped and counted (`missed_exits`).
//! - An outside vehicle's last exit is remembered for `forget_ms` (the lateness bound: no event
//!   older than that is accepted), so a late entry older than it is recognised; then forgotten.
//! - A stocktake (盘点) records the counted number: `inside` is the set's size plus the
//!   stocktake's adjustment (counted − the set's size at the stocktake), never below zero. The
//!   set itself is kept (its stays still end at their exits); an exit with no known entry
//!   afterwards is one of the vehicles only the stocktake counted, and takes one off the
//!   adjustment while it is positive; the next stocktake replaces the adjustment.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A 16-byte presence pseudonym.
pub type PresenceKey = [u8; 16];

/// A vehicle event's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dir {
    Entry,
    Exit,
}

impl Dir {
    /// The direction of a vehicle event's `action` and `result`, if it moves the set: `entry`
    /// or `exit`, unless the result is `denied`.
    pub fn of(action: &str, result: &str) -> Option<Dir> {
        if result == "denied" {
            return None;
        }
        match action {
            "entry" => Some(Dir::Entry),
            "exit" => Some(Dir::Exit),
            _ => None,
        }
    }
}

/// A vehicle's newest event, as stored (record version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecordV1 {
    /// The newest event's time (ms).
    pub ts_ms: i64,
    pub dir: Dir,
    /// The gate (device) of that event.
    pub device: String,
    /// The plate masked to its first two and last two characters ([`mask_plate`]).
    pub masked: String,
    /// An exit counted in `unmatched_exits` (no entry known before it).
    pub unmatched: bool,
}

/// The plate as the page shows it: its first two and last two characters, `***` between
/// (`浙A12345` → `浙A***45`); four characters or fewer: all `*`.
pub fn mask_plate(plate: &str) -> String {
    let c: Vec<char> = plate.trim().chars().collect();
    if c.len() <= 4 {
        return "*".repeat(c.len());
    }
    let head: String = c[..2].iter().collect();
    let tail: String = c[c.len() - 2..].iter().collect();
    format!("{head}***{tail}")
}

/// The counted totals kept beside the set (record version 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Stays dropped past `max_stay`, since the box started counting.
    pub missed_exits: u64,
    /// Exits with no known entry.
    pub unmatched_exits: u64,
    /// The last stocktake's adjustment (counted − set size then).
    pub adjust: i64,
    /// The last stocktake: (counted, when, ms).
    pub stocktake: Option<(u64, i64)>,
}

/// What one event did to the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The vehicle is inside now (new stay).
    Entered,
    /// Already inside: its stay now starts at this entry.
    Refreshed,
    /// It left.
    Left,
    /// An exit with no entry known: counted.
    Unmatched,
    /// The entry an earlier-counted unmatched exit was waiting for: that exit is matched now.
    Matched,
    /// Older than what is known of the vehicle, or the same again: nothing.
    Stale,
}

/// The order of a vehicle's events: by time, and at the same millisecond an exit after an
/// entry (a vehicle that entered and left within one millisecond is outside), so the newest
/// event is the same whatever order they arrive in.
fn rank(ts_ms: i64, dir: Dir) -> (i64, u8) {
    (ts_ms, u8::from(dir == Dir::Exit))
}

/// The presence set and its totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Presence {
    pub vehicles: BTreeMap<PresenceKey, PresenceRecordV1>,
    pub totals: Totals,
}

impl Presence {
    /// Apply one vehicle event. Returns what it did; `self.vehicles[key]` is the record to
    /// write when it changed.
    pub fn apply(
        &mut self,
        key: PresenceKey,
        dir: Dir,
        ts_ms: i64,
        device: &str,
        masked: &str,
    ) -> Step {
        let rec = |unmatched| PresenceRecordV1 {
            ts_ms,
            dir,
            device: device.to_string(),
            masked: masked.to_string(),
            unmatched,
        };
        match (self.vehicles.get_mut(&key), dir) {
            (None, Dir::Entry) => {
                self.vehicles.insert(key, rec(false));
                Step::Entered
            }
            (None, Dir::Exit) => {
                self.vehicles.insert(key, rec(true));
                self.totals.unmatched_exits += 1;
                // A vehicle the last stocktake counted and the set never saw come in: it
                // leaves the stocktake's share.
                if self.totals.adjust > 0 {
                    self.totals.adjust -= 1;
                }
                Step::Unmatched
            }
            (Some(r), _) if rank(ts_ms, dir) <= rank(r.ts_ms, r.dir) => {
                // Older than the newest event: an entry before an unmatched exit matches it.
                if dir == Dir::Entry && r.dir == Dir::Exit && r.unmatched {
                    r.unmatched = false;
                    self.totals.unmatched_exits -= 1;
                    return Step::Matched;
                }
                Step::Stale
            }
            (Some(r), Dir::Entry) => {
                let was_inside = r.dir == Dir::Entry;
                *r = rec(false);
                if was_inside {
                    Step::Refreshed
                } else {
                    Step::Entered
                }
            }
            (Some(r), Dir::Exit) => {
                if r.dir == Dir::Entry {
                    *r = rec(false);
                    Step::Left
                } else {
                    // Out already (a second exit read): nothing new.
                    Step::Stale
                }
            }
        }
    }

    /// Vehicles inside by the set (without the stocktake's adjustment).
    pub fn in_set(&self) -> u64 {
        self.vehicles
            .values()
            .filter(|r| r.dir == Dir::Entry)
            .count() as u64
    }

    /// Vehicles inside: the set plus the stocktake's adjustment, never below zero.
    pub fn inside(&self) -> u64 {
        (self.in_set() as i64 + self.totals.adjust).max(0) as u64
    }

    /// Drop stays older than `max_stay_ms` (missed exits, counted) and forget exits older than
    /// `forget_ms`. Returns the keys whose record changed or went (to write or delete).
    pub fn expire(&mut self, now_ms: i64, max_stay_ms: i64, forget_ms: i64) -> Vec<PresenceKey> {
        let mut touched = Vec::new();
        let mut missed = 0;
        self.vehicles.retain(|k, r| {
            let gone = match r.dir {
                Dir::Entry => {
                    let g = now_ms - r.ts_ms > max_stay_ms;
                    missed += u64::from(g);
                    g
                }
                Dir::Exit => now_ms - r.ts_ms > forget_ms,
            };
            if gone {
                touched.push(*k);
            }
            !gone
        });
        self.totals.missed_exits += missed;
        touched
    }

    /// Record a stocktake: `counted` vehicles inside at `now_ms`.
    pub fn stocktake(&mut self, counted: u64, now_ms: i64) {
        self.totals.adjust = counted as i64 - self.in_set() as i64;
        self.totals.stocktake = Some((counted, now_ms));
    }

    /// Stays at least `long_ms` old at `now_ms`, oldest first.
    pub fn long_stays(&self, now_ms: i64, long_ms: i64) -> Vec<&PresenceRecordV1> {
        let mut v: Vec<&PresenceRecordV1> = self
            .vehicles
            .values()
            .filter(|r| r.dir == Dir::Entry && now_ms - r.ts_ms >= long_ms)
            .collect();
        v.sort_by_key(|r| r.ts_ms);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(n: u8) -> PresenceKey {
        [n; 16]
    }

    #[test]
    fn plates_are_masked_to_two_and_two() {
        assert_eq!(mask_plate("浙A12345"), "浙A***45");
        assert_eq!(mask_plate("浙AD12345"), "浙A***45");
        assert_eq!(mask_plate("AB12"), "****");
        assert_eq!(mask_plate(""), "");
    }

    #[test]
    fn entries_and_exits_by_event_time() {
        let mut p = Presence::default();
        assert_eq!(p.apply(k(1), Dir::Entry, 100, "g1", "m"), Step::Entered);
        assert_eq!(p.apply(k(1), Dir::Entry, 100, "g1", "m"), Step::Stale);
        assert_eq!(p.apply(k(1), Dir::Entry, 200, "g2", "m"), Step::Refreshed);
        assert_eq!(p.vehicles[&k(1)].device, "g2");
        assert_eq!(p.inside(), 1);
        assert_eq!(p.apply(k(1), Dir::Exit, 300, "g1", "m"), Step::Left);
        assert_eq!(p.apply(k(1), Dir::Exit, 310, "g1", "m"), Step::Stale);
        assert_eq!(p.inside(), 0);
        // An exit with no entry: counted; its entry arriving late matches it.
        assert_eq!(p.apply(k(2), Dir::Exit, 500, "g1", "m"), Step::Unmatched);
        assert_eq!(p.totals.unmatched_exits, 1);
        assert_eq!(p.apply(k(2), Dir::Entry, 400, "g1", "m"), Step::Matched);
        assert_eq!(p.totals.unmatched_exits, 0);
        assert_eq!(p.inside(), 0);
        // Past max_stay: a missed exit.
        p.apply(k(3), Dir::Entry, 1_000, "g1", "m");
        let gone = p.expire(10_000, 5_000, 100_000);
        assert_eq!(gone, vec![k(3)]);
        assert_eq!(p.totals.missed_exits, 1);
        // A stocktake adjusts; stays keep ending at their exits.
        p.apply(k(4), Dir::Entry, 20_000, "g1", "m");
        p.stocktake(10, 20_001);
        assert_eq!(p.inside(), 10);
        p.apply(k(4), Dir::Exit, 20_002, "g1", "m");
        assert_eq!(p.inside(), 9);
        // A vehicle only the stocktake counted leaves: its exit is unmatched, and it is gone.
        p.apply(k(5), Dir::Exit, 20_003, "g1", "m");
        assert_eq!(p.inside(), 8);
    }

    #[derive(Debug, Clone)]
    struct Ev {
        key: u8,
        dir: Dir,
        ts: i64,
    }

    fn events() -> impl Strategy<Value = Vec<Ev>> {
        prop::collection::vec(
            (0u8..6, any::<bool>(), 0i64..50).prop_map(|(key, entry, ts)| Ev {
                key,
                dir: if entry { Dir::Entry } else { Dir::Exit },
                ts,
            }),
            0..40,
        )
    }

    /// The model: per vehicle, its newest event by time, an exit after an entry at the same
    /// millisecond.
    fn model(evs: &[Ev]) -> BTreeMap<u8, Dir> {
        let mut last: BTreeMap<u8, (i64, u8)> = BTreeMap::new();
        for e in evs {
            let rank = (e.ts, u8::from(e.dir == Dir::Exit));
            let cur = last.entry(e.key).or_insert(rank);
            if rank > *cur {
                *cur = rank;
            }
        }
        last.into_iter()
            .map(|(k, (_, r))| (k, if r == 1 { Dir::Exit } else { Dir::Entry }))
            .collect()
    }

    proptest! {
        /// Inside is the model's (each vehicle's newest event) in any arrival order, and
        /// delivered twice changes nothing.
        #[test]
        fn inside_is_each_vehicles_newest_event_in_any_order(evs in events(), seed in any::<u64>()) {
            let mut shuffled = evs.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            let mut p = Presence::default();
            for e in shuffled.iter().chain(shuffled.iter()) {
                p.apply(k(e.key), e.dir, e.ts, "g", "m");
            }
            let want: BTreeMap<u8, Dir> = model(&evs);
            let got: BTreeMap<u8, Dir> = p.vehicles.iter().map(|(k, r)| (k[0], r.dir)).collect();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(p.inside(), want.values().filter(|d| **d == Dir::Entry).count() as u64);
        }

        /// In time order, an exit is unmatched exactly when the vehicle was not inside.
        #[test]
        fn unmatched_exits_in_time_order_are_exits_of_vehicles_not_inside(mut evs in events()) {
            evs.sort_by_key(|e| (e.ts, u8::from(e.dir == Dir::Exit)));
            let mut p = Presence::default();
            let mut inside: BTreeMap<u8, bool> = BTreeMap::new();
            let mut seen: BTreeMap<u8, bool> = BTreeMap::new();
            let mut unmatched = 0;
            let mut last: BTreeMap<u8, (i64, Dir)> = BTreeMap::new();
            for e in &evs {
                let same = last.get(&e.key) == Some(&(e.ts, e.dir));
                last.insert(e.key, (e.ts, e.dir));
                p.apply(k(e.key), e.dir, e.ts, "g", "m");
                if same { continue; }
                match e.dir {
                    Dir::Entry => { inside.insert(e.key, true); }
                    Dir::Exit => {
                        if !seen.get(&e.key).copied().unwrap_or(false) { unmatched += 1; }
                        inside.insert(e.key, false);
                    }
                }
                seen.insert(e.key, true);
            }
            prop_assert_eq!(p.totals.unmatched_exits, unmatched);
        }
    }
}
