//! zhian-gateway: turns a residential compound's access-control, camera and vehicle-gate feeds
//! into durable, deduplicated, per-window counts for the district platform.
//!
//! [`run`] is the daemon as a library function: `main` only parses the command line, loads the
//! config and calls it with a shutdown future. Tests drive it the same way.

/// Shared with the district receiver: `zhian-common` (re-exported so `crate::backoff`,
/// `crate::logfmt` and `crate::mqtt` paths stay).
pub use zhian_common::{backoff, logfmt, mqtt};
pub mod broker;
pub mod clock;
pub mod committer;
pub mod config;
pub mod daemon;
/// The pure core, its own crate (`crates/zhian-core`): `crate::core::...` paths name it.
pub use zhian_core as core;
#[cfg(feature = "demo")]
pub mod demo;
pub mod devices;
/// The district receiver, a crate of its own (`crates/zhian-district`), behind the `district`
/// feature: `crate::district::...` paths name it.
#[cfg(feature = "district")]
pub use zhian_district as district;
pub mod durable_file;
pub mod epoch;
pub mod fleet;
pub mod forwarder;
pub mod health;
pub mod ingest;
pub mod inspect;
pub mod keys;
pub mod link;
pub mod modbus;
pub mod preflight;
pub mod stats;
pub mod status;
pub mod store;
pub mod systemd;

use crate::config::Config;
use crate::core::engine::Engine;
use crate::core::summary::Site;
use crate::core::window::WindowCfg;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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

/// Run the daemon until `shutdown` resolves, then stop in order: intake, committer (commits
/// what was accepted and acks it), device connection, district connection.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    run_with_reload(cfg, shutdown, reloads).await
}

/// As [`run`], and each config received on `reloads` (SIGHUP) is applied: the sections in
/// [`daemon::reload::Live`] live; any other change is logged as needing a restart. A reload
/// never stops the daemon. The steps are [`daemon`]'s, in order.
pub async fn run_with_reload(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<(), RunError> {
    run_daemon(cfg, None, shutdown, reloads).await.map(|_| ())
}

/// How the daemon stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` resolved (SIGTERM, SIGINT).
    Shutdown,
    /// A fleet change (or its rollback) needs a restart: the caller starts the daemon again on
    /// the config `fleet.json` now records (`main` execs the binary in place).
    Restart,
}

/// As [`run_with_reload`], for a config loaded from a file ([`fleet::load_effective`]): with
/// `[fleet] trust` set, the fleet link runs and may ask for a restart. `effective` is what
/// `load_effective` gave.
pub async fn run_daemon(
    effective: impl Into<fleet::Effective>,
    origin: Option<fleet::Origin>,
    shutdown: impl Future<Output = ()>,
    mut reloads: tokio::sync::mpsc::Receiver<Config>,
) -> Result<Stopped, RunError> {
    let effective: fleet::Effective = effective.into();
    let cfg = effective.cfg;
    match run_steps(
        cfg,
        effective.problem,
        origin.clone(),
        shutdown,
        &mut reloads,
    )
    .await
    {
        // A change on trial the daemon cannot start on: back to the config before it.
        Err(e @ (RunError::Bind { .. } | RunError::Broker(_) | RunError::Keys(_)))
            if origin
                .as_ref()
                .is_some_and(|o| fleet::roll_back_failed_start(o, &e.to_string())) =>
        {
            Ok(Stopped::Restart)
        }
        other => other,
    }
}

async fn run_steps(
    cfg: Config,
    overlay_problem: Option<String>,
    origin: Option<fleet::Origin>,
    shutdown: impl Future<Output = ()>,
    reloads: &mut tokio::sync::mpsc::Receiver<Config>,
) -> Result<Stopped, RunError> {
    mqtt::install_crypto_provider();
    let cfg = Arc::new(cfg);
    tokio::pin!(shutdown);
    let Some((store, mut writer, quarantined)) = daemon::open_store(&cfg, &mut shutdown).await?
    else {
        return Ok(Stopped::Shutdown);
    };
    daemon::prepare_writer(&cfg, &mut writer).await?;
    daemon::start_broker(&cfg).await?;
    let status_listener = daemon::bind_status(&cfg).await?;
    let stats = daemon::restore_stats(&cfg, &store, quarantined)?;
    let mut tasks = daemon::Tasks::start(&cfg, store, writer, stats, status_listener);
    tasks.start_fleet(&cfg, origin, overlay_problem);
    tracing::info!(gateway = %cfg.gateway.id, version = VERSION, "zhian-gateway running");
    systemd::ready();
    let result = tasks.serve(&cfg, shutdown, reloads).await;
    let restart = tasks.restart;
    tasks.stop(result).await?;
    Ok(if restart {
        Stopped::Restart
    } else {
        Stopped::Shutdown
    })
}
