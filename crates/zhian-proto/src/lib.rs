//! The upstream wire format (contract: "Upstream to the district platform"): every topic and
//! every message a gateway sends to the district broker, as one Rust type each. The box
//! serializes these types and the district receiver parses them, so the two ends cannot
//! disagree about a field; `tests` property-test that every message round-trips.
//!
//! - Topics: `{prefix}/{gateway}/{leaf}`, [`Leaf`], [`topic`], [`parse_topic`].
//! - Messages: [`Summary`], [`Alert`], [`Care`], [`Daily`], [`Status`], [`Heartbeat`], each with
//!   its versioned `schema` string ([`Message::SCHEMA`], e.g. `zhian.summary.v1`).
//! - Fleet configuration and diagnostics (`fleet`): [`ConfigSet`], [`ConfigState`],
//!   [`DiagRequest`], [`DiagReply`] and the bytes their signatures cover.
//! - Times on the wire: [`Timestamp`] (RFC 3339 UTC; Unix milliseconds inside).
//!
//! Invariant (an absence): no subject, card, face or plate id is a field of any type here.
//! Pure: serde, serde_json and time only; no I/O.

mod fleet;
mod messages;
mod timestamp;
mod topic;

pub use fleet::*;
pub use messages::*;
pub use timestamp::{rfc3339_utc, Timestamp};
pub use topic::{parse_topic, topic, valid_gateway_id, Leaf, TopicError};

/// What every upstream message type shares: its topic leaf and its versioned schema string.
pub trait Message: serde::Serialize + serde::de::DeserializeOwned {
    /// The last topic level (`summary`, `alert`, ...).
    const LEAF: Leaf;
    /// The `schema` field's value (`zhian.summary.v1`, ...). Bumped on an incompatible change.
    const SCHEMA: &'static str;

    /// The message as the JSON bytes sent upstream.
    fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an upstream message always serializes")
    }
}

#[cfg(test)]
mod tests;
