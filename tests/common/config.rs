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
/// The daemon's default device subscription (`mqtt.topics`).
pub const DEVICE_FILTER: &str = "zhian/+/+";
/// Strings that only ever occur inside `subject` values the tests send: none may appear upstream.
pub const SUBJECT_MARKERS: &[&str] = &["SUBJ", "card:", "face:", "plate:", "浙A"];

/// The test config (see the brief); `upstream_extra` is appended to the `[upstream]` table.
pub fn config_text(
    data_dir: &Path,
    device_port: u16,
    district_port: u16,
    upstream_extra: &str,
) -> String {
    format!(
        r#"[gateway]
id = "{GATEWAY_ID}"
data_dir = {data_dir}
district = "富阳区"
compound = "春江花园"

[mqtt]
url = "mqtt://127.0.0.1:{device_port}"
client_id = "{DEVICE_CLIENT_ID}"

[upstream]
url = "mqtt://127.0.0.1:{district_port}"
topic_prefix = "zhian/district"
heartbeat = "1s"
reconnect_max = "2s"
{upstream_extra}
[aggregate]
window = "2s"
grace = "1s"
max_lateness = "1h"
max_future_skew = "5m"

[status]
enabled = false
"#,
        data_dir = toml_string(&data_dir.to_string_lossy()),
    )
}

/// [`config_text`] with the status page on 127.0.0.1:`status_port`.
pub fn config_with_status(
    data_dir: &Path,
    device_port: u16,
    district_port: u16,
    status_port: u16,
) -> String {
    let base = config_text(data_dir, device_port, district_port, "");
    assert!(base.contains("[status]\nenabled = false\n"));
    base.replace(
        "[status]\nenabled = false\n",
        &format!("[status]\nenabled = true\nlisten = \"127.0.0.1:{status_port}\"\n"),
    )
}
