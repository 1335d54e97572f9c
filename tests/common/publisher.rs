//! A QoS 1 device publisher on the site broker, and a seeded gateway session.

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

/// Unacknowledged QoS 1 messages a [`Publisher`] allows before it waits.
const PUBLISH_WINDOW: usize = 500;

/// A QoS 1 publisher on the device broker that counts PUBACKs and bounds what is in flight.
pub struct Publisher {
    client: Option<Client>,
    acked: Arc<AtomicUsize>,
    errors: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    sent: usize,
}

impl Publisher {
    /// Connects (persistent session, so a reconnect resends what was not acknowledged).
    pub fn connect(port: u16, client_id: &str) -> Publisher {
        Self::connect_opts(
            MqttOptions::new(client_id, "127.0.0.1", port),
            port,
            client_id,
        )
    }

    /// As [`Publisher::connect`], with a username and password.
    pub fn connect_with_credentials(port: u16, client_id: &str, user: &str, pw: &str) -> Publisher {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_credentials(user, pw);
        Self::connect_opts(opts, port, client_id)
    }

    fn connect_opts(mut opts: MqttOptions, port: u16, client_id: &str) -> Publisher {
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_inflight(200)
            // The too_large case sends 70 KiB; the default outgoing limit is 10 KiB.
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(opts, 256);
        let acked = Arc::new(AtomicUsize::new(0));
        let connected = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (acked, connected, errors, stop) = (
                acked.clone(),
                connected.clone(),
                errors.clone(),
                stop.clone(),
            );
            thread::Builder::new()
                .name(format!("publisher-{client_id}"))
                .spawn(move || loop {
                    match conn.recv() {
                        Err(_) => break,
                        Ok(Ok(MqttEvent::Incoming(Incoming::ConnAck(_)))) => {
                            connected.store(true, Ordering::SeqCst);
                        }
                        Ok(Ok(MqttEvent::Incoming(Incoming::PubAck(_)))) => {
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => {
                            errors.lock().expect("errors lock").push(e.to_string());
                            if stop.load(Ordering::SeqCst) {
                                break;
                            }
                            thread::sleep(Duration::from_millis(100));
                        }
                    }
                })
                .expect("spawn publisher thread")
        };
        assert!(
            wait_until(Duration::from_secs(10), || connected.load(Ordering::SeqCst)),
            "publisher could not connect to the device broker on port {port}"
        );
        Publisher {
            client: Some(client),
            acked,
            errors,
            stop,
            thread: Some(thread),
            sent: 0,
        }
    }

    /// Queues one QoS 1 message, first waiting while too many are unacknowledged.
    pub fn send(&mut self, topic: &str, payload: Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.sent - self.acked.load(Ordering::SeqCst) >= PUBLISH_WINDOW {
            assert!(
                Instant::now() < deadline,
                "device broker stopped acknowledging ({} of {} acked); errors: {:?}",
                self.acked.load(Ordering::SeqCst),
                self.sent,
                self.errors()
            );
            thread::sleep(Duration::from_millis(1));
        }
        self.client
            .as_ref()
            .expect("publisher client")
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .expect("queue publish");
        self.sent += 1;
    }

    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Shared PUBACK counter (for watching progress from another thread).
    pub fn acked_counter(&self) -> Arc<AtomicUsize> {
        self.acked.clone()
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors lock").clone()
    }

    /// Waits until the broker acknowledged every message sent so far.
    pub fn wait_all_acked(&self, timeout: Duration) {
        let ok = wait_until(timeout, || self.acked.load(Ordering::SeqCst) >= self.sent);
        assert!(
            ok,
            "only {} of {} messages acknowledged by the device broker; errors: {:?}",
            self.acked.load(Ordering::SeqCst),
            self.sent,
            self.errors()
        );
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(client) = self.client.take() {
            let _ = client.try_disconnect();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Creates a persistent session `client_id` subscribed to every filter of `filters` at QoS 1
/// (logged in as `creds`, user and password, when given), then disconnects: the broker queues
/// every matching message for that session until its owner connects.
pub fn seed_session(port: u16, client_id: &str, filters: &[String], creds: Option<(&str, &str)>) {
    if filters.is_empty() {
        return;
    }
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(1));
    if let Some((user, pw)) = creds {
        opts.set_credentials(user, pw);
    }
    let (client, mut conn) = Client::new(opts, 10);
    client
        .subscribe_many(
            filters
                .iter()
                .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        )
        .expect("queue subscribe");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            Instant::now() < deadline,
            "could not seed session {client_id} on port {port}"
        );
        match conn.recv() {
            Ok(Ok(MqttEvent::Incoming(Incoming::SubAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => thread::sleep(Duration::from_millis(100)),
            Err(_) => panic!("seed session {client_id}: event loop ended"),
        }
    }
    client.disconnect().expect("queue disconnect");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match conn.recv() {
            Ok(Ok(MqttEvent::Outgoing(Outgoing::Disconnect))) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(_)) => {}
        }
    }
}
