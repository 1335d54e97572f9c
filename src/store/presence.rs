//! Vehicles inside on disk ([`crate::core::occupancy`] is the logic). Table `presence`: the
//! vehicle's 16-byte presence pseudonym (its plate keyed with `presence.key` in
//! `privacy.key_dir`, never in this file) → v1 [`PresenceRecordV1`]: its newest event's time,
//! entry or exit, gate, the plate masked to its first two and last two characters, and whether
//! it is an exit counted as unmatched. `meta` `presence_totals`: v1 [`Totals`] (missed and
//! unmatched exits, the last stocktake). No plate is stored, only its masked form.
//!
//! Written in the batch's transaction for the vehicles the batch moved (so the set and the
//! counts commit together: a power cut keeps both or neither), and by maintenance for stays past
//! `occupancy.max_stay` and exits past the lateness bound.

use super::records::{decode, encode};
use super::{StoreError, META};
use crate::core::occupancy::{Dir, Presence, PresenceKey, PresenceRecordV1, Totals};
use redb::ReadableTable;

pub(crate) const PRESENCE: redb::TableDefinition<&[u8], &[u8]> =
    redb::TableDefinition::new("presence");
const TOTALS: &str = "presence_totals";

/// One vehicle event of a batch, keyed.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    pub key: PresenceKey,
    pub dir: Dir,
    pub ts_ms: i64,
    pub device: String,
    pub masked: String,
}

/// What a batch changes: the next set and the keys to write (or delete); applied to memory
/// after the commit.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    pub next: Option<Presence>,
    pub touched: Vec<PresenceKey>,
}

/// Stage, over `mem`: with `lost` (the presence key was lost) the set's orphaning first, then
/// `hits` (keyed with the key in use), then (with `expire`: now, max stay, lateness bound) the
/// expiry, and a stocktake. Nothing staged when nothing changes.
pub(crate) fn stage(
    mem: &Presence,
    lost: bool,
    hits: &[Hit],
    expire: Option<(i64, i64, i64)>,
    stocktake: Option<(u64, i64)>,
) -> Staged {
    let due = expire.is_some_and(|(now, max_stay, forget)| {
        mem.vehicles.values().any(|r| match r.dir {
            Dir::Entry => now - r.ts_ms > max_stay,
            Dir::Exit => now - r.ts_ms > forget,
        })
    });
    if hits.is_empty() && !due && stocktake.is_none() && !lost {
        return Staged::default();
    }
    let mut next = mem.clone();
    let mut touched = if lost { next.orphan() } else { Vec::new() };
    for h in hits {
        let before = next.vehicles.get(&h.key).cloned();
        next.apply(h.key, h.dir, h.ts_ms, &h.device, &h.masked);
        if next.vehicles.get(&h.key) != before.as_ref() {
            touched.push(h.key);
        }
    }
    if let (true, Some((now, max_stay, forget))) = (due, expire) {
        touched.extend(next.expire(now, max_stay, forget));
    }
    if let Some((n, at)) = stocktake {
        next.stocktake(n, at);
    }
    touched.sort();
    touched.dedup();
    Staged {
        next: Some(next),
        touched,
    }
}

/// Write what was staged (the totals into `meta`, which the batch's ledger holds open).
/// Returns the change in row bytes.
pub(crate) fn write(
    txn: &redb::WriteTransaction,
    meta: &mut redb::Table<&str, &[u8]>,
    st: &Staged,
) -> Result<i64, StoreError> {
    let Some(next) = &st.next else {
        return Ok(0);
    };
    let mut t = txn.open_table(PRESENCE)?;
    let mut bytes = 0i64;
    for k in &st.touched {
        match next.vehicles.get(k) {
            Some(r) => {
                let rec = encode(r);
                let old = t
                    .insert(k.as_slice(), rec.as_slice())?
                    .map(|o| o.value().len());
                bytes += rec.len() as i64 - old.map_or(-16, |n| n as i64);
            }
            None => {
                if let Some(old) = t.remove(k.as_slice())? {
                    bytes -= 16 + old.value().len() as i64;
                }
            }
        }
    }
    meta.insert(TOTALS, encode(&next.totals).as_slice())?;
    Ok(bytes)
}

/// The set and totals as stored, and their row bytes.
pub(crate) fn load(txn: &redb::ReadTransaction) -> Result<(Presence, u64), StoreError> {
    let mut p = Presence::default();
    let mut bytes = 0;
    for row in txn.open_table(PRESENCE)?.iter()? {
        let (k, v) = row?;
        let Ok(key) = <PresenceKey>::try_from(k.value()) else {
            continue;
        };
        bytes += (k.value().len() + v.value().len()) as u64;
        p.vehicles
            .insert(key, decode::<PresenceRecordV1>("presence", v.value())?);
    }
    if let Some(v) = txn.open_table(META)?.get(TOTALS)? {
        p.totals = decode::<Totals>("meta", v.value())?;
    }
    Ok((p, bytes))
}
