//! Under systemd (`Type=notify`): READY=1 once running, WATCHDOG=1 pings from the pipeline's
//! liveness at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM, exit 0.

use crate::common;

use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

#[test]
fn notifies_ready_watchdog_and_stopping() {
    // A gateway with no input and no link: only its notifications matter.
    let b = Site::build("notify")
        .no_device_broker()
        .no_district_broker()
        .config(|c| {
            c.gateway.id = "notify-test".into();
            c.mqtt.enabled = false;
            c.upstream.enabled = false;
        });
    let sock_path = b.root().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let sock_env = sock_path.display().to_string();
    let site = b
        .env("NOTIFY_SOCKET", &sock_env)
        .env("WATCHDOG_USEC", "1000000")
        .start();
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && got.iter().filter(|m| m.contains("WATCHDOG=1")).count() < 3 {
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        got.first().is_some_and(|m| m.contains("READY=1")),
        "{got:?}"
    );
    assert!(
        got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 3,
        "{got:?}"
    );
    let (status, took) = site.term_daemon();
    assert!(status.success(), "{status:?}");
    assert!(took < Duration::from_secs(5));
    let mut rest = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(rest.iter().any(|m| m.contains("STOPPING=1")), "{rest:?}");
}
