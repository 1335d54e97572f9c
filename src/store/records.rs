//! The records kept in the store's tables: one version byte, then postcard (serde, varint
//! integers, a documented and stable wire format). A reader that meets a version it does not
//! know refuses to guess ([`StoreError::Version`]).

use super::StoreError;
use crate::core::counter::Value;
use crate::core::event::Kind;
use serde::{Deserialize, Serialize};

pub(crate) const RECORD_V1: u8 = 1;
/// An `events` row that also carries its dedup hash: version 2, the hash (u64 LE), then the
/// [`EventRecordV1`] in postcard. While the raw event lives it is the dedup record, so a batch
/// writes no separate dedup row.
pub(crate) const EVENT_WITH_HASH_V2: u8 = 2;

/// A subject as kept on the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredSubject {
    None,
    /// The 16-byte pseudonym: BLAKE3 keyed with the key of the event's local day, kept
    /// outside the store ([`crate::keys::SubjectKeys::pseudonym`]).
    Hashed([u8; 16]),
    Plain(String),
    /// `privacy.subjects = "plain"`: the subject sealed with the key of the day it arrived
    /// ([`crate::keys::SubjectKeys::seal`]): the key's day, the nonce, the encrypted bytes.
    /// Unreadable once that key is destroyed (after `store.raw_retention`).
    Sealed(i64, [u8; 16], Vec<u8>),
}

/// Raw accepted event, record version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecordV1 {
    pub kind: Kind,
    pub device: String,
    pub id: String,
    pub ts_ms: i64,
    pub action: String,
    pub result: String,
    pub subject: StoredSubject,
}

/// What an outbox message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboxTopic {
    Summary,
    Alert,
    /// `zhian.daily.v1`: a local day's distinct counts and totals.
    Daily,
    /// `zhian.care.v1`: a care-watch notice.
    Care,
    /// `zhian.occupancy.v1`: vehicles inside, once per window.
    Occupancy,
}

impl OutboxTopic {
    /// The upstream topic's leaf: `{prefix}/{gateway}/{leaf}`.
    pub fn leaf(self) -> zhian_proto::Leaf {
        match self {
            OutboxTopic::Summary => zhian_proto::Leaf::Summary,
            OutboxTopic::Alert => zhian_proto::Leaf::Alert,
            OutboxTopic::Daily => zhian_proto::Leaf::Daily,
            OutboxTopic::Care => zhian_proto::Leaf::Care,
            OutboxTopic::Occupancy => zhian_proto::Leaf::Occupancy,
        }
    }
}

/// An upstream message waiting for its PUBACK, record version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxRecordV1 {
    pub topic: OutboxTopic,
    /// Window start and rev, for summaries (status page: oldest pending window).
    pub window: Option<(i64, u32)>,
    pub created_ms: i64,
    pub payload: Vec<u8>,
}

/// The last committed value of a Modbus counter, record version 1 (before the glitch rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRecordV1 {
    pub value: i64,
    pub at_ms: i64,
}

/// A Modbus counter's state, record version 2: the last value that counted, when, and the
/// suspicious readings held by the glitch rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRecordV2 {
    pub value: i64,
    pub at_ms: i64,
    pub held: Vec<i64>,
}

const COUNTER_V2: u8 = 2;

/// Version 2 byte + postcard.
pub(crate) fn encode_counter(rec: &CounterRecordV2) -> Vec<u8> {
    let mut out = vec![COUNTER_V2];
    out.extend(postcard::to_allocvec(rec).expect("records serialize"));
    out
}

/// A `counters` row of either version.
pub(crate) fn decode_counter(bytes: &[u8]) -> Result<CounterRecordV2, StoreError> {
    match bytes.split_first() {
        Some((&COUNTER_V2, rest)) => {
            postcard::from_bytes(rest).map_err(|source| StoreError::Decode {
                table: "counters",
                source,
            })
        }
        _ => decode::<CounterRecordV1>("counters", bytes).map(|v1| CounterRecordV2 {
            value: v1.value,
            at_ms: v1.at_ms,
            held: Vec::new(),
        }),
    }
}

/// A Modbus state point, record version 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StateRecordV1 {
    pub value: Value,
    /// When the value last changed (or was first read).
    pub since_ms: i64,
    /// When it was last read.
    pub seen_ms: i64,
}

/// A state reading to keep: `key` is "kind\0device\0point".
#[derive(Debug, Clone, PartialEq)]
pub struct StateUpdate {
    pub key: String,
    pub value: Value,
    pub ts_ms: i64,
}

/// Version byte + postcard.
pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![RECORD_V1];
    out.extend(postcard::to_allocvec(v).expect("records serialize"));
    out
}

/// The record in `bytes` from `table`, or why it cannot be read.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&RECORD_V1, rest)) => {
            postcard::from_bytes(rest).map_err(|source| StoreError::Decode { table, source })
        }
        Some((&version, _)) => Err(StoreError::Version { table, version }),
        None => Err(StoreError::Version { table, version: 0 }),
    }
}

/// An `events` row: the record and the dedup hash it carries.
pub(crate) fn encode_event(rec: &EventRecordV1, hash: u64) -> Vec<u8> {
    let mut out = vec![EVENT_WITH_HASH_V2];
    out.extend_from_slice(&hash.to_le_bytes());
    out.extend(postcard::to_allocvec(rec).expect("records serialize"));
    out
}

/// The dedup hash an `events` row carries (rows written before format 2 carry none).
pub(crate) fn event_hash(bytes: &[u8]) -> Option<u64> {
    match bytes.split_first() {
        Some((&EVENT_WITH_HASH_V2, rest)) if rest.len() >= 8 => {
            Some(u64::from_le_bytes(rest[..8].try_into().expect("8 bytes")))
        }
        _ => None,
    }
}

/// The record in an `events` row, either version.
pub(crate) fn decode_event(bytes: &[u8]) -> Result<EventRecordV1, StoreError> {
    match bytes.split_first() {
        Some((&EVENT_WITH_HASH_V2, rest)) if rest.len() >= 8 => postcard::from_bytes(&rest[8..])
            .map_err(|source| StoreError::Decode {
                table: "events",
                source,
            }),
        _ => decode("events", bytes),
    }
}

/// The dedup hashes packed in one `dedup_log` value: little-endian u64s.
pub(crate) fn pack_hashes(hashes: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hashes.len() * 8);
    for h in hashes {
        out.extend_from_slice(&h.to_le_bytes());
    }
    out
}

/// The hashes of one `dedup_log` value (a trailing partial word is ignored).
pub(crate) fn unpack_hashes(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
}
