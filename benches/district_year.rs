//! A synthetic year at the district (issue 22): the dashboard's queries on the rollups against
//! the same answers computed from raw rows (the plain views), at a year's scale.
//!
//! In a throwaway PostgreSQL (temp dir, removed at the end) with the migrations V1..V5 applied:
//! - one district (富阳区), 10 streets (街道01..), 30 communities (社区01..; community c in street
//!   c mod 10), BENCH_COMPOUNDS compounds (小区001..; compound g in community g mod 30), one
//!   gateway per compound (`gateways` with `site` and `last_heartbeat`; 2 in 50 silent or
//!   offline);
//! - generated inside PostgreSQL (generate_series, no client-side row loops): the last BENCH_DAYS
//!   local days (the last one is today in Asia/Shanghai, generated whole) as raw data at full
//!   density, a 60 s window per compound per minute (`windows` with labels, `window_rows` at the
//!   real shape: access entry granted on door-1 and door-2, access exit, vehicle entry and exit
//!   on gate-1, a camera intrusion in ~1 window of 10; counts with a day/night rhythm), and
//!   their rollups filled from the plain views (`counts_hourly_by_layer_raw`,
//!   `counts_by_layer_raw`); the year's other days (BENCH_YEAR_DAYS total) as rollups only
//!   (`rollup_hourly` per compound hour, summed up the layers, `rollup_daily` from it);
//! - VACUUM ANALYZE, then rows and bytes per table (all partitions, indexes included) and per
//!   compound-day;
//! - the dashboard's queries timed in one psql session each (`\timing on`, one warm-up, then the
//!   runs; median of psql's own `Time:` lines, no process start in them): (a) today by street,
//!   (b) 30 days by community, (c) one compound's hours this week, against the rollup views
//!   (`counts_by_layer`, `counts_hourly_by_layer`) and against the plain views on the same data;
//!   (d) silent gateways (no plain-view equivalent). The rollup and plain answers to a, b and c
//!   must be equal (the bench panics if not). Then EXPLAIN (ANALYZE, BUFFERS) of a-c on the
//!   rollups.
//!
//! `cargo bench --bench district_year`. Knobs: BENCH_DAYS (raw days, default 30), BENCH_COMPOUNDS
//! (default 150), BENCH_YEAR_DAYS (default 365), BENCH_RUNS (timed runs per rollup query, default
//! 15), BENCH_RAW_RUNS (timed runs per plain-view query, default 5: each is a scan of every raw
//! row), TMPDIR (where the cluster goes). At the defaults the cluster peaks under 12 GB (tables
//! 7-10 GB, WAL up to 2 GB, no temp files; check `df -h` first) and the whole run takes about
//! 10 minutes on 2 cores (generation ~5, the plain views' 18 scans most of the rest). With
//! BENCH_DAYS under 30 (or 7) the ranges of b (and c) shrink to the raw days, so the answers stay
//! comparable.
//! Server settings: PostgreSQL's defaults (work_mem 4MB for the queries) but shared_buffers 1GB
//! and, for the generation only, fsync/full_page_writes off, a large max_wal_size.

#[path = "../tests/common/mod.rs"]
mod common;

use common::free_port;
use common::pg::Postgres;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

const TZ: &str = "Asia/Shanghai";
const MIGRATIONS: [&str; 5] = [
    "V1__init.sql",
    "V2__care_order.sql",
    "V3__epochs_and_receivers.sql",
    "V4__daily_key_generations.sql",
    "V5__layers_partitions.sql",
];
/// The compound whose hours query c reads.
const ONE_COMPOUND: &str = "小区001";

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// psql of the newest installed PostgreSQL (as tests/common/pg.rs finds the server).
fn psql_bin() -> PathBuf {
    let mut v: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL in /usr/lib/postgresql")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("psql").exists())
        .collect();
    v.sort();
    v.pop().expect("psql").join("psql")
}

/// Run `sql` (a script: several statements, psql meta-commands) in one psql session, stopping at
/// the first error. Returns stdout (unaligned, tuples only); panics with psql's stderr.
fn psql(port: u16, sql: &str) -> String {
    let mut child = Command::new(psql_bin())
        .env("PGCONNECT_TIMEOUT", "5")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-U", "zhian", "-d", "postgres", "-X", "-q", "-At"])
        .args(["-v", "ON_ERROR_STOP=1", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run psql");
    let mut stdin = child.stdin.take().unwrap();
    let script = sql.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().expect("psql output");
    let _ = writer.join();
    assert!(
        out.status.success(),
        "psql failed:\n{}\n--- script (head) ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        sql.chars().take(3000).collect::<String>()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run each (name, script) in its own session at the same time; the seconds each took.
fn parallel(port: u16, jobs: &[(&str, String)]) -> Vec<(String, f64)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(name, sql)| {
                s.spawn(move || {
                    let t = Instant::now();
                    psql(port, sql);
                    let secs = t.elapsed().as_secs_f64();
                    println!("  {name}: {secs:.1} s");
                    (name.to_string(), secs)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// `sql` once as a warm-up and `runs` more times in one session under `\timing on`: the timed
/// runs' milliseconds (psql's `Time:` lines) and the warm-up's rows, sorted.
fn time_query(port: u16, sql: &str, runs: usize) -> (Vec<f64>, Vec<String>) {
    let mut script = String::from("\\timing on\n");
    for _ in 0..=runs {
        script.push_str(sql);
        script.push_str(";\n");
    }
    let out = psql(port, &script);
    let mut times = Vec::new();
    let mut first: Option<Vec<String>> = None;
    let mut rows = Vec::new();
    for line in out.lines() {
        if let Some(t) = line.strip_prefix("Time: ") {
            let ms: f64 = t
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or_else(|| panic!("a timing line: {line}"));
            if first.is_none() {
                rows.sort();
                first = Some(std::mem::take(&mut rows));
            } else {
                times.push(ms);
            }
            rows.clear();
        } else if !line.starts_with("Timing is") {
            rows.push(line.to_string());
        }
    }
    assert_eq!(times.len(), runs, "timed runs of {sql}\n{out}");
    (times, first.unwrap_or_default())
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn human(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.2} GB", bytes / 1e9)
    } else if bytes >= 1e6 {
        format!("{:.1} MB", bytes / 1e6)
    } else if bytes >= 1e3 {
        format!("{:.1} kB", bytes / 1e3)
    } else {
        format!("{bytes:.0} B")
    }
}

/// The n-th hash-uniform in [0, 1) of key `k` (SQL).
fn u(k: &str, n: u32) -> String {
    format!("((hashint8({k} + {n}) & 65535) / 65536.0::float8)")
}

fn main() {
    let wall = Instant::now();
    let days = knob("BENCH_DAYS", 30).max(1);
    let compounds = knob("BENCH_COMPOUNDS", 150).max(1);
    let year_days = knob("BENCH_YEAR_DAYS", 365).max(days);
    let runs = knob("BENCH_RUNS", 15).max(1);
    let raw_runs = knob("BENCH_RAW_RUNS", 5).max(1);
    let command = format!(
        "BENCH_DAYS={days} BENCH_COMPOUNDS={compounds} BENCH_YEAR_DAYS={year_days} \
         BENCH_RUNS={runs} BENCH_RAW_RUNS={raw_runs} cargo bench --bench district_year"
    );
    println!("district_year: {command}");

    // The temp dir outlives the server (declared first, dropped last).
    let tmp = tempfile::Builder::new()
        .prefix("district-year-")
        .tempdir()
        .expect("a temp dir");
    let mut pg = Postgres::start(&tmp.path().join("pg"), free_port());
    let port = pg.port;
    psql(
        port,
        "ALTER SYSTEM SET shared_buffers = '1GB';
         ALTER SYSTEM SET maintenance_work_mem = '1GB';
         ALTER SYSTEM SET max_wal_size = '2GB';
         ALTER SYSTEM SET checkpoint_timeout = '30min';
         ALTER SYSTEM SET full_page_writes = off;
         ALTER SYSTEM SET synchronous_commit = off;",
    );
    pg.restart_fast();
    println!("cluster in {} (port {port})", tmp.path().display());

    // Schema, as the receiver applies it: V1..V5 in order.
    let t = Instant::now();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("migrations/district");
    for m in MIGRATIONS {
        let sql = std::fs::read_to_string(dir.join(m)).expect("a migration");
        psql(port, &format!("BEGIN;\n{sql}\nCOMMIT;\n"));
    }
    println!("migrations V1..V5: {:.1} s", t.elapsed().as_secs_f64());

    // The calendar: the last day is today (local), raw days end it, rollup-only days before.
    let cal = psql(
        port,
        &format!(
            "SELECT d, d - {r}, d - {y}, d - {c}, d - {b}
               FROM (SELECT (now() AT TIME ZONE '{TZ}')::date AS d) x",
            r = days - 1,
            y = year_days - 1,
            c = 7.min(days - 1),
            b = 30.min(days),
        ),
    );
    let cal: Vec<&str> = cal.trim().split('|').collect();
    let (last, raw_first, year_first, c_from, b_after) = (cal[0], cal[1], cal[2], cal[3], cal[4]);
    let ts = |d: &str| format!("('{d}'::date::timestamp AT TIME ZONE '{TZ}')");
    let raw_start = ts(raw_first);
    let raw_end = format!("(('{last}'::date + 1)::timestamp AT TIME ZONE '{TZ}')");
    let year_start = ts(year_first);
    println!(
        "year {year_first} .. {last} ({year_days} days): rollups only {year_first} .. {}, raw {raw_first} .. {last} ({days} days), {compounds} compounds",
        if year_days > days { "the day before the raw ones" } else { "(none)" }
    );

    // Compounds, their labels and size; the day/night rhythm per local hour; gateways.
    let t = Instant::now();
    psql(
        port,
        &format!(
            "CREATE SCHEMA bench;
             CREATE TABLE bench.compounds AS
             SELECT g, 'gw-' || to_char(g, 'FM000') AS gateway, '富阳区'::text AS district,
                    '街道' || to_char((g - 1) % 30 % 10 + 1, 'FM00') AS street,
                    '社区' || to_char((g - 1) % 30 + 1, 'FM00') AS community,
                    '小区' || to_char(g, 'FM000') AS compound,
                    (0.5 + (g * 37 % 11) / 10.0)::float8 AS size
             FROM generate_series(1, {compounds}) g;
             -- Busy 07-09 and 17-20, a midday bump, quiet nights (never zero).
             CREATE TABLE bench.rate AS
             SELECT h, (0.08 + 0.92 * greatest(exp(-power(((h + 0.5) - 7.5) / 1.5, 2)),
                                             exp(-power(((h + 0.5) - 18.0) / 2.0, 2)),
                                             0.45 * exp(-power(((h + 0.5) - 12.5) / 2.5, 2))))::float8 AS r
             FROM generate_series(0, 23) h;
             INSERT INTO gateways (gateway, site, status, status_at, last_heartbeat, epoch)
             SELECT gateway,
                    jsonb_build_object('district', district, 'street', street,
                                       'community', community, 'compound', compound),
                    CASE WHEN g % 50 = 17 THEN 'offline' ELSE 'online' END,
                    now() - interval '3 days', now(), 1
             FROM bench.compounds;
             SELECT sum(zhian_ensure_month(m::date, '1970-01-01')) FROM generate_series(
                 date_trunc('month', ('{year_first}'::date - 1)::timestamp),
                 date_trunc('month', ('{last}'::date + 1)::timestamp), interval '1 month') m;"
        ),
    );
    println!(
        "compounds, gateways, month partitions: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Raw days: every compound's window every minute, and its rows.
    let minutes = format!(
        "generate_series({raw_start}, {raw_end} - interval '1 minute', interval '1 minute')"
    );
    let windows_sql = format!(
        "INSERT INTO windows (gateway, window_start, window_secs, rev, updated,
                              district, street, community, compound)
         SELECT c.gateway, m.ts, 60, 0, m.ts + interval '61 seconds',
                c.district, c.street, c.community, c.compound
         FROM {minutes} AS m(ts) CROSS JOIN bench.compounds c;"
    );
    let k = "x.k";
    let rows_sql = format!(
        "SET work_mem = '256MB';
         INSERT INTO window_rows (gateway, window_start, window_secs, kind, device, action, result, n)
         SELECT c.gateway, m.ts, 60, v.kind, v.device, v.action, v.result, v.n
         FROM (SELECT ts, extract(epoch FROM ts)::bigint / 60 AS mi, r.r
                 FROM {minutes} AS ts
                 JOIN bench.rate r ON r.h = extract(hour FROM ts AT TIME ZONE '{TZ}')) m
         CROSS JOIN bench.compounds c
         CROSS JOIN LATERAL (SELECT m.r * c.size AS load, m.mi * 4096 + c.g * 8 AS k) x
         CROSS JOIN LATERAL (VALUES
             ('access', 'door-1', 'entry', 'granted', (1 + floor(x.load * 6 * {u1}))::bigint),
             ('access', 'door-2', 'entry', 'granted', (1 + floor(x.load * 4 * {u2}))::bigint),
             ('access', 'door-1', 'exit', 'granted', (1 + floor(x.load * 8 * {u3}))::bigint),
             ('vehicle', 'gate-1', 'entry', 'ok', (1 + floor(x.load * 3 * {u4}))::bigint),
             ('vehicle', 'gate-1', 'exit', 'ok', (1 + floor(x.load * 3 * {u5}))::bigint),
             ('camera', 'cam-1', 'intrusion', 'ok', CASE WHEN {u6} < 0.1 THEN 1 ELSE 0 END::bigint)
         ) v(kind, device, action, result, n)
         WHERE v.n > 0;",
        u1 = u(k, 1),
        u2 = u(k, 2),
        u3 = u(k, 3),
        u4 = u(k, 4),
        u5 = u(k, 5),
        u6 = u(k, 6),
    );
    // The other days as rollups only: per compound hour (about what 60 such windows sum to),
    // then each layer from the one below, then the days from the hours.
    let rollup_only_sql = format!(
        "SET work_mem = '512MB';
         INSERT INTO rollup_hourly (layer, name, parent, hour, kind, action, n)
         SELECT 'compound', c.compound, c.community, h.hr, v.kind, v.action, v.n
         FROM (SELECT hr, extract(epoch FROM hr)::bigint / 3600 AS hi, r.r
                 FROM generate_series({year_start}, {raw_start} - interval '1 hour',
                                      interval '1 hour') AS hr
                 JOIN bench.rate r ON r.h = extract(hour FROM hr AT TIME ZONE '{TZ}')) h
         CROSS JOIN bench.compounds c
         CROSS JOIN LATERAL (SELECT h.r * c.size AS load, h.hi * 4096 + c.g * 8 AS k) x
         CROSS JOIN LATERAL (VALUES
             ('access', 'entry', round(60 * (1 + x.load * 10 * (0.3 + 0.4 * {u1})))::bigint),
             ('access', 'exit', round(60 * (0.5 + x.load * 8 * (0.3 + 0.4 * {u3})))::bigint),
             ('vehicle', 'entry', round(60 * (0.5 + x.load * 3 * (0.3 + 0.4 * {u4})))::bigint),
             ('vehicle', 'exit', round(60 * (0.5 + x.load * 3 * (0.3 + 0.4 * {u5})))::bigint),
             ('camera', 'intrusion', round(6 * (0.5 + {u6}))::bigint)
         ) v(kind, action, n);
         INSERT INTO rollup_hourly (layer, name, parent, hour, kind, action, n)
         SELECT 'community', r.parent, c.street, r.hour, r.kind, r.action, sum(r.n)
         FROM rollup_hourly r
         JOIN (SELECT DISTINCT community, street FROM bench.compounds) c ON c.community = r.parent
         WHERE r.layer = 'compound' AND r.hour < {raw_start}
         GROUP BY 2, 3, 4, 5, 6;
         INSERT INTO rollup_hourly (layer, name, parent, hour, kind, action, n)
         SELECT 'street', r.parent, '富阳区', r.hour, r.kind, r.action, sum(r.n)
         FROM rollup_hourly r
         WHERE r.layer = 'community' AND r.hour < {raw_start}
         GROUP BY 2, 3, 4, 5, 6;
         INSERT INTO rollup_hourly (layer, name, parent, hour, kind, action, n)
         SELECT 'district', r.parent, '', r.hour, r.kind, r.action, sum(r.n)
         FROM rollup_hourly r
         WHERE r.layer = 'street' AND r.hour < {raw_start}
         GROUP BY 2, 3, 4, 5, 6;
         INSERT INTO rollup_daily (layer, name, parent, day, kind, action, n)
         SELECT layer, name, parent, (hour AT TIME ZONE '{TZ}')::date, kind, action, sum(n)
         FROM rollup_hourly
         WHERE hour >= {year_start} AND hour < {raw_start}
         GROUP BY 1, 2, 3, 4, 5, 6;",
        u1 = u("x.k", 1),
        u3 = u("x.k", 3),
        u4 = u("x.k", 4),
        u5 = u("x.k", 5),
        u6 = u("x.k", 6),
    );
    println!("generating (three sessions: windows, window_rows, rollup-only days):");
    let t = Instant::now();
    let mut gen_times = parallel(
        port,
        &[
            ("windows", windows_sql),
            ("window_rows", rows_sql),
            ("rollup-only days", rollup_only_sql),
        ],
    );
    let gen_raw = t.elapsed().as_secs_f64();
    println!("  phase: {gen_raw:.1} s");

    // The raw days' rollups from the plain views (the views turn parent '' into NULL). Statistics
    // first; then hash join and hash aggregate (windows and the groups fit in memory): the
    // planner's own choice, sorts for the join and the grouping, took 500 s at 30 days and
    // spilled 11 GB of temp files; this takes under two minutes and spills nothing.
    println!("rollups of the raw days from the plain views (two sessions):");
    let t = Instant::now();
    psql(port, "ANALYZE windows, window_rows;");
    let hash_plans = "SET work_mem = '512MB'; SET enable_sort = off; SET enable_mergejoin = off;
                      SET enable_nestloop = off;";
    gen_times.extend(parallel(
        port,
        &[
            (
                "rollup_hourly <- counts_hourly_by_layer_raw",
                format!(
                    "{hash_plans}
                     INSERT INTO rollup_hourly (layer, name, parent, hour, kind, action, n)
                     SELECT layer, coalesce(name, ''), coalesce(parent, ''), hour, kind, action, n
                     FROM counts_hourly_by_layer_raw;"
                ),
            ),
            (
                "rollup_daily <- counts_by_layer_raw",
                format!(
                    "{hash_plans}
                     INSERT INTO rollup_daily (layer, name, parent, day, kind, action, n)
                     SELECT layer, coalesce(name, ''), coalesce(parent, ''), day, kind, action, n
                     FROM counts_by_layer_raw;"
                ),
            ),
        ],
    ));
    let gen_rollups = t.elapsed().as_secs_f64();
    println!("  phase: {gen_rollups:.1} s");

    let t = Instant::now();
    psql(
        port,
        "VACUUM (ANALYZE) windows, window_rows, rollup_hourly, rollup_daily, gateways; CHECKPOINT;",
    );
    let gen_vacuum = t.elapsed().as_secs_f64();
    println!("VACUUM ANALYZE, CHECKPOINT: {gen_vacuum:.1} s");
    let gen_total = wall.elapsed().as_secs_f64();

    // Sizes: every partition, indexes and TOAST included.
    let tables = ["windows", "window_rows", "rollup_hourly", "rollup_daily"];
    let sizes = psql(
        port,
        "SELECT p.parent, count(*), sum(pg_total_relation_size(i.inhrelid)),
                sum(pg_indexes_size(i.inhrelid))
         FROM partitioned p JOIN pg_inherits i ON i.inhparent = p.parent::regclass
         WHERE p.parent IN ('windows', 'window_rows', 'rollup_hourly', 'rollup_daily')
         GROUP BY 1;
         SELECT 'rows', (SELECT count(*) FROM windows), (SELECT count(*) FROM window_rows),
                (SELECT count(*) FROM rollup_hourly), (SELECT count(*) FROM rollup_daily);
         SELECT 'cluster', (SELECT sum(pg_database_size(datname)) FROM pg_database),
                (SELECT sum(size) FROM pg_ls_waldir()),
                (SELECT temp_bytes FROM pg_stat_database WHERE datname = current_database());",
    );
    let mut bytes = std::collections::HashMap::new();
    let mut rows = std::collections::HashMap::new();
    let mut cluster = (0f64, 0f64, 0f64);
    for line in sizes.lines() {
        let f: Vec<&str> = line.split('|').collect();
        match f[0] {
            "rows" => {
                for (i, t) in tables.iter().enumerate() {
                    rows.insert(*t, f[i + 1].parse::<f64>().unwrap());
                }
            }
            "cluster" => {
                cluster = (
                    f[1].parse().unwrap(),
                    f[2].parse().unwrap(),
                    f[3].parse().unwrap(),
                )
            }
            t => {
                let parts: u64 = f[1].parse().unwrap();
                let total: f64 = f[2].parse().unwrap();
                let idx: f64 = f[3].parse().unwrap();
                bytes.insert(t.to_string(), (parts, total, idx));
            }
        }
    }
    let mut size_table = String::from(
        "| table | partitions | rows | bytes (total) | of which indexes | bytes/row |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for t in tables {
        let (parts, total, idx) = bytes[t];
        let r = rows[t];
        size_table.push_str(&format!(
            "| {t} | {parts} | {r:.0} | {} | {} | {:.0} |\n",
            human(total),
            human(idx),
            total / r.max(1.0)
        ));
    }
    let raw_cd = (compounds * days) as f64;
    let year_cd = (compounds * year_days) as f64;
    let raw_rows = rows["windows"] + rows["window_rows"];
    let raw_bytes = bytes["windows"].1 + bytes["window_rows"].1;
    let roll_rows = rows["rollup_hourly"] + rows["rollup_daily"];
    let roll_bytes = bytes["rollup_hourly"].1 + bytes["rollup_daily"].1;
    let per_cd = format!(
        "- raw (windows + window_rows), per compound-day ({compounds} x {days}): {:.0} rows, {}\n\
         - rollups (hourly + daily, all four layers, counted against the compounds), per \
         compound-day ({compounds} x {year_days}): {:.0} rows, {}\n\
         - a year of raw at that rate: {} for {compounds} compounds; the year's rollups: {}\n\
         - cluster on disk: databases {}, WAL {}; temp files the generation wrote: {}\n",
        raw_rows / raw_cd,
        human(raw_bytes / raw_cd),
        roll_rows / year_cd,
        human(roll_bytes / year_cd),
        human(raw_bytes / raw_cd * (compounds * 365) as f64),
        human(roll_bytes / year_cd * (compounds * 365) as f64),
        human(cluster.0),
        human(cluster.1),
        human(cluster.2),
    );
    println!("\n{size_table}\n{per_cd}");

    // The dashboard's queries.
    let q_a = |v: &str| {
        format!(
            "SELECT name, kind, sum(n) FROM {v} WHERE layer = 'street' AND day = DATE '{last}' \
             GROUP BY 1, 2"
        )
    };
    let q_b = |v: &str| {
        format!(
            "SELECT name, day, sum(n) FROM {v} WHERE layer = 'community' AND day > DATE '{b_after}' \
             GROUP BY 1, 2"
        )
    };
    let q_c = |v: &str| {
        format!(
            "SELECT hour, kind, sum(n) FROM {v} WHERE layer = 'compound' AND name = '{ONE_COMPOUND}' \
             AND hour >= TIMESTAMPTZ '{c_from} 00:00:00+08' GROUP BY 1, 2"
        )
    };
    let queries: Vec<(String, String, Option<String>)> = vec![
        (
            format!("a. today by street (day = {last})"),
            q_a("counts_by_layer"),
            Some(q_a("counts_by_layer_raw")),
        ),
        (
            format!("b. days by community (day > {b_after})"),
            q_b("counts_by_layer"),
            Some(q_b("counts_by_layer_raw")),
        ),
        (
            format!("c. {ONE_COMPOUND}'s hours (hour >= {c_from} local)"),
            q_c("counts_hourly_by_layer"),
            Some(q_c("counts_hourly_by_layer_raw")),
        ),
        (
            "d. silent gateways".to_string(),
            "SELECT * FROM silent_gateways".to_string(),
            None,
        ),
    ];
    let expect_silent = (1..=compounds)
        .filter(|g| g % 50 == 17 || g % 50 == 33)
        .count();
    let mut table = String::from(
        "| query | rows | rollups median ms | plain views median ms | ratio |\n|---|---:|---:|---:|---:|\n",
    );
    for (name, rollup, raw) in &queries {
        println!("timing {name} ...");
        if raw.is_none() {
            // Heartbeats as of now (the generation and the plain views took minutes): 1 in 50
            // offline since hours, 1 in 50 silent for 25 minutes, the others beat within 45 s.
            psql(
                port,
                "UPDATE gateways w SET last_heartbeat =
                     CASE WHEN c.g % 50 = 17 THEN now() - interval '6 hours'
                          WHEN c.g % 50 = 33 THEN now() - interval '25 minutes'
                          ELSE now() - (c.g % 45) * interval '1 second' END
                 FROM bench.compounds c WHERE c.gateway = w.gateway;",
            );
        }
        let (rt, r_rows) = time_query(port, rollup, runs);
        println!(
            "  rollups: {} rows, median {:.3} ms (min {:.3}, max {:.3}, {runs} runs)",
            r_rows.len(),
            median(&rt),
            rt.iter().cloned().fold(f64::MAX, f64::min),
            rt.iter().cloned().fold(0.0, f64::max)
        );
        match raw {
            Some(raw) => {
                let (pt, p_rows) = time_query(port, raw, raw_runs);
                println!(
                    "  plain views: {} rows, median {:.1} ms (min {:.1}, max {:.1}, {raw_runs} runs)",
                    p_rows.len(),
                    median(&pt),
                    pt.iter().cloned().fold(f64::MAX, f64::min),
                    pt.iter().cloned().fold(0.0, f64::max)
                );
                assert!(!r_rows.is_empty(), "{name}: no rows");
                if r_rows != p_rows {
                    let only_r: Vec<_> = r_rows
                        .iter()
                        .filter(|r| !p_rows.contains(r))
                        .take(10)
                        .collect();
                    let only_p: Vec<_> = p_rows
                        .iter()
                        .filter(|r| !r_rows.contains(r))
                        .take(10)
                        .collect();
                    panic!(
                        "{name}: rollups and plain views disagree ({} vs {} rows)\n\
                         only in rollups: {only_r:?}\nonly in plain views: {only_p:?}",
                        r_rows.len(),
                        p_rows.len()
                    );
                }
                println!("  answers equal ({} rows)", r_rows.len());
                table.push_str(&format!(
                    "| {name} | {} | {:.3} | {:.1} | {:.0}x |\n",
                    r_rows.len(),
                    median(&rt),
                    median(&pt),
                    median(&pt) / median(&rt)
                ));
            }
            None => {
                assert_eq!(r_rows.len(), expect_silent, "{name}: {r_rows:?}");
                table.push_str(&format!(
                    "| {name} | {} | {:.3} | n/a (no raw equivalent: gateway state is not counted) | |\n",
                    r_rows.len(),
                    median(&rt)
                ));
            }
        }
    }

    println!("\nplans on the rollups:");
    for (name, rollup, _) in queries.iter().take(3) {
        let plan = psql(port, &format!("EXPLAIN (ANALYZE, BUFFERS) {rollup}"));
        println!("--- {name}\n{}", plan.trim_end());
    }

    let settings = psql(
        port,
        "SELECT string_agg(name || '=' || current_setting(name), ', ' ORDER BY name)
         FROM pg_settings WHERE name IN ('shared_buffers', 'work_mem', 'jit',
             'max_parallel_workers_per_gather', 'random_page_cost', 'effective_cache_size');",
    );
    let gen_lines: String = gen_times
        .iter()
        .map(|(n, s)| format!("  - {n}: {s:.1} s\n"))
        .collect();
    println!(
        "\n## district_year: a synthetic year\n\n\
         {compounds} compounds ({} streets, {} communities, one district), {days} raw days \
         ({raw_first} .. {last}) of 60 s windows, {year_days} days of rollups. PostgreSQL {}, {}.\n\n\
         {size_table}\n{per_cd}\n{table}\n\
         Medians of {runs} runs (rollups) and {raw_runs} runs (plain views) after one warm-up each, \
         psql's own `\\timing` in one session per query. a-c: rollup and plain answers equal.\n\n\
         generation: {gen_total:.0} s in all (raw days + rollup-only days {gen_raw:.0} s, raw days' \
         rollups from the plain views {gen_rollups:.0} s, VACUUM ANALYZE {gen_vacuum:.0} s)\n{gen_lines}\
         whole run: {:.0} s\n\ncommand: `{command}`",
        compounds.min(30).min(10),
        compounds.min(30),
        psql(port, "SHOW server_version").trim(),
        settings.trim(),
        wall.elapsed().as_secs_f64()
    );
    drop(pg);
    drop(tmp);
}
