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
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

mod listener;
mod metrics;
mod page;
mod report;

use listener::Limited;
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
        max: cfg.status.max_connections as usize,
        registry: Default::default(),
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
    use super::page::esc;
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
