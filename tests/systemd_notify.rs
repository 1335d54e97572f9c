//! Under systemd (`Type=notify`): READY=1 once running, WATCHDOG=1 pings from the pipeline's
//! liveness at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM, exit 0.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn notifies_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let cfg = dir.path().join("gateway.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"notify-test\"\ndata_dir = \"{}\"\n[mqtt]\nenabled = false\n[upstream]\nenabled = false\n[status]\nenabled = false\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(
        std::env::var_os("ZHIAN_GATEWAY_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_zhian-gateway").into()),
    )
    .args(["run", "--config"])
    .arg(&cfg)
    .env("NOTIFY_SOCKET", &sock_path)
    .env("WATCHDOG_USEC", "1000000")
    .env_remove("WATCHDOG_PID")
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
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
    let started = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut rest = Vec::new();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(rest.iter().any(|m| m.contains("STOPPING=1")), "{rest:?}");
}
