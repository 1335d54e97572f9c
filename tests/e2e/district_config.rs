//! Fleet configuration reports at the district (issue 23): boxes' `config/state` reports,
//! published retained at QoS 1 as the box's fleet link does, scrambled, redelivered and
//! republished, land in `config_rollouts` (one row per gateway and serial, a final state over
//! applying and probation whatever the arrival order) and `gateway_state.config_serial` (the
//! highest `applied` serial, never lowered by a late older report, unchanged by a rejected or
//! rolled-back change), exactly. The session is made by `district --init`: reports published
//! before the receiver first runs are kept, and the box's other fleet topics (`config/set`,
//! `diag/...`), which `+/#` matches, are acknowledged and kept nowhere. A malformed report is a
//! reject and intake goes on. The operators' query in docs/district-operations.md runs as
//! written and names the gateways that did not apply a serial.

use crate::common;

use common::district::DISTRICT_PREFIX as PREFIX;
use common::district::*;
use common::pg::Postgres;
use common::*;
use rumqttc::{Client, Event, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};

/// 2026-11-30T00:00:00Z, Unix ms: the boxes' clock in these reports.
const T: i64 = 1_795_996_800_000;
const ROLLED_BACK: &str = "site broker mqtt://10.0.0.9:1884 down for 61 s (health.link_grace 60 s)";
const REJECTED: &str = "fragment sets gateway.id, which stays with the installer";

fn topic(gw: &str) -> String {
    format!("{PREFIX}/{gw}/config/state")
}

/// A `config/state` report as the box sends it (`at` in whole seconds after [`T`]; `None`: no
/// `at` and no `gateway` field, as from another sender).
fn report(
    gw: &str,
    serial: u64,
    state: &str,
    reason: Option<&str>,
    at_s: Option<i64>,
) -> (String, Vec<u8>) {
    let mut v = json!({"schema": "zhian.config_state.v1", "serial": serial, "state": state,
                       "config_hash": format!("{serial:064x}")});
    if let Some(r) = reason {
        v["reason"] = json!(r);
    }
    if let Some(s) = at_s {
        v["at"] = json!(rfc(T + s * 1000));
        v["gateway"] = json!(gw);
    }
    (topic(gw), serde_json::to_vec(&v).unwrap())
}

/// Publishes each message at QoS 1, retained when `retain` (as a box's fleet link does), and
/// waits for every PUBACK.
fn publish(port: u16, client_id: &str, msgs: &[(String, Vec<u8>)], retain: bool) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut conn) = Client::new(opts, msgs.len() + 4);
    for (t, p) in msgs {
        client
            .publish(t.as_str(), QoS::AtLeastOnce, retain, p.clone())
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut acked = 0;
    while acked < msgs.len() {
        assert!(
            Instant::now() < deadline,
            "{acked} of {} acknowledged",
            msgs.len()
        );
        match conn.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Incoming::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("publisher {client_id}: {e}"),
        }
    }
    client.disconnect().unwrap();
    while let Ok(Ok(ev)) = conn.recv_timeout(Duration::from_secs(2)) {
        if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
            break;
        }
    }
}

#[test]
fn config_reports_land_in_config_rollouts_exactly_in_any_order() {
    let site_ = Site::build("district-config")
        .no_device_broker()
        .persistent_district()
        .no_collector()
        .no_gateway()
        .start();
    let pg = Postgres::start(&site_.root.join("pg"), free_port());
    let port = site_.district().port;
    let log = site_.root.join("receiver.log");
    let cfg = site_.root.join("r.toml");
    let health = receiver_config(&cfg, &pg.url(), port, "cfg-r1");
    let started_s = now_ms() / 1000;

    // The receiver's session (`district --init`: `$share/{group}/{prefix}/+/#`).
    let init = Command::new(env!("CARGO_BIN_EXE_zhian-gateway"))
        .args(["district", "--init", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    // Before the receiver ever ran: two malformed reports (from a stray sender, not retained:
    // mosquitto sends a topic's retained message again when a session subscribes again, so a
    // retained one would be rejected at every receiver start), a good one, and the box's other
    // fleet topics (not the receiver's).
    let malformed = vec![
        (
            topic("cfg-05"),
            br#"{"schema":"zhian.config_state.v1","serial":"x","state":"applied","config_hash":"ab"}"#.to_vec(),
        ),
        (
            topic("cfg-05"),
            br#"{"schema":"zhian.config_state.v1","gateway":"cfg-06","serial":7,"state":"applied","config_hash":"ab"}"#.to_vec(),
        ),
    ];
    publish(port, "cfg-stray", &malformed, false);
    let phase0 = vec![
        report("cfg-01", 100, "applying", None, Some(0)),
        (
            format!("{PREFIX}/cfg-01/config/set"),
            br#"{"schema":"zhian.config.v1","serial":100,"fragment":"","sig":"AA=="}"#.to_vec(),
        ),
        (
            format!("{PREFIX}/cfg-01/diag/request"),
            br#"{"schema":"zhian.diag_request.v1","id":"d1","at":0,"sig":"AA=="}"#.to_vec(),
        ),
        (
            format!("{PREFIX}/cfg-01/diag/reply"),
            br#"{"schema":"zhian.diag.v1","gateway":"cfg-01","id":"d1","at":0,"status":{},"log":[]}"#.to_vec(),
        ),
    ];
    publish(port, "cfg-boxes-0", &phase0, true);

    let _r = start_receiver(&cfg, &log);
    wait_healthy(health, &log);

    // Every box's steps, each sent once or twice, in a scrambled order.
    let steps = vec![
        report("cfg-01", 100, "probation", None, Some(10)),
        report("cfg-01", 100, "applied", None, Some(310)),
        report("cfg-01", 200, "applying", None, Some(1000)),
        report("cfg-01", 200, "rolled_back", Some(ROLLED_BACK), Some(1100)),
        report("cfg-02", 100, "applying", None, Some(0)),
        report("cfg-02", 100, "probation", None, Some(10)),
        report("cfg-02", 100, "applied", None, Some(310)),
        report("cfg-02", 200, "applying", None, Some(1000)),
        report("cfg-02", 200, "probation", None, Some(1010)),
        report("cfg-02", 200, "applied", None, Some(1310)),
        report("cfg-03", 100, "applying", None, Some(0)),
        report("cfg-03", 100, "probation", None, Some(10)),
        report("cfg-03", 100, "applied", None, Some(310)),
        report("cfg-03", 200, "rejected", Some(REJECTED), Some(1000)),
        // Still on probation; its `applying` carries no time (the receipt's is kept).
        report("cfg-04", 200, "applying", None, None),
        report("cfg-04", 200, "probation", None, Some(1010)),
        // After the malformed ones: intake went on.
        report("cfg-05", 7, "applied", None, Some(5)),
    ];
    let mut rng = Rng::new(23);
    let mut phase1: Vec<(String, Vec<u8>)> = Vec::new();
    for m in &steps {
        for _ in 0..1 + rng.below(2) {
            phase1.push(m.clone());
        }
    }
    for i in (1..phase1.len()).rev() {
        phase1.swap(i, rng.below(i + 1));
    }
    // The phase-0 report and these.
    let mut valid = 1 + phase1.len();
    publish(port, "cfg-boxes-1", &phase1, true);

    let serials = || {
        pg.psql(
            "SELECT gateway, coalesce(config_serial::text, '-') FROM gateway_state
             WHERE gateway LIKE 'cfg-%' ORDER BY 1",
        )
        .unwrap_or_default()
    };
    let want_serials = "cfg-01|100\ncfg-02|200\ncfg-03|100\ncfg-04|-\ncfg-05|7\n";
    let reports = || {
        pg.psql("SELECT count(*) FROM config_reports")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(60), || serials() == want_serials
            && reports() == "18"),
        "serials {:?}, {} reports\n{}",
        serials(),
        reports(),
        tail(&log, 30)
    );
    let applying_at = || {
        pg.psql(
            "SELECT (extract(epoch FROM at) * 1000)::bigint FROM config_reports
             WHERE gateway = 'cfg-04' AND state = 'applying'",
        )
        .unwrap_or_default()
    };
    let first_at = applying_at();
    let at_s = first_at.trim().parse::<i64>().unwrap() / 1000;
    assert!(
        (started_s - 1..=now_ms() / 1000 + 1).contains(&at_s),
        "a report without `at` is kept at its receipt: {at_s}, test started {started_s}"
    );

    // Late: an older serial applied (a box's backlog), the rolled-back change's probation
    // (stamped after the rollback), and everything republished again (reconnects); last, a
    // new gateway's report: one receiver commits in arrival order, so once it is in, all is.
    let mut phase2 = vec![
        report("cfg-01", 50, "applied", None, Some(-1000)),
        report("cfg-01", 200, "probation", None, Some(1200)),
    ];
    phase2.extend(steps.iter().cloned());
    phase2.push(report("cfg-01", 100, "applying", None, Some(0)));
    phase2.push(report("cfg-06", 1, "applied", None, Some(2000)));
    valid += phase2.len();
    publish(port, "cfg-boxes-2", &phase2, true);
    let want_serials = format!("{want_serials}cfg-06|1\n");
    assert!(
        wait_until(Duration::from_secs(60), || serials() == want_serials),
        "serials {:?}\n{}",
        serials(),
        tail(&log, 30)
    );
    // Every report was taken (more when the broker sent retained ones again at a subscribe).
    let kept = metric(
        health,
        "zhian_district_messages_total{topic_kind=\"config_state\",outcome=\"kept\"}",
    ) as usize;
    assert!(kept >= valid, "{kept} of {valid} reports kept");

    // Each distinct report once; one rollout row per (gateway, serial) with its final state.
    assert_eq!(reports(), "21", "republished reports are no-ops");
    let rollouts = pg
        .psql(
            "SELECT gateway, serial, state, coalesce(reason, ''),
                    (extract(epoch FROM at) * 1000)::bigint - 1795996800000
             FROM config_rollouts ORDER BY 1, 2",
        )
        .unwrap();
    let want = format!(
        "cfg-01|50|applied||-1000000\n\
         cfg-01|100|applied||310000\n\
         cfg-01|200|rolled_back|{ROLLED_BACK}|1100000\n\
         cfg-02|100|applied||310000\n\
         cfg-02|200|applied||1310000\n\
         cfg-03|100|applied||310000\n\
         cfg-03|200|rejected|{REJECTED}|1000000\n\
         cfg-04|200|probation||1010000\n\
         cfg-05|7|applied||5000\n\
         cfg-06|1|applied||2000000\n"
    );
    assert_eq!(rollouts, want);
    assert_eq!(
        serials(),
        want_serials,
        "a late older `applied` does not lower the serial in force"
    );
    assert_eq!(
        applying_at(),
        first_at,
        "a redelivery keeps the first report"
    );
    assert_eq!(
        pg.psql("SELECT DISTINCT config_hash FROM config_rollouts WHERE gateway = 'cfg-02' AND serial = 200")
            .unwrap()
            .trim(),
        format!("{:064x}", 200)
    );

    // The operators' query (docs/district-operations.md), as written there: which gateways did
    // not apply serial 200.
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/district-operations.md"),
    )
    .unwrap();
    let section = doc
        .split("## Fleet configuration reports")
        .nth(1)
        .expect("the section");
    let query = section
        .split("```sql")
        .nth(1)
        .and_then(|q| q.split("```").next())
        .expect("its query")
        .replace("1764460800", "200");
    let behind: Vec<String> = pg
        .psql(&query)
        .unwrap_or_else(|| panic!("the documented query runs:\n{query}"))
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            format!("{} {}", f[0], f[3])
        })
        .collect();
    assert_eq!(
        behind,
        [
            "cfg-01 rolled_back",
            "cfg-03 rejected",
            "cfg-04 probation",
            "cfg-05 no report",
            "cfg-06 no report"
        ]
    );

    // The malformed reports are rejects; the box's other fleet topics were never taken.
    assert_eq!(
        pg.psql("SELECT topic, reason FROM rejects ORDER BY reason")
            .unwrap(),
        format!(
            "{}|gateway_mismatch\n{}|invalid_field\n",
            topic("cfg-05"),
            topic("cfg-05")
        )
    );
    assert_eq!(
        metric(
            health,
            "zhian_district_messages_total{topic_kind=\"config_state\",outcome=\"rejected\"}"
        ),
        2.0
    );
}
