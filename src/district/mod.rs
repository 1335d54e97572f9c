//! The district receiver (`zhian-gateway district`, contract: "District receiver"): takes what
//! the gateways send to the district broker and keeps it in PostgreSQL, exactly.
//!
//! Two tasks:
//! - the MQTT task holds a persistent QoS 1 session with a shared subscription
//!   (`$share/{group}/{prefix}/+/#`, so several receivers split the load), hands each message
//!   to the database task through a bounded channel, and acknowledges only what that task
//!   reports committed (manual acks; an ack for an older connection is dropped, and the broker
//!   redelivers that message, which the database rules make a no-op);
//! - the database task gathers batches (`district.batch_max`, `district.linger`), parses them
//!   ([`msg`]), applies each batch in one transaction ([`db`]), and after the commit asks for
//!   the acks. An error that is the database's state ([`errors`]: down, restarting, disk full,
//!   read-only, statement timeout) keeps the batch unacknowledged and retries it with jittered
//!   backoff (one WARN per outage, one INFO at recovery); a value the database cannot store
//!   makes that one message a reject. Nothing is lost and nothing counted twice.
//! - `/healthz` and `/metrics` ([`ops`]) read what the tasks report; the database task also
//!   keeps the receivers' roll-call, so a receiver gone for good (whose broker session holds its
//!   share of the messages) is seen by the others.
//!
//! The schema is created and migrated by the receiver ([`db::migrate`]).

pub mod config;
pub mod db;
pub mod errors;
pub mod msg;
pub mod ops;

use crate::backoff::Backoff;
use crate::mqtt::{options, ClientSettings};
use config::DistrictConfig;
use ops::Ops;
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One received message: topic, payload, and what acknowledges it.
struct Item {
    topic: String,
    payload: bytes::Bytes,
    /// The connection it came on, and its packet (payload dropped).
    gen: u64,
    ack: Option<rumqttc::Publish>,
}

/// Counters, logged every 30 s.
#[derive(Default)]
struct Counters {
    received: AtomicU64,
    kept: AtomicU64,
    rejected: AtomicU64,
    batches: AtomicU64,
}

/// A database error with the server's message (tokio-postgres' Display says only "db error").
fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {} ({})", e, d.message(), d.code().code()),
        None => format!("{e}: {e:?}"),
    }
}

/// Connect to PostgreSQL: the URL, the password from the config, TLS when `ca_file` is set.
/// A failed connection says whose fault it is ([`errors::Fault`]: an authentication failure or
/// "too many connections" is not the same as a server that is down) and why.
async fn connect(cfg: &DistrictConfig) -> Result<tokio_postgres::Client, (errors::Fault, String)> {
    connect_inner(cfg)
        .await
        .map_err(|(f, e)| (f, crate::logfmt::redact_url(&e)))
}

async fn connect_inner(
    cfg: &DistrictConfig,
) -> Result<tokio_postgres::Client, (errors::Fault, String)> {
    let other = |e: String| (errors::Fault::Database("other"), e);
    let mut pg: tokio_postgres::Config = cfg
        .district
        .database_url
        .parse()
        .map_err(|e| other(format!("district.database_url: {e}")))?;
    // A server that stops answering (a partition without a reset) is noticed in about a
    // minute, not after the kernel's 15 minutes of retransmissions; a connect never hangs.
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(10));
    }
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3);
    if let Some(p) = &cfg.district.password {
        pg.password(p.0.as_bytes());
    }
    let client = match &cfg.district.ca_file {
        Some(ca) => {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let pem = std::fs::read(ca).map_err(|e| other(format!("district.ca_file: {e}")))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| other(format!("district.ca_file: {e:?}")))?;
                roots
                    .add(cert)
                    .map_err(|e| other(format!("district.ca_file: {e}")))?;
            }
            let tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let (client, conn) = pg
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
                .map_err(|e| (errors::of(&e), pg_error(&e)))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "database connection closed");
                }
            });
            client
        }
        None => {
            let (client, conn) = pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| (errors::of(&e), pg_error(&e)))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "database connection closed");
                }
            });
            client
        }
    };
    Ok(client)
}

/// Tracks one database outage: WARN once when it starts (with the reason), INFO once when
/// writes succeed again, DEBUG for every retry in between; feeds `/healthz` and the metrics.
struct Outage {
    since: Option<(Instant, &'static str)>,
}

impl Outage {
    fn failed(&mut self, ops: &Ops, fault: errors::Fault, detail: &str) {
        let kind = fault.kind();
        ops.db_error(kind);
        ops.set_db_down(Some(format!("{kind}: {detail}")));
        match self.since {
            None => {
                tracing::warn!(kind, error = %detail, "database does not take writes; nothing is acknowledged until it does (retrying with backoff)");
                self.since = Some((Instant::now(), kind));
            }
            Some(_) => tracing::debug!(kind, error = %detail, "database still refuses writes"),
        }
    }

    fn recovered(&mut self, ops: &Ops) {
        if let Some((at, kind)) = self.since.take() {
            tracing::info!(
                kind,
                down_ms = at.elapsed().as_millis() as u64,
                "database takes writes again"
            );
        }
        ops.set_db_down(None);
    }
}

/// `zhian-gateway district --init`: create this receiver's persistent session with the shared
/// subscription, then disconnect. Run once before the first gateway publishes: messages sent
/// before any receiver subscribed are kept by no session (docs/district-operations.md).
pub async fn init_subscription(cfg: &DistrictConfig) -> Result<String, String> {
    crate::mqtt::install_crypto_provider();
    let m = &cfg.mqtt;
    let mut opts = options(&settings(cfg), "mqtt")?;
    opts.set_clean_session(false);
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let filter = cfg.filter();
    let work = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    client
                        .subscribe(filter.clone(), QoS::AtLeastOnce)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(Event::Incoming(Incoming::SubAck(s))) => {
                    if s.return_codes.iter().all(|c| {
                        matches!(c, rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    }) {
                        let _ = client.disconnect().await;
                        let _ = tokio::time::timeout(Duration::from_secs(2), async {
                            while eventloop.poll().await.is_ok() {}
                        })
                        .await;
                        return Ok(());
                    }
                    return Err(format!(
                        "the broker did not grant {filter} at QoS 1: {:?}",
                        s.return_codes
                    ));
                }
                Ok(_) => {}
                Err(e) => return Err(format!("{}: {e}", m.url)),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .map_err(|_| format!("{}: no SUBACK within 30 s", m.url))??;
    Ok(format!(
        "session {} on {} subscribed to {filter}: the broker keeps this receiver's share from now on",
        m.client_id, m.url
    ))
}

fn settings(cfg: &DistrictConfig) -> ClientSettings<'_> {
    let m = &cfg.mqtt;
    ClientSettings {
        url: &m.url,
        client_id: m.client_id.clone(),
        username: m.username.as_deref(),
        password: m.password.as_ref(),
        ca_file: m.ca_file.as_deref(),
        client_cert: m.client_cert.as_deref(),
        client_key: m.client_key.as_deref(),
        keep_alive: m.keep_alive.0,
    }
}

/// Run the receiver until `shutdown`.
pub async fn run(cfg: DistrictConfig, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    crate::mqtt::install_crypto_provider();
    let cfg = Arc::new(cfg);
    let stop = CancellationToken::new();
    let ops = Arc::new(Ops::default());
    tokio::pin!(shutdown);
    // The operations surface first: /healthz says `migrating` (and why) while the database is
    // not there yet.
    // A port already taken (a second receiver on one host with the default `listen`) costs
    // the endpoint, not the receiver: the data path matters more (ERROR: an operator must
    // give each receiver its own `status.listen`).
    *ops.stuck_after.lock().unwrap_or_else(|e| e.into_inner()) = cfg.district.stuck_after.0;
    let status = match cfg.status.enabled {
        true => match tokio::net::TcpListener::bind(&cfg.status.listen).await {
            Ok(listener) => Some({
                if listener.local_addr().is_ok_and(|a| !a.ip().is_loopback()) {
                    tracing::warn!(listen = %cfg.status.listen, "status.listen is beyond loopback: /healthz and /metrics have no authentication; keep them on a management network");
                }
                tokio::spawn(ops::serve(listener, ops.clone(), stop.clone()))
            }),
            Err(e) => {
                tracing::error!(listen = %cfg.status.listen, error = %e, "status.listen: cannot listen; running without /healthz and /metrics (give each receiver on a host its own status.listen)");
                None
            }
        },
        false => None,
    };
    // The database first: the schema must exist before anything is acknowledged.
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut outage = Outage { since: None };
    let mut client: Option<tokio_postgres::Client> = None;
    // Receivers starting together migrate one at a time (a session advisory lock); a failed
    // migration is retried, it does not stop the receiver.
    let applied = loop {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            match connect(&cfg).await {
                Ok(c) => client = Some(c),
                Err((fault, e)) => {
                    outage.failed(&ops, fault, &e);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = &mut shutdown => { stop.cancel(); return Ok(()) }
                    }
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected");
        let r = async {
            c.execute("SELECT pg_advisory_lock(7431990)", &[])
                .await
                .map_err(|e| (errors::of(&e), pg_error(&e)))?;
            let r = db::migrate(c).await.map_err(|e| {
                // refinery's own message names the migration; the server's says why.
                match std::error::Error::source(&e)
                    .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
                {
                    Some(pe) => (errors::of(pe), format!("{e}: {}", pg_error(pe))),
                    None => (errors::Fault::Database("other"), e.to_string()),
                }
            });
            let _ = c.execute("SELECT pg_advisory_unlock(7431990)", &[]).await;
            let n = r?;
            db::set_silent_after(c, cfg.district.silent_after.0.as_secs())
                .await
                .map_err(|e| (errors::of(&e), pg_error(&e)))?;
            Ok::<_, (errors::Fault, String)>(n)
        }
        .await;
        match r {
            Ok(n) => break n,
            Err((fault, e)) => {
                outage.failed(&ops, fault, &e);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = &mut shutdown => { stop.cancel(); return Ok(()) }
                }
            }
        }
    };
    let client = client.expect("connected");
    ops.migrating.store(false, Relaxed);
    outage.recovered(&ops);
    tracing::info!(migrations_applied = applied, filter = %cfg.filter(), "district receiver: database ready");

    let counters = Arc::new(Counters::default());
    let (tx, rx) = flume::bounded::<Item>(cfg.district.batch_max as usize * 4);
    let (current_tx, current_rx) = tokio::sync::watch::channel::<Option<(u64, AsyncClient)>>(None);
    let mqtt = tokio::spawn(mqtt_task(
        cfg.clone(),
        tx,
        current_tx,
        counters.clone(),
        ops.clone(),
        stop.clone(),
    ));
    let (acks_tx, acks_rx) = tokio::sync::mpsc::unbounded_channel();
    let acker = tokio::spawn(acker(acks_rx, current_rx));
    let dbt = tokio::spawn(db_task(
        cfg.clone(),
        client,
        rx,
        acks_tx,
        counters.clone(),
        ops.clone(),
        outage,
    ));
    let report = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut last = (0u64, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let kept = counters.kept.load(Relaxed);
                let rate = (kept - last.0) as f64 / last.1.elapsed().as_secs_f64();
                last = (kept, Instant::now());
                tracing::info!(
                    received = counters.received.load(Relaxed),
                    kept,
                    rejected = counters.rejected.load(Relaxed),
                    batches = counters.batches.load(Relaxed),
                    per_second = format!("{rate:.0}"),
                    "district receiver"
                );
            }
        })
    };
    // A task that ends before shutdown (a panic, a closed channel) ends the process with an
    // error, so its supervisor restarts it: a receiver must never sit connected and idle.
    let mut dbt = dbt;
    let mut mqtt = mqtt;
    tokio::select! {
        _ = &mut shutdown => {}
        r = &mut dbt => {
            stop.cancel();
            report.abort();
            return Err(format!("the database task stopped: {r:?}"));
        }
        r = &mut mqtt => {
            stop.cancel();
            report.abort();
            return Err(format!("the MQTT task stopped: {r:?}"));
        }
    }
    tracing::info!("district receiver: stopping");
    stop.cancel();
    // The MQTT task drops its sender; the database task finishes its batch and acks it.
    let _ = tokio::time::timeout(Duration::from_secs(4), dbt).await;
    // The last acks go out before the MQTT task disconnects.
    let _ = tokio::time::timeout(Duration::from_secs(1), acker).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), mqtt).await;
    report.abort();
    if let Some(s) = status {
        let _ = tokio::time::timeout(Duration::from_secs(1), s).await;
    }
    Ok(())
}

async fn mqtt_task(
    cfg: Arc<DistrictConfig>,
    tx: flume::Sender<Item>,
    current: tokio::sync::watch::Sender<Option<(u64, AsyncClient)>>,
    counters: Arc<Counters>,
    ops: Arc<Ops>,
    stop: CancellationToken,
) {
    let m = &cfg.mqtt;
    let mut backoff = Backoff::new(m.reconnect_min.0, m.reconnect_max.0);
    let filter = cfg.filter();
    let mut gen = 0u64;
    // When the link went down (WARN once per outage, INFO when it is back).
    let mut down_since: Option<Instant> = None;
    'connections: loop {
        let mut opts = match options(&settings(&cfg), "mqtt") {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "district receiver: MQTT cannot start");
                return;
            }
        };
        opts.set_clean_session(false);
        opts.set_manual_acks(true);
        let (client, mut eventloop) = AsyncClient::new(opts, 4096);
        gen += 1;
        current.send_replace(Some((gen, client.clone())));
        loop {
            let polled = tokio::select! {
                _ = stop.cancelled() => {
                    let _ = client.disconnect().await;
                    // Let the disconnect (and the last acks) go out.
                    let _ = tokio::time::timeout(Duration::from_millis(500), async {
                        while eventloop.poll().await.is_ok() {}
                    }).await;
                    return;
                }
                p = eventloop.poll() => p,
            };
            match polled {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    backoff.reset();
                    tracing::debug!(url = %m.url, %filter, "district broker connected; subscribing");
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, "cannot queue the subscription");
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(s))) => {
                    if s.return_codes.iter().any(|c| {
                        !matches!(c, rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    }) {
                        ops.set_broker_down(Some(format!(
                            "subscription {filter} not granted at QoS 1: {:?}",
                            s.return_codes
                        )));
                        tracing::error!(%filter, codes = ?s.return_codes, "the district broker did not grant the shared subscription at QoS 1 (ACL? shared subscriptions enabled?)");
                    } else {
                        ops.set_broker_down(None);
                        match down_since.take() {
                            Some(at) => {
                                tracing::info!(url = %m.url, %filter, down_ms = at.elapsed().as_millis() as u64, "district broker connected again")
                            }
                            None => {
                                tracing::info!(url = %m.url, %filter, "district broker connected")
                            }
                        }
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    counters.received.fetch_add(1, Relaxed);
                    ops.received(crate::clock::now_ms() / 1000);
                    let ack = (p.qos != QoS::AtMostOnce).then(|| {
                        let mut slim = rumqttc::Publish::new("", p.qos, Vec::new());
                        slim.pkid = p.pkid;
                        slim
                    });
                    let item = Item {
                        topic: p.topic.clone(),
                        payload: p.payload.clone(),
                        gen,
                        ack,
                    };
                    if tx.send_async(item).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    let delay = backoff.next_delay();
                    ops.set_broker_down(Some(e.to_string()));
                    if down_since.is_none() {
                        down_since = Some(Instant::now());
                        tracing::warn!(error = %e, url = %m.url, "district broker connection lost; reconnecting with backoff");
                    } else {
                        tracing::debug!(error = %e, url = %m.url, delay_ms = delay.as_millis() as u64, "district broker still unreachable");
                    }
                    current.send_replace(None);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                    continue 'connections;
                }
            }
        }
    }
}

/// The topic kind of a message, for the metrics (its leaf, when it is one we know).
fn topic_kind(topic: &str) -> &'static str {
    match topic.rsplit('/').next().unwrap_or("") {
        "summary" => "summary",
        "alert" => "alert",
        "care" => "care",
        "daily" => "daily",
        "status" => "status",
        "heartbeat" => "heartbeat",
        _ => "other",
    }
}

type Parsed = (String, Result<msg::Msg, msg::Reject>);

/// One batch on its way into the database: how far it got, and which messages the database
/// refused as values (indices into the batch).
struct Progress {
    done: usize,
    applied: db::Applied,
    refused: Vec<usize>,
}

/// Apply `parsed[p.done..]` in transactions of at most `*chunk` messages. A statement timeout
/// halves the chunk (a batch larger than the database lets one statement run would otherwise
/// time out for ever); a value the database refuses sends that chunk one message at a time.
/// Returns the first error that is the database's state; `p` keeps what committed.
async fn commit(
    client: &mut tokio_postgres::Client,
    parsed: &[Parsed],
    p: &mut Progress,
    chunk: &mut usize,
    ops: &Ops,
) -> Result<(), tokio_postgres::Error> {
    let mut conflicts = 0;
    while p.done < parsed.len() {
        let end = (p.done + *chunk).min(parsed.len());
        let slice = &parsed[p.done..end];
        let attempt = async {
            let tx = client.transaction().await?;
            let a = db::apply(&tx, slice).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(a)
        }
        .await;
        match attempt {
            Ok(a) => {
                p.applied.add(a);
                p.done = end;
            }
            Err(e) => match errors::of(&e) {
                errors::Fault::Value if !client.is_closed() => {
                    ops.db_error("refused_value");
                    tracing::warn!(error = %pg_error(&e), batch = slice.len(), "database refused a value in the batch; applying its messages one at a time");
                    isolate(client, parsed, p, end).await?;
                }
                // Two receivers' transactions in a deadlock or a serialization failure: the
                // database chose this one to roll back; a retry is the cure, not an outage.
                errors::Fault::Database("conflict") if conflicts < 3 && !client.is_closed() => {
                    conflicts += 1;
                    ops.db_error("conflict");
                    tracing::debug!(error = %pg_error(&e), "transaction conflict; retrying it");
                }
                errors::Fault::Database("timeout") if *chunk > 1 && !client.is_closed() => {
                    ops.db_error("timeout");
                    *chunk = (*chunk / 2).max(1);
                    tracing::debug!(chunk = *chunk, error = %pg_error(&e), "statement timeout: smaller transactions");
                }
                _ => return Err(e),
            },
        }
    }
    Ok(())
}

async fn db_task(
    cfg: Arc<DistrictConfig>,
    client: tokio_postgres::Client,
    rx: flume::Receiver<Item>,
    acks: tokio::sync::mpsc::UnboundedSender<(u64, rumqttc::Publish)>,
    counters: Arc<Counters>,
    ops: Arc<Ops>,
    mut outage: Outage,
) {
    let prefix = cfg.mqtt.topic_prefix.clone();
    let max = cfg.district.batch_max as usize;
    let linger = cfg.district.linger.0;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut client = Some(client);
    let mut chunk = max;
    let mut rollcall = Rollcall::new(&cfg);
    loop {
        // Between batches (and at least every `rollcall_every` when idle): the roll-call. It
        // reconnects an idle receiver whose connection was cut; a roll-call that fails is said
        // once (WARN) and when it works again (INFO), apart from the batches' outages, which
        // say whether the database takes the messages.
        if rollcall.due() {
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match connect(&cfg).await {
                    Ok(c) => client = Some(c),
                    Err((fault, e)) => outage.failed(&ops, fault, &e),
                }
            }
            if let Some(c) = client.as_ref().filter(|c| !c.is_closed()) {
                match rollcall.run(c, &ops).await {
                    Ok(()) => {
                        if rollcall.failing.take().is_some() {
                            tracing::info!("receivers roll-call works again");
                        }
                        if outage.since.is_some() && ops.db_down().is_some() {
                            // Reconnected while idle: the database is back.
                            outage.recovered(&ops);
                        }
                    }
                    Err(e) => {
                        if rollcall.failing.is_none() {
                            tracing::warn!(error = %pg_error(&e), "receivers roll-call failed (the receivers table or the gateway_state view?); retried every rollcall_every");
                        }
                        rollcall.failing = Some(pg_error(&e));
                    }
                }
            }
        }
        let first = match tokio::time::timeout(rollcall.until_due(), rx.recv_async()).await {
            Ok(Ok(i)) => i,
            Ok(Err(_)) => {
                if let Some(c) = client.as_ref() {
                    rollcall.stopped(c).await;
                }
                return; // the MQTT task stopped
            }
            Err(_) => continue, // time for the roll-call
        };
        let mut items = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while items.len() < max {
            match tokio::time::timeout_at(deadline, rx.recv_async()).await {
                Ok(Ok(i)) => items.push(i),
                _ => break,
            }
        }
        let parsed: Vec<Parsed> = items
            .iter()
            .map(|i| (i.topic.clone(), msg::parse(&prefix, &i.topic, &i.payload)))
            .collect();
        let started = Instant::now();
        ops.batch_writing(true);
        // Commit, retrying through the database's bad days; nothing is acked until it commits.
        let mut p = Progress {
            done: 0,
            applied: db::Applied::default(),
            refused: Vec::new(),
        };
        loop {
            let c = match client.as_mut().filter(|c| !c.is_closed()) {
                Some(c) => c,
                None => match connect(&cfg).await {
                    Ok(c) => client.insert(c),
                    Err((fault, e)) => {
                        outage.failed(&ops, fault, &e);
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            match commit(c, &parsed, &mut p, &mut chunk, &ops).await {
                Ok(()) => {
                    backoff.reset();
                    outage.recovered(&ops);
                    chunk = (chunk * 2).min(max);
                    break;
                }
                Err(e) => {
                    let fault = errors::of(&e);
                    outage.failed(&ops, fault, &pg_error(&e));
                    // A read-only server (a primary demoted, a standby not yet promoted): the
                    // next attempt reconnects, so a multi-host `database_url` with
                    // `target_session_attrs=read-write` finds the new primary.
                    if fault == errors::Fault::Database("read_only") {
                        client = None;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        ops.batch_writing(false);
        ops.batch_took(started.elapsed().as_secs_f64());
        ops.batches.fetch_add(1, Relaxed);
        let applied = p.applied;
        for (i, (topic, r)) in parsed.iter().enumerate() {
            let kind = topic_kind(topic);
            match r {
                Err(r) => {
                    ops.message(kind, "rejected");
                    tracing::warn!(topic = %crate::logfmt::Clean(topic), reason = r.reason, detail = %crate::logfmt::Clean(&r.detail), "district receiver: message rejected");
                }
                Ok(_) if p.refused.contains(&i) => ops.message(kind, "rejected"),
                Ok(_) => ops.message(kind, "kept"),
            }
        }
        counters.kept.fetch_add(applied.kept, Relaxed);
        counters.rejected.fetch_add(applied.rejected, Relaxed);
        counters.batches.fetch_add(1, Relaxed);
        ops.done(items.len());
        // Acks in arrival order, handed to the acker: this task never waits on the MQTT
        // client (its request queue is drained by the MQTT task, which may itself be waiting
        // for this task to take messages: measured, that deadlocked after 6,500 messages).
        for i in items {
            if let Some(p) = i.ack {
                if acks.send((i.gen, p)).is_err() {
                    return;
                }
            }
        }
    }
}

/// The receivers' roll-call (`receivers` table): this receiver's row written every
/// `district.rollcall_every`; receivers of the group whose row is older than
/// `district.stale_after` are stale (WARN once each, `zhian_district_receivers{state}`); the
/// gateway counts for `/metrics` are read at the same time.
struct Rollcall {
    every: Duration,
    stale_after: Duration,
    next: tokio::time::Instant,
    client_id: String,
    group: String,
    host: String,
    started: std::time::SystemTime,
    warned: std::collections::BTreeSet<String>,
    /// The last roll-call's error, while it keeps failing.
    failing: Option<String>,
}

impl Rollcall {
    fn new(cfg: &DistrictConfig) -> Rollcall {
        Rollcall {
            every: cfg.district.rollcall_every.0,
            stale_after: cfg.district.stale_after.0,
            next: tokio::time::Instant::now(),
            client_id: cfg.mqtt.client_id.clone(),
            group: cfg.mqtt.group.clone(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
            started: std::time::SystemTime::now(),
            warned: Default::default(),
            failing: None,
        }
    }

    fn due(&self) -> bool {
        tokio::time::Instant::now() >= self.next
    }

    fn until_due(&self) -> Duration {
        self.next
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(1))
    }

    async fn run(
        &mut self,
        c: &tokio_postgres::Client,
        ops: &Ops,
    ) -> Result<(), tokio_postgres::Error> {
        self.next = tokio::time::Instant::now() + self.every;
        c.execute(
            "INSERT INTO receivers (client_id, grp, host, version, started, last_seen)
             VALUES ($1, $2, $3, $4, $5, now())
             ON CONFLICT (client_id) DO UPDATE SET grp = EXCLUDED.grp, host = EXCLUDED.host,
               version = EXCLUDED.version, started = EXCLUDED.started, last_seen = now(),
               stopped = NULL",
            &[
                &self.client_id,
                &self.group,
                &self.host,
                &env!("CARGO_PKG_VERSION"),
                &self.started,
            ],
        )
        .await?;
        let stale_secs = self.stale_after.as_secs_f64();
        let rows = c
            .query(
                "SELECT client_id, host, to_char(last_seen AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                        last_seen < now() - make_interval(secs => $2)
                 FROM receivers WHERE grp = $1 ORDER BY client_id",
                &[&self.group, &stale_secs],
            )
            .await?;
        let (mut live, mut stale) = (0, 0);
        let mut now_stale = std::collections::BTreeSet::new();
        for r in &rows {
            let (id, host, last, is_stale): (String, String, String, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if !is_stale {
                live += 1;
                continue;
            }
            stale += 1;
            if !self.warned.contains(&id) {
                tracing::warn!(receiver = %id, %host, last_seen = %last, group = %self.group,
                    "a receiver of this group has been gone since last_seen: its broker session keeps queuing its share of the messages. Start a replacement with mqtt.client_id = {id:?} (it takes the session over and drains it), or expire the session on the broker (what it held is then lost); then DELETE its row from receivers (docs/district-operations.md)");
            }
            now_stale.insert(id);
        }
        for id in self.warned.difference(&now_stale) {
            tracing::info!(receiver = %id, "a receiver of this group is back (or its row was removed)");
        }
        self.warned = now_stale;
        ops.receivers_live.store(live, Relaxed);
        ops.receivers_stale.store(stale, Relaxed);
        let g = c
            .query_one(
                "SELECT count(*) FILTER (WHERE status = 'online'),
                        count(*) FILTER (WHERE status = 'offline'),
                        count(*) FILTER (WHERE silent)
                 FROM gateway_state",
                &[],
            )
            .await?;
        ops.set_gateways(
            [
                ("online", g.get(0)),
                ("offline", g.get(1)),
                ("silent", g.get(2)),
            ]
            .into_iter()
            .collect(),
        );
        Ok(())
    }

    /// A clean stop: the row says so (the broker session still holds this receiver's share
    /// until it comes back).
    async fn stopped(&self, c: &tokio_postgres::Client) {
        let _ = c
            .execute(
                "UPDATE receivers SET stopped = now() WHERE client_id = $1",
                &[&self.client_id],
            )
            .await;
    }
}

/// Sends the database task's acks on the connection they belong to (an ack for an older
/// connection is dropped: the broker redelivers that message, which the database makes a no-op).
async fn acker(
    mut acks: tokio::sync::mpsc::UnboundedReceiver<(u64, rumqttc::Publish)>,
    current: tokio::sync::watch::Receiver<Option<(u64, AsyncClient)>>,
) {
    while let Some((gen, p)) = acks.recv().await {
        let conn = current.borrow().clone();
        if let Some((g, client)) = conn {
            if g == gen {
                let _ = client.ack(&p).await;
            }
        }
    }
}

/// Apply `parsed[p.done..end]` one message per transaction; a message the database refuses as
/// a value becomes a `database_refused` reject (acknowledged, never retried). An error that is
/// the database's state is returned, with `p` holding what committed.
async fn isolate(
    client: &mut tokio_postgres::Client,
    parsed: &[Parsed],
    p: &mut Progress,
    end: usize,
) -> Result<(), tokio_postgres::Error> {
    while p.done < end {
        let item = &parsed[p.done];
        let attempt = async {
            let tx = client.transaction().await?;
            let a = db::apply(&tx, std::slice::from_ref(item)).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(a)
        }
        .await;
        match attempt {
            Ok(a) => p.applied.add(a),
            Err(e) if errors::of(&e) == errors::Fault::Value && !client.is_closed() => {
                let detail = pg_error(&e);
                tracing::warn!(topic = %crate::logfmt::Clean(&item.0), error = %detail, "district receiver: message refused by the database; kept as a reject");
                db::refuse(client, &item.0, &detail).await?;
                p.applied.rejected += 1;
                p.refused.push(p.done);
            }
            Err(e) => return Err(e),
        }
        p.done += 1;
    }
    Ok(())
}
