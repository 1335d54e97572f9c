//! One gateway of a site: its typed config (written to its file), its log, and the daemon
//! process when it runs.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use zhian_gateway::config::Config;

use super::*;

/// A gateway: `config` is what its file holds (rewritten by [`Gateway::edit_config`]). Its
/// process is started and stopped through `&self`, so a test can hold the site's collector
/// while it restarts the daemon.
pub struct Gateway {
    pub name: String,
    pub config: Config,
    pub config_path: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    daemon: Mutex<Option<Daemon>>,
}

impl Gateway {
    /// A gateway named `name` whose config file and log go in `dir`; the config is written, the
    /// daemon not started. `env` is set on every start.
    pub fn new(name: &str, config: Config, dir: &Path, env: Vec<(String, String)>) -> Gateway {
        let (config_path, log) = if name == "gateway" {
            (dir.join("gateway.toml"), dir.join("daemon.log"))
        } else {
            (
                dir.join(format!("{name}.toml")),
                dir.join(format!("{name}.log")),
            )
        };
        let gw = Gateway {
            name: name.to_string(),
            config,
            config_path,
            log,
            env,
            daemon: Mutex::new(None),
        };
        gw.write_config();
        gw
    }

    /// Writes [`Gateway::config`] to its file.
    pub fn write_config(&self) {
        write_config(&self.config_path, &self.config);
    }

    /// Changes the config and writes it (a running daemon reads it at its next start or
    /// SIGHUP).
    pub fn edit_config(&mut self, edit: impl FnOnce(&mut Config)) {
        edit(&mut self.config);
        self.write_config();
    }

    /// Starts the daemon (`run --config <file>`).
    pub fn start(&self) {
        self.start_with_env(&[]);
    }

    /// Starts the daemon with `extra` environment besides the gateway's own.
    pub fn start_with_env(&self, extra: &[(&str, &str)]) {
        let mut daemon = self.lock();
        assert!(
            daemon.as_mut().is_none_or(|d| d.try_wait().is_some()),
            "gateway {} already running",
            self.name
        );
        let mut env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        env.extend_from_slice(extra);
        *daemon = Some(Daemon::start_with_env(&self.config_path, &self.log, &env));
    }

    fn lock(&self) -> MutexGuard<'_, Option<Daemon>> {
        self.daemon.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The daemon's process id (panics when it was never started).
    pub fn pid(&self) -> u32 {
        self.lock()
            .as_ref()
            .unwrap_or_else(|| panic!("gateway {} not started", self.name))
            .pid()
    }

    /// Exit status if the daemon has exited (None while it runs or when it was never started).
    pub fn exited(&self) -> Option<ExitStatus> {
        self.lock().as_mut().and_then(Daemon::try_wait)
    }

    /// Whether the daemon runs.
    pub fn running(&self) -> bool {
        self.lock().as_mut().is_some_and(|d| d.try_wait().is_none())
    }

    /// SIGTERM and wait: the exit status and how long the exit took.
    pub fn term(&self) -> (ExitStatus, Duration) {
        let mut d = self
            .lock()
            .take()
            .unwrap_or_else(|| panic!("gateway {} not started", self.name));
        d.term()
    }

    /// SIGKILL and reap.
    pub fn kill9(&self) -> ExitStatus {
        let mut d = self
            .lock()
            .take()
            .unwrap_or_else(|| panic!("gateway {} not started", self.name));
        d.kill9()
    }

    /// Sends `sig` (`"HUP"`, ...) to the daemon.
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.config.gateway.data_dir
    }

    /// The status page's port (panics when the page is off).
    pub fn status_port(&self) -> u16 {
        status_port_of(&self.config)
            .unwrap_or_else(|| panic!("gateway {}: no status page", self.name))
    }

    /// `/api/status` (None while the page does not answer).
    pub fn status(&self) -> Option<Value> {
        api_status(self.status_port())
    }

    /// Waits for an `/api/status` that satisfies `pred` and returns it; fails the test naming
    /// `what` (with the latest status and the log) after [`DEADLINE`].
    pub fn wait_for_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = None;
        let ok = wait_until(DEADLINE, || {
            last = self.status();
            last.as_ref().is_some_and(&pred)
        });
        assert!(
            ok,
            "gateway {}: no status with {what} within {DEADLINE:?}; latest: {last:?}\nlog:\n{}",
            self.name,
            self.tail(40)
        );
        last.expect("status present")
    }

    /// Fails the test (with the log) if the daemon has exited.
    pub fn assert_alive(&self, what: &str) {
        if let Some(status) = self.exited() {
            panic!(
                "gateway {} exited ({status}) while waiting for {what}; log:\n{}",
                self.name,
                self.tail(40)
            );
        }
    }

    /// The daemon log's text.
    pub fn log_text(&self) -> String {
        log_text(&self.log)
    }

    /// The daemon log's last `n` lines.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}
