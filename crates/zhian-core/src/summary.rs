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

/// Site labels copied into every summary: the protocol's type (contract: "The five layers").
pub use zhian_proto::Site;

/// RFC 3339 UTC with a `Z`, milliseconds only when not whole seconds (the protocol's format).
pub use zhian_proto::rfc3339_utc;

use zhian_proto::{Count, Message, Summary, SummaryV1, Timestamp, Window};

/// The wire row of a count.
fn count_out(k: &CountKey, n: u64) -> Count {
    Count {
        kind: k.kind.as_str().to_string(),
        device: k.device.clone(),
        action: k.action.clone(),
        result: k.result.clone(),
        n,
    }
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
    let rows: Vec<Count> = w
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| count_out(k, *n))
        .collect();
    let head = Head {
        gateway,
        site,
        window: Window {
            start: Timestamp(w.start_ms),
            secs: w.secs,
        },
        rev,
    };
    chunked(&head, rows, max_bytes)
        .into_iter()
        .map(|p| p.payload)
        .collect()
}

/// What every part of one summary rev carries besides its rows.
struct Head<'a> {
    gateway: &'a str,
    site: &'a Site,
    window: Window,
    rev: u32,
}

impl Head<'_> {
    fn render(&self, counts: Vec<Count>, part: Option<(usize, usize)>) -> Vec<u8> {
        Summary {
            schema: SummaryV1,
            gateway: self.gateway.to_string(),
            site: self.site.clone(),
            window: self.window,
            rev: self.rev,
            part: part.map(|p| p.0 as u32),
            parts: part.map(|p| p.1 as u32),
            counts,
        }
        .to_bytes()
    }
}

/// One payload of a summary rev and how many rows it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryPart {
    pub payload: Vec<u8>,
    pub rows: usize,
}

/// `rows` (sorted) as one payload when it fits `max_bytes`, else as parts `1..=n` of `n`, each
/// at most `max_bytes` unless a single row alone is larger (it then travels alone).
fn chunked(head: &Head, rows: Vec<Count>, max_bytes: usize) -> Vec<SummaryPart> {
    let all = rows.len();
    let whole = head.render(rows.clone(), None);
    if whole.len() <= max_bytes {
        return vec![SummaryPart {
            payload: whole,
            rows: all,
        }];
    }
    // The envelope of a part with the widest part numbers, and each row's bytes (plus a comma).
    let envelope = head.render(Vec::new(), Some((all, all))).len();
    let budget = max_bytes.saturating_sub(envelope).max(1);
    let mut chunks: Vec<Vec<Count>> = vec![Vec::new()];
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
    if n == 1 {
        // One row too large for any part: it goes whole, as it is.
        return vec![SummaryPart {
            payload: whole,
            rows: all,
        }];
    }
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| SummaryPart {
            rows: c.len(),
            payload: head.render(c, Some((i + 1, n))),
        })
        .collect()
}

/// Why payloads cannot be split again as one summary rev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResplitError {
    /// Not a `zhian.summary.v1` payload (or not JSON).
    NotASummary(String),
    /// Not exactly the parts `1..=n` of `n` of one window and rev (or one whole summary).
    NotOneRev(String),
}

impl std::fmt::Display for ResplitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResplitError::NotASummary(e) => write!(f, "not a summary: {e}"),
            ResplitError::NotOneRev(e) => write!(f, "not one complete rev: {e}"),
        }
    }
}

/// The `"part"`/`"parts"` numbers of a summary payload (`None` for a whole summary or anything
/// that is not a summary).
pub fn summary_part_of(payload: &[u8]) -> Option<(usize, usize)> {
    #[derive(Deserialize)]
    struct PartOnly {
        part: Option<usize>,
        parts: Option<usize>,
    }
    let p: PartOnly = serde_json::from_slice(payload).ok()?;
    Some((p.part?, p.parts?))
}

/// Split one summary rev again under `max_bytes`: `payloads` are either one whole summary or
/// all the parts `1..=n` of `n` of one window and rev (in any order), as [`summary_parts`] made
/// them. Their rows are merged (they must be disjoint) and cut anew exactly as
/// [`summary_parts`] would cut them: one payload without part fields when the rows fit, else
/// parts `1..=m` of `m`, each at most `max_bytes` unless it holds a single row. For the
/// forwarder, which learns a smaller packet limit from the district broker than the one the
/// summary was issued under (contract: "Upstream").
pub fn resplit(payloads: &[&[u8]], max_bytes: usize) -> Result<Vec<SummaryPart>, ResplitError> {
    let mut docs = Vec::with_capacity(payloads.len());
    for p in payloads {
        let d: Summary =
            serde_json::from_slice(p).map_err(|e| ResplitError::NotASummary(e.to_string()))?;
        docs.push(d);
    }
    let Some(first) = docs.first() else {
        return Err(ResplitError::NotOneRev("no payload".into()));
    };
    let n = docs.len();
    let mut numbers: Vec<usize> = Vec::with_capacity(n);
    for d in &docs {
        if d.gateway != first.gateway
            || d.site != first.site
            || d.window != first.window
            || d.rev != first.rev
        {
            return Err(ResplitError::NotOneRev(
                "payloads of different windows or revs".into(),
            ));
        }
        match (d.part, d.parts) {
            (None, None) if n == 1 => numbers.push(1),
            (Some(p), Some(of)) if of as usize == n => numbers.push(p as usize),
            (p, of) => {
                return Err(ResplitError::NotOneRev(format!(
                    "part {p:?} of {of:?} among {n} payloads"
                )))
            }
        }
    }
    numbers.sort_unstable();
    if numbers != (1..=n).collect::<Vec<_>>() {
        return Err(ResplitError::NotOneRev(format!("parts {numbers:?} of {n}")));
    }
    let mut rows: Vec<Count> = docs
        .iter()
        .flat_map(|d| d.counts.iter())
        .filter(|c| c.n > 0)
        .cloned()
        .collect();
    fn key(c: &Count) -> (&str, &str, &str, &str) {
        (&c.kind, &c.device, &c.action, &c.result)
    }
    rows.sort_by(|a, b| key(a).cmp(&key(b)));
    if rows.windows(2).any(|w| key(&w[0]) == key(&w[1])) {
        return Err(ResplitError::NotOneRev("a row in two parts".into()));
    }
    let head = Head {
        gateway: &first.gateway,
        site: &first.site,
        window: first.window,
        rev: first.rev,
    };
    Ok(chunked(&head, rows, max_bytes))
}

/// The `zhian.alert.v1` payload for a camera incident. Carries no subject.
pub fn alert_json(gateway: &str, e: &Event) -> Vec<u8> {
    zhian_proto::Alert {
        schema: zhian_proto::AlertV1,
        gateway: gateway.to_string(),
        kind: e.kind.as_str().to_string(),
        device: e.device.clone(),
        action: e.action.clone(),
        id: e.id.clone(),
        ts: Timestamp(e.ts_ms),
    }
    .to_bytes()
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

    fn window_of(devices: usize, long: bool) -> WindowState {
        let mut w = WindowState::new(1_800_000_000_000, 10);
        for d in 0..devices {
            let word = if long { "x".repeat(64) } else { "entry".into() };
            w.add(
                CountKey {
                    kind: Kind::Access,
                    device: format!("door-{d:04}"),
                    action: word.clone(),
                    result: word,
                },
                d as u64 + 1,
            );
        }
        w
    }

    /// Rows of `parts` (one rev), checked as the contract wants them: every part within `max`
    /// unless it holds one row, part numbers `1..=m` of `m`, rows disjoint. Returns the rows.
    fn check_parts(parts: &[SummaryPart], max: usize, rev: u32) -> Vec<(String, u64)> {
        let m = parts.len();
        let mut rows = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            assert!(
                p.payload.len() <= max || p.rows == 1,
                "part {} of {m}",
                i + 1
            );
            assert_eq!(v["rev"], rev);
            if m == 1 {
                assert!(v.get("part").is_none() && v.get("parts").is_none());
            } else {
                assert_eq!(v["part"], i + 1);
                assert_eq!(v["parts"], m);
            }
            let counts = v["counts"].as_array().unwrap();
            assert_eq!(counts.len(), p.rows);
            for c in counts {
                rows.push((
                    c["device"].as_str().unwrap().to_string(),
                    c["n"].as_u64().unwrap(),
                ));
            }
        }
        let mut keys: Vec<_> = rows.iter().map(|r| r.0.clone()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), rows.len(), "rows disjoint");
        rows
    }

    #[test]
    fn a_summary_splits_again_under_a_smaller_limit_as_it_would_have_been_issued() {
        let w = window_of(900, false);
        let site = Site {
            district: Some("富阳区".into()),
            ..Site::default()
        };
        let whole = summary_json("gw", &site, &w, 2);
        // A whole summary, split again, is what issuing it under the smaller limit gives.
        let again = resplit(&[&whole], 30_000).unwrap();
        let issued = summary_parts("gw", &site, &w, 2, 30_000);
        assert!(again.len() >= 3);
        assert_eq!(
            again.iter().map(|p| p.payload.clone()).collect::<Vec<_>>(),
            issued
        );
        let rows = check_parts(&again, 30_000, 2);
        assert_eq!(rows.len(), 900);
        // Parts issued under 64 KB, merged and split under 8 KB, in any order.
        let big: Vec<Vec<u8>> = summary_parts("gw", &site, &w, 2, 65_000);
        assert_eq!(big.len(), 2);
        let refs: Vec<&[u8]> = big.iter().rev().map(Vec::as_slice).collect();
        let small = resplit(&refs, 8_000).unwrap();
        assert_eq!(
            small.iter().map(|p| p.payload.clone()).collect::<Vec<_>>(),
            summary_parts("gw", &site, &w, 2, 8_000)
        );
        // And back into one payload when the limit allows it.
        let one = resplit(&refs, usize::MAX).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].payload, whole);
        assert_eq!(one[0].rows, 900);
    }

    #[test]
    fn a_single_row_too_large_goes_whole() {
        let w = window_of(1, true);
        let whole = summary_json("gw", &Site::default(), &w, 0);
        let parts = resplit(&[&whole], 100).unwrap();
        assert_eq!(
            parts,
            vec![SummaryPart {
                payload: whole,
                rows: 1
            }]
        );
        // Two rows under a tiny limit: one row a part, each over the limit.
        let w = window_of(2, true);
        let parts = resplit(&[&summary_json("gw", &Site::default(), &w, 0)], 100).unwrap();
        assert_eq!(parts.len(), 2);
        check_parts(&parts, 100, 0);
    }

    #[test]
    fn only_one_complete_rev_is_split_again() {
        let w = window_of(300, false);
        let parts = summary_parts("gw", &Site::default(), &w, 1, 8_000);
        assert!(parts.len() >= 3);
        assert_eq!(summary_part_of(&parts[1]), Some((2, parts.len())));
        assert_eq!(
            summary_part_of(&summary_json("gw", &Site::default(), &w, 1)),
            None
        );
        // A part missing.
        let some: Vec<&[u8]> = parts[1..].iter().map(Vec::as_slice).collect();
        assert!(matches!(
            resplit(&some, 4_000),
            Err(ResplitError::NotOneRev(_))
        ));
        // A part of another rev.
        let other = summary_parts("gw", &Site::default(), &w, 2, 8_000);
        let mut mixed: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        mixed[0] = &other[0];
        assert!(matches!(
            resplit(&mixed, 4_000),
            Err(ResplitError::NotOneRev(_))
        ));
        // The same part twice.
        let mut twice: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        twice[1] = &parts[0];
        assert!(resplit(&twice, 4_000).is_err());
        // Not a summary.
        assert!(matches!(
            resplit(&[br#"{"schema":"zhian.alert.v1"}"#], 4_000),
            Err(ResplitError::NotASummary(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Whatever the rows and limits: every part within the limit (or a single row), parts
        /// numbered `1..=m` of `m`, rows disjoint and complete, from a whole summary or from
        /// its parts issued under another limit.
        #[test]
        fn resplit_keeps_every_row_once_under_the_limit(
            devices in 1usize..400,
            long in proptest::bool::ANY,
            issued_at in 2_000usize..200_000,
            max in 200usize..100_000,
        ) {
            let w = window_of(devices, long);
            let issued = summary_parts("gw", &Site::default(), &w, 4, issued_at);
            let refs: Vec<&[u8]> = issued.iter().map(Vec::as_slice).collect();
            let parts = resplit(&refs, max).unwrap();
            let mut rows = check_parts(&parts, max, 4);
            rows.sort();
            let mut want: Vec<(String, u64)> = (0..devices)
                .map(|d| (format!("door-{d:04}"), d as u64 + 1))
                .collect();
            want.sort();
            proptest::prop_assert_eq!(rows, want);
        }
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
