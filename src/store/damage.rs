//! A store file that cannot be opened: cut short, bit rot on an SD card, not a store at all.
//!
//! [`create_db`] opens a file with redb's integrity check on, turns every failure that is not
//! "busy" or "the disk failed" into [`StoreError::Damaged`], and catches a panic inside redb
//! (a file cut short by one page has made redb 4 assert in its buddy allocator) so it becomes
//! the same error instead of a crash loop. [`open_or_quarantine`] is what the daemon does with
//! it, per `store.on_damage`: move the file aside as `zhian.redb.damaged-<UTC time>` and start
//! a fresh store (`quarantine`, the default), or refuse (`refuse`, exit 74).

use super::{Store, StoreError, StoreWriter};
use crate::config::{OnDamage, SubjectMode};
use redb::Database;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The prefix of a quarantined store file's name; the rest is the UTC time it was moved.
pub const DAMAGED_PREFIX: &str = "zhian.redb.damaged-";

static PANIC_MESSAGE: Mutex<Option<String>> = Mutex::new(None);

/// Run `f`, turning a panic into `Err(message)`. The panic hook is silenced meanwhile (the
/// caller reports the failure in its own words).
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        *PANIC_MESSAGE.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{msg}{at}"));
    }));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(previous);
    r.map_err(|_| {
        PANIC_MESSAGE
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Open (or create) the redb file at `path` for writing, checking every page.
pub(crate) fn create_db(path: &Path) -> Result<Database, StoreError> {
    open_with(path, |b| b.create(path))
}

/// As [`create_db`], on the storage `backend` instead of the file (power-cut tests: the same
/// settings, checks and errors; `path` only names it in errors).
#[cfg(test)]
pub(crate) fn create_db_on(
    path: &Path,
    backend: impl redb::StorageBackend,
) -> Result<Database, StoreError> {
    open_with(path, |b| b.create_with_backend(backend))
}

/// Open with the store's settings (cache, integrity check on open) through `open`, a panic in
/// redb caught, and every failure that is not "busy" or "the disk failed" made
/// [`StoreError::Damaged`].
fn open_with(
    path: &Path,
    open: impl FnOnce(&redb::Builder) -> Result<Database, redb::DatabaseError>,
) -> Result<Database, StoreError> {
    let damaged = |reason: String| StoreError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let opened = catch(|| {
        let mut builder = Database::builder();
        builder
            .set_cache_size(super::CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .set_repair_callback(|s| {
                // Called by the integrity check every open runs (and by the repair after an
                // unclean shutdown): progress, not a problem.
                tracing::info!(
                    progress = format!("{:.0}%", s.progress() * 100.0),
                    "store: checking every page"
                );
            });
        open(&builder)
    });
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => {
            Err(StoreError::AlreadyOpen(path.to_path_buf()))
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() != std::io::ErrorKind::UnexpectedEof
                && e.kind() != std::io::ErrorKind::InvalidData =>
        {
            Err(StoreError::Io {
                what: "cannot open",
                path: path.to_path_buf(),
                source: e,
            })
        }
        Ok(Err(e)) => Err(damaged(e.to_string())),
        Err(panic) => Err(damaged(format!("redb panicked while opening it: {panic}"))),
    }
}

/// A store file moved aside.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Quarantined {
    /// File name inside the data dir.
    pub file: String,
    pub bytes: u64,
    /// Why it was moved (this run only; after a restart the file name and size remain).
    pub reason: Option<String>,
}

/// The quarantined files in `data_dir`, oldest first (their names sort by time).
pub fn quarantined(data_dir: &Path) -> Vec<Quarantined> {
    let mut out: Vec<Quarantined> = std::fs::read_dir(data_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.starts_with(DAMAGED_PREFIX).then(|| Quarantined {
                bytes: e.metadata().map(|m| m.len()).unwrap_or(0),
                file: name,
                reason: None,
            })
        })
        .collect();
    out.sort_by(|a, b| a.file.cmp(&b.file));
    out
}

/// Move the store file aside; returns its new path.
pub fn quarantine(path: &Path, now_ms: i64) -> Result<PathBuf, StoreError> {
    let stamp = crate::core::summary::rfc3339_utc(now_ms).replace(':', "");
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut to = dir.join(format!("{DAMAGED_PREFIX}{stamp}"));
    let mut n = 1;
    while to.exists() {
        n += 1;
        to = dir.join(format!("{DAMAGED_PREFIX}{stamp}-{n}"));
    }
    std::fs::rename(path, &to).map_err(|source| StoreError::Io {
        what: "cannot move aside",
        path: path.to_path_buf(),
        source,
    })?;
    // The rename is durable before a fresh file takes the name.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(to)
}

/// redb writes its magic number in the first bytes of a file it creates, and this is the page
/// its header lives in.
const MAGIC_BYTES: usize = 9;
const HEADER_PAGE: u64 = 4096;

/// True when the file holds no store and never did, so removing it loses nothing:
/// - empty, or only zero bytes (what an open that failed on a full disk leaves: the file was
///   sized but never written);
/// - a store whose creation never finished: redb sizes a new file, writes and syncs its header
///   *without* the magic number, and only then writes the magic number and syncs again. A power
///   cut between the two leaves a header with no magic number and zeros past it, which redb
///   then refuses ("Not a redb database"). No transaction commits before the magic number is
///   on disk, and every commit writes past the header page, so such a file never held data.
///
/// A store that lost its first bytes to damage still holds its pages past the header: that is
/// not this, and is quarantined. Files over 64 MiB are not read to find out.
fn never_written(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    if f.metadata().map(|m| m.len() > 64 << 20).unwrap_or(true) {
        return false;
    }
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(_) => return false,
        };
        for (i, b) in buf[..n].iter().enumerate() {
            let offset = at + i as u64;
            // The header redb wrote before its magic number may hold anything.
            let header = offset >= MAGIC_BYTES as u64 && offset < HEADER_PAGE;
            if *b != 0 && !header {
                return false;
            }
        }
        at += n as u64;
    }
}

/// Open the daemon's store; a damaged file is moved aside (and a fresh store started) or
/// refused per `on_damage`. Returns the quarantined file, if this open moved one.
pub fn open_or_quarantine(
    data_dir: &Path,
    subjects: SubjectMode,
    on_damage: OnDamage,
    now_ms: i64,
    dedup_ttl_ms: Option<u64>,
) -> Result<(Arc<Store>, StoreWriter, Option<Quarantined>), StoreError> {
    match Store::open_with_ttl(data_dir, subjects, dedup_ttl_ms) {
        Ok((s, w)) => Ok((s, w, None)),
        Err(StoreError::Damaged { path, .. }) if never_written(&path) => {
            tracing::warn!(file = %path.display(), "store file holds nothing (an earlier start ran out of disk, or lost power while creating it?): creating it again");
            std::fs::remove_file(&path).map_err(|source| StoreError::Io {
                what: "cannot remove the empty",
                path: path.clone(),
                source,
            })?;
            let (s, w) = Store::open_with_ttl(data_dir, subjects, dedup_ttl_ms)?;
            Ok((s, w, None))
        }
        Err(StoreError::Damaged { path, reason }) if on_damage == OnDamage::Quarantine => {
            let to = quarantine(&path, now_ms)?;
            tracing::error!(
                file = %path.display(),
                moved_to = %to.display(),
                %reason,
                "store damaged: moved it aside and started a fresh store; counts not yet sent upstream from the old file are not in the new one (inspect --file can read what is left)"
            );
            let (s, w) = Store::open_with_ttl(data_dir, subjects, dedup_ttl_ms)?;
            let q = Quarantined {
                file: to
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes: std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0),
                reason: Some(reason),
            };
            Ok((s, w, Some(q)))
        }
        Err(e) => Err(e),
    }
}
