//! Device MQTT input: a persistent QoS 1 session on the site broker, validation, and
//! acknowledgement only after the committer has made each message's outcome durable.
//!
//! Each connection attempt gets a fresh rumqttc client and event loop, polled by this task alone
//! and never cancelled mid-poll except at shutdown. Acks for a connection go through its own
//! channel; an ack that outlives its connection is dropped, and the broker redelivers that
//! message on the next session, where dedup recognises it.

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::committer::{Ack, Intake};
use crate::config::Config;
use crate::core::event;
use crate::core::mapping::{self, Source};
use crate::mqtt::{options, ClientSettings};
use crate::stats::LinkChange;
use crate::stats::Stats;
use rumqttc::{AsyncClient, Event, Incoming, Outgoing, QoS};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Ingest {
    pub cfg: Arc<Config>,
    /// The vendor sources in force (`[[mqtt.sources]]`); SIGHUP sends new ones, and their
    /// topic filters are subscribed (and old ones unsubscribed) on the running session.
    pub sources: tokio::sync::watch::Receiver<Arc<Vec<Source>>>,
    /// Taken by `run`; dropped at shutdown so the committer sees the intake close.
    pub intake: Option<flume::Sender<Intake>>,
    pub stats: Arc<Stats>,
    /// Stop taking new messages; keep the connection until committed messages are acked.
    pub stop: CancellationToken,
}

impl Ingest {
    pub async fn run(mut self) {
        let cfg = self.cfg.clone();
        let m = &cfg.mqtt;
        let mut backoff = Backoff::new(m.reconnect_min.0, m.reconnect_max.0);
        let settings = ClientSettings {
            url: &m.url,
            client_id: self.cfg.mqtt_client_id(),
            username: m.username.as_deref(),
            password: m.password.as_ref(),
            ca_file: m.ca_file.as_deref(),
            client_cert: m.client_cert.as_deref(),
            client_key: m.client_key.as_deref(),
            keep_alive: m.keep_alive.0,
        };
        let mut intake = self.intake.take();
        let mut watch = crate::link::TakeoverWatch::default();
        self.stats
            .link_start(crate::link::Link::Site, &m.url, now_ms());
        loop {
            let mut opts = match options(&settings, "mqtt") {
                Ok(o) => o,
                Err(e) => {
                    tracing::error!(error = %e, "device input cannot start");
                    return;
                }
            };
            opts.set_clean_session(false);
            opts.set_manual_acks(true);
            let (client, eventloop) = AsyncClient::new(opts, 4096);
            let done = self
                .connection(client, eventloop, &mut intake, &mut backoff, &mut watch)
                .await;
            if done {
                return;
            }
            // A problem that needs an operator is retried with the long backoff.
            let delay = if self
                .stats
                .link_problems()
                .contains_key(&crate::link::Link::Site)
            {
                m.reconnect_max.0
            } else {
                backoff.next_delay()
            };
            tracing::debug!(
                delay_ms = delay.as_millis() as u64,
                "site broker: reconnecting after backoff"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    /// One connection. Returns true when the input is finished (shutdown completed).
    async fn connection(
        &mut self,
        client: AsyncClient,
        mut eventloop: rumqttc::EventLoop,
        intake: &mut Option<flume::Sender<Intake>>,
        backoff: &mut Backoff,
        watch: &mut crate::link::TakeoverWatch,
    ) -> bool {
        let (ack_tx, mut ack_rx) = tokio::sync::mpsc::unbounded_channel::<rumqttc::Publish>();
        let mut ack_tx = Some(ack_tx);
        let acker_client = client.clone();
        // Acks in arrival order; when every ack sender is gone (shutdown), disconnect cleanly.
        let acker = tokio::spawn(async move {
            while let Some(p) = ack_rx.recv().await {
                if acker_client.ack(&p).await.is_err() {
                    return;
                }
            }
            let _ = acker_client.disconnect().await;
        });
        // Every filter subscribed on this session, and the batches whose SUBACK is awaited.
        let mut topics: Vec<String> =
            mapping::subscriptions(&self.cfg.mqtt.topics, &self.sources.borrow());
        let mut sub_batches: std::collections::VecDeque<Vec<String>> = Default::default();
        let offset_s = self.cfg.site_offset_s();
        let mut stopping = self.stop.is_cancelled();
        if stopping {
            intake.take();
            ack_tx.take();
        }
        let finished = loop {
            let polled = if stopping {
                eventloop.poll().await
            } else {
                tokio::select! {
                    biased;
                    _ = self.stop.cancelled() => {
                        // Stop intake: messages not yet handed over are not acked and will be
                        // redelivered. Committed ones are acked when the committer finishes.
                        stopping = true;
                        intake.take();
                        ack_tx.take();
                        continue;
                    }
                    Ok(()) = self.sources.changed() => {
                        let new = mapping::subscriptions(&self.cfg.mqtt.topics, &self.sources.borrow_and_update());
                        let added: Vec<String> = new.iter().filter(|t| !topics.contains(t)).cloned().collect();
                        for gone in topics.iter().filter(|t| !new.contains(t)) {
                            let _ = client.try_unsubscribe(gone.clone());
                        }
                        if !added.is_empty() {
                            let subs = added.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                            if client.try_subscribe_many(subs).is_ok() {
                                sub_batches.push_back(added.clone());
                            }
                        }
                        tracing::info!(added = ?added, topics = ?new, "device input: sources reloaded");
                        topics = new;
                        continue;
                    }
                    p = eventloop.poll() => p,
                }
            };
            match polled {
                Ok(Event::Incoming(Incoming::ConnAck(ack))) => {
                    backoff.reset();
                    watch.connected(std::time::Instant::now());
                    let url = &self.cfg.mqtt.url;
                    match self.stats.link_up(crate::link::Link::Site, now_ms()) {
                        LinkChange::Up { first: true, .. } => {
                            tracing::info!(%url, session_present = ack.session_present, "site broker connected")
                        }
                        LinkChange::Up { down_ms, .. } => {
                            tracing::info!(%url, down_s = down_ms / 1000, "site broker link up");
                            if !ack.session_present {
                                // Our persistent session is gone: what the devices sent while we
                                // were away was not queued for us.
                                tracing::warn!(%url, "site broker lost our session (restarted without persistence, or it expired): device messages sent while the link was down may not be delivered; see README, \"What the site broker needs\"");
                            }
                        }
                        _ => tracing::debug!("site broker connected"),
                    }
                    let subs = topics
                        .iter()
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    sub_batches.clear();
                    sub_batches.push_back(topics.clone());
                    if let Err(e) = client.try_subscribe_many(subs) {
                        sub_batches.clear();
                        tracing::warn!(error = %e, "device broker: cannot queue subscribe");
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    self.stats.received.fetch_add(1, Relaxed);
                    let (Some(tx), Some(acks)) = (intake.as_ref(), ack_tx.as_ref()) else {
                        continue; // stopping: leave it unacked for redelivery
                    };
                    let ack = (p.qos != QoS::AtMostOnce).then(|| {
                        let acks = acks.clone();
                        // An ack needs only the packet id and QoS: do not hold the payload.
                        let mut slim = rumqttc::Publish::new("", p.qos, Vec::new());
                        slim.pkid = p.pkid;
                        Ack::new(move || {
                            let _ = acks.send(slim);
                        })
                    });
                    let sources = self.sources.borrow().clone();
                    let outcomes: Vec<Result<_, (_, Option<String>)>> =
                        match mapping::source_for(&sources, &p.topic) {
                            Some(s) => mapping::map_all(s, &p.topic, &p.payload, offset_s)
                                .into_iter()
                                .map(|m| m.map_err(|(r, u)| (r, u.map(|u| u.to_string()))))
                                .collect(),
                            None => vec![event::parse(&p.topic, &p.payload).map_err(|r| (r, None))],
                        };
                    // A batch message is acknowledged once all its events are committed.
                    let mut acks: Vec<Option<Ack>> = match ack {
                        Some(a) => a.split(outcomes.len()).into_iter().map(Some).collect(),
                        None => (0..outcomes.len()).map(|_| None).collect(),
                    };
                    for parsed in outcomes {
                        let ack = acks.pop().flatten();
                        let item = match parsed {
                            Ok(event) => Intake::Event {
                                event,
                                topic: p.topic.clone(),
                                ack,
                            },
                            Err((reason, detail)) => {
                                tracing::debug!(
                                    topic = %crate::logfmt::Clean(&p.topic),
                                    %reason,
                                    detail = detail.as_deref().unwrap_or(""),
                                    "device message rejected"
                                );
                                Intake::Rejected {
                                    reason,
                                    topic: p.topic.clone(),
                                    detail,
                                    ack,
                                }
                            }
                        };
                        if tx.send_async(item).await.is_err() {
                            tracing::warn!("device input: committer is gone");
                            intake.take();
                            break;
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => break true,
                Ok(Event::Incoming(Incoming::SubAck(s))) => {
                    let mut problems = Vec::new();
                    let batch = sub_batches.pop_front().unwrap_or_default();
                    for (topic, code) in batch.iter().zip(&s.return_codes) {
                        match code {
                            rumqttc::SubscribeReasonCode::Failure => {
                                tracing::error!(%topic, url = %self.cfg.mqtt.url, "device broker refused the subscription; check its ACL");
                                problems
                                    .push(format!("{topic}: subscription refused (broker ACL)"));
                            }
                            rumqttc::SubscribeReasonCode::Success(QoS::AtMostOnce) => {
                                tracing::error!(%topic, url = %self.cfg.mqtt.url, "device broker granted QoS 0, not 1 (max_qos 0?): messages are no longer held until committed, so a restart can lose them; allow QoS 1 for this client");
                                problems.push(format!("{topic}: broker granted QoS 0 (set max_qos 1 or more): messages can be lost across restarts"));
                            }
                            _ => {}
                        }
                    }
                    self.stats
                        .set_site_problem((!problems.is_empty()).then(|| problems.join("; ")));
                }
                Ok(_) => {
                    if watch.is_stable(std::time::Instant::now())
                        && self.stats.set_link_problem(crate::link::Link::Site, None)
                    {
                        watch.reset();
                        tracing::info!(url = %self.cfg.mqtt.url, "device broker: the connection holds again");
                    }
                }
                Err(e) => {
                    if stopping {
                        self.stats.site_connected.store(false, Relaxed);
                        break true;
                    }
                    let url = &self.cfg.mqtt.url;
                    let problem = crate::link::classify(&e, "mqtt", url).or_else(|| {
                        watch.dropped(std::time::Instant::now()).then(|| {
                            crate::link::identity_taken(
                                "mqtt",
                                url,
                                &self.cfg.mqtt_client_id(),
                                "mqtt.client_id",
                            )
                        })
                    });
                    let reason = crate::link::down_reason(&e, problem.as_ref());
                    let change = self.stats.link_down(
                        crate::link::Link::Site,
                        reason,
                        e.to_string(),
                        now_ms(),
                    );
                    match problem {
                        Some(p) => {
                            if self
                                .stats
                                .set_link_problem(crate::link::Link::Site, Some(p.clone()))
                            {
                                tracing::error!(link = crate::link::Link::Site.as_str(), %url, reason = p.reason, error = %e, "{}", p.detail);
                            }
                        }
                        None if change == LinkChange::Down => {
                            tracing::warn!(link = crate::link::Link::Site.as_str(), %url, reason, error = %e, "site broker link down")
                        }
                        None => {
                            tracing::debug!(link = crate::link::Link::Site.as_str(), %url, reason, error = %e, "site broker still down")
                        }
                    }
                    break false;
                }
            }
        };
        acker.abort();
        if finished {
            tracing::info!("device input stopped");
        }
        finished || self.stop.is_cancelled()
    }
}

/// How long shutdown waits for the device input to flush acks and disconnect.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
