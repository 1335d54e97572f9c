//! The district side (issue 14): `zhian-gateway district` keeping a fleet's counts in a real
//! PostgreSQL, exactly. Two receivers share the subscription on a real mosquitto; 20 real
//! gateway processes with 2 s windows and a publisher playing 150 more gateways' upstream
//! traffic (re-issued revs, split summaries, redeliveries, alerts, care notices, daily counts,
//! heartbeats); the district broker is restarted once and one receiver is killed with -9
//! mid-stream. The database's totals per gateway and window equal what the gateways counted.

use crate::common;

use common::district::DISTRICT_PREFIX as PREFIX;
use common::district::*;
use common::pg::Postgres;
use common::*;
use rumqttc::{Client, Event as MqttEvent, Incoming, MqttOptions, QoS};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Every summary on the district broker, as (gateway, start, secs) -> rev -> (parts, part ->
/// counts total): what the gateways sent, to compute what the database must hold.
type Seen = Arc<Mutex<BTreeMap<(String, String, i64), BTreeMap<i64, (i64, BTreeMap<i64, i64>)>>>>;

fn watch_summaries(port: u16) -> (Seen, std::thread::JoinHandle<()>) {
    let seen: Seen = Default::default();
    let subscribed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sub = subscribed.clone();
    let mut opts = MqttOptions::new("fleet-watcher", "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(5))
        .set_max_packet_size(16 << 20, 64 << 10);
    let (client, mut conn) = Client::new(opts, 1024);
    let s = seen.clone();
    let h = std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(MqttEvent::Incoming(Incoming::ConnAck(_))) => {
                    let _ = client.subscribe(format!("{PREFIX}/+/summary"), QoS::AtLeastOnce);
                }
                Ok(MqttEvent::Incoming(Incoming::SubAck(_))) => {
                    sub.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(MqttEvent::Incoming(Incoming::Publish(p))) => {
                    let v: Value = match serde_json::from_slice(&p.payload) {
                        Ok(v) => v,
                        Err(_) => continue,
                    };
                    let g = v["gateway"].as_str().unwrap_or("").to_string();
                    let start = v["window"]["start"].as_str().unwrap_or("").to_string();
                    let secs = v["window"]["secs"].as_i64().unwrap_or(0);
                    let rev = v["rev"].as_i64().unwrap_or(0);
                    let parts = v["parts"].as_i64().unwrap_or(1);
                    let part = v["part"].as_i64().unwrap_or(1);
                    let n: i64 = v["counts"]
                        .as_array()
                        .map(|c| c.iter().map(|r| r["n"].as_i64().unwrap_or(0)).sum())
                        .unwrap_or(0);
                    s.lock()
                        .unwrap()
                        .entry((g, start, secs))
                        .or_default()
                        .entry(rev)
                        .or_insert((parts, BTreeMap::new()))
                        .1
                        .insert(part, n);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
                _ => {}
            }
        }
    });
    assert!(
        wait_until(Duration::from_secs(10), || subscribed
            .load(std::sync::atomic::Ordering::SeqCst)),
        "the summary watcher subscribed"
    );
    (seen, h)
}

/// `gateway_state` of the fleet's real gateways: gateway -> (status, epoch).
fn fleet_state(pg: &Postgres) -> BTreeMap<String, (String, i64)> {
    pg.psql("SELECT gateway, coalesce(status, ''), coalesce(epoch, -1) FROM gateway_state WHERE gateway LIKE 'fleet-%'")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            Some((f.next()?.to_string(), (f.next()?.to_string(), f.next()?.parse().ok()?)))
        })
        .collect()
}

/// The epoch a gateway persisted for its current (or last) district connection.
fn epoch_on_disk(dir: &Path) -> i64 {
    fs::read_to_string(dir.join("upstream.epoch"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(-2)
}

/// The highest complete rev's total per (gateway, window start RFC 3339).
fn expected(seen: &Seen) -> BTreeMap<(String, String), i64> {
    let mut out = BTreeMap::new();
    for ((g, start, _secs), revs) in seen.lock().unwrap().iter() {
        if start.is_empty() {
            continue; // a malformed message the test sent on purpose
        }
        let best = revs
            .iter()
            .rev()
            .find(|(_, (parts, got))| got.len() as i64 == *parts);
        if let Some((_, (_, got))) = best {
            out.insert((g.clone(), start.clone()), got.values().sum());
        }
    }
    out
}

#[test]
fn a_fleet_of_170_gateways_lands_exactly_in_postgresql() {
    // One site broker and the district broker; the gateways come later.
    let mut site = Site::build("fleet")
        .persistent_device()
        .persistent_district()
        .no_collector()
        .no_gateway()
        .start();
    let pg = Postgres::start(&site.root.join("pg"), free_port());
    let scratch = site.root.clone();
    let district_port = site.district().port;
    let (seen, _watcher) = watch_summaries(district_port);

    // Two receivers sharing the subscription.
    let rlog = scratch.join("receivers.log");
    let (c1, c2) = (scratch.join("r1.toml"), scratch.join("r2.toml"));
    let h1 = receiver_config(&c1, &pg.url(), district_port, "zhian-district-1");
    let h2 = receiver_config(&c2, &pg.url(), district_port, "zhian-district-2");
    let check = Command::new(env!("CARGO_BIN_EXE_zhian-gateway"))
        .args(["check-config", "--config"])
        .arg(&c1)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut r1 = start_receiver(&c1, &rlog);
    let r2 = start_receiver(&c2, &rlog);
    // Both subscribed (their shared subscription exists) before anything is published.
    wait_healthy(h1, &rlog);
    wait_healthy(h2, &rlog);

    // 20 real gateways, one site broker, each on its own topic prefix (each gateway's device
    // session is seeded before any device publishes).
    for i in 0..20 {
        site.add_gateway(&format!("gw{i}"), |c| {
            c.gateway.id = format!("fleet-{i:02}");
            c.mqtt.client_id = Some(format!("fleet-{i:02}-dev"));
            c.mqtt.topics = vec![format!("g{i}/+/+")];
        });
    }
    let dirs: Vec<PathBuf> = (0..20)
        .map(|i| site.gateway(i).data_dir().to_path_buf())
        .collect();

    // Devices: 20 gateways x 40 events over a few windows, with redeliveries (same id).
    let mut devices = Publisher::connect(site.device().port, "fleet-devices");
    let mut sent_per_gateway = BTreeMap::new();
    // The synthetic 150: the publisher's expected totals per (gateway, window).
    let mut synth = Publisher::connect(district_port, "fleet-synth");
    let mut synth_expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    let base = (now_ms() / 60_000 - 30) * 60_000;
    let mut rng = Rng::new(14);
    for round in 0..4 {
        for i in 0..20 {
            for k in 0..10 {
                let e = Event::new(
                    "access",
                    &format!("door-{}", k % 3),
                    &format!("r{round}-{k}"),
                    "entry",
                );
                let topic = format!("g{i}/access/door-{}", k % 3);
                devices.send(&topic, e.payload());
                if k == 0 {
                    devices.send(&topic, e.payload()); // redelivered: counted once
                }
                *sent_per_gateway
                    .entry(format!("fleet-{i:02}"))
                    .or_insert(0i64) += 1;
            }
        }
        for g in 0..150 {
            let gw = format!("syn-{g:03}");
            let start = base + (round as i64) * 60_000;
            let a = rng.below(50) as i64 + 1;
            let b = rng.below(50) as i64;
            match g % 4 {
                // Whole, sent twice (redelivery).
                0 => {
                    let p = summary(&gw, start, 0, None, &[("door-1", a), ("door-2", b)]);
                    synth.send(&format!("{PREFIX}/{gw}/summary"), p.clone());
                    synth.send(&format!("{PREFIX}/{gw}/summary"), p);
                    synth_expected.insert((gw.clone(), rfc(start)), a + b);
                }
                // Re-issued: rev 1 replaces rev 0; a stale rev 0 redelivered after it changes nothing.
                1 => {
                    let p0 = summary(&gw, start, 0, None, &[("door-1", a)]);
                    synth.send(&format!("{PREFIX}/{gw}/summary"), p0.clone());
                    synth.send(
                        &format!("{PREFIX}/{gw}/summary"),
                        summary(&gw, start, 1, None, &[("door-1", a + 1), ("door-2", b)]),
                    );
                    synth.send(&format!("{PREFIX}/{gw}/summary"), p0);
                    synth_expected.insert((gw.clone(), rfc(start)), a + 1 + b);
                }
                // Split in two parts, second part first; then a rev 1 in three parts.
                2 => {
                    synth.send(
                        &format!("{PREFIX}/{gw}/summary"),
                        summary(&gw, start, 0, Some((2, 2)), &[("door-2", b)]),
                    );
                    synth.send(
                        &format!("{PREFIX}/{gw}/summary"),
                        summary(&gw, start, 0, Some((1, 2)), &[("door-1", a)]),
                    );
                    for (i, d) in ["door-1", "door-2", "door-3"].iter().enumerate() {
                        synth.send(
                            &format!("{PREFIX}/{gw}/summary"),
                            summary(&gw, start, 1, Some((i as i64 + 1, 3)), &[(d, a)]),
                        );
                    }
                    synth_expected.insert((gw.clone(), rfc(start)), 3 * a);
                }
                // A rev 1 with a missing part: rev 0 stays in force.
                _ => {
                    synth.send(
                        &format!("{PREFIX}/{gw}/summary"),
                        summary(&gw, start, 0, None, &[("door-1", a)]),
                    );
                    synth.send(
                        &format!("{PREFIX}/{gw}/summary"),
                        summary(&gw, start, 1, Some((1, 2)), &[("door-1", 999)]),
                    );
                    synth_expected.insert((gw.clone(), rfc(start)), a);
                }
            }
            if round == 0 {
                let hb = json!({"schema": "zhian.heartbeat.v1", "gateway": gw, "version": "0.1.0"});
                synth.send(
                    &format!("{PREFIX}/{gw}/heartbeat"),
                    serde_json::to_vec(&hb).unwrap(),
                );
                let alert = json!({"schema": "zhian.alert.v1", "gateway": gw, "kind": "camera", "device": "cam-1",
                    "action": "high_altitude_throw", "id": format!("a-{g}"), "ts": rfc(base)});
                synth.send(
                    &format!("{PREFIX}/{gw}/alert"),
                    serde_json::to_vec(&alert).unwrap(),
                );
                synth.send(
                    &format!("{PREFIX}/{gw}/alert"),
                    serde_json::to_vec(&alert).unwrap(),
                );
                if g % 10 == 0 {
                    let care = json!({"schema": "zhian.care.v1", "gateway": gw, "alias": "3-2-601",
                        "state": "silent", "last_seen": null, "silent_secs": 90000});
                    synth.send(
                        &format!("{PREFIX}/{gw}/care"),
                        serde_json::to_vec(&care).unwrap(),
                    );
                    synth.send(
                        &format!("{PREFIX}/{gw}/care"),
                        serde_json::to_vec(&care).unwrap(),
                    );
                }
                let daily = json!({"schema": "zhian.daily.v1", "gateway": gw, "date": "2026-11-29", "tz": "+08:00",
                    "rev": 0, "distinct": {"access_subjects": 100 + g, "vehicles": 20}, "counts": []});
                synth.send(
                    &format!("{PREFIX}/{gw}/daily"),
                    serde_json::to_vec(&daily).unwrap(),
                );
            }
        }
        // Mid-stream faults: a receiver killed with -9 (and restarted), the broker restarted.
        if round == 1 {
            let _ = r1.0.kill(); // SIGKILL: -9
            let _ = r1.0.wait();
            r1 = start_receiver(&c1, &rlog);
        }
        if round == 2 {
            synth.wait_all_acked(Duration::from_secs(30));
            site.district_mut().restart();
        }
        // The scenario: rounds 2 s apart, so the gateways' events span several windows.
        std::thread::sleep(Duration::from_secs(2));
    }
    // Foreign and malformed messages: rejected, counted, never stopping anything.
    synth.send(&format!("{PREFIX}/syn-000/summary"), b"{not json".to_vec());
    synth.send(&format!("{PREFIX}/syn-001/bogus"), b"{}".to_vec());
    synth.send(
        &format!("{PREFIX}/syn-002/summary"),
        br#"{"schema":"zhian.summary.v1","gateway":"someone-else"}"#.to_vec(),
    );
    devices.wait_all_acked(Duration::from_secs(60));
    synth.wait_all_acked(Duration::from_secs(60));

    // The 20 real gateways: what they counted (their own summaries, highest complete rev).
    let real_done = || {
        let exp = expected(&seen);
        sent_per_gateway.iter().all(|(g, n)| {
            exp.iter()
                .filter(|((eg, _), _)| eg == g)
                .map(|(_, v)| *v)
                .sum::<i64>()
                == *n
        })
    };
    assert!(
        wait_until(Duration::from_secs(60), real_done),
        "the gateways' own summaries add up to what their devices sent"
    );
    let mut want = expected(&seen);
    for (k, v) in &synth_expected {
        want.insert(k.clone(), *v);
    }
    let converged = wait_until(Duration::from_secs(60), || in_db(&pg) == want);
    let got = in_db(&pg);
    assert!(
        converged,
        "database vs gateways:\n{}\nreceivers:\n{}",
        map_diff(&want, &got),
        tail(&rlog, 40)
    );
    let total: i64 = got.values().sum();
    println!(
        "fleet: {} gateways, {} windows, {} events in PostgreSQL, equal to the gateways' counts",
        got.keys()
            .map(|(g, _)| g)
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        got.len(),
        total
    );
    // Per real gateway, the database total is what its devices sent (no event twice).
    for (g, n) in &sent_per_gateway {
        let db: i64 = got
            .iter()
            .filter(|((eg, _), _)| eg == g)
            .map(|(_, v)| *v)
            .sum();
        assert_eq!(db, *n, "{g}");
    }
    // The rollups of every layer equal a recount from the raw rows (issue 22).
    assert_eq!(rollup_mismatches(&pg), Some(0), "rollups equal a recount");
    // Alerts once, care notices once, daily counts, heartbeats, rejects.
    let one = |sql: &str| pg.psql(sql).unwrap().trim().to_string();
    assert_eq!(
        one("SELECT count(*) FROM alerts WHERE gateway LIKE 'syn-%'"),
        "150"
    );
    assert_eq!(one("SELECT count(*) FROM open_care_notices"), "15");
    assert_eq!(
        one("SELECT count(*) FROM daily WHERE gateway LIKE 'syn-%'"),
        "150"
    );
    assert_eq!(
        one("SELECT count(*) FROM gateway_state WHERE gateway LIKE 'syn-%' AND NOT silent"),
        "150"
    );
    assert_eq!(one("SELECT count(*) FROM rejects"), "3");
    assert_eq!(
        one("SELECT count(*) FROM summary_parts WHERE gateway LIKE 'syn-%' AND rev = 0"),
        "0"
    );
    assert!(
        one("SELECT count(*) FROM counts_hourly")
            .parse::<i64>()
            .unwrap()
            > 0
    );
    // The state by epoch: every live gateway online at the epoch it persisted, whatever order
    // the wills, retained states and heartbeats of the broker restart and the receiver kill
    // arrived in.
    let all_online = |pg: &Postgres, dirs: &[std::path::PathBuf]| {
        let st = fleet_state(pg);
        st.len() == 20
            && dirs.iter().enumerate().all(|(i, d)| {
                st.get(&format!("fleet-{i:02}")) == Some(&("online".to_string(), epoch_on_disk(d)))
            })
    };
    assert!(
        wait_until(Duration::from_secs(60), || all_online(&pg, &dirs)),
        "gateway_state after a broker restart and a receiver kill -9: {:?}\nreceivers:\n{}",
        fleet_state(&pg),
        tail(&rlog, 40)
    );
    // A gateway killed with -9 (its will: offline at its epoch), one stopped cleanly (its own
    // offline), then the district broker restarted again: the other 18 come back online at a
    // higher epoch, the two stay offline.
    site.gateway(0).kill9();
    let (stopped, _) = site.gateway(1).term();
    assert!(stopped.success());
    let before: BTreeMap<String, (String, i64)> = fleet_state(&pg);
    assert!(
        wait_until(Duration::from_secs(60), || {
            let st = fleet_state(&pg);
            ["fleet-00", "fleet-01"]
                .iter()
                .all(|g| st.get(*g).is_some_and(|(s, _)| s == "offline"))
        }),
        "offline after kill -9 and a clean stop: {:?}",
        fleet_state(&pg)
    );
    site.district_mut().restart();
    let want_after = |st: &BTreeMap<String, (String, i64)>| {
        (0..20).all(|i| {
            let g = format!("fleet-{i:02}");
            let (s, e) = st.get(&g).cloned().unwrap_or_default();
            if i < 2 {
                s == "offline" && e == epoch_on_disk(&dirs[i])
            } else {
                s == "online" && e == epoch_on_disk(&dirs[i]) && e > before[&g].1
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(60), || want_after(&fleet_state(&pg))),
        "gateway_state after the second broker restart: {:?}\nreceivers:\n{}",
        fleet_state(&pg),
        tail(&rlog, 40)
    );
    // Every message the restarts queued is in (nothing left unacknowledged at the receivers),
    // and the state still holds: no stale message arriving late turned it.
    assert!(
        wait_until(Duration::from_secs(30), || metric(
            h1,
            "zhian_district_oldest_unacked_seconds"
        ) < 1.0
            && metric(h2, "zhian_district_oldest_unacked_seconds") < 1.0
            && metric(h1, "zhian_district_gateways{state=\"offline\"}") == 2.0),
        "receivers drained"
    );
    assert!(want_after(&fleet_state(&pg)), "{:?}", fleet_state(&pg));
    assert_eq!(healthz(h1).map(|h| h.0), Some(200));
    assert!(
        metric(
            h1,
            "zhian_district_messages_total{topic_kind=\"summary\",outcome=\"kept\"}"
        ) + metric(
            h2,
            "zhian_district_messages_total{topic_kind=\"summary\",outcome=\"kept\"}"
        ) > 0.0
    );
    for i in 2..20 {
        site.gateway(i).term();
    }
    drop((r1, r2));
}

/// Found by a break-it run: a NUL in a string, a time PostgreSQL cannot store, and counts that
/// overflow a bigint each stopped a receiver for good (the batch retried for ever, or a panic),
/// and the broker dropped what queued behind it. Now each is a reject and the next message lands.
#[test]
fn poison_messages_are_rejects_not_a_stalled_receiver() {
    // The district side alone: its broker, PostgreSQL and a receiver.
    let site = Site::build("poison")
        .no_device_broker()
        .persistent_district()
        .no_collector()
        .no_gateway()
        .start();
    let pg = Postgres::start(&site.root.join("pg"), free_port());
    let district = site.district();
    let cfg = site.root.join("r.toml");
    let hp = receiver_config(&cfg, &pg.url(), district.port, "zhian-district-p");
    let log = site.root.join("r.log");
    let mut r = start_receiver(&cfg, &log);
    wait_healthy(hp, &log);
    let mut p = Publisher::connect(district.port, "poison-pub");
    let max = i64::MAX;
    for (leaf, body) in [
        ("alert", r#"{"schema":"zhian.alert.v1","gateway":"p1","kind":"camera","device":"cam\u0000x","action":"intrusion","id":"a1","ts":"2026-11-30T00:00:00Z"}"#.to_string()),
        ("alert", r#"{"schema":"zhian.alert.v1","gateway":"p1","kind":"camera","device":"cam","action":"intrusion","id":"a2","ts":10000000000000000}"#.to_string()),
        ("heartbeat", r#"{"schema":"zhian.heartbeat.v1","gateway":"p1","note":"a\u0000b"}"#.to_string()),
        ("summary", format!(r#"{{"schema":"zhian.summary.v1","gateway":"p1","window":{{"start":"2026-11-30T00:00:00Z","secs":60}},"rev":0,"counts":[{{"kind":"access","device":"d","action":"entry","result":"ok","n":{max}}},{{"kind":"access","device":"d","action":"entry","result":"ok","n":{max}}}]}}"#)),
    ] {
        p.send(&format!("{PREFIX}/p1/{leaf}"), body.into_bytes());
    }
    p.send(
        &format!("{PREFIX}/p1/summary"),
        summary("p1", 1_796_000_000_000, 0, None, &[("door-1", 7)]),
    );
    p.wait_all_acked(Duration::from_secs(10));
    assert!(
        wait_until(Duration::from_secs(30), || in_db(&pg).values().sum::<i64>()
            == 7),
        "{}",
        tail(&log, 20)
    );
    assert_eq!(pg.psql("SELECT count(*) FROM rejects").unwrap().trim(), "4");
    assert!(r.0.try_wait().unwrap().is_none(), "the receiver runs on");
}
