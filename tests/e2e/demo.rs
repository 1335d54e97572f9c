//! `zhian-gateway demo`: the README's first command. It prints what it started, its page fills
//! with counts from the simulated site (MQTT doors and cameras through the embedded broker, the
//! Modbus TCP vehicle gate), and SIGTERM stops it cleanly. Uses the demo's fixed ports.

use crate::common;

use common::*;
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::time::Duration;

fn get(path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect("127.0.0.1:8080").ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

#[test]
fn demo_site_fills_its_status_page() {
    // The demo is a whole site of its own (embedded broker, simulated devices, its page): the
    // harness only runs the command and keeps its output.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let data = dir.path().join("data");
    let args = [
        OsStr::new("demo"),
        OsStr::new("--data-dir"),
        data.as_os_str(),
    ];
    let mut demo = Daemon::start_args(&args, &log, &[("RUST_LOG", "warn")]);
    let mut last = serde_json::Value::Null;
    let ok = wait_until(Duration::from_secs(60), || {
        let Some(body) = get("/api/status") else {
            return false;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            return false;
        };
        last = v.clone();
        let access: u64 = ["entry", "exit"]
            .iter()
            .filter_map(|a| v["today"]["access"][a].as_u64())
            .sum();
        let gate_online = v["devices"].as_array().is_some_and(|d| {
            d.iter()
                .any(|x| x["name"] == "gate-east" && x["online"] == true && x["source"] == "modbus")
        });
        let doors = v["devices"]
            .as_array()
            .map_or(0, |d| d.iter().filter(|x| x["source"] == "mqtt").count());
        access > 0 && gate_online && doors >= 2
    });
    let page = get("/").unwrap_or_default();
    let (status, _) = demo.term();
    let printed = log_text(&log);
    assert!(
        ok,
        "the demo's page did not fill within 60 s; last /api/status: {last}"
    );
    assert!(
        page.contains("今日统计") && page.contains("gate-east"),
        "{page}"
    );
    assert!(printed.contains("http://127.0.0.1:8080/"), "{printed}");
    assert!(status.success(), "{status:?}");
}
