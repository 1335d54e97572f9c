//! Device events and workloads: payloads, mixed events, send plans with duplicates.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{Client, Connection, Event as MqttEvent, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::*;

/// Expected window totals for a set of unique events (each counted once).
pub fn expected_windows<'a>(events: impl IntoIterator<Item = &'a Event>) -> WindowTotals {
    let mut out = WindowTotals::new();
    for e in events {
        *out.entry((window_start(e.ts_ms), e.key())).or_default() += 1;
    }
    out
}

/// How an event's `ts` is written.
#[derive(Clone, Copy, Debug)]
pub enum TsStyle {
    /// Integer Unix milliseconds.
    Millis,
    /// RFC 3339 in UTC ("...Z").
    Utc,
    /// RFC 3339 at +08:00 (China Standard Time).
    Plus8,
}

/// Formats `ts_ms` as a JSON `ts` value.
pub fn ts_value(ts_ms: i64, style: TsStyle) -> Value {
    let offset = match style {
        TsStyle::Millis => return json!(ts_ms),
        TsStyle::Utc => UtcOffset::UTC,
        TsStyle::Plus8 => UtcOffset::from_hms(8, 0, 0).expect("valid offset"),
    };
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .expect("timestamp in range")
        .to_offset(offset);
    json!(at.format(&Rfc3339).expect("format RFC 3339"))
}

/// One device event (valid per the contract).
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: String,
    pub device: String,
    pub id: String,
    pub action: String,
    pub result: Option<String>,
    pub subject: Option<String>,
    pub ts_ms: i64,
    pub ts_style: TsStyle,
    /// Also write `kind` and `device` into the payload (they must equal the topic's).
    pub echo_topic: bool,
}

impl Event {
    pub fn new(kind: &str, device: &str, id: &str, action: &str) -> Event {
        Event {
            kind: kind.to_string(),
            device: device.to_string(),
            id: id.to_string(),
            action: action.to_string(),
            result: None,
            subject: None,
            ts_ms: now_ms(),
            ts_style: TsStyle::Millis,
            echo_topic: false,
        }
    }

    pub fn result(mut self, result: &str) -> Event {
        self.result = Some(result.to_string());
        self
    }

    pub fn subject(mut self, subject: &str) -> Event {
        self.subject = Some(subject.to_string());
        self
    }

    pub fn at(mut self, ts_ms: i64) -> Event {
        self.ts_ms = ts_ms;
        self
    }

    pub fn topic(&self) -> String {
        format!("zhian/{}/{}", self.kind, self.device)
    }

    /// The payload as a JSON object (tests may tamper with it before sending).
    pub fn json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("ts".into(), ts_value(self.ts_ms, self.ts_style));
        m.insert("action".into(), json!(self.action));
        if let Some(r) = &self.result {
            m.insert("result".into(), json!(r));
        }
        if let Some(s) = &self.subject {
            m.insert("subject".into(), json!(s));
        }
        if self.echo_topic {
            m.insert("kind".into(), json!(self.kind));
            m.insert("device".into(), json!(self.device));
        }
        m
    }

    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(&self.json()).expect("serialise event")
    }

    /// The summary row this event counts under (`result` defaults to `ok`).
    pub fn key(&self) -> Key {
        (
            self.kind.clone(),
            self.device.clone(),
            self.action.clone(),
            self.result.clone().unwrap_or_else(|| "ok".to_string()),
        )
    }
}

/// `n` unique events over three access doors and one vehicle gate, with mixed actions, results
/// (including an omitted result, counted as `ok`), subjects and `ts` styles. `ts_ms` is set when
/// sent (see [`send_plan`]).
pub fn mixed_events(rng: &mut Rng, n: usize) -> Vec<Event> {
    const DEVICES: [(&str, &str); 4] = [
        ("access", "door-1"),
        ("access", "door-2"),
        ("access", "door-3"),
        ("vehicle", "gate-1"),
    ];
    (0..n)
        .map(|seq| {
            let (kind, device) = DEVICES[rng.below(DEVICES.len())];
            let action = if rng.below(2) == 0 { "entry" } else { "exit" };
            let id = format!("{device}-{seq:06}");
            let mut e = Event::new(kind, device, &id, action);
            if kind == "access" {
                let result = if rng.below(5) == 0 {
                    "denied"
                } else {
                    "granted"
                };
                let card = format!("card:SUBJ{:05}", rng.below(100_000));
                e = e.result(result).subject(&card);
            } else {
                if rng.below(2) == 0 {
                    e = e.result("granted");
                }
                let plate = format!("plate:浙A·SUBJ{:04}", rng.below(10_000));
                e = e.subject(&plate);
            }
            e.ts_style = match seq % 3 {
                0 => TsStyle::Millis,
                1 => TsStyle::Utc,
                _ => TsStyle::Plus8,
            };
            e.echo_topic = seq % 7 == 0;
            e
        })
        .collect()
}

/// One step of a send plan.
#[derive(Clone, Copy, Debug)]
pub enum Slot {
    /// Send event i for the first time (stamped with the wall clock at that moment).
    New(usize),
    /// Re-send event i's exact payload (same id and ts).
    Dup(usize),
}

/// Every event once, in order, plus `n_dups` re-sends of random events: half right after the
/// original, half at a random later point.
pub fn plan_with_duplicates(rng: &mut Rng, n_unique: usize, n_dups: usize) -> Vec<Slot> {
    assert!(n_unique > 0);
    let mut keyed: Vec<(usize, Slot)> = (0..n_unique).map(|i| (i * 4, Slot::New(i))).collect();
    let end = n_unique * 4;
    for j in 0..n_dups {
        let target = rng.below(n_unique);
        let at = if j % 2 == 0 {
            target * 4 + 1
        } else {
            let from = target * 4 + 2;
            from + rng.below(end - from)
        };
        keyed.push((at, Slot::Dup(target)));
    }
    keyed.sort_by_key(|(at, _)| *at);
    keyed.into_iter().map(|(_, slot)| slot).collect()
}

/// Sends a plan through `publisher`: a new event gets `ts_ms = now` when sent; a duplicate
/// re-sends the original's bytes. `before(k)` runs before the k-th message (for pacing).
pub fn send_plan(
    publisher: &mut Publisher,
    events: &mut [Event],
    plan: &[Slot],
    mut before: impl FnMut(usize),
) {
    let mut payloads: Vec<Option<Vec<u8>>> = vec![None; events.len()];
    for (k, slot) in plan.iter().enumerate() {
        before(k);
        match *slot {
            Slot::New(i) => {
                events[i].ts_ms = now_ms();
                let payload = events[i].payload();
                payloads[i] = Some(payload.clone());
                publisher.send(&events[i].topic(), payload);
            }
            Slot::Dup(i) => {
                let payload = payloads[i]
                    .clone()
                    .expect("plan re-sends an event before its first send");
                publisher.send(&events[i].topic(), payload);
            }
        }
    }
}

/// Number of re-sends in a plan.
pub fn duplicates_in(plan: &[Slot]) -> usize {
    plan.iter().filter(|s| matches!(s, Slot::Dup(_))).count()
}
