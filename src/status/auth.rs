//! HTTP Basic auth for the status page, API and metrics (not `/healthz`).
//!
//! - argon2id (the `argon2` crate's default: m = 19 MiB, t = 2, p = 1, the OWASP password
//!   storage cheat sheet's first recommendation) runs one at a time on a blocking thread, so
//!   guesses cannot pile up memory; credentials that verified are remembered (a keyed BLAKE3 of
//!   them), so a logged-in browser costs one argon2, not one per request.
//! - Failed logins are logged (client address and path; never the user name or password) and
//!   counted (`zhian_http_auth_failures_total`). After [`MAX_FAILURES`] failures within
//!   [`FAILURE_WINDOW`] an address gets `429 Too Many Requests` without any argon2 until the
//!   window ends (`zhian_http_rate_limited_total`); the table of addresses is bounded.

use super::AppState;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Failed logins an address may make within [`FAILURE_WINDOW`]: a person mistyping never
/// meets it; a guesser gets 20 tries a minute (28,800 a day) instead of one per argon2.
pub const MAX_FAILURES: u32 = 20;
/// The rate limit's window.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; the oldest window is dropped first.
const MAX_ADDRESSES: usize = 1024;
/// Password verifications waiting at most (across addresses); more get 503 at once.
const MAX_QUEUED: usize = 8;
/// `hash-password` refuses shorter passwords (NIST SP 800-63B, 5.1.1.2: at least 8).
pub const MIN_PASSWORD_CHARS: usize = 8;

/// Failed logins per client address: (window start, failures in it, 429 logged).
#[derive(Default)]
pub(crate) struct Failures(HashMap<IpAddr, (Instant, u32, bool)>);

impl Failures {
    /// Whether `ip` is over the limit now.
    fn limited(&mut self, ip: IpAddr, now: Instant) -> Option<bool> {
        let e = self.0.get_mut(&ip)?;
        if now.duration_since(e.0) >= FAILURE_WINDOW {
            self.0.remove(&ip);
            return None;
        }
        if e.1 >= MAX_FAILURES {
            let first = !e.2;
            e.2 = true;
            return Some(first);
        }
        None
    }

    /// A charged attempt that succeeded.
    fn forgive(&mut self, ip: IpAddr) {
        if let Some(e) = self.0.get_mut(&ip) {
            e.1 = e.1.saturating_sub(1);
        }
    }

    /// Attempts charged to `ip` in its current window.
    fn count(&self, ip: IpAddr) -> u32 {
        self.0.get(&ip).map_or(0, |e| e.1)
    }

    fn failed(&mut self, ip: IpAddr, now: Instant) -> u32 {
        if self.0.len() >= MAX_ADDRESSES && !self.0.contains_key(&ip) {
            self.0
                .retain(|_, e| now.duration_since(e.0) < FAILURE_WINDOW);
            if self.0.len() >= MAX_ADDRESSES {
                if let Some(oldest) = self.0.iter().min_by_key(|(_, e)| e.0).map(|(k, _)| *k) {
                    self.0.remove(&oldest);
                }
            }
        }
        let e = self.0.entry(ip).or_insert((now, 0, false));
        if now.duration_since(e.0) >= FAILURE_WINDOW {
            *e = (now, 0, false);
        }
        e.1 += 1;
        e.1
    }
}

pub(super) async fn auth(
    State(st): State<AppState>,
    req: Request<axum::body::Body>,
    next: Next,
) -> Response {
    let (Some(user), Some(hash)) = (&st.cfg.status.username, &st.cfg.status.password_hash) else {
        return next.run(req).await;
    };
    let ip = req
        .extensions()
        .get::<ConnectInfo<super::listener::Peer>>()
        .map(|c| c.0 .0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let path = req.uri().path().to_string();
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
    let Some((u, p)) = given.as_deref().and_then(|g| g.split_once(':')) else {
        // No credentials yet: the browser's first request. Not a failure.
        return challenge();
    };
    // Keyed with the configured hash, compared in constant time (blake3::Hash's `==`).
    let digest = blake3::keyed_hash(
        blake3::hash(hash.0.as_bytes()).as_bytes(),
        format!("{u}:{p}").as_bytes(),
    );
    if *st.verified.lock().expect("auth cache") == Some(digest) {
        return next.run(req).await;
    }
    let limited = st
        .failures
        .lock()
        .expect("failures lock")
        .limited(ip, Instant::now());
    if let Some(first) = limited {
        st.stats.http_rate_limited.fetch_add(1, Relaxed);
        if first {
            tracing::warn!(peer = %ip, max = MAX_FAILURES, "status page: too many failed logins from this address; refused for a minute");
        }
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed logins; try again in a minute\n",
        )
            .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("60"));
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"zhian-gateway\", charset=\"UTF-8\""),
        );
        return r;
    }
    // Too many verifications waiting: refuse at once rather than queue argon2 runs a client
    // that hangs up would leave behind.
    if st.verify_queue.load(Relaxed) >= MAX_QUEUED {
        return (StatusCode::SERVICE_UNAVAILABLE, "busy; try again\n").into_response();
    }
    // The attempt is charged before it runs and forgiven if it succeeds, so an address that
    // hangs up before its answer still spends its 20 tries a minute.
    st.failures
        .lock()
        .expect("failures lock")
        .failed(ip, Instant::now());
    // The verification is its own task: it finishes, and is counted and logged, even when the
    // client hangs up (the request future is dropped). One argon2 at a time (19 MiB each): the
    // permit moves into the blocking job and is released only when argon2 is done. The hash
    // runs for a wrong user too (no timing hint).
    let job = {
        let st = st.clone();
        let (h, p, u, user) = (hash.0.clone(), p.to_string(), u.to_string(), user.clone());
        st.verify_queue.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let permit = st.verify_permits.clone().acquire_owned().await;
            let good = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                verify_password(&h, &p)
            })
            .await
            .unwrap_or(false)
                && u == user;
            st.verify_queue.fetch_sub(1, Relaxed);
            if good {
                *st.verified.lock().expect("auth cache") = Some(digest);
                st.failures.lock().expect("failures lock").forgive(ip);
            } else {
                st.stats.http_auth_failures.fetch_add(1, Relaxed);
                let n = st.failures.lock().expect("failures lock").count(ip);
                tracing::warn!(peer = %ip, path = %crate::logfmt::Clean(&path), failures = n, "status page: failed login");
            }
            good
        })
    };
    if job.await.unwrap_or(false) {
        return next.run(req).await;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    challenge()
}

fn challenge() -> Response {
    let mut r = (StatusCode::UNAUTHORIZED, "authentication required\n").into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"zhian-gateway\", charset=\"UTF-8\""),
    );
    r
}

/// Check `password` against a PHC (argon2) hash. The hash's own parameters apply.
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

/// A PHC (argon2id, m = 19 MiB, t = 2, p = 1) hash of `password`, for `status.password_hash`.
///
/// Errors: a password shorter than [`MIN_PASSWORD_CHARS`] characters, or no random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!(
            "the password must have at least {MIN_PASSWORD_CHARS} characters (a LAN attacker can try guesses)"
        ));
    }
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&bytes).map_err(|e| e.to_string())?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hash_round_trip_and_minimum() {
        let h = hash_password("门卫 secret").unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password(&h, "门卫 secret"));
        assert!(!verify_password(&h, "wrong"));
        assert!(!verify_password("not a hash", "x"));
        assert!(hash_password("short").unwrap_err().contains("at least 8"));
    }

    #[test]
    fn failures_limit_per_address_and_expire() {
        let mut f = Failures::default();
        let t = Instant::now();
        let a: IpAddr = [10, 0, 0, 5].into();
        let b: IpAddr = [10, 0, 0, 6].into();
        for _ in 0..MAX_FAILURES {
            assert_eq!(f.limited(a, t), None);
            f.failed(a, t);
        }
        assert_eq!(f.limited(a, t), Some(true));
        assert_eq!(f.limited(a, t), Some(false));
        assert_eq!(f.limited(b, t), None, "another address is not limited");
        assert_eq!(f.limited(a, t + FAILURE_WINDOW), None, "the window ends");
        for i in 0..(MAX_ADDRESSES as u32 + 10) {
            f.failed(IpAddr::from(i.to_be_bytes()), t);
        }
        assert!(f.0.len() <= MAX_ADDRESSES);
    }
}
