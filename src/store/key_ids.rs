//! Which pseudonym, care and presence keys the store has used, so that a key dir emptied or replaced while
//! the daemon was stopped is found at the next start instead of silently doubling the day's
//! distinct count ([`crate::keys`] holds the keys; this holds only their [`KeyId`]s).
//!
//! Table `key_ids`: the key's file name in `privacy.key_dir` (`subject-2026-11-30.key`,
//! `subject.key`, `care.key`) → v1 [`KeyRecordV1`]. Written in the batch that first uses a key
//! (made, or found in the key dir at start), when a start finds a key lost, and when a care
//! resident keyed with a lost care key is no longer listed; a pseudonym key's row is deleted
//! once the key's life is over (its day's end plus `aggregate.max_lateness`), or when the
//! rotation mode changed (the other mode's keys are destroyed on purpose).
//!
//! A pseudonym's key generation ([`KeyGen`]: the day's distinct sets are kept per generation)
//! is the index of its key's id in the record's `ids`. Rows written before this table existed
//! have generation 0: the key in the key dir at the first start of this version is registered
//! as generation 0 of its name.
//!
//! Like the rest of the writer's state, changes are staged and reach the memory only after the
//! transaction that writes them commits; staged changes survive a failed commit and go with the
//! next one.

use super::records::{decode, encode};
use super::StoreError;
use crate::core::care::{CarePseudonym, Resident};
use crate::core::daily::KeyGen;
use crate::keys::{KeyId, KeyLoss, SubjectKeys, CARE_KEY, PRESENCE_KEY};
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const KEY_IDS: TableDefinition<&str, &[u8]> = TableDefinition::new("key_ids");

/// What the store knows of the keys used under one file name, record version 1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecordV1 {
    /// The ids of every key used under this name, in the order they were first used: a
    /// pseudonym's key generation is the index of its key's id here.
    pub ids: Vec<KeyId>,
    /// The index in `ids` of the key in use; `None` after a loss until a new key is made.
    pub current: Option<u32>,
    /// When a start first found this name's key lost (ms); `None`: never lost.
    pub lost_at_ms: Option<i64>,
    /// `care.key` only: the care pseudonyms the watch held when the care key was found lost.
    /// A resident listed by one of them was keyed with the lost key and can never be matched
    /// again; removed once no longer listed.
    pub orphans: Vec<CarePseudonym>,
}

/// The records as committed, and the changes staged for the next commit.
#[derive(Debug, Default)]
pub(crate) struct KeyBook {
    mem: BTreeMap<String, KeyRecordV1>,
    /// `None`: delete the row.
    staged: BTreeMap<String, Option<KeyRecordV1>>,
    /// The [`SubjectKeys::changes`] last registered (staged).
    registered: Option<u64>,
}

impl KeyBook {
    /// The record of `name` as it will be after the staged changes.
    pub fn get(&self, name: &str) -> Option<&KeyRecordV1> {
        match self.staged.get(name) {
            Some(r) => r.as_ref(),
            None => self.mem.get(name),
        }
    }

    /// Every record as it will be after the staged changes.
    fn view(&self) -> BTreeMap<String, KeyRecordV1> {
        let mut all = self.mem.clone();
        for (name, r) in &self.staged {
            match r {
                Some(r) => {
                    all.insert(name.clone(), r.clone());
                }
                None => {
                    all.remove(name);
                }
            }
        }
        all
    }

    fn stage(&mut self, name: &str, rec: Option<KeyRecordV1>) {
        if self.mem.get(name) == rec.as_ref() {
            self.staged.remove(name);
        } else {
            self.staged.insert(name.to_string(), rec);
        }
    }

    /// Whether changes wait for a commit.
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// The records as stored (at open, and after a reopen).
    pub fn set_committed(&mut self, mem: BTreeMap<String, KeyRecordV1>) {
        self.mem = mem;
    }

    /// At start, with the keys just loaded from the key dir: every key the store used that
    /// should still be there (see [`SubjectKeys::tracks`]) but is missing or another is lost.
    /// Stages the loss (and, for the care key, the watch's pseudonyms `care_held` as orphans),
    /// forgets the rows of keys past their life, registers the keys present. Returns the lost
    /// keys' names.
    pub fn detect(
        &mut self,
        keys: &SubjectKeys,
        care_held: impl IntoIterator<Item = CarePseudonym>,
        now_ms: i64,
    ) -> Vec<String> {
        let mut lost = Vec::new();
        let mut care_held: Vec<CarePseudonym> = care_held.into_iter().collect();
        care_held.sort();
        for (name, rec) in self.view() {
            if !keys.tracks(&name, now_ms) {
                self.stage(&name, None);
                continue;
            }
            let Some(want) = rec.current.and_then(|i| rec.ids.get(i as usize)) else {
                continue;
            };
            if keys.id_of(&name) == Some(*want) {
                continue;
            }
            let mut r = rec.clone();
            r.current = None;
            r.lost_at_ms.get_or_insert(now_ms);
            if name == CARE_KEY {
                for p in &care_held {
                    if !r.orphans.contains(p) {
                        r.orphans.push(*p);
                    }
                }
            }
            self.stage(&name, Some(r));
            lost.push(name);
        }
        self.register(keys);
        lost
    }

    /// Stage the ids of the keys `keys` holds where the records do not have them as the key in
    /// use: a new name starts at generation 0; a key new to its name becomes its next
    /// generation. A lost key found again (the key dir put back) before any other key was made
    /// under its name is not lost after all: its loss and its orphans are forgotten. Cheap when
    /// no key was made or loaded since the last call.
    pub fn register(&mut self, keys: &SubjectKeys) {
        if !keys.persistent() || self.registered == Some(keys.changes()) {
            return;
        }
        for (name, id) in keys.held_ids() {
            let mut r = self.get(&name).cloned().unwrap_or_default();
            let idx = match r.ids.iter().position(|x| *x == id) {
                Some(i) => {
                    if r.current.is_none() && i + 1 == r.ids.len() {
                        r.lost_at_ms = None;
                        r.orphans.clear();
                    }
                    i
                }
                None => {
                    r.ids.push(id);
                    r.ids.len() - 1
                }
            };
            if r.current != Some(idx as u32) {
                r.current = Some(idx as u32);
                self.stage(&name, Some(r));
            }
        }
        self.registered = Some(keys.changes());
    }

    /// The generation of the key named `name` in use (0 when the store has no record: keys
    /// held only in memory).
    pub fn gen_of(&self, name: &str) -> KeyGen {
        self.get(name)
            .and_then(|r| r.current)
            .map_or(0, |i| i.min(KeyGen::MAX as u32) as KeyGen)
    }

    /// Care pseudonyms keyed with a lost care key.
    pub fn orphans(&self) -> &[CarePseudonym] {
        self.get(CARE_KEY).map_or(&[], |r| r.orphans.as_slice())
    }

    /// Forget orphans no longer on the care list (the installer relisted them).
    pub fn prune_orphans(&mut self, list: &[Resident]) {
        let Some(r) = self.get(CARE_KEY) else { return };
        if r.orphans
            .iter()
            .all(|p| list.iter().any(|x| x.pseudonym == *p))
        {
            return;
        }
        let mut r = r.clone();
        r.orphans.retain(|p| list.iter().any(|x| x.pseudonym == *p));
        self.stage(CARE_KEY, Some(r));
    }

    /// Forget the rows of keys past their life at `now_ms` (destroyed as they should be).
    pub fn forget_expired(&mut self, keys: &SubjectKeys, now_ms: i64) {
        if !keys.persistent() {
            return;
        }
        let doomed: Vec<String> = self
            .view()
            .into_keys()
            .filter(|name| !keys.tracks(name, now_ms))
            .collect();
        for name in doomed {
            self.stage(&name, None);
        }
    }

    /// The losses still shown at `now_ms`: a pseudonym key's until its day can no longer
    /// change, the care key's while residents keyed with it are listed (`list`).
    pub fn losses(&self, keys: &SubjectKeys, list: &[Resident], now_ms: i64) -> Vec<KeyLoss> {
        let mut out = Vec::new();
        for (name, r) in self.view() {
            let Some(at) = r.lost_at_ms else { continue };
            if name == PRESENCE_KEY {
                // Shown until a stocktake after it (the writer knows; see `keys_lost`).
                out.push(KeyLoss {
                    key: name,
                    date: None,
                    detected_ms: at,
                    until_ms: None,
                    unmatched: Vec::new(),
                });
                continue;
            }
            if name == CARE_KEY {
                let unmatched: Vec<String> = list
                    .iter()
                    .filter(|x| r.orphans.contains(&x.pseudonym))
                    .map(|x| x.alias.clone())
                    .collect();
                if !unmatched.is_empty() {
                    out.push(KeyLoss {
                        key: name,
                        date: None,
                        detected_ms: at,
                        until_ms: None,
                        unmatched,
                    });
                }
                continue;
            }
            let Some(until) = keys.loss_shown_until(&name, at) else {
                continue;
            };
            if now_ms < until {
                let date = name
                    .strip_prefix("subject-")
                    .and_then(|n| n.strip_suffix(".key"))
                    .map(str::to_string)
                    .unwrap_or_else(|| crate::core::daily::date_label(keys.local_day(at)));
                out.push(KeyLoss {
                    key: name,
                    date: Some(date),
                    detected_ms: at,
                    until_ms: Some(until),
                    unmatched: Vec::new(),
                });
            }
        }
        out
    }

    /// Write the staged changes in the batch's transaction. Returns the change in row bytes.
    pub fn write(&self, txn: &redb::WriteTransaction) -> Result<i64, StoreError> {
        if self.staged.is_empty() {
            return Ok(0);
        }
        let mut t = txn.open_table(KEY_IDS)?;
        let mut bytes = 0i64;
        for (name, r) in &self.staged {
            let old = match r {
                Some(r) => {
                    let rec = encode(r);
                    bytes += (name.len() + rec.len()) as i64;
                    t.insert(name.as_str(), rec.as_slice())?
                        .map(|o| o.value().len())
                }
                None => t.remove(name.as_str())?.map(|o| o.value().len()),
            };
            if let Some(len) = old {
                bytes -= (name.len() + len) as i64;
            }
        }
        Ok(bytes)
    }

    /// After the commit that wrote them: memory follows the staged changes.
    pub fn committed(&mut self) {
        for (name, r) in std::mem::take(&mut self.staged) {
            match r {
                Some(r) => {
                    self.mem.insert(name, r);
                }
                None => {
                    self.mem.remove(&name);
                }
            }
        }
    }
}

/// The records as stored, and their row bytes.
pub(crate) fn load(
    txn: &redb::ReadTransaction,
) -> Result<(BTreeMap<String, KeyRecordV1>, u64), StoreError> {
    let mut mem = BTreeMap::new();
    let mut bytes = 0;
    for row in txn.open_table(KEY_IDS)?.iter()? {
        let (k, v) = row?;
        bytes += (k.value().len() + v.value().len()) as u64;
        mem.insert(k.value().to_string(), decode("key_ids", v.value())?);
    }
    Ok((mem, bytes))
}

#[cfg(test)]
mod tests {
    //! A key dir emptied while the daemon was stopped, through the writer: found at the next
    //! start (once), the day counted per key, the care watch sending no false `silent`.

    use super::super::{Retention, Store, CLASS_ALERT, CLASS_SUMMARY, FILE_NAME};
    use crate::config::{CareResident, Dur, Secret, SubjectMode};
    use crate::core::daily::{DayCfg, DAY_MS};
    use crate::core::engine::Engine;
    use crate::core::event::{Event, Kind};
    use crate::core::summary::Site;
    use crate::core::window::WindowCfg;
    use crate::keys::{Rotate, SubjectKeys};
    use crate::store::OutboxTopic;
    use std::path::Path;

    const H: i64 = 3_600_000;

    fn access(id: &str, ts: i64, subject: &str) -> Event {
        Event {
            kind: Kind::Access,
            device: "door-1".into(),
            id: id.into(),
            ts_ms: ts,
            action: "entry".into(),
            result: "granted".into(),
            subject: Some(subject.into()),
        }
    }

    fn outbox(s: &Store, class: u8, topic: OutboxTopic) -> Vec<serde_json::Value> {
        s.outbox_after(class, None, 10_000)
            .unwrap()
            .into_iter()
            .filter(|(_, r)| r.topic == topic)
            .map(|(_, r)| serde_json::from_slice(&r.payload).unwrap())
            .collect()
    }

    fn resident(alias: &str, subject: Option<&str>, pseudonym: Option<String>) -> CareResident {
        CareResident {
            subject: subject.map(|s| Secret(s.into())),
            pseudonym,
            alias: alias.into(),
            silence: Dur::secs(3600),
            quiet: None,
        }
    }

    fn hex(p: [u8; 16]) -> String {
        p.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn open_keys(kd: &Path, now: i64) -> SubjectKeys {
        SubjectKeys::open(
            kd,
            Rotate::Daily,
            8 * 3600,
            DAY_MS as u64,
            7 * DAY_MS as u64,
            now,
        )
        .unwrap()
    }

    #[test]
    fn a_key_dir_put_back_before_a_new_key_was_made_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let kd = dir.path().join("data.keys");
        let moved = dir.path().join("moved");
        let t = 20_400 * DAY_MS;
        let p;
        {
            let (_s, mut w) = Store::open(&data, SubjectMode::Hashed).unwrap();
            w.set_subject_keys(open_keys(&kd, t), t);
            p = hex(w.care_pseudonym("card:ELDER-2").unwrap());
            w.set_care(&[resident("5-1-302", None, Some(p.clone()))]);
            // The watch of them starts (a maintenance commit).
            w.commit(&engine_for_due(), &[], &[], t, Some(&retention()))
                .unwrap();
        }
        std::fs::rename(&kd, &moved).unwrap();
        // Started without it: lost (the loss is written with the first commit).
        {
            let (_s, mut w) = Store::open(&data, SubjectMode::Hashed).unwrap();
            assert_eq!(
                w.set_subject_keys(open_keys(&kd, t + 1), t + 1),
                ["care.key"]
            );
            w.set_care(&[resident("5-1-302", None, Some(p.clone()))]);
            assert_eq!(w.keys_lost(t + 1).len(), 1);
            assert!(w
                .maintenance_due(&engine_for_due(), &retention(), t + 2)
                .unwrap());
            w.commit(&engine_for_due(), &[], &[], t + 2, None).unwrap();
        }
        // Put back before any new care key was made: found again, nothing lost.
        std::fs::remove_dir_all(&kd).unwrap();
        std::fs::rename(&moved, &kd).unwrap();
        let (_s, mut w) = Store::open(&data, SubjectMode::Hashed).unwrap();
        assert!(w.set_subject_keys(open_keys(&kd, t + 3), t + 3).is_empty());
        w.set_care(&[resident("5-1-302", None, Some(p))]);
        assert!(w.keys_lost(t + 3).is_empty(), "{:?}", w.keys_lost(t + 3));
        assert!(w.care_overview().iter().all(|l| !l.key_lost));
    }

    fn engine_for_due() -> Engine {
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
            alert_actions: Vec::new(),
            max_summary_bytes: usize::MAX,
        }
    }

    fn retention() -> Retention {
        Retention {
            dedup_ttl_ms: 7 * DAY_MS as u64,
            raw_retention_ms: 7 * DAY_MS as u64,
            purge_batch: 1000,
        }
    }

    #[test]
    fn a_lost_key_dir_is_found_once_counts_per_key_and_sends_no_false_silent() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let kd = dir.path().join("data.keys");
        let en = Engine {
            window: WindowCfg {
                window_ms: 10_000,
                grace_ms: 1_000,
                max_lateness_ms: DAY_MS as u64,
                max_future_skew_ms: 60_000,
            },
            dedup_ttl_ms: 600_000,
            gateway: "gw".into(),
            site: Site::default(),
            alert_actions: Vec::new(),
            max_summary_bytes: usize::MAX,
        };
        let cfg = DayCfg {
            offset_ms: 8 * H,
            grace_ms: 1_000,
            lateness_ms: DAY_MS,
            settle_ms: 10_000,
        };
        let ret = Retention {
            dedup_ttl_ms: 7 * DAY_MS as u64,
            raw_retention_ms: 7 * DAY_MS as u64,
            purge_batch: 1000,
        };
        let day = 20_400;
        let (start, end) = cfg.bounds(day);
        let people = ["card:1", "card:2", "face:3"];

        // First run: three people pass; resident 3-2-601 is listed by subject, 5-1-302 by a
        // pseudonym made with the care key of that time.
        let t0 = start + 8 * H;
        let old_p2;
        {
            let (_s, mut w) = Store::open(&data, SubjectMode::Hashed).unwrap();
            w.set_day_cfg(cfg);
            assert!(w.set_subject_keys(open_keys(&kd, t0), t0).is_empty());
            old_p2 = hex(w.care_pseudonym("card:ELDER-2").unwrap());
            w.set_care(&[
                resident("3-2-601", Some("card:ELDER-1"), None),
                resident("5-1-302", None, Some(old_p2.clone())),
            ]);
            w.set_care_hold(false);
            let evs: Vec<Event> = people
                .iter()
                .enumerate()
                .map(|(i, p)| access(&format!("a{i}"), t0 + i as i64, p))
                .collect();
            w.commit(
                &en,
                &evs.iter().collect::<Vec<_>>(),
                &[],
                t0 + 10,
                Some(&ret),
            )
            .unwrap();
            w.commit(&en, &[], &[], t0 + 20, Some(&ret)).unwrap();
            assert!(w.keys_lost(t0 + 20).is_empty());
        }
        // The store file holds the keys' ids, never a key.
        let store_bytes = std::fs::read(data.join(FILE_NAME)).unwrap();
        for f in std::fs::read_dir(&kd).unwrap() {
            let key = std::fs::read(f.unwrap().path()).unwrap();
            assert_eq!(key.len(), 32);
            assert!(!store_bytes.windows(32).any(|w| w == key.as_slice()));
            let id = crate::keys::key_id(&key.try_into().unwrap());
            assert!(store_bytes.windows(16).any(|w| w == id), "the id is kept");
        }

        // Stopped; the key dir emptied; started again the same day: both keys found lost.
        for f in std::fs::read_dir(&kd).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        let t1 = t0 + H;
        let residents = |p2: String| {
            vec![
                resident("3-2-601", Some("card:ELDER-1"), None),
                resident("5-1-302", None, Some(p2)),
            ]
        };
        {
            let (s, mut w) = Store::open(&data, SubjectMode::Hashed).unwrap();
            w.set_day_cfg(cfg);
            let lost = w.set_subject_keys(open_keys(&kd, t1), t1);
            let day_key = format!("subject-{}.key", crate::keys::day_label(day));
            assert_eq!(lost, vec!["care.key".to_string(), day_key.clone()]);
            w.set_care(&residents(old_p2.clone()));
            w.set_care_hold(false);
            let shown = w.keys_lost(t1);
            assert_eq!(shown.len(), 2, "{shown:?}");
            assert_eq!(shown[0].key, "care.key");
            assert_eq!(shown[0].unmatched, vec!["5-1-302".to_string()]);
            assert_eq!(shown[1].key, day_key);
            assert_eq!(
                shown[1].date.as_deref(),
                Some(crate::keys::day_label(day).as_str())
            );
            assert_eq!(shown[1].until_ms, Some(end + DAY_MS));
            let lines = w.care_overview();
            assert!(lines.iter().any(|l| l.alias == "5-1-302" && l.key_lost));
            assert!(lines.iter().any(|l| l.alias == "3-2-601" && !l.key_lost));
            // The same three pass again, and the subject-listed resident (its pseudonym made
            // with the new care key) too.
            let mut evs: Vec<Event> = people
                .iter()
                .enumerate()
                .map(|(i, p)| access(&format!("b{i}"), t1 + i as i64, p))
                .collect();
            evs.push(access("e1", t1 + 5, "card:ELDER-1"));
            w.commit(
                &en,
                &evs.iter().collect::<Vec<_>>(),
                &[],
                t1 + 10,
                Some(&ret),
            )
            .unwrap();
            assert!(w
                .care_overview()
                .iter()
                .any(|l| l.alias == "3-2-601" && l.last_seen_ms == Some(t1 + 5)));
            // Two hours of silence: 3-2-601 is silent, truly; 5-1-302 can never be seen, so
            // nothing is said of them.
            w.commit(&en, &[], &[], t1 + 3 * H, Some(&ret)).unwrap();
            let notices = outbox(&s, CLASS_ALERT, OutboxTopic::Care);
            assert_eq!(notices.len(), 1, "{notices:?}");
            assert_eq!(notices[0]["alias"], "3-2-601");
            assert_eq!(notices[0]["state"], "silent");
            // The day ends: three people, counted under two keys, not six.
            w.commit(&en, &[], &[], end + 2_000, Some(&ret)).unwrap();
            let d = outbox(&s, CLASS_SUMMARY, OutboxTopic::Daily);
            assert_eq!(d.len(), 1, "{d:?}");
            assert_eq!(d[0]["distinct"]["access_subjects"], 4, "{}", d[0]);
            assert_eq!(d[0]["distinct"]["key_generations"], 2, "{}", d[0]);
        }

        // A third start with the new keys: nothing newly lost (no second ERROR), but the day
        // and the unmatched resident are still shown.
        let t2 = end + 3_000;
        let (s, mut w) = Store::open(&data, SubjectMode::Hashed).unwrap();
        w.set_day_cfg(cfg);
        assert!(w.set_subject_keys(open_keys(&kd, t2), t2).is_empty());
        w.set_care(&residents(old_p2.clone()));
        w.set_care_hold(false);
        assert_eq!(w.keys_lost(t2).len(), 2);
        // The installer relists 5-1-302 with a pseudonym of the new care key: matched again.
        let new_p2 = hex(w.care_pseudonym("card:ELDER-2").unwrap());
        assert_ne!(new_p2, old_p2);
        w.set_care(&residents(new_p2));
        w.commit(&en, &[], &[], t2 + 1_000, Some(&ret)).unwrap();
        let shown = w.keys_lost(t2 + 1_000);
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(shown[0].key.starts_with("subject-"));
        w.commit(
            &en,
            &[&access("e2", t2 + 2_000, "card:ELDER-2")],
            &[],
            t2 + 2_010,
            None,
        )
        .unwrap();
        assert!(w
            .care_overview()
            .iter()
            .any(|l| l.alias == "5-1-302" && !l.key_lost && l.last_seen_ms == Some(t2 + 2_000)));
        // Once the day can no longer change, its key dies and the loss is no longer shown.
        let t3 = end + DAY_MS + 1;
        w.destroy_expired_keys(t3);
        w.commit(&en, &[], &[], t3, Some(&ret)).unwrap();
        assert!(w.keys_lost(t3).is_empty());
        // Relisted, 5-1-302 is watched again: silent now, from their pass after the relisting.
        let notices = outbox(&s, CLASS_ALERT, OutboxTopic::Care);
        let theirs: Vec<_> = notices.iter().filter(|n| n["alias"] == "5-1-302").collect();
        assert_eq!(theirs.len(), 1, "{notices:?}");
        assert_eq!(theirs[0]["state"], "silent");
        assert_eq!(
            theirs[0]["last_seen"],
            zhian_proto::rfc3339_utc(t2 + 2_000).as_str()
        );
    }
}
