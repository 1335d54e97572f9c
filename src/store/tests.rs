use super::*;
use crate::config::SubjectMode;
use crate::core::counter::Value;
use crate::core::engine::{Engine, Input, Outcome};
use crate::core::event::{Event, Kind};
use crate::core::summary::Site;
use crate::core::window::WindowCfg;
use redb::{ReadableTable, ReadableTableMetadata};

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
        max_summary_bytes: usize::MAX,
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
        let (_s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        let (a, b) = (ev("a", now), ev("b", now));
        let r = w.commit(&en, &[&a, &b, &a], &[], now, None).unwrap();
        assert_eq!(
            r.outcomes,
            vec![Outcome::Accepted, Outcome::Accepted, Outcome::Duplicate]
        );
    }
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    let a = ev("a", now);
    let r = w.commit(&en, &[&a], &[], now + 1, None).unwrap();
    assert_eq!(r.outcomes, vec![Outcome::Duplicate]);
    // Window closes: one summary in the outbox, n = 2.
    let r = w.commit(&en, &[], &[], now + 20_000, None).unwrap();
    assert_eq!(r.emitted, 1);
    let out = s.outbox_after(CLASS_SUMMARY, None, 10).unwrap();
    assert_eq!(out.len(), 1);
    let v: serde_json::Value = serde_json::from_slice(&out[0].1.payload).unwrap();
    assert_eq!(v["counts"][0]["n"], 2);
    // Acknowledged entries go.
    w.commit(&en, &[], &[out[0].0], now + 21_000, None).unwrap();
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
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Drop).unwrap();
    let now = 1_000_000_000;
    let evs: Vec<Event> = (0..50).map(|i| ev(&i.to_string(), now)).collect();
    let refs: Vec<&Event> = evs.iter().collect();
    w.commit(&en, &refs, &[], now, None).unwrap();
    let ret = Retention {
        dedup_ttl_ms: 600_000,
        raw_retention_ms: 1_000,
        purge_batch: 20,
    };
    let later = now + 700_000;
    // The raw events carry their dedup hashes: past the TTL they go with the rows (no
    // dedup_log row is written for them).
    let r = w.commit(&en, &[], &[], later, Some(&ret)).unwrap();
    assert_eq!((r.purged_dedup, r.purged_events), (0, 20));
    let r = w.commit(&en, &[], &[], later, Some(&ret)).unwrap();
    assert_eq!((r.purged_dedup, r.purged_events), (0, 20));
    let r = w.commit(&en, &[], &[], later, Some(&ret)).unwrap();
    assert_eq!((r.purged_dedup, r.purged_events), (0, 10));
    let o = s.overview().unwrap();
    assert_eq!((o.dedup_keys, o.raw_events), (0, 0));
    // After the TTL the same id counts again.
    let again = ev("0", later);
    let r = w.commit(&en, &[&again], &[], later, None).unwrap();
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
        max_step: 1000,
        ts_ms: now,
    };
    let commit = |w: &mut StoreWriter, v: i64| {
        let r = reading(v);
        let st = StateUpdate {
            key: "vehicle\0gate-1\0barrier".into(),
            value: Value::Bool(v % 2 == 0),
            ts_ms: now,
        };
        w.commit_inputs(&en, &[Input::Counter(&r)], &[st], &[], now, None)
            .unwrap()
            .outcomes
    };
    {
        let (_s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        assert_eq!(
            commit(&mut w, 65_530),
            vec![Outcome::Counted(Step::Baseline)]
        );
        assert_eq!(
            commit(&mut w, 65_535),
            vec![Outcome::Counted(Step::Increase(5))]
        );
    }
    // A decrease is held across reopens (glitch rule), then, once it keeps disagreeing with
    // the last value, counted as a wrap.
    {
        let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        assert_eq!(commit(&mut w, 4), vec![Outcome::Counted(Step::Increase(0))]);
        assert_eq!(s.counters().unwrap()[0].1.held, vec![4]);
    }
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    assert_eq!(commit(&mut w, 6), vec![Outcome::Counted(Step::Increase(0))]);
    assert_eq!(commit(&mut w, 6), vec![Outcome::Counted(Step::Wrapped(7))]);
    let ws = s.windows().unwrap();
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].total(), 12);
    let c = s.counters().unwrap()[0].1.clone();
    assert_eq!((c.value, c.held), (6, vec![]));
    let states = s.states().unwrap();
    assert_eq!(states[0].1.value, Value::Bool(true));
}

#[test]
fn pressure_evicts_raw_then_dedup_then_outbox_counted() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine();
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    let now = 1_000_000_000;
    let evs: Vec<Event> = (0..30).map(|i| ev(&i.to_string(), now)).collect();
    let refs: Vec<&Event> = evs.iter().collect();
    w.commit(&en, &refs, &[], now, None).unwrap();
    // Two closed windows -> two pending summaries.
    w.commit(&en, &[&ev("x", now + 20_000)], &[], now + 20_000, None)
        .unwrap();
    w.commit(&en, &[], &[], now + 40_000, None).unwrap();
    assert_eq!(s.overview().unwrap().pending_summaries, 2);
    // No room at all: every commit evicts, in the contract's order.
    w.set_max_bytes(0);
    assert_eq!(w.pressure(), Pressure::Hard);
    let first = w.commit(&en, &[], &[], now + 40_000, None).unwrap();
    assert_eq!((first.pressure_events, first.dropped_dedup_keys), (31, 0));
    let second = w.commit(&en, &[], &[], now + 40_000, None).unwrap();
    assert_eq!(
        (
            second.pressure_events,
            second.dropped_dedup_keys,
            second.dropped_summaries
        ),
        (0, 31, 0)
    );
    let third = w.commit(&en, &[], &[], now + 40_000, None).unwrap();
    assert_eq!((third.dropped_dedup_keys, third.dropped_summaries), (0, 2));
    let o = s.overview().unwrap();
    assert_eq!(
        (
            o.raw_events,
            o.pending_summaries,
            o.dropped_summaries,
            o.dropped_dedup_keys,
            o.evicted_events
        ),
        (0, 0, 2, 31, 31)
    );
    // With room again, nothing more goes and the counts survive a reopen.
    w.set_max_bytes(u64::MAX);
    assert_eq!(w.pressure(), Pressure::None);
    drop((s, w));
    let (s, _w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    assert_eq!(s.overview().unwrap().dropped_summaries, 2);
}

#[test]
fn format_1_store_is_migrated_with_its_dedup_keys_and_open_windows() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine();
    let now = 1_000_000_000;
    // A format 1 store as the previous release wrote it: one dedup key, one open window.
    {
        let db = redb::Database::create(dir.path().join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert("format", 1u32.to_le_bytes().as_slice())
                .unwrap();
            meta.insert("subject_key", [7u8; 32].as_slice()).unwrap();
            meta.insert("next_seq", 5u64.to_le_bytes().as_slice())
                .unwrap();
            let mut d = txn.open_table(DEDUP_V1).unwrap();
            d.insert("access\0door-1\0a", now).unwrap();
            let mut t = txn.open_table(DEDUP_BY_TIME_V1).unwrap();
            t.insert((now, "access\0door-1\0a"), ()).unwrap();
            let mut o = txn.open_table(OPEN_WINDOWS_V1).unwrap();
            o.insert(en.window.start_of(now), ()).unwrap();
            let mut win = crate::core::summary::WindowState::new(en.window.start_of(now), 10);
            win.add(crate::core::summary::CountKey::of(&ev("a", now)), 1);
            let mut wt = txn.open_table(WINDOWS).unwrap();
            wt.insert(en.window.start_of(now), records::encode(&win).as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    assert_eq!(w.dedup_keys(), 1);
    assert_eq!(s.open_windows().unwrap().len(), 1);
    let r = w
        .commit(&en, &[&ev("a", now), &ev("b", now)], &[], now + 1, None)
        .unwrap();
    assert_eq!(r.outcomes, vec![Outcome::Duplicate, Outcome::Accepted]);
    let r = w.commit(&en, &[], &[], now + 20_000, None).unwrap();
    assert_eq!(r.emitted, 1);
    let out = s.outbox_after(CLASS_SUMMARY, None, 10).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out[0].1.payload).unwrap();
    assert_eq!(v["counts"][0]["n"], 2);
}

#[test]
fn format_2_store_loses_its_subject_key_and_the_subjects_hashed_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine();
    let now = 1_000_000_000;
    let mut e = ev("a", now);
    e.subject = Some("card:88213".into());
    {
        let (_s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        w.commit(&en, &[&e], &[], now, None).unwrap();
    }
    // Make it look as format 2 left it: the key under its old name, the subject hashed with it.
    let key = [9u8; 32];
    {
        let db = redb::Database::create(dir.path().join(FILE_NAME)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            let dk: Vec<u8> = meta.remove("dedup_key").unwrap().unwrap().value().to_vec();
            assert_eq!(dk.len(), 32);
            meta.insert("subject_key", dk.as_slice()).unwrap();
            meta.insert("format", 2u32.to_le_bytes().as_slice())
                .unwrap();
            let mut events = txn.open_table(EVENTS).unwrap();
            let (k, v) = {
                let (k, v) = events.first().unwrap().unwrap();
                (k.value(), v.value().to_vec())
            };
            let mut rec = records::decode_event(&v).unwrap();
            let h = blake3::keyed_hash(&key, b"card:88213");
            rec.subject = StoredSubject::Hashed(h.as_bytes()[..16].try_into().unwrap());
            let hash = records::event_hash(&v).unwrap();
            events
                .insert(k, records::encode_event(&rec, hash).as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    // The dedup hashes still match (same key), the subject is gone, and so is the old name.
    let r = w.commit(&en, &[&e], &[], now + 1, None).unwrap();
    assert_eq!(r.outcomes, vec![Outcome::Duplicate]);
    let txn = s.read().unwrap();
    let meta = txn.open_table(META).unwrap();
    assert!(meta.get("subject_key").unwrap().is_none());
    let format = meta.get("format").unwrap().unwrap().value().to_vec();
    assert_eq!(format, FORMAT.to_le_bytes());
    let events = txn.open_table(EVENTS).unwrap();
    for row in events.iter().unwrap() {
        let rec = records::decode_event(row.unwrap().1.value()).unwrap();
        assert_eq!(rec.subject, StoredSubject::None);
    }
}

#[test]
fn alerts_come_first() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine();
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    let now = 1_000_000_000;
    w.commit(&en, &[&ev("a", now)], &[], now, None).unwrap();
    w.commit(&en, &[], &[], now + 20_000, None).unwrap();
    let mut cam = ev("c", now + 20_000);
    cam.kind = Kind::Camera;
    cam.action = "fire_lane_blocked".into();
    w.commit(&en, &[&cam], &[], now + 20_000, None).unwrap();
    let alerts = s.outbox_after(CLASS_ALERT, None, 10).unwrap();
    assert_eq!(alerts.len(), 1);
    assert_eq!(alerts[0].1.topic, OutboxTopic::Alert);
    let o = s.overview().unwrap();
    assert_eq!((o.pending_alerts, o.pending_summaries), (1, 1));
    assert_eq!(o.oldest_pending_window_ms, Some(en.window.start_of(now)));
}

#[test]
fn free_space_is_reused_and_compaction_gives_it_back_when_it_pays() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine();
    let now = 1_000_000_000;
    let ret = Retention {
        dedup_ttl_ms: 1,
        raw_retention_ms: 1,
        purge_batch: 100_000,
    };
    let batch = |round: usize| -> Vec<Event> {
        (0..1000)
            .map(|i| ev(&format!("{round}-{i}-{}", "x".repeat(200)), now))
            .collect()
    };
    let grown = {
        let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        for round in 0..40 {
            let evs = batch(round);
            let refs: Vec<&Event> = evs.iter().collect();
            w.commit(&en, &refs, &[], now, None).unwrap();
        }
        let grown = s.file_bytes();
        assert!(grown >= 8 << 20, "{grown}");
        // Everything expires and is purged: the pages are free again, the file stays.
        let later = now + 3_600_000 * 48;
        while w.maintenance_due(&en, &ret, later).unwrap() {
            w.commit(&en, &[], &[], later, Some(&ret)).unwrap();
        }
        assert_eq!(s.overview().unwrap().raw_events, 0);
        // Freed pages are reused: as much again does not grow the file much.
        for round in 40..80 {
            let evs = batch(round);
            let refs: Vec<&Event> = evs.iter().collect();
            w.commit(&en, &[], &[], later, Some(&ret)).unwrap();
            w.commit(&en, &refs, &[], later, None).unwrap();
        }
        assert!(s.file_bytes() <= grown * 2, "{} vs {grown}", s.file_bytes());
        while w.maintenance_due(&en, &ret, later + 1000).unwrap() {
            w.commit(&en, &[], &[], later + 1000, Some(&ret)).unwrap();
        }
        s.file_bytes()
    };
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    w.set_max_bytes(u64::MAX);
    assert!(
        w.compact_if_it_pays().unwrap(),
        "a mostly free file is compacted"
    );
    assert!(
        s.file_bytes() < grown / 4,
        "{} after compaction, {grown} before",
        s.file_bytes()
    );
    // Nothing left to gain: no second compaction.
    assert!(!w.compact_if_it_pays().unwrap());
    assert_eq!(s.overview().unwrap().raw_events, 0);
}

#[test]
fn hashes_outlive_their_raw_events_within_the_ttl_and_memory_forgets_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine(); // dedup TTL 600 s
    let now = 1_000_000_000;
    let ret = Retention {
        dedup_ttl_ms: 600_000,
        raw_retention_ms: 1_000,
        purge_batch: 100,
    };
    {
        let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        let evs: Vec<Event> = (0..50).map(|i| ev(&i.to_string(), now)).collect();
        let refs: Vec<&Event> = evs.iter().collect();
        w.commit(&en, &refs, &[], now, None).unwrap();
        // Raw retention (1 s) is shorter than the TTL: the rows go, their hashes stay.
        let r = w.commit(&en, &[], &[], now + 5_000, Some(&ret)).unwrap();
        assert_eq!(r.purged_events, 50);
        assert_eq!(s.overview().unwrap().raw_events, 0);
        assert_eq!(w.dedup_keys(), 50);
    }
    let (_s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    assert_eq!(w.dedup_keys(), 50, "rebuilt from dedup_log");
    let r = w
        .commit(&en, &[&ev("7", now)], &[], now + 6_000, None)
        .unwrap();
    assert_eq!(r.outcomes, vec![Outcome::Duplicate]);
    // A raw event whose TTL passed is forgotten from memory without a write.
    let fresh = ev("fresh", now + 10_000);
    w.commit(&en, &[&fresh], &[], now + 10_000, None).unwrap();
    assert_eq!(w.dedup_keys(), 51);
    assert_eq!(
        w.forget_expired_hashes(now + 10_000 + 600_001, 600_000, 100)
            .unwrap(),
        1
    );
    let r = w
        .commit(
            &en,
            &[&ev("fresh", now + 700_000)],
            &[],
            now + 700_000,
            None,
        )
        .unwrap();
    assert_eq!(
        r.outcomes,
        vec![Outcome::Accepted],
        "past the TTL it counts again"
    );
}

#[test]
fn devices_are_remembered_new_at_once_known_ones_together_every_period() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine();
    let now = 1_000_000_000;
    let on = |device: &str, id: &str, ts: i64| Event {
        device: device.into(),
        ..ev(id, ts)
    };
    let seen = |s: &Store| -> Vec<(String, i64)> {
        let mut v: Vec<_> = s
            .devices()
            .unwrap()
            .into_iter()
            .map(|(_, d, t)| (d, t))
            .collect();
        v.sort();
        v
    };
    {
        let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        w.commit(&en, &[&on("door-1", "a", now)], &[], now, None)
            .unwrap();
        assert_eq!(seen(&s), [("door-1".to_string(), now)], "new: at once");
        // A known device seen again: not written yet.
        w.commit(&en, &[&on("door-1", "b", now)], &[], now + 1000, None)
            .unwrap();
        assert_eq!(seen(&s), [("door-1".to_string(), now)]);
        // A new device flushes the pending sighting with it.
        w.commit(&en, &[&on("door-2", "c", now)], &[], now + 2000, None)
            .unwrap();
        assert_eq!(
            seen(&s),
            [
                ("door-1".to_string(), now + 1000),
                ("door-2".to_string(), now + 2000)
            ]
        );
        w.commit(&en, &[&on("door-1", "d", now)], &[], now + 3000, None)
            .unwrap();
        w.commit(&en, &[&on("door-2", "e", now)], &[], now + 4000, None)
            .unwrap();
        assert_eq!(seen(&s)[0].1, now + 1000, "pending");
        // The oldest pending sighting is a period old: both written in one go.
        let later = now + 3000 + DEVICE_SEEN_EVERY_MS;
        w.commit(&en, &[&on("door-1", "f", now)], &[], later, None)
            .unwrap();
        assert_eq!(
            seen(&s),
            [
                ("door-1".to_string(), later),
                ("door-2".to_string(), now + 4000)
            ]
        );
    }
    let (s, _w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    assert_eq!(seen(&s).len(), 2, "remembered across a reopen");
}

/// `health.max_devices` bounds the table, never the events: past it the longest silent goes,
/// in the batch's transaction (rows and marks), across a reopen; forgetting by name and a
/// source's mark work the same way.
#[test]
fn the_device_table_forgets_the_longest_silent_at_its_bound_and_counts_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine();
    let now = 1_000_000_000;
    let on = |device: &str, id: &str| Event {
        device: device.into(),
        ..ev(id, now)
    };
    let names = |s: &Store| -> Vec<String> {
        let mut v: Vec<_> = s
            .devices()
            .unwrap()
            .into_iter()
            .map(|(_, d, _)| d)
            .collect();
        v.sort();
        v
    };
    let marks = |w: &StoreWriter| -> Vec<(String, String)> {
        w.known_devices()
            .into_iter()
            .map(|(k, _, m)| (k.split_once('\0').unwrap().1.to_string(), m))
            .collect()
    };
    {
        let (s, mut w) = Store::open(dir.path(), SubjectMode::Drop).unwrap();
        w.set_max_devices(3);
        for (i, d) in ["door-1", "door-2", "plate-a"].iter().enumerate() {
            let mut staged = std::collections::HashMap::new();
            if d.starts_with("plate") {
                staged.insert(format!("access\0{d}"), "m-old".to_string());
            }
            w.stage_device_marks(staged);
            let r = w
                .commit(&en, &[&on(d, &format!("e{i}"))], &[], now + i as i64, None)
                .unwrap();
            assert!(r.forgotten.is_empty());
        }
        assert_eq!(names(&s), ["door-1", "door-2", "plate-a"]);
        assert_eq!(marks(&w)[2], ("plate-a".to_string(), "m-old".to_string()));
        // door-1 is seen again (pending, not written): door-2 is now the longest silent.
        w.commit(&en, &[&on("door-1", "e3")], &[], now + 10, None)
            .unwrap();
        // Two new devices in one batch: both counted, the two longest silent forgotten.
        let r = w
            .commit(
                &en,
                &[&on("door-9", "e4"), &on("door-8", "e5")],
                &[],
                now + 20,
                None,
            )
            .unwrap();
        assert_eq!(r.outcomes, vec![Outcome::Accepted, Outcome::Accepted]);
        assert_eq!(r.forgotten, ["access\0door-2", "access\0plate-a"]);
        assert_eq!(names(&s), ["door-1", "door-8", "door-9"]);
        assert!(
            marks(&w).iter().all(|(_, m)| m.is_empty()),
            "the mark went with its device"
        );
        // A batch larger than the bound: the table still holds 3.
        let evs: Vec<Event> = (0..5).map(|i| on(&format!("cam-{i}"), "x")).collect();
        let refs: Vec<&Event> = evs.iter().collect();
        let r = w.commit(&en, &refs, &[], now + 30, None).unwrap();
        assert!(r.outcomes.iter().all(|o| *o == Outcome::Accepted));
        assert_eq!(r.forgotten.len(), 5);
        assert_eq!(names(&s), ["cam-2", "cam-3", "cam-4"]);
        // The installer forgets by key; unknown keys are ignored.
        let gone = w
            .forget_devices(&["access\0cam-3".into(), "access\0nope".into()])
            .unwrap();
        assert_eq!(gone, ["access\0cam-3"]);
        assert_eq!(names(&s), ["cam-2", "cam-4"]);
        // A device's source mark changes when its events come through another source.
        let mut staged = std::collections::HashMap::new();
        staged.insert("access\0cam-4".to_string(), "m-new".to_string());
        w.stage_device_marks(staged);
        w.commit(&en, &[&on("cam-4", "y")], &[], now + 40, None)
            .unwrap();
        assert_eq!(w.device_mark("access\0cam-4"), "m-new");
    }
    let (s, w) = Store::open(dir.path(), SubjectMode::Drop).unwrap();
    assert_eq!(
        names(&s),
        ["cam-2", "cam-4"],
        "the bound held across a reopen"
    );
    assert_eq!(w.device_mark("access\0cam-4"), "m-new", "marks are kept");
    assert_eq!(s.raw_events().unwrap().len(), 12, "every event counted");
}

/// The day's distinct subjects and totals against a model: duplicates by id count once, the
/// same card on two events once, a plate as a vehicle; issued after the day's end + grace; a
/// late event re-issues with rev + 1 once settled; a reopen neither re-issues nor double-counts.
#[test]
fn daily_distinct_counts_follow_a_model_across_late_events_and_reopen() {
    use crate::core::daily::{DayCfg, DAY_MS};
    let dir = tempfile::tempdir().unwrap();
    let mut en = engine();
    en.window.max_lateness_ms = DAY_MS as u64;
    let cfg = DayCfg {
        offset_ms: 8 * 3_600_000,
        grace_ms: 1_000,
        lateness_ms: DAY_MS,
        settle_ms: 10_000,
    };
    let day = 20_400; // a local day
    let (start, end) = cfg.bounds(day);
    let ret = Retention {
        dedup_ttl_ms: 7 * DAY_MS as u64,
        raw_retention_ms: 7 * DAY_MS as u64,
        purge_batch: 1000,
    };
    let mk = |id: &str, ts: i64, kind: Kind, subject: &str| Event {
        kind,
        device: if kind == Kind::Vehicle {
            "gate-1"
        } else {
            "door-1"
        }
        .into(),
        id: id.into(),
        ts_ms: ts,
        action: "entry".into(),
        result: "ok".into(),
        subject: Some(subject.into()),
    };
    let dailies = |s: &Store| -> Vec<serde_json::Value> {
        s.outbox_after(CLASS_SUMMARY, None, 10_000)
            .unwrap()
            .into_iter()
            .filter(|(_, r)| r.topic == OutboxTopic::Daily)
            .map(|(_, r)| serde_json::from_slice(&r.payload).unwrap())
            .collect()
    };
    let kd = dir.path().join("keys");
    let keys = || {
        crate::keys::SubjectKeys::open(
            &kd,
            crate::keys::Rotate::Daily,
            8 * 3600,
            DAY_MS as u64,
            7 * DAY_MS as u64,
            start,
        )
        .unwrap()
    };
    {
        let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        w.set_day_cfg(cfg);
        w.set_subject_keys(keys(), start);
        let t = start + 3_600_000;
        let batch = [
            mk("a1", t, Kind::Access, "card:1"),
            mk("a2", t + 1, Kind::Access, "card:1"), // same card: one subject
            mk("a1", t, Kind::Access, "card:1"),     // duplicate id: not counted
            mk("a3", t + 2, Kind::Access, "face:7"),
            mk("v1", t + 3, Kind::Vehicle, "浙A12345"),
            mk("v2", t + 4, Kind::Vehicle, "浙A12345"),
            mk("v3", t + 5, Kind::Vehicle, "浙B00001"),
        ];
        let refs: Vec<&Event> = batch.iter().collect();
        w.commit(&en, &refs, &[], t + 10, None).unwrap();
        // The day before it ends: nothing issued.
        w.commit(&en, &[], &[], end - 1, Some(&ret)).unwrap();
        assert!(dailies(&s).is_empty());
        w.commit(&en, &[], &[], end + 1_000, Some(&ret)).unwrap();
        let d = dailies(&s);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0]["schema"], "zhian.daily.v1");
        assert_eq!(d[0]["rev"], 0);
        assert_eq!(d[0]["tz"], "+08:00");
        assert_eq!(d[0]["date"], crate::core::daily::date_label(day));
        assert_eq!(d[0]["distinct"]["access_subjects"], 2);
        assert_eq!(d[0]["distinct"]["vehicles"], 2);
        let total: u64 = d[0]["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["n"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 6);
        assert!(!String::from_utf8_lossy(&serde_json::to_vec(&d[0]).unwrap()).contains("card:"));
    }
    // Reopened (with the same keys, as the daemon's key dir gives): nothing re-issued; a late
    // event with a known card and one with a new card.
    let (s, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
    w.set_day_cfg(cfg);
    w.set_subject_keys(keys(), start);
    w.commit(&en, &[], &[], end + 2_000, Some(&ret)).unwrap();
    assert_eq!(dailies(&s).len(), 1);
    let late = [
        mk("a4", end - 5_000, Kind::Access, "card:1"),
        mk("a5", end - 4_000, Kind::Access, "card:2"),
    ];
    let refs: Vec<&Event> = late.iter().collect();
    let now = end + 60_000;
    let r = w.commit(&en, &refs, &[], now, None).unwrap();
    assert_eq!(r.outcomes, vec![Outcome::Accepted, Outcome::Accepted]);
    w.commit(&en, &[], &[], now + 5_000, Some(&ret)).unwrap();
    assert_eq!(dailies(&s).len(), 1, "not yet settled");
    w.commit(&en, &[], &[], now + 10_000, Some(&ret)).unwrap();
    let d = dailies(&s);
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[1]["rev"], 1);
    assert_eq!(d[1]["distinct"]["access_subjects"], 3);
    assert_eq!(d[1]["distinct"]["vehicles"], 2);
    // Past the lateness the day is forgotten: its rows go.
    w.commit(&en, &[], &[], end + DAY_MS + 2_000, Some(&ret))
        .unwrap();
    let txn = s.read().unwrap();
    assert_eq!(txn.open_table(days::DAYS).unwrap().len().unwrap(), 0);
    assert_eq!(
        txn.open_table(days::DAY_SUBJECTS).unwrap().len().unwrap(),
        0
    );
}

/// A power cut while redb creates the file (the daemon's first start, or the one after a
/// quarantine) leaves its header synced without the magic number, which redb then refuses.
/// That file never held a store: the next start creates it again instead of quarantining it
/// (or, with `on_damage = "refuse"`, refusing to start). A store that lost its magic number to
/// damage still holds pages past its header and is moved aside as before.
#[test]
fn a_power_cut_while_the_file_is_created_is_no_damage() {
    use super::crash::{CrashDisk, Cut};
    use crate::config::OnDamage;
    let dir = tempfile::tempdir().unwrap();
    // redb's second sync writes the magic number: cut there.
    let disk = CrashDisk::cut_at(2, Cut::Drop);
    assert!(Store::open_on_backend(dir.path(), disk.clone(), SubjectMode::Hashed, None).is_err());
    let image = disk.survived().unwrap();
    assert!(image.len() > 4096 && image[..9] == [0; 9]);
    assert!(
        image[..4096].iter().any(|b| *b != 0),
        "a header was written"
    );
    let file = dir.path().join(FILE_NAME);
    std::fs::write(&file, &image).unwrap();
    let (s, mut w, q) =
        damage::open_or_quarantine(dir.path(), SubjectMode::Hashed, OnDamage::Refuse, 0, None)
            .unwrap();
    assert!(q.is_none() && damage::quarantined(dir.path()).is_empty());
    let now = 1_000_000_000;
    w.commit(&engine(), &[&ev("a", now)], &[], now, None)
        .unwrap();
    drop((s, w));

    // The same first bytes zeroed in a store that holds data: damaged.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..9].fill(0);
    std::fs::write(&file, bytes).unwrap();
    let refused =
        damage::open_or_quarantine(dir.path(), SubjectMode::Hashed, OnDamage::Refuse, 0, None);
    assert!(matches!(refused, Err(StoreError::Damaged { .. })));
    let (_s, _w, q) = damage::open_or_quarantine(
        dir.path(),
        SubjectMode::Hashed,
        OnDamage::Quarantine,
        0,
        None,
    )
    .unwrap();
    assert!(q.is_some());
}
