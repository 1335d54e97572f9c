//! The forwarder: the only task that talks to the district broker.
//!
//! It sends the outbox in order (alerts first), at most `upstream.max_inflight` unacknowledged
//! at once, and reports an entry to the committer for deletion only after its PUBACK. rumqttc's
//! `publish()` only queues, so PUBACKs are correlated by hand: publishes are issued from this
//! task only, `Outgoing::Publish(pkid)` events come back in issue order and bind each pkid to the
//! entry, and `Incoming::PubAck(pkid)` releases it. Every connection uses a fresh client and
//! event loop with a clean session, so nothing from an earlier connection can be replayed under
//! our feet; after a reconnect the outbox is resent from its start (the platform keeps the
//! highest rev per window, so a resend never double-counts).
//!
//! The district broker's packet limit is learned: when the broker closes the connection with a
//! publish unacknowledged that is larger than any it acknowledged on that connection, the limit
//! drops to half that publish (never below [`MIN_LEARNED_PACKET`]) for the rest of the process,
//! and summaries larger than it are split again at send time ([`crate::core::summary::resplit`]):
//! a whole summary into parts, the pre-split parts of one rev (all still pending) merged and cut
//! anew. Such a send unit's outbox keys are reported acked only after every publish of it is.
//! A message is parked only when it cannot be made smaller (a single row, an alert, a rev with a
//! part already delivered) and the broker still closes the connection on it `PARK_AFTER` times.

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::config::Config;
use crate::core::summary::{resplit, summary_part_of};
use crate::mqtt::{options, ClientSettings};
use crate::stats::LinkChange;
use crate::stats::Stats;
use crate::store::{OutboxKey, OutboxRecordV1, OutboxTopic, Store, CLASS_ALERT, CLASS_SUMMARY};
use rumqttc::{AsyncClient, Event, Incoming, LastWill, Outgoing, QoS};
use session::{PacketLimit, Pub, Queued, Refusals, Sent, Session};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use zhian_proto::{self as proto, Message};

mod heartbeat;
mod session;

pub struct Forwarder {
    pub cfg: Arc<Config>,
    pub store: Arc<Store>,
    pub stats: Arc<Stats>,
    pub outbox_ready: Arc<Notify>,
    /// PUBACKed outbox keys, to the committer for deletion.
    pub acked: flume::Sender<OutboxKey>,
    /// Keys the district broker kept refusing, to the committer for parking.
    pub park: flume::Sender<OutboxKey>,
    pub stop: CancellationToken,
}

/// A message the broker closed the connection on this many times in a row, and that cannot be
/// made smaller, is parked.
pub const PARK_AFTER: u32 = 3;

/// The smallest packet limit learned from the district broker (bytes). A summary row is a few
/// hundred bytes at most: with site labels of usual length, any one row fits a part this size.
pub const MIN_LEARNED_PACKET: usize = 1024;

/// MQTT 3.1.1 QoS 1 PUBLISH overhead beyond topic and payload: fixed header up to 5 bytes,
/// topic length 2, packet id 2.
const PUBLISH_OVERHEAD: usize = 9;

/// Above this many remembered PUBACKed keys, drop the ones the committer already deleted.
const ACKED_PRUNE_AT: usize = 4096;

/// Keep only the PUBACKed keys still in the outbox (the rest were deleted by the committer).
fn prune(store: &Store, acked_local: &mut BTreeSet<OutboxKey>) {
    if let Ok(still) = store.outbox_contains(acked_local.iter().copied()) {
        *acked_local = still.into_iter().collect();
    }
}

/// One connection: its client and its [`Session`] (what was sent on it; `c.field` reads the
/// session through `Deref`).
struct Conn {
    client: AsyncClient,
    session: Session,
}

impl Conn {
    fn new(client: AsyncClient, limit: usize, epoch: u64) -> Conn {
        Conn {
            client,
            session: Session::new(limit, epoch),
        }
    }
}

impl std::ops::Deref for Conn {
    type Target = Session;
    fn deref(&self) -> &Session {
        &self.session
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Session {
        &mut self.session
    }
}

impl Forwarder {
    fn topic(&self, leaf: proto::Leaf) -> String {
        proto::topic(&self.cfg.upstream.topic_prefix, &self.cfg.gateway.id, leaf)
    }

    fn status_payload(&self, online: bool, epoch: u64) -> Vec<u8> {
        proto::Status {
            schema: proto::StatusV1,
            state: if online {
                proto::LinkState::Online
            } else {
                proto::LinkState::Offline
            },
            gateway: Some(self.cfg.gateway.id.clone()),
            epoch: Some(epoch),
            version: online.then(|| env!("CARGO_PKG_VERSION").to_string()),
            since: online.then(|| proto::Timestamp(now_ms())),
            site: Some(proto::Site {
                district: self.cfg.gateway.district.clone(),
                street: self.cfg.gateway.street.clone(),
                community: self.cfg.gateway.community.clone(),
                compound: self.cfg.gateway.compound.clone(),
            }),
        }
        .to_bytes()
    }

    pub async fn run(self) {
        let u = &self.cfg.upstream;
        let mut backoff = Backoff::new(u.reconnect_min.0, u.reconnect_max.0);
        // Keys PUBACKed but perhaps not yet deleted by the committer: never resend them.
        let mut acked_local: BTreeSet<OutboxKey> = BTreeSet::new();
        let mut watch = crate::link::TakeoverWatch::default();
        let mut refusals = Refusals {
            blamed: HashMap::new(),
            limit: PacketLimit {
                configured: u.max_packet_size.0 as usize,
                learned: None,
            },
        };
        self.stats
            .upstream_max_packet
            .store(u.max_packet_size.0, Relaxed);
        self.stats
            .link_start(crate::link::Link::District, &u.url, now_ms());
        let mut epochs = crate::epoch::Epochs::open(&self.cfg.gateway.data_dir);
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let settings = ClientSettings {
                url: &u.url,
                client_id: self.cfg.upstream_client_id(),
                username: u.username.as_deref(),
                password: u.password.as_ref(),
                ca_file: u.ca_file.as_deref(),
                client_cert: u.client_cert.as_deref(),
                client_key: u.client_key.as_deref(),
                keep_alive: u.keep_alive.0,
            };
            let finished = match options(&settings, "upstream") {
                Ok(opts) => {
                    let (epoch, err) = epochs.next(u64::try_from(now_ms() / 1000).unwrap_or(0));
                    if let Some(e) = err {
                        tracing::warn!(error = %e, epoch, "cannot persist the district connection epoch (used anyway)");
                    }
                    self.stats.upstream_epoch.store(epoch, Relaxed);
                    self.connect_once(
                        opts,
                        epoch,
                        &mut acked_local,
                        &mut backoff,
                        &mut watch,
                        &mut refusals,
                    )
                    .await
                }
                // E.g. a certificate being rotated: try again, never give up the link.
                Err(e) => {
                    tracing::error!(error = %e, "district broker: cannot set up the connection");
                    false
                }
            };
            self.stats.upstream_connected.store(false, Relaxed);
            if finished {
                return;
            }
            // A problem that needs an operator is retried with the long backoff.
            let delay = if self
                .stats
                .link_problems()
                .contains_key(&crate::link::Link::District)
            {
                u.reconnect_max.0
            } else {
                backoff.next_delay()
            };
            tracing::debug!(
                delay_ms = delay.as_millis() as u64,
                "district broker: reconnecting after backoff"
            );
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    async fn connect_once(
        &self,
        mut opts: rumqttc::MqttOptions,
        epoch: u64,
        acked_local: &mut BTreeSet<OutboxKey>,
        backoff: &mut Backoff,
        watch: &mut crate::link::TakeoverWatch,
        refusals: &mut Refusals,
    ) -> bool {
        let u = &self.cfg.upstream;
        {
            opts.set_clean_session(true);
            opts.set_inflight(u.max_inflight.saturating_add(8));
            // Refuse locally what the district broker would refuse (summaries are split under it,
            // or under the smaller limit learned from the broker).
            opts.set_max_packet_size(
                crate::mqtt::MAX_INCOMING_PACKET,
                u.max_packet_size.0 as usize,
            );
            opts.set_last_will(LastWill::new(
                self.topic(proto::Leaf::Status),
                self.status_payload(false, epoch),
                QoS::AtLeastOnce,
                true,
            ));
            prune(&self.store, acked_local);
        }
        self.connection(opts, epoch, acked_local, backoff, watch, refusals)
            .await
    }

    /// One connection. Returns true when shut down.
    async fn connection(
        &self,
        opts: rumqttc::MqttOptions,
        epoch: u64,
        acked_local: &mut BTreeSet<OutboxKey>,
        backoff: &mut Backoff,
        watch: &mut crate::link::TakeoverWatch,
        refusals: &mut Refusals,
    ) -> bool {
        let cap = usize::from(self.cfg.upstream.max_inflight) * 2 + 16;
        let (client, mut eventloop) = AsyncClient::new(opts, cap);
        let (ev_tx, mut ev_rx) = mpsc::channel(256);
        // The event loop is polled by its own task and never cancelled mid-poll (rumqttc's
        // poll is not cancel-safe); it ends at the first error and the connection is rebuilt.
        let poller = tokio::spawn(async move {
            loop {
                let r = eventloop.poll().await;
                let end = r.is_err() || matches!(r, Ok(Event::Outgoing(Outgoing::Disconnect)));
                if ev_tx.send(r).await.is_err() || end {
                    return;
                }
            }
        });
        let mut c = Conn::new(client, refusals.limit.current(), epoch);
        let mut connected = false;
        // A safety net: refill once a second even if a wake-up was missed.
        let mut refill = tokio::time::interval(Duration::from_secs(1));
        let mut heartbeat = tokio::time::interval(self.cfg.upstream.heartbeat.0);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let finished = loop {
            tokio::select! {
                ev = ev_rx.recv() => match ev {
                    Some(Ok(Event::Incoming(Incoming::ConnAck(_)))) => {
                        connected = true;
                        backoff.reset();
                        watch.connected(Instant::now());
                        match self.stats.link_up(crate::link::Link::District, now_ms()) {
                            LinkChange::Up { first: true, .. } => tracing::info!(url = %self.cfg.upstream.url, "district broker connected"),
                            LinkChange::Up { down_ms, .. } => tracing::info!(url = %self.cfg.upstream.url, down_s = down_ms / 1000, "district broker link up"),
                            _ => {}
                        }
                        let status = self.status_payload(true, c.epoch);
                        if c.client.try_publish(self.topic(proto::Leaf::Status), QoS::AtLeastOnce, true, status).is_ok() {
                            c.record_sent(Sent::Status, Instant::now());
                        }
                        self.fill(&mut c, acked_local);
                    }
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => c.bind(pkid, Instant::now()),
                    Some(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                        if let Some((done, latency)) = c.puback(ack.pkid, Instant::now()) {
                            self.stats.upstream_published.fetch_add(1, Relaxed);
                            self.stats.publish_seconds.observe(latency.as_secs_f64());
                            for key in done.into_iter().flatten() {
                                refusals.blamed.remove(&key);
                                acked_local.insert(key);
                                tracing::debug!(class = key.0, seq = key.1, latency_ms = latency.as_millis() as u64, "upstream PUBACK");
                                let _ = self.acked.send(key);
                            }
                            self.fill(&mut c, acked_local);
                        } else if c.status_pkid == Some(ack.pkid) {
                            c.status_acked = true;
                        }
                    }
                    Some(Ok(_)) => {
                        if watch.is_stable(Instant::now())
                            && self.stats.set_link_problem(crate::link::Link::District, None)
                        {
                            watch.reset();
                            tracing::info!(url = %self.cfg.upstream.url, "district broker: the connection holds again");
                        }
                    }
                    Some(Err(e)) => {
                        // The broker closing the connection on a message it will not take
                        // (too large for its max_packet_size, say).
                        let explained = self.refused(&mut c, refusals, acked_local, &e);
                        let url = &self.cfg.upstream.url;
                        let problem = crate::link::classify(&e, "upstream", url).or_else(|| {
                            if explained {
                                // A message too large for the broker (a new limit learned),
                                // not our identity taken by another box.
                                watch.dropped_explained();
                                return None;
                            }
                            watch.dropped(Instant::now()).then(|| {
                                crate::link::identity_taken(
                                    "upstream",
                                    url,
                                    &self.cfg.upstream_client_id(),
                                    "upstream.client_id",
                                )
                            })
                        });
                        let reason = crate::link::down_reason(&e, problem.as_ref());
                        let change = self.stats.link_down(crate::link::Link::District, reason, e.to_string(), now_ms());
                        match problem {
                            Some(p) => {
                                if self.stats.set_link_problem(crate::link::Link::District, Some(p.clone())) {
                                    tracing::error!(link = crate::link::Link::District.as_str(), %url, reason = p.reason, error = %e, "{}", p.detail);
                                }
                            }
                            None if change == LinkChange::Down => {
                                tracing::warn!(link = crate::link::Link::District.as_str(), %url, reason, error = %e, "district broker link down")
                            }
                            None => tracing::debug!(link = crate::link::Link::District.as_str(), %url, reason, error = %e, "district broker still down"),
                        }
                        break false;
                    }
                    None => break false,
                },
                _ = self.outbox_ready.notified(), if connected => {
                    c.check_alerts = true;
                    self.fill(&mut c, acked_local)
                }
                _ = heartbeat.tick(), if connected => self.heartbeat(&mut c),
                _ = refill.tick(), if connected => {
                    if acked_local.len() > ACKED_PRUNE_AT {
                        prune(&self.store, acked_local);
                    }
                    c.check_alerts = true;
                    self.fill(&mut c, acked_local);
                }
                _ = self.stop.cancelled() => {
                    if connected {
                        self.goodbye(&mut c, &mut ev_rx).await;
                    }
                    break true;
                }
            }
        };
        poller.abort();
        finished
    }

    /// The broker closed the connection. The suspect is the largest publish it did not
    /// acknowledge: larger than any it took on this connection, it may be too large for the
    /// broker, so the packet limit is learned from it and, if its rows can go in smaller parts,
    /// it is simply sent again that way. Otherwise (it cannot shrink, or no publish is larger
    /// than what passed: not a size refusal) the suspect, or else the oldest unacknowledged
    /// entry, is blamed, and parked after `PARK_AFTER` times. Returns whether the limit dropped
    /// (the connection's end is explained by a message too large for the broker).
    fn refused(
        &self,
        c: &mut Conn,
        refusals: &mut Refusals,
        acked_local: &mut BTreeSet<OutboxKey>,
        e: &rumqttc::ConnectionError,
    ) -> bool {
        let verdict = c.judge_refusal(&mut refusals.limit);
        if let Some(refused_bytes) = verdict.learned_from {
            let limit = refusals.limit.current();
            self.stats
                .upstream_learned_max_packet
                .store(limit as u64, Relaxed);
            self.stats.upstream_max_packet.store(limit as u64, Relaxed);
            tracing::warn!(
                refused_bytes,
                acknowledged_bytes = c.proven,
                learned_max_packet = limit,
                configured = refusals.limit.configured,
                url = %self.cfg.upstream.url,
                "district broker closed the connection on a message this large: summaries go in parts of at most learned_max_packet bytes from now on (upstream.max_packet_size need not be set)"
            );
        }
        let explained = verdict.learned_from.is_some();
        let Some(keys) = verdict
            .blame
            .and_then(|u| c.units.get(&u))
            .map(|u| u.keys.clone())
        else {
            return explained;
        };
        if refusals.charge(&keys) {
            for &key in &keys {
                acked_local.insert(key);
                let _ = self.park.send(key);
            }
            let first = keys[0];
            tracing::error!(class = first.0, seq = first.1, entries = keys.len(), tries = PARK_AFTER, error = %e, url = %self.cfg.upstream.url, learned_max_packet = refusals.limit.learned, "district broker closed the connection on this message every time and it cannot be made smaller: parked (kept on the box, not sent again; see the broker's limits)");
        }
        explained
    }

    /// Publish outbox entries until `max_inflight` publishes are unacknowledged; alerts before
    /// summaries.
    fn fill(&self, c: &mut Conn, acked_local: &BTreeSet<OutboxKey>) {
        let max = usize::from(self.cfg.upstream.max_inflight);
        if !self.flush(c) {
            return;
        }
        // Alerts first, looked for only when the committer said something new is in the
        // outbox (or at connect, or on the once-a-second refill).
        if c.check_alerts {
            while c.publishes < max {
                let room = max - c.publishes;
                let rows =
                    match self
                        .store
                        .outbox_after(CLASS_ALERT, c.cursor[CLASS_ALERT as usize], room)
                    {
                        Ok(r) => r,
                        Err(e) => {
                            // Store unavailable while the committer reopens it after a disk
                            // fault (intake is paused and says so): retried on the next refill.
                            tracing::debug!(error = %e, "forwarder: cannot read the outbox");
                            return;
                        }
                    };
                if rows.is_empty() {
                    c.check_alerts = false;
                    break;
                }
                for (key, rec) in rows {
                    c.cursor[CLASS_ALERT as usize] = Some(key.1);
                    if !acked_local.contains(&key) && !c.inflight.contains_key(&key) {
                        self.send(c, key, rec, acked_local);
                    }
                }
                if !self.flush(c) {
                    return;
                }
            }
        }
        // Summaries from a read-ahead buffer: one read transaction per window's worth, not one
        // per PUBACK (a backlog drains at the broker's pace; BENCHMARKS.md, drain).
        while c.publishes < max {
            let Some((key, rec)) = c.ahead.pop_front() else {
                let rows = match self.store.outbox_after(
                    CLASS_SUMMARY,
                    c.cursor[CLASS_SUMMARY as usize],
                    max,
                ) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "forwarder: cannot read the outbox");
                        return;
                    }
                };
                if rows.is_empty() {
                    return;
                }
                if let Some((k, _)) = rows.last() {
                    c.cursor[CLASS_SUMMARY as usize] = Some(k.1);
                }
                c.ahead.extend(rows);
                continue;
            };
            if acked_local.contains(&key) || c.inflight.contains_key(&key) {
                continue;
            }
            self.send(c, key, rec, acked_local);
            if !self.flush(c) {
                return;
            }
        }
    }

    /// Hand queued publishes to the client; false when its request queue is full (the rest
    /// waits for the next event).
    fn flush(&self, c: &mut Conn) -> bool {
        while let Some(q) = c.queue.pop_front() {
            match c
                .client
                .try_publish(q.topic, QoS::AtLeastOnce, false, q.payload)
            {
                Ok(()) => {
                    c.record_sent(
                        Sent::Outbox {
                            unit: q.unit,
                            idx: q.idx,
                        },
                        Instant::now(),
                    );
                }
                Err(rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(p))) => {
                    c.queue.push_front(Queued {
                        unit: q.unit,
                        idx: q.idx,
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                    });
                    return false;
                }
                Err(e) => {
                    // Not a full queue: the client is gone (the connection is ending).
                    tracing::debug!(error = %e, "forwarder: publish not queued");
                    return false;
                }
            }
        }
        true
    }

    /// Make one send unit of an outbox entry and queue its publishes: the entry as it is, or,
    /// when it is a summary larger than the packet limit learned from the broker, its rows
    /// (with those of the other parts of its rev, all still pending) split again under it.
    fn send(
        &self,
        c: &mut Conn,
        key: OutboxKey,
        rec: OutboxRecordV1,
        acked_local: &BTreeSet<OutboxKey>,
    ) {
        let topic = self.topic(rec.topic.leaf());
        // Payload bytes a publish on this topic may carry (16 to spare, as at issue time).
        let budget = c.limit.saturating_sub(topic.len() + 16);
        let configured = self.cfg.upstream.max_packet_size.0 as usize;
        let mut keys = vec![key];
        // (payload, shrinks)
        let mut payloads: Vec<(Vec<u8>, bool)> = Vec::new();
        if rec.topic != OutboxTopic::Summary {
            payloads.push((rec.payload, false));
        } else if c.limit >= configured {
            // Issued split under this very limit.
            payloads.push((rec.payload, true));
        } else {
            let members = match summary_part_of(&rec.payload) {
                None => Ok(vec![(key, rec)]),
                Some((part, parts)) => self.rev_parts(c, key, rec, part, parts, acked_local),
            };
            match members {
                Ok(members) if members.iter().any(|(_, r)| r.payload.len() > budget) => {
                    let refs: Vec<&[u8]> =
                        members.iter().map(|(_, r)| r.payload.as_slice()).collect();
                    match resplit(&refs, budget) {
                        Ok(parts) => {
                            tracing::debug!(class = key.0, seq = key.1, window = ?members[0].1.window, entries = members.len(), parts = parts.len(), budget, "summary split again under the learned packet limit");
                            keys = members.iter().map(|(k, _)| *k).collect();
                            payloads = parts.into_iter().map(|p| (p.payload, p.rows > 1)).collect();
                        }
                        Err(e) => {
                            tracing::warn!(class = key.0, seq = key.1, error = %e, "summary larger than the learned packet limit cannot be split again: sent as it is");
                            let rec = members.into_iter().find(|(k, _)| *k == key).map(|(_, r)| r);
                            payloads.extend(rec.map(|r| (r.payload, false)));
                        }
                    }
                }
                Ok(members) => {
                    // Every part fits: this one goes as it is.
                    let rec = members.into_iter().find(|(k, _)| *k == key).map(|(_, r)| r);
                    payloads.extend(rec.map(|r| (r.payload, true)));
                }
                Err(rec) => {
                    if rec.payload.len() > budget {
                        tracing::warn!(class = key.0, seq = key.1, window = ?rec.window, bytes = rec.payload.len(), budget, "summary part larger than the learned packet limit, but other parts of its rev are already delivered (or parked, or dropped): a split now would break the rev, so it is sent as it is (parked if the district broker keeps refusing it)");
                    }
                    payloads.push((rec.payload, false));
                }
            }
        }
        if payloads.is_empty() {
            // Not reached (the entry is always among its rev's parts); resent after a reconnect.
            debug_assert!(false, "a send unit without publishes");
            return;
        }
        let unit = c.next_unit();
        let mut pubs = Vec::with_capacity(payloads.len());
        for (idx, (payload, shrinks)) in payloads.into_iter().enumerate() {
            pubs.push(Pub {
                bytes: payload.len() + topic.len() + PUBLISH_OVERHEAD,
                shrinks,
                acked: false,
            });
            c.queue.push_back(Queued {
                unit,
                idx,
                topic: topic.clone(),
                payload,
            });
        }
        c.open_unit(unit, keys, pubs);
    }

    /// All `parts` parts of the summary rev `key` is part `part` of, in order, if every one is
    /// still pending (consecutive entries, as they were issued) and none is in flight or
    /// acknowledged; else `Err` with the entry itself.
    #[allow(clippy::result_large_err)]
    fn rev_parts(
        &self,
        c: &Conn,
        key: OutboxKey,
        rec: OutboxRecordV1,
        part: usize,
        parts: usize,
        acked_local: &BTreeSet<OutboxKey>,
    ) -> Result<Vec<(OutboxKey, OutboxRecordV1)>, OutboxRecordV1> {
        let Some(first) = (part as u64)
            .checked_sub(1)
            .and_then(|back| key.1.checked_sub(back))
        else {
            return Err(rec);
        };
        let Ok(rows) = self
            .store
            .outbox_after(CLASS_SUMMARY, first.checked_sub(1), parts)
        else {
            return Err(rec);
        };
        let complete = rows.len() == parts
            && rows.iter().enumerate().all(|(i, (k, r))| {
                *k == (CLASS_SUMMARY, first + i as u64)
                    && r.topic == OutboxTopic::Summary
                    && r.window == rec.window
                    && !acked_local.contains(k)
                    && (*k == key || !c.inflight.contains_key(k))
                    && summary_part_of(&r.payload) == Some((i + 1, parts))
            });
        if complete {
            Ok(rows)
        } else {
            Err(rec)
        }
    }

    /// Graceful stop: retained `offline` (a clean disconnect suppresses the will), then
    /// disconnect, bounded in time.
    async fn goodbye(
        &self,
        c: &mut Conn,
        ev_rx: &mut mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    ) {
        c.status_pkid = None;
        c.status_acked = false;
        if c.client
            .try_publish(
                self.topic(proto::Leaf::Status),
                QoS::AtLeastOnce,
                true,
                self.status_payload(false, c.epoch),
            )
            .is_ok()
        {
            c.record_sent(Sent::Status, Instant::now());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while !c.status_acked {
            match tokio::time::timeout_at(deadline, ev_rx.recv()).await {
                Ok(Some(Ok(Event::Outgoing(Outgoing::Publish(pkid))))) => {
                    c.bind(pkid, Instant::now())
                }
                Ok(Some(Ok(Event::Incoming(Incoming::PubAck(a))))) => {
                    if c.status_pkid == Some(a.pkid) {
                        c.status_acked = true;
                    } else if let Some((Some(keys), _)) = c.puback(a.pkid, Instant::now()) {
                        for key in keys {
                            let _ = self.acked.send(key);
                        }
                    }
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        let _ = c.client.try_disconnect();
        let _ = tokio::time::timeout_at(deadline + Duration::from_millis(300), async {
            while let Some(Ok(ev)) = ev_rx.recv().await {
                if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                    break;
                }
            }
        })
        .await;
        tracing::info!("district link closed (status offline)");
    }
}
