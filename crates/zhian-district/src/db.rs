//! PostgreSQL side of the receiver (tokio-postgres; schema migrated by refinery from
//! `migrations/district/`). One transaction per batch of messages; the MQTT side acknowledges the
//! batch's messages only after it commits.
//!
//! Exactness rests on three rules, all inside the batch's transaction:
//! - a summary part is kept until its rev is complete; a complete rev replaces the window's rows
//!   only when it is higher than the rev in force (redelivery and stale revs change nothing);
//! - summaries of one window are serialised across receivers by a transaction-scoped advisory
//!   lock on the window, taken in sorted order per batch (no deadlock between two receivers);
//! - alerts, care notices and daily counts are keyed so a redelivery is a no-op, and a daily
//!   message replaces the day only with a higher rev.

use super::msg::{Msg, Reject, Row};
use std::collections::BTreeMap;
use tokio_postgres::Transaction;

mod embedded {
    refinery::embed_migrations!("../../migrations/district");
}

/// Create or migrate the schema (versioned migrations; each runs once, in order).
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<usize, refinery::Error> {
    let report = embedded::migrations::runner().run_async(client).await?;
    Ok(report.applied_migrations().len())
}

/// Record the receiver's setting for when a gateway counts as silent (`gateway_state.silent`).
pub async fn set_silent_after(
    client: &tokio_postgres::Client,
    secs: u64,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE settings SET value = $1 WHERE key = 'silent_after'",
            &[&format!("{secs} seconds")],
        )
        .await?;
    Ok(())
}

fn ts(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64)
}

fn rows_json(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({"kind": r.kind, "device": r.device, "action": r.action,
                    "result": r.result, "n": r.n})
            })
            .collect(),
    )
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub kept: u64,
    pub rejected: u64,
    /// Summary revs that became the one in force.
    pub windows_set: u64,
}

impl Applied {
    /// Add what another transaction of the same batch did.
    pub fn add(&mut self, o: Applied) {
        self.kept += o.kept;
        self.rejected += o.rejected;
        self.windows_set += o.windows_set;
    }
}

/// Apply a batch in one transaction (the caller commits).
pub async fn apply(
    tx: &Transaction<'_>,
    batch: &[(String, Result<Msg, Reject>)],
) -> Result<Applied, tokio_postgres::Error> {
    let mut a = Applied::default();
    // Every gateway row this batch writes, created if new and locked in sorted order before
    // anything else: status, heartbeat and site updates then take no new row locks, so two
    // receivers' batches never deadlock on them (found by a break-it run: heartbeats of 150
    // gateways in shuffled order deadlocked two receivers' drains).
    let mut gateways: Vec<&str> = batch
        .iter()
        .filter_map(|(_, m)| m.as_ref().ok().map(Msg::gateway))
        .collect();
    gateways.sort_unstable();
    gateways.dedup();
    if !gateways.is_empty() {
        tx.execute(
            "INSERT INTO gateways (gateway) SELECT unnest($1::text[]) ORDER BY 1 ON CONFLICT DO NOTHING",
            &[&gateways],
        )
        .await?;
        tx.execute(
            "SELECT 1 FROM gateways WHERE gateway = ANY($1) ORDER BY gateway FOR UPDATE",
            &[&gateways],
        )
        .await?;
    }
    // Lock every window this batch's summaries touch, in one order.
    let mut keys: Vec<String> = batch
        .iter()
        .filter_map(|(_, m)| match m {
            Ok(Msg::Summary {
                gateway,
                start_ms,
                secs,
                ..
            }) => Some(format!("{gateway}|{start_ms}|{secs}")),
            _ => None,
        })
        .collect();
    keys.sort();
    keys.dedup();
    for k in &keys {
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
            &[k],
        )
        .await?;
    }
    for (topic, m) in batch {
        match m {
            Err(r) => {
                tx.execute(
                    "INSERT INTO rejects (topic, reason, detail) VALUES ($1, $2, $3)",
                    &[
                        &topic.chars().take(300).collect::<String>(),
                        &r.reason,
                        &r.detail,
                    ],
                )
                .await?;
                a.rejected += 1;
            }
            Ok(m) => {
                a.kept += 1;
                if apply_one(tx, m).await? {
                    a.windows_set += 1;
                }
            }
        }
    }
    Ok(a)
}

/// Keep one message the database refused (a value it cannot store) as a reject, in its own
/// transaction, so it is acknowledged and never retried.
pub async fn refuse(
    client: &mut tokio_postgres::Client,
    topic: &str,
    detail: &str,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "INSERT INTO rejects (topic, reason, detail) VALUES ($1, 'database_refused', $2)",
        &[
            &topic.chars().take(300).collect::<String>(),
            &detail.chars().take(500).collect::<String>(),
        ],
    )
    .await?;
    tx.commit().await
}

/// Returns whether a summary rev came into force.
async fn apply_one(tx: &Transaction<'_>, m: &Msg) -> Result<bool, tokio_postgres::Error> {
    // The gateway's row exists and is locked ([`apply`]).
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
                tx.execute(
                    "UPDATE gateways SET site = $2 WHERE gateway = $1 AND site IS DISTINCT FROM $2",
                    &[gateway, site],
                )
                .await?;
            }
            let start = ts(*start_ms);
            let current: Option<i32> = tx
                .query_opt(
                    "SELECT rev FROM windows WHERE gateway = $1 AND window_start = $2 AND window_secs = $3",
                    &[gateway, &start, secs],
                )
                .await?
                .map(|r| r.get(0));
            if current.is_some_and(|c| c >= *rev) {
                return Ok(false); // redelivered, or older than the rev in force
            }
            tx.execute(
                "INSERT INTO summary_parts (gateway, window_start, window_secs, rev, part, parts, counts)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                &[gateway, &start, secs, rev, part, parts, &rows_json(rows)],
            )
            .await?;
            let got = tx
                .query(
                    "SELECT counts FROM summary_parts
                     WHERE gateway = $1 AND window_start = $2 AND window_secs = $3 AND rev = $4
                       AND parts = $5",
                    &[gateway, &start, secs, rev, parts],
                )
                .await?;
            if (got.len() as i32) < *parts {
                return Ok(false); // wait for the other parts
            }
            // Complete: this rev's rows replace the window's.
            let mut sum: BTreeMap<(String, String, String, String), i64> = BTreeMap::new();
            for r in &got {
                let counts: serde_json::Value = r.get(0);
                for c in counts.as_array().into_iter().flatten() {
                    let f = |k: &str| c.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                    let e = sum
                        .entry((f("kind"), f("device"), f("action"), f("result")))
                        .or_insert(0i64);
                    *e = e.saturating_add(c.get("n").and_then(|v| v.as_i64()).unwrap_or(0));
                }
            }
            tx.execute(
                "DELETE FROM window_rows WHERE gateway = $1 AND window_start = $2 AND window_secs = $3",
                &[gateway, &start, secs],
            )
            .await?;
            let insert = tx
                .prepare(
                    "INSERT INTO window_rows (gateway, window_start, window_secs, kind, device, action, result, n)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .await?;
            for ((kind, device, action, result), n) in &sum {
                tx.execute(
                    &insert,
                    &[gateway, &start, secs, kind, device, action, result, n],
                )
                .await?;
            }
            tx.execute(
                "INSERT INTO windows (gateway, window_start, window_secs, rev) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (gateway, window_start, window_secs) DO UPDATE SET rev = EXCLUDED.rev, updated = now()",
                &[gateway, &start, secs, rev],
            )
            .await?;
            tx.execute(
                "DELETE FROM summary_parts
                 WHERE gateway = $1 AND window_start = $2 AND window_secs = $3 AND rev <= $4",
                &[gateway, &start, secs, rev],
            )
            .await?;
            Ok(true)
        }
        Msg::Alert {
            gateway,
            kind,
            device,
            action,
            id,
            ts_ms,
        } => {
            tx.execute(
                "INSERT INTO alerts (gateway, kind, device, action, id, ts) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT DO NOTHING",
                &[gateway, kind, device, action, id, &ts(*ts_ms)],
            )
            .await?;
            Ok(false)
        }
        Msg::Care {
            gateway,
            alias,
            state,
            last_seen_ms,
            silent_secs,
        } => {
            tx.execute(
                "INSERT INTO care_notices (gateway, alias, state, last_seen, silent_secs)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[gateway, alias, state, &last_seen_ms.map(ts), silent_secs],
            )
            .await?;
            Ok(false)
        }
        Msg::Daily {
            gateway,
            site,
            date,
            tz,
            rev,
            access_subjects,
            vehicles,
            key_generations,
            rows,
        } => {
            if !site.is_null() {
                tx.execute(
                    "UPDATE gateways SET site = $2 WHERE gateway = $1 AND site IS DISTINCT FROM $2",
                    &[gateway, site],
                )
                .await?;
            }
            tx.execute(
                "INSERT INTO daily (gateway, date, tz, rev, access_subjects, vehicles, counts,
                                    key_generations)
                 VALUES ($1, $2::text::date, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (gateway, date) DO UPDATE SET tz = EXCLUDED.tz, rev = EXCLUDED.rev,
                   access_subjects = EXCLUDED.access_subjects, vehicles = EXCLUDED.vehicles,
                   counts = EXCLUDED.counts, key_generations = EXCLUDED.key_generations,
                   received = now()
                 WHERE daily.rev < EXCLUDED.rev",
                &[
                    gateway,
                    date,
                    tz,
                    rev,
                    access_subjects,
                    vehicles,
                    &rows_json(rows),
                    key_generations,
                ],
            )
            .await?;
            Ok(false)
        }
        // The state by epoch (contract: "Upstream", `status`; the model is
        // `msg::next_state`): one conditional UPDATE, so two receivers writing one gateway's
        // row serialise on its row lock and each re-checks the rule against the other's
        // committed state. A gateway without epochs (an older version) is kept by arrival,
        // until its first epoch arrives.
        Msg::Status {
            gateway,
            state,
            epoch: Some(epoch),
            ..
        } => {
            tx.execute(
                "UPDATE gateways SET status = $2, epoch = $3, status_at = now()
                 WHERE gateway = $1
                   AND (epoch IS NULL OR $3 > epoch
                        OR ($3 = epoch AND $2 = 'offline' AND status IS DISTINCT FROM 'offline'))",
                &[gateway, state, epoch],
            )
            .await?;
            Ok(false)
        }
        Msg::Status {
            gateway,
            state,
            epoch: None,
            ..
        } => {
            tx.execute(
                "UPDATE gateways SET status = $2, status_at = now() WHERE gateway = $1 AND epoch IS NULL",
                &[gateway, state],
            )
            .await?;
            Ok(false)
        }
        Msg::Heartbeat {
            gateway,
            epoch,
            body,
        } => {
            tx.execute(
                "UPDATE gateways SET last_heartbeat = now(), heartbeat = $2 WHERE gateway = $1",
                &[gateway, body],
            )
            .await?;
            // A heartbeat is sent only while connected: one of a higher epoch than the state
            // in force means online at that epoch (how a receiver on an empty database, which
            // never sees the retained status through a shared subscription, learns it).
            if let Some(epoch) = epoch {
                tx.execute(
                    "UPDATE gateways SET status = 'online', epoch = $2, status_at = now()
                     WHERE gateway = $1 AND (epoch IS NULL OR $2 > epoch)",
                    &[gateway, epoch],
                )
                .await?;
            }
            Ok(false)
        }
    }
}
