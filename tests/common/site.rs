//! A whole site: two brokers, the collector, the daemon.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{Client, Connection, Event as MqttEvent, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::*;

/// Lines of the daemon log printed when a test fails.
const LOG_TAIL_LINES: usize = 300;

/// A device broker, a district broker, the upstream collector and the daemon, in one tempdir.
/// On a failing test, Drop prints the daemon and broker logs and keeps the directory.
pub struct Site {
    pub name: String,
    daemon: Option<Daemon>,
    pub upstream: Upstream,
    pub device: Mosquitto,
    pub district: Mosquitto,
    pub root: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    publishers: usize,
    dir: Option<tempfile::TempDir>,
}

impl Site {
    /// Starts both brokers (the district one persistent when asked), the collector, seeds the
    /// daemon's device session, writes the config and starts the daemon; returns once the
    /// daemon reports upstream (status `online` or a heartbeat).
    pub fn start(name: &str, persistent_district: bool) -> Site {
        Site::start_with(name, persistent_district, |text| text)
    }

    /// Starts the daemon (same config and data dir as before).
    pub fn start_daemon(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        self.daemon = Some(Daemon::start(&self.config, &self.log));
    }

    /// Waits until the daemon said something upstream (status online or a heartbeat).
    pub fn wait_ready(&mut self) {
        let ready = wait_until(Duration::from_secs(20), || {
            if let Some(d) = self.daemon.as_mut() {
                if let Some(status) = d.try_wait() {
                    panic!("daemon exited during start-up: {status}");
                }
            }
            self.upstream.latest_status().as_deref() == Some("online")
                || self.upstream.latest_heartbeat().is_some()
        });
        assert!(
            ready,
            "daemon published neither status online nor a heartbeat within 20 s\n{}",
            self.upstream.dump()
        );
    }

    /// SIGKILL the daemon.
    pub fn kill9_daemon(&mut self) {
        let mut d = self.daemon.take().expect("daemon running");
        d.kill9();
    }

    /// SIGTERM the daemon: its exit status and how long it took to exit.
    pub fn term_daemon(&mut self) -> (ExitStatus, Duration) {
        let mut d = self.daemon.take().expect("daemon running");
        d.term()
    }

    /// A new publisher on the device broker.
    pub fn publisher(&mut self) -> Publisher {
        self.publishers += 1;
        Publisher::connect(
            self.device.port,
            &format!("pub-{}-{}", self.name, self.publishers),
        )
    }

    /// `state` of the retained status message, read by a fresh client.
    pub fn retained_status(&self) -> Option<String> {
        let topic = format!("{PREFIX}/status");
        fetch_retained(self.district.port, &topic, Duration::from_secs(3))
            .and_then(|m| m.json()["state"].as_str().map(str::to_string))
    }

    /// Waits until the retained status is `state`.
    pub fn assert_retained_status(&self, state: &str, timeout: Duration) {
        let mut last = None;
        let ok = wait_until(timeout, || {
            last = self.retained_status();
            last.as_deref() == Some(state)
        });
        assert!(ok, "retained status is {last:?}, expected {state:?}");
    }

    /// Waits until the platform view (highest rev per window) equals `expected`, checks it stays
    /// so for a moment, and checks the summaries against the contract.
    pub fn assert_windows(&self, expected: &WindowTotals, timeout: Duration) {
        let ok = wait_until(timeout, || self.upstream.window_totals() == *expected);
        let actual = self.upstream.window_totals();
        assert!(
            ok,
            "upstream windows differ from the events sent (after {timeout:?}):\n{}\n\
             totals:\n{}\n{}",
            map_diff(expected, &actual),
            map_diff(&collapse(expected), &collapse(&actual)),
            self.upstream.dump()
        );
        // Nothing more may change it: no spurious re-issue or extra window.
        thread::sleep(Duration::from_millis(2_500));
        let later = self.upstream.window_totals();
        assert!(
            later == *expected,
            "upstream windows changed after matching:\n{}",
            map_diff(expected, &later)
        );
        let problems = self.upstream.summary_problems();
        assert!(
            problems.is_empty(),
            "summary contract problems:\n{}",
            problems.join("\n")
        );
    }

    /// Waits for a heartbeat that satisfies `pred`; returns it.
    pub fn wait_heartbeat(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let ok = wait_until(timeout, || {
            self.upstream.latest_heartbeat().is_some_and(|hb| pred(&hb))
        });
        let latest = self.upstream.latest_heartbeat();
        assert!(
            ok,
            "no heartbeat with {what} within {timeout:?}; latest: {latest:?}"
        );
        latest.expect("heartbeat present")
    }

    /// No upstream payload carries any subject marker.
    pub fn assert_no_subject_leaks(&self) {
        let leaks = self.upstream.subject_leaks(SUBJECT_MARKERS);
        assert!(
            leaks.is_empty(),
            "subjects leaked upstream ({} messages):\n{}",
            leaks.len(),
            leaks
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            if d.try_wait().is_none() {
                d.kill9();
            }
        }
        if thread::panicking() {
            let kept = self.dir.take().map(tempfile::TempDir::keep);
            eprintln!(
                "===== site {}: daemon log ({}), last {LOG_TAIL_LINES} lines =====\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, LOG_TAIL_LINES)
            );
            for (label, broker) in [("device", &self.device), ("district", &self.district)] {
                eprintln!(
                    "===== site {}: {label} broker log (port {}) =====\n{}",
                    self.name,
                    broker.port,
                    tail(&broker.log_path(), 40)
                );
            }
            let unique: BTreeSet<String> =
                self.upstream.on("summary").iter().map(Msg::text).collect();
            eprintln!(
                "===== site {}: {} distinct summaries received =====\n{}",
                self.name,
                unique.len(),
                self.upstream.dump()
            );
            if let Some(path) = kept {
                eprintln!(
                    "===== site {}: files kept in {} =====",
                    self.name,
                    path.display()
                );
            }
        }
    }
}

impl Site {
    /// [`Site::start`] with `edit` applied to the config text before the daemon first starts
    /// (e.g. to replace the `[status]` table that [`config_text`] writes).
    pub fn start_with(
        name: &str,
        persistent_district: bool,
        edit: impl FnOnce(String) -> String,
    ) -> Site {
        let dir = tempfile::Builder::new()
            .prefix(&format!("zhian-e2e-{name}-"))
            .tempdir()
            .expect("create tempdir");
        let root = dir.path().to_path_buf();
        let device = Mosquitto::start(&root.join("device-broker"), free_port(), false);
        let district = Mosquitto::start(
            &root.join("district-broker"),
            free_port(),
            persistent_district,
        );
        let upstream = Upstream::start(district.port, &format!("collector-{name}"));
        // The daemon's persistent session exists before it first connects, so nothing sent
        // while it starts up is lost, whatever its start-up order.
        seed_session(device.port, DEVICE_CLIENT_ID, DEVICE_FILTER);
        let config = root.join("gateway.toml");
        let text = edit(config_text(
            &root.join("data"),
            device.port,
            district.port,
            "",
        ));
        fs::write(&config, text).expect("write config");
        let log = root.join("daemon.log");
        let mut site = Site {
            name: name.to_string(),
            daemon: None,
            upstream,
            device,
            district,
            root,
            config,
            log,
            publishers: 0,
            dir: Some(dir),
        };
        site.start_daemon();
        site.wait_ready();
        site
    }

    /// Exit status if the daemon has exited (None while it runs or when it was never started).
    pub fn daemon_exited(&mut self) -> Option<ExitStatus> {
        self.daemon.as_mut().and_then(Daemon::try_wait)
    }
}
