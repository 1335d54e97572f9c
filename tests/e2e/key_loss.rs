//! A key dir emptied while the gateway was stopped (issue 21, item 5), through the real binary,
//! real mosquitto brokers and libfaketime: three people pass a door, the gateway stops, its key
//! dir is emptied, it starts again, and the same three pass again the same local day. The day's
//! `daily` message says three (not six) and that it spans two keys; the loss is logged at ERROR
//! once and shown on `/api/status`, the page and `/metrics`; a care resident listed by a
//! pseudonym of the lost care key gets no false `silent` notice and is shown as unmatched, while
//! one listed by subject is watched with the new key.

use crate::common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zhian_gateway::config::{CareResident, Dur, Secret};

fn access(id: &str, ts_ms: i64, subject: &str) -> Vec<u8> {
    serde_json::json!({"id": id, "ts": ts_ms, "action": "entry", "result": "granted",
        "subject": subject})
    .to_string()
    .into_bytes()
}

fn care_pseudonym(cfg: &Path, subject: &str) -> String {
    let args = [
        std::ffi::OsString::from("care-pseudonym"),
        "--config".into(),
        cfg.into(),
    ];
    let out = run_with_stdin(&args, &format!("{subject}\n"));
    assert!(out.status.success(), "{out:?}");
    let p = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(p.len(), 32, "{p}");
    p
}

/// Lines of the daemon log that report the lost keys.
fn loss_lines(log: &Path) -> Vec<String> {
    log_text(log)
        .lines()
        .filter(|l| l.contains("the key dir lost keys"))
        .map(str::to_string)
        .collect()
}

/// The daemon's (faked) wall clock, from `/api/status`.
fn daemon_now_ms(port: u16) -> Option<i64> {
    let s = api_status(port)?;
    let t = time::OffsetDateTime::parse(
        s["now"].as_str()?,
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[test]
fn a_lost_key_dir_marks_the_day_instead_of_counting_people_twice() {
    // The daemon's clock a little before the next local midnight (+08:00).
    let (real_s, midnight) = to_next_midnight_s();
    let offset = midnight - 240 - real_s;
    let mut site = Site::build("keyloss")
        .persistent_device()
        .status()
        .faketime(&format!("+{offset}"))
        .unstarted()
        .start();
    let cfg = site.config_path();
    let key_dir = PathBuf::from(format!("{}.keys", site.data_dir().display()));
    // 5-1-302 is listed by a pseudonym made with the care key of today (the installer's way);
    // 3-2-601 by subject (the daemon keys it itself, with whatever care key it has).
    let p2 = care_pseudonym(&cfg, "card:ELDER-2");
    let resident = |alias: &str, subject: Option<&str>, pseudonym: Option<&str>| CareResident {
        subject: subject.map(|s| Secret(s.into())),
        pseudonym: pseudonym.map(str::to_string),
        alias: alias.into(),
        silence: Dur::secs(120),
        quiet: None,
    };
    site.gw_mut().edit_config(|c| {
        c.care.residents = vec![
            resident("3-2-601", Some("card:ELDER-1"), None),
            resident("5-1-302", None, Some(&p2)),
        ]
    });
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let fake_now = |off: i64| now_ms() + off * 1000;
    let people = ["card:ELDER-1", "card:PERSON-2", "face:PERSON-3"];

    site.start_daemon();
    site.wait_ready(Ready::SiteLink);
    let mut p = site.publisher();
    for (i, s) in people.iter().enumerate() {
        p.send(
            "zhian/access/door-1",
            access(&format!("a-{i}"), fake_now(offset), s),
        );
    }
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == 3),
        "{:?}\n{}",
        up.totals(),
        tail(&log, 20)
    );
    let s = api_status(status_port).unwrap();
    assert_eq!(s["keys_lost"], serde_json::json!([]), "{}", s["keys_lost"]);
    let (st, _) = site.term_daemon();
    assert!(st.success());
    assert!(loss_lines(&log).is_empty(), "nothing lost yet");

    // While it is stopped, the key dir is emptied (an SD card swapped, a restore without it).
    let emptied: Vec<_> = fs::read_dir(&key_dir).unwrap().flatten().collect();
    assert_eq!(
        emptied.len(),
        2,
        "today's pseudonym key and the care key: {emptied:?}"
    );
    for f in emptied {
        fs::remove_file(f.path()).unwrap();
    }

    site.start_daemon();
    let lost_shown = |s: &Value| {
        s["keys_lost"].as_array().is_some_and(|k| {
            k.iter()
                .any(|x| x["kind"] == "day" && x["date"].is_string())
                && k.iter().any(|x| {
                    x["kind"] == "care" && x["key"] == "care.key" && x["unmatched"][0] == "5-1-302"
                })
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some_and(
                |s| lost_shown(&s) && s["links"]["site"]["connected"] == true
            )),
        "{:?}\n{}",
        api_status(status_port).map(|s| s["keys_lost"].clone()),
        tail(&log, 30)
    );
    let s = api_status(status_port).unwrap();
    let care = s["care"].as_array().unwrap();
    let by_alias = |a: &str| care.iter().find(|r| r["alias"] == a).unwrap().clone();
    assert_eq!(by_alias("5-1-302")["unmatched"], "care_key_lost");
    assert!(by_alias("3-2-601")["unmatched"].is_null());
    // Logged at ERROR, once.
    let lines = loss_lines(&log);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("<3>"), "{}", lines[0]);
    // The page (Chinese first, English on request) and the metrics.
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert!(page.contains("data-keys-lost"), "{page}");
    assert!(page.contains("密钥目录丢失了密钥"));
    assert!(page.contains("关怀密钥丢失") && page.contains("data-unmatched=\"care_key_lost\""));
    let page_en = http(status_port, "GET", "/?lang=en", None).unwrap().text();
    assert!(page_en.contains("The key dir lost keys"), "{page_en}");
    assert!(page_en.contains("Care key lost"));
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(
        metrics.lines().any(|l| l == "zhian_keys_lost 2"),
        "{metrics}"
    );
    assert!(metrics.lines().any(|l| l == "zhian_care_unmatched 1"));

    // The same three pass again, the same local day, under the new keys.
    for (i, s) in people.iter().enumerate() {
        p.send(
            "zhian/access/door-1",
            access(&format!("b-{i}"), fake_now(offset), s),
        );
    }
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == 6),
        "{:?}",
        up.totals()
    );
    // 3-2-601, listed by subject, is matched with the new care key.
    assert!(
        wait_until(Duration::from_secs(10), || api_status(status_port)
            .is_some_and(|s| s["care"].as_array().is_some_and(|c| c
                .iter()
                .any(
                    |r| r["alias"] == "3-2-601" && r["last_seen"].is_string()
                )))),
        "{:?}",
        api_status(status_port).map(|s| s["care"].clone())
    );

    // Past midnight (a device on the new day vouches for the step): both residents have been
    // silent for longer than 2 minutes by the daemon's clock.
    let offset2 = midnight + 30 - real_s;
    site.set_clock(&format!("+{offset2}"));
    assert!(
        wait_until(Duration::from_secs(10), || daemon_now_ms(status_port)
            .is_some_and(|t| t >= midnight * 1000)),
        "the daemon's clock moved"
    );
    p.send(
        "zhian/access/door-2",
        access("next-1", fake_now(offset2), "card:NEXT-DAY"),
    );
    let care_notices = || -> Vec<Value> { up.on("care").iter().map(|m| m.json()).collect() };
    let dailies = || -> Vec<Value> { up.on("daily").iter().map(|m| m.json()).collect() };
    assert!(
        wait_until(Duration::from_secs(30), || !care_notices().is_empty()
            && !dailies().is_empty()),
        "care {:?} daily {:?}\n{}",
        care_notices(),
        dailies(),
        tail(&log, 30)
    );
    // 3-2-601 is truly silent: one notice. 5-1-302 can never be matched with the lost key:
    // no notice at all (it would have come in the same check).
    let notices = care_notices();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0]["alias"], "3-2-601");
    assert_eq!(notices[0]["state"], "silent");
    assert!(notices[0]["last_seen"].is_string(), "{}", notices[0]);

    // The day: three people under each key, so three, marked as spanning two keys; the
    // totals are every event.
    let d0 = dailies()[0].clone();
    assert_eq!(d0["rev"], 0, "{d0}");
    assert_eq!(d0["distinct"]["access_subjects"], 3, "{d0}");
    assert_eq!(d0["distinct"]["key_generations"], 2, "{d0}");
    let total: u64 = d0["counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["n"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 6, "{d0}");
    // Window counts are untouched by the loss.
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == 7),
        "{:?}",
        up.totals()
    );
    let (st, _) = site.term_daemon();
    assert!(st.success());
    assert_eq!(loss_lines(&log).len(), 1, "logged once");
    let markers: Vec<&str> = people
        .iter()
        .copied()
        .chain(["ELDER", "NEXT-DAY", p2.as_str()])
        .collect();
    let leaks = up.subject_leaks(&markers);
    assert!(leaks.is_empty(), "{leaks:?}");
}
