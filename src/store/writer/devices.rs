//! The writer's device table, care list and pseudonym keys: what it knows of each device
//! (bounded, forgotten on request), the care residents it watches, the day keys it uses.

use super::*;

impl StoreWriter {
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
        if lost.iter().any(|k| k == crate::keys::PRESENCE_KEY) {
            // The set's pseudonyms can never be made again: its stays become a count (the
            // next commit, with the loss's row).
            self.presence_lost = true;
            tracing::error!(
                vehicles_inside = self.mem.presence.inside(),
                "the key dir lost presence.key (vehicles inside): the vehicles inside are kept as a count, each exit with no known entry takes one off; record a stocktake (zhian-gateway occupancy set --count N) to settle it"
            );
        }
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
    /// residents keyed with it are listed, the presence key until a stocktake after the loss.
    pub fn keys_lost(&self, now_ms: i64) -> Vec<crate::keys::KeyLoss> {
        let settled = self.mem.presence.totals.stocktake.map(|(_, at)| at);
        let mut out = self.key_book.losses(&self.keys, &self.care_list, now_ms);
        out.retain(|k| {
            k.key != crate::keys::PRESENCE_KEY || settled.is_none_or(|at| at < k.detected_ms)
        });
        out
    }
}

impl StoreWriter {
    /// Turn vehicles inside on (`Some`) or off; off keeps what is stored.
    pub fn set_occupancy(&mut self, cfg: Option<super::OccupancyCfg>) {
        self.occupancy = cfg;
    }

    /// Record a stocktake (盘点, `zhian-gateway occupancy set --count N`) with the next commit.
    pub fn record_stocktake(&mut self, counted: u64, now_ms: i64) {
        self.stocktake = Some((counted, now_ms));
    }

    /// Vehicles inside as they stand (page, `/api/status`, metrics, upstream); `None` when
    /// `[occupancy]` is off.
    pub fn occupancy_overview(&self, now_ms: i64) -> Option<crate::stats::OccupancyView> {
        let o = self.occupancy?;
        let p = &self.mem.presence;
        let inside = p.inside();
        let long: Vec<crate::stats::LongStay> = p
            .long_stays(now_ms, o.long_stay_ms)
            .into_iter()
            .map(|r| crate::stats::LongStay {
                plate: r.masked.clone(),
                entry_ms: r.ts_ms,
                entry: crate::core::summary::rfc3339_utc(r.ts_ms),
                gate: r.device.clone(),
            })
            .collect();
        Some(crate::stats::OccupancyView {
            inside,
            capacity: o.capacity.map(u64::from),
            free: o.capacity.map(|c| u64::from(c).saturating_sub(inside)),
            long_stay: long.len() as u64,
            long_stays: long
                .into_iter()
                .take(crate::stats::LONG_STAYS_LISTED)
                .collect(),
            missed_exits: p.totals.missed_exits,
            unmatched_exits: p.totals.unmatched_exits,
            in_set: p.in_set(),
            stocktake: p.totals.stocktake,
            stocktake_at: p
                .totals
                .stocktake
                .map(|(_, at)| crate::core::summary::rfc3339_utc(at)),
            stocktake_count: p.totals.stocktake.map(|(n, _)| n),
            adjust: p.totals.adjust,
        })
    }
}
