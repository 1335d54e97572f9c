//! The store under real faults, through the real binary: a data dir on a small tmpfs that fills
//! and is emptied while events flow, store files cut short / zeroed / garbage / foreign under
//! both `store.on_damage` values, `inspect` after kill -9 and on a quarantined file, and a
//! bounded store taking many times its size in events.
//!
//! The tmpfs test mounts a filesystem, so it needs root (CI runs as root).

use crate::common;

use common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zhian_gateway::config::{ByteSize, OnDamage, SubjectMode};
use zhian_gateway::core::engine::Engine;
use zhian_gateway::core::event::{Event as CoreEvent, Kind};
use zhian_gateway::core::window::WindowCfg;
use zhian_gateway::store::Store;

/// A site of one gateway with its page, and no district: upstream off.
fn offline_site(name: &str) -> SiteBuilder {
    Site::build(name)
        .no_district_broker()
        .status()
        .config(|c| c.upstream.enabled = false)
}

fn grand_total(up: &Upstream) -> u64 {
    up.totals().values().sum()
}

// ---------------------------------------------------------------------------------------------
// A damaged store
// ---------------------------------------------------------------------------------------------

/// A healthy store with a few thousand events over many commits, as the daemon leaves it.
fn healthy_store(dir: &Path) -> PathBuf {
    let en = Engine {
        window: WindowCfg {
            window_ms: 60_000,
            grace_ms: 10_000,
            max_lateness_ms: 3_600_000,
            max_future_skew_ms: 300_000,
        },
        dedup_ttl_ms: 3_600_000,
        gateway: GATEWAY_ID.into(),
        site: zhian_gateway::core::summary::Site::default(),
        alert_actions: vec![],
        max_summary_bytes: usize::MAX,
    };
    let now = now_ms();
    let (_s, mut w) = Store::open(dir, SubjectMode::Hashed).unwrap();
    for batch in 0..40 {
        let evs: Vec<CoreEvent> = (0..100)
            .map(|i| CoreEvent {
                kind: Kind::Access,
                device: format!("door-{}", i % 7),
                id: format!("evt-{batch}-{i}-with-a-longer-id-to-fill-pages"),
                ts_ms: now - 120_000 + batch * 1000,
                action: "entry".into(),
                result: "granted".into(),
                subject: Some(format!("card:{i}")),
            })
            .collect();
        let refs: Vec<&CoreEvent> = evs.iter().collect();
        w.commit(&en, &refs, &[], now, None).unwrap();
    }
    dir.join("zhian.redb")
}

type Damage = fn(&Path);

fn cut_to(path: &Path, len: u64) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn damages() -> Vec<(&'static str, Damage, bool)> {
    // (name, damage, surely detected)
    vec![
        (
            "cut short by one page",
            |p| cut_to(p, fs::metadata(p).unwrap().len() - 4096),
            true,
        ),
        (
            "cut to half",
            |p| cut_to(p, fs::metadata(p).unwrap().len() / 2),
            true,
        ),
        ("cut to two pages", |p| cut_to(p, 8192), true),
        (
            "zeroed pages",
            |p| {
                let mut b = fs::read(p).unwrap();
                let half = b.len() / 2;
                b[4096..half].fill(0);
                fs::write(p, b).unwrap();
            },
            true,
        ),
        (
            "garbage",
            |p| {
                let mut rng = Rng::new(7);
                let b: Vec<u8> = (0..256 * 1024).map(|_| rng.next_u64() as u8).collect();
                fs::write(p, b).unwrap();
            },
            true,
        ),
        (
            "a foreign file",
            |p| {
                fs::write(
                    p,
                    "SQLite format 3\0 this is not a redb store\n".repeat(500),
                )
                .unwrap()
            },
            true,
        ),
    ]
}

fn quarantined_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("zhian.redb.damaged-")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn damaged_store_is_refused_with_74_or_quarantined_never_a_panic() {
    let scratch = tempfile::tempdir().unwrap();
    let good = scratch.path().join("good");
    let good_file = healthy_store(&good);
    for (i, (name, damage, surely)) in damages().into_iter().enumerate() {
        // refuse: exit 74, one line naming the file, the file left where it is.
        let site = offline_site(&format!("refuse-{i}"))
            .no_device_broker()
            .config(|c| c.store.on_damage = OnDamage::Refuse)
            .unstarted()
            .start();
        let dir = site.data_dir();
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("zhian.redb");
        fs::copy(&good_file, &file).unwrap();
        damage(&file);
        let damaged_bytes = fs::read(&file).unwrap();
        let cfg = site.config_path();
        let args = ["run".as_ref(), "--config".as_ref(), cfg.as_os_str()];
        if surely {
            let out = run_cli(&args, scratch.path(), Duration::from_secs(60));
            assert_eq!(
                out.status.code(),
                Some(74),
                "{name}: refuse must exit 74; stderr:\n{}",
                out.stderr
            );
            assert!(
                out.stderr.contains(&file.display().to_string()) && out.stderr.contains("damaged"),
                "{name}: the error names the file: {}",
                out.stderr
            );
            assert!(!out.stderr.contains("panicked"), "{name}: {}", out.stderr);
            assert_eq!(
                fs::read(&file).unwrap(),
                damaged_bytes,
                "{name}: refuse leaves the file"
            );
        }

        // quarantine (the default): moved aside, fresh store, shown on the page; no panic.
        let site = offline_site(&format!("quarantine-{i}"))
            .no_device_broker()
            .unstarted()
            .start();
        let dir = site.data_dir();
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("zhian.redb");
        fs::copy(&good_file, &file).unwrap();
        damage(&file);
        let (status_port, log) = (site.status_port(), site.log_path());
        site.start_daemon();
        let mut status = None;
        assert!(
            wait_until(Duration::from_secs(60), || {
                status = api_status(status_port);
                status.is_some()
            }),
            "{name}: the daemon serves its page; log:\n{}",
            tail(&log, 40)
        );
        assert!(site.daemon_exited().is_none(), "{name}: still running");
        let status = status.unwrap();
        let moved = quarantined_files(&dir);
        if surely {
            assert_eq!(
                moved.len(),
                1,
                "{name}: one file moved aside; log:\n{}",
                tail(&log, 40)
            );
            let shown = &status["store"]["quarantined"];
            assert_eq!(shown.as_array().map(Vec::len), Some(1), "{name}: {status}");
            assert!(shown[0]["file"]
                .as_str()
                .unwrap()
                .starts_with("zhian.redb.damaged-"));
            assert!(log_text(&log).contains("ERROR"), "{name}: logged at ERROR");
            assert!(file.exists(), "{name}: a fresh store took its place");
        }
        let (code, _) = site.term_daemon();
        assert!(code.success(), "{name}: clean stop");
        assert!(
            !log_text(&log).contains("panicked"),
            "{name}: {}",
            tail(&log, 40)
        );
        // A restart does not crash-loop and does not move the fresh store.
        site.start_daemon();
        site.wait_ready(Ready::Status);
        assert_eq!(quarantined_files(&dir), moved, "{name}: nothing more moved");
        site.term_daemon();
        // inspect reads the data dir (listing the quarantined file) and tries the moved file
        // without a panic and without changing it.
        let out = run_cli(
            &[
                "inspect".as_ref(),
                "--json".as_ref(),
                "--data-dir".as_ref(),
                dir.as_os_str(),
            ],
            scratch.path(),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "{name}: {}", out.stderr);
        let r: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(r["quarantined"].as_array().map(Vec::len), Some(moved.len()));
        for m in &moved {
            let before = fs::read(m).unwrap();
            let out = run_cli(
                &["inspect".as_ref(), "--file".as_ref(), m.as_os_str()],
                scratch.path(),
                Duration::from_secs(60),
            );
            assert!(!out.stderr.contains("panicked"), "{name}: {}", out.stderr);
            if !out.status.success() {
                assert!(
                    out.stderr.contains("damaged"),
                    "{name}: says why: {}",
                    out.stderr
                );
            }
            assert_eq!(
                fs::read(m).unwrap(),
                before,
                "{name}: inspect changed nothing"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// inspect after kill -9
// ---------------------------------------------------------------------------------------------

#[test]
fn inspect_reads_the_store_after_kill9_without_changing_it() {
    let site = offline_site("inspect-kill9").start();
    let (dir, scratch) = (site.data_dir(), site.root.clone());
    let mut p = site.publisher();
    for i in 0..500 {
        let e = Event::new("access", "door-1", &format!("k9-{i}"), "entry");
        p.send(&e.topic(), e.payload());
    }
    p.wait_all_acked(Duration::from_secs(60));
    // The broker's PUBACK to the publisher says only that the broker has them: wait until the
    // store holds all 500 (a CI run under load killed the daemon before its first commit).
    site.gw()
        .wait_for_status("500 committed", |s| s["store"]["raw_events"] == 500);
    site.kill9_daemon();
    let file = dir.join("zhian.redb");
    let before = fs::read(&file).unwrap();
    let out = run_cli(
        &[
            "inspect".as_ref(),
            "--json".as_ref(),
            "--data-dir".as_ref(),
            dir.as_os_str(),
        ],
        &scratch,
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "inspect after kill -9: {}",
        out.stderr
    );
    let r: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(r["raw_events"], 500, "{r}");
    assert_eq!(r["dedup_keys"], 500, "{r}");
    assert_eq!(
        fs::read(&file).unwrap(),
        before,
        "inspect never writes the file it reads"
    );
}

// ---------------------------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------------------------

/// Fill the filesystem of `dir` with `dir/filler` until it is full.
fn fill(dir: &Path) {
    use std::io::Write;
    let mut f = fs::File::create(dir.join("filler")).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let small = vec![0x5au8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn full_disk_pauses_intake_and_resumes_by_itself_with_exact_counts() {
    let site = Site::build("full-disk").tmpfs("mnt", "24m");
    let mnt = site.root().join("mnt");
    let site = site
        .status()
        .config(|c| {
            c.gateway.data_dir = mnt.join("data");
            c.store.max_size = ByteSize(16 << 20);
        })
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let mut p = site.publisher();
    let mut sent = 0usize;
    let mut send = |p: &mut Publisher, n: usize| {
        for _ in 0..n {
            let e = Event::new(
                "access",
                &format!("door-{}", sent % 5),
                &format!("full-{sent:07}-padding-the-id-so-rows-take-room"),
                "entry",
            );
            p.send(&e.topic(), e.payload());
            sent += 1;
        }
    };
    send(&mut p, 200);
    p.wait_all_acked(Duration::from_secs(60));

    // The disk fills: intake pauses, nothing is acknowledged, the daemon stays up. Events go
    // on arriving, 200 every 300 ms, until it does.
    fill(&mnt);
    let paused = |port: u16| api_status(port).is_some_and(|s| s["intake"]["paused"] == true);
    let did_pause = wait_every(Duration::from_millis(300), Duration::from_secs(120), || {
        paused(status_port) || {
            send(&mut p, 200);
            false
        }
    });
    assert!(
        did_pause,
        "intake never paused on a full disk after {sent} events; log:\n{}",
        tail(&log, 40)
    );
    let s = api_status(status_port).unwrap();
    assert_eq!(s["intake"]["reason"], "disk_full", "{s}");
    let health = http(status_port, "GET", "/healthz", None).unwrap();
    assert_eq!(health.status, 503);
    assert!(health.text().contains("disk_full"), "{}", health.text());
    let metrics = http(status_port, "GET", "/metrics", None).unwrap().text();
    assert!(
        metrics.contains("zhian_intake_paused{reason=\"disk_full\"} 1"),
        "{metrics}"
    );
    let page = http(status_port, "GET", "/", None).unwrap().text();
    assert!(
        page.contains("data-intake-paused=\"disk_full\""),
        "the page says so"
    );
    assert!(
        site.daemon_exited().is_none(),
        "a full disk never kills the daemon"
    );

    // Space returns: intake resumes by itself.
    fs::remove_file(mnt.join("filler")).unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || !paused(status_port)),
        "intake resumed; log:\n{}",
        tail(&log, 40)
    );
    send(&mut p, 100);
    p.wait_all_acked(Duration::from_secs(120));
    let want = sent as u64;
    assert!(
        wait_until(Duration::from_secs(60), || grand_total(up) == want),
        "upstream counts {} of {want}; log:\n{}",
        grand_total(up),
        tail(&log, 40)
    );
    // Nothing counted twice, even after the batch that failed was retried: the pause is the
    // check (4 s of windows and re-issues that must not change the total).
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(grand_total(up), want);
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
    assert!(site.daemon_exited().is_none(), "the same process all along");
    assert!(!log_text(&log).contains("panicked"));
    let (code, _) = site.term_daemon();
    assert!(code.success());
}

// ---------------------------------------------------------------------------------------------
// The size bound
// ---------------------------------------------------------------------------------------------

/// Bytes the data dir takes, as `du` counts them (allocated blocks) or by file length,
/// whichever is more (a sparse file must not hide a length past the bound).
fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| (m.blocks() * 512).max(m.len()))
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn bounded_store_stays_within_max_size_under_many_times_its_size_in_events() {
    const MAX: u64 = 8 << 20;
    let site = Site::build("bound")
        .status()
        .config(|c| c.store.max_size = ByteSize(MAX))
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let dir = site.data_dir();
    // Watch du of the data dir all along (a sample every 20 ms: the sampling is the check).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let watcher = {
        let (stop, peak, dir) = (stop.clone(), peak.clone(), dir.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(du(&dir), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let n: usize = std::env::var("BOUND_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let mut p = site.publisher();
    let mut payload_bytes = 0u64;
    let mut rng = Rng::new(11);
    let mut ids = std::collections::HashSet::new();
    for i in 0..n {
        // ~5 % redeliveries of a recent id: still exactly one count each.
        let id = if i > 100 && rng.below(20) == 0 {
            i - 1 - rng.below(50)
        } else {
            i
        };
        ids.insert(id);
        let e = Event::new(
            "access",
            &format!("door-{}", id % 9),
            &format!("{id:09}-{}", "x".repeat(110)),
            "entry",
        )
        .subject(&format!("face:{id:09}-{}", "f".repeat(100)));
        let payload = e.payload();
        payload_bytes += payload.len() as u64;
        p.send(&e.topic(), payload);
    }
    p.wait_all_acked(Duration::from_secs(600));
    let unique = ids.len() as u64;
    assert!(
        wait_until(Duration::from_secs(120), || grand_total(up) == unique),
        "upstream counts {} of {unique}; log:\n{}",
        grand_total(up),
        tail(&log, 40)
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "bound: {n} events, {payload_bytes} payload bytes ({:.1}x max_size), peak du {peak} of {MAX}",
        payload_bytes as f64 / MAX as f64
    );
    assert!(
        payload_bytes > 10 * MAX,
        "the load is at least 10x the bound"
    );
    assert!(
        peak <= MAX,
        "data dir peaked at {peak} bytes, over max_size {MAX}"
    );
    let s = api_status(status_port).unwrap();
    assert!(
        s["store"]["dropped"]["raw_events"].as_u64().unwrap() > 0,
        "raw events went first: {s}"
    );
    assert_eq!(s["store"]["dropped"]["summaries"], 0, "{s}");
    let hb = up.latest_heartbeat().unwrap();
    assert!(hb["dropped"]["raw_events"].as_u64().unwrap() > 0, "{hb}");
    assert!(
        up.summary_problems().is_empty(),
        "{:?}",
        up.summary_problems()
    );
    site.term_daemon();
}

#[test]
fn a_disk_full_at_first_start_waits_stops_on_sigterm_and_starts_clean_later() {
    let site = offline_site("first-start-full").tmpfs("mnt", "8m");
    let mnt = site.root().join("mnt");
    fill(&mnt);
    let site = site
        .no_device_broker()
        .config(|c| {
            c.gateway.data_dir = mnt.join("data");
            c.store.on_damage = OnDamage::Refuse;
        })
        .ready(Ready::Started)
        .start();
    let (dir, log) = (site.data_dir(), site.log_path());
    // No room for a store: it waits (retrying every 5 s), does not exit, does not call its own
    // half-made file damaged. The pause is the check: 7 s, more than one retry.
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        site.daemon_exited().is_none(),
        "still waiting; log:\n{}",
        tail(&log, 20)
    );
    assert!(log_text(&log).contains("store cannot be opened"));
    let (code, took) = site.term_daemon();
    assert!(
        code.success(),
        "SIGTERM while waiting for the store: {code:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Space returns: a clean start, nothing quarantined, no exit 74.
    fs::remove_file(mnt.join("filler")).unwrap();
    site.start_daemon();
    let status_port = site.status_port();
    assert!(
        wait_until(Duration::from_secs(30), || api_status(status_port)
            .is_some()),
        "started once there was room; log:\n{}",
        tail(&log, 20)
    );
    assert!(quarantined_files(&dir).is_empty());
    assert!(!log_text(&log).contains("panicked"));
    site.term_daemon();
}

#[test]
fn sigterm_while_the_disk_is_full_stops_in_time_and_loses_nothing() {
    let site = Site::build("term-full").tmpfs("mnt", "24m");
    let mnt = site.root().join("mnt");
    let site = site
        .persistent_device()
        .status()
        .config(|c| {
            c.gateway.data_dir = mnt.join("data");
            c.store.max_size = ByteSize(16 << 20);
        })
        .start();
    let (up, status_port, log) = (site.upstream(), site.status_port(), site.log_path());
    let mut p = site.publisher();
    let mut sent = 0usize;
    fill(&mnt);
    // Events go on arriving, 200 every 200 ms, until intake pauses.
    let did_pause = wait_every(Duration::from_millis(200), Duration::from_secs(120), || {
        if api_status(status_port).is_some_and(|s| s["intake"]["paused"] == true) {
            return true;
        }
        for _ in 0..200 {
            let e = Event::new(
                "access",
                "door-1",
                &format!("tf-{sent:07}-padding-the-id-so-rows-take-room"),
                "entry",
            );
            p.send(&e.topic(), e.payload());
            sent += 1;
        }
        false
    });
    assert!(did_pause, "never paused");
    // A backlog keeps arriving while paused.
    for _ in 0..2000 {
        let e = Event::new("access", "door-1", &format!("tf-{sent:07}"), "entry");
        p.send(&e.topic(), e.payload());
        sent += 1;
    }
    // The site broker holds the whole backlog before the stop.
    p.wait_all_acked(Duration::from_secs(60));
    let (code, took) = site.term_daemon();
    assert!(code.success(), "{code:?}");
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    let lines = log_text(&log).lines().count();
    assert!(lines < 2000, "the log stays readable: {lines} lines");
    // Space returns; the restarted daemon takes what the broker kept: every event once.
    fs::remove_file(mnt.join("filler")).unwrap();
    site.start_daemon();
    p.wait_all_acked(Duration::from_secs(60));
    let want = sent as u64;
    assert!(
        wait_until(Duration::from_secs(90), || grand_total(up) == want),
        "counted {} of {want}; log:\n{}",
        grand_total(up),
        tail(&log, 30)
    );
    // The pause is the check: 3 s in which nothing may be counted twice.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(grand_total(up), want);
    site.term_daemon();
}
