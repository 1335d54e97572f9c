//! The fleet link: one task with its own MQTT connection to the district broker (client id
//! `{upstream client id}-fleet`, clean session: `config/set` is retained, so each connection
//! gets the newest change again). It takes a change through [`rules`], records it in
//! `fleet.json` before the daemon applies it ([`Apply`]), watches the probation every second,
//! and publishes each step on `config/state` (retained, republished at every connection).
//! Signed `diag/request`s are answered on `diag/reply`.

use super::rules::{self, Verdict};
use super::*;
use crate::backoff::Backoff;
use crate::mqtt::{options, ClientSettings};
use crate::stats::{ConfigEvent, ConfigView, Stats};
use crate::store::Store;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, QoS};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use zhian_common::fleet_key::Trust;
use zhian_proto::{self as proto, ConfigPhase, Message};

/// A config for the daemon to run now (the fleet's change, or the one it rolls back to);
/// `None`: restart and read it from the file and `fleet.json` (the config could not be loaded
/// here).
pub struct Apply {
    pub cfg: Option<Config>,
    /// How the daemon applied it; dropped unanswered when the daemon stops first.
    pub done: oneshot::Sender<Applied>,
}

/// How a config was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Through the SIGHUP path: every changed section is live.
    Live,
    /// A section that only a restart applies changed: the daemon stops and starts again.
    Restart,
}

/// The fleet link's inputs.
pub struct FleetTask {
    pub cfg: Arc<Config>,
    pub origin: Origin,
    pub trust: Trust,
    pub store: Arc<Store>,
    pub stats: Arc<Stats>,
    pub apply: mpsc::Sender<Apply>,
    /// Why the recorded overlay is not in the running config (see [`Effective::problem`]).
    pub overlay_problem: Option<String>,
    pub stop: CancellationToken,
}

/// How far a diag request's `at` may be from the box's clock.
const DIAG_SKEW_MS: i64 = 600_000;

/// Whether the task goes on after a step (a restart ends it).
enum Go {
    On,
    Restarting,
}

struct Link {
    t: FleetTask,
    state: FleetState,
    /// When the running probation began (this process's clock), if one runs.
    probation_since: Option<i64>,
    client: Option<AsyncClient>,
    events: Option<EventLoop>,
    /// A change that arrived during a probation: taken once the probation ends.
    deferred: Option<Vec<u8>>,
}

impl FleetTask {
    pub async fn run(self) {
        let data_dir = self.cfg.gateway.data_dir.clone();
        let state = FleetState::load(&data_dir).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "fleet: state unreadable; starting from none");
            FleetState::default()
        });
        let mut link = Link {
            t: self,
            state,
            probation_since: None,
            client: None,
            events: None,
            deferred: None,
        };
        if let Go::On = link.at_start().await {
            link.serve().await;
        }
        // A restart ends this task before the daemon's stop token is cancelled: wait for it,
        // so the task is not taken for one that died.
        link.t.stop.cancelled().await;
    }
}

impl Link {
    fn now() -> i64 {
        crate::clock::now_ms()
    }

    fn data_dir(&self) -> &Path {
        &self.t.cfg.gateway.data_dir
    }

    /// A trial recorded before this start: continue its probation, or roll it back.
    async fn at_start(&mut self) -> Go {
        let Some(trial) = self.state.trial.clone() else {
            self.show();
            return Go::On;
        };
        if let Some(p) = self.t.overlay_problem.clone() {
            return self.roll_back(p).await;
        }
        // This start was counted before anything was bound (`fleet::count_start`).
        self.report(trial.change.serial, ConfigPhase::Probation, None);
        if let Err(e) = self.state.save(self.data_dir()) {
            tracing::error!(error = %e, "fleet: cannot record the probation's start");
        }
        self.probation_since = Some(Self::now());
        tracing::info!(
            serial = trial.change.serial,
            start = trial.starts,
            probation = %self.t.cfg.fleet.probation,
            "fleet: change on probation"
        );
        self.show();
        Go::On
    }

    async fn serve(&mut self) {
        let u = &self.t.cfg.upstream;
        let mut backoff = Backoff::new(u.reconnect_min.0, u.reconnect_max.0);
        let mut retry_at = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        enum Step {
            Stop,
            Tick,
            Connect,
            Event(Result<Event, rumqttc::ConnectionError>),
        }
        loop {
            let step = {
                let events = &mut self.events;
                let poll = async {
                    match events.as_mut() {
                        Some(el) => Step::Event(el.poll().await),
                        None => {
                            tokio::time::sleep_until(retry_at).await;
                            Step::Connect
                        }
                    }
                };
                tokio::select! {
                    _ = self.t.stop.cancelled() => Step::Stop,
                    _ = tick.tick() => Step::Tick,
                    s = poll => s,
                }
            };
            match step {
                Step::Stop => {
                    if let Some(c) = &self.client {
                        let _ = c.try_disconnect();
                    }
                    return;
                }
                Step::Tick => {
                    if let Go::Restarting = self.judge().await {
                        return;
                    }
                }
                Step::Connect => match self.connect() {
                    Ok((c, el)) => {
                        self.client = Some(c);
                        self.events = Some(el);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "fleet: cannot set up the link");
                        retry_at = tokio::time::Instant::now() + backoff.next_delay();
                    }
                },
                Step::Event(Ok(Event::Incoming(Incoming::ConnAck(_)))) => {
                    backoff.reset();
                    let g = &self.t.cfg.gateway.id;
                    let p = &self.t.cfg.upstream.topic_prefix;
                    if let Some(c) = &self.client {
                        for topic in [
                            proto::config_set_topic(p, g),
                            proto::diag_request_topic(p, g),
                        ] {
                            let _ = c.try_subscribe(topic, QoS::AtLeastOnce);
                        }
                    }
                    tracing::debug!("fleet: link up");
                    self.publish_report();
                }
                Step::Event(Ok(Event::Incoming(Incoming::Publish(m)))) => {
                    let g = &self.t.cfg.gateway.id;
                    let p = &self.t.cfg.upstream.topic_prefix;
                    if m.topic == proto::config_set_topic(p, g) {
                        if m.payload.is_empty() {
                            continue; // a retained change cleared by the district
                        }
                        if self.probation_since.is_some() {
                            self.deferred = Some(m.payload.to_vec());
                        } else if let Go::Restarting = self.take(&m.payload).await {
                            return;
                        }
                    } else if m.topic == proto::diag_request_topic(p, g) {
                        self.diag(&m.payload).await;
                    }
                }
                Step::Event(Ok(_)) => {}
                Step::Event(Err(e)) => {
                    tracing::debug!(error = %e, "fleet: link down");
                    self.events = None;
                    self.client = None;
                    retry_at = tokio::time::Instant::now() + backoff.next_delay();
                }
            }
        }
    }

    fn connect(&self) -> Result<(AsyncClient, EventLoop), String> {
        let u = &self.t.cfg.upstream;
        let settings = ClientSettings {
            url: &u.url,
            client_id: format!("{}-fleet", self.t.cfg.upstream_client_id()),
            username: u.username.as_deref(),
            password: u.password.as_ref(),
            ca_file: u.ca_file.as_deref(),
            client_cert: u.client_cert.as_deref(),
            client_key: u.client_key.as_deref(),
            keep_alive: u.keep_alive.0,
        };
        let mut opts = options(&settings, "upstream")?;
        opts.set_clean_session(true);
        Ok(AsyncClient::new(opts, 16))
    }

    /// The config hash of what runs now.
    fn hash_now(&self) -> String {
        config_hash(
            &self.t.origin,
            self.state.overlay().map(|c| c.fragment.as_str()),
        )
    }

    /// Record `phase` for `serial` as the report (not yet saved) and publish it.
    fn report(&mut self, serial: u64, state: ConfigPhase, reason: Option<String>) {
        self.state.report = Some(Report {
            serial,
            state,
            reason,
            config_hash: self.hash_now(),
            at_ms: Self::now(),
        });
        self.publish_report();
    }

    fn publish_report(&self) {
        let (Some(c), Some(r)) = (&self.client, &self.state.report) else {
            return;
        };
        let msg = proto::ConfigState {
            schema: proto::ConfigStateV1,
            gateway: Some(self.t.cfg.gateway.id.clone()),
            serial: r.serial,
            state: r.state,
            reason: r.reason.clone(),
            config_hash: r.config_hash.clone(),
            at: Some(proto::Timestamp(r.at_ms)),
        };
        let topic = proto::topic(
            &self.t.cfg.upstream.topic_prefix,
            &self.t.cfg.gateway.id,
            proto::Leaf::ConfigState,
        );
        if let Err(e) = c.try_publish(topic, QoS::AtLeastOnce, true, msg.to_bytes()) {
            tracing::warn!(error = %e, "fleet: cannot queue the config/state report; it is sent at the next connection");
        }
    }

    /// Show the state on the page and `/api/status`.
    fn show(&self) {
        let st = &self.state;
        let ev = |o: &Option<Outcome>| {
            o.as_ref().map(|o| ConfigEvent {
                serial: o.serial,
                reason: o.reason.clone(),
                at: crate::core::summary::rfc3339_utc(o.at_ms),
            })
        };
        // An applied overlay this file no longer loads with is not in force (the trial's
        // problem is rolled back at start instead).
        let problem = self
            .t
            .overlay_problem
            .clone()
            .filter(|_| st.trial.is_none());
        let overlay = st.overlay().filter(|_| problem.is_none());
        self.t.stats.set_config_view(ConfigView {
            problem,
            source: if overlay.is_some() { "fleet" } else { "file" },
            serial: overlay.map(|c| c.serial),
            state: if st.trial.is_some() {
                Some("probation")
            } else {
                overlay.map(|_| "applied")
            },
            since: overlay.map(|c| crate::core::summary::rfc3339_utc(c.at_ms)),
            keys: overlay
                .map(|c| rules::overlay_keys(&c.fragment))
                .unwrap_or_default(),
            trust: Some(
                self.t
                    .trust
                    .0
                    .iter()
                    .map(|k| k.fingerprint())
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            rolled_back: ev(&st.rolled_back),
            rejected: ev(&st.rejected),
        });
    }

    fn save_or_log(&self, what: &str) -> bool {
        match self.state.save(self.data_dir()) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "fleet: cannot record {what} in {}", FILE_NAME);
                false
            }
        }
    }

    /// A `config/set` payload.
    async fn take(&mut self, payload: &[u8]) -> Go {
        let set: proto::ConfigSet = match serde_json::from_slice(payload) {
            Ok(s) => s,
            Err(e) => {
                let serial = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("serial").and_then(|s| s.as_u64()))
                    .unwrap_or(0);
                self.reject(
                    serial,
                    sha256_hex(payload),
                    format!("not a zhian.config.v1 message: {e}"),
                );
                return Go::On;
            }
        };
        let sha = sha256_hex(set.fragment.as_bytes());
        let signed = proto::config_signed_bytes(&self.t.cfg.gateway.id, set.serial, &set.fragment);
        let sig = self.t.trust.verify(&signed, &set.sig);
        match rules::classify(&self.state, set.serial, &sha, sig) {
            Verdict::Again => Go::On,
            Verdict::Reject(r) => {
                self.reject(set.serial, sha, r);
                Go::On
            }
            Verdict::Check => {
                if let Some(r) = rules::refuse_keys(&set.fragment) {
                    self.reject(set.serial, sha, r);
                    return Go::On;
                }
                let origin = self.t.origin.clone();
                let fragment = set.fragment.clone();
                let checked =
                    tokio::task::spawn_blocking(move || with_overlay(&origin, &fragment)).await;
                match checked {
                    Ok(Ok(cfg)) => self.accept(set, cfg).await,
                    Ok(Err(problems)) => {
                        let why = problems
                            .iter()
                            .map(|p| p.to_string())
                            .collect::<Vec<_>>()
                            .join("; ");
                        self.reject(set.serial, sha, format!("check-config refuses it: {why}"));
                        Go::On
                    }
                    Err(_) => Go::On,
                }
            }
        }
    }

    fn reject(&mut self, serial: u64, sha: String, reason: String) {
        tracing::warn!(serial, reason = %reason, "fleet: change rejected; nothing applied");
        self.state.rejected = Some(Outcome {
            serial,
            reason: reason.clone(),
            at_ms: Self::now(),
            sha,
        });
        self.report(serial, ConfigPhase::Rejected, Some(reason));
        self.save_or_log("a rejection");
        self.show();
    }

    async fn accept(&mut self, set: proto::ConfigSet, cfg: Config) -> Go {
        let before = self.state.clone();
        self.state.trial = Some(Trial {
            change: Change {
                serial: set.serial,
                fragment: set.fragment,
                at_ms: Self::now(),
            },
            starts: 0,
        });
        self.state.last_serial = set.serial;
        self.report(set.serial, ConfigPhase::Applying, None);
        if !self.save_or_log("the change") {
            // Not recorded: not applied (a restart would lose it half-way).
            let sha = self
                .state
                .trial
                .as_ref()
                .map(|t| t.change.sha())
                .unwrap_or_default();
            self.state = before;
            self.reject(
                set.serial,
                sha,
                format!("cannot record the change in {FILE_NAME}"),
            );
            return Go::On;
        }
        tracing::info!(serial = set.serial, "fleet: change accepted; applying");
        self.show();
        if !crate::daemon::reload::restart_sections(&self.t.cfg, &cfg).is_empty() {
            // The restart ends this connection: let `applying` reach the broker first.
            self.flush(Duration::from_secs(3)).await;
        }
        match self.run_config(Some(cfg)).await {
            Applied::Live => {
                self.probation_since = Some(Self::now());
                self.report(set.serial, ConfigPhase::Probation, None);
                self.save_or_log("the probation");
                tracing::info!(serial = set.serial, probation = %self.t.cfg.fleet.probation, "fleet: change applied live; on probation");
                self.show();
                Go::On
            }
            Applied::Restart => Go::Restarting,
        }
    }

    /// Poll the connection until the broker acknowledged a publish, at most `limit` (nothing to
    /// do while disconnected).
    async fn flush(&mut self, limit: Duration) {
        let Some(el) = self.events.as_mut() else {
            return;
        };
        let _ = tokio::time::timeout(limit, async {
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Incoming::PubAck(_))) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    /// Hand `cfg` to the daemon and wait for how it was applied (a daemon that stops first
    /// counts as a restart: the next start runs what `fleet.json` records).
    async fn run_config(&mut self, cfg: Option<Config>) -> Applied {
        let (tx, rx) = oneshot::channel();
        if self.t.apply.send(Apply { cfg, done: tx }).await.is_err() {
            return Applied::Restart;
        }
        rx.await.unwrap_or(Applied::Restart)
    }

    /// Each second during a probation: roll back on a failed rule, pass at its end.
    async fn judge(&mut self) -> Go {
        let Some(since) = self.probation_since else {
            return Go::On;
        };
        let Some(trial) = self.state.trial.clone() else {
            self.probation_since = None;
            return Go::On;
        };
        let now = Self::now();
        let stats = &self.t.stats;
        let cfg = &self.t.cfg;
        let links = stats.links();
        let mut facts = Vec::new();
        for (link, used, name) in [
            (crate::link::Link::Site, cfg.mqtt.enabled, "site broker"),
            (
                crate::link::Link::District,
                cfg.upstream.enabled,
                "district broker",
            ),
        ] {
            if let (true, Some(l)) = (used, links.get(&link)) {
                facts.push(rules::LinkFact {
                    name,
                    url: l.url.clone(),
                    connected: l.connected,
                    since_ms: l.since_ms,
                    reason: l.error.clone().or(l.reason.map(str::to_string)),
                });
            }
        }
        let health = rules::Health {
            now_ms: now,
            since_ms: since,
            // A fragment may lengthen `health.link_grace`, and a grace as long as the probation
            // would judge nothing: on probation a link gets at most half of it.
            grace_ms: stats
                .cadence()
                .link_grace_ms
                .min(cfg.fleet.probation.as_millis_u64() as i64 / 2),
            links: facts,
            paused: stats
                .paused()
                .map(|p| format!("{}: {}", p.reason.as_str(), p.detail)),
            down: stats.down(),
        };
        if let Some(why) = rules::probation_failure(&health) {
            return self.roll_back(why).await;
        }
        if now - since >= cfg.fleet.probation.as_millis_u64() as i64 {
            self.state.applied = Some(trial.change.clone());
            self.state.trial = None;
            self.probation_since = None;
            self.report(trial.change.serial, ConfigPhase::Applied, None);
            self.save_or_log("the passed probation");
            tracing::info!(
                serial = trial.change.serial,
                "fleet: probation passed; change applied"
            );
            self.show();
            if let Some(next) = self.deferred.take() {
                return self.take(&next).await;
            }
        }
        Go::On
    }

    /// Back to the config the box had before the trial, recorded first.
    async fn roll_back(&mut self, reason: String) -> Go {
        let Some(trial) = self.state.trial.take() else {
            return Go::On;
        };
        self.probation_since = None;
        tracing::warn!(serial = trial.change.serial, reason = %reason, "fleet: probation failed; rolling back to the config before it");
        self.state.rolled_back = Some(Outcome {
            serial: trial.change.serial,
            reason: reason.clone(),
            at_ms: Self::now(),
            sha: trial.change.sha(),
        });
        self.report(trial.change.serial, ConfigPhase::RolledBack, Some(reason));
        self.save_or_log("the rollback");
        self.show();
        let origin = self.t.origin.clone();
        let loaded = tokio::task::spawn_blocking(move || load_effective(&origin)).await;
        let cfg = match loaded {
            Ok(Ok(e)) => Some(e.cfg),
            Ok(Err(p)) => {
                tracing::error!(problems = ?p.iter().map(|p| p.to_string()).collect::<Vec<_>>(), "fleet: the config to roll back to does not load; restarting on what the file says");
                None
            }
            Err(_) => None,
        };
        match self.run_config(cfg).await {
            Applied::Live => {
                if let Some(next) = self.deferred.take() {
                    return self.take(&next).await;
                }
                Go::On
            }
            Applied::Restart => Go::Restarting,
        }
    }

    /// A `diag/request`: answered with the status report and the log tail if signed.
    async fn diag(&mut self, payload: &[u8]) {
        let g = &self.t.cfg.gateway.id;
        let req: proto::DiagRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "fleet: diag request unreadable; not answered");
                return;
            }
        };
        let ok_id = !req.id.is_empty()
            && req.id.len() <= 64
            && req
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-');
        let skew = (Self::now() - req.at.0).abs();
        let sig = self
            .t
            .trust
            .verify(&proto::diag_signed_bytes(g, &req.id, req.at), &req.sig);
        let refused = if !ok_id {
            Some("id is not 1-64 of [A-Za-z0-9-]".to_string())
        } else if let Err(e) = sig {
            Some(e)
        } else if skew > DIAG_SKEW_MS {
            Some(format!(
                "signed {} s away from this box's clock",
                skew / 1000
            ))
        } else {
            None
        };
        if let Some(why) = refused {
            tracing::warn!(reason = %why, "fleet: diag request refused; not answered");
            return;
        }
        tracing::info!(id = %req.id, "fleet: diag request answered");
        let (cfg, store, stats) = (
            self.t.cfg.clone(),
            self.t.store.clone(),
            self.t.stats.clone(),
        );
        let status =
            tokio::task::spawn_blocking(move || crate::status::status_json(cfg, store, stats))
                .await
                .unwrap_or(serde_json::Value::Null);
        let reply = proto::DiagReply {
            schema: proto::DiagV1,
            gateway: g.clone(),
            id: req.id,
            at: proto::Timestamp(Self::now()),
            status,
            log: log_tail::lines(),
        };
        if let Some(c) = &self.client {
            let bytes = serde_json::to_vec(&reply).expect("diag reply serializes");
            let topic = proto::diag_reply_topic(&self.t.cfg.upstream.topic_prefix, g);
            if let Err(e) = c.try_publish(topic, QoS::AtLeastOnce, false, bytes) {
                tracing::warn!(error = %e, "fleet: cannot queue the diag reply");
            }
        }
    }
}
