//! What arrives on the district broker (contract: "Upstream to the district platform"), parsed
//! and checked before anything touches the database. Pure: no I/O.
//!
//! Topics are `{prefix}/{gateway}/{leaf}` with `leaf` one of `summary`, `alert`, `care`, `daily`,
//! `status`, `heartbeat`. Anything else, or a payload that breaks its schema, is a [`Reject`]
//! with a reason: counted, kept in the `rejects` table and acknowledged, never stopping the
//! receiver.

use serde_json::Value;

/// One counted row of a summary or daily message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub kind: String,
    pub device: String,
    pub action: String,
    pub result: String,
    pub n: i64,
}

/// A message the receiver keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Summary {
        gateway: String,
        site: Value,
        /// Window start, Unix ms.
        start_ms: i64,
        secs: i32,
        rev: i32,
        /// 1-based; 1 of 1 when not split.
        part: i32,
        parts: i32,
        rows: Vec<Row>,
    },
    Alert {
        gateway: String,
        kind: String,
        device: String,
        action: String,
        id: String,
        ts_ms: i64,
    },
    Care {
        gateway: String,
        alias: String,
        state: String,
        last_seen_ms: Option<i64>,
        silent_secs: i64,
    },
    Daily {
        gateway: String,
        site: Value,
        /// `YYYY-MM-DD`.
        date: String,
        tz: String,
        rev: i32,
        access_subjects: Option<i64>,
        vehicles: Option<i64>,
        rows: Vec<Row>,
    },
    Status {
        gateway: String,
        state: String,
        body: Value,
    },
    Heartbeat {
        gateway: String,
        body: Value,
    },
}

impl Msg {
    pub fn gateway(&self) -> &str {
        match self {
            Msg::Summary { gateway, .. }
            | Msg::Alert { gateway, .. }
            | Msg::Care { gateway, .. }
            | Msg::Daily { gateway, .. }
            | Msg::Status { gateway, .. }
            | Msg::Heartbeat { gateway, .. } => gateway,
        }
    }
}

/// Why a message was not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// `foreign_topic`, `invalid_json`, `wrong_schema`, `gateway_mismatch`, `invalid_field`.
    pub reason: &'static str,
    pub detail: String,
}

fn reject(reason: &'static str, detail: impl Into<String>) -> Reject {
    Reject {
        reason,
        detail: detail.into(),
    }
}

fn s<'a>(v: &'a Value, key: &str) -> Result<&'a str, Reject> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && s.len() <= 256)
        .ok_or_else(|| reject("invalid_field", format!("{key}: a string is required")))
}

fn int(v: &Value, key: &str) -> Result<i64, Reject> {
    v.get(key)
        .and_then(Value::as_i64)
        .ok_or_else(|| reject("invalid_field", format!("{key}: an integer is required")))
}

/// Times the database keeps: 1970 to 2200 (PostgreSQL refuses far more, and a refused value
/// must be a reject here, not a batch the database keeps refusing).
const MAX_MS: i64 = crate::core::event::MAX_TS_MS;
/// A count per row at most (a bigint sum over a year of windows stays far from overflow).
const MAX_N: i64 = 1_000_000_000_000;

fn bounded_ms(ms: i64, key: &str) -> Result<i64, Reject> {
    if (0..=MAX_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(reject(
            "invalid_field",
            format!("{key}: not a time between 1970 and 2200"),
        ))
    }
}

fn rfc3339_ms(text: &str, key: &str) -> Result<i64, Reject> {
    let ms = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
        .ok_or_else(|| reject("invalid_field", format!("{key}: not an RFC 3339 time")))?;
    bounded_ms(ms, key)
}

/// Whether any string in `v` (keys included) holds a NUL, which PostgreSQL text and jsonb
/// refuse.
fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(a) => a.iter().any(has_nul),
        Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn rows(v: &Value) -> Result<Vec<Row>, Reject> {
    let arr = v
        .get("counts")
        .and_then(Value::as_array)
        .ok_or_else(|| reject("invalid_field", "counts: an array is required"))?;
    arr.iter()
        .enumerate()
        .map(|(i, r)| {
            let n =
                int(r, "n").map_err(|e| reject(e.reason, format!("counts[{i}].{}", e.detail)))?;
            if !(0..=MAX_N).contains(&n) {
                return Err(reject(
                    "invalid_field",
                    format!("counts[{i}].n is not 0 to 10^12"),
                ));
            }
            let f = |k| {
                s(r, k)
                    .map(str::to_string)
                    .map_err(|e| reject(e.reason, format!("counts[{i}].{}", e.detail)))
            };
            Ok(Row {
                kind: f("kind")?,
                device: f("device")?,
                action: f("action")?,
                result: f("result")?,
                n,
            })
        })
        .collect()
}

/// Parse one message from `topic` under `prefix`.
pub fn parse(prefix: &str, topic: &str, payload: &[u8]) -> Result<Msg, Reject> {
    let rest = topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| reject("foreign_topic", format!("not under {prefix}/")))?;
    let (gateway, leaf) = rest
        .split_once('/')
        .filter(|(g, l)| !g.is_empty() && !l.contains('/'))
        .ok_or_else(|| reject("foreign_topic", "not {prefix}/{gateway}/{leaf}"))?;
    if gateway.len() > 64
        || !gateway
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(reject("foreign_topic", "gateway is not 1-64 of [a-z0-9-]"));
    }
    let v: Value =
        serde_json::from_slice(payload).map_err(|e| reject("invalid_json", e.to_string()))?;
    if !v.is_object() {
        return Err(reject("invalid_json", "not a JSON object"));
    }
    if has_nul(&v) {
        return Err(reject("invalid_field", "a string holds a NUL character"));
    }
    let gateway = gateway.to_string();
    let same_gateway = |v: &Value| -> Result<(), Reject> {
        match v.get("gateway").and_then(Value::as_str) {
            Some(g) if g == gateway => Ok(()),
            Some(g) => Err(reject(
                "gateway_mismatch",
                format!("payload says {g:?}, topic {gateway:?}"),
            )),
            None => Err(reject("invalid_field", "gateway: a string is required")),
        }
    };
    let schema = |want: &str| -> Result<(), Reject> {
        match v.get("schema").and_then(Value::as_str) {
            Some(s) if s == want => Ok(()),
            other => Err(reject(
                "wrong_schema",
                format!("{other:?}, expected {want:?}"),
            )),
        }
    };
    match leaf {
        "summary" => {
            schema("zhian.summary.v1")?;
            same_gateway(&v)?;
            let w = v
                .get("window")
                .ok_or_else(|| reject("invalid_field", "window: an object is required"))?;
            let start_ms = rfc3339_ms(s(w, "start")?, "window.start")?;
            let secs = int(w, "secs")?;
            let rev = int(&v, "rev")?;
            let (part, parts) = match (v.get("part"), v.get("parts")) {
                (None, None) => (1, 1),
                _ => (int(&v, "part")?, int(&v, "parts")?),
            };
            if !(1..=86_400).contains(&secs) || !(0..=i32::MAX as i64).contains(&rev) {
                return Err(reject("invalid_field", "window.secs or rev out of range"));
            }
            if !(1..=10_000).contains(&parts) || !(1..=parts).contains(&part) {
                return Err(reject("invalid_field", format!("part {part} of {parts}")));
            }
            Ok(Msg::Summary {
                gateway,
                site: v.get("site").cloned().unwrap_or(Value::Null),
                start_ms,
                secs: secs as i32,
                rev: rev as i32,
                part: part as i32,
                parts: parts as i32,
                rows: rows(&v)?,
            })
        }
        "alert" => {
            schema("zhian.alert.v1")?;
            same_gateway(&v)?;
            let ts_ms = match v.get("ts") {
                Some(Value::String(t)) => rfc3339_ms(t, "ts")?,
                Some(Value::Number(n)) => bounded_ms(
                    n.as_i64()
                        .ok_or_else(|| reject("invalid_field", "ts: not an integer"))?,
                    "ts",
                )?,
                _ => return Err(reject("invalid_field", "ts: a time is required")),
            };
            Ok(Msg::Alert {
                kind: s(&v, "kind")?.into(),
                device: s(&v, "device")?.into(),
                action: s(&v, "action")?.into(),
                id: s(&v, "id")?.into(),
                ts_ms,
                gateway,
            })
        }
        "care" => {
            schema("zhian.care.v1")?;
            same_gateway(&v)?;
            let state = s(&v, "state")?;
            if state != "silent" && state != "seen" {
                return Err(reject("invalid_field", format!("state {state:?}")));
            }
            let last_seen_ms = match v.get("last_seen") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(rfc3339_ms(t, "last_seen")?),
                _ => return Err(reject("invalid_field", "last_seen: a time or null")),
            };
            Ok(Msg::Care {
                alias: s(&v, "alias")?.into(),
                state: state.into(),
                last_seen_ms,
                silent_secs: int(&v, "silent_secs")?,
                gateway,
            })
        }
        "daily" => {
            schema("zhian.daily.v1")?;
            same_gateway(&v)?;
            let date = s(&v, "date")?;
            let fmt = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(date, &fmt)
                .map_err(|_| reject("invalid_field", "date: not YYYY-MM-DD"))?;
            let d = v.get("distinct").cloned().unwrap_or(Value::Null);
            let rev = int(&v, "rev")?;
            if !(0..=i32::MAX as i64).contains(&rev) {
                return Err(reject("invalid_field", "rev out of range"));
            }
            Ok(Msg::Daily {
                site: v.get("site").cloned().unwrap_or(Value::Null),
                date: date.into(),
                tz: s(&v, "tz")?.into(),
                rev: rev as i32,
                access_subjects: d.get("access_subjects").and_then(Value::as_i64),
                vehicles: d.get("vehicles").and_then(Value::as_i64),
                rows: rows(&v)?,
                gateway,
            })
        }
        "status" => {
            let state = s(&v, "state")?;
            if state != "online" && state != "offline" {
                return Err(reject("invalid_field", format!("state {state:?}")));
            }
            Ok(Msg::Status {
                state: state.into(),
                body: v.clone(),
                gateway,
            })
        }
        "heartbeat" => {
            schema("zhian.heartbeat.v1")?;
            same_gateway(&v)?;
            Ok(Msg::Heartbeat { body: v, gateway })
        }
        other => Err(reject("foreign_topic", format!("unknown leaf {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "zhian/district";

    #[test]
    fn summaries_parse_with_and_without_parts() {
        let m = parse(
            P,
            "zhian/district/gw-1/summary",
            br#"{"schema":"zhian.summary.v1","gateway":"gw-1","site":{"compound":"x"},
                "window":{"start":"2026-11-28T00:00:00Z","secs":60},"rev":2,
                "counts":[{"kind":"access","device":"door-3","action":"entry","result":"granted","n":42}]}"#,
        )
        .unwrap();
        let Msg::Summary {
            rev,
            part,
            parts,
            rows,
            secs,
            ..
        } = m
        else {
            panic!()
        };
        assert_eq!((rev, part, parts, secs), (2, 1, 1, 60));
        assert_eq!(rows[0].n, 42);
        let m = parse(
            P,
            "zhian/district/gw-1/summary",
            br#"{"schema":"zhian.summary.v1","gateway":"gw-1","window":{"start":"2026-11-28T00:00:00Z","secs":60},
                "rev":0,"part":2,"parts":3,"counts":[]}"#,
        )
        .unwrap();
        assert!(matches!(
            m,
            Msg::Summary {
                part: 2,
                parts: 3,
                ..
            }
        ));
    }

    #[test]
    fn rejects_name_their_reason() {
        let cases: [(&str, &[u8], &str); 7] = [
            ("other/x/summary", b"{}", "foreign_topic"),
            ("zhian/district/gw-1/nonsense", b"{}", "foreign_topic"),
            ("zhian/district/GW/summary", b"{}", "foreign_topic"),
            ("zhian/district/gw-1/summary", b"not json", "invalid_json"),
            ("zhian/district/gw-1/summary", br#"{"schema":"x"}"#, "wrong_schema"),
            ("zhian/district/gw-1/alert", br#"{"schema":"zhian.alert.v1","gateway":"gw-2"}"#, "gateway_mismatch"),
            ("zhian/district/gw-1/summary", br#"{"schema":"zhian.summary.v1","gateway":"gw-1","window":{"start":"x","secs":60},"rev":0,"counts":[]}"#, "invalid_field"),
        ];
        for (topic, payload, reason) in cases {
            assert_eq!(
                parse(P, topic, payload).unwrap_err().reason,
                reason,
                "{topic}"
            );
        }
    }
}
