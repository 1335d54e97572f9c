//! The read side's queries: the forwarder's outbox cursor, the status page, the heartbeat and
//! `inspect`. Each is one read transaction; none writes.

use super::records::{
    decode, decode_counter, decode_event, event_hash, unpack_hashes, CounterRecordV2,
    EventRecordV1, OutboxRecordV1, StateRecordV1,
};
use super::{
    decode_window, OutboxKey, Store, StoreError, CLASS_ALERT, CLASS_PARKED, CLASS_SUMMARY,
    COUNTERS, DEDUP_LOG, DEVICES, EVENTS, META, OUTBOX, STATES, WINDOWS,
};
use crate::core::event::Kind;
use crate::core::summary::WindowState;
use redb::{ReadableTable, ReadableTableMetadata};
use serde::Serialize;
use std::sync::atomic::Ordering::Relaxed;

/// A read of the store for the status page, heartbeat and `inspect`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overview {
    pub pending_summaries: u64,
    pub pending_alerts: u64,
    /// Messages parked because the district broker kept refusing them.
    pub parked: u64,
    pub oldest_pending_window_ms: Option<i64>,
    pub open_windows: u64,
    pub dedup_keys: u64,
    pub raw_events: u64,
    pub dropped_summaries: u64,
    pub dropped_alerts: u64,
    /// Dedup hashes dropped early under disk pressure.
    pub dropped_dedup_keys: u64,
    /// Raw events deleted before their retention under disk pressure.
    pub evicted_events: u64,
    pub file_bytes: u64,
}

pub(crate) fn read_u64<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    key: &str,
) -> Result<u64, StoreError> {
    Ok(t.get(key)?
        .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
        .unwrap_or(0))
}

impl Store {
    /// Up to `limit` outbox entries of `class` after `after` (exclusive), in order.
    pub fn outbox_after(
        &self,
        class: u8,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(OutboxKey, OutboxRecordV1)>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(OUTBOX)?;
        let start = after.map_or(0, |s| s.saturating_add(1));
        let mut out = Vec::new();
        for row in t.range((class, start)..=(class, u64::MAX))? {
            let (k, v) = row?;
            out.push((k.value(), decode("outbox", v.value())?));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Which of `keys` are still in the outbox.
    pub fn outbox_contains(
        &self,
        keys: impl IntoIterator<Item = OutboxKey>,
    ) -> Result<Vec<OutboxKey>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for k in keys {
            if t.get(k)?.is_some() {
                out.push(k);
            }
        }
        Ok(out)
    }

    /// Counts for the heartbeat, status page and `inspect`.
    pub fn overview(&self) -> Result<Overview, StoreError> {
        let txn = self.read()?;
        let outbox = txn.open_table(OUTBOX)?;
        let pending_alerts = outbox
            .range((CLASS_ALERT, 0)..=(CLASS_ALERT, u64::MAX))?
            .count() as u64;
        let parked = outbox
            .range((CLASS_PARKED, 0)..=(CLASS_PARKED, u64::MAX))?
            .count() as u64;
        let total = outbox.len()?;
        let mut oldest = None;
        for row in outbox.range((CLASS_SUMMARY, 0)..=(CLASS_SUMMARY, u64::MAX))? {
            let (_, v) = row?;
            let rec: OutboxRecordV1 = decode("outbox", v.value())?;
            if let Some((start, _)) = rec.window {
                oldest = Some(oldest.map_or(start, |o: i64| o.min(start)));
            }
        }
        let meta = txn.open_table(META)?;
        let (open_windows, dedup_keys) = if self.live() {
            (
                self.figures.open_windows.load(Relaxed),
                self.figures.dedup_keys.load(Relaxed),
            )
        } else {
            (self.open_windows()?.len() as u64, self.dedup_keys()?)
        };
        Ok(Overview {
            pending_summaries: total - pending_alerts - parked,
            pending_alerts,
            parked,
            oldest_pending_window_ms: oldest,
            open_windows,
            dedup_keys,
            raw_events: txn.open_table(EVENTS)?.len()?,
            dropped_summaries: read_u64(&meta, "dropped_summaries")?,
            dropped_alerts: read_u64(&meta, "dropped_alerts")?,
            dropped_dedup_keys: read_u64(&meta, "dropped_dedup_keys")?,
            evicted_events: read_u64(&meta, "evicted_events")?,
            file_bytes: self.file_bytes(),
        })
    }

    /// Distinct dedup hashes held (a scan of `events` and `dedup_log`: for `inspect`).
    pub fn dedup_keys(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        let mut seen = std::collections::HashSet::new();
        for row in txn.open_table(DEDUP_LOG)?.iter()? {
            let (_, v) = row?;
            seen.extend(unpack_hashes(v.value()));
        }
        for row in txn.open_table(EVENTS)?.iter()? {
            let (_, v) = row?;
            seen.extend(event_hash(v.value()));
        }
        Ok(seen.len() as u64)
    }

    /// Number of entries in the outbox (cheap: redb keeps table lengths).
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// Starts of the windows not yet summarised, oldest first.
    pub fn open_windows(&self) -> Result<Vec<i64>, StoreError> {
        Ok(self
            .windows()?
            .into_iter()
            .filter(|w| w.issued.is_none())
            .map(|w| w.start_ms)
            .collect())
    }

    /// Number of windows held (open and summarised).
    pub fn windows_held(&self) -> Result<u64, StoreError> {
        Ok(self.read()?.open_table(WINDOWS)?.len()?)
    }

    /// Every Modbus state point: key "kind\0device\0point" and its record.
    pub fn states(&self) -> Result<Vec<(String, StateRecordV1)>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(STATES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode("states", v.value())?));
        }
        Ok(out)
    }

    /// Every MQTT device the store remembers: kind, device and when it was last seen (ms, to
    /// within `DEVICE_SEEN_EVERY_MS`). Empty for a file from before the table existed.
    pub fn devices(&self) -> Result<Vec<(Kind, String, i64)>, StoreError> {
        let txn = self.read()?;
        let t = match txn.open_table(DEVICES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            let Some((kind, device)) = k.value().split_once('\0') else {
                continue;
            };
            if let Some(kind) = Kind::parse(kind) {
                out.push((kind, device.to_string(), v.value()));
            }
        }
        Ok(out)
    }

    /// Every Modbus counter's last committed value.
    pub fn counters(&self) -> Result<Vec<(String, CounterRecordV2)>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(COUNTERS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode_counter(v.value())?));
        }
        Ok(out)
    }

    /// All windows currently held, oldest first (tests and `inspect`).
    pub fn windows(&self) -> Result<Vec<WindowState>, StoreError> {
        self.windows_since(i64::MIN)
    }

    /// Windows starting at or after `start_ms`, oldest first (the status page).
    pub fn windows_since(&self, start_ms: i64) -> Result<Vec<WindowState>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(WINDOWS)?;
        let mut out = Vec::new();
        for row in t.range(start_ms..)? {
            let (_, v) = row?;
            out.push(decode_window(v.value())?);
        }
        Ok(out)
    }

    /// Vehicles inside as stored: the presence set and its totals (tests and `inspect`).
    pub fn presence(&self) -> Result<crate::core::occupancy::Presence, StoreError> {
        let txn = self.read()?;
        Ok(super::presence::load(&txn)?.0)
    }

    /// All raw events, oldest first (tests and investigations).
    pub fn raw_events(&self) -> Result<Vec<EventRecordV1>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode_event(v.value())?);
        }
        Ok(out)
    }
}
