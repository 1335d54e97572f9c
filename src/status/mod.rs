//! The local status page, JSON API, health check and Prometheus metrics (axum), read-only.
//!
//! `GET /` is a server-rendered page, Chinese by default (`?lang=en` English), with no resource
//! from the internet: inline CSS and an inline SVG chart. `GET /api/status` is the same data as
//! JSON. `GET /healthz` answers 200 while every core task runs, 503 otherwise. `GET /metrics` is
//! Prometheus text (prometheus-client). With `status.username`/`status.password_hash` set, all
//! but `/healthz` need HTTP Basic auth. A connection limit and a per-request timeout keep a
//! misbehaving client on the LAN away from the pipeline (see `listener`); store reads run on
//! blocking threads.

use crate::clock::now_ms;
use crate::config::Config;
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
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

mod auth;
/// The listener's connection limits live in `zhian-common` (the district receiver's endpoints
/// use them too).
pub(crate) use zhian_common::listener;
pub(crate) use zhian_common::listener::Limited;
mod labels;
mod metrics;
mod page;
mod report;

pub use auth::{hash_password, verify_password, MIN_PASSWORD_CHARS};
use metrics::{to_prometheus_text, Metrics};
use page::render;
use report::{snapshot_blocking, StatusOut};

/// A request that takes longer than this is answered 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(super) struct AppState {
    pub(super) cfg: Arc<Config>,
    pub(super) store: Arc<Store>,
    pub(super) stats: Arc<Stats>,
    pub(super) registry: Arc<Registry>,
    /// Keyed BLAKE3 of the last credentials that verified, so argon2 runs once, not per request.
    pub(super) verified: Arc<Mutex<Option<blake3::Hash>>>,
    /// Password verifications allowed at once.
    pub(super) verify_permits: Arc<Semaphore>,
    /// Failed logins per client address, for the rate limit.
    pub(super) failures: Arc<Mutex<auth::Failures>>,
    /// Password verifications started and not finished.
    pub(super) verify_queue: Arc<std::sync::atomic::AtomicUsize>,
}

/// The `/api/status` document as JSON, built outside the HTTP server (for `fleet diag`).
/// Blocking: it reads the store. A store that cannot be read gives `{"error": ...}`.
pub fn status_json(cfg: Arc<Config>, store: Arc<Store>, stats: Arc<Stats>) -> serde_json::Value {
    let st = AppState {
        cfg,
        store,
        stats,
        registry: Arc::new(Registry::default()),
        verified: Arc::new(Mutex::new(None)),
        verify_permits: Arc::new(Semaphore::new(1)),
        failures: Default::default(),
        verify_queue: Default::default(),
    };
    match report::snapshot(&st) {
        Ok(s) => serde_json::to_value(&s).unwrap_or(serde_json::Value::Null),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
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
        failures: Default::default(),
        verify_queue: Default::default(),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/api/status", get(api_status))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::auth,
        ))
        .route("/healthz", get(healthz))
        .layer(axum::middleware::from_fn(timeout))
        .layer(axum::middleware::from_fn(access))
        .with_state(state);
    match listener.local_addr() {
        Ok(addr) => tracing::info!(listen = %addr, "status page listening"),
        Err(e) => tracing::warn!(error = %e, "status page listening (address unknown)"),
    }
    let limited = Limited::new(listener, cfg.status.max_connections as usize);
    if let Err(e) = axum::serve(
        limited,
        app.into_make_service_with_connect_info::<listener::Peer>(),
    )
    .with_graceful_shutdown(stop.cancelled_owned())
    .await
    {
        tracing::warn!(error = %e, "status page stopped");
    }
}

/// The security headers every answer carries: no framing (clickjacking), no MIME sniffing, no
/// referrer, and a content security policy that allows what the page uses (inline CSS and an
/// inline SVG; no script at all, no resource from elsewhere).
pub const SECURITY_HEADERS: [(&str, &str); 5] = [
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    (
        "content-security-policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("cache-control", "no-store"),
];

/// Adds [`SECURITY_HEADERS`] and writes one access-log line per request (target
/// `zhian_gateway::access`): peer address, method, path (control characters escaped, no query
/// string, never the Authorization header), status and duration. Successful `/healthz` and
/// `/metrics` (probes and scrapes, every few seconds) go at DEBUG, everything else at INFO.
async fn access(req: Request<axum::body::Body>, next: Next) -> Response {
    let started = std::time::Instant::now();
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<listener::Peer>>()
        .map(|c| c.0 .0.ip().to_string())
        .unwrap_or_else(|| "-".into());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut r = next.run(req).await;
    for (k, v) in SECURITY_HEADERS {
        r.headers_mut().insert(k, HeaderValue::from_static(v));
    }
    let status = r.status().as_u16();
    let ms = started.elapsed().as_millis() as u64;
    let path = crate::logfmt::Clean(&path);
    if status < 400 && (path.0 == "/healthz" || path.0 == "/metrics") {
        tracing::debug!(target: "zhian_gateway::access", peer, %method, %path, status, ms, "http");
    } else {
        tracing::info!(target: "zhian_gateway::access", peer, %method, %path, status, ms, "http");
    }
    r
}

async fn timeout(req: Request<axum::body::Body>, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(req)).await {
        Ok(r) => r,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout\n").into_response(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::counter::Value;

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
        // The page's templates escape every value (maud): text and attributes.
        let v = "<a href=\"x\">&'";
        assert_eq!(
            maud::html! { b title=(v) { (v) } }.into_string(),
            "<b title=\"&lt;a href=&quot;x&quot;&gt;&amp;'\">&lt;a href=&quot;x&quot;&gt;&amp;'</b>"
        );
    }

    #[test]
    fn value_json() {
        assert_eq!(Value::Float(21.5).to_json(), serde_json::json!(21.5));
    }
}
