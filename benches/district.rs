//! The district receiver's sustained rate (issues 14, 22): messages per second it commits to a
//! real PostgreSQL (windows, rows and the rollups of all four layers), with one and with four
//! receivers sharing the subscription, as ratios to `mosquitto_sub`'s rate draining the same
//! kind of backlog from the same broker in the same run (these machines are noisy: only ratios
//! are comparable). Also the database rows and bytes one compound costs per day (60 s windows,
//! a day of traffic played through the receivers).
//!
//! `cargo bench --bench district` (BENCH_N messages per run, default 50000). The last line is
//! `ingest ratio (one receiver / mosquitto_sub): X`.

#[path = "../tests/common/mod.rs"]
mod common;

use common::district::wait_healthy;
use common::pg::Postgres;
use common::*;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PREFIX: &str = "zhian/district";

/// A receiver `id` in the group `bench`; its `/healthz` on the returned port says when it is
/// subscribed and its database takes writes.
fn receiver(dir: &Path, db: &str, port: u16, id: &str) -> (Child, u16) {
    let cfg = dir.join(format!("{id}.toml"));
    let status = free_port();
    fs::write(
        &cfg,
        format!(
            "[district]\ndatabase_url = \"{db}\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
             topic_prefix = \"{PREFIX}\"\nclient_id = \"{id}\"\ngroup = \"bench\"\n\
             [status]\nlisten = \"127.0.0.1:{status}\"\n"
        ),
    )
    .unwrap();
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("receivers.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_zhian-gateway"))
        .args(["district", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    (child, status)
}

/// CPU seconds (user + system) used so far by every PostgreSQL, mosquitto and zhian-gateway
/// process on the machine (`/proc/<pid>/stat`).
fn cpu_secs() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ticks = 0u64;
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !["postgres", "mosquitto", "zhian-gateway"].contains(&&stat[open + 1..close]) {
            continue;
        }
        let f: Vec<&str> = stat[close + 2..].split(' ').collect();
        // Fields 14 and 15 (utime, stime), counted from the state field (3).
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    ticks as f64 / hz
}

fn stop(mut c: Child) {
    // SAFETY: kill(2) on a child we spawned.
    unsafe {
        libc::kill(c.id() as i32, libc::SIGTERM);
    }
    let _ = c.wait();
}

/// Window `window` counted from 20 days ago (inside `[retention]`'s kept months).
fn summary(g: usize, window: usize) -> Vec<u8> {
    let start = (now_ms() / 1000 / 60 - 20 * 1440) * 60 + window as i64 * 60;
    let t = time::OffsetDateTime::from_unix_timestamp(start).unwrap();
    let rfc = t
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
        .replace("+00:00", "Z");
    // 150 compounds over 30 communities over 10 streets.
    serde_json::to_vec(&serde_json::json!({"schema": "zhian.summary.v1", "gateway": format!("b-{g:03}"),
        "site": {"district": "富阳区", "street": format!("街道{:02}", g % 30 % 10),
                 "community": format!("社区{:02}", g % 30), "compound": format!("小区{g}")},
        "window": {"start": rfc, "secs": 60}, "rev": 0,
        "counts": [{"kind": "access", "device": "door-1", "action": "entry", "result": "granted", "n": 3},
                   {"kind": "vehicle", "device": "gate-1", "action": "entry", "result": "ok", "n": 1}]}))
    .unwrap()
}

/// Publish `n` summaries (distinct windows) with `offset` windows added.
fn publish(port: u16, n: usize, offset: usize) {
    let mut p = Publisher::connect(port, &format!("bench-pub-{offset}"));
    for i in 0..n {
        let g = i % 150;
        p.send(
            &format!("{PREFIX}/b-{g:03}/summary"),
            summary(g, offset + i / 150),
        );
    }
    p.wait_all_acked(Duration::from_secs(120));
}

fn windows(pg: &Postgres) -> usize {
    pg.psql("SELECT count(*) FROM windows")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn signal(c: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned.
    unsafe {
        libc::kill(c.id() as i32, sig);
    }
}

fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    // The district side of a site: its broker; PostgreSQL beside it.
    let site = Site::build("bench-district")
        .no_device_broker()
        .persistent_district()
        .no_collector()
        .no_gateway()
        .start();
    let pg = Postgres::start(&site.root.join("pg"), free_port());
    let (broker, dir) = (site.district(), site.root.as_path());
    let rlog = dir.join("receivers.log");
    let url = pg.url();
    // Each reader is connected and subscribed, then frozen (SIGSTOP) while a backlog of n
    // messages builds on the broker, then thawed: the time to drain it is its rate.
    // Baseline: mosquitto_sub, a null subscriber, on the same broker in the same run.
    // Three runs, the median: the baseline drains in a fraction of a second, so one run is noisy.
    let mut subs = Vec::new();
    for run in 0..3 {
        let sub = Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port.to_string(),
                "-q",
                "1",
                "-c",
                "-i",
                &format!("bench-sub-{run}"),
            ])
            .args(["-t", &format!("{PREFIX}/+/#"), "-C", &n.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        broker.wait_subscribed(&format!("bench-sub-{run}"), &format!("{PREFIX}/+/#"));
        signal(&sub, libc::SIGSTOP);
        publish(broker.port, n, 0);
        let t = Instant::now();
        signal(&sub, libc::SIGCONT);
        let mut sub = sub;
        assert!(sub.wait().unwrap().success());
        subs.push(n as f64 / t.elapsed().as_secs_f64());
        // End its persistent session (a clean-session connect with its id), so the broker
        // queues nothing more for it during the receivers' runs.
        let _ = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
            .args([
                "-i",
                &format!("bench-sub-{run}"),
                "-t",
                "bench/end",
                "-m",
                "x",
            ])
            .status();
    }
    subs.sort_by(f64::total_cmp);
    let sub_rate = subs[1];
    eprintln!("mosquitto_sub: {sub_rate:.0} msg/s");

    let mut rates = Vec::new();
    // (cores busy, CPU microseconds per message) of PostgreSQL, mosquitto and the receivers.
    let mut cpus = Vec::new();
    for (k, ids) in [(2usize, vec!["r1"]), (3, vec!["r1", "r2", "r3", "r4"])] {
        let (rs, ports): (Vec<Child>, Vec<u16>) = ids
            .iter()
            .map(|id| receiver(dir, &url, broker.port, id))
            .unzip();
        assert!(wait_until(Duration::from_secs(30), || pg
            .psql("SELECT 1 FROM settings LIMIT 1")
            .is_some()));
        for port in ports {
            wait_healthy(port, &rlog);
        }
        let before = windows(&pg);
        for r in &rs {
            signal(r, libc::SIGSTOP);
        }
        publish(broker.port, n, k * (n / 150 + 10));
        let (t, cpu0) = (Instant::now(), cpu_secs());
        for r in &rs {
            signal(r, libc::SIGCONT);
        }
        assert!(
            wait_until(Duration::from_secs(600), || windows(&pg) >= before + n),
            "receivers did not drain: {} of {n}; {}",
            windows(&pg) - before,
            tail(&rlog, 20)
        );
        let wall = t.elapsed().as_secs_f64();
        let rate = n as f64 / wall;
        let cpu = cpu_secs() - cpu0;
        eprintln!("{} receiver(s): {rate:.0} msg/s", ids.len());
        rates.push(rate);
        cpus.push((cpu / wall, cpu * 1e6 / n as f64));
        for r in rs {
            stop(r);
        }
    }
    // Rows and bytes per compound and day: a day of 60 s windows for one compound, two rows a
    // window (as the summaries above), measured as the growth of the schema's tables.
    // Raw (windows, window_rows) and rollups (rollup_hourly, rollup_daily): rows, and bytes of
    // their partitions with indexes.
    let size = |pg: &Postgres, like: &str| -> i64 {
        pg.psql(&format!("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = 'public' AND c.relkind = 'r' AND c.relname ~ '{like}'"))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let count = |pg: &Postgres, tables: &[&str]| -> i64 {
        tables
            .iter()
            .map(|t| {
                pg.psql(&format!("SELECT count(*) FROM {t}"))
                    .and_then(|s| s.trim().parse::<i64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    };
    const RAW: &str = "^(windows|window_rows)_p";
    const ROLL: &str = "^rollup_(hourly|daily)_p";
    let measure = |pg: &Postgres| {
        pg.psql("VACUUM ANALYZE");
        (
            count(pg, &["windows", "window_rows"]),
            size(pg, RAW),
            count(pg, &["rollup_hourly", "rollup_daily"]),
            size(pg, ROLL),
        )
    };
    let (r0, b0, u0, c0) = measure(&pg);
    // Both group members: a stopped one's share of the shared subscription waits in its session.
    let (rs, ports): (Vec<Child>, Vec<u16>) = ["r1", "r2", "r3", "r4"]
        .iter()
        .map(|id| receiver(dir, &url, broker.port, id))
        .unzip();
    for port in ports {
        wait_healthy(port, &rlog);
    }
    {
        let mut p = Publisher::connect(broker.port, "bench-day");
        for w in 0..1440 {
            let mut v: serde_json::Value =
                serde_json::from_slice(&summary(0, 5 * (n / 150 + 10) + w)).unwrap();
            v["gateway"] = "b-day".into();
            p.send(
                &format!("{PREFIX}/b-day/summary"),
                serde_json::to_vec(&v).unwrap(),
            );
        }
        p.wait_all_acked(Duration::from_secs(120));
    }
    assert!(wait_until(Duration::from_secs(300), || pg
        .psql("SELECT count(*) FROM windows WHERE gateway = 'b-day'")
        .is_some_and(|s| s.trim() == "1440")));
    for r in rs {
        stop(r);
    }
    let (r1, b1, u1, c1) = measure(&pg);
    println!(
        "district receiver, {n} summaries per run (2 rows each), PostgreSQL fsync off, loopback:"
    );
    println!("  mosquitto_sub draining the same backlog: {sub_rate:.0} msg/s (baseline)");
    println!(
        "  one receiver:   {:.0} msg/s committed, ratio {:.3}",
        rates[0],
        rates[0] / sub_rate
    );
    println!(
        "  four receivers: {:.0} msg/s committed, ratio {:.3} ({:.2}x one receiver)",
        rates[1],
        rates[1] / sub_rate,
        rates[1] / rates[0]
    );
    for (who, (cores, us)) in ["one receiver", "four receivers"].iter().zip(&cpus) {
        println!(
            "  {who}: PostgreSQL + mosquitto + receivers kept {cores:.2} of {} cores busy, {us:.0} CPU us per message",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    println!(
        "  one compound-day (1440 windows of 60 s, 2 rows each): raw {} rows, {} KiB; rollups {} rows, {} KiB (tables and indexes)",
        r1 - r0,
        (b1 - b0) / 1024,
        u1 - u0,
        (c1 - c0) / 1024
    );
    println!(
        "ingest ratio (one receiver / mosquitto_sub): {:.3}",
        rates[0] / sub_rate
    );
}
