//! The care watch and the daily distinct counts (issue 13) through real brokers, with the
//! daemon's clock driven by the test (libfaketime): a resident going silent and being seen
//! again across a restart; a day's distinct subjects and vehicles against a model, with
//! duplicates and a late event re-issuing the day; no card or plate upstream.

use crate::common;

use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use zhian_gateway::config::{CareResident, Dur, Secret};

fn access(id: &str, ts_ms: i64, subject: &str) -> Vec<u8> {
    serde_json::json!({"id": id, "ts": ts_ms, "action": "entry", "result": "granted",
        "subject": subject})
    .to_string()
    .into_bytes()
}

fn vehicle(id: &str, ts_ms: i64, plate: &str) -> Vec<u8> {
    serde_json::json!({"id": id, "ts": ts_ms, "action": "entry", "subject": plate})
        .to_string()
        .into_bytes()
}

fn care_pseudonym(cfg: &Path, subject: &str) -> String {
    let mut args = vec![
        std::ffi::OsString::from("care-pseudonym"),
        "--config".into(),
    ];
    args.push(cfg.into());
    let out = run_with_stdin(&args, &format!("{subject}\n"));
    assert!(out.status.success());
    let p = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(p.len(), 32, "{p}");
    p
}

fn care_notices(up: &Upstream) -> Vec<Value> {
    up.on("care").iter().map(|m| m.json()).collect()
}

/// A resident silent after 2 minutes, listed by `subject` or by `pseudonym`.
fn resident(alias: &str, subject: Option<&str>, pseudonym: Option<&str>) -> CareResident {
    CareResident {
        subject: subject.map(|s| Secret(s.into())),
        pseudonym: pseudonym.map(str::to_string),
        alias: alias.into(),
        silence: Dur::secs(120),
        quiet: None,
    }
}

#[test]
fn a_resident_goes_silent_and_is_seen_again_across_a_restart() {
    let mut site = Site::build("care")
        .persistent_device()
        .status()
        .faketime("+0")
        .unstarted()
        .start();
    let cfg = site.config_path();
    // The second resident is listed by pseudonym: the config never holds that card.
    let p2 = care_pseudonym(&cfg, "card:ELDER-2");
    site.gw_mut().edit_config(|c| {
        c.care.residents = vec![
            resident("3-2-601", Some("card:ELDER-1"), None),
            resident("5-1-302", None, Some(&p2)),
        ]
    });
    let check = Command::new(common::gateway_bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{printed}");
    assert!(
        !printed.contains("ELDER-1"),
        "the subject is printed redacted: {printed}"
    );

    site.start_daemon();
    site.wait_ready(Ready::SiteLink);
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let mut p = site.publisher();
    // Resident 2 passes a door now; resident 1 does not.
    p.send(
        "zhian/access/door-1",
        access("c-1", now_ms(), "card:ELDER-2"),
    );
    p.wait_all_acked(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(10), || api_status(status_port)
            .is_some_and(|s| s["care"].as_array().is_some_and(|c| c
                .iter()
                .any(
                    |r| r["alias"] == "5-1-302" && r["last_seen"].is_string()
                )))),
        "{:?}\n{}",
        api_status(status_port).map(|s| s["care"].clone()),
        tail(&log, 20)
    );
    assert!(care_notices(up).is_empty());

    // Three minutes later (the clock stepped, a device's event vouching for it): both silent.
    site.set_clock("+180");
    site.wait_step_held(170_000);
    p.send(
        "zhian/access/door-9",
        access("c-2", now_ms() + 180_000, "card:SOMEONE"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || care_notices(up).len() == 2),
        "{:?}\n{}",
        care_notices(up),
        tail(&log, 20)
    );
    let notices = care_notices(up);
    let aliases: BTreeSet<&str> = notices
        .iter()
        .map(|n| n["alias"].as_str().unwrap())
        .collect();
    assert_eq!(aliases, BTreeSet::from(["3-2-601", "5-1-302"]));
    for n in &notices {
        assert_eq!(n["schema"], "zhian.care.v1");
        assert_eq!(n["state"], "silent");
        assert!(n["silent_secs"].as_i64().unwrap() >= 120, "{n}");
    }
    let never = notices.iter().find(|n| n["alias"] == "3-2-601").unwrap();
    assert!(
        never["last_seen"].is_null(),
        "never seen since the watch began: {never}"
    );
    let page_ok = || {
        http(status_port, "GET", "/", None).is_ok_and(|r| {
            let page = r.text();
            page.contains("独居老人关怀") && page.contains("3-2-601") && page.contains("超时未出现")
        })
    };
    assert!(
        wait_until(Duration::from_secs(10), page_ok),
        "the page lists the silent residents"
    );

    // A restart: the watch survives, no notice twice.
    let (st, _) = site.term_daemon();
    assert!(st.success());
    site.start_daemon();
    site.wait_for_status("both residents silent after the restart", |s| {
        s["care"]
            .as_array()
            .is_some_and(|c| c.iter().filter(|r| r["silent"] == true).count() == 2)
    });
    // The pause is the check: 3 s in which a second notice would have come.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(care_notices(up).len(), 2, "{:?}", care_notices(up));

    // Resident 1 passes a door: one `seen` notice; a second pass, none.
    let t = now_ms() + 180_000;
    p.send("zhian/access/door-1", access("c-3", t, "card:ELDER-1"));
    p.send(
        "zhian/access/door-1",
        access("c-4", t + 1000, "card:ELDER-1"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || care_notices(up).len() == 3),
        "{:?}",
        care_notices(up)
    );
    // The pause is the check: 3 s in which the second pass would have sent a notice.
    std::thread::sleep(Duration::from_secs(3));
    let notices = care_notices(up);
    assert_eq!(notices.len(), 3, "{notices:?}");
    assert_eq!(notices[2]["alias"], "3-2-601");
    assert_eq!(notices[2]["state"], "seen");
    assert!(notices[2]["last_seen"].is_string());
    let s = api_status(status_port).unwrap();
    let one = s["care"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["alias"] == "3-2-601")
        .unwrap()
        .clone();
    assert_eq!(one["silent"], false, "{one}");
    site.term_daemon();
    let leaks = up.subject_leaks(&["ELDER", "SOMEONE", &p2]);
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[test]
fn daily_distinct_counts_match_a_model_with_duplicates_and_a_late_event() {
    // The daemon's clock 90 s before the next local midnight (+08:00). (The status page shows
    // the test when the daemon took a step of its clock.)
    let (real_s, midnight) = to_next_midnight_s();
    let offset = midnight - 90 - real_s;
    let site = Site::build("daily")
        .persistent_device()
        .status()
        .faketime(&format!("+{offset}"))
        .start();
    let (up, log) = (site.upstream(), site.log_path());
    let mut p = site.publisher();
    // The day: 60 door events from 25 cards, 12 plates over 30 gate events, and every tenth
    // message sent twice (redelivery: same id).
    let mut rng = Rng::new(7);
    let mut cards = BTreeSet::new();
    let mut plates = BTreeSet::new();
    let mut total = 0u64;
    for i in 0..90 {
        let ts = now_ms() + offset * 1000;
        let (topic, payload) = if i % 3 == 2 {
            let plate = format!("浙A{:05}", 10_000 + rng.below(12));
            plates.insert(plate.clone());
            (
                "zhian/vehicle/gate-1".to_string(),
                vehicle(&format!("v-{i}"), ts, &plate),
            )
        } else {
            let card = format!("card:{}", 80_000 + rng.below(25));
            cards.insert(card.clone());
            (
                format!("zhian/access/door-{}", i % 4),
                access(&format!("a-{i}"), ts, &card),
            )
        };
        p.send(&topic, payload.clone());
        if i % 10 == 0 {
            p.send(&topic, payload);
        }
        total += 1;
    }
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == total),
        "{:?}\n{}",
        up.totals(),
        tail(&log, 20)
    );
    assert!(up.on("daily").is_empty(), "not before the day ends");
    // Past midnight (a device on the new day vouches for the step): the day is issued.
    let offset2 = midnight + 20 - real_s;
    site.set_clock(&format!("+{offset2}"));
    site.wait_step_held(100_000);
    p.send(
        "zhian/access/door-0",
        access("next-1", now_ms() + offset2 * 1000, "card:NEXT"),
    );
    let dailies = || -> Vec<Value> { up.on("daily").iter().map(|m| m.json()).collect() };
    assert!(
        wait_until(Duration::from_secs(30), || !dailies().is_empty()),
        "{}",
        tail(&log, 20)
    );
    let d0 = dailies()[0].clone();
    assert_eq!(d0["schema"], "zhian.daily.v1");
    assert_eq!(d0["rev"], 0);
    assert_eq!(d0["tz"], "+08:00");
    assert_eq!(d0["gateway"], "test-gw");
    assert_eq!(d0["distinct"]["access_subjects"], cards.len(), "{d0}");
    assert_eq!(d0["distinct"]["vehicles"], plates.len(), "{d0}");
    let sum: u64 = d0["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["n"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, total, "{d0}");
    let date = d0["date"].as_str().unwrap().to_string();
    // A late event for that day with a new card and one with a known card: rev 1, +1.
    let late_ts = (midnight - 30) * 1000;
    p.send(
        "zhian/access/door-2",
        access("late-1", late_ts, "card:LATE-NEW"),
    );
    let known = cards.iter().next().unwrap().clone();
    p.send("zhian/access/door-2", access("late-2", late_ts + 1, &known));
    assert!(
        wait_until(Duration::from_secs(30), || dailies()
            .iter()
            .any(|d| d["rev"] == 1)),
        "{:?}\n{}",
        dailies(),
        tail(&log, 20)
    );
    let d1 = dailies().into_iter().find(|d| d["rev"] == 1).unwrap();
    assert_eq!(d1["date"], date.as_str());
    assert_eq!(d1["distinct"]["access_subjects"], cards.len() + 1, "{d1}");
    assert_eq!(d1["distinct"]["vehicles"], plates.len());
    let sum: u64 = d1["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["n"].as_u64().unwrap())
        .sum();
    assert_eq!(sum, total + 2);
    site.term_daemon();
    let markers: Vec<String> = cards
        .iter()
        .chain(&plates)
        .cloned()
        .chain(["card:LATE-NEW".to_string()])
        .collect();
    let leaks = up.subject_leaks(&markers.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(leaks.is_empty(), "{leaks:?}");
}
