//! Fleet configuration through real brokers and the real binary (contract: "Fleet
//! configuration"): `fleet keygen`, `fleet push` with canaries to 20 gateways, a change that
//! breaks the canary rolled back by the box itself while the rest never get it, refused
//! changes (forged, replayed, forbidden keys, invalid), `kill -9` during probation, and `fleet
//! diag` with no subject or secret in its bytes. Counts stay exact throughout.
//!
//! The gateways run the box binary (`common::gateway_bin()`); `fleet push` and `fleet diag`
//! run at the district, so they run the full build (`CARGO_BIN_EXE_zhian-gateway`).

use crate::common;

use common::*;
use rumqttc::{Client, Event as MqttEvent, Incoming, MqttOptions, QoS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use zhian_gateway::config::{CareResident, Dur, Secret};

/// `zhian-gateway fleet ...` with the district build, killed after `timeout` (a failure).
fn fleet_cli(args: &[&str], scratch: &Path, timeout: Duration) -> CliOutput {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (out, err) = (
        scratch.join(format!("fleet-{n}.stdout")),
        scratch.join(format!("fleet-{n}.stderr")),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_zhian-gateway"))
        .arg("fleet")
        .args(args)
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .expect("spawn zhian-gateway fleet");
    let status = wait_child(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        panic!(
            "fleet {args:?} still running after {timeout:?}:\n{}",
            tail(&err, 40)
        )
    });
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    CliOutput {
        status,
        stdout: read(&out),
        stderr: read(&err),
    }
}

/// `fleet keygen --out dir`: (private, public).
fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let out = fleet_cli(
        &["keygen", "--out", dir.to_str().unwrap()],
        dir.parent().unwrap(),
        Duration::from_secs(15),
    );
    assert!(out.status.success(), "{}", out.stderr);
    (dir.join("fleet.key"), dir.join("fleet.pub"))
}

/// A district.toml whose `[mqtt]` names the district broker (all `fleet push` reads).
fn district_toml(dir: &Path, port: u16) -> PathBuf {
    let p = dir.join("district.toml");
    fs::write(
        &p,
        format!(
            "[district]\ndatabase_url = \"postgres://unused@127.0.0.1:1/x\"\n\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic_prefix = \"zhian/district\"\nclient_id = \"fleet-operator\"\n"
        ),
    )
    .unwrap();
    p
}

/// Publish `payload` retained at QoS 1 and wait for its PUBACK.
fn publish_retained(port: u16, topic: &str, payload: Vec<u8>) {
    let mut opts = MqttOptions::new(format!("fleet-test-{}", now_ms()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(opts, 10);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for ev in conn.iter() {
        assert!(Instant::now() < deadline, "no PUBACK for {topic}");
        if let Ok(MqttEvent::Incoming(Incoming::PubAck(_))) = ev {
            break;
        }
    }
    let _ = client.disconnect();
}

/// A `config/set` signed with `key` for `gateway`.
fn signed_set(key: &Path, gateway: &str, serial: u64, fragment: &str) -> Vec<u8> {
    let k = zhian_common::fleet_key::SigningKey::load(key).unwrap();
    let sig = k.sign(&zhian_proto::config_signed_bytes(gateway, serial, fragment));
    serde_json::to_vec(&serde_json::json!({
        "schema": "zhian.config.v1", "serial": serial, "fragment": fragment, "sig": sig,
    }))
    .unwrap()
}

/// The `config/state` reports of `gateway` the collector saw: (serial, state, reason).
fn reports(up: &Upstream, gateway: &str) -> Vec<(u64, String, Option<String>)> {
    let topic = format!("zhian/district/{gateway}/config/state");
    up.messages()
        .into_iter()
        .filter(|m| m.topic == topic)
        .map(|m| {
            let v = m.json();
            (
                v["serial"].as_u64().unwrap(),
                v["state"].as_str().unwrap().to_string(),
                v["reason"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// When the collector first saw `gateway` report `state` for `serial`.
fn reported_at(up: &Upstream, gateway: &str, serial: u64, state: &str) -> Option<i64> {
    let topic = format!("zhian/district/{gateway}/config/state");
    up.messages()
        .into_iter()
        .filter(|m| m.topic == topic)
        .find(|m| {
            let v = m.json();
            v["serial"] == serial && v["state"] == state
        })
        .map(|m| m.at_ms)
}

/// Waits for `gateway` to report `state` for `serial`; returns its reason.
fn wait_report(up: &Upstream, gw: &Gateway, serial: u64, state: &str) -> Option<String> {
    let mut found = None;
    let ok = wait_until(DEADLINE, || {
        found = reports(up, &gw.config.gateway.id)
            .into_iter()
            .find(|(s, st, _)| *s == serial && st == state);
        found.is_some()
    });
    assert!(
        ok,
        "{}: no {state} report for serial {serial}; reports {:?}\nlog:\n{}",
        gw.name,
        reports(up, &gw.config.gateway.id),
        gw.tail(40)
    );
    found.unwrap().2
}

/// Per gateway, the district's count: the highest rev of each window, summed.
fn district_totals(up: &Upstream) -> BTreeMap<String, i64> {
    let mut best: BTreeMap<(String, String), (i64, i64)> = BTreeMap::new();
    for m in up.messages() {
        let Some(rest) = m.topic.strip_prefix("zhian/district/") else {
            continue;
        };
        let Some(gw) = rest.strip_suffix("/summary") else {
            continue;
        };
        let v = m.json();
        let rev = v["rev"].as_i64().unwrap();
        let n: i64 = v["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["n"].as_i64().unwrap())
            .sum();
        let key = (gw.to_string(), v["window"]["start"].to_string());
        let e = best.entry(key).or_insert((-1, 0));
        if rev > e.0 {
            *e = (rev, n);
        }
    }
    let mut out = BTreeMap::new();
    for ((gw, _), (_, n)) in best {
        *out.entry(gw).or_insert(0) += n;
    }
    out
}

fn fleet_json(dir: &Path) -> Value {
    serde_json::from_slice(&fs::read(dir.join("fleet.json")).unwrap()).unwrap()
}

const GOOD: &str = "[alerts]\nactions = [\"loitering\", \"intrusion\"]\n\n[health]\nsilence = \"20m\"\nlink_grace = \"2s\"\n";

#[test]
fn a_canary_rollout_reaches_20_gateways_and_a_breaking_change_rolls_back_on_the_canary_alone() {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[t+{:5.1} s] {what}", t0.elapsed().as_secs_f64());
    let b = Site::build("fleet-rollout");
    let keys = b.root().join("keys");
    let (key, publ) = keygen(&keys);
    let mut site = b
        .persistent_device()
        .status()
        .no_gateway()
        .config(|c| {
            c.fleet.trust = Some(publ.clone());
            c.fleet.probation = Dur::secs(4);
            c.health.link_grace = Dur::secs(2);
        })
        .start();
    let dport = site.district().port;
    // The district: PostgreSQL and a receiver; its district.toml is what `fleet push` reads.
    let pg = common::pg::Postgres::start(&site.root.join("pg"), free_port());
    let district = site.root.join("district.toml");
    let health = common::district::receiver_config(&district, &pg.url(), dport, "fleet-r1");
    let rlog = site.root.join("receiver.log");
    let _receiver = common::district::start_receiver(&district, &rlog);
    common::district::wait_healthy(health, &rlog);
    let n = 20;
    for i in 0..n {
        site.add_gateway(&format!("gw{i}"), |c| {
            c.gateway.id = format!("fleet-{i:02}");
            c.gateway.street = Some(
                if i < 10 {
                    "富春街道"
                } else {
                    "银湖街道"
                }
                .into(),
            );
            c.gateway.community = Some(format!("社区{}", i % 4));
            c.mqtt.client_id = Some(format!("fleet-{i:02}-dev"));
            c.mqtt.topics = vec![format!("g{i}/+/+")];
            // One page (the canary's): 20 ports picked free and bound later race the ephemeral
            // ports of everything else on the machine.
            c.status.enabled = i == 0;
        });
    }
    let ids: Vec<String> = (0..n).map(|i| format!("fleet-{i:02}")).collect();
    let up = site.upstream();
    eventually("all 20 gateways online upstream", || {
        ids.iter().all(|g| {
            up.messages().iter().any(|m| {
                m.topic == format!("zhian/district/{g}/status") && m.text().contains("online")
            })
        })
    });
    step("20 gateways online");

    let mut devices = Publisher::connect(site.device().port, "fleet-devices");
    let mut sent: BTreeMap<String, i64> = BTreeMap::new();
    let round = |tag: &str, devices: &mut Publisher, sent: &mut BTreeMap<String, i64>| {
        for i in 0..n {
            for k in 0..5 {
                let e = Event::new("access", "door-1", &format!("{tag}-{k}"), "entry");
                devices.send(&format!("g{i}/access/door-1"), e.payload());
                *sent.entry(format!("fleet-{i:02}")).or_insert(0) += 1;
            }
        }
        devices.wait_all_acked(Duration::from_secs(30));
    };
    round("before", &mut devices, &mut sent);

    // A good change (live sections only) to all, two canaries first.
    let good = site.root.join("good.toml");
    fs::write(&good, GOOD).unwrap();
    step("push serial 100 (alerts.actions, [health]) --all --canary 2");
    let out = fleet_cli(
        &[
            "push",
            "--config",
            district.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--fragment",
            good.to_str().unwrap(),
            "--all",
            "--canary",
            "2",
            "--serial",
            "100",
            "--timeout",
            "3m",
        ],
        &site.root,
        Duration::from_secs(240),
    );
    assert!(
        out.status.success(),
        "push failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), n, "{}", out.stdout);
    assert!(
        lines.iter().all(|l| l.ends_with(" applied")),
        "{}",
        out.stdout
    );
    // The canaries applied before anyone else was sent the change.
    let canaries_done = ["fleet-00", "fleet-01"]
        .iter()
        .map(|g| reported_at(up, g, 100, "applied").expect("canary applied"))
        .max()
        .unwrap();
    let first_rest = up
        .messages()
        .iter()
        .filter(|m| {
            m.topic.ends_with("/config/set")
                && !m.topic.contains("fleet-00")
                && !m.topic.contains("fleet-01")
        })
        .map(|m| m.at_ms)
        .min()
        .expect("the rest were sent the change");
    assert!(
        first_rest >= canaries_done,
        "the rest got it before the canaries applied"
    );
    step(&format!(
        "canaries applied; rest sent {} ms later; all 20 applied",
        first_rest - canaries_done
    ));
    let s = site
        .gateway(0)
        .wait_for_status("the fleet serial in force", |s| {
            s["config"]["serial"] == 100
        });
    assert_eq!(s["config"]["source"], "fleet");
    assert_eq!(s["config"]["state"], "applied");
    assert!(s["config"]["keys"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k == "alerts.actions"));
    for g in &ids {
        assert!(reported_at(up, g, 100, "applied").is_some(), "{g}");
    }
    // Live: loitering is an alert now.
    let e = Event::new("camera", "cam-1", "loiter-1", "loitering");
    devices.send("g5/camera/cam-1", e.payload());
    *sent.get_mut("fleet-05").unwrap() += 1;
    eventually("a loitering alert from fleet-05", || {
        up.messages()
            .iter()
            .any(|m| m.topic == "zhian/district/fleet-05/alert" && m.text().contains("loiter-1"))
    });
    round("applied", &mut devices, &mut sent);

    // A change that validates but breaks the box: the site broker at a dead port.
    let dead = free_port();
    let bad = site.root.join("bad.toml");
    fs::write(
        &bad,
        format!("{GOOD}\n[mqtt]\nurl = \"mqtt://127.0.0.1:{dead}\"\n"),
    )
    .unwrap();
    step("push serial 101 (mqtt.url at a dead port) --all --canary 1");
    let handle = {
        let (district, key, bad, root) = (
            district.clone(),
            key.clone(),
            bad.clone(),
            site.root.clone(),
        );
        std::thread::spawn(move || {
            fleet_cli(
                &[
                    "push",
                    "--config",
                    district.to_str().unwrap(),
                    "--key",
                    key.to_str().unwrap(),
                    "--fragment",
                    bad.to_str().unwrap(),
                    "--all",
                    "--canary",
                    "1",
                    "--serial",
                    "101",
                    "--timeout",
                    "3m",
                ],
                &root,
                Duration::from_secs(240),
            )
        })
    };
    // Events while the canary runs the bad config: its device session keeps them.
    wait_report(up, site.gateway(0), 101, "probation");
    step("canary fleet-00 restarted on serial 101, on probation");
    round("bad", &mut devices, &mut sent);
    let out = handle.join().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    let reason = wait_report(up, site.gateway(0), 101, "rolled_back").unwrap_or_default();
    assert!(
        reason.contains("site broker") && reason.contains(&dead.to_string()),
        "{reason}"
    );
    step(&format!("canary rolled back: {reason}"));
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert!(
        lines[0].starts_with("fleet-00 rolled_back"),
        "{}",
        out.stdout
    );
    assert!(
        lines[1..].iter().all(|l| l.ends_with(" not_sent")),
        "{}",
        out.stdout
    );
    assert!(out.stderr.contains("rollout stopped"), "{}", out.stderr);
    // The other 19 never got it: their retained change is still serial 100.
    for g in &ids[1..] {
        let m = fetch_retained(
            dport,
            &format!("zhian/district/{g}/config/set"),
            Duration::from_secs(10),
        )
        .expect("retained change");
        assert_eq!(m.json()["serial"], 100, "{g}");
    }
    assert!(reports(up, "fleet-01").iter().all(|(s, _, _)| *s == 100));
    let s =
        site.gateway(0)
            .wait_for_status("the canary back on serial 100 and its site link", |s| {
                s["config"]["serial"] == 100
                    && s["config"]["rolled_back"]["serial"] == 101
                    && s["links"]["site"]["connected"] == true
            });
    assert_eq!(s["config"]["state"], "applied");
    let state = fleet_json(site.gateway(0).data_dir());
    assert!(state["trial"].is_null(), "{state}");
    assert_eq!(state["applied"]["serial"], 100);
    // What the property manager's page shows: serial 100 in force, 101 rolled back and why.
    let page = http(site.gateway(0).status_port(), "GET", "/", None)
        .unwrap()
        .text();
    for want in [
        "data-config-serial=\"100\"",
        "已生效",
        "已自动回退的版本",
        "区级下发",
        &dead.to_string(),
    ] {
        assert!(page.contains(want), "{want} not on the page");
    }
    let metrics = http(site.gateway(0).status_port(), "GET", "/metrics", None)
        .unwrap()
        .text();
    for want in [
        "zhian_config_serial 100",
        "zhian_config_rolled_back_serial 101",
        "zhian_config_probation 0",
    ] {
        assert!(metrics.lines().any(|l| l == want), "{want} not in /metrics");
    }

    // No event lost anywhere, the canary included.
    eventually("every gateway's events counted at the district", || {
        district_totals(up) == sent
    });
    step("counts exact on all 20 (canary included)");
    // The district keeps the reports: 20 applied serial 100, the canary's 101 rolled back.
    let q = |sql: &str| pg.psql(sql).unwrap_or_default().trim().to_string();
    eventually("the receiver kept every report", || {
        q("SELECT string_agg(state || ':' || n, ',' ORDER BY state) FROM (SELECT serial || '/' || state AS state, count(*) AS n FROM config_rollouts GROUP BY 1) x")
            == "100/applied:20,101/rolled_back:1"
            && q("SELECT count(*) FROM gateway_state WHERE config_serial = 100") == "20"
    });
    let why = q("SELECT gateway || ' ' || reason FROM config_rollouts WHERE serial = 101");
    assert!(why.starts_with("fleet-00 site broker"), "{why}");
    let log = site.gateway(0).log_text();
    assert!(
        !log.contains("stopped unexpectedly"),
        "{}",
        site.gateway(0).tail(40)
    );
    site.term_daemon();
}

#[test]
fn forged_replayed_forbidden_and_invalid_changes_are_rejected_and_nothing_applied() {
    let b = Site::build("fleet-reject");
    let (key, publ) = keygen(&b.root().join("keys"));
    let (other, _) = keygen(&b.root().join("other"));
    let site = b
        .status()
        .config(|c| {
            c.fleet.trust = Some(publ.clone());
            c.fleet.probation = Dur::secs(1);
        })
        .start();
    let (dport, up, gw) = (site.district().port, site.upstream(), site.gw());
    let district = district_toml(&site.root, dport);
    let frag = site.root.join("a.toml");
    fs::write(&frag, "[alerts]\nactions = [\"loitering\"]\n").unwrap();
    let push = |key: &Path, serial: &str, fragment: &Path| {
        fleet_cli(
            &[
                "push",
                "--config",
                district.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "--fragment",
                fragment.to_str().unwrap(),
                "--gateway",
                GATEWAY_ID,
                "--serial",
                serial,
                "--timeout",
                "60s",
            ],
            &site.root,
            Duration::from_secs(90),
        )
    };
    let out = push(&key, "10", &frag);
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.stdout.trim(), "test-gw applied");

    // Forged: signed by a key the box does not trust.
    let other_frag = site.root.join("b.toml");
    fs::write(&other_frag, "[alerts]\nactions = [\"intrusion\"]\n").unwrap();
    let out = push(&other, "11", &other_frag);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(
        out.stdout.contains("rejected signature does not verify"),
        "{}",
        out.stdout
    );
    // Replayed: a serial not above the one applied.
    let out = push(&key, "10", &other_frag);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.contains("rejected serial 10 is not above 10"),
        "{}",
        out.stdout
    );
    // Forbidden keys: push refuses them itself ...
    let pw = site.root.join("pw.toml");
    fs::write(&pw, "[upstream]\npassword = \"hunter2\"\n").unwrap();
    let out = push(&key, "12", &pw);
    assert_eq!(out.status.code(), Some(78), "{}", out.stderr);
    assert!(out.stderr.contains("upstream.password"), "{}", out.stderr);
    // ... and the box refuses them when signed and sent anyway.
    let topic = format!("zhian/district/{GATEWAY_ID}/config/set");
    for (serial, fragment, named) in [
        (
            12,
            "[upstream]\npassword = \"hunter2\"\n",
            "upstream.password",
        ),
        (13, "[gateway]\nid = \"someone-else\"\n", "gateway.id"),
        (
            14,
            "[aggregate]\nwindow = \"0s\"\n",
            "check-config refuses it: aggregate.window",
        ),
    ] {
        publish_retained(
            dport,
            &topic,
            signed_set(&key, GATEWAY_ID, serial, fragment),
        );
        let why = wait_report(up, gw, serial, "rejected").unwrap_or_default();
        assert!(why.contains(named), "{serial}: {why}");
    }
    assert!(up
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with("/config/state"))
        .all(|m| !m.text().contains("hunter2")));
    // A change signed for another gateway, replayed to this one.
    publish_retained(
        dport,
        &topic,
        signed_set(&key, "another-gw", 15, "[alerts]\nactions = []\n"),
    );
    let why = wait_report(up, gw, 15, "rejected").unwrap_or_default();
    assert!(why.contains("signature"), "{why}");

    // Nothing applied: serial 10 in force, its alert actions running.
    let s = gw.wait_for_status("the last rejection shown", |s| {
        s["config"]["rejected"]["serial"] == 15
    });
    assert_eq!(s["config"]["serial"], 10);
    assert_eq!(s["config"]["state"], "applied");
    let state = fleet_json(gw.data_dir());
    assert_eq!(state["applied"]["serial"], 10);
    assert_eq!(state["last_serial"], 10);
    assert!(state["trial"].is_null());
    let mut p = site.publisher();
    let e = Event::new("camera", "cam-1", "l-1", "loitering");
    p.send(&e.topic(), e.payload());
    eventually("loitering (serial 10's action) alerts", || {
        up.on("alert").iter().any(|m| m.text().contains("l-1"))
    });
    // check-config shows the overlay and which keys came from it.
    let out = check_config(&site.config_path(), &site.root);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("# fleet serial 10 (applied) overlays the file: alerts.actions"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("actions = [\"loitering\"]"),
        "{}",
        out.stdout
    );
    // The retained rejected change delivered again (a restart) is not reported again.
    let before = reports(up, GATEWAY_ID).len();
    site.term_daemon();
    site.start_daemon();
    eventually("the state republished after the restart", || {
        reports(up, GATEWAY_ID).len() > before
    });
    let s = gw.wait_for_status("serial 10 after the restart", |s| {
        s["config"]["serial"] == 10
    });
    assert_eq!(s["config"]["state"], "applied");
    assert_eq!(reports(up, GATEWAY_ID).last().unwrap().0, 15);
    site.term_daemon();
}

#[test]
fn kill_9_during_probation_finishes_the_probation_or_rolls_back_never_half_applied() {
    let b = Site::build("fleet-kill9");
    let (key, publ) = keygen(&b.root().join("keys"));
    let site = b
        .persistent_device()
        .status()
        .config(|c| {
            c.fleet.trust = Some(publ.clone());
            c.fleet.probation = Dur::secs(6);
            c.health.link_grace = Dur::secs(2);
        })
        .start();
    let (dport, up, gw) = (site.district().port, site.upstream(), site.gw());
    let topic = format!("zhian/district/{GATEWAY_ID}/config/set");
    let mut p = site.publisher();
    let mut sent = 0i64;
    let mut burst = |p: &mut Publisher, tag: &str| {
        for k in 0..10 {
            let e = Event::new("access", "door-1", &format!("{tag}-{k}"), "entry");
            p.send(&e.topic(), e.payload());
            sent += 1;
        }
        p.wait_all_acked(Duration::from_secs(30));
    };
    burst(&mut p, "a");

    // A live change: killed on probation, the next start finishes the probation.
    publish_retained(
        dport,
        &topic,
        signed_set(
            &key,
            GATEWAY_ID,
            20,
            "[alerts]\nactions = [\"loitering\"]\n",
        ),
    );
    wait_report(up, gw, 20, "probation");
    site.kill9_daemon();
    burst(&mut p, "b");
    site.start_daemon();
    wait_report(up, gw, 20, "applied");
    let state = fleet_json(gw.data_dir());
    assert_eq!(state["applied"]["serial"], 20);
    assert!(state["trial"].is_null());

    // A change that takes a restart and breaks the site link: killed on probation, the next
    // start rolls it back.
    let dead = free_port();
    publish_retained(
        dport,
        &topic,
        signed_set(
            &key,
            GATEWAY_ID,
            21,
            &format!(
                "[alerts]\nactions = [\"loitering\"]\n[mqtt]\nurl = \"mqtt://127.0.0.1:{dead}\"\n"
            ),
        ),
    );
    wait_report(up, gw, 21, "probation");
    site.kill9_daemon();
    burst(&mut p, "c");
    site.start_daemon();
    let why = wait_report(up, gw, 21, "rolled_back").unwrap_or_default();
    assert!(why.contains("site broker"), "{why}");
    let s = gw.wait_for_status("back on serial 20 with the site link up", |s| {
        s["config"]["serial"] == 20 && s["links"]["site"]["connected"] == true
    });
    assert_eq!(s["config"]["rolled_back"]["serial"], 21);
    let state = fleet_json(gw.data_dir());
    assert!(state["trial"].is_null(), "{state}");
    assert_eq!(state["applied"]["serial"], 20);
    eventually("every event counted once", || {
        up.window_totals().values().sum::<u64>() == sent as u64
    });
    site.term_daemon();
}

#[test]
fn fleet_diag_answers_a_signed_request_with_no_subject_or_secret() {
    let b = Site::build("fleet-diag");
    let (key, publ) = keygen(&b.root().join("keys"));
    let (other, _) = keygen(&b.root().join("other"));
    let pwfile = b.root().join("passwd");
    fs::write(&pwfile, "").unwrap();
    let made = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&pwfile)
        .args(["gateway", "site-Secret-77"])
        .status()
        .expect("mosquitto_passwd");
    assert!(made.success());
    let site = b
        .device_broker_with(&format!(
            "allow_anonymous false\npassword_file {}",
            pwfile.display()
        ))
        .status()
        .config(|c| {
            c.fleet.trust = Some(publ.clone());
            c.mqtt.username = Some("gateway".into());
            c.mqtt.password = Some(Secret("site-Secret-77".into()));
            c.care.residents = vec![CareResident {
                alias: "3-2-601".into(),
                subject: Some(Secret("card:CARE-SUBJECT-9".into())),
                pseudonym: None,
                silence: Dur::secs(3600),
                quiet: None,
            }];
        })
        .start();
    let (dport, gw) = (site.district().port, site.gw());
    let mut p = Publisher::connect_with_credentials(
        site.device().port,
        "diag-devices",
        "gateway",
        "site-Secret-77",
    );
    for k in 0..5 {
        let e = Event::new("access", "door-1", &format!("d-{k}"), "entry")
            .subject(&format!("card:SUBJ-DIAG-{k}"));
        p.send(&e.topic(), e.payload());
    }
    // Rejected payloads carrying a subject.
    p.send(
        "zhian/access/door-1",
        b"{\"id\": 1, \"subject\": \"card:SUBJ-BAD\"".to_vec(),
    );
    p.send(
        "zhian/access/door-1",
        b"{\"id\":\"x\",\"ts\":\"never\",\"action\":\"entry\",\"subject\":\"face:SUBJ-BAD-2\"}"
            .to_vec(),
    );
    p.wait_all_acked(Duration::from_secs(30));
    gw.wait_for_status("the events taken", |s| s["counters"]["accepted"] == 5);
    let district = district_toml(&site.root, dport);
    let out = fleet_cli(
        &[
            "diag",
            "--config",
            district.to_str().unwrap(),
            "--gateway",
            GATEWAY_ID,
            "--key",
            key.to_str().unwrap(),
        ],
        &site.root,
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.stderr);
    let reply: Value = serde_json::from_str(&out.stdout).expect("the reply is JSON");
    assert_eq!(reply["gateway"], GATEWAY_ID);
    assert_eq!(reply["status"]["gateway"]["id"], GATEWAY_ID);
    assert_eq!(reply["status"]["counters"]["accepted"], 5);
    let log = reply["log"].as_array().unwrap();
    assert!(!log.is_empty() && log.len() <= 200, "{} lines", log.len());
    assert!(log
        .iter()
        .any(|l| l.as_str().unwrap().contains("zhian-gateway running")));
    for secret in ["site-Secret-77", "CARE-SUBJECT", "SUBJ", "card:", "face:"] {
        assert!(
            !out.stdout.contains(secret),
            "{secret} in the diag reply:\n{}",
            out.stdout
        );
    }
    // A request signed with another key is not answered.
    let out = fleet_cli(
        &[
            "diag",
            "--config",
            district.to_str().unwrap(),
            "--gateway",
            GATEWAY_ID,
            "--key",
            other.to_str().unwrap(),
            "--timeout",
            "3s",
        ],
        &site.root,
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(out.stdout.is_empty());
    eventually("the refused request logged", || {
        gw.log_text().contains("diag request refused")
    });
    site.term_daemon();
}

#[test]
fn a_change_that_takes_a_restart_restarts_in_place_and_tells_systemd() {
    use std::os::unix::net::UnixDatagram;
    let b = Site::build("fleet-systemd");
    let (key, publ) = keygen(&b.root().join("keys"));
    let sock_path = b.root().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock_env = sock_path.display().to_string();
    let site = b
        .env("NOTIFY_SOCKET", &sock_env)
        .status()
        .config(|c| {
            c.fleet.trust = Some(publ.clone());
            c.fleet.probation = Dur::secs(1);
        })
        .start();
    let (dport, up, gw) = (site.district().port, site.upstream(), site.gw());
    let pid = gw.pid();
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    let mut recv = |got: &mut Vec<String>| {
        while let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    eventually("READY=1", || {
        recv(&mut got);
        got.iter().any(|m| m.contains("READY=1"))
    });
    // `upstream.heartbeat` is not live: the box restarts itself to apply it.
    publish_retained(
        dport,
        &format!("zhian/district/{GATEWAY_ID}/config/set"),
        signed_set(&key, GATEWAY_ID, 30, "[upstream]\nheartbeat = \"3s\"\n"),
    );
    wait_report(up, gw, 30, "applied");
    // Every step reported, `applying` too (sent before the restart).
    let steps: Vec<String> = reports(up, GATEWAY_ID)
        .into_iter()
        .filter(|r| r.0 == 30)
        .map(|r| r.1)
        .collect();
    assert_eq!(steps, ["applying", "probation", "applied"]);
    recv(&mut got);
    let readies = got.iter().filter(|m| m.contains("READY=1")).count();
    assert_eq!(readies, 2, "{got:?}");
    assert!(got.iter().any(|m| m.contains("RELOADING=1")), "{got:?}");
    assert!(!got.iter().any(|m| m.contains("STOPPING=1")), "{got:?}");
    // The same process, running the change.
    assert_eq!(gw.pid(), pid);
    assert!(gw.running());
    assert!(gw.log_text().contains("restarting in place"));
    assert!(
        !gw.log_text().contains("stopped unexpectedly"),
        "{}",
        gw.tail(30)
    );
    let s = gw.wait_for_status("serial 30 in force", |s| s["config"]["serial"] == 30);
    assert_eq!(s["config"]["keys"][0], "upstream.heartbeat");
    site.term_daemon();
}

#[test]
fn changes_that_would_strand_a_box_are_refused_or_rolled_back() {
    let b = Site::build("fleet-strand");
    let (key, publ) = keygen(&b.root().join("keys"));
    let site = b
        .status()
        .config(|c| {
            c.fleet.trust = Some(publ.clone());
            c.fleet.probation = Dur::secs(4);
            c.health.link_grace = Dur::secs(30);
        })
        .start();
    let (dport, up, gw) = (site.district().port, site.upstream(), site.gw());
    let topic = format!("zhian/district/{GATEWAY_ID}/config/set");
    let set = |serial: u64, fragment: &str| {
        publish_retained(
            dport,
            &topic,
            signed_set(&key, GATEWAY_ID, serial, fragment),
        )
    };
    // Keys that would cut the box off or point it at another's session: refused.
    for (serial, fragment, named) in [
        (1, "[upstream]\nenabled = false\n", "upstream.enabled"),
        (
            2,
            "[upstream]\ntopic_prefix = \"elsewhere\"\n",
            "upstream.topic_prefix",
        ),
        (
            3,
            "[upstream]\nclient_id = \"another-gw\"\n",
            "upstream.client_id",
        ),
        (4, "[privacy]\nsubjects = \"plain\"\n", "privacy.subjects"),
    ] {
        set(serial, fragment);
        let why = wait_report(up, gw, serial, "rejected").unwrap_or_default();
        assert!(why.contains(named), "{serial}: {why}");
    }
    // A change the daemon cannot start on (its status port taken): rolled back at once.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    set(
        5,
        &format!("[status]\nlisten = \"127.0.0.1:{busy_port}\"\n"),
    );
    let why = wait_report(up, gw, 5, "rolled_back").unwrap_or_default();
    assert!(why.contains("could not start on it"), "{why}");
    let s = gw.wait_for_status("back on the file, rollback shown", |s| {
        s["config"]["rolled_back"]["serial"] == 5
    });
    assert_eq!(s["config"]["source"], "file");
    drop(busy);
    // A change that lengthens link_grace past the probation and cuts the district link: the
    // probation judges the link with at most half of itself, and rolls it back.
    let dead = free_port();
    set(
        6,
        &format!(
            "[health]\nlink_grace = \"1h\"\n\n[upstream]\nurl = \"mqtt://127.0.0.1:{dead}\"\n"
        ),
    );
    let why = wait_report(up, gw, 6, "rolled_back").unwrap_or_default();
    assert!(
        why.contains("district broker") && why.contains(&dead.to_string()),
        "{why}"
    );
    gw.wait_for_status("the district link back", |s| {
        s["links"]["district"]["connected"] == true && s["config"]["rolled_back"]["serial"] == 6
    });
    assert!(gw.running());
    site.term_daemon();
}

#[test]
fn a_forged_serial_cannot_push_the_next_one_out_of_reach_and_push_reaches_400_boxes() {
    let b = Site::build("fleet-scale");
    let (key, publ) = keygen(&b.root().join("keys"));
    let site = b
        .config(|c| {
            c.fleet.trust = Some(publ.clone());
            c.fleet.probation = Dur::secs(1);
        })
        .start();
    let (dport, up, gw) = (site.district().port, site.upstream(), site.gw());
    let district = district_toml(&site.root, dport);
    eventually("the gateway online", || {
        up.latest_status().as_deref() == Some("online")
    });
    // An unsigned change quoting a huge serial: refused, and its `rejected` report quotes it.
    let topic = format!("zhian/district/{GATEWAY_ID}/config/set");
    publish_retained(
        dport,
        &topic,
        br#"{"schema":"zhian.config.v1","serial":18446744073709551614,"fragment":"","sig":"AAAA"}"#
            .to_vec(),
    );
    wait_report(up, gw, 18446744073709551614, "rejected");
    // The next push without --serial still lands (the forged serials do not count).
    let frag = site.root.join("a.toml");
    fs::write(&frag, "[alerts]\nactions = [\"loitering\"]\n").unwrap();
    let out = fleet_cli(
        &[
            "push",
            "--config",
            district.to_str().unwrap(),
            "--key",
            site.root.join("keys/fleet.key").to_str().unwrap(),
            "--fragment",
            frag.to_str().unwrap(),
            "--gateway",
            GATEWAY_ID,
            "--timeout",
            "60s",
        ],
        &site.root,
        Duration::from_secs(90),
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    let serial = reports(up, GATEWAY_ID).last().unwrap().0;
    assert!(serial < 1 << 53, "{serial}");
    let out = fleet_cli(
        &[
            "push",
            "--config",
            district.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--fragment",
            frag.to_str().unwrap(),
            "--gateway",
            GATEWAY_ID,
            "--serial",
            "18446744073709551615",
        ],
        &site.root,
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(78), "{}", out.stderr);
    // 400 boxes of one community (their retained statuses): every one is sent the change.
    for i in 0..400 {
        let status = serde_json::json!({
            "schema": "zhian.status.v1", "state": "online", "gateway": format!("fake-{i:03}"),
            "epoch": 1, "site": {"community": "假社区"},
        });
        let m = serde_json::to_vec(&status).unwrap();
        // Retained, as a box's status is.
        publish_retained(dport, &format!("zhian/district/fake-{i:03}/status"), m);
    }
    let out = fleet_cli(
        &[
            "push",
            "--config",
            district.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--fragment",
            frag.to_str().unwrap(),
            "--layer",
            "community=假社区",
            "--no-wait",
        ],
        &site.root,
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.lines().filter(|l| l.ends_with(" sent")).count(),
        400,
        "{}",
        out.stdout
    );
    eventually("400 changes on the broker", || {
        up.messages()
            .iter()
            .filter(|m| {
                m.topic.starts_with("zhian/district/fake-") && m.topic.ends_with("/config/set")
            })
            .count()
            >= 400
    });
    site.term_daemon();
}
