//! Fleet configuration and diagnostics on the wire (contract: "Fleet configuration"): what the
//! district sends a box (`config/set`, `diag/request`), what a box answers (`config/state`,
//! `diag/reply`), and the exact bytes each signature covers. The signing itself (Ed25519) is
//! `zhian-common`'s `fleet_key`; this crate stays free of crypto and I/O.
//!
//! Topics, under the same `{prefix}` as the upstream messages:
//! - `{prefix}/{gateway}/config/set`: [`ConfigSet`], QoS 1, retained (the newest change per box);
//! - `{prefix}/{gateway}/config/state`: [`ConfigState`], QoS 1, retained ([`crate::Leaf::ConfigState`]);
//! - `{prefix}/{gateway}/diag/request`: [`DiagRequest`], QoS 1, not retained;
//! - `{prefix}/{gateway}/diag/reply`: [`DiagReply`], QoS 1, not retained.

use crate::{Leaf, Message, Timestamp};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

crate::messages::schema_tag!(
    /// `zhian.config.v1`.
    ConfigV1 = "zhian.config.v1"
);
crate::messages::schema_tag!(
    /// `zhian.config_state.v1`.
    ConfigStateV1 = "zhian.config_state.v1"
);
crate::messages::schema_tag!(
    /// `zhian.diag_request.v1`.
    DiagRequestV1 = "zhian.diag_request.v1"
);
crate::messages::schema_tag!(
    /// `zhian.diag.v1`.
    DiagV1 = "zhian.diag.v1"
);

/// `{prefix}/{gateway}/config/set`.
pub fn config_set_topic(prefix: &str, gateway: &str) -> String {
    format!("{prefix}/{gateway}/config/set")
}

/// `{prefix}/{gateway}/diag/request`.
pub fn diag_request_topic(prefix: &str, gateway: &str) -> String {
    format!("{prefix}/{gateway}/diag/request")
}

/// `{prefix}/{gateway}/diag/reply`.
pub fn diag_reply_topic(prefix: &str, gateway: &str) -> String {
    format!("{prefix}/{gateway}/diag/reply")
}

/// A signed configuration change for one gateway: `fragment` is TOML overlaid on the box's own
/// file. `sig` is the base64 (standard alphabet, padded) Ed25519 signature of
/// [`config_signed_bytes`]`(gateway, serial, fragment)`, where `gateway` is the topic's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSet {
    pub schema: ConfigV1,
    /// Above the last serial the box applied, or it refuses the change (a replay).
    pub serial: u64,
    pub fragment: String,
    pub sig: String,
}

/// The bytes a [`ConfigSet`]'s signature covers: `zhian.config.v1\n{gateway}\n{serial}\n` and
/// the fragment's bytes. The gateway is in them so a change signed for one box cannot be
/// replayed to another; the schema so no other signed message can pass for one.
pub fn config_signed_bytes(gateway: &str, serial: u64, fragment: &str) -> Vec<u8> {
    let mut b = format!("{}\n{gateway}\n{serial}\n", ConfigV1::NAME).into_bytes();
    b.extend_from_slice(fragment.as_bytes());
    b
}

/// Where a change stands on a box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigPhase {
    /// Accepted (signature, serial, fragment and the whole config valid); being applied.
    Applying,
    /// Applied; the box watches its health for `fleet.probation`.
    Probation,
    /// Probation passed: the change is in force.
    Applied,
    /// Refused before anything was applied (`reason` says why).
    Rejected,
    /// Applied, failed probation, and the box went back to the config it had (`reason`).
    RolledBack,
}

impl ConfigPhase {
    /// Every phase, in the order a change goes through them.
    pub const ALL: [ConfigPhase; 5] = [
        ConfigPhase::Applying,
        ConfigPhase::Probation,
        ConfigPhase::Applied,
        ConfigPhase::Rejected,
        ConfigPhase::RolledBack,
    ];

    /// As on the wire (`rolled_back`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ConfigPhase::Applying => "applying",
            ConfigPhase::Probation => "probation",
            ConfigPhase::Applied => "applied",
            ConfigPhase::Rejected => "rejected",
            ConfigPhase::RolledBack => "rolled_back",
        }
    }

    /// Whether no later report for the same serial follows (`applied`, `rejected`,
    /// `rolled_back`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            ConfigPhase::Applied | ConfigPhase::Rejected | ConfigPhase::RolledBack
        )
    }
}

/// `{prefix}/{gateway}/config/state` (retained): where the newest change stands.
/// `config_hash` is the hex SHA-256 of the config the box runs after this step (its file's bytes
/// and the fragment in force), so two boxes on the same config report the same hash only if
/// their files are equal too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    pub schema: ConfigStateV1,
    /// Absent from other senders; the box always sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    pub serial: u64,
    pub state: ConfigPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub config_hash: String,
    /// When the box took this step (its clock). Absent from other senders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Timestamp>,
}

impl Message for ConfigState {
    const LEAF: Leaf = Leaf::ConfigState;
    const SCHEMA: &'static str = ConfigStateV1::NAME;
}

/// `{prefix}/{gateway}/diag/request`: asks the box for its status report and log tail.
/// `sig` covers [`diag_signed_bytes`]`(gateway, id, at)`; a box answers only a request whose
/// `at` is within ten minutes of its clock, so a captured request cannot be replayed later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagRequest {
    pub schema: DiagRequestV1,
    /// Chosen by the asker; the reply carries it back (1-64 of `[A-Za-z0-9-]`).
    pub id: String,
    pub at: Timestamp,
    pub sig: String,
}

/// The bytes a [`DiagRequest`]'s signature covers: `zhian.diag_request.v1\n{gateway}\n{id}\n{at}`
/// with `at` in Unix milliseconds.
pub fn diag_signed_bytes(gateway: &str, id: &str, at: Timestamp) -> Vec<u8> {
    format!("{}\n{gateway}\n{id}\n{}", DiagRequestV1::NAME, at.0).into_bytes()
}

/// `{prefix}/{gateway}/diag/reply`: the box's status report (the `/api/status` document) and its
/// last log lines (at most 200, oldest first). Neither holds a subject or a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiagReply {
    pub schema: DiagV1,
    pub gateway: String,
    pub id: String,
    pub at: Timestamp,
    pub status: serde_json::Value,
    pub log: Vec<String>,
}
