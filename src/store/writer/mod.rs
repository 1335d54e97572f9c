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
        };
        w.load()?;
        Ok(w)
    }

    /// Whether an MQTT device ("kind\0device") is known: accepted before (this run or an
    /// earlier one) and not forgotten since.
    pub fn knows_device(&self, key: &str) -> bool {
        self.mem.devices.contains_key(key)
    }

    /// `health.max_devices`: a batch that brings the table past it forgets the longest-silent
    /// devices in its own transaction ([`CommitReport::forgotten`]).
    pub fn set_max_devices(&mut self, max: usize) {
        self.max_devices = max.max(1);
    }

    /// The source mark a device is stored with ("" for none).
    pub fn device_mark(&self, key: &str) -> &str {
        self.mem.device_marks.get(key).map_or("", String::as_str)
    }

    /// The marks of the next batch's devices whose mark differs from the stored one; written
    /// with the batch for the devices it accepts (kept until a commit succeeds).
    pub fn stage_device_marks(&mut self, marks: HashMap<String, String>) {
        self.staged_marks = marks;
    }

    /// Every device in the table: key, last seen (ms) and source mark, by key.
    pub fn known_devices(&self) -> Vec<(String, i64, String)> {
        let mut out: Vec<(String, i64, String)> = self
            .mem
            .devices
            .iter()
            .map(|(k, t)| {
                let seen = self.mem.devices_pending.get(k).map_or(*t, |p| (*p).max(*t));
                (k.clone(), seen, self.device_mark(k).to_string())
            })
            .collect();
        out.sort();
        out
    }

    /// Forget devices (a source change, the installer): their rows go in a transaction of
    /// their own; the events they sent stay counted. Returns the keys that were known.
    pub fn forget_devices(&mut self, keys: &[String]) -> Result<Vec<String>, StoreError> {
        let known: Vec<String> = keys
            .iter()
            .filter(|k| self.mem.devices.contains_key(k.as_str()))
            .cloned()
            .collect();
        if known.is_empty() {
            return Ok(known);
        }
        let guard = self.store.db.read().expect("store lock");
        let txn = begin_immediate(guard.as_ref())?;
        let mut freed = 0u64;
        {
            let mut t = txn.open_table(DEVICES)?;
            let mut m = txn.open_table(DEVICE_SOURCES)?;
            for key in &known {
                if t.remove(key.as_str())?.is_some() {
                    freed += key.len() as u64 + 8;
                }
                if let Some(v) = m.remove(key.as_str())? {
                    freed += (key.len() + v.value().len()) as u64;
                }
            }
        }
        txn.commit()?;
        drop(guard);
        for key in &known {
            self.mem.devices.remove(key);
            self.mem.devices_pending.remove(key);
            self.mem.device_marks.remove(key);
        }
        if self.mem.devices_pending.is_empty() {
            self.mem.devices_pending_since = None;
        }
        self.mem.row_bytes = self.mem.row_bytes.saturating_sub(freed);
        Ok(known)
    }

    /// The care watch's residents (`[[care.residents]]`): a `subject` becomes its care
    /// pseudonym here (with the care key, made on first use); the plain subject is not kept.
    /// Residents whose pseudonym cannot be made are skipped, with a WARN.
    pub fn set_care(&mut self, residents: &[crate::config::CareResident]) {
        let mut list = Vec::new();
        for r in residents {
            let p = match (&r.subject, &r.pseudonym) {
                (Some(s), _) => self.keys.care_pseudonym(&s.0),
                (None, Some(p)) => crate::config::parse_pseudonym(p),
                (None, None) => None,
            };
            match p {
                Some(pseudonym) => list.push(Resident {
                    pseudonym,
                    alias: r.alias.clone(),
                    silence_ms: r.silence.0.as_millis() as i64,
                    quiet: r.quiet.as_deref().and_then(crate::core::care::Quiet::parse),
                }),
                None => {
                    tracing::warn!(alias = %r.alias, "care watch: no care key for this resident; not watched")
                }
            }
        }
        self.care_list = list;
        let orphans = self.key_book.orphans();
        let unmatched: Vec<String> = self
            .care_list
            .iter()
            .filter(|r| orphans.contains(&r.pseudonym))
            .map(|r| r.alias.clone())
            .collect();
        if !unmatched.is_empty() && unmatched != self.unmatched_logged {
            tracing::warn!(aliases = ?unmatched, "care watch: these residents are listed by a pseudonym made with the care key the key dir lost; it can never match again, so no silent notice is sent for them; relist them (a new pseudonym from `zhian-gateway care-pseudonym`, or by subject)");
        }
        self.unmatched_logged = unmatched;
    }

    /// Hold (or release) the care watch's silence checks.
    pub fn set_care_hold(&mut self, hold: bool) {
        self.care_hold = hold;
    }

    /// The care watch as it stands, for the page.
    pub fn care_overview(&self) -> Vec<crate::core::care::CareLine> {
        self.care_list
            .iter()
            .map(|r| {
                let st = self.mem.care.get(&r.pseudonym);
                crate::core::care::CareLine {
                    alias: r.alias.clone(),
                    last_seen_ms: st.filter(|s| s.seen_ever).map(|s| s.last_seen_ms),
                    silent: st.is_some_and(|s| s.silent),
                    silence_ms: r.silence_ms,
                    key_lost: self.key_book.orphans().contains(&r.pseudonym),
                }
            })
            .collect()
    }

    /// The care pseudonym of `subject` (for `zhian-gateway care-pseudonym`).
    pub fn care_pseudonym(&mut self, subject: &str) -> Option<[u8; 16]> {
        self.keys.care_pseudonym(subject)
    }

    /// The site's day rules (offset, grace, lateness, settle time) for the daily counts.
    pub fn set_day_cfg(&mut self, cfg: DayCfg) {
        self.day_cfg = cfg;
    }

    /// Hand the writer the pseudonym keys (from `privacy.key_dir`, opened at `now_ms`); until
    /// then it keeps memory-only keys. A key the store used that the key dir no longer has
    /// (emptied or replaced while the daemon was stopped) is logged at ERROR, once, and kept as
    /// lost (written with the next commit): the day's distinct sets then count per key
    /// ([`crate::core::daily::DaySets`]), and residents the care watch held under a lost care
    /// key are unmatched. Returns the lost keys' file names.
    pub fn set_subject_keys(&mut self, keys: SubjectKeys, now_ms: i64) -> Vec<String> {
        self.keys = keys;
        if !self.keys.persistent() {
            return Vec::new();
        }
        let lost = self
            .key_book
            .detect(&self.keys, self.mem.care.keys().copied(), now_ms);
        if !lost.is_empty() {
            tracing::error!(keys = ?lost, "the key dir lost keys the store had used (privacy.key_dir emptied or replaced while the daemon was stopped): the day's distinct count cannot link people across the loss (the daily message counts per key and says it spans several), and care residents listed by a pseudonym of a lost care key must be relisted; if the key dir was only moved, stop the daemon and put it back (a key found again before a new one was made is not lost)");
        }
        lost
    }

    /// Destroy the pseudonym keys past their life at `now_ms` (see [`crate::keys`]); their
    /// ids go from the store with the next commit.
    pub fn destroy_expired_keys(&mut self, now_ms: i64) -> usize {
        let n = self.keys.destroy_expired(now_ms);
        self.key_book.forget_expired(&self.keys, now_ms);
        n
    }

    /// The keys the key dir lost that still matter at `now_ms` (page, `/api/status`,
    /// metrics): a pseudonym key until its day can no longer change, the care key while
    /// residents keyed with it are listed.
    pub fn keys_lost(&self, now_ms: i64) -> Vec<crate::keys::KeyLoss> {
        self.key_book.losses(&self.keys, &self.care_list, now_ms)
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
        let (key_mem, key_bytes) = key_ids::load(&txn)?;
        self.key_book.set_committed(key_mem);
        bytes += key_bytes;
        let (day_mem, day_bytes, day_seq) = days::load(&txn)?;
        mem.days = day_mem;
        bytes += day_bytes;
        max_seq = max_seq.max(day_seq);
        let reserved = read_u64(&txn.open_table(META)?, "seq_reserved")?;
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
fn issue_days(
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

/// Check the format (migrating formats 1 and 2), make the dedup key and every table. One
/// commit.
fn prepare(db: &redb::Database) -> Result<[u8; 32], StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let key = {
        let mut meta = txn.open_table(META)?;
        let format: Option<Result<u32, usize>> = meta.get("format")?.map(|f| {
            let v = f.value();
            v.try_into().map(u32::from_le_bytes).map_err(|_| v.len())
        });
        let from = match format {
            None => FORMAT,
            Some(Ok(v @ (1 | 2 | FORMAT))) => v,
            Some(Ok(v)) => return Err(StoreError::Format(v)),
            Some(Err(len)) => return Err(StoreError::Format(len as u32 | 0x8000_0000)),
        };
        // Formats 1 and 2 kept one key, `subject_key`, for subjects and dedup hashes alike.
        // It stays the dedup key (so the held hashes still match), and the subjects hashed
        // with it are scrubbed below: the store then holds no key that reverses a subject.
        let legacy: Option<[u8; 32]> = meta
            .get("subject_key")?
            .and_then(|k| k.value().try_into().ok());
        let existing: Option<[u8; 32]> = meta
            .get("dedup_key")?
            .and_then(|k| k.value().try_into().ok());
        let key = match existing.or(legacy) {
            Some(k) => k,
            None => {
                let mut k = [0u8; 32];
                getrandom::fill(&mut k).map_err(|e| StoreError::Random(e.to_string()))?;
                k
            }
        };
        if existing.is_none() {
            meta.insert("dedup_key", key.as_slice())?;
        }
        if from == 1 {
            migrate_v1(&txn, &mut meta, &key)?;
        }
        if legacy.is_some() {
            meta.remove("subject_key")?;
            let scrubbed = scrub_hashed_subjects(&txn)?;
            tracing::info!(
                scrubbed,
                "store: the subject key left the store file; subjects hashed with it were removed from the raw events (pseudonym keys now live in privacy.key_dir)"
            );
        }
        if format != Some(Ok(FORMAT)) {
            meta.insert("format", FORMAT.to_le_bytes().as_slice())?;
        }
        key
    };
    // Create every table so readers never meet a missing one.
    txn.open_table(EVENTS)?;
    txn.open_table(DEDUP_LOG)?;
    txn.open_table(WINDOWS)?;
    txn.open_table(OUTBOX)?;
    txn.open_table(COUNTERS)?;
    txn.open_table(STATES)?;
    txn.open_table(DEVICES)?;
    txn.open_table(DEVICE_SOURCES)?;
    txn.open_table(days::DAYS)?;
    txn.open_table(days::DAY_SUBJECTS)?;
    txn.open_table(care_store::CARE)?;
    txn.open_table(key_ids::KEY_IDS)?;
    txn.commit()?;
    Ok(key)
}

/// Format 2 -> 3: rewrite every raw event whose subject was hashed with the old in-store key
/// without its subject. Returns how many rows changed.
fn scrub_hashed_subjects(txn: &redb::WriteTransaction) -> Result<usize, StoreError> {
    let mut events = txn.open_table(EVENTS)?;
    let mut changed: Vec<((u64, u64), Vec<u8>)> = Vec::new();
    for row in events.iter()? {
        let (k, v) = row?;
        let mut rec = decode_event(v.value())?;
        if matches!(rec.subject, StoredSubject::Hashed(_)) {
            rec.subject = StoredSubject::None;
            let bytes = match event_hash(v.value()) {
                Some(h) => encode_event(&rec, h),
                None => encode(&rec),
            };
            changed.push((k.value(), bytes));
        }
    }
    for (k, v) in &changed {
        events.insert(*k, v.as_slice())?;
    }
    Ok(changed.len())
}

/// Format 1 -> 2: dedup keys become hashes in `dedup_log`, the open-window index goes (the
/// windows say whether they are open), and the sequence counter becomes a reservation.
fn migrate_v1(
    txn: &redb::WriteTransaction,
    meta: &mut Table<&'static str, &'static [u8]>,
    key: &[u8; 32],
) -> Result<(), StoreError> {
    let mut by_time: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    let mut n = 0usize;
    {
        let old = txn.open_table(DEDUP_V1)?;
        for row in old.iter()? {
            let (k, v) = row?;
            by_time
                .entry(v.value())
                .or_default()
                .push(dedup_hash(key, k.value()));
            n += 1;
        }
    }
    let mut seq = read_u64(meta, "next_seq")?;
    {
        let mut log = txn.open_table(DEDUP_LOG)?;
        for (t, hashes) in by_time {
            log.insert((t, seq), pack_hashes(&hashes).as_slice())?;
            seq += 1;
        }
    }
    txn.delete_table(DEDUP_V1)?;
    txn.delete_table(DEDUP_BY_TIME_V1)?;
    txn.delete_table(OPEN_WINDOWS_V1)?;
    meta.remove("next_seq")?;
    meta.insert("seq_reserved", (seq + SEQ_BLOCK).to_le_bytes().as_slice())?;
    tracing::info!(dedup_keys = n, "store: migrated from format 1 to {FORMAT}");
    Ok(())
}

struct Changes {
    dedup: HashMapId<Option<i64>>,
    open: BTreeMap<i64, bool>,
    next_seq: u64,
    seq_reserved: u64,
    bytes: i64,
}

/// The engine's view of one write transaction, with an overlay on the writer's memory.
struct TxLedger<'t, 's> {
    meta: Table<'t, &'static str, &'static [u8]>,
    events: Table<'t, (u64, u64), &'static [u8]>,
    dedup_log: Table<'t, (i64, u64), &'static [u8]>,
    windows: Table<'t, i64, &'static [u8]>,
    outbox: Table<'t, (u8, u64), &'static [u8]>,
    counters: Table<'t, &'static str, &'static [u8]>,
    states: Table<'t, &'static str, &'static [u8]>,
    mem: &'s Mem,
    /// Dedup hashes this transaction added (`Some`) or removed (`None`).
    dedup: HashMapId<Option<i64>>,
    /// The hash of the event `remember` just accepted, for `record` to carry.
    new_hash: Option<u64>,
    dedup_ttl_ms: i64,
    /// Windows this transaction opened (`true`) or summarised (`false`).
    open: BTreeMap<i64, bool>,
    seq: u64,
    /// Change of row bytes.
    bytes: i64,
    subjects: SubjectMode,
    dedup_key: &'s [u8; 32],
    keys: &'s mut SubjectKeys,
    day_cfg: DayCfg,
    /// Pseudonyms of this batch's accepted access and vehicle events: (day, event time,
    /// vehicle, p); the event time names the key (and so its generation).
    day_subjects: Vec<(i64, i64, bool, crate::core::daily::Pseudonym)>,
    care_list: &'s [Resident],
    /// Access events of watched residents: (care pseudonym, event time).
    care_hits: Vec<(CarePseudonym, i64)>,
    now_ms: i64,
    emitted: usize,
}

impl TxLedger<'_, '_> {
    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    fn held(&self, h: u64) -> Option<i64> {
        match self.dedup.get(&h) {
            Some(v) => *v,
            None => self.mem.dedup.get(&h).copied(),
        }
    }

    fn is_open(&self, start: i64) -> bool {
        self.open
            .get(&start)
            .copied()
            .unwrap_or_else(|| self.mem.open.contains(&start))
    }

    fn add_meta(&mut self, name: &str, n: u64) -> Result<(), StoreError> {
        if n > 0 {
            let total = read_u64(&self.meta, name)? + n;
            self.meta.insert(name, total.to_le_bytes().as_slice())?;
        }
        Ok(())
    }

    fn put_state(&mut self, st: &StateUpdate) -> Result<(), StoreError> {
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
    fn drop_dedup_rows(&mut self, cutoff: Option<i64>, limit: usize) -> Result<usize, StoreError> {
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

    fn purge_dedup(&mut self, cutoff_ms: i64, limit: usize) -> Result<usize, StoreError> {
        self.drop_dedup_rows(Some(cutoff_ms), limit)
    }

    /// Under hard pressure: the oldest dedup hashes, whatever their age.
    fn drop_oldest_dedup(&mut self, limit: usize) -> Result<u64, StoreError> {
        Ok(self.drop_dedup_rows(None, limit)? as u64)
    }

    /// Delete up to `limit` raw events received before `cutoff_ms`. A hash one of them carries
    /// that is still within the dedup TTL moves to `dedup_log` (8 bytes instead of the row).
    fn purge_events(&mut self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
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
    fn drop_oldest_outbox(&mut self, limit: usize) -> Result<(u64, u64), StoreError> {
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
    fn forget_windows(&mut self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
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
