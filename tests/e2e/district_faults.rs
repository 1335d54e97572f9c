//! The district receiver through PostgreSQL's bad days and its own (issue 19), each provoked for
//! real: a database down when the receiver starts (with the subscription made beforehand by
//! `district --init`), stopped for 30 s mid-stream, restarted with a fast shutdown in the
//! middle of a stream of batches, its data dir on a small tmpfs that fills, switched read-only
//! (as after a failover to a standby), a `statement_timeout` shorter than a batch under lock
//! contention; and one of two receivers gone for good, its share recovered by a replacement
//! that takes over its client id.
//!
//! In every case: nothing acknowledged that is not committed (the database ends equal to what
//! was published, nothing rejected), `/healthz` says `database` while it lasts, one WARN per
//! outage and one INFO at recovery.

use crate::common;

use common::district::*;
use common::pg::Postgres;
use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A district: PostgreSQL, a persistent mosquitto, a receiver config and a publisher playing
/// gateways' summaries, with what the database must end up holding.
struct Rig {
    pg: Postgres,
    /// The district side of a site: the broker (no gateway; the publisher plays them).
    site: Site,
    cfg: PathBuf,
    health: u16,
    log: PathBuf,
    publisher: Publisher,
    want: BTreeMap<(String, String), i64>,
    windows: i64,
    base_ms: i64,
}

impl Rig {
    fn new(pg: impl FnOnce(&Path) -> Postgres, extra: &str) -> Rig {
        let site = Site::build("district-faults")
            .no_device_broker()
            .persistent_district()
            .no_collector()
            .no_gateway()
            .start();
        let pg = pg(&site.root);
        let port = site.district().port;
        let cfg = site.root.join("district.toml");
        let health = receiver_config_with(&cfg, &pg.url(), port, "zhian-district-f", extra);
        let log = site.root.join("receiver.log");
        let publisher = Publisher::connect(port, "fault-gateways");
        Rig {
            pg,
            site,
            cfg,
            health,
            log,
            publisher,
            want: BTreeMap::new(),
            windows: 0,
            base_ms: (now_ms() / 60_000 - 600) * 60_000,
        }
    }

    /// `n` summaries for new windows of ten played gateways (each window one message).
    fn publish(&mut self, n: usize) {
        for _ in 0..n {
            let i = self.windows;
            self.windows += 1;
            let gw = format!("pgf-{}", i % 10);
            let start = self.base_ms + (i / 10) * 60_000;
            let count = 1 + i % 7;
            self.publisher.send(
                &format!("{DISTRICT_PREFIX}/{gw}/summary"),
                summary(&gw, start, 0, None, &[("door-1", count)]),
            );
            self.want.insert((gw, rfc(start)), count);
        }
    }

    /// Waits until the database holds exactly what was published; panics with the difference.
    fn converge(&self, what: &str) {
        let t0 = std::time::Instant::now();
        self.publisher.wait_all_acked(Duration::from_secs(60));
        let ok = wait_until(Duration::from_secs(120), || in_db(&self.pg) == self.want);
        assert!(
            ok,
            "{what}: database vs published:\n{}\nreceiver:\n{}",
            map_diff(&self.want, &in_db(&self.pg)),
            tail(&self.log, 40)
        );
        assert_eq!(
            self.pg.psql("SELECT count(*) FROM rejects").unwrap().trim(),
            "0",
            "{what}: nothing rejected"
        );
        // The outcome, for the record (a failing equality above would have shown the loss).
        let events: i64 = self.want.values().sum();
        println!(
            "{what}: {} windows, {events} events exact (lost 0, doubled 0), converged {:.1} s after the fault ended; WARN {} INFO {}; db errors: {}",
            self.want.len(),
            t0.elapsed().as_secs_f64(),
            self.log_count("database does not take writes"),
            self.log_count("database takes writes again"),
            super_errors(self.health)
        );
    }

    /// Waits until `/healthz` answers 503 naming the database (and `needle`).
    fn wait_unhealthy(&self, needle: &str) {
        assert!(
            wait_until(Duration::from_secs(60), || healthz(self.health)
                .is_some_and(|(s, b)| s == 503
                    && b.contains("database")
                    && b.contains(needle))),
            "/healthz 503 with {needle:?}: {:?}\n{}",
            healthz(self.health),
            tail(&self.log, 20)
        );
        assert_eq!(metric(self.health, "zhian_district_database_up"), 0.0);
    }

    fn log_count(&self, needle: &str) -> usize {
        log_text(&self.log).matches(needle).count()
    }

    /// One WARN when the outage began, one INFO when it ended.
    fn one_warn_one_info(&self, what: &str) {
        let warns = self.log_count("database does not take writes");
        let infos = self.log_count("database takes writes again");
        assert!(
            warns == 1 && infos == 1,
            "{what}: {warns} WARN and {infos} INFO lines for one outage:\n{}",
            tail(&self.log, 40)
        );
        assert!(
            !log_text(&self.log).lines().any(|l| l.starts_with("<3>")),
            "{what}: no ERROR for an outage the receiver rides out:\n{}",
            tail(&self.log, 40)
        );
        assert_eq!(healthz(self.health).map(|h| h.0), Some(200));
        assert_eq!(metric(self.health, "zhian_district_database_up"), 1.0);
    }
}

/// Another session holding the `windows` table for `secs` (ACCESS EXCLUSIVE, no statement
/// timeout of its own): every batch that reaches the table waits behind it.
fn hold_windows_lock(pg: &Postgres, secs: u32) -> std::process::Child {
    let psql = fs::read_dir("/usr/lib/postgresql")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("bin/psql"))
        .find(|p| p.exists())
        .unwrap();
    Command::new(psql)
        .env("PGOPTIONS", "-c statement_timeout=0")
        .args(["-h", "127.0.0.1", "-p", &pg.port.to_string()])
        .args(["-U", "zhian", "-d", "postgres", "-v", "ON_ERROR_STOP=1"])
        .args([
            "-c",
            &format!("BEGIN; LOCK TABLE windows IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({secs}); COMMIT;"),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The receiver's `zhian_district_db_errors_total` series that are not zero.
fn super_errors(port: u16) -> String {
    let text = common::http::http(port, "GET", "/metrics", None)
        .map(|r| r.text())
        .unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("zhian_district_db_errors_total{") && !l.ends_with(" 0"))
        .map(|l| l.trim_start_matches("zhian_district_db_errors_total"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn database_down_at_start_with_the_subscription_made_first() {
    let mut rig = Rig::new(|d| Postgres::start(&d.join("pg"), free_port()), "");
    rig.pg.stop();
    // The first start: the durable subscription exists before anything is published.
    let init = Command::new(env!("CARGO_BIN_EXE_zhian-gateway"))
        .args(["district", "--init", "--config"])
        .arg(&rig.cfg)
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    rig.publish(100);
    let _r = start_receiver(&rig.cfg, &rig.log);
    rig.wait_unhealthy("connection");
    assert!(healthz(rig.health).unwrap().1.contains("migrating"));
    rig.publish(100);
    rig.pg.start_again();
    rig.converge("database down at start");
    rig.one_warn_one_info("database down at start");
}

#[test]
fn database_stopped_30s_mid_stream() {
    let mut rig = Rig::new(|d| Postgres::start(&d.join("pg"), free_port()), "");
    let _r = start_receiver(&rig.cfg, &rig.log);
    wait_healthy(rig.health, &rig.log);
    rig.publish(150);
    rig.converge("before the stop");
    rig.pg.stop();
    rig.publish(150);
    rig.wait_unhealthy("connection");
    // The outage lasts 30 s (the scenario), with messages arriving throughout.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(5));
        rig.publish(20);
    }
    assert!(
        metric(rig.health, "zhian_district_oldest_unacked_seconds") >= 25.0,
        "the lag shows"
    );
    rig.pg.start_again();
    rig.publish(50);
    rig.converge("after a 30 s stop");
    rig.one_warn_one_info("stopped 30 s");
    assert!(
        metric(
            rig.health,
            "zhian_district_db_errors_total{kind=\"connection\"}"
        ) >= 1.0
    );
}

#[test]
fn database_restarted_fast_in_the_middle_of_batches() {
    let mut rig = Rig::new(|d| Postgres::start(&d.join("pg"), free_port()), "");
    let _r = start_receiver(&rig.cfg, &rig.log);
    wait_healthy(rig.health, &rig.log);
    rig.publish(4000);
    // Restart while the stream is being written: some of it in, not all.
    let total = rig.want.len();
    assert!(
        wait_until(Duration::from_secs(60), || {
            let n = in_db(&rig.pg).len();
            n > 0 && n < total
        }),
        "part of the stream in"
    );
    rig.pg.restart_fast();
    rig.publish(200);
    rig.converge("restarted mid-stream");
    let warns = rig.log_count("database does not take writes");
    let infos = rig.log_count("database takes writes again");
    assert!(warns <= 1 && warns == infos, "{warns} WARN, {infos} INFO");
}

#[test]
fn database_disk_full_then_freed() {
    let mut mnt = None;
    let mut rig = Rig::new(
        |d| {
            let m = Tmpfs::mount(&d.join("pgdisk"), "96m");
            let data = m.0.join("cluster").join("data");
            mnt = Some(m);
            Postgres::start_with(&d.join("pg"), free_port(), &data, &["--wal-segsize=1"])
        },
        "",
    );
    let mnt = mnt.unwrap();
    let _r = start_receiver(&rig.cfg, &rig.log);
    wait_healthy(rig.health, &rig.log);
    rig.publish(100);
    rig.converge("before the disk fills");
    // Fill the database's filesystem to the last byte.
    let filler = mnt.0.join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        let chunk = vec![0x5au8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let small = vec![0x5au8; 512];
        while f.write_all(&small).is_ok() {}
    }
    rig.publish(2000);
    rig.wait_unhealthy("");
    let reason = healthz(rig.health).unwrap().1;
    // Freed, as an operator would; a server that stopped on it (a PANIC writing WAL) is started.
    fs::remove_file(&filler).unwrap();
    rig.pg.start_again();
    rig.publish(100);
    rig.converge(&format!("disk full ({})", reason.trim()));
    let warns = rig.log_count("database does not take writes");
    assert!(warns >= 1);
    assert_eq!(warns, rig.log_count("database takes writes again"));
}

#[test]
fn database_read_only_after_a_failover() {
    let mut rig = Rig::new(|d| Postgres::start(&d.join("pg"), free_port()), "");
    let _r = start_receiver(&rig.cfg, &rig.log);
    wait_healthy(rig.health, &rig.log);
    rig.publish(100);
    rig.converge("before read-only");
    // What a promoted standby that is not yet writable, or a primary demoted by hand, looks
    // like to a client: every transaction read-only (SQLSTATE 25006).
    rig.pg
        .psql("ALTER SYSTEM SET default_transaction_read_only = on")
        .unwrap();
    rig.pg.psql("SELECT pg_reload_conf()").unwrap();
    rig.publish(200);
    rig.wait_unhealthy("read_only");
    assert!(in_db(&rig.pg).len() < rig.want.len());
    let off = "-c default_transaction_read_only=off";
    rig.pg
        .psql_with("ALTER SYSTEM RESET default_transaction_read_only", off)
        .unwrap();
    rig.pg.psql_with("SELECT pg_reload_conf()", off).unwrap();
    rig.converge("after read-only");
    rig.one_warn_one_info("read-only");
    assert!(
        metric(
            rig.health,
            "zhian_district_db_errors_total{kind=\"read_only\"}"
        ) >= 1.0
    );
}

#[test]
fn statement_timeout_shorter_than_a_batch_under_lock_contention() {
    let mut rig = Rig::new(
        |d| {
            let pg = Postgres::start(&d.join("pg"), free_port());
            pg.psql("ALTER DATABASE postgres SET statement_timeout = '300ms'")
                .unwrap();
            pg
        },
        "",
    );
    let _r = start_receiver(&rig.cfg, &rig.log);
    wait_healthy(rig.health, &rig.log);
    rig.publish(100);
    rig.converge("before contention");
    // Another session holds the windows table for 5 s: every batch that reaches it times out.
    let mut holder = hold_windows_lock(&rig.pg, 5);
    assert!(wait_until(Duration::from_secs(10), || {
        rig
        .pg
        .psql("SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'windows' AND l.mode = 'AccessExclusiveLock' AND l.granted")
        .is_some_and(|n| n.trim() == "1")
    }));
    rig.publish(300);
    rig.wait_unhealthy("timeout");
    assert!(holder.wait().unwrap().success());
    rig.converge("after the lock is released");
    rig.one_warn_one_info("statement timeout");
    assert!(
        metric(
            rig.health,
            "zhian_district_db_errors_total{kind=\"timeout\"}"
        ) >= 1.0
    );
}

#[test]
fn a_receiver_gone_for_good_is_seen_and_its_share_recovered_by_a_replacement() {
    let mut rig = Rig::new(|d| Postgres::start(&d.join("pg"), free_port()), "");
    let log2 = rig.site.root.join("receiver2.log");
    let cfg2 = rig.site.root.join("district2.toml");
    let h2 = receiver_config(
        &cfg2,
        &rig.pg.url(),
        rig.site.district().port,
        "zhian-district-gone",
    );
    let _r1 = start_receiver(&rig.cfg, &rig.log);
    let mut r2 = start_receiver(&cfg2, &log2);
    wait_healthy(rig.health, &rig.log);
    wait_healthy(h2, &log2);
    rig.publish(20);
    rig.converge("both receivers");
    let _ = r2.0.kill();
    let _ = r2.0.wait();
    rig.publish(200);
    rig.publisher.wait_all_acked(Duration::from_secs(30));
    // The survivor sees the other's roll-call go stale, says so, and its share is missing.
    assert!(
        wait_until(Duration::from_secs(60), || metric(
            rig.health,
            "zhian_district_receivers{state=\"stale\"}"
        ) == 1.0),
        "stale receiver in /metrics\n{}",
        tail(&rig.log, 20)
    );
    assert!(log_text(&rig.log).contains("a receiver of this group has been gone"));
    assert!(log_text(&rig.log).contains("zhian-district-gone"));
    let held = rig.want.len() - in_db(&rig.pg).len();
    assert!(held > 0, "the gone receiver's session holds its share");
    // A replacement with the gone receiver's client id (another host, another status port)
    // takes the session over and drains it.
    let cfg3 = rig.site.root.join("district3.toml");
    let h3 = receiver_config(
        &cfg3,
        &rig.pg.url(),
        rig.site.district().port,
        "zhian-district-gone",
    );
    let _r3 = start_receiver(&cfg3, &log2);
    wait_healthy(h3, &log2);
    rig.converge(&format!("after the replacement ({held} held)"));
    assert!(wait_until(Duration::from_secs(30), || metric(
        rig.health,
        "zhian_district_receivers{state=\"stale\"}"
    ) == 0.0));
    let _ = rig.site.district().port;
}

/// Found by a break-it run: a lock held elsewhere (or a hung server) makes no statement fail,
/// so `/healthz` said 200 while nothing committed. A batch still writing after
/// `district.stuck_after` is now `database: stuck`, and the heartbeats of 150 gateways in
/// shuffled order to two receivers never deadlock (gateway rows locked in sorted order).
#[test]
fn a_batch_stuck_behind_a_lock_is_unhealthy_and_two_receivers_never_deadlock() {
    let mut rig = Rig::new(
        |d| Postgres::start(&d.join("pg"), free_port()),
        "stuck_after = \"2s\"",
    );
    let cfg2 = rig.site.root.join("district2.toml");
    let log2 = rig.site.root.join("receiver2.log");
    let h2 = receiver_config_with(
        &cfg2,
        &rig.pg.url(),
        rig.site.district().port,
        "zhian-district-f2",
        "stuck_after = \"2s\"",
    );
    let _r1 = start_receiver(&rig.cfg, &rig.log);
    let _r2 = start_receiver(&cfg2, &log2);
    wait_healthy(rig.health, &rig.log);
    wait_healthy(h2, &log2);
    // Heartbeats with epochs, 150 gateways in a different order each round.
    let mut rng = Rng::new(19);
    let mut order: Vec<usize> = (0..150).collect();
    for round in 0..20 {
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        for &g in &order {
            let gw = format!("hb-{g:03}");
            let hb = serde_json::json!({"schema": "zhian.heartbeat.v1", "gateway": gw, "epoch": 100 + round});
            rig.publisher.send(
                &format!("{DISTRICT_PREFIX}/{gw}/heartbeat"),
                serde_json::to_vec(&hb).unwrap(),
            );
        }
    }
    rig.publisher.wait_all_acked(Duration::from_secs(60));
    assert!(
        wait_until(Duration::from_secs(60), || {
            rig
            .pg
            .psql("SELECT count(*) FROM gateway_state WHERE gateway LIKE 'hb-%' AND status = 'online' AND epoch = 119")
            .is_some_and(|n| n.trim() == "150")
        }),
        "every gateway online at its last epoch"
    );
    for log in [&rig.log, &log2] {
        let text = log_text(log);
        assert!(
            !text.contains("deadlock") && !text.contains("does not take writes"),
            "no deadlock, no outage:\n{}",
            tail(log, 20)
        );
    }
    // Another session holds the windows table; the next summaries wait behind it.
    let mut holder = hold_windows_lock(&rig.pg, 8);
    rig.publish(50);
    assert!(
        wait_until(Duration::from_secs(30), || {
            [rig.health, h2].iter().any(|&h| {
                healthz(h).is_some_and(|(s, b)| s == 503 && b.contains("database: stuck"))
            })
        }),
        "a receiver stuck behind the lock says so: {:?} {:?}",
        healthz(rig.health),
        healthz(h2)
    );
    assert!(holder.wait().unwrap().success());
    rig.converge("after the lock");
    assert!(wait_until(Duration::from_secs(30), || healthz(rig.health)
        .is_some_and(|h| h.0 == 200)
        && healthz(h2).is_some_and(|h| h.0 == 200)));
}
