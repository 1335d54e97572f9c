//! The daemon's steps, in the order [`crate::run_with_reload`] takes them: open the store
//! (retrying a disk that may recover), prepare the writer (site days, pseudonym keys, care
//! list), start the embedded broker, bind the status listener, restore the shared stats from
//! the store, start one task per I/O resource ([`Tasks::start`]), serve until shutdown while
//! applying reloads ([`Tasks::serve`], live sections in [`reload::Live`]), and stop in order
//! within [`crate::SHUTDOWN_BUDGET`] ([`Tasks::stop`]).

pub mod reload;

use crate::committer::{Committer, CommitterCfg, Intake};
use crate::config::{self, Config};
use crate::stats::Stats;
use crate::store::{self, Retention, Store, StoreWriter};
use crate::{
    broker, clock, core, devices, fleet, forwarder, health, ingest, keys, modbus, preflight,
    status, systemd, RunError, SHUTDOWN_BUDGET,
};
use reload::Live;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An opened store: the shared reader, the one writer, and the file moved aside if it was damaged.
pub type Opened = (Arc<Store>, StoreWriter, Option<store::damage::Quarantined>);

/// One attempt at opening the daemon's store: a damaged file is quarantined or refused per
/// `store.on_damage`; compacts when it pays.
fn open_store_once(cfg: &Config) -> Result<Opened, store::StoreError> {
    let (s, mut w, q) = store::damage::open_or_quarantine(
        &cfg.gateway.data_dir,
        cfg.privacy.subjects,
        cfg.store.on_damage,
        clock::now_ms(),
        Some(cfg.dedup.ttl.as_millis_u64()),
    )?;
    w.set_max_bytes(cfg.store.max_size.0);
    if let Err(e) = w.compact_if_it_pays() {
        tracing::warn!(error = %e, "store: compaction failed; continuing");
    }
    Ok((s, w, q))
}

/// Open the store. One that cannot be opened for a reason that may pass (a full or failing
/// disk, a file the service user cannot read) is retried every 5 s; `None` when shutdown came
/// first.
pub async fn open_store(
    cfg: &Arc<Config>,
    shutdown: &mut Pin<&mut impl Future<Output = ()>>,
) -> Result<Option<Opened>, RunError> {
    let mut warned = false;
    loop {
        let c = cfg.clone();
        let attempt = tokio::task::spawn_blocking(move || open_store_once(&c))
            .await
            .map_err(|_| RunError::TaskDied("store open"))?;
        match attempt {
            Ok(opened) => {
                tracing::info!(path = %opened.0.path().display(), bytes = opened.0.file_bytes(), "store open");
                return Ok(Some(opened));
            }
            Err(e) if e.disk_fault().is_some() => {
                if !warned {
                    tracing::error!(error = %e, "store cannot be opened; retrying every 5 s (SIGTERM stops the daemon)");
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.as_mut() => {
                        tracing::info!("shutdown requested while the store could not be opened");
                        return Ok(None);
                    }
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Give the writer the site's days, the pseudonym keys (unless subjects are dropped and no one
/// is watched; a key dir inside the data dir is refused) and the care list.
pub async fn prepare_writer(cfg: &Config, writer: &mut StoreWriter) -> Result<(), RunError> {
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
        let offset = cfg.site_offset_s();
        let keep = cfg.aggregate.max_lateness.as_millis_u64();
        let seal_keep = cfg.store.raw_retention.as_millis_u64();
        let now = clock::now_ms();
        let keys = tokio::task::spawn_blocking(move || {
            keys::SubjectKeys::open(&dir, rotate, offset, keep, seal_keep, now)
        })
        .await
        .map_err(|_| RunError::TaskDied("pseudonym keys open"))??;
        // A key the store used that the key dir lost is logged (ERROR) and shown from here on.
        writer.set_subject_keys(keys, now);
    }
    writer.set_care(&cfg.care.residents);
    writer.set_occupancy(occupancy_cfg(cfg));
    writer.set_max_bytes(cfg.store.max_size.0);
    Ok(())
}

/// Start the embedded broker when `[broker] enabled` (a WARN when it listens beyond loopback:
/// it has no per-device topic rules).
pub async fn start_broker(cfg: &Config) -> Result<(), RunError> {
    if !cfg.broker.enabled {
        return Ok(());
    }
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
    .map_err(RunError::Broker)
}

/// Bind the status page's listener when `[status] enabled` (before any task starts, so a taken
/// port stops the start).
pub async fn bind_status(cfg: &Config) -> Result<Option<tokio::net::TcpListener>, RunError> {
    if !cfg.status.enabled {
        return Ok(None);
    }
    status::bind(cfg)
        .await
        .map(Some)
        .map_err(|e| RunError::Bind {
            what: "status.listen",
            addr: cfg.status.listen.clone(),
            source: e,
        })
}

/// The shared stats, restored from the store: devices known once, the outbox's backlog, the
/// store's size, a quarantined file.
pub fn restore_stats(
    cfg: &Config,
    store: &Store,
    quarantined: Option<store::damage::Quarantined>,
) -> Result<Arc<Stats>, RunError> {
    let stats = Arc::new(Stats::default());
    *stats.quarantined.lock().expect("lock") = quarantined;
    stats.set_cadence(config::Cadence::new(&cfg.health));
    for (kind, device, last_seen) in store.devices()? {
        stats.remember_device(kind, &device, last_seen);
    }
    let overview = store.overview()?;
    stats.outbox_pending.store(
        overview.pending_summaries + overview.pending_alerts,
        Relaxed,
    );
    stats.outbox_parked.store(overview.parked, Relaxed);
    stats.store_bytes.store(store.file_bytes(), Relaxed);
    Ok(stats)
}

/// Start the Modbus input for `devices` (none: no task), stopped by its own child token.
fn spawn_modbus(
    devices: &[config::ModbusDevice],
    intake: &flume::Sender<Intake>,
    stats: &Arc<Stats>,
    parent: &CancellationToken,
) -> Option<(JoinHandle<()>, CancellationToken)> {
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

/// The running tasks (one per I/O resource), their stop tokens, and the channels a reload
/// feeds.
pub struct Tasks {
    stats: Arc<Stats>,
    store: Arc<Store>,
    committer: JoinHandle<Result<(), store::StoreError>>,
    committer_done: bool,
    ingest: Option<JoinHandle<()>>,
    modbus: Option<(JoinHandle<()>, CancellationToken)>,
    forwarder: Option<JoinHandle<()>>,
    status: Option<JoinHandle<()>>,
    watchdog: JoinHandle<()>,
    health_watch: JoinHandle<()>,
    /// Held until shutdown so the committer keeps running (closing windows, deleting PUBACKed
    /// entries) even with no input enabled; the Modbus input restarts from it.
    intake: flume::Sender<Intake>,
    intake_stop: CancellationToken,
    upstream_stop: CancellationToken,
    status_stop: CancellationToken,
    alerts: flume::Sender<Vec<String>>,
    care: flume::Sender<Vec<config::CareResident>>,
    occupancy: flume::Sender<Option<store::OccupancyCfg>>,
    sources: tokio::sync::watch::Sender<Arc<Vec<core::mapping::Source>>>,
    marks: flume::Sender<devices::SourceMarks>,
    /// The fleet link (`[fleet] trust` set and a config file to overlay), and the configs it
    /// asks the daemon to run.
    fleet: Option<JoinHandle<()>>,
    fleet_stop: CancellationToken,
    fleet_apply: Option<tokio::sync::mpsc::Receiver<fleet::Apply>>,
    /// A fleet change (or its rollback) needs a restart: [`Tasks::stop`] says RELOADING, not
    /// STOPPING, and the caller starts the daemon again.
    pub restart: bool,
}

impl Tasks {
    /// Start the committer (on a blocking thread: it owns the store writer), the device input,
    /// the Modbus input, the forwarder, the status page, the systemd watchdog and the device
    /// health watch.
    pub fn start(
        cfg: &Arc<Config>,
        store: Arc<Store>,
        writer: StoreWriter,
        stats: Arc<Stats>,
        status_listener: Option<tokio::net::TcpListener>,
    ) -> Tasks {
        let engine = crate::engine_for(cfg);
        let window_ms = engine.window.window_ms;
        let (intake_tx, intake_rx) = flume::bounded(cfg.store.batch_max as usize * 2);
        let (acked_tx, acked_rx) = flume::unbounded();
        let outbox_ready = Arc::new(Notify::new());
        let intake_stop = CancellationToken::new();
        let (alerts_tx, alerts_rx) = flume::bounded(4);
        let (care_tx, care_rx) = flume::bounded(4);
        let (occupancy_tx, occupancy_rx) = flume::bounded(4);
        // The store's latest record: a wall clock far behind it at start is a stale boot.
        let store_high = writer.latest_record_ms();
        let (park_tx, park_rx) = flume::unbounded();
        let (marks_tx, marks_rx) = flume::unbounded();
        let skew_ms = cfg.aggregate.max_future_skew.as_millis_u64() as i64;
        let committer = Committer {
            writer,
            engine,
            alert_updates: alerts_rx,
            care_updates: care_rx,
            occupancy_updates: occupancy_rx,
            park: park_rx,
            clock: core::clock::ClockTrust::new(skew_ms, store_high),
            require_sync: cfg.clock.require_sync,
            store_clock: core::clock::StoreClock::new(skew_ms),
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
        let committer = tokio::task::spawn_blocking(move || {
            let _guard = committer_guard;
            committer.run()
        });
        let (sources_tx, sources_rx) = tokio::sync::watch::channel(Arc::new(cfg.sources()));
        let ingest = cfg.mqtt.enabled.then(|| {
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
        let modbus = spawn_modbus(&cfg.modbus.devices, &intake_tx, &stats, &intake_stop);
        let forwarder = cfg.upstream.enabled.then(|| {
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
        let status = status_listener.map(|listener| {
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
        let watchdog = tokio::spawn(systemd::watchdog(stats.clone(), status_stop.clone()));
        let health_watch = tokio::spawn(health::watch(stats.clone(), status_stop.clone()));
        Tasks {
            stats,
            store,
            committer,
            committer_done: false,
            ingest,
            modbus,
            forwarder,
            status,
            watchdog,
            health_watch,
            intake: intake_tx,
            intake_stop,
            upstream_stop,
            status_stop,
            alerts: alerts_tx,
            care: care_tx,
            occupancy: occupancy_tx,
            sources: sources_tx,
            marks: marks_tx,
            fleet: None,
            fleet_stop: CancellationToken::new(),
            fleet_apply: None,
            restart: false,
        }
    }

    /// Start the fleet link when `[fleet] trust` is set, the district link is on and the
    /// config came from a file (`origin`) the fleet's fragment can overlay. A trust file that
    /// cannot be read is logged (check-config names it) and leaves remote configuration off.
    pub fn start_fleet(
        &mut self,
        cfg: &Arc<Config>,
        origin: Option<fleet::Origin>,
        overlay_problem: Option<String>,
    ) {
        if let Some(p) = &overlay_problem {
            tracing::error!(problem = %p, "fleet: the recorded overlay is not in force");
        }
        let (Some(trust_path), Some(origin)) = (&cfg.fleet.trust, origin) else {
            return;
        };
        if !cfg.upstream.enabled {
            tracing::warn!("fleet.trust is set but upstream.enabled = false: no fleet link");
            return;
        }
        let trust = match zhian_common::fleet_key::Trust::load(trust_path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "fleet.trust: cannot read the trusted key; remote configuration is off");
                return;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let guard = self.stats.task_guard("fleet link", self.fleet_stop.clone());
        let task = fleet::FleetTask {
            cfg: cfg.clone(),
            origin,
            trust,
            store: self.store.clone(),
            stats: self.stats.clone(),
            apply: tx,
            overlay_problem,
            stop: self.fleet_stop.clone(),
        };
        self.fleet_apply = Some(rx);
        self.fleet = Some(tokio::spawn(async move {
            let _guard = guard;
            task.run().await
        }));
    }

    /// Serve until `shutdown` resolves or the committer stops (an error), applying each config
    /// received on `reloads`. The result is what the daemon exits with, unless stopping adds an
    /// error.
    pub async fn serve(
        &mut self,
        cfg: &Arc<Config>,
        mut shutdown: Pin<&mut impl Future<Output = ()>>,
        reloads: &mut tokio::sync::mpsc::Receiver<Config>,
    ) -> Result<(), RunError> {
        let mut running = cfg.clone();
        loop {
            tokio::select! {
                _ = shutdown.as_mut() => {
                    tracing::info!("shutdown requested");
                    return Ok(());
                }
                r = &mut self.committer => {
                    self.committer_done = true;
                    tracing::error!("committer stopped; shutting down");
                    return match r {
                        Ok(Err(e)) => Err(RunError::Store(e)),
                        _ => Err(RunError::TaskDied("committer")),
                    };
                }
                Some(new) = reloads.recv() => {
                    running = self.reload(&running, &new).await;
                }
                Some(a) = recv_some(&mut self.fleet_apply) => {
                    let restart = match &a.cfg {
                        Some(cfg) => reload::restart_sections(&running, cfg),
                        None => vec!["(the config is read again at the start)".into()],
                    };
                    if let (true, Some(cfg)) = (restart.is_empty(), &a.cfg) {
                        running = self.reload(&running, cfg).await;
                        let _ = a.done.send(fleet::Applied::Live);
                    } else {
                        tracing::info!(sections = ?restart, "fleet: these sections take a restart; restarting");
                        let _ = a.done.send(fleet::Applied::Restart);
                        self.restart = true;
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Apply the [`Live`] sections of `new` that differ from `running`; log the sections that
    /// need a restart. Returns what runs now: the live sections from `new`, the rest as before.
    async fn reload(&mut self, running: &Arc<Config>, new: &Config) -> Arc<Config> {
        let restart = reload::restart_sections(running, new);
        let mut next = (**running).clone();
        for live in Live::ALL {
            if !live.changed(running, new) {
                continue;
            }
            match live {
                Live::Alerts => {
                    let _ = self.alerts.try_send(new.alerts.actions.clone());
                    tracing::info!(actions = ?new.alerts.actions, "reload: alerts.actions applied");
                }
                Live::Modbus => {
                    if let Some((h, stop)) = self.modbus.take() {
                        stop.cancel();
                        let _ = tokio::time::timeout(Duration::from_secs(3), h).await;
                    }
                    self.stats.modbus_retain(
                        new.modbus
                            .devices
                            .iter()
                            .filter(|d| !d.example)
                            .map(|d| d.name.as_str()),
                    );
                    self.modbus = spawn_modbus(
                        &new.modbus.devices,
                        &self.intake,
                        &self.stats,
                        &self.intake_stop,
                    );
                    tracing::info!(
                        devices = new.modbus.devices.len(),
                        "reload: Modbus devices applied"
                    );
                }
                Live::Health => {
                    self.stats.set_cadence(config::Cadence::new(&new.health));
                    tracing::info!("reload: [health] applied");
                }
                Live::Care => {
                    let _ = self.care.try_send(new.care.residents.clone());
                    tracing::info!(
                        residents = new.care.residents.len(),
                        "reload: [care] applied"
                    );
                }
                Live::Occupancy => {
                    // The lateness bound is `[aggregate]`'s, which a reload does not change.
                    let mut cfg = (**running).clone();
                    cfg.occupancy = new.occupancy.clone();
                    let _ = self.occupancy.try_send(occupancy_cfg(&cfg));
                    tracing::info!(on = new.occupancy.is_some(), "reload: [occupancy] applied");
                }
                Live::MqttSources => {
                    self.sources.send_replace(Arc::new(new.sources()));
                    let _ = self.marks.send(devices::SourceMarks::of(&new.mqtt.sources));
                    tracing::info!(
                        sources = new.mqtt.sources.len(),
                        "reload: mqtt.sources applied"
                    );
                }
            }
            live.adopt(&mut next, new);
        }
        if restart.is_empty() {
            tracing::info!("reload: done");
        } else {
            tracing::warn!(sections = ?restart, "reload: these sections changed in the file and take effect after a restart (systemctl restart zhian-gateway); they keep their running values");
        }
        Arc::new(next)
    }

    /// Ordered, time-bounded shutdown within [`SHUTDOWN_BUDGET`]: stop taking messages and say
    /// goodbye upstream; the committer commits what was accepted (and the PUBACKs the forwarder
    /// saw), then acks go out and the device connection closes; the status page last; the store
    /// closed cleanly so the next start needs no repair.
    pub async fn stop(mut self, mut result: Result<(), RunError>) -> Result<(), RunError> {
        if self.restart {
            systemd::reloading();
        } else {
            systemd::stopping();
        }
        self.watchdog.abort();
        self.health_watch.abort();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_BUDGET;
        self.intake_stop.cancel();
        self.upstream_stop.cancel();
        self.fleet_stop.cancel();
        drop(self.intake);
        if let Some((h, _)) = self.modbus.as_mut() {
            // Stops at once on cancel; its sender must be gone before the committer can finish.
            let _ = tokio::time::timeout_at(deadline - Duration::from_millis(3000), h).await;
        }
        if let Some(h) = self.forwarder.as_mut() {
            if tokio::time::timeout_at(deadline - Duration::from_millis(2000), h)
                .await
                .is_err()
            {
                tracing::warn!("shutdown: district link did not close in time");
            }
        }
        if let Some(h) = self.fleet.as_mut() {
            let _ = tokio::time::timeout_at(deadline - Duration::from_millis(2000), h).await;
        }
        if !self.committer_done {
            match tokio::time::timeout_at(deadline - Duration::from_millis(700), &mut self.committer)
                .await
            {
                Ok(Ok(Err(e))) => result = Err(RunError::Store(e)),
                Ok(_) => {}
                Err(_) => tracing::warn!("shutdown: committer did not drain in time; uncommitted messages stay unacknowledged and will be redelivered"),
            }
        }
        if let Some(h) = self.ingest.as_mut() {
            if tokio::time::timeout_at(deadline, h).await.is_err() {
                tracing::warn!("shutdown: device input did not close in time");
            }
        }
        self.status_stop.cancel();
        if let Some(h) = self.status.as_mut() {
            let _ = tokio::time::timeout_at(deadline + Duration::from_millis(200), h).await;
        }
        self.store.close();
        tracing::info!("zhian-gateway stopped");
        result
    }
}

/// The next item of `rx`, or never when there is no receiver (a `select!` branch that stays
/// idle).
async fn recv_some<T>(rx: &mut Option<tokio::sync::mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// `[occupancy]` as the store's writer takes it (ms; exits remembered for
/// `aggregate.max_lateness`); `None` when the section is absent.
fn occupancy_cfg(cfg: &Config) -> Option<store::OccupancyCfg> {
    cfg.occupancy.as_ref().map(|o| store::OccupancyCfg {
        max_stay_ms: o.max_stay.as_millis_u64() as i64,
        long_stay_ms: o.long_stay.as_millis_u64() as i64,
        forget_ms: cfg.aggregate.max_lateness.as_millis_u64() as i64,
        capacity: o.capacity,
    })
}
