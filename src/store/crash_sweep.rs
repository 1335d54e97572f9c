//! The power-cut sweep (test builds only): a scripted workload through the writer API the
//! committer uses, cut at every `sync_data` it makes, each cut both ways ([`Cut::Drop`],
//! [`Cut::Torn`]); after each cut the surviving image is reopened through the daemon's own
//! open path ([`damage::open_or_quarantine`] on a real file) and checked:
//! - it opens, and nothing is quarantined;
//! - every event of a batch whose commit returned `Ok` (acknowledged to the device broker) is
//!   in `events` exactly once; the batch in flight at the cut is there whole or not at all;
//! - the writer's dedup set, a scan of the file and the window counts all agree with a recount
//!   of the raw events, and the whole store is the state after the acknowledged batches, or
//!   after the one in flight too;
//! - a summary whose deletion (after its PUBACK) committed stays deleted;
//! - vehicles inside (`[occupancy]` on, the plates keyed with one `presence.key` for the whole
//!   sweep): the presence set, its totals and the window's `occupancy` message are those of the
//!   acknowledged batches (or those and the one in flight), the writer's set is the stored one,
//!   and the count is a model's (each plate's newest read) over the events that landed;
//! - redelivering what was not acknowledged and running the rest of the workload ends in the
//!   state of a run without a cut (nothing counted twice, nothing lost).

use super::crash::{CrashDisk, Cut};
use super::OccupancyCfg;
use super::{
    damage, OutboxKey, OutboxTopic, Retention, Store, StoreError, StoreWriter, CLASS_ALERT,
    CLASS_SUMMARY,
};
use crate::config::{OnDamage, SubjectMode};
use crate::core::engine::{Engine, Outcome};
use crate::core::event::{Event, Kind};
use crate::core::occupancy::Presence;
use crate::core::summary::{CountKey, Site, WindowState};
use crate::core::window::WindowCfg;
use crate::keys::{Rotate, SubjectKeys};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

/// Where the torn cuts fall is derived from this (and the sync number).
const SEED: u64 = 0x5EED_0021;
/// Torn cuts per sync point, each at a different place (one dropped cut besides). 300 per
/// point (4,816 cuts, about 95 s in debug) found nothing more than these.
const TORN_SEEDS: u64 = 4;
/// The workload's clock: a window boundary (windows are 10 s).
const T0: i64 = 1_000_000_000;
const DEDUP_TTL_MS: u64 = 600_000;
const RETENTION: Retention = Retention {
    dedup_ttl_ms: DEDUP_TTL_MS,
    raw_retention_ms: 86_400_000,
    purge_batch: 64,
};

fn engine() -> Engine {
    Engine {
        window: WindowCfg {
            window_ms: 10_000,
            grace_ms: 1_000,
            max_lateness_ms: 3_600_000,
            max_future_skew_ms: 60_000,
        },
        dedup_ttl_ms: DEDUP_TTL_MS,
        gateway: "gw".into(),
        site: Site::default(),
        alert_actions: vec!["fire_lane_blocked".into()],
        max_summary_bytes: usize::MAX,
    }
}

fn ev(kind: Kind, device: &str, id: &str, ts_ms: i64) -> Event {
    Event {
        kind,
        device: device.into(),
        id: id.into(),
        ts_ms,
        action: if kind == Kind::Camera {
            "fire_lane_blocked".into()
        } else {
            "entry".into()
        },
        result: "granted".into(),
        subject: (kind != Kind::Camera).then(|| format!("card:{id}")),
    }
}

/// A vehicle gate's read of `plate` (`entry` or `exit`): the plate is the event's subject.
fn car(id: &str, plate: &str, action: &str, ts_ms: i64) -> Event {
    Event {
        kind: Kind::Vehicle,
        device: if action == "exit" {
            "gate-out"
        } else {
            "gate-in"
        }
        .into(),
        id: id.into(),
        ts_ms,
        action: action.into(),
        result: "granted".into(),
        subject: Some(plate.into()),
    }
}

/// `[occupancy]` for the sweep: stays end at 15 s (so the workload's last tick drops one as a
/// missed exit), long stays from 5 s, exits remembered for the lateness bound.
const OCCUPANCY: OccupancyCfg = OccupancyCfg {
    max_stay_ms: 15_000,
    long_stay_ms: 5_000,
    forget_ms: 3_600_000,
    capacity: Some(40),
};

/// A writer as the daemon sets it up: vehicles inside on, the sweep's one key dir (so a plate
/// keys the same before and after a cut, as `presence.key` survives a power cut on a box).
fn prepare(w: &mut StoreWriter, key_dir: &Path) {
    let keys =
        SubjectKeys::open(key_dir, Rotate::Daily, 0, 86_400_000, 86_400_000, T0).expect("key dir");
    w.set_subject_keys(keys, T0);
    w.set_occupancy(Some(OCCUPANCY));
}

/// A PUBACK from the district broker, as the forwarder reports it to the committer.
#[derive(Clone, Copy)]
enum Ack {
    /// The summary of (window start, rev).
    Summary(i64, u32),
    /// Every alert in the outbox.
    Alerts,
}

/// One step of the workload, as the committer would make it.
enum Step {
    /// A batch: its events, the summaries (window start, rev) whose PUBACK came in (their
    /// outbox entries are deleted in the batch's transaction), and whether the tick's
    /// maintenance rides along.
    Batch {
        now: i64,
        events: Vec<Event>,
        acked: Vec<Ack>,
        tick: bool,
        /// A stocktake (`occupancy set --count N`) recorded with this batch.
        stocktake: Option<u64>,
    },
    /// A clean stop: the database closed.
    Stop,
}

fn workload() -> Vec<Step> {
    use Kind::{Access, Camera, Vehicle};
    let w0 = T0;
    vec![
        // Window 0: a first batch, with a duplicate inside it.
        Step::Batch {
            now: T0 + 100,
            events: vec![
                ev(Access, "door-1", "a0", T0 + 10),
                ev(Access, "door-1", "a1", T0 + 20),
                ev(Access, "door-1", "a2", T0 + 30),
                ev(Access, "door-1", "a1", T0 + 20),
                ev(Access, "door-2", "a3", T0 + 40),
                // Two cars in, one read twice.
                car("v0", "浙A00001", "entry", T0 + 50),
                car("v1", "浙A00002", "entry", T0 + 60),
                car("v0", "浙A00001", "entry", T0 + 50),
            ],
            acked: vec![],
            tick: false,
            stocktake: None,
        },
        // More of window 0, an alert, and redeliveries of events already committed.
        Step::Batch {
            now: T0 + 600,
            events: vec![
                ev(Vehicle, "gate-1", "b0", T0 + 500),
                ev(Access, "door-1", "a2", T0 + 30),
                ev(Camera, "cam-1", "b1", T0 + 550),
                ev(Vehicle, "gate-1", "b2", T0 + 560),
                ev(Access, "door-1", "a0", T0 + 10),
                // An exit with no entry yet (counted, not subtracted); one car leaves.
                car("v2", "浙A00003", "exit", T0 + 580),
                car("v3", "浙A00002", "exit", T0 + 590),
            ],
            acked: vec![],
            tick: false,
            stocktake: None,
        },
        // The tick closes window 0 (summary rev 0); window 1 opens.
        Step::Batch {
            now: T0 + 11_500,
            events: vec![
                ev(Access, "door-2", "c0", T0 + 11_400),
                ev(Access, "door-1", "c1", T0 + 11_450),
                // The unmatched exit's entry, late: matched after all. A new car.
                car("v4", "浙A00003", "entry", T0 + 570),
                car("v5", "浙A00004", "entry", T0 + 11_300),
            ],
            acked: vec![],
            tick: true,
            stocktake: None,
        },
        // The district broker's PUBACK for window 0's summary: deleted with this batch.
        Step::Batch {
            now: T0 + 12_000,
            events: vec![
                ev(Vehicle, "gate-1", "d0", T0 + 11_900),
                ev(Access, "door-2", "c0", T0 + 11_400),
            ],
            acked: vec![Ack::Summary(w0, 0)],
            tick: false,
            // The guard counts 9: more than the set knows.
            stocktake: Some(9),
        },
        // A late event for window 0: re-issued whole, rev 1.
        Step::Batch {
            now: T0 + 12_500,
            events: vec![
                ev(Access, "door-1", "late0", T0 + 3_000),
                ev(Vehicle, "gate-1", "b2", T0 + 560),
                // A car only the stocktake counted leaves: one off the adjustment.
                car("v6", "浙A00009", "exit", T0 + 12_400),
            ],
            acked: vec![],
            tick: false,
            stocktake: None,
        },
        // Nothing but duplicates.
        Step::Batch {
            now: T0 + 13_000,
            events: vec![
                ev(Access, "door-1", "late0", T0 + 3_000),
                ev(Access, "door-1", "a0", T0 + 10),
            ],
            acked: vec![],
            tick: false,
            stocktake: None,
        },
        // Rev 1 and the alert PUBACKed; the tick closes window 1.
        Step::Batch {
            now: T0 + 22_000,
            // A stay refreshed; at this tick the stays from window 0 pass max_stay (missed
            // exits).
            events: vec![
                ev(Access, "door-1", "e0", T0 + 21_000),
                car("v7", "浙A00004", "entry", T0 + 21_500),
            ],
            acked: vec![Ack::Summary(w0, 1), Ack::Alerts],
            tick: true,
            stocktake: None,
        },
        Step::Stop,
    ]
}

/// The outbox keys of the entries `acked` names, as the forwarder finds them in the store.
fn outbox_keys(s: &Store, acked: &[Ack]) -> Result<Vec<OutboxKey>, StoreError> {
    let mut keys = Vec::new();
    for ack in acked {
        match *ack {
            Ack::Alerts => keys.extend(
                s.outbox_after(CLASS_ALERT, None, 1000)?
                    .into_iter()
                    .map(|e| e.0),
            ),
            Ack::Summary(start, rev) => {
                for (k, rec) in s.outbox_after(CLASS_SUMMARY, None, 1000)? {
                    if rec.window == Some((start, rev)) {
                        keys.push(k);
                    }
                }
            }
        }
    }
    Ok(keys)
}

/// Run `steps[from..]` until one fails. Returns the steps done (each returned `Ok`: its
/// batch is acknowledged) and the outcomes of each.
fn drive(
    s: &Arc<Store>,
    w: &mut StoreWriter,
    steps: &[Step],
    from: usize,
) -> (usize, Vec<Vec<Outcome>>) {
    let en = engine();
    let mut outcomes = Vec::new();
    for (i, step) in steps.iter().enumerate().skip(from) {
        let done = match step {
            Step::Batch {
                now,
                events,
                acked,
                tick,
                stocktake,
            } => {
                if let Some(n) = stocktake {
                    w.record_stocktake(*n, *now);
                }
                let refs: Vec<&Event> = events.iter().collect();
                outbox_keys(s, acked).and_then(|keys| {
                    let maintain = tick.then_some(&RETENTION);
                    w.commit(&en, &refs, &keys, *now, maintain)
                })
            }
            Step::Stop => {
                s.close();
                Ok(Default::default())
            }
        };
        match done {
            Ok(r) => outcomes.push(r.outcomes),
            Err(_) => return (i, outcomes),
        }
    }
    (steps.len(), outcomes)
}

/// An outbox entry as the checks compare it: topic, window and rev, payload.
type Entry = (OutboxTopic, Option<(i64, u32)>, Vec<u8>);

/// What the store holds, as the checks compare it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    /// (kind, device, id) of every raw event, with how many rows it has.
    events: BTreeMap<(Kind, String, String), usize>,
    windows: Vec<WindowState>,
    /// Alerts then summaries (and `occupancy` messages), in send order.
    outbox: Vec<Entry>,
    /// Vehicles inside: the presence set and its totals.
    presence: Presence,
}

fn snapshot(s: &Store) -> Snapshot {
    let mut events = BTreeMap::new();
    for e in s.raw_events().expect("raw events") {
        *events.entry((e.kind, e.device, e.id)).or_insert(0) += 1;
    }
    let mut outbox = Vec::new();
    for class in [CLASS_ALERT, CLASS_SUMMARY] {
        for (_, rec) in s.outbox_after(class, None, 1000).expect("outbox") {
            outbox.push((rec.topic, rec.window, rec.payload));
        }
    }
    Snapshot {
        events,
        windows: s.windows().expect("windows"),
        outbox,
        presence: s.presence().expect("presence"),
    }
}

/// The run without a cut: the state after each step, the outcomes, and how many syncs.
struct Reference {
    /// `after[i]`: the state once `i` steps are done.
    after: Vec<Snapshot>,
    outcomes: Vec<Vec<Outcome>>,
    /// `syncs_after[0]`: `sync_data` calls once the store is open; `[i]`: once `i` steps
    /// are done.
    syncs_after: Vec<u64>,
}

fn reference(steps: &[Step], key_dir: &Path) -> Reference {
    let disk = CrashDisk::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (s, mut w) =
        Store::open_on_backend(dir.path(), disk.clone(), SubjectMode::Hashed, None).expect("open");
    prepare(&mut w, key_dir);
    let mut after = vec![snapshot(&s)];
    let mut syncs_after = vec![disk.syncs()];
    let mut outcomes = Vec::new();
    for i in 0..steps.len() {
        if matches!(steps[i], Step::Stop) {
            // The state a stop leaves is the one before it.
            after.push(after[i].clone());
        }
        let (done, o) = drive(&s, &mut w, &steps[..=i], i);
        assert_eq!(done, i + 1, "step {i} failed without a cut");
        outcomes.extend(o);
        if !matches!(steps[i], Step::Stop) {
            after.push(snapshot(&s));
        }
        syncs_after.push(disk.syncs());
    }
    drop((s, w));
    Reference {
        after,
        outcomes,
        syncs_after,
    }
}

/// Windows as a recount of `events` would make them: counts per (kind, device, action,
/// result), by window start.
fn recount(s: &Store) -> BTreeMap<i64, BTreeMap<CountKey, u64>> {
    let en = engine();
    let mut out: BTreeMap<i64, BTreeMap<CountKey, u64>> = BTreeMap::new();
    for e in s.raw_events().expect("raw events") {
        let key = CountKey {
            kind: e.kind,
            device: e.device,
            action: e.action,
            result: e.result,
        };
        *out.entry(en.window.start_of(e.ts_ms))
            .or_default()
            .entry(key)
            .or_insert(0) += 1;
    }
    out
}

/// Plates inside by a model of the accepted events of the first `landed` steps (each plate's
/// newest read by time, an exit winning a tie), stays dropped at `max_stay` included.
fn model_in_set(steps: &[Step], outcomes: &[Vec<Outcome>], landed: usize) -> u64 {
    let mut newest: BTreeMap<String, (i64, bool)> = BTreeMap::new();
    for (step, o) in steps.iter().zip(outcomes).take(landed) {
        let Step::Batch { events, .. } = step else {
            continue;
        };
        for (e, o) in events.iter().zip(o) {
            let (Kind::Vehicle, Outcome::Accepted, Some(plate)) = (e.kind, o, &e.subject) else {
                continue;
            };
            let read = (e.ts_ms, e.action == "exit");
            let n = newest.entry(plate.clone()).or_insert(read);
            *n = (*n).max(read);
        }
    }
    newest.values().filter(|(_, exit)| !exit).count() as u64
}

/// One cut: run the workload on a disk that loses power at sync `k`, reopen what survived
/// through the daemon's open path, check, then finish the workload. Returns the step in
/// flight at the cut (the stop, when the cut fell in the close) and whether it landed.
fn cut_and_check(
    steps: &[Step],
    re: &Reference,
    k: u64,
    cut: Cut,
    scratch: &Path,
    key_dir: &Path,
) -> (usize, bool) {
    let at = format!("cut at sync {k} ({cut:?})");
    let disk = CrashDisk::cut_at(k, cut);
    let run_dir = scratch.join(format!("run-{k}-{}", matches!(cut, Cut::Drop)));
    let done = match Store::open_on_backend(&run_dir, disk.clone(), SubjectMode::Hashed, None) {
        Ok((s, mut w)) => {
            prepare(&mut w, key_dir);
            drive(&s, &mut w, steps, 0).0
        }
        Err(_) => 0,
    };
    let image = disk
        .survived()
        .unwrap_or_else(|| panic!("{at}: the workload made fewer syncs than the reference"));

    // Reopen as the daemon does after a power cut.
    let dir = scratch.join(format!("after-{k}-{}", matches!(cut, Cut::Drop)));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join(super::FILE_NAME), &image).expect("image");
    let (s, mut w, quarantined) = damage::open_or_quarantine(
        &dir,
        SubjectMode::Hashed,
        OnDamage::Quarantine,
        T0 + 30_000,
        None,
    )
    .unwrap_or_else(|e| panic!("{at}: the store does not open: {e}"));
    prepare(&mut w, key_dir);
    assert!(
        quarantined.is_none() && damage::quarantined(&dir).is_empty(),
        "{at}: quarantined {quarantined:?}"
    );

    // The state of the acknowledged steps, or of those and the one in flight.
    let got = snapshot(&s);
    let landed = if got == re.after[done] {
        done
    } else if done < steps.len() && got == re.after[done + 1] {
        done + 1
    } else {
        panic!(
            "{at}: {done} steps acknowledged; the store holds neither their state nor the next \
             one's:\n got {got:#?}\n acknowledged {:#?}",
            re.after[done]
        )
    };
    // Every acknowledged event exactly once (the snapshot comparison says it too; said
    // plainly here).
    for (i, o) in re.outcomes.iter().enumerate().take(done) {
        let Step::Batch { events, .. } = &steps[i] else {
            continue;
        };
        for (e, o) in events.iter().zip(o) {
            if *o == Outcome::Accepted {
                let key = (e.kind, e.device.clone(), e.id.clone());
                assert_eq!(got.events.get(&key), Some(&1), "{at}: {key:?} acknowledged");
            }
        }
    }
    // Dedup set, a scan of the file and the counts agree with a recount of the raw events.
    let present = got.events.len() as u64;
    assert_eq!(w.dedup_keys() as u64, present, "{at}: writer's dedup set");
    assert_eq!(s.dedup_keys().expect("scan"), present, "{at}: dedup scan");
    let counted: BTreeMap<i64, BTreeMap<CountKey, u64>> = got
        .windows
        .iter()
        .filter(|w| w.total() > 0)
        .map(|w| (w.start_ms, w.counts.clone()))
        .collect();
    assert_eq!(
        counted,
        recount(&s),
        "{at}: window counts against a recount"
    );
    // Vehicles inside: the writer's set is the stored one, and the count is a model's over the
    // events that landed (each plate's newest read; the stocktake and max_stay as the
    // reference applied them: the snapshot comparison above holds those).
    let view = w.occupancy_overview(T0 + 30_000).expect("occupancy on");
    assert_eq!(view.inside, got.presence.inside(), "{at}: writer's count");
    assert_eq!(
        model_in_set(steps, &re.outcomes, landed),
        got.presence.in_set() + got.presence.totals.missed_exits,
        "{at}: the set against each plate's newest read"
    );
    // A summary whose deletion committed stays deleted.
    for step in &steps[..landed] {
        if let Step::Batch { acked, .. } = step {
            for ack in acked {
                let Ack::Summary(start, rev) = *ack else {
                    continue;
                };
                assert!(
                    !got.outbox.iter().any(|o| o.1 == Some((start, rev))),
                    "{at}: summary ({start}, rev {rev}) was deleted after its PUBACK"
                );
            }
        }
    }

    // The broker redelivers what was not acknowledged; the rest of the workload runs. The end
    // is the state of a run without a cut.
    let (finished, _) = drive(&s, &mut w, steps, done);
    assert_eq!(
        finished,
        steps.len(),
        "{at}: the workload fails after reopening"
    );
    s.close();
    drop((s, w));
    let (s, _w) = Store::open_with_ttl(&dir, SubjectMode::Hashed, None)
        .unwrap_or_else(|e| panic!("{at}: reopening after the workload: {e}"));
    assert_eq!(
        snapshot(&s),
        re.after[steps.len()],
        "{at}: the end differs from a run without a cut"
    );
    (done.min(steps.len() - 1), landed > done)
}

/// Every sync point of the workload, both ways.
#[test]
fn power_cut_at_every_sync_point_loses_no_acknowledged_event() {
    let started = std::time::Instant::now();
    let steps = workload();
    let keys = tempfile::tempdir().expect("key dir");
    let re = reference(&steps, keys.path());
    // The workload's shape, as the checks rely on it.
    let n = |i: usize, o: Outcome| re.outcomes[i].iter().filter(|x| **x == o).count();
    assert_eq!((n(0, Outcome::Accepted), n(0, Outcome::Duplicate)), (6, 2));
    assert_eq!((n(1, Outcome::Accepted), n(1, Outcome::Duplicate)), (5, 2));
    assert_eq!(n(5, Outcome::Duplicate), 2);
    let last = re.after.last().expect("states");
    assert!(last
        .outbox
        .iter()
        .all(|o| o.1 != Some((T0, 0)) && o.1 != Some((T0, 1))));
    assert!(re.after[5].outbox.iter().any(|o| o.1 == Some((T0, 1))));
    assert!(last.outbox.iter().any(|o| o.1 == Some((T0 + 10_000, 0))));
    // Vehicles inside, step by step: two in (one read twice); two more in (gate-1), an
    // unmatched exit and a car out; the exit matched and a car in; one in, then the stocktake;
    // a car only it counted leaves; at the last tick three stays (window 0's) pass max_stay.
    let inside = |i: usize| re.after[i].presence.inside();
    let totals = |i: usize| re.after[i].presence.totals;
    assert_eq!(inside(1), 2);
    assert_eq!((inside(2), totals(2).unmatched_exits), (3, 1), "b0, b2, v0");
    assert_eq!(
        (inside(3), totals(3).unmatched_exits),
        (4, 0),
        "A00003's exit matched, A00004 in"
    );
    assert_eq!(
        (inside(4), totals(4).adjust),
        (9, 4),
        "d0 in, then the stocktake"
    );
    assert_eq!((inside(5), totals(5).adjust), (8, 3));
    assert_eq!(
        (inside(7), totals(7).missed_exits, totals(7).adjust),
        (5, 3, 3),
        "A00004 refreshed, d0 stays; b0, b2, A00001 missed"
    );
    let occupancy = |i: usize| {
        re.after[i]
            .outbox
            .iter()
            .filter(|o| o.0 == OutboxTopic::Occupancy)
            .count()
    };
    assert_eq!((occupancy(2), occupancy(3), occupancy(7)), (0, 1, 2));

    let scratch = tempfile::tempdir().expect("tempdir");
    let syncs = *re.syncs_after.last().expect("syncs");
    let mut in_flight = BTreeSet::new();
    let (mut cuts, mut landed) = (0, 0);
    for k in 1..=syncs {
        let torn = (0..TORN_SEEDS).map(|j| Cut::Torn {
            seed: SEED ^ k ^ (j << 32),
        });
        for cut in std::iter::once(Cut::Drop).chain(torn) {
            let (step, l) = cut_and_check(&steps, &re, k, cut, scratch.path(), keys.path());
            in_flight.insert(step);
            landed += usize::from(l);
            cuts += 1;
        }
    }
    // Every step was the one in flight at some cut.
    assert_eq!(
        in_flight,
        (0..steps.len()).collect::<BTreeSet<_>>(),
        "a step with no sync"
    );
    eprintln!(
        "power-cut sweep: {syncs} sync points (open, then after each step: {:?}) x (1 dropped + \
         {TORN_SEEDS} torn) = {cuts} cuts; the step in flight landed in {landed}; {:.1} s",
        re.syncs_after,
        started.elapsed().as_secs_f64()
    );
}
