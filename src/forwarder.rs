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

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::config::Config;
use crate::core::summary::rfc3339_utc;
use crate::mqtt::{options, ClientSettings};
use crate::stats::LinkChange;
use crate::stats::Stats;
use crate::store::{OutboxKey, OutboxRecordV1, Store, CLASS_ALERT, CLASS_SUMMARY};
use rumqttc::{AsyncClient, Event, Incoming, LastWill, Outgoing, QoS};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

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

/// A message the broker closed the connection on this many times in a row is parked.
pub const PARK_AFTER: u32 = 3;

/// What a queued publish was, in issue order, to bind the pkid rumqttc assigns.
enum Sent {
    Outbox(OutboxKey),
    Status,
    Other,
}

#[derive(Serialize)]
struct StatusMsg<'a> {
    state: &'a str,
    gateway: &'a str,
    /// The connection's epoch ([`crate::epoch`]): orders this state among all others.
    epoch: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    since: Option<String>,
}

#[derive(Serialize)]
struct Heartbeat<'a> {
    schema: &'static str,
    gateway: &'a str,
    /// The connection's epoch: a heartbeat of a higher epoch than the district knows means
    /// `online` (a receiver that starts on an empty database learns the state from it).
    epoch: u64,
    version: &'static str,
    uptime_secs: u64,
    devices: DeviceCounts,
    pending_summaries: u64,
    pending_alerts: u64,
    /// Messages the district broker kept refusing (parked on the box).
    parked: u64,
    oldest_pending_window: Option<String>,
    store_bytes: u64,
    counters: crate::stats::CounterSnapshot,
    dropped: Dropped,
    /// Why intake is paused (disk full or failing), if it is.
    intake_paused: Option<crate::stats::Paused>,
    /// Damaged store files moved aside, kept until an operator removes them from the data dir.
    store_quarantined: Vec<crate::store::damage::Quarantined>,
    /// Links failing for a reason that needs an operator (the site link, here).
    link_problems: std::collections::BTreeMap<&'static str, crate::link::Problem>,
    modbus: Vec<ModbusOut>,
}

#[derive(Serialize)]
struct ModbusOut {
    name: String,
    kind: crate::core::event::Kind,
    online: bool,
    polls: u64,
    errors: u64,
    last_error: Option<String>,
    last_seen: Option<String>,
    counted: u64,
    /// Counter readings dropped as misreads (glitch rule) since start.
    glitches: u64,
    states: serde_json::Map<String, serde_json::Value>,
}

#[derive(Serialize)]
struct DeviceCounts {
    online: usize,
    offline: usize,
}

#[derive(Serialize)]
struct Dropped {
    summaries: u64,
    alerts: u64,
    /// Dedup keys and raw events dropped early under disk pressure.
    dedup_keys: u64,
    raw_events: u64,
}

/// Above this many remembered PUBACKed keys, drop the ones the committer already deleted.
const ACKED_PRUNE_AT: usize = 4096;

/// Keep only the PUBACKed keys still in the outbox (the rest were deleted by the committer).
fn prune(store: &Store, acked_local: &mut BTreeSet<OutboxKey>) {
    if let Ok(still) = store.outbox_contains(acked_local.iter().copied()) {
        *acked_local = still.into_iter().collect();
    }
}

struct Conn {
    client: AsyncClient,
    sent: VecDeque<Sent>,
    by_pkid: HashMap<u16, (OutboxKey, Instant)>,
    queued_at: VecDeque<Instant>,
    inflight: BTreeSet<OutboxKey>,
    cursor: [Option<u64>; 2],
    /// Summaries read from the outbox, not yet sent (the cursor is past them).
    ahead: VecDeque<(OutboxKey, OutboxRecordV1)>,
    /// Whether the alerts class may hold something unsent.
    check_alerts: bool,
    status_pkid: Option<u16>,
    status_acked: bool,
    /// This connection's epoch.
    epoch: u64,
}

impl Conn {
    /// rumqttc reports publishes in the order they were queued: bind the pkid to what we queued.
    fn bind(&mut self, pkid: u16) {
        let at = self.queued_at.pop_front().unwrap_or_else(Instant::now);
        match self.sent.pop_front() {
            Some(Sent::Outbox(key)) => {
                self.by_pkid.insert(pkid, (key, at));
            }
            Some(Sent::Status) => self.status_pkid = Some(pkid),
            Some(Sent::Other) => {}
            None => tracing::warn!(pkid, "forwarder: publish event with nothing queued"),
        }
    }
}

impl Forwarder {
    fn topic(&self, suffix: &str) -> String {
        format!(
            "{}/{}/{}",
            self.cfg.upstream.topic_prefix, self.cfg.gateway.id, suffix
        )
    }

    fn status_payload(&self, online: bool, epoch: u64) -> Vec<u8> {
        let msg = StatusMsg {
            state: if online { "online" } else { "offline" },
            gateway: &self.cfg.gateway.id,
            epoch,
            version: online.then_some(env!("CARGO_PKG_VERSION")),
            since: online.then(|| rfc3339_utc(now_ms())),
        };
        serde_json::to_vec(&msg).expect("status serializes")
    }

    pub async fn run(self) {
        let u = &self.cfg.upstream;
        let mut backoff = Backoff::new(u.reconnect_min.0, u.reconnect_max.0);
        // Keys PUBACKed but perhaps not yet deleted by the committer: never resend them.
        let mut acked_local: BTreeSet<OutboxKey> = BTreeSet::new();
        let mut watch = crate::link::TakeoverWatch::default();
        // Connections lost while this entry was the oldest unacknowledged one.
        let mut blamed: HashMap<OutboxKey, u32> = HashMap::new();
        self.stats.link_start("district", &u.url, now_ms());
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
                        &mut blamed,
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
            let delay = if self.stats.link_problems().contains_key("district") {
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
        blamed: &mut HashMap<OutboxKey, u32>,
    ) -> bool {
        let u = &self.cfg.upstream;
        {
            opts.set_clean_session(true);
            opts.set_inflight(u.max_inflight.saturating_add(8));
            // Refuse locally what the district broker would refuse (summaries are split under it).
            opts.set_max_packet_size(
                crate::mqtt::MAX_INCOMING_PACKET,
                u.max_packet_size.0 as usize,
            );
            opts.set_last_will(LastWill::new(
                self.topic("status"),
                self.status_payload(false, epoch),
                QoS::AtLeastOnce,
                true,
            ));
            prune(&self.store, acked_local);
        }
        self.connection(opts, epoch, acked_local, backoff, watch, blamed)
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
        blamed: &mut HashMap<OutboxKey, u32>,
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
        let mut c = Conn {
            client,
            sent: VecDeque::new(),
            by_pkid: HashMap::new(),
            queued_at: VecDeque::new(),
            inflight: BTreeSet::new(),
            cursor: [None, None],
            ahead: VecDeque::new(),
            check_alerts: true,
            status_pkid: None,
            status_acked: false,
            epoch,
        };
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
                        match self.stats.link_up("district", now_ms()) {
                            LinkChange::Up { first: true, .. } => tracing::info!(url = %self.cfg.upstream.url, "district broker connected"),
                            LinkChange::Up { down_ms, .. } => tracing::info!(url = %self.cfg.upstream.url, down_s = down_ms / 1000, "district broker link up"),
                            _ => {}
                        }
                        let status = self.status_payload(true, c.epoch);
                        if c.client.try_publish(self.topic("status"), QoS::AtLeastOnce, true, status).is_ok() {
                            c.sent.push_back(Sent::Status);
                            c.queued_at.push_back(Instant::now());
                        }
                        self.fill(&mut c, acked_local);
                    }
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => c.bind(pkid),
                    Some(Ok(Event::Incoming(Incoming::PubAck(ack)))) => {
                        if let Some((key, at)) = c.by_pkid.remove(&ack.pkid) {
                            c.inflight.remove(&key);
                            blamed.remove(&key);
                            acked_local.insert(key);
                            self.stats.upstream_published.fetch_add(1, Relaxed);
                            self.stats.publish_seconds.observe(at.elapsed().as_secs_f64());
                            tracing::debug!(class = key.0, seq = key.1, latency_ms = at.elapsed().as_millis() as u64, "upstream PUBACK");
                            let _ = self.acked.send(key);
                            self.fill(&mut c, acked_local);
                        } else if c.status_pkid == Some(ack.pkid) {
                            c.status_acked = true;
                        }
                    }
                    Some(Ok(_)) => {
                        if watch.is_stable(Instant::now())
                            && self.stats.set_link_problem("district", None)
                        {
                            watch.reset();
                            tracing::info!(url = %self.cfg.upstream.url, "district broker: the connection holds again");
                        }
                    }
                    Some(Err(e)) => {
                        // The broker closing the connection on a message it will not take
                        // (too large for its max_packet_size, say): the oldest unacknowledged
                        // message is the suspect; after PARK_AFTER times it is parked.
                        if let Some(&key) = c.inflight.iter().next() {
                            let n = blamed.entry(key).or_insert(0);
                            *n += 1;
                            if *n >= PARK_AFTER {
                                blamed.remove(&key);
                                acked_local.insert(key);
                                let _ = self.park.send(key);
                                tracing::error!(class = key.0, seq = key.1, tries = PARK_AFTER, error = %e, url = %self.cfg.upstream.url, "district broker closed the connection on this message every time: parked (kept on the box, not sent again; see upstream.max_packet_size and the broker's limits)");
                            }
                        }
                        let url = &self.cfg.upstream.url;
                        let problem = crate::link::classify(&e, "upstream", url).or_else(|| {
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
                        let change = self.stats.link_down("district", reason, e.to_string(), now_ms());
                        match problem {
                            Some(p) => {
                                if self.stats.set_link_problem("district", Some(p.clone())) {
                                    tracing::error!(link = "district", %url, reason = p.reason, error = %e, "{}", p.detail);
                                }
                            }
                            None if change == LinkChange::Down => {
                                tracing::warn!(link = "district", %url, reason, error = %e, "district broker link down")
                            }
                            None => tracing::debug!(link = "district", %url, reason, error = %e, "district broker still down"),
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

    /// Publish outbox entries until `max_inflight` are unacknowledged; alerts before summaries.
    fn fill(&self, c: &mut Conn, acked_local: &BTreeSet<OutboxKey>) {
        let max = usize::from(self.cfg.upstream.max_inflight);
        // Alerts first, looked for only when the committer said something new is in the
        // outbox (or at connect, or on the once-a-second refill).
        if c.check_alerts {
            while c.inflight.len() < max {
                let room = max - c.inflight.len();
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
                    if !acked_local.contains(&key) && !self.send(c, key, rec) {
                        c.cursor[CLASS_ALERT as usize] = key.1.checked_sub(1);
                        return;
                    }
                }
            }
        }
        // Summaries from a read-ahead buffer: one read transaction per window's worth, not one
        // per PUBACK (a backlog drains at the broker's pace; BENCHMARKS.md, drain).
        while c.inflight.len() < max {
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
            if acked_local.contains(&key) {
                continue;
            }
            if !self.send(c, key, rec.clone()) {
                c.ahead.push_front((key, rec));
                return;
            }
        }
    }

    /// Queue one outbox entry; false when the client's request queue is full (try again on
    /// the next event).
    fn send(&self, c: &mut Conn, key: OutboxKey, rec: OutboxRecordV1) -> bool {
        let topic = self.topic(rec.topic.suffix());
        if c.client
            .try_publish(topic, QoS::AtLeastOnce, false, rec.payload)
            .is_err()
        {
            return false;
        }
        c.sent.push_back(Sent::Outbox(key));
        c.queued_at.push_back(Instant::now());
        c.inflight.insert(key);
        true
    }

    fn heartbeat(&self, c: &mut Conn) {
        let overview = self
            .store
            .overview()
            .unwrap_or_else(|_| crate::store::Overview {
                file_bytes: self.store.file_bytes(),
                ..Default::default()
            });
        let mut quarantined = crate::store::damage::quarantined(self.store.data_dir());
        if let Some(q) = self.stats.quarantined.lock().expect("lock").as_ref() {
            for f in quarantined.iter_mut().filter(|f| f.file == q.file) {
                f.reason = q.reason.clone();
            }
        }
        let now = now_ms();
        let devices = crate::health::devices(&self.stats, now);
        let online = devices.iter().filter(|d| d.online).count();
        let total = devices.len();
        let hb = Heartbeat {
            schema: "zhian.heartbeat.v1",
            gateway: &self.cfg.gateway.id,
            epoch: c.epoch,
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: self.stats.started.elapsed().as_secs(),
            devices: DeviceCounts {
                online,
                offline: total - online,
            },
            pending_summaries: overview.pending_summaries,
            pending_alerts: overview.pending_alerts,
            parked: overview.parked,
            oldest_pending_window: overview.oldest_pending_window_ms.map(rfc3339_utc),
            store_bytes: overview.file_bytes,
            counters: self.stats.counters(),
            dropped: Dropped {
                summaries: overview.dropped_summaries,
                alerts: overview.dropped_alerts,
                dedup_keys: overview.dropped_dedup_keys,
                raw_events: overview.evicted_events,
            },
            intake_paused: self.stats.paused(),
            store_quarantined: quarantined,
            link_problems: self.stats.link_problems(),
            modbus: self
                .stats
                .modbus()
                .into_iter()
                .map(|(name, h)| ModbusOut {
                    name,
                    kind: h.kind,
                    online: h.online,
                    polls: h.polls,
                    errors: h.errors,
                    last_error: h.last_error,
                    last_seen: h.last_seen_ms.map(rfc3339_utc),
                    counted: h.counted,
                    glitches: h.glitches,
                    states: h
                        .states
                        .into_iter()
                        .map(|(k, v)| (k, v.to_json()))
                        .collect(),
                })
                .collect(),
        };
        let payload = serde_json::to_vec(&hb).expect("heartbeat serializes");
        if c.client
            .try_publish(self.topic("heartbeat"), QoS::AtLeastOnce, false, payload)
            .is_ok()
        {
            c.sent.push_back(Sent::Other);
            c.queued_at.push_back(Instant::now());
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
                self.topic("status"),
                QoS::AtLeastOnce,
                true,
                self.status_payload(false, c.epoch),
            )
            .is_ok()
        {
            c.sent.push_back(Sent::Status);
            c.queued_at.push_back(Instant::now());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
        while !c.status_acked {
            match tokio::time::timeout_at(deadline, ev_rx.recv()).await {
                Ok(Some(Ok(Event::Outgoing(Outgoing::Publish(pkid))))) => c.bind(pkid),
                Ok(Some(Ok(Event::Incoming(Incoming::PubAck(a))))) => {
                    if c.status_pkid == Some(a.pkid) {
                        c.status_acked = true;
                    } else if let Some((key, _)) = c.by_pkid.remove(&a.pkid) {
                        let _ = self.acked.send(key);
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
