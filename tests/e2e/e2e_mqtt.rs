//! End-to-end tests: the `zhian-gateway` binary between a device broker and a district broker
//! (both real mosquitto processes), driven only through the external contract.

use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use time::macros::format_description;
use time::OffsetDateTime;

fn n64(n: usize) -> u64 {
    u64::try_from(n).expect("usize fits in u64")
}

/// When the window of the latest event closes (end + grace), in Unix ms.
fn last_close(events: &[Event]) -> i64 {
    let last = events.iter().map(|e| e.ts_ms).max().expect("some events");
    window_start(last) + WINDOW_MS + GRACE_MS
}

#[test]
fn duplicates_counted_once() {
    let site = Site::build("dups").start();
    let mut rng = Rng::new(0x00D0_0001);
    let mut events = mixed_events(&mut rng, 2_000);
    let plan = plan_with_duplicates(&mut rng, events.len(), 200);
    let mut publisher = site.publisher();
    // Spread over several windows (a 1 s pause every 550 messages: the scenario, not a wait),
    // so the later re-sends often hit windows that were already summarised.
    send_plan(&mut publisher, &mut events, &plan, |k| {
        if k > 0 && k % 550 == 0 {
            thread::sleep(Duration::from_secs(1));
        }
    });
    publisher.wait_all_acked(Duration::from_secs(30));

    let expected = expected_windows(&events);
    let timeout = until_ms(last_close(&events)) + Duration::from_secs(30);
    site.assert_windows(&expected, timeout);

    let sent = n64(plan.len());
    let dups = n64(duplicates_in(&plan));
    let hb = site.wait_heartbeat(
        "received == messages sent and no pending summary",
        Duration::from_secs(15),
        |hb| hb_counter(hb, "received") == Some(sent) && hb["pending_summaries"] == 0,
    );
    assert_eq!(hb["schema"], "zhian.heartbeat.v1", "{hb}");
    assert_eq!(hb["gateway"], GATEWAY_ID, "{hb}");
    assert_eq!(hb_counter(&hb, "accepted"), Some(n64(events.len())), "{hb}");
    assert_eq!(hb_counter(&hb, "duplicate"), Some(dups), "{hb}");
    assert_eq!(hb_counter(&hb, "rejected"), Some(0), "{hb}");
    assert_eq!(hb["dropped"]["summaries"], 0, "{hb}");
    assert_eq!(hb["dropped"]["alerts"], 0, "{hb}");
    site.assert_no_subject_leaks();
}

/// One message per reject reason: (reason, topic, payload).
fn malformed_messages(now: i64) -> Vec<(&'static str, String, Vec<u8>)> {
    let door = "zhian/access/door-1".to_string();
    // A valid door-1 event with one field replaced (or added).
    let with = |id: &str, field: &str, value: Value| {
        let mut m = Event::new("access", "door-1", id, "entry")
            .result("granted")
            .subject("card:SUBJ-BAD")
            .at(now)
            .json();
        m.insert(field.to_string(), value);
        serde_json::to_vec(&m).expect("serialise")
    };
    let mut bad_utf8 = br#"{"id":"bad-utf8-"#.to_vec();
    bad_utf8.extend([0xff, 0xfe]);
    bad_utf8.extend(format!(r#"","ts":{now},"action":"entry","result":"granted"}}"#).bytes());
    let without_offset = OffsetDateTime::from_unix_timestamp(now / 1000)
        .expect("timestamp in range")
        .format(format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second]"
        ))
        .expect("format");
    vec![
        (
            "too_large",
            door.clone(),
            with("bad-too-large", "pad", json!("x".repeat(70 * 1024))),
        ),
        ("invalid_utf8", door.clone(), bad_utf8),
        (
            "invalid_json",
            door.clone(),
            br#"{"id": "bad-json", "ts": "#.to_vec(),
        ),
        (
            "invalid_topic",
            "zhian/elevator/lift-1".to_string(),
            with(
                "bad-topic",
                "note",
                json!("kind is not access, camera or vehicle"),
            ),
        ),
        ("invalid_id", door.clone(), with("bad-id", "id", json!(""))),
        (
            "invalid_ts",
            door.clone(),
            with("bad-ts", "ts", json!(without_offset)),
        ),
        (
            "invalid_action",
            door.clone(),
            with("bad-action", "action", json!("Entry!")),
        ),
        (
            "invalid_result",
            door.clone(),
            with("bad-result", "result", json!("Granted")),
        ),
        (
            "invalid_subject",
            door.clone(),
            with(
                "bad-subject",
                "subject",
                json!(format!("card:SUBJ{}", "9".repeat(200))),
            ),
        ),
        (
            "topic_mismatch",
            door.clone(),
            with("bad-mismatch", "device", json!("door-99")),
        ),
        // An event stamped ahead of the gateway clock is no reject: it counts at receipt
        // (tests/e2e/field_faults.rs, `two_cameras_ahead_...`).
        (
            "too_late",
            door,
            with("bad-late", "ts", json!(now - 2 * 3_600_000)),
        ),
    ]
}

#[test]
fn malformed_inputs_rejected_rest_counted() {
    let site = Site::build("malformed").start();
    let mut publisher = site.publisher();
    let malformed = malformed_messages(now_ms());
    let mut bad = malformed.iter();
    let mut events = Vec::new();
    for i in 0..100 {
        let device = if i % 2 == 0 { "door-1" } else { "door-2" };
        let action = if i % 3 == 0 { "exit" } else { "entry" };
        let mut e = Event::new("access", device, &format!("ok-{i:03}"), action)
            .result("granted")
            .subject(&format!("card:SUBJ{i:05}"));
        e.ts_style = [TsStyle::Millis, TsStyle::Utc, TsStyle::Plus8][i % 3];
        e.echo_topic = i % 4 == 0;
        let mut m = e.json();
        if i % 5 == 0 {
            // Unknown fields are ignored.
            m.insert("firmware".to_string(), json!({"version": "2.1.0"}));
        }
        publisher.send(&e.topic(), serde_json::to_vec(&m).expect("serialise"));
        events.push(e);
        if i % 8 == 7 {
            if let Some((_, topic, payload)) = bad.next() {
                publisher.send(topic, payload.clone());
            }
        }
    }
    for (_, topic, payload) in bad {
        publisher.send(topic, payload.clone());
    }
    publisher.wait_all_acked(Duration::from_secs(20));

    let total = n64(events.len() + malformed.len());
    let hb = site.wait_heartbeat(
        "received == every message sent",
        Duration::from_secs(20),
        |hb| hb_counter(hb, "received") == Some(total),
    );
    assert_eq!(hb_counter(&hb, "accepted"), Some(n64(events.len())), "{hb}");
    assert_eq!(
        hb_counter(&hb, "rejected"),
        Some(n64(malformed.len())),
        "{hb}"
    );
    assert_eq!(hb_counter(&hb, "duplicate"), Some(0), "{hb}");
    let by_reason: BTreeMap<String, u64> = hb["counters"]["rejected_by_reason"]
        .as_object()
        .unwrap_or_else(|| panic!("no counters.rejected_by_reason object: {hb}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(u64::MAX)))
        .filter(|(_, n)| *n != 0)
        .collect();
    let want: BTreeMap<String, u64> = malformed
        .iter()
        .map(|(reason, _, _)| (reason.to_string(), 1))
        .collect();
    assert!(
        by_reason == want,
        "rejected_by_reason differs:\n{}\nheartbeat: {hb}",
        map_diff(&want, &by_reason)
    );

    let timeout = until_ms(last_close(&events)) + Duration::from_secs(20);
    site.assert_windows(&expected_windows(&events), timeout);
    site.assert_no_subject_leaks();
}

#[test]
fn late_event_reissues_window() {
    let site = Site::build("late").start();
    // Start early in a window so all five events land in it well before it closes (a sleep
    // to a wall-clock instant: what it waits for is the clock, not the daemon).
    if now_ms() - window_start(now_ms()) > 500 {
        thread::sleep(until_ms(window_start(now_ms()) + WINDOW_MS + 20));
    }
    let w = window_start(now_ms());
    let key = ("access", "door-1", "entry", "granted");
    let event = |i: i64, ts: i64| {
        Event::new(key.0, key.1, &format!("late-{i}"), key.2)
            .result(key.3)
            .subject("card:SUBJ-LATE")
            .at(ts)
    };
    let mut events: Vec<Event> = (0..5).map(|i| event(i, w + 10 * i)).collect();
    let mut publisher = site.publisher();
    for e in &events {
        publisher.send(&e.topic(), e.payload());
    }
    publisher.wait_all_acked(Duration::from_secs(10));

    let close = w + WINDOW_MS + GRACE_MS;
    let got = wait_until(until_ms(close) + Duration::from_secs(15), || {
        site.upstream().latest_revs().contains_key(&(w, 2))
    });
    assert!(got, "no summary for window {w}\n{}", site.upstream().dump());
    let first: Vec<Summary> = site
        .upstream()
        .summaries()
        .into_iter()
        .filter(|s| s.start_ms == w)
        .collect();
    let row = |n: u64| {
        vec![(
            (
                key.0.to_string(),
                key.1.to_string(),
                key.2.to_string(),
                key.3.to_string(),
            ),
            n,
        )]
    };
    for s in &first {
        assert_eq!(s.rev, 0, "first summary of the window: {}", s.json);
        assert_eq!(s.secs, 2, "{}", s.json);
        assert_eq!(s.counts, row(5), "{}", s.json);
        assert!(
            s.at_ms >= close,
            "summary for window {w} arrived at {} before end + grace ({close})",
            s.at_ms
        );
    }

    // One more event stamped inside that window, after it was summarised.
    assert!(now_ms() > close);
    let late = event(5, w + 1_000);
    publisher.send(&late.topic(), late.payload());
    publisher.wait_all_acked(Duration::from_secs(10));
    events.push(late);
    let reissued = wait_until(Duration::from_secs(15), || {
        site.upstream()
            .latest_revs()
            .get(&(w, 2))
            .is_some_and(|s| s.rev >= 1)
    });
    assert!(
        reissued,
        "window {w} not re-issued\n{}",
        site.upstream().dump()
    );
    let latest = site.upstream().latest_revs()[&(w, 2)].clone();
    assert_eq!(latest.rev, 1, "{}", latest.json);
    assert_eq!(
        latest.counts,
        row(6),
        "a re-issue carries the whole window: {}",
        latest.json
    );
    site.assert_windows(&expected_windows(&events), Duration::from_secs(10));
    site.assert_no_subject_leaks();
}

#[test]
fn kill9_mid_stream_no_loss_no_double_count() {
    let site = Site::build("kill9").start();
    let mut rng = Rng::new(0x0009_0009);
    let mut events = mixed_events(&mut rng, 18_000);
    let plan = plan_with_duplicates(&mut rng, events.len(), 2_000);
    let total = plan.len();
    let mut publisher = site.publisher();
    let acked = publisher.acked_counter();
    // The daemon batches (up to store.batch_linger, or until the broker stops sending), so the
    // stream pauses after its first half until the daemon has committed part of it; the kill
    // then lands while the second half streams in: messages committed, in a batch, and queued.
    let committed_some = Arc::new(AtomicBool::new(false));
    let go_on = committed_some.clone();
    let sender = thread::spawn(move || {
        send_plan(&mut publisher, &mut events, &plan, |k| {
            if k == plan.len() / 2 {
                wait_every(Duration::from_millis(2), DEADLINE, || {
                    go_on.load(Ordering::SeqCst)
                });
            }
        });
        publisher.wait_all_acked(Duration::from_secs(90));
        events
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let left = || deadline.saturating_duration_since(Instant::now());
    assert!(
        wait_every(Duration::from_millis(2), left(), || site
            .upstream()
            .latest_heartbeat()
            .and_then(|hb| hb_counter(&hb, "accepted"))
            .unwrap_or(0)
            > 0),
        "the daemon committed nothing of the stream's first half"
    );
    committed_some.store(true, Ordering::SeqCst);
    // Then kill while the second half streams in.
    assert!(
        wait_every(Duration::from_millis(1), left(), || acked
            .load(Ordering::SeqCst)
            >= total * 3 / 4),
        "publisher stalled in the second half"
    );
    site.kill9_daemon();
    let at_kill = acked.load(Ordering::SeqCst);
    assert!(
        at_kill < total,
        "the whole stream was acknowledged before the kill: not a mid-stream crash"
    );
    // The scenario: the daemon stays dead for a second while devices keep publishing.
    thread::sleep(Duration::from_secs(1));
    site.start_daemon();

    let events = sender
        .join()
        .unwrap_or_else(|_| panic!("publisher thread failed"));
    let timeout = until_ms(last_close(&events)) + Duration::from_secs(45);
    site.assert_windows(&expected_windows(&events), timeout);
    // Counters are since process start: the restarted daemon must have taken over part of the
    // stream, or the crash was not mid-stream.
    let hb = site
        .upstream()
        .latest_heartbeat()
        .expect("a heartbeat from the restarted daemon");
    let after_restart = hb_counter(&hb, "received").unwrap_or(0);
    assert!(
        after_restart > 0 && after_restart < n64(total),
        "restarted daemon received {after_restart} of {total} messages: {hb}"
    );
    eprintln!("kill9: {at_kill} of {total} acked by the broker at the kill; {after_restart} received after the restart");
    site.assert_retained_status("online", Duration::from_secs(10));
    site.assert_no_subject_leaks();
}

#[test]
fn district_outage_every_summary_arrives() {
    let mut site = Site::build("outage").persistent_district().start();
    let mut publisher = site.publisher();
    let mut rng = Rng::new(0x0007_7A6E);
    let devices = [
        ("access", "door-1", "card:SUBJ-OUT-1"),
        ("access", "door-2", "card:SUBJ-OUT-2"),
        ("camera", "cam-1", "face:SUBJ-OUT-3"),
        ("vehicle", "gate-1", "plate:浙A·SUBJ4"),
    ];
    let mut events = Vec::new();
    let started = Instant::now();
    let mut stopped_at: Option<Instant> = None;
    let mut restarted = false;
    let mut tick = 0u32;
    // About 50 events a second for 20 s; the district broker is down from 3 s to 13 s.
    while started.elapsed() < Duration::from_secs(20) {
        if stopped_at.is_none() && started.elapsed() >= Duration::from_secs(3) {
            site.district_mut().stop();
            stopped_at = Some(Instant::now());
        }
        if let Some(at) = stopped_at {
            if !restarted && at.elapsed() >= Duration::from_secs(10) {
                site.district_mut().start_again();
                restarted = true;
            }
        }
        for _ in 0..5 {
            let seq = events.len();
            let (kind, device, subject) = devices[seq % devices.len()];
            let action = match (kind, rng.below(2)) {
                ("camera", _) => "stranger",
                (_, 0) => "entry",
                _ => "exit",
            };
            let mut e =
                Event::new(kind, device, &format!("{device}-{seq:05}"), action).subject(subject);
            if kind != "camera" {
                e = e.result("granted");
            }
            publisher.send(&e.topic(), e.payload());
            if seq % 20 == 0 {
                publisher.send(&e.topic(), e.payload());
            }
            events.push(e);
        }
        tick += 1;
        // The scenario's rate: five events every 100 ms of wall time.
        let next = started + Duration::from_millis(100) * tick;
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    assert!(restarted, "district broker was never restarted");
    publisher.wait_all_acked(Duration::from_secs(30));

    let timeout = until_ms(last_close(&events)) + Duration::from_secs(40);
    site.assert_windows(&expected_windows(&events), timeout);
    site.assert_retained_status("online", Duration::from_secs(15));
    site.assert_no_subject_leaks();
}

#[test]
fn no_subject_ever_upstream() {
    let site = Site::build("privacy").start();
    let mut events = Vec::new();
    for i in 0..10 {
        events.push(
            Event::new("access", "door-1", &format!("door-1-p{i}"), "entry")
                .result("granted")
                .subject(&format!("card:SUBJ-CARD-{i:05}")),
        );
        events.push(
            Event::new("vehicle", "gate-1", &format!("gate-1-p{i}"), "exit")
                .subject(&format!("plate:浙A·SUBJ{i:03}")),
        );
        events.push(
            Event::new("camera", "cam-1", &format!("cam-1-p{i}"), "stranger")
                .subject(&format!("face:SUBJ-FACE-{i:05}")),
        );
    }
    let alert = Event::new("camera", "cam-2", "cam-2-alert-1", "high_altitude_throw")
        .subject("face:SUBJ-FACE-ALERT");
    events.push(alert.clone());
    let mut publisher = site.publisher();
    for e in &events {
        publisher.send(&e.topic(), e.payload());
    }
    publisher.wait_all_acked(Duration::from_secs(10));

    let alerted = wait_until(Duration::from_secs(10), || {
        site.upstream()
            .on("alert")
            .iter()
            .any(|m| m.json()["id"] == alert.id)
    });
    assert!(
        alerted,
        "no alert for {}\n{}",
        alert.id,
        site.upstream().dump()
    );
    let msg = site
        .upstream()
        .on("alert")
        .into_iter()
        .find(|m| m.json()["id"] == alert.id)
        .expect("alert present");
    let a = msg.json();
    assert_eq!(a["schema"], "zhian.alert.v1", "{a}");
    assert_eq!(a["gateway"], GATEWAY_ID, "{a}");
    assert_eq!(a["kind"], "camera", "{a}");
    assert_eq!(a["device"], "cam-2", "{a}");
    assert_eq!(a["action"], "high_altitude_throw", "{a}");
    assert!(!a["ts"].is_null(), "alert without ts: {a}");

    let timeout = until_ms(last_close(&events)) + Duration::from_secs(20);
    site.assert_windows(&expected_windows(&events), timeout);

    let (status, took) = site.term_daemon();
    assert_eq!(status.code(), Some(0), "SIGTERM exit status: {status}");
    assert!(took < Duration::from_secs(5), "SIGTERM exit took {took:?}");
    site.assert_retained_status("offline", Duration::from_secs(5));
    site.assert_no_subject_leaks();
}

#[test]
fn bad_config_exits_78() {
    // Nothing runs: a config file and the CLI on it.
    let site = Site::build("config")
        .no_device_broker()
        .no_district_broker()
        .unstarted()
        .start();
    let dir = &site.root;
    let good = site.config_path();
    let bad = dir.join("bad.toml");
    let mut table = config_table(&site.gw().config);
    table["upstream"]
        .as_table_mut()
        .expect("[upstream]")
        .insert("bogus".into(), 1.into());
    write_table(&bad, &table);

    for command in ["check-config", "run"] {
        let args = [OsStr::new(command), OsStr::new("--config"), bad.as_os_str()];
        let out = run_cli(&args, dir, Duration::from_secs(15));
        assert_eq!(
            out.status.code(),
            Some(78),
            "{command} with an unknown key: {}\nstderr:\n{}",
            out.status,
            out.stderr
        );
        assert!(
            out.stderr.contains("upstream.bogus"),
            "{command}: stderr does not name upstream.bogus:\n{}",
            out.stderr
        );
    }

    let out = check_config(&good, dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config on a valid config: {}\nstderr:\n{}",
        out.status,
        out.stderr
    );
    assert!(
        out.stdout.contains(GATEWAY_ID),
        "check-config prints the effective config; stdout:\n{}",
        out.stdout
    );
}
