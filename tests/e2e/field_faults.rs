//! Bad days in the field, provoked for real through the real binary: a 9 MiB device message on a
//! mosquitto with no size limit, a site broker that grants QoS 0 (`max_qos 0`), and a Modbus
//! controller that misreads a counter once (a scripted Modbus TCP peer answering each read from
//! a list).

use crate::common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::fs;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_modbus::prelude::{ExceptionCode, Request, Response};
use tokio_modbus::server::tcp::Server;
use zhian_gateway::config::{ByteSize, Dur, PointType, Secret, Table};
use zhian_gateway::core::event::Kind;

#[test]
fn a_9_mib_message_is_rejected_too_large_and_intake_goes_on() {
    // mosquitto's default message_size_limit: none.
    let site = Site::build("big").status().start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let mut p = site.publisher();
    let before = Event::new("camera", "cam-1", "before", "stranger");
    p.send(&before.topic(), before.payload());
    p.wait_all_acked(Duration::from_secs(30));
    // mosquitto_pub: our test publisher (rumqttc) will not send a packet over 1 MiB.
    let big = site.root.join("big.bin");
    fs::write(&big, vec![b'x'; 9 << 20]).unwrap();
    let pubbed = std::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &site.device().port.to_string(),
            "-q",
            "1",
        ])
        .args(["-i", "big-sender", "-t", "zhian/camera/cam-1", "-f"])
        .arg(&big)
        .status()
        .expect("run mosquitto_pub");
    assert!(pubbed.success(), "mosquitto_pub of 9 MiB");
    let mut sent = vec![before];
    for i in 0..50 {
        let e = Event::new("camera", "cam-1", &format!("after-{i}"), "stranger");
        p.send(&e.topic(), e.payload());
        sent.push(e);
    }
    p.wait_all_acked(Duration::from_secs(60));
    let want = sent.len() as u64;
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == want),
        "every event around the big one counted; log:\n{}",
        tail(&log, 30)
    );
    let s = api_status(status_port).unwrap();
    assert_eq!(s["counters"]["rejected_by_reason"]["too_large"], 1, "{s}");
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(
        metrics.contains("zhian_events_rejected_total{reason=\"too_large\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("zhian_site_connected 1"), "{metrics}");
    assert!(metrics.contains("zhian_build_info{version="), "{metrics}");
    // Acknowledged: not redelivered, and the session never dropped over it. The pause is the
    // check: 3 s of wall time in which a redelivery would have shown.
    std::thread::sleep(Duration::from_secs(3));
    let s = api_status(status_port).unwrap();
    assert_eq!(s["counters"]["rejected_by_reason"]["too_large"], 1, "{s}");
    assert!(
        !log_text(&log).contains("device broker connection lost"),
        "{}",
        tail(&log, 30)
    );
    site.term_daemon();
}

#[test]
fn a_qos_0_grant_is_an_error_on_the_log_and_the_page() {
    let site = Site::build("qos0")
        .device_broker_with("max_qos 0")
        .no_district_broker()
        .status()
        .config(|c| c.upstream.enabled = false)
        .start();
    let (status_port, log) = (site.status_port(), site.log_path());
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some_and(|s| s["site_problem"].is_string())),
        "the page says what is wrong; log:\n{}",
        tail(&log, 30)
    );
    let s = api_status(status_port).unwrap();
    assert!(s["site_problem"].as_str().unwrap().contains("QoS 0"), "{s}");
    let l = log_text(&log);
    assert!(l.contains("ERROR") && l.contains("granted QoS 0"), "{l}");
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert!(page.contains("data-site-problem"));
    site.term_daemon();
}

// ---------------------------------------------------------------------------------------------
// A Modbus controller that misreads once
// ---------------------------------------------------------------------------------------------

/// Answers each read of holding registers 0-1 (a u32, high word first) with the next value of
/// a script, then keeps answering the last one.
/// The values to answer with, and how many reads were answered.
type Script = Arc<Mutex<(Vec<u32>, usize)>>;

#[derive(Clone)]
struct Scripted {
    script: Script,
}

impl tokio_modbus::server::Service for Scripted {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = Pin<Box<dyn Future<Output = Result<Response, ExceptionCode>> + Send>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let value = {
            let mut s = self.script.lock().unwrap();
            let v = s.0[s.1.min(s.0.len() - 1)];
            s.1 += 1;
            v
        };
        Box::pin(async move {
            match req {
                Request::ReadHoldingRegisters(0, 2) => Ok(Response::ReadHoldingRegisters(vec![
                    (value >> 16) as u16,
                    value as u16,
                ])),
                _ => Err(ExceptionCode::IllegalDataAddress),
            }
        })
    }
}

/// Serve `script` on a free loopback port in a thread of its own; returns the address and how
/// many reads were answered so far.
fn serve_script(script: Vec<u32>) -> (String, Script) {
    let state = Arc::new(Mutex::new((script, 0usize)));
    let svc = Scripted {
        script: state.clone(),
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().to_string()).unwrap();
            let server = Server::new(listener);
            let on_connected = move |stream, _addr| {
                let svc = svc.clone();
                async move { Ok(Some((svc, stream))) }
            };
            let _ = server.serve(&on_connected, |_e| {}).await;
        });
    });
    (rx.recv().unwrap(), state)
}

#[test]
fn a_counter_misread_once_never_reaches_the_platform() {
    // The two cases in one series: a u32 read as 0xFFFFFFFF once, and a controller
    // that reads 0 once after a reboot; then a real reset to 0 that stays, and counting on.
    let script: Vec<u32> = vec![
        1000,
        1000,
        0xFFFF_FFFF,
        1001,
        1001,
        12345,
        12345,
        0,
        12346,
        12346,
        0,
        0,
        3,
        3,
    ];
    // Truth: 1000 -> 1001 (+1); 1001 -> 12345 (a real jump of 11,344, held one poll, then it
    // stands); 12345 -> 12346 (+1, the 0 was a misread); reset to 0 (0 events), then +3.
    let truth: u64 = 1 + 11_344 + 1 + 3;
    let (addr, served) = serve_script(script.clone());
    let site = Site::build("glitch")
        .no_device_broker()
        .status()
        .config(|c| {
            c.mqtt.enabled = false;
            let mut gate = modbus_tcp("gate-east", Kind::Vehicle, &addr);
            gate.poll = Dur::millis(150);
            gate.timeout = Dur::millis(500);
            gate.points = vec![counter_point(
                "plates_in",
                Table::Holding,
                0,
                PointType::U32,
                "entry",
            )];
            c.modbus.devices = vec![gate];
        })
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    assert!(
        wait_until(Duration::from_secs(30), || served.lock().unwrap().1
            > script.len() + 3),
        "the peer answered every scripted read; log:\n{}",
        tail(&log, 30)
    );
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == truth),
        "upstream counted {:?}, truth {truth}; log:\n{}",
        up.totals(),
        tail(&log, 40)
    );
    // The pause is the check: 3 s more of polls (20 of them) that must count nothing more.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        up.totals().values().sum::<u64>(),
        truth,
        "and no more later"
    );
    let s = api_status(status_port).unwrap();
    let dev: HashMap<String, Value> = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["name"].as_str().unwrap().to_string(), d.clone()))
        .collect();
    assert_eq!(dev["gate-east"]["glitches"], 2, "{s}");
    let hb = up.latest_heartbeat().unwrap();
    assert_eq!(hb["modbus"][0]["glitches"], 2, "{hb}");
    assert!(log_text(&log).contains("Modbus counter misread"));
    site.term_daemon();
}

// ---------------------------------------------------------------------------------------------
// Links that need an operator
// ---------------------------------------------------------------------------------------------

#[test]
fn two_boxes_with_one_identity_are_named_and_backed_off() {
    // One copied config: same gateway.id, same client ids; only the data dir and the status
    // port differ (two boxes).
    let mut site = Site::build("twins").no_collector().status().start();
    site.add_gateway("box-1", |_| {});
    let ports = [site.gateway(0).status_port(), site.gateway(1).status_port()];
    let named = |port: u16, link: &str| {
        api_status(port).is_some_and(|s| s["link_problems"][link]["reason"] == "identity_taken")
    };
    for link in ["site", "district"] {
        assert!(
            wait_until(Duration::from_secs(60), || ports
                .iter()
                .any(|p| named(*p, link))),
            "{link}: identity clash named on a page; logs:\n{}\n{}",
            site.gateway(0).tail(20),
            site.gateway(1).tail(20)
        );
    }
    let logs: String = [0, 1].map(|i| site.gateway(i).log_text()).concat();
    assert!(
        logs.contains("ERROR") && logs.contains("another client is using client id"),
        "logged at ERROR with what to change"
    );
    let metrics: String = ports
        .iter()
        .filter_map(|p| http(*p, "GET", "/metrics", None).ok())
        .map(|r| r.text())
        .collect();
    assert!(
        metrics.contains("zhian_link_problem{link=\"site\",reason=\"identity_taken\"} 1"),
        "{metrics}"
    );
    // The clone goes away: the remaining box holds its links and clears the problem.
    site.gateway_mut(1).term();
    assert!(
        wait_until(Duration::from_secs(90), || api_status(ports[0])
            .is_some_and(|s| s["link_problems"]
                .as_object()
                .is_some_and(|m| m.is_empty()))),
        "the problem clears once the clone is gone; log:\n{}",
        site.gateway(0).tail(30)
    );
    site.term_daemon();
}

#[test]
fn refused_district_credentials_are_an_error_on_the_page() {
    let site = Site::build("refused");
    let pw = site.root().join("passwd");
    fs::write(&pw, "").unwrap();
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b"])
        .arg(&pw)
        .args(["gateway", "right-password"])
        .status()
        .expect("run mosquitto_passwd");
    assert!(made.success());
    let site = site
        .no_device_broker()
        .district_broker_with(&format!(
            "allow_anonymous false\npassword_file {}",
            pw.display()
        ))
        .no_collector()
        .status()
        .config(|c| {
            c.upstream.username = Some("gateway".into());
            c.upstream.password = Some(Secret("wrong-password".into()));
        })
        .start();
    let (status_port, log) = (site.status_port(), site.log_path());
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some_and(
                |s| s["link_problems"]["district"]["reason"] == "refused"
            )),
        "log:\n{}",
        tail(&log, 30)
    );
    let l = log_text(&log);
    assert!(
        l.contains("ERROR") && l.contains("upstream.username"),
        "an ERROR naming the link and what to check: {l}"
    );
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert!(page.contains("data-link-problem=\"district\""));
    site.term_daemon();
}

// ---------------------------------------------------------------------------------------------
// A picky district broker
// ---------------------------------------------------------------------------------------------

/// A district broker with `max_packet_size broker_max`, one 2 s window with 900 distinct devices
/// (a summary of about 70 KB), then 5 events in a later window. `gateway_max` is the gateway's
/// `upstream.max_packet_size` (`None`: not set, the default 256 KiB). Returns the site and the
/// events sent.
fn picky_district(
    name: &str,
    gateway_max: Option<ByteSize>,
    broker_max: usize,
) -> (Site, Vec<Event>) {
    let site = Site::build(name)
        .district_broker_with(&format!("max_packet_size {broker_max}"))
        .status()
        .config(|c| {
            if let Some(max) = gateway_max {
                c.upstream.max_packet_size = max;
            }
        })
        .start();
    let mut p = site.publisher();
    let ts = now_ms();
    let mut events = Vec::new();
    for i in 0..900 {
        let e = Event::new(
            "access",
            &format!("door-{i:04}"),
            &format!("big-{i}"),
            "entry",
        )
        .at(ts);
        p.send(&e.topic(), e.payload());
        events.push(e);
    }
    p.wait_all_acked(Duration::from_secs(60));
    // The next events fall into a later window.
    let next = window_start(ts) + 2_000;
    assert!(wait_until(Duration::from_secs(10), || now_ms() >= next));
    for i in 0..5 {
        let e = Event::new("access", "door-0001", &format!("small-{i}"), "exit");
        p.send(&e.topic(), e.payload());
        events.push(e);
    }
    p.wait_all_acked(Duration::from_secs(60));
    (site, events)
}

/// Every summary publish the collector received fits a broker packet of `limit` bytes: payload,
/// topic, 2 topic-length bytes, 2 packet id bytes and a fixed header of at most 5.
fn assert_packets_within(up: &Upstream, limit: usize) {
    for m in up.on("summary") {
        assert!(
            m.payload.len() + m.topic.len() + 9 <= limit,
            "{} bytes",
            m.payload.len()
        );
    }
}

/// (window start, rev, parts).
type RevKey = (i64, u64, u64);
/// A summary's rows.
type Rows = Vec<(Key, u64)>;

/// Per (window start, rev, parts): the rows of the revs that arrived whole (all parts
/// `1..=parts`, each once), as the district receiver takes them (its key includes `parts`).
fn complete_revs(up: &Upstream) -> Vec<(RevKey, Rows)> {
    let mut revs: std::collections::BTreeMap<RevKey, HashMap<u64, Rows>> = Default::default();
    for s in up.summaries() {
        let parts = s.json["parts"].as_u64().unwrap_or(1);
        let part = s.json["part"].as_u64().unwrap_or(1);
        revs.entry((s.start_ms, s.rev, parts))
            .or_default()
            .insert(part, s.counts.clone());
    }
    revs.into_iter()
        .filter(|((_, _, parts), got)| (1..=*parts).all(|p| got.contains_key(&p)))
        .map(|(k, got)| (k, got.into_values().flatten().collect()))
        .collect()
}

#[test]
fn a_large_summary_is_split_under_the_district_packet_limit() {
    let (site, _events) = picky_district("split", Some(ByteSize(64 << 10)), 65_536);
    let (up, log) = (site.upstream(), site.log_path());
    assert!(
        wait_until(Duration::from_secs(60), || up
            .totals()
            .values()
            .sum::<u64>()
            == 905),
        "all 905 events counted: {:?}; log:\n{}",
        up.totals().values().sum::<u64>(),
        tail(&log, 30)
    );
    let parts: Vec<Value> = up
        .on("summary")
        .iter()
        .map(|m| m.json())
        .filter(|j| j["parts"].is_u64())
        .collect();
    assert!(parts.len() >= 2, "the big window went in parts");
    assert_packets_within(up, 65_536);
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
    let l = log_text(&log);
    assert!(
        !l.contains("district broker link down"),
        "split at issue time: the broker never closed the connection\n{}",
        tail(&log, 30)
    );
    site.term_daemon();
}

/// Contract: "The district broker's packet limit need not be configured: a message the broker
/// refuses (it closes the connection on it) is split into smaller parts and tried again, and is
/// parked only when a single row will not fit."
#[test]
fn the_district_packet_limit_is_learned_and_a_900_device_window_arrives_whole() {
    // No upstream.max_packet_size: the gateway issues the 70 KB summary whole (256 KiB).
    let (site, events) = picky_district("learned", None, 65_536);
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let want = collapse(&expected_windows(&events));
    assert!(
        wait_until(Duration::from_secs(90), || up.totals() == want),
        "every event counted once: {}; log:\n{}",
        map_diff(&want, &up.totals()),
        tail(&log, 40)
    );
    // The 900-device window arrived as one complete rev, in parts.
    let big = window_start(events[0].ts_ms);
    let revs = complete_revs(up);
    let (key, rows) = revs
        .iter()
        .filter(|((start, _, _), _)| *start == big)
        .max_by_key(|((_, rev, _), _)| *rev)
        .expect("a complete rev of the big window");
    assert!(key.2 >= 2, "sent in parts: {key:?}");
    assert_eq!(rows.len(), 900, "900 devices, each row once");
    assert_eq!(rows.iter().map(|(_, n)| n).sum::<u64>(), 900);
    assert_packets_within(up, 65_536);
    // Nothing parked; the learned limit shown.
    let status = api_status(status_port).expect("/api/status");
    assert_eq!(status["upstream"]["parked"], 0, "{}", status["upstream"]);
    let learned = status["upstream"]["learned_max_packet"]
        .as_u64()
        .unwrap_or_else(|| panic!("learned_max_packet: {}", status["upstream"]));
    assert!((1024..65_536).contains(&learned), "{learned}");
    assert!(
        wait_until(Duration::from_secs(10), || up
            .latest_heartbeat()
            .is_some_and(|h| h["parked"] == 0 && h["pending_summaries"] == 0)),
        "heartbeat: {:?}",
        up.latest_heartbeat()
    );
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(
        metrics.contains(&format!("zhian_upstream_max_packet_bytes {learned}")),
        "{metrics}"
    );
    assert!(metrics.contains("zhian_outbox_parked 0"), "{metrics}");
    let l = log_text(&log);
    assert!(
        l.contains("learned_max_packet") && !l.contains("parked (kept on the box"),
        "{}",
        tail(&log, 40)
    );
    site.term_daemon();
}

/// Parts issued under `upstream.max_packet_size` but still too large for the broker: the parts
/// of the rev (all pending) are merged and split again under the learned limit.
#[test]
fn parts_too_large_for_the_district_are_merged_and_split_again() {
    // Issued as 2 parts of up to 64 KiB; the broker takes 32 KiB.
    let (site, events) = picky_district("resplit", Some(ByteSize(64 << 10)), 32_768);
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let want = collapse(&expected_windows(&events));
    assert!(
        wait_until(Duration::from_secs(90), || up.totals() == want),
        "every event counted once: {}; log:\n{}",
        map_diff(&want, &up.totals()),
        tail(&log, 40)
    );
    let big = window_start(events[0].ts_ms);
    let revs = complete_revs(up);
    let (key, rows) = revs
        .iter()
        .filter(|((start, _, _), _)| *start == big)
        .max_by_key(|((_, rev, _), _)| *rev)
        .expect("a complete rev of the big window");
    assert!(key.2 >= 3, "split again into more parts: {key:?}");
    assert_eq!(rows.iter().map(|(_, n)| n).sum::<u64>(), 900);
    assert_packets_within(up, 32_768);
    let status = api_status(status_port).expect("/api/status");
    assert_eq!(status["upstream"]["parked"], 0, "{}", status["upstream"]);
    assert!(status["upstream"]["learned_max_packet"]
        .as_u64()
        .is_some_and(|b| b < 32_768));
    let l = log_text(&log);
    assert!(
        l.contains("summary split again") && l.contains("entries=2"),
        "{}",
        tail(&log, 40)
    );
    site.term_daemon();
}

/// A summary whose single row will not fit the district broker's packet limit is parked after
/// `PARK_AFTER` refusals (it cannot be made smaller) and never blocks the window after it. Long
/// site labels make every summary a few KB, so that the broker's limit sits between a summary
/// with one long row (device, action and result of 64 characters) and one with a short row.
#[test]
fn a_single_row_the_district_refuses_is_parked_and_never_blocks_the_rest() {
    let street = "富春街道".repeat(500);
    let long = "x".repeat(64);
    let window = "2026-12-05T10:00:02Z";
    let summary = |device: &str, action: &str, result: &str, n: u64| {
        let v = serde_json::json!({
            "schema": "zhian.summary.v1", "gateway": GATEWAY_ID,
            "site": {"district": "富阳区", "street": street, "compound": "春江花园"},
            "window": {"start": window, "secs": 2}, "rev": 0,
            "counts": [{"kind": "access", "device": device, "action": action, "result": result, "n": n}]
        });
        serde_json::to_vec(&v).unwrap().len() + format!("{PREFIX}/summary").len() + 9
    };
    let long_device = format!("door-{}", "x".repeat(59));
    let refused = summary(&long_device, &long, &long, 1);
    let fits = summary("door-0001", "exit", "ok", 5);
    assert!(fits + 100 < refused, "{fits} {refused}");
    let limit = (fits + refused) / 2;
    let site = Site::build("tiny")
        .district_broker_with(&format!("max_packet_size {limit}"))
        .status()
        .config(|c| c.gateway.street = Some(street.clone()))
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    // The heartbeat and status fit the broker's limit: the link holds while nothing is sent.
    assert!(
        wait_until(Duration::from_secs(30), || up.latest_heartbeat().is_some()),
        "heartbeat through a {limit}-byte limit; log:\n{}",
        tail(&log, 30)
    );
    let mut p = site.publisher();
    let big = Event::new("access", &long_device, "long-1", &long).result(&long);
    p.send(&big.topic(), big.payload());
    p.wait_all_acked(Duration::from_secs(30));
    let next = window_start(big.ts_ms) + 2_000;
    assert!(wait_until(Duration::from_secs(10), || now_ms() >= next));
    let mut small = Vec::new();
    for i in 0..5 {
        let e = Event::new("access", "door-0001", &format!("small-{i}"), "exit");
        p.send(&e.topic(), e.payload());
        small.push(e);
    }
    p.wait_all_acked(Duration::from_secs(30));
    let want = collapse(&expected_windows(&small));
    assert!(
        wait_until(Duration::from_secs(90), || up.totals() == want),
        "the window behind the refused one arrives: {}; log:\n{}",
        map_diff(&want, &up.totals()),
        tail(&log, 40)
    );
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some_and(|s| s["upstream"]["parked"] == 1)),
        "parked and shown; log:\n{}",
        tail(&log, 40)
    );
    let l = log_text(&log);
    assert!(l.contains("parked (kept on the box"), "{}", tail(&log, 40));
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(metrics.contains("zhian_outbox_parked 1"), "{metrics}");
    assert_packets_within(up, limit);
    assert!(
        up.summaries()
            .iter()
            .all(|s| s.start_ms != window_start(big.ts_ms)),
        "the refused window never arrived in pieces"
    );
    // Bounded flapping: the broker closed the connection a few times, then the link holds.
    let flips = up.on("status").len();
    assert!(flips <= 16, "{flips} status messages");
    let beats = up.on("heartbeat").len();
    assert!(
        wait_until(Duration::from_secs(30), || up.on("heartbeat").len()
            >= beats + 3),
        "heartbeats go on"
    );
    assert_eq!(
        up.on("status").len(),
        flips,
        "no reconnect after parking: {}",
        tail(&log, 20)
    );
    site.term_daemon();
}

// ---------------------------------------------------------------------------------------------
// A stale gateway clock, and devices with wrong clocks
// ---------------------------------------------------------------------------------------------

/// The gateway clock 3 days behind (libfaketime; a box without RTC before NTP): every recently
/// active device (four doors, more than half and at least three) stamps ahead of it, so the
/// gateway is the one that is wrong and intake pauses, as before issue 20.
#[test]
fn a_gateway_clock_days_behind_pauses_intake_and_loses_nothing() {
    // The daemon's wall clock 3 days behind (a box without RTC before NTP); monotonic untouched.
    let site = Site::build("clock").status().faketime("-3d").start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let mut p = site.publisher();
    let mut sent = 0u64;
    for i in 0..20 {
        let e = Event::new(
            "access",
            &format!("door-{}", i % 4),
            &format!("clk-{i}"),
            "entry",
        );
        p.send(&e.topic(), e.payload());
        sent += 1;
    }
    let paused = || {
        api_status(status_port).is_some_and(|s| {
            s["intake"]["paused"] == true && s["intake"]["reason"] == "clock_untrusted"
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), paused),
        "intake paused for the clock; log:\n{}",
        tail(&log, 30)
    );
    let s = api_status(status_port).unwrap();
    assert!(
        s["intake"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("4 of 4 recently active devices")),
        "most recently active devices agree: {}",
        s["intake"]
    );
    let health = http(status_port, "GET", "/healthz", None).unwrap();
    assert_eq!(health.status, 503, "{}", health.text());
    assert!(health.text().contains("clock"), "{}", health.text());
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(metrics.contains("zhian_intake_paused{reason=\"clock_untrusted\"} 1"));
    // The pause is the check: 3 s (windows and heartbeats) in which nothing may be counted.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        up.totals().values().sum::<u64>(),
        0,
        "nothing counted with a stale clock"
    );

    // NTP steps the clock: intake resumes by itself, every event counts, none rejected.
    site.set_clock("+0");
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == sent),
        "all {sent} events counted after the clock caught up: {:?}; log:\n{}",
        up.totals(),
        tail(&log, 30)
    );
    let s = api_status(status_port).unwrap();
    assert_eq!(s["intake"]["paused"], false, "{s}");
    assert!(
        s["counters"]["rejected_by_reason"]["too_far_future"].is_null(),
        "{s}"
    );
    assert_eq!(
        s["counters"]["counted_at_receipt"], 0,
        "held, then counted at their own times once the clock was right: {s}"
    );
    assert!(
        s["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["clock_skew"] == false),
        "no door is blamed for the gateway's clock: {}",
        s["devices"]
    );
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
    assert!(log_text(&log).contains("gateway clock not trusted"));

    // A step back by 2 hours: no pause, no window reopened, nothing lost.
    site.set_clock("-2h");
    // Until the daemon's store clock took the step (it keeps its pace: 2 h ahead of the wall).
    site.wait_for_status("the store clock 2 h ahead of the stepped-back wall", |s| {
        s["clock_offset_ms"]
            .as_i64()
            .is_some_and(|off| off > 7_000_000)
    });
    for i in 0..10 {
        let e = Event::new(
            "access",
            &format!("door-{}", i % 4),
            &format!("back-{i}"),
            "exit",
        );
        p.send(&e.topic(), e.payload());
        sent += 1;
    }
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == sent),
        "all {sent} counted after the step back; log:\n{}",
        tail(&log, 30)
    );
    let s = api_status(status_port).unwrap();
    assert_eq!(s["intake"]["paused"], false, "{s}");
    assert!(
        up.summaries().iter().all(|s| s.rev == 0),
        "no window reopened: {}",
        up.dump()
    );

    // A step forward to 2 hours ahead while trusted (a bad NTP source, a hand-set clock): the
    // devices keep stamping the real time, so the new wall time is not believed; no window
    // closes early (the devices' events would be 2 h late and over max_lateness: lost).
    site.set_clock("+2h");
    // Until the daemon's store clock took the step (held: 2 h behind the jumped wall).
    site.wait_for_status("the store clock 2 h behind the jumped wall", |s| {
        s["clock_offset_ms"]
            .as_i64()
            .is_some_and(|off| off < -7_000_000)
    });
    for i in 0..12 {
        let e = Event::new(
            "access",
            &format!("door-{}", i % 4),
            &format!("fwd-{i}"),
            "entry",
        );
        p.send(&e.topic(), e.payload());
        sent += 1;
        // The scenario: the devices' events arrive over 3 s of wall time, not in one batch.
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == sent),
        "all {sent} counted after the step forward: {:?}; log:\n{}",
        up.totals(),
        tail(&log, 30)
    );
    let s = api_status(status_port).unwrap();
    assert_eq!(s["intake"]["paused"], false, "{s}");
    let off = s["clock_offset_ms"].as_i64().unwrap();
    assert!(
        off < -3_600_000,
        "the store clock stays behind the jumped wall: {s}"
    );
    assert!(
        s["counters"]["rejected_by_reason"]
            .as_object()
            .is_none_or(|m| m.is_empty()),
        "{s}"
    );
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(
        metrics.contains("zhian_clock_offset_seconds -7"),
        "{metrics}"
    );
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert!(page.contains("data-clock-step"), "the page says so");
    assert!(log_text(&log).contains("wall clock stepped forward"));
    assert!(
        up.summaries().iter().all(|s| s.rev == 0),
        "no window closed early and reopened: {}",
        up.dump()
    );
    // The wall clock is put right: the store follows it again.
    site.set_clock("+0");
    assert!(
        wait_until(Duration::from_secs(10), || api_status(status_port)
            .is_some_and(
                |s| s["clock_offset_ms"].as_i64().unwrap().abs() < 2000
            )),
        "{}",
        api_status(status_port).unwrap()
    );
    site.term_daemon();
}

/// Two cameras stamping two minutes ahead of a correct gateway clock (`max_future_skew` 30 s)
/// while four doors report normally (issue 20): intake never pauses, every event of both counts
/// (the cameras' at the gateway's receive time, so their windows close now, not two minutes
/// on), both cameras are flagged `clock_skew` on the page, the API and the metrics, with exactly
/// one WARN each, and nothing is rejected.
#[test]
fn two_cameras_ahead_of_a_right_gateway_clock_count_at_receipt_and_never_pause_the_site() {
    let site = Site::build("skew")
        .status()
        .config(|c| c.aggregate.max_future_skew = Dur::secs(30))
        .ready(Ready::SiteLink)
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    // Watch the whole run for a pause (sampled every 50 ms: the sampling is the check).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen_pause = Arc::new(Mutex::new(None::<Value>));
    let watcher = {
        let (stop, seen_pause) = (stop.clone(), seen_pause.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(s) = api_status(status_port) {
                    if s["intake"]["paused"] == true {
                        *seen_pause.lock().unwrap() = Some(s["intake"].clone());
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut p = site.publisher();
    let (mut doors, mut cams) = (0u64, 0u64);
    for i in 0..40 {
        let door = Event::new(
            "access",
            &format!("door-{}", i % 4),
            &format!("d-{i}"),
            "entry",
        )
        .at(now_ms());
        p.send(&door.topic(), door.payload());
        doors += 1;
        if i % 2 == 0 {
            let cam = Event::new(
                "camera",
                &format!("cam-{}", 1 + (i / 2) % 2),
                &format!("c-{i}"),
                "loitering",
            )
            .at(now_ms() + 120_000);
            p.send(&cam.topic(), cam.payload());
            cams += 1;
        }
        // The scenario: spread over several batches and windows (4 s of wall time).
        std::thread::sleep(Duration::from_millis(100));
    }
    p.wait_all_acked(Duration::from_secs(30));
    // Every event counted and delivered within seconds: a camera event counted at its own
    // time (two minutes ahead) could not be summarised before its window closed.
    let total = || up.totals().values().sum::<u64>();
    assert!(
        wait_until(Duration::from_secs(30), || total() == doors + cams),
        "all {} events counted upstream: {:?}; log:\n{}",
        doors + cams,
        up.totals(),
        tail(&log, 30)
    );
    let newest_window = up.summaries().iter().map(|s| s.start_ms).max().unwrap();
    assert!(
        newest_window <= now_ms(),
        "no window from the cameras' future: {}",
        up.dump()
    );
    let cam_total: u64 = up
        .totals()
        .iter()
        .filter(|(k, _)| k.0 == "camera")
        .map(|(_, n)| *n)
        .sum();
    assert_eq!(cam_total, cams);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    assert_eq!(
        *seen_pause.lock().unwrap(),
        None,
        "intake never paused; log:\n{}",
        tail(&log, 30)
    );
    let s = api_status(status_port).unwrap();
    assert_eq!(
        s["counters"]["counted_at_receipt"], cams,
        "{}",
        s["counters"]
    );
    assert_eq!(s["counters"]["rejected"], 0, "{}", s["counters"]);
    assert_eq!(s["counters"]["accepted"], doors + cams, "{}", s["counters"]);
    for dev in s["devices"].as_array().unwrap() {
        let camera = dev["kind"] == "camera";
        assert_eq!(dev["clock_skew"], camera, "{dev}");
        if camera {
            let ahead = dev["clock_ahead_secs"].as_i64().unwrap();
            assert!((100..=121).contains(&ahead), "{dev}");
        }
    }
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    for cam in ["cam-1", "cam-2"] {
        assert!(
            metrics.contains(&format!(
                "zhian_device_clock_skew{{device=\"{cam}\",kind=\"camera\"}} 1"
            )),
            "{metrics}"
        );
    }
    assert!(metrics.contains("zhian_device_clock_skew{device=\"door-0\",kind=\"access\"} 0"));
    assert!(
        metrics.contains(&format!(
            "zhian_events_counted_at_receipt_total{{kind=\"camera\"}} {cams}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("zhian_intake_paused{reason=\"clock_untrusted\"} 0"));
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert_eq!(
        page.matches("data-clock-skew=").count(),
        2,
        "both cameras flagged on the page"
    );
    let text = log_text(&log);
    for cam in ["cam-1", "cam-2"] {
        let warns = text
            .lines()
            .filter(|l| l.contains("device clock ahead of the gateway clock"))
            .filter(|l| l.contains(&format!("device={cam} ")))
            .count();
        assert_eq!(warns, 1, "one WARN for {cam}; log:\n{}", tail(&log, 40));
    }
    assert!(!text.contains("gateway clock not trusted"));
    // A camera whose clock is put right counts at its own time again and loses its flag.
    let e = Event::new("camera", "cam-1", "fixed-1", "loitering").at(now_ms());
    p.send(&e.topic(), e.payload());
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(10), || api_status(status_port)
            .is_some_and(|s| s["devices"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["name"] == "cam-1" && d["clock_skew"] == false))),
        "{}",
        api_status(status_port).unwrap()["devices"]
    );
    site.term_daemon();
}

// ---------------------------------------------------------------------------------------------
// A flood
// ---------------------------------------------------------------------------------------------

/// Resident set of a process, in KiB (VmRSS).
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

#[test]
fn a_flood_from_200_devices_is_absorbed_by_back_pressure_with_exact_counts() {
    // Batches of 8: an fsync'ed commit every 8 messages, so the devices offer far more than the
    // daemon sustains and back-pressure does the work.
    let site = Site::build("flood")
        .status()
        .config(|c| c.store.batch_max = 8)
        .start();
    let (up, log) = (site.upstream(), site.log_path());
    let pid = site.gw().pid();
    let idle_rss = rss_kib(pid);
    let flood_started = std::time::Instant::now();
    let devices: usize = 200;
    let per: usize = std::env::var("FLOOD_PER_DEVICE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    // RSS sampled all along.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                // A sample every 50 ms: the sampling is the measurement.
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // Every device publishes as fast as its connection allows: far beyond what the daemon
    // commits, so the broker holds the rest until the daemon acknowledges.
    let port = site.device().port;
    let senders: Vec<_> = (0..devices)
        .map(|dev| {
            std::thread::spawn(move || {
                let mut p = Publisher::connect(port, &format!("flood-{dev}"));
                for i in 0..per {
                    let e = Event::new(
                        "access",
                        &format!("door-{dev:03}"),
                        &format!("f-{i}"),
                        "entry",
                    );
                    p.send(&e.topic(), e.payload());
                }
                p.wait_all_acked(Duration::from_secs(300));
            })
        })
        .collect();
    for s in senders {
        s.join().expect("publisher");
    }
    let offered_secs = flood_started.elapsed().as_secs_f64();
    let want = (devices * per) as u64;
    assert!(
        wait_until(Duration::from_secs(300), || up
            .totals()
            .values()
            .sum::<u64>()
            == want),
        "counted {} of {want}; log:\n{}",
        up.totals().values().sum::<u64>(),
        tail(&log, 30)
    );
    let absorbed_secs = flood_started.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    // Reported, not asserted (no timed assertions): the offered rate against what the daemon
    // sustained.
    eprintln!(
        "flood: {want} events from {devices} devices offered at {:.0}/s, absorbed at {:.0}/s ({:.1}x); daemon RSS idle {idle_rss} KiB, peak {peak} KiB",
        want as f64 / offered_secs,
        want as f64 / absorbed_secs,
        absorbed_secs / offered_secs
    );
    // Back-pressure bounds memory: the daemon holds at most the broker's in-flight window, a
    // batch and the intake channel, whatever is waiting in the broker.
    assert!(peak < 200 * 1024, "peak RSS {peak} KiB");
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
    assert!(site.daemon_exited().is_none());
    site.term_daemon();
}

// ---------------------------------------------------------------------------------------------
// A compressed week with the district down
// ---------------------------------------------------------------------------------------------

#[test]
fn a_compressed_week_with_the_district_down_delivers_every_summary_in_order() {
    // A week of the daemon's wall clock in 86 s of ours.
    const SPEED: i64 = 7 * 1000;
    // The daemon's wall clock runs SPEED times faster (its monotonic clock does not).
    let mut site = Site::build("week")
        .persistent_district()
        .status()
        .config(|c| {
            c.aggregate.window = Dur::secs(60);
            c.aggregate.grace = Dur::secs(10);
            c.aggregate.max_lateness = Dur::secs(24 * 3600);
            c.aggregate.max_future_skew = Dur::secs(30 * 60);
            c.store.max_size = ByteSize(8 << 20);
        })
        .env("LD_PRELOAD", &libfaketime())
        .env("FAKETIME", &format!("+0 x{SPEED}"))
        .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
        .unstarted()
        .start();
    site.start_daemon();
    site.wait_ready(Ready::Status);
    let (dir, status_port, log) = (site.data_dir(), site.status_port(), site.log_path());
    // The daemon's faked clock starts when libfaketime loads, some real time after our spawn;
    // at ×7000 a 0.26 s start is 30 min of its clock, past `max_future_skew`. So the events are
    // stamped from the daemon's own clock (its `/api/status` `now`), read once: taken after the
    // reply, our estimate is behind the daemon by the reply's trip (late events still count;
    // future ones would not).
    let (daemon_at, read_at) = {
        let s = api_status(status_port).expect("status");
        let at = zhian_proto::Timestamp::parse(s["now"].as_str().expect("now")).expect("rfc3339");
        (at.0, now_ms())
    };
    let fake_now = || daemon_at + (now_ms() - read_at) * SPEED;
    let pid = site.gw().pid();
    site.district_mut().stop();
    let mut p = site.publisher();
    let mut sent = 0u64;
    let mut peak_rss = 0u64;
    let mut peak_du = 0u64;
    let started = std::time::Instant::now();
    let week_ms = 7 * 86_400_000 / SPEED as u64;
    let mut tick = 0u64;
    while started.elapsed() < Duration::from_millis(week_ms) {
        let ts = fake_now();
        // A daily rhythm: busier from 07:00 to 20:00 (UTC+8) than at night.
        let hour = ((ts / 3_600_000) + 8).rem_euclid(24);
        let n = if (7..20).contains(&hour) { 4 } else { 1 };
        for k in 0..n {
            let e = Event::new(
                "access",
                &format!("door-{}", k % 3),
                &format!("day-{sent}"),
                "entry",
            )
            .at(ts);
            p.send(&e.topic(), e.payload());
            sent += 1;
        }
        if tick % 10 == 0 {
            peak_rss = peak_rss.max(rss_kib(pid));
            peak_du = peak_du.max(
                fs::read_dir(&dir)
                    .map(|rd| {
                        rd.flatten()
                            .filter_map(|e| e.metadata().ok())
                            .map(|m| {
                                use std::os::unix::fs::MetadataExt;
                                (m.blocks() * 512).max(m.len())
                            })
                            .sum()
                    })
                    .unwrap_or(0),
            );
        }
        tick += 1;
        // The scenario's pace: a tick every 100 ms of our time (11.7 min of the daemon's).
        std::thread::sleep(Duration::from_millis(100));
    }
    p.wait_all_acked(Duration::from_secs(60));
    let pending = api_status(status_port).unwrap()["upstream"]["pending_summaries"]
        .as_u64()
        .unwrap();
    assert!(
        pending > 500,
        "a week of windows waits on the box: {pending}"
    );
    // The district broker comes back.
    site.district_mut().start_again();
    let up = site.upstream();
    // The daemon's wall clock runs ×7000 against its monotonic clock, so to the daemon it steps
    // forward between any two commits; only devices' events vouch for it ("Clocks"). With the
    // devices silent the store clock would crawl at the monotonic pace, and the week's last
    // window would close minutes later (or, if the last batch's events contradicted the step,
    // later still). So a device keeps reporting, as a real compound's do, on its own id: the
    // week's count is its three doors'.
    let week = |up: &Upstream| -> u64 {
        up.totals()
            .iter()
            .filter(|(k, _)| k.1 != "door-clock")
            .map(|(_, n)| n)
            .sum()
    };
    let mut witness = 0u64;
    assert!(
        wait_until(Duration::from_secs(180), || {
            let e = Event::new("access", "door-clock", &format!("clock-{witness}"), "entry")
                .at(fake_now());
            p.send(&e.topic(), e.payload());
            witness += 1;
            week(up) == sent
        }),
        "counted {} of {sent}; status: counters {} rejects {} clock_offset_ms {} upstream {}; log:\n{}",
        week(up),
        api_status(status_port).map(|s| s["counters"].to_string()).unwrap_or_default(),
        api_status(status_port).map(|s| s["recent_rejects"].to_string()).unwrap_or_default(),
        api_status(status_port).map(|s| s["clock_offset_ms"].to_string()).unwrap_or_default(),
        api_status(status_port).map(|s| s["upstream"].to_string()).unwrap_or_default(),
        {
            let text = fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| !l.contains("PUBACK")).collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        }
    );
    let starts: Vec<i64> = up
        .summaries()
        .iter()
        .filter(|s| s.rev == 0)
        .map(|s| s.start_ms)
        .collect();
    assert!(
        starts.windows(2).all(|w| w[0] <= w[1]),
        "summaries arrive in window order"
    );
    eprintln!(
        "week: {sent} events, {} summaries, RSS peak {peak_rss} KiB, data dir peak {peak_du} B",
        starts.len()
    );
    assert!(peak_du <= 8 << 20, "store within its bound: {peak_du}");
    assert!(peak_rss < 200 * 1024, "RSS {peak_rss} KiB");
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
    site.term_daemon();
}

#[test]
fn an_unknown_district_ca_is_a_tls_error_on_the_page() {
    let site = Site::build("unknown-ca");
    let pki = site.root().to_path_buf();
    // The broker's certificate from its CA, and another CA the gateway is told to trust.
    make_ca(&pki, "district-ca");
    make_leaf(&pki, "broker", "district-ca");
    make_ca(&pki, "other-ca");
    let district_port = site.district_port();
    let site = site
        .no_device_broker()
        .district_broker_with(&format!(
            "certfile {}\nkeyfile {}",
            pki.join("broker.pem").display(),
            pki.join("broker.key").display()
        ))
        .no_collector()
        .status()
        .config(|c| {
            c.upstream.url = format!("mqtts://127.0.0.1:{district_port}");
            c.upstream.ca_file = Some(pki.join("other-ca.pem"));
        })
        .start();
    let (status_port, log) = (site.status_port(), site.log_path());
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some_and(|s| s["link_problems"]["district"]["reason"] == "tls")),
        "log:\n{}",
        tail(&log, 30)
    );
    let l = log_text(&log);
    assert!(
        l.contains("ERROR") && l.contains("upstream.ca_file"),
        "{}",
        tail(&log, 30)
    );
    site.term_daemon();
}

#[test]
fn a_refused_client_certificate_is_a_tls_error_on_the_page() {
    let site = Site::build("refused-cert");
    let pki = site.root().to_path_buf();
    // The broker requires a client certificate from its own CA; the gateway presents one from
    // another (a box set up with the wrong district's key pair).
    make_ca(&pki, "district-ca");
    make_leaf(&pki, "broker", "district-ca");
    make_ca(&pki, "other-ca");
    make_leaf(&pki, "client", "other-ca");
    let district_port = site.district_port();
    let site = site
        .no_device_broker()
        .district_broker_with(&format!(
            "certfile {}\nkeyfile {}\ncafile {}\nrequire_certificate true",
            pki.join("broker.pem").display(),
            pki.join("broker.key").display(),
            pki.join("district-ca.pem").display()
        ))
        .no_collector()
        .status()
        .config(|c| {
            c.upstream.url = format!("mqtts://127.0.0.1:{district_port}");
            c.upstream.ca_file = Some(pki.join("district-ca.pem"));
            c.upstream.client_cert = Some(pki.join("client.pem"));
            c.upstream.client_key = Some(pki.join("client.key"));
        })
        .start();
    let (status_port, log) = (site.status_port(), site.log_path());
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some_and(|s| s["link_problems"]["district"]["reason"] == "tls")),
        "status: {:?}\nlog:\n{}",
        api_status(status_port).map(|s| s["link_problems"].clone()),
        tail(&log, 30)
    );
    let l = log_text(&log);
    assert!(
        l.contains("ERROR") && l.contains("upstream.client_cert"),
        "{}",
        tail(&log, 30)
    );
    assert_eq!(
        api_status(status_port).unwrap()["upstream"]["connected"],
        false
    );
    site.term_daemon();
}
