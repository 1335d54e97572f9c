//! What arrives on the district broker (contract: "Upstream to the district platform"), parsed
//! and checked before anything touches the database. Pure: no I/O.
//!
//! Topics are `{prefix}/{gateway}/{leaf}` with `leaf` one of `summary`, `alert`, `care`, `daily`,
//! `status`, `heartbeat`, `occupancy` (contract: "Vehicles inside") and the fleet's
//! `config/state` (contract: "Fleet configuration").
//! Anything else, or a payload that breaks its schema, is a [`Reject`] with a reason: counted,
//! kept in the `rejects` table and acknowledged, never stopping the receiver.

use serde_json::Value;
use zhian_proto::{self as proto, Leaf, Message};

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
        /// How many pseudonym keys the day's figures span, when more than one (the box's key
        /// dir was lost that day: the figures are the largest count under one key).
        key_generations: Option<i32>,
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
    /// A fleet configuration report (`config/state`): where change `serial` stands on the box.
    ConfigState {
        gateway: String,
        /// At most `i64::MAX` (a bigint in the database).
        serial: i64,
        state: proto::ConfigPhase,
        reason: Option<String>,
        config_hash: String,
        /// When the box took the step, Unix ms (absent from other senders: the database then
        /// keeps the time it received the report).
        at_ms: Option<i64>,
    },
    /// Vehicles inside a compound at the end of a window (contract: "Vehicles inside"). The
    /// receiver keeps the newest per gateway ([`super::batch::Occupancy`]).
    Occupancy {
        gateway: String,
        /// The `site` object as sent (labels are capped and defaulted by
        /// [`super::batch::Labels::of`], as for summaries).
        site: Value,
        /// The window's end, Unix ms.
        at_ms: i64,
        /// Vehicles inside, at most [`MAX_N`] like every count here.
        inside: i64,
        /// Parking spaces, when the box has `occupancy.capacity`.
        capacity: Option<i64>,
        /// Vehicles inside longer than the box's `occupancy.long_stay`.
        long_stay: i64,
        /// Stays dropped as missed exits (cumulative on the box).
        missed_exits: i64,
    },
}

impl Msg {
    /// The gateway the message is from (its topic's).
    pub fn gateway(&self) -> &str {
        match self {
            Msg::Summary { gateway, .. }
            | Msg::Alert { gateway, .. }
            | Msg::Care { gateway, .. }
            | Msg::Daily { gateway, .. }
            | Msg::Status { gateway, .. }
            | Msg::Heartbeat { gateway, .. }
            | Msg::ConfigState { gateway, .. }
            | Msg::Occupancy { gateway, .. } => gateway,
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

/// Whether `topic` is one of the boxes' fleet topics that only the boxes and `fleet push` /
/// `fleet diag` speak (`{prefix}/{gateway}/config/set`, `.../diag/request`, `.../diag/reply`):
/// the subscription `{prefix}/+/#` matches them, and the receiver acknowledges them and keeps
/// nothing (they are neither data nor a mistake). `config/state` is the receiver's.
pub fn not_for_the_receiver(prefix: &str, topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
        return false;
    };
    match rest.split_once('/') {
        Some((gateway, leaf)) => {
            proto::valid_gateway_id(gateway)
                && matches!(leaf, "config/set" | "diag/request" | "diag/reply")
        }
        None => false,
    }
}

fn reject(reason: &'static str, detail: impl Into<String>) -> Reject {
    Reject {
        reason,
        detail: detail.into(),
    }
}

/// Times the database keeps: 1970 to 2200 (PostgreSQL refuses far more, and a refused value
/// must be a reject here, not a batch the database keeps refusing).
const MAX_MS: i64 = zhian_core::event::MAX_TS_MS;
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

/// `epoch`, when present: at most `i64::MAX` (a bigint in the database).
fn epoch(e: Option<u64>) -> Result<Option<i64>, Reject> {
    e.map(|e| {
        i64::try_from(e)
            .map_err(|_| reject("invalid_field", "epoch: a non-negative integer is required"))
    })
    .transpose()
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

/// A typed message from `v`, its serde error as an `invalid_field` reject.
fn typed<M: Message>(v: &Value) -> Result<M, Reject> {
    M::deserialize(v).map_err(|e| reject("invalid_field", e.to_string()))
}

/// A count kept as a bigint: at most [`MAX_N`].
fn count(n: u64, key: &str) -> Result<i64, Reject> {
    if n > MAX_N as u64 {
        Err(reject("invalid_field", format!("{key} is not 0 to 10^12")))
    } else {
        Ok(n as i64)
    }
}

/// The counted rows, each `n` at most [`MAX_N`] and each label 1-256 bytes.
fn rows(counts: Vec<proto::Count>) -> Result<Vec<Row>, Reject> {
    counts
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let n = count(c.n, &format!("counts[{i}].n"))?;
            for (k, f) in [
                ("kind", &c.kind),
                ("device", &c.device),
                ("action", &c.action),
                ("result", &c.result),
            ] {
                label(f).map_err(|_| {
                    reject(
                        "invalid_field",
                        format!("counts[{i}].{k}: a string is required"),
                    )
                })?;
            }
            Ok(Row {
                kind: c.kind,
                device: c.device,
                action: c.action,
                result: c.result,
                n,
            })
        })
        .collect()
}

/// A label the database keeps: 1 to 256 bytes.
fn label(s: &str) -> Result<&str, ()> {
    if s.is_empty() || s.len() > 256 {
        Err(())
    } else {
        Ok(s)
    }
}

fn text(s: String, key: &str) -> Result<String, Reject> {
    label(&s).map_err(|_| reject("invalid_field", format!("{key}: a string is required")))?;
    Ok(s)
}

/// Parse one message from `topic` under `prefix`, through the protocol's types
/// ([`zhian_proto`]), then narrow it to what the database keeps.
pub fn parse(prefix: &str, topic: &str, payload: &[u8]) -> Result<Msg, Reject> {
    let (gateway, leaf) = proto::parse_topic(prefix, topic).map_err(|e| match e {
        proto::TopicError::UnknownLeaf(l) => reject("foreign_topic", format!("unknown leaf {l:?}")),
        e => reject("foreign_topic", e.to_string()),
    })?;
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
    let site = |s: &proto::Site| serde_json::to_value(s).unwrap_or(Value::Null);
    match leaf {
        Leaf::Summary => {
            schema(proto::Summary::SCHEMA)?;
            same_gateway(&v)?;
            let m: proto::Summary = typed(&v)?;
            let start_ms = bounded_ms(m.window.start.0, "window.start")?;
            let (part, parts) = match (m.part, m.parts) {
                (None, None) => (1, 1),
                (Some(p), Some(n)) => (p as i64, n as i64),
                _ => return Err(reject("invalid_field", "part and parts go together")),
            };
            if !(1..=86_400).contains(&m.window.secs) || m.rev > i32::MAX as u32 {
                return Err(reject("invalid_field", "window.secs or rev out of range"));
            }
            if !(1..=10_000).contains(&parts) || !(1..=parts).contains(&part) {
                return Err(reject("invalid_field", format!("part {part} of {parts}")));
            }
            Ok(Msg::Summary {
                gateway,
                site: site(&m.site),
                start_ms,
                secs: m.window.secs as i32,
                rev: m.rev as i32,
                part: part as i32,
                parts: parts as i32,
                rows: rows(m.counts)?,
            })
        }
        Leaf::Alert => {
            schema(proto::Alert::SCHEMA)?;
            same_gateway(&v)?;
            let m: proto::Alert = typed(&v)?;
            Ok(Msg::Alert {
                ts_ms: bounded_ms(m.ts.0, "ts")?,
                kind: text(m.kind, "kind")?,
                device: text(m.device, "device")?,
                action: text(m.action, "action")?,
                id: text(m.id, "id")?,
                gateway,
            })
        }
        Leaf::Care => {
            schema(proto::Care::SCHEMA)?;
            same_gateway(&v)?;
            let m: proto::Care = typed(&v)?;
            Ok(Msg::Care {
                alias: text(m.alias, "alias")?,
                state: m.state.as_str().into(),
                last_seen_ms: m
                    .last_seen
                    .map(|t| bounded_ms(t.0, "last_seen"))
                    .transpose()?,
                silent_secs: m.silent_secs,
                gateway,
            })
        }
        Leaf::Daily => {
            schema(proto::Daily::SCHEMA)?;
            same_gateway(&v)?;
            let m: proto::Daily = typed(&v)?;
            let fmt = time::macros::format_description!("[year]-[month]-[day]");
            time::Date::parse(&m.date, &fmt)
                .map_err(|_| reject("invalid_field", "date: not YYYY-MM-DD"))?;
            if m.rev > i32::MAX as u32 {
                return Err(reject("invalid_field", "rev out of range"));
            }
            let bigint = |n: Option<u64>| n.and_then(|n| i64::try_from(n).ok());
            Ok(Msg::Daily {
                site: site(&m.site),
                date: m.date,
                tz: text(m.tz, "tz")?,
                rev: m.rev as i32,
                access_subjects: bigint(m.distinct.access_subjects),
                vehicles: bigint(m.distinct.vehicles),
                key_generations: m
                    .distinct
                    .key_generations
                    .map(|g| {
                        i32::try_from(g)
                            .map_err(|_| reject("invalid_field", "key_generations out of range"))
                    })
                    .transpose()?,
                rows: rows(m.counts)?,
                gateway,
            })
        }
        Leaf::Status => {
            // The gateway field is optional in a status (a will written by another client
            // library, say), but when given it must be the topic's.
            if v.get("gateway").is_some() {
                same_gateway(&v)?;
            }
            let m: proto::Status = typed(&v)?;
            Ok(Msg::Status {
                state: m.state.as_str().into(),
                epoch: epoch(m.epoch)?,
                body: v,
                gateway,
            })
        }
        Leaf::Heartbeat => {
            schema(proto::Heartbeat::SCHEMA)?;
            same_gateway(&v)?;
            let m: proto::Heartbeat = typed(&v)?;
            Ok(Msg::Heartbeat {
                epoch: epoch(m.epoch)?,
                body: v,
                gateway,
            })
        }
        Leaf::ConfigState => {
            schema(proto::ConfigState::SCHEMA)?;
            // Optional like a status's (the box always sends it), but when given the topic's.
            if v.get("gateway").is_some() {
                same_gateway(&v)?;
            }
            let m: proto::ConfigState = typed(&v)?;
            let serial = i64::try_from(m.serial).map_err(|_| {
                reject(
                    "invalid_field",
                    "serial: a non-negative integer is required",
                )
            })?;
            Ok(Msg::ConfigState {
                serial,
                state: m.state,
                reason: m.reason,
                config_hash: text(m.config_hash, "config_hash")?,
                at_ms: m.at.map(|t| bounded_ms(t.0, "at")).transpose()?,
                gateway,
            })
        }
        Leaf::Occupancy => {
            schema(proto::Occupancy::SCHEMA)?;
            same_gateway(&v)?;
            let m: proto::Occupancy = typed(&v)?;
            Ok(Msg::Occupancy {
                site: site(&m.site),
                at_ms: bounded_ms(m.at.0, "at")?,
                inside: count(m.inside, "inside")?,
                capacity: m.capacity.map(|c| count(c, "capacity")).transpose()?,
                long_stay: count(m.long_stay, "long_stay")?,
                missed_exits: count(m.missed_exits, "missed_exits")?,
                gateway,
            })
        }
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
    fn dailies_keep_the_key_generations_a_day_spans() {
        let daily = |distinct: &str| {
            parse(
                P,
                "zhian/district/gw-1/daily",
                format!(
                    r#"{{"schema":"zhian.daily.v1","gateway":"gw-1","date":"2026-11-30","tz":"+08:00",
                        "rev":0,"distinct":{distinct},"counts":[]}}"#
                )
                .as_bytes(),
            )
        };
        let Ok(Msg::Daily {
            access_subjects,
            key_generations,
            ..
        }) = daily(r#"{"access_subjects":3,"vehicles":0,"key_generations":2}"#)
        else {
            panic!()
        };
        assert_eq!((access_subjects, key_generations), (Some(3), Some(2)));
        let Ok(Msg::Daily {
            key_generations, ..
        }) = daily(r#"{"access_subjects":3,"vehicles":0}"#)
        else {
            panic!()
        };
        assert_eq!(key_generations, None, "one key: the column stays NULL");
        let e = daily(r#"{"access_subjects":3,"vehicles":0,"key_generations":4294967295}"#);
        assert!(
            matches!(
                e,
                Err(Reject {
                    reason: "invalid_field",
                    ..
                })
            ),
            "{e:?}"
        );
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
    fn config_state_reports_parse_with_and_without_optional_fields() {
        let t = "zhian/district/gw-1/config/state";
        let m = parse(
            P,
            t,
            br#"{"schema":"zhian.config_state.v1","gateway":"gw-1","serial":1764460800,
                "state":"rolled_back","reason":"site broker down","config_hash":"ab12",
                "at":"2026-11-30T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            Msg::ConfigState {
                gateway: "gw-1".into(),
                serial: 1_764_460_800,
                state: proto::ConfigPhase::RolledBack,
                reason: Some("site broker down".into()),
                config_hash: "ab12".into(),
                at_ms: Some(1_795_996_800_000),
            }
        );
        // No gateway field, no reason, no time, `at` in Unix ms.
        let m = parse(
            P,
            t,
            br#"{"schema":"zhian.config_state.v1","serial":7,"state":"applied","config_hash":"cd"}"#,
        )
        .unwrap();
        assert!(matches!(
            m,
            Msg::ConfigState { serial: 7, state: proto::ConfigPhase::Applied, reason: None, at_ms: None, ref gateway, .. }
                if gateway == "gw-1"
        ));
        let m = parse(
            P,
            t,
            br#"{"schema":"zhian.config_state.v1","serial":7,"state":"probation","config_hash":"cd","at":1796000000000}"#,
        )
        .unwrap();
        assert!(matches!(
            m,
            Msg::ConfigState {
                at_ms: Some(1_796_000_000_000),
                ..
            }
        ));
        // What the box sends, through the same type.
        let sent = proto::ConfigState {
            schema: proto::ConfigStateV1,
            gateway: Some("gw-1".into()),
            serial: 3,
            state: proto::ConfigPhase::Applying,
            reason: None,
            config_hash: "ef".repeat(32),
            at: Some(proto::Timestamp(1_796_000_000_000)),
        };
        assert!(matches!(
            parse(P, t, &sent.to_bytes()).unwrap(),
            Msg::ConfigState {
                serial: 3,
                state: proto::ConfigPhase::Applying,
                ..
            }
        ));
    }

    #[test]
    fn bad_config_state_reports_are_rejects() {
        let t = "zhian/district/gw-1/config/state";
        let cases: [(&str, &[u8], &str); 9] = [
            (t, b"[1]", "invalid_json"),
            (t, br#"{"serial":1,"state":"applied","config_hash":"ab"}"#, "wrong_schema"),
            (t, br#"{"schema":"zhian.config.v1","serial":1,"state":"applied","config_hash":"ab"}"#, "wrong_schema"),
            (t, br#"{"schema":"zhian.config_state.v1","gateway":"gw-2","serial":1,"state":"applied","config_hash":"ab"}"#, "gateway_mismatch"),
            (t, br#"{"schema":"zhian.config_state.v1","serial":1,"state":"done","config_hash":"ab"}"#, "invalid_field"),
            (t, br#"{"schema":"zhian.config_state.v1","serial":-1,"state":"applied","config_hash":"ab"}"#, "invalid_field"),
            (t, br#"{"schema":"zhian.config_state.v1","serial":9223372036854775808,"state":"applied","config_hash":"ab"}"#, "invalid_field"),
            (t, br#"{"schema":"zhian.config_state.v1","serial":1,"state":"applied","config_hash":""}"#, "invalid_field"),
            (t, br#"{"schema":"zhian.config_state.v1","serial":1,"state":"applied","config_hash":"ab","at":10000000000000000}"#, "invalid_field"),
        ];
        for (topic, payload, reason) in cases {
            let e = parse(P, topic, payload).unwrap_err();
            assert_eq!(
                e.reason,
                reason,
                "{}: {e:?}",
                String::from_utf8_lossy(payload)
            );
        }
        // The box's other fleet topics are not the receiver's: skipped before parsing (and a
        // parse would call them foreign); a deeper or malformed one is a reject as before.
        for leaf in ["config/set", "diag/request", "diag/reply"] {
            let t = format!("zhian/district/gw-1/{leaf}");
            assert!(not_for_the_receiver(P, &t), "{t}");
            assert_eq!(parse(P, &t, b"{}").unwrap_err().reason, "foreign_topic");
        }
        for t in [
            "zhian/district/gw-1/config/state",
            "zhian/district/gw-1/summary",
            "zhian/district/gw-1/config/state/x",
            "zhian/district/GW/config/set",
            "other/gw-1/config/set",
        ] {
            assert!(!not_for_the_receiver(P, t), "{t}");
        }
    }

    #[test]
    fn occupancy_reports_parse_with_and_without_capacity() {
        let t = "zhian/district/gw-1/occupancy";
        let m = parse(
            P,
            t,
            r#"{"schema":"zhian.occupancy.v1","gateway":"gw-1",
                "site":{"district":"富阳区","street":"富春街道","community":"江滨社区","compound":"江滨花园"},
                "at":"2026-11-30T00:01:00Z","inside":312,"capacity":420,"long_stay":4,"missed_exits":2}"#
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            m,
            Msg::Occupancy {
                gateway: "gw-1".into(),
                site: serde_json::json!({"district":"富阳区","street":"富春街道",
                                         "community":"江滨社区","compound":"江滨花园"}),
                at_ms: 1_795_996_860_000,
                inside: 312,
                capacity: Some(420),
                long_stay: 4,
                missed_exits: 2,
            }
        );
        // No capacity configured, no labels, `at` in Unix ms.
        let m = parse(
            P,
            t,
            br#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","site":{},"at":1796000000000,
                "inside":0,"long_stay":0,"missed_exits":0}"#,
        )
        .unwrap();
        assert!(matches!(
            m,
            Msg::Occupancy {
                capacity: None,
                at_ms: 1_796_000_000_000,
                inside: 0,
                ..
            }
        ));
        // What the box sends, through the same type.
        let sent = proto::Occupancy {
            schema: proto::OccupancyV1,
            gateway: "gw-1".into(),
            site: proto::Site {
                compound: Some("x".into()),
                ..proto::Site::default()
            },
            at: proto::Timestamp(1_796_000_000_000),
            inside: 7,
            capacity: Some(9),
            long_stay: 1,
            missed_exits: 0,
        };
        assert!(matches!(
            parse(P, t, &serde_json::to_vec(&sent).unwrap()).unwrap(),
            Msg::Occupancy {
                inside: 7,
                capacity: Some(9),
                ref site,
                ..
            } if site == &serde_json::json!({"compound": "x"})
        ));
    }

    #[test]
    fn bad_occupancy_reports_are_rejects() {
        let t = "zhian/district/gw-1/occupancy";
        let ok =
            r#""site":{},"at":"2026-11-30T00:01:00Z","inside":1,"long_stay":0,"missed_exits":0"#;
        let cases: Vec<(String, &str)> = vec![
            ("[1]".into(), "invalid_json"),
            (format!(r#"{{"gateway":"gw-1",{ok}}}"#), "wrong_schema"),
            (format!(r#"{{"schema":"zhian.summary.v1","gateway":"gw-1",{ok}}}"#), "wrong_schema"),
            (format!(r#"{{"schema":"zhian.occupancy.v1","gateway":"gw-2",{ok}}}"#), "gateway_mismatch"),
            (format!(r#"{{"schema":"zhian.occupancy.v1",{ok}}}"#), "invalid_field"),
            (
                r#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","site":{},"at":"2026-11-30T00:01:00Z","inside":-1,"long_stay":0,"missed_exits":0}"#.into(),
                "invalid_field",
            ),
            (
                r#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","site":{},"at":"2026-11-30T00:01:00Z","inside":"3","long_stay":0,"missed_exits":0}"#.into(),
                "invalid_field",
            ),
            (
                r#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","site":{},"at":"2026-11-30T00:01:00Z","inside":1000000000001,"long_stay":0,"missed_exits":0}"#.into(),
                "invalid_field",
            ),
            (
                r#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","site":{},"at":"2026-11-30T00:01:00Z","inside":1,"capacity":18446744073709551615,"long_stay":0,"missed_exits":0}"#.into(),
                "invalid_field",
            ),
            (
                r#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","site":{},"at":"2026-11-30T00:01:00Z","inside":1,"long_stay":0}"#.into(),
                "invalid_field",
            ),
            (
                r#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","site":{},"at":10000000000000000,"inside":1,"long_stay":0,"missed_exits":0}"#.into(),
                "invalid_field",
            ),
            (
                r#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","site":{"compound":"a\u0000b"},"at":"2026-11-30T00:01:00Z","inside":1,"long_stay":0,"missed_exits":0}"#.into(),
                "invalid_field",
            ),
        ];
        for (payload, reason) in cases {
            let e = parse(P, t, payload.as_bytes()).unwrap_err();
            assert_eq!(e.reason, reason, "{payload}: {e:?}");
        }
        // A report without `site` is taken (its labels empty, the compound its gateway id),
        // as a summary without one is.
        assert!(parse(
            P,
            t,
            br#"{"schema":"zhian.occupancy.v1","gateway":"gw-1","at":"2026-11-30T00:01:00Z","inside":1,"long_stay":0,"missed_exits":0}"#
        )
        .is_ok());
        // A deeper topic is not the occupancy leaf.
        let e = parse(P, "zhian/district/gw-1/occupancy/x", b"{}").unwrap_err();
        assert_eq!(e.reason, "foreign_topic");
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
