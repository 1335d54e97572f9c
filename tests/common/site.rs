//! A whole site in one scratch dir, built the way a test asks for it (rust-analyzer's
//! `Project::with_fixture(..).server()` is the model):
//!
//! ```ignore
//! let mut site = Site::build("outage")
//!     .persistent_district()
//!     .status()
//!     .config(|c| c.aggregate.window = Dur::secs(60))
//!     .start();
//! ```
//!
//! What it starts, each optional: the site (device) broker and the district broker (real
//! mosquitto processes), the collector subscribed upstream, the gateway's device session seeded
//! on the site broker, and the gateway daemon with its typed [`Config`] written to a file (never
//! patched as text). `start` returns once the site is [`Ready`]. On a failing test, Drop prints
//! every gateway's and broker's log and what arrived upstream, and keeps the directory.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use zhian_gateway::config::Config;

use super::*;

/// Lines of each daemon log printed when a test fails.
const LOG_TAIL_LINES: usize = 300;

/// A running site: its brokers, collector and gateways (the first is the one the builder
/// configured; [`Site::add_gateway`] adds more on the same brokers).
pub struct Site {
    pub name: String,
    pub root: PathBuf,
    pub(super) device: Option<Mosquitto>,
    pub(super) district: Option<Mosquitto>,
    pub(super) upstream: Option<Upstream>,
    pub(super) gateways: Vec<Gateway>,
    pub(super) base: Config,
    pub(super) env: Vec<(String, String)>,
    pub(super) seed: bool,
    pub(super) publishers: AtomicUsize,
    pub(super) mounts: Vec<Tmpfs>,
    pub(super) show: Vec<String>,
    pub(super) dir: Option<tempfile::TempDir>,
}

impl Site {
    /// The site broker.
    pub fn device(&self) -> &Mosquitto {
        self.device.as_ref().expect("this site has no site broker")
    }

    pub fn device_mut(&mut self) -> &mut Mosquitto {
        self.device.as_mut().expect("this site has no site broker")
    }

    /// The district broker.
    pub fn district(&self) -> &Mosquitto {
        self.district
            .as_ref()
            .expect("this site has no district broker")
    }

    pub fn district_mut(&mut self) -> &mut Mosquitto {
        self.district
            .as_mut()
            .expect("this site has no district broker")
    }

    /// The collector: everything the district broker received under `zhian/district/#`.
    pub fn upstream(&self) -> &Upstream {
        self.upstream.as_ref().expect("this site has no collector")
    }

    /// The first gateway (the one the builder configured).
    pub fn gw(&self) -> &Gateway {
        &self.gateways[0]
    }

    pub fn gw_mut(&mut self) -> &mut Gateway {
        &mut self.gateways[0]
    }

    /// Gateway `i` (0 is the first).
    pub fn gateway(&self, i: usize) -> &Gateway {
        &self.gateways[i]
    }

    pub fn gateway_mut(&mut self, i: usize) -> &mut Gateway {
        &mut self.gateways[i]
    }

    /// Makes the persistent session of a gateway with config `c` on the site broker (when the
    /// site starts that broker and `c` connects to it), so that nothing sent while the daemon
    /// starts up is lost, whatever its start-up order.
    pub(super) fn seed(&self, c: &Config) {
        let Some(device) = &self.device else { return };
        let device_url = format!("mqtt://127.0.0.1:{}", device.port);
        if self.seed && c.mqtt.enabled && c.mqtt.url == device_url {
            let filters = zhian_gateway::core::mapping::subscriptions(&c.mqtt.topics, &c.sources());
            let creds = c.mqtt.username.as_deref().zip(c.mqtt.password.as_ref());
            let creds = creds.map(|(u, p)| (u, p.0.as_str()));
            seed_session(device.port, &c.mqtt_client_id(), &filters, creds);
        }
    }

    /// Another gateway on the same brokers: the builder's config with its own data dir
    /// (`<root>/<name>`) and, when the site has a page, its own status port, then `edit`.
    /// Its session seeded, written and started (not waited for); returns its index.
    pub fn add_gateway(&mut self, name: &str, edit: impl FnOnce(&mut Config)) -> usize {
        let mut c = self.base.clone();
        c.gateway.data_dir = self.root.join(name);
        if c.status.enabled {
            enable_status(&mut c, free_port());
        }
        edit(&mut c);
        self.seed(&c);
        let gw = Gateway::new(name, c, &self.root, self.env.clone());
        gw.start();
        self.gateways.push(gw);
        self.gateways.len() - 1
    }

    /// Starts the first gateway's daemon (same config and data dir as before).
    pub fn start_daemon(&self) {
        self.gw().start();
    }

    /// SIGKILL the first gateway's daemon.
    pub fn kill9_daemon(&self) {
        self.gw().kill9();
    }

    /// SIGTERM the first gateway's daemon: its exit status and how long it took to exit.
    pub fn term_daemon(&self) -> (ExitStatus, Duration) {
        self.gw().term()
    }

    /// Exit status if the first daemon has exited (None while it runs or was never started).
    pub fn daemon_exited(&self) -> Option<ExitStatus> {
        self.gw().exited()
    }

    /// The first gateway's status port (panics when it has no page).
    pub fn status_port(&self) -> u16 {
        self.gw().status_port()
    }

    /// The first gateway's `/api/status`.
    pub fn status(&self) -> Option<Value> {
        self.gw().status()
    }

    /// Waits for a first-gateway `/api/status` that satisfies `pred`; returns it.
    pub fn wait_for_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.gw().wait_for_status(what, pred)
    }

    /// The first gateway's log file.
    pub fn log_path(&self) -> PathBuf {
        self.gw().log.clone()
    }

    /// The first gateway's data dir.
    pub fn data_dir(&self) -> PathBuf {
        self.gw().data_dir().to_path_buf()
    }

    /// The first gateway's config file.
    pub fn config_path(&self) -> PathBuf {
        self.gw().config_path.clone()
    }

    /// Rewrites the libfaketime clock file ([`SiteBuilder::faketime`]), e.g. `"+0"`, `"-2h"`.
    pub fn set_clock(&self, clock: &str) {
        fs::write(self.root.join("faketime"), format!("{clock}\n")).expect("write faketime");
    }

    /// Waits until the first gateway is `ready` (failing the test if its daemon exits).
    pub fn wait_ready(&self, ready: Ready) {
        let what = format!("the gateway to be ready ({ready:?})");
        let mut last: Option<String> = None;
        let ok = wait_until(DEADLINE, || {
            self.gateways[0].assert_alive(&what);
            let (ok, seen) = match ready {
                Ready::Started => (true, None),
                Ready::Status => {
                    let s = self.status();
                    (s.is_some(), None)
                }
                Ready::SiteLink => {
                    let s = self.status();
                    let ok = s
                        .as_ref()
                        .is_some_and(|s| s["links"]["site"]["connected"] == true);
                    (ok, s.map(|s| s["links"].to_string()))
                }
                Ready::Healthz => {
                    let r = http(self.status_port(), "GET", "/healthz", None);
                    let ok = r.as_ref().is_ok_and(|r| r.status == 200);
                    (ok, Some(format!("{:?}", r.map(|r| (r.status, r.text())))))
                }
                Ready::Listening => {
                    let r = http(self.status_port(), "GET", "/healthz", None);
                    (r.is_ok(), None)
                }
                Ready::Upstream => {
                    let up = self.upstream();
                    let ok = up.latest_status().as_deref() == Some("online")
                        || up.latest_heartbeat().is_some();
                    (ok, None)
                }
            };
            last = seen;
            ok
        });
        assert!(
            ok,
            "still waiting after {DEADLINE:?} for {what}; last seen: {last:?}\nlog:\n{}",
            self.gw().tail(40)
        );
    }

    /// A new QoS 1 publisher on the site broker.
    pub fn publisher(&self) -> Publisher {
        let n = self.publishers.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("pub-{}-{n}", self.name);
        Publisher::connect(self.device().port, &id)
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for gw in &self.gateways {
            if gw.running() {
                gw.kill9();
            }
        }
        // Unmounted before the scratch dir is removed.
        self.mounts.clear();
        if !thread::panicking() {
            return;
        }
        let kept = self.dir.take().map(tempfile::TempDir::keep);
        for gw in &self.gateways {
            eprintln!(
                "===== site {}: gateway {} log ({}), last {LOG_TAIL_LINES} lines =====\n{}",
                self.name,
                gw.name,
                gw.log.display(),
                gw.tail(LOG_TAIL_LINES)
            );
        }
        for (label, broker) in [("device", &self.device), ("district", &self.district)] {
            if let Some(b) = broker {
                eprintln!(
                    "===== site {}: {label} broker log (port {}) =====\n{}",
                    self.name,
                    b.port,
                    tail(&b.log_path(), 40)
                );
            }
        }
        for file in &self.show {
            let path = self.root.join(file);
            if path.exists() {
                eprintln!(
                    "===== site {}: {file} =====\n{}",
                    self.name,
                    tail(&path, 40)
                );
            }
        }
        if let Some(up) = &self.upstream {
            let unique: BTreeSet<String> = up.on("summary").iter().map(Msg::text).collect();
            eprintln!(
                "===== site {}: {} distinct summaries received =====\n{}",
                self.name,
                unique.len(),
                up.dump()
            );
        }
        if let Some(path) = kept {
            eprintln!(
                "===== site {}: files kept in {} =====",
                self.name,
                path.display()
            );
        }
    }
}
