//! End-to-end throughput and memory of the daemon (QoS 1, durable), as ratios to a baseline
//! measured in the same run: the same publishers into the same kind of mosquitto broker, drained
//! by a null QoS 1 subscriber. Run with `cargo bench --bench e2e` (release build).
//!
//! Environment: `BENCH_EVENTS` (default 100000 messages, 10 % of them duplicates),
//! `BENCH_PUBLISHERS` (default 4).

#[path = "../tests/common/mod.rs"]
mod common;

use common::{free_port, Mosquitto, Publisher, Ready, Site};
use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use zhian_gateway::config::Dur;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The workload: `n` messages over 16 doors; every 10th re-sends an earlier id (same door).
fn workload(n: usize, publishers: usize) -> Vec<Vec<(String, Vec<u8>)>> {
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
            r#"{{"id":"evt-{id}","ts":{ts},"action":"{act}","result":"granted","subject":"card:{id}"}}"#,
            ts = now + (id as i64 % 5_000),
            act = if id % 2 == 0 { "entry" } else { "exit" },
        );
        per[i % publishers].push((
            format!("zhian/access/bench-door{}", id % 16),
            payload.into_bytes(),
        ));
    }
    per
}

fn publish_all(port: u16, work: &[Vec<(String, Vec<u8>)>], tag: &str) -> Instant {
    let start = Instant::now();
    let handles: Vec<_> = work
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, msgs)| {
            let tag = tag.to_string();
            thread::spawn(move || {
                let mut p = Publisher::connect(port, &format!("bench-pub-{tag}-{i}"));
                for (topic, payload) in msgs {
                    p.send(&topic, payload);
                }
                p.wait_all_acked(Duration::from_secs(600));
            })
        })
        .collect();
    for h in handles {
        h.join().expect("publisher thread");
    }
    start
}

/// Baseline: a null QoS 1 subscriber drains the same workload from a fresh broker.
fn baseline(dir: &Path, work: &[Vec<(String, Vec<u8>)>], n: usize) -> f64 {
    let port = free_port();
    let _broker = Mosquitto::start(&dir.join("baseline-broker"), port, false);
    let mut opts = MqttOptions::new("bench-null-sub", "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = Client::new(opts, 64);
    client
        .subscribe("zhian/+/+", QoS::AtLeastOnce)
        .expect("subscribe");
    let got = Arc::new(AtomicU64::new(0));
    let done_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let subscribed = Arc::new(AtomicBool::new(false));
    let t = {
        let (got, done_at, subscribed) = (got.clone(), done_at.clone(), subscribed.clone());
        thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        subscribed.store(true, Ordering::SeqCst)
                    }
                    Ok(Event::Incoming(Incoming::Publish(_))) => {
                        if got.fetch_add(1, Ordering::SeqCst) + 1 == n as u64 {
                            *done_at.lock().unwrap() = Some(Instant::now());
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
    let start = publish_all(port, work, "base");
    assert!(common::wait_until(Duration::from_secs(600), || done_at
        .lock()
        .unwrap()
        .is_some()));
    let secs = done_at
        .lock()
        .unwrap()
        .unwrap()
        .duration_since(start)
        .as_secs_f64();
    let _ = client.disconnect();
    let _ = t.join();
    n as f64 / secs
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

struct GatewayRun {
    rate: f64,
    idle_rss_kib: u64,
    peak_rss_kib: u64,
    commits: u64,
    commit_avg_us: u64,
}

/// The daemon between two brokers (its group commit `batch_max`, `batch_linger`); time from the
/// first publish until its heartbeat counters show every message decided (interpolated between
/// heartbeats).
fn gateway(
    name: &str,
    work: &[Vec<(String, Vec<u8>)>],
    n: usize,
    (batch_max, linger): (u32, Dur),
) -> GatewayRun {
    let site = Site::build(name)
        .config(|c| {
            c.aggregate.window = Dur::secs(60);
            c.store.batch_max = batch_max;
            c.store.batch_linger = linger;
        })
        .env("RUST_LOG", "warn")
        .ready(Ready::Upstream)
        .start();
    let (upstream, log, pid) = (site.upstream(), site.log_path(), site.gw().pid());
    assert!(
        common::wait_until(Duration::from_secs(20), || upstream
            .latest_heartbeat()
            .is_some()),
        "no heartbeat from the daemon; log: {}",
        common::tail(&log, 30)
    );
    // Idle RSS after half a second of idling: the measurement's baseline, not a wait.
    thread::sleep(Duration::from_millis(500));
    let idle = rss_kib(pid).unwrap_or(0);
    let peak = Arc::new(AtomicU64::new(idle));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(r) = rss_kib(pid) {
                    peak.fetch_max(r, Ordering::SeqCst);
                }
                // A sample every 50 ms: the sampling is the measurement.
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let start_wall = common::now_ms();
    let start = publish_all(site.device().port, work, "gw");
    let decided = |hb: &serde_json::Value| {
        let c = &hb["counters"];
        c["accepted"].as_u64().unwrap_or(0)
            + c["duplicate"].as_u64().unwrap_or(0)
            + c["rejected"].as_u64().unwrap_or(0)
    };
    assert!(
        common::wait_until(Duration::from_secs(600), || upstream
            .latest_heartbeat()
            .is_some_and(|h| decided(&h) >= n as u64)),
        "daemon did not decide every message; log: {}",
        common::tail(&log, 30)
    );
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let _ = start;
    // Interpolate the completion time between the last heartbeat short of n and the first at n.
    let beats: Vec<(i64, u64, serde_json::Value)> = upstream
        .on("heartbeat")
        .into_iter()
        .map(|m| {
            let v = m.json();
            (m.at_ms, decided(&v), v)
        })
        .collect();
    let after = beats.iter().position(|(_, d, _)| *d >= n as u64).unwrap();
    let (t1, d1, last) = (&beats[after].0, beats[after].1, &beats[after].2);
    let (t0, d0) = if after > 0 {
        (beats[after - 1].0, beats[after - 1].1)
    } else {
        (start_wall, 0)
    };
    let done_ms = if d1 > d0 {
        t0 as f64 + (n as u64 - d0.min(n as u64)) as f64 / (d1 - d0) as f64 * (*t1 - t0) as f64
    } else {
        *t1 as f64
    };
    let secs = ((done_ms - start_wall as f64) / 1000.0).max(0.001);
    let commits = last["counters"]["commits"].as_u64().unwrap_or(0);
    let commit_avg_us = last["counters"]["commit_avg_us"].as_u64().unwrap_or(0);
    site.kill9_daemon();
    GatewayRun {
        rate: n as f64 / secs,
        idle_rss_kib: idle,
        peak_rss_kib: peak.load(Ordering::SeqCst),
        commits,
        commit_avg_us,
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("e2e benchmark: run it with `cargo bench --bench e2e`");
        return;
    }
    let n = env_usize("BENCH_EVENTS", 100_000);
    let publishers = env_usize("BENCH_PUBLISHERS", 4);
    let work = workload(n, publishers);
    let root = tempfile::tempdir().expect("tempdir");
    println!(
        "e2e: {n} QoS 1 messages (10% duplicates) from {publishers} publishers, loopback, {} cores",
        thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(0)
    );
    let base = baseline(&root.path().join("baseline"), &work, n);
    println!("baseline  mosquitto -> null QoS 1 subscriber: {base:>9.0} msg/s");
    let runs = [
        (
            "batch_max 2048, linger 1.8s (default)",
            (2048, Dur::millis(1800)),
        ),
        (
            "batch_max 2048, linger 2ms (before issue 8)",
            (2048, Dur::millis(2)),
        ),
        ("batch_max 2048, linger 0ms", (2048, Dur::millis(0))),
        ("batch_max 256,  linger 2ms", (256, Dur::millis(2))),
        (
            "batch_max 1,    linger 0ms (no group commit)",
            (1, Dur::millis(0)),
        ),
    ];
    for (i, (label, store)) in runs.iter().enumerate() {
        // Without group commit a full run takes minutes: a tenth of the workload is enough.
        let (n_run, work_run) = if store.0 == 1 {
            let m = n / 10;
            (m, workload(m, publishers))
        } else {
            (n, work.clone())
        };
        let r = gateway(&format!("bench-gw-{i}"), &work_run, n_run, *store);
        println!(
            "gateway   {label:<44} {:>9.0} msg/s = {:.2} x baseline; {} commits ({:.0} msg/commit, {:.1} ms avg); RSS idle {:.1} MiB, peak {:.1} MiB",
            r.rate,
            r.rate / base,
            r.commits,
            n_run as f64 / r.commits.max(1) as f64,
            r.commit_avg_us as f64 / 1000.0,
            r.idle_rss_kib as f64 / 1024.0,
            r.peak_rss_kib as f64 / 1024.0,
        );
    }
}
