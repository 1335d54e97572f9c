//! The upstream collector on the district broker, what it received, and summaries parsed.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{Client, Connection, Event as MqttEvent, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::*;

/// One message seen on the district broker.
#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// Wall clock (Unix ms) when the collector received it.
    pub at_ms: i64,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "upstream payload on {} is not JSON ({e}): {}",
                self.topic,
                self.text()
            )
        })
    }
}

/// Event loop of a collector: records every PUBLISH, re-subscribes after each CONNACK and
/// keeps reconnecting (with a pause) until the request channel closes or `stop` is set.
fn collector_loop(
    mut conn: Connection,
    client: Arc<Mutex<Option<Client>>>,
    filter: String,
    msgs: Arc<Mutex<Vec<Msg>>>,
    subscribed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    loop {
        match conn.recv() {
            // The request channel closed: the owner dropped the client.
            Err(_) => break,
            Ok(Ok(MqttEvent::Incoming(Incoming::ConnAck(_)))) => {
                if let Some(c) = client.lock().expect("client lock").as_ref() {
                    let _ = c.try_subscribe(filter.as_str(), QoS::AtLeastOnce);
                }
            }
            Ok(Ok(MqttEvent::Incoming(Incoming::SubAck(_)))) => {
                subscribed.store(true, Ordering::SeqCst);
            }
            Ok(Ok(MqttEvent::Incoming(Incoming::Publish(p)))) => {
                msgs.lock().expect("messages lock").push(Msg {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    retain: p.retain,
                    at_ms: now_ms(),
                });
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                subscribed.store(false, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Collects everything published under `zhian/district/#` on the district broker, through a
/// persistent session (clean_session = false, fixed client id) that survives broker restarts.
pub struct Upstream {
    msgs: Arc<Mutex<Vec<Msg>>>,
    client: Arc<Mutex<Option<Client>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Connects and subscribes; returns once the SUBACK arrived.
    pub fn start(port: u16, client_id: &str) -> Upstream {
        Self::start_opts(
            MqttOptions::new(client_id, "127.0.0.1", port),
            port,
            client_id,
        )
    }

    /// As [`Upstream::start`], with a username and password.
    pub fn start_with_credentials(port: u16, client_id: &str, user: &str, pw: &str) -> Upstream {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_credentials(user, pw);
        Self::start_opts(opts, port, client_id)
    }

    fn start_opts(mut opts: MqttOptions, port: u16, client_id: &str) -> Upstream {
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(16 << 20, 64 << 10);
        let (client, conn) = Client::new(opts, 64);
        let client = Arc::new(Mutex::new(Some(client)));
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (client, msgs, subscribed, stop) = (
                client.clone(),
                msgs.clone(),
                subscribed.clone(),
                stop.clone(),
            );
            thread::Builder::new()
                .name(format!("collector-{client_id}"))
                .spawn(move || {
                    collector_loop(
                        conn,
                        client,
                        "zhian/district/#".to_string(),
                        msgs,
                        subscribed,
                        stop,
                    )
                })
                .expect("spawn collector thread")
        };
        let upstream = Upstream {
            msgs,
            client,
            stop,
            thread: Some(thread),
        };
        assert!(
            wait_until(Duration::from_secs(10), || subscribed
                .load(Ordering::SeqCst)),
            "upstream collector could not subscribe on port {port}"
        );
        upstream
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().expect("messages lock").clone()
    }

    /// Messages on `{PREFIX}/{leaf}`.
    pub fn on(&self, leaf: &str) -> Vec<Msg> {
        let topic = format!("{PREFIX}/{leaf}");
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    pub fn summaries(&self) -> Vec<Summary> {
        self.on("summary").iter().map(Summary::parse).collect()
    }

    /// Per (window.start, window.secs), the summary with the highest rev (the platform's view).
    /// A rev sent in parts (`"part": i, "parts": n`) counts only once all its parts arrived,
    /// and then as the union of their rows.
    pub fn latest_revs(&self) -> BTreeMap<(i64, u64), Summary> {
        // (start, secs, rev) -> (parts expected, parts seen, merged summary)
        type Gathered = (u64, BTreeSet<u64>, Summary);
        let mut revs: BTreeMap<(i64, u64, u64), Gathered> = BTreeMap::new();
        for s in self.summaries() {
            let part = s.json["part"].as_u64();
            let parts = s.json["parts"].as_u64().unwrap_or(1);
            let e = revs.entry((s.start_ms, s.secs, s.rev)).or_insert_with(|| {
                (
                    parts,
                    BTreeSet::new(),
                    Summary {
                        counts: Vec::new(),
                        ..s.clone()
                    },
                )
            });
            if e.1.insert(part.unwrap_or(1)) {
                e.2.counts.extend(s.counts.iter().cloned());
            }
        }
        let mut best: BTreeMap<(i64, u64), Summary> = BTreeMap::new();
        for ((start, secs, rev), (parts, seen, s)) in revs {
            if seen.len() as u64 != parts {
                continue;
            }
            if best.get(&(start, secs)).is_none_or(|b| rev > b.rev) {
                best.insert((start, secs), s);
            }
        }
        best
    }

    /// Per (window start, kind, device, action, result): n of the highest-rev summary.
    pub fn window_totals(&self) -> WindowTotals {
        let mut out = WindowTotals::new();
        for ((start, _), s) in self.latest_revs() {
            for (key, n) in &s.counts {
                if *n > 0 {
                    *out.entry((start, key.clone())).or_default() += n;
                }
            }
        }
        out
    }

    /// Per (kind, device, action, result): the sum over windows of the highest-rev summaries.
    pub fn totals(&self) -> Totals {
        collapse(&self.window_totals())
    }

    pub fn latest_heartbeat(&self) -> Option<Value> {
        self.on("heartbeat").last().map(Msg::json)
    }

    /// `state` of the last status message received (live or retained).
    pub fn latest_status(&self) -> Option<String> {
        self.on("status")
            .last()
            .and_then(|m| m.json()["state"].as_str().map(str::to_string))
    }

    /// Contract violations in the summaries received so far (empty when all is well).
    pub fn summary_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen: BTreeMap<(i64, u64, u64), Vec<(Key, u64)>> = BTreeMap::new();
        for s in self.summaries() {
            let j = &s.json;
            if j["schema"] != "zhian.summary.v1" {
                problems.push(format!("bad schema: {j}"));
            }
            if j["gateway"] != GATEWAY_ID {
                problems.push(format!("bad gateway: {j}"));
            }
            if j["site"]["district"] != "富阳区" || j["site"]["compound"] != "春江花园" {
                problems.push(format!("site labels not copied: {j}"));
            }
            if !s.start_text.ends_with('Z') {
                problems.push(format!("window.start not UTC 'Z': {}", s.start_text));
            }
            let secs_ms = i64::try_from(s.secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            if s.secs == 0 || s.start_ms.rem_euclid(secs_ms) != 0 {
                problems.push(format!("window not epoch-aligned: {j}"));
            }
            if s.counts.is_empty() {
                problems.push(format!("empty window sent: {j}"));
            }
            if s.counts.iter().any(|(_, n)| *n == 0) {
                problems.push(format!("row with n = 0: {j}"));
            }
            let keys: Vec<&Key> = s.counts.iter().map(|(k, _)| k).collect();
            if keys.windows(2).any(|w| w[0] >= w[1]) {
                problems.push(format!(
                    "counts not sorted/unique by kind, device, action, result: {j}"
                ));
            }
            // Parts of one rev carry different rows by design: key them by part too.
            let part = j["part"].as_u64().unwrap_or(0);
            if let (Some(p), Some(n)) = (j["part"].as_u64(), j["parts"].as_u64()) {
                if p == 0 || p > n {
                    problems.push(format!("part {p} of {n}: {j}"));
                }
            }
            match seen.get(&(s.start_ms, s.secs, s.rev * 1_000_000 + part)) {
                Some(prev) if *prev != s.counts => problems.push(format!(
                    "two different summaries with the same window and rev: {prev:?} vs {j}"
                )),
                Some(_) => {}
                None => {
                    seen.insert(
                        (s.start_ms, s.secs, s.rev * 1_000_000 + part),
                        s.counts.clone(),
                    );
                }
            }
        }
        problems
    }

    /// Upstream payloads that contain any of `markers` (raw text or any decoded JSON string).
    pub fn subject_leaks(&self, markers: &[&str]) -> Vec<String> {
        let mut leaks = Vec::new();
        for m in self.messages() {
            let mut texts = vec![m.text()];
            if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                collect_strings(&v, &mut texts);
            }
            if texts
                .iter()
                .any(|t| markers.iter().any(|mk| t.contains(mk)))
            {
                leaks.push(format!("{}: {}", m.topic, m.text()));
            }
        }
        leaks
    }

    /// A short listing of what arrived, for failure messages.
    pub fn dump(&self) -> String {
        let msgs = self.messages();
        let from = msgs.len().saturating_sub(40);
        let mut out = format!(
            "{} upstream messages; the last {}:\n",
            msgs.len(),
            msgs.len() - from
        );
        for m in &msgs[from..] {
            let text = m.text();
            let short: String = text.chars().take(400).collect();
            out.push_str(&format!(
                "  [{}] {} retain={} {short}\n",
                m.at_ms, m.topic, m.retain
            ));
        }
        out
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(client) = self.client.lock().expect("client lock").take() {
            let _ = client.try_disconnect();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => {
            for (k, item) in map {
                out.push(k.clone());
                collect_strings(item, out);
            }
        }
        _ => {}
    }
}

/// The retained message on `topic`, read by a fresh clean-session client (None if none arrives
/// within about a second after the SUBACK, or if the broker is unreachable within `timeout`).
pub fn fetch_retained(port: u16, topic: &str, timeout: Duration) -> Option<Msg> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let id = format!(
        "probe-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(1));
    let (client, mut conn) = Client::new(opts, 10);
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .expect("queue subscribe");
    let mut deadline = Instant::now() + timeout;
    let mut found = None;
    while Instant::now() < deadline {
        match conn.recv() {
            Ok(Ok(MqttEvent::Incoming(Incoming::SubAck(_)))) => {
                deadline = deadline.min(Instant::now() + Duration::from_secs(1));
            }
            Ok(Ok(MqttEvent::Incoming(Incoming::Publish(p)))) if p.retain => {
                found = Some(Msg {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    retain: true,
                    at_ms: now_ms(),
                });
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => thread::sleep(Duration::from_millis(100)),
            Err(_) => break,
        }
    }
    let _ = client.try_disconnect();
    drop(client);
    found
}

/// Reads a heartbeat counter (`counters.<name>`).
pub fn hb_counter(hb: &Value, name: &str) -> Option<u64> {
    hb["counters"][name].as_u64()
}
