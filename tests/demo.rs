//! `zhian-gateway demo`: the README's first command. It prints what it started, its page fills
//! with counts from the simulated site (MQTT doors and cameras through the embedded broker, the
//! Modbus TCP vehicle gate), and SIGTERM stops it cleanly. Uses the demo's fixed ports.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(
        std::env::var_os("ZHIAN_GATEWAY_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_zhian-gateway").into()),
    )
    .args(["demo", "--data-dir"])
    .arg(dir.path())
    .env("RUST_LOG", "warn")
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = serde_json::Value::Null;
    let ok = loop {
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
        let Some(body) = get("/api/status") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
            continue;
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
        if access > 0 && gate_online && doors >= 2 {
            break true;
        }
    };
    let page = get("/").unwrap_or_default();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    let mut printed = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .unwrap();
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
