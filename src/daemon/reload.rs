//! What a reload (SIGHUP) applies live, listed once: [`Live`]. Every other section that changed
//! in the file is logged as needing a restart and keeps its running value.

use crate::config::Config;

/// A config section a reload applies without a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// `alerts.actions`: sent to the committer.
    Alerts,
    /// `[[modbus.devices]]`: the Modbus input is restarted with the new list.
    Modbus,
    /// `[health]`: the device cadences.
    Health,
    /// `[care]`: the watched residents.
    Care,
    /// `[[mqtt.sources]]`: the vendor mappings (the rest of `[mqtt]` needs a restart).
    MqttSources,
    /// `[occupancy]`: capacity, long and maximum stays (vehicles inside); sent to the committer.
    Occupancy,
}

impl Live {
    /// Every live section.
    pub const ALL: [Live; 6] = [
        Live::Alerts,
        Live::Modbus,
        Live::Health,
        Live::Care,
        Live::MqttSources,
        Live::Occupancy,
    ];

    /// Its key path in the file.
    pub fn key(self) -> &'static str {
        match self {
            Live::Alerts => "alerts",
            Live::Modbus => "modbus",
            Live::Health => "health",
            Live::Care => "care",
            Live::MqttSources => "mqtt.sources",
            Live::Occupancy => "occupancy",
        }
    }

    /// Whether the section differs between `a` and `b`.
    pub fn changed(self, a: &Config, b: &Config) -> bool {
        fn differs<T: serde::Serialize>(a: &T, b: &T) -> bool {
            // Sections without PartialEq compare through their TOML form.
            toml::Value::try_from(a).ok() != toml::Value::try_from(b).ok()
        }
        match self {
            Live::Alerts => a.alerts.actions != b.alerts.actions,
            Live::Modbus => differs(&a.modbus, &b.modbus),
            Live::Health => differs(&a.health, &b.health),
            Live::Care => a.care != b.care,
            Live::MqttSources => a.mqtt.sources != b.mqtt.sources,
            Live::Occupancy => differs(&a.occupancy, &b.occupancy),
        }
    }

    /// Take the section from `new` into `running`.
    pub fn adopt(self, running: &mut Config, new: &Config) {
        match self {
            Live::Alerts => running.alerts = new.alerts.clone(),
            Live::Modbus => running.modbus = new.modbus.clone(),
            Live::Health => running.health = new.health.clone(),
            Live::Care => running.care = new.care.clone(),
            Live::MqttSources => running.mqtt.sources = new.mqtt.sources.clone(),
            Live::Occupancy => running.occupancy = new.occupancy.clone(),
        }
    }
}

/// Top-level config sections that differ between `a` and `b` outside the [`Live`] ones (a
/// restart applies them).
pub fn restart_sections(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(toml::Value::Table(mut a)), Ok(toml::Value::Table(mut b))) =
        (toml::Value::try_from(a), toml::Value::try_from(b))
    else {
        return vec!["(config could not be compared)".into()];
    };
    for t in [&mut a, &mut b] {
        for live in Live::ALL {
            match live.key().split_once('.') {
                None => {
                    t.remove(live.key());
                }
                Some((section, key)) => {
                    if let Some(toml::Value::Table(m)) = t.get_mut(section) {
                        m.remove(key);
                    }
                }
            }
        }
    }
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        crate::config::load_str(&format!("[gateway]\nid = \"gw-1\"\n{extra}")).unwrap()
    }

    #[test]
    fn live_sections_are_adopted_and_the_rest_named_for_a_restart() {
        let a = cfg("");
        let b = cfg("[alerts]\nactions = [\"loitering\"]\n[health]\nsilence = \"1h\"\n[upstream]\ntopic_prefix = \"x/y\"\n[occupancy]\ncapacity = 12\n");
        let changed: Vec<_> = Live::ALL
            .into_iter()
            .filter(|l| l.changed(&a, &b))
            .collect();
        assert_eq!(changed, [Live::Alerts, Live::Health, Live::Occupancy]);
        assert_eq!(restart_sections(&a, &b), ["upstream"]);
        let mut running = a.clone();
        for l in changed {
            l.adopt(&mut running, &b);
        }
        assert!(Live::ALL.into_iter().all(|l| !l.changed(&running, &b)));
        assert_eq!(restart_sections(&running, &b), ["upstream"]);
    }

    #[test]
    fn the_rest_of_mqtt_needs_a_restart_but_its_sources_do_not() {
        let a = cfg("");
        let b = cfg("[mqtt]\nkeep_alive = \"45s\"\n");
        assert_eq!(restart_sections(&a, &b), ["mqtt"]);
        assert!(!Live::MqttSources.changed(&a, &b));
    }
}
