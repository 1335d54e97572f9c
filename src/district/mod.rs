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
//!   the acks. A database error keeps the batch unacknowledged and retries it after
//!   reconnecting (backoff), so nothing is lost and nothing counted twice.
//!
//! The schema is created and migrated by the receiver ([`db::migrate`]).

pub mod config;
pub mod db;
pub mod msg;

use crate::backoff::Backoff;
use crate::mqtt::{options, ClientSettings};
use config::DistrictConfig;
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
async fn connect(cfg: &DistrictConfig) -> Result<tokio_postgres::Client, String> {
    let mut pg: tokio_postgres::Config = cfg
        .district
        .database_url
        .parse()
        .map_err(|e| format!("district.database_url: {e}"))?;
    if let Some(p) = &cfg.district.password {
        pg.password(p.0.as_bytes());
    }
    let client = match &cfg.district.ca_file {
        Some(ca) => {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            let pem = std::fs::read(ca).map_err(|e| format!("district.ca_file: {e}"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("district.ca_file: {e:?}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("district.ca_file: {e}"))?;
            }
            let tls = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let (client, conn) = pg
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                .await
                .map_err(|e| pg_error(&e))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "database connection closed");
                }
            });
            client
        }
        None => {
            let (client, conn) = pg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| pg_error(&e))?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::warn!(error = %e, "database connection closed");
                }
            });
            client
        }
    };
    Ok(client)
}

/// Run the receiver until `shutdown`.
pub async fn run(cfg: DistrictConfig, shutdown: impl Future<Output = ()>) -> Result<(), String> {
    crate::mqtt::install_crypto_provider();
    let cfg = Arc::new(cfg);
    let stop = CancellationToken::new();
    tokio::pin!(shutdown);
    // The database first: the schema must exist before anything is acknowledged.
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut client = loop {
        match connect(&cfg).await {
            Ok(c) => break c,
            Err(e) => {
                tracing::error!(error = %crate::logfmt::redact_url(&e), "cannot connect to the database; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = &mut shutdown => return Ok(()),
                }
            }
        }
    };
    // Receivers starting together migrate one at a time (a session advisory lock); a failed
    // migration is retried, it does not stop the receiver.
    let applied = loop {
        let r = async {
            client
                .execute("SELECT pg_advisory_lock(7431990)", &[])
                .await
                .map_err(|e| pg_error(&e))?;
            let r = db::migrate(&mut client).await.map_err(|e| e.to_string());
            let _ = client
                .execute("SELECT pg_advisory_unlock(7431990)", &[])
                .await;
            let n = r?;
            db::set_silent_after(&client, cfg.district.silent_after.0.as_secs())
                .await
                .map_err(|e| pg_error(&e))?;
            Ok::<_, String>(n)
        }
        .await;
        match r {
            Ok(n) => break n,
            Err(e) => {
                tracing::error!(error = %e, "database migration failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = &mut shutdown => return Ok(()),
                }
                if client.is_closed() {
                    if let Ok(c) = connect(&cfg).await {
                        client = c;
                    }
                }
            }
        }
    };
    tracing::info!(migrations_applied = applied, filter = %cfg.filter(), "district receiver: database ready");

    let counters = Arc::new(Counters::default());
    let (tx, rx) = flume::bounded::<Item>(cfg.district.batch_max as usize * 4);
    let (current_tx, current_rx) = tokio::sync::watch::channel::<Option<(u64, AsyncClient)>>(None);
    let mqtt = tokio::spawn(mqtt_task(
        cfg.clone(),
        tx,
        current_tx,
        counters.clone(),
        stop.clone(),
    ));
    let (acks_tx, acks_rx) = tokio::sync::mpsc::unbounded_channel();
    let acker = tokio::spawn(acker(acks_rx, current_rx));
    let dbt = tokio::spawn(db_task(cfg.clone(), client, rx, acks_tx, counters.clone()));
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
    Ok(())
}

async fn mqtt_task(
    cfg: Arc<DistrictConfig>,
    tx: flume::Sender<Item>,
    current: tokio::sync::watch::Sender<Option<(u64, AsyncClient)>>,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    let m = &cfg.mqtt;
    let settings = ClientSettings {
        url: &m.url,
        client_id: m.client_id.clone(),
        username: m.username.as_deref(),
        password: m.password.as_ref(),
        ca_file: m.ca_file.as_deref(),
        client_cert: m.client_cert.as_deref(),
        client_key: m.client_key.as_deref(),
        keep_alive: m.keep_alive.0,
    };
    let mut backoff = Backoff::new(m.reconnect_min.0, m.reconnect_max.0);
    let filter = cfg.filter();
    let mut gen = 0u64;
    'connections: loop {
        let mut opts = match options(&settings, "mqtt") {
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
                    tracing::info!(url = %m.url, %filter, "district broker connected");
                    if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                        tracing::warn!(error = %e, "cannot queue the subscription");
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(s))) => {
                    if s.return_codes.iter().any(|c| {
                        !matches!(c, rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    }) {
                        tracing::error!(%filter, codes = ?s.return_codes, "the district broker did not grant the shared subscription at QoS 1 (ACL? shared subscriptions enabled?)");
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    counters.received.fetch_add(1, Relaxed);
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
                    tracing::warn!(error = %e, url = %m.url, delay_ms = delay.as_millis() as u64, "district broker connection lost; reconnecting");
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

async fn db_task(
    cfg: Arc<DistrictConfig>,
    mut client: tokio_postgres::Client,
    rx: flume::Receiver<Item>,
    acks: tokio::sync::mpsc::UnboundedSender<(u64, rumqttc::Publish)>,
    counters: Arc<Counters>,
) {
    let prefix = cfg.mqtt.topic_prefix.clone();
    let max = cfg.district.batch_max as usize;
    let linger = cfg.district.linger.0;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let Ok(first) = rx.recv_async().await else {
            return; // the MQTT task stopped
        };
        let mut items = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while items.len() < max {
            match tokio::time::timeout_at(deadline, rx.recv_async()).await {
                Ok(Ok(i)) => items.push(i),
                _ => break,
            }
        }
        let parsed: Vec<(String, Result<msg::Msg, msg::Reject>)> = items
            .iter()
            .map(|i| (i.topic.clone(), msg::parse(&prefix, &i.topic, &i.payload)))
            .collect();
        // Commit, retrying through database trouble; nothing is acked until it commits.
        let applied = loop {
            let attempt = async {
                let tx = client.transaction().await?;
                let a = db::apply(&tx, &parsed).await?;
                tx.commit().await?;
                Ok::<_, tokio_postgres::Error>(a)
            }
            .await;
            match attempt {
                Ok(a) => {
                    backoff.reset();
                    break a;
                }
                // A value the database refuses (not a lost connection): the batch goes one message
                // at a time, and a message it still refuses is kept as a reject and acknowledged,
                // so one bad message never blocks the ones behind it.
                Err(e) if e.as_db_error().is_some() && !client.is_closed() => {
                    tracing::warn!(error = %pg_error(&e), batch = parsed.len(), "database refused the batch; applying its messages one at a time");
                    match isolate(&mut client, &parsed).await {
                        Ok(a) => break a,
                        Err(e) => {
                            tracing::error!(error = %pg_error(&e), "database write failed; the batch stays unacknowledged and is retried");
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                    }
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    let e = pg_error(&e);
                    tracing::error!(error = %e, batch = parsed.len(), delay_ms = delay.as_millis() as u64, "database write failed; the batch stays unacknowledged and is retried");
                    tokio::time::sleep(delay).await;
                    if client.is_closed() {
                        match connect(&cfg).await {
                            Ok(c) => client = c,
                            Err(e) => {
                                tracing::warn!(error = %crate::logfmt::redact_url(&e), "database reconnect failed")
                            }
                        }
                    }
                }
            }
        };
        for (topic, r) in &parsed {
            if let Err(r) = r {
                tracing::warn!(topic = %crate::logfmt::Clean(topic), reason = r.reason, detail = %crate::logfmt::Clean(&r.detail), "district receiver: message rejected");
            }
        }
        counters.kept.fetch_add(applied.kept, Relaxed);
        counters.rejected.fetch_add(applied.rejected, Relaxed);
        counters.batches.fetch_add(1, Relaxed);
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

/// Apply `parsed` one message per transaction; a message the database refuses becomes a
/// `database_refused` reject. An error that is not the database refusing a value (a lost
/// connection) is returned, and the whole batch is retried.
async fn isolate(
    client: &mut tokio_postgres::Client,
    parsed: &[(String, Result<msg::Msg, msg::Reject>)],
) -> Result<db::Applied, tokio_postgres::Error> {
    let mut total = db::Applied::default();
    for item in parsed {
        let attempt = async {
            let tx = client.transaction().await?;
            let a = db::apply(&tx, std::slice::from_ref(item)).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(a)
        }
        .await;
        match attempt {
            Ok(a) => {
                total.kept += a.kept;
                total.rejected += a.rejected;
                total.windows_set += a.windows_set;
            }
            Err(e) if e.as_db_error().is_some() && !client.is_closed() => {
                let detail = pg_error(&e);
                tracing::warn!(topic = %crate::logfmt::Clean(&item.0), error = %detail, "district receiver: message refused by the database; kept as a reject");
                db::refuse(client, &item.0, &detail).await?;
                total.rejected += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(total)
}
