//! `[health]`: device cadences (a default, per kind, per device), the link grace and the device
//! table bound, its types, defaults and validation; [`Cadence`], the section in the form the
//! device-health lookups want (parsed once, ms).

use super::*;
use crate::core::event::Kind;
use std::collections::HashMap;

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

/// The `[health]` rules in the form lookups want (ms).
#[derive(Debug, Clone)]
pub struct Cadence {
    default_ms: i64,
    kinds: [Option<i64>; 3],
    /// Lower-cased device id -> ms.
    devices: HashMap<String, i64>,
    pub forget_after_ms: i64,
    pub link_grace_ms: i64,
    /// `health.max_devices`.
    pub max_devices: usize,
}

fn kind_slot(k: Kind) -> usize {
    match k {
        Kind::Access => 0,
        Kind::Camera => 1,
        Kind::Vehicle => 2,
    }
}

impl Default for Cadence {
    fn default() -> Self {
        Cadence::new(&Health::default())
    }
}

impl Cadence {
    pub fn new(h: &Health) -> Self {
        let ms = |d: &Dur| d.0.as_millis() as i64;
        let mut kinds = [None; 3];
        for (k, d) in &h.kinds {
            if let Some(k) = Kind::parse(k) {
                kinds[kind_slot(k)] = Some(ms(d));
            }
        }
        Cadence {
            default_ms: ms(&h.silence),
            kinds,
            devices: h
                .devices
                .iter()
                .map(|(k, d)| (k.to_ascii_lowercase(), ms(d)))
                .collect(),
            forget_after_ms: ms(&h.forget_after),
            link_grace_ms: ms(&h.link_grace),
            max_devices: h.max_devices as usize,
        }
    }

    /// How long `device` may be silent before it is offline (ms).
    pub fn silence_ms(&self, kind: Kind, device: &str) -> i64 {
        self.devices
            .get(&device.to_ascii_lowercase())
            .copied()
            .or(self.kinds[kind_slot(kind)])
            .unwrap_or(self.default_ms)
    }

    /// The one "online" rule for an MQTT device last seen at `last_seen_ms` (0: never).
    pub fn online(&self, kind: Kind, device: &str, last_seen_ms: i64, now_ms: i64) -> bool {
        last_seen_ms > 0 && now_ms - last_seen_ms <= self.silence_ms(kind, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cadence_is_per_device_then_per_kind_then_the_default() {
        let mut h = Health::default();
        h.kinds
            .insert("camera".into(), Dur(Duration::from_secs(86_400)));
        h.devices
            .insert("Gate-East".into(), Dur(Duration::from_secs(7_200)));
        let c = Cadence::new(&h);
        assert_eq!(c.silence_ms(Kind::Access, "door-1"), 900_000);
        assert_eq!(c.silence_ms(Kind::Camera, "cam-1"), 86_400_000);
        assert_eq!(c.silence_ms(Kind::Vehicle, "gate-east"), 7_200_000);
        let now = 1_800_000_000_000;
        assert!(c.online(Kind::Camera, "cam-1", now - 3_600_000, now));
        assert!(!c.online(Kind::Access, "door-1", now - 3_600_000, now));
        assert!(!c.online(Kind::Access, "door-1", 0, now), "never seen");
    }
}
