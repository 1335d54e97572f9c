//! Fleet configuration on the box (contract: "Fleet configuration"): signed changes from the
//! district, overlaid on the installer's file, applied, watched on probation, and rolled back
//! by the box itself when a health rule fails.
//!
//! - `rules.rs`: the decisions, pure: which keys a fragment may set, replay and redelivery,
//!   the probation's health rules.
//! - `task.rs`: the fleet link, one task: its own MQTT connection to the district broker
//!   (client id `{upstream client id}-fleet`, clean session), subscribed to `config/set` and
//!   `diag/request`; it checks, records, asks the daemon to apply ([`Apply`]), watches the
//!   probation, and publishes `config/state` and diagnostic replies.
//! - `log_tail.rs`: the last 200 log lines, for `fleet diag`.
//! - `push.rs` (feature `district`): `fleet push` and `fleet diag`, the district's side.
//!
//! On disk: `<data_dir>/fleet.json` ([`FleetState`], JSON), written through
//! [`crate::durable_file`] (temporary file, fsync, rename, directory fsync) before anything it
//! records takes effect: a change is recorded as on trial before it is applied, and as rolled
//! back before the old config is applied again. So after a power cut or `kill -9` the next
//! start runs the file plus the recorded overlay (the trial's, else the applied one's) and
//! finishes the probation, or rolls back; never a half-applied change.
//!
//! The effective config is defaults < the installer's file < the overlay < `ZHIAN_*`
//! environment. Each change carries the whole district overlay: a key left out of the newest
//! fragment comes from the installer's file again (docs/fleet.md).

pub mod log_tail;
#[cfg(feature = "district")]
pub mod push;
pub mod rules;
mod task;

pub use task::{Applied, Apply, FleetTask};

use crate::config::{self, Config, Problem};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zhian_proto::ConfigPhase;

/// The state file's name in the data dir.
pub const FILE_NAME: &str = "fleet.json";

/// Starts on one trial (the restart a change asked for counts as one) after which the change
/// is rolled back: a change that crashes the daemon cannot keep it in a restart loop.
pub const MAX_TRIAL_STARTS: u32 = 3;

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A signed change the box took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub serial: u64,
    /// The TOML overlay, as signed.
    pub fragment: String,
    /// When the box took it (ms, wall clock).
    pub at_ms: i64,
}

impl Change {
    /// The fragment's SHA-256 (hex): with the serial, what tells a redelivery from a replay.
    pub fn sha(&self) -> String {
        sha256_hex(self.fragment.as_bytes())
    }
}

/// A change on probation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub change: Change,
    /// Daemon starts since the change was taken (see [`MAX_TRIAL_STARTS`]).
    pub starts: u32,
}

/// A change refused or rolled back, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub serial: u64,
    pub reason: String,
    pub at_ms: i64,
    /// The fragment's SHA-256, so its retained message delivered again is recognised.
    pub sha: String,
}

/// The last `config/state` report: republished (retained) at each connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub serial: u64,
    pub state: ConfigPhase,
    pub reason: Option<String>,
    pub config_hash: String,
    pub at_ms: i64,
}

/// `fleet.json`: what the box took from the fleet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct FleetState {
    /// The change in force (it passed probation).
    pub applied: Option<Change>,
    /// The change on probation, if any: it runs instead of `applied` until judged.
    pub trial: Option<Trial>,
    /// The highest serial taken (applied, on trial or rolled back): a change must be above it.
    pub last_serial: u64,
    pub rolled_back: Option<Outcome>,
    pub rejected: Option<Outcome>,
    pub report: Option<Report>,
}

impl FleetState {
    /// Read `<data_dir>/fleet.json`; none yet is the empty state. A file that cannot be read
    /// or parsed is an error (the caller runs on the installer's file alone and says so).
    pub fn load(data_dir: &Path) -> Result<FleetState, String> {
        let path = data_dir.join(FILE_NAME);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FleetState::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write it durably (before what it records takes effect).
    pub fn save(&self, data_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("fleet state serializes");
        crate::durable_file::write(&data_dir.join(FILE_NAME), &bytes)
    }

    /// The overlay the config runs with: the trial's, else the applied change's.
    pub fn overlay(&self) -> Option<&Change> {
        self.trial
            .as_ref()
            .map(|t| &t.change)
            .or(self.applied.as_ref())
    }
}

/// Where the daemon's config came from: the file (and whether `--config` named it).
#[derive(Debug, Clone)]
pub struct Origin {
    pub path: PathBuf,
    pub explicit: bool,
}

/// The fleet overlay a config runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub serial: u64,
    /// On probation (not yet `applied`).
    pub trial: bool,
    /// The key paths it sets ([`rules::overlay_keys`]).
    pub keys: Vec<String>,
}

/// A config as the daemon runs it: the installer's file with the fleet overlay.
#[derive(Debug, Clone)]
pub struct Effective {
    pub cfg: Config,
    pub overlay: Option<Overlay>,
    /// Why a recorded overlay is not in `cfg` (a state file that cannot be read, or an overlay
    /// this file no longer accepts); the daemon logs it, and rolls a trial back.
    pub problem: Option<String>,
}

impl From<Config> for Effective {
    /// A config with no overlay (tests, the demo).
    fn from(cfg: Config) -> Self {
        Effective {
            cfg,
            overlay: None,
            problem: None,
        }
    }
}

/// The config of `origin`'s file with the overlay `fleet.json` records (none when `fleet.trust`
/// is unset). Errors: the file's own problems, as `config::load` names them.
pub fn load_effective(origin: &Origin) -> Result<Effective, Vec<Problem>> {
    let base = config::load(&origin.path, origin.explicit)?;
    // Remote configuration runs over the district link: without either, no overlay.
    if base.fleet.trust.is_none() || !base.upstream.enabled {
        return Ok(Effective {
            cfg: base,
            overlay: None,
            problem: None,
        });
    }
    let state = match FleetState::load(&base.gateway.data_dir) {
        Ok(s) => s,
        Err(e) => {
            return Ok(Effective {
                cfg: base,
                overlay: None,
                problem: Some(format!(
                    "fleet state unreadable, running on the file alone: {e}"
                )),
            })
        }
    };
    let Some(change) = state.overlay() else {
        return Ok(Effective {
            cfg: base,
            overlay: None,
            problem: None,
        });
    };
    match with_overlay(origin, &change.fragment) {
        Ok(cfg) => Ok(Effective {
            cfg,
            overlay: Some(Overlay {
                serial: change.serial,
                trial: state.trial.is_some(),
                keys: rules::overlay_keys(&change.fragment),
            }),
            problem: None,
        }),
        Err(problems) => Ok(Effective {
            cfg: base,
            overlay: None,
            problem: Some(format!(
                "fleet serial {} no longer loads with {}: {}; running on the file alone",
                change.serial,
                origin.path.display(),
                problems
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }),
    }
}

/// At each start of `run`, before anything is bound: a change on trial counts this start
/// (recorded), and one that saw more than [`MAX_TRIAL_STARTS`] starts is rolled back (recorded:
/// the config loaded next has no trial). A change that kills the daemon before its fleet link
/// runs (a port it cannot bind, a crash) so cannot keep it down. Nothing to do without
/// `fleet.trust`, a readable file or a trial. Returns whether it rolled the trial back (the
/// config must be read again).
pub fn count_start(origin: &Origin) -> bool {
    let Some((dir, mut state)) = trial_state(origin) else {
        return false;
    };
    let Some(trial) = state.trial.as_mut() else {
        return false;
    };
    trial.starts += 1;
    let (serial, starts) = (trial.change.serial, trial.starts);
    if starts > MAX_TRIAL_STARTS {
        roll_back_recorded(
            origin,
            &dir,
            &mut state,
            format!("the daemon started {starts} times during probation"),
        );
        return true;
    }
    if let Err(e) = state.save(&dir) {
        tracing::error!(error = %e, serial, "fleet: cannot record this start of the trial");
    }
    false
}

/// The daemon could not start on a change on trial (`why`): record the rollback, so the next
/// start runs the config before it. Returns whether there was a trial to roll back.
pub fn roll_back_failed_start(origin: &Origin, why: &str) -> bool {
    let Some((dir, mut state)) = trial_state(origin) else {
        return false;
    };
    if state.trial.is_none() {
        return false;
    }
    roll_back_recorded(
        origin,
        &dir,
        &mut state,
        format!("the daemon could not start on it: {why}"),
    );
    true
}

/// The data dir and the state, when remote configuration is on.
fn trial_state(origin: &Origin) -> Option<(PathBuf, FleetState)> {
    let base = config::load(&origin.path, origin.explicit).ok()?;
    if base.fleet.trust.is_none() || !base.upstream.enabled {
        return None;
    }
    let dir = base.gateway.data_dir.clone();
    let state = FleetState::load(&dir).ok()?;
    Some((dir, state))
}

/// Take the trial off `state` as rolled back for `reason` and save it (the report goes out at
/// the fleet link's next connection).
fn roll_back_recorded(origin: &Origin, dir: &Path, state: &mut FleetState, reason: String) {
    let Some(trial) = state.trial.take() else {
        return;
    };
    let now = crate::clock::now_ms();
    tracing::warn!(serial = trial.change.serial, reason = %reason, "fleet: rolling back to the config before the change");
    state.rolled_back = Some(Outcome {
        serial: trial.change.serial,
        reason: reason.clone(),
        at_ms: now,
        sha: trial.change.sha(),
    });
    state.report = Some(Report {
        serial: trial.change.serial,
        state: ConfigPhase::RolledBack,
        reason: Some(reason),
        config_hash: config_hash(origin, state.applied.as_ref().map(|c| c.fragment.as_str())),
        at_ms: now,
    });
    if let Err(e) = state.save(dir) {
        tracing::error!(error = %e, "fleet: cannot record the rollback");
    }
}

/// The file with `fragment` overlaid, validated as `check-config` validates (the config rules,
/// then what a start needs: data dir, files). The key rules are [`rules::refuse_keys`]'.
pub fn with_overlay(origin: &Origin, fragment: &str) -> Result<Config, Vec<Problem>> {
    let cfg = config::load_layers(&origin.path, origin.explicit, None, Some(fragment))?;
    let p = crate::preflight::check_start_needs(&cfg);
    if p.is_empty() {
        Ok(cfg)
    } else {
        Err(p)
    }
}

/// `config_hash`: SHA-256 (hex) of the installer's file bytes, a NUL, and the overlay in force.
pub fn config_hash(origin: &Origin, overlay: Option<&str>) -> String {
    let mut b = std::fs::read(&origin.path).unwrap_or_default();
    b.push(0);
    b.extend_from_slice(overlay.unwrap_or("").as_bytes());
    sha256_hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config file with `[fleet] trust` (when `trusted`) in a fresh dir; its origin.
    fn site(name: &str, trusted: bool) -> (PathBuf, Origin) {
        let dir = std::env::temp_dir().join(format!("fleet-mod-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let (_, publ) = zhian_common::fleet_key::keygen(&dir.join("keys")).unwrap();
        let fleet = if trusted {
            format!("[fleet]\ntrust = \"{}\"\n", publ.display())
        } else {
            String::new()
        };
        let path = dir.join("gateway.toml");
        std::fs::write(
            &path,
            format!(
                "[gateway]\nid = \"gw-1\"\ndata_dir = \"{}\"\n[alerts]\nactions = [\"intrusion\"]\n{fleet}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        (
            dir,
            Origin {
                path,
                explicit: true,
            },
        )
    }

    fn record(dir: &Path, state: &FleetState) {
        state.save(&dir.join("data")).unwrap();
    }

    fn applied(fragment: &str) -> FleetState {
        FleetState {
            applied: Some(Change {
                serial: 7,
                fragment: fragment.into(),
                at_ms: 1,
            }),
            last_serial: 7,
            ..FleetState::default()
        }
    }

    #[test]
    fn the_recorded_overlay_is_laid_over_the_file_and_named() {
        let (dir, origin) = site("overlay", true);
        let e = load_effective(&origin).unwrap();
        assert!(e.overlay.is_none() && e.problem.is_none());
        record(&dir, &applied("[alerts]\nactions = [\"loitering\"]\n"));
        let e = load_effective(&origin).unwrap();
        assert_eq!(e.cfg.alerts.actions, ["loitering"]);
        assert_eq!(
            e.overlay,
            Some(Overlay {
                serial: 7,
                trial: false,
                keys: vec!["alerts.actions".into()],
            })
        );
        // A trial runs instead of the applied change.
        let mut st = applied("[alerts]\nactions = [\"loitering\"]\n");
        st.trial = Some(Trial {
            change: Change {
                serial: 8,
                fragment: "[alerts]\nactions = []\n".into(),
                at_ms: 2,
            },
            starts: 1,
        });
        record(&dir, &st);
        let e = load_effective(&origin).unwrap();
        assert!(e.cfg.alerts.actions.is_empty());
        assert_eq!(e.overlay.map(|o| (o.serial, o.trial)), Some((8, true)));
        let back = FleetState::load(&dir.join("data")).unwrap();
        assert_eq!(back, st);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_trust_the_overlay_is_not_used() {
        let (dir, origin) = site("untrusted", false);
        record(&dir, &applied("[alerts]\nactions = [\"loitering\"]\n"));
        let e = load_effective(&origin).unwrap();
        assert_eq!(e.cfg.alerts.actions, ["intrusion"]);
        assert!(e.overlay.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_garbled_state_or_an_overlay_the_file_refuses_runs_the_file_alone_and_says_why() {
        let (dir, origin) = site("garbled", true);
        std::fs::write(dir.join("data").join(FILE_NAME), b"{\"applied\": ").unwrap();
        let e = load_effective(&origin).unwrap();
        assert_eq!(e.cfg.alerts.actions, ["intrusion"]);
        assert!(e.problem.unwrap().contains("fleet state unreadable"));
        record(&dir, &applied("[aggregate]\nwindow = \"0s\"\n"));
        let e = load_effective(&origin).unwrap();
        assert!(e.overlay.is_none());
        let why = e.problem.unwrap();
        assert!(
            why.contains("fleet serial 7 no longer loads") && why.contains("aggregate.window"),
            "{why}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
