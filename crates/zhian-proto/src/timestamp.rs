//! [`Timestamp`]: an instant on the wire, RFC 3339 UTC text outside, Unix milliseconds inside.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An instant, Unix milliseconds. Serialized as RFC 3339 UTC with a `Z` (milliseconds only when
/// not whole seconds, [`rfc3339_utc`]); parsed from any RFC 3339 offset, or from an integer of
/// Unix milliseconds (some senders write numbers). Range: what `i64` milliseconds hold; the
/// receiver narrows it further to what its database keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

/// RFC 3339 UTC with a `Z`, milliseconds only when not whole seconds
/// (`2026-11-28T00:00:00Z`, `2026-11-28T00:00:00.250Z`).
pub fn rfc3339_utc(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (y, mo, d) = (t.year(), u8::from(t.month()), t.day());
    let (h, mi, s) = (t.hour(), t.minute(), t.second());
    let milli = ms.rem_euclid(1000);
    if milli == 0 {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
    } else {
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
    }
}

impl Timestamp {
    /// Parse RFC 3339 text (any offset) to Unix milliseconds; `None` if it is not RFC 3339.
    pub fn parse(text: &str) -> Option<Timestamp> {
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
            .ok()
            .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
            .map(Timestamp)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&rfc3339_utc(self.0))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through a Value: serde_json's arbitrary_precision numbers are maps to a visitor.
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(t) => {
                Timestamp::parse(&t).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 time"))
            }
            serde_json::Value::Number(n) => n
                .as_i64()
                .map(Timestamp)
                .ok_or_else(|| serde::de::Error::custom("not an integer of milliseconds")),
            _ => Err(serde::de::Error::custom(
                "a time is required (RFC 3339 text or Unix ms)",
            )),
        }
    }
}
