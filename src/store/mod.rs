//! The durable store: one redb file, written only by the committer's [`StoreWriter`].
//!
//! # What is on disk
//!
//! `<data_dir>/zhian.redb`, one redb database with the tables below. Keys are fixed-width
//! integers (redb encodes them little-endian with explicit widths) or UTF-8 strings; a value
//! that is a record starts with a one-byte record version followed by postcard
//! ([`records`]). Store format 3. Format 1 (before the flash work) and format 2 (which kept the
//! subject key in `meta`) are migrated in place on first open: format 2's key stays as the dedup
//! key, and the subjects hashed with it are removed from the raw events.
//!
//! | table | key | value | written |
//! |---|---|---|---|
//! | `meta` | `&str` name | `format` (u32 LE, now 3), `dedup_key` (32 random bytes: the BLAKE3 key for dedup hashes of event ids; formats 1-2 called it `subject_key` and also hashed subjects with it), `seq_reserved` (u64 LE: sequence numbers below it may be in use), `dropped_summaries`, `dropped_alerts`, `dropped_dedup_keys`, `evicted_events` (u64 LE) | at open, every millionth sequence number, when something is dropped |
//! | `events` | `(u64 received_ms, u64 seq)` | version 2: the event's dedup hash (u64 LE), then [`EventRecordV1`] in postcard: the raw accepted event, subject hashed/dropped/plain per `privacy.subjects` (version 1 rows, from format 1, carry no hash) | per batch, appended |
//! | `dedup_log` | `(i64 first_seen_ms, u64 seq)` | dedup hashes whose raw events were deleted (pressure, or a retention shorter than `dedup.ttl`) while the hash still counts, packed little-endian u64s | when raw events go early |
//! | `windows` | `i64` window start ms | v1 [`WindowState`]: counts per (kind, device, action, result) and the last issued rev (`None` while open) | per batch, the windows it touched |
//! | `outbox` | `(u8 class, u64 seq)` | v1 [`OutboxRecordV1`]: an upstream message waiting for its PUBACK; class 0 alerts, 1 summaries, so alerts go first; class 2 parked (the district broker kept refusing it) | when windows close, alerts, PUBACKs, parking |
//! | `counters` | `&str` "kind\0device\0point" | v2 [`CounterRecordV2`] (v1 [`CounterRecordV1`] still read): the last value of a Modbus counter that counted and a reading held by the glitch rule, written in the same transaction as the counts it produced | Modbus polls that moved |
//! | `states` | `&str` "kind\0device\0point" | v1 [`StateRecordV1`]: the latest value of a Modbus state point and when it last changed | Modbus polls that changed |
//! | `devices` | `&str` "kind\0device" | `i64`: when an event of this MQTT device was last accepted (ms), so devices known once stay known across restarts (contract: "Status page") | a new device at once (with any pending sightings); known ones together, at most every [`DEVICE_SEEN_EVERY_MS`]; deleted when the device is forgotten (at most `health.max_devices` rows: past it the longest silent goes, in the batch's transaction; a source change; the installer's `devices forget`) |
//! | `device_sources` | `&str` "kind\0device" | `&str`: the mark of the `[[mqtt.sources]]` entry the device was last learned through (a hash of its topic, `each`, `kind` and `device` rules); none for canonical topics (and for devices stored before this table existed). A device whose mark no longer names a configured source is forgotten (SIGHUP, start) | with the batch that learns the device or changes its source; deleted with the device |
//! | `days`, `day_subjects` | `i64` local day; `(i64 day, u64 seq)` | the daily distinct counts: a day's issue state; its distinct pseudonyms by key generation, 17 bytes each (`days.rs`) | when a day is touched, issued or final; per batch, appended |
//! | `care` | `&[u8]` care pseudonym | v1 care-watch state (`care.rs`) | when a watched resident passes or a notice is due |
//! | `presence` | `&[u8]` presence pseudonym (16 bytes) | v1 `PresenceRecordV1`: a vehicle's newest entry or exit (time, gate, plate masked to two and two characters, unmatched flag); totals in `meta` `presence_totals` (`presence.rs`), and `meta` `occupancy_sent` (u64 LE: the window boundary of the last `occupancy` message queued) | per batch, the vehicles it moved; maintenance, stays past `occupancy.max_stay`, the window's `occupancy` message |
//! | `key_ids` | `&str` key file name in `privacy.key_dir` | v1 `KeyRecordV1`: the ids (a BLAKE3 derivation, never the key) of the pseudonym or care keys used under that name, which one is in use, when a start found it lost, care pseudonyms keyed with a lost care key (`key_ids.rs`) | when a key is first used, found lost at start, or its life ends |
//!
//! A `plain` subject is stored sealed ([`StoredSubject::Sealed`]) with the key of the day it
//! arrived, destroyed after `store.raw_retention`: deleting a row does not wipe its bytes from
//! redb's free pages, destroying the key makes them unreadable.
//!
//! A hashed subject is the 16-byte pseudonym from [`crate::keys`]: keyed with the key of the
//! event's local day, which is never in this file (`privacy.key_dir`) and is destroyed once
//! that day can receive no more events.
//!
//! The store knows which keys it used, never the keys: `key_ids` holds 16-byte ids (BLAKE3's
//! key derivation under a fixed context, [`crate::keys::key_id`]), so a start that finds a key
//! it used missing from the key dir says so (ERROR, page, `/api/status`, `zhian_keys_lost`)
//! and counts the day's distinct subjects per key generation instead of twice.
//!
//! A dedup hash is the first 8 bytes of BLAKE3 keyed with `dedup_key` over
//! `"dedup\0" kind "\0" device "\0" id`. The writer holds every live hash in memory (built
//! from `events` and `dedup_log` at open, about 16-32 bytes per key), so a lookup never touches
//! the disk, and the raw event row itself is the durable dedup record: a batch appends to one
//! time-ordered table instead of one random B-tree leaf per event (the flash cost the field
//! notes measured: about 4 KiB per random key) and touches two tables in all (`events`,
//! `windows`; each table touched costs about 8 KB of copy-on-write pages per commit, measured).
//!
//! Beside the store the data dir may hold `zhian.redb.damaged-<UTC time>`: a store file that
//! could not be opened and was moved aside ([`damage`]).
//!
//! # Invariants
//! - Only [`StoreWriter`] writes, and there is one per open file: [`Store::open`] hands out the
//!   only one, and it is not `Clone`. [`Store`] is the read side (page, forwarder, inspect).
//! - One write transaction per batch holds the batch's raw events, dedup hashes, window counts,
//!   outbox entries and the deletions of acknowledged outbox entries, so after a power cut they
//!   agree. Commits use `Durability::Immediate` (fsync) without quick repair: an unclean file
//!   is repaired at the next open (redb's full repair) instead of paying allocator pages on
//!   every commit.
//! - The writer's memory (dedup hashes, open windows, next sequence number, live bytes) changes
//!   only after its transaction committed; a failed commit leaves it as it was.
//! - An outbox entry is deleted only after the forwarder saw the upstream PUBACK for it, or
//!   under disk pressure, counted.
//! - Maintenance (expired dedup hashes, raw events past retention, forgotten windows) deletes a
//!   bounded number of rows per commit.
//! - Every open checks the whole file (`set_check_integrity_on_open`): a damaged file fails to
//!   open (or redb panics, which is caught) instead of being trusted.

mod care;
#[cfg(test)]
mod crash;
pub mod damage;
mod days;
mod key_ids;
pub(crate) mod presence;
pub mod pressure;
mod reader;
pub mod records;
mod writer;

pub use pressure::{Pressure, Retention};
pub use reader::Overview;
pub use records::{
    CounterRecordV1, CounterRecordV2, EventRecordV1, OutboxRecordV1, OutboxTopic, StateRecordV1,
    StateUpdate, StoredSubject,
};
pub use writer::{CommitReport, OccupancyCfg, StoreWriter, DEVICE_SEEN_EVERY_MS};

use crate::core::summary::WindowState;
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::RwLock;

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const EVENTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("events");
pub(crate) const DEDUP_LOG: TableDefinition<(i64, u64), &[u8]> = TableDefinition::new("dedup_log");
pub(crate) const WINDOWS: TableDefinition<i64, &[u8]> = TableDefinition::new("windows");
pub(crate) const OUTBOX: TableDefinition<(u8, u64), &[u8]> = TableDefinition::new("outbox");
pub(crate) const COUNTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("counters");
pub(crate) const STATES: TableDefinition<&str, &[u8]> = TableDefinition::new("states");
pub(crate) const DEVICES: TableDefinition<&str, i64> = TableDefinition::new("devices");
pub(crate) const DEVICE_SOURCES: TableDefinition<&str, &str> =
    TableDefinition::new("device_sources");
// Format 1 tables, read once by the migration and then deleted.
pub(crate) const DEDUP_V1: TableDefinition<&str, i64> = TableDefinition::new("dedup");
pub(crate) const DEDUP_BY_TIME_V1: TableDefinition<(i64, &str), ()> =
    TableDefinition::new("dedup_by_time");
pub(crate) const OPEN_WINDOWS_V1: TableDefinition<i64, ()> = TableDefinition::new("open_windows");

/// The store format this build writes (it also reads and migrates formats 1 and 2).
pub const FORMAT: u32 = 3;
/// File name inside the data dir.
pub const FILE_NAME: &str = "zhian.redb";
/// redb's page cache (bytes). Dedup lookups never read the disk (the hashes are in memory) and
/// a batch touches two tables, so the cache holds little that is read again: 2 MiB keeps the
/// steady RSS down (BENCHMARKS.md: 16 MiB bought no throughput).
const CACHE_BYTES: usize = 2 << 20;

/// What can go wrong with the store. [`StoreError::disk_fault`] tells a full or failing disk
/// (pause and retry) from the rest.
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
    #[error("store: format {0:#x} is not one this build reads (1 to {FORMAT}); use the zhian-gateway that wrote it, or move the data dir aside")]
    Format(u32),
    #[error("store: cannot read random bytes for the dedup key: {0}")]
    Random(String),
    #[error("store: opened read-only")]
    ReadOnly,
    #[error("store: {} does not exist", .0.display())]
    Missing(PathBuf),
    #[error("store: {} is open in another process (stop the daemon first: systemctl stop zhian-gateway)", .0.display())]
    AlreadyOpen(PathBuf),
    #[error("store: {} is damaged: {reason}; move it aside (or set store.on_damage = \"quarantine\") and start again, or restore it from a backup", path.display())]
    Damaged { path: PathBuf, reason: String },
    #[error("store: {what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: not open (the writer is reopening it after a disk fault)")]
    Unavailable,
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
    redb::SetDurabilityError,
    redb::CompactionError
);

/// Why a commit failed, when the disk is to blame: intake pauses with this reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFault {
    /// ENOSPC or EDQUOT: `disk_full`.
    Full,
    /// Any other I/O error (EIO, EROFS, ...): `disk_error`.
    Error,
}

impl DiskFault {
    /// Why intake pauses for it.
    pub fn reason(self) -> crate::stats::PauseReason {
        match self {
            DiskFault::Full => crate::stats::PauseReason::DiskFull,
            DiskFault::Error => crate::stats::PauseReason::DiskError,
        }
    }
}

fn io_fault(e: &std::io::Error) -> DiskFault {
    // ENOSPC 28, EDQUOT 122 on Linux.
    match e.raw_os_error() {
        Some(28) | Some(122) => DiskFault::Full,
        _ if e.kind() == std::io::ErrorKind::StorageFull => DiskFault::Full,
        _ => DiskFault::Error,
    }
}

impl StoreError {
    /// The I/O error underneath, if any.
    fn io(&self) -> Option<&std::io::Error> {
        match self {
            StoreError::Db(redb::Error::Io(e)) => Some(e),
            StoreError::Io { source, .. } | StoreError::DataDir { source, .. } => Some(source),
            _ => None,
        }
    }

    /// A full or failing disk (or a handle redb poisoned after one): pause, reopen, retry.
    pub fn disk_fault(&self) -> Option<DiskFault> {
        if let Some(e) = self.io() {
            return Some(io_fault(e));
        }
        match self {
            StoreError::Db(redb::Error::PreviousIo) | StoreError::Unavailable => {
                Some(DiskFault::Error)
            }
            _ => None,
        }
    }
}

/// Figures the writer keeps current for the read side.
#[derive(Debug, Default)]
pub(crate) struct Figures {
    /// True while a writer owns the file (else readers compute these by scanning).
    pub live: AtomicBool,
    pub dedup_keys: AtomicU64,
    pub open_windows: AtomicU64,
}

/// The database, opened for the daemon (read-write) or for `inspect` (read-only).
pub(crate) enum Db {
    ReadWrite(Database),
    ReadOnly(redb::ReadOnlyDatabase),
}

/// The store's read side: cheap to share (`Arc<Store>`), never writes. The writer swaps the
/// database underneath after a disk fault; readers then see [`StoreError::Unavailable`] until
/// it is back.
pub struct Store {
    pub(crate) db: RwLock<Option<Db>>,
    path: PathBuf,
    data_dir: PathBuf,
    pub(crate) figures: Figures,
    /// For `inspect` of a file left unclean: the repaired temporary copy, removed on drop.
    _scratch: Option<tempfile::TempDir>,
}

impl Store {
    /// Open (or create) the store in `data_dir` for the daemon: the read side and the only
    /// writer. A file that cannot be opened is [`StoreError::Damaged`] (see [`damage`] for
    /// what the daemon does then); another process holding it is [`StoreError::AlreadyOpen`].
    pub fn open(
        data_dir: &Path,
        subjects: crate::config::SubjectMode,
    ) -> Result<(std::sync::Arc<Store>, StoreWriter), StoreError> {
        Self::open_with_ttl(data_dir, subjects, None)
    }

    /// As [`Store::open`], knowing `dedup.ttl` (ms): the writer then loads into memory only
    /// the dedup hashes of raw events received within the TTL before the newest one, instead
    /// of every raw event's (a week of backlog is mostly past the TTL: start-up reads less and
    /// the memory holds only the live keys).
    pub fn open_with_ttl(
        data_dir: &Path,
        subjects: crate::config::SubjectMode,
        dedup_ttl_ms: Option<u64>,
    ) -> Result<(std::sync::Arc<Store>, StoreWriter), StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join(FILE_NAME);
        let db = damage::create_db(&path)?;
        Self::open_db(data_dir, path, db, subjects, dedup_ttl_ms)
    }

    /// As [`Store::open_with_ttl`], on the storage `backend` instead of the file in `data_dir`
    /// (power-cut tests, [`crash`]): the same settings and checks ([`damage::create_db_on`]),
    /// the same writer start. `data_dir` only names the store.
    #[cfg(test)]
    pub(crate) fn open_on_backend(
        data_dir: &Path,
        backend: impl redb::StorageBackend,
        subjects: crate::config::SubjectMode,
        dedup_ttl_ms: Option<u64>,
    ) -> Result<(std::sync::Arc<Store>, StoreWriter), StoreError> {
        let path = data_dir.join(FILE_NAME);
        let db = damage::create_db_on(&path, backend)?;
        Self::open_db(data_dir, path, db, subjects, dedup_ttl_ms)
    }

    /// The read side and the writer over an opened database.
    fn open_db(
        data_dir: &Path,
        path: PathBuf,
        db: Database,
        subjects: crate::config::SubjectMode,
        dedup_ttl_ms: Option<u64>,
    ) -> Result<(std::sync::Arc<Store>, StoreWriter), StoreError> {
        let store = std::sync::Arc::new(Store {
            db: RwLock::new(Some(Db::ReadWrite(db))),
            path,
            data_dir: data_dir.to_path_buf(),
            figures: Figures::default(),
            _scratch: None,
        });
        let writer = StoreWriter::init(store.clone(), subjects, dedup_ttl_ms)?;
        Ok((store, writer))
    }

    /// Open the store in `data_dir` read-only (`inspect`). Never changes the file: a file left
    /// unclean (kill -9, power cut, a store-error exit) is copied to a temporary directory and
    /// the copy is repaired and read. Fails while a daemon has it open.
    pub fn open_read_only(data_dir: &Path) -> Result<Store, StoreError> {
        Self::open_file_read_only(&data_dir.join(FILE_NAME))
    }

    /// As [`Store::open_read_only`], for any store file (e.g. a quarantined one).
    pub fn open_file_read_only(path: &Path) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Missing(path.to_path_buf()));
        }
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError::Damaged {
                path: path.to_path_buf(),
                reason: "the file is empty: no store was ever written to it".into(),
            });
        }
        let data_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let direct = damage::catch(|| redb::ReadOnlyDatabase::open(path));
        let (db, scratch) = match direct {
            Ok(Ok(db)) => (Db::ReadOnly(db), None),
            Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
                return Err(StoreError::AlreadyOpen(path.to_path_buf()))
            }
            // Unclean (needs a repair, which a read-only open cannot do) or worse: read a
            // repaired copy.
            _ => {
                let scratch = tempfile::tempdir().map_err(|source| StoreError::Io {
                    what: "cannot create a scratch dir for",
                    path: path.to_path_buf(),
                    source,
                })?;
                let copy = scratch.path().join(FILE_NAME);
                std::fs::copy(path, &copy).map_err(|source| StoreError::Io {
                    what: "cannot copy",
                    path: path.to_path_buf(),
                    source,
                })?;
                let db = damage::create_db(&copy).map_err(|e| match e {
                    StoreError::Damaged { reason, .. } => StoreError::Damaged {
                        path: path.to_path_buf(),
                        reason,
                    },
                    e => e,
                })?;
                (Db::ReadWrite(db), Some(scratch))
            }
        };
        Ok(Store {
            db: RwLock::new(Some(db)),
            path: path.to_path_buf(),
            data_dir,
            figures: Figures::default(),
            _scratch: scratch,
        })
    }

    /// Close the database (at the end of a clean stop): redb marks the file clean when it is
    /// dropped, so the next start needs no repair. Readers get [`StoreError::Unavailable`]
    /// afterwards.
    pub fn close(&self) {
        let db = self.db.write().expect("store lock").take();
        drop(db);
    }

    pub(crate) fn read(&self) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db.read().expect("store lock");
        match db.as_ref() {
            Some(Db::ReadWrite(db)) => Ok(db.begin_read()?),
            Some(Db::ReadOnly(db)) => Ok(db.begin_read()?),
            None => Err(StoreError::Unavailable),
        }
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data dir the store lives in.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Size of the store file in bytes (its length; `du` may show less for sparse regions).
    pub fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    pub(crate) fn live(&self) -> bool {
        self.figures.live.load(Relaxed)
    }
}

/// Decode a window record (shared by reader and writer).
pub(crate) fn decode_window(bytes: &[u8]) -> Result<WindowState, StoreError> {
    records::decode("windows", bytes)
}

/// Where the outbox stands in line: class 0 alerts, then class 1 summaries, each by sequence.
pub type OutboxKey = (u8, u64);
pub const CLASS_ALERT: u8 = 0;
pub const CLASS_SUMMARY: u8 = 1;
/// Messages the district broker kept refusing (it closed the connection on them 3 times):
/// kept on the box, never sent again, counted and shown; dropped first under disk pressure.
pub const CLASS_PARKED: u8 = 2;

#[cfg(test)]
mod crash_sweep;
#[cfg(test)]
mod tests;
