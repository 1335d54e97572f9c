//! A batch of parsed messages as sets (pure: no database, no clock): what [`super::db`] sends
//! as a few array-valued statements instead of a few statements per message.
//!
//! The rules are the per-message rules, folded over the batch so that applying the fold once
//! gives what applying each message in arrival order gave:
//! - summaries: per window, the highest complete rev comes into force when it is higher than
//!   the rev in force ([`winners`]); a single-part rev is complete by itself, a split one when
//!   all its parts are stored;
//! - a rev coming into force subtracts its predecessor's rows from the rollups and adds its own,
//!   under the labels the window was first counted under ([`Deltas`]);
//! - daily counts: per (gateway, date), the highest rev;
//! - status and heartbeat: the state by epoch is a join ([`super::msg::next_state`]), so the
//!   batch's join is applied once; heartbeat body and site: the last to arrive;
//! - a window or alert outside the kept range ([`Horizon`]) is a reject (`outside_retention`):
//!   its month's partitions are gone or far in the future;
//! - fleet configuration reports: one per (gateway, serial, state), the first to arrive (the
//!   table keeps the first too, so a republished report is a no-op); per gateway the highest
//!   serial reported `applied`, which raises `gateways.config_serial` and never lowers it;
//! - occupancy reports (vehicles inside): per gateway the newest ([`Occupancy::rank`]: the
//!   latest `at`, ties broken by the content, so the choice is a join like the states' and
//!   any order, redelivery or batching keeps the same report); the table keeps a report only
//!   when it ranks above the one kept. A report stamped past the kept months (a gateway clock
//!   far ahead, which would otherwise hold the gateway's row against every later report) is
//!   an `outside_retention` reject; an old one is kept by the same rule (it loses to anything
//!   newer).

use super::msg::{next_state, LinkState, Msg, Reject, Row};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use zhian_proto::ConfigPhase;

/// The site labels a window's rows are counted under (contract: "The five layers"). A missing
/// label is `""`; a missing compound is the gateway id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Labels {
    pub district: String,
    pub street: String,
    pub community: String,
    pub compound: String,
}

/// Longest label kept, in characters (a label is part of the rollups' primary key).
pub const MAX_LABEL: usize = 256;

impl Labels {
    /// From a message's `site` object.
    pub fn of(gateway: &str, site: &Value) -> Labels {
        let get = |k: &str| {
            site.get(k)
                .and_then(Value::as_str)
                .map(|s| s.chars().take(MAX_LABEL).collect::<String>())
                .unwrap_or_default()
        };
        let compound = get("compound");
        Labels {
            district: get("district"),
            street: get("street"),
            community: get("community"),
            compound: if compound.is_empty() {
                gateway.chars().take(MAX_LABEL).collect()
            } else {
                compound
            },
        }
    }
}

/// A window: (gateway, start in Unix ms, length in s).
pub type WinKey = (String, i64, i32);

/// A complete rev of a window, before it is compared with the rev in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub key: WinKey,
    pub rev: i32,
    pub labels: Labels,
    /// Summed by (kind, device, action, result), sorted.
    pub rows: Vec<Row>,
}

/// One part of a split rev, to be stored until its rev is complete.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    pub key: WinKey,
    pub rev: i32,
    pub part: i32,
    pub parts: i32,
    pub labels: Labels,
    pub rows: Vec<Row>,
}

/// The window times and alert times kept, Unix ms: `[min_ms, max_ms)`. Below `min_ms` the raw
/// rows' months are dropped by retention; above `max_ms` is a gateway clock far ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    pub min_ms: i64,
    pub max_ms: i64,
}

impl Horizon {
    /// Everything (no retention).
    pub const ALL: Horizon = Horizon {
        min_ms: i64::MIN,
        max_ms: i64::MAX,
    };

    fn check(&self, ms: i64, what: &str) -> Result<(), Reject> {
        let detail = if ms < self.min_ms {
            format!(
                "{what} {} is before the oldest month kept, {} ([retention] window_rows)",
                rfc3339(ms),
                rfc3339(self.min_ms)
            )
        } else if ms >= self.max_ms {
            format!(
                "{what} {} is past the months created ahead, to {} ([retention] months_ahead; a gateway clock far ahead?)",
                rfc3339(ms),
                rfc3339(self.max_ms)
            )
        } else {
            return Ok(());
        };
        Err(Reject {
            reason: "outside_retention",
            detail,
        })
    }
}

/// Why `m` is outside `horizon` (an `outside_retention` reject), if it is: a summary's window
/// or an alert's time outside the kept months; an occupancy report only past the months
/// created ahead (its table is not partitioned, an old report is harmless).
pub fn outside(m: &Msg, horizon: Horizon) -> Option<Reject> {
    match m {
        Msg::Summary { start_ms, .. } => horizon.check(*start_ms, "window.start").err(),
        Msg::Alert { ts_ms, .. } => horizon.check(*ts_ms, "ts").err(),
        Msg::Occupancy { at_ms, .. } if *at_ms >= horizon.max_ms => {
            horizon.check(*at_ms, "at").err()
        }
        _ => None,
    }
}

/// Unix ms as RFC 3339 UTC (for messages).
fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// An alert to keep.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert<'a> {
    pub gateway: &'a str,
    pub kind: &'a str,
    pub device: &'a str,
    pub action: &'a str,
    pub id: &'a str,
    pub ts_ms: i64,
}

/// A fleet configuration report to keep (`config_reports`, contract: "Fleet configuration").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReport<'a> {
    pub gateway: &'a str,
    pub serial: i64,
    pub state: ConfigPhase,
    pub reason: Option<&'a str>,
    pub config_hash: &'a str,
    /// The box's time of the step, Unix ms; `None`: the database keeps its time of receipt.
    pub at_ms: Option<i64>,
}

/// An occupancy report to keep (`occupancy`, contract: "Vehicles inside"): the latest per
/// gateway, with the labels it rolls up under in `occupancy_by_layer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Occupancy<'a> {
    pub gateway: &'a str,
    /// The window's end, Unix ms.
    pub at_ms: i64,
    pub labels: Labels,
    pub inside: i64,
    pub capacity: Option<i64>,
    pub long_stay: i64,
    pub missed_exits: i64,
}

/// An occupancy report's place in the order "newer than" ([`Occupancy::rank`]): `at` (Unix
/// ms), inside, capacity (-1 when absent), long stays, missed exits, labels.
pub type Rank<'a> = (i64, i64, i64, i64, i64, &'a Labels);

impl Occupancy<'_> {
    /// What "newer" means between two reports of one gateway: the later `at`; at the same `at`
    /// (a box that re-sent a window's report with other figures, say after a stocktake) the
    /// greater content, compared field by field, so the newest of a set does not depend on the
    /// order it arrives in. The database's upsert compares the same tuple (labels in byte
    /// order, `COLLATE "C"`; a missing capacity as -1).
    pub fn rank(&self) -> Rank<'_> {
        (
            self.at_ms,
            self.inside,
            self.capacity.unwrap_or(-1),
            self.long_stay,
            self.missed_exits,
            &self.labels,
        )
    }
}

/// A batch as sets. Borrowed from the parsed messages.
#[derive(Debug, Default)]
pub struct Split<'a> {
    /// Every gateway the batch writes, sorted and distinct (locked in this order).
    pub gateways: Vec<&'a str>,
    /// Every window the batch's summaries touch, sorted and distinct.
    pub windows: Vec<WinKey>,
    /// The gateways whose rows the batch updates whatever they hold (statuses, heartbeats) or
    /// may update (an `applied` configuration report), sorted and distinct.
    pub updated: Vec<&'a str>,
    /// Single-part revs.
    pub whole: Vec<Candidate>,
    /// Parts of split revs.
    pub parts: Vec<Part>,
    pub alerts: Vec<Alert<'a>>,
    /// Care notices (the table's unique index makes a redelivery a no-op).
    pub care: Vec<&'a Msg>,
    /// Per (gateway, date), the highest rev in the batch.
    pub daily: Vec<&'a Msg>,
    /// The last state per gateway from statuses without an epoch (older gateways).
    pub epochless: Vec<(&'a str, &'a str)>,
    /// The join of the statuses and heartbeats with an epoch, per gateway.
    pub states: Vec<(&'a str, LinkState)>,
    /// The last heartbeat body per gateway.
    pub heartbeats: Vec<(&'a str, &'a Value)>,
    /// The last non-null site per gateway (from summaries and daily counts).
    pub sites: Vec<(&'a str, &'a Value)>,
    /// Fleet configuration reports, one per (gateway, serial, state): the first to arrive.
    /// Sorted by that key, so two receivers insert them in one order.
    pub config_reports: Vec<ConfigReport<'a>>,
    /// Per gateway, the highest serial the batch reports `applied`, sorted by gateway.
    pub config_serials: Vec<(&'a str, i64)>,
    /// Per gateway the newest occupancy report of the batch ([`Occupancy::rank`]), sorted by
    /// gateway (so two receivers take the rows' locks in one order).
    pub occupancy: Vec<Occupancy<'a>>,
    /// (topic, reason, detail).
    pub rejects: Vec<(&'a str, &'static str, String)>,
    /// Messages kept (not rejected).
    pub kept: u64,
}

/// Sum rows with the same (kind, device, action, result), sorted by them.
pub fn summed<'r>(rows: impl IntoIterator<Item = &'r Row>) -> Vec<Row> {
    let mut sum: BTreeMap<(&str, &str, &str, &str), i64> = BTreeMap::new();
    for r in rows {
        let e = sum
            .entry((&r.kind, &r.device, &r.action, &r.result))
            .or_insert(0);
        *e = e.saturating_add(r.n);
    }
    sum.into_iter()
        .map(|((k, d, a, r), n)| Row {
            kind: k.into(),
            device: d.into(),
            action: a.into(),
            result: r.into(),
            n,
        })
        .collect()
}

/// Keep the last value per key, in order of the key's first appearance.
fn last_per<'a, V>(items: impl IntoIterator<Item = (&'a str, V)>) -> Vec<(&'a str, V)> {
    let mut order: Vec<&'a str> = Vec::new();
    let mut last: HashMap<&'a str, V> = HashMap::new();
    for (k, v) in items {
        if last.insert(k, v).is_none() {
            order.push(k);
        }
    }
    order
        .into_iter()
        .map(|k| {
            let v = last.remove(k).expect("inserted");
            (k, v)
        })
        .collect()
}

/// Split a parsed batch into sets.
pub fn split<'a>(batch: &'a [(String, Result<Msg, Reject>)], horizon: Horizon) -> Split<'a> {
    let mut s = Split::default();
    let mut daily: BTreeMap<(&str, &str), &Msg> = BTreeMap::new();
    let mut epochless = Vec::new();
    let mut states: BTreeMap<&str, LinkState> = BTreeMap::new();
    let mut heartbeats = Vec::new();
    let mut sites = Vec::new();
    let mut reports: BTreeMap<(&str, i64, ConfigPhase), ConfigReport<'a>> = BTreeMap::new();
    let mut serials: BTreeMap<&str, i64> = BTreeMap::new();
    let mut occupancy: BTreeMap<&str, Occupancy<'a>> = BTreeMap::new();
    for (topic, m) in batch {
        let m = match m {
            Err(r) => {
                s.rejects.push((topic, r.reason, r.detail.clone()));
                continue;
            }
            Ok(m) => m,
        };
        if let Some(r) = outside(m, horizon) {
            s.rejects.push((topic, r.reason, r.detail));
            continue;
        }
        s.kept += 1;
        s.gateways.push(m.gateway());
        match m {
            Msg::Summary {
                gateway,
                site,
                start_ms,
                secs,
                rev,
                part,
                parts,
                rows,
            } => {
                if !site.is_null() {
                    sites.push((gateway.as_str(), site));
                }
                let key = (gateway.clone(), *start_ms, *secs);
                s.windows.push(key.clone());
                let labels = Labels::of(gateway, site);
                if *parts == 1 {
                    s.whole.push(Candidate {
                        key,
                        rev: *rev,
                        labels,
                        rows: summed(rows),
                    });
                } else {
                    s.parts.push(Part {
                        key,
                        rev: *rev,
                        part: *part,
                        parts: *parts,
                        labels,
                        rows: rows.clone(),
                    });
                }
            }
            Msg::Alert {
                gateway,
                kind,
                device,
                action,
                id,
                ts_ms,
            } => s.alerts.push(Alert {
                gateway,
                kind,
                device,
                action,
                id,
                ts_ms: *ts_ms,
            }),
            Msg::Care { .. } => s.care.push(m),
            Msg::Daily {
                gateway,
                site,
                date,
                rev,
                ..
            } => {
                if !site.is_null() {
                    sites.push((gateway.as_str(), site));
                }
                let e = daily.entry((gateway.as_str(), date.as_str())).or_insert(m);
                if matches!(e, Msg::Daily { rev: r, .. } if r < rev) {
                    *e = m;
                }
            }
            Msg::Status {
                gateway,
                state,
                epoch: None,
                ..
            } => epochless.push((gateway.as_str(), state.as_str())),
            Msg::Status {
                gateway,
                state,
                epoch: Some(epoch),
                ..
            } => {
                let msg = LinkState {
                    epoch: *epoch,
                    online: state != "offline",
                };
                let cur = states.get(gateway.as_str()).copied();
                states.insert(gateway, next_state(cur, msg));
            }
            Msg::Heartbeat {
                gateway,
                epoch,
                body,
            } => {
                heartbeats.push((gateway.as_str(), body));
                if let Some(epoch) = epoch {
                    // A heartbeat is sent only while connected: online at its epoch, when
                    // that epoch is higher than the state in force (a join like the statuses:
                    // online at epoch e never overrides anything at e).
                    let msg = LinkState {
                        epoch: *epoch,
                        online: true,
                    };
                    let cur = states.get(gateway.as_str()).copied();
                    states.insert(gateway, next_state(cur, msg));
                }
            }
            Msg::ConfigState {
                gateway,
                serial,
                state,
                reason,
                config_hash,
                at_ms,
            } => {
                reports
                    .entry((gateway.as_str(), *serial, *state))
                    .or_insert(ConfigReport {
                        gateway,
                        serial: *serial,
                        state: *state,
                        reason: reason.as_deref(),
                        config_hash,
                        at_ms: *at_ms,
                    });
                if *state == ConfigPhase::Applied {
                    let e = serials.entry(gateway.as_str()).or_insert(*serial);
                    *e = (*e).max(*serial);
                }
            }
            Msg::Occupancy {
                gateway,
                site,
                at_ms,
                inside,
                capacity,
                long_stay,
                missed_exits,
            } => {
                let o = Occupancy {
                    gateway,
                    at_ms: *at_ms,
                    labels: Labels::of(gateway, site),
                    inside: *inside,
                    capacity: *capacity,
                    long_stay: *long_stay,
                    missed_exits: *missed_exits,
                };
                match occupancy.get(gateway.as_str()) {
                    Some(kept) if kept.rank() >= o.rank() => {}
                    _ => {
                        occupancy.insert(gateway, o);
                    }
                }
            }
        }
    }
    s.gateways.sort_unstable();
    s.gateways.dedup();
    s.windows.sort();
    s.windows.dedup();
    s.daily = daily.into_values().collect();
    s.epochless = last_per(epochless);
    s.updated = s
        .epochless
        .iter()
        .map(|x| x.0)
        .chain(states.keys().copied())
        .chain(heartbeats.iter().map(|x: &(&str, &Value)| x.0))
        .chain(serials.keys().copied())
        .collect();
    s.updated.sort_unstable();
    s.updated.dedup();
    s.states = states.into_iter().collect();
    s.heartbeats = last_per(heartbeats);
    s.sites = last_per(sites);
    s.config_reports = reports.into_values().collect();
    s.config_serials = serials.into_iter().collect();
    s.occupancy = occupancy.into_values().collect();
    s
}

/// Stored parts by split rev: `(window, rev, parts) -> [(part, labels if the part had a site,
/// rows)]`.
pub type StoredParts = BTreeMap<(WinKey, i32, i32), Vec<(i32, Option<Labels>, Vec<Row>)>>;

/// Complete split revs from their stored parts: `(key, rev, parts) -> [(part, labels, rows)]`.
/// A rev is complete when every part 1..=parts is there; its rows are the parts' rows summed,
/// its labels those of its first part that had a site (a part stored before schema V5 has
/// none), else the gateway's defaults.
pub fn complete(stored: StoredParts) -> Vec<Candidate> {
    let mut out = Vec::new();
    for ((key, rev, parts), mut got) in stored {
        got.sort_by_key(|g| g.0);
        got.dedup_by_key(|g| g.0);
        if got.len() as i32 != parts || got.iter().any(|g| g.0 < 1 || g.0 > parts) {
            continue;
        }
        let labels = got
            .iter()
            .find_map(|g| g.1.clone())
            .unwrap_or_else(|| Labels::of(&key.0, &Value::Null));
        let rows = summed(got.iter().flat_map(|g| g.2.iter()));
        out.push(Candidate {
            key,
            rev,
            labels,
            rows,
        });
    }
    out
}

/// The rev in force of a window, as the database has it.
#[derive(Debug, Clone, PartialEq)]
pub struct InForce {
    pub rev: i32,
    pub labels: Labels,
}

/// Per window the highest candidate rev, sorted by window (what the windows' upsert is given;
/// the database keeps it only when higher than the rev in force).
pub fn best(candidates: Vec<Candidate>) -> Vec<Candidate> {
    let mut best: BTreeMap<WinKey, Candidate> = BTreeMap::new();
    for c in candidates {
        match best.get(&c.key) {
            Some(b) if b.rev >= c.rev => {}
            _ => {
                best.insert(c.key.clone(), c);
            }
        }
    }
    best.into_values().collect()
}

/// Which candidates come into force (the model of what [`best`] and the windows' upsert do
/// together): per window the highest candidate rev, when it is higher
/// than the rev in force. Each winner carries the labels it is counted under: those of the
/// rev in force when there is one (a window never moves), else its own. Sorted by window.
pub fn winners(
    candidates: Vec<Candidate>,
    in_force: &HashMap<WinKey, InForce>,
) -> Vec<(Candidate, Option<i32>)> {
    best(candidates)
        .into_iter()
        .filter_map(|mut c| match in_force.get(&c.key) {
            Some(f) if f.rev >= c.rev => None,
            Some(f) => {
                c.labels = f.labels.clone();
                Some((c, Some(f.rev)))
            }
            None => Some((c, None)),
        })
        .collect()
}

/// The quarter hour (UTC) holding `start_ms`, in Unix ms. Every time zone's offset is a
/// multiple of 15 minutes (IANA tzdb: +05:45 Nepal, +12:45 Chatham are the finest), so a
/// quarter hour lies inside one local hour and one local day: deltas summed per quarter hour
/// land in the same hourly and daily rollup rows as per window, with a fraction of the rows.
pub fn slot(start_ms: i64) -> i64 {
    start_ms.div_euclid(900_000) * 900_000
}

/// Rollup deltas at quarter-hour grain ([`slot`]): (quarter hour start ms, labels, kind, action) -> n. The database
/// groups them by hour and by local day, for each layer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Deltas(pub BTreeMap<(i64, Labels, String, String), i64>);

impl Deltas {
    /// Add `sign` x each row's count.
    pub fn add(&mut self, start_ms: i64, labels: &Labels, kind: &str, action: &str, n: i64) {
        if n == 0 {
            return;
        }
        let e = self
            .0
            .entry((
                start_ms,
                labels.clone(),
                kind.to_string(),
                action.to_string(),
            ))
            .or_insert(0);
        *e = e.saturating_add(n);
    }

    /// The non-zero deltas.
    pub fn nonzero(&self) -> impl Iterator<Item = (&(i64, Labels, String, String), i64)> {
        self.0
            .iter()
            .filter(|(_, n)| **n != 0)
            .map(|(k, n)| (k, *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(kind: &str, device: &str, n: i64) -> Row {
        Row {
            kind: kind.into(),
            device: device.into(),
            action: "entry".into(),
            result: "ok".into(),
            n,
        }
    }

    #[test]
    fn labels_default_compound_to_gateway() {
        let l = Labels::of("gw-1", &serde_json::json!({"street": "富春街道"}));
        assert_eq!(l.street, "富春街道");
        assert_eq!(l.compound, "gw-1");
        assert_eq!(l.community, "");
        let l = Labels::of("gw-1", &Value::Null);
        assert_eq!(l.compound, "gw-1");
    }

    #[test]
    fn split_folds_states_daily_and_sites() {
        let s = |t: &str, m: Msg| (t.to_string(), Ok(m));
        let st = |g: &str, state: &str, e: Option<i64>| Msg::Status {
            gateway: g.into(),
            state: state.into(),
            epoch: e,
            body: Value::Null,
        };
        let daily = |rev: i32| Msg::Daily {
            gateway: "a".into(),
            site: serde_json::json!({"compound": format!("c{rev}")}),
            date: "2026-12-01".into(),
            tz: "+08:00".into(),
            rev,
            access_subjects: None,
            vehicles: None,
            key_generations: None,
            rows: vec![],
        };
        let batch = vec![
            s("t", st("b", "offline", Some(3))),
            s("t", st("b", "online", Some(3))),
            s("t", st("a", "online", Some(1))),
            s("t", daily(2)),
            s("t", daily(1)),
            s("t", st("c", "online", None)),
            s("t", st("c", "offline", None)),
            (
                "bad".into(),
                Err(Reject {
                    reason: "invalid_json",
                    detail: "x".into(),
                }),
            ),
        ];
        let sp = split(&batch, Horizon::ALL);
        assert_eq!(sp.gateways, vec!["a", "b", "c"]);
        assert_eq!(
            sp.states,
            vec![
                (
                    "a",
                    LinkState {
                        epoch: 1,
                        online: true
                    }
                ),
                (
                    "b",
                    LinkState {
                        epoch: 3,
                        online: false
                    }
                )
            ]
        );
        assert_eq!(sp.epochless, vec![("c", "offline")]);
        assert_eq!(sp.updated, vec!["a", "b", "c"]);
        assert_eq!(sp.daily.len(), 1);
        assert!(matches!(sp.daily[0], Msg::Daily { rev: 2, .. }));
        // The last site to arrive.
        assert_eq!(
            sp.sites,
            vec![("a", &serde_json::json!({"compound": "c1"}))]
        );
        assert_eq!(sp.rejects.len(), 1);
        assert_eq!(sp.kept, 7);
    }

    fn report(g: &str, serial: i64, state: ConfigPhase, at_ms: Option<i64>) -> Msg {
        Msg::ConfigState {
            gateway: g.into(),
            serial,
            state,
            reason: (state == ConfigPhase::RolledBack).then(|| "link down".to_string()),
            config_hash: format!("h{serial}"),
            at_ms,
        }
    }

    #[test]
    fn split_keeps_config_reports_once_and_the_highest_applied_serial() {
        use ConfigPhase::*;
        let s = |m: Msg| ("t".to_string(), Ok(m));
        let batch = vec![
            s(report("b", 5, Applied, Some(50))),
            s(report("a", 9, Probation, Some(91))),
            s(report("a", 7, Applied, Some(70))),
            // A republished report (after a reconnect): the first is kept.
            s(report("a", 7, Applied, Some(75))),
            s(report("a", 9, RolledBack, None)),
            s(report("a", 6, Applied, Some(60))),
            s(report("c", 2, Rejected, Some(20))),
        ];
        let sp = split(&batch, Horizon::ALL);
        assert_eq!(sp.kept, 7);
        assert_eq!(sp.gateways, vec!["a", "b", "c"]);
        let keys: Vec<_> = sp
            .config_reports
            .iter()
            .map(|r| (r.gateway, r.serial, r.state, r.at_ms))
            .collect();
        assert_eq!(
            keys,
            vec![
                ("a", 6, Applied, Some(60)),
                ("a", 7, Applied, Some(70)),
                ("a", 9, Probation, Some(91)),
                ("a", 9, RolledBack, None),
                ("b", 5, Applied, Some(50)),
                ("c", 2, Rejected, Some(20)),
            ]
        );
        assert_eq!(sp.config_reports[3].reason, Some("link down"));
        assert_eq!(sp.config_reports[1].config_hash, "h7");
        // Only `applied` moves the serial in force; a rejected or rolled-back one does not.
        assert_eq!(sp.config_serials, vec![("a", 7), ("b", 5)]);
        // The gateways whose serial may move are locked with the others updated.
        assert_eq!(sp.updated, vec!["a", "b"]);
    }

    proptest! {
        /// Configuration reports in any order, redelivered, cut into any batches: the kept
        /// reports are each distinct report once, and the serial in force is the highest
        /// `applied` one, as if every report had arrived in one batch in order.
        #[test]
        fn config_reports_ignore_order_redelivery_and_batches(
            msgs in proptest::collection::vec((0usize..3, 0i64..6, 0usize..5), 1..50),
            cut in proptest::collection::vec(1usize..6, 1..10),
        ) {
            let gws = ["g0", "g1", "g2"];
            // A report's content is a function of its key (a redelivery is the same message).
            let batch: Vec<(String, Result<Msg, Reject>)> = msgs
                .iter()
                .map(|&(g, serial, st)| {
                    let state = ConfigPhase::ALL[st];
                    ("t".to_string(), Ok(report(gws[g], serial, state, Some(serial * 10 + st as i64))))
                })
                .collect();
            // The "database": kept reports (the first per key) and the serial in force.
            let mut kept: BTreeMap<(String, i64, ConfigPhase), Option<i64>> = BTreeMap::new();
            let mut serial: BTreeMap<String, i64> = BTreeMap::new();
            let mut i = 0;
            let mut ci = 0;
            while i < batch.len() {
                let end = (i + cut[ci % cut.len()]).min(batch.len());
                ci += 1;
                let sp = split(&batch[i..end], Horizon::ALL);
                let keys: Vec<_> = sp.config_reports.iter().map(|r| (r.gateway, r.serial, r.state)).collect();
                let mut sorted = keys.clone();
                sorted.sort();
                sorted.dedup();
                prop_assert_eq!(&keys, &sorted, "sorted and distinct");
                for r in &sp.config_reports {
                    kept.entry((r.gateway.to_string(), r.serial, r.state)).or_insert(r.at_ms);
                }
                for &(g, n) in &sp.config_serials {
                    prop_assert!(sp.updated.contains(&g));
                    let e = serial.entry(g.to_string()).or_insert(n);
                    *e = (*e).max(n);
                }
                i = end;
            }
            let mut want_kept = BTreeMap::new();
            let mut want_serial = BTreeMap::new();
            for &(g, n, st) in &msgs {
                let state = ConfigPhase::ALL[st];
                want_kept.insert((gws[g].to_string(), n, state), Some(n * 10 + st as i64));
                if state == ConfigPhase::Applied {
                    let e = want_serial.entry(gws[g].to_string()).or_insert(n);
                    *e = (*e).max(n);
                }
            }
            prop_assert_eq!(kept, want_kept);
            prop_assert_eq!(serial, want_serial);
        }
    }

    /// An occupancy row as the model keeps it: at, inside, capacity, long stays, missed exits,
    /// labels.
    type Kept = (i64, i64, Option<i64>, i64, i64, Labels);

    fn occ(g: &str, at_ms: i64, site: Value, inside: i64, capacity: Option<i64>) -> Msg {
        Msg::Occupancy {
            gateway: g.into(),
            site,
            at_ms,
            inside,
            capacity,
            long_stay: inside / 10,
            missed_exits: at_ms % 3,
        }
    }

    #[test]
    fn split_keeps_the_newest_occupancy_per_gateway() {
        use serde_json::json;
        let s = |m: Msg| ("t".to_string(), Ok(m));
        let long = "长".repeat(300);
        let batch = vec![
            s(occ("b", 60, json!({"compound": "B"}), 5, Some(10))),
            s(occ(
                "a",
                120,
                json!({"street": "S", "compound": long}),
                7,
                None,
            )),
            // Late and older: changes nothing.
            s(occ("a", 60, json!({"compound": "old"}), 99, Some(100))),
            s(occ("b", 180, json!({"compound": "B"}), 6, Some(10))),
            // Redelivered.
            s(occ("b", 180, json!({"compound": "B"}), 6, Some(10))),
            // No compound: the gateway id, as for summaries.
            s(occ("c", 60, json!({"community": "C"}), 1, Some(2))),
        ];
        let sp = split(&batch, Horizon::ALL);
        assert_eq!(sp.kept, 6);
        assert_eq!(sp.gateways, vec!["a", "b", "c"]);
        assert!(sp.updated.is_empty(), "no gateway row is updated");
        let got: Vec<_> = sp
            .occupancy
            .iter()
            .map(|o| (o.gateway, o.at_ms, o.inside, o.capacity))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a", 120, 7, None),
                ("b", 180, 6, Some(10)),
                ("c", 60, 1, Some(2))
            ]
        );
        // Labels capped (256 characters) and defaulted like a summary's.
        assert_eq!(sp.occupancy[0].labels.compound, "长".repeat(MAX_LABEL));
        assert_eq!(sp.occupancy[0].labels.street, "S");
        assert_eq!(sp.occupancy[2].labels.compound, "c");
        assert_eq!(sp.occupancy[2].labels.community, "C");
        assert_eq!(sp.occupancy[2].labels.district, "");
        // Same `at`, other figures: the greater content, whichever arrives first.
        let x = s(occ("a", 60, json!({}), 3, Some(5)));
        let y = s(occ("a", 60, json!({}), 3, None));
        let xy = [x.clone(), y.clone()];
        let yx = [y, x];
        assert_eq!(
            split(&xy, Horizon::ALL).occupancy,
            split(&yx, Horizon::ALL).occupancy
        );
        assert_eq!(split(&xy, Horizon::ALL).occupancy[0].capacity, Some(5));
    }

    #[test]
    fn occupancy_from_a_clock_far_ahead_is_a_reject_and_an_old_one_is_kept() {
        let s = |m: Msg| ("t".to_string(), Ok(m));
        let h = Horizon {
            min_ms: 1_000,
            max_ms: 2_000,
        };
        let batch = vec![
            s(occ("a", 2_000, Value::Null, 1, None)),
            s(occ("b", 5, Value::Null, 2, None)),
        ];
        let sp = split(&batch, h);
        assert_eq!(sp.kept, 1);
        assert_eq!(sp.rejects.len(), 1);
        assert_eq!(sp.rejects[0].1, "outside_retention");
        assert!(sp.rejects[0].2.starts_with("at "), "{}", sp.rejects[0].2);
        assert_eq!(sp.gateways, vec!["b"]);
        assert_eq!(sp.occupancy.len(), 1);
        assert_eq!(sp.occupancy[0].gateway, "b");
    }

    proptest! {
        /// Occupancy reports in any order, redelivered, cut into any batches and applied the
        /// way the table's upsert applies them (a report replaces the row only when it ranks
        /// above it): the row of each gateway is its newest report. A report's content is a
        /// function of (gateway, `at`, variant): variant 0 is the box's report; variant 1, when
        /// present, a second report of the same window with other figures, which must not make
        /// the result depend on the order.
        #[test]
        fn occupancy_is_the_newest_report_whatever_the_order_and_batches(
            msgs in proptest::collection::vec((0usize..3, 0i64..6, 0usize..2), 1..50),
            seed in any::<u64>(),
            cut in proptest::collection::vec(1usize..6, 1..10),
        ) {
            let gws = ["g0", "g1", "g2"];
            let report = |g: usize, at: i64, v: usize| {
                let site = serde_json::json!({"community": format!("c{}", (g + v) % 2)});
                let inside = (at * 7 + g as i64 * 3 + v as i64 * 5) % 11;
                let capacity = ((at + v as i64) % 3 != 0).then_some(10 + at);
                occ(gws[g], at * 60_000, site, inside, capacity)
            };
            let apply = |order: &[(usize, i64, usize)]| {
                let batch: Vec<(String, Result<Msg, Reject>)> = order
                    .iter()
                    .map(|&(g, at, v)| ("t".to_string(), Ok(report(g, at, v))))
                    .collect();
                // The "database": one row per gateway.
                let mut db: BTreeMap<String, Kept> = BTreeMap::new();
                let (mut i, mut ci) = (0, 0);
                while i < batch.len() {
                    let end = (i + cut[ci % cut.len()]).min(batch.len());
                    ci += 1;
                    let sp = split(&batch[i..end], Horizon::ALL);
                    let keys: Vec<_> = sp.occupancy.iter().map(|o| o.gateway).collect();
                    let mut sorted = keys.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    assert_eq!(keys, sorted, "one per gateway, sorted");
                    for o in &sp.occupancy {
                        let row = (o.at_ms, o.inside, o.capacity, o.long_stay, o.missed_exits, o.labels.clone());
                        match db.get(o.gateway) {
                            Some(k) if (k.0, k.1, k.2.unwrap_or(-1), k.3, k.4, &k.5) >= o.rank() => {}
                            _ => {
                                db.insert(o.gateway.to_string(), row);
                            }
                        }
                    }
                    i = end;
                }
                db
            };
            // Each message sent once or twice (redelivery), then shuffled.
            let mut sent: Vec<(usize, i64, usize)> = Vec::new();
            let mut r = seed;
            let mut next = || {
                r = r.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (r >> 33) as usize
            };
            for &m in &msgs {
                sent.push(m);
                if next() % 3 == 0 {
                    sent.push(m);
                }
            }
            for i in (1..sent.len()).rev() {
                sent.swap(i, next() % (i + 1));
            }
            let got = apply(&sent);
            prop_assert_eq!(&got, &apply(&msgs), "the order and redelivery do not matter");
            // The model: per gateway the latest `at`; at that `at`, the greater variant's
            // content when both were sent.
            let mut want = BTreeMap::new();
            for (g, name) in gws.iter().enumerate() {
                let Some(at) = msgs.iter().filter(|m| m.0 == g).map(|m| m.1).max() else {
                    continue;
                };
                let best = msgs
                    .iter()
                    .filter(|m| m.0 == g && m.1 == at)
                    .map(|&(_, _, v)| {
                        let Msg::Occupancy { site, at_ms, inside, capacity, long_stay, missed_exits, .. } =
                            report(g, at, v) else { unreachable!() };
                        (at_ms, inside, capacity, long_stay, missed_exits, Labels::of(name, &site))
                    })
                    .max_by_key(|k| (k.0, k.1, k.2.unwrap_or(-1), k.3, k.4, k.5.clone()))
                    .unwrap();
                want.insert(name.to_string(), best);
            }
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn outside_the_horizon_is_a_reject() {
        let m = Msg::Alert {
            gateway: "a".into(),
            kind: "camera".into(),
            device: "c".into(),
            action: "x".into(),
            id: "1".into(),
            ts_ms: 5,
        };
        let batch = vec![("t".to_string(), Ok(m))];
        let sp = split(
            &batch,
            Horizon {
                min_ms: 10,
                max_ms: 20,
            },
        );
        assert_eq!(sp.rejects[0].1, "outside_retention");
        assert!(sp.alerts.is_empty());
        assert_eq!(sp.kept, 0);
    }

    #[test]
    fn complete_needs_every_part() {
        let key: WinKey = ("g".into(), 0, 60);
        let l = Labels::default();
        let l2 = Labels {
            compound: "K2".into(),
            ..Labels::default()
        };
        let mut stored = BTreeMap::new();
        stored.insert(
            (key.clone(), 0, 2),
            vec![(1, Some(l.clone()), vec![row("access", "d1", 2)])],
        );
        stored.insert(
            (key.clone(), 1, 2),
            vec![
                (2, Some(l2.clone()), vec![row("access", "d2", 1)]),
                (
                    1,
                    None,
                    vec![row("access", "d1", 2), row("access", "d2", 1)],
                ),
            ],
        );
        let c = complete(stored);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].rev, 1);
        // Part 1 was stored without a site (before schema V5): the labels are part 2's.
        assert_eq!(c[0].labels, l2);
        assert_eq!(
            c[0].rows,
            vec![row("access", "d1", 2), row("access", "d2", 2)]
        );
    }

    #[test]
    fn winners_keep_the_windows_labels() {
        let key: WinKey = ("g".into(), 0, 60);
        let old = Labels {
            community: "old".into(),
            ..Labels::default()
        };
        let new = Labels {
            community: "new".into(),
            ..Labels::default()
        };
        let cand = |rev| Candidate {
            key: key.clone(),
            rev,
            labels: new.clone(),
            rows: vec![],
        };
        let mut f = HashMap::new();
        f.insert(
            key.clone(),
            InForce {
                rev: 1,
                labels: old.clone(),
            },
        );
        let w = winners(vec![cand(1), cand(3), cand(2)], &f);
        assert_eq!(w.len(), 1);
        assert_eq!((w[0].0.rev, w[0].1), (3, Some(1)));
        assert_eq!(w[0].0.labels, old);
        assert!(winners(vec![cand(1)], &f).is_empty());
        let w = winners(vec![cand(0)], &HashMap::new());
        assert_eq!(w[0].0.labels, new);
    }

    proptest! {
        /// Applying batches through `winners` and `Deltas` keeps a rollup equal to a recount
        /// of the windows in force, for any order of revs, duplicates and batch boundaries.
        #[test]
        fn deltas_equal_a_recount(
            msgs in proptest::collection::vec((0i64..4, 0i32..4), 1..60),
            cut in proptest::collection::vec(1usize..8, 1..20),
        ) {
            // The "database": windows in force with their rows, and the rollup by (start, kind).
            let mut in_force: HashMap<WinKey, (InForce, Vec<Row>)> = HashMap::new();
            let mut rollup: BTreeMap<(i64, String), i64> = BTreeMap::new();
            let kinds = ["access", "vehicle", "camera"];
            let cands: Vec<Candidate> = msgs.iter().map(|&(w, rev)| Candidate {
                key: ("g".into(), w * 60_000, 60),
                rev,
                labels: Labels::default(),
                // A rev's rows are a function of (window, rev): re-sending it is a duplicate.
                rows: vec![
                    row(kinds[(w as usize + rev as usize) % 3], "d", w + rev as i64 + 1),
                    row(kinds[(w as usize + 2 * rev as usize) % 3], "e", (w * rev as i64) % 3),
                ],
            }).map(|mut c| { c.rows = summed(&c.rows); c }).collect();
            let mut i = 0;
            let mut ci = 0;
            while i < cands.len() {
                let end = (i + cut[ci % cut.len()]).min(cands.len());
                ci += 1;
                let f: HashMap<WinKey, InForce> = in_force.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
                let mut d = Deltas::default();
                for (c, prev) in winners(cands[i..end].to_vec(), &f) {
                    if prev.is_some() {
                        for r in &in_force[&c.key].1 {
                            d.add(c.key.1, &c.labels, &r.kind, &r.action, -r.n);
                        }
                    }
                    for r in &c.rows {
                        d.add(c.key.1, &c.labels, &r.kind, &r.action, r.n);
                    }
                    in_force.insert(c.key.clone(), (InForce { rev: c.rev, labels: c.labels.clone() }, c.rows.clone()));
                }
                for ((start, _, kind, _), n) in d.nonzero() {
                    *rollup.entry((*start, kind.clone())).or_insert(0) += n;
                }
                i = end;
            }
            let mut recount: BTreeMap<(i64, String), i64> = BTreeMap::new();
            for (k, (_, rows)) in &in_force {
                for r in rows {
                    *recount.entry((k.1, r.kind.clone())).or_insert(0) += r.n;
                }
            }
            rollup.retain(|_, n| *n != 0);
            recount.retain(|_, n| *n != 0);
            prop_assert_eq!(&rollup, &recount);
            // And the highest rev of each window is in force.
            for &(w, _) in &msgs {
                let top = msgs.iter().filter(|m| m.0 == w).map(|m| m.1).max().unwrap();
                prop_assert_eq!(in_force[&("g".to_string(), w * 60_000, 60)].0.rev, top);
            }
        }
    }
}
