//! Vendor payloads (issue 13): the shipped `[[mqtt.sources]]` examples (`config/vendor-sources.toml`)
//! with their sample payloads (`tests/fixtures/vendor/`), through a real mosquitto: every
//! sample mapped and counted exactly, duplicates once, the ones that cannot be mapped rejected
//! `unmapped` with the rule they broke, canonical topics still working, sources applied on
//! SIGHUP, and no card or plate upstream. Also `zhian-gateway map` on each sample.

use crate::common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use zhian_gateway::config::SourceCfg;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/vendor");
const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/vendor-sources.toml");

/// The `[[mqtt.sources]]` of the shipped example.
fn example_sources() -> Vec<SourceCfg> {
    let text = fs::read_to_string(EXAMPLES).unwrap();
    let example: toml::Table = toml::from_str(&text).unwrap();
    example["mqtt"]["sources"].clone().try_into().unwrap()
}

/// A fixture with its times moved to `now_ms` (the samples are from 2026-11-30 morning).
fn fixture(name: &str, now_ms: i64) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&fs::read(Path::new(FIXTURES).join(name)).unwrap()).unwrap();
    let local = time::OffsetDateTime::from_unix_timestamp(now_ms / 1000)
        .unwrap()
        .to_offset(time::UtcOffset::from_hms(8, 0, 0).unwrap());
    if v.get("dateTime").is_some() {
        v["dateTime"] = Value::String(
            local
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
        );
    }
    if let Some(d) = v.pointer_mut("/Data/LocaleTime") {
        let fmt =
            time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
        *d = Value::String(local.format(&fmt).unwrap());
    }
    if let Some(s) = v.pointer_mut("/AlarmInfoPlate/result/PlateResult/timeStamp/Timeval/sec") {
        *s = Value::from(now_ms / 1000);
    }
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn map_shows_each_sample_as_the_gateway_would_count_it() {
    let cases = [
        (
            "hik/acs/door-3/event",
            "hik-acs-card-granted.json",
            Some(("door-3-4521", "granted")),
        ),
        (
            "hik/acs/door-3/event",
            "hik-acs-face-granted.json",
            Some(("door-3-4522", "granted")),
        ),
        (
            "hik/acs/door-3/event",
            "hik-acs-card-denied.json",
            Some(("door-3-4523", "denied")),
        ),
        ("hik/acs/door-3/event", "hik-acs-door-open-alarm.json", None),
        (
            "intercom/gate-2/events",
            "intercom-entry.json",
            Some(("gate-2-812", "granted")),
        ),
        (
            "intercom/gate-2/events",
            "intercom-exit-denied.json",
            Some(("gate-2-813", "denied")),
        ),
        ("intercom/gate-2/events", "intercom-no-record.json", None),
        (
            "parking/gate-east/plate",
            "plate-entry.json",
            Some(("gate-east-3051", "ok")),
        ),
        (
            "parking/gate-east/plate",
            "plate-exit.json",
            Some(("gate-east-3052", "ok")),
        ),
        (
            "parking/gate-east/plate",
            "plate-unknown-direction.json",
            None,
        ),
    ];
    for (topic, file, want) in cases {
        let out = Command::new(common::gateway_bin())
            .args(["map", "--config", EXAMPLES, "--topic", topic, "--payload"])
            .arg(Path::new(FIXTURES).join(file))
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{file}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
        match want {
            Some((id, result)) => {
                assert_eq!(out.status.code(), Some(0), "{file}: {v}");
                assert_eq!(v["event"]["id"], id, "{file}");
                assert_eq!(v["event"]["result"], result, "{file}");
                let subject = v["event"]["subject"].as_str().unwrap_or("");
                assert!(
                    subject.is_empty() || subject.contains("***"),
                    "{file}: the subject is masked: {subject}"
                );
            }
            None => {
                assert_eq!(out.status.code(), Some(65), "{file}: {v}");
                assert_eq!(v["rejected"], "unmapped", "{file}");
                assert!(v["rule"].as_str().unwrap().starts_with("source "), "{v}");
            }
        }
    }
    // The intercom's local time is read in the site's zone (+08:00).
    let out = Command::new(common::gateway_bin())
        .args([
            "map",
            "--config",
            EXAMPLES,
            "--topic",
            "intercom/gate-2/events",
            "--payload",
        ])
        .arg(Path::new(FIXTURES).join("intercom-entry.json"))
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["event"]["ts"], "2026-11-30T00:16:40Z");
    assert_eq!(v["event"]["action"], "entry");
}

#[test]
fn vendor_samples_are_counted_exactly_through_a_real_broker() {
    // Start without the plate camera's source (and those after it): its messages are not even
    // subscribed.
    let sources = example_sources();
    let before_plate: Vec<SourceCfg> = sources
        .iter()
        .take_while(|s| s.name.as_deref() != Some("plate-camera"))
        .cloned()
        .collect();
    assert_eq!(before_plate.len(), 2);
    let mut site = Site::build("vendor")
        .persistent_device()
        .status()
        .config(|c| c.mqtt.sources = before_plate)
        .ready(Ready::SiteLink)
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let mut p = site.publisher();
    let now = now_ms();
    for (topic, file) in [
        ("hik/acs/door-3/event", "hik-acs-card-granted.json"),
        ("hik/acs/door-3/event", "hik-acs-card-granted.json"), // redelivered: counted once
        ("hik/acs/door-3/event", "hik-acs-face-granted.json"),
        ("hik/acs/door-3/event", "hik-acs-card-denied.json"),
        ("hik/acs/door-3/event", "hik-acs-door-open-alarm.json"),
        ("intercom/gate-2/events", "intercom-entry.json"),
        ("intercom/gate-2/events", "intercom-exit-denied.json"),
        ("intercom/gate-2/events", "intercom-no-record.json"),
        ("parking/gate-east/plate", "plate-entry.json"), // no source yet: not subscribed
    ] {
        p.send(topic, fixture(file, now));
    }
    // The canonical topics keep working beside the sources.
    let e = Event::new("access", "door-9", "canon-1", "entry");
    p.send(&e.topic(), e.payload());
    p.wait_all_acked(Duration::from_secs(30));
    let want: BTreeMap<(String, String, String, String), u64> = [
        (("access", "door-3", "entry", "granted"), 2),
        (("access", "door-3", "entry", "denied"), 1),
        (("access", "gate-2", "entry", "granted"), 1),
        (("access", "gate-2", "exit", "denied"), 1),
        (("access", "door-9", "entry", "ok"), 1),
    ]
    .into_iter()
    .map(|((k, d, a, r), n)| ((k.into(), d.into(), a.into(), r.into()), n))
    .collect();
    assert!(
        wait_until(Duration::from_secs(30), || up.totals() == want),
        "{}\nlog:\n{}",
        map_diff(&want, &up.totals()),
        tail(&log, 20)
    );
    let s = api_status(status_port).unwrap();
    assert_eq!(
        s["counters"]["rejected_by_reason"]["unmapped"], 2,
        "{}",
        s["counters"]
    );
    let rejects = s["recent_rejects"].as_array().unwrap();
    let details: Vec<&str> = rejects
        .iter()
        .filter_map(|r| r["detail"].as_str())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("\"acs-isapi\": result: \"1024\" is not in its map")),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.contains("\"intercom\": id: join part /Data/RecNo is missing")),
        "{details:?}"
    );
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert!(page.contains("无法映射"), "the page names the reason");

    // The plate camera's source added and SIGHUP: subscribed live, counted.
    site.gw_mut().edit_config(|c| c.mqtt.sources = sources);
    site.gw().signal("HUP");
    assert!(wait_until(Duration::from_secs(15), || log_text(&log)
        .contains("reload: mqtt.sources applied")));
    site.device()
        .wait_subscribed(DEVICE_CLIENT_ID, "parking/+/plate");
    let up = site.upstream();
    for file in [
        "plate-entry.json",
        "plate-exit.json",
        "plate-unknown-direction.json",
    ] {
        p.send("parking/gate-east/plate", fixture(file, now));
    }
    p.wait_all_acked(Duration::from_secs(30));
    let mut want = want;
    want.insert(
        (
            "vehicle".into(),
            "gate-east".into(),
            "entry".into(),
            "ok".into(),
        ),
        1,
    );
    want.insert(
        (
            "vehicle".into(),
            "gate-east".into(),
            "exit".into(),
            "ok".into(),
        ),
        1,
    );
    assert!(
        wait_until(Duration::from_secs(30), || up.totals() == want),
        "{}\nlog:\n{}",
        map_diff(&want, &up.totals()),
        tail(&log, 20)
    );
    assert!(wait_until(Duration::from_secs(10), || api_status(
        status_port
    )
    .is_some_and(
        |s| s["counters"]["rejected_by_reason"]["unmapped"] == 3
    )));
    assert!(!log_text(&log).contains("take effect after a restart"));
    site.term_daemon();
    let leaks = up.subject_leaks(&[
        "3011223344",
        "A1B2C3D4",
        "FFEE0011",
        "浙A12345",
        "9999000011",
    ]);
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
}

/// The moment the issue-20 samples were taken, as they write it (site time, +08:00).
const SAMPLE_LOCAL: [&str; 2] = ["2026-12-04T12:37:", "2026-12-04 12:37:"];

/// An issue-20 sample with its times moved to the current minute (site time), re-encoded as it
/// came (the GBK samples stay GBK). Seconds are kept, so a sample's events stay apart.
fn sample(name: &str, now_ms: i64) -> Vec<u8> {
    let bytes = fs::read(Path::new(FIXTURES).join(name)).unwrap();
    let gbk = std::str::from_utf8(&bytes).is_err();
    let mut text = if gbk {
        encoding_rs::GBK.decode(&bytes).0.into_owned()
    } else {
        String::from_utf8(bytes).unwrap()
    };
    let local = time::OffsetDateTime::from_unix_timestamp(now_ms / 1000 - 60)
        .unwrap()
        .to_offset(time::UtcOffset::from_hms(8, 0, 0).unwrap());
    let minute = |sep: &str| {
        let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:");
        local.format(&fmt).unwrap().replacen(' ', sep, 1)
    };
    text = text
        .replace(SAMPLE_LOCAL[0], &minute("T"))
        .replace(SAMPLE_LOCAL[1], &minute(" "));
    if gbk {
        encoding_rs::GBK.encode(&text).0.into_owned()
    } else {
        text.into_bytes()
    }
}

/// `map` on a sample: the parsed output and the exit code.
fn map_cli(topic: &str, file: &str) -> (Value, Option<i32>) {
    let out = Command::new(common::gateway_bin())
        .args(["map", "--config", EXAMPLES, "--topic", topic, "--payload"])
        .arg(Path::new(FIXTURES).join(file))
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{file}: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    (v, out.status.code())
}

/// Issue 20: payloads as real devices send them. A controller's batch upload (three events in
/// one message, one of them with an RFC 9557 zone), an intercom sending its codes as floats
/// with a colon-less offset and 21-digit record ids that differ only past a float's precision,
/// a plate camera in GBK with Chinese direction labels and a `CST` time, and the first plate
/// camera sending its direction as `4.0`: `map` shows each as a person would count it.
#[test]
fn map_reads_real_device_payloads() {
    let (v, code) = map_cli("hik/acsevent/door-7/batch", "hik-acsevent-batch.json");
    assert_eq!(code, Some(0), "{v}");
    let events = v["events"].as_array().unwrap();
    let got: Vec<(String, String, String)> = events
        .iter()
        .map(|e| {
            (
                e["event"]["id"].as_str().unwrap().to_string(),
                e["event"]["result"].as_str().unwrap().to_string(),
                e["event"]["ts"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("door-7-9001", "granted", "2026-12-04T04:37:42Z"),
            ("door-7-9002", "granted", "2026-12-04T04:37:48Z"),
            ("door-7-9003", "denied", "2026-12-04T04:37:55Z"),
        ]
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    );
    for (file, id, action, result) in [
        (
            "talk-record-granted.json",
            "unit-3-123456789012345678901",
            "entry",
            "granted",
        ),
        (
            "talk-record-denied.json",
            "unit-3-123456789012345678902",
            "exit",
            "denied",
        ),
    ] {
        let (v, code) = map_cli("talk/unit-3/record", file);
        assert_eq!(code, Some(0), "{file}: {v}");
        assert_eq!(v["event"]["id"], id, "{file}");
        assert_eq!(v["event"]["action"], action, "{file}");
        assert_eq!(v["event"]["result"], result, "{file}");
    }
    let (v, _) = map_cli("talk/unit-3/record", "talk-record-granted.json");
    assert_eq!(v["event"]["ts"], "2026-12-04T04:37:42Z");
    for (file, action, plate) in [
        ("its-plate-entry-gbk.json", "entry", "浙***8"),
        ("its-plate-exit-gbk.json", "exit", "浙***6"),
    ] {
        let (v, code) = map_cli("its/gate-west/plate", file);
        assert_eq!(code, Some(0), "{file}: {v}");
        assert_eq!(v["event"]["action"], action, "{file}");
        assert_eq!(
            v["event"]["subject"], plate,
            "{file}: the plate decoded from GBK"
        );
        assert_eq!(v["event"]["kind"], "vehicle");
    }
    let (v, _) = map_cli("its/gate-west/plate", "its-plate-entry-gbk.json");
    assert_eq!(
        v["event"]["ts"], "2026-12-04T04:37:42Z",
        "CST at a +08:00 site"
    );
    let (v, code) = map_cli("parking/gate-east/plate", "plate-entry-float.json");
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["event"]["action"], "entry", "direction 4.0 is the code 4");
}

/// The same samples through a real mosquitto and the daemon: every event counted once under
/// the right result (the batch redelivered whole, counted once per element), nothing rejected,
/// and no card or plate upstream.
#[test]
fn real_device_payloads_are_counted_exactly_through_a_real_broker() {
    let site = Site::build("vendor20")
        .persistent_device()
        .status()
        .config(|c| c.mqtt.sources = example_sources())
        .ready(Ready::SiteLink)
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let mut p = site.publisher();
    let now = now_ms();
    for (topic, file) in [
        ("hik/acsevent/door-7/batch", "hik-acsevent-batch.json"),
        ("hik/acsevent/door-7/batch", "hik-acsevent-batch.json"), // redelivered whole
        ("talk/unit-3/record", "talk-record-granted.json"),
        ("talk/unit-3/record", "talk-record-denied.json"),
        ("its/gate-west/plate", "its-plate-entry-gbk.json"),
        ("its/gate-west/plate", "its-plate-exit-gbk.json"),
        ("its/gate-west/plate", "its-plate-exit-gbk.json"), // redelivered
    ] {
        p.send(topic, sample(file, now));
    }
    p.send(
        "parking/gate-east/plate",
        fixture("plate-entry-float.json", now),
    );
    p.wait_all_acked(Duration::from_secs(30));
    let want: BTreeMap<(String, String, String, String), u64> = [
        (("access", "door-7", "entry", "granted"), 2),
        (("access", "door-7", "entry", "denied"), 1),
        (("access", "unit-3", "entry", "granted"), 1),
        (("access", "unit-3", "exit", "denied"), 1),
        (("vehicle", "gate-west", "entry", "ok"), 1),
        (("vehicle", "gate-west", "exit", "ok"), 1),
        (("vehicle", "gate-east", "entry", "ok"), 1),
    ]
    .into_iter()
    .map(|((k, dv, a, r), n)| ((k.into(), dv.into(), a.into(), r.into()), n))
    .collect();
    assert!(
        wait_until(Duration::from_secs(30), || up.totals() == want),
        "{}\nlog:\n{}",
        map_diff(&want, &up.totals()),
        tail(&log, 20)
    );
    let s = api_status(status_port).unwrap();
    assert!(
        s["counters"]["rejected_by_reason"]
            .as_object()
            .is_none_or(|r| r.values().all(|n| n == 0)),
        "nothing rejected: {}",
        s["counters"]
    );
    site.term_daemon();
    let leaks = up.subject_leaks(&[
        "3011223355",
        "3011229999",
        "C0FFEE01",
        "C0FFEE02",
        "浙A88888",
        "浙B66666",
        "浙A55555",
    ]);
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
}
