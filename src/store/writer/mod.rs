//! The only writer of the store, owned by the committer: one write transaction per batch, and
//! the in-memory state that lets a batch append instead of update (dedup hashes, open windows,
//! sequence numbers, live bytes). See the module above for the layout and invariants.

use super::care::{self as care_store, CareChanges};
use super::days::{self, DayChanges};
use super::key_ids::{self, KeyBook};
use super::pressure::{self, Pressure, Retention};
use super::reader::read_u64;
use super::records::{
    decode, decode_counter, decode_event, encode, encode_counter, encode_event, event_hash,
    pack_hashes, unpack_hashes, CounterRecordV2, EventRecordV1, OutboxRecordV1, OutboxTopic,
    StateRecordV1, StateUpdate, StoredSubject,
};
use super::{
    damage, decode_window, Db, OutboxKey, Store, StoreError, CLASS_ALERT, CLASS_PARKED,
    CLASS_SUMMARY, COUNTERS, DEDUP_BY_TIME_V1, DEDUP_LOG, DEDUP_V1, DEVICES, DEVICE_SOURCES,
    EVENTS, FORMAT, META, OPEN_WINDOWS_V1, OUTBOX, STATES, WINDOWS,
};
use crate::config::SubjectMode;
use crate::core::care::{care_json, CarePseudonym, CareRecordV1, Resident};
use crate::core::counter::CounterState;
use crate::core::daily::{daily_json, DayCfg, DayMem};
use crate::core::devices::{device_key, longest_silent};
use crate::core::engine::{Emit, Engine, Input, Ledger, Outcome};
use crate::core::event::{Event, Kind};
use crate::core::summary::WindowState;
use crate::keys::{Rotate, SubjectKeys};
use redb::{Durability, ReadableTable, ReadableTableMetadata, Table};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

mod devices;
mod ledger;
mod maintenance;
mod open;

use ledger::{Changes, TxLedger};
use maintenance::issue_days;
use open::prepare;

/// Sequence numbers are reserved in `meta` this many at a time, so `meta` is written about
/// once per million rows instead of on every commit.
const SEQ_BLOCK: u64 = 1_000_000;
/// Pending messages dropped per pass under [`Pressure::Hard`].
const DROP_BATCH: usize = 64;

/// Dedup hashes are keyed BLAKE3 outputs already: hash them as themselves.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type HashMapId<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// What the writer keeps in memory; changed only after a commit succeeded.
#[derive(Default)]
struct Mem {
    /// Dedup hash -> when first accepted (ms).
    dedup: HashMapId<i64>,
    /// Starts of windows not yet summarised.
    open: BTreeSet<i64>,
    next_seq: u64,
    seq_reserved: u64,
    /// Key + value bytes of every row.
    row_bytes: u64,
    /// `events` rows before this key have had their expired hashes forgotten from `dedup`.
    forget_cursor: (u64, u64),
    /// "kind\0device" -> the last-seen time written to `devices`.
    devices: HashMap<String, i64>,
    /// Sightings of known devices not written yet, and when the oldest of them happened.
    devices_pending: HashMap<String, i64>,
    devices_pending_since: Option<i64>,
    /// "kind\0device" -> the mark of the `[[mqtt.sources]]` entry it was last learned through
    /// (devices of canonical topics have none).
    device_marks: HashMap<String, String>,
    /// Local days still open (daily distinct counts; see `days`).
    days: BTreeMap<i64, DayMem>,
    /// Care-watch states by care pseudonym.
    care: HashMap<CarePseudonym, CareRecordV1>,
    /// Vehicles inside (`[occupancy]`).
    presence: crate::core::occupancy::Presence,
}

/// Known devices' last-seen times are written together at most this often (ms): after a
/// restart one may read up to this much older than it was, and the table is touched (about
/// 8 KB of copy-on-write pages) at most once per period for all devices, plus once per new
/// device.
pub const DEVICE_SEEN_EVERY_MS: i64 = 5 * 60 * 1000;

/// What one commit did.
#[derive(Debug, Default, Clone)]
pub struct CommitReport {
    pub outcomes: Vec<Outcome>,
    pub emitted: usize,
    pub deleted_outbox: usize,
    pub purged_dedup: usize,
    pub purged_events: usize,
    /// Raw events deleted early because of disk pressure.
    pub pressure_events: usize,
    pub dropped_dedup_keys: u64,
    pub dropped_summaries: u64,
    pub dropped_alerts: u64,
    /// Devices ("kind\0device") forgotten to keep the table within `health.max_devices`, the
    /// longest silent first.
    pub forgotten: Vec<String>,
}

/// The store's only writer. Not `Clone`: [`Store::open`] hands out one per open file.
pub struct StoreWriter {
    store: Arc<Store>,
    subjects: SubjectMode,
    /// Keys the dedup hashes of event ids (kept in `meta`: event ids are not personal data).
    dedup_key: [u8; 32],
    /// Pseudonym keys for hashed subjects, kept outside the store ([`crate::keys`]).
    keys: SubjectKeys,
    /// The site's days, for the daily distinct counts.
    day_cfg: DayCfg,
    /// The care watch's residents (`[[care.residents]]`, pseudonyms resolved).
    care_list: Vec<Resident>,
    /// No silence checks now (the committer's word: the site link not settled, or paused).
    care_hold: bool,
    mem: Mem,
    /// Bytes the store may take: `store.max_size` less the data dir's other files.
    budget: u64,
    /// `dedup.ttl` when known: `load` skips the hashes of raw events older than the TTL.
    dedup_ttl_ms: Option<u64>,
    /// `health.max_devices`: the device table holds at most this many MQTT devices.
    max_devices: usize,
    /// The source marks of the next batch's devices, where they differ from what is stored.
    staged_marks: HashMap<String, String>,
    /// The ids of the pseudonym and care keys the store used, and what a start found lost.
    key_book: KeyBook,
    /// The care aliases last logged as unmatched (care key lost), so each set is logged once.
    unmatched_logged: Vec<String>,
    /// `[occupancy]`, when on.
    occupancy: Option<OccupancyCfg>,
    /// A stocktake to record with the next commit: (counted, when).
    stocktake: Option<(u64, i64)>,
    /// The presence key was found lost at start: the set is orphaned with the next commit
    /// (with the loss's `key_ids` row).
    presence_lost: bool,
    /// The window boundary of the last `occupancy` message queued (`meta` `occupancy_sent`,
    /// written with it: a batch redelivered after a power cut does not queue it twice).
    occupancy_sent: i64,
}

/// `meta` key: the window boundary (ms, u64 LE) of the last `occupancy` message queued.
const OCCUPANCY_SENT: &str = "occupancy_sent";

/// `[occupancy]` as the writer uses it (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OccupancyCfg {
    pub max_stay_ms: i64,
    pub long_stay_ms: i64,
    /// How long an exit is remembered: `aggregate.max_lateness` (no older event is accepted).
    pub forget_ms: i64,
    pub capacity: Option<u32>,
}

/// A write transaction on the writer's open database: fsync'ed at commit
/// (`Durability::Immediate`), without quick repair (an unclean file is repaired at the next
/// open instead; see the module). Hold the store's read guard until it commits.
fn begin_immediate(db: Option<&Db>) -> Result<redb::WriteTransaction, StoreError> {
    let db = match db {
        Some(Db::ReadWrite(db)) => db,
        Some(Db::ReadOnly(_)) => return Err(StoreError::ReadOnly),
        None => return Err(StoreError::Unavailable),
    };
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.set_quick_repair(false);
    Ok(txn)
}

fn dedup_hash(key: &[u8; 32], dedup_key: &str) -> u64 {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"dedup\0");
    h.update(dedup_key.as_bytes());
    let out = h.finalize();
    u64::from_le_bytes(out.as_bytes()[..8].try_into().expect("8 bytes"))
}

impl StoreWriter {
    /// Prepare a freshly opened file: check or migrate its format, make the subject key, create
    /// every table, then load the in-memory state.
    pub(crate) fn init(
        store: Arc<Store>,
        subjects: SubjectMode,
        dedup_ttl_ms: Option<u64>,
    ) -> Result<Self, StoreError> {
        let dedup_key = {
            let guard = store.db.read().expect("store lock");
            let Some(Db::ReadWrite(db)) = guard.as_ref() else {
                return Err(StoreError::ReadOnly);
            };
            prepare(db)?
        };
        let mut w = StoreWriter {
            store,
            subjects,
            dedup_key,
            // Until the daemon hands over the keys from `privacy.key_dir`: memory only.
            keys: SubjectKeys::ephemeral(Rotate::Daily, 0, 86_400_000, 7 * 86_400_000),
            day_cfg: DayCfg::default(),
            care_list: Vec::new(),
            care_hold: true,
            mem: Mem::default(),
            budget: u64::MAX,
            dedup_ttl_ms,
            max_devices: usize::MAX,
            staged_marks: HashMap::new(),
            key_book: KeyBook::default(),
            unmatched_logged: Vec::new(),
            occupancy: None,
            stocktake: None,
            occupancy_sent: 0,
            presence_lost: false,
        };
        w.load()?;
        Ok(w)
    }

    /// The read side of this store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Rebuild the in-memory state from the file.
    fn load(&mut self) -> Result<(), StoreError> {
        let txn = self.store.read()?;
        let mut mem = Mem::default();
        let mut bytes = 0u64;
        let mut max_seq = 0u64;
        {
            let log = txn.open_table(DEDUP_LOG)?;
            for row in log.iter()? {
                let (k, v) = row?;
                let (t, seq) = k.value();
                max_seq = max_seq.max(seq);
                bytes += 16 + v.value().len() as u64;
                for h in unpack_hashes(v.value()) {
                    mem.dedup
                        .entry(h)
                        .and_modify(|held| *held = (*held).max(t))
                        .or_insert(t);
                }
            }
        }
        for row in txn.open_table(WINDOWS)?.iter()? {
            let (_, v) = row?;
            bytes += 8 + v.value().len() as u64;
            let w = decode_window(v.value())?;
            if w.issued.is_none() {
                mem.open.insert(w.start_ms);
            }
        }
        let events = txn.open_table(EVENTS)?;
        // Rows are keyed (received, seq), both only growing: the last row has the highest
        // sequence number, the table's stored bytes are its rows' key and value bytes.
        let last = events.last()?.map(|(k, _)| k.value());
        if let Some((_, seq)) = last {
            max_seq = max_seq.max(seq);
        }
        bytes += events.stats()?.stored_bytes();
        // Hashes of raw events received more than the TTL before the newest one have expired
        // (measured from the data, not the wall clock, which may be wrong at boot).
        let from = match (self.dedup_ttl_ms, last) {
            (Some(ttl), Some((t, _))) => (t.saturating_sub(ttl), 0),
            _ => (0, 0),
        };
        mem.forget_cursor = from;
        for row in events.range(from..)? {
            let (k, v) = row?;
            let (t, _) = k.value();
            if let Some(h) = event_hash(v.value()) {
                let t = t as i64;
                mem.dedup
                    .entry(h)
                    .and_modify(|held| *held = (*held).max(t))
                    .or_insert(t);
            }
        }
        for row in txn.open_table(OUTBOX)?.iter()? {
            let (k, v) = row?;
            max_seq = max_seq.max(k.value().1);
            bytes += 9 + v.value().len() as u64;
        }
        for t in [COUNTERS, STATES, META] {
            for row in txn.open_table(t)?.iter()? {
                let (k, v) = row?;
                bytes += (k.value().len() + v.value().len()) as u64;
            }
        }
        for row in txn.open_table(DEVICES)?.iter()? {
            let (k, v) = row?;
            bytes += k.value().len() as u64 + 8;
            mem.devices.insert(k.value().to_string(), v.value());
        }
        for row in txn.open_table(DEVICE_SOURCES)?.iter()? {
            let (k, v) = row?;
            bytes += (k.value().len() + v.value().len()) as u64;
            mem.device_marks
                .insert(k.value().to_string(), v.value().to_string());
        }
        let (care_mem, care_bytes) = care_store::load(&txn)?;
        mem.care = care_mem;
        bytes += care_bytes;
        let (presence_mem, presence_bytes) = super::presence::load(&txn)?;
        mem.presence = presence_mem;
        bytes += presence_bytes;
        let (key_mem, key_bytes) = key_ids::load(&txn)?;
        self.key_book.set_committed(key_mem);
        bytes += key_bytes;
        let (day_mem, day_bytes, day_seq) = days::load(&txn)?;
        mem.days = day_mem;
        bytes += day_bytes;
        max_seq = max_seq.max(day_seq);
        let reserved = read_u64(&txn.open_table(META)?, "seq_reserved")?;
        self.occupancy_sent = read_u64(&txn.open_table(META)?, OCCUPANCY_SENT)? as i64;
        mem.next_seq = reserved.max(max_seq + 1);
        mem.seq_reserved = reserved;
        mem.row_bytes = bytes;
        self.mem = mem;
        self.publish();
        Ok(())
    }

    /// Keep the read side's figures current.
    fn publish(&self) {
        let f = &self.store.figures;
        f.dedup_keys.store(self.mem.dedup.len() as u64, Relaxed);
        f.open_windows.store(self.mem.open.len() as u64, Relaxed);
        f.live.store(true, Relaxed);
    }

    /// Drop the database and open the file again (after a disk fault: redb refuses every write
    /// after an I/O error until reopened; the open repairs what the fault left). The in-memory
    /// state is rebuilt from the file.
    pub fn reopen(&mut self) -> Result<(), StoreError> {
        {
            let mut guard = self.store.db.write().expect("store lock");
            *guard = None;
            let db = damage::create_db(self.store.path())?;
            prepare(&db)?;
            *guard = Some(Db::ReadWrite(db));
        }
        self.load()
    }

    /// Set the bound: `max_bytes` (`store.max_size`) less what the data dir's other files take.
    pub fn set_max_bytes(&mut self, max_bytes: u64) {
        let others = pressure::others_bytes(self.store.data_dir(), self.store.path());
        self.budget = max_bytes.saturating_sub(others);
    }

    /// Estimated bytes of pages the live rows take ([`pressure::live_estimate`]).
    pub fn live_bytes(&self) -> u64 {
        pressure::live_estimate(self.mem.row_bytes)
    }

    /// The pressure right now, from the live estimate against the budget.
    pub fn pressure(&self) -> Pressure {
        Pressure::of(self.live_bytes(), self.budget)
    }

    /// Compact the file when that gives back enough: it is over the budget, or more than four
    /// times the live estimate and at least 8 MiB. Needs no reader inside a transaction (at
    /// start-up). Returns whether it compacted.
    pub fn compact_if_it_pays(&mut self) -> Result<bool, StoreError> {
        let file = self.store.file_bytes();
        let live = self.live_bytes();
        if !(file > self.budget || (file > 4 * live && file >= 8 << 20)) {
            return Ok(false);
        }
        let mut guard = self.store.db.write().expect("store lock");
        let Some(Db::ReadWrite(db)) = guard.as_mut() else {
            return Ok(false);
        };
        let started = std::time::Instant::now();
        while db.compact()? {}
        tracing::info!(
            before_bytes = file,
            after_bytes = self.store.file_bytes(),
            millis = started.elapsed().as_millis() as u64,
            "store compacted"
        );
        Ok(true)
    }

    /// One write transaction: decide `events` with `engine` at `now_ms`, delete the outbox
    /// entries in `acked`, and, when `maintain`, purge expired rows (bounded).
    pub fn commit(
        &mut self,
        engine: &Engine,
        events: &[&Event],
        acked: &[OutboxKey],
        now_ms: i64,
        maintain: Option<&Retention>,
    ) -> Result<CommitReport, StoreError> {
        let inputs: Vec<Input> = events.iter().map(|e| Input::Event(e)).collect();
        self.commit_inputs(engine, &inputs, &[], acked, now_ms, maintain)
    }

    /// As [`StoreWriter::commit`], for events and Modbus counter readings in arrival order,
    /// plus Modbus state values, all in the same transaction. Under disk pressure every commit
    /// also evicts (at least twice as many rows as it adds), in the contract's order.
    pub fn commit_inputs(
        &mut self,
        engine: &Engine,
        inputs: &[Input],
        states: &[StateUpdate],
        acked: &[OutboxKey],
        now_ms: i64,
        maintain: Option<&Retention>,
    ) -> Result<CommitReport, StoreError> {
        let pressure = self.pressure();
        let guard = self.store.db.read().expect("store lock");
        let txn = begin_immediate(guard.as_ref())?;
        let mut report = CommitReport::default();
        let mut seen: HashMap<String, i64> = HashMap::new();
        let mut marks_changed: Vec<(String, String)> = Vec::new();
        let mut day_changes = DayChanges::default();
        let mut care_changes = CareChanges::default();
        let presence_staged;
        let mut occupancy_sent = None;
        let seen_pending;
        let changes = {
            let mut l = TxLedger {
                meta: txn.open_table(META)?,
                events: txn.open_table(EVENTS)?,
                dedup_log: txn.open_table(DEDUP_LOG)?,
                windows: txn.open_table(WINDOWS)?,
                outbox: txn.open_table(OUTBOX)?,
                counters: txn.open_table(COUNTERS)?,
                states: txn.open_table(STATES)?,
                mem: &self.mem,
                dedup: HashMapId::default(),
                new_hash: None,
                dedup_ttl_ms: engine.dedup_ttl_ms as i64,
                open: BTreeMap::new(),
                seq: self.mem.next_seq,
                bytes: 0,
                subjects: self.subjects,
                dedup_key: &self.dedup_key,
                keys: &mut self.keys,
                day_cfg: self.day_cfg,
                day_subjects: Vec::new(),
                care_list: &self.care_list,
                care_hits: Vec::new(),
                presence_on: self.occupancy.is_some(),
                presence_hits: Vec::new(),
                now_ms,
                emitted: 0,
            };
            for key in acked {
                if let Some(old) = l.outbox.remove(*key)? {
                    l.bytes -= 9 + old.value().len() as i64;
                    report.deleted_outbox += 1;
                }
            }
            report.outcomes = engine.apply_inputs(&mut l, inputs.iter().copied(), now_ms)?;
            // The ids of keys made for this batch go with it; each pseudonym counts under the
            // generation of the key that made it.
            self.key_book.register(l.keys);
            let mut gens: BTreeMap<i64, crate::core::daily::KeyGen> = BTreeMap::new();
            let day_subjects: Vec<_> = std::mem::take(&mut l.day_subjects)
                .into_iter()
                .map(|(day, ts, vehicle, p)| {
                    let g = *gens
                        .entry(l.keys.period(ts))
                        .or_insert_with(|| self.key_book.gen_of(&l.keys.pseudonym_name(ts)));
                    (day, g, vehicle, p)
                })
                .collect();
            // Devices seen: a new one is written at once; known ones collect in memory and are
            // written together once the oldest unwritten sighting is DEVICE_SEEN_EVERY_MS old,
            // so the table costs at most one touch per period however many devices there are.
            let mut pending = self.mem.devices_pending.clone();
            let mut pending_since = self.mem.devices_pending_since;
            let mut new_keys: Vec<String> = Vec::new();
            let mut batch_keys: BTreeSet<String> = BTreeSet::new();
            for (input, outcome) in inputs.iter().zip(&report.outcomes) {
                let (Input::Event(e), Outcome::Accepted) = (input, outcome) else {
                    continue;
                };
                let key = device_key(e.kind, &e.device);
                if !self.mem.devices.contains_key(&key) && !pending.contains_key(&key) {
                    new_keys.push(key.clone());
                }
                batch_keys.insert(key.clone());
                pending.insert(key, now_ms);
                pending_since.get_or_insert(now_ms);
            }
            // health.max_devices bounds the table, never the events: past it, the longest
            // silent devices are forgotten (their rows deleted in this transaction).
            let len = self.mem.devices.len() + new_keys.len();
            if len > self.max_devices {
                let candidates = self
                    .mem
                    .devices
                    .iter()
                    .map(|(k, t)| (k.as_str(), pending.get(k).map_or(*t, |p| (*p).max(*t))))
                    .chain(new_keys.iter().map(|k| (k.as_str(), now_ms)));
                report.forgotten = longest_silent(candidates, len, self.max_devices)
                    .into_iter()
                    .map(str::to_string)
                    .collect();
                let mut t = txn.open_table(DEVICES)?;
                let mut m = txn.open_table(DEVICE_SOURCES)?;
                for key in &report.forgotten {
                    pending.remove(key);
                    batch_keys.remove(key);
                    if t.remove(key.as_str())?.is_some() {
                        l.bytes -= key.len() as i64 + 8;
                    }
                    if let Some(v) = m.remove(key.as_str())? {
                        l.bytes -= (key.len() + v.value().len()) as i64;
                    }
                }
                let gone: BTreeSet<&String> = report.forgotten.iter().collect();
                new_keys.retain(|k| !gone.contains(k));
                if pending.is_empty() {
                    pending_since = None;
                }
            }
            // The source each device was learned through, where it changed.
            for key in &batch_keys {
                let Some(mark) = self.staged_marks.get(key) else {
                    continue;
                };
                let stored = self.mem.device_marks.get(key).map_or("", String::as_str);
                if mark.as_str() != stored {
                    marks_changed.push((key.clone(), mark.clone()));
                }
            }
            if !marks_changed.is_empty() {
                let mut m = txn.open_table(DEVICE_SOURCES)?;
                for (key, mark) in &marks_changed {
                    let old = if mark.is_empty() {
                        m.remove(key.as_str())?
                    } else {
                        m.insert(key.as_str(), mark.as_str())?
                    };
                    if let Some(v) = old {
                        l.bytes -= (key.len() + v.value().len()) as i64;
                    }
                    if !mark.is_empty() {
                        l.bytes += (key.len() + mark.len()) as i64;
                    }
                }
            }
            let new_device = !new_keys.is_empty();
            let flush =
                new_device || pending_since.is_some_and(|t| now_ms - t >= DEVICE_SEEN_EVERY_MS);
            if flush && !pending.is_empty() {
                let mut t = txn.open_table(DEVICES)?;
                for (key, at) in &pending {
                    if t.insert(key.as_str(), *at)?.is_none() {
                        l.bytes += key.len() as i64 + 8;
                    }
                }
                seen = std::mem::take(&mut pending);
                pending_since = None;
            }
            seen_pending = (pending, pending_since);
            for st in states {
                l.put_state(st)?;
            }
            days::note_batch(
                &self.mem.days,
                &self.day_cfg,
                inputs,
                &report.outcomes,
                day_subjects,
                now_ms,
                pressure == Pressure::None,
                &mut day_changes,
            );
            care_store::note_hits(
                l.care_list,
                self.key_book.orphans(),
                &self.mem.care,
                &std::mem::take(&mut l.care_hits),
                now_ms,
                &mut care_changes,
            );
            if let Some(r) = maintain {
                // apply() already closed due windows; maintenance also covers idle periods.
                engine.close_due(&mut l, now_ms)?;
                issue_days(&mut l, engine, &mut day_changes, now_ms)?;
                care_store::check_all(
                    l.care_list,
                    self.key_book.orphans(),
                    &self.mem.care,
                    now_ms,
                    l.day_cfg.offset_ms,
                    self.care_hold,
                    &mut care_changes,
                );
                self.key_book.prune_orphans(l.care_list);
                report.purged_dedup =
                    l.purge_dedup(now_ms - r.dedup_ttl_ms as i64, r.purge_batch)?;
                report.purged_events = l.purge_events(
                    now_ms.saturating_sub(r.raw_retention_ms as i64).max(0) as u64,
                    r.purge_batch,
                )?;
                l.forget_windows(engine.window.forget_before(now_ms), r.purge_batch)?;
            }
            if pressure != Pressure::None {
                let limit = maintain
                    .map_or(0, |r| r.purge_batch)
                    .max(2 * inputs.len())
                    .max(64);
                report.pressure_events = l.purge_events(u64::MAX, limit)?;
                l.add_meta("evicted_events", report.pressure_events as u64)?;
                if pressure == Pressure::Hard && report.pressure_events == 0 {
                    report.dropped_dedup_keys = l.drop_oldest_dedup(limit)?;
                    l.add_meta("dropped_dedup_keys", report.dropped_dedup_keys)?;
                    if report.dropped_dedup_keys == 0 {
                        let (s, a) = l.drop_oldest_outbox(DROP_BATCH)?;
                        report.dropped_summaries = s;
                        report.dropped_alerts = a;
                    }
                }
            }
            for n in &care_changes.notices {
                tracing::info!(alias = %n.alias, state = n.state.as_str(), silent_secs = n.silent_secs, "care watch notice");
                let rec = encode(&OutboxRecordV1 {
                    topic: OutboxTopic::Care,
                    window: None,
                    created_ms: now_ms,
                    payload: care_json(&engine.gateway, n),
                });
                let seq = l.next_seq();
                l.outbox.insert((CLASS_ALERT, seq), rec.as_slice())?;
                l.bytes += 9 + rec.len() as i64;
                l.emitted += 1;
            }
            l.bytes += care_store::write(&txn, &care_changes)?;
            presence_staged = super::presence::stage(
                &self.mem.presence,
                self.presence_lost,
                &std::mem::take(&mut l.presence_hits),
                maintain
                    .and(self.occupancy)
                    .map(|o| (now_ms, o.max_stay_ms, o.forget_ms)),
                self.stocktake,
            );
            l.bytes += super::presence::write(&txn, &mut l.meta, &presence_staged)?;
            if let (Some(_), Some(o)) = (maintain, self.occupancy) {
                // Once per window (contract: "Vehicles inside"), at the window's boundary.
                let w = engine.window.window_ms.max(1) as i64;
                let boundary = now_ms.div_euclid(w) * w;
                if boundary > self.occupancy_sent {
                    let p = presence_staged.next.as_ref().unwrap_or(&self.mem.presence);
                    let msg = zhian_proto::Occupancy {
                        schema: zhian_proto::OccupancyV1,
                        gateway: engine.gateway.clone(),
                        site: engine.site.clone(),
                        at: zhian_proto::Timestamp(boundary),
                        inside: p.inside(),
                        capacity: o.capacity.map(u64::from),
                        long_stay: p.long_stays(now_ms, o.long_stay_ms).len() as u64,
                        missed_exits: p.totals.missed_exits,
                    };
                    let rec = encode(&OutboxRecordV1 {
                        topic: OutboxTopic::Occupancy,
                        window: None,
                        created_ms: now_ms,
                        payload: zhian_proto::Message::to_bytes(&msg),
                    });
                    let seq = l.next_seq();
                    l.outbox.insert((CLASS_SUMMARY, seq), rec.as_slice())?;
                    l.bytes += 9 + rec.len() as i64;
                    l.emitted += 1;
                    l.meta
                        .insert(OCCUPANCY_SENT, (boundary as u64).to_le_bytes().as_slice())?;
                    occupancy_sent = Some(boundary);
                }
            }
            l.bytes += self.key_book.write(&txn)?;
            let mut seq = l.seq;
            l.bytes += days::write(&txn, &day_changes, || {
                seq += 1;
                seq - 1
            })?;
            l.seq = seq;
            let mut reserved = self.mem.seq_reserved;
            if l.seq >= reserved {
                reserved = l.seq + SEQ_BLOCK;
                l.meta
                    .insert("seq_reserved", reserved.to_le_bytes().as_slice())?;
            }
            report.emitted = l.emitted;
            Changes {
                dedup: std::mem::take(&mut l.dedup),
                open: std::mem::take(&mut l.open),
                next_seq: l.seq,
                seq_reserved: reserved,
                bytes: l.bytes,
            }
        };
        txn.commit()?;
        drop(guard);
        // Durable: now the memory may follow.
        for (h, v) in changes.dedup {
            match v {
                Some(t) => {
                    self.mem.dedup.insert(h, t);
                }
                None => {
                    self.mem.dedup.remove(&h);
                }
            }
        }
        for (start, open) in changes.open {
            if open {
                self.mem.open.insert(start);
            } else {
                self.mem.open.remove(&start);
            }
        }
        self.mem.devices.extend(seen);
        for key in &report.forgotten {
            self.mem.devices.remove(key);
            self.mem.device_marks.remove(key);
        }
        for (key, mark) in marks_changed {
            if mark.is_empty() {
                self.mem.device_marks.remove(&key);
            } else {
                self.mem.device_marks.insert(key, mark);
            }
        }
        self.staged_marks.clear();
        days::apply(&mut self.mem.days, day_changes);
        care_store::apply(&mut self.mem.care, care_changes);
        if let Some(next) = presence_staged.next {
            let missed = next.totals.missed_exits - self.mem.presence.totals.missed_exits;
            if missed > 0 {
                tracing::info!(
                    missed,
                    "vehicles inside: stays past occupancy.max_stay dropped as missed exits"
                );
            }
            self.mem.presence = next;
            self.stocktake = None;
            self.presence_lost = false;
        }
        if let Some(b) = occupancy_sent {
            self.occupancy_sent = b;
        }
        self.key_book.committed();
        {
            let (pending, since) = seen_pending;
            self.mem.devices_pending = pending;
            self.mem.devices_pending_since = since;
        }
        self.mem.next_seq = changes.next_seq;
        self.mem.seq_reserved = changes.seq_reserved;
        self.mem.row_bytes = (self.mem.row_bytes as i64 + changes.bytes).max(0) as u64;
        self.publish();
        Ok(report)
    }
}
