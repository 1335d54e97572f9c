//! One batch's transaction as the engine's [`Ledger`]: dedup, raw events, windows, counters and
//! the outbox written in the batch's redb transaction, with the changes the writer's memory
//! takes once it commits; retention and early drops inside the same transaction.

use super::*;

pub(super) struct Changes {
    pub(super) dedup: HashMapId<Option<i64>>,
    pub(super) open: BTreeMap<i64, bool>,
    pub(super) next_seq: u64,
    pub(super) seq_reserved: u64,
    pub(super) bytes: i64,
}

/// The engine's view of one write transaction, with an overlay on the writer's memory.
pub(super) struct TxLedger<'t, 's> {
    pub(super) meta: Table<'t, &'static str, &'static [u8]>,
    pub(super) events: Table<'t, (u64, u64), &'static [u8]>,
    pub(super) dedup_log: Table<'t, (i64, u64), &'static [u8]>,
    pub(super) windows: Table<'t, i64, &'static [u8]>,
    pub(super) outbox: Table<'t, (u8, u64), &'static [u8]>,
    pub(super) counters: Table<'t, &'static str, &'static [u8]>,
    pub(super) states: Table<'t, &'static str, &'static [u8]>,
    pub(super) mem: &'s Mem,
    /// Dedup hashes this transaction added (`Some`) or removed (`None`).
    pub(super) dedup: HashMapId<Option<i64>>,
    /// The hash of the event `remember` just accepted, for `record` to carry.
    pub(super) new_hash: Option<u64>,
    pub(super) dedup_ttl_ms: i64,
    /// Windows this transaction opened (`true`) or summarised (`false`).
    pub(super) open: BTreeMap<i64, bool>,
    pub(super) seq: u64,
    /// Change of row bytes.
    pub(super) bytes: i64,
    pub(super) subjects: SubjectMode,
    pub(super) dedup_key: &'s [u8; 32],
    pub(super) keys: &'s mut SubjectKeys,
    pub(super) day_cfg: DayCfg,
    /// Pseudonyms of this batch's accepted access and vehicle events: (day, event time,
    /// vehicle, p); the event time names the key (and so its generation).
    pub(super) day_subjects: Vec<(i64, i64, bool, crate::core::daily::Pseudonym)>,
    pub(super) care_list: &'s [Resident],
    /// Access events of watched residents: (care pseudonym, event time).
    pub(super) care_hits: Vec<(CarePseudonym, i64)>,
    /// `[occupancy]` is on: vehicle entries and exits with a plate move the presence set.
    pub(super) presence_on: bool,
    pub(super) presence_hits: Vec<crate::store::presence::Hit>,
    pub(super) now_ms: i64,
    pub(super) emitted: usize,
}

impl TxLedger<'_, '_> {
    pub(super) fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    pub(super) fn held(&self, h: u64) -> Option<i64> {
        match self.dedup.get(&h) {
            Some(v) => *v,
            None => self.mem.dedup.get(&h).copied(),
        }
    }

    pub(super) fn is_open(&self, start: i64) -> bool {
        self.open
            .get(&start)
            .copied()
            .unwrap_or_else(|| self.mem.open.contains(&start))
    }

    pub(super) fn add_meta(&mut self, name: &str, n: u64) -> Result<(), StoreError> {
        if n > 0 {
            let total = read_u64(&self.meta, name)? + n;
            self.meta.insert(name, total.to_le_bytes().as_slice())?;
        }
        Ok(())
    }

    pub(super) fn put_state(&mut self, st: &StateUpdate) -> Result<(), StoreError> {
        let prev: Option<StateRecordV1> = match self.states.get(st.key.as_str())? {
            Some(v) => Some(decode("states", v.value())?),
            None => None,
        };
        let since_ms = match prev {
            Some(p) if p.value == st.value => p.since_ms,
            _ => st.ts_ms,
        };
        let rec = encode(&StateRecordV1 {
            value: st.value,
            since_ms,
            seen_ms: st.ts_ms,
        });
        let old = self
            .states
            .insert(st.key.as_str(), rec.as_slice())?
            .map_or(st.key.len() as i64, |o| o.value().len() as i64);
        self.bytes += rec.len() as i64 - old;
        Ok(())
    }

    /// Remove the rows of up to `limit` dedup hashes from `dedup_log` rows in `range`, and
    /// those hashes from memory where that row is still their latest. Returns hashes removed.
    pub(super) fn drop_dedup_rows(
        &mut self,
        cutoff: Option<i64>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut doomed: Vec<((i64, u64), Vec<u64>)> = Vec::new();
        let mut n = 0;
        let end = cutoff.map_or((i64::MAX, u64::MAX), |c| (c, 0));
        for row in self.dedup_log.range(..end)? {
            let (k, v) = row?;
            let hashes: Vec<u64> = unpack_hashes(v.value()).collect();
            n += hashes.len();
            doomed.push((k.value(), hashes));
            if n >= limit {
                break;
            }
        }
        let mut removed = 0;
        for (k, hashes) in doomed {
            self.dedup_log.remove(k)?;
            self.bytes -= 16 + 8 * hashes.len() as i64;
            for h in hashes {
                if self.held(h) == Some(k.0) {
                    self.dedup.insert(h, None);
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    pub(super) fn purge_dedup(
        &mut self,
        cutoff_ms: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.drop_dedup_rows(Some(cutoff_ms), limit)
    }

    /// Under hard pressure: the oldest dedup hashes, whatever their age.
    pub(super) fn drop_oldest_dedup(&mut self, limit: usize) -> Result<u64, StoreError> {
        Ok(self.drop_dedup_rows(None, limit)? as u64)
    }

    /// Delete up to `limit` raw events received before `cutoff_ms`. A hash one of them carries
    /// that is still within the dedup TTL moves to `dedup_log` (8 bytes instead of the row).
    pub(super) fn purge_events(
        &mut self,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for row in self.events.range(..(cutoff_ms, 0))? {
            let (k, v) = row?;
            doomed.push((k.value(), v.value().len(), event_hash(v.value())));
            if doomed.len() >= limit {
                break;
            }
        }
        let mut keep: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
        for (k, len, hash) in &doomed {
            self.events.remove(*k)?;
            self.bytes -= 16 + *len as i64;
            let t = k.0 as i64;
            if let Some(h) = *hash {
                if self.held(h) == Some(t) {
                    if self.now_ms - t < self.dedup_ttl_ms {
                        keep.entry(t).or_default().push(h);
                    } else {
                        self.dedup.insert(h, None);
                    }
                }
            }
        }
        for (t, hashes) in keep {
            let seq = self.next_seq();
            let packed = pack_hashes(&hashes);
            self.bytes += 16 + packed.len() as i64;
            self.dedup_log.insert((t, seq), packed.as_slice())?;
        }
        Ok(doomed.len())
    }

    /// Drop up to `limit` of the oldest pending messages, summaries before alerts, and add them
    /// to the `dropped_*` counters. Returns (summaries, alerts) dropped.
    pub(super) fn drop_oldest_outbox(&mut self, limit: usize) -> Result<(u64, u64), StoreError> {
        let mut doomed = Vec::new();
        for class in [CLASS_PARKED, CLASS_SUMMARY, CLASS_ALERT] {
            for row in self.outbox.range((class, 0)..=(class, u64::MAX))? {
                let (k, v) = row?;
                doomed.push((k.value(), v.value().len()));
                if doomed.len() >= limit {
                    break;
                }
            }
            if doomed.len() >= limit {
                break;
            }
        }
        let (mut s, mut a) = (0, 0);
        for (k, len) in &doomed {
            self.outbox.remove(*k)?;
            self.bytes -= 9 + *len as i64;
            if k.0 == CLASS_ALERT {
                a += 1;
            } else {
                s += 1;
            }
        }
        self.add_meta("dropped_summaries", s)?;
        self.add_meta("dropped_alerts", a)?;
        Ok((s, a))
    }

    /// Forget summarised windows that start before `before_ms`. Open windows are never
    /// forgotten: they are summarised first.
    pub(super) fn forget_windows(
        &mut self,
        before_ms: i64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for row in self.windows.range(..before_ms)? {
            let (k, v) = row?;
            let start = k.value();
            if !self.is_open(start) {
                doomed.push((start, v.value().len()));
                if doomed.len() >= limit {
                    break;
                }
            }
        }
        for (k, len) in &doomed {
            self.windows.remove(*k)?;
            self.bytes -= 8 + *len as i64;
        }
        Ok(doomed.len())
    }
}

impl Ledger for TxLedger<'_, '_> {
    type Error = StoreError;

    fn first_seen(&mut self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.held(dedup_hash(self.dedup_key, key)))
    }

    fn remember(
        &mut self,
        key: &str,
        now_ms: i64,
        _previous: Option<i64>,
    ) -> Result<(), StoreError> {
        // An older row with this hash stays; purging it later leaves this newer time alone.
        let h = dedup_hash(self.dedup_key, key);
        self.dedup.insert(h, Some(now_ms));
        self.new_hash = Some(h);
        Ok(())
    }

    fn record(&mut self, e: &Event, now_ms: i64) -> Result<(), StoreError> {
        // The day's pseudonym of an access or vehicle subject counts towards the day's distinct
        // subjects (not kept at all with `drop`).
        let pseudonym = match (&e.subject, self.subjects, e.kind) {
            (Some(s), SubjectMode::Hashed | SubjectMode::Plain, Kind::Access | Kind::Vehicle) => {
                self.keys.pseudonym(s, e.ts_ms, now_ms)
            }
            _ => None,
        };
        if let Some(p) = pseudonym {
            self.day_subjects.push((
                self.day_cfg.day_of(e.ts_ms),
                e.ts_ms,
                e.kind == Kind::Vehicle,
                p,
            ));
        }
        if let (true, Kind::Vehicle, Some(plate)) = (self.presence_on, e.kind, &e.subject) {
            use crate::core::occupancy::{mask_plate, normalize_plate, Dir};
            // An unreadable plate (empty, a vendor's "无牌车") is no vehicle of its own.
            if let (Some(dir), Some(plate)) =
                (Dir::of(&e.action, &e.result), normalize_plate(plate))
            {
                if let Some(key) = self.keys.presence_pseudonym(&plate) {
                    self.presence_hits.push(crate::store::presence::Hit {
                        key,
                        dir,
                        ts_ms: e.ts_ms,
                        device: e.device.clone(),
                        masked: mask_plate(&plate),
                    });
                }
            }
        }
        if let (false, Kind::Access, Some(s)) = (self.care_list.is_empty(), e.kind, &e.subject) {
            if let Some(p) = self.keys.care_pseudonym(s) {
                if self.care_list.iter().any(|r| r.pseudonym == p) {
                    self.care_hits.push((p, e.ts_ms));
                }
            }
        }
        let subject = match (&e.subject, self.subjects) {
            (None, _) | (Some(_), SubjectMode::Drop) => StoredSubject::None,
            (Some(s), SubjectMode::Plain) => match self.keys.seal(s, now_ms) {
                Some((day, nonce, bytes)) => StoredSubject::Sealed(day, nonce, bytes),
                None => StoredSubject::None,
            },
            (Some(s), SubjectMode::Hashed) => {
                match pseudonym.or_else(|| self.keys.pseudonym(s, e.ts_ms, now_ms)) {
                    Some(p) => StoredSubject::Hashed(p),
                    None => StoredSubject::None,
                }
            }
        };
        let rec = EventRecordV1 {
            kind: e.kind,
            device: e.device.clone(),
            id: e.id.clone(),
            ts_ms: e.ts_ms,
            action: e.action.clone(),
            result: e.result.clone(),
            subject,
        };
        let hash = self
            .new_hash
            .take()
            .unwrap_or_else(|| dedup_hash(self.dedup_key, &e.dedup_key()));
        let rec = encode_event(&rec, hash);
        let seq = self.next_seq();
        self.events
            .insert((now_ms.max(0) as u64, seq), rec.as_slice())?;
        self.bytes += 16 + rec.len() as i64;
        Ok(())
    }

    fn window(&mut self, start_ms: i64) -> Result<Option<WindowState>, StoreError> {
        match self.windows.get(start_ms)? {
            Some(v) => Ok(Some(decode_window(v.value())?)),
            None => Ok(None),
        }
    }

    fn put_window(&mut self, w: &WindowState) -> Result<(), StoreError> {
        let rec = encode(w);
        let old = self
            .windows
            .insert(w.start_ms, rec.as_slice())?
            .map_or(-8, |o| o.value().len() as i64);
        self.bytes += rec.len() as i64 - old;
        self.open.insert(w.start_ms, w.issued.is_none());
        Ok(())
    }

    fn open_windows_until(&mut self, max_start: i64) -> Result<Vec<i64>, StoreError> {
        let mut all: BTreeSet<i64> = self.mem.open.range(..=max_start).copied().collect();
        for (&start, &open) in self.open.range(..=max_start) {
            if open {
                all.insert(start);
            } else {
                all.remove(&start);
            }
        }
        Ok(all.into_iter().collect())
    }

    fn counter(&mut self, key: &str) -> Result<CounterState, StoreError> {
        match self.counters.get(key)? {
            Some(v) => {
                let rec = decode_counter(v.value())?;
                Ok(CounterState {
                    last: Some(rec.value),
                    held: rec.held,
                })
            }
            None => Ok(CounterState::default()),
        }
    }

    fn set_counter(
        &mut self,
        key: &str,
        state: CounterState,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let Some(value) = state.last else {
            return Ok(());
        };
        let rec = encode_counter(&CounterRecordV2 {
            value,
            at_ms: now_ms,
            held: state.held,
        });
        let old = self
            .counters
            .insert(key, rec.as_slice())?
            .map_or(key.len() as i64, |o| o.value().len() as i64);
        self.bytes += rec.len() as i64 - old;
        Ok(())
    }

    fn emit(&mut self, e: Emit) -> Result<(), StoreError> {
        let (class, rec) = match e {
            Emit::Alert { payload } => (
                CLASS_ALERT,
                OutboxRecordV1 {
                    topic: OutboxTopic::Alert,
                    window: None,
                    created_ms: self.now_ms,
                    payload,
                },
            ),
            Emit::Summary {
                start_ms,
                rev,
                payload,
            } => (
                CLASS_SUMMARY,
                OutboxRecordV1 {
                    topic: OutboxTopic::Summary,
                    window: Some((start_ms, rev)),
                    created_ms: self.now_ms,
                    payload,
                },
            ),
        };
        let seq = self.next_seq();
        let rec = encode(&rec);
        self.outbox.insert((class, seq), rec.as_slice())?;
        self.bytes += 9 + rec.len() as i64;
        self.emitted += 1;
        Ok(())
    }
}
