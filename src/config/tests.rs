//! The config's unit tests: loading, layering, secrets, validation, notes.

use super::*;
use std::io::Write;

#[test]
fn secrets_come_from_files_and_systemd_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(dir.path().join("up.pw"), "from-file\n").unwrap();
    std::fs::write(creds.join("site.pw"), "from-cred-file\r\nsecond line").unwrap();
    std::fs::write(creds.join("broker.password"), "from-credential").unwrap();
    std::fs::write(creds.join("status.password_hash"), "$argon2id$x").unwrap();
    let mut c = Config::default();
    c.upstream.password_file = Some(dir.path().join("up.pw"));
    c.mqtt.password_file = Some("site.pw".into());
    assert!(resolve_secrets(&mut c, Some(&creds)).is_empty());
    assert_eq!(c.upstream.password, Some(Secret("from-file".into())));
    assert_eq!(c.mqtt.password, Some(Secret("from-cred-file".into())));
    assert_eq!(c.broker.password, Some(Secret("from-credential".into())));
    assert_eq!(c.status.password_hash, Some(Secret("$argon2id$x".into())));
    // Relative without systemd, both given, unreadable: each names its key.
    let mut c = Config::default();
    c.mqtt.password_file = Some("site.pw".into());
    c.upstream.password_file = Some(dir.path().join("up.pw"));
    c.upstream.password = Some(Secret("inline".into()));
    c.broker.password_file = Some(dir.path().join("missing"));
    let p = resolve_secrets(&mut c, None);
    let keys: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "mqtt.password_file",
            "upstream.password_file",
            "broker.password_file"
        ],
        "{p:?}"
    );
    assert!(!format!("{p:?}").contains("inline"));
}

fn load_str(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, Vec<Problem>> {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(toml_text.as_bytes()).unwrap();
    let env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_with_env(f.path(), true, Some(env))
}

const MIN: &str = "[gateway]\nid = \"gw-1\"\n";

#[test]
fn minimal_file_gets_defaults() {
    let c = load_str(MIN, &[]).unwrap();
    assert_eq!(c.aggregate.window, Dur::secs(60));
    assert_eq!(c.mqtt.topics, vec!["zhian/+/+".to_string()]);
    assert_eq!(c.mqtt_client_id(), "zhian-gw-1");
    assert_eq!(c.upstream_client_id(), "gw-1");
    assert_eq!(c.store.max_size, ByteSize(2 << 30));
}

#[test]
fn unknown_key_is_named() {
    let e = load_str("[gateway]\nid = \"gw-1\"\n[upstream]\nbogus = 1\n", &[]).unwrap_err();
    assert_eq!(e.len(), 1);
    assert!(e[0].to_string().starts_with("upstream.bogus"), "{}", e[0]);
}

#[test]
fn bad_duration_names_key() {
    let e = load_str(
        "[gateway]\nid = \"gw-1\"\n[aggregate]\nwindow = \"soon\"\n",
        &[],
    )
    .unwrap_err();
    assert_eq!(e[0].key, "aggregate.window", "{:?}", e);
}

#[test]
fn env_overrides_file() {
    let c = load_str(
        MIN,
        &[
            ("ZHIAN_UPSTREAM__PASSWORD", "s3cret"),
            ("ZHIAN_AGGREGATE__WINDOW", "5m"),
            ("ZHIAN_MQTT__TOPICS", "a/+/+,b/+/+"),
        ],
    )
    .unwrap();
    assert_eq!(c.upstream.password, Some(Secret("s3cret".into())));
    assert_eq!(c.aggregate.window, Dur::secs(300));
    assert_eq!(c.mqtt.topics.len(), 2);
    assert!(!c.to_redacted_toml().contains("s3cret"));
}

#[test]
fn validation_collects_every_problem() {
    let e = load_str(
        "[gateway]\nid = \"Bad_ID\"\n[upstream]\nurl = \"http://x\"\n[aggregate]\ngrace = \"2d\"\n",
        &[],
    )
    .unwrap_err();
    let keys: Vec<_> = e.iter().map(|p| p.key.as_str()).collect();
    assert!(keys.contains(&"gateway.id"), "{keys:?}");
    assert!(keys.contains(&"upstream.url"), "{keys:?}");
    assert!(keys.contains(&"aggregate.grace"), "{keys:?}");
}

#[test]
fn lan_status_page_needs_credentials() {
    let lan = "[gateway]\nid = \"gw-1\"\n[status]\nlisten = \"0.0.0.0:8080\"\n";
    let e = load_str(lan, &[]).unwrap_err();
    assert_eq!(e[0].key, "status.username", "{e:?}");
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$3Tm6mSMGfCA1C8GdBDuFjH4GY4uSbcVxR3R5mx0eGXY";
    let ok = format!("{lan}username = \"wuye\"\npassword_hash = \"{hash}\"\n");
    assert!(load_str(&ok, &[]).is_ok());
    let inside = "[gateway]\nid = \"gw-1\"\ndata_dir = \"/var/lib/z\"\n[privacy]\nkey_dir = \"/var/lib/z/keys\"\n";
    let e = load_str(inside, &[]).unwrap_err();
    assert_eq!(e[0].key, "privacy.key_dir");
    assert!(e[0].message.contains("/var/lib/z.keys"), "{e:?}");
    let rot = "[gateway]\nid = \"gw-1\"\n[privacy]\nrotate = \"hourly\"\n";
    let e = load_str(rot, &[]).unwrap_err();
    assert!(e[0].message.contains("\"daily\", \"never\""), "{e:?}");
    let twice = "[gateway]\nid = \"gw-1\"\n[[care.residents]]\nsubject = \"card:1\"\nalias = \"A-601\"\n[[care.residents]]\nsubject = \"card:1\"\nalias = \"a-601\"\n";
    let e = load_str(twice, &[]).unwrap_err();
    let keys: Vec<&str> = e.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["care.residents[1]", "care.residents[1].alias"],
        "{e:?}"
    );
    let named =
        "[gateway]\nid = \"gw-1\"\n[[care.residents]]\nsubject = \"card:1\"\nalias = \"王秀英\"\n";
    let e = load_str(named, &[]).unwrap_err();
    assert!(
        !e[0].message.contains("王秀英"),
        "a refused alias is not echoed: {e:?}"
    );
    let bad_tz = "[gateway]\nid = \"gw-1\"\n[status]\ntimezone = \"CST\"\n";
    assert_eq!(load_str(bad_tz, &[]).unwrap_err()[0].key, "status.timezone");
}

#[test]
fn dedup_must_outlive_lateness() {
    let e = load_str("[gateway]\nid = \"gw-1\"\n[dedup]\nttl = \"1h\"\n", &[]).unwrap_err();
    assert_eq!(e[0].key, "dedup.ttl", "{e:?}");
}

fn rtu_device(extra: &str) -> String {
    format!(
        "{MIN}[[modbus.devices]]\nname = \"gate-1\"\nkind = \"vehicle\"\n{extra}\n\
         [[modbus.devices.points]]\nname = \"in\"\ntable = \"holding\"\naddress = 0\ntype = \"u16\"\nrole = \"counter\"\naction = \"entry\"\n"
    )
}

#[test]
fn modbus_parity_letters_unit_zero_and_enum_errors() {
    for (given, want) in [
        ("N", Parity::None),
        ("E", Parity::Even),
        ("o", Parity::Odd),
        ("even", Parity::Even),
    ] {
        let c = load_str(
            &rtu_device(&format!(
                "unit = 1\nrtu = {{ path = \"/dev/ttyS0\", baud = 9600, parity = \"{given}\" }}"
            )),
            &[],
        )
        .unwrap_or_else(|p| panic!("{given}: {p:?}"));
        assert_eq!(c.modbus.devices[0].rtu.as_ref().unwrap().parity, want);
        assert_eq!(c.modbus.devices[0].points[0].max_step, 1000);
    }
    let p = load_str(
        &rtu_device("unit = 0\nrtu = { path = \"/dev/ttyS0\", baud = 9600 }"),
        &[],
    )
    .unwrap_err();
    assert!(
        p.iter()
            .any(|p| p.key == "modbus.devices[0].unit" && p.message.contains("1-247")),
        "{p:?}"
    );
    let p = load_str(
        &rtu_device("unit = 1\nrtu = { path = \"/dev/ttyS0\", baud = 9600, parity = \"X\" }"),
        &[],
    )
    .unwrap_err();
    assert!(
        p[0].message.contains("\"N\", \"E\", \"O\""),
        "an enum error lists the allowed values: {p:?}"
    );
}

#[test]
fn only_section_key_variables_are_config() {
    let c = load_str(
        MIN,
        &[
            ("ZHIAN_BIN", "/usr/bin/x"),
            ("ZHIAN_STORE__MAX_SIZE", "64MiB"),
        ],
    )
    .unwrap();
    assert_eq!(c.store.max_size, ByteSize(64 << 20));
}

#[test]
fn sizes_and_urls() {
    assert_eq!(ByteSize::parse("512MiB").unwrap(), ByteSize(512 << 20));
    assert_eq!(ByteSize::parse("2GiB").unwrap(), ByteSize(2 << 30));
    assert!(ByteSize::parse("2 parsecs").is_err());
    let u = BrokerUrl::parse("mqtts://district.example:8883").unwrap();
    assert!(u.tls && u.port == 8883 && u.host == "district.example");
    assert_eq!(BrokerUrl::parse("mqtt://[::1]").unwrap().port, 1883);
    assert!(BrokerUrl::parse("tcp://x").is_err());
}
