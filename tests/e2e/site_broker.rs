//! The site-broker recipe in `contrib/mosquitto/` (issue 12), on a real mosquitto with its
//! password and ACL files: a device publishes only on its own topic, reads nobody's events,
//! and cannot take the gateway's client id; the gateway counts what the devices send.

use crate::common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use zhian_gateway::config::Secret;

fn passwd(file: &Path, user: &str, password: &str) {
    let mut cmd = Command::new("mosquitto_passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    let ok = cmd
        .arg("-b")
        .arg(file)
        .args([user, password])
        .status()
        .expect("mosquitto_passwd (package mosquitto)")
        .success();
    assert!(ok, "mosquitto_passwd {user}");
}

/// `mosquitto_pub` as a device with credentials, QoS 1.
fn publish(port: u16, user: &str, password: &str, topic: &str, payload: &[u8]) {
    let ok = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-u",
            user,
            "-P",
            password,
            "-q",
            "1",
        ])
        .args(["-t", topic, "-m"])
        .arg(String::from_utf8_lossy(payload).as_ref())
        .status()
        .expect("mosquitto_pub")
        .success();
    assert!(ok, "mosquitto_pub as {user} on {topic}");
}

#[test]
fn the_site_broker_recipe_keeps_devices_apart_and_the_gateway_id_bound() {
    let site = Site::build("recipe");
    let s = site.root().to_path_buf();
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/mosquitto");
    let pw = s.join("zhian-site.passwd");
    passwd(&pw, "zhian-gateway", "gw-secret");
    passwd(&pw, "door-1", "door-1-secret");
    passwd(&pw, "door-2", "door-2-secret");
    fs::copy(contrib.join("zhian-site.acl"), s.join("zhian-site.acl")).unwrap();
    // The recipe's lines, with this test's paths (the listener comes from the harness).
    let recipe = fs::read_to_string(contrib.join("zhian-site.conf")).unwrap();
    let extra: String = recipe
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter(|l| !l.starts_with("listener") && !l.starts_with("persistence "))
        .map(|l| {
            l.replace(
                "/etc/mosquitto/zhian-site.passwd",
                &pw.display().to_string(),
            )
            .replace(
                "/etc/mosquitto/zhian-site.acl",
                &s.join("zhian-site.acl").display().to_string(),
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(extra.contains("use_username_as_clientid true"), "{extra}");
    let site = site
        .persistent_device()
        .device_broker_with(&extra)
        .status()
        .config(|c| {
            c.mqtt.client_id = Some("zhian-gateway".into());
            c.mqtt.username = Some("zhian-gateway".into());
            c.mqtt.password = Some(Secret("gw-secret".into()));
        })
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let port = site.device().port;
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some_and(|s| s["links"]["site"]["connected"] == true)),
        "the gateway logs in with its own user; log:\n{}",
        tail(&log, 20)
    );

    // door-2 listens to everything it can, as a curious neighbour's device would.
    let spy = Command::new("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-u",
            "door-2",
            "-P",
            "door-2-secret",
        ])
        .args(["-t", "#", "-t", "zhian/+/+", "-v", "-W", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto_sub");
    site.device().wait_subscribed("door-2", "zhian/+/+");

    // door-1 on its own topic: counted. door-1 posing as door-2: refused by the broker.
    for i in 0..5 {
        let e = Event::new("access", "door-1", &format!("own-{i}"), "entry")
            .subject(&format!("card:SUBJ{i}"));
        publish(port, "door-1", "door-1-secret", &e.topic(), &e.payload());
    }
    for i in 0..3 {
        let e = Event::new("access", "door-2", &format!("spoof-{i}"), "entry");
        publish(port, "door-1", "door-1-secret", &e.topic(), &e.payload());
    }
    // door-2 tries to take the gateway's client id: the broker names it door-2 instead.
    let _ = Command::new("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-u",
            "door-2",
            "-P",
            "door-2-secret",
        ])
        .args(["-i", "zhian-gateway", "-t", "zhian/+/+", "-W", "2"])
        .status();
    for i in 5..8 {
        let e = Event::new("access", "door-1", &format!("own-{i}"), "entry");
        publish(port, "door-1", "door-1-secret", &e.topic(), &e.payload());
    }
    let counted = |dev: &str| -> u64 {
        up.totals()
            .iter()
            .filter(|((_, d, _, _), _)| d == dev)
            .map(|(_, n)| *n)
            .sum()
    };
    assert!(
        wait_until(Duration::from_secs(20), || counted("door-1") == 8),
        "door-1's 8 events counted: {:?}",
        up.totals()
    );
    // The pause is the check: 3 s in which a spoofed event would have been counted.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        counted("door-2"),
        0,
        "no event published as door-2 by door-1"
    );
    let out = spy.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        seen.trim().is_empty(),
        "a device read other devices' events:\n{seen}"
    );
    let l = log_text(&log);
    assert!(
        !l.contains("site broker link down") && !l.contains("identity_taken"),
        "the gateway's session was not taken over:\n{}",
        tail(&log, 20)
    );
    site.term_daemon();
}
