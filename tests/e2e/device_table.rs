//! The device table through the real binary and a real mosquitto (issue 20, item 5): a source
//! mapping mistake (a plate used as the device id) fills `health.max_devices` with phantoms, yet
//! every event counts and a real door that comes after them is learned; fixing the source by
//! SIGHUP forgets the phantoms at once; an installer forgets devices by pattern while the daemon
//! runs (`zhian-gateway devices forget`), or while it is stopped (applied at the next start);
//! a source changed while the daemon was stopped forgets its devices at start.

use crate::common;

use common::*;
use std::fs;
use std::path::Path;
use std::time::Duration;
use zhian_gateway::config::sources::FieldTable;
use zhian_gateway::config::{FieldCfg, SourceCfg};

/// A plate camera source whose device is `device_rule`.
fn lpr_source(device_rule: &str) -> SourceCfg {
    let short = |s: &str| FieldCfg::Short(s.into());
    SourceCfg {
        name: Some("lpr".into()),
        topic: "lpr/+/event".into(),
        encoding: None,
        each: None,
        kind: short("vehicle"),
        device: short(device_rule),
        id: short("/id"),
        ts: FieldCfg::Table(FieldTable {
            pointer: Some("/ts".into()),
            format: Some("epoch_ms".into()),
            ..FieldTable::default()
        }),
        action: short("entry"),
        result: None,
        subject: Some(short("/plate")),
    }
}

fn plate_event(id: &str, plate: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id, "ts": now_ms(), "plate": plate, "camera": "lpr-1"
    }))
    .unwrap()
}

/// The names of the devices `/api/status` shows.
fn shown(port: u16) -> Vec<String> {
    let s = api_status(port).unwrap();
    let mut v: Vec<String> = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

fn devices_cli(cfg: &Path, scratch: &Path, args: &[&str]) -> CliOutput {
    let mut all = vec!["devices", args[0], "--config", cfg.to_str().unwrap()];
    all.extend(&args[1..]);
    run_cli(&all, scratch, Duration::from_secs(30))
}

fn forgotten(port: u16, why: &str) -> Option<u64> {
    api_status(port)?["counters"]["devices_forgotten"][why].as_u64()
}

#[test]
fn phantom_devices_never_cost_a_real_door_and_are_forgotten_by_fixing_the_source_or_by_name() {
    // The mistake: the plate as the device id.
    let mut site = Site::build("table")
        .persistent_device()
        .status()
        .config(|c| {
            c.health.max_devices = 12;
            c.mqtt.sources = vec![lpr_source("/plate")];
        })
        .ready(Ready::SiteLink)
        .start();
    let (status_port, log, cfg) = (site.status_port(), site.log_path(), site.config_path());
    let (dir, scratch) = (site.data_dir(), site.root.clone());
    let mut p = site.publisher();
    let up = site.upstream();
    let mut sent = 0u64;
    let door = |id: &str| Event::new("access", "door-1", id, "entry");
    let e = door("d-0");
    p.send(&e.topic(), e.payload());
    sent += 1;
    p.wait_all_acked(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || shown(status_port) == ["door-1"]));
    // 20 vehicles through the mistaken source: 20 phantom devices for a table of 12.
    for i in 0..20 {
        p.send(
            "lpr/lpr-1/event",
            plate_event(&format!("p-{i}"), &format!("ZJA10{i:02}")),
        );
        sent += 1;
    }
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(15), || up
            .totals()
            .values()
            .sum::<u64>()
            == sent),
        "every event counted: {:?}; log:\n{}",
        up.totals(),
        tail(&log, 30)
    );
    assert!(wait_until(Duration::from_secs(10), || forgotten(
        status_port,
        "bound"
    ) == Some(9)));
    let phantoms = shown(status_port);
    assert_eq!(phantoms.len(), 12, "{phantoms:?}");
    assert!(
        !phantoms.contains(&"door-1".to_string()),
        "the door was the longest silent"
    );
    // The real door reports again: counted, and back in the table (a phantom makes room).
    let e = door("d-1");
    p.send(&e.topic(), e.payload());
    sent += 1;
    p.wait_all_acked(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || shown(status_port)
        .contains(&"door-1".to_string())));
    assert_eq!(shown(status_port).len(), 12);
    let s = api_status(status_port).unwrap();
    assert_eq!(s["counters"]["rejected"], 0, "{}", s["counters"]);
    // The installer sees where each device came from.
    let out = devices_cli(&cfg, &scratch, &["list"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 12, "{}", out.stdout);
    assert!(out.stdout.contains("door-1") && out.stdout.contains("canonical topic"));
    assert_eq!(
        out.stdout.matches("source \"lpr\"").count(),
        11,
        "{}",
        out.stdout
    );
    assert_eq!(
        log_text(&log).matches("health.max_devices reached").count(),
        1
    );

    // The source is fixed and SIGHUP sent: the phantoms no longer map and go at once.
    site.gw_mut()
        .edit_config(|c| c.mqtt.sources = vec![lpr_source("topic[1]")]);
    site.gw().signal("HUP");
    let up = site.upstream();
    assert!(
        wait_until(Duration::from_secs(10), || shown(status_port) == ["door-1"]),
        "{:?}; log:\n{}",
        shown(status_port),
        tail(&log, 20)
    );
    assert_eq!(forgotten(status_port, "unmapped"), Some(11));
    for i in 0..2 {
        p.send(
            "lpr/lpr-1/event",
            plate_event(&format!("q-{i}"), &format!("ZJB20{i:02}")),
        );
        sent += 1;
    }
    p.wait_all_acked(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || shown(status_port)
        == ["door-1", "lpr-1"]));

    // The installer forgets a device by pattern while the daemon runs.
    let out = devices_cli(&cfg, &scratch, &["forget", "door-*"]);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.contains("door-1"), "{}", out.stdout);
    assert!(
        out.stdout.contains("1 device(s) forgotten"),
        "{}",
        out.stdout
    );
    assert_eq!(shown(status_port), ["lpr-1"]);
    assert_eq!(forgotten(status_port, "installer"), Some(1));
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    for (why, n) in [("bound", 10), ("unmapped", 11), ("installer", 1)] {
        assert!(
            metrics.contains(&format!(
                "zhian_devices_forgotten_total{{reason=\"{why}\"}} {n}"
            )),
            "{why} {n}: {metrics}"
        );
    }
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert!(page.contains("data-forgotten-unmapped=\"11\""));
    let out = devices_cli(&cfg, &scratch, &["forget", "nothing-*"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "nothing matched: {}",
        out.stderr
    );
    // Its counted events stay counted.
    assert!(wait_until(Duration::from_secs(10), || up
        .totals()
        .values()
        .sum::<u64>()
        == sent));

    // A request made while the daemon is stopped is applied when it starts.
    let (st, _) = site.term_daemon();
    assert!(st.success());
    let out = devices_cli(&cfg, &scratch, &["forget", "vehicle/lpr-*"]);
    assert_eq!(out.status.code(), Some(75), "queued: {}", out.stderr);
    assert!(out.stderr.contains("queued"), "{}", out.stderr);
    site.start_daemon();
    assert!(
        wait_until(Duration::from_secs(30), || forgotten(
            status_port,
            "installer"
        ) == Some(1)),
        "log:\n{}",
        tail(&log, 20)
    );
    assert!(shown(status_port).is_empty());
    assert!(
        !fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".json")),
        "the request was taken"
    );

    // lpr-1 comes back with its next event; its source is changed while the daemon is
    // stopped: at start it no longer maps and is forgotten.
    p.send("lpr/lpr-1/event", plate_event("r-0", "ZJC3000"));
    sent += 1;
    p.wait_all_acked(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || shown(status_port) == ["lpr-1"]));
    let (st, _) = site.term_daemon();
    assert!(st.success());
    site.gw_mut()
        .edit_config(|c| c.mqtt.sources = vec![lpr_source("/camera")]);
    site.start_daemon();
    let up = site.upstream();
    assert!(
        wait_until(Duration::from_secs(30), || forgotten(
            status_port,
            "unmapped"
        ) == Some(1)),
        "log:\n{}",
        tail(&log, 20)
    );
    assert!(shown(status_port).is_empty());
    assert!(wait_until(Duration::from_secs(10), || up
        .totals()
        .values()
        .sum::<u64>()
        == sent));
    site.term_daemon();
}
