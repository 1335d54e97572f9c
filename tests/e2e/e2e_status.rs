//! End-to-end tests of the status page, JSON API and metrics: the real binary with real brokers,
//! the page rendered by headless Chromium, `/metrics` checked by `promtool`, Basic auth and the
//! non-loopback rule driven through HTTP and the CLI.

use crate::common;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;
use zhian_gateway::config::{Config, Secret};

const CHROMIUM: &str = "/usr/bin/chromium";
const PROMTOOL: &str = "/usr/bin/promtool";

/// GET, failing the test on a transport error.
fn get(port: u16, path: &str) -> Reply {
    http(port, "GET", path, None).unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// GET `/api/status` as JSON (None on a transport error or a non-200 answer).
fn try_status(port: u16, auth: Option<(&str, &str)>) -> Option<Value> {
    let reply = http(port, "GET", "/api/status", auth).ok()?;
    if reply.status != 200 {
        return None;
    }
    serde_json::from_slice(&reply.body).ok()
}

// ---------------------------------------------------------------------------------------------
// Sites with the status page on
// ---------------------------------------------------------------------------------------------

/// Starts a site whose daemon serves the status page on a fresh port (`edit` changes the
/// config); returns once `/healthz` answers 200 and the gateway is online upstream.
fn status_site(name: &str, edit: impl FnOnce(&mut Config)) -> (Site, u16) {
    let site = Site::build(name)
        .status()
        .config(edit)
        .ready(Ready::Healthz)
        .start();
    site.wait_ready(Ready::Upstream);
    let port = site.status_port();
    (site, port)
}

/// Fails the test, pointing at the install script, when a tool the tests run is missing.
fn require_tool(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing (Debian package `{package}`): run scripts/test-deps.sh"
    );
}

/// Runs `cmd` (stdin from `input`, stdout and stderr to files in `scratch`) until it exits or
/// `timeout` passes (then kills it and fails the test).
fn run_with_timeout(
    mut cmd: Command,
    what: &str,
    input: Option<&[u8]>,
    scratch: &Path,
    timeout: Duration,
) -> (ExitStatus, String, String) {
    let out_path = scratch.join(format!("{what}.stdout"));
    let err_path = scratch.join(format!("{what}.stderr"));
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(File::create(&out_path).expect("create stdout file"))
    .stderr(File::create(&err_path).expect("create stderr file"));
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    if let Some(bytes) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write stdin of {what}: {e}"));
    }
    let Some(status) = wait_child(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "{what} still running after {timeout:?}; stderr:\n{}",
            tail(&err_path, 40)
        );
    };
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    (status, read(&out_path), read(&err_path))
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium
// ---------------------------------------------------------------------------------------------

/// Runs headless Chromium (a fresh profile and HOME under `scratch`) with `args`; returns stdout.
fn chromium(scratch: &Path, what: &str, args: &[&str]) -> String {
    require_tool(CHROMIUM, "chromium");
    let home = scratch.join(format!("chromium-{what}"));
    fs::create_dir_all(&home).expect("create chromium home");
    let mut cmd = Command::new(CHROMIUM);
    cmd.env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
        ])
        .arg(format!(
            "--user-data-dir={}",
            home.join("profile").display()
        ))
        .args(args);
    let (status, stdout, stderr) = run_with_timeout(
        cmd,
        &format!("chromium-{what}"),
        None,
        scratch,
        Duration::from_secs(30),
    );
    assert!(
        status.success(),
        "chromium {args:?}: {status}\nstderr (tail):\n{}",
        last_lines(&stderr, 30)
    );
    stdout
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The DOM Chromium rendered for `url`.
/// Serves `html` to every request on a loopback port for a minute, from a thread; returns the
/// URL (`http://localhost:PORT/`).
fn serve_once(html: String) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind wrapper server");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let until = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < until {
            match listener.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf);
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{html}",
                        html.len()
                    );
                }
                Err(_) => break,
            }
        }
    });
    format!("http://localhost:{port}/")
}

fn dump_dom(scratch: &Path, what: &str, url: &str) -> String {
    let dom = chromium(scratch, what, &["--dump-dom", url]);
    assert!(
        dom.contains("<html") && dom.contains("</html>"),
        "chromium --dump-dom {url} gave no document:\n{dom}"
    );
    dom
}

// ---------------------------------------------------------------------------------------------
// Looking into HTML without a parser
// ---------------------------------------------------------------------------------------------

/// Every start tag (`<...>`) that contains `needle`.
fn tags_with<'a>(html: &'a str, needle: &str) -> Vec<(usize, &'a str)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = html[from..].find(needle) {
        let at = from + pos;
        let start = html[..at].rfind('<').unwrap_or(0);
        let end = html[at..].find('>').map_or(html.len(), |e| at + e + 1);
        out.push((end, &html[start..end]));
        from = at + needle.len();
    }
    out
}

/// The first non-blank text after the end of a start tag (skipping nested tags).
fn text_after(html: &str, tag_end: usize) -> String {
    let mut rest = &html[tag_end..];
    loop {
        let text_end = rest.find('<').unwrap_or(rest.len());
        let text = rest[..text_end].trim();
        if !text.is_empty() || text_end == rest.len() {
            return text.to_string();
        }
        rest = &rest[text_end..];
        match rest.find('>') {
            Some(e) => rest = &rest[e + 1..],
            None => return String::new(),
        }
    }
}

/// The text of the element carrying `data-count="<key>"`.
fn count_text(html: &str, key: &str) -> Option<String> {
    let needle = format!("data-count=\"{key}\"");
    tags_with(html, &needle)
        .first()
        .map(|(end, _)| text_after(html, *end))
}

/// Resource references to the internet: `src=`/`href=` (and CSS `url(`/`@import`) to http(s).
fn internet_refs(html: &str) -> Vec<String> {
    let lower = html.to_ascii_lowercase();
    let mut out = Vec::new();
    for attr in ["src=", "href=", "url(", "@import", "action="] {
        let mut from = 0;
        while let Some(pos) = lower[from..].find(attr) {
            let at = from + pos + attr.len();
            let value = lower[at..].trim_start_matches([' ', '"', '\'']);
            if value.starts_with("http://")
                || value.starts_with("https://")
                || value.starts_with("//")
            {
                let end = (at + 80).min(lower.len());
                let end = (end..=lower.len())
                    .find(|i| lower.is_char_boundary(*i))
                    .unwrap_or(lower.len());
                out.push(lower[from + pos..end].to_string());
            }
            from = at;
        }
    }
    out
}

/// Subject markers found in `text`.
fn subject_hits(text: &str) -> Vec<&'static str> {
    SUBJECT_MARKERS
        .iter()
        .copied()
        .filter(|m| text.contains(m))
        .collect()
}

/// What a manager must see on the page (served HTML or Chromium's DOM), in one language.
fn page_problems(html: &str, lang: &str, counts: &[(&str, u64)], devices: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    if !html.contains(&format!("<html lang=\"{lang}\"")) {
        problems.push(format!("no <html lang=\"{lang}\">"));
    }
    for device in devices {
        let tags = tags_with(html, &format!("data-device=\"{device}\""));
        if tags.is_empty() {
            problems.push(format!("no element with data-device=\"{device}\""));
        } else if !tags.iter().any(|(_, t)| t.contains("data-online=\"true\"")) {
            problems.push(format!(
                "device {device} not data-online=\"true\": {:?}",
                tags.iter().map(|(_, t)| *t).collect::<Vec<_>>()
            ));
        }
    }
    for (key, want) in counts {
        match count_text(html, key) {
            None => problems.push(format!("no element with data-count=\"{key}\"")),
            Some(text) if text.parse::<u64>().ok() != Some(*want) => problems.push(format!(
                "data-count=\"{key}\" shows {text:?}, expected {want}"
            )),
            Some(_) => {}
        }
    }
    let chart = tags_with(html, "data-chart=\"hourly\"");
    if !chart.iter().any(|(_, t)| t.starts_with("<svg")) {
        problems.push(format!(
            "no <svg data-chart=\"hourly\"> (tags with it: {:?})",
            chart.iter().map(|(_, t)| *t).collect::<Vec<_>>()
        ));
    }
    if tags_with(html, "data-upstream=\"connected\"").is_empty() {
        problems.push(format!(
            "no data-upstream=\"connected\" (found: {:?})",
            tags_with(html, "data-upstream=")
                .iter()
                .map(|(_, t)| *t)
                .collect::<Vec<_>>()
        ));
    }
    let pending = tags_with(html, "data-pending-summaries=\"");
    let pending_ok = pending.iter().any(|(_, t)| {
        t.split("data-pending-summaries=\"")
            .nth(1)
            .and_then(|v| v.split('"').next())
            .is_some_and(|v| v.parse::<u64>().is_ok())
    });
    if !pending_ok {
        problems.push(format!(
            "no data-pending-summaries=\"<n>\" (found: {:?})",
            pending.iter().map(|(_, t)| *t).collect::<Vec<_>>()
        ));
    }
    let labels: &[&str] = if lang == "en" {
        &["Today", "Entries", "Exits", "Devices", "Online"]
    } else {
        &["今日", "进入", "离开", "设备", "在线", "上级平台"]
    };
    for label in labels {
        if !html.contains(label) {
            problems.push(format!("label {label:?} missing"));
        }
    }
    for hit in subject_hits(html) {
        problems.push(format!("subject marker {hit:?} on the page"));
    }
    for r in internet_refs(html) {
        problems.push(format!("resource from the internet: {r}"));
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// /api/status
// ---------------------------------------------------------------------------------------------

/// Keys of the documented `/api/status` shape that are missing.
fn status_shape_problems(v: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let mut need = |path: &str, ok: bool| {
        if !ok {
            problems.push(format!("{path} missing or of the wrong type"));
        }
    };
    for key in ["id", "district", "street", "community", "compound"] {
        need(&format!("gateway.{key}"), v["gateway"].get(key).is_some());
    }
    need("version", v["version"].is_string());
    need("uptime_secs", v["uptime_secs"].is_u64());
    need("now", v["now"].is_string());
    for kind in ["access", "vehicle", "camera"] {
        need(&format!("today.{kind}"), v["today"][kind].is_object());
    }
    let hourly = v["hourly"].as_array();
    need("hourly (24 entries)", hourly.is_some_and(|h| h.len() == 24));
    for (i, h) in hourly.into_iter().flatten().enumerate() {
        for key in ["start", "access", "vehicle", "camera"] {
            need(&format!("hourly[{i}].{key}"), h.get(key).is_some());
        }
    }
    need("devices", v["devices"].is_array());
    for (i, d) in v["devices"].as_array().into_iter().flatten().enumerate() {
        for key in [
            "kind",
            "name",
            "source",
            "online",
            "last_seen",
            "last_error",
            "states",
        ] {
            need(&format!("devices[{i}].{key}"), d.get(key).is_some());
        }
        need(&format!("devices[{i}].online"), d["online"].is_boolean());
    }
    need(
        "upstream.connected",
        v["upstream"]["connected"].is_boolean(),
    );
    need(
        "upstream.pending_summaries",
        v["upstream"]["pending_summaries"].is_u64(),
    );
    need(
        "upstream.pending_alerts",
        v["upstream"]["pending_alerts"].is_u64(),
    );
    need(
        "upstream.oldest_pending_window",
        v["upstream"].get("oldest_pending_window").is_some(),
    );
    for key in ["bytes", "raw_events", "dedup_keys"] {
        need(&format!("store.{key}"), v["store"][key].is_u64());
    }
    need("counters", v["counters"].is_object());
    need("recent_alerts", v["recent_alerts"].is_array());
    for (i, a) in v["recent_alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        for key in ["at", "kind", "device", "action", "id"] {
            need(&format!("recent_alerts[{i}].{key}"), a.get(key).is_some());
        }
    }
    need("recent_rejects", v["recent_rejects"].is_array());
    for (i, r) in v["recent_rejects"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        for key in ["at", "topic", "reason"] {
            need(&format!("recent_rejects[{i}].{key}"), r.get(key).is_some());
        }
    }
    problems
}

/// `today.<kind>.<action>` (0 when absent).
fn today(v: &Value, kind: &str, action: &str) -> u64 {
    v["today"][kind][action].as_u64().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Prometheus text
// ---------------------------------------------------------------------------------------------

/// One sample: metric name, labels, value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of the Prometheus text format (comments skipped).
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = line[..name_end].to_string();
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(inner) = rest.strip_prefix('{') {
            // key="value" pairs; values may hold escaped quotes.
            let mut chars = inner.char_indices().peekable();
            let mut key = String::new();
            let mut end = inner.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        let mut value = String::new();
                        chars.next(); // opening quote
                        while let Some((_, c)) = chars.next() {
                            match c {
                                '\\' => {
                                    if let Some((_, e)) = chars.next() {
                                        value.push(if e == 'n' { '\n' } else { e });
                                    }
                                }
                                '"' => break,
                                c => value.push(c),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    c => key.push(c),
                }
            }
            rest = &inner[end..];
        }
        let value_text = rest.split_whitespace().next().unwrap_or("");
        let value = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse::<f64>().unwrap_or(f64::NAN),
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Sum of the samples named `name` whose labels include every pair of `labels` (None if none).
fn metric(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}

fn f(n: u64) -> f64 {
    // Small counts only: exact in f64.
    f64::from(u32::try_from(n).expect("small count"))
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

#[test]
fn status_page_in_chromium() {
    require_tool(CHROMIUM, "chromium");
    let (site, port) = status_site("status-page", |c| {
        c.status.timezone = zhian_gateway::config::UtcOffset(8 * 3600);
        c.status.max_connections = 32;
    });
    let scratch = site.root.join("status-test");
    fs::create_dir_all(&scratch).expect("create scratch dir");

    let mut publisher = site.publisher();
    let mut send = |e: Event| publisher.send(&e.topic(), e.payload());
    for i in 0..3 {
        send(
            Event::new("access", "door-1", &format!("door-1-in-{i}"), "entry")
                .result("granted")
                .subject(&format!("card:SUBJ1000{i}")),
        );
    }
    for i in 0..2 {
        send(
            Event::new("access", "door-1", &format!("door-1-out-{i}"), "exit")
                .result("granted")
                .subject(&format!("card:SUBJ2000{i}")),
        );
    }
    for i in 0..2 {
        send(
            Event::new("vehicle", "gate-1", &format!("gate-1-in-{i}"), "entry")
                .subject(&format!("plate:浙A·SUBJ300{i}")),
        );
    }
    send(Event::new("vehicle", "gate-1", "gate-1-out-0", "exit").subject("plate:浙A·SUBJ4000"));
    send(Event::new("camera", "cam-1", "cam-1-stranger-0", "stranger").subject("face:SUBJ5000"));
    send(Event::new(
        "camera",
        "cam-1",
        "cam-1-fire-0",
        "fire_lane_blocked",
    ));
    // A reject that carries a subject: listed in recent_rejects, its subject never shown.
    send(Event::new("access", "door-1", "door-1-bad-0", "NOT-AN-ACTION!").subject("card:SUBJ9999"));
    publisher.wait_all_acked(Duration::from_secs(10));

    let expected: [(&str, &str, u64); 6] = [
        ("access", "entry", 3),
        ("access", "exit", 2),
        ("vehicle", "entry", 2),
        ("vehicle", "exit", 1),
        ("camera", "stranger", 1),
        ("camera", "fire_lane_blocked", 1),
    ];
    let mut last = Value::Null;
    let settled = wait_until(Duration::from_secs(20), || {
        let Some(v) = try_status(port, None) else {
            return false;
        };
        last = v;
        expected
            .iter()
            .all(|(kind, action, n)| today(&last, kind, action) == *n)
            && last["recent_alerts"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x["action"] == "fire_lane_blocked" && x["id"] == "cam-1-fire-0")
            })
            && last["recent_rejects"]
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x["topic"] == "zhian/access/door-1"))
    });
    assert!(
        settled,
        "/api/status did not reach today's counts {expected:?}, the fire_lane_blocked alert and \
         the reject within 20 s; last:\n{last:#}"
    );

    // The JSON API: documented shape and the values behind the page.
    let api = get(port, "/api/status");
    assert_eq!(api.status, 200, "{}", api.text());
    assert!(
        api.header("content-type")
            .is_some_and(|t| t.contains("application/json")),
        "/api/status content-type: {:?}",
        api.header("content-type")
    );
    let status = api.json();
    let problems = status_shape_problems(&status);
    assert!(
        problems.is_empty(),
        "/api/status shape:\n{}\n{status:#}",
        problems.join("\n")
    );
    assert_eq!(status["gateway"]["id"], GATEWAY_ID, "{status:#}");
    assert_eq!(status["gateway"]["district"], "富阳区", "{status:#}");
    assert_eq!(status["gateway"]["compound"], "春江花园", "{status:#}");
    assert_eq!(status["upstream"]["connected"], true, "{status:#}");
    for (kind, name) in [
        ("access", "door-1"),
        ("vehicle", "gate-1"),
        ("camera", "cam-1"),
    ] {
        let device = status["devices"]
            .as_array()
            .and_then(|ds| ds.iter().find(|d| d["name"] == name))
            .unwrap_or_else(|| panic!("device {name} not in /api/status: {status:#}"));
        assert_eq!(device["kind"], kind, "{device}");
        assert_eq!(device["source"], "mqtt", "{device}");
        assert_eq!(device["online"], true, "{device}");
        assert!(!device["last_seen"].is_null(), "{device}");
    }
    let alerts = status["recent_alerts"].as_array().expect("recent_alerts");
    let fire = alerts
        .iter()
        .find(|a| a["id"] == "cam-1-fire-0")
        .expect("the fire_lane_blocked alert");
    assert_eq!(fire["kind"], "camera", "{fire}");
    assert_eq!(fire["device"], "cam-1", "{fire}");
    assert_eq!(fire["action"], "fire_lane_blocked", "{fire}");
    assert!(
        !alerts.iter().any(|a| a["action"] == "stranger"),
        "stranger is not in alerts.actions, yet listed as an alert: {alerts:?}"
    );
    let hourly_total: u64 = status["hourly"]
        .as_array()
        .expect("hourly")
        .iter()
        .map(|h| {
            ["access", "vehicle", "camera"]
                .iter()
                .map(|k| h[*k].as_u64().unwrap_or(0))
                .sum::<u64>()
        })
        .sum();
    assert_eq!(
        hourly_total, 10,
        "the hourly buckets hold the 10 accepted events: {:#}",
        status["hourly"]
    );
    if let Some(hb) = site.upstream().latest_heartbeat() {
        let want: Vec<&String> = hb["counters"]
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        let have = status["counters"].as_object().expect("counters object");
        let missing: Vec<&&String> = want.iter().filter(|k| !have.contains_key(**k)).collect();
        assert!(
            missing.is_empty(),
            "/api/status counters lack heartbeat counters {missing:?}: {:#}",
            status["counters"]
        );
    }
    let hits = subject_hits(&api.text());
    assert!(hits.is_empty(), "subjects in /api/status: {hits:?}");

    // The served page, before any browser: language, refresh, no subject, no internet.
    let counts: Vec<(String, u64)> = expected
        .iter()
        .map(|(k, a, n)| (format!("{k}:{a}"), *n))
        .collect();
    let counts: Vec<(&str, u64)> = counts.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    let devices = ["door-1", "gate-1", "cam-1"];
    for (path, lang) in [("/", "zh-CN"), ("/?lang=en", "en")] {
        let page = get(port, path);
        assert_eq!(page.status, 200, "GET {path}: {}", page.text());
        assert!(
            page.header("content-type")
                .is_some_and(|t| t.contains("text/html")),
            "GET {path} content-type: {:?}",
            page.header("content-type")
        );
        let html = page.text();
        let mut problems = page_problems(&html, lang, &counts, &devices);
        if !html
            .to_ascii_lowercase()
            .contains("<meta http-equiv=\"refresh\"")
        {
            problems.push("no <meta http-equiv=\"refresh\">".to_string());
        }
        assert!(
            problems.is_empty(),
            "served page {path}:\n{}\n----\n{html}",
            problems.join("\n")
        );
    }

    // What a manager sees: the DOM Chromium renders.
    let base = format!("http://127.0.0.1:{port}");
    for (path, lang, what) in [("/", "zh-CN", "zh"), ("/?lang=en", "en", "en")] {
        let dom = dump_dom(&scratch, what, &format!("{base}{path}"));
        let problems = page_problems(&dom, lang, &counts, &devices);
        assert!(
            problems.is_empty(),
            "page {path} as rendered by chromium:\n{}\n----\n{dom}",
            problems.join("\n")
        );
    }

    // The screenshot for the README (committed only when asked for).
    let shot: PathBuf = if std::env::var("ZHIAN_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
        fs::create_dir_all(&docs).expect("create docs/");
        docs.join("status-page.png")
    } else {
        scratch.join("status-page.png")
    };
    let _ = fs::remove_file(&shot);
    chromium(
        &scratch,
        "screenshot",
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1280,900",
            &format!("{base}/"),
        ],
    );
    let png = fs::read(&shot).unwrap_or_else(|e| panic!("screenshot {}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        shot.display()
    );
    assert!(
        png.len() > 10 * 1024,
        "screenshot {} is only {} bytes (an empty page?)",
        shot.display(),
        png.len()
    );

    // On a phone (390 px wide, an iPhone 12-15): nothing runs off the side, chart labels stay
    // readable. Measured in Chromium: the page's HTML, fetched by a wrapper page (served from
    // another loopback port; web security off for that, in this throwaway profile only), laid
    // out in a 390 px iframe's srcdoc, since the page itself refuses to be framed
    // (X-Frame-Options, frame-ancestors) and runs no script (its CSP); it needs nothing from
    // its origin (inline CSS and SVG).
    for (path, what) in [("/", "phone-zh"), ("/?lang=en", "phone-en")] {
        let wrapper = serve_once(
            format!(
                "<html><body style=\"margin:0\"><iframe id=\"f\" style=\"width:390px;height:844px;border:0\"></iframe>\
                 <script>fetch('{base}{path}').then(function(r){{return r.text()}}).then(function(t){{document.getElementById('f').srcdoc=t}});\
                 document.getElementById('f').onload=function(){{var d=this.contentDocument;\
                 var h=[].slice.call(d.querySelectorAll('svg text')).map(function(t){{return t.getBoundingClientRect().height}});\
                 document.body.setAttribute('data-scroll-width',d.documentElement.scrollWidth);\
                 document.body.setAttribute('data-min-label',h.length?Math.min.apply(null,h).toFixed(1):'none');}};</script></body></html>"
            ),
        );
        let dom = chromium(
            &scratch,
            what,
            &[
                "--disable-web-security",
                "--disable-site-isolation-trials",
                "--virtual-time-budget=10000",
                "--dump-dom",
                &wrapper,
            ],
        );
        let attr = |name: &str| -> String {
            let key = format!("{name}=\"");
            let at = dom
                .find(&key)
                .unwrap_or_else(|| panic!("{name} not measured:\n{dom}"));
            dom[at + key.len()..]
                .split('"')
                .next()
                .unwrap_or("")
                .to_string()
        };
        let width: f64 = attr("data-scroll-width").parse().unwrap();
        assert!(
            width <= 390.0,
            "{path} is {width} px wide on a 390 px phone"
        );
        let label: f64 = attr("data-min-label").parse().unwrap();
        assert!(
            label >= 9.0,
            "{path}: chart labels {label} px high on a phone"
        );
        eprintln!("phone {path}: width {width} px, smallest chart label {label} px");
    }
    let phone_shot: PathBuf = shot.with_file_name("status-page-phone.png");
    let _ = fs::remove_file(&phone_shot);
    chromium(
        &scratch,
        "screenshot-phone",
        &[
            &format!("--screenshot={}", phone_shot.display()),
            "--window-size=390,844",
            &format!("{base}/"),
        ],
    );
    assert!(fs::read(&phone_shot).is_ok_and(|p| p.starts_with(b"\x89PNG")));
    assert!(
        site.daemon_exited().is_none(),
        "daemon exited during the test"
    );
}

#[test]
fn metrics_pass_promtool() {
    require_tool(PROMTOOL, "prometheus");
    let (site, port) = status_site("status-metrics", |_| {});
    let scratch = site.root.join("metrics-test");
    fs::create_dir_all(&scratch).expect("create scratch dir");

    // 5 accepted access events (2 re-sent), 2 accepted vehicle events, 1 rejected access message.
    let access: Vec<Event> = (0..5)
        .map(|i| {
            let (device, action) = if i < 3 {
                ("door-1", "entry")
            } else {
                ("door-2", "exit")
            };
            Event::new("access", device, &format!("{device}-m-{i}"), action)
                .result("granted")
                .subject(&format!("card:SUBJ{i:05}"))
        })
        .collect();
    let mut publisher = site.publisher();
    for e in &access {
        publisher.send(&e.topic(), e.payload());
    }
    for e in &access[..2] {
        publisher.send(&e.topic(), e.payload());
    }
    for i in 0..2 {
        let e = Event::new("vehicle", "gate-1", &format!("gate-1-m-{i}"), "entry");
        publisher.send(&e.topic(), e.payload());
    }
    publisher.send(
        "zhian/access/door-1",
        br#"{"ts": 0, "action": "entry"}"#.to_vec(),
    );
    publisher.wait_all_acked(Duration::from_secs(10));

    let mut body = String::new();
    let settled = wait_until(Duration::from_secs(20), || {
        let Ok(reply) = http(port, "GET", "/metrics", None) else {
            return false;
        };
        if reply.status != 200 {
            return false;
        }
        body = reply.text();
        let samples = parse_metrics(&body);
        let events = |kind: &str, outcome: &str| {
            metric(
                &samples,
                "zhian_events_total",
                &[("kind", kind), ("outcome", outcome)],
            )
        };
        events("access", "accepted") == Some(f(5))
            && events("access", "duplicate") == Some(f(2))
            && events("vehicle", "accepted") == Some(f(2))
            && metric(&samples, "zhian_device_up", &[("device", "door-2")]) == Some(1.0)
    });
    assert!(
        settled,
        "/metrics did not show 5 accepted and 2 duplicate access events, 2 accepted vehicle \
         events and door-2 up within 20 s; last body:\n{body}"
    );

    let metrics = get(port, "/metrics");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "/metrics content-type: {:?}",
        metrics.header("content-type")
    );
    let body = metrics.text();
    let samples = parse_metrics(&body);
    assert_eq!(
        metric(
            &samples,
            "zhian_events_total",
            &[("kind", "access"), ("outcome", "accepted")]
        ),
        Some(f(5)),
        "zhian_events_total{{kind=\"access\",outcome=\"accepted\"}}:\n{body}"
    );
    let mut missing = Vec::new();
    for name in [
        "zhian_events_total",
        "zhian_outbox_pending",
        "zhian_upstream_connected",
        "zhian_device_up",
        "zhian_store_bytes",
        "zhian_commit_duration_seconds_bucket",
        "zhian_commit_duration_seconds_sum",
        "zhian_commit_duration_seconds_count",
    ] {
        if metric(&samples, name, &[]).is_none() {
            missing.push(name);
        }
    }
    if !body.contains("# TYPE zhian_commit_duration_seconds histogram") {
        missing.push("# TYPE zhian_commit_duration_seconds histogram");
    }
    assert!(
        missing.is_empty(),
        "missing from /metrics: {missing:?}\n{body}"
    );
    assert_eq!(
        metric(&samples, "zhian_upstream_connected", &[]),
        Some(1.0),
        "{body}"
    );
    for device in ["door-1", "door-2", "gate-1"] {
        assert_eq!(
            metric(&samples, "zhian_device_up", &[("device", device)]),
            Some(1.0),
            "zhian_device_up{{device=\"{device}\"}}:\n{body}"
        );
    }
    assert!(
        metric(&samples, "zhian_store_bytes", &[]).is_some_and(|b| b > 0.0),
        "zhian_store_bytes:\n{body}"
    );
    assert!(
        metric(&samples, "zhian_commit_duration_seconds_count", &[]).is_some_and(|n| n >= 1.0),
        "commits happened, yet zhian_commit_duration_seconds_count is not >= 1:\n{body}"
    );
    let hits = subject_hits(&body);
    assert!(hits.is_empty(), "subjects in /metrics: {hits:?}");

    let (status, stdout, stderr) = run_with_timeout(
        {
            let mut cmd = Command::new(PROMTOOL);
            cmd.args(["check", "metrics"]);
            cmd
        },
        "promtool",
        Some(body.as_bytes()),
        &scratch,
        Duration::from_secs(20),
    );
    assert!(
        status.success(),
        "promtool check metrics: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}\nbody:\n{body}"
    );
    assert!(
        site.daemon_exited().is_none(),
        "daemon exited during the test"
    );
}

#[test]
fn basic_auth_and_non_loopback_rule() {
    assert_eq!(
        base64(b"Aladdin:open sesame"),
        "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    );
    assert_eq!(base64(b"ab"), "YWI=");
    let scratch_dir = tempfile::Builder::new()
        .prefix("zhian-e2e-status-auth-")
        .tempdir()
        .expect("create tempdir");
    let scratch = scratch_dir.path();
    const USER: &str = "wuye";
    const PASSWORD: &str = "春江-guard-2026";

    // hash-password: one line on stdin, a PHC argon2 string on stdout.
    let (status, stdout, stderr) = run_with_timeout(
        {
            let mut cmd = Command::new(common::gateway_bin());
            cmd.arg("hash-password");
            cmd
        },
        "hash-password",
        Some(format!("{PASSWORD}\n").as_bytes()),
        scratch,
        Duration::from_secs(20),
    );
    assert_eq!(
        status.code(),
        Some(0),
        "hash-password: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let hash = stdout.trim().to_string();
    assert!(
        hash.starts_with("$argon2") && !hash.contains('\n') && !hash.contains(PASSWORD),
        "hash-password printed no single-line PHC argon2 hash: {stdout:?}"
    );

    // The non-loopback rule, through check-config (and run, which must not start).
    let data = scratch.join("data");
    let mut open = test_config(&data, free_port(), free_port());
    open.status.enabled = true;
    open.status.listen = format!("0.0.0.0:{}", free_port());
    let no_creds = scratch.join("open-no-creds.toml");
    write_config(&no_creds, &open);
    let creds = |c: &mut Config| {
        c.status.username = Some(USER.into());
        c.status.password_hash = Some(Secret(hash.clone()));
    };
    creds(&mut open);
    let with_creds = scratch.join("open-with-creds.toml");
    write_config(&with_creds, &open);
    for command in ["check-config", "run"] {
        let args = [
            OsStr::new(command),
            OsStr::new("--config"),
            no_creds.as_os_str(),
        ];
        let out = run_cli(&args, scratch, Duration::from_secs(15));
        assert_eq!(
            out.status.code(),
            Some(78),
            "{command} with status.listen 0.0.0.0 and no credentials: {}\nstderr:\n{}",
            out.status,
            out.stderr
        );
        assert!(
            out.stderr.contains("status.username"),
            "{command}: stderr does not name status.username:\n{}",
            out.stderr
        );
    }
    let out = check_config(&with_creds, scratch);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config with status.listen 0.0.0.0 and credentials: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    assert!(
        !out.stdout.contains(&hash) && !out.stderr.contains(&hash),
        "check-config must redact status.password_hash:\n{}",
        out.stdout
    );

    // A running daemon with credentials.
    let (site, port) = status_site("status-auth", creds);
    let right = Some((USER, PASSWORD));
    let wrong_password = Some((USER, "not-the-password"));
    let wrong_user = Some(("admin", PASSWORD));
    for path in ["/", "/?lang=en", "/api/status", "/metrics"] {
        for (label, auth) in [
            ("without credentials", None),
            ("with a wrong password", wrong_password),
            ("with a wrong user", wrong_user),
        ] {
            let reply = http(port, "GET", path, auth).expect("HTTP");
            assert_eq!(reply.status, 401, "GET {path} {label}: {}", reply.text());
            assert!(
                reply
                    .header("www-authenticate")
                    .is_some_and(|v| v.to_ascii_lowercase().starts_with("basic")),
                "GET {path} {label}: WWW-Authenticate is {:?}",
                reply.header("www-authenticate")
            );
            let hits = subject_hits(&reply.text());
            assert!(hits.is_empty(), "401 body carries {hits:?}");
        }
        let reply = http(port, "GET", path, right).expect("HTTP");
        assert_eq!(
            reply.status,
            200,
            "GET {path} with the right credentials: {}",
            reply.text()
        );
    }
    let healthz = get(port, "/healthz");
    assert_eq!(
        healthz.status,
        200,
        "/healthz needs no credentials: {}",
        healthz.text()
    );
    let status = try_status(port, right).expect("/api/status with credentials");
    assert!(
        !status.to_string().contains(&hash),
        "/api/status shows the password hash"
    );

    // Read-only: any other method is 405 (credentials given, so auth is not what answers).
    for (method, path) in [
        ("POST", "/"),
        ("PUT", "/api/status"),
        ("DELETE", "/api/status"),
        ("POST", "/metrics"),
        ("PATCH", "/"),
    ] {
        let reply = http(port, method, path, right).expect("HTTP");
        assert_eq!(reply.status, 405, "{method} {path}: {}", reply.text());
    }
    let reply = http(port, "POST", "/healthz", None).expect("HTTP");
    assert_eq!(reply.status, 405, "POST /healthz: {}", reply.text());
    assert!(
        site.daemon_exited().is_none(),
        "daemon exited during the test"
    );
}
