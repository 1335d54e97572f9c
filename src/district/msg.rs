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
        /// The gateway's connection epoch (`None` from gateways older than epochs).
        epoch: Option<i64>,
        body: Value,
    },
    Heartbeat {
        gateway: String,
        /// The epoch of the connection the heartbeat was sent on.
        epoch: Option<i64>,
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

/// `epoch`, when present: a non-negative integer (a bigint in the database).
fn epoch(v: &Value) -> Result<Option<i64>, Reject> {
    match v.get("epoch") {
        None | Some(Value::Null) => Ok(None),
        Some(e) => e
            .as_i64()
            .filter(|e| *e >= 0)
            .map(Some)
            .ok_or_else(|| reject("invalid_field", "epoch: a non-negative integer is required")),
    }
}

/// A gateway's link state as the district keeps it: the state of the highest epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    pub epoch: i64,
    pub online: bool,
}

/// The state after `msg` arrives on `current` (contract: "Upstream", `status`): a higher epoch
/// is later than any lower one; within one epoch `offline` is later than `online`; a heartbeat of
/// a higher epoch means `online` at that epoch. Whatever order a set of messages arrives in, the
/// result is the same (the order is a join: [`tests::state_by_epoch_ignores_arrival_order`]).
/// The database applies the same rule in one conditional `UPDATE` ([`super::db`]); this is its
/// model.
pub fn next_state(current: Option<LinkState>, msg: LinkState) -> LinkState {
    match current {
        None => msg,
        Some(c) if msg.epoch > c.epoch => msg,
        Some(c) if msg.epoch == c.epoch && !msg.online => msg,
        Some(c) => c,
    }
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
            // The gateway field is optional in a status (a will written by another client
            // library, say), but when given it must be the topic's.
            if v.get("gateway").is_some() {
                same_gateway(&v)?;
            }
            let state = s(&v, "state")?;
            if state != "online" && state != "offline" {
                return Err(reject("invalid_field", format!("state {state:?}")));
            }
            Ok(Msg::Status {
                state: state.into(),
                epoch: epoch(&v)?,
                body: v.clone(),
                gateway,
            })
        }
        "heartbeat" => {
            schema("zhian.heartbeat.v1")?;
            same_gateway(&v)?;
            Ok(Msg::Heartbeat {
                epoch: epoch(&v)?,
                body: v,
                gateway,
            })
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
    fn state_by_epoch_ignores_arrival_order() {
        use proptest::prelude::*;
        // Any sequence of (epoch, online) messages, in any order, ends in the same state: the
        // highest epoch, offline if any message of that epoch said so.
        proptest!(|(msgs in proptest::collection::vec((0i64..6, any::<bool>()), 1..12), seed in any::<u64>())| {
            let fold = |ms: &[(i64, bool)]| ms.iter().fold(None, |s, &(epoch, online)| {
                Some(next_state(s, LinkState { epoch, online }))
            });
            let mut shuffled = msgs.clone();
            let mut r = seed;
            for i in (1..shuffled.len()).rev() {
                r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (r >> 33) as usize % (i + 1));
            }
            let top = msgs.iter().map(|m| m.0).max().unwrap();
            let want = LinkState { epoch: top, online: !msgs.iter().any(|m| m.0 == top && !m.1) };
            prop_assert_eq!(fold(&msgs), Some(want));
            prop_assert_eq!(fold(&shuffled), Some(want));
        });
    }

    #[test]
    fn status_and_heartbeat_carry_the_epoch() {
        let m = parse(
            P,
            "zhian/district/gw-1/status",
            br#"{"state":"offline","gateway":"gw-1","epoch":7}"#,
        )
        .unwrap();
        assert!(matches!(m, Msg::Status { epoch: Some(7), .. }));
        let m = parse(
            P,
            "zhian/district/gw-1/heartbeat",
            br#"{"schema":"zhian.heartbeat.v1","gateway":"gw-1","epoch":8}"#,
        )
        .unwrap();
        assert!(matches!(m, Msg::Heartbeat { epoch: Some(8), .. }));
        let m = parse(P, "zhian/district/gw-1/status", br#"{"state":"online"}"#).unwrap();
        assert!(matches!(m, Msg::Status { epoch: None, .. }));
        let e = parse(
            P,
            "zhian/district/gw-1/status",
            br#"{"state":"online","epoch":-1}"#,
        )
        .unwrap_err();
        assert_eq!(e.reason, "invalid_field");
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
