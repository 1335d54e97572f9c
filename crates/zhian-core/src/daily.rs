//! Daily distinct counts (contract: the `daily` topic): per local day of the site (event time,
//! `status.timezone`), how many distinct access subjects (cards, faces) and distinct vehicle
//! plates passed, counted from the day's keyed pseudonyms, and the day's totals. Pure: the
//! caller passes `now`, persists what changed, and builds the counts from its windows.
//!
//! The sets are exact: a compound of 5,000 residents and 3,000 vehicles holds at most 8,000
//! 16-byte pseudonyms a day (about 0.4 MiB in memory with the hash set's overhead), for at most
//! the days still open to late events (today, and yesterday while `max_lateness` lasts).
//!
//! A key dir lost while the daemon was stopped gives the day a second pseudonym key: one person
//! who passes before and after the loss has two pseudonyms that nothing can link. So the sets
//! are kept per key generation ([`DaySets`]), and the day's figures are the largest count under
//! any one key, a lower bound that never counts anyone twice, with the number of keys the day
//! spans (`key_generations`, sent when more than one).
//!
//! A day is issued (rev 0) once the wall clock passes its end plus `aggregate.grace`; a late
//! event (within `max_lateness`) that lands in an issued day marks it dirty, and it is issued
//! again with `rev + 1` once it has been dirty for `settle_ms` (so a burst of late events makes
//! one re-issue, not one per event). A day is final (forgotten) at its end plus `max_lateness`
//! plus the grace.

use super::summary::{CountKey, Site};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

pub const DAY_MS: i64 = 86_400_000;

/// A 16-byte keyed pseudonym of a subject (`zhian_gateway::keys::SubjectKeys::pseudonym`).
pub type Pseudonym = [u8; 16];

/// A pseudonym key's generation under its name: 0 for the first key of the name, 1 for the key
/// made after the first was lost, and so on (the store keeps which key is which generation).
pub type KeyGen = u8;

/// Key generations one day's sets may span. A pseudonym of a later generation is not kept (the
/// day's figures are then a floor): a key dir lost 64 times in a day is no box anyone runs.
pub const MAX_KEY_GENERATIONS: KeyGen = 64;

/// The distinct pseudonyms of one day under one key generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenSets {
    pub access: HashSet<Pseudonym>,
    pub vehicles: HashSet<Pseudonym>,
}

impl GenSets {
    fn set(&self, vehicle: bool) -> &HashSet<Pseudonym> {
        if vehicle {
            &self.vehicles
        } else {
            &self.access
        }
    }
}

/// A day's distinct pseudonyms, by key generation. Pseudonyms of two generations cannot be
/// compared (the keys differ), so each generation has its own sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaySets {
    gens: BTreeMap<KeyGen, GenSets>,
}

impl DaySets {
    /// Whether `p` is already counted under generation `gen` in its class.
    pub fn contains(&self, gen: KeyGen, vehicle: bool, p: &Pseudonym) -> bool {
        self.gens
            .get(&gen)
            .is_some_and(|g| g.set(vehicle).contains(p))
    }

    /// Count `p` under generation `gen`; false when it already was.
    pub fn insert(&mut self, gen: KeyGen, vehicle: bool, p: Pseudonym) -> bool {
        let g = self.gens.entry(gen).or_default();
        if vehicle {
            g.vehicles.insert(p)
        } else {
            g.access.insert(p)
        }
    }

    /// How many pseudonyms of a class generation `gen` holds.
    pub fn len(&self, gen: KeyGen, vehicle: bool) -> usize {
        self.gens.get(&gen).map_or(0, |g| g.set(vehicle).len())
    }

    /// Whether no pseudonym is held.
    pub fn is_empty(&self) -> bool {
        self.gens
            .values()
            .all(|g| g.access.is_empty() && g.vehicles.is_empty())
    }

    /// (generation, access count, vehicle count) of every generation held.
    pub fn per_gen(&self) -> impl Iterator<Item = (KeyGen, usize, usize)> + '_ {
        self.gens
            .iter()
            .map(|(g, s)| (*g, s.access.len(), s.vehicles.len()))
    }

    /// The day's figures: see [`DayDistinct::of`].
    pub fn distinct(&self) -> DayDistinct {
        DayDistinct::of(self.per_gen().map(|(_, a, v)| (a, v)))
    }
}

/// A day's distinct figures as sent upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DayDistinct {
    /// The largest number of distinct access subjects under one key generation.
    pub access_subjects: usize,
    /// The largest number of distinct vehicles under one key generation.
    pub vehicles: usize,
    /// Key generations holding at least one pseudonym (0 for a day without any).
    pub key_generations: usize,
}

impl DayDistinct {
    /// The figures from per-generation counts (access, vehicles): each the largest under one
    /// key, so a person counted under two keys (before and after a lost key dir) is counted
    /// once, and someone seen only before the loss may be missing: a lower bound, never a
    /// double count. With one generation they are exact.
    pub fn of(per_gen: impl IntoIterator<Item = (usize, usize)>) -> DayDistinct {
        let mut d = DayDistinct::default();
        for (a, v) in per_gen {
            if a + v == 0 {
                continue;
            }
            d.access_subjects = d.access_subjects.max(a);
            d.vehicles = d.vehicles.max(v);
            d.key_generations += 1;
        }
        d
    }
}

/// What is kept of one day between commits (and, as [`DayRecordV1`], in the store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DayMem {
    /// The last rev issued, `None` until the day is first issued.
    pub issued: Option<u32>,
    /// Since when late events changed the issued day (`None`: nothing to re-issue).
    pub dirty_since: Option<i64>,
    /// The day's distinct pseudonyms, by key generation.
    pub sets: DaySets,
}

/// A day's state as stored: record version 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayRecordV1 {
    pub issued: Option<u32>,
    pub dirty_since: Option<i64>,
}

/// The rules for days: the site's offset and the aggregate timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayCfg {
    pub offset_ms: i64,
    pub grace_ms: i64,
    pub lateness_ms: i64,
    /// A dirty day is re-issued once it has been dirty this long (the window length).
    pub settle_ms: i64,
}

impl DayMem {
    pub fn record(&self) -> DayRecordV1 {
        DayRecordV1 {
            issued: self.issued,
            dirty_since: self.dirty_since,
        }
    }
}

impl Default for DayCfg {
    fn default() -> Self {
        DayCfg {
            offset_ms: 8 * 3_600_000,
            grace_ms: 10_000,
            lateness_ms: DAY_MS,
            settle_ms: 60_000,
        }
    }
}

impl DayCfg {
    /// The local day (days since 1970-01-01 in the site's zone) of a time.
    pub fn day_of(&self, ts_ms: i64) -> i64 {
        (ts_ms + self.offset_ms).div_euclid(DAY_MS)
    }

    /// The UTC instants a local day starts and ends (end exclusive).
    pub fn bounds(&self, day: i64) -> (i64, i64) {
        let start = day * DAY_MS - self.offset_ms;
        (start, start + DAY_MS)
    }

    /// Whether a late event can still change `day` at `now_ms`.
    pub fn open_to_late(&self, day: i64, now_ms: i64) -> bool {
        now_ms < self.bounds(day).1 + self.lateness_ms
    }

    /// The days to issue at `now_ms`, with the rev each gets: days never issued whose end
    /// plus the grace has passed, and dirty days settled.
    pub fn due(
        &self,
        days: impl IntoIterator<Item = (i64, DayRecordV1)>,
        now_ms: i64,
    ) -> Vec<(i64, u32)> {
        days.into_iter()
            .filter_map(|(d, m)| match (m.issued, m.dirty_since) {
                (None, _) if now_ms >= self.bounds(d).1 + self.grace_ms => Some((d, 0)),
                (Some(rev), Some(since)) if now_ms - since >= self.settle_ms => Some((d, rev + 1)),
                _ => None,
            })
            .collect()
    }

    /// Days issued, clean and closed to late events: nothing can change them any more.
    pub fn finished(
        &self,
        days: impl IntoIterator<Item = (i64, DayRecordV1)>,
        now_ms: i64,
    ) -> Vec<i64> {
        days.into_iter()
            .filter(|(d, m)| {
                m.issued.is_some()
                    && m.dirty_since.is_none()
                    && now_ms >= self.bounds(*d).1 + self.lateness_ms + self.grace_ms
            })
            .map(|(d, _)| d)
            .collect()
    }
}

/// `2026-11-30` for a local day number.
pub fn date_label(day: i64) -> String {
    let epoch = time::Date::from_calendar_date(1970, time::Month::January, 1).expect("epoch");
    match epoch.checked_add(time::Duration::days(day)) {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day()),
        None => format!("day{day}"),
    }
}

/// `+08:00` for an offset in ms.
pub fn tz_label(offset_ms: i64) -> String {
    let s = offset_ms / 1000;
    let sign = if s < 0 { '-' } else { '+' };
    let s = s.abs();
    format!("{sign}{:02}:{:02}", s / 3600, (s % 3600) / 60)
}

/// The `zhian.daily.v1` payload: `distinct` is `None` where subjects are not kept at all
/// (`privacy.subjects = "drop"`), sent as `null`; `distinct.key_generations` only when the day
/// spans more than one key. `counts` rows sorted as in summaries.
#[allow(clippy::too_many_arguments)]
pub fn daily_json(
    gateway: &str,
    site: &Site,
    cfg: &DayCfg,
    day: i64,
    rev: u32,
    distinct: Option<DayDistinct>,
    counts: &BTreeMap<CountKey, u64>,
) -> Vec<u8> {
    use zhian_proto::Message;
    zhian_proto::Daily {
        schema: zhian_proto::DailyV1,
        gateway: gateway.to_string(),
        site: site.clone(),
        date: date_label(day),
        tz: tz_label(cfg.offset_ms),
        rev,
        distinct: zhian_proto::Distinct {
            access_subjects: distinct.map(|d| d.access_subjects as u64),
            vehicles: distinct.map(|d| d.vehicles as u64),
            key_generations: distinct
                .filter(|d| d.key_generations > 1)
                .map(|d| d.key_generations as u32),
        },
        counts: counts
            .iter()
            .map(|(k, n)| zhian_proto::Count {
                kind: k.kind.as_str().to_string(),
                device: k.device.clone(),
                action: k.action.clone(),
                result: k.result.clone(),
                n: *n,
            })
            .collect(),
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn days_are_local_and_issue_after_grace_then_reissue_when_late_events_settle() {
        let c = DayCfg::default();
        // 2026-11-30T00:00+08:00
        let midnight = time::macros::datetime!(2026-11-30 00:00 +8).unix_timestamp() * 1000;
        let d = c.day_of(midnight);
        assert_eq!(date_label(d), "2026-11-30");
        assert_eq!(c.day_of(midnight - 1), d - 1);
        assert_eq!(c.bounds(d), (midnight, midnight + DAY_MS));
        assert_eq!(tz_label(c.offset_ms), "+08:00");
        assert_eq!(tz_label(-(3 * 3600 + 1800) * 1000), "-03:30");
        let mut days: BTreeMap<i64, DayMem> = BTreeMap::new();
        days.insert(d, DayMem::default());
        let st = |days: &BTreeMap<i64, DayMem>| -> Vec<(i64, DayRecordV1)> {
            days.iter().map(|(d, m)| (*d, m.record())).collect()
        };
        let end = midnight + DAY_MS;
        assert!(c.due(st(&days), end + c.grace_ms - 1).is_empty());
        assert_eq!(c.due(st(&days), end + c.grace_ms), vec![(d, 0)]);
        days.get_mut(&d).unwrap().issued = Some(0);
        assert!(c.due(st(&days), end + 60_000).is_empty());
        days.get_mut(&d).unwrap().dirty_since = Some(end + 60_000);
        assert!(c.due(st(&days), end + 60_000 + c.settle_ms - 1).is_empty());
        assert_eq!(c.due(st(&days), end + 60_000 + c.settle_ms), vec![(d, 1)]);
        assert!(
            c.finished(st(&days), end + DAY_MS + c.grace_ms).is_empty(),
            "still dirty"
        );
        days.get_mut(&d).unwrap().dirty_since = None;
        assert!(c.open_to_late(d, end + DAY_MS - 1));
        assert!(!c.open_to_late(d, end + DAY_MS));
        assert_eq!(c.finished(st(&days), end + DAY_MS + c.grace_ms), vec![d]);
    }

    #[test]
    fn three_people_before_and_after_a_lost_key_are_three_under_two_keys() {
        let mut s = DaySets::default();
        // Before the loss: key generation 0; after: generation 1, new pseudonyms for the same
        // three people (a different key).
        for person in 0u8..3 {
            assert!(s.insert(0, false, [person; 16]));
            assert!(
                !s.insert(0, false, [person; 16]),
                "a second pass is no one new"
            );
            assert!(s.insert(1, false, [person + 100; 16]));
        }
        s.insert(1, true, [7; 16]);
        let d = s.distinct();
        assert_eq!(
            d,
            DayDistinct {
                access_subjects: 3,
                vehicles: 1,
                key_generations: 2
            }
        );
        let c = DayCfg::default();
        let json: serde_json::Value = serde_json::from_slice(&daily_json(
            "gw",
            &Site::default(),
            &c,
            20_000,
            0,
            Some(d),
            &BTreeMap::new(),
        ))
        .unwrap();
        assert_eq!(json["distinct"]["access_subjects"], 3);
        assert_eq!(json["distinct"]["key_generations"], 2);
        // One key: exact, and the field is left out.
        let mut one = DaySets::default();
        one.insert(0, false, [1; 16]);
        let json: serde_json::Value = serde_json::from_slice(&daily_json(
            "gw",
            &Site::default(),
            &c,
            20_000,
            0,
            Some(one.distinct()),
            &BTreeMap::new(),
        ))
        .unwrap();
        assert_eq!(json["distinct"]["access_subjects"], 1);
        assert!(json["distinct"].get("key_generations").is_none(), "{json}");
        assert_eq!(DaySets::default().distinct(), DayDistinct::default());
    }

    proptest! {
        /// Against a model of people passing doors while the day's key is lost now and then:
        /// the figure never exceeds the people who passed (no one counted twice), is the
        /// largest number seen under one key, is exact under one key, and the generations are
        /// those that saw someone.
        #[test]
        fn per_generation_counts_never_double_count(
            passes in proptest::collection::vec((0u8..40, any::<bool>(), any::<bool>()), 0..200),
            losses in proptest::collection::btree_set(0usize..200, 0..4),
        ) {
            // A person's pseudonym under generation g: distinct per (person, g), as keyed
            // hashes under different keys are.
            let pseudonym = |person: u8, g: KeyGen| {
                let mut p = [0u8; 16];
                p[0] = person;
                p[1] = g;
                p[2] = 0xA5;
                p
            };
            let mut sets = DaySets::default();
            let mut gen: KeyGen = 0;
            let mut people: [std::collections::BTreeSet<u8>; 2] = Default::default();
            let mut by_gen: BTreeMap<KeyGen, [std::collections::BTreeSet<u8>; 2]> = BTreeMap::new();
            for (i, (person, vehicle, twice)) in passes.iter().copied().enumerate() {
                if losses.contains(&i) {
                    gen += 1;
                }
                sets.insert(gen, vehicle, pseudonym(person, gen));
                if twice {
                    prop_assert!(!sets.insert(gen, vehicle, pseudonym(person, gen)));
                }
                people[vehicle as usize].insert(person);
                by_gen.entry(gen).or_default()[vehicle as usize].insert(person);
            }
            let d = sets.distinct();
            prop_assert!(d.access_subjects <= people[0].len());
            prop_assert!(d.vehicles <= people[1].len());
            let max_of = |v: usize| by_gen.values().map(|g| g[v].len()).max().unwrap_or(0);
            prop_assert_eq!(d.access_subjects, max_of(0));
            prop_assert_eq!(d.vehicles, max_of(1));
            prop_assert_eq!(d.key_generations, by_gen.len());
            if by_gen.len() <= 1 {
                prop_assert_eq!((d.access_subjects, d.vehicles), (people[0].len(), people[1].len()));
            }
            prop_assert_eq!(sets.is_empty(), passes.is_empty());
        }

        /// Every instant falls in exactly one local day, whose bounds contain it.
        #[test]
        fn bounds_contain_their_instants(ts in 0i64..4_000_000_000_000, off_h in -12i64..=14) {
            let c = DayCfg { offset_ms: off_h * 3_600_000, ..DayCfg::default() };
            let d = c.day_of(ts);
            let (s, e) = c.bounds(d);
            prop_assert!(s <= ts && ts < e);
        }
    }
}
