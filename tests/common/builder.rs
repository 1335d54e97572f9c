//! The site builder: what a test asks of its site (brokers, collector, the gateway's typed
//! config, readiness), started by [`SiteBuilder::start`]. See `site.rs`.

use std::fs;
use std::path::Path;
use std::sync::atomic::AtomicUsize;

use zhian_gateway::config::Config;

use super::*;

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
    gateway: bool,
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
            gateway: true,
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

    /// No gateway of the builder's config: the test adds its own ([`Site::add_gateway`], which
    /// starts from that config).
    pub fn no_gateway(mut self) -> SiteBuilder {
        self.gateway = false;
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
        let ready = self.ready.unwrap_or(if !self.start_gateway {
            Ready::Started
        } else if c.status.enabled {
            Ready::Status
        } else if upstream.is_some() && c.upstream.enabled {
            Ready::Upstream
        } else {
            Ready::Started
        });
        let gateways = if self.gateway {
            let gw = Gateway::new("gateway", self.config.clone(), &root, self.env.clone());
            vec![gw]
        } else {
            Vec::new()
        };
        let site = Site {
            name: self.name,
            root,
            device,
            district,
            upstream,
            gateways,
            base: self.config,
            env: self.env,
            seed: self.seed,
            publishers: AtomicUsize::new(0),
            mounts: self.mounts,
            show: self.show,
            dir: Some(self.dir),
        };
        if let Some(gw) = site.gateways.first() {
            site.seed(&gw.config);
        }
        if self.start_gateway {
            site.start_daemon();
            site.wait_ready(ready);
        }
        site
    }
}
