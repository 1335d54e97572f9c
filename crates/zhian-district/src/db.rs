//! PostgreSQL side of the receiver (tokio-postgres; schema migrated by refinery from
//! `migrations/district/`, whose V5 documents the partitions and rollups). One transaction per
//! batch of messages; the MQTT side acknowledges the batch's messages only after it commits.
//!
//! A batch is a few array-valued statements, not a few per message ([`super::batch`] folds it
//! into sets): every statement is prepared once per connection ([`Prepared`]) and the ones that
//! do not wait on an answer are sent together (pipelined), so a batch of 1,000 summaries costs
//! about five round trips. In order, inside the batch's transaction:
//! 1. new gateways' rows are created; the rows of gateways this batch updates (statuses,
//!    heartbeats, sites that differ) are locked in sorted order; windows with split revs are
//!    locked (transaction-scoped advisory locks, sorted), their parts stored and read back;
//!    per window the batch's highest complete rev is upserted into `windows`, which keeps it
//!    only when it is new or higher than the rev in force and returns what changed (with the
//!    rev it replaced and the labels the window is counted under). Without split revs all of
//!    this is one round trip;
//! 2. for windows that replaced a rev, the predecessor's rows are deleted (returned, to be
//!    subtracted from the rollups);
//! 3. the new rows, the rollup deltas (hourly, then daily; sorted, so two receivers take the
//!    rollup rows' locks in one order), alerts, care notices, daily counts, states,
//!    heartbeats, sites, fleet configuration reports and serials, occupancy reports, and
//!    rejects, all sent at once.
//!
//! Exactness rests on the same rules as before: a complete rev replaces the window's rows only
//! when higher than the rev in force (the upsert's `WHERE`, re-checked by PostgreSQL after it
//! waits on a row another receiver is writing); the parts of one window are serialised across
//! receivers by its advisory lock; alerts, care notices, daily counts and configuration reports
//! are keyed so a redelivery is a no-op; a gateway's configuration serial only rises; a
//! gateway's occupancy row is replaced only by a report that ranks above it
//! ([`batch::Occupancy::rank`]).
//! The rollups equal a recount of the windows in force (`counts_by_layer_raw`) after any batch.

use super::batch::{self, Candidate, Horizon, InForce, Labels, WinKey};
use super::msg::{Msg, Reject, Row};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_postgres::{Client, Statement, Transaction};

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

fn ts(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn rows_json(rows: &[Row]) -> Value {
    Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({"kind": r.kind, "device": r.device, "action": r.action,
                    "result": r.result, "n": r.n})
            })
            .collect(),
    )
}

fn rows_of(counts: &Value) -> Vec<Row> {
    counts
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            let f = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            Row {
                kind: f("kind"),
                device: f("device"),
                action: f("action"),
                result: f("result"),
                n: c.get("n").and_then(Value::as_i64).unwrap_or(0),
            }
        })
        .collect()
}

fn labels_json(l: &Labels) -> Value {
    serde_json::json!({"district": l.district, "street": l.street, "community": l.community,
        "compound": l.compound})
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

/// The array-valued statements of [`apply`], in the order they are sent.
const SQL: [&str; 22] = [
    // 0 gateways: create
    "INSERT INTO gateways (gateway) SELECT unnest($1::text[]) ORDER BY 1 ON CONFLICT DO NOTHING",
    // 1 gateways: lock, in sorted order, the rows this batch updates (statuses, heartbeats,
    // and sites that differ), so those updates take no new row locks and two receivers'
    // batches never deadlock on them; a batch of summaries alone locks no gateway row, so
    // receivers do not queue behind each other's gateways
    "SELECT 1 FROM gateways g
     LEFT JOIN unnest($2::text[], $3::jsonb[]) AS k(gateway, site) USING (gateway)
     WHERE g.gateway = ANY($4)
       AND (g.gateway = ANY($1) OR (k.gateway IS NOT NULL AND g.site IS DISTINCT FROM k.site))
     ORDER BY g.gateway FOR UPDATE OF g",
    // 2 windows with split revs: advisory locks, in the array's (sorted) order (two receivers
    // holding parts of one rev must not both miss the other's part; a whole rev needs no
    // advisory lock: the windows' upsert waits on the row another receiver is writing)
    "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) FROM unnest($1::text[]) AS k",
    // 3 parts of split revs, unless a rev as high is in force
    "INSERT INTO summary_parts (gateway, window_start, window_secs, rev, part, parts, counts, site)
     SELECT k.* FROM unnest($1::text[], $2::timestamptz[], $3::int[], $4::int[], $5::int[],
                            $6::int[], $7::jsonb[], $8::jsonb[])
          AS k(gateway, window_start, window_secs, rev, part, parts, counts, site)
     WHERE NOT EXISTS (SELECT 1 FROM windows w WHERE w.gateway = k.gateway
                         AND w.window_start = k.window_start AND w.window_secs = k.window_secs
                         AND w.rev >= k.rev)
     ON CONFLICT DO NOTHING",
    // 4 the stored parts of the batch's split revs
    "SELECT p.gateway, p.window_start, p.window_secs, p.rev, p.parts, p.part, p.counts, p.site
     FROM summary_parts p
     JOIN (SELECT DISTINCT * FROM unnest($1::text[], $2::timestamptz[], $3::int[], $4::int[], $5::int[])
           AS k(gateway, window_start, window_secs, rev, parts)) k
       USING (gateway, window_start, window_secs, rev, parts)",
    // 5 the windows' revs: a candidate comes into force when it is new or higher than the rev
    // in force, which it replaces (`replaced_rev`); a window keeps the labels it was first
    // counted under. Returns the windows that changed, with those labels.
    "INSERT INTO windows AS w (gateway, window_start, window_secs, rev, district, street, community, compound)
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int[], $4::int[], $5::text[],
                          $6::text[], $7::text[], $8::text[])
     ON CONFLICT (gateway, window_start, window_secs)
       DO UPDATE SET replaced_rev = w.rev, rev = EXCLUDED.rev, updated = now()
       WHERE w.rev < EXCLUDED.rev
     RETURNING w.gateway, w.window_start, w.window_secs, w.replaced_rev, w.district, w.street,
               w.community, w.compound",
    // 6 the predecessors' rows, deleted and returned (to be subtracted)
    "DELETE FROM window_rows r
     USING unnest($1::text[], $2::timestamptz[], $3::int[]) AS k(gateway, window_start, window_secs)
     WHERE r.gateway = k.gateway AND r.window_start = k.window_start AND r.window_secs = k.window_secs
     RETURNING r.gateway, r.window_start, r.window_secs, r.kind, r.action, r.n",
    // 7 the new rows
    "INSERT INTO window_rows (gateway, window_start, window_secs, kind, device, action, result, n)
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::int[], $4::text[], $5::text[],
                          $6::text[], $7::text[], $8::bigint[])",
    // 8 parts no longer needed
    "DELETE FROM summary_parts p
     USING unnest($1::text[], $2::timestamptz[], $3::int[], $4::int[]) AS k(gateway, window_start, window_secs, rev)
     WHERE p.gateway = k.gateway AND p.window_start = k.window_start
       AND p.window_secs = k.window_secs AND p.rev <= k.rev",
    // 9 hourly rollups, every layer (the hour in the district's time zone)
    "INSERT INTO rollup_hourly AS r (layer, name, parent, hour, kind, action, n)
     SELECT l.layer, l.name, l.parent,
            date_trunc('hour', d.window_start, (SELECT value FROM settings WHERE key = 'timezone')),
            d.kind, d.action, sum(d.n)
     FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::text[], $8::bigint[])
          AS d(window_start, district, street, community, compound, kind, action, n)
     CROSS JOIN LATERAL (VALUES ('compound', d.compound, d.community),
                                ('community', d.community, d.street),
                                ('street', d.street, d.district),
                                ('district', d.district, '')) AS l(layer, name, parent)
     GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
     ON CONFLICT (layer, name, parent, hour, kind, action) DO UPDATE SET n = r.n + EXCLUDED.n",
    // 10 daily rollups, every layer (the district's local date)
    "INSERT INTO rollup_daily AS r (layer, name, parent, day, kind, action, n)
     SELECT l.layer, l.name, l.parent,
            (d.window_start AT TIME ZONE (SELECT value FROM settings WHERE key = 'timezone'))::date,
            d.kind, d.action, sum(d.n)
     FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::text[], $8::bigint[])
          AS d(window_start, district, street, community, compound, kind, action, n)
     CROSS JOIN LATERAL (VALUES ('compound', d.compound, d.community),
                                ('community', d.community, d.street),
                                ('street', d.street, d.district),
                                ('district', d.district, '')) AS l(layer, name, parent)
     GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 1, 2, 3, 4, 5, 6
     ON CONFLICT (layer, name, parent, day, kind, action) DO UPDATE SET n = r.n + EXCLUDED.n",
    // 11 alerts
    "INSERT INTO alerts (gateway, kind, device, action, id, ts)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
     ON CONFLICT DO NOTHING",
    // 12 care notices
    "INSERT INTO care_notices (gateway, alias, state, last_seen, silent_secs)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::bigint[])
     ON CONFLICT DO NOTHING",
    // 13 daily counts: a day is replaced only by a higher rev
    "INSERT INTO daily (gateway, date, tz, rev, access_subjects, vehicles, counts, key_generations)
     SELECT k.gateway, k.date::date, k.tz, k.rev, k.subjects, k.vehicles, k.counts, k.keys
     FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[], $6::bigint[],
                 $7::jsonb[], $8::int[])
          AS k(gateway, date, tz, rev, subjects, vehicles, counts, keys)
     ON CONFLICT (gateway, date) DO UPDATE SET tz = EXCLUDED.tz, rev = EXCLUDED.rev,
       access_subjects = EXCLUDED.access_subjects, vehicles = EXCLUDED.vehicles,
       counts = EXCLUDED.counts, key_generations = EXCLUDED.key_generations, received = now()
     WHERE daily.rev < EXCLUDED.rev",
    // 14 states of gateways older than epochs: by arrival, until their first epoch
    "UPDATE gateways g SET status = k.state, status_at = now()
     FROM unnest($1::text[], $2::text[]) AS k(gateway, state)
     WHERE g.gateway = k.gateway AND g.epoch IS NULL",
    // 15 the state by epoch (contract: \"Upstream\", `status`; the model is `msg::next_state`):
    // one conditional UPDATE, so two receivers writing one gateway's row serialise on its row
    // lock and each re-checks the rule against the other's committed state
    "UPDATE gateways g SET status = k.state, epoch = k.epoch, status_at = now()
     FROM unnest($1::text[], $2::text[], $3::bigint[]) AS k(gateway, state, epoch)
     WHERE g.gateway = k.gateway
       AND (g.epoch IS NULL OR k.epoch > g.epoch
            OR (k.epoch = g.epoch AND k.state = 'offline' AND g.status IS DISTINCT FROM 'offline'))",
    // 16 heartbeats
    "UPDATE gateways g SET last_heartbeat = now(), heartbeat = k.body
     FROM unnest($1::text[], $2::jsonb[]) AS k(gateway, body) WHERE g.gateway = k.gateway",
    // 17 sites
    "UPDATE gateways g SET site = k.site
     FROM unnest($1::text[], $2::jsonb[]) AS k(gateway, site)
     WHERE g.gateway = k.gateway AND g.site IS DISTINCT FROM k.site",
    // 18 rejects
    "INSERT INTO rejects (topic, reason, detail)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[])",
    // 19 fleet configuration reports (V6): one per (gateway, serial, state), the first kept, so
    // a report the box republishes after a reconnect is a no-op; without the box's `at`, the
    // time of receipt
    "INSERT INTO config_reports (gateway, serial, state, reason, config_hash, at)
     SELECT k.gateway, k.serial, k.state, k.reason, k.config_hash, coalesce(k.at, now())
     FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::timestamptz[])
          AS k(gateway, serial, state, reason, config_hash, at)
     ON CONFLICT DO NOTHING",
    // 20 the configuration serial in force: the highest reported `applied`, never lowered
    "UPDATE gateways g SET config_serial = k.serial
     FROM unnest($1::text[], $2::bigint[]) AS k(gateway, serial)
     WHERE g.gateway = k.gateway AND (g.config_serial IS NULL OR g.config_serial < k.serial)",
    // 21 occupancy (V7): per gateway the latest report, replaced only by one that ranks above
    // it (`batch::Occupancy::rank`: `at`, then the figures, then the labels in byte order), so
    // a redelivered or late older report is a no-op and the order two receivers commit in does
    // not matter; one row per gateway in the (sorted) arrays
    "INSERT INTO occupancy AS o (gateway, at, inside, capacity, long_stay, missed_exits,
                                 district, street, community, compound)
     SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::bigint[], $5::bigint[],
                          $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[])
     ON CONFLICT (gateway) DO UPDATE SET at = EXCLUDED.at, inside = EXCLUDED.inside,
       capacity = EXCLUDED.capacity, long_stay = EXCLUDED.long_stay,
       missed_exits = EXCLUDED.missed_exits, district = EXCLUDED.district,
       street = EXCLUDED.street, community = EXCLUDED.community, compound = EXCLUDED.compound,
       received = now()
     WHERE (o.at, o.inside, coalesce(o.capacity, -1), o.long_stay, o.missed_exits,
            o.district COLLATE \"C\", o.street COLLATE \"C\", o.community COLLATE \"C\",
            o.compound COLLATE \"C\")
         < (EXCLUDED.at, EXCLUDED.inside, coalesce(EXCLUDED.capacity, -1), EXCLUDED.long_stay,
            EXCLUDED.missed_exits, EXCLUDED.district COLLATE \"C\", EXCLUDED.street COLLATE \"C\",
            EXCLUDED.community COLLATE \"C\", EXCLUDED.compound COLLATE \"C\")",
];

/// [`SQL`], prepared on one connection (prepare again after a reconnect).
pub struct Prepared(Vec<Statement>);

impl Prepared {
    /// Prepare every statement (pipelined: one round trip).
    pub async fn new(client: &Client) -> Result<Prepared, tokio_postgres::Error> {
        let all = futures_util::future::join_all(SQL.iter().map(|s| client.prepare(s))).await;
        Ok(Prepared(all.into_iter().collect::<Result<_, _>>()?))
    }
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

/// Send `calls` together (pipelined, in order) and wait for all; the first error in order is
/// the cause (the ones after it are "transaction aborted"). `join_all` polls up to 30 futures
/// in order, so each statement is sent in order on the first poll (tokio-postgres sends a
/// request when its future is first polled).
async fn pipelined(calls: Vec<Pending<'_>>) -> Result<(), tokio_postgres::Error> {
    debug_assert!(calls.len() <= 30, "join_all keeps order only up to 30");
    for r in futures_util::future::join_all(calls).await {
        r?;
    }
    Ok(())
}

/// Unix ms of each window key's start.
fn key_arrays(keys: &[&WinKey]) -> (Vec<String>, Vec<SystemTime>, Vec<i32>) {
    (
        keys.iter().map(|k| k.0.clone()).collect(),
        keys.iter().map(|k| ts(k.1)).collect(),
        keys.iter().map(|k| k.2).collect(),
    )
}

/// Apply a batch in one transaction (the caller commits). Messages outside `horizon` become
/// `outside_retention` rejects.
pub async fn apply(
    tx: &Transaction<'_>,
    st: &Prepared,
    batch: &[(String, Result<Msg, Reject>)],
    horizon: Horizon,
) -> Result<Applied, tokio_postgres::Error> {
    let s = batch::split(batch, horizon);
    let q = &st.0;
    let mut a = Applied {
        kept: s.kept,
        rejected: s.rejects.len() as u64,
        windows_set: 0,
    };

    // 1. Locks and parts (one round trip); without split revs, the windows' upsert too.
    let mut lock_keys: Vec<String> = s
        .parts
        .iter()
        .map(|p| format!("{}|{}|{}", p.key.0, p.key.1, p.key.2))
        .collect();
    lock_keys.sort();
    lock_keys.dedup();
    let (site_g, site_v): (Vec<&str>, Vec<&Value>) = s.sites.iter().copied().unzip();
    let updated = &s.updated;
    let pk: Vec<&WinKey> = s.parts.iter().map(|p| &p.key).collect();
    let (pg_, pt, ps) = key_arrays(&pk);
    let p_rev: Vec<i32> = s.parts.iter().map(|p| p.rev).collect();
    let p_part: Vec<i32> = s.parts.iter().map(|p| p.part).collect();
    let p_parts: Vec<i32> = s.parts.iter().map(|p| p.parts).collect();
    let p_counts: Vec<Value> = s.parts.iter().map(|p| rows_json(&p.rows)).collect();
    let p_site: Vec<Value> = s.parts.iter().map(|p| labels_json(&p.labels)).collect();
    let gws = &s.gateways;
    let have_gw = !gws.is_empty();
    let have_win = !lock_keys.is_empty();
    let have_parts = !s.parts.is_empty();
    // Per window the batch's highest single-part rev (split revs join after their parts).
    let mut best = batch::best(s.whole.clone());
    let early = WinArrays::of(&best);
    let (parts_rows, early_rows) = {
        let gw_insert = async {
            if have_gw {
                tx.execute(&q[0], &[gws]).await
            } else {
                Ok(0)
            }
        };
        let gw_lock = async {
            if have_gw {
                tx.query(&q[1], &[updated, &site_g, &site_v, gws])
                    .await
                    .map(|r| r.len() as u64)
            } else {
                Ok(0)
            }
        };
        let win_lock = async {
            if have_win {
                tx.query(&q[2], &[&lock_keys]).await.map(|r| r.len() as u64)
            } else {
                Ok(0)
            }
        };
        let parts_insert = async {
            if have_parts {
                tx.execute(
                    &q[3],
                    &[
                        &pg_, &pt, &ps, &p_rev, &p_part, &p_parts, &p_counts, &p_site,
                    ],
                )
                .await
            } else {
                Ok(0)
            }
        };
        let parts_fetch = async {
            if have_parts {
                tx.query(&q[4], &[&pg_, &pt, &ps, &p_rev, &p_parts]).await
            } else {
                Ok(Vec::new())
            }
        };
        let upsert = async {
            if !have_parts && !early.g.is_empty() {
                early.upsert(tx, &q[5]).await
            } else {
                Ok(Vec::new())
            }
        };
        // `biased`: polled, so sent, in this order on the first poll; the server runs them in
        // that order and answers in it.
        let (r0, r1, r2, r3, r4, r5) =
            tokio::join!(biased; gw_insert, gw_lock, win_lock, parts_insert, parts_fetch, upsert);
        r0?;
        r1?;
        r2?;
        r3?;
        (r4?, r5?)
    };
    let changed = if have_parts {
        // Complete split revs join the candidates; then the windows' upsert.
        let mut stored = batch::StoredParts::new();
        for r in &parts_rows {
            let g: String = r.get(0);
            let key = (g.clone(), ms(r.get(1)), r.get(2));
            let site: Option<Value> = r.get(7);
            stored.entry((key, r.get(3), r.get(4))).or_default().push((
                r.get(5),
                site.filter(|s| !s.is_null()).map(|s| Labels::of(&g, &s)),
                rows_of(&r.get::<_, Value>(6)),
            ));
        }
        let mut candidates = best;
        candidates.extend(batch::complete(stored));
        best = batch::best(candidates);
        let all = WinArrays::of(&best);
        if all.g.is_empty() {
            Vec::new()
        } else {
            all.upsert(tx, &q[5]).await?
        }
    } else {
        early_rows
    };

    // The windows that changed: which replaced a rev, under which labels.
    let mut in_force: HashMap<WinKey, InForce> = HashMap::new();
    for r in &changed {
        in_force.insert(
            (r.get(0), ms(r.get(1)), r.get(2)),
            InForce {
                rev: r.get::<_, Option<i32>>(3).unwrap_or(-1),
                labels: Labels {
                    district: r.get(4),
                    street: r.get(5),
                    community: r.get(6),
                    compound: r.get(7),
                },
            },
        );
    }
    let winners: Vec<Candidate> = best
        .into_iter()
        .filter_map(|mut c| {
            let f = in_force.get(&c.key)?;
            c.labels = f.labels.clone();
            Some(c)
        })
        .collect();
    a.windows_set = winners.len() as u64;

    // 2. The predecessors' rows, deleted and returned (only for windows that replaced a rev).
    let mut deltas = batch::Deltas::default();
    let replaced: Vec<&WinKey> = winners
        .iter()
        .filter(|c| in_force.get(&c.key).is_some_and(|f| f.rev >= 0))
        .map(|c| &c.key)
        .collect();
    if !replaced.is_empty() {
        let (g, t, sec) = key_arrays(&replaced);
        for r in tx.query(&q[6], &[&g, &t, &sec]).await? {
            let key: WinKey = (r.get(0), ms(r.get(1)), r.get(2));
            if let Some(f) = in_force.get(&key) {
                let (kind, action): (&str, &str) = (r.get(3), r.get(4));
                deltas.add(
                    batch::slot(key.1),
                    &f.labels,
                    kind,
                    action,
                    -r.get::<_, i64>(5),
                );
            }
        }
    }

    // 3. Everything else, sent together.
    let mut rows = RowArrays::default();
    for c in &winners {
        for r in &c.rows {
            rows.push(&c.key, r);
            deltas.add(batch::slot(c.key.1), &c.labels, &r.kind, &r.action, r.n);
        }
    }
    let win = WinArrays::of(&winners);
    let mut d = DeltaArrays::default();
    for ((start, l, kind, action), n) in deltas.nonzero() {
        d.push(*start, l, kind, action, n);
    }
    let al = AlertArrays::of(&s.alerts);
    let care = CareArrays::of(&s.care);
    let daily = DailyArrays::of(&s.daily);
    let (el_g, el_s): (Vec<&str>, Vec<&str>) = s.epochless.iter().copied().unzip();
    let st_g: Vec<&str> = s.states.iter().map(|x| x.0).collect();
    let st_s: Vec<&str> = s
        .states
        .iter()
        .map(|x| if x.1.online { "online" } else { "offline" })
        .collect();
    let st_e: Vec<i64> = s.states.iter().map(|x| x.1.epoch).collect();
    let hb_g: Vec<&str> = s.heartbeats.iter().map(|x| x.0).collect();
    let hb_b: Vec<&Value> = s.heartbeats.iter().map(|x| x.1).collect();
    let si_g: Vec<&str> = s.sites.iter().map(|x| x.0).collect();
    let si_s: Vec<&Value> = s.sites.iter().map(|x| x.1).collect();
    let rj_t: Vec<String> = s
        .rejects
        .iter()
        .map(|r| r.0.chars().take(300).collect())
        .collect();
    let rj_r: Vec<&str> = s.rejects.iter().map(|r| r.1).collect();
    let rj_d: Vec<&str> = s.rejects.iter().map(|r| r.2.as_str()).collect();
    let cfg = ConfigArrays::of(&s.config_reports);
    let (cs_g, cs_n): (Vec<&str>, Vec<i64>) = s.config_serials.iter().copied().unzip();
    let occ = OccupancyArrays::of(&s.occupancy);

    let (rows, win, al, care, daily) = (&rows, &win, &al, &care, &daily);
    let (el_g, el_s, st_g, st_s, st_e) = (&el_g, &el_s, &st_g, &st_s, &st_e);
    let (hb_g, hb_b, si_g, si_s) = (&hb_g, &hb_b, &si_g, &si_s);
    let (rj_t, rj_r, rj_d) = (&rj_t, &rj_r, &rj_d);
    let (cfg, cs_g, cs_n, occ) = (&cfg, &cs_g, &cs_n, &occ);
    let mut calls: Vec<Pending<'_>> = Vec::new();
    if !win.g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(
                &q[7],
                &[
                    &rows.g,
                    &rows.t,
                    &rows.s,
                    &rows.kind,
                    &rows.device,
                    &rows.action,
                    &rows.result,
                    &rows.n,
                ],
            )
            .await
        }));
        calls.push(Box::pin(async move {
            tx.execute(&q[8], &[&win.g, &win.t, &win.s, &win.rev]).await
        }));
    }
    if !d.t.is_empty() {
        for i in [9, 10] {
            let (q, d) = (&q[i], &d);
            calls.push(Box::pin(async move {
                tx.execute(
                    q,
                    &[
                        &d.t,
                        &d.district,
                        &d.street,
                        &d.community,
                        &d.compound,
                        &d.kind,
                        &d.action,
                        &d.n,
                    ],
                )
                .await
            }));
        }
    }
    if !al.g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(
                &q[11],
                &[&al.g, &al.kind, &al.device, &al.action, &al.id, &al.ts],
            )
            .await
        }));
    }
    if !care.g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(
                &q[12],
                &[
                    &care.g,
                    &care.alias,
                    &care.state,
                    &care.last_seen,
                    &care.silent,
                ],
            )
            .await
        }));
    }
    if !daily.g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(
                &q[13],
                &[
                    &daily.g,
                    &daily.date,
                    &daily.tz,
                    &daily.rev,
                    &daily.subjects,
                    &daily.vehicles,
                    &daily.counts,
                    &daily.keys,
                ],
            )
            .await
        }));
    }
    if !el_g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(&q[14], &[&el_g, &el_s]).await
        }));
    }
    if !st_g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(&q[15], &[&st_g, &st_s, &st_e]).await
        }));
    }
    if !hb_g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(&q[16], &[&hb_g, &hb_b]).await
        }));
    }
    if !si_g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(&q[17], &[&si_g, &si_s]).await
        }));
    }
    if !cfg.g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(
                &q[19],
                &[
                    &cfg.g,
                    &cfg.serial,
                    &cfg.state,
                    &cfg.reason,
                    &cfg.hash,
                    &cfg.at,
                ],
            )
            .await
        }));
    }
    if !cs_g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(&q[20], &[&cs_g, &cs_n]).await
        }));
    }
    if !occ.g.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(
                &q[21],
                &[
                    &occ.g,
                    &occ.at,
                    &occ.inside,
                    &occ.capacity,
                    &occ.long_stay,
                    &occ.missed_exits,
                    &occ.district,
                    &occ.street,
                    &occ.community,
                    &occ.compound,
                ],
            )
            .await
        }));
    }
    if !rj_t.is_empty() {
        calls.push(Box::pin(async move {
            tx.execute(&q[18], &[&rj_t, &rj_r, &rj_d]).await
        }));
    }
    pipelined(calls).await?;
    Ok(a)
}

#[derive(Default)]
struct RowArrays {
    g: Vec<String>,
    t: Vec<SystemTime>,
    s: Vec<i32>,
    kind: Vec<String>,
    device: Vec<String>,
    action: Vec<String>,
    result: Vec<String>,
    n: Vec<i64>,
}

impl RowArrays {
    fn push(&mut self, k: &WinKey, r: &Row) {
        self.g.push(k.0.clone());
        self.t.push(ts(k.1));
        self.s.push(k.2);
        self.kind.push(r.kind.clone());
        self.device.push(r.device.clone());
        self.action.push(r.action.clone());
        self.result.push(r.result.clone());
        self.n.push(r.n);
    }
}

#[derive(Default)]
struct WinArrays {
    g: Vec<String>,
    t: Vec<SystemTime>,
    s: Vec<i32>,
    rev: Vec<i32>,
    district: Vec<String>,
    street: Vec<String>,
    community: Vec<String>,
    compound: Vec<String>,
}

impl WinArrays {
    fn of(cs: &[Candidate]) -> Self {
        let mut x = WinArrays::default();
        for c in cs {
            x.push(c);
        }
        x
    }

    /// The windows' upsert ([`SQL`] 5): the rows that changed.
    async fn upsert(
        &self,
        tx: &Transaction<'_>,
        st: &Statement,
    ) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        tx.query(
            st,
            &[
                &self.g,
                &self.t,
                &self.s,
                &self.rev,
                &self.district,
                &self.street,
                &self.community,
                &self.compound,
            ],
        )
        .await
    }

    fn push(&mut self, c: &Candidate) {
        self.g.push(c.key.0.clone());
        self.t.push(ts(c.key.1));
        self.s.push(c.key.2);
        self.rev.push(c.rev);
        self.district.push(c.labels.district.clone());
        self.street.push(c.labels.street.clone());
        self.community.push(c.labels.community.clone());
        self.compound.push(c.labels.compound.clone());
    }
}

#[derive(Default)]
struct DeltaArrays {
    t: Vec<SystemTime>,
    district: Vec<String>,
    street: Vec<String>,
    community: Vec<String>,
    compound: Vec<String>,
    kind: Vec<String>,
    action: Vec<String>,
    n: Vec<i64>,
}

impl DeltaArrays {
    fn push(&mut self, start_ms: i64, l: &Labels, kind: &str, action: &str, n: i64) {
        self.t.push(ts(start_ms));
        self.district.push(l.district.clone());
        self.street.push(l.street.clone());
        self.community.push(l.community.clone());
        self.compound.push(l.compound.clone());
        self.kind.push(kind.into());
        self.action.push(action.into());
        self.n.push(n);
    }
}

#[derive(Default)]
struct AlertArrays<'a> {
    g: Vec<&'a str>,
    kind: Vec<&'a str>,
    device: Vec<&'a str>,
    action: Vec<&'a str>,
    id: Vec<&'a str>,
    ts: Vec<SystemTime>,
}

impl<'a> AlertArrays<'a> {
    fn of(alerts: &[batch::Alert<'a>]) -> Self {
        let mut x = AlertArrays::default();
        for al in alerts {
            x.g.push(al.gateway);
            x.kind.push(al.kind);
            x.device.push(al.device);
            x.action.push(al.action);
            x.id.push(al.id);
            x.ts.push(ts(al.ts_ms));
        }
        x
    }
}

#[derive(Default)]
struct CareArrays<'a> {
    g: Vec<&'a str>,
    alias: Vec<&'a str>,
    state: Vec<&'a str>,
    last_seen: Vec<Option<SystemTime>>,
    silent: Vec<i64>,
}

impl<'a> CareArrays<'a> {
    fn of(care: &[&'a Msg]) -> Self {
        let mut x = CareArrays::default();
        for m in care {
            if let Msg::Care {
                gateway,
                alias,
                state,
                last_seen_ms,
                silent_secs,
            } = m
            {
                x.g.push(gateway);
                x.alias.push(alias);
                x.state.push(state);
                x.last_seen.push(last_seen_ms.map(ts));
                x.silent.push(*silent_secs);
            }
        }
        x
    }
}

#[derive(Default)]
struct DailyArrays<'a> {
    g: Vec<&'a str>,
    date: Vec<&'a str>,
    tz: Vec<&'a str>,
    rev: Vec<i32>,
    subjects: Vec<Option<i64>>,
    vehicles: Vec<Option<i64>>,
    counts: Vec<Value>,
    keys: Vec<Option<i32>>,
}

impl<'a> DailyArrays<'a> {
    fn of(daily: &[&'a Msg]) -> Self {
        let mut x = DailyArrays::default();
        for m in daily {
            if let Msg::Daily {
                gateway,
                date,
                tz,
                rev,
                access_subjects,
                vehicles,
                key_generations,
                rows,
                ..
            } = m
            {
                x.g.push(gateway);
                x.date.push(date);
                x.tz.push(tz);
                x.rev.push(*rev);
                x.subjects.push(*access_subjects);
                x.vehicles.push(*vehicles);
                x.counts.push(rows_json(rows));
                x.keys.push(*key_generations);
            }
        }
        x
    }
}

#[derive(Default)]
struct ConfigArrays<'a> {
    g: Vec<&'a str>,
    serial: Vec<i64>,
    state: Vec<&'static str>,
    reason: Vec<Option<&'a str>>,
    hash: Vec<&'a str>,
    at: Vec<Option<SystemTime>>,
}

impl<'a> ConfigArrays<'a> {
    fn of(reports: &[batch::ConfigReport<'a>]) -> Self {
        let mut x = ConfigArrays::default();
        for r in reports {
            x.g.push(r.gateway);
            x.serial.push(r.serial);
            x.state.push(r.state.as_str());
            x.reason.push(r.reason);
            x.hash.push(r.config_hash);
            x.at.push(r.at_ms.map(ts));
        }
        x
    }
}

#[derive(Default)]
struct OccupancyArrays<'a> {
    g: Vec<&'a str>,
    at: Vec<SystemTime>,
    inside: Vec<i64>,
    capacity: Vec<Option<i64>>,
    long_stay: Vec<i64>,
    missed_exits: Vec<i64>,
    district: Vec<&'a str>,
    street: Vec<&'a str>,
    community: Vec<&'a str>,
    compound: Vec<&'a str>,
}

impl<'a> OccupancyArrays<'a> {
    fn of(reports: &'a [batch::Occupancy<'a>]) -> Self {
        let mut x = OccupancyArrays::default();
        for o in reports {
            x.g.push(o.gateway);
            x.at.push(ts(o.at_ms));
            x.inside.push(o.inside);
            x.capacity.push(o.capacity);
            x.long_stay.push(o.long_stay);
            x.missed_exits.push(o.missed_exits);
            x.district.push(&o.labels.district);
            x.street.push(&o.labels.street);
            x.community.push(&o.labels.community);
            x.compound.push(&o.labels.compound);
        }
        x
    }
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
