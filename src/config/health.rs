//! `[health]`: device cadences (a default, per kind, per device), the link grace and the device
//! table bound, its types, defaults and validation.

use super::*;

/// `[health]`: when a device counts as offline, and how long the site link may be down before
/// `/healthz` says so (contract: "Status page").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    /// The expected cadence of an MQTT device: one silent for longer is offline. Default 15 min.
    pub silence: Dur,
    /// Per kind (`access`, `camera`, `vehicle`), e.g. `camera = "24h"` for cameras that report
    /// only incidents.
    pub kinds: BTreeMap<String, Dur>,
    /// Per device id (matched without regard to case), e.g. `"gate-east" = "2h"`.
    pub devices: BTreeMap<String, Dur>,
    /// `/healthz` answers 503 once the site broker has been unreachable this long. Default 60 s.
    pub link_grace: Dur,
    /// An MQTT device silent this long is forgotten (page, API, heartbeat, metrics). Default
    /// 30 days.
    pub forget_after: Dur,
    /// Most MQTT devices learned from traffic (remembered ones included): it bounds the device
    /// table, never the events counted. A new device past it is learned and its events count;
    /// the longest-silent device is forgotten instead (counted, logged once per burst, shown),
    /// so a flood of invented device ids cannot grow the store, the page, the API or the
    /// metrics. Default 2000.
    pub max_devices: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            silence: Dur(Duration::from_secs(15 * 60)),
            kinds: BTreeMap::new(),
            devices: BTreeMap::new(),
            link_grace: Dur(Duration::from_secs(60)),
            forget_after: Dur(Duration::from_secs(30 * 86_400)),
            max_devices: 2000,
        }
    }
}

pub(crate) fn validate_health(h: &Health, p: &mut Vec<Problem>) {
    let zero = |d: &Dur| d.0.is_zero();
    for (key, d) in [
        ("health.silence", &h.silence),
        ("health.link_grace", &h.link_grace),
        ("health.forget_after", &h.forget_after),
    ] {
        if zero(d) {
            p.push(problem(key, "must be more than 0"));
        }
    }
    if !(1..=100_000).contains(&h.max_devices) {
        p.push(problem(
            "health.max_devices",
            format!("{} must be 1-100000", h.max_devices),
        ));
    }
    for (k, d) in &h.kinds {
        if crate::core::event::Kind::parse(k).is_none() {
            p.push(problem(
                format!("health.kinds.{k:?}"),
                "not a kind: one of \"access\", \"camera\", \"vehicle\"",
            ));
        } else if zero(d) {
            p.push(problem(format!("health.kinds.{k}"), "must be more than 0"));
        }
    }
    for (k, d) in &h.devices {
        if !crate::core::event::valid_device(k) {
            p.push(problem(
                format!("health.devices.{k:?}"),
                "not a device id (1-64 of [A-Za-z0-9_.-])",
            ));
        } else if zero(d) {
            p.push(problem(
                format!("health.devices.{k:?}"),
                "must be more than 0",
            ));
        }
    }
    if zero(&h.forget_after) {
        return;
    }
    // Every cadence must be shorter than forget_after: name the longest one that is not.
    let mut cadences: Vec<(String, &Dur)> = vec![("health.silence".into(), &h.silence)];
    cadences.extend(
        h.kinds
            .iter()
            .map(|(k, d)| (format!("health.kinds.{k}"), d)),
    );
    cadences.extend(
        h.devices
            .iter()
            .map(|(k, d)| (format!("health.devices.{k:?}"), d)),
    );
    if let Some((key, d)) = cadences
        .iter()
        .filter(|(_, d)| d.0 >= h.forget_after.0)
        .max_by_key(|(_, d)| d.0)
    {
        p.push(problem(
            "health.forget_after",
            format!(
                "{} must be longer than {key} ({d}{}): a device would be forgotten before it is offline",
                h.forget_after,
                if key == "health.silence" { ", the default when not set" } else { "" }
            ),
        ));
    }
}
