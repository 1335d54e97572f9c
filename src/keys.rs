//! Pseudonym keys: the BLAKE3 keys that turn a subject (card, face or plate id) into the
//! 16-byte pseudonym the store keeps with `privacy.subjects = "hashed"`.
//!
//! # What is on disk
//!
//! `privacy.key_dir` (default: `<data_dir>.keys`, a sibling of the data dir, so a copy or backup
//! of the data dir holds no key), closed to other users (made 0700), holds one file per key period, mode 0600, each 32
//! random bytes:
//! - `privacy.rotate = "daily"` (the default): `subject-YYYY-MM-DD.key`, one per local day in
//!   the site's time zone (`status.timezone`). An event's subject is keyed with the key of the
//!   local day of its *event time*, so one day's pseudonyms are comparable (distinct counts) and
//!   two days' are not.
//! - `privacy.rotate = "never"`: `subject.key`, one key for ever (pseudonyms link across days).
//!
//! # Invariants
//! - No key is ever written into the store file (the store keeps only a separate dedup key, for
//!   hashes of event ids, which are not personal data).
//! - A daily key is destroyed (overwritten with zeros, synced, unlinked) once no event of its
//!   day can still be accepted: at the end of its day plus `aggregate.max_lateness`. After
//!   that the day's pseudonyms cannot be reversed by trying candidate plates or cards, nor
//!   linked to any other day's, by anyone, including someone holding the box.
//! - A key is never made for a day whose key may already have been destroyed: such an event's
//!   subject is not stored (`None`), rather than keyed with a fresh key.
//! - A key is on disk (file and directory synced) before the first pseudonym made with it is
//!   committed, so a restart keys the rest of the day the same way.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const DAY_MS: i64 = 86_400_000;

/// How often the pseudonym key changes (`privacy.rotate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotate {
    /// A new key at each local midnight; old ones destroyed after `max_lateness`.
    Daily,
    /// One key for ever.
    Never,
}

/// Why the key directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("privacy.key_dir {}: {what}: {source}", path.display())]
pub struct KeyError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// The pseudonym keys of one box: loaded from `privacy.key_dir`, made on demand, destroyed when
/// their period can no longer receive events. Owned by the store writer.
pub struct SubjectKeys {
    /// `None`: keys live only in memory (tests, benches), lost at exit.
    dir: Option<PathBuf>,
    rotate: Rotate,
    /// Site UTC offset, ms.
    offset_ms: i64,
    /// How long after its day ends a daily key is kept (the accepted lateness), ms.
    keep_ms: i64,
    /// Period (local day number since 1970-01-01; 0 for `Never`) to key.
    keys: BTreeMap<i64, [u8; 32]>,
    /// Warned once that a key could not be made (subjects of that period are not stored).
    warned: bool,
}

impl std::fmt::Debug for SubjectKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key bytes.
        f.debug_struct("SubjectKeys")
            .field("dir", &self.dir)
            .field("rotate", &self.rotate)
            .field("periods", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl SubjectKeys {
    /// Keys kept only in memory (nothing written; a restart starts new ones).
    pub fn ephemeral(rotate: Rotate, offset_s: i32, keep_ms: u64) -> Self {
        SubjectKeys {
            dir: None,
            rotate,
            offset_ms: offset_s as i64 * 1000,
            keep_ms: keep_ms.min(i64::MAX as u64 / 4) as i64,
            keys: BTreeMap::new(),
            warned: false,
        }
    }

    /// Open (creating it, mode 0700) the key directory and load its keys. Files of the other
    /// rotation mode, and daily keys already past their life at `now_ms`, are destroyed.
    ///
    /// Errors: the directory cannot be created, read or restricted to its owner.
    pub fn open(
        dir: &Path,
        rotate: Rotate,
        offset_s: i32,
        keep_ms: u64,
        now_ms: i64,
    ) -> Result<Self, KeyError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let err = |what, source| KeyError {
            path: dir.to_path_buf(),
            what,
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err("cannot create", e))?;
        let meta = std::fs::metadata(dir).map_err(|e| err("cannot read", e))?;
        // Others never; the group may list it (systemd's StateDirectoryMode= applies one mode to
        // every state dir of the unit) but each key file is 0600.
        if meta.permissions().mode() & 0o007 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| err("cannot restrict to its owner (chmod 700)", e))?;
            tracing::warn!(dir = %dir.display(), "privacy.key_dir was open to other users; restricted it to its owner (0700)");
        }
        let mut k = SubjectKeys::ephemeral(rotate, offset_s, keep_ms);
        k.dir = Some(dir.to_path_buf());
        for entry in std::fs::read_dir(dir).map_err(|e| err("cannot list", e))? {
            let entry = entry.map_err(|e| err("cannot list", e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let period = match (parse_name(name), rotate) {
                (Some(Some(day)), Rotate::Daily) => day,
                (Some(None), Rotate::Never) => 0,
                // A key of the other mode: a fixed key left by `never` links days; a daily key
                // left when switching to `never` is not needed. Either way, gone.
                (Some(_), _) => {
                    destroy_file(&entry.path());
                    tracing::info!(
                        file = name,
                        "destroyed a pseudonym key of the other privacy.rotate mode"
                    );
                    continue;
                }
                (None, _) => continue,
            };
            match std::fs::read(entry.path()) {
                Ok(b) if b.len() == 32 => {
                    let mut key = [0u8; 32];
                    key.copy_from_slice(&b);
                    k.keys.insert(period, key);
                }
                Ok(_) => {
                    tracing::warn!(file = name, "pseudonym key file is not 32 bytes; destroyed (that day's pseudonyms start again)");
                    destroy_file(&entry.path());
                }
                Err(e) => return Err(err("cannot read a key file", e)),
            }
        }
        k.destroy_expired(now_ms);
        Ok(k)
    }

    /// The key period of an event stamped `ts_ms`: its local day number (0 when keys never
    /// rotate).
    pub fn period(&self, ts_ms: i64) -> i64 {
        match self.rotate {
            Rotate::Daily => (ts_ms + self.offset_ms).div_euclid(DAY_MS),
            Rotate::Never => 0,
        }
    }

    /// When period `p`'s key is destroyed (ms since the epoch): the end of its day plus the
    /// accepted lateness. `i64::MAX` for `Never`.
    pub fn destroy_at(&self, p: i64) -> i64 {
        match self.rotate {
            Rotate::Daily => ((p + 1) * DAY_MS - self.offset_ms).saturating_add(self.keep_ms),
            Rotate::Never => i64::MAX,
        }
    }

    /// The pseudonym of `subject` for an event stamped `ts_ms`, received at `now_ms`: the
    /// first 16 bytes of BLAKE3 keyed with that period's key. Makes (and syncs to disk) the
    /// period's key when it is the first subject of the period. `None` when the period's key
    /// is past its life or cannot be written: the subject is then not stored.
    pub fn pseudonym(&mut self, subject: &str, ts_ms: i64, now_ms: i64) -> Option<[u8; 16]> {
        let p = self.period(ts_ms);
        let key = self.key(p, now_ms)?;
        let h = blake3::keyed_hash(&key, subject.as_bytes());
        let mut short = [0u8; 16];
        short.copy_from_slice(&h.as_bytes()[..16]);
        Some(short)
    }

    fn key(&mut self, p: i64, now_ms: i64) -> Option<[u8; 32]> {
        if let Some(k) = self.keys.get(&p) {
            return (self.destroy_at(p) > now_ms).then_some(*k);
        }
        if self.destroy_at(p) <= now_ms {
            return None;
        }
        let mut key = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut key) {
            self.warn_once(&format!("no random bytes: {e}"));
            return None;
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(self.file_name(p));
            if let Err(e) = write_key(dir, &path, &key) {
                self.warn_once(&format!("cannot write {}: {e}", path.display()));
                return None;
            }
        }
        self.warned = false;
        self.keys.insert(p, key);
        Some(key)
    }

    fn warn_once(&mut self, why: &str) {
        if !self.warned {
            tracing::warn!(
                why,
                "cannot make today's pseudonym key; subjects are not stored until it can be made"
            );
            self.warned = true;
        }
    }

    fn file_name(&self, p: i64) -> String {
        match self.rotate {
            Rotate::Never => "subject.key".into(),
            Rotate::Daily => format!("subject-{}.key", day_label(p)),
        }
    }

    /// Destroy every key past its life at `now_ms`: zeroed in memory, and its file overwritten
    /// with zeros, synced and removed. Returns how many.
    pub fn destroy_expired(&mut self, now_ms: i64) -> usize {
        let doomed: Vec<i64> = self
            .keys
            .keys()
            .copied()
            .filter(|p| self.destroy_at(*p) <= now_ms)
            .collect();
        for p in &doomed {
            if let Some(mut k) = self.keys.remove(p) {
                k.fill(0);
                std::hint::black_box(&k);
            }
            if let Some(dir) = &self.dir {
                destroy_file(&dir.join(self.file_name(*p)));
            }
            tracing::info!(
                day = %day_label(*p),
                "pseudonym key destroyed: that day's pseudonyms can no longer be reversed or linked"
            );
        }
        doomed.len()
    }

    /// Periods whose keys are held (for tests and `inspect`-like tools; never the bytes).
    pub fn periods(&self) -> Vec<i64> {
        self.keys.keys().copied().collect()
    }
}

impl Drop for SubjectKeys {
    fn drop(&mut self) {
        for k in self.keys.values_mut() {
            k.fill(0);
        }
        std::hint::black_box(&self.keys);
    }
}

/// `subject-YYYY-MM-DD.key` → `Some(Some(day))`, `subject.key` → `Some(None)`, else `None`.
fn parse_name(name: &str) -> Option<Option<i64>> {
    if name == "subject.key" {
        return Some(None);
    }
    let date = name.strip_prefix("subject-")?.strip_suffix(".key")?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let d = time::Date::parse(date, &fmt).ok()?;
    let epoch = time::Date::from_calendar_date(1970, time::Month::January, 1).ok()?;
    Some(Some((d - epoch).whole_days()))
}

/// A local day number as `YYYY-MM-DD`.
pub fn day_label(p: i64) -> String {
    let epoch = time::Date::from_calendar_date(1970, time::Month::January, 1).expect("epoch");
    match epoch.checked_add(time::Duration::days(p)) {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day()),
        None => format!("day{p}"),
    }
}

fn write_key(dir: &Path, path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(key)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Overwrite a key file with zeros, sync, remove it and sync its directory. Best effort: a
/// failure is logged (a key left behind is what an operator must know about).
fn destroy_file(path: &Path) {
    let res = (|| -> std::io::Result<()> {
        if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(path) {
            let len = f.metadata()?.len() as usize;
            f.write_all(&vec![0u8; len.max(32)])?;
            f.sync_all()?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if let Err(e) = res {
        tracing::error!(file = %path.display(), error = %e, "cannot destroy an expired pseudonym key; remove it by hand");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn daily_keys_differ_by_local_day_and_die_after_lateness() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().join("keys");
        let midnight = time::macros::datetime!(2026-11-30 00:00 +8).unix_timestamp() * 1000;
        let mut k = SubjectKeys::open(&kd, Rotate::Daily, 8 * 3600, 24 * H as u64, 0).unwrap();
        let before = midnight - 1;
        let at = midnight + H;
        let a = k.pseudonym("粤B12345", before, at).unwrap();
        let b = k.pseudonym("粤B12345", at, at).unwrap();
        assert_ne!(a, b, "two local days must not share pseudonyms");
        assert_eq!(k.pseudonym("粤B12345", at + H, at + H).unwrap(), b);
        assert_eq!(std::fs::read_dir(&kd).unwrap().count(), 2);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(kd.join(k.file_name(k.period(at))))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // Reopened: the same keys.
        drop(k);
        let mut k = SubjectKeys::open(&kd, Rotate::Daily, 8 * 3600, 24 * H as u64, at).unwrap();
        assert_eq!(k.pseudonym("粤B12345", at, at).unwrap(), b);
        // Yesterday's key lives until its day's end plus the lateness: this midnight + 24 h.
        let yesterday = k.period(before);
        assert_eq!(k.destroy_at(yesterday), midnight + 24 * H);
        assert_eq!(k.destroy_expired(midnight + 24 * H), 1);
        assert!(k.pseudonym("粤B12345", before, midnight + 24 * H).is_none());
        assert_eq!(std::fs::read_dir(&kd).unwrap().count(), 1);
        // A restart after its death does not make it again.
        drop(k);
        let mut k = SubjectKeys::open(
            &kd,
            Rotate::Daily,
            8 * 3600,
            24 * H as u64,
            midnight + 25 * H,
        )
        .unwrap();
        assert!(k.pseudonym("x", before, midnight + 25 * H).is_none());
        assert!(!kd
            .join(format!("subject-{}.key", day_label(yesterday)))
            .exists());
    }

    #[test]
    fn never_rotating_key_and_mode_switch() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().join("k");
        let mut k = SubjectKeys::open(&kd, Rotate::Never, 0, 0, 0).unwrap();
        let a = k.pseudonym("card:1", 0, 0).unwrap();
        assert_eq!(
            k.pseudonym("card:1", 400 * DAY_MS, 400 * DAY_MS).unwrap(),
            a
        );
        assert!(kd.join("subject.key").exists());
        drop(k);
        // Switching to daily destroys the fixed key.
        let _k = SubjectKeys::open(&kd, Rotate::Daily, 0, 0, 0).unwrap();
        assert!(!kd.join("subject.key").exists());
    }

    #[test]
    fn day_labels_round_trip() {
        for p in [0, 1, 20_000, 20_787] {
            assert_eq!(
                parse_name(&format!("subject-{}.key", day_label(p))),
                Some(Some(p))
            );
        }
        assert_eq!(day_label(0), "1970-01-01");
    }
}
