//! The smaller sections' types and defaults: `[clock]`, `[gateway]`, `[broker]`, `[mqtt]`,
//! `[dedup]`, `[aggregate]`, `[store]`, `[upstream]`, `[status]`, `[privacy]`, `[alerts]`. Their
//! validation is in `validate.rs` (the cross-section rules need the whole config).

use super::*;

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
    pub timezone: UtcOffset,
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
            timezone: UtcOffset(8 * 3600),
            max_connections: 32,
            refresh: Dur::secs(30),
        }
    }
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

/// `[fleet]` (contract: "Fleet configuration"): remote configuration from the district. Set by
/// the installer only; a fragment may not touch this section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fleet {
    /// The trusted public key file (`fleet.pub`, one or more Ed25519 `PUBLIC KEY` blocks).
    /// Unset: remote configuration and `fleet diag` are off.
    pub trust: Option<PathBuf>,
    /// How long an applied change is watched before the box reports it `applied`; a failed
    /// health rule within it rolls the change back.
    pub probation: Dur,
}

impl Default for Fleet {
    fn default() -> Self {
        Fleet {
            trust: None,
            probation: Dur(Duration::from_secs(300)),
        }
    }
}

/// `[occupancy]` (contract: "Vehicles inside"): the vehicles inside the compound, from the
/// vehicle gates' plates. On when the section is in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Occupancy {
    /// Parking spaces (free = capacity − inside). Unset: no free spaces shown.
    pub capacity: Option<u32>,
    /// A stay at least this long is a long stay (page, API, upstream count).
    pub long_stay: Dur,
    /// A stay longer than this is a missed exit: dropped and counted.
    pub max_stay: Dur,
}

impl Default for Occupancy {
    fn default() -> Self {
        Occupancy {
            capacity: None,
            long_stay: Dur(Duration::from_secs(72 * 3600)),
            max_stay: Dur(Duration::from_secs(30 * 86_400)),
        }
    }
}
