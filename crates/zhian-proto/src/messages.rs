//! One type per upstream message (contract: "Upstream to the district platform"). Field order is
//! the order on the wire. Optional fields the box leaves out are `None`.

use crate::{Leaf, Message, Timestamp};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;

/// A `schema` tag: serializes as its string, parses only from exactly that string.
macro_rules! schema_tag {
    ($(#[$doc:meta])* $name:ident = $s:literal) => {
        $(#[$doc])*
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name;

        impl $name {
            /// The schema string.
            pub const NAME: &'static str = $s;
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str($s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let got = String::deserialize(d)?;
                if got == $s {
                    Ok($name)
                } else {
                    Err(serde::de::Error::custom(format!(
                        "schema {got:?}, expected {:?}",
                        $s
                    )))
                }
            }
        }
    };
}
pub(crate) use schema_tag;

schema_tag!(
    /// `zhian.summary.v1`.
    SummaryV1 = "zhian.summary.v1"
);
schema_tag!(
    /// `zhian.alert.v1`.
    AlertV1 = "zhian.alert.v1"
);
schema_tag!(
    /// `zhian.care.v1`.
    CareV1 = "zhian.care.v1"
);
schema_tag!(
    /// `zhian.daily.v1`.
    DailyV1 = "zhian.daily.v1"
);
schema_tag!(
    /// `zhian.status.v1` (optional on parse: a will written by another client may lack it).
    StatusV1 = "zhian.status.v1"
);
schema_tag!(
    /// `zhian.heartbeat.v1`.
    HeartbeatV1 = "zhian.heartbeat.v1"
);
schema_tag!(
    /// `zhian.occupancy.v1`.
    OccupancyV1 = "zhian.occupancy.v1"
);

/// The compound's place in the seed's layers, copied into summaries and daily messages
/// (contract: "The five layers"). Each label is optional; unknown fields are ignored on parse.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Site {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub district: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub street: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compound: Option<String>,
}

/// One counted row of a summary or daily message. Rows are sorted by kind, device, action,
/// result (the contract's order) and `n > 0`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Count {
    /// `access`, `camera` or `vehicle`.
    pub kind: String,
    pub device: String,
    pub action: String,
    pub result: String,
    pub n: u64,
}

/// A tumbling window: its start and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Window {
    pub start: Timestamp,
    /// Length, seconds.
    pub secs: u32,
}

/// `{prefix}/{gateway}/summary`: the counts of one closed window, revision `rev` (a re-issue
/// after late events is `rev + 1`); split as parts `1..=parts` when larger than the packet limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub schema: SummaryV1,
    pub gateway: String,
    #[serde(default)]
    pub site: Site,
    pub window: Window,
    pub rev: u32,
    /// 1-based part number, when split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<u32>,
    pub counts: Vec<Count>,
}

impl Message for Summary {
    const LEAF: Leaf = Leaf::Summary;
    const SCHEMA: &'static str = SummaryV1::NAME;
}

/// `{prefix}/{gateway}/alert`: a camera incident listed in `alerts.actions`. `id` is the
/// device's own event id, never a subject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    pub schema: AlertV1,
    pub gateway: String,
    pub kind: String,
    pub device: String,
    pub action: String,
    pub id: String,
    pub ts: Timestamp,
}

impl Message for Alert {
    const LEAF: Leaf = Leaf::Alert;
    const SCHEMA: &'static str = AlertV1::NAME;
}

/// A care-watch resident's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CareState {
    /// Not seen for longer than the resident's limit.
    Silent,
    /// Seen again after a `silent` notice.
    Seen,
}

impl CareState {
    /// `silent` or `seen`.
    pub fn as_str(self) -> &'static str {
        match self {
            CareState::Silent => "silent",
            CareState::Seen => "seen",
        }
    }
}

/// `{prefix}/{gateway}/care`: a care-watch notice, by alias only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Care {
    pub schema: CareV1,
    pub gateway: String,
    /// The installer's alias for the resident (`3-2-601`), never a subject.
    pub alias: String,
    pub state: CareState,
    /// The last access event's time (`None`: never seen since the watch began).
    pub last_seen: Option<Timestamp>,
    /// How long the resident was (or has been) silent, seconds.
    pub silent_secs: i64,
}

impl Message for Care {
    const LEAF: Leaf = Leaf::Care;
    const SCHEMA: &'static str = CareV1::NAME;
}

/// Distinct people and vehicles of a local day, counted from keyed pseudonyms on the box; both
/// `None` (`null`) where subjects are not kept (`privacy.subjects = "drop"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Distinct {
    pub access_subjects: Option<u64>,
    pub vehicles: Option<u64>,
    /// How many pseudonym keys the day's figures span, when more than one (absent otherwise, so
    /// payloads of a day under one key are as they always were). The box's key dir lost the
    /// day's key while the daemon was stopped, so a person who passed before and after the loss
    /// has two unlinkable pseudonyms: the figures are then the largest count under any one key,
    /// a lower bound that never counts anyone twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_generations: Option<u32>,
}

/// `{prefix}/{gateway}/daily`: one local day's distinct counts and totals, re-issued with
/// `rev + 1` when late events change it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Daily {
    pub schema: DailyV1,
    pub gateway: String,
    #[serde(default)]
    pub site: Site,
    /// The local date, `YYYY-MM-DD`.
    pub date: String,
    /// The site's UTC offset, `+08:00`.
    pub tz: String,
    pub rev: u32,
    pub distinct: Distinct,
    pub counts: Vec<Count>,
}

impl Message for Daily {
    const LEAF: Leaf = Leaf::Daily;
    const SCHEMA: &'static str = DailyV1::NAME;
}

/// A gateway's link to the district broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkState {
    Online,
    Offline,
}

impl LinkState {
    /// `online` or `offline`.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Online => "online",
            LinkState::Offline => "offline",
        }
    }
}

/// `{prefix}/{gateway}/status` (retained): `online` at each connection, `offline` at a clean
/// stop and as the last will. `epoch` orders states: a higher epoch is later than any lower one;
/// within one, `offline` is later than `online`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub schema: StatusV1,
    pub state: LinkState,
    /// Optional on parse (a will written by another client library); the box always sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// The connection's epoch (`None` from gateways older than epochs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// When this connection came up (with `online`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// The box's place in the layers (the same labels as its summaries), so that `fleet push
    /// --layer` can pick boxes from the retained statuses alone. Absent from older boxes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<Site>,
}

impl Message for Status {
    const LEAF: Leaf = Leaf::Status;
    const SCHEMA: &'static str = StatusV1::NAME;
}

/// Devices the box knows, by health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceCounts {
    pub online: u64,
    pub offline: u64,
}

/// What the box dropped under disk pressure since its store began.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub summaries: u64,
    pub alerts: u64,
    /// Dedup keys dropped early.
    pub dedup_keys: u64,
    /// Raw events evicted early.
    pub raw_events: u64,
}

/// The box's intake counters since start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub received: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Store write transactions, and their mean duration (fsync included), microseconds.
    pub commits: u64,
    pub commit_avg_us: u64,
    /// The longest a device message waited for its commit and acknowledgement, ms.
    pub ack_wait_max_ms: u64,
    /// Devices forgotten since start, by why (`bound`, `unmapped`, `installer`).
    pub devices_forgotten: BTreeMap<String, u64>,
    /// Events stamped too far ahead of the trusted clock, counted at receipt.
    pub counted_at_receipt: u64,
}

/// Why intake is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    /// `disk_full`, `disk_error` or `clock_untrusted`.
    pub reason: String,
    pub detail: String,
    /// Wall clock (Unix ms) when intake paused.
    pub since_ms: i64,
}

/// A damaged store file moved aside in the data dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantined {
    pub file: String,
    pub bytes: u64,
    pub reason: Option<String>,
}

/// A link failing for a reason that needs an operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// `refused`, `tls` or `identity_taken`.
    pub reason: String,
    pub detail: String,
}

/// One Modbus device's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModbusDevice {
    pub name: String,
    pub kind: String,
    pub online: bool,
    pub polls: u64,
    pub errors: u64,
    pub last_error: Option<String>,
    pub last_seen: Option<Timestamp>,
    pub counted: u64,
    /// Counter readings dropped as misreads (glitch rule) since start.
    pub glitches: u64,
    /// The device's `state` points, by name.
    pub states: serde_json::Map<String, serde_json::Value>,
}

/// `{prefix}/{gateway}/heartbeat` every `upstream.heartbeat` (60 s): the box's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub schema: HeartbeatV1,
    pub gateway: String,
    /// The epoch of the connection it was sent on: a heartbeat of a higher epoch than the
    /// district knows means `online`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub uptime_secs: u64,
    #[serde(default)]
    pub devices: DeviceCounts,
    #[serde(default)]
    pub pending_summaries: u64,
    #[serde(default)]
    pub pending_alerts: u64,
    /// Messages the district broker kept refusing (parked on the box).
    #[serde(default)]
    pub parked: u64,
    #[serde(default)]
    pub oldest_pending_window: Option<Timestamp>,
    #[serde(default)]
    pub store_bytes: u64,
    #[serde(default)]
    pub counters: Counters,
    #[serde(default)]
    pub dropped: Dropped,
    /// Why intake is paused (disk full or failing), if it is.
    #[serde(default)]
    pub intake_paused: Option<Paused>,
    /// Damaged store files moved aside, kept until an operator removes them.
    #[serde(default)]
    pub store_quarantined: Vec<Quarantined>,
    /// Links failing for a reason that needs an operator, by link (`site`).
    #[serde(default)]
    pub link_problems: BTreeMap<String, Problem>,
    #[serde(default)]
    pub modbus: Vec<ModbusDevice>,
}

impl Message for Heartbeat {
    const LEAF: Leaf = Leaf::Heartbeat;
    const SCHEMA: &'static str = HeartbeatV1::NAME;
}

/// `{prefix}/{gateway}/occupancy`, once per window (contract: "Vehicles inside"): vehicles
/// inside the compound at `at` (the window's end), the parking capacity, stays longer than
/// `occupancy.long_stay`, and stays dropped as missed exits (cumulative). No plate, masked or
/// not, is in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupancy {
    pub schema: OccupancyV1,
    pub gateway: String,
    #[serde(default)]
    pub site: Site,
    pub at: Timestamp,
    pub inside: u64,
    /// `occupancy.capacity` (spaces); absent when not configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    pub long_stay: u64,
    pub missed_exits: u64,
}

impl Message for Occupancy {
    const LEAF: Leaf = Leaf::Occupancy;
    const SCHEMA: &'static str = OccupancyV1::NAME;
}
