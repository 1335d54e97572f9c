//! The writer's upkeep between batches: flushing device sightings, retention and pressure
//! (purges, early drops), parking refused outbox entries, forgetting expired dedup hashes, and
//! issuing the local days' `daily` messages.

use super::*;

impl StoreWriter {
    /// Write the pending device sightings now, in a transaction of their own (at a clean stop),
    /// so that after a restart no device reads as silent since up to `DEVICE_SEEN_EVERY_MS`
    /// before it really was. Nothing pending: nothing written.
    pub fn flush_devices(&mut self) -> Result<(), StoreError> {
        if self.mem.devices_pending.is_empty() {
            return Ok(());
        }
        let guard = self.store.db.read().expect("store lock");
        let txn = begin_immediate(guard.as_ref())?;
        {
            let mut t = txn.open_table(DEVICES)?;
            for (key, at) in &self.mem.devices_pending {
                t.insert(key.as_str(), *at)?;
            }
        }
        txn.commit()?;
        drop(guard);
        let pending = std::mem::take(&mut self.mem.devices_pending);
        self.mem.devices.extend(pending);
        self.mem.devices_pending_since = None;
        Ok(())
    }

    /// Whether a maintenance commit would do anything: a window is due, rows have expired, or
    /// the store is under pressure. Reads only, so an idle gateway does not write (flash wear).
    pub fn maintenance_due(
        &self,
        engine: &Engine,
        r: &Retention,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let w = engine.window;
        let due_start = now_ms - w.window_ms as i64 - w.grace_ms as i64;
        if self.mem.open.range(..=due_start).next().is_some() || self.pressure() != Pressure::None {
            return Ok(true);
        }
        if self.key_book.has_staged() {
            return Ok(true);
        }
        // Vehicles inside: the window's `occupancy` message is due, a stocktake waits, or a
        // stay passed max_stay / an exit the lateness bound.
        if let Some(o) = self.occupancy {
            let w = engine.window.window_ms.max(1) as i64;
            if now_ms.div_euclid(w) * w > self.occupancy_sent
                || self.stocktake.is_some()
                || self.mem.presence.vehicles.values().any(|r| match r.dir {
                    crate::core::occupancy::Dir::Entry => now_ms - r.ts_ms > o.max_stay_ms,
                    crate::core::occupancy::Dir::Exit => now_ms - r.ts_ms > o.forget_ms,
                })
            {
                return Ok(true);
            }
        }
        if care_store::due(
            &self.care_list,
            self.key_book.orphans(),
            &self.mem.care,
            now_ms,
            self.day_cfg.offset_ms,
            self.care_hold,
        ) {
            return Ok(true);
        }
        let days = || self.mem.days.iter().map(|(d, m)| (*d, m.record()));
        if !self.day_cfg.due(days(), now_ms).is_empty()
            || !self.day_cfg.finished(days(), now_ms).is_empty()
        {
            return Ok(true);
        }
        let txn = self.store.read()?;
        if let Some((k, _)) = txn.open_table(DEDUP_LOG)?.first()? {
            if k.value().0 < now_ms - r.dedup_ttl_ms as i64 {
                return Ok(true);
            }
        }
        let raw_cut = now_ms.saturating_sub(r.raw_retention_ms as i64).max(0) as u64;
        if let Some((k, _)) = txn.open_table(EVENTS)?.first()? {
            if k.value().0 < raw_cut {
                return Ok(true);
            }
        }
        let forget = engine.window.forget_before(now_ms);
        for row in txn.open_table(WINDOWS)?.range(..forget)? {
            if !self.mem.open.contains(&row?.0.value()) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Move outbox entries the district broker kept refusing to the parked class (one small
    /// transaction; parking is rare). Returns how many moved.
    pub fn park(&mut self, keys: &[OutboxKey]) -> Result<usize, StoreError> {
        let guard = self.store.db.read().expect("store lock");
        let txn = begin_immediate(guard.as_ref())?;
        let mut moved = 0;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            for &(class, seq) in keys {
                if class == CLASS_PARKED {
                    continue;
                }
                let rec = outbox.remove((class, seq))?.map(|v| v.value().to_vec());
                if let Some(rec) = rec {
                    outbox.insert((CLASS_PARKED, seq), rec.as_slice())?;
                    moved += 1;
                }
            }
        }
        txn.commit()?;
        Ok(moved)
    }

    /// The latest wall time the store recorded (the newest raw event's arrival), if any: a
    /// wall clock far behind it at start is stale.
    pub fn latest_record_ms(&self) -> Option<i64> {
        let txn = self.store.read().ok()?;
        let events = txn.open_table(EVENTS).ok()?;
        let last = events.last().ok()??;
        Some(last.0.value().0 as i64)
    }

    /// Dedup hashes held in memory.
    pub fn dedup_keys(&self) -> usize {
        self.mem.dedup.len()
    }

    /// Forget, from memory only, up to `limit` hashes carried by raw events first accepted
    /// before `now_ms - ttl_ms` (the raw events stay until their own retention; nothing is
    /// written). Returns how many were forgotten.
    pub fn forget_expired_hashes(
        &mut self,
        now_ms: i64,
        ttl_ms: u64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let cutoff = now_ms.saturating_sub(ttl_ms as i64).max(0) as u64;
        if self.mem.forget_cursor.0 >= cutoff {
            return Ok(0);
        }
        let txn = self.store.read()?;
        let events = txn.open_table(EVENTS)?;
        let mut seen = 0;
        let mut forgotten = 0;
        let mut cursor = self.mem.forget_cursor;
        for row in events.range(self.mem.forget_cursor..(cutoff, 0))? {
            let (k, v) = row?;
            let (t, seq) = k.value();
            cursor = (t, seq.saturating_add(1));
            if let Some(h) = event_hash(v.value()) {
                if self.mem.dedup.get(&h) == Some(&(t as i64)) {
                    self.mem.dedup.remove(&h);
                    forgotten += 1;
                }
            }
            seen += 1;
            if seen >= limit {
                break;
            }
        }
        if seen < limit {
            cursor = (cutoff, 0);
        }
        self.mem.forget_cursor = cursor;
        if forgotten > 0 {
            self.publish();
        }
        Ok(forgotten)
    }
}

/// Issue the days that are due (a `daily` message in the outbox, after the summaries of the
/// day's last windows, which `close_due` just emitted) and forget the final ones.
pub(super) fn issue_days(
    l: &mut TxLedger<'_, '_>,
    engine: &Engine,
    ch: &mut DayChanges,
    now_ms: i64,
) -> Result<(), StoreError> {
    let cfg = l.day_cfg;
    let states = ch.states(&l.mem.days);
    for (day, rev) in cfg.due(states.iter().copied(), now_ms) {
        let (start, end) = cfg.bounds(day);
        let mut counts = BTreeMap::new();
        for row in l.windows.range(start..end)? {
            let (_, v) = row?;
            for (k, n) in decode_window(v.value())?.counts {
                *counts.entry(k).or_insert(0u64) += n;
            }
        }
        let distinct = (l.subjects != SubjectMode::Drop).then(|| ch.distinct(&l.mem.days, day));
        let payload = daily_json(
            &engine.gateway,
            &engine.site,
            &cfg,
            day,
            rev,
            distinct,
            &counts,
        );
        let rec = encode(&OutboxRecordV1 {
            topic: OutboxTopic::Daily,
            window: None,
            created_ms: now_ms,
            payload,
        });
        let seq = l.next_seq();
        l.outbox.insert((CLASS_SUMMARY, seq), rec.as_slice())?;
        l.bytes += 9 + rec.len() as i64;
        l.emitted += 1;
        ch.state.insert(
            day,
            Some(crate::core::daily::DayRecordV1 {
                issued: Some(rev),
                dirty_since: None,
            }),
        );
    }
    let states = ch.states(&l.mem.days);
    for day in cfg.finished(states, now_ms) {
        ch.state.insert(day, None);
    }
    Ok(())
}
