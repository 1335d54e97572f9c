//! What a broker connection's failures mean to an operator, for both links (the site broker and
//! the district broker): refused credentials, TLS trouble, and another client holding our
//! client id (two boxes started from one copied config). These need someone to act, so they
//! are ERRORs naming the link, the URL and what to change, shown on the page and in metrics,
//! and retried with the long backoff; a network blip stays a WARN.

use std::time::{Duration, Instant};

/// A failure that needs an operator, with the `reason` label of `zhian_link_problem`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// `refused` (credentials, ACL), `tls` (unknown CA, refused certificate) or
    /// `identity_taken` (another client with our client id).
    pub reason: &'static str,
    /// What is wrong and what to change, for the log and the page.
    pub detail: String,
}

/// Every `reason` a [`Problem`] can have (the metric's label values).
/// One of the gateway's two MQTT links.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// The site (device) broker.
    Site,
    /// The district broker (upstream).
    District,
}

impl Link {
    /// Both links, site first.
    pub const ALL: [Link; 2] = [Link::Site, Link::District];

    /// `site` or `district` (log fields, metric labels, the API's keys).
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Site => "site",
            Link::District => "district",
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub const PROBLEM_REASONS: [&str; 3] = ["refused", "tls", "identity_taken"];

/// The operator-facing meaning of a connection error, if it has one.
pub fn classify(e: &rumqttc::ConnectionError, link: &str, url: &str) -> Option<Problem> {
    use rumqttc::{ConnectReturnCode as Code, ConnectionError as E};
    match e {
        E::ConnectionRefused(code) => {
            let why = match code {
                Code::BadUserNamePassword => "refused the username or password",
                Code::NotAuthorized => "refused: not authorized (credentials or ACL)",
                Code::BadClientId => "refused our client id",
                Code::RefusedProtocolVersion => "refused MQTT 3.1.1",
                Code::ServiceUnavailable => "says it is unavailable",
                Code::Success => return None,
            };
            Some(Problem {
                reason: "refused",
                detail: format!("{link} broker {url} {why}: check {link}.username / password"),
            })
        }
        E::Tls(t) => {
            // rustls says "certificate expired", "certificate not valid for name ...",
            // "UnknownIssuer" (Display and Debug forms differ between versions).
            let text = t.to_string().to_ascii_lowercase().replace(['_', ' '], "");
            let hint = if text.contains("expired") || text.contains("notvalidyet") {
                "the broker's certificate is expired or not yet valid (renew it on the broker; or this box's clock is wrong)".to_string()
            } else if text.contains("notvalidforname") {
                format!("the broker's certificate does not name the host in {link}.url: use the name (or IP) its certificate carries")
            } else if text.contains("unknownissuer") || text.contains("badsignature") {
                format!("the broker's certificate is not signed by {link}.ca_file: give the CA that signed it")
            } else {
                format!("check {link}.ca_file (the broker's CA) and, for mutual TLS, client_cert / client_key")
            };
            Some(Problem {
                reason: "tls",
                detail: format!("{link} broker {url}: TLS failed ({t}): {hint}"),
            })
        }
        // The broker refused our side of the handshake (TLS 1.3 reports it after the client
        // finished: rumqttc surfaces it as an I/O or MQTT-state error carrying the alert).
        _ if e.to_string().contains("fatal alert") => Some(Problem {
            reason: "tls",
            detail: format!(
                "{link} broker {url} refused our TLS client certificate ({e}): check {link}.client_cert / client_key (a certificate the broker's CA signed, not expired)"
            ),
        }),
        E::Io(io) if io.to_string().contains("certificate") => Some(Problem {
            reason: "tls",
            detail: format!("{link} broker {url}: TLS failed ({io}): check {link}.ca_file, client_cert, client_key"),
        }),
        _ => None,
    }
}

/// Connections the broker closes right after CONNACK, this many times in a row, mean another
/// client holds our client id (a broker disconnects the older session when a client connects
/// with the same id: two boxes flap each other for ever).
pub const TAKEOVER_DROPS: u32 = 3;
/// A connection that ends sooner than this after its CONNACK counts as a quick drop.
pub const QUICK: Duration = Duration::from_secs(5);

/// Watches one link's sessions for the identity-taken pattern. Pure: `now` is passed in.
#[derive(Debug, Default)]
pub struct TakeoverWatch {
    connected_at: Option<Instant>,
    quick_drops: u32,
}

impl TakeoverWatch {
    /// CONNACK received.
    pub fn connected(&mut self, now: Instant) {
        self.connected_at = Some(now);
    }

    /// The connection ended (with an error). Returns true when the pattern is established.
    pub fn dropped(&mut self, now: Instant) -> bool {
        match self.connected_at.take() {
            Some(at) if now.duration_since(at) < QUICK => self.quick_drops += 1,
            Some(_) => self.quick_drops = 0,
            // Never connected (refused, unreachable): says nothing about our identity.
            None => {}
        }
        self.quick_drops >= TAKEOVER_DROPS
    }

    /// The connection ended for a reason that is not another client taking our identity (the
    /// broker closed it on a message too large for it): not counted as a quick drop.
    pub fn dropped_explained(&mut self) {
        self.connected_at = None;
    }

    /// The current connection has lived long enough to trust (clears the pattern).
    pub fn is_stable(&self, now: Instant) -> bool {
        self.connected_at
            .is_some_and(|at| now.duration_since(at) >= QUICK)
    }

    /// Forget past drops.
    pub fn reset(&mut self) {
        self.quick_drops = 0;
    }
}

/// Why a link is down, for the page, the API and the log: a [`Problem`]'s reason, or
/// `unreachable` (nothing answers: refused port, timeout, unknown host) or `closed` (the
/// connection was lost).
pub fn down_reason(e: &rumqttc::ConnectionError, problem: Option<&Problem>) -> &'static str {
    use rumqttc::ConnectionError as E;
    if let Some(p) = problem {
        return p.reason;
    }
    match e {
        E::NetworkTimeout | E::FlushTimeout => "unreachable",
        E::Io(io) => {
            use std::io::ErrorKind as K;
            match io.kind() {
                K::ConnectionRefused
                | K::TimedOut
                | K::HostUnreachable
                | K::NetworkUnreachable
                | K::AddrNotAvailable
                | K::NotFound => "unreachable",
                _ if io.to_string().contains("lookup") => "unreachable",
                _ => "closed",
            }
        }
        _ => "closed",
    }
}

/// Every reason a link can be down for (`LinkState::reason`), `connecting` before the first
/// attempt ends.
pub const DOWN_REASONS: [&str; 6] = [
    "connecting",
    "unreachable",
    "closed",
    "refused",
    "tls",
    "identity_taken",
];

/// How often a link that stays down is mentioned again at WARN (each failed attempt in between
/// is DEBUG).
pub const REMIND_EVERY_MS: i64 = 10 * 60 * 1000;

/// The ERROR text for an identity taken on `link`.
pub fn identity_taken(link: &str, url: &str, client_id: &str, key: &str) -> Problem {
    Problem {
        reason: "identity_taken",
        detail: format!(
            "{link} broker {url} keeps closing our session right after it connects: another client is using client id {client_id:?} (a second box started from a copied config?); give each box its own gateway.id (or {key})"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_quick_drops_in_a_row_are_a_takeover() {
        let t0 = Instant::now();
        let mut w = TakeoverWatch::default();
        for i in 0..3u64 {
            w.connected(t0 + Duration::from_secs(i * 2));
            let hit = w.dropped(t0 + Duration::from_secs(i * 2 + 1));
            assert_eq!(hit, i == 2);
        }
        // A long-lived connection in between resets the count.
        let mut w = TakeoverWatch::default();
        w.connected(t0);
        w.dropped(t0 + Duration::from_secs(1));
        w.connected(t0 + Duration::from_secs(2));
        w.dropped(t0 + Duration::from_secs(60));
        w.connected(t0 + Duration::from_secs(61));
        assert!(!w.dropped(t0 + Duration::from_secs(62)));
        // Failures before any CONNACK say nothing.
        let mut w = TakeoverWatch::default();
        for _ in 0..5 {
            assert!(!w.dropped(t0));
        }
    }
}
