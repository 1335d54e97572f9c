//! A real mosquitto broker (the site broker, the district broker).

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

/// A mosquitto broker on 127.0.0.1:`port`, killed on drop.
pub struct Mosquitto {
    pub port: u16,
    dir: PathBuf,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Writes `dir/mosquitto.conf` and starts the broker; returns once the port accepts.
    pub fn start(dir: &Path, port: u16, persistent: bool) -> Mosquitto {
        Self::start_with(dir, port, persistent, "")
    }

    /// As [`Mosquitto::start`], with `extra` lines appended to the config (a broker
    /// misconfigured on purpose: `max_qos 0`, `max_packet_size 65536`, ...).
    pub fn start_with(dir: &Path, port: u16, persistent: bool, extra: &str) -> Mosquitto {
        fs::create_dir_all(dir).expect("create broker dir");
        let data = dir.join("persist");
        fs::create_dir_all(&data).expect("create broker persistence dir");
        // mosquitto started as root drops to the `mosquitto` user unless told `user root`;
        // the open permissions keep the paths usable either way.
        for d in [dir, data.as_path()] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o777)).expect("chmod broker dir");
        }
        let conf = dir.join("mosquitto.conf");
        let text = format!(
            "user root\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             max_inflight_messages 2000\n\
             max_queued_messages 1000000\n\
             persistence {persistence}\n\
             persistence_location {location}/\n\
             log_dest file {log}\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             log_type subscribe\n\
             connection_messages true\n{extra}\n",
            persistence = persistent,
            location = data.display(),
            log = dir.join("mosquitto.log").display(),
        );
        fs::write(&conf, text).expect("write mosquitto.conf");
        let mut broker = Mosquitto {
            port,
            dir: dir.to_path_buf(),
            conf,
            child: None,
        };
        broker.spawn();
        broker
    }

    fn spawn(&mut self) {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.stderr"))
            .expect("open mosquitto stderr file");
        let bin = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone file handle"))
            .stderr(out)
            .spawn()
            .expect("spawn mosquitto");
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait on mosquitto") {
                panic!(
                    "mosquitto on port {} exited at start ({status}):\n{}\n{}",
                    self.port,
                    tail(&self.dir.join("mosquitto.stderr"), 20),
                    tail(&self.dir.join("mosquitto.log"), 20)
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "mosquitto did not accept on port {} within 5 s:\n{}",
                    self.port,
                    tail(&self.dir.join("mosquitto.log"), 20)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
    }

    /// Graceful stop (SIGTERM; a persistent broker saves its database), waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            sigterm(child.id());
            if wait_child(&mut child, Duration::from_secs(5)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mosquitto on port {} ignored SIGTERM for 5 s", self.port);
            }
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Graceful stop, then start again on the same port with the same config.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts a stopped broker again (no-op while it runs).
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// The broker's process id while it runs (benchmarks read its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("mosquitto.log")
    }

    /// Waits until the broker's log shows `client` subscribed to `filter` (mosquitto logs
    /// `<client> <qos> <filter>` for each granted filter).
    pub fn wait_subscribed(&self, client: &str, filter: &str) {
        let log = self.log_path();
        let shows = || {
            log_text(&log).lines().any(|l| {
                let mut f = l.split_whitespace().skip(1);
                f.next() == Some(client) && f.nth(1) == Some(filter)
            })
        };
        assert!(
            wait_until(DEADLINE, shows),
            "{client} never subscribed to {filter} on port {}:\n{}",
            self.port,
            tail(&log, 20)
        );
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
