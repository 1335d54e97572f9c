//! The keys that protect subjects (card, face or plate ids) on the box: pseudonym keys for
//! `privacy.subjects = "hashed"` and sealing keys for `"plain"`.
//!
//! # What is on disk
//!
//! `privacy.key_dir` (default: `<data_dir>.keys`, a sibling of the data dir, so a copy or backup
//! of the data dir holds no key), closed to other users (made 0700), holds one file per key and
//! day, mode 0600, each 32 random bytes:
//! - `subject-YYYY-MM-DD.key` (`privacy.rotate = "daily"`, the default): the pseudonym key of a
//!   local day in the site's time zone (`status.timezone`). An event's subject is keyed with
//!   the key of the local day of its *event time*, so one day's pseudonyms are comparable
//!   (distinct counts) and two days' are not. `subject.key` with `rotate = "never"`: one key
//!   for ever (pseudonyms link across days).
//! - `sealed-YYYY-MM-DD.key`: the sealing key of the day an event *arrived*, with `"plain"`;
//!   the subject is stored encrypted with it (see [`SubjectKeys::seal`]).
//! - `care.key`: the care watch's key ([`SubjectKeys::care_pseudonym`]); it does not rotate, so
//!   the watch list keeps matching, and only listed residents' pseudonyms are ever kept.
//!
//! # Invariants
//! - No key is ever written into the store file (the store keeps only a separate dedup key, for
//!   hashes of event ids, which are not personal data).
//! - A daily pseudonym key is destroyed (overwritten with zeros, synced, unlinked) once no
//!   event of its day can still be accepted: at the end of its day plus
//!   `aggregate.max_lateness`. After that the day's pseudonyms cannot be reversed by trying
//!   candidate plates or cards, nor linked to any other day's, by anyone, including someone
//!   holding the box.
//! - A sealing key is destroyed once every raw event that arrived on its day is past
//!   `store.raw_retention` (the end of the day plus the retention): the subjects are then
//!   unreadable wherever their bytes linger (redb's freed pages, a backup, worn flash cells).
//! - A key is never made for a day whose key may already have been destroyed: such an event's
//!   subject is not stored (`None`), rather than keyed with a fresh key.
//! - A key is on disk (file and directory synced: [`crate::durable_file`]) before the first
//!   subject protected with it is committed, so a restart keys the rest of the day the same way.
//!
//! # A key dir lost while the daemon was stopped
//!
//! The store remembers a [`KeyId`] of every pseudonym and care key it used (never the key: a
//! BLAKE3 derivation under a fixed context, which no one can turn back into the key), so a start
//! that finds a key the store used missing from the key dir, or replaced by another, knows it
//! was lost (`crate::store`'s `key_ids` table). What that costs is said in README ("Security
//! and privacy") and docs/install.md ("Pseudonym keys"); [`KeyLoss`] is how the page shows it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const DAY_MS: i64 = 86_400_000;

/// The fingerprint of a key that the store keeps: the first 16 bytes of BLAKE3's key derivation
/// under [`KEY_ID_CONTEXT`] from the key. It names a key; it neither is one nor yields one.
pub type KeyId = [u8; 16];

/// The BLAKE3 `derive_key` context of a [`KeyId`].
pub const KEY_ID_CONTEXT: &str = "zhian-gateway 2026-12-05 key fingerprint v1";

/// The [`KeyId`] of `key`.
pub fn key_id(key: &[u8; 32]) -> KeyId {
    let d = blake3::derive_key(KEY_ID_CONTEXT, key);
    d[..16].try_into().expect("16 bytes")
}

/// The file name of the care key in the key dir.
pub const CARE_KEY: &str = "care.key";

/// The file name of the presence key (vehicles inside) in the key dir.
pub const PRESENCE_KEY: &str = "presence.key";

/// A key the store had used that the key dir lost, while it still matters (status page,
/// `/api/status`, `zhian_keys_lost`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyLoss {
    /// The key's file name: `subject-2026-11-30.key`, `subject.key` or `care.key`.
    pub key: String,
    /// The local day whose distinct counts span two keys (pseudonym keys; `None` for the care
    /// key).
    pub date: Option<String>,
    /// When the daemon found the key missing (ms since the epoch).
    pub detected_ms: i64,
    /// Until when it is shown (ms; `None`: the care key, shown while residents listed by a
    /// pseudonym of the lost key are still listed).
    pub until_ms: Option<i64>,
    /// Care key: the aliases of the residents listed by a pseudonym made with the lost key,
    /// which can never be matched again (relist them).
    pub unmatched: Vec<String>,
}

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

/// One family of daily (or fixed) keys: files `{prefix}-YYYY-MM-DD.key` (`{prefix}.key` when
/// fixed), each destroyed `keep_ms` after its day ends.
struct Family {
    prefix: &'static str,
    rotate: Rotate,
    keep_ms: i64,
    /// Period (local day number since 1970-01-01; 0 for `Never`) to key.
    keys: BTreeMap<i64, [u8; 32]>,
}

impl Family {
    fn new(prefix: &'static str, rotate: Rotate, keep_ms: u64) -> Self {
        Family {
            prefix,
            rotate,
            keep_ms: keep_ms.min(i64::MAX as u64 / 4) as i64,
            keys: BTreeMap::new(),
        }
    }

    fn period(&self, offset_ms: i64, at_ms: i64) -> i64 {
        match self.rotate {
            Rotate::Daily => (at_ms + offset_ms).div_euclid(DAY_MS),
            Rotate::Never => 0,
        }
    }

    fn destroy_at(&self, offset_ms: i64, p: i64) -> i64 {
        match self.rotate {
            Rotate::Daily => ((p + 1) * DAY_MS - offset_ms).saturating_add(self.keep_ms),
            Rotate::Never => i64::MAX,
        }
    }

    fn file_name(&self, p: i64) -> String {
        match self.rotate {
            Rotate::Never => format!("{}.key", self.prefix),
            Rotate::Daily => format!("{}-{}.key", self.prefix, day_label(p)),
        }
    }
}

/// The keys of one box, owned by the store writer: pseudonym keys (`subject-*.key`, for
/// `privacy.subjects = "hashed"`) and sealing keys (`sealed-*.key`, for `"plain"`: the subject
/// is kept encrypted with the key of the day it arrived, and that key is destroyed once
/// `store.raw_retention` has passed after the day, so an expired subject is unreadable
/// wherever its bytes linger: freed pages of the store, a backup, flash cells the card's wear
/// levelling left behind). Loaded from `privacy.key_dir`, made on demand, destroyed when their
/// day can no longer need them.
pub struct SubjectKeys {
    /// `None`: keys live only in memory (tests, benches), lost at exit.
    dir: Option<PathBuf>,
    /// Site UTC offset, ms.
    offset_ms: i64,
    pseudonym: Family,
    seal: Family,
    /// `care.key`: keys the care watch's residents (never rotates: the watch list must keep
    /// matching; only listed residents' pseudonyms are ever kept).
    care: Family,
    /// `presence.key`: keys the vehicles inside (contract: "Vehicles inside"); never rotates, so
    /// a stay across midnight keeps its pseudonym.
    presence: Family,
    /// Warned once that a key could not be made (subjects are not stored meanwhile).
    warned: bool,
    /// When the held keys' files were last checked on disk.
    checked_ms: i64,
    /// Bumped whenever a key is made or loaded: the store registers the held keys' ids again
    /// when it changed ([`SubjectKeys::changes`]).
    changes: u64,
}

impl std::fmt::Debug for SubjectKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key bytes.
        f.debug_struct("SubjectKeys")
            .field("dir", &self.dir)
            .field(
                "pseudonym_days",
                &self.pseudonym.keys.keys().collect::<Vec<_>>(),
            )
            .field("seal_days", &self.seal.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a sealed subject is: the day of its key, a random nonce, and the subject's UTF-8 bytes
/// XORed with BLAKE3's keyed extendable output over (`"zhian sealed subject\0"`, nonce).
pub type Sealed = (i64, [u8; 16], Vec<u8>);

impl SubjectKeys {
    /// Keys kept only in memory (nothing written; a restart starts new ones). `keep_ms`: how
    /// long a pseudonym key outlives its day; `seal_keep_ms`: how long a sealing key does.
    pub fn ephemeral(rotate: Rotate, offset_s: i32, keep_ms: u64, seal_keep_ms: u64) -> Self {
        SubjectKeys {
            dir: None,
            offset_ms: offset_s as i64 * 1000,
            pseudonym: Family::new("subject", rotate, keep_ms),
            seal: Family::new("sealed", Rotate::Daily, seal_keep_ms),
            care: Family::new("care", Rotate::Never, 0),
            presence: Family::new("presence", Rotate::Never, 0),
            warned: false,
            checked_ms: 0,
            changes: 0,
        }
    }

    /// Open (creating it, 0700) the key directory and load its keys. Pseudonym keys of the other
    /// rotation mode, and keys already past their life at `now_ms`, are destroyed.
    ///
    /// Errors: the directory cannot be created, read or restricted to its owner.
    pub fn open(
        dir: &Path,
        rotate: Rotate,
        offset_s: i32,
        keep_ms: u64,
        seal_keep_ms: u64,
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
        let mut k = SubjectKeys::ephemeral(rotate, offset_s, keep_ms, seal_keep_ms);
        k.dir = Some(dir.to_path_buf());
        for entry in std::fs::read_dir(dir).map_err(|e| err("cannot list", e))? {
            let entry = entry.map_err(|e| err("cannot list", e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some((prefix, day)) = parse_name(name) else {
                continue;
            };
            let family = match prefix {
                "sealed" => &mut k.seal,
                "care" => &mut k.care,
                "presence" => &mut k.presence,
                _ => &mut k.pseudonym,
            };
            let period = match (day, family.rotate) {
                (Some(day), Rotate::Daily) => day,
                (None, Rotate::Never) => 0,
                // A key of the other mode: a fixed key left by `never` links days; a daily key
                // left when switching to `never` is not needed. Either way, gone.
                _ => {
                    destroy_file(&entry.path());
                    tracing::info!(
                        file = name,
                        "destroyed a key of the other privacy.rotate mode"
                    );
                    continue;
                }
            };
            match std::fs::read(entry.path()) {
                Ok(b) if b.len() == 32 => {
                    let mut key = [0u8; 32];
                    key.copy_from_slice(&b);
                    family.keys.insert(period, key);
                }
                Ok(_) => {
                    tracing::warn!(
                        file = name,
                        "key file is not 32 bytes; destroyed (that day's pseudonyms start again)"
                    );
                    destroy_file(&entry.path());
                }
                Err(e) => return Err(err("cannot read a key file", e)),
            }
        }
        k.destroy_expired(now_ms);
        k.changes += 1;
        Ok(k)
    }

    /// Whether the keys live in a key dir (false: [`SubjectKeys::ephemeral`], nothing to lose).
    pub fn persistent(&self) -> bool {
        self.dir.is_some()
    }

    /// A number that changes whenever a key is made or loaded.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// The file names and [`KeyId`]s of the pseudonym, care and presence keys held now.
    pub fn held_ids(&self) -> Vec<(String, KeyId)> {
        let mut out = Vec::new();
        for family in [&self.pseudonym, &self.care, &self.presence] {
            for (p, key) in &family.keys {
                out.push((family.file_name(*p), key_id(key)));
            }
        }
        out
    }

    /// The [`KeyId`] of the pseudonym or care key held under file name `name`, if one is.
    pub fn id_of(&self, name: &str) -> Option<KeyId> {
        let (family, p) = self.family_of(name)?;
        family.keys.get(&p).map(key_id)
    }

    /// The local day (days since 1970-01-01 in the site's zone) of an instant.
    pub fn local_day(&self, ms: i64) -> i64 {
        (ms + self.offset_ms).div_euclid(DAY_MS)
    }

    /// The file name of the pseudonym key that keys an event stamped `ts_ms`.
    pub fn pseudonym_name(&self, ts_ms: i64) -> String {
        self.pseudonym.file_name(self.period(ts_ms))
    }

    /// Whether a pseudonym or care key named `name` should be in the key dir at `now_ms`: the
    /// care key always; a pseudonym key of this rotation mode until its day's life ends.
    pub fn tracks(&self, name: &str, now_ms: i64) -> bool {
        match self.family_of(name) {
            Some((f, p)) if f.prefix == "subject" => self.destroy_at(p) > now_ms,
            Some(_) => true,
            None => false,
        }
    }

    /// Until when a loss of the key `name` found at `lost_at_ms` is shown: a pseudonym key's
    /// loss until its day can no longer change (the day's end plus `aggregate.max_lateness`:
    /// the key would have died then); with `rotate = "never"`, the day of the loss's. `None`
    /// for the care key (shown while its unmatched residents are listed).
    pub fn loss_shown_until(&self, name: &str, lost_at_ms: i64) -> Option<i64> {
        let (f, p) = self.family_of(name)?;
        if f.prefix != "subject" {
            return None;
        }
        let day = match f.rotate {
            Rotate::Daily => p,
            Rotate::Never => (lost_at_ms + self.offset_ms).div_euclid(DAY_MS),
        };
        Some(((day + 1) * DAY_MS - self.offset_ms).saturating_add(f.keep_ms))
    }

    /// The family and period a pseudonym, care or presence key file name belongs to, in this
    /// rotation mode (`None` for sealing keys, other names, and pseudonym keys of the other
    /// mode).
    fn family_of(&self, name: &str) -> Option<(&Family, i64)> {
        match parse_name(name)? {
            ("care", None) => Some((&self.care, 0)),
            ("presence", None) => Some((&self.presence, 0)),
            ("subject", Some(day)) if self.pseudonym.rotate == Rotate::Daily => {
                Some((&self.pseudonym, day))
            }
            ("subject", None) if self.pseudonym.rotate == Rotate::Never => {
                Some((&self.pseudonym, 0))
            }
            _ => None,
        }
    }

    /// The pseudonym key period of an event stamped `ts_ms`: its local day number (0 when
    /// keys never rotate).
    pub fn period(&self, ts_ms: i64) -> i64 {
        self.pseudonym.period(self.offset_ms, ts_ms)
    }

    /// When the pseudonym key of period `p` is destroyed (ms since the epoch): the end of its
    /// day plus the accepted lateness. `i64::MAX` for `Never`.
    pub fn destroy_at(&self, p: i64) -> i64 {
        self.pseudonym.destroy_at(self.offset_ms, p)
    }

    /// The pseudonym of `subject` for an event stamped `ts_ms`, received at `now_ms`: the
    /// first 16 bytes of BLAKE3 keyed with that period's key. Makes (and syncs to disk) the
    /// period's key when it is the first subject of the period. `None` when the period's key
    /// is past its life or cannot be written: the subject is then not stored.
    pub fn pseudonym(&mut self, subject: &str, ts_ms: i64, now_ms: i64) -> Option<[u8; 16]> {
        let p = self.period(ts_ms);
        let key = self.key(false, p, now_ms)?;
        let h = blake3::keyed_hash(&key, subject.as_bytes());
        let mut short = [0u8; 16];
        short.copy_from_slice(&h.as_bytes()[..16]);
        Some(short)
    }

    /// `subject` sealed with the sealing key of the local day of `now_ms` (its arrival).
    /// `None` when the key cannot be made: the subject is then not stored.
    pub fn seal(&mut self, subject: &str, now_ms: i64) -> Option<Sealed> {
        let p = self.seal.period(self.offset_ms, now_ms);
        let key = self.key(true, p, now_ms)?;
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).ok()?;
        let mut bytes = subject.as_bytes().to_vec();
        xor_stream(&key, &nonce, &mut bytes);
        Some((p, nonce, bytes))
    }

    /// The subject a [`SubjectKeys::seal`] made, while its day's key lives.
    pub fn unseal(&self, sealed: &Sealed) -> Option<String> {
        let key = self.seal.keys.get(&sealed.0)?;
        let mut bytes = sealed.2.clone();
        xor_stream(key, &sealed.1, &mut bytes);
        String::from_utf8(bytes).ok()
    }

    /// The care-watch pseudonym of `subject`: the first 16 bytes of BLAKE3 keyed with the
    /// box's care key (made on first use; never rotated). `None` when the key cannot be made.
    pub fn care_pseudonym(&mut self, subject: &str) -> Option<[u8; 16]> {
        let key = self.key_of(Which::Care, 0, 0)?;
        let h = blake3::keyed_hash(&key, subject.as_bytes());
        Some(h.as_bytes()[..16].try_into().expect("16 bytes"))
    }

    /// The presence pseudonym of a plate (vehicles inside): the first 16 bytes of BLAKE3 keyed
    /// with the box's presence key (made on first use; never rotated). `None` when the key
    /// cannot be made.
    pub fn presence_pseudonym(&mut self, plate: &str) -> Option<[u8; 16]> {
        let key = self.key_of(Which::Presence, 0, 0)?;
        let h = blake3::keyed_hash(&key, plate.trim().as_bytes());
        Some(h.as_bytes()[..16].try_into().expect("16 bytes"))
    }

    fn key(&mut self, seal: bool, p: i64, now_ms: i64) -> Option<[u8; 32]> {
        self.key_of(if seal { Which::Seal } else { Which::Pseudonym }, p, now_ms)
    }

    fn key_of(&mut self, which: Which, p: i64, now_ms: i64) -> Option<[u8; 32]> {
        let offset = self.offset_ms;
        let family = match which {
            Which::Seal => &self.seal,
            Which::Care => &self.care,
            Which::Presence => &self.presence,
            Which::Pseudonym => &self.pseudonym,
        };
        if let Some(k) = family.keys.get(&p) {
            return (family.destroy_at(offset, p) > now_ms).then_some(*k);
        }
        if family.destroy_at(offset, p) <= now_ms {
            return None;
        }
        let mut key = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut key) {
            self.warn_once(&format!("no random bytes: {e}"));
            return None;
        }
        if let Some(dir) = &self.dir {
            let path = dir.join(family.file_name(p));
            if let Err(e) = write_key(&path, &key) {
                self.warn_once(&format!("cannot write {}: {e}", path.display()));
                return None;
            }
        }
        self.warned = false;
        self.changes += 1;
        let family = match which {
            Which::Seal => &mut self.seal,
            Which::Care => &mut self.care,
            Which::Presence => &mut self.presence,
            Which::Pseudonym => &mut self.pseudonym,
        };
        family.keys.insert(p, key);
        Some(key)
    }

    fn warn_once(&mut self, why: &str) {
        if !self.warned {
            tracing::warn!(why, "cannot make today's key in privacy.key_dir; subjects are not stored until it can be made");
            self.warned = true;
        }
    }

    /// Destroy every key past its life at `now_ms`: zeroed in memory, and its file overwritten
    /// with zeros, synced and removed. Returns how many.
    pub fn destroy_expired(&mut self, now_ms: i64) -> usize {
        if now_ms - self.checked_ms >= 60_000 {
            self.checked_ms = now_ms;
            self.restore_missing();
        }
        let offset = self.offset_ms;
        let mut n = 0;
        for family in [&mut self.pseudonym, &mut self.seal] {
            let doomed: Vec<i64> = family
                .keys
                .keys()
                .copied()
                .filter(|p| family.destroy_at(offset, *p) <= now_ms)
                .collect();
            for p in &doomed {
                if let Some(mut k) = family.keys.remove(p) {
                    k.fill(0);
                    std::hint::black_box(&k);
                }
                if let Some(dir) = &self.dir {
                    destroy_file(&dir.join(family.file_name(*p)));
                }
                if family.prefix == "sealed" {
                    tracing::info!(day = %day_label(*p), "sealing key destroyed: that day's raw subjects are unreadable wherever their bytes remain");
                } else {
                    tracing::info!(day = %day_label(*p), "pseudonym key destroyed: that day's pseudonyms can no longer be reversed or linked");
                }
            }
            n += doomed.len();
        }
        n
    }
}

impl SubjectKeys {
    /// A held key whose file is gone (the key dir removed by hand, a restore of another
    /// backup): written again from memory, so the rest of its day keys subjects the same way
    /// after a restart. Called at most once a minute.
    fn restore_missing(&mut self) {
        let Some(dir) = self.dir.clone() else { return };
        let mut restored = Vec::new();
        for family in [&self.pseudonym, &self.seal, &self.care, &self.presence] {
            for (p, key) in &family.keys {
                let path = dir.join(family.file_name(*p));
                if path.exists() {
                    continue;
                }
                use std::os::unix::fs::DirBuilderExt;
                let made = std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&dir)
                    .and_then(|_| write_key(&path, key));
                match made {
                    Ok(()) => restored.push(family.file_name(*p)),
                    Err(e) => {
                        tracing::error!(file = %path.display(), error = %e, "a pseudonym key file is gone and cannot be written again; after a restart today's pseudonyms will not match earlier ones")
                    }
                }
            }
        }
        if !restored.is_empty() {
            tracing::warn!(dir = %dir.display(), files = ?restored, "key files were missing from privacy.key_dir (removed by hand?); wrote them again from memory");
        }
    }
}

#[derive(Clone, Copy)]
enum Which {
    Pseudonym,
    Seal,
    Care,
    Presence,
}

fn xor_stream(key: &[u8; 32], nonce: &[u8; 16], bytes: &mut [u8]) {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"zhian sealed subject\0");
    h.update(nonce);
    let mut stream = vec![0u8; bytes.len()];
    h.finalize_xof().fill(&mut stream);
    for (b, s) in bytes.iter_mut().zip(&stream) {
        *b ^= s;
    }
}

impl Drop for SubjectKeys {
    fn drop(&mut self) {
        for family in [&mut self.pseudonym, &mut self.seal, &mut self.care] {
            for k in family.keys.values_mut() {
                k.fill(0);
            }
            std::hint::black_box(&family.keys);
        }
    }
}

/// `{subject|sealed}-YYYY-MM-DD.key` → `Some((prefix, Some(day)))`, `subject.key` →
/// `Some(("subject", None))`, anything else `None`.
fn parse_name(name: &str) -> Option<(&'static str, Option<i64>)> {
    if name == "subject.key" {
        return Some(("subject", None));
    }
    if name == "care.key" {
        return Some(("care", None));
    }
    if name == "presence.key" {
        return Some(("presence", None));
    }
    let (prefix, rest) = if let Some(r) = name.strip_prefix("subject-") {
        ("subject", r)
    } else {
        ("sealed", name.strip_prefix("sealed-")?)
    };
    let date = rest.strip_suffix(".key")?;
    let fmt = time::macros::format_description!("[year]-[month]-[day]");
    let d = time::Date::parse(date, &fmt).ok()?;
    let epoch = time::Date::from_calendar_date(1970, time::Month::January, 1).ok()?;
    Some((prefix, Some((d - epoch).whole_days())))
}

/// A local day number as `YYYY-MM-DD`.
pub fn day_label(p: i64) -> String {
    let epoch = time::Date::from_calendar_date(1970, time::Month::January, 1).expect("epoch");
    match epoch.checked_add(time::Duration::days(p)) {
        Some(d) => format!("{:04}-{:02}-{:02}", d.year(), d.month() as u8, d.day()),
        None => format!("day{p}"),
    }
}

/// Write a key file durably, 0600 from its creation ([`crate::durable_file`]).
fn write_key(path: &Path, key: &[u8; 32]) -> std::io::Result<()> {
    crate::durable_file::write_private(path, key)
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
        let mut k = SubjectKeys::open(
            &kd,
            Rotate::Daily,
            8 * 3600,
            24 * H as u64,
            7 * 24 * H as u64,
            0,
        )
        .unwrap();
        let before = midnight - 1;
        let at = midnight + H;
        let a = k.pseudonym("粤B12345", before, at).unwrap();
        let b = k.pseudonym("粤B12345", at, at).unwrap();
        assert_ne!(a, b, "two local days must not share pseudonyms");
        assert_eq!(k.pseudonym("粤B12345", at + H, at + H).unwrap(), b);
        assert_eq!(std::fs::read_dir(&kd).unwrap().count(), 2);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(kd.join(k.pseudonym.file_name(k.period(at))))
                .unwrap()
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // Reopened: the same keys.
        drop(k);
        let mut k = SubjectKeys::open(
            &kd,
            Rotate::Daily,
            8 * 3600,
            24 * H as u64,
            7 * 24 * H as u64,
            at,
        )
        .unwrap();
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
            0,
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
        let mut k = SubjectKeys::open(&kd, Rotate::Never, 0, 0, 0, 0).unwrap();
        let a = k.pseudonym("card:1", 0, 0).unwrap();
        assert_eq!(
            k.pseudonym("card:1", 400 * DAY_MS, 400 * DAY_MS).unwrap(),
            a
        );
        assert!(kd.join("subject.key").exists());
        drop(k);
        // Switching to daily destroys the fixed key.
        let _k = SubjectKeys::open(&kd, Rotate::Daily, 0, 0, 0, 0).unwrap();
        assert!(!kd.join("subject.key").exists());
    }

    #[test]
    fn sealed_subjects_open_while_their_day_key_lives() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().join("k");
        let day = 20_000 * DAY_MS;
        let mut k = SubjectKeys::open(&kd, Rotate::Daily, 0, 0, 3 * DAY_MS as u64, day).unwrap();
        let s = k.seal("card:MARKER-1", day + H).unwrap();
        assert!(!s.2.windows(6).any(|w| w == b"MARKER"));
        assert_eq!(k.unseal(&s).as_deref(), Some("card:MARKER-1"));
        assert!(kd
            .join(format!("sealed-{}.key", day_label(20_000)))
            .exists());
        // Reopened, it still opens; after the day plus the retention, the key is gone.
        drop(k);
        let mut k = SubjectKeys::open(&kd, Rotate::Daily, 0, 0, 3 * DAY_MS as u64, day).unwrap();
        assert_eq!(k.unseal(&s).as_deref(), Some("card:MARKER-1"));
        assert_eq!(k.destroy_expired(day + 4 * DAY_MS), 1);
        assert_eq!(k.unseal(&s), None);
        assert_eq!(std::fs::read_dir(&kd).unwrap().count(), 0);
    }

    #[test]
    fn the_presence_key_outlives_days_and_restarts_and_is_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let kd = dir.path().join("k");
        let mut k = SubjectKeys::open(&kd, Rotate::Daily, 0, 0, 0, 0).unwrap();
        let a = k.presence_pseudonym("浙A12345").unwrap();
        assert_ne!(Some(a), k.care_pseudonym("浙A12345"));
        assert!(kd.join("presence.key").exists());
        k.destroy_expired(400 * DAY_MS);
        drop(k);
        let mut k = SubjectKeys::open(&kd, Rotate::Daily, 0, 0, 0, 400 * DAY_MS).unwrap();
        assert_eq!(k.presence_pseudonym(" 浙A12345 "), Some(a));
        assert_ne!(k.presence_pseudonym("浙A12346"), Some(a));
    }

    #[test]
    fn day_labels_round_trip() {
        for p in [0, 1, 20_000, 20_787] {
            assert_eq!(
                parse_name(&format!("subject-{}.key", day_label(p))),
                Some(("subject", Some(p)))
            );
            assert_eq!(
                parse_name(&format!("sealed-{}.key", day_label(p))),
                Some(("sealed", Some(p)))
            );
        }
        assert_eq!(day_label(0), "1970-01-01");
    }
}
