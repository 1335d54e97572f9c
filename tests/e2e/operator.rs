//! What an operator sees, through the real binary: both links on the page, the API, `/healthz`
//! and the metrics while a real site broker is stopped and started again; device health by
//! cadence (`[health]`), remembered across a restart; log lines journald files at the right
//! priority, one per state change; `check-config` naming what an installer gets wrong.

use crate::common;

use common::*;
use std::fs;
use std::time::Duration;
use zhian_gateway::config::Dur;

/// The tests run as root in CI (the package and tmpfs tests need it); the "as another user"
/// checks need it too.
fn unsafe_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn a_dead_site_broker_shows_on_every_surface_and_logs_once() {
    let mut site = Site::build("dead-site-broker")
        .persistent_device()
        .no_collector()
        .status()
        .config(|c| {
            c.mqtt.reconnect_min = Dur::millis(200);
            c.mqtt.reconnect_max = Dur::millis(500);
            c.health.link_grace = Dur::secs(3);
        })
        .start();
    let (status_port, log) = (site.status_port(), site.log_path());
    let link = |name: &str| api_status(status_port).map(|s| s["links"][name].clone());
    assert!(
        wait_until(Duration::from_secs(30), || link("site")
            .is_some_and(|l| l["connected"] == true)
            && link("district").is_some_and(|l| l["connected"] == true)),
        "{:?}\n{}",
        api_status(status_port),
        tail(&log, 20)
    );
    let health = http(status_port, "GET", "/healthz", None).unwrap();
    assert_eq!(health.status, 200, "{}", health.text());

    // The site broker dies: within link_grace the API says so with a reason, then /healthz.
    site.device_mut().stop();
    assert!(
        wait_until(Duration::from_secs(10), || link("site").is_some_and(|l| {
            l["connected"] == false && l["reason"] == "unreachable"
        })),
        "{:?}",
        link("site")
    );
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(metrics.contains("zhian_site_connected 0"), "{metrics}");
    assert!(
        wait_until(Duration::from_secs(15), || http(
            status_port,
            "GET",
            "/healthz",
            None
        )
        .is_ok_and(|r| r.status == 503 && r.text().contains("site broker"))),
        "{}",
        http(status_port, "GET", "/healthz", None).unwrap().text()
    );
    let l = link("site").unwrap();
    assert!(l["attempts"].as_u64().unwrap() >= 3, "{l}");
    assert!(l["url"]
        .as_str()
        .unwrap()
        .contains(&site.device().port.to_string()));
    // The page says it in Chinese, with the reason translated.
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert!(page.contains("data-link=\"site\""), "{page}");
    assert!(page.contains("无法连接"), "reason in Chinese");
    assert!(
        !page.contains("os error"),
        "no raw English error on the Chinese page"
    );

    // Back: up again, one WARN for the whole outage however many attempts failed.
    site.device_mut().start_again();
    assert!(
        wait_until(Duration::from_secs(20), || link("site")
            .is_some_and(|l| l["connected"] == true)),
        "{:?}",
        link("site")
    );
    assert!(wait_until(Duration::from_secs(5), || http(
        status_port,
        "GET",
        "/healthz",
        None
    )
    .is_ok_and(|r| r.status == 200)));
    let text = log_text(&log);
    assert_eq!(
        count(&text, "site broker link down"),
        1,
        "one WARN per outage:\n{text}"
    );
    assert!(text.contains("site broker link up"), "{text}");
    // journald priorities: every line the daemon wrote starts with <N>.
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("===== harness"))
        .collect();
    assert!(!lines.is_empty());
    for l in &lines {
        assert!(
            ["<3>", "<4>", "<6>", "<7>"]
                .iter()
                .any(|p| l.starts_with(p)),
            "no syslog priority prefix: {l}"
        );
    }
    assert!(lines
        .iter()
        .any(|l| l.starts_with("<4>") && l.contains("site broker link down")));
    assert!(!text.contains('\u{1b}'), "no colour codes");
    assert!(!text.contains("Some("), "no Rust debug formatting");
    site.term_daemon();
}

#[test]
fn devices_go_offline_by_their_cadence_and_are_remembered_across_a_restart() {
    let site = Site::build("cadence")
        .persistent_device()
        .no_collector()
        .status()
        .config(|c| {
            c.health.silence = Dur::secs(3);
            c.health.kinds.insert("camera".into(), Dur::secs(3600));
            c.health.devices.insert("Door-Slow".into(), Dur::secs(3600));
        })
        .ready(Ready::SiteLink)
        .start();
    let (status_port, log) = (site.status_port(), site.log_path());
    let mut p = site.publisher();
    for (kind, dev, action) in [
        ("access", "door-1", "entry"),
        ("access", "Door-Slow", "entry"),
        ("camera", "cam-1", "stranger"),
    ] {
        let e = Event::new(kind, dev, &format!("{dev}-1"), action);
        p.send(&e.topic(), e.payload());
    }
    p.wait_all_acked(Duration::from_secs(10));
    let device = |name: &str| {
        api_status(status_port).and_then(|s| {
            s["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == name)
                .cloned()
        })
    };
    assert!(wait_until(Duration::from_secs(10), || device("door-1")
        .is_some_and(|d| d["online"] == true && d["today"] == 1)));
    // door-1's cadence is 3 s: offline after that, listed first, logged once.
    assert!(
        wait_until(Duration::from_secs(30), || device("door-1").is_some_and(
            |d| d["online"] == false && d["offline_since"].is_string()
        )),
        "{:?}",
        device("door-1")
    );
    let s = api_status(status_port).unwrap();
    let devices = s["devices"].as_array().unwrap();
    assert_eq!(devices[0]["name"], "door-1", "offline first: {s}");
    assert_eq!(device("cam-1").unwrap()["online"], true, "per-kind cadence");
    assert_eq!(
        device("Door-Slow").unwrap()["online"],
        true,
        "per-device cadence"
    );
    assert!(
        wait_until(Duration::from_secs(15), || log_text(&log)
            .contains("device offline")),
        "{}",
        tail(&log, 20)
    );
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(
        metrics.contains("zhian_device_up{device=\"door-1\",kind=\"access\",source=\"mqtt\"} 0"),
        "{metrics}"
    );
    assert!(metrics.contains("zhian_device_last_seen_timestamp_seconds{device=\"cam-1\""));

    // Restart: the devices are still known (not "vanished"), with their last-seen time as it
    // was at the stop, and no WARN again for a device that was offline before it.
    let cam_seen = device("cam-1").unwrap()["last_seen"].clone();
    let warns_before = count(&log_text(&log), "device offline");
    site.term_daemon();
    site.start_daemon();
    assert!(
        wait_until(Duration::from_secs(30), || device("door-1").is_some()
            && device("cam-1").is_some_and(|d| d["last_seen"].is_string())),
        "{:?}",
        api_status(status_port)
    );
    assert_eq!(device("door-1").unwrap()["online"], false);
    assert_eq!(device("cam-1").unwrap()["online"], true);
    let cam_after = device("cam-1").unwrap()["last_seen"].clone();
    assert_eq!(
        cam_after, cam_seen,
        "last seen kept exactly across a clean stop"
    );
    // The pause is the check: 5 s, more than door-1's cadence, without a second WARN.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        count(&log_text(&log), "device offline"),
        warns_before,
        "no WARN again for a device already offline before the restart"
    );
    // Only rejects on a topic: not a device.
    let mut p = site.publisher();
    p.send("zhian/access/door-9", b"not json".to_vec());
    p.wait_all_acked(Duration::from_secs(10));
    site.wait_for_status("the reject counted", |s| {
        s["counters"]["rejected"].as_u64() >= Some(1)
    });
    assert!(
        device("door-9").is_none(),
        "a topic with only rejects is no device"
    );
    site.term_daemon();
}

#[test]
fn check_config_names_what_installers_get_wrong() {
    // Nothing runs: config files and check-config on them.
    let site = Site::build("check-config")
        .no_device_broker()
        .no_district_broker()
        .unstarted()
        .start();
    let s = site.root.as_path();
    let good = test_config(&s.join("data"), 1883, 1884);
    let cfg = s.join("gateway.toml");
    let with = |edit: &dyn Fn(&mut zhian_gateway::config::Config)| {
        let mut c = good.clone();
        edit(&mut c);
        write_config(&cfg, &c);
    };

    // A missing file is named as missing, not as "gateway.id: required".
    let out = check_config(&s.join("nope.toml"), s);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        out.stderr.contains("nope.toml") && out.stderr.contains("does not exist"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("gateway.id"), "{}", out.stderr);

    // An environment typo is blamed on the environment variable.
    write_config(&cfg, &good);
    let out = common::run_cli_env(
        &["check-config", "--config", cfg.to_str().unwrap()],
        s,
        &[("ZHIAN_UPSTREAM__PASWORD", "x")],
    );
    assert_eq!(out.status.code(), Some(78), "{}", out.stderr);
    assert!(
        out.stderr.contains("ZHIAN_UPSTREAM__PASWORD (environment)"),
        "{}",
        out.stderr
    );

    // A relative data dir, and one that cannot be created.
    for (dir, why) in [("data", "relative"), ("/proc/zhian-data", "cannot")] {
        with(&|c| c.gateway.data_dir = dir.into());
        let out = check_config(&cfg, s);
        assert_eq!(out.status.code(), Some(78), "{dir}: {}", out.stderr);
        assert!(
            out.stderr.contains("gateway.data_dir") && out.stderr.contains(why),
            "{dir}: {}",
            out.stderr
        );
    }

    // A CA file that cannot be read.
    with(&|c| c.upstream.ca_file = Some(s.join("missing-ca.pem")));
    let out = check_config(&cfg, s);
    assert_eq!(out.status.code(), Some(78));
    assert!(out.stderr.contains("upstream.ca_file"), "{}", out.stderr);

    // Durations print as written; --quiet prints nothing.
    with(&|c| {
        c.store.batch_linger = Dur::millis(1800);
        c.health.silence = Dur::secs(24 * 3600);
    });
    let out = check_config(&cfg, s);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains("batch_linger = \"1800ms\""),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("silence = \"1d\""), "{}", out.stdout);
    let out = run_cli(
        &["check-config", "--quiet", "--config", cfg.to_str().unwrap()],
        s,
        Duration::from_secs(15),
    );
    assert!(out.status.success());
    assert_eq!(out.stdout, "");

    // The reference config's example devices are listed as examples.
    let reference = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    let mut table: toml::Table = toml::from_str(&fs::read_to_string(&reference).unwrap()).unwrap();
    table["gateway"].as_table_mut().unwrap().insert(
        "data_dir".into(),
        s.join("ref-data").to_string_lossy().as_ref().into(),
    );
    write_table(&cfg, &table);
    let out = check_config(&cfg, s);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        count(&out.stderr, "is an example (example = true)"),
        3,
        "{}",
        out.stderr
    );
    assert!(out
        .stderr
        .contains("note: gateway.id is the reference config's example"));
    assert!(out
        .stderr
        .contains("note: upstream.url mqtts://district.example:8883 is an example host"));
    // --quiet: not a word, notes included.
    let out = run_cli(
        &["check-config", "--quiet", "--config", cfg.to_str().unwrap()],
        s,
        Duration::from_secs(15),
    );
    assert!(out.status.success());
    assert_eq!((out.stdout.as_str(), out.stderr.as_str()), ("", ""));

    // A one-underscore environment typo is not read, and check-config says so.
    write_config(&cfg, &good);
    let out = common::run_cli_env(
        &["check-config", "--config", cfg.to_str().unwrap()],
        s,
        &[("ZHIAN_UPSTREAM_PASSWORD", "x")],
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("ZHIAN_UPSTREAM_PASSWORD is not read")
            && out.stderr.contains("ZHIAN_UPSTREAM__PASSWORD"),
        "{}",
        out.stderr
    );

    // A store file the checking user cannot write (left root-owned by a restore, say).
    if unsafe_is_root() {
        let data = s.join("ro-data");
        fs::create_dir_all(&data).unwrap();
        fs::write(data.join("zhian.redb"), b"").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&data, fs::Permissions::from_mode(0o777)).unwrap();
        fs::set_permissions(s, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(data.join("zhian.redb"), fs::Permissions::from_mode(0o644)).unwrap();
        with(&|c| c.gateway.data_dir = data.clone());
        fs::set_permissions(&cfg, fs::Permissions::from_mode(0o644)).unwrap();
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(common::gateway_bin())
            .args(["check-config", "--quiet", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{err}");
        assert!(err.contains("cannot write the store file"), "{err}");
    }
}

#[test]
fn slow_and_idle_connections_cannot_lock_out_healthz() {
    use std::io::Write;
    let site = Site::build("slowloris")
        .no_collector()
        .status()
        .ready(Ready::Healthz)
        .start();
    let status_port = site.status_port();
    // 40 connections that never finish their headers (one byte every 2 s, a slowloris) and
    // 40 that send nothing at all: more than status.max_connections (32) together.
    // The attackers' pace (a byte every 2 s, a retry after 100 ms) is the attack.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holding = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for i in 0..80 {
        let (stop, holding) = (stop.clone(), holding.clone());
        attackers.push(std::thread::spawn(move || {
            let mut reconnects = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", status_port)) else {
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                if reconnects == 0 {
                    holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                reconnects += 1;
                for b in b"GET / HTTP/1.1\r\nHost: x\r\n".iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) {
                        return reconnects;
                    }
                    if i % 2 == 0 && s.write_all(&[*b]).is_err() {
                        break; // closed by the daemon: come back, as an attacker would
                    }
                    std::thread::sleep(Duration::from_millis(2000));
                    if i % 2 == 1 && s.peek(&mut [0u8; 1]).is_ok_and(|n| n == 0) {
                        break;
                    }
                }
            }
            reconnects
        }));
    }
    eventually("every attacker connected", || {
        holding.load(std::sync::atomic::Ordering::SeqCst) == 80
    });
    // /healthz answers every time while they hold on (the client waits up to 10 s), asked
    // every 1.5 s for 12 s of the attack.
    for _ in 0..8 {
        let r = http(status_port, "GET", "/healthz", None);
        assert!(
            r.as_ref().is_ok_and(|r| r.status == 200),
            "/healthz under attack: {:?}",
            r.map(|r| r.status)
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
    assert!(api_status(status_port).is_some(), "the page's API too");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reconnects: u32 = attackers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(
        reconnects > 80,
        "slow connections were closed (deadline or eviction) and came back: {reconnects}"
    );
    site.term_daemon();
}
