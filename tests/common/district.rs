//! The district receiver in tests: its config, process, `/healthz` and `/metrics`, what the
//! database holds, and summary payloads as gateways send them.

use super::pg::Postgres;
use super::{free_port, tail, wait_until};
use serde_json::json;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The district topic prefix the tests use.
pub const DISTRICT_PREFIX: &str = "zhian/district";

/// A receiver config; returns its `/healthz` and `/metrics` port.
pub fn receiver_config(path: &Path, db: &str, broker_port: u16, id: &str) -> u16 {
    receiver_config_with(path, db, broker_port, id, "")
}

/// As [`receiver_config`], with `extra` lines in `[district]`.
pub fn receiver_config_with(path: &Path, db: &str, broker_port: u16, id: &str, extra: &str) -> u16 {
    let status = free_port();
    fs::write(
        path,
        format!(
            "[district]\ndatabase_url = \"{db}\"\nsilent_after = \"30s\"\n\
             rollcall_every = \"1s\"\nstale_after = \"5s\"\n{extra}\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\ntopic_prefix = \"{DISTRICT_PREFIX}\"\n\
             client_id = \"{id}\"\ngroup = \"zhian-district\"\nreconnect_max = \"2s\"\n\
             [status]\nlisten = \"127.0.0.1:{status}\"\n"
        ),
    )
    .unwrap();
    status
}

/// `GET /healthz` on a receiver: (HTTP status, body), or None when it does not answer.
pub fn healthz(port: u16) -> Option<(u16, String)> {
    let r = super::http::http(port, "GET", "/healthz", None).ok()?;
    Some((r.status, r.text()))
}

/// Waits until the receiver on `port` is subscribed and its database takes writes.
pub fn wait_healthy(port: u16, log: &Path) {
    assert!(
        wait_until(Duration::from_secs(60), || healthz(port)
            .is_some_and(|(s, _)| s == 200)),
        "receiver healthy: {:?}\n{}",
        healthz(port),
        tail(log, 30)
    );
}

/// One sample of a receiver's `/metrics` (0 when absent).
pub fn metric(port: u16, series: &str) -> f64 {
    super::http::http(port, "GET", "/metrics", None)
        .ok()
        .and_then(|r| {
            r.text().lines().find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|v| v.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0.0)
}

/// A receiver process, killed when dropped (a failing assertion must not leave it running).
pub struct Receiver(pub Child);

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_receiver(cfg: &Path, log: &Path) -> Receiver {
    Receiver(start_receiver_child(cfg, log))
}

pub fn start_receiver_child(cfg: &Path, log: &Path) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_zhian-gateway"))
        .args(["district", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap()
}

pub fn in_db(pg: &Postgres) -> BTreeMap<(String, String), i64> {
    let rows = pg
        .psql(
            "SELECT gateway, to_char(window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), sum(n)
             FROM window_counts GROUP BY 1, 2",
        )
        .unwrap_or_default();
    rows.lines()
        .filter_map(|l| {
            let mut f = l.split('|');
            Some((
                (f.next()?.to_string(), f.next()?.to_string()),
                f.next()?.parse().ok()?,
            ))
        })
        .collect()
}

pub fn rfc(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000).unwrap();
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
        .replace("+00:00", "Z")
}

/// A summary payload (one part of `parts`, or whole) with `n` events in one row per device.
pub fn summary(
    g: &str,
    start_ms: i64,
    rev: i64,
    part: Option<(i64, i64)>,
    rows: &[(&str, i64)],
) -> Vec<u8> {
    let mut v = json!({"schema": "zhian.summary.v1", "gateway": g,
        "site": {"district": "富阳区", "compound": format!("小区-{g}")},
        "window": {"start": rfc(start_ms), "secs": 60}, "rev": rev,
        "counts": rows.iter().map(|(d, n)| json!({"kind": "access", "device": d, "action": "entry", "result": "granted", "n": n})).collect::<Vec<_>>()});
    if let Some((i, n)) = part {
        v["part"] = json!(i);
        v["parts"] = json!(n);
    }
    serde_json::to_vec(&v).unwrap()
}

/// Rows that differ between the rollups and a recount from raw rows, hourly and daily (the
/// views `counts_hourly_by_layer` vs `counts_hourly_by_layer_raw`, `counts_by_layer` vs
/// `counts_by_layer_raw`): `Some(0)` when they agree.
pub fn rollup_mismatches(pg: &Postgres) -> Option<i64> {
    pg.psql(
        "SELECT (SELECT count(*) FROM (
                   (SELECT * FROM counts_hourly_by_layer EXCEPT ALL SELECT * FROM counts_hourly_by_layer_raw)
                   UNION ALL
                   (SELECT * FROM counts_hourly_by_layer_raw EXCEPT ALL SELECT * FROM counts_hourly_by_layer)) h)
              + (SELECT count(*) FROM (
                   (SELECT * FROM counts_by_layer EXCEPT ALL SELECT * FROM counts_by_layer_raw)
                   UNION ALL
                   (SELECT * FROM counts_by_layer_raw EXCEPT ALL SELECT * FROM counts_by_layer)) d)",
    )
    .and_then(|s| s.trim().parse().ok())
}
