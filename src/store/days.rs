//! Daily distinct counts on disk ([`crate::core::daily`] is the logic): the writer stages what
//! a batch changes in a [`DayChanges`], writes it in the batch's transaction, and only after
//! the commit applies it to its memory.
//!
//! Tables (see the store module's layout):
//! - `days`: `i64` local day → v1 [`DayRecordV1`] (last rev issued, dirty since): written when a
//!   day is first touched, issued, or changed by a late event after issue; deleted when final.
//! - `day_subjects`: `(i64 day, u64 seq)` → the day's new distinct pseudonyms of one batch,
//!   packed as 17-byte records (1 byte: the key generation shifted left by one, or'd with 1 for
//!   a vehicle, 0 for an access subject; 16 bytes pseudonym). Rows written before key
//!   generations (bytes 0 and 1) are generation 0. Appended (sequential keys batch well on
//!   flash); all of a day's rows go when the day is final.

use super::records::{decode, encode};
use super::StoreError;
use crate::core::daily::{
    DayCfg, DayDistinct, DayMem, DayRecordV1, KeyGen, Pseudonym, MAX_KEY_GENERATIONS,
};
use crate::core::engine::{Input, Outcome};
use redb::{ReadableTable, TableDefinition};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) const DAYS: TableDefinition<i64, &[u8]> = TableDefinition::new("days");

/// Distinct pseudonyms kept per day and class at most (a compound of 5,000 residents and 3,000
/// vehicles stays far below it): a device inventing a subject per event must not grow the store
/// or the memory without bound (found by the bounded-store test: 300,000 distinct faces took the
/// data dir past `store.max_size`). Past it the day's figure is a floor.
pub const MAX_DISTINCT_PER_DAY: usize = 20_000;
pub(crate) const DAY_SUBJECTS: TableDefinition<(i64, u64), &[u8]> =
    TableDefinition::new("day_subjects");

/// What a batch changes about days; applied to memory after the commit.
#[derive(Debug, Default)]
pub(crate) struct DayChanges {
    /// New distinct pseudonyms: (day, key generation, vehicle, pseudonym).
    pub add: Vec<(i64, KeyGen, bool, Pseudonym)>,
    /// A day's new state; `None`: the day is final and forgotten.
    pub state: BTreeMap<i64, Option<DayRecordV1>>,
}

impl DayChanges {
    fn current(&self, mem: &BTreeMap<i64, DayMem>, day: i64) -> Option<DayRecordV1> {
        match self.state.get(&day) {
            Some(s) => *s,
            None => mem.get(&day).map(DayMem::record),
        }
    }

    fn has(
        &self,
        mem: &BTreeMap<i64, DayMem>,
        day: i64,
        gen: KeyGen,
        vehicle: bool,
        p: &Pseudonym,
    ) -> bool {
        let in_mem = mem
            .get(&day)
            .is_some_and(|m| m.sets.contains(gen, vehicle, p));
        in_mem
            || self
                .add
                .iter()
                .any(|(d, g, v, q)| *d == day && *g == gen && *v == vehicle && q == p)
    }

    /// How many pseudonyms of a class generation `gen` of `day` holds after this batch.
    fn len(&self, mem: &BTreeMap<i64, DayMem>, day: i64, gen: KeyGen, vehicle: bool) -> usize {
        mem.get(&day).map_or(0, |m| m.sets.len(gen, vehicle))
            + self
                .add
                .iter()
                .filter(|(d, g, v, _)| *d == day && *g == gen && *v == vehicle)
                .count()
    }

    /// Every day's state as it will be after this batch.
    pub fn states(&self, mem: &BTreeMap<i64, DayMem>) -> Vec<(i64, DayRecordV1)> {
        let days: BTreeSet<i64> = mem.keys().chain(self.state.keys()).copied().collect();
        days.into_iter()
            .filter_map(|d| self.current(mem, d).map(|s| (d, s)))
            .collect()
    }

    /// The distinct figures of `day` after this batch (per key generation, see
    /// [`DayDistinct::of`]).
    pub fn distinct(&self, mem: &BTreeMap<i64, DayMem>, day: i64) -> DayDistinct {
        let mut per_gen: BTreeMap<KeyGen, (usize, usize)> = BTreeMap::new();
        if let Some(m) = mem.get(&day) {
            for (g, a, v) in m.sets.per_gen() {
                per_gen.insert(g, (a, v));
            }
        }
        for (d, g, veh, _) in &self.add {
            if *d == day {
                let e = per_gen.entry(*g).or_default();
                if *veh {
                    e.1 += 1
                } else {
                    e.0 += 1
                }
            }
        }
        DayDistinct::of(per_gen.into_values())
    }
}

/// Note what a batch's outcomes change: the days its counted events and counter steps fall in
/// are tracked (a new day) or, when already issued and still open to late events, dirty; and
/// `subjects` (the accepted events' pseudonyms, by day and key generation) adds the ones new to
/// their day and generation.
// One call per batch, from the writer, with what the batch holds: a struct would only move
// these names one level down.
#[allow(clippy::too_many_arguments)]
pub(crate) fn note_batch(
    mem: &BTreeMap<i64, DayMem>,
    cfg: &DayCfg,
    inputs: &[Input],
    outcomes: &[Outcome],
    subjects: Vec<(i64, KeyGen, bool, Pseudonym)>,
    now_ms: i64,
    room: bool,
    ch: &mut DayChanges,
) {
    let mut touched = BTreeSet::new();
    for (input, outcome) in inputs.iter().zip(outcomes) {
        match (input, outcome) {
            (Input::Event(e), Outcome::Accepted) => {
                touched.insert(cfg.day_of(e.ts_ms));
            }
            (Input::Counter(r), Outcome::Counted(s) | Outcome::Glitch(s)) if s.events() > 0 => {
                touched.insert(cfg.day_of(r.ts_ms));
            }
            _ => {}
        }
    }
    for d in touched {
        match ch.current(mem, d) {
            None => {
                ch.state.insert(d, Some(DayRecordV1::default()));
            }
            // Dirty already: the settle time starts again, so a burst of late events re-issues
            // the day once, after it.
            Some(s) if s.issued.is_some() && s.dirty_since.is_some() => {
                ch.state.insert(
                    d,
                    Some(DayRecordV1 {
                        dirty_since: Some(now_ms),
                        ..s
                    }),
                );
            }
            Some(s) if s.issued.is_some() && s.dirty_since.is_none() => {
                if cfg.open_to_late(d, now_ms) {
                    ch.state.insert(
                        d,
                        Some(DayRecordV1 {
                            dirty_since: Some(now_ms),
                            ..s
                        }),
                    );
                }
            }
            Some(_) => {}
        }
    }
    // Under disk pressure no new pseudonym is kept (derived figures yield to events).
    if !room {
        return;
    }
    for (d, gen, vehicle, p) in subjects {
        if gen >= MAX_KEY_GENERATIONS
            || ch.current(mem, d).is_none()
            || ch.has(mem, d, gen, vehicle, &p)
        {
            continue;
        }
        if ch.len(mem, d, gen, vehicle) >= MAX_DISTINCT_PER_DAY {
            continue;
        }
        ch.add.push((d, gen, vehicle, p));
    }
}

/// Write the staged changes in the batch's transaction; `seq` hands out row sequence numbers.
/// Returns the change in row bytes.
pub(crate) fn write(
    txn: &redb::WriteTransaction,
    ch: &DayChanges,
    mut seq: impl FnMut() -> u64,
) -> Result<i64, StoreError> {
    let mut bytes = 0i64;
    if !ch.state.is_empty() {
        let mut days = txn.open_table(DAYS)?;
        let mut subjects = txn.open_table(DAY_SUBJECTS)?;
        for (d, st) in &ch.state {
            match st {
                Some(st) => {
                    let rec = encode(st);
                    let old = days.insert(*d, rec.as_slice())?.map(|o| o.value().len());
                    bytes += rec.len() as i64 - old.map_or(-8, |n| n as i64);
                }
                None => {
                    if let Some(old) = days.remove(*d)? {
                        bytes -= 8 + old.value().len() as i64;
                    }
                    let doomed: Vec<((i64, u64), usize)> = subjects
                        .range((*d, 0)..(*d + 1, 0))?
                        .map(|r| r.map(|(k, v)| (k.value(), v.value().len())))
                        .collect::<Result<_, _>>()?;
                    for (k, len) in doomed {
                        subjects.remove(k)?;
                        bytes -= 16 + len as i64;
                    }
                }
            }
        }
    }
    if !ch.add.is_empty() {
        let mut subjects = txn.open_table(DAY_SUBJECTS)?;
        let mut by_day: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
        for (d, gen, vehicle, p) in &ch.add {
            let row = by_day.entry(*d).or_default();
            row.push(gen << 1 | *vehicle as u8);
            row.extend_from_slice(p);
        }
        for (d, row) in by_day {
            subjects.insert((d, seq()), row.as_slice())?;
            bytes += 16 + row.len() as i64;
        }
    }
    Ok(bytes)
}

/// After the commit: memory follows the staged changes.
pub(crate) fn apply(mem: &mut BTreeMap<i64, DayMem>, ch: DayChanges) {
    for (d, st) in ch.state {
        match st {
            Some(st) => {
                let m = mem.entry(d).or_default();
                m.issued = st.issued;
                m.dirty_since = st.dirty_since;
            }
            None => {
                mem.remove(&d);
            }
        }
    }
    for (d, gen, vehicle, p) in ch.add {
        if let Some(m) = mem.get_mut(&d) {
            m.sets.insert(gen, vehicle, p);
        }
    }
}

/// The days and their distinct sets, as the store has them; with their row bytes and the
/// highest row sequence number.
pub(crate) fn load(
    txn: &redb::ReadTransaction,
) -> Result<(BTreeMap<i64, DayMem>, u64, u64), StoreError> {
    let mut mem: BTreeMap<i64, DayMem> = BTreeMap::new();
    let mut bytes = 0u64;
    let mut max_seq = 0u64;
    for row in txn.open_table(DAYS)?.iter()? {
        let (k, v) = row?;
        bytes += 8 + v.value().len() as u64;
        let st: DayRecordV1 = decode("days", v.value())?;
        let m = mem.entry(k.value()).or_default();
        m.issued = st.issued;
        m.dirty_since = st.dirty_since;
    }
    for row in txn.open_table(DAY_SUBJECTS)?.iter()? {
        let (k, v) = row?;
        let (d, seq) = k.value();
        max_seq = max_seq.max(seq);
        bytes += 16 + v.value().len() as u64;
        let Some(m) = mem.get_mut(&d) else { continue };
        for rec in v.value().chunks_exact(17) {
            let p: Pseudonym = rec[1..].try_into().expect("16 bytes");
            m.sets.insert(rec[0] >> 1, rec[0] & 1 == 1, p);
        }
    }
    Ok((mem, bytes, max_seq))
}
