//! The receiver's operations surface (contract: "Receiver operations"): what the tasks report
//! ([`Ops`]), `/healthz` (200 while subscribed and the database takes writes; 503 with the
//! reason `migrating`, `database` or `broker` otherwise) and `/metrics` (Prometheus text).
//!
//! The tasks write plain atomics and short-held mutexes; the HTTP side only reads them, so a
//! slow scrape never holds up a batch.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// Upper bounds (seconds) of the batch duration histogram.
const BATCH_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Everything `/healthz` and `/metrics` show, written by the receiver's tasks.
#[derive(Debug)]
pub struct Ops {
    /// True until the schema is migrated.
    pub migrating: AtomicBool,
    /// Why the database does not take writes (`None` while it does).
    db_down: Mutex<Option<String>>,
    /// Connected to the district broker with the shared subscription granted.
    pub subscribed: AtomicBool,
    /// Why the broker link is down (`None` while it is up).
    broker_down: Mutex<Option<String>>,
    /// `(topic_kind, outcome)` -> messages.
    messages: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Database errors by kind ([`super::errors::Fault::kind`]).
    db_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Batch durations: counts per bucket (cumulative at render), sum, count.
    batch: Mutex<([u64; BATCH_BUCKETS.len()], f64, u64)>,
    /// Arrival times of messages received and not yet committed, oldest first (the database
    /// task handles messages in arrival order).
    unacked: Mutex<VecDeque<Instant>>,
    /// Unix seconds of the last message received (0: none yet).
    pub last_message_secs: AtomicI64,
    /// Gateways by state (`online`, `offline`, `silent`), from the last roll-call.
    gateways: Mutex<BTreeMap<&'static str, i64>>,
    /// Receivers of this group: live and stale, from the last roll-call.
    pub receivers_live: AtomicI64,
    pub receivers_stale: AtomicI64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// When the batch being written began (`None` between batches).
    batch_started: Mutex<Option<Instant>>,
    /// A batch writing longer than this makes `/healthz` say `database` (a lock held
    /// elsewhere, a hung server, a partition without a reset: no statement fails, nothing
    /// commits).
    pub stuck_after: Mutex<std::time::Duration>,
}

impl Default for Ops {
    fn default() -> Self {
        Ops {
            migrating: AtomicBool::new(true),
            db_down: Mutex::new(Some("not connected yet".into())),
            subscribed: AtomicBool::new(false),
            broker_down: Mutex::new(Some("not connected yet".into())),
            messages: Mutex::default(),
            db_errors: Mutex::default(),
            batch: Mutex::new(([0; BATCH_BUCKETS.len()], 0.0, 0)),
            unacked: Mutex::default(),
            last_message_secs: AtomicI64::new(0),
            gateways: Mutex::default(),
            receivers_live: AtomicI64::new(0),
            receivers_stale: AtomicI64::new(0),
            batches: AtomicU64::new(0),
            batch_started: Mutex::new(None),
            stuck_after: Mutex::new(std::time::Duration::from_secs(30)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ops {
    /// The database takes writes again (`None`) or does not, and why.
    pub fn set_db_down(&self, why: Option<String>) {
        *lock(&self.db_down) = why;
    }

    /// Why the database does not take writes: what the last error said, or a batch that has
    /// been writing for longer than `stuck_after`.
    pub fn db_down(&self) -> Option<String> {
        if let Some(why) = lock(&self.db_down).clone() {
            return Some(why);
        }
        let started = *lock(&self.batch_started);
        let limit = *lock(&self.stuck_after);
        started
            .map(|t| t.elapsed())
            .filter(|e| *e > limit)
            .map(|e| {
                format!(
                    "stuck: a batch has not committed for {} s (a lock held elsewhere? a hung server?)",
                    e.as_secs()
                )
            })
    }

    /// A batch began writing (`true`) or finished (`false`).
    pub fn batch_writing(&self, writing: bool) {
        *lock(&self.batch_started) = writing.then(Instant::now);
    }

    pub fn set_broker_down(&self, why: Option<String>) {
        self.subscribed.store(why.is_none(), Relaxed);
        *lock(&self.broker_down) = why;
    }

    pub fn db_error(&self, kind: &'static str) {
        *lock(&self.db_errors).entry(kind).or_insert(0) += 1;
    }

    pub fn message(&self, topic_kind: &'static str, outcome: &'static str) {
        *lock(&self.messages)
            .entry((topic_kind, outcome))
            .or_insert(0) += 1;
    }

    pub fn batch_took(&self, secs: f64) {
        let mut b = lock(&self.batch);
        if let Some(i) = BATCH_BUCKETS.iter().position(|le| secs <= *le) {
            b.0[i] += 1;
        }
        b.1 += secs;
        b.2 += 1;
    }

    /// A message arrived (MQTT task).
    pub fn received(&self, now_secs: i64) {
        lock(&self.unacked).push_back(Instant::now());
        self.last_message_secs.store(now_secs, Relaxed);
    }

    /// `n` messages were committed (or rejected) and handed to the acker (database task).
    pub fn done(&self, n: usize) {
        let mut u = lock(&self.unacked);
        let n = n.min(u.len());
        u.drain(..n);
    }

    /// Seconds since the oldest message not yet committed arrived (0 when none).
    pub fn oldest_unacked_secs(&self) -> f64 {
        lock(&self.unacked)
            .front()
            .map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    pub fn set_gateways(&self, by_state: BTreeMap<&'static str, i64>) {
        *lock(&self.gateways) = by_state;
    }

    /// `/healthz`: `Ok` or the reason it is not healthy.
    pub fn health(&self) -> Result<(), String> {
        if self.migrating.load(Relaxed) {
            return Err(match self.db_down() {
                Some(why) => format!("migrating: database: {why}"),
                None => "migrating".into(),
            });
        }
        if let Some(why) = self.db_down() {
            return Err(format!("database: {why}"));
        }
        if !self.subscribed.load(Relaxed) {
            let why = lock(&self.broker_down)
                .clone()
                .unwrap_or_else(|| "not subscribed".into());
            return Err(format!("broker: {why}"));
        }
        Ok(())
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut o = String::with_capacity(4096);
        let family = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut o,
            "zhian_district_messages_total",
            "counter",
            "Messages taken from the district broker, by topic kind and outcome (kept or rejected), counted once committed",
        );
        let msgs = lock(&self.messages).clone();
        if msgs.is_empty() {
            let _ = writeln!(
                o,
                "zhian_district_messages_total{{topic_kind=\"summary\",outcome=\"kept\"}} 0"
            );
        }
        for ((k, out), n) in msgs {
            let _ = writeln!(
                o,
                "zhian_district_messages_total{{topic_kind=\"{k}\",outcome=\"{out}\"}} {n}"
            );
        }
        family(
            &mut o,
            "zhian_district_batch_seconds",
            "histogram",
            "Time to commit one batch (one transaction), seconds",
        );
        let (buckets, sum, count) = *lock(&self.batch);
        let mut cum = 0;
        for (le, n) in BATCH_BUCKETS.iter().zip(buckets) {
            cum += n;
            let _ = writeln!(
                o,
                "zhian_district_batch_seconds_bucket{{le=\"{le}\"}} {cum}"
            );
        }
        let _ = writeln!(
            o,
            "zhian_district_batch_seconds_bucket{{le=\"+Inf\"}} {count}\n\
             zhian_district_batch_seconds_sum {sum}\nzhian_district_batch_seconds_count {count}"
        );
        family(
            &mut o,
            "zhian_district_db_errors_total",
            "counter",
            "Database errors by kind: connection, disk_full, read_only, timeout, resources, conflict, refused_value, other",
        );
        let errs = lock(&self.db_errors).clone();
        for kind in super::errors::KINDS {
            let n = errs.get(kind).copied().unwrap_or(0);
            let _ = writeln!(o, "zhian_district_db_errors_total{{kind=\"{kind}\"}} {n}");
        }
        family(
            &mut o,
            "zhian_district_oldest_unacked_seconds",
            "gauge",
            "Age of the oldest message received and not yet committed and acknowledged (0: none)",
        );
        let _ = writeln!(
            o,
            "zhian_district_oldest_unacked_seconds {:.3}",
            self.oldest_unacked_secs()
        );
        family(
            &mut o,
            "zhian_district_gateways",
            "gauge",
            "Gateways by state in gateway_state: online, offline (by epoch), silent (no heartbeat within silent_after)",
        );
        let gw = lock(&self.gateways).clone();
        for state in ["online", "offline", "silent"] {
            let n = gw.get(state).copied().unwrap_or(0);
            let _ = writeln!(o, "zhian_district_gateways{{state=\"{state}\"}} {n}");
        }
        family(
            &mut o,
            "zhian_district_database_up",
            "gauge",
            "1 while the database takes writes",
        );
        let _ = writeln!(
            o,
            "zhian_district_database_up {}",
            i32::from(self.db_down().is_none() && !self.migrating.load(Relaxed))
        );
        family(
            &mut o,
            "zhian_district_broker_connected",
            "gauge",
            "1 while connected to the district broker with the shared subscription granted",
        );
        let _ = writeln!(
            o,
            "zhian_district_broker_connected {}",
            i32::from(self.subscribed.load(Relaxed))
        );
        family(
            &mut o,
            "zhian_district_last_message_timestamp_seconds",
            "gauge",
            "Unix time of the last message received (0: none yet)",
        );
        let _ = writeln!(
            o,
            "zhian_district_last_message_timestamp_seconds {}",
            self.last_message_secs.load(Relaxed)
        );
        family(
            &mut o,
            "zhian_district_receivers",
            "gauge",
            "Receivers of this group in the roll-call: live, or stale (no roll-call for 2 min: its broker session may hold its share of the messages)",
        );
        let _ = writeln!(
            o,
            "zhian_district_receivers{{state=\"live\"}} {}\nzhian_district_receivers{{state=\"stale\"}} {}",
            self.receivers_live.load(Relaxed),
            self.receivers_stale.load(Relaxed)
        );
        family(
            &mut o,
            "zhian_district_build_info",
            "gauge",
            "The receiver's version",
        );
        let _ = writeln!(
            o,
            "zhian_district_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        o
    }
}

async fn healthz(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    match ops.health() {
        Ok(()) => (StatusCode::OK, "ok\n".to_string()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(ops): State<Arc<Ops>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ops.render(),
    )
}

/// Serve `/healthz` and `/metrics` on `listener` until `stop`.
pub async fn serve(listener: tokio::net::TcpListener, ops: Arc<Ops>, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(ops);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "district receiver: /healthz and /metrics listening");
    }
    // The status page's listener: at most 64 connections (8 per address), each answered within
    // 5 s or closed, so idle connections cannot take the file descriptors the database
    // connection needs (found by a break-it run: 1,100 idle sockets stopped the reconnect).
    let limited = zhian_common::listener::Limited::new(listener, 64);
    if let Err(e) = axum::serve(
        limited,
        app.into_make_service_with_connect_info::<zhian_common::listener::Peer>(),
    )
    .with_graceful_shutdown(stop.cancelled_owned())
    .await
    {
        tracing::warn!(error = %e, "district receiver: status listener stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_names_the_first_reason() {
        let o = Ops::default();
        assert!(o.health().unwrap_err().starts_with("migrating"));
        o.migrating.store(false, Relaxed);
        assert!(o.health().unwrap_err().starts_with("database"));
        o.set_db_down(None);
        assert!(o.health().unwrap_err().starts_with("broker"));
        o.set_broker_down(None);
        assert_eq!(o.health(), Ok(()));
        o.set_db_down(Some("disk_full: could not extend file".into()));
        assert_eq!(
            o.health().unwrap_err(),
            "database: disk_full: could not extend file"
        );
        o.set_db_down(None);
        *lock(&o.stuck_after) = std::time::Duration::ZERO;
        o.batch_writing(true);
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(o.health().unwrap_err().starts_with("database: stuck"));
        o.batch_writing(false);
        assert_eq!(o.health(), Ok(()));
    }

    #[test]
    fn unacked_age_follows_arrival_order() {
        let o = Ops::default();
        assert_eq!(o.oldest_unacked_secs(), 0.0);
        o.received(1);
        o.received(2);
        assert!(o.oldest_unacked_secs() >= 0.0);
        o.done(1);
        assert_eq!(lock(&o.unacked).len(), 1);
        o.done(5);
        assert_eq!(o.oldest_unacked_secs(), 0.0);
        o.batch_took(0.02);
        let text = o.render();
        assert!(text.contains("zhian_district_batch_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("zhian_district_batch_seconds_count 1"));
        assert!(text.contains("zhian_district_last_message_timestamp_seconds 2"));
    }
}
