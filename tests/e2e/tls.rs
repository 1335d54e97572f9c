//! TLS both ways (issue 12): the device and district links over mutual TLS to real mosquitto
//! TLS listeners with certificates made here, the passwords from files and systemd credentials;
//! and the refusals (an expired broker certificate, one for another host name), each an ERROR
//! naming the link, the reason and the key to change. (A wrong CA and a refused client
//! certificate: `field_faults.rs`.)

use crate::common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn passwd(file: &Path, user: &str, password: &str) {
    let mut cmd = Command::new("mosquitto_passwd");
    if !file.exists() {
        cmd.arg("-c");
    }
    assert!(cmd
        .arg("-b")
        .arg(file)
        .args([user, password])
        .status()
        .expect("mosquitto_passwd")
        .success());
}

/// mosquitto config lines: the main listener over TLS requiring a client certificate from
/// `ca`, password auth, and a plain loopback listener on `plain` for the test's own clients.
fn tls_listener(pki: &Path, server: &str, ca: &str, passwords: &Path, plain: u16) -> String {
    format!(
        "certfile {}\nkeyfile {}\ncafile {}\nrequire_certificate true\ntls_version tlsv1.2\n\
         password_file {}\nlistener {plain} 127.0.0.1\n",
        pki.join(format!("{server}.pem")).display(),
        pki.join(format!("{server}.key")).display(),
        pki.join(format!("{ca}.pem")).display(),
        passwords.display(),
    )
}

#[test]
fn both_links_over_mutual_tls_with_passwords_from_files_and_credentials_count_exactly() {
    let b = Site::build("mutual-tls");
    let scratch = b.root().to_path_buf();
    let pki = scratch.join("pki");
    fs::create_dir(&pki).unwrap();
    make_ca(&pki, "site-ca");
    make_leaf(&pki, "site-broker", "site-ca");
    make_leaf(&pki, "gw-site", "site-ca");
    make_ca(&pki, "district-ca");
    make_leaf(&pki, "district-broker", "district-ca");
    make_leaf(&pki, "gw-district", "district-ca");
    let pw = scratch.join("passwd");
    passwd(&pw, "gw-site", "site-Pass-1");
    passwd(&pw, "gw-up", "district-Pass-2");
    passwd(&pw, "tester", "tester-Pass-3");
    // The passwords: the site's in a file the config names; the district's as a systemd
    // credential (`$CREDENTIALS_DIRECTORY/upstream.password`), which the config does not name.
    let creds = scratch.join("credentials");
    fs::create_dir(&creds).unwrap();
    fs::write(creds.join("upstream.password"), "district-Pass-2\n").unwrap();
    let site_pw = scratch.join("site.password");
    fs::write(&site_pw, "site-Pass-1\n").unwrap();
    let creds_s = creds.display().to_string();
    // mosquitto reads the password file as its own user: root here (`user root`).
    let (site_plain, district_plain) = (free_port(), free_port());
    let (site_port, district_port) = (b.device_port(), b.district_port());
    let p = |n: &str| Some(pki.join(n));
    let site = b
        .persistent_device()
        .device_broker_with(&tls_listener(
            &pki,
            "site-broker",
            "site-ca",
            &pw,
            site_plain,
        ))
        .district_broker_with(&tls_listener(
            &pki,
            "district-broker",
            "district-ca",
            &pw,
            district_plain,
        ))
        .collector_port(district_plain)
        .collector_credentials("tester", "tester-Pass-3")
        .status()
        .config(|c| {
            c.mqtt.url = format!("mqtts://127.0.0.1:{site_port}");
            c.mqtt.username = Some("gw-site".into());
            c.mqtt.password_file = Some(site_pw.clone());
            c.mqtt.ca_file = p("site-ca.pem");
            c.mqtt.client_cert = p("gw-site.pem");
            c.mqtt.client_key = p("gw-site.key");
            c.upstream.url = format!("mqtts://127.0.0.1:{district_port}");
            c.upstream.username = Some("gw-up".into());
            c.upstream.ca_file = p("district-ca.pem");
            c.upstream.client_cert = p("gw-district.pem");
            c.upstream.client_key = p("gw-district.key");
        })
        .env("CREDENTIALS_DIRECTORY", &creds_s)
        .unstarted()
        .start();
    let (cfg, log) = (site.config_path(), site.log_path());
    // check-config sees the same credentials and never prints a password.
    let out = Command::new(common::gateway_bin())
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("CREDENTIALS_DIRECTORY", &creds_s)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("Pass-1") && !text.contains("Pass-2"),
        "{text}"
    );

    site.start_daemon();
    let (up, status_port) = (site.upstream(), site.status_port());
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some_and(
                |s| s["links"]["site"]["connected"] == true && s["upstream"]["connected"] == true
            )),
        "both links up over mutual TLS: {:?}\n{}",
        api_status(status_port).map(|s| s["link_problems"].clone()),
        tail(&log, 20)
    );
    let mut publisher =
        Publisher::connect_with_credentials(site_plain, "tls-pub", "tester", "tester-Pass-3");
    for i in 0..25 {
        let e = Event::new(
            "access",
            &format!("door-{}", i % 3),
            &format!("t-{i}"),
            "entry",
        );
        publisher.send(&e.topic(), e.payload());
    }
    publisher.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == 25),
        "{:?}\n{}",
        up.totals(),
        tail(&log, 20)
    );
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
    site.term_daemon();
    assert!(!log_text(&log).contains("Pass-"));
}

#[test]
fn an_expired_or_misnamed_broker_certificate_is_refused_and_named() {
    // The certificates, shared by both sites.
    let fixtures = tempfile::tempdir().unwrap();
    let pki = fixtures.path().join("pki");
    fs::create_dir(&pki).unwrap();
    make_ca_with(&pki, "district-ca", Some("-5d"), 30);
    make_leaf_with(&pki, "expired", "district-ca", "IP:127.0.0.1", Some("-3d"));
    make_leaf_with(
        &pki,
        "misnamed",
        "district-ca",
        "DNS:district.example",
        None,
    );
    let mut runs = Vec::new();
    for (leaf, reason_text) in [
        ("expired", "expired or not yet valid"),
        ("misnamed", "does not name the host in upstream.url"),
    ] {
        let b = Site::build(leaf);
        let district_port = b.district_port();
        let site = b
            .no_device_broker()
            .district_broker_with(&format!(
                "certfile {}\nkeyfile {}\n",
                pki.join(format!("{leaf}.pem")).display(),
                pki.join(format!("{leaf}.key")).display()
            ))
            .no_collector()
            .status()
            .config(|c| {
                c.upstream.url = format!("mqtts://127.0.0.1:{district_port}");
                c.upstream.ca_file = Some(pki.join("district-ca.pem"));
            })
            .start();
        runs.push((site, reason_text));
    }
    for (site, reason_text) in runs {
        let (status_port, log) = (site.status_port(), site.log_path());
        assert!(
            wait_until(Duration::from_secs(30), || api_status(status_port)
                .is_some_and(|s| s["link_problems"]["district"]["reason"] == "tls")),
            "log:\n{}",
            tail(&log, 20)
        );
        let l = log_text(&log);
        let error = l
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("TLS failed"))
            .unwrap_or_else(|| panic!("no TLS ERROR:\n{}", tail(&log, 20)));
        assert!(error.contains(reason_text), "{error}");
        assert!(
            error.contains("link=\"district\"") || error.contains("link=district"),
            "{error}"
        );
        assert_eq!(
            api_status(status_port).unwrap()["upstream"]["connected"],
            false
        );
        site.term_daemon();
    }
}
