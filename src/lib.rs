//! zhian-gateway: turns a residential compound's access-control, camera and vehicle-gate feeds
//! into durable, deduplicated, per-window counts for the district platform.
//!
//! [`run`] is the daemon as a library function: `main` only parses the command line, loads the
//! config and calls it with a shutdown future. Tests drive it the same way.

pub mod backoff;
pub mod broker;
pub mod clock;
pub mod committer;
pub mod config;
/// The pure core, its own crate (`crates/zhian-core`): `crate::core::...` paths name it.
pub use zhian_core as core;
#[cfg(feature = "demo")]
pub mod demo;
pub mod devices;
#[cfg(feature = "district")]
pub mod district;
pub mod epoch;
pub mod forwarder;
pub mod health;
pub mod ingest;
pub mod inspect;
pub mod keys;
pub mod link;
pub mod logfmt;
pub mod modbus;
pub mod mqtt;
pub mod preflight;
pub mod stats;
pub mod status;
pub mod store;
pub mod systemd;

use crate::committer::{Committer, CommitterCfg};
use crate::config::Config;
use crate::core::engine::Engine;
use crate::core::summary::Site;
use crate::core::window::WindowCfg;
use crate::stats::Stats;
use crate::store::{Retention, Store};
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Version and target triple, for `--version` and the heartbeat.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BUILD_TARGET_TRIPLE"),
    ")"
);

/// Everything after SIGTERM must finish within this (the contract allows 5 s).
pub const SHUTDOWN_BUDGET: Duration = Duration::from_millis(4000);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error("a core task stopped unexpectedly: {0}")]
    TaskDied(&'static str),
    #[error("{0}")]
    Broker(String),
    #[error("{what}: cannot listen on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
}

/// The decision engine configured from `cfg`.
pub fn engine_for(cfg: &Config) -> Engine {
    let a = &cfg.aggregate;
    Engine {
        window: WindowCfg {
            window_ms: a.window.as_millis_u64(),
            grace_ms: a.grace.as_millis_u64(),
            max_lateness_ms: a.max_lateness.as_millis_u64(),
            max_future_skew_ms: a.max_future_skew.as_millis_u64(),
        },
        dedup_ttl_ms: cfg.dedup.ttl.as_millis_u64(),
        gateway: cfg.gateway.id.clone(),
        site: Site {
            district: cfg.gateway.district.clone(),
            street: cfg.gateway.street.clone(),
            community: cfg.gateway.community.clone(),
            compound: cfg.gateway.compound.clone(),
        },
        alert_actions: cfg.alerts.actions.clone(),
        max_summary_bytes: max_summary_bytes(cfg),
    }
}

/// The largest summary payload that fits `upstream.max_packet_size` with its topic and the MQTT
/// headers (fixed header up to 5 bytes, topic length 2, packet id 2; 16 to spare).
pub fn max_summary_bytes(cfg: &Config) -> usize {
    let topic = format!("{}/{}/summary", cfg.upstream.topic_prefix, cfg.gateway.id);
    (cfg.upstream.max_packet_size.0 as usize).saturating_sub(topic.len() + 16)
}

/// One attempt at opening the daemon's store: a damaged file is quarantined or refused per
/// `store.on_damage`; compacts when it pays.
fn open_store(
    dir: &std::path::Path,
    subjects: config::SubjectMode,
    on_damage: config::OnDamage,
    max_bytes: u64,
    dedup_ttl_ms: Option<u64>,
) -> Result<
    (
        Arc<Store>,
        store::StoreWriter,
        Option<store::damage::Quarantined>,
    ),
    store::StoreError,
> {
    let (s, mut w, q) =
        store::damage::open_or_quarantine(dir, subjects, on_damage, clock::now_ms(), dedup_ttl_ms)?;
    w.set_max_bytes(max_bytes);
    if let Err(e) = w.compact_if_it_pays() {
        tracing::warn!(error = %e, "store: compaction failed; continuing");
    }
    Ok((s, w, q))
}

/// Run the daemon until `shutdown` resolves, then stop in order: intake, committer (commits
/// what was accepted and acks it), device connection, district connection.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reload(cfg, shutdown, reloads).await
}

/// The config sections that a reload applies live; every other change needs a restart.
const LIVE_SECTIONS: [&str; 4] = ["alerts", "modbus", "health", "care"];

/// Top-level config sections that differ between `a` and `b`, other than [`LIVE_SECTIONS`].
fn restart_sections(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(toml::Value::Table(mut a)), Ok(toml::Value::Table(mut b))) =
        (toml::Value::try_from(a), toml::Value::try_from(b))
    else {
        return vec!["(config could not be compared)".into()];
    };
    // `mqtt.sources` is applied live; the rest of `[mqtt]` needs a restart.
    for t in [&mut a, &mut b] {
        if let Some(toml::Value::Table(m)) = t.get_mut("mqtt") {
            m.remove("sources");
        }
    }
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| !LIVE_SECTIONS.contains(&k.as_str()) && a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Start the Modbus input for `devices` (none: no task), stopped by its own child token.
fn spawn_modbus(
    devices: &[config::ModbusDevice],
    intake: &flume::Sender<committer::Intake>,
    stats: &Arc<Stats>,
    parent: &CancellationToken,
) -> Option<(tokio::task::JoinHandle<()>, CancellationToken)> {
    let devices: Vec<config::ModbusDevice> =
        devices.iter().filter(|d| !d.example).cloned().collect();
    if devices.is_empty() {
        return None;
    }
    let stop = parent.child_token();
    let guard = stats.task_guard("modbus input", stop.clone());
    let task = modbus::Modbus {
        devices,
        intake: intake.clone(),
        stats: stats.clone(),
        stop: stop.clone(),
    };
    Some((
        tokio::spawn(async move {
            let _guard = guard;
            task.run().await
        }),
        stop,
    ))
}

/// As [`run`], and each config received on `reloads` (SIGHUP) is applied: `alerts.actions` and
/// the Modbus devices live; any other change is logged as needing a restart. A reload never
/// stops the daemon.
pub async fn run_with_reload(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    mqtt::install_crypto_provider();
    let cfg = Arc::new(cfg);
    tokio::pin!(shutdown);
    // A store that cannot be opened for a reason that may pass (a full or failing disk, a file
    // the service user cannot read) is retried every 5 s; SIGTERM still stops the daemon.
    let mut warned = false;
    let (store, mut writer, quarantined) = loop {
        let dir = cfg.gateway.data_dir.clone();
        let subjects = cfg.privacy.subjects;
        let on_damage = cfg.store.on_damage;
        let max_bytes = cfg.store.max_size.0;
        let ttl = Some(cfg.dedup.ttl.as_millis_u64());
        let attempt = tokio::task::spawn_blocking(move || {
            open_store(&dir, subjects, on_damage, max_bytes, ttl)
        })
        .await
        .map_err(|_| RunError::TaskDied("store open"))?;
        match attempt {
            Ok(opened) => break opened,
            Err(e) if e.disk_fault().is_some() => {
                if !warned {
                    tracing::error!(error = %e, "store cannot be opened; retrying every 5 s (SIGTERM stops the daemon)");
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = &mut shutdown => {
                        tracing::info!("shutdown requested while the store could not be opened");
                        return Ok(());
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(path = %store.path().display(), bytes = store.file_bytes(), "store open");
    writer.set_day_cfg(core::daily::DayCfg {
        offset_ms: cfg.site_offset_s() as i64 * 1000,
        grace_ms: cfg.aggregate.grace.as_millis_u64() as i64,
        lateness_ms: cfg.aggregate.max_lateness.as_millis_u64() as i64,
        settle_ms: cfg.aggregate.window.as_millis_u64() as i64,
    });
    if cfg.privacy.subjects != config::SubjectMode::Drop || !cfg.care.residents.is_empty() {
        let dir = cfg.privacy.key_dir(&cfg.gateway.data_dir);
        if preflight::resolves_inside(&dir, &cfg.gateway.data_dir) {
            return Err(RunError::Keys(keys::KeyError {
                path: dir,
                what: "is inside gateway.data_dir once symlinks are followed (a backup of the data dir would hold the keys)",
                source: std::io::Error::other("refused"),
            }));
        }
        let rotate = match cfg.privacy.rotate {
            config::KeyRotation::Daily => keys::Rotate::Daily,
            config::KeyRotation::Never => keys::Rotate::Never,
        };
        let offset = config::parse_utc_offset(&cfg.status.timezone).unwrap_or(8 * 3600);
        let keep = cfg.aggregate.max_lateness.as_millis_u64();
        let seal_keep = cfg.store.raw_retention.as_millis_u64();
        let keys = tokio::task::spawn_blocking(move || {
            keys::SubjectKeys::open(&dir, rotate, offset, keep, seal_keep, clock::now_ms())
        })
        .await
        .map_err(|_| RunError::TaskDied("pseudonym keys open"))??;
        writer.set_subject_keys(keys);
    }
    writer.set_care(&cfg.care.residents);
    if cfg.broker.enabled {
        let listen: std::net::SocketAddr = cfg.broker.listen.parse().map_err(|_| {
            RunError::Broker(format!(
                "broker.listen: {:?} is not ip:port",
                cfg.broker.listen
            ))
        })?;
        if !listen.ip().is_loopback() {
            tracing::warn!(%listen, "the embedded broker has no per-device topic rules: any device holding the broker credential can read every device's events (card, face and plate ids) and publish as any device; where devices are not all trusted, use a site broker with contrib/mosquitto (README, \"Security and privacy\")");
        }
        let creds = cfg
            .broker
            .username
            .clone()
            .zip(cfg.broker.password.clone().map(|p| p.0));
        tokio::task::spawn_blocking(move || {
            broker::start(
                listen,
                creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
            )
        })
        .await
        .map_err(|_| RunError::TaskDied("embedded broker start"))?
        .map_err(RunError::Broker)?;
    }
    let status_listener = if cfg.status.enabled {
        Some(status::bind(&cfg).await.map_err(|e| RunError::Bind {
            what: "status.listen",
            addr: cfg.status.listen.clone(),
            source: e,
        })?)
    } else {
        None
    };
    let stats = Arc::new(Stats::default());
    *stats.quarantined.lock().expect("lock") = quarantined;
    stats.set_cadence(config::Cadence::new(&cfg.health));
    // Devices known once stay known across restarts.
    for (kind, device, last_seen) in store.devices()? {
        stats.remember_device(kind, &device, last_seen);
    }
    writer.set_max_bytes(cfg.store.max_size.0);
    let overview = store.overview()?;
    stats.outbox_pending.store(
        overview.pending_summaries + overview.pending_alerts,
        Relaxed,
    );
    stats.outbox_parked.store(overview.parked, Relaxed);
    stats.store_bytes.store(store.file_bytes(), Relaxed);
    let engine = engine_for(&cfg);
    let window_ms = engine.window.window_ms;
    let (intake_tx, intake_rx) = flume::bounded(cfg.store.batch_max as usize * 2);
    let (acked_tx, acked_rx) = flume::unbounded();
    let outbox_ready = Arc::new(Notify::new());

    let intake_stop = CancellationToken::new();
    let (alerts_tx, alerts_rx) = flume::bounded(4);
    let (care_tx, care_rx) = flume::bounded(4);
    // The store's latest record: a wall clock far behind it at start is a stale boot.
    let store_high = writer.latest_record_ms();
    let (park_tx, park_rx) = flume::unbounded();
    let (marks_tx, marks_rx) = flume::unbounded();
    let committer = Committer {
        writer,
        engine,
        alert_updates: alerts_rx,
        care_updates: care_rx,
        park: park_rx,
        clock: core::clock::ClockTrust::new(
            cfg.aggregate.max_future_skew.as_millis_u64() as i64,
            store_high,
        ),
        require_sync: cfg.clock.require_sync,
        store_clock: core::clock::StoreClock::new(
            cfg.aggregate.max_future_skew.as_millis_u64() as i64
        ),
        clock_step: core::clock::Step::None,
        committed_at: 0,
        trim_due: false,
        mono_origin: std::time::Instant::now(),
        site_up_since: None,
        abandoned: false,
        stop: intake_stop.clone(),
        source_marks: devices::SourceMarks::of(&cfg.mqtt.sources),
        source_updates: marks_rx,
        // Sources may have changed while the daemon was stopped.
        unmapped_due: true,
        bound_burst: None,
        skew_warns: (None, 0),
        cfg: CommitterCfg {
            batch_max: cfg.store.batch_max as usize,
            linger: cfg.store.batch_linger.0,
            max_inflight: cfg.mqtt.max_inflight,
            on_damage: cfg.store.on_damage,
            tick: Duration::from_millis((window_ms / 4).clamp(100, 1000)),
            retention: Retention {
                dedup_ttl_ms: cfg.dedup.ttl.as_millis_u64(),
                raw_retention_ms: cfg.store.raw_retention.as_millis_u64(),
                purge_batch: cfg.dedup.purge_batch as usize,
            },
            max_bytes: cfg.store.max_size.0,
            site_input: cfg.mqtt.enabled,
        },
        intake: intake_rx,
        acked: acked_rx,
        stats: stats.clone(),
        outbox_ready: outbox_ready.clone(),
    };
    let upstream_stop = CancellationToken::new();
    let status_stop = CancellationToken::new();
    let committer_guard = stats.task_guard("committer", intake_stop.clone());
    let mut committer = tokio::task::spawn_blocking(move || {
        let _guard = committer_guard;
        committer.run()
    });

    let (sources_tx, sources_rx) = tokio::sync::watch::channel(Arc::new(cfg.sources()));
    let mut ingest = cfg.mqtt.enabled.then(|| {
        let guard = stats.task_guard("device input", intake_stop.clone());
        let task = ingest::Ingest {
            cfg: cfg.clone(),
            sources: sources_rx,
            intake: Some(intake_tx.clone()),
            stats: stats.clone(),
            stop: intake_stop.clone(),
        };
        tokio::spawn(async move {
            let _guard = guard;
            task.run().await
        })
    });
    let mut modbus = spawn_modbus(&cfg.modbus.devices, &intake_tx, &stats, &intake_stop);
    // Held until shutdown so the committer keeps running (closing windows, deleting PUBACKed
    // entries) even with no input enabled.
    let intake_keepalive = intake_tx;
    let mut forwarder = cfg.upstream.enabled.then(|| {
        let guard = stats.task_guard("forwarder", upstream_stop.clone());
        let task = forwarder::Forwarder {
            cfg: cfg.clone(),
            store: store.clone(),
            stats: stats.clone(),
            outbox_ready,
            acked: acked_tx,
            park: park_tx,
            stop: upstream_stop.clone(),
        };
        tokio::spawn(async move {
            let _guard = guard;
            task.run().await
        })
    });
    let mut status_task = status_listener.map(|listener| {
        let guard = stats.task_guard("status page", status_stop.clone());
        let serve = status::serve(
            listener,
            cfg.clone(),
            store.clone(),
            stats.clone(),
            status_stop.clone(),
        );
        tokio::spawn(async move {
            let _guard = guard;
            serve.await
        })
    });
    tracing::info!(gateway = %cfg.gateway.id, version = VERSION, "zhian-gateway running");
    systemd::ready();
    let watchdog = tokio::spawn(systemd::watchdog(stats.clone(), status_stop.clone()));
    let health_watch = tokio::spawn(health::watch(stats.clone(), status_stop.clone()));

    let mut result = Ok(());
    let mut committer_done = false;
    let mut running = cfg.clone();
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tracing::info!("shutdown requested");
                break;
            }
            r = &mut committer => {
                committer_done = true;
                result = match r {
                    Ok(Err(e)) => Err(RunError::Store(e)),
                    _ => Err(RunError::TaskDied("committer")),
                };
                tracing::error!("committer stopped; shutting down");
                break;
            }
            Some(new) = reloads.recv() => {
                let new = Arc::new(new);
                let restart = restart_sections(&running, &new);
                if new.alerts.actions != running.alerts.actions {
                    let _ = alerts_tx.try_send(new.alerts.actions.clone());
                    tracing::info!(actions = ?new.alerts.actions, "reload: alerts.actions applied");
                }
                let devices_changed = toml::Value::try_from(&new.modbus).ok()
                    != toml::Value::try_from(&running.modbus).ok();
                if devices_changed {
                    if let Some((h, stop)) = modbus.take() {
                        stop.cancel();
                        let _ = tokio::time::timeout(Duration::from_secs(3), h).await;
                    }
                    stats.modbus_retain(new.modbus.devices.iter().filter(|d| !d.example).map(|d| d.name.as_str()));
                    modbus = spawn_modbus(&new.modbus.devices, &intake_keepalive, &stats, &intake_stop);
                    tracing::info!(devices = new.modbus.devices.len(), "reload: Modbus devices applied");
                }
                if toml::Value::try_from(&new.health).ok() != toml::Value::try_from(&running.health).ok() {
                    stats.set_cadence(config::Cadence::new(&new.health));
                    tracing::info!("reload: [health] applied");
                }
                if restart.is_empty() {
                    tracing::info!("reload: done");
                } else {
                    tracing::warn!(sections = ?restart, "reload: these sections changed in the file and take effect after a restart (systemctl restart zhian-gateway); they keep their running values");
                }
                if new.care != running.care {
                    let _ = care_tx.try_send(new.care.residents.clone());
                    tracing::info!(residents = new.care.residents.len(), "reload: [care] applied");
                }
                if new.mqtt.sources != running.mqtt.sources {
                    sources_tx.send_replace(Arc::new(new.sources()));
                    let _ = marks_tx.send(devices::SourceMarks::of(&new.mqtt.sources));
                    tracing::info!(sources = new.mqtt.sources.len(), "reload: mqtt.sources applied");
                }
                // What runs now: the live sections from the new file, the rest as before.
                let mut next = (*running).clone();
                next.mqtt.sources = new.mqtt.sources.clone();
                next.care = new.care.clone();
                next.alerts = new.alerts.clone();
                next.modbus = new.modbus.clone();
                next.health = new.health.clone();
                running = Arc::new(next);
            }
        }
    }
    systemd::stopping();
    watchdog.abort();
    health_watch.abort();
    // Ordered, time-bounded shutdown: stop taking messages and say goodbye upstream; the
    // committer commits what was accepted (and the PUBACKs the forwarder saw), then acks go out
    // and the device connection closes.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_BUDGET;
    intake_stop.cancel();
    upstream_stop.cancel();
    drop(intake_keepalive);
    if let Some((h, _)) = modbus.as_mut() {
        // Stops at once on cancel; its sender must be gone before the committer can finish.
        let _ = tokio::time::timeout_at(deadline - Duration::from_millis(3000), h).await;
    }
    if let Some(h) = forwarder.as_mut() {
        if tokio::time::timeout_at(deadline - Duration::from_millis(2000), h)
            .await
            .is_err()
        {
            tracing::warn!("shutdown: district link did not close in time");
        }
    }
    if !committer_done {
        match tokio::time::timeout_at(deadline - Duration::from_millis(700), &mut committer).await {
            Ok(Ok(Err(e))) => result = Err(RunError::Store(e)),
            Ok(_) => {}
            Err(_) => tracing::warn!("shutdown: committer did not drain in time; uncommitted messages stay unacknowledged and will be redelivered"),
        }
    }
    if let Some(h) = ingest.as_mut() {
        if tokio::time::timeout_at(deadline, h).await.is_err() {
            tracing::warn!("shutdown: device input did not close in time");
        }
    }
    status_stop.cancel();
    if let Some(h) = status_task.as_mut() {
        let _ = tokio::time::timeout_at(deadline + Duration::from_millis(200), h).await;
    }
    // Closed cleanly (the committer is done), so the next start needs no repair.
    store.close();
    tracing::info!("zhian-gateway stopped");
    result
}
