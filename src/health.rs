//! Devices and links: the expected cadence of each device (`[health]`), the one rule for "is
//! this device online", the one device list the page, the API, the metrics and the heartbeat
//! read, the log lines when a device goes offline or comes back, and whether the site link has
//! been down longer than `health.link_grace`.
//!
//! An MQTT device has no liveness but its events: it is online while its last accepted event is
//! no older than its cadence (per device, else per kind, else `health.silence`). A Modbus device
//! is polled: it is offline after `offline_after` failed polls in a row (the Modbus input
//! decides, see `modbus.rs`). Devices known once are remembered across restarts (the store's
//! `devices` table) until silent for `health.forget_after`, or until forgotten: at
//! `health.max_devices` the longest silent makes room for a new one, a `[[mqtt.sources]]` change
//! forgets the devices that no longer map, and the installer can forget devices by name
//! (`zhian-gateway devices forget`); see `crate::devices`.

use crate::core::event::Kind;
use crate::stats::Stats;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One device as every surface shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceHealth {
    pub kind: Kind,
    pub name: String,
    /// `mqtt` or `modbus`.
    pub source: &'static str,
    pub online: bool,
    /// When it was last seen (ms): an accepted event, or a good poll.
    pub last_seen_ms: Option<i64>,
    /// Since when it has been offline (ms): the end of its cadence after it was last seen
    /// (MQTT), or its last good poll (Modbus). None while online or never seen.
    pub offline_since_ms: Option<i64>,
    /// Its cadence (MQTT; ms).
    pub silence_ms: Option<i64>,
    /// Events accepted (MQTT) or counted (Modbus) since the daemon started.
    pub events: u64,
    /// The reason its last message was rejected (MQTT), or its last poll error (Modbus,
    /// cleared by a good poll).
    pub last_error: Option<String>,
    /// Counter readings dropped by the glitch rule since start (Modbus).
    pub glitches: u64,
    /// Latest value of each state point (Modbus).
    pub states: BTreeMap<String, serde_json::Value>,
    /// Its latest event was stamped more than `aggregate.max_future_skew` ahead of the trusted
    /// gateway clock and was counted at receipt (MQTT; contract: "Clocks").
    pub clock_skew: bool,
    /// How far ahead that event was (ms), while flagged.
    pub clock_ahead_ms: Option<i64>,
}

/// Every known device, offline first, then by kind and name. MQTT devices that never had an
/// event accepted, and those silent longer than `health.forget_after`, are left out.
pub fn devices(stats: &Stats, now_ms: i64) -> Vec<DeviceHealth> {
    let c = stats.cadence();
    let mut out: Vec<DeviceHealth> = stats
        .devices()
        .into_iter()
        // Never accepted an event (only rejects on its topic): not a device, its rejects are
        // in the recent rejects; silent past forget_after: forgotten.
        .filter(|(_, d)| d.last_seen_ms > 0 && now_ms - d.last_seen_ms < c.forget_after_ms)
        .map(|((kind, name), d)| {
            let silence = c.silence_ms(kind, &name);
            let online = c.online(kind, &name, d.last_seen_ms, now_ms);
            DeviceHealth {
                kind,
                source: "mqtt",
                online,
                last_seen_ms: (d.last_seen_ms > 0).then_some(d.last_seen_ms),
                offline_since_ms: (!online && d.last_seen_ms > 0)
                    .then_some(d.last_seen_ms + silence),
                silence_ms: Some(silence),
                events: d.accepted,
                last_error: d.last_error.map(str::to_string),
                glitches: 0,
                states: BTreeMap::new(),
                clock_skew: d.clock_ahead_ms.is_some(),
                clock_ahead_ms: d.clock_ahead_ms,
                name,
            }
        })
        .collect();
    out.extend(stats.modbus().into_iter().map(|(name, h)| {
        DeviceHealth {
            kind: h.kind,
            source: "modbus",
            online: h.online,
            last_seen_ms: h.last_seen_ms,
            offline_since_ms: (!h.online).then_some(h.last_seen_ms).flatten(),
            silence_ms: None,
            events: h.counted,
            last_error: h.last_error,
            glitches: h.glitches,
            states: h
                .states
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
            clock_skew: false,
            clock_ahead_ms: None,
            name,
        }
    }));
    out.sort_by(|a, b| (a.online, a.kind, &a.name).cmp(&(b.online, b.kind, &b.name)));
    out
}

/// Why `/healthz` should fail because of the site link: down (never connected, or lost) for
/// longer than `health.link_grace`.
pub fn site_link_too_long_down(stats: &Stats, now_ms: i64) -> Option<String> {
    let links = stats.links();
    let l = links.get(&crate::link::Link::Site)?;
    let grace = stats.cadence().link_grace_ms;
    (!l.connected && now_ms - l.since_ms > grace).then(|| {
        format!(
            "site broker {} down for {} s: {}",
            l.url,
            (now_ms - l.since_ms) / 1000,
            l.reason.unwrap_or("closed")
        )
    })
}

/// How often the watcher looks at the MQTT devices.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Log each MQTT device going offline (WARN) or coming back (INFO), once per change. Modbus
/// devices are logged by the Modbus input, which sees their polls fail.
///
/// A device already offline before this process started is not news: no WARN at start.
pub async fn watch(stats: Arc<Stats>, stop: CancellationToken) {
    let started_ms = crate::clock::now_ms();
    let mut was: HashMap<(Kind, String), bool> = HashMap::new();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = crate::clock::now_ms();
        let list = devices(&stats, now);
        // Forgotten devices leave the watch too (the device table's bound holds here as well).
        let present: std::collections::HashSet<(Kind, &str)> = list
            .iter()
            .filter(|d| d.source == "mqtt")
            .map(|d| (d.kind, d.name.as_str()))
            .collect();
        was.retain(|(kind, name), _| present.contains(&(*kind, name.as_str())));
        for d in list.into_iter().filter(|d| d.source == "mqtt") {
            let prev = was.insert((d.kind, d.name.clone()), d.online);
            match (prev, d.online) {
                (Some(true), false) | (None, false)
                    if d.offline_since_ms.is_some_and(|t| t >= started_ms) =>
                {
                    tracing::warn!(
                        kind = d.kind.as_str(),
                        device = %d.name,
                        silent_s = d.last_seen_ms.map_or(0, |t| (now - t) / 1000),
                        cadence_s = d.silence_ms.unwrap_or(0) / 1000,
                        "device offline: silent for longer than its cadence ([health])"
                    );
                }
                (Some(false), true) => {
                    tracing::info!(kind = d.kind.as_str(), device = %d.name, "device online again");
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offline_devices_come_first_and_the_forgotten_are_left_out() {
        let stats = Stats::default();
        let now = 1_800_000_000_000;
        stats.rejected(
            crate::core::event::Reject::InvalidJson,
            "zhian/access/only-rejects",
            now,
        );
        stats.remember_device(Kind::Access, "b-door", now - 1000);
        stats.remember_device(Kind::Access, "a-door", now - 1000);
        stats.remember_device(Kind::Access, "z-door", now - 3_600_000);
        stats.remember_device(Kind::Access, "old", now - 40 * 86_400_000);
        let list = devices(&stats, now);
        let names: Vec<_> = list.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["z-door", "a-door", "b-door"]);
        assert_eq!(list[0].offline_since_ms, Some(now - 3_600_000 + 900_000));
    }
}
