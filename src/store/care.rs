//! The care watch on disk ([`crate::core::care`] is the logic). Table `care`: the resident's
//! 16-byte care pseudonym → v1 [`CareRecordV1`] (last seen, silent). Written when a watched
//! resident passes a door (at most once per batch per resident) or a notice is due; rows of
//! residents no longer listed are deleted. Notices go to the outbox with the alerts (ahead of
//! any summary backlog), in the same transaction as the state that produced them.
//!
//! `orphans` are care pseudonyms keyed with a care key the key dir lost (`key_ids`): such a
//! resident can never be matched again, so they are never judged silent (no false `silent`
//! notice); their row stays as it was until the installer relists them.

use super::records::{decode, encode};
use super::StoreError;
use crate::core::care::{check, seen, CarePseudonym, CareRecordV1, Notice, Resident};
use redb::{ReadableTable, TableDefinition};
use std::collections::{BTreeMap, HashMap};

pub(crate) const CARE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("care");

/// What a batch changes about the watch; applied to memory after the commit.
#[derive(Debug, Default)]
pub(crate) struct CareChanges {
    /// A resident's new state; `None`: no longer watched, row deleted.
    pub state: BTreeMap<CarePseudonym, Option<CareRecordV1>>,
    pub notices: Vec<Notice>,
}

impl CareChanges {
    fn current(
        &self,
        mem: &HashMap<CarePseudonym, CareRecordV1>,
        p: &CarePseudonym,
        now_ms: i64,
    ) -> CareRecordV1 {
        match self.state.get(p) {
            Some(Some(s)) => *s,
            _ => mem
                .get(p)
                .copied()
                .unwrap_or_else(|| CareRecordV1::start(now_ms)),
        }
    }
}

/// Access events of watched residents in this batch: (care pseudonym, event time).
pub(crate) fn note_hits(
    list: &[Resident],
    orphans: &[CarePseudonym],
    mem: &HashMap<CarePseudonym, CareRecordV1>,
    hits: &[(CarePseudonym, i64)],
    _now_ms: i64,
    ch: &mut CareChanges,
) {
    for (p, ts) in hits {
        let Some(r) = list.iter().find(|r| r.pseudonym == *p) else {
            continue;
        };
        if orphans.contains(p) {
            continue;
        }
        // A resident whose watch has not started yet (just listed, checks held): this pass
        // starts it.
        let mut st = ch.current(mem, p, ts.saturating_sub(1));
        if let Some(n) = seen(r, &mut st, *ts) {
            ch.notices.push(n);
        }
        ch.state.insert(*p, Some(st));
    }
}

/// The silence check at `now_ms` (not while `hold`, never for `orphans`); new residents start
/// their watch (held or not: the watch starts when a resident is listed), gone ones are
/// dropped.
pub(crate) fn check_all(
    list: &[Resident],
    orphans: &[CarePseudonym],
    mem: &HashMap<CarePseudonym, CareRecordV1>,
    now_ms: i64,
    offset_ms: i64,
    hold: bool,
    ch: &mut CareChanges,
) {
    for r in list {
        let known = mem.contains_key(&r.pseudonym) || ch.state.contains_key(&r.pseudonym);
        let mut st = ch.current(mem, &r.pseudonym, now_ms);
        let before = st;
        if !hold && !orphans.contains(&r.pseudonym) {
            if let Some(n) = check(r, &mut st, now_ms, offset_ms) {
                ch.notices.push(n);
            }
        }
        if !known || st != before {
            ch.state.insert(r.pseudonym, Some(st));
        }
    }
    for p in mem.keys() {
        if !list.iter().any(|r| r.pseudonym == *p) {
            ch.state.insert(*p, None);
        }
    }
}

/// Whether [`check_all`] would change anything at `now_ms` (reads only: an idle box writes
/// nothing).
pub(crate) fn due(
    list: &[Resident],
    orphans: &[CarePseudonym],
    mem: &HashMap<CarePseudonym, CareRecordV1>,
    now_ms: i64,
    offset_ms: i64,
    hold: bool,
) -> bool {
    list.iter().any(|r| match mem.get(&r.pseudonym) {
        None => true,
        Some(st) => {
            !hold
                && !orphans.contains(&r.pseudonym)
                && check(r, &mut st.clone(), now_ms, offset_ms).is_some()
        }
    }) || mem.keys().any(|p| !list.iter().any(|r| r.pseudonym == *p))
        || orphans
            .iter()
            .any(|p| !list.iter().any(|r| r.pseudonym == *p))
}

/// Write the staged states. Returns the change in row bytes.
pub(crate) fn write(txn: &redb::WriteTransaction, ch: &CareChanges) -> Result<i64, StoreError> {
    if ch.state.is_empty() {
        return Ok(0);
    }
    let mut t = txn.open_table(CARE)?;
    let mut bytes = 0i64;
    for (p, st) in &ch.state {
        match st {
            Some(st) => {
                let rec = encode(st);
                let old = t
                    .insert(p.as_slice(), rec.as_slice())?
                    .map(|o| o.value().len());
                bytes += rec.len() as i64 - old.map_or(-16, |n| n as i64);
            }
            None => {
                if let Some(old) = t.remove(p.as_slice())? {
                    bytes -= 16 + old.value().len() as i64;
                }
            }
        }
    }
    Ok(bytes)
}

/// After the commit: memory follows.
pub(crate) fn apply(mem: &mut HashMap<CarePseudonym, CareRecordV1>, ch: CareChanges) {
    for (p, st) in ch.state {
        match st {
            Some(st) => {
                mem.insert(p, st);
            }
            None => {
                mem.remove(&p);
            }
        }
    }
}

/// The states as stored, and their row bytes.
pub(crate) fn load(
    txn: &redb::ReadTransaction,
) -> Result<(HashMap<CarePseudonym, CareRecordV1>, u64), StoreError> {
    let mut mem = HashMap::new();
    let mut bytes = 0;
    for row in txn.open_table(CARE)?.iter()? {
        let (k, v) = row?;
        let Ok(p) = <CarePseudonym>::try_from(k.value()) else {
            continue;
        };
        bytes += (k.value().len() + v.value().len()) as u64;
        mem.insert(p, decode::<CareRecordV1>("care", v.value())?);
    }
    Ok((mem, bytes))
}
