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
//!
//! Files: `intake.rs` (the MQTT task), `db_task.rs` (batches, retries, the acks), `rollcall.rs`
//! (the receivers' roll-call), `msg.rs` (parsing through `zhian-proto`; pure), `db.rs` (the
//! statements), `errors.rs` (whose fault an error is; pure), `ops.rs` (`/healthz`, `/metrics`),
//! `config.rs` (`district.toml`); here: `run`, the connection and the acker.

/// Wall clock, Unix ms.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub mod batch;
pub mod config;
pub mod db;
mod db_task;
pub mod errors;
mod intake;
pub mod msg;
pub mod ops;
pub mod partitions;
mod rollcall;

use db_task::*;
use intake::*;
use rollcall::*;

use config::DistrictConfig;
use ops::Ops;
use rumqttc::{AsyncClient, Event, Incoming, QoS};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use zhian_common::backoff::Backoff;
use zhian_common::mqtt::{options, ClientSettings};

/// One received message, parsed by the MQTT task (so parsing overlaps the database task's
/// statements), and what acknowledges it.
struct Item {
    parsed: Parsed,
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
    /// The boxes' fleet topics that are not for the receiver, acknowledged and dropped.
    not_ours: AtomicU64,
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
        .map_err(|(f, e)| (f, zhian_common::logfmt::redact_url(&e)))
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

/// `zhian-gateway district --init`: create this receiver's persistent session with the shared
/// subscription, then disconnect. Run once before the first gateway publishes: messages sent
/// before any receiver subscribed are kept by no session (docs/district-operations.md).
pub async fn init_subscription(cfg: &DistrictConfig) -> Result<String, String> {
    zhian_common::mqtt::install_crypto_provider();
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
    zhian_common::mqtt::install_crypto_provider();
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
                    fleet_topics_skipped = counters.not_ours.load(Relaxed),
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
    st: &db::Prepared,
    horizon: batch::Horizon,
    parsed: &[Parsed],
    p: &mut Progress,
    end: usize,
) -> Result<(), tokio_postgres::Error> {
    while p.done < end {
        let item = &parsed[p.done];
        let attempt = async {
            let tx = client.transaction().await?;
            let a = db::apply(&tx, st, std::slice::from_ref(item), horizon).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(a)
        }
        .await;
        match attempt {
            Ok(a) => p.applied.add(a),
            Err(e) if errors::of(&e) == errors::Fault::Value && !client.is_closed() => {
                let detail = pg_error(&e);
                tracing::warn!(topic = %zhian_common::logfmt::Clean(&item.0), error = %detail, "district receiver: message refused by the database; kept as a reject");
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
