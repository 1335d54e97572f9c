//! Vehicles inside (实有车辆, contract: "Vehicles inside") through a real broker and the real
//! binary: entries and exits move the presence set by event time; a duplicate, a second entry
//! of a car inside and an exit without an entry are handled as the rules say; a denied entry
//! moves nothing; the set and its counts survive `kill -9`; `/api/status`, the page and
//! `/metrics` show them; a stocktake (`occupancy set --count`) sets the count and the cars only
//! it counted leave through it; `{prefix}/{gateway}/occupancy` goes upstream each window; the
//! plate is nowhere in the store, the log or upstream (its masked form only on the page).

use crate::common;

use common::*;
use std::fs;
use std::time::Duration;
use zhian_gateway::config::{Dur, Occupancy};

fn car(id: &str, plate: &str, action: &str, ts_ms: i64) -> Event {
    Event::new("vehicle", "gate-1", id, action)
        .subject(plate)
        .at(ts_ms)
}

#[test]
fn vehicles_inside_follow_entries_and_exits_through_a_kill_9() {
    let site = Site::build("occupancy")
        .persistent_device()
        .status()
        .config(|c| {
            c.occupancy = Some(Occupancy {
                capacity: Some(10),
                long_stay: Dur::secs(60),
                max_stay: Dur::secs(30 * 86_400),
            });
        })
        .start();
    let gw = site.gw();
    let mut p = site.publisher();
    let now = now_ms();
    let plates = ["浙A10001", "浙A10002", "浙A10003", "浙B20004"];
    let send = |p: &mut Publisher, e: Event| p.send(&e.topic(), e.payload());
    // Three cars in (one two minutes ago: a long stay), one of them read twice (the same
    // event again) and once more at another gate moment (a refresh).
    send(&mut p, car("e1", plates[0], "entry", now - 120_000));
    send(&mut p, car("e1", plates[0], "entry", now - 120_000));
    send(&mut p, car("e2", plates[1], "entry", now - 5_000));
    send(&mut p, car("e3", plates[2], "entry", now - 4_000));
    send(&mut p, car("e3b", plates[2], "entry", now - 3_000));
    // One leaves; one leaves that never came in (counted, not subtracted); one denied entry.
    send(&mut p, car("x2", plates[1], "exit", now - 2_000));
    send(&mut p, car("x4", plates[3], "exit", now - 1_000));
    send(
        &mut p,
        Event::new("vehicle", "gate-1", "d5", "entry")
            .result("denied")
            .subject("浙C30005")
            .at(now - 500),
    );
    p.wait_all_acked(Duration::from_secs(30));
    let s = gw.wait_for_status("two vehicles inside", |s| {
        s["occupancy"]["inside"] == 2 && s["occupancy"]["unmatched_exits"] == 1
    });
    let o = &s["occupancy"];
    assert_eq!(o["capacity"], 10);
    assert_eq!(o["free"], 8);
    assert_eq!(o["long_stay"], 1);
    assert_eq!(o["long_stays"][0]["plate"], "浙A***01");
    assert_eq!(o["long_stays"][0]["gate"], "gate-1");

    // kill -9: the set is in the store, committed with the events that made it.
    site.kill9_daemon();
    send(&mut p, car("x1", plates[0], "exit", now));
    site.start_daemon();
    let s = gw.wait_for_status("one inside after the restart", |s| {
        s["occupancy"]["inside"] == 1
    });
    assert_eq!(s["occupancy"]["free"], 9);
    assert_eq!(s["occupancy"]["long_stay"], 0);
    let page = http(gw.status_port(), "GET", "/", None).unwrap().text();
    assert!(
        page.contains("实有车辆") && page.contains("data-free=\"9\""),
        "no occupancy on the page"
    );
    let metrics = http(gw.status_port(), "GET", "/metrics", None)
        .unwrap()
        .text();
    assert!(
        metrics.lines().any(|l| l == "zhian_vehicles_inside 1"),
        "{metrics}"
    );
    assert!(metrics.lines().any(|l| l == "zhian_parking_free 9"));

    // A stocktake: 5 counted inside; then a car the set never saw leaves (unmatched: one of
    // the stocktake's).
    let cfg = gw.config_path.to_str().unwrap().to_string();
    let out = run_cli(
        &["occupancy", "set", "--config", &cfg, "--count", "5"],
        &site.root,
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", out.stderr);
    gw.wait_for_status("the stocktake's count", |s| s["occupancy"]["inside"] == 5);
    send(&mut p, car("x9", "浙D40009", "exit", now_ms()));
    p.wait_all_acked(Duration::from_secs(30));
    gw.wait_for_status("one of the stocktake's cars gone", |s| {
        s["occupancy"]["inside"] == 4 && s["occupancy"]["stocktake_count"] == 5
    });
    // Upstream, once per window: the latest says 4 inside of 10.
    eventually("an occupancy report of 4 upstream", || {
        site.upstream()
            .on("occupancy")
            .last()
            .is_some_and(|m| m.json()["inside"] == 4 && m.json()["capacity"] == 10)
    });
    let m = site.upstream().on("occupancy").last().unwrap().json();
    assert_eq!(m["schema"], "zhian.occupancy.v1");
    assert_eq!(m["site"]["compound"], "春江花园");

    // No plate anywhere but masked on the page.
    let store = fs::read(gw.data_dir().join("zhian.redb")).unwrap();
    let log = gw.log_text();
    for plate in plates.iter().chain(["浙C30005", "浙D40009"].iter()) {
        let b = plate.as_bytes();
        assert!(
            !store.windows(b.len()).any(|w| w == b),
            "{plate} in the store"
        );
        assert!(!log.contains(plate), "{plate} in the log");
        assert!(!page.contains(plate), "{plate} on the page");
        assert!(!site.upstream().dump().contains(plate), "{plate} upstream");
    }
    site.term_daemon();
}
