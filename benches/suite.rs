//! The performance suite: every figure of BENCHMARKS.md's summary table, each against a
//! baseline measured in the same run where one exists. Starts its own mosquitto brokers on
//! loopback, runs the release binary, prints a Markdown table; never gates CI.
//!
//! `cargo bench --bench suite` (about 4 minutes on 2 cores). Environment: `SUITE_EVENTS`
//! (default 100000 messages for the ingest phases), `SUITE_STORED` (default 1000000 raw events
//! for the start-up phases), `SUITE_SUMMARIES` (default 10000 for the drain phase).
//!
//! Phases:
//! 1. ingest: the same QoS 1 workload (10 % duplicates, 4 publishers) into a mosquitto drained
//!    by a null QoS 1 subscriber (the baseline: the physical limit of the setup), then through
//!    the daemon, durable; rates, CPU seconds per 100k events of the daemon and the broker, the
//!    daemon's peak RSS and its RSS 10 s after;
//! 2. 1,000 devices: the same with device ids spread over 1,000 doors;
//! 3. start-up with `SUITE_STORED` raw events in the store, after a clean stop and after a
//!    kill -9 (time from spawn to `/healthz` 200), and the RSS with that backlog held;
//! 4. drain: `SUITE_SUMMARIES` summaries waiting in the store, the district broker up: time
//!    until all are PUBACKed, against `mosquitto_pub -q 1 -l` sending as many lines of the same
//!    size to the same broker;
//! 5. quiet hour: 50 events/s for 30 s, the daemon's CPU as a share of one core.

#[path = "../tests/common/mod.rs"]
mod common;

use common::http::http;
use common::{free_port, Mosquitto, Publisher, Ready, Site, SiteBuilder};
use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use zhian_gateway::config::{ByteSize, Config, Dur};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Anonymous resident memory (heap, stacks): the RSS less the binary's file-backed pages,
/// which are shared and which the kernel can drop and reread under memory pressure.
fn anon_kib(pid: u32) -> u64 {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples a process's RSS every 20 ms until dropped; `peak()` is the highest seen.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    t: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let t = {
            let (peak, stop) = (peak.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_kib(pid), Ordering::SeqCst);
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssSampler {
            peak,
            stop,
            t: Some(t),
        }
    }
    fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

/// `n` messages over `doors` doors from `publishers` publishers; every 10th re-sends an
/// earlier id of the same door (a duplicate).
fn workload(n: usize, publishers: usize, doors: usize, tag: &str) -> Vec<Vec<(String, Vec<u8>)>> {
    let now = common::now_ms();
    let mut per: Vec<Vec<(String, Vec<u8>)>> = vec![Vec::new(); publishers];
    let mut unique = 0usize;
    for i in 0..n {
        let id = if i % 10 == 9 && unique > 0 {
            unique - 1 - (i % 7).min(unique - 1)
        } else {
            unique += 1;
            unique - 1
        };
        let payload = format!(
            r#"{{"id":"{tag}-{id}","ts":{ts},"action":"{act}","result":"granted","subject":"card:{id}"}}"#,
            ts = now + (id as i64 % 5_000),
            act = if id % 2 == 0 { "entry" } else { "exit" },
        );
        per[i % publishers].push((
            format!("zhian/access/door-{}", id % doors),
            payload.into_bytes(),
        ));
    }
    per
}

fn publish_all(port: u16, work: &[Vec<(String, Vec<u8>)>], tag: &str) {
    let handles: Vec<_> = work
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, msgs)| {
            let tag = tag.to_string();
            thread::spawn(move || {
                let mut p = Publisher::connect(port, &format!("suite-pub-{tag}-{i}"));
                for (topic, payload) in msgs {
                    p.send(&topic, payload);
                }
                p.wait_all_acked(Duration::from_secs(600));
            })
        })
        .collect();
    for h in handles {
        h.join().expect("publisher");
    }
}

/// The baseline of phase 1: msg/s into a broker drained by a null QoS 1 subscriber, and the
/// broker's CPU seconds.
fn null_subscriber(dir: &Path, work: &[Vec<(String, Vec<u8>)>], n: usize) -> (f64, f64) {
    let port = free_port();
    let broker = Mosquitto::start(&dir.join("baseline-broker"), port, false);
    let mut opts = MqttOptions::new("suite-null-sub", "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 64);
    client
        .subscribe("zhian/+/+", QoS::AtLeastOnce)
        .expect("subscribe");
    let got = Arc::new(AtomicU64::new(0));
    let subscribed = Arc::new(AtomicBool::new(false));
    let t = {
        let (got, subscribed) = (got.clone(), subscribed.clone());
        thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        subscribed.store(true, Ordering::SeqCst)
                    }
                    Ok(Event::Incoming(Incoming::Publish(_))) => {
                        if got.fetch_add(1, Ordering::SeqCst) + 1 == n as u64 {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => thread::sleep(Duration::from_millis(50)),
                }
            }
        })
    };
    assert!(common::wait_until(Duration::from_secs(10), || subscribed
        .load(Ordering::SeqCst)));
    let bpid = broker.pid().expect("broker pid");
    let cpu0 = cpu_secs(bpid);
    let start = Instant::now();
    publish_all(port, work, "base");
    t.join().expect("null subscriber");
    let secs = start.elapsed().as_secs_f64();
    let _ = client.disconnect();
    (n as f64 / secs, cpu_secs(bpid) - cpu0)
}

/// The release daemon with its status page, between a site and a district broker.
/// A site for the suite: both brokers (no collector), the daemon with its status page, 60 s
/// windows and a heartbeat a minute, logging at WARN; `edit` changes its config.
fn bench_site(name: &str, edit: impl FnOnce(&mut Config)) -> SiteBuilder {
    Site::build(name)
        .no_collector()
        .status()
        .config(|c| {
            c.aggregate.window = Dur::secs(60);
            c.upstream.heartbeat = Dur::secs(60);
            edit(c);
        })
        .env("RUST_LOG", "warn")
}

/// accepted + duplicate + rejected, from /metrics.
fn decided(status: u16) -> u64 {
    let Ok(r) = http(status, "GET", "/metrics", None) else {
        return 0;
    };
    r.text()
        .lines()
        .filter(|l| l.starts_with("zhian_events_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn metric(status: u16, name: &str) -> Option<f64> {
    let r = http(status, "GET", "/metrics", None).ok()?;
    r.text()
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

struct Ingest {
    rate: f64,
    cpu_per_100k: f64,
    broker_cpu_per_100k: f64,
    peak_rss_kib: u64,
    after_rss_kib: u64,
    after_anon_kib: u64,
    idle_rss_kib: u64,
}

/// The daemon through one workload: from the first publish until /metrics shows every message
/// decided (polled every 100 ms).
fn ingest(name: &str, work: &[Vec<(String, Vec<u8>)>], n: usize) -> Ingest {
    let site = bench_site(name, |_| {}).ready(Ready::Healthz).start();
    // Idle RSS after half a second of idling: the measurement's baseline, not a wait.
    thread::sleep(Duration::from_millis(500));
    let (pid, status) = (site.gw().pid(), site.status_port());
    let idle = rss_kib(pid);
    let sampler = RssSampler::start(pid);
    let bpid = site.device().pid().expect("site broker pid");
    let (cpu0, bcpu0) = (cpu_secs(pid), cpu_secs(bpid));
    let start = Instant::now();
    let port = site.device().port;
    let pubs = {
        let work = work.to_vec();
        thread::spawn(move || publish_all(port, &work, "gw"))
    };
    assert!(
        common::wait_until(Duration::from_secs(600), || decided(status) >= n as u64),
        "the daemon did not decide every message"
    );
    let secs = start.elapsed().as_secs_f64();
    let (cpu, bcpu) = (cpu_secs(pid) - cpu0, cpu_secs(bpid) - bcpu0);
    pubs.join().expect("publishers");
    let peak = sampler.peak();
    drop(sampler);
    // The steady RSS is measured after 10 s of idling: the figure, not a wait.
    thread::sleep(Duration::from_secs(10));
    Ingest {
        rate: n as f64 / secs,
        cpu_per_100k: cpu * 100_000.0 / n as f64,
        broker_cpu_per_100k: bcpu * 100_000.0 / n as f64,
        peak_rss_kib: peak,
        after_rss_kib: rss_kib(pid),
        after_anon_kib: anon_kib(pid),
        idle_rss_kib: idle,
    }
}

/// Fill a store with `n` raw events (and their windows), as the daemon with this config would
/// have, through the library's writer in batches of 10,000.
fn fill_store(cfg: &Config, n: usize) {
    let engine = zhian_gateway::engine_for(cfg);
    let (_s, mut w) =
        zhian_gateway::store::Store::open(&cfg.gateway.data_dir, cfg.privacy.subjects)
            .expect("open store");
    let now = common::now_ms();
    let start = now - 6 * 86_400_000;
    let step = (6 * 86_400_000 / n.max(1)) as i64;
    let mut i = 0usize;
    while i < n {
        let batch: Vec<zhian_gateway::core::event::Event> = (i..(i + 10_000).min(n))
            .map(|k| {
                let ts = start + k as i64 * step;
                zhian_gateway::core::event::Event {
                    kind: zhian_gateway::core::event::Kind::Access,
                    device: format!("door-{}", k % 20),
                    id: format!("fill-{k}"),
                    ts_ms: ts,
                    action: "entry".into(),
                    result: "granted".into(),
                    subject: Some(format!("card:{k}")),
                }
            })
            .collect();
        let refs: Vec<&zhian_gateway::core::event::Event> = batch.iter().collect();
        let at = batch.last().map_or(now, |e| e.ts_ms + 1);
        w.commit(&engine, &refs, &[], at.min(now), None)
            .expect("commit");
        i += 10_000;
    }
}

struct Startup {
    clean_ms: f64,
    after_kill_ms: f64,
    rss_kib: u64,
    anon_kib: u64,
    file_bytes: u64,
}

fn startup(name: &str, n: usize) -> Startup {
    // A week of raw events kept (raw_retention 7 d), dedup keys for the default 24 h.
    let site = bench_site(name, |c| {
        c.store.raw_retention = Dur::secs(7 * 86_400);
        c.store.max_size = ByteSize(4 << 30);
    })
    .unstarted()
    .start();
    fill_store(&site.gw().config, n);
    let file_bytes = std::fs::metadata(site.data_dir().join("zhian.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let status = site.status_port();
    let healthy = || http(status, "GET", "/healthz", None).is_ok_and(|r| r.status == 200);
    let time_start = || -> f64 {
        let t0 = Instant::now();
        site.start_daemon();
        // Polled every 5 ms: the figure is in tens of milliseconds.
        assert!(
            common::wait_every(Duration::from_millis(5), Duration::from_secs(300), healthy),
            "daemon did not come up"
        );
        t0.elapsed().as_secs_f64() * 1000.0
    };
    // A first start after the fill (it may migrate or compact): not measured.
    time_start();
    site.term_daemon();
    let clean_ms = time_start();
    // The RSS with the backlog held, after 2 s of idling: the figure, not a wait.
    thread::sleep(Duration::from_secs(2));
    let pid = site.gw().pid();
    let rss = rss_kib(pid);
    let anon = anon_kib(pid);
    site.kill9_daemon(); // SIGKILL: the file is left unclean
    let after_kill_ms = time_start();
    site.term_daemon();
    Startup {
        clean_ms,
        after_kill_ms,
        rss_kib: rss,
        anon_kib: anon,
        file_bytes,
    }
}

/// Phase 4: `n` summaries waiting (one event in each of `n` closed 60 s windows), then the
/// district broker reachable: seconds until the outbox is empty. Baseline: mosquitto_pub -q 1
/// -l with `n` lines of the same size to the same broker.
fn drain(name: &str, n: usize) -> (f64, f64) {
    let mut site = bench_site(name, |c| {
        c.aggregate.max_lateness = Dur::secs(30 * 86_400);
        c.store.max_size = ByteSize(4 << 30);
        c.dedup.ttl = Dur::secs(30 * 86_400);
    })
    .unstarted()
    .start();
    let (district_port, status) = (site.district().port, site.status_port());
    let cfg = site.gw().config.clone();
    let engine = zhian_gateway::engine_for(&cfg);
    let payload_len;
    {
        let (s, mut w) =
            zhian_gateway::store::Store::open(&cfg.gateway.data_dir, cfg.privacy.subjects)
                .expect("open store");
        let now = common::now_ms();
        let first = (now - (n as i64 + 10) * 60_000) / 60_000 * 60_000;
        let mut i = 0;
        while i < n {
            let evs: Vec<zhian_gateway::core::event::Event> = (i..(i + 1000).min(n))
                .map(|k| zhian_gateway::core::event::Event {
                    kind: zhian_gateway::core::event::Kind::Access,
                    device: "door-1".into(),
                    id: format!("drain-{k}"),
                    ts_ms: first + k as i64 * 60_000,
                    action: "entry".into(),
                    result: "granted".into(),
                    subject: None,
                })
                .collect();
            let refs: Vec<_> = evs.iter().collect();
            w.commit(&engine, &refs, &[], now, None).expect("commit");
            i += 1000;
        }
        // Close every window.
        w.commit(&engine, &[], &[], now, None).expect("close");
        let o = s.overview().expect("overview");
        assert!(
            o.pending_summaries >= n as u64,
            "{} summaries pending",
            o.pending_summaries
        );
        payload_len = s
            .outbox_after(1, None, 1)
            .ok()
            .and_then(|v| v.first().map(|(_, r)| r.payload.len()))
            .unwrap_or(300);
    }
    // Rates as a subscriber on the district broker sees them: messages over the time from the
    // first to the last arrival (so neither the daemon's reconnect backoff nor mosquitto_pub's
    // start-up counts).
    let arrival_rate = |up: &common::Upstream, suffix: &str| -> Option<f64> {
        let at: Vec<i64> = up
            .messages()
            .iter()
            .filter(|m| m.topic.ends_with(suffix))
            .map(|m| m.at_ms)
            .collect();
        (at.len() >= n).then(|| {
            let span = (at.iter().max().unwrap() - at.iter().min().unwrap()).max(1);
            (at.len() - 1) as f64 * 1000.0 / span as f64
        })
    };
    // Baseline: mosquitto_pub -l, one QoS 1 message per line, the same size, the same broker.
    let up = common::Upstream::start(district_port, "suite-drain-base");
    let lines: String = (0..n)
        .map(|i| format!("{:0>width$}\n", i, width = payload_len))
        .collect();
    let mut p = Command::new("mosquitto_pub")
        .args([
            "-p",
            &district_port.to_string(),
            "-q",
            "1",
            "-t",
            "zhian/district/bench/drain",
            "-l",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    {
        use std::io::Write;
        p.stdin.take().unwrap().write_all(lines.as_bytes()).unwrap();
    }
    assert!(p.wait().unwrap().success());
    assert!(common::wait_until(Duration::from_secs(120), || {
        arrival_rate(&up, "/bench/drain").is_some()
    }));
    let base = arrival_rate(&up, "/bench/drain").unwrap();
    drop(up);
    // The daemon: start with the district broker stopped so the backlog is all there, then
    // bring the broker back.
    site.district_mut().stop();
    site.start_daemon();
    assert!(common::wait_until(Duration::from_secs(120), || metric(
        status,
        "zhian_outbox_pending"
    )
    .is_some_and(|p| p >= n as f64)));
    site.district_mut().start_again();
    let up = common::Upstream::start(district_port, "suite-drain-gw");
    assert!(
        common::wait_until(Duration::from_secs(600), || arrival_rate(&up, "/summary")
            .is_some()),
        "backlog not drained"
    );
    let rate = arrival_rate(&up, "/summary").unwrap();
    site.term_daemon();
    (rate, base)
}

/// Phase 5: 50 events/s for 30 s: the daemon's CPU as a share of one core.
fn quiet(name: &str) -> f64 {
    let site = bench_site(name, |_| {}).ready(Ready::Healthz).start();
    let pid = site.gw().pid();
    let mut p = site.publisher();
    // CPU is measured from 2 s after the start-up settled: the measurement's baseline.
    thread::sleep(Duration::from_secs(2));
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let now = common::now_ms();
    let mut i = 0u64;
    while t0.elapsed() < Duration::from_secs(30) {
        // The scenario's rate: an event every 20 ms of wall time.
        let due = t0 + Duration::from_millis(i * 20);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        let payload = format!(
            r#"{{"id":"q-{i}","ts":{},"action":"entry","result":"granted"}}"#,
            now + i as i64 * 20
        );
        p.send(
            &format!("zhian/access/door-{}", i % 20),
            payload.into_bytes(),
        );
        i += 1;
    }
    let secs = t0.elapsed().as_secs_f64();
    let share = (cpu_secs(pid) - cpu0) / secs;
    let _ = metric(site.status_port(), "zhian_store_bytes");
    share
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("suite: run it with `cargo bench --bench suite`");
        return;
    }
    let n = env_usize("SUITE_EVENTS", 100_000);
    let stored = env_usize("SUITE_STORED", 1_000_000);
    let summaries = env_usize("SUITE_SUMMARIES", 10_000);
    let root = tempfile::tempdir().expect("tempdir");
    let cores = thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(0);
    println!(
        "suite: {cores} cores, {n} events per ingest phase, {stored} stored, {summaries} summaries"
    );
    // SUITE_ONLY=drain,quiet (say) runs those phases only (the table then has only theirs).
    let only = std::env::var("SUITE_ONLY").ok();
    let want = |p: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == p));
    if !want("ingest") {
        if want("drain") {
            let (r, b) = drain("suite-drain", summaries);
            println!("4 drain {summaries} summaries: {r:.0} msg/s vs mosquitto_pub -q 1 -l {b:.0} msg/s ({:.2})", r / b);
        }
        if want("startup") {
            let s = startup("suite-startup", stored);
            println!(
                "3 start-up: clean {:.0} ms, after kill -9 {:.0} ms, RSS {} KiB",
                s.clean_ms, s.after_kill_ms, s.rss_kib
            );
        }
        return;
    }
    let phase = |name: &str| {
        let d = root.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };

    let work = workload(n, 4, 16, "a");
    let (base, base_broker_cpu) = null_subscriber(&phase("baseline"), &work, n);
    println!(
        "1 baseline null subscriber: {base:.0} msg/s, broker {:.2} CPU s/100k",
        base_broker_cpu * 100_000.0 / n as f64
    );
    let a = ingest("suite-ingest", &work, n);
    println!(
        "1 daemon: {:.0} msg/s ({:.2} of baseline), daemon {:.2} CPU s/100k, broker {:.2} CPU s/100k, RSS idle {} / peak {} / 10 s after {} KiB",
        a.rate,
        a.rate / base,
        a.cpu_per_100k,
        a.broker_cpu_per_100k,
        a.idle_rss_kib,
        a.peak_rss_kib,
        a.after_rss_kib
    );
    let work1k = workload(n, 4, 1000, "b");
    let b = ingest("suite-devices1000", &work1k, n);
    println!(
        "2 1,000 devices: {:.0} msg/s ({:.2} of baseline), RSS peak {} / 10 s after {} KiB",
        b.rate,
        b.rate / base,
        b.peak_rss_kib,
        b.after_rss_kib
    );
    let s = startup("suite-startup", stored);
    println!(
        "3 start-up with {stored} stored events ({:.0} MiB file): clean stop {:.0} ms, after kill -9 {:.0} ms, RSS with the backlog {} KiB",
        s.file_bytes as f64 / 1048576.0,
        s.clean_ms,
        s.after_kill_ms,
        s.rss_kib
    );
    // Three runs (a 10,000-message drain takes a fraction of a second): the median ratio.
    let mut drains: Vec<(f64, f64)> = (0..3)
        .map(|i| drain(&format!("suite-drain{i}"), summaries))
        .collect();
    drains.sort_by(|a, b| (a.0 / a.1).total_cmp(&(b.0 / b.1)));
    for (r, b) in &drains {
        println!("4 drain run: {r:.0} msg/s vs {b:.0} msg/s ({:.2})", r / b);
    }
    let (drain_rate, drain_base) = drains[1];
    println!(
        "4 drain {summaries} summaries: {drain_rate:.0} msg/s vs mosquitto_pub -q 1 -l {drain_base:.0} msg/s ({:.2})",
        drain_rate / drain_base
    );
    let q = quiet("suite-quiet");
    println!("5 quiet hour (50 events/s): {:.2} % of one core", q * 100.0);

    println!();
    println!("| figure | measured | baseline (same run) | ratio | target |");
    println!("|---|---:|---:|---:|---|");
    println!("| durable ingest, 16 doors | {:.0} msg/s | {base:.0} msg/s (null QoS 1 subscriber) | {:.2} | ≥ 0.95 |", a.rate, a.rate / base);
    println!("| CPU per 100k events: daemon / broker | {:.2} s / {:.2} s | broker alone {:.2} s | — | — |", a.cpu_per_100k, a.broker_cpu_per_100k, base_broker_cpu * 100_000.0 / n as f64);
    println!(
        "| peak RSS at full speed | {:.1} MiB | — | — | ≤ 24 MiB |",
        a.peak_rss_kib as f64 / 1024.0
    );
    println!("| steady RSS (10 s after), of it anonymous | {:.1} MiB, {:.1} MiB | idle before: {:.1} MiB | — | ≤ 16 MiB |", a.after_rss_kib as f64 / 1024.0, a.after_anon_kib as f64 / 1024.0, a.idle_rss_kib as f64 / 1024.0);
    println!(
        "| durable ingest, 1,000 devices | {:.0} msg/s | {base:.0} msg/s | {:.2} | — |",
        b.rate,
        b.rate / base
    );
    println!(
        "| peak RSS, 1,000 devices | {:.1} MiB | — | — | ≤ 24 MiB |",
        b.peak_rss_kib as f64 / 1024.0
    );
    println!("| RSS with {stored} events stored, of it anonymous | {:.1} MiB, {:.1} MiB | — | — | ≤ 16 MiB |", s.rss_kib as f64 / 1024.0, s.anon_kib as f64 / 1024.0);
    println!(
        "| start-up, {stored} stored, clean stop | {:.0} ms | — | — | ≤ 300 ms |",
        s.clean_ms
    );
    println!(
        "| start-up, {stored} stored, after kill -9 | {:.0} ms | — | — | ≤ 2,000 ms |",
        s.after_kill_ms
    );
    println!("| drain {summaries} summaries (median of 3) | {drain_rate:.0} msg/s | {drain_base:.0} msg/s (mosquitto_pub -q 1) | {:.2} | ≥ 0.8 |", drain_rate / drain_base);
    println!(
        "| CPU at 50 events/s | {:.2} % of a core | — | — | < 1 % |",
        q * 100.0
    );
}
