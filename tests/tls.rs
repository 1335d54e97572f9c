//! TLS both ways (issue 12): the device and district links over mutual TLS to real mosquitto
//! TLS listeners with certificates made here, the passwords from files and systemd credentials;
//! and the refusals (an expired broker certificate, one for another host name), each an ERROR
//! naming the link, the reason and the key to change. (A wrong CA and a refused client
//! certificate: `field_faults.rs`.)

mod common;

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
    let scratch = tempfile::tempdir().unwrap();
    let pki = scratch.path().join("pki");
    fs::create_dir(&pki).unwrap();
    make_ca(&pki, "site-ca");
    make_leaf(&pki, "site-broker", "site-ca");
    make_leaf(&pki, "gw-site", "site-ca");
    make_ca(&pki, "district-ca");
    make_leaf(&pki, "district-broker", "district-ca");
    make_leaf(&pki, "gw-district", "district-ca");
    let pw = scratch.path().join("passwd");
    passwd(&pw, "gw-site", "site-Pass-1");
    passwd(&pw, "gw-up", "district-Pass-2");
    passwd(&pw, "tester", "tester-Pass-3");
    // mosquitto reads the password file as its own user: root here (`user root`).
    let (site_plain, district_plain) = (free_port(), free_port());
    let site = Mosquitto::start_with(
        &scratch.path().join("site"),
        free_port(),
        true,
        &tls_listener(&pki, "site-broker", "site-ca", &pw, site_plain),
    );
    let district = Mosquitto::start_with(
        &scratch.path().join("district"),
        free_port(),
        false,
        &tls_listener(&pki, "district-broker", "district-ca", &pw, district_plain),
    );
    // The passwords: the site's in a file the config names; the district's as a systemd
    // credential (`$CREDENTIALS_DIRECTORY/upstream.password`), which the config does not name.
    let creds = scratch.path().join("credentials");
    fs::create_dir(&creds).unwrap();
    fs::write(creds.join("upstream.password"), "district-Pass-2\n").unwrap();
    let site_pw = scratch.path().join("site.password");
    fs::write(&site_pw, "site-Pass-1\n").unwrap();
    let status_port = free_port();
    let dir = scratch.path().join("data");
    let p = |n: &str| pki.join(n).display().to_string();
    let cfg_text = config_with_status(&dir, site.port, district.port, status_port)
        .replace(
            &format!("url = \"mqtt://127.0.0.1:{}\"", site.port),
            &format!(
                "url = \"mqtts://127.0.0.1:{}\"\nusername = \"gw-site\"\npassword_file = \"{}\"\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
                site.port,
                site_pw.display(),
                p("site-ca.pem"),
                p("gw-site.pem"),
                p("gw-site.key")
            ),
        )
        .replace(
            &format!("url = \"mqtt://127.0.0.1:{}\"", district.port),
            &format!(
                "url = \"mqtts://127.0.0.1:{}\"\nusername = \"gw-up\"\nca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
                district.port,
                p("district-ca.pem"),
                p("gw-district.pem"),
                p("gw-district.key")
            ),
        );
    let cfg = scratch.path().join("gateway.toml");
    fs::write(&cfg, cfg_text).unwrap();
    let creds_s = creds.display().to_string();
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

    let up = Upstream::start_with_credentials(
        district_plain,
        "tls-collector",
        "tester",
        "tester-Pass-3",
    );
    let log = scratch.path().join("daemon.log");
    let mut d = Daemon::start_with_env(&cfg, &log, &[("CREDENTIALS_DIRECTORY", &creds_s)]);
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
    d.term();
    assert!(!log_text(&log).contains("Pass-"));
}

#[test]
fn an_expired_or_misnamed_broker_certificate_is_refused_and_named() {
    let scratch = tempfile::tempdir().unwrap();
    let pki = scratch.path().join("pki");
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
        let district = Mosquitto::start_with(
            &scratch.path().join(leaf),
            free_port(),
            false,
            &format!(
                "certfile {}\nkeyfile {}\n",
                pki.join(format!("{leaf}.pem")).display(),
                pki.join(format!("{leaf}.key")).display()
            ),
        );
        let status_port = free_port();
        let cfg = scratch.path().join(format!("{leaf}.toml"));
        fs::write(
            &cfg,
            config_with_status(
                &scratch.path().join(format!("data-{leaf}")),
                free_port(),
                district.port,
                status_port,
            )
            .replace(
                &format!("url = \"mqtt://127.0.0.1:{}\"", district.port),
                &format!(
                    "url = \"mqtts://127.0.0.1:{}\"\nca_file = \"{}\"",
                    district.port,
                    pki.join("district-ca.pem").display()
                ),
            ),
        )
        .unwrap();
        let log = scratch.path().join(format!("{leaf}.log"));
        let d = Daemon::start(&cfg, &log);
        runs.push((district, d, status_port, log, reason_text));
    }
    for (_district, mut d, status_port, log, reason_text) in runs {
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
        d.term();
    }
}
