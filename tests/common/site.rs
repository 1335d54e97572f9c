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

/// When [`SiteBuilder::start`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// As soon as the processes are spawned.
    Started,
    /// Once `/api/status` answers.
    Status,
    /// Once `/api/status` says the site broker link is up.
    SiteLink,
    /// Once `/healthz` answers 200.
    Healthz,
    /// Once the status port answers HTTP at all (a page behind a password, a 503).
    Listening,
    /// Once the collector saw the gateway online (status `online` or a heartbeat).
    Upstream,
}

/// A broker the site starts (or not).
struct BrokerSpec {
    start: bool,
    persistent: bool,
    extra: String,
}

impl BrokerSpec {
    fn plain() -> BrokerSpec {
        BrokerSpec {
            start: true,
            persistent: false,
            extra: String::new(),
        }
    }
}

/// What a test asks of its site; [`SiteBuilder::start`] starts it.
pub struct SiteBuilder {
    name: String,
    dir: tempfile::TempDir,
    device_port: u16,
    district_port: u16,
    status_port: u16,
    device: BrokerSpec,
    district: BrokerSpec,
    collector: bool,
    collector_port: Option<u16>,
    collector_credentials: Option<(String, String)>,
    seed: bool,
    config: Config,
    env: Vec<(String, String)>,
    start_gateway: bool,
    ready: Option<Ready>,
    mounts: Vec<Tmpfs>,
    show: Vec<String>,
}

impl Site {
    /// A site named `name` (its scratch dir is made now: [`SiteBuilder::root`]); by default both
    /// brokers, the collector and the gateway with [`test_config`], no status page.
    pub fn build(name: &str) -> SiteBuilder {
        let dir = tempfile::Builder::new()
            .prefix(&format!("zhian-e2e-{name}-"))
            .tempdir()
            .expect("create tempdir");
        let (device_port, district_port) = (free_port(), free_port());
        let config = test_config(&dir.path().join("data"), device_port, district_port);
        SiteBuilder {
            name: name.to_string(),
            dir,
            device_port,
            district_port,
            status_port: free_port(),
            device: BrokerSpec::plain(),
            district: BrokerSpec::plain(),
            collector: true,
            collector_port: None,
            collector_credentials: None,
            seed: true,
            config,
            env: Vec::new(),
            start_gateway: true,
            ready: None,
            mounts: Vec::new(),
            show: Vec::new(),
        }
    }
}

impl SiteBuilder {
    /// The scratch dir (certificates, fixtures and a tmpfs can go there before the start).
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// The site broker's port (whether or not the site starts it).
    pub fn device_port(&self) -> u16 {
        self.device_port
    }

    /// The district broker's port (whether or not the site starts it).
    pub fn district_port(&self) -> u16 {
        self.district_port
    }

    /// Changes the gateway's config (the test config with this site's ports and data dir).
    pub fn config(mut self, edit: impl FnOnce(&mut Config)) -> SiteBuilder {
        edit(&mut self.config);
        self
    }

    /// The status page on a free loopback port.
    pub fn status(mut self) -> SiteBuilder {
        enable_status(&mut self.config, self.status_port);
        self
    }

    /// The site broker keeps its sessions and messages across a restart.
    pub fn persistent_device(mut self) -> SiteBuilder {
        self.device.persistent = true;
        self
    }

    /// `lines` appended to the site broker's mosquitto.conf (`max_qos 0`, a password file...).
    pub fn device_broker_with(mut self, lines: &str) -> SiteBuilder {
        self.device.extra = lines.to_string();
        self
    }

    /// No site broker (the config still names its port: nothing listens there).
    pub fn no_device_broker(mut self) -> SiteBuilder {
        self.device.start = false;
        self
    }

    /// The district broker keeps its sessions and messages across a restart.
    pub fn persistent_district(mut self) -> SiteBuilder {
        self.district.persistent = true;
        self
    }

    /// `lines` appended to the district broker's mosquitto.conf.
    pub fn district_broker_with(mut self, lines: &str) -> SiteBuilder {
        self.district.extra = lines.to_string();
        self
    }

    /// No district broker (and so no collector).
    pub fn no_district_broker(mut self) -> SiteBuilder {
        self.district.start = false;
        self.collector = false;
        self
    }

    /// No collector on the district broker.
    pub fn no_collector(mut self) -> SiteBuilder {
        self.collector = false;
        self
    }

    /// The collector connects to the district broker's other listener on `port` (a plain one
    /// beside the TLS listener the gateway uses).
    pub fn collector_port(mut self, port: u16) -> SiteBuilder {
        self.collector_port = Some(port);
        self
    }

    /// The collector logs in to the district broker as `user`.
    pub fn collector_credentials(mut self, user: &str, password: &str) -> SiteBuilder {
        self.collector_credentials = Some((user.to_string(), password.to_string()));
        self
    }

    /// The gateway's device session is not made before the daemon first connects (by default it
    /// is, so nothing published while the daemon starts is lost).
    pub fn no_seed(mut self) -> SiteBuilder {
        self.seed = false;
        self
    }

    /// An environment variable for every start of the gateway.
    pub fn env(mut self, key: &str, value: &str) -> SiteBuilder {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// The gateway's wall clock under libfaketime, read from `<root>/faketime` (which holds
    /// `clock`, e.g. `"-3d"`; [`Site::set_clock`] rewrites it); its monotonic clock untouched.
    pub fn faketime(mut self, clock: &str) -> SiteBuilder {
        let file = self.dir.path().join("faketime");
        fs::write(&file, format!("{clock}\n")).expect("write the faketime file");
        let file = file.display().to_string();
        self = self
            .env("LD_PRELOAD", &libfaketime())
            .env("FAKETIME_TIMESTAMP_FILE", &file)
            .env("FAKETIME_CACHE_DURATION", "1");
        self.env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    }

    /// A tmpfs of `size` (`"24m"`) mounted now at `<root>/<dir>`, unmounted when the site is
    /// dropped: a filesystem that fills for real. Needs root (CI runs as root).
    pub fn tmpfs(mut self, dir: &str, size: &str) -> SiteBuilder {
        let at = self.dir.path().join(dir);
        self.mounts.push(Tmpfs::mount(&at, size));
        self
    }

    /// A file of the scratch dir (a peer's stderr, say) whose tail a failing test prints.
    pub fn show_on_failure(mut self, file: &str) -> SiteBuilder {
        self.show.push(file.to_string());
        self
    }

    /// The config is written but the daemon not started ([`Site::start_daemon`] does).
    pub fn unstarted(mut self) -> SiteBuilder {
        self.start_gateway = false;
        self
    }

    /// When `start` returns (by default: the page answers when there is one, else the gateway
    /// is online upstream when there is a collector, else at once).
    pub fn ready(mut self, ready: Ready) -> SiteBuilder {
        self.ready = Some(ready);
        self
    }

    /// Starts what was asked for and returns once the site is ready.
    pub fn start(self) -> Site {
        let root = self.dir.path().to_path_buf();
        let broker = |spec: &BrokerSpec, dir: &str, port: u16| {
            spec.start
                .then(|| Mosquitto::start_with(&root.join(dir), port, spec.persistent, &spec.extra))
        };
        let device = broker(&self.device, "device-broker", self.device_port);
        let district = broker(&self.district, "district-broker", self.district_port);
        let upstream = self.collector.then(|| {
            let id = format!("collector-{}", self.name);
            let port = self.collector_port.unwrap_or(self.district_port);
            match &self.collector_credentials {
                Some((user, pw)) => Upstream::start_with_credentials(port, &id, user, pw),
                None => Upstream::start(port, &id),
            }
        });
        let c = &self.config;
        let device_url = format!("mqtt://127.0.0.1:{}", self.device_port);
        if self.seed && device.is_some() && c.mqtt.enabled && c.mqtt.url == device_url {
            // The daemon's persistent session exists before it first connects, so nothing sent
            // while it starts up is lost, whatever its start-up order.
            let filters = zhian_gateway::core::mapping::subscriptions(&c.mqtt.topics, &c.sources());
            let creds = c.mqtt.username.as_deref().zip(c.mqtt.password.as_ref());
            let creds = creds.map(|(u, p)| (u, p.0.as_str()));
            seed_session_as(self.device_port, &c.mqtt_client_id(), &filters, creds);
        }
        let ready = self.ready.unwrap_or(if !self.start_gateway {
            Ready::Started
        } else if c.status.enabled {
            Ready::Status
        } else if upstream.is_some() && c.upstream.enabled {
            Ready::Upstream
        } else {
            Ready::Started
        });
        let gateway = Gateway::new("gateway", self.config.clone(), &root, self.env.clone());
        let site = Site {
            name: self.name,
            root,
            device,
            district,
            upstream,
            gateways: vec![gateway],
            base: self.config,
            env: self.env,
            publishers: AtomicUsize::new(0),
            mounts: self.mounts,
            show: self.show,
            dir: Some(self.dir),
        };
        if self.start_gateway {
            site.start_daemon();
            site.wait_ready(ready);
        }
        site
    }
}

/// A running site: its brokers, collector and gateways (the first is the one the builder
/// configured; [`Site::add_gateway`] adds more on the same brokers).
pub struct Site {
    pub name: String,
    pub root: PathBuf,
    device: Option<Mosquitto>,
    district: Option<Mosquitto>,
    upstream: Option<Upstream>,
    gateways: Vec<Gateway>,
    base: Config,
    env: Vec<(String, String)>,
    publishers: AtomicUsize,
    mounts: Vec<Tmpfs>,
    show: Vec<String>,
    dir: Option<tempfile::TempDir>,
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

    /// Another gateway on the same brokers: the builder's config with its own data dir
    /// (`<root>/<name>`) and, when the site has a page, its own status port, then `edit`.
    /// Written and started (not waited for); returns its index.
    pub fn add_gateway(&mut self, name: &str, edit: impl FnOnce(&mut Config)) -> usize {
        let mut c = self.base.clone();
        c.gateway.data_dir = self.root.join(name);
        if c.status.enabled {
            enable_status(&mut c, free_port());
        }
        edit(&mut c);
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
