//! The test config and its constants.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{Client, Connection, Event as MqttEvent, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use zhian_gateway::config::{
    Config, Dur, ModbusDevice, ModbusPoint, PointType, Role, Table, WordOrder,
};
use zhian_gateway::core::event::Kind;

use super::*;

/// `gateway.id` in the test config.
pub const GATEWAY_ID: &str = "test-gw";
/// Upstream topic prefix for this gateway: `{topic_prefix}/{gateway.id}`.
pub const PREFIX: &str = "zhian/district/test-gw";
/// `aggregate.window` in the test config, in milliseconds.
pub const WINDOW_MS: i64 = 2_000;
/// `aggregate.grace` in the test config, in milliseconds.
pub const GRACE_MS: i64 = 1_000;
/// `mqtt.client_id` in the test config: the daemon's persistent session on the device broker.
pub const DEVICE_CLIENT_ID: &str = "zhian-test";
/// Strings that only ever occur inside `subject` values the tests send: none may appear upstream.
pub const SUBJECT_MARKERS: &[&str] = &["SUBJ", "card:", "face:", "plate:", "浙A"];

/// The test config, typed: gateway [`GATEWAY_ID`] in 富阳区 / 春江花园 with its data in
/// `data_dir`, the site broker on `device_port` (client id [`DEVICE_CLIENT_ID`]), the district
/// broker on `district_port` (heartbeat every second, reconnects within 2 s), windows of
/// [`WINDOW_MS`] with [`GRACE_MS`] of grace, no status page. Tests change fields in Rust.
pub fn test_config(data_dir: &Path, device_port: u16, district_port: u16) -> Config {
    let mut c = Config::default();
    c.gateway.id = GATEWAY_ID.into();
    c.gateway.data_dir = data_dir.to_path_buf();
    c.gateway.district = Some("富阳区".into());
    c.gateway.compound = Some("春江花园".into());
    c.mqtt.url = format!("mqtt://127.0.0.1:{device_port}");
    c.mqtt.client_id = Some(DEVICE_CLIENT_ID.into());
    c.upstream.url = format!("mqtt://127.0.0.1:{district_port}");
    c.upstream.topic_prefix = "zhian/district".into();
    c.upstream.heartbeat = Dur::secs(1);
    c.upstream.reconnect_max = Dur::secs(2);
    c.aggregate.window = Dur::millis(WINDOW_MS as u64);
    c.aggregate.grace = Dur::millis(GRACE_MS as u64);
    c.aggregate.max_lateness = Dur::secs(3600);
    c.aggregate.max_future_skew = Dur::secs(300);
    c.status.enabled = false;
    c
}

/// The status page of `c` on 127.0.0.1:`port`.
pub fn enable_status(c: &mut Config, port: u16) {
    c.status.enabled = true;
    c.status.listen = format!("127.0.0.1:{port}");
}

/// The port of `c`'s status page (None when it is off).
pub fn status_port_of(c: &Config) -> Option<u16> {
    if !c.status.enabled {
        return None;
    }
    let addr: SocketAddr = c
        .status
        .listen
        .parse()
        .unwrap_or_else(|e| panic!("status.listen {:?}: {e}", c.status.listen));
    Some(addr.port())
}

/// `c` as a TOML table, with its secrets written out: a [`Config`] serializes every secret as
/// `<redacted>` (what `check-config` prints), a test writes the real value.
pub fn config_table(c: &Config) -> toml::Table {
    let mut table = toml::Table::try_from(c).expect("the config serializes to TOML");
    let secrets = [
        ("mqtt", "password", &c.mqtt.password),
        ("upstream", "password", &c.upstream.password),
        ("broker", "password", &c.broker.password),
        ("status", "password_hash", &c.status.password_hash),
    ];
    for (section, key, secret) in secrets {
        if let Some(s) = secret {
            table[section]
                .as_table_mut()
                .expect("a section is a table")
                .insert(key.into(), toml::Value::String(s.0.clone()));
        }
    }
    for (i, r) in c.care.residents.iter().enumerate() {
        if let Some(s) = &r.subject {
            table["care"]["residents"][i]
                .as_table_mut()
                .expect("a resident is a table")
                .insert("subject".into(), toml::Value::String(s.0.clone()));
        }
    }
    table
}

/// `c` as the TOML text of a config file, secrets written out. Checked: the text reads back
/// as the same config, so a field the rendering would drop or change fails here, not in a
/// test's assertion.
pub fn render_config(c: &Config) -> String {
    let text = toml::to_string(&config_table(c)).expect("the config renders as TOML");
    let back: Config = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("the rendered config does not read back ({e}):\n{text}"));
    let redacted = |c: &Config| toml::to_string(c).expect("the config renders as TOML");
    assert_eq!(
        redacted(&back),
        redacted(c),
        "the rendered config reads back differently"
    );
    assert!(
        config_table(&back) == config_table(c),
        "a secret of the rendered config reads back differently"
    );
    text
}

/// A Modbus TCP device at `addr` (`host:port`) with the defaults a config file gets (unit 1,
/// polled every second, 500 ms timeout, offline after 3 failed polls) and no points.
pub fn modbus_tcp(name: &str, kind: Kind, addr: &str) -> ModbusDevice {
    ModbusDevice {
        name: name.into(),
        example: false,
        kind,
        tcp: Some(addr.into()),
        rtu: None,
        unit: 1,
        poll: Dur::secs(1),
        timeout: Dur::millis(500),
        offline_after: 3,
        points: Vec::new(),
    }
}

/// A counter point counting `action` (result `ok`), with the defaults a config file gets
/// (high word first, no wrap, a glitch bound of 1000).
pub fn counter_point(
    name: &str,
    table: Table,
    address: u32,
    ty: PointType,
    action: &str,
) -> ModbusPoint {
    ModbusPoint {
        name: name.into(),
        table,
        address,
        ty,
        word_order: WordOrder::default(),
        role: Role::Counter,
        action: Some(action.into()),
        result: None,
        wrap: false,
        max_step: 1000,
    }
}

/// Writes `c` to `path` as a config file (secrets written out).
pub fn write_config(path: &Path, c: &Config) {
    fs::write(path, render_config(c))
        .unwrap_or_else(|e| panic!("write config {}: {e}", path.display()));
}

/// Writes a TOML table to `path`: a config with a key no [`Config`] has (an unknown key, a
/// misspelt one), made from [`config_table`].
pub fn write_table(path: &Path, table: &toml::Table) {
    let text = toml::to_string(table).expect("the table renders as TOML");
    fs::write(path, text).unwrap_or_else(|e| panic!("write config {}: {e}", path.display()));
}
