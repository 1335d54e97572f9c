//! The local status page, JSON API, health check and Prometheus metrics (axum), read-only.
//!
//! `GET /` is a server-rendered page, Chinese by default (`?lang=en` English), with no resource
//! from the internet: inline CSS and an inline SVG chart. `GET /api/status` is the same data as
//! JSON. `GET /healthz` answers 200 while every core task runs, 503 otherwise. `GET /metrics` is
//! Prometheus text (prometheus-client). With `status.username`/`status.password_hash` set, all
//! but `/healthz` need HTTP Basic auth. A connection limit and a per-request timeout keep a
//! misbehaving client on the LAN away from the pipeline; store reads run on blocking threads.

use crate::clock::now_ms;
use crate::config::{parse_utc_offset, Config};
use crate::core::event::Kind;
use crate::core::summary::rfc3339_utc;
use crate::stats::Stats;
use crate::store::Store;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// A request that takes longer than this is answered 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct AppState {
    cfg: Arc<Config>,
    store: Arc<Store>,
    stats: Arc<Stats>,
    registry: Arc<Registry>,
    /// Keyed BLAKE3 of the last credentials that verified, so argon2 runs once, not per request.
    verified: Arc<Mutex<Option<blake3::Hash>>>,
    /// Password verifications allowed at once.
    verify_permits: Arc<Semaphore>,
}

/// Bind the status listener (before anything else starts talking to the network).
pub async fn bind(cfg: &Config) -> io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(&cfg.status.listen).await
}

/// Serve until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: Arc<Config>,
    store: Arc<Store>,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut registry = Registry::default();
    registry.register(
        "zhian_commit_duration_seconds",
        "Store write transactions (one per batch, fsync included)",
        stats.commit_seconds.clone(),
    );
    registry.register(
        "zhian_ack_wait_seconds",
        "Per committed batch, how long its first device message waited for commit and acknowledgement",
        stats.ack_wait_seconds.clone(),
    );
    registry.register(
        "zhian_upstream_publish_seconds",
        "From queueing a summary or alert upstream to its PUBACK",
        stats.publish_seconds.clone(),
    );
    registry.register_collector(Box::new(Metrics {
        stats: stats.clone(),
        store: store.clone(),
        max_bytes: cfg.store.max_size.0,
    }));
    let state = AppState {
        cfg: cfg.clone(),
        store,
        stats,
        registry: Arc::new(registry),
        verified: Arc::new(Mutex::new(None)),
        verify_permits: Arc::new(Semaphore::new(1)),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/api/status", get(api_status))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth))
        .route("/healthz", get(healthz))
        .layer(axum::middleware::from_fn(timeout))
        .with_state(state);
    match listener.local_addr() {
        Ok(addr) => tracing::info!(listen = %addr, "status page listening"),
        Err(e) => tracing::warn!(error = %e, "status page listening (address unknown)"),
    }
    let limited = Limited {
        inner: listener,
        permits: Arc::new(Semaphore::new(cfg.status.max_connections as usize)),
    };
    if let Err(e) = axum::serve(limited, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "status page stopped");
    }
}

async fn timeout(req: Request<axum::body::Body>, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout\n").into_response(),
    }
}

async fn auth(State(st): State<AppState>, req: Request<axum::body::Body>, next: Next) -> Response {
    let (Some(user), Some(hash)) = (&st.cfg.status.username, &st.cfg.status.password_hash) else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .and_then(|(_, b)| {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let ok = match given.as_deref().and_then(|g| g.split_once(':')) {
        Some((u, p)) => {
            // Keyed with the configured hash, compared in constant time (blake3::Hash's `==`).
            let digest = blake3::keyed_hash(
                blake3::hash(hash.0.as_bytes()).as_bytes(),
                format!("{u}:{p}").as_bytes(),
            );
            let cached = *st.verified.lock().expect("auth cache") == Some(digest);
            if cached {
                true
            } else {
                // One argon2 at a time (19 MiB each): a LAN client guessing passwords cannot
                // exhaust the box's memory. The hash runs for a wrong user too (no timing hint).
                let _permit = st.verify_permits.clone().acquire_owned().await;
                let (h, p) = (hash.0.clone(), p.to_string());
                let good = tokio::task::spawn_blocking(move || verify_password(&h, &p))
                    .await
                    .unwrap_or(false)
                    && u == user;
                if good {
                    *st.verified.lock().expect("auth cache") = Some(digest);
                } else {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                good
            }
        }
        None => false,
    };
    if ok {
        next.run(req).await
    } else {
        let mut r = (StatusCode::UNAUTHORIZED, "authentication required\n").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"zhian-gateway\", charset=\"UTF-8\""),
        );
        r
    }
}

/// Check `password` against a PHC (argon2) hash.
pub fn verify_password(phc: &str, password: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(phc)
        .map(|h| {
            argon2::Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A PHC (argon2id) hash of `password`, for `status.password_hash`.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// 200 while the pipeline runs: every core task alive and the committer turning (the same
/// test as the systemd watchdog); 503 otherwise, saying why.
async fn healthz(State(st): State<AppState>) -> Response {
    if let Some(p) = st.stats.paused() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("intake paused: {}: {}\n", p.reason, p.detail),
        )
            .into_response();
    }
    if let Some(why) = crate::health::site_link_too_long_down(&st.stats, now_ms()) {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response();
    }
    if crate::systemd::alive(&st.stats, crate::systemd::STUCK_AFTER) {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let down = st.stats.down();
    let why = if down.is_empty() {
        "the committer is not turning (stuck store?)".to_string()
    } else {
        format!("down: {}", down.join(", "))
    };
    (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &st.registry) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let mut r = to_prometheus_text(&body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

/// prometheus-client writes OpenMetrics, where a counter family `x` has samples `x_total`.
/// Scrapers and `promtool check metrics` read the classic text format, where HELP and TYPE name
/// the sample (`x_total`) and there is no `# EOF`: rename counter families, drop the EOF line.
fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Series derived from the shared counters and the store at scrape time.
struct Metrics {
    stats: Arc<Stats>,
    store: Arc<Store>,
    /// `store.max_size`.
    max_bytes: u64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The process's own figures from /proc (the `process_*` names the Prometheus client
/// libraries use, so stock dashboards work): resident and virtual memory (bytes), CPU
/// seconds, start time (Unix s), open file descriptors.
fn process_figures() -> Option<(u64, u64, f64, f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = 100.0; // sysconf(_SC_CLK_TCK) on Linux
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let start_ticks: f64 = f.get(19)?.parse().ok()?;
    let vsize: u64 = f.get(20)?.parse().ok()?;
    let rss_pages: u64 = f.get(21)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse().ok()))?;
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    Some((
        rss_pages * page,
        vsize,
        (utime + stime) / ticks,
        boot + start_ticks / ticks,
        fds,
    ))
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let m = e.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

impl Collector for Metrics {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let c = s.counters();
        counter(
            &mut e,
            "zhian_events_received",
            "Device messages received",
            c.received,
        )?;
        {
            let mut m = e.encode_descriptor(
                "zhian_events",
                "Device events by kind and committed outcome (accepted, duplicate, rejected)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for kind in Kind::ALL {
                for (outcome, v) in [
                    ("accepted", s.accepted_of(kind)),
                    ("duplicate", s.duplicate_of(kind)),
                    ("rejected", s.rejected_kind_of(Some(kind))),
                ] {
                    let labels = [("kind", kind.as_str()), ("outcome", outcome)];
                    ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
                }
            }
            let labels = [("kind", "unknown"), ("outcome", "rejected")];
            ConstCounter::new(s.rejected_kind_of(None)).encode(m.encode_family(&labels)?)?;
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_events_rejected",
                "Rejected device messages by reason",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for r in crate::core::event::Reject::ALL {
                let labels = [("reason", r.as_str())];
                ConstCounter::new(s.rejected_of(r)).encode(m.encode_family(&labels)?)?;
            }
        }
        counter(
            &mut e,
            "zhian_commits",
            "Store write transactions",
            c.commits,
        )?;
        gauge(
            &mut e,
            "zhian_outbox_pending",
            "Summaries and alerts waiting for the district broker's PUBACK",
            s.outbox_pending.load(Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "zhian_upstream_connected",
            "1 while connected to the district broker",
            i64::from(s.upstream_connected.load(Relaxed)),
        )?;
        gauge(
            &mut e,
            "zhian_clock_offset_seconds",
            "Store clock less wall clock, whole seconds: positive after a wall-clock step back, negative while a step forward is not believed (windows keep the monotonic pace)",
            s.clock_offset_ms.load(Relaxed) / 1000,
        )?;
        gauge(
            &mut e,
            "zhian_site_connected",
            "1 while connected to the site (device) broker",
            i64::from(s.site_connected.load(Relaxed)),
        )?;
        {
            let mut m = e.encode_descriptor(
                "zhian_build_info",
                "Version and target of this build (always 1)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            let labels = [
                ("version", env!("CARGO_PKG_VERSION")),
                ("target", env!("BUILD_TARGET_TRIPLE")),
            ];
            ConstGauge::new(1i64).encode(m.encode_family(&labels)?)?;
        }
        gauge(
            &mut e,
            "zhian_outbox_parked",
            "Messages the district broker kept refusing, kept on the box and not sent again",
            s.outbox_parked.load(Relaxed) as i64,
        )?;
        counter(
            &mut e,
            "zhian_upstream_published",
            "Summaries and alerts acknowledged by the district broker",
            s.upstream_published.load(Relaxed),
        )?;
        gauge(
            &mut e,
            "zhian_store_bytes",
            "Size of the store file",
            s.store_bytes.load(Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "zhian_store_max_bytes",
            "store.max_size: the data dir stays within it",
            self.max_bytes as i64,
        )?;
        if let Ok(o) = self.store.overview() {
            {
                let mut m = e.encode_descriptor(
                    "zhian_outbox_pending_by_class",
                    "Upstream messages waiting for their PUBACK, by class",
                    None,
                    prometheus_client::metrics::MetricType::Gauge,
                )?;
                for (class, v) in [
                    ("alert", o.pending_alerts),
                    ("summary", o.pending_summaries),
                ] {
                    ConstGauge::new(v as i64).encode(m.encode_family(&[("class", class)])?)?;
                }
            }
            gauge(
                &mut e,
                "zhian_outbox_oldest_pending_seconds",
                "Age of the oldest window still waiting to be delivered upstream (0: none)",
                o.oldest_pending_window_ms
                    .map_or(0, |t| (now_ms() - t).max(0) / 1000),
            )?;
            let mut m = e.encode_descriptor(
                "zhian_dropped",
                "Dropped under disk pressure since the store was created (summaries and alerts: never delivered)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (what, v) in [
                ("summaries", o.dropped_summaries),
                ("alerts", o.dropped_alerts),
                ("dedup_keys", o.dropped_dedup_keys),
                ("raw_events", o.evicted_events),
            ] {
                ConstCounter::new(v).encode(m.encode_family(&[("what", what)])?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_link_connected",
                "1 while the link is connected (site: the device broker; district: upstream)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (link, l) in s.links() {
                ConstGauge::new(i64::from(l.connected))
                    .encode(m.encode_family(&[("link", link)])?)?;
            }
        }
        if let Some((rss, vsize, cpu, start, fds)) = process_figures() {
            gauge(
                &mut e,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                rss as i64,
            )?;
            gauge(
                &mut e,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                vsize as i64,
            )?;
            gauge(
                &mut e,
                "process_open_fds",
                "Open file descriptors",
                fds as i64,
            )?;
            let g = prometheus_client::metrics::gauge::ConstGauge::new(start);
            let m = e.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since the Unix epoch, seconds",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
            let c = ConstCounter::new(cpu);
            let m = e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        {
            let problems = s.link_problems();
            let mut m = e.encode_descriptor(
                "zhian_link_problem",
                "1 while a link fails for a reason that needs an operator (refused, tls, identity_taken)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for link in ["site", "district"] {
                for reason in crate::link::PROBLEM_REASONS {
                    let v = i64::from(problems.get(link).is_some_and(|p| p.reason == reason));
                    ConstGauge::new(v)
                        .encode(m.encode_family(&[("link", link), ("reason", reason)])?)?;
                }
            }
        }
        {
            let paused = s.paused();
            let mut m = e.encode_descriptor(
                "zhian_intake_paused",
                "1 while intake is paused for this reason (nothing acknowledged meanwhile)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for reason in crate::stats::PAUSE_REASONS {
                let v = i64::from(paused.as_ref().is_some_and(|p| p.reason == reason));
                ConstGauge::new(v).encode(m.encode_family(&[("reason", reason)])?)?;
            }
        }
        let now = now_ms();
        let devices = crate::health::devices(s, now);
        {
            let mut m = e.encode_descriptor(
                "zhian_device_up",
                "1 if the device is online (MQTT: reported within its [health] cadence; Modbus: its last polls good)",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for d in &devices {
                let labels = [
                    ("device", d.name.as_str()),
                    ("kind", d.kind.as_str()),
                    ("source", d.source),
                ];
                ConstGauge::new(i64::from(d.online)).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_device_last_seen_timestamp_seconds",
                "When the device was last seen (an accepted event, a good poll), Unix seconds",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for d in &devices {
                let Some(t) = d.last_seen_ms else { continue };
                let labels = [
                    ("device", d.name.as_str()),
                    ("kind", d.kind.as_str()),
                    ("source", d.source),
                ];
                ConstGauge::new(t / 1000).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_modbus_poll_errors",
                "Failed Modbus polls (timeouts, exceptions, transport errors) per device",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, h) in s.modbus() {
                let labels = [("device", name.as_str())];
                ConstCounter::new(h.errors).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "zhian_modbus_polls",
                "Successful Modbus polls per device",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (name, h) in s.modbus() {
                let labels = [("device", name.as_str())];
                ConstCounter::new(h.polls).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The data behind the page and /api/status
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct GatewayOut {
    id: String,
    district: Option<String>,
    street: Option<String>,
    community: Option<String>,
    compound: Option<String>,
}

#[derive(Serialize)]
struct HourOut {
    start: String,
    #[serde(skip)]
    start_ms: i64,
    access: u64,
    vehicle: u64,
    camera: u64,
}

#[derive(Serialize)]
struct DeviceOut {
    kind: Kind,
    name: String,
    source: &'static str,
    online: bool,
    last_seen: Option<String>,
    /// Seconds since it was last seen.
    last_seen_secs_ago: Option<i64>,
    /// Since when it has been offline (None while online or never seen).
    offline_since: Option<String>,
    /// Its expected cadence (`[health]`, MQTT devices), seconds.
    silence_secs: Option<i64>,
    /// Events counted today (local day, site time zone) from this device.
    today: u64,
    last_error: Option<String>,
    /// Modbus: counter readings dropped as misreads (glitch rule) since start.
    glitches: u64,
    states: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct LinkOut {
    url: String,
    connected: bool,
    since: String,
    /// Seconds in this state.
    for_secs: i64,
    /// Why not connected: `connecting`, `unreachable`, `closed`, `refused`, `tls`,
    /// `identity_taken`.
    reason: Option<&'static str>,
    /// The last error as the MQTT client reported it.
    error: Option<String>,
    /// Failed attempts since it went down.
    attempts: u64,
}

#[derive(Serialize)]
struct UpstreamOut {
    connected: bool,
    pending_summaries: u64,
    pending_alerts: u64,
    /// Messages the district broker kept refusing: kept on the box, not sent again.
    parked: u64,
    oldest_pending_window: Option<String>,
    /// Age of the oldest pending window's start, seconds.
    oldest_pending_secs: Option<i64>,
}

#[derive(Serialize)]
struct StoreOut {
    bytes: u64,
    /// `store.max_size`: the data dir stays within it.
    max_bytes: u64,
    raw_events: u64,
    dedup_keys: u64,
    /// Dropped under disk pressure since the store was created (contract: "Disk pressure").
    dropped: DroppedOut,
    /// Damaged store files moved aside (in the data dir until an operator removes them).
    quarantined: Vec<crate::store::damage::Quarantined>,
    /// A store read that failed for this snapshot (e.g. while the writer reopens it).
    error: Option<String>,
}

#[derive(Serialize, Default)]
struct DroppedOut {
    summaries: u64,
    alerts: u64,
    dedup_keys: u64,
    raw_events: u64,
}

/// Intake: paused while the store cannot be written (nothing is acknowledged meanwhile).
#[derive(Serialize)]
struct IntakeOut {
    paused: bool,
    reason: Option<&'static str>,
    detail: Option<String>,
    since: Option<String>,
}

#[derive(Serialize)]
struct AlertOut {
    at: String,
    kind: Kind,
    device: String,
    action: String,
    id: String,
}

#[derive(Serialize)]
struct RejectOut {
    at: String,
    topic: String,
    reason: &'static str,
}

#[derive(Serialize)]
struct StatusOut {
    gateway: GatewayOut,
    version: &'static str,
    uptime_secs: u64,
    now: String,
    /// kind -> action -> events since local midnight.
    today: BTreeMap<&'static str, BTreeMap<String, u64>>,
    hourly: Vec<HourOut>,
    devices: Vec<DeviceOut>,
    intake: IntakeOut,
    /// The store clock less the wall clock, ms (see `core::clock::StoreClock`): non-zero after
    /// a step of the wall clock, until it is caught up with or vouched for.
    clock_offset_ms: i64,
    /// Both links: `site` (the device broker) and `district` (upstream), each connected or
    /// not, since when, why not.
    links: BTreeMap<&'static str, LinkOut>,
    /// What is wrong with the site broker's subscription (refused, or granted QoS 0).
    site_problem: Option<String>,
    /// Per link (`site`, `district`): a connection failure that needs an operator (refused
    /// credentials, TLS, another client holding our client id).
    link_problems: BTreeMap<&'static str, crate::link::Problem>,
    upstream: UpstreamOut,
    store: StoreOut,
    counters: crate::stats::CounterSnapshot,
    recent_alerts: Vec<AlertOut>,
    recent_rejects: Vec<RejectOut>,
    #[serde(skip)]
    tz_secs: i32,
}

fn snapshot(st: &AppState) -> Result<StatusOut, crate::store::StoreError> {
    let now = now_ms();
    let tz = parse_utc_offset(&st.cfg.status.timezone).unwrap_or(8 * 3600);
    let tz_ms = i64::from(tz) * 1000;
    const DAY: i64 = 86_400_000;
    const HOUR: i64 = 3_600_000;
    let midnight = (now + tz_ms).div_euclid(DAY) * DAY - tz_ms;
    let hour_now = (now + tz_ms).div_euclid(HOUR) * HOUR - tz_ms;
    let first_hour = hour_now - 23 * HOUR;
    let mut today: BTreeMap<&'static str, BTreeMap<String, u64>> = BTreeMap::new();
    for k in [Kind::Access, Kind::Vehicle] {
        let m = today.entry(k.as_str()).or_default();
        m.insert("entry".into(), 0);
        m.insert("exit".into(), 0);
    }
    today.entry(Kind::Camera.as_str()).or_default();
    let mut hourly: Vec<HourOut> = (0..24)
        .map(|i| {
            let start_ms = first_hour + i * HOUR;
            HourOut {
                start: rfc3339_utc(start_ms),
                start_ms,
                access: 0,
                vehicle: 0,
                camera: 0,
            }
        })
        .collect();
    let mut store_error = None;
    let windows = st
        .store
        .windows_since(first_hour.min(midnight))
        .unwrap_or_else(|e| {
            store_error = Some(e.to_string());
            Vec::new()
        });
    let mut device_today: BTreeMap<(Kind, String), u64> = BTreeMap::new();
    for w in windows {
        for (k, n) in &w.counts {
            if w.start_ms >= midnight {
                *device_today.entry((k.kind, k.device.clone())).or_default() += n;
                *today
                    .entry(k.kind.as_str())
                    .or_default()
                    .entry(k.action.clone())
                    .or_default() += n;
            }
            if w.start_ms >= first_hour {
                let h = &mut hourly[((w.start_ms - first_hour) / HOUR).min(23) as usize];
                match k.kind {
                    Kind::Access => h.access += n,
                    Kind::Vehicle => h.vehicle += n,
                    Kind::Camera => h.camera += n,
                }
            }
        }
    }
    let devices: Vec<DeviceOut> = crate::health::devices(&st.stats, now)
        .into_iter()
        .map(|d| DeviceOut {
            today: device_today
                .get(&(d.kind, d.name.clone()))
                .copied()
                .unwrap_or(0),
            last_seen: d.last_seen_ms.map(rfc3339_utc),
            last_seen_secs_ago: d.last_seen_ms.map(|t| (now - t).max(0) / 1000),
            offline_since: d.offline_since_ms.map(rfc3339_utc),
            silence_secs: d.silence_ms.map(|ms| ms / 1000),
            states: d.states.into_iter().collect(),
            kind: d.kind,
            name: d.name,
            source: d.source,
            online: d.online,
            last_error: d.last_error,
            glitches: d.glitches,
        })
        .collect();
    let o = st.store.overview().unwrap_or_else(|e| {
        store_error = Some(e.to_string());
        crate::store::Overview {
            file_bytes: st.store.file_bytes(),
            ..Default::default()
        }
    });
    let cfg = &st.cfg;
    let paused = st.stats.paused();
    let mut quarantined = crate::store::damage::quarantined(st.store.data_dir());
    if let Some(q) = st.stats.quarantined.lock().expect("lock").as_ref() {
        for f in quarantined.iter_mut().filter(|f| f.file == q.file) {
            f.reason = q.reason.clone();
        }
    }
    Ok(StatusOut {
        gateway: GatewayOut {
            id: cfg.gateway.id.clone(),
            district: cfg.gateway.district.clone(),
            street: cfg.gateway.street.clone(),
            community: cfg.gateway.community.clone(),
            compound: cfg.gateway.compound.clone(),
        },
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: st.stats.started.elapsed().as_secs(),
        now: rfc3339_utc(now),
        today,
        hourly,
        devices,
        intake: IntakeOut {
            paused: paused.is_some(),
            reason: paused.as_ref().map(|p| p.reason),
            detail: paused.as_ref().map(|p| p.detail.clone()),
            since: paused.as_ref().map(|p| rfc3339_utc(p.since_ms)),
        },
        clock_offset_ms: st.stats.clock_offset_ms.load(Relaxed),
        links: st
            .stats
            .links()
            .into_iter()
            .map(|(k, l)| {
                (
                    k,
                    LinkOut {
                        since: rfc3339_utc(l.since_ms),
                        for_secs: (now - l.since_ms).max(0) / 1000,
                        url: l.url,
                        connected: l.connected,
                        reason: l.reason,
                        error: l.error,
                        attempts: l.attempts,
                    },
                )
            })
            .collect(),
        site_problem: st.stats.site_problem(),
        link_problems: st.stats.link_problems(),
        upstream: UpstreamOut {
            connected: st.stats.upstream_connected.load(Relaxed),
            pending_summaries: o.pending_summaries,
            pending_alerts: o.pending_alerts,
            parked: o.parked,
            oldest_pending_window: o.oldest_pending_window_ms.map(rfc3339_utc),
            oldest_pending_secs: o.oldest_pending_window_ms.map(|t| (now - t).max(0) / 1000),
        },
        store: StoreOut {
            bytes: o.file_bytes,
            max_bytes: cfg.store.max_size.0,
            raw_events: o.raw_events,
            dedup_keys: o.dedup_keys,
            dropped: DroppedOut {
                summaries: o.dropped_summaries,
                alerts: o.dropped_alerts,
                dedup_keys: o.dropped_dedup_keys,
                raw_events: o.evicted_events,
            },
            quarantined,
            error: store_error,
        },
        counters: st.stats.counters(),
        recent_alerts: st
            .stats
            .recent_alerts()
            .into_iter()
            .rev()
            .map(|a| AlertOut {
                at: rfc3339_utc(a.at_ms),
                kind: a.kind,
                device: a.device,
                action: a.action,
                id: a.id,
            })
            .collect(),
        recent_rejects: st
            .stats
            .recent_rejects()
            .into_iter()
            .rev()
            .map(|r| RejectOut {
                at: rfc3339_utc(r.at_ms),
                topic: r.topic,
                reason: r.reason,
            })
            .collect(),
        tz_secs: tz,
    })
}

async fn snapshot_blocking(st: AppState) -> Result<StatusOut, Response> {
    tokio::task::spawn_blocking(move || snapshot(&st))
        .await
        .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "snapshot task failed\n").into_response())?
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response())
}

async fn api_status(State(st): State<AppState>) -> Response {
    match snapshot_blocking(st).await {
        Ok(s) => Json(s).into_response(),
        Err(r) => r,
    }
}

#[derive(serde::Deserialize)]
struct PageQuery {
    lang: Option<String>,
}

async fn page(
    State(st): State<AppState>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let _ = headers;
    let en = q.lang.as_deref() == Some("en");
    let refresh = st.cfg.status.refresh.0.as_secs();
    match snapshot_blocking(st).await {
        Ok(s) => Html(render(&s, en, refresh)).into_response(),
        Err(r) => r,
    }
}

// ---------------------------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------------------------

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Labels, Chinese first.
fn t(en: bool, key: &str) -> &'static str {
    let (zh, e) = match key {
        "title" => ("智安小区网关", "Smart-compound gateway"),
        "today" => ("今日统计", "Today"),
        "people" => ("人员进出", "People"),
        "vehicles" => ("车辆进出", "Vehicles"),
        "camera" => ("摄像头事件", "Camera incidents"),
        "entry_p" => ("进入", "Entries"),
        "exit_p" => ("离开", "Exits"),
        "entry_v" => ("驶入", "Vehicles in"),
        "exit_v" => ("驶出", "Vehicles out"),
        "none" => ("无", "none"),
        "hourly" => ("近24小时（每小时）", "Last 24 hours (hourly)"),
        "devices" => ("设备", "Devices"),
        "name" => ("名称", "Name"),
        "kind" => ("类型", "Kind"),
        "source" => ("接入", "Source"),
        "state" => ("状态", "State"),
        "online" => ("在线", "Online"),
        "offline" => ("离线", "Offline"),
        "last_seen" => ("最后上报", "Last seen"),
        "last_error" => ("最近错误", "Last error"),
        "values" => ("状态值", "Values"),
        "never" => ("从未", "never"),
        "upstream" => ("上级平台", "District platform"),
        "link" => ("连接", "Link"),
        "connected" => ("已连接", "Connected"),
        "disconnected" => ("未连接", "Disconnected"),
        "pending" => ("待发送汇总", "Pending summaries"),
        "pending_alerts" => ("待发送告警", "Pending alerts"),
        "oldest" => ("最早待发送窗口", "Oldest pending window"),
        "store" => ("本地存储", "Local store"),
        "attention" => ("需要处理", "Needs attention"),
        "site_problem" => ("现场代理订阅异常：", "Site broker subscription problem:"),
        "parked" => (
            "区级代理多次拒收、已搁置在本机的消息：",
            "Messages the district broker kept refusing, parked on the box:",
        ),
        "site_link" => ("现场代理连接需要处理：", "Site broker link needs action:"),
        "district_link" => ("区级平台连接需要处理：", "District link needs action:"),
        "paused" => (
            "数据接收已暂停，设备消息在现场代理中等待",
            "Intake paused: device messages wait in the site broker",
        ),
        "disk_full" => ("磁盘已满", "disk full"),
        "disk_error" => ("磁盘写入失败", "disk write failing"),
        "clock_untrusted" => ("网关时钟不可信", "gateway clock not trusted"),
        "clock_back" => (
            "网关时钟被调慢，窗口按单调时钟继续计时，差值：",
            "Gateway clock stepped back; windows keep the monotonic pace, off by",
        ),
        "clock_ahead" => (
            "网关时钟向前跳变，设备时间未证实，窗口按单调时钟计时，差值：",
            "Gateway clock jumped ahead, not confirmed by devices; windows keep the monotonic pace, off by",
        ),
        "since" => ("自", "since"),
        "quarantined" => (
            "存储文件损坏，已移至一旁并启用新存储：",
            "Damaged store file moved aside, fresh store started:",
        ),
        "dropped" => ("存储空间不足，已丢弃：", "Dropped for lack of space:"),
        "dedup_dropped" => ("去重记录", "dedup keys"),
        "raw_dropped" => ("原始事件", "raw events"),
        "alerts" => ("最近告警", "Recent alerts"),
        "rejects" => ("最近拒收", "Recent rejects"),
        "time" => ("时间", "Time"),
        "device" => ("设备", "Device"),
        "type" => ("类型", "Type"),
        "topic" => ("主题", "Topic"),
        "reason" => ("原因", "Reason"),
        "updated" => ("更新于", "Updated"),
        "other_lang" => ("English", "中文"),
        "access" => ("门禁", "Access"),
        "links" => ("连接", "Links"),
        "site_broker" => ("现场代理（设备）", "Site broker (devices)"),
        "district_broker" => ("区级平台", "District platform"),
        "connecting" => ("正在连接", "connecting"),
        "unreachable" => ("无法连接", "unreachable"),
        "closed" => ("连接中断", "connection lost"),
        "refused" => ("拒绝登录（用户名/密码或权限）", "refused (credentials or ACL)"),
        "tls" => ("TLS 证书问题", "TLS certificate problem"),
        "identity_taken" => ("客户端ID被另一台设备占用", "client id taken by another client"),
        "fix_refused" => ("请检查用户名和密码", "check the username and password"),
        "fix_tls" => (
            "请检查 ca_file、client_cert、client_key",
            "check ca_file, client_cert, client_key",
        ),
        "fix_identity_taken" => (
            "两台网关用了同一份配置？请为每台设置不同的 gateway.id",
            "two boxes from one config? give each its own gateway.id",
        ),
        "site_problem_zh" => (
            "现场代理未按 QoS 1 授予订阅（重启时可能丢消息）：请允许本客户端使用 QoS 1",
            "",
        ),
        "for" => ("已持续", "for"),
        "attempts" => ("次重试", "attempts"),
        "today_n" => ("今日", "Today"),
        "offline_for" => ("离线", "offline for"),
        "ago" => ("前", "ago"),
        "undelivered" => ("未送达", "not delivered yet"),
        "state_ok" => ("运行正常", "All is well"),
        "state_attention" => ("需要关注", "Needs attention"),
        "state_broken" => ("故障：数据未在采集", "Broken: nothing is being collected"),
        "devices_offline" => ("台设备离线", "devices offline"),
        "poll_failed" => ("通信失败", "polls failing"),
        "backlog" => ("待发送积压", "backlog"),
        "vehicle" => ("车辆", "Vehicle"),
        "camera_k" => ("摄像头", "Camera"),
        _ => ("?", "?"),
    };
    if en {
        e
    } else {
        zh
    }
}

/// An age in words: "5 s", "3 min", "2 h", "4 d" (en) or "5 秒", "3 分钟", "2 小时", "4 天".
fn age(secs: i64, en: bool) -> String {
    let secs = secs.max(0);
    let (n, zh, e) = if secs < 60 {
        (secs, "秒", "s")
    } else if secs < 3600 {
        (secs / 60, "分钟", "min")
    } else if secs < 86_400 {
        (secs / 3600, "小时", "h")
    } else {
        (secs / 86_400, "天", "d")
    };
    if en {
        format!("{n} {e}")
    } else {
        format!("{n} {zh}")
    }
}

/// A reject reason (`too_late`, ...) in the page's language.
fn reject_label(en: bool, reason: &str) -> String {
    let zh = match reason {
        "invalid_json" => "不是有效的 JSON",
        "invalid_topic" => "主题格式不对",
        "invalid_ts" => "时间戳无效",
        "invalid_id" => "事件编号无效",
        "invalid_action" => "动作无效",
        "invalid_result" => "结果无效",
        "invalid_subject" => "人员/车牌字段无效",
        "topic_mismatch" => "内容与主题不符",
        "too_late" => "太迟（窗口已关闭太久）",
        "too_far_future" => "时间超前太多",
        "too_large" => "消息过大",
        "unmapped" => "无法映射",
        _ => return reason.replace('_', " "),
    };
    if en {
        reason.replace('_', " ")
    } else {
        zh.to_string()
    }
}

fn kind_label(en: bool, k: Kind) -> &'static str {
    match k {
        Kind::Access => t(en, "access"),
        Kind::Vehicle => t(en, "vehicle"),
        Kind::Camera => t(en, "camera_k"),
    }
}

fn action_label(en: bool, action: &str) -> String {
    let zh = match action {
        "stranger" => "陌生人",
        "loitering" => "徘徊",
        "high_altitude_throw" => "高空抛物",
        "fire_lane_blocked" => "消防通道占用",
        "intrusion" => "闯入",
        "entry" => "进入",
        "exit" => "离开",
        _ => return action.to_string(),
    };
    if en {
        action.replace('_', " ")
    } else {
        zh.to_string()
    }
}

/// Local wall time `HH:MM` (or with the date when `date`).
fn local(ms: i64, tz: i32, date: bool) -> String {
    let s = rfc3339_utc(ms + i64::from(tz) * 1000);
    // "YYYY-MM-DDTHH:MM:SS[.mmm]Z"
    if date {
        format!("{} {}", &s[5..10], &s[11..16])
    } else {
        s[11..16].to_string()
    }
}

fn local_rfc(rfc: &Option<String>, tz: i32, en: bool) -> String {
    match rfc.as_deref().and_then(|r| {
        time::OffsetDateTime::parse(r, &time::format_description::well_known::Rfc3339).ok()
    }) {
        Some(t) => local((t.unix_timestamp_nanos() / 1_000_000) as i64, tz, true),
        None => t(en, "never").to_string(),
    }
}

fn chart(s: &StatusOut, en: bool) -> String {
    let (w, h, pad) = (720.0f64, 200.0f64, 28.0f64);
    let max = s
        .hourly
        .iter()
        .map(|b| b.access + b.vehicle + b.camera)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bw = (w - pad) / 24.0;
    let mut out = format!(
        "<svg data-chart=\"hourly\" viewBox=\"0 0 {w} {}\" role=\"img\" aria-label=\"{}\" preserveAspectRatio=\"none\">",
        h + 20.0,
        t(en, "hourly")
    );
    out.push_str(&format!(
        "<line x1=\"{pad}\" y1=\"{h}\" x2=\"{w}\" y2=\"{h}\" class=\"axis\"/><text x=\"0\" y=\"12\" class=\"lbl\">{}</text>",
        max as u64
    ));
    for (i, b) in s.hourly.iter().enumerate() {
        let x = pad + i as f64 * bw + 2.0;
        let mut y = h;
        for (n, class) in [(b.access, "a"), (b.vehicle, "v"), (b.camera, "c")] {
            if n == 0 {
                continue;
            }
            let bh = (n as f64 / max) * (h - 16.0);
            y -= bh;
            out.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{bh:.1}\" class=\"{class}\"><title>{n}</title></rect>",
                bw - 4.0
            ));
        }
        if i % 3 == 0 {
            out.push_str(&format!(
                "<text x=\"{x:.1}\" y=\"{}\" class=\"lbl\">{}</text>",
                h + 16.0,
                local(b.start_ms, s.tz_secs, false)
            ));
        }
    }
    out.push_str("</svg>");
    out
}

fn render(s: &StatusOut, en: bool, refresh: u64) -> String {
    let site: Vec<&str> = [&s.gateway.district, &s.gateway.street, &s.gateway.community]
        .into_iter()
        .filter_map(|x| x.as_deref())
        .collect();
    let name = s
        .gateway
        .compound
        .clone()
        .unwrap_or_else(|| s.gateway.id.clone());
    let mut h = String::with_capacity(16 * 1024);
    h.push_str(&format!(
        "<!doctype html><html lang=\"{lang}\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{refresh}\">\
         <title>{title} · {name}</title><style>{css}</style></head><body>",
        lang = if en { "en" } else { "zh-CN" },
        title = t(en, "title"),
        name = esc(&name),
        css = CSS,
    ));
    h.push_str(&format!(
        "<header><h1>{} <small>{}</small></h1><p>{}{} · v{} · {} {}</p><a class=\"lang\" href=\"?lang={}\">{}</a></header>",
        esc(&name),
        t(en, "title"),
        if site.is_empty() { String::new() } else { format!("{} · ", esc(&site.join(" "))) },
        esc(&s.gateway.id),
        s.version,
        t(en, "updated"),
        local_rfc(&Some(s.now.clone()), s.tz_secs, en),
        if en { "zh" } else { "en" },
        t(en, "other_lang"),
    ));
    // What needs attention: paused intake, quarantined store files, drops under pressure.
    let mut alarms: Vec<String> = Vec::new();
    if s.intake.paused {
        alarms.push(format!(
            "<li data-intake-paused=\"{}\"><b>{}</b> ({}) {} {} · {}</li>",
            s.intake.reason.unwrap_or(""),
            t(en, "paused"),
            t(en, s.intake.reason.unwrap_or("disk_error")),
            t(en, "since"),
            local_rfc(&s.intake.since, s.tz_secs, en),
            if en {
                esc(s.intake.detail.as_deref().unwrap_or(""))
            } else {
                String::new()
            },
        ));
    }
    if s.clock_offset_ms.abs() > crate::core::clock::STEP_MS {
        alarms.push(format!(
            "<li data-clock-step=\"{}\"><b>{}</b> {} s</li>",
            s.clock_offset_ms,
            t(
                en,
                if s.clock_offset_ms > 0 {
                    "clock_back"
                } else {
                    "clock_ahead"
                }
            ),
            s.clock_offset_ms.abs() / 1000
        ));
    }
    if let Some(p) = &s.site_problem {
        alarms.push(format!(
            "<li data-site-problem><b>{}</b> {}</li>",
            t(en, "site_problem"),
            if en {
                esc(p)
            } else {
                t(en, "site_problem_zh").to_string()
            }
        ));
    }
    for (link, p) in &s.link_problems {
        alarms.push(format!(
            "<li data-link-problem=\"{link}\" data-reason=\"{}\"><b>{}</b> {}</li>",
            p.reason,
            t(
                en,
                if *link == "site" {
                    "site_link"
                } else {
                    "district_link"
                }
            ),
            if en {
                esc(&p.detail)
            } else {
                format!(
                    "{}：{}",
                    t(en, p.reason),
                    t(en, &format!("fix_{}", p.reason))
                )
            }
        ));
    }
    for q in &s.store.quarantined {
        alarms.push(format!(
            "<li data-quarantined=\"{}\"><b>{}</b> {} ({:.1} MiB){}</li>",
            esc(&q.file),
            t(en, "quarantined"),
            esc(&q.file),
            q.bytes as f64 / 1048576.0,
            q.reason
                .as_ref()
                .filter(|_| en)
                .map(|r| format!(" · {}", esc(r)))
                .unwrap_or_default(),
        ));
    }
    if s.upstream.parked > 0 {
        alarms.push(format!(
            "<li data-parked=\"{}\"><b>{}</b> {}</li>",
            s.upstream.parked,
            t(en, "parked"),
            s.upstream.parked
        ));
    }
    let d = &s.store.dropped;
    if d.summaries + d.alerts + d.dedup_keys + d.raw_events > 0 {
        alarms.push(format!(
            "<li data-dropped=\"{}\"><b>{}</b> {} {} · {} {} · {} {} · {} {}</li>",
            d.summaries + d.alerts,
            t(en, "dropped"),
            t(en, "pending"),
            d.summaries,
            t(en, "pending_alerts"),
            d.alerts,
            t(en, "dedup_dropped"),
            d.dedup_keys,
            t(en, "raw_dropped"),
            d.raw_events,
        ));
    }
    // The overall state first: broken when nothing is being collected, attention when
    // something needs a look, ok otherwise; with the first reason.
    let site_down = s.links.get("site").filter(|l| !l.connected);
    let offline = s.devices.iter().filter(|d| !d.online).count();
    let district_down = s.links.get("district").filter(|l| !l.connected);
    let (state, first) = if s.intake.paused {
        ("broken", t(en, "paused").to_string())
    } else if let Some(l) = site_down.filter(|l| l.for_secs >= 10) {
        (
            "broken",
            format!(
                "{}：{} {} {}",
                t(en, "site_broker"),
                t(en, l.reason.unwrap_or("closed")),
                t(en, "for"),
                age(l.for_secs, en)
            ),
        )
    } else if !alarms.is_empty() {
        ("attention", t(en, "attention").to_string())
    } else if let Some(l) = district_down.filter(|l| l.for_secs >= 10) {
        (
            "attention",
            format!(
                "{}：{} {} {}",
                t(en, "district_broker"),
                t(en, l.reason.unwrap_or("closed")),
                t(en, "for"),
                age(l.for_secs, en)
            ),
        )
    } else if offline > 0 {
        (
            "attention",
            format!("{offline} {}", t(en, "devices_offline")),
        )
    } else {
        ("ok", String::new())
    };
    h.push_str(&format!(
        "<div class=\"banner {state}\" data-state=\"{state}\"><b>{}</b> {}</div>",
        t(en, &format!("state_{state}")),
        esc(&first)
    ));
    if !alarms.is_empty() {
        h.push_str(&format!(
            "<section class=\"alarm\"><h2>{}</h2><ul>{}</ul></section>",
            t(en, "attention"),
            alarms.join("")
        ));
    }
    // Both links: connected or not, for how long, why not.
    h.push_str(&format!(
        "<section><h2>{}</h2><div class=\"cards\">",
        t(en, "links")
    ));
    for (key, label) in [("site", "site_broker"), ("district", "district_broker")] {
        let Some(l) = s.links.get(key) else { continue };
        let why = if l.connected {
            String::new()
        } else {
            let mut w = format!(" · {}", t(en, l.reason.unwrap_or("closed")));
            if l.attempts > 0 {
                w.push_str(&format!(" · {} {}", l.attempts, t(en, "attempts")));
            }
            if en {
                if let Some(e) = &l.error {
                    w.push_str(&format!(" · {}", esc(e)));
                }
            }
            w
        };
        h.push_str(&format!(
            "<div class=\"card\" data-link=\"{key}\" data-connected=\"{}\"><h3>{}</h3><div class=\"small\"><b class=\"{}\">{}</b><span>{} {}</span></div><p class=\"muted\">{}{}</p></div>",
            l.connected,
            t(en, label),
            if l.connected { "ok" } else { "bad" },
            t(en, if l.connected { "connected" } else { "disconnected" }),
            t(en, "for"),
            age(l.for_secs, en),
            esc(&l.url),
            why,
        ));
    }
    h.push_str("</div></section>");
    // Today.
    h.push_str(&format!(
        "<section><h2>{}</h2><div class=\"cards\">",
        t(en, "today")
    ));
    for (kind, group, entry, exit) in [
        ("access", "people", "entry_p", "exit_p"),
        ("vehicle", "vehicles", "entry_v", "exit_v"),
    ] {
        let m = s.today.get(kind).cloned().unwrap_or_default();
        h.push_str(&format!("<div class=\"card\"><h3>{}</h3>", t(en, group)));
        for (action, label) in [("entry", entry), ("exit", exit)] {
            h.push_str(&format!(
                "<div class=\"big\"><span>{}</span><b data-count=\"{kind}:{action}\">{}</b></div>",
                t(en, label),
                m.get(action).copied().unwrap_or(0)
            ));
        }
        for (action, n) in m.iter().filter(|(a, _)| *a != "entry" && *a != "exit") {
            h.push_str(&format!(
                "<div class=\"small\"><span>{}</span><b data-count=\"{kind}:{}\">{n}</b></div>",
                esc(&action_label(en, action)),
                esc(action)
            ));
        }
        h.push_str("</div>");
    }
    h.push_str(&format!("<div class=\"card\"><h3>{}</h3>", t(en, "camera")));
    let cam = s.today.get("camera").cloned().unwrap_or_default();
    if cam.is_empty() {
        h.push_str(&format!("<p class=\"muted\">{}</p>", t(en, "none")));
    }
    for (action, n) in &cam {
        h.push_str(&format!(
            "<div class=\"small\"><span>{}</span><b data-count=\"camera:{}\">{n}</b></div>",
            esc(&action_label(en, action)),
            esc(action)
        ));
    }
    h.push_str("</div></div></section>");
    // Chart.
    h.push_str(&format!(
        "<section><h2>{}</h2>{}<p class=\"legend\"><i class=\"a\"></i>{} <i class=\"v\"></i>{} <i class=\"c\"></i>{}</p></section>",
        t(en, "hourly"),
        chart(s, en),
        t(en, "access"),
        t(en, "vehicle"),
        t(en, "camera_k")
    ));
    // Devices: offline first (the list comes sorted), with ages and today's counts.
    h.push_str(&format!(
        "<section><h2>{}</h2><div class=\"scroll\"><table class=\"dev\"><tr><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th>{}</th><th class=\"wide\">{}</th><th class=\"wide\">{}</th></tr>",
        t(en, "devices"),
        t(en, "name"),
        t(en, "state"),
        t(en, "last_seen"),
        t(en, "today_n"),
        t(en, "kind"),
        t(en, "last_error"),
        t(en, "values")
    ));
    for d in &s.devices {
        let states: Vec<String> = d
            .states
            .iter()
            .map(|(k, v)| format!("{}={}", esc(k), esc(&v.to_string())))
            .collect();
        let seen = match d.last_seen_secs_ago {
            Some(a) if en => format!("{} {}", age(a, en), t(en, "ago")),
            Some(a) => format!("{}{}", age(a, en), t(en, "ago")),
            None => t(en, "never").to_string(),
        };
        let err = match (&d.last_error, d.source) {
            (None, _) => String::new(),
            (Some(e), "mqtt") => reject_label(en, e),
            (Some(e), _) if en => esc(e),
            (Some(_), _) => t(en, "poll_failed").to_string(),
        };
        h.push_str(&format!(
            "<tr data-device=\"{name}\" data-online=\"{online}\"><td>{name}</td><td class=\"{cls}\">{state}</td><td>{seen}</td><td data-today=\"{today}\">{today}</td><td class=\"wide\">{kind} · {src}</td><td class=\"wide\">{err}</td><td class=\"wide\">{states}</td></tr>",
            name = esc(&d.name),
            online = d.online,
            kind = kind_label(en, d.kind),
            src = if d.source == "mqtt" { "MQTT" } else { "Modbus" },
            cls = if d.online { "ok" } else { "bad" },
            state = t(en, if d.online { "online" } else { "offline" }),
            today = d.today,
            states = states.join(" "),
        ));
    }
    h.push_str("</table></div></section>");
    // Upstream.
    let u = &s.upstream;
    h.push_str(&format!(
        "<section><h2>{}</h2><div class=\"cards\"><div class=\"card\"><div class=\"small\"><span>{}</span><b data-upstream=\"{}\" class=\"{}\">{}</b></div>\
         <div class=\"small\"><span>{}</span><b data-pending-summaries=\"{}\">{}</b></div>\
         <div class=\"small\"><span>{}</span><b>{}</b></div>\
         <div class=\"small\"><span>{}</span><b>{}</b></div>\
         <div class=\"small\"><span>{}</span><b>{:.1} MiB</b></div></div></div></section>",
        t(en, "upstream"),
        t(en, "link"),
        if u.connected { "connected" } else { "disconnected" },
        if u.connected { "ok" } else { "bad" },
        t(en, if u.connected { "connected" } else { "disconnected" }),
        t(en, "pending"),
        u.pending_summaries,
        u.pending_summaries,
        t(en, "pending_alerts"),
        u.pending_alerts,
        t(en, "oldest"),
        u.oldest_pending_secs
            .map(|a| if en { format!("{} {}", age(a, en), t(en, "ago")) } else { format!("{}{}", age(a, en), t(en, "ago")) })
            .unwrap_or_else(|| "—".into()),
        t(en, "store"),
        s.store.bytes as f64 / 1048576.0,
    ));
    // Alerts and rejects.
    h.push_str(&format!(
        "<section><h2>{}</h2><table><tr><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(en, "alerts"),
        t(en, "time"),
        t(en, "device"),
        t(en, "type")
    ));
    // Alerts leave oldest first, so the newest `pending_alerts` ones are the undelivered.
    let undelivered = s.upstream.pending_alerts as usize;
    for (i, a) in s.recent_alerts.iter().take(20).enumerate() {
        let pending = i < undelivered;
        h.push_str(&format!(
            "<tr data-alert=\"{}\" data-pending=\"{pending}\"><td>{}</td><td>{}</td><td>{}{}</td></tr>",
            esc(&a.action),
            local_rfc(&Some(a.at.clone()), s.tz_secs, en),
            esc(&a.device),
            esc(&action_label(en, &a.action)),
            if pending { format!(" <b class=\"bad\">{}</b>", t(en, "undelivered")) } else { String::new() }
        ));
    }
    h.push_str("</table></section>");
    h.push_str(&format!(
        "<section><h2>{}</h2><table><tr><th>{}</th><th>{}</th><th>{}</th></tr>",
        t(en, "rejects"),
        t(en, "time"),
        t(en, "topic"),
        t(en, "reason")
    ));
    for r in s.recent_rejects.iter().take(20) {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            local_rfc(&Some(r.at.clone()), s.tz_secs, en),
            esc(&r.topic),
            reject_label(en, r.reason)
        ));
    }
    h.push_str("</table></section></body></html>");
    h
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'PingFang SC','Noto Sans CJK SC','Microsoft YaHei',sans-serif;margin:0;background:#f4f6f8;color:#1d2329}\
header{background:#0b5394;color:#fff;padding:12px 16px;position:relative}header h1{margin:0;font-size:1.4em}header small{font-weight:normal;opacity:.8;font-size:.6em}\
header p{margin:4px 0 0;opacity:.85;font-size:.9em}.lang{position:absolute;right:16px;top:14px;color:#fff}\
section{background:#fff;margin:12px;padding:12px 16px;border-radius:8px;box-shadow:0 1px 2px rgba(0,0,0,.08)}h2{font-size:1.1em;margin:0 0 8px}\
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{flex:1 1 220px;border:1px solid #e3e7eb;border-radius:6px;padding:8px 12px}.card h3{margin:0 0 6px;font-size:1em;color:#555}\
.big{display:flex;justify-content:space-between;font-size:1.3em;margin:2px 0}.small{display:flex;justify-content:space-between;margin:2px 0}\
table{width:100%;border-collapse:collapse;font-size:.92em}th,td{text-align:left;padding:4px 6px;border-bottom:1px solid #eee}\
.alarm{border:2px solid #c5221f;padding:0 .8em}.ok{color:#137333;font-weight:bold}.bad{color:#c5221f;font-weight:bold}.muted{color:#888}\
svg{width:100%;height:auto;max-height:260px}.axis{stroke:#999}.lbl{font-size:11px;fill:#666}rect.a,.legend i.a{fill:#1a73e8;background:#1a73e8}\
rect.v,.legend i.v{fill:#f29900;background:#f29900}rect.c,.legend i.c{fill:#d93025;background:#d93025}.legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}\
.banner{margin:12px;padding:10px 16px;border-radius:8px;font-size:1.05em}.banner.ok{background:#e6f4ea;color:#137333}\
.banner.attention{background:#fef7e0;color:#8a5a00;border:1px solid #f29900}.banner.broken{background:#fce8e6;color:#a50e0e;border:2px solid #c5221f}\
.scroll{overflow-x:auto}\
@media(max-width:600px){section,.banner{margin:8px;padding:8px}table{font-size:.85em}.wide{display:none}.lbl{font-size:26px}.cards{gap:8px}.card{flex-basis:100%}header .lang{position:static;display:inline-block;margin-top:4px}}";

/// A listener that holds at most `permits` connections open at once.
struct Limited {
    inner: tokio::net::TcpListener,
    permits: Arc<Semaphore>,
}

struct LimitedIo {
    io: tokio::net::TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Closes the connection after `IDLE_TIMEOUT` without a byte read: covers slow headers and
    /// idle keep-alive (axum gives hyper no timer of its own).
    idle: Pin<Box<tokio::time::Sleep>>,
}

/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

impl axum::serve::Listener for Limited {
    type Io = LimitedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closed");
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    return (
                        LimitedIo {
                            io,
                            _permit: permit,
                            idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
                        },
                        addr,
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "status page: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

impl AsyncRead for LimitedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.idle
                        .as_mut()
                        .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                }
                Poll::Ready(r)
            }
            Poll::Pending => match std::future::Future::poll(this.idle.as_mut(), cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle connection",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for LimitedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::counter::Value;

    #[test]
    fn password_hash_round_trip() {
        let h = hash_password("门卫 secret").unwrap();
        assert!(h.starts_with("$argon2"));
        assert!(verify_password(&h, "门卫 secret"));
        assert!(!verify_password(&h, "wrong"));
        assert!(!verify_password("not a hash", "x"));
    }

    #[test]
    fn classic_text_names_counter_samples() {
        let om = "# HELP a_b Help.\n# TYPE a_b counter\na_b_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP a_b_total Help.\n# TYPE a_b_total counter\na_b_total 3\n# HELP g G.\n# TYPE g gauge\ng 1\n"
        );
    }

    #[test]
    fn escaping() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn value_json() {
        assert_eq!(Value::Float(21.5).to_json(), serde_json::json!(21.5));
    }
}
