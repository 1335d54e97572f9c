//! SIGHUP through the real binary: the config file is re-read; `alerts.actions` applies live, an
//! invalid file is logged and the running config kept, a change that needs a restart is logged
//! as such, and the daemon never stops.

use crate::common;

use common::*;
use std::fs;
use std::time::Duration;
use zhian_gateway::config::Dur;

fn actions(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

#[test]
fn sighup_reloads_what_can_change_live_and_never_stops() {
    let mut site = Site::build("reload")
        .config(|c| c.alerts.actions = actions(&["fire_lane_blocked"]))
        .start();
    let log = site.log_path();
    let up = site.upstream();
    assert!(
        wait_until(Duration::from_secs(30), || up.latest_status().as_deref()
            == Some("online")),
        "daemon online; log:\n{}",
        tail(&log, 30)
    );
    let mut p = site.publisher();
    let camera = |id: &str| Event::new("camera", "cam-1", id, "loitering");

    // Not an alert action yet: counted (committed: the heartbeat says so), no alert.
    let e = camera("c-1");
    p.send(&e.topic(), e.payload());
    p.wait_all_acked(Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(20), || up
        .latest_heartbeat()
        .is_some_and(|hb| hb["counters"]["accepted"] == 1)));

    // A bare SIGHUP with the file unchanged: nothing happens but a log line.
    site.gw().signal("HUP");
    eventually("the reload handled", || {
        log_text(&log).contains("reload: done")
    });
    assert!(
        site.daemon_exited().is_none(),
        "SIGHUP never stops the daemon"
    );

    // An invalid file: refused, logged with the key, the running config kept.
    site.gw_mut()
        .edit_config(|c| c.alerts.actions = actions(&["Not Valid"]));
    site.gw().signal("HUP");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let l = String::from_utf8_lossy(&fs::read(&log).unwrap()).into_owned();
            l.contains("config reload refused") && l.contains("alerts.actions")
        }),
        "the refusal names the key; log:\n{}",
        tail(&log, 30)
    );
    assert!(site.daemon_exited().is_none());

    // A valid file that makes loitering an alert and changes a restart-only key.
    site.gw_mut().edit_config(|c| {
        c.alerts.actions = actions(&["fire_lane_blocked", "loitering"]);
        c.aggregate.window = Dur::secs(4);
    });
    let up = site.upstream();
    site.gw().signal("HUP");
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
    let (status, took) = site.term_daemon();
    assert!(status.success(), "clean stop after reloads");
    assert!(took < Duration::from_secs(5));
}
