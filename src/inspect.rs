//! `zhian-gateway inspect --data-dir DIR` (or `--file PATH`): an offline, read-only view of
//! the store. It never changes the file it reads: a file left unclean (kill -9, power cut, a
//! store-error exit) is read through a repaired copy in a temporary dir.

use crate::core::summary::rfc3339_utc;
use crate::store::{Store, StoreError};
use serde::Serialize;
use std::fmt::Write;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Report {
    pub path: String,
    pub file_bytes: u64,
    pub pending_summaries: u64,
    pub pending_alerts: u64,
    pub oldest_pending_window: Option<String>,
    pub open_windows: Vec<String>,
    pub windows_held: u64,
    pub dedup_keys: u64,
    pub raw_events: u64,
    pub dropped_summaries: u64,
    pub dropped_alerts: u64,
    pub dropped_dedup_keys: u64,
    pub evicted_events: u64,
    /// Damaged store files moved aside in the same dir.
    pub quarantined: Vec<crate::store::damage::Quarantined>,
    pub device_states: Vec<StateOut>,
    pub counters: Vec<CounterOut>,
}

#[derive(Debug, Serialize)]
pub struct StateOut {
    pub kind: String,
    pub device: String,
    pub point: String,
    pub value: serde_json::Value,
    pub since: String,
    pub seen: String,
}

#[derive(Debug, Serialize)]
pub struct CounterOut {
    pub kind: String,
    pub device: String,
    pub point: String,
    pub value: i64,
    pub at: String,
}

fn split3(key: &str) -> (String, String, String) {
    let mut p = key.splitn(3, '\0').map(str::to_string);
    (
        p.next().unwrap_or_default(),
        p.next().unwrap_or_default(),
        p.next().unwrap_or_default(),
    )
}

/// Read the store file at `path` without changing it.
pub fn report(path: &Path) -> Result<Report, StoreError> {
    let store = Store::open_file_read_only(path)?;
    let o = store.overview()?;
    Ok(Report {
        path: store.path().display().to_string(),
        file_bytes: o.file_bytes,
        pending_summaries: o.pending_summaries,
        pending_alerts: o.pending_alerts,
        oldest_pending_window: o.oldest_pending_window_ms.map(rfc3339_utc),
        open_windows: store.open_windows()?.into_iter().map(rfc3339_utc).collect(),
        windows_held: store.windows_held()?,
        dedup_keys: o.dedup_keys,
        raw_events: o.raw_events,
        dropped_summaries: o.dropped_summaries,
        dropped_alerts: o.dropped_alerts,
        dropped_dedup_keys: o.dropped_dedup_keys,
        evicted_events: o.evicted_events,
        quarantined: crate::store::damage::quarantined(store.data_dir()),
        device_states: store
            .states()?
            .into_iter()
            .map(|(k, r)| {
                let (kind, device, point) = split3(&k);
                StateOut {
                    kind,
                    device,
                    point,
                    value: r.value.to_json(),
                    since: rfc3339_utc(r.since_ms),
                    seen: rfc3339_utc(r.seen_ms),
                }
            })
            .collect(),
        counters: store
            .counters()?
            .into_iter()
            .map(|(k, r)| {
                let (kind, device, point) = split3(&k);
                CounterOut {
                    kind,
                    device,
                    point,
                    value: r.value,
                    at: rfc3339_utc(r.at_ms),
                }
            })
            .collect(),
    })
}

impl Report {
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "store          {} ({:.1} MiB on disk)",
            self.path,
            self.file_bytes as f64 / 1048576.0
        );
        let _ = writeln!(
            s,
            "pending        {} summaries, {} alerts; oldest pending window {}",
            self.pending_summaries,
            self.pending_alerts,
            self.oldest_pending_window.as_deref().unwrap_or("-")
        );
        let _ = writeln!(
            s,
            "open windows   {}{}",
            self.open_windows.len(),
            self.open_windows
                .first()
                .map(|w| format!(" (oldest {w})"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "windows held   {}", self.windows_held);
        let _ = writeln!(s, "dedup keys     {}", self.dedup_keys);
        let _ = writeln!(s, "raw events     {}", self.raw_events);
        let _ = writeln!(
            s,
            "dropped        {} summaries, {} alerts, {} dedup keys, {} raw events (disk pressure)",
            self.dropped_summaries,
            self.dropped_alerts,
            self.dropped_dedup_keys,
            self.evicted_events
        );
        for q in &self.quarantined {
            let _ = writeln!(
                s,
                "quarantined    {} ({:.1} MiB): inspect --file to read it",
                q.file,
                q.bytes as f64 / 1048576.0
            );
        }
        let _ = writeln!(s, "device states  {}", self.device_states.len());
        for st in &self.device_states {
            let _ = writeln!(
                s,
                "  {} {} {} = {} (since {})",
                st.kind, st.device, st.point, st.value, st.since
            );
        }
        let _ = writeln!(s, "counters       {}", self.counters.len());
        for c in &self.counters {
            let _ = writeln!(
                s,
                "  {} {} {} = {} (at {})",
                c.kind, c.device, c.point, c.value, c.at
            );
        }
        s
    }
}
