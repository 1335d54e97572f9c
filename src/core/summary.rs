//! Window state and the upstream payloads built from it (summary, alert), per the contract.
//!
//! No subject, card, face or plate id is a field of anything built here: summaries carry only
//! counts, alerts only the device's own event id.

use super::event::{Event, Kind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One row of a summary: what is counted. Ordered by kind, device, action, result, as the
/// contract sorts `counts`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CountKey {
    pub kind: Kind,
    pub device: String,
    pub action: String,
    pub result: String,
}

impl CountKey {
    pub fn of(e: &Event) -> Self {
        CountKey {
            kind: e.kind,
            device: e.device.clone(),
            action: e.action.clone(),
            result: e.result.clone(),
        }
    }
}

/// Everything known about one window: its counts and the last revision issued upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowState {
    pub start_ms: i64,
    pub secs: u32,
    pub counts: BTreeMap<CountKey, u64>,
    /// `None` while the window is open; `Some(rev)` once revision `rev` was issued.
    pub issued: Option<u32>,
}

impl WindowState {
    pub fn new(start_ms: i64, secs: u32) -> Self {
        WindowState {
            start_ms,
            secs,
            counts: BTreeMap::new(),
            issued: None,
        }
    }

    pub fn add(&mut self, key: CountKey, n: u64) {
        *self.counts.entry(key).or_insert(0) += n;
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The revision the next summary of this window carries.
    pub fn next_rev(&self) -> u32 {
        self.issued.map_or(0, |r| r + 1)
    }
}

/// Site labels copied into every summary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub district: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub street: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub community: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compound: Option<String>,
}

/// RFC 3339 UTC with a `Z`, milliseconds only when not whole seconds.
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

#[derive(Serialize)]
struct SummaryOut<'a> {
    schema: &'static str,
    gateway: &'a str,
    site: &'a Site,
    window: WindowOut,
    rev: u32,
    /// 1-based part number, when the summary is split (contract: "Upstream").
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parts: Option<usize>,
    counts: Vec<CountOut<'a>>,
}

#[derive(Serialize)]
struct WindowOut {
    start: String,
    secs: u32,
}

#[derive(Serialize, Clone)]
struct CountOut<'a> {
    kind: Kind,
    device: &'a str,
    action: &'a str,
    result: &'a str,
    n: u64,
}

/// The `zhian.summary.v1` payload for revision `rev` of a window.
pub fn summary_json(gateway: &str, site: &Site, w: &WindowState, rev: u32) -> Vec<u8> {
    summary_parts(gateway, site, w, rev, usize::MAX)
        .pop()
        .expect("one part")
}

/// The `zhian.summary.v1` payloads for revision `rev` of a window, each at most `max_bytes`:
/// one payload when it fits (no `part` fields), else several with `"part": i` (1-based),
/// `"parts": n` and a disjoint share of the rows, in row order (contract: "Upstream"). A row is
/// a few hundred bytes at most, so any `max_bytes` of a kilobyte or more fits at least one.
pub fn summary_parts(
    gateway: &str,
    site: &Site,
    w: &WindowState,
    rev: u32,
    max_bytes: usize,
) -> Vec<Vec<u8>> {
    let rows: Vec<CountOut> = w
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| CountOut {
            kind: k.kind,
            device: &k.device,
            action: &k.action,
            result: &k.result,
            n: *n,
        })
        .collect();
    let render = |counts: Vec<CountOut>, part: Option<(usize, usize)>| {
        serde_json::to_vec(&SummaryOut {
            schema: "zhian.summary.v1",
            gateway,
            site,
            window: WindowOut {
                start: rfc3339_utc(w.start_ms),
                secs: w.secs,
            },
            rev,
            part: part.map(|p| p.0),
            parts: part.map(|p| p.1),
            counts,
        })
        .expect("summary serializes")
    };
    let whole = render(rows.clone(), None);
    if whole.len() <= max_bytes {
        return vec![whole];
    }
    // The envelope of a part with the widest part numbers, and each row's bytes (plus a comma).
    let envelope = render(Vec::new(), Some((rows.len(), rows.len()))).len();
    let budget = max_bytes.saturating_sub(envelope).max(1);
    let mut chunks: Vec<Vec<CountOut>> = vec![Vec::new()];
    let mut used = 0;
    for row in rows {
        let len = serde_json::to_vec(&row).map_or(0, |v| v.len()) + 1;
        let last = chunks.last_mut().expect("a chunk");
        if !last.is_empty() && used + len > budget {
            chunks.push(Vec::new());
            used = 0;
        }
        used += len;
        chunks.last_mut().expect("a chunk").push(row);
    }
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| render(c, Some((i + 1, n))))
        .collect()
}

#[derive(Serialize)]
struct AlertOut<'a> {
    schema: &'static str,
    gateway: &'a str,
    kind: Kind,
    device: &'a str,
    action: &'a str,
    id: &'a str,
    ts: String,
}

/// The `zhian.alert.v1` payload for a camera incident. Carries no subject.
pub fn alert_json(gateway: &str, e: &Event) -> Vec<u8> {
    let out = AlertOut {
        schema: "zhian.alert.v1",
        gateway,
        kind: e.kind,
        device: &e.device,
        action: &e.action,
        id: &e.id,
        ts: rfc3339_utc(e.ts_ms),
    };
    serde_json::to_vec(&out).expect("alert serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_summary_splits_into_disjoint_parts_under_the_limit() {
        let mut w = WindowState::new(1_800_000_000_000, 10);
        for d in 0..900 {
            w.add(
                CountKey {
                    kind: Kind::Access,
                    device: format!("door-{d:04}"),
                    action: "entry".into(),
                    result: "granted".into(),
                },
                d as u64 + 1,
            );
        }
        let whole = summary_json("gw", &Site::default(), &w, 3);
        assert!(whole.len() > 65_000, "{}", whole.len());
        let limit = 65_536 - 40;
        let parts = summary_parts("gw", &Site::default(), &w, 3, limit);
        assert!(parts.len() >= 2);
        let mut seen = std::collections::BTreeSet::new();
        let mut total = 0;
        for (i, p) in parts.iter().enumerate() {
            assert!(p.len() <= limit, "part {} is {} bytes", i + 1, p.len());
            let v: serde_json::Value = serde_json::from_slice(p).unwrap();
            assert_eq!(v["part"], i + 1);
            assert_eq!(v["parts"], parts.len());
            assert_eq!(v["rev"], 3);
            for c in v["counts"].as_array().unwrap() {
                assert!(seen.insert(c["device"].as_str().unwrap().to_string()));
                total += c["n"].as_u64().unwrap();
            }
        }
        assert_eq!(seen.len(), 900);
        assert_eq!(total, (1..=900).sum::<u64>());
        // A summary that fits is one message without part fields.
        let one = summary_parts("gw", &Site::default(), &w, 3, usize::MAX);
        assert_eq!(one, vec![whole]);
    }

    #[test]
    fn summary_matches_contract_shape() {
        let mut w = WindowState::new(1_764_288_000_000, 60);
        for (dev, n) in [("door-3", 42), ("door-1", 2)] {
            w.add(
                CountKey {
                    kind: Kind::Access,
                    device: dev.into(),
                    action: "entry".into(),
                    result: "granted".into(),
                },
                n,
            );
        }
        w.add(
            CountKey {
                kind: Kind::Vehicle,
                device: "gate-1".into(),
                action: "exit".into(),
                result: "ok".into(),
            },
            1,
        );
        let site = Site {
            district: Some("富阳区".into()),
            ..Site::default()
        };
        let v: serde_json::Value =
            serde_json::from_slice(&summary_json("gw", &site, &w, 2)).unwrap();
        assert_eq!(v["schema"], "zhian.summary.v1");
        assert_eq!(v["window"]["start"], "2025-11-28T00:00:00Z");
        assert_eq!(v["window"]["secs"], 60);
        assert_eq!(v["rev"], 2);
        assert_eq!(v["site"]["district"], "富阳区");
        let devs: Vec<_> = v["counts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["device"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(devs, ["door-1", "door-3", "gate-1"]);
        assert_eq!(v["counts"][1]["n"], 42);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(1_764_288_001_123), "2025-11-28T00:00:01.123Z");
    }
}
