//! Device events: the contract's payload rules, and the reasons a message is rejected.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Largest accepted payload (contract: at most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// What kind of device reported an event.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    #[default]
    Access,
    Camera,
    Vehicle,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Access, Kind::Camera, Kind::Vehicle];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Access => "access",
            Kind::Camera => "camera",
            Kind::Vehicle => "vehicle",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "access" => Some(Kind::Access),
            "camera" => Some(Kind::Camera),
            "vehicle" => Some(Kind::Vehicle),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated device event. `subject` is as received; the store decides how to keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: Kind,
    pub device: String,
    pub id: String,
    /// Event time, Unix milliseconds.
    pub ts_ms: i64,
    pub action: String,
    pub result: String,
    pub subject: Option<String>,
}

impl Event {
    /// The dedup key (kind, device, id) as one string. `kind` and `device` cannot contain NUL,
    /// so the first two NULs split it unambiguously whatever `id` holds.
    pub fn dedup_key(&self) -> String {
        dedup_key(self.kind, &self.device, &self.id)
    }
}

pub fn dedup_key(kind: Kind, device: &str, id: &str) -> String {
    let mut k = String::with_capacity(kind.as_str().len() + device.len() + id.len() + 2);
    k.push_str(kind.as_str());
    k.push('\0');
    k.push_str(device);
    k.push('\0');
    k.push_str(id);
    k
}

/// Why a message was rejected. The snake_case names are the metric labels and heartbeat keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reject {
    TooLarge,
    InvalidUtf8,
    InvalidJson,
    InvalidTopic,
    InvalidId,
    InvalidTs,
    InvalidAction,
    InvalidResult,
    InvalidSubject,
    TopicMismatch,
    TooLate,
    TooFarFuture,
    /// A message on a vendor source's topic that its rules cannot map (`[[mqtt.sources]]`).
    Unmapped,
}

impl Reject {
    pub const ALL: [Reject; 13] = [
        Reject::TooLarge,
        Reject::InvalidUtf8,
        Reject::InvalidJson,
        Reject::InvalidTopic,
        Reject::InvalidId,
        Reject::InvalidTs,
        Reject::InvalidAction,
        Reject::InvalidResult,
        Reject::InvalidSubject,
        Reject::TopicMismatch,
        Reject::TooLate,
        Reject::TooFarFuture,
        Reject::Unmapped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::TooLarge => "too_large",
            Reject::InvalidUtf8 => "invalid_utf8",
            Reject::InvalidJson => "invalid_json",
            Reject::InvalidTopic => "invalid_topic",
            Reject::InvalidId => "invalid_id",
            Reject::InvalidTs => "invalid_ts",
            Reject::InvalidAction => "invalid_action",
            Reject::InvalidResult => "invalid_result",
            Reject::InvalidSubject => "invalid_subject",
            Reject::TopicMismatch => "topic_mismatch",
            Reject::TooLate => "too_late",
            Reject::TooFarFuture => "too_far_future",
            Reject::Unmapped => "unmapped",
        }
    }

    pub fn index(self) -> usize {
        Reject::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_device_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'
}

pub fn valid_device(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(is_device_char)
}

pub fn valid_word(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(is_word_char)
}

/// Kind and device from a topic: its last two levels (`zhian/{kind}/{device}` by default).
pub fn parse_topic(topic: &str) -> Result<(Kind, &str), Reject> {
    let mut levels = topic.rsplit('/');
    let device = levels.next().ok_or(Reject::InvalidTopic)?;
    let kind = levels.next().ok_or(Reject::InvalidTopic)?;
    let kind = Kind::parse(kind).ok_or(Reject::InvalidTopic)?;
    if !valid_device(device) {
        return Err(Reject::InvalidTopic);
    }
    Ok((kind, device))
}

/// Event times after 2200-01-01 are not times any device means: `invalid_ts`.
pub const MAX_TS_MS: i64 = 7_258_118_400_000;

/// Parse an RFC 3339 timestamp with offset, or integer Unix milliseconds (1970 to 2200).
pub fn parse_ts(v: &Value) -> Result<i64, Reject> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .filter(|ms| (0..=MAX_TS_MS).contains(ms))
            .ok_or(Reject::InvalidTs),
        Value::String(s) => {
            let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map_err(|_| Reject::InvalidTs)?;
            let ms = t.unix_timestamp_nanos() / 1_000_000;
            i64::try_from(ms)
                .ok()
                .filter(|ms| (0..=MAX_TS_MS).contains(ms))
                .ok_or(Reject::InvalidTs)
        }
        _ => Err(Reject::InvalidTs),
    }
}

/// Validate one device message against the contract. Time-window checks (too late, too far in
/// the future) need `now` and happen in [`crate::window::check_time`].
pub fn parse(topic: &str, payload: &[u8]) -> Result<Event, Reject> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Reject::TooLarge);
    }
    let (kind, device) = parse_topic(topic)?;
    let text = std::str::from_utf8(payload).map_err(|_| Reject::InvalidUtf8)?;
    let value: Value = serde_json::from_str(text).map_err(|_| Reject::InvalidJson)?;
    let Value::Object(obj) = value else {
        return Err(Reject::InvalidJson);
    };
    let id = match obj.get("id") {
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= 128 => s.clone(),
        _ => return Err(Reject::InvalidId),
    };
    let ts_ms = parse_ts(obj.get("ts").ok_or(Reject::InvalidTs)?)?;
    let action = match obj.get("action") {
        Some(Value::String(s)) if valid_word(s) => s.clone(),
        _ => return Err(Reject::InvalidAction),
    };
    let result = match obj.get("result") {
        None | Some(Value::Null) => "ok".to_string(),
        Some(Value::String(s)) if valid_word(s) => s.clone(),
        _ => return Err(Reject::InvalidResult),
    };
    let subject = match obj.get("subject") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= 128 => Some(s.clone()),
        _ => return Err(Reject::InvalidSubject),
    };
    match obj.get("kind") {
        None | Some(Value::Null) => {}
        Some(Value::String(k)) if k == kind.as_str() => {}
        _ => return Err(Reject::TopicMismatch),
    }
    match obj.get("device") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) if d == device => {}
        _ => return Err(Reject::TopicMismatch),
    }
    Ok(Event {
        kind,
        device: device.to_string(),
        id,
        ts_ms,
        action,
        result,
        subject,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(topic: &str, json: &str) -> Result<Event, Reject> {
        parse(topic, json.as_bytes())
    }

    #[test]
    fn accepts_contract_example() {
        let e = p(
            "zhian/access/door-3",
            r#"{"id": "door-3-000123", "ts": "2026-11-28T08:00:01.123+08:00", "action": "entry",
               "result": "granted", "subject": "card:88213", "extra": [1,2]}"#,
        )
        .unwrap();
        assert_eq!(e.kind, Kind::Access);
        assert_eq!(e.device, "door-3");
        assert_eq!(e.ts_ms, 1_795_824_001_123);
        assert_eq!(e.result, "granted");
        assert_eq!(e.subject.as_deref(), Some("card:88213"));
    }

    #[test]
    fn defaults_and_integer_ts() {
        let e = p(
            "zhian/camera/cam.1",
            r#"{"id":"x","ts":1764288001123,"action":"stranger"}"#,
        )
        .unwrap();
        assert_eq!(e.result, "ok");
        assert_eq!(e.ts_ms, 1_764_288_001_123);
        assert_eq!(e.subject, None);
    }

    #[test]
    fn every_reject_class() {
        let ok = r#"{"id":"x","ts":1,"action":"entry"}"#;
        let big = format!(
            r#"{{"id":"x","ts":1,"action":"entry","pad":"{}"}}"#,
            "a".repeat(MAX_PAYLOAD)
        );
        assert_eq!(
            parse("zhian/access/d", big.as_bytes()),
            Err(Reject::TooLarge)
        );
        assert_eq!(
            parse("zhian/access/d", b"\xff\xfe"),
            Err(Reject::InvalidUtf8)
        );
        assert_eq!(p("zhian/access/d", "[1]"), Err(Reject::InvalidJson));
        assert_eq!(p("zhian/access/d", "{"), Err(Reject::InvalidJson));
        assert_eq!(p("zhian/door/d", ok), Err(Reject::InvalidTopic));
        assert_eq!(p("zhian/access/d d", ok), Err(Reject::InvalidTopic));
        assert_eq!(p("access", ok), Err(Reject::InvalidTopic));
        assert_eq!(
            p("zhian/access/d", r#"{"ts":1,"action":"entry"}"#),
            Err(Reject::InvalidId)
        );
        assert_eq!(
            p("zhian/access/d", r#"{"id":"","ts":1,"action":"entry"}"#),
            Err(Reject::InvalidId)
        );
        let long_id = format!(r#"{{"id":"{}","ts":1,"action":"entry"}}"#, "i".repeat(129));
        assert_eq!(p("zhian/access/d", &long_id), Err(Reject::InvalidId));
        assert_eq!(
            p("zhian/access/d", r#"{"id":"x","action":"entry"}"#),
            Err(Reject::InvalidTs)
        );
        assert_eq!(
            p(
                "zhian/access/d",
                r#"{"id":"x","ts":"2026-11-28T08:00:01","action":"entry"}"#
            ),
            Err(Reject::InvalidTs)
        );
        assert_eq!(
            p("zhian/access/d", r#"{"id":"x","ts":-5,"action":"entry"}"#),
            Err(Reject::InvalidTs)
        );
        assert_eq!(
            p("zhian/access/d", r#"{"id":"x","ts":1,"action":"Entry"}"#),
            Err(Reject::InvalidAction)
        );
        assert_eq!(
            p(
                "zhian/access/d",
                r#"{"id":"x","ts":1,"action":"entry","result":"OK!"}"#
            ),
            Err(Reject::InvalidResult)
        );
        assert_eq!(
            p(
                "zhian/access/d",
                r#"{"id":"x","ts":1,"action":"entry","subject":7}"#
            ),
            Err(Reject::InvalidSubject)
        );
        assert_eq!(
            p(
                "zhian/access/d",
                r#"{"id":"x","ts":1,"action":"entry","kind":"camera"}"#
            ),
            Err(Reject::TopicMismatch)
        );
        assert_eq!(
            p(
                "zhian/access/d",
                r#"{"id":"x","ts":1,"action":"entry","device":"e"}"#
            ),
            Err(Reject::TopicMismatch)
        );
        assert!(p(
            "zhian/access/d",
            r#"{"id":"x","ts":1,"action":"entry","device":"d","kind":"access"}"#
        )
        .is_ok());
    }

    #[test]
    fn dedup_key_is_unambiguous() {
        // Devices cannot hold NUL, so the id (which can) always starts after the second one.
        assert!(!valid_device("a\0b"));
        assert_ne!(
            dedup_key(Kind::Access, "a", "b\0c"),
            dedup_key(Kind::Access, "a", "b\0d")
        );
        assert_ne!(
            dedup_key(Kind::Access, "a.b", "c"),
            dedup_key(Kind::Access, "a", "b.c")
        );
        assert_ne!(
            dedup_key(Kind::Access, "d", "1"),
            dedup_key(Kind::Camera, "d", "1")
        );
    }
}
