//! SIGHUP through the real binary: the config file is re-read; `alerts.actions` applies live, an
//! invalid file is logged and the running config kept, a change that needs a restart is logged
//! as such, and the daemon never stops.

mod common;

use common::*;
use std::fs;
use std::time::Duration;

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn sighup_reloads_what_can_change_live_and_never_stops() {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("data");
    let site = Mosquitto::start(&scratch.path().join("site"), free_port(), false);
    let district = Mosquitto::start(&scratch.path().join("district"), free_port(), false);
    let up = Upstream::start(district.port, "reload-collector");
    let cfg = scratch.path().join("gateway.toml");
    let base = config_text(&dir, site.port, district.port, "");
    let with_alerts = |actions: &str| format!("{base}\n[alerts]\nactions = [{actions}]\n");
    fs::write(&cfg, with_alerts("\"fire_lane_blocked\"")).unwrap();
    let log = scratch.path().join("daemon.log");
    let mut d = Daemon::start(&cfg, &log);
    assert!(
        wait_until(Duration::from_secs(30), || up.latest_status().as_deref()
            == Some("online")),
        "daemon online; log:\n{}",
        tail(&log, 30)
    );
    let mut p = Publisher::connect(site.port, "reload-pub");
    let camera = |id: &str| Event::new("camera", "cam-1", id, "loitering");

    // Not an alert action yet: counted (committed: the heartbeat says so), no alert.
    let e = camera("c-1");
    p.send(&e.topic(), e.payload());
    p.wait_all_acked(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(20), || up
        .latest_heartbeat()
        .is_some_and(|hb| hb["counters"]["accepted"] == 1)));

    // A bare SIGHUP with the file unchanged: nothing happens but a log line.
    signal(d.pid(), "HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert!(d.try_wait().is_none(), "SIGHUP never stops the daemon");

    // An invalid file: refused, logged with the key, the running config kept.
    fs::write(&cfg, with_alerts("\"Not Valid\"")).unwrap();
    signal(d.pid(), "HUP");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let l = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
            l.contains("config reload refused") && l.contains("alerts.actions")
        }),
        "the refusal names the key; log:\n{}",
        tail(&log, 30)
    );
    assert!(d.try_wait().is_none());

    // A valid file that makes loitering an alert and changes a restart-only key.
    fs::write(
        &cfg,
        with_alerts("\"fire_lane_blocked\", \"loitering\"")
            .replace("window = \"2s\"", "window = \"4s\""),
    )
    .unwrap();
    signal(d.pid(), "HUP");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let l = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
            l.contains("alerts.actions applied")
                && l.contains("after a restart")
                && l.contains("aggregate")
        }),
        "applied and restart-needed sections logged; log:\n{}",
        tail(&log, 30)
    );
    let e = camera("c-2");
    p.send(&e.topic(), e.payload());
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(20), || up
            .on("alert")
            .iter()
            .any(|m| m.json()["id"] == "c-2")),
        "the reloaded alerts.actions applies: {}",
        up.dump()
    );
    assert!(!up.on("alert").iter().any(|m| m.json()["id"] == "c-1"));
    // The window stays at its running value until a restart: both events in 2 s windows.
    assert!(
        wait_until(Duration::from_secs(20), || up.summaries().len() >= 2),
        "{}",
        up.dump()
    );
    assert!(up.summaries().iter().all(|s| s.secs == 2), "{}", up.dump());
    let (status, took) = d.term();
    assert!(status.success(), "clean stop after reloads");
    assert!(took < Duration::from_secs(5));
}
