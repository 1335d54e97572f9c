//! systemd integration: `READY=1` once the pipeline runs, and a watchdog fed from the
//! pipeline's liveness (not from a timer that always fires), `STOPPING=1` at shutdown.
//!
//! The watchdog is pinged only while every core task runs (`Stats::down` is empty) and the
//! committer turned its loop recently (it turns at least once a second even when idle). A stuck
//! committer, a dead task or a wedged runtime stops the pings, and systemd restarts the service
//! (`WatchdogSec=` in the unit). Without `NOTIFY_SOCKET` (not under systemd) all of this is a
//! no-op.

use crate::stats::Stats;
use sd_notify::NotifyState;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Tell systemd the service is up.
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        tracing::warn!(error = %e, "systemd: cannot send READY=1");
    }
}

/// Tell systemd the service is restarting itself in place (a fleet change that needs a
/// restart): the same process execs the binary again, which sends `READY=1` when it runs.
pub fn reloading() {
    let _ = sd_notify::notify(&[NotifyState::Reloading]);
}

/// Tell systemd the service is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// Whether the pipeline is alive enough to pet the watchdog.
pub fn alive(stats: &Stats, stale_after: Duration) -> bool {
    stats.down().is_empty()
        && stats
            .committer_idle_ms()
            .is_some_and(|idle| idle <= stale_after.as_millis() as i64)
}

/// How long the committer may go without a turn before the pipeline counts as stuck.
pub const STUCK_AFTER: Duration = Duration::from_secs(5);

/// Ping the watchdog at half its interval while the pipeline is alive, until `stop`.
pub async fn watchdog(stats: Arc<Stats>, stop: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = interval / 2;
    tracing::info!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let mut warned = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if alive(&stats, period.max(STUCK_AFTER)) {
            warned = false;
            let _ = sd_notify::notify(&[NotifyState::Watchdog]);
        } else if !warned {
            warned = true;
            tracing::error!(down = ?stats.down(), "pipeline not alive: withholding the watchdog ping, systemd will restart the service");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_needs_a_recent_committer_turn_and_no_dead_task() {
        let stats = Arc::new(Stats::default());
        assert!(!alive(&stats, Duration::from_secs(3)), "never turned");
        stats.committer_turned();
        assert!(alive(&stats, Duration::from_secs(3)));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!alive(&stats, Duration::from_millis(10)), "stale");
        stats.committer_turned();
        let stop = CancellationToken::new();
        drop(stats.task_guard("forwarder", stop)); // dropped before stop: the task died
        assert!(!alive(&stats, Duration::from_secs(3)), "a dead task");
    }
}
