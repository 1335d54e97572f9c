//! The durable store: one redb file, written only by the committer.
//!
//! # What is on disk
//!
//! `<data_dir>/zhian.redb`, one redb database with these tables. Keys are fixed-width integers
//! (redb encodes them little-endian with explicit widths) or UTF-8 strings; every value that is
//! a record starts with a one-byte record version followed by the record in postcard (serde,
//! varint integers, stable documented wire format). A reader that meets a version it does not
//! know refuses to guess.
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | `&str` name | bytes: `format` (u32 LE, store format, now 1), `subject_key` (32 random bytes, the BLAKE3 key for hashed subjects), `next_seq` (u64 LE), `dropped_summaries`, `dropped_alerts` (u64 LE) |
//! | `events` | `(u64 received_ms, u64 seq)` | v1 [`EventRecordV1`]: the raw accepted event, subject hashed/dropped/plain per `privacy.subjects` |
//! | `dedup` | `&str` "kind\0device\0id" | `i64` ms when first accepted |
//! | `dedup_by_time` | `(i64 first_seen_ms, &str key)` | `()`: the purge index of `dedup` |
//! | `windows` | `i64` window start ms | v1 [`WindowState`]: counts per (kind, device, action, result) and the last issued rev |
//! | `open_windows` | `i64` window start ms | `()`: windows not yet summarised |
//! | `outbox` | `(u8 class, u64 seq)` | v1 [`OutboxRecordV1`]: an upstream message waiting for its PUBACK; class 0 alerts, 1 summaries, so alerts go first |
//! | `counters` | `&str` "kind\0device\0point" | v1 [`CounterRecordV1`]: the last committed value of a Modbus counter, written in the same transaction as the counts it produced |
//! | `states` | `&str` "kind\0device\0point" | v1 [`StateRecordV1`]: the latest value of a Modbus state point and when it last changed |
//!
//! # Invariants
//! - One write transaction per batch holds the batch's raw events, dedup keys, window counts,
//!   outbox entries and the deletions of acknowledged outbox entries, so after a power cut they
//!   agree. Commits use `Durability::Immediate` (fsync) with quick repair.
//! - An outbox entry is deleted only after the forwarder saw the upstream PUBACK for it.
//! - Maintenance (expired dedup keys, raw events past retention, forgotten windows) deletes a
//!   bounded number of rows per commit.

use crate::config::SubjectMode;
use crate::core::counter::Value;
use crate::core::engine::{Emit, Engine, Input, Ledger, Outcome};
use crate::core::event::{Event, Kind};
use crate::core::summary::WindowState;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("events");
const DEDUP: TableDefinition<&str, i64> = TableDefinition::new("dedup");
const DEDUP_BY_TIME: TableDefinition<(i64, &str), ()> = TableDefinition::new("dedup_by_time");
const WINDOWS: TableDefinition<i64, &[u8]> = TableDefinition::new("windows");
const OPEN_WINDOWS: TableDefinition<i64, ()> = TableDefinition::new("open_windows");
const OUTBOX: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("outbox");
const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("states");

/// The store format this build writes and reads.
pub const FORMAT: u32 = 1;
const RECORD_V1: u8 = 1;
/// File name inside the data dir.
pub const FILE_NAME: &str = "zhian.redb";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Db(#[from] redb::Error),
    #[error("store: cannot create data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: record in table {table} has unknown version {version}")]
    Version { table: &'static str, version: u8 },
    #[error("store: corrupt record in table {table}: {source}")]
    Decode {
        table: &'static str,
        source: postcard::Error,
    },
    #[error("store: format {0:#x} is not the one this build reads ({FORMAT}); use the zhian-gateway that wrote it, or move the data dir aside")]
    Format(u32),
    #[error("store: cannot read random bytes for the subject key: {0}")]
    Random(String),
    #[error("store: opened read-only")]
    ReadOnly,
    #[error("store: {} does not exist", .0.display())]
    Missing(PathBuf),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

/// Where the outbox stands in line: class 0 alerts, then class 1 summaries, each by sequence.
pub type OutboxKey = (u8, u64);
pub const CLASS_ALERT: u8 = 0;
pub const CLASS_SUMMARY: u8 = 1;

/// A subject as kept on the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredSubject {
    None,
    /// First 16 bytes of BLAKE3 keyed with the box's `subject_key`.
    Hashed([u8; 16]),
    Plain(String),
}

/// Raw accepted event, record version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecordV1 {
    pub kind: Kind,
    pub device: String,
    pub id: String,
    pub ts_ms: i64,
    pub action: String,
    pub result: String,
    pub subject: StoredSubject,
}

/// What an outbox message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxTopic {
    Summary,
    Alert,
}

impl OutboxTopic {
    /// The last topic level: `{prefix}/{gateway}/{suffix}`.
    pub fn suffix(self) -> &'static str {
        match self {
            OutboxTopic::Summary => "summary",
            OutboxTopic::Alert => "alert",
        }
    }
}

/// An upstream message waiting for its PUBACK, record version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecordV1 {
    pub topic: OutboxTopic,
    /// Window start and rev, for summaries (status page: oldest pending window).
    pub window: Option<(i64, u32)>,
    pub created_ms: i64,
    pub payload: Vec<u8>,
}

/// The last committed value of a Modbus counter, record version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRecordV1 {
    pub value: i64,
    pub at_ms: i64,
}

/// A Modbus state point, record version 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StateRecordV1 {
    pub value: Value,
    /// When the value last changed (or was first read).
    pub since_ms: i64,
    /// When it was last read.
    pub seen_ms: i64,
}

/// A state reading to keep: `key` is "kind\0device\0point".
#[derive(Debug, Clone, PartialEq)]
pub struct StateUpdate {
    pub key: String,
    pub value: Value,
    pub ts_ms: i64,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![RECORD_V1];
    out.extend(postcard::to_allocvec(v).expect("records serialize"));
    out
}

fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&RECORD_V1, rest)) => {
            postcard::from_bytes(rest).map_err(|source| StoreError::Decode { table, source })
        }
        Some((&version, _)) => Err(StoreError::Version { table, version }),
        None => Err(StoreError::Version { table, version: 0 }),
    }
}

/// Retention and purge settings the committer applies each maintenance pass.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub dedup_ttl_ms: u64,
    pub raw_retention_ms: u64,
    /// Most rows of each kind deleted per maintenance pass.
    pub purge_batch: usize,
    /// How hard the store presses against `store.max_size` right now.
    pub pressure: Pressure,
}

/// Disk pressure: what maintenance gives up to keep the store under `store.max_size`.
///
/// redb reuses freed pages, so the file stops growing once old rows are deleted; its size is a
/// high-water mark. Pressure is therefore measured on growth: when the file grows past 80 % of
/// the bound, the oldest raw events go (beyond those already past retention); past 95 %, or at
/// the bound, pending upstream messages are dropped too once no raw event is left, oldest first,
/// and counted (the heartbeat carries the counts). Dedup keys and windows are never dropped:
/// they are what keeps counts exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pressure {
    #[default]
    None,
    /// Delete the oldest raw events.
    Raw,
    /// Delete the oldest raw events; with none left, drop the oldest pending messages.
    Outbox,
}

impl Pressure {
    /// The pressure for a file of `file` bytes that was `last` bytes at the previous check.
    pub fn of(file: u64, last: u64, max: u64) -> Pressure {
        let grew = file > last;
        if file >= max || (grew && file >= max / 100 * 95) {
            Pressure::Outbox
        } else if grew && file >= max / 100 * 80 {
            Pressure::Raw
        } else {
            Pressure::None
        }
    }
}

/// Pending messages dropped per maintenance pass under `Pressure::Outbox`.
const DROP_BATCH: usize = 64;

/// What one commit did.
#[derive(Debug, Default, Clone)]
pub struct CommitReport {
    pub outcomes: Vec<Outcome>,
    pub emitted: usize,
    pub deleted_outbox: usize,
    pub purged_dedup: usize,
    pub purged_events: usize,
    /// Raw events deleted early, and pending messages dropped, because of disk pressure.
    pub pressure_events: usize,
    pub dropped_summaries: u64,
    pub dropped_alerts: u64,
}

/// A read of the store for the status page, heartbeat and `inspect`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overview {
    pub pending_summaries: u64,
    pub pending_alerts: u64,
    pub oldest_pending_window_ms: Option<i64>,
    pub open_windows: u64,
    pub dedup_keys: u64,
    pub raw_events: u64,
    pub dropped_summaries: u64,
    pub dropped_alerts: u64,
    pub file_bytes: u64,
}

/// The database, opened for the daemon (read-write) or for `inspect` (read-only).
enum Db {
    ReadWrite(Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

pub struct Store {
    db: Db,
    path: PathBuf,
    subject_key: [u8; 32],
    subjects: SubjectMode,
    /// Next outbox/event sequence number; the lock also serialises writers (only the committer).
    next_seq: std::sync::Mutex<u64>,
}

impl Store {
    /// Open (or create) the store in `data_dir`.
    pub fn open(data_dir: &Path, subjects: SubjectMode) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(32 << 20)
            .set_repair_callback(|s| {
                tracing::warn!(
                    progress = s.progress(),
                    "store: repairing after an unclean shutdown"
                );
            })
            .create(&path)?;
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(true);
        let (subject_key, next_seq) = {
            let mut meta = txn.open_table(META)?;
            let format: Option<Result<u32, usize>> = meta.get("format")?.map(|f| {
                let v = f.value();
                v.try_into().map(u32::from_le_bytes).map_err(|_| v.len())
            });
            match format {
                None => {}
                Some(Ok(v)) if v == FORMAT => {}
                Some(Ok(v)) => return Err(StoreError::Format(v)),
                Some(Err(len)) => return Err(StoreError::Format(len as u32 | 0x8000_0000)),
            }
            meta.insert("format", FORMAT.to_le_bytes().as_slice())?;
            let existing: Option<[u8; 32]> = meta
                .get("subject_key")?
                .and_then(|k| k.value().try_into().ok());
            let key = match existing {
                Some(k) => k,
                None => {
                    let mut k = [0u8; 32];
                    getrandom::fill(&mut k).map_err(|e| StoreError::Random(e.to_string()))?;
                    meta.insert("subject_key", k.as_slice())?;
                    k
                }
            };
            let seq = read_u64(&meta, "next_seq")?;
            // Create every table so readers never meet a missing one.
            txn.open_table(EVENTS)?;
            txn.open_table(DEDUP)?;
            txn.open_table(DEDUP_BY_TIME)?;
            txn.open_table(WINDOWS)?;
            txn.open_table(OPEN_WINDOWS)?;
            txn.open_table(OUTBOX)?;
            txn.open_table(COUNTERS)?;
            txn.open_table(STATES)?;
            (key, seq)
        };
        txn.commit()?;
        Ok(Store {
            db: Db::ReadWrite(db),
            path,
            subject_key,
            subjects,
            next_seq: std::sync::Mutex::new(next_seq),
        })
    }

    /// Open an existing store read-only (`inspect`): fails while a daemon has it open.
    pub fn open_read_only(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join(FILE_NAME);
        if !path.exists() {
            return Err(StoreError::Missing(path));
        }
        let db = redb::ReadOnlyDatabase::open(&path)?;
        let (subject_key, next_seq) = {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            ([0u8; 32], read_u64(&meta, "next_seq")?)
        };
        Ok(Store {
            db: Db::ReadOnly(db),
            path,
            subject_key,
            subjects: SubjectMode::Drop,
            next_seq: std::sync::Mutex::new(next_seq),
        })
    }

    fn read(&self) -> Result<redb::ReadTransaction, redb::TransactionError> {
        match &self.db {
            Db::ReadWrite(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the store file in bytes.
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// One write transaction: decide `events` with `engine` at `now_ms`, delete the outbox
    /// entries in `acked`, and, when `maintain`, purge expired rows (bounded).
    pub fn commit(
        &self,
        engine: &Engine,
        events: &[&Event],
        acked: &[OutboxKey],
        now_ms: i64,
        maintain: Option<&Retention>,
    ) -> Result<CommitReport, StoreError> {
        let inputs: Vec<Input> = events.iter().map(|e| Input::Event(e)).collect();
        self.commit_inputs(engine, &inputs, &[], acked, now_ms, maintain)
    }

    /// As [`Store::commit`], for events and Modbus counter readings in arrival order, plus
    /// Modbus state values, all in the same transaction.
    pub fn commit_inputs(
        &self,
        engine: &Engine,
        inputs: &[Input],
        states: &[StateUpdate],
        acked: &[OutboxKey],
        now_ms: i64,
        maintain: Option<&Retention>,
    ) -> Result<CommitReport, StoreError> {
        let mut next_seq = self.next_seq.lock().expect("seq lock");
        let Db::ReadWrite(db) = &self.db else {
            return Err(StoreError::ReadOnly);
        };
        let mut txn = db.begin_write()?;
        txn.set_quick_repair(true);
        let mut report = CommitReport::default();
        let mut seq = *next_seq;
        {
            let mut ledger = TxLedger {
                meta: txn.open_table(META)?,
                events: txn.open_table(EVENTS)?,
                dedup: txn.open_table(DEDUP)?,
                dedup_by_time: txn.open_table(DEDUP_BY_TIME)?,
                windows: txn.open_table(WINDOWS)?,
                open: txn.open_table(OPEN_WINDOWS)?,
                outbox: txn.open_table(OUTBOX)?,
                counters: txn.open_table(COUNTERS)?,
                states: txn.open_table(STATES)?,
                seq: &mut seq,
                subjects: self.subjects,
                subject_key: &self.subject_key,
                now_ms,
                emitted: 0,
            };
            for key in acked {
                if ledger.outbox.remove(*key)?.is_some() {
                    report.deleted_outbox += 1;
                }
            }
            report.outcomes = engine.apply_inputs(&mut ledger, inputs.iter().copied(), now_ms)?;
            for st in states {
                ledger.put_state(st)?;
            }
            if let Some(r) = maintain {
                // apply() already closed due windows; maintenance also covers idle periods.
                engine.close_due(&mut ledger, now_ms)?;
                report.purged_dedup =
                    ledger.purge_dedup(now_ms - r.dedup_ttl_ms as i64, r.purge_batch)?;
                report.purged_events = ledger.purge_events(
                    now_ms.saturating_sub(r.raw_retention_ms as i64).max(0) as u64,
                    r.purge_batch,
                )?;
                ledger.forget_windows(engine.window.forget_before(now_ms), r.purge_batch)?;
                if r.pressure != Pressure::None {
                    report.pressure_events = ledger.purge_events(u64::MAX, r.purge_batch)?;
                    if r.pressure == Pressure::Outbox && report.pressure_events == 0 {
                        let (s, a) = ledger.drop_oldest_outbox(DROP_BATCH)?;
                        report.dropped_summaries = s;
                        report.dropped_alerts = a;
                    }
                }
            }
            report.emitted = ledger.emitted;
            ledger
                .meta
                .insert("next_seq", seq.to_le_bytes().as_slice())?;
        }
        txn.commit()?;
        *next_seq = seq;
        Ok(report)
    }

    /// Whether a maintenance commit would do anything: a window is due, or rows have expired.
    /// A read transaction only, so an idle gateway does not write (flash wear).
    pub fn maintenance_due(
        &self,
        engine: &Engine,
        r: &Retention,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let txn = self.read()?;
        let w = engine.window;
        let due_start = now_ms - w.window_ms as i64 - w.grace_ms as i64;
        if txn
            .open_table(OPEN_WINDOWS)?
            .range(..=due_start)?
            .next()
            .is_some()
        {
            return Ok(true);
        }
        if txn
            .open_table(DEDUP_BY_TIME)?
            .range(..(now_ms - r.dedup_ttl_ms as i64, ""))?
            .next()
            .is_some()
        {
            return Ok(true);
        }
        let raw_cut = now_ms.saturating_sub(r.raw_retention_ms as i64).max(0) as u64;
        if txn
            .open_table(EVENTS)?
            .range(..(raw_cut, 0))?
            .next()
            .is_some()
        {
            return Ok(true);
        }
        let forget = engine.window.forget_before(now_ms);
        let open = txn.open_table(OPEN_WINDOWS)?;
        for row in txn.open_table(WINDOWS)?.range(..forget)? {
            if open.get(row?.0.value())?.is_none() {
                return Ok(true);
            }
        }
        Ok(false)
    }

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
        Ok(Overview {
            pending_summaries: total - pending_alerts,
            pending_alerts,
            oldest_pending_window_ms: oldest,
            open_windows: txn.open_table(OPEN_WINDOWS)?.len()?,
            dedup_keys: txn.open_table(DEDUP)?.len()?,
            raw_events: txn.open_table(EVENTS)?.len()?,
            dropped_summaries: read_u64(&meta, "dropped_summaries")?,
            dropped_alerts: read_u64(&meta, "dropped_alerts")?,
            file_bytes: self.file_bytes(),
        })
    }

    /// Number of entries in the outbox (cheap: redb keeps table lengths).
    pub fn outbox_len(&self) -> Result<u64, StoreError> {
        let txn = self.read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// Starts of the windows not yet summarised, oldest first.
    pub fn open_windows(&self) -> Result<Vec<i64>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(OPEN_WINDOWS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            out.push(row?.0.value());
        }
        Ok(out)
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

    /// Every Modbus counter's last committed value.
    pub fn counters(&self) -> Result<Vec<(String, CounterRecordV1)>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(COUNTERS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), decode("counters", v.value())?));
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
            out.push(decode("windows", v.value())?);
        }
        Ok(out)
    }

    /// All raw events, oldest first (tests and investigations).
    pub fn raw_events(&self) -> Result<Vec<EventRecordV1>, StoreError> {
        let txn = self.read()?;
        let t = txn.open_table(EVENTS)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(decode("events", v.value())?);
        }
        Ok(out)
    }
}

fn read_u64<T: ReadableTable<&'static str, &'static [u8]>>(
    t: &T,
    key: &str,
) -> Result<u64, StoreError> {
    Ok(t.get(key)?
        .and_then(|v| v.value().try_into().ok().map(u64::from_le_bytes))
        .unwrap_or(0))
}

/// The engine's view of one write transaction.
struct TxLedger<'t, 's> {
    meta: Table<'t, &'static str, &'static [u8]>,
    events: Table<'t, (u64, u64), &'static [u8]>,
    dedup: Table<'t, &'static str, i64>,
    dedup_by_time: Table<'t, (i64, &'static str), ()>,
    windows: Table<'t, i64, &'static [u8]>,
    open: Table<'t, i64, ()>,
    outbox: Table<'t, (u8, u64), &'static [u8]>,
    counters: Table<'t, &'static str, &'static [u8]>,
    states: Table<'t, &'static str, &'static [u8]>,
    seq: &'s mut u64,
    subjects: SubjectMode,
    subject_key: &'s [u8; 32],
    now_ms: i64,
    emitted: usize,
}

impl TxLedger<'_, '_> {
    fn put_state(&mut self, st: &StateUpdate) -> Result<(), StoreError> {
        let prev: Option<StateRecordV1> = match self.states.get(st.key.as_str())? {
            Some(v) => Some(decode("states", v.value())?),
            None => None,
        };
        let since_ms = match prev {
            Some(p) if p.value == st.value => p.since_ms,
            _ => st.ts_ms,
        };
        let rec = StateRecordV1 {
            value: st.value,
            since_ms,
            seen_ms: st.ts_ms,
        };
        self.states
            .insert(st.key.as_str(), encode(&rec).as_slice())?;
        Ok(())
    }

    fn next_seq(&mut self) -> u64 {
        let s = *self.seq;
        *self.seq += 1;
        s
    }

    fn purge_dedup(&mut self, cutoff_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let mut doomed: Vec<(i64, String)> = Vec::new();
        for row in self.dedup_by_time.range(..(cutoff_ms, ""))? {
            let (k, _) = row?;
            let (t, key) = k.value();
            doomed.push((t, key.to_string()));
            if doomed.len() >= limit {
                break;
            }
        }
        for (t, key) in &doomed {
            self.dedup_by_time.remove((*t, key.as_str()))?;
            let current = self.dedup.get(key.as_str())?.map(|v| v.value());
            if current == Some(*t) {
                self.dedup.remove(key.as_str())?;
            }
        }
        Ok(doomed.len())
    }

    fn purge_events(&mut self, cutoff_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for row in self.events.range(..(cutoff_ms, 0))? {
            let (k, _) = row?;
            doomed.push(k.value());
            if doomed.len() >= limit {
                break;
            }
        }
        for k in &doomed {
            self.events.remove(*k)?;
        }
        Ok(doomed.len())
    }

    /// Drop up to `limit` of the oldest pending messages, summaries before alerts, and add them
    /// to the `dropped_*` counters. Returns (summaries, alerts) dropped.
    fn drop_oldest_outbox(&mut self, limit: usize) -> Result<(u64, u64), StoreError> {
        let mut doomed = Vec::new();
        for class in [CLASS_SUMMARY, CLASS_ALERT] {
            for row in self.outbox.range((class, 0)..=(class, u64::MAX))? {
                doomed.push(row?.0.value());
                if doomed.len() >= limit {
                    break;
                }
            }
            if doomed.len() >= limit {
                break;
            }
        }
        let (mut s, mut a) = (0, 0);
        for k in &doomed {
            self.outbox.remove(*k)?;
            if k.0 == CLASS_ALERT {
                a += 1;
            } else {
                s += 1;
            }
        }
        for (name, n) in [("dropped_summaries", s), ("dropped_alerts", a)] {
            if n > 0 {
                let total = read_u64(&self.meta, name)? + n;
                self.meta.insert(name, total.to_le_bytes().as_slice())?;
            }
        }
        Ok((s, a))
    }

    /// Forget summarised windows that start before `before_ms`. Open windows are never
    /// forgotten: they are summarised first.
    fn forget_windows(&mut self, before_ms: i64, limit: usize) -> Result<usize, StoreError> {
        let mut doomed = Vec::new();
        for row in self.windows.range(..before_ms)? {
            let (k, _) = row?;
            let start = k.value();
            if self.open.get(start)?.is_none() {
                doomed.push(start);
                if doomed.len() >= limit {
                    break;
                }
            }
        }
        for k in &doomed {
            self.windows.remove(*k)?;
        }
        Ok(doomed.len())
    }
}

impl Ledger for TxLedger<'_, '_> {
    type Error = StoreError;

    fn first_seen(&mut self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.dedup.get(key)?.map(|v| v.value()))
    }

    fn remember(
        &mut self,
        key: &str,
        now_ms: i64,
        previous: Option<i64>,
    ) -> Result<(), StoreError> {
        if let Some(p) = previous {
            self.dedup_by_time.remove((p, key))?;
        }
        self.dedup.insert(key, now_ms)?;
        self.dedup_by_time.insert((now_ms, key), ())?;
        Ok(())
    }

    fn record(&mut self, e: &Event, now_ms: i64) -> Result<(), StoreError> {
        let subject = match (&e.subject, self.subjects) {
            (None, _) | (Some(_), SubjectMode::Drop) => StoredSubject::None,
            (Some(s), SubjectMode::Plain) => StoredSubject::Plain(s.clone()),
            (Some(s), SubjectMode::Hashed) => {
                let h = blake3::keyed_hash(self.subject_key, s.as_bytes());
                let mut short = [0u8; 16];
                short.copy_from_slice(&h.as_bytes()[..16]);
                StoredSubject::Hashed(short)
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
        let seq = self.next_seq();
        self.events
            .insert((now_ms.max(0) as u64, seq), encode(&rec).as_slice())?;
        Ok(())
    }

    fn window(&mut self, start_ms: i64) -> Result<Option<WindowState>, StoreError> {
        match self.windows.get(start_ms)? {
            Some(v) => Ok(Some(decode("windows", v.value())?)),
            None => Ok(None),
        }
    }

    fn put_window(&mut self, w: &WindowState) -> Result<(), StoreError> {
        self.windows.insert(w.start_ms, encode(w).as_slice())?;
        if w.issued.is_none() {
            self.open.insert(w.start_ms, ())?;
        } else {
            self.open.remove(w.start_ms)?;
        }
        Ok(())
    }

    fn open_windows_until(&mut self, max_start: i64) -> Result<Vec<i64>, StoreError> {
        let mut out = Vec::new();
        for row in self.open.range(..=max_start)? {
            out.push(row?.0.value());
        }
        Ok(out)
    }

    fn counter(&mut self, key: &str) -> Result<Option<i64>, StoreError> {
        match self.counters.get(key)? {
            Some(v) => Ok(Some(
                decode::<CounterRecordV1>("counters", v.value())?.value,
            )),
            None => Ok(None),
        }
    }

    fn set_counter(&mut self, key: &str, value: i64, now_ms: i64) -> Result<(), StoreError> {
        let rec = CounterRecordV1 {
            value,
            at_ms: now_ms,
        };
        self.counters.insert(key, encode(&rec).as_slice())?;
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
        self.outbox.insert((class, seq), encode(&rec).as_slice())?;
        self.emitted += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::summary::Site;
    use crate::core::window::WindowCfg;

    fn engine() -> Engine {
        Engine {
            window: WindowCfg {
                window_ms: 10_000,
                grace_ms: 1_000,
                max_lateness_ms: 3_600_000,
                max_future_skew_ms: 60_000,
            },
            dedup_ttl_ms: 600_000,
            gateway: "gw".into(),
            site: Site::default(),
            alert_actions: vec!["fire_lane_blocked".into()],
        }
    }

    fn ev(id: &str, ts: i64) -> Event {
        Event {
            kind: Kind::Access,
            device: "door-1".into(),
            id: id.into(),
            ts_ms: ts,
            action: "entry".into(),
            result: "granted".into(),
            subject: Some("card:88213".into()),
        }
    }

    #[test]
    fn batch_survives_reopen_and_dedups_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let en = engine();
        let now = 1_000_000_000;
        {
            let s = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
            let (a, b) = (ev("a", now), ev("b", now));
            let r = s.commit(&en, &[&a, &b, &a], &[], now, None).unwrap();
            assert_eq!(
                r.outcomes,
                vec![Outcome::Accepted, Outcome::Accepted, Outcome::Duplicate]
            );
        }
        let s = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        let a = ev("a", now);
        let r = s.commit(&en, &[&a], &[], now + 1, None).unwrap();
        assert_eq!(r.outcomes, vec![Outcome::Duplicate]);
        // Window closes: one summary in the outbox, n = 2.
        let r = s.commit(&en, &[], &[], now + 20_000, None).unwrap();
        assert_eq!(r.emitted, 1);
        let out = s.outbox_after(CLASS_SUMMARY, None, 10).unwrap();
        assert_eq!(out.len(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out[0].1.payload).unwrap();
        assert_eq!(v["counts"][0]["n"], 2);
        // Acknowledged entries go.
        s.commit(&en, &[], &[out[0].0], now + 21_000, None).unwrap();
        assert_eq!(s.outbox_len().unwrap(), 0);
        // Subjects are hashed on disk.
        let raw = s.raw_events().unwrap();
        assert_eq!(raw.len(), 2);
        assert!(matches!(raw[0].subject, StoredSubject::Hashed(_)));
        let bytes = std::fs::read(s.path()).unwrap();
        assert!(!bytes.windows(10).any(|w| w == b"card:88213"));
    }

    #[test]
    fn maintenance_purges_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let en = engine();
        let s = Store::open(dir.path(), SubjectMode::Drop).unwrap();
        let now = 1_000_000_000;
        let evs: Vec<Event> = (0..50).map(|i| ev(&i.to_string(), now)).collect();
        let refs: Vec<&Event> = evs.iter().collect();
        s.commit(&en, &refs, &[], now, None).unwrap();
        let ret = Retention {
            dedup_ttl_ms: 600_000,
            raw_retention_ms: 1_000,
            purge_batch: 20,
            pressure: Pressure::None,
        };
        let later = now + 700_000;
        let r = s.commit(&en, &[], &[], later, Some(&ret)).unwrap();
        assert_eq!((r.purged_dedup, r.purged_events), (20, 20));
        let r = s.commit(&en, &[], &[], later, Some(&ret)).unwrap();
        assert_eq!((r.purged_dedup, r.purged_events), (20, 20));
        let r = s.commit(&en, &[], &[], later, Some(&ret)).unwrap();
        assert_eq!((r.purged_dedup, r.purged_events), (10, 10));
        let o = s.overview().unwrap();
        assert_eq!((o.dedup_keys, o.raw_events), (0, 0));
        // After the TTL the same id counts again.
        let again = ev("0", later);
        let r = s.commit(&en, &[&again], &[], later, None).unwrap();
        assert_eq!(r.outcomes, vec![Outcome::Accepted]);
    }

    #[test]
    fn counter_values_and_counts_commit_together_across_reopen() {
        use crate::core::counter::{Step, Width};
        use crate::core::engine::CounterReading;
        let dir = tempfile::tempdir().unwrap();
        let en = engine();
        let now = 1_000_000_000;
        let reading = |value: i64| CounterReading {
            kind: Kind::Vehicle,
            device: "gate-1".into(),
            point: "in_count".into(),
            action: "entry".into(),
            result: "ok".into(),
            value,
            width: Width::U16,
            wrap: true,
            ts_ms: now,
        };
        let commit = |s: &Store, v: i64| {
            let r = reading(v);
            let st = StateUpdate {
                key: "vehicle\0gate-1\0barrier".into(),
                value: Value::Bool(v % 2 == 0),
                ts_ms: now,
            };
            s.commit_inputs(&en, &[Input::Counter(&r)], &[st], &[], now, None)
                .unwrap()
                .outcomes
        };
        {
            let s = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
            assert_eq!(commit(&s, 65_530), vec![Outcome::Counted(Step::Baseline)]);
            assert_eq!(
                commit(&s, 65_535),
                vec![Outcome::Counted(Step::Increase(5))]
            );
        }
        let s = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        assert_eq!(commit(&s, 4), vec![Outcome::Counted(Step::Wrapped(5))]);
        let w = s.windows().unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].total(), 10);
        assert_eq!(s.counters().unwrap()[0].1.value, 4);
        let states = s.states().unwrap();
        assert_eq!(states[0].1.value, Value::Bool(true));
    }

    #[test]
    fn pressure_levels() {
        let max = 1000;
        assert_eq!(Pressure::of(500, 400, max), Pressure::None);
        assert_eq!(Pressure::of(850, 800, max), Pressure::Raw);
        assert_eq!(Pressure::of(850, 850, max), Pressure::None);
        assert_eq!(Pressure::of(960, 900, max), Pressure::Outbox);
        assert_eq!(Pressure::of(1000, 1000, max), Pressure::Outbox);
    }

    #[test]
    fn pressure_drops_raw_events_first_then_counts_dropped_messages() {
        let dir = tempfile::tempdir().unwrap();
        let en = engine();
        let s = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        let now = 1_000_000_000;
        let evs: Vec<Event> = (0..30).map(|i| ev(&i.to_string(), now)).collect();
        let refs: Vec<&Event> = evs.iter().collect();
        s.commit(&en, &refs, &[], now, None).unwrap();
        // Two closed windows -> two pending summaries.
        s.commit(&en, &[&ev("x", now + 20_000)], &[], now + 20_000, None)
            .unwrap();
        s.commit(&en, &[], &[], now + 40_000, None).unwrap();
        assert_eq!(s.overview().unwrap().pending_summaries, 2);
        let r = Retention {
            dedup_ttl_ms: 600_000,
            raw_retention_ms: 3_600_000,
            purge_batch: 20,
            pressure: Pressure::Outbox,
        };
        let first = s.commit(&en, &[], &[], now + 40_000, Some(&r)).unwrap();
        assert_eq!((first.pressure_events, first.dropped_summaries), (20, 0));
        let second = s.commit(&en, &[], &[], now + 40_000, Some(&r)).unwrap();
        assert_eq!((second.pressure_events, second.dropped_summaries), (11, 0));
        let third = s.commit(&en, &[], &[], now + 40_000, Some(&r)).unwrap();
        assert_eq!((third.pressure_events, third.dropped_summaries), (0, 2));
        let o = s.overview().unwrap();
        assert_eq!(
            (o.raw_events, o.pending_summaries, o.dropped_summaries),
            (0, 0, 2)
        );
        // Dedup keys survive pressure: the same ids are still duplicates.
        let out = s
            .commit(&en, &[&ev("3", now + 40_000)], &[], now + 40_000, None)
            .unwrap();
        assert_eq!(out.outcomes, vec![Outcome::Duplicate]);
    }

    #[test]
    fn alerts_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let en = engine();
        let s = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        let now = 1_000_000_000;
        s.commit(&en, &[&ev("a", now)], &[], now, None).unwrap();
        s.commit(&en, &[], &[], now + 20_000, None).unwrap();
        let mut cam = ev("c", now + 20_000);
        cam.kind = Kind::Camera;
        cam.action = "fire_lane_blocked".into();
        s.commit(&en, &[&cam], &[], now + 20_000, None).unwrap();
        let alerts = s.outbox_after(CLASS_ALERT, None, 10).unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].1.topic, OutboxTopic::Alert);
        let o = s.overview().unwrap();
        assert_eq!((o.pending_alerts, o.pending_summaries), (1, 1));
        assert_eq!(o.oldest_pending_window_ms, Some(en.window.start_of(now)));
    }
}
