//! Configuration: built-in defaults < TOML file < `ZHIAN_<SECTION>__<KEY>` environment.
//!
//! Loading never binds a port or opens the store. Every problem is reported as a
//! [`Problem`] naming its key path (`upstream.url: ...`), so `check-config` and `run`
//! can print one line per problem and exit 78 (EX_CONFIG) before anything starts.
//!
//! Here: [`Config`] (one field per section) and [`Problem`]. Beside it, one file per job:
//! `values.rs` (durations, byte sizes, secrets, broker URLs, UTC offsets), `sections.rs` (the
//! smaller sections' types and defaults), `care.rs`, `health.rs`, `modbus.rs` (a section each:
//! types, defaults and validation together), `sources.rs` (`[[mqtt.sources]]`, compiled into
//! core mapping rules), `load.rs` (layering, secrets, error translation, check-config's notes),
//! `validate.rs` (the rules serde cannot check, across sections), `tests.rs`. What a start needs
//! from the machine (dirs, key dir, files) is `crate::preflight`, above both config and store.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Exit code for configuration errors (sysexits.h EX_CONFIG).
pub const EX_CONFIG: i32 = 78;

/// Default config path used when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/zhian-gateway/gateway.toml";

mod care;
mod health;
mod load;
mod modbus;
mod sections;
pub mod sources;
mod validate;

pub use care::*;
pub use health::*;
pub use load::*;
pub use modbus::*;
pub use sections::*;
pub use sources::{FieldCfg, SourceCfg};
pub use validate::*;
/// The value types, [`Problem`] and the shared helpers live in `zhian-common` (the district
/// receiver uses them too); re-exported so every `crate::config::X` path stays.
pub use zhian_common::config::*;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub gateway: Gateway,
    pub broker: Broker,
    pub mqtt: Mqtt,
    pub dedup: Dedup,
    pub aggregate: Aggregate,
    pub store: Store,
    pub upstream: Upstream,
    pub status: Status,
    pub privacy: Privacy,
    pub alerts: Alerts,
    pub modbus: Modbus,
    pub clock: Clock,
    pub health: Health,
    pub care: Care,
    pub fleet: Fleet,
    /// `[occupancy]`: vehicles inside; `None` (off) unless the section is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub occupancy: Option<Occupancy>,
}

impl Config {
    /// Client id on the device broker.
    pub fn mqtt_client_id(&self) -> String {
        self.mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("zhian-{}", self.gateway.id))
    }

    /// Client id on the district broker.
    pub fn upstream_client_id(&self) -> String {
        self.upstream
            .client_id
            .clone()
            .unwrap_or_else(|| self.gateway.id.clone())
    }

    /// The vendor sources, compiled (a config that passed validation compiles whole).
    pub fn sources(&self) -> Vec<crate::core::mapping::Source> {
        sources::compile(&self.mqtt.sources, &mut Vec::new())
    }

    /// The site's UTC offset in seconds (`status.timezone`, parsed when the config was read).
    pub fn site_offset_s(&self) -> i32 {
        self.status.timezone.seconds()
    }

    /// The effective config as TOML, secrets redacted (for `check-config`).
    pub fn to_redacted_toml(&self) -> String {
        let text =
            toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        crate::logfmt::redact_url(&text)
    }
}

#[cfg(test)]
mod tests;
