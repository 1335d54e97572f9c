//! Configuration: built-in defaults < TOML file < `ZHIAN_<SECTION>__<KEY>` environment.
//!
//! Loading never binds a port or opens the store. Every problem is reported as a
//! [`Problem`] naming its key path (`upstream.url: ...`), so `check-config` and `run`
//! can print one line per problem and exit 78 (EX_CONFIG) before anything starts.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code for configuration errors (sysexits.h EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

/// Default config path used when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/zhian-gateway/gateway.toml";

/// One configuration problem, tied to a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

pub mod sources;
pub mod start;
pub use sources::{FieldCfg, SourceCfg};
pub use start::check_start_needs;

/// A problem with `key`. The message is cleaned of secrets (a URL's password, the value of a
/// `password = ...` line a syntax error quotes) and of control characters, since it is printed
/// and logged.
pub(crate) fn problem(key: impl Into<String>, message: impl Into<String>) -> Problem {
    let message = crate::logfmt::redact_secrets(&message.into());
    let message = message
        .split('\n')
        .map(crate::logfmt::escape_controls)
        .collect::<Vec<_>>()
        .join("\n");
    Problem {
        key: crate::logfmt::escape_controls(&key.into()),
        message,
    }
}

/// A duration written as a humantime string (`"500ms"`, `"60s"`, `"7d"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    pub const fn millis(ms: u64) -> Self {
        Dur(Duration::from_millis(ms))
    }
    pub fn as_millis_u64(self) -> u64 {
        u64::try_from(self.0.as_millis()).unwrap_or(u64::MAX)
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); use e.g. \"500ms\", \"60s\", \"24h\", \"7d\""
            ))
        })
    }
}

impl Serialize for Dur {
    /// As written in the config: the largest of `h`, `m`, `s`, `ms` that divides it (`"24h"`,
    /// `"1800ms"`; `d` from a week up, `"30d"`), never humantime's `"1day"` or `"1s 800ms"`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (unit, n) in [
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1000),
        ] {
            if ms > 0 && ms % n == 0 {
                return write!(f, "{}{unit}", ms / n);
            }
        }
        write!(f, "{ms}ms")
    }
}

/// A byte size written as `"512MiB"`, `"2GiB"`, `"64KiB"` or a plain number of bytes.
///
/// Hand-written: a dozen lines, versus a crate whose own unit rules we would have to document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?}; use e.g. \"512MiB\", \"2GiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "invalid size unit {other:?} in {s:?}; use B, KiB, MiB, GiB, KB, MB or GB"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        let text = if n > 0 && n % (1 << 30) == 0 {
            format!("{}GiB", n >> 30)
        } else if n > 0 && n % (1 << 20) == 0 {
            format!("{}MiB", n >> 20)
        } else if n > 0 && n % (1 << 10) == 0 {
            format!("{}KiB", n >> 10)
        } else {
            format!("{n}B")
        };
        s.serialize_str(&text)
    }
}

/// A secret: deserialized as a plain string, always serialized redacted.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: Gateway,
    pub broker: Broker,
    pub mqtt: Mqtt,
    pub dedup: Dedup,
    pub aggregate: Aggregate,
    pub store: Store,
    pub upstream: Upstream,
    pub status: Status,
    pub privacy: Privacy,
    pub alerts: Alerts,
    pub modbus: Modbus,
    pub clock: Clock,
    pub health: Health,
    pub care: Care,
}

/// `[care]`: the care watch (独居老人关怀, contract: "Care watch").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Care {
    pub residents: Vec<CareResident>,
}

/// One `[[care.residents]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CareResident {
    /// The card or face id as devices send it. Kept only in the config (printed redacted); the
    /// daemon keeps its care pseudonym. Give `pseudonym` instead to keep it out of the config.
    pub subject: Option<Secret>,
    /// 32 hex digits from `zhian-gateway care-pseudonym`.
    pub pseudonym: Option<String>,
    /// A flat number (`3-2-601`), never a name: 1-32 of `[A-Za-z0-9_.#-]`.
    pub alias: String,
    /// A `silent` notice once no access event of the resident arrived for this long.
    #[serde(default = "default_care_silence")]
    pub silence: Dur,
    /// Quiet hours, site time, `HH:MM-HH:MM` (may wrap midnight): no `silent` notice in them.
    pub quiet: Option<String>,
}

fn default_care_silence() -> Dur {
    Dur::secs(24 * 3600)
}

/// 32 hex digits → 16 bytes.
pub fn parse_pseudonym(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn validate_care(c: &Care, p: &mut Vec<Problem>) {
    let mut aliases = std::collections::BTreeSet::new();
    let mut idents = std::collections::BTreeSet::new();
    for (i, r) in c.residents.iter().enumerate() {
        let key = format!("care.residents[{i}]");
        match (&r.subject, &r.pseudonym) {
            (Some(s), None) if s.0.is_empty() || s.0.chars().count() > 128 => p.push(problem(
                format!("{key}.subject"),
                "must be 1-128 characters",
            )),
            (None, Some(ps)) if parse_pseudonym(ps).is_none() => p.push(problem(
                format!("{key}.pseudonym"),
                "must be 32 hex digits, as `zhian-gateway care-pseudonym` prints",
            )),
            (Some(_), Some(_)) | (None, None) => p.push(problem(
                key.clone(),
                "give subject or pseudonym (one of them)",
            )),
            _ => {}
        }
        let ident = match (&r.subject, &r.pseudonym) {
            (Some(s), _) => format!("s:{}", s.0),
            (None, Some(ps)) => format!("p:{}", ps.to_ascii_lowercase()),
            _ => String::new(),
        };
        if !ident.is_empty() && !idents.insert(ident) {
            p.push(problem(
                key.clone(),
                "the same resident is listed twice (one subject, one alias)",
            ));
        }
        let ok_alias = !r.alias.is_empty()
            && r.alias.chars().count() <= 32
            && r.alias
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_.#-".contains(ch));
        if !ok_alias {
            // The value is not echoed: a refused alias may be a resident's name.
            p.push(problem(
                format!("{key}.alias"),
                "must be a flat number such as \"3-2-601\", 1-32 of [A-Za-z0-9_.#-] (never a name)",
            ));
        } else if !aliases.insert(r.alias.to_ascii_lowercase()) {
            p.push(problem(
                format!("{key}.alias"),
                format!("{:?} is listed twice", r.alias),
            ));
        }
        if r.silence.0 < Duration::from_secs(60) {
            p.push(problem(format!("{key}.silence"), "at least 1m"));
        }
        if let Some(q) = &r.quiet {
            if crate::core::care::Quiet::parse(q).is_none() {
                p.push(problem(
                    format!("{key}.quiet"),
                    format!("{q:?} is not HH:MM-HH:MM (e.g. \"22:00-07:00\")"),
                ));
            }
        }
    }
}

/// `[health]`: when a device counts as offline, and how long the site link may be down before
/// `/healthz` says so (contract: "Status page").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// The expected cadence of an MQTT device: one silent for longer is offline. Default 15 min.
    pub silence: Dur,
    /// Per kind (`access`, `camera`, `vehicle`), e.g. `camera = "24h"` for cameras that report
    /// only incidents.
    pub kinds: BTreeMap<String, Dur>,
    /// Per device id (matched without regard to case), e.g. `"gate-east" = "2h"`.
    pub devices: BTreeMap<String, Dur>,
    /// `/healthz` answers 503 once the site broker has been unreachable this long. Default 60 s.
    pub link_grace: Dur,
    /// An MQTT device silent this long is forgotten (page, API, heartbeat, metrics). Default
    /// 30 days.
    pub forget_after: Dur,
    /// Most MQTT devices learned from traffic (remembered ones included): it bounds the device
    /// table, never the events counted. A new device past it is learned and its events count;
    /// the longest-silent device is forgotten instead (counted, logged once per burst, shown),
    /// so a flood of invented device ids cannot grow the store, the page, the API or the
    /// metrics. Default 2000.
    pub max_devices: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            silence: Dur(Duration::from_secs(15 * 60)),
            kinds: BTreeMap::new(),
            devices: BTreeMap::new(),
            link_grace: Dur(Duration::from_secs(60)),
            forget_after: Dur(Duration::from_secs(30 * 86_400)),
            max_devices: 2000,
        }
    }
}

/// `[clock]`: the gateway clock's trust (contract: "Clocks").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Clock {
    /// Hold intake until the kernel reports the clock synchronized (adjtimex). Off by default:
    /// many boxes and virtual machines never set that flag.
    pub require_sync: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Gateway {
    pub id: String,
    pub district: Option<String>,
    pub street: Option<String>,
    pub community: Option<String>,
    pub compound: Option<String>,
    pub data_dir: PathBuf,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            id: String::new(),
            district: None,
            street: None,
            community: None,
            compound: None,
            data_dir: PathBuf::from("/var/lib/zhian-gateway"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Broker {
    pub enabled: bool,
    pub listen: String,
    /// Credentials every client (devices, and this gateway's own `mqtt`/`upstream` clients when
    /// they use the embedded broker) must present. Required when `listen` is not loopback.
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (first line), instead of `password`; relative: in
    /// `$CREDENTIALS_DIRECTORY`.
    pub password_file: Option<PathBuf>,
}

impl Default for Broker {
    fn default() -> Self {
        Broker {
            enabled: false,
            listen: "127.0.0.1:1883".into(),
            username: None,
            password: None,
            password_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mqtt {
    pub enabled: bool,
    pub url: String,
    pub topics: Vec<String>,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (first line), instead of `password`. A relative path is
    /// looked up in `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS: this box's certificate and key for the site broker (with `ca_file`).
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub keep_alive: Dur,
    pub reconnect_min: Dur,
    pub reconnect_max: Dur,
    /// The site broker's limit of unacknowledged QoS 1 messages it sends this client
    /// (mosquitto `max_inflight_messages`, default 20; 0 there means no limit). The committer
    /// commits as soon as a batch holds this many unacknowledged messages, since the broker
    /// sends no more until they are acknowledged. 0 here: unknown, learned from the broker
    /// (a batch that stops growing at the same size).
    pub max_inflight: u32,
    /// Vendor payload mappings (contract: "Vendor payloads"; see [`sources`]).
    pub sources: Vec<SourceCfg>,
}

impl Default for Mqtt {
    fn default() -> Self {
        Mqtt {
            enabled: true,
            url: "mqtt://127.0.0.1:1883".into(),
            topics: vec!["zhian/+/+".into()],
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            keep_alive: Dur::secs(30),
            reconnect_min: Dur::millis(500),
            reconnect_max: Dur::secs(30),
            max_inflight: 0,
            sources: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dedup {
    pub ttl: Dur,
    /// Most expired dedup keys purged per maintenance tick (keeps each commit short).
    pub purge_batch: u32,
}

impl Default for Dedup {
    fn default() -> Self {
        Dedup {
            ttl: Dur::secs(24 * 3600),
            purge_batch: 5000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Aggregate {
    pub window: Dur,
    pub grace: Dur,
    pub max_lateness: Dur,
    pub max_future_skew: Dur,
}

impl Default for Aggregate {
    fn default() -> Self {
        Aggregate {
            window: Dur::secs(60),
            grace: Dur::secs(10),
            max_lateness: Dur::secs(24 * 3600),
            max_future_skew: Dur::secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Store {
    pub raw_retention: Dur,
    pub max_size: ByteSize,
    /// Group commit: most events in one write transaction.
    pub batch_max: u32,
    /// Group commit: the longest a message waits for its batch's commit (and so for its
    /// acknowledgement) while events are sparse. A batch commits sooner when it fills, holds
    /// an alert, or holds as many unacknowledged messages as the site broker sends.
    pub batch_linger: Dur,
    /// What to do with a store file that cannot be opened: `quarantine` (move it aside and
    /// start a fresh store) or `refuse` (exit 74).
    pub on_damage: OnDamage,
}

/// `store.on_damage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDamage {
    /// Move the damaged file aside as `zhian.redb.damaged-<UTC time>`, start a fresh store.
    #[default]
    Quarantine,
    /// Exit 74 (EX_IOERR) naming the file.
    Refuse,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            raw_retention: Dur::secs(7 * 24 * 3600),
            max_size: ByteSize(2 << 30),
            batch_max: 2048,
            batch_linger: Dur::millis(1800),
            on_damage: OnDamage::Quarantine,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    pub enabled: bool,
    pub url: String,
    pub topic_prefix: String,
    pub client_id: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// A file holding the password (first line), instead of `password`; relative: in
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`).
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub heartbeat: Dur,
    pub max_inflight: u16,
    /// The district broker's largest packet: summaries larger than this are sent in parts.
    pub max_packet_size: ByteSize,
    pub keep_alive: Dur,
    pub reconnect_min: Dur,
    pub reconnect_max: Dur,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            enabled: true,
            url: "mqtts://district.example:8883".into(),
            topic_prefix: "zhian/district".into(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            heartbeat: Dur::secs(60),
            max_inflight: 32,
            max_packet_size: ByteSize(256 << 10),
            keep_alive: Dur::secs(30),
            reconnect_min: Dur::secs(1),
            reconnect_max: Dur::secs(120),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Status {
    pub enabled: bool,
    pub listen: String,
    pub username: Option<String>,
    /// PHC string (argon2) from `zhian-gateway hash-password`.
    pub password_hash: Option<Secret>,
    /// The compound's UTC offset, for "today" and the hourly chart (China: +08:00, no DST).
    pub timezone: String,
    /// Most concurrent HTTP connections; more wait until one closes.
    pub max_connections: u32,
    /// How often the page reloads itself.
    pub refresh: Dur,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            username: None,
            password_hash: None,
            timezone: "+08:00".into(),
            max_connections: 32,
            refresh: Dur::secs(30),
        }
    }
}

/// Parse a UTC offset like `+08:00` or `-03:30` into seconds.
pub fn parse_utc_offset(s: &str) -> Option<i32> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    ((0..=14).contains(&h) && (0..60).contains(&m)).then_some(sign * (h * 3600 + m * 60))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SubjectMode {
    /// Keyed pseudonym (BLAKE3 with a key kept in `privacy.key_dir`, outside the store,
    /// rotated per `privacy.rotate`); never leaves the box.
    #[default]
    Hashed,
    /// Not stored at all.
    Drop,
    /// Stored as received (still never sent upstream).
    Plain,
}

/// How often the pseudonym key changes (`privacy.rotate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyRotation {
    /// A new key at each local midnight (`status.timezone`); a day's key is destroyed once
    /// `aggregate.max_lateness` has passed after its day.
    #[default]
    Daily,
    /// One key for ever: pseudonyms link a resident across days (not recommended).
    Never,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Privacy {
    pub subjects: SubjectMode,
    /// Where the pseudonym keys live (see [`crate::keys`]); default `<data_dir>.keys`, beside
    /// the data dir and never inside it, so a backup of the data dir holds no key.
    pub key_dir: Option<PathBuf>,
    pub rotate: KeyRotation,
}

impl Privacy {
    /// `privacy.key_dir`, or its default beside `data_dir`.
    pub fn key_dir(&self, data_dir: &Path) -> PathBuf {
        match &self.key_dir {
            Some(d) => d.clone(),
            None => {
                let mut s = data_dir.as_os_str().to_os_string();
                if s.len() > 1 && s.to_string_lossy().ends_with('/') {
                    s = data_dir.components().as_path().as_os_str().to_os_string();
                }
                s.push(".keys");
                PathBuf::from(s)
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Alerts {
    pub actions: Vec<String>,
}

impl Default for Alerts {
    fn default() -> Self {
        Alerts {
            actions: vec![
                "high_altitude_throw".into(),
                "fire_lane_blocked".into(),
                "intrusion".into(),
            ],
        }
    }
}

/// `[modbus]`: counters and states polled from Modbus TCP/RTU controllers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Modbus {
    pub devices: Vec<ModbusDevice>,
}

/// One `[[modbus.devices]]` entry: a unit on a TCP connection or an RS-485 line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusDevice {
    /// Counted under this name (the summary's `device`); 1-64 of [A-Za-z0-9_.-].
    pub name: String,
    /// An example (the reference config's devices): checked like any device, never polled,
    /// never shown. Remove the flag (or the device) once it describes a real one.
    #[serde(default)]
    pub example: bool,
    /// `vehicle` or `access`.
    pub kind: crate::core::event::Kind,
    /// `host:port` of a Modbus TCP device (or gateway).
    #[serde(default)]
    pub tcp: Option<String>,
    /// A serial line (RS-485) shared by every device naming the same `path`.
    #[serde(default)]
    pub rtu: Option<Rtu>,
    /// Unit (slave) id, 0-247 (TCP devices commonly use 1 or 255).
    #[serde(default = "default_unit")]
    pub unit: u8,
    #[serde(default = "default_poll")]
    pub poll: Dur,
    #[serde(default = "default_timeout")]
    pub timeout: Dur,
    /// Failed polls in a row before the device counts as offline.
    #[serde(default = "default_offline_after")]
    pub offline_after: u32,
    #[serde(default)]
    pub points: Vec<ModbusPoint>,
}

fn default_unit() -> u8 {
    1
}
fn default_poll() -> Dur {
    Dur::secs(1)
}
fn default_timeout() -> Dur {
    Dur::millis(500)
}
fn default_offline_after() -> u32 {
    3
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rtu {
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}

/// `parity`: `"N"`, `"E"`, `"O"` as Modbus tools write it (Telegraf, pymodbus), or `"none"`,
/// `"even"`, `"odd"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Parity {
    #[default]
    #[serde(alias = "N", alias = "n")]
    None,
    #[serde(alias = "E", alias = "e")]
    Even,
    #[serde(alias = "O", alias = "o")]
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Holding,
    Input,
    Coil,
    Discrete,
}

impl Table {
    /// Coils and discrete inputs are bits; holding and input registers are 16-bit words.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PointType {
    U16,
    U32,
    I32,
    F32,
    Bool,
}

impl PointType {
    /// Registers (or bits) the value spans.
    pub fn width(self) -> u16 {
        match self {
            PointType::U16 | PointType::Bool => 1,
            PointType::U32 | PointType::I32 | PointType::F32 => 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WordOrder {
    /// High word first (the Modbus convention).
    #[default]
    Big,
    Little,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Counter,
    State,
}

/// One `[[modbus.devices.points]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusPoint {
    pub name: String,
    pub table: Table,
    /// 0-based address.
    pub address: u32,
    #[serde(rename = "type")]
    pub ty: PointType,
    #[serde(default)]
    pub word_order: WordOrder,
    pub role: Role,
    /// Counters: the events' action and result.
    #[serde(default)]
    pub action: Option<String>,
    #[serde(default)]
    pub result: Option<String>,
    /// Counters: a decrease that looks like a wrap past the type's maximum is counted as one.
    #[serde(default)]
    pub wrap: bool,
    /// Counters: the glitch rule's bound. A reading that decreases, or rises by more than this
    /// since the last poll, is held for one more poll; if the next reading continues from the
    /// value before it, the held one was a misread and is dropped (counted per device).
    #[serde(default = "default_max_step")]
    pub max_step: u64,
}

fn default_max_step() -> u64 {
    1000
}

/// Where an MQTT broker is, parsed from `mqtt://host:port` or `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl BrokerUrl {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (tls, rest) = if let Some(r) = s.strip_prefix("mqtt://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("mqtts://") {
            (true, r)
        } else {
            return Err(format!("{s:?} must start with mqtt:// or mqtts://"));
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('@') || rest.contains('?') {
            return Err(format!(
                "{s:?}: only scheme://host[:port] is allowed; put credentials in username/password"
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| format!("{s:?}: invalid port"))?,
                None if after.is_empty() => default_port,
                None => return Err(format!("{s:?}: invalid host")),
            };
            (h.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (
                    h.to_string(),
                    p.parse()
                        .map_err(|_| format!("{s:?}: invalid port {p:?}"))?,
                ),
                None => (rest.to_string(), default_port),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: missing host"));
        }
        if port == 0 {
            return Err(format!("{s:?}: port 0"));
        }
        Ok(BrokerUrl { tls, host, port })
    }
}

/// Load the configuration from `path` (if it exists or was named explicitly) and the environment.
///
/// `explicit` says whether the path came from `--config`: a missing explicit file is an error,
/// a missing default file is not (defaults plus environment may be enough).
pub fn load(path: &Path, explicit: bool) -> Result<Config, Vec<Problem>> {
    load_with_env(path, explicit, None)
}

/// As [`load`], with the environment given as a map (tests) instead of read from the process.
pub fn load_with_env(
    path: &Path,
    explicit: bool,
    env: Option<config::Map<String, String>>,
) -> Result<Config, Vec<Problem>> {
    // Only ZHIAN_<SECTION>__<KEY> variables are config: another ZHIAN_* variable of the
    // environment (ZHIAN_BIN in a script, say) is not a key and must not fail the load.
    let env = env.unwrap_or_else(|| std::env::vars().collect());
    let env: config::Map<String, String> = env
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix("ZHIAN_")
                .is_some_and(|rest| rest.contains("__"))
        })
        .collect();
    let file = if path.exists() {
        Some(config::File::from(path.to_path_buf()).format(config::FileFormat::Toml))
    } else if explicit || !env.contains_key("ZHIAN_GATEWAY__ID") {
        // Without the file, only an environment that gives at least gateway.id is a config.
        return Err(vec![problem(
            "config",
            format!(
                "file {} does not exist (give the right --config PATH)",
                path.display()
            ),
        )]);
    } else {
        None
    };
    let build = |env: config::Map<String, String>| {
        let mut builder = config::Config::builder();
        if let Some(f) = &file {
            builder = builder.add_source(f.clone());
        }
        let environment = config::Environment::with_prefix("ZHIAN")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("mqtt.topics")
            .with_list_parse_key("alerts.actions")
            .source(Some(env));
        finish(builder.add_source(environment))
    };
    match build(env.clone()) {
        Ok(c) => Ok(c),
        Err(problems) if !env.is_empty() => {
            // Blame the environment, not the file, for what only the environment brings: a
            // typo such as ZHIAN_UPSTREAM__PASWORD.
            let file_alone = build(config::Map::new()).err().unwrap_or_default();
            Err(problems
                .into_iter()
                .map(|p| {
                    if file_alone.contains(&p) {
                        return p;
                    }
                    let var = env_var_for(&p.key, &env);
                    match var {
                        Some(var) => problem(
                            format!("{var} (environment)"),
                            format!("{}: {}", p.key, p.message),
                        ),
                        None => p,
                    }
                })
                .collect())
        }
        Err(problems) => Err(problems),
    }
}

/// The environment variable that sets `key` (`upstream.pasword` -> `ZHIAN_UPSTREAM__PASWORD`),
/// if one is set; for a key path naming only a section, the first variable of that section
/// whose key is unknown.
fn env_var_for(key: &str, env: &config::Map<String, String>) -> Option<String> {
    let exact = format!("ZHIAN_{}", key.replace('.', "__").to_ascii_uppercase());
    if env.contains_key(&exact) {
        return Some(exact);
    }
    let section = format!(
        "ZHIAN_{}__",
        key.split('.').next().unwrap_or("").to_ascii_uppercase()
    );
    let mut vars: Vec<&String> = env.keys().filter(|k| k.starts_with(&section)).collect();
    vars.sort();
    vars.first().map(|v| v.to_string())
}

/// Defaults < `text` (TOML), no environment: the embedded demo site.
pub fn load_str(text: &str) -> Result<Config, Vec<Problem>> {
    finish(
        config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml)),
    )
}

fn finish(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
) -> Result<Config, Vec<Problem>> {
    let raw = builder.build().map_err(|e| vec![from_config_error(e)])?;
    let mut cfg: Config = serde_path_to_error::deserialize(raw).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        vec![problem(
            if path == "." { "config".into() } else { path },
            strip_key_suffix(&inner.to_string()),
        )]
    })?;
    // `data/.`, `a/../data`: one spelling per directory, so "is the key dir inside the data
    // dir" and the default key dir beside it are decided on the path meant.
    cfg.gateway.data_dir = normalize_path(&cfg.gateway.data_dir);
    cfg.privacy.key_dir = cfg.privacy.key_dir.as_deref().map(normalize_path);
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from);
    let mut problems = resolve_secrets(&mut cfg, creds.as_deref());
    problems.extend(validate(&cfg));
    if problems.is_empty() {
        Ok(cfg)
    } else {
        Err(problems)
    }
}

/// `p` without `.` components and with `..` applied to what precedes it (lexically: a `..`
/// after a symlink is resolved against the link's name, which `start` checks on disk).
pub fn normalize_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() && !p.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Fill each password from its `password_file`, or from the systemd credential named
/// `{section}.password` (`status.password_hash` for the page) when neither is given.
/// A relative `password_file` is looked up in `creds` (`$CREDENTIALS_DIRECTORY`, set by systemd
/// for `LoadCredential=` / `LoadCredentialEncrypted=`). The file's first line is the secret.
fn resolve_secrets(c: &mut Config, creds: Option<&Path>) -> Vec<Problem> {
    let mut p = Vec::new();
    let slots: [(&str, &mut Option<Secret>, Option<&PathBuf>); 4] = [
        ("mqtt", &mut c.mqtt.password, c.mqtt.password_file.as_ref()),
        (
            "upstream",
            &mut c.upstream.password,
            c.upstream.password_file.as_ref(),
        ),
        (
            "broker",
            &mut c.broker.password,
            c.broker.password_file.as_ref(),
        ),
        ("status", &mut c.status.password_hash, None),
    ];
    for (section, slot, file) in slots {
        if let Err(e) = fill_secret(section, slot, file, creds) {
            p.push(e);
        }
    }
    p
}

/// One section's secret: from its `password_file` (relative: in `creds`), or, when neither it
/// nor the value is given, from the credential `{section}.password` (`status.password_hash`
/// for the page). The file's first line is the secret.
pub(crate) fn fill_secret(
    section: &str,
    slot: &mut Option<Secret>,
    file: Option<&PathBuf>,
    creds: Option<&Path>,
) -> Result<(), Problem> {
    let (key, name) = if section == "status" {
        ("status.password_hash".to_string(), "password_hash")
    } else {
        (format!("{section}.password_file"), "password")
    };
    let path = match (file, &*slot) {
        (Some(_), Some(_)) => {
            return Err(problem(
                &key,
                format!("give {section}.password or {key}, not both"),
            ));
        }
        (Some(f), None) if f.is_absolute() => f.clone(),
        (Some(f), None) => match creds {
            Some(dir) => dir.join(f),
            None => {
                return Err(problem(
                    &key,
                    format!(
                        "{} is relative: give an absolute path, or run under systemd with LoadCredential (it sets $CREDENTIALS_DIRECTORY)",
                        f.display()
                    ),
                ));
            }
        },
        (None, None) => match creds.map(|d| d.join(format!("{section}.{name}"))) {
            Some(f) if f.is_file() => f,
            _ => return Ok(()),
        },
        (None, Some(_)) => return Ok(()),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
            if first.is_empty() {
                Err(problem(&key, format!("{} is empty", path.display())))
            } else {
                *slot = Some(Secret(first.to_string()));
                Ok(())
            }
        }
        Err(e) => Err(problem(
            &key,
            format!("cannot read {}: {e}", path.display()),
        )),
    }
}

pub(crate) fn strip_key_suffix(msg: &str) -> String {
    // config's own messages sometimes end with " for key `x`"; the path is already in front.
    let msg = match msg.find(" for key `") {
        Some(i) => &msg[..i],
        None => msg,
    };
    enum_choices(msg).unwrap_or_else(|| msg.to_string())
}

/// The values each config enum takes, for errors that name a value it does not take.
const ENUM_CHOICES: &[(&str, &str)] = &[
    (
        "Parity",
        "\"N\", \"E\", \"O\" (or \"none\", \"even\", \"odd\")",
    ),
    ("Table", "\"holding\", \"input\", \"coil\", \"discrete\""),
    ("PointType", "\"u16\", \"u32\", \"i32\", \"f32\", \"bool\""),
    ("WordOrder", "\"big\", \"little\""),
    ("Role", "\"counter\", \"state\""),
    ("Kind", "\"access\", \"camera\", \"vehicle\""),
    ("SubjectMode", "\"hashed\", \"drop\", \"plain\""),
    ("KeyRotation", "\"daily\", \"never\""),
    ("OnDamage", "\"quarantine\", \"refuse\""),
];

/// `config` reports an unknown enum value as "enum Parity does not have variant constructor X":
/// say which values are allowed instead.
fn enum_choices(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("enum ")?;
    let (name, value) = rest.split_once(" does not have variant constructor ")?;
    let (_, choices) = ENUM_CHOICES.iter().find(|(n, _)| *n == name)?;
    Some(format!("{value:?} is not one of {choices}"))
}

pub(crate) fn from_config_error(e: config::ConfigError) -> Problem {
    match e {
        // A TOML syntax error quotes the file around the error, which may be a password in any
        // form (a multi-line string, an inline table): keep only the position and what was
        // expected, never the file's text.
        config::ConfigError::FileParse { uri, cause } => {
            let text = cause.to_string();
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let t = l.trim_start();
                    !(t.starts_with('|')
                        || t.split_once('|')
                            .is_some_and(|(n, _)| n.trim().chars().all(|c| c.is_ascii_digit())))
                })
                .collect();
            problem(
                "config",
                format!(
                    "cannot parse {}: {} (the file's text is not shown: it may hold secrets)",
                    uri.unwrap_or_default(),
                    kept.join(" ")
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            )
        }
        config::ConfigError::Foreign(cause) => problem("config", cause.to_string()),
        other => problem("config", other.to_string()),
    }
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
}

fn is_action_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

/// Checks what serde cannot: ranges, required keys, cross-key rules.
pub fn validate(c: &Config) -> Vec<Problem> {
    let mut p = Vec::new();
    validate_health(&c.health, &mut p);
    validate_care(&c.care, &mut p);
    let g = &c.gateway;
    if g.id.is_empty() {
        p.push(problem("gateway.id", "required (1-64 of [a-z0-9-])"));
    } else if g.id.len() > 64 || !g.id.chars().all(is_id_char) {
        p.push(problem(
            "gateway.id",
            format!("{:?} must be 1-64 of [a-z0-9-]", g.id),
        ));
    }
    if g.data_dir.as_os_str().is_empty() {
        p.push(problem("gateway.data_dir", "must not be empty"));
    }
    if let Some(k) = &c.privacy.key_dir {
        if !k.is_absolute() {
            p.push(problem(
                "privacy.key_dir",
                format!("{} must be an absolute path", k.display()),
            ));
        } else if k.starts_with(&g.data_dir) {
            p.push(problem(
                "privacy.key_dir",
                format!(
                    "{} is inside gateway.data_dir: a copy or backup of the data dir would hold the keys; put it beside it (default: {})",
                    k.display(),
                    Privacy::default().key_dir(&g.data_dir).display()
                ),
            ));
        }
    }
    if c.broker.enabled && !cfg!(feature = "embedded-broker") {
        p.push(problem(
            "broker.enabled",
            "this build has no embedded broker (cargo feature `embedded-broker`); use a site broker",
        ));
    }
    if c.broker.enabled {
        let lan = c
            .broker
            .listen
            .parse::<SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback());
        let creds = (c.broker.username.is_some(), c.broker.password.is_some());
        if lan && creds != (true, true) {
            p.push(problem(
                "broker.username",
                "the embedded broker listens on the LAN: set broker.username and broker.password (devices carry cards, faces and plates)",
            ));
        } else if creds.0 != creds.1 {
            p.push(problem(
                "broker.password",
                "broker.username and broker.password go together",
            ));
        }
    }
    if c.broker.listen.parse::<SocketAddr>().is_err() {
        p.push(problem(
            "broker.listen",
            format!("{:?} is not host:port", c.broker.listen),
        ));
    }
    if c.mqtt.enabled {
        if let Err(e) = BrokerUrl::parse(&c.mqtt.url) {
            p.push(problem("mqtt.url", e));
        }
        if c.mqtt.topics.is_empty() {
            p.push(problem(
                "mqtt.topics",
                "at least one topic filter is needed",
            ));
        }
        for (i, t) in c.mqtt.topics.iter().enumerate() {
            if t.is_empty() || t.len() > 1024 {
                p.push(problem(format!("mqtt.topics[{i}]"), "invalid topic filter"));
            }
        }
        check_client_id(&mut p, "mqtt.client_id", c.mqtt.client_id.as_deref());
        check_backoff(&mut p, "mqtt", c.mqtt.reconnect_min, c.mqtt.reconnect_max);
        sources::compile(&c.mqtt.sources, &mut p);
        // A source must not take canonical messages (contract: "Canonical topics keep working").
        for (i, s) in c.mqtt.sources.iter().enumerate() {
            if let Some(t) = c
                .mqtt
                .topics
                .iter()
                .find(|t| sources::filters_overlap(&s.topic, t))
            {
                p.push(problem(
                    format!("mqtt.sources[{i}].topic"),
                    format!(
                        "{:?} overlaps mqtt.topics {t:?}: canonical messages would be mapped by this source; give the source's devices a topic of their own",
                        s.topic
                    ),
                ));
            }
        }
        check_file(&mut p, "mqtt.ca_file", c.mqtt.ca_file.as_deref());
        check_file(&mut p, "mqtt.client_cert", c.mqtt.client_cert.as_deref());
        check_file(&mut p, "mqtt.client_key", c.mqtt.client_key.as_deref());
        if c.mqtt.client_cert.is_some() && c.mqtt.ca_file.is_none() {
            p.push(problem(
                "mqtt.client_cert",
                "mutual TLS needs mqtt.ca_file (the site broker's CA) as well",
            ));
        }
        if c.mqtt.client_cert.is_some() != c.mqtt.client_key.is_some() {
            p.push(problem(
                "mqtt.client_key",
                "client_cert and client_key go together",
            ));
        }
    }
    let w = c.aggregate.window.0;
    if w < Duration::from_secs(1) || w > Duration::from_secs(24 * 3600) || w.subsec_nanos() != 0 {
        p.push(problem(
            "aggregate.window",
            "must be a whole number of seconds between 1s and 24h",
        ));
    }
    if c.aggregate.grace.0 >= c.aggregate.max_lateness.0 {
        p.push(problem(
            "aggregate.grace",
            "must be shorter than aggregate.max_lateness",
        ));
    }
    if c.aggregate.max_lateness.0 > Duration::from_secs(30 * 24 * 3600) {
        p.push(problem("aggregate.max_lateness", "at most 30d"));
    }
    if c.dedup.ttl.0 < Duration::from_secs(1) {
        p.push(problem("dedup.ttl", "at least 1s"));
    }
    if c.dedup.ttl < c.aggregate.max_lateness {
        p.push(problem(
            "dedup.ttl",
            format!(
                "must be at least aggregate.max_lateness ({}): a message redelivered after its dedup key expired but still within max_lateness would count twice",
                humantime::format_duration(c.aggregate.max_lateness.0)
            ),
        ));
    }
    if c.dedup.purge_batch == 0 {
        p.push(problem("dedup.purge_batch", "at least 1"));
    }
    if c.upstream.max_packet_size.0 < 4096 || c.upstream.max_packet_size.0 > 268_435_455 {
        p.push(problem(
            "upstream.max_packet_size",
            "between 4KiB and 256MiB (the MQTT maximum)",
        ));
    }
    if c.store.max_size.0 < (8 << 20) {
        p.push(problem("store.max_size", "at least 8MiB"));
    }
    if c.store.batch_max == 0 || c.store.batch_max > 65_536 {
        p.push(problem("store.batch_max", "between 1 and 65536"));
    }
    if c.store.batch_linger.0 > Duration::from_secs(2) {
        p.push(problem(
            "store.batch_linger",
            "at most 2s (a device message is acknowledged within about that long)",
        ));
    }
    if c.upstream.enabled {
        if let Err(e) = BrokerUrl::parse(&c.upstream.url) {
            p.push(problem("upstream.url", e));
        }
        let prefix = &c.upstream.topic_prefix;
        if prefix.is_empty() || prefix.contains(['+', '#']) || prefix.ends_with('/') {
            p.push(problem(
                "upstream.topic_prefix",
                "must be non-empty, without wildcards or a trailing '/'",
            ));
        }
        check_client_id(
            &mut p,
            "upstream.client_id",
            c.upstream.client_id.as_deref(),
        );
        if c.upstream.max_inflight == 0 || c.upstream.max_inflight > 1000 {
            p.push(problem("upstream.max_inflight", "between 1 and 1000"));
        }
        if c.upstream.heartbeat.0 < Duration::from_secs(1) {
            p.push(problem("upstream.heartbeat", "at least 1s"));
        }
        check_backoff(
            &mut p,
            "upstream",
            c.upstream.reconnect_min,
            c.upstream.reconnect_max,
        );
        check_file(&mut p, "upstream.ca_file", c.upstream.ca_file.as_deref());
        check_file(
            &mut p,
            "upstream.client_cert",
            c.upstream.client_cert.as_deref(),
        );
        check_file(
            &mut p,
            "upstream.client_key",
            c.upstream.client_key.as_deref(),
        );
        if c.upstream.client_cert.is_some() && c.upstream.ca_file.is_none() {
            p.push(problem(
                "upstream.client_cert",
                "mutual TLS needs upstream.ca_file (the district CA) as well",
            ));
        }
        if c.upstream.client_cert.is_some() != c.upstream.client_key.is_some() {
            p.push(problem(
                "upstream.client_key",
                "client_cert and client_key go together",
            ));
        }
    }
    match c.status.listen.parse::<SocketAddr>() {
        Err(_) => p.push(problem(
            "status.listen",
            format!("{:?} is not ip:port", c.status.listen),
        )),
        Ok(addr) if c.status.enabled => {
            let creds = (
                c.status.username.is_some(),
                c.status.password_hash.is_some(),
            );
            if c.status
                .username
                .as_deref()
                .is_some_and(|u| u.is_empty() || u.contains(':'))
            {
                p.push(problem(
                    "status.username",
                    "must be non-empty and without ':' (HTTP Basic auth)",
                ));
            } else if !addr.ip().is_loopback() && creds != (true, true) {
                p.push(problem(
                    "status.username",
                    format!("status.listen {addr} is reachable from the LAN: set status.username and status.password_hash (`zhian-gateway hash-password` makes one)"),
                ));
            } else if creds.0 != creds.1 {
                p.push(problem(
                    "status.password_hash",
                    "status.username and status.password_hash go together",
                ));
            }
        }
        Ok(_) => {}
    }
    if let Some(h) = &c.status.password_hash {
        if argon2::PasswordHash::new(&h.0).is_err() {
            p.push(problem(
                "status.password_hash",
                "not a PHC password hash; make one with `zhian-gateway hash-password`",
            ));
        }
    }
    if parse_utc_offset(&c.status.timezone).is_none() {
        p.push(problem(
            "status.timezone",
            format!(
                "{:?} is not a UTC offset like \"+08:00\"",
                c.status.timezone
            ),
        ));
    }
    if c.status.max_connections == 0 || c.status.max_connections > 1024 {
        p.push(problem("status.max_connections", "between 1 and 1024"));
    }
    if c.status.refresh.0 < Duration::from_secs(5) {
        p.push(problem("status.refresh", "at least 5s"));
    }
    for (i, a) in c.alerts.actions.iter().enumerate() {
        if a.is_empty() || a.len() > 64 || !a.chars().all(is_action_char) {
            p.push(problem(
                format!("alerts.actions[{i}]"),
                format!("{a:?} must be 1-64 of [a-z0-9_]"),
            ));
        }
    }
    validate_modbus(&c.modbus, &mut p);
    p
}

fn validate_health(h: &Health, p: &mut Vec<Problem>) {
    let zero = |d: &Dur| d.0.is_zero();
    for (key, d) in [
        ("health.silence", &h.silence),
        ("health.link_grace", &h.link_grace),
        ("health.forget_after", &h.forget_after),
    ] {
        if zero(d) {
            p.push(problem(key, "must be more than 0"));
        }
    }
    if !(1..=100_000).contains(&h.max_devices) {
        p.push(problem(
            "health.max_devices",
            format!("{} must be 1-100000", h.max_devices),
        ));
    }
    for (k, d) in &h.kinds {
        if crate::core::event::Kind::parse(k).is_none() {
            p.push(problem(
                format!("health.kinds.{k:?}"),
                "not a kind: one of \"access\", \"camera\", \"vehicle\"",
            ));
        } else if zero(d) {
            p.push(problem(format!("health.kinds.{k}"), "must be more than 0"));
        }
    }
    for (k, d) in &h.devices {
        if !crate::core::event::valid_device(k) {
            p.push(problem(
                format!("health.devices.{k:?}"),
                "not a device id (1-64 of [A-Za-z0-9_.-])",
            ));
        } else if zero(d) {
            p.push(problem(
                format!("health.devices.{k:?}"),
                "must be more than 0",
            ));
        }
    }
    if zero(&h.forget_after) {
        return;
    }
    // Every cadence must be shorter than forget_after: name the longest one that is not.
    let mut cadences: Vec<(String, &Dur)> = vec![("health.silence".into(), &h.silence)];
    cadences.extend(
        h.kinds
            .iter()
            .map(|(k, d)| (format!("health.kinds.{k}"), d)),
    );
    cadences.extend(
        h.devices
            .iter()
            .map(|(k, d)| (format!("health.devices.{k:?}"), d)),
    );
    if let Some((key, d)) = cadences
        .iter()
        .filter(|(_, d)| d.0 >= h.forget_after.0)
        .max_by_key(|(_, d)| d.0)
    {
        p.push(problem(
            "health.forget_after",
            format!(
                "{} must be longer than {key} ({d}{}): a device would be forgotten before it is offline",
                h.forget_after,
                if key == "health.silence" { ", the default when not set" } else { "" }
            ),
        ));
    }
}

/// The reference config's example values still in `c`, one note each (`check-config` prints
/// them; they are valid, but no real site uses them).
pub fn example_notes(c: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if c.gateway.id == "fy-fuchun-jiangbin-01" {
        out.push("gateway.id is the reference config's example: give each box its own (two boxes with one id take each other's connections)".to_string());
    }
    for (key, url) in [("mqtt.url", &c.mqtt.url), ("upstream.url", &c.upstream.url)] {
        if let Ok(u) = BrokerUrl::parse(url) {
            if u.host.ends_with(".example") || u.host.ends_with(".invalid") {
                out.push(format!(
                    "{key} {url} is an example host: put the real broker's"
                ));
            }
        }
    }
    for (i, d) in c.modbus.devices.iter().enumerate() {
        if d.example {
            out.push(format!("modbus.devices[{i}] ({}) is an example (example = true): checked, never polled; remove the flag once it describes a real device", d.name));
        }
    }
    out
}

/// Environment variables that look meant for the config but are not read: `ZHIAN_<SECTION>_<KEY>`
/// with one underscore where two are needed. One line each, for `check-config` and the log.
pub fn env_notes(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    const SECTIONS: [&str; 13] = [
        "GATEWAY",
        "BROKER",
        "MQTT",
        "DEDUP",
        "AGGREGATE",
        "STORE",
        "UPSTREAM",
        "STATUS",
        "PRIVACY",
        "ALERTS",
        "MODBUS",
        "CLOCK",
        "HEALTH",
    ];
    let mut out: Vec<String> = env
        .into_iter()
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix("ZHIAN_")?;
            if rest.contains("__") {
                return None;
            }
            let (section, key) = rest.split_once('_')?;
            SECTIONS.contains(&section).then(|| {
                format!(
                    "{k} is not read: config variables are ZHIAN_<SECTION>__<KEY>, two underscores (ZHIAN_{section}__{key}?)"
                )
            })
        })
        .collect();
    out.sort();
    out
}

fn validate_modbus(m: &Modbus, p: &mut Vec<Problem>) {
    let mut names = std::collections::BTreeSet::new();
    let mut lines: std::collections::BTreeMap<PathBuf, (usize, Rtu)> = Default::default();
    for (i, d) in m.devices.iter().enumerate() {
        let k = |rest: &str| format!("modbus.devices[{i}].{rest}");
        if !crate::core::event::valid_device(&d.name) {
            p.push(problem(
                k("name"),
                format!("{:?} must be 1-64 of [A-Za-z0-9_.-]", d.name),
            ));
        } else if !names.insert((d.kind, d.name.clone())) {
            p.push(problem(
                k("name"),
                format!("{:?} is used by another {} device", d.name, d.kind),
            ));
        }
        if d.kind == crate::core::event::Kind::Camera {
            p.push(problem(k("kind"), "must be vehicle or access"));
        }
        match (&d.tcp, &d.rtu) {
            (Some(_), Some(_)) => p.push(problem(
                k("tcp"),
                "a device has either tcp or rtu, not both",
            )),
            (None, None) => p.push(problem(
                k("tcp"),
                "a device needs tcp = \"host:port\" or rtu = { path = ... }",
            )),
            (Some(addr), None) => {
                if addr
                    .rsplit_once(':')
                    .and_then(|(h, port)| {
                        (!h.is_empty()).then(|| port.parse::<u16>().ok()).flatten()
                    })
                    .is_none()
                {
                    p.push(problem(k("tcp"), format!("{addr:?} is not host:port")));
                }
            }
            (None, Some(r)) => match &r.path {
                None => p.push(problem(
                    k("rtu.path"),
                    "an RTU device needs the serial port path",
                )),
                Some(path) => {
                    if !(1200..=921_600).contains(&r.baud) {
                        p.push(problem(k("rtu.baud"), "between 1200 and 921600"));
                    }
                    if !(5..=8).contains(&r.data_bits) {
                        p.push(problem(k("rtu.data_bits"), "5, 6, 7 or 8"));
                    }
                    if !(1..=2).contains(&r.stop_bits) {
                        p.push(problem(k("rtu.stop_bits"), "1 or 2"));
                    }
                    match lines.get(path) {
                        Some((j, other)) if other != r => p.push(problem(
                            k("rtu"),
                            format!("{} is shared with modbus.devices[{j}] but its line settings differ", path.display()),
                        )),
                        _ => {
                            lines.insert(path.clone(), (i, r.clone()));
                        }
                    }
                }
            },
        }
        if (d.unit == 0 || d.unit > 247) && d.rtu.is_some() {
            p.push(problem(
                k("unit"),
                format!(
                    "{} is not an RTU unit id: use 1-247 (0 is the broadcast address, which no unit answers)",
                    d.unit
                ),
            ));
        }
        if d.poll.0 < Duration::from_millis(10) {
            p.push(problem(k("poll"), "at least 10ms"));
        }
        if d.timeout.0 < Duration::from_millis(10) || d.timeout.0 > Duration::from_secs(30) {
            p.push(problem(k("timeout"), "between 10ms and 30s"));
        }
        if d.offline_after == 0 {
            p.push(problem(k("offline_after"), "at least 1"));
        }
        if d.points.is_empty() {
            p.push(problem(k("points"), "a device needs at least one point"));
        }
        let mut point_names = std::collections::BTreeSet::new();
        for (j, pt) in d.points.iter().enumerate() {
            let k = |rest: &str| format!("modbus.devices[{i}].points[{j}].{rest}");
            if pt.name.is_empty()
                || pt.name.len() > 64
                || !pt
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                p.push(problem(
                    k("name"),
                    format!("{:?} must be 1-64 of [A-Za-z0-9_-]", pt.name),
                ));
            } else if !point_names.insert(pt.name.clone()) {
                p.push(problem(
                    k("name"),
                    format!("{:?} appears twice on this device", pt.name),
                ));
            }
            let end = u64::from(pt.address) + u64::from(pt.ty.width());
            if end > 65_536 {
                p.push(problem(
                    k("address"),
                    format!(
                        "{} (+{} {}) is past the last Modbus address 65535",
                        pt.address,
                        pt.ty.width(),
                        if pt.table.is_bits() {
                            "bits"
                        } else {
                            "registers"
                        }
                    ),
                ));
            }
            if pt.table.is_bits() && pt.ty != PointType::Bool {
                p.push(problem(
                    k("type"),
                    format!("a {:?} table holds bits: use type = \"bool\"", pt.table)
                        .to_lowercase(),
                ));
            }
            match pt.role {
                Role::Counter => {
                    if matches!(pt.ty, PointType::F32 | PointType::Bool) {
                        p.push(problem(
                            k("type"),
                            "a counter needs an integer type (u16, u32 or i32)",
                        ));
                    }
                    match pt.action.as_deref() {
                        Some(a) if crate::core::event::valid_word(a) => {}
                        Some(a) => p.push(problem(
                            k("action"),
                            format!("{a:?} must be 1-64 of [a-z0-9_]"),
                        )),
                        None => p.push(problem(
                            k("action"),
                            "a counter needs an action (e.g. \"entry\")",
                        )),
                    }
                    if let Some(r) = pt.result.as_deref() {
                        if !crate::core::event::valid_word(r) {
                            p.push(problem(
                                k("result"),
                                format!("{r:?} must be 1-64 of [a-z0-9_]"),
                            ));
                        }
                    }
                }
                Role::State => {
                    if pt.action.is_some() || pt.result.is_some() || pt.wrap {
                        p.push(problem(
                            k("role"),
                            "action, result and wrap belong to counters, not states",
                        ));
                    }
                }
            }
        }
    }
}

pub(crate) fn check_client_id(p: &mut Vec<Problem>, key: &str, id: Option<&str>) {
    if let Some(id) = id {
        if id.is_empty() || id.len() > 128 {
            p.push(problem(key, "must be 1-128 characters"));
        }
    }
}

pub(crate) fn check_backoff(p: &mut Vec<Problem>, section: &str, min: Dur, max: Dur) {
    if min.0 < Duration::from_millis(10) {
        p.push(problem(format!("{section}.reconnect_min"), "at least 10ms"));
    }
    if max < min {
        p.push(problem(
            format!("{section}.reconnect_max"),
            format!("must be at least {section}.reconnect_min"),
        ));
    }
}

pub(crate) fn check_file(p: &mut Vec<Problem>, key: &str, path: Option<&Path>) {
    if let Some(path) = path {
        if !path.is_file() {
            p.push(problem(
                key,
                format!("{} is not a readable file", path.display()),
            ));
        }
    }
}

impl Config {
    /// Client id on the device broker.
    pub fn mqtt_client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("zhian-{}", self.gateway.id))
    }

    /// Client id on the district broker.
    pub fn upstream_client_id(&self) -> String {
        self.upstream
            .client_id
            .clone()
            .unwrap_or_else(|| self.gateway.id.clone())
    }

    /// The vendor sources, compiled (a config that passed validation compiles whole).
    pub fn sources(&self) -> Vec<crate::core::mapping::Source> {
        sources::compile(&self.mqtt.sources, &mut Vec::new())
    }

    /// The site's UTC offset in seconds (`status.timezone`; +08:00 if unreadable).
    pub fn site_offset_s(&self) -> i32 {
        parse_utc_offset(&self.status.timezone).unwrap_or(8 * 3600)
    }

    /// The effective config as TOML, secrets redacted (for `check-config`).
    pub fn to_redacted_toml(&self) -> String {
        let text =
            toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        crate::logfmt::redact_url(&text)
    }
}

#[cfg(test)]
mod tests {
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
        let named = "[gateway]\nid = \"gw-1\"\n[[care.residents]]\nsubject = \"card:1\"\nalias = \"王秀英\"\n";
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
}
