//! Summaries as the platform reads them: their rows parsed and checked for shape, and the
//! totals per window and per key the tests compare.

use std::collections::BTreeMap;

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::*;

/// (kind, device, action, result)
pub type Key = (String, String, String, String);
/// Per key, the number of events.
pub type Totals = BTreeMap<Key, u64>;
/// Per (window start in Unix ms, key), the number of events.
pub type WindowTotals = BTreeMap<(i64, Key), u64>;

/// A parsed `zhian.summary.v1` message.
#[derive(Clone, Debug)]
pub struct Summary {
    pub start_ms: i64,
    pub start_text: String,
    pub secs: u64,
    pub rev: u64,
    pub counts: Vec<(Key, u64)>,
    pub json: Value,
    pub at_ms: i64,
}

impl Summary {
    /// Parses a summary; panics (failing the test) on anything that breaks the contract shape.
    pub fn parse(msg: &Msg) -> Summary {
        let json = msg.json();
        let bad = |what: &str| -> ! { panic!("summary {what}: {json}") };
        let start_text = json["window"]["start"]
            .as_str()
            .unwrap_or_else(|| bad("without window.start string"))
            .to_string();
        let start = OffsetDateTime::parse(&start_text, &Rfc3339)
            .unwrap_or_else(|_| bad("with a window.start that is not RFC 3339"));
        let start_ms = i64::try_from(start.unix_timestamp_nanos() / 1_000_000)
            .unwrap_or_else(|_| bad("with an absurd window.start"));
        let secs = json["window"]["secs"]
            .as_u64()
            .unwrap_or_else(|| bad("without integer window.secs"));
        let rev = json["rev"]
            .as_u64()
            .unwrap_or_else(|| bad("without integer rev"));
        let rows = json["counts"]
            .as_array()
            .unwrap_or_else(|| bad("without a counts array"));
        let mut counts = Vec::new();
        for row in rows {
            let field = |name: &str| {
                row[name]
                    .as_str()
                    .unwrap_or_else(|| bad(&format!("row without string {name}")))
                    .to_string()
            };
            let key = (
                field("kind"),
                field("device"),
                field("action"),
                field("result"),
            );
            let n = row["n"]
                .as_u64()
                .unwrap_or_else(|| bad("row without integer n"));
            counts.push((key, n));
        }
        Summary {
            start_ms,
            start_text,
            secs,
            rev,
            counts,
            json: json.clone(),
            at_ms: msg.at_ms,
        }
    }

    /// Sum of n over all rows.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

/// Window totals summed over windows.
pub fn collapse(windows: &WindowTotals) -> Totals {
    let mut out = Totals::new();
    for ((_, key), n) in windows {
        *out.entry(key.clone()).or_default() += n;
    }
    out
}
