//! Shared harness for the end-to-end tests: mosquitto brokers, the daemon binary, an upstream
//! collector on the district broker, a QoS 1 device publisher and event workloads.
//!
//! Everything here is synchronous (plain threads): rumqttc's blocking `Client`/`Connection` pair
//! is driven from a dedicated thread per connection, so no test ever publishes from the thread
//! that polls the event loop.

// Each integration-test crate that includes this module uses a different subset of it.
#![allow(dead_code, unused_imports)]

pub mod district;
pub mod http;
pub use http::{base64, http, http_from, Reply};
pub mod pg;
pub mod pki;
pub use pki::{make_ca, make_ca_with, make_leaf, make_leaf_with};

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

/// `gateway.id` in the test config.
pub const GATEWAY_ID: &str = "test-gw";
/// Upstream topic prefix for this gateway: `{topic_prefix}/{gateway.id}`.
pub const PREFIX: &str = "zhian/district/test-gw";
/// `aggregate.window` in the test config, in milliseconds.
pub const WINDOW_MS: i64 = 2_000;
/// `aggregate.grace` in the test config, in milliseconds.
pub const GRACE_MS: i64 = 1_000;
/// `mqtt.client_id` in the test config: the daemon's persistent session on the device broker.
pub const DEVICE_CLIENT_ID: &str = "zhian-test";
/// The daemon's default device subscription (`mqtt.topics`).
pub const DEVICE_FILTER: &str = "zhian/+/+";
/// Strings that only ever occur inside `subject` values the tests send: none may appear upstream.
pub const SUBJECT_MARKERS: &[&str] = &["SUBJ", "card:", "face:", "plate:", "浙A"];

/// Lines of the daemon log printed when a test fails.
const LOG_TAIL_LINES: usize = 300;
/// Unacknowledged QoS 1 messages a [`Publisher`] allows before it waits.
const PUBLISH_WINDOW: usize = 500;

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// A TCP port that was free a moment ago (bind 127.0.0.1:0, read the port, drop the listener).
/// The gateway binary under test: `ZHIAN_GATEWAY_BIN` when set (the test command points it at
/// the box build, `--no-default-features --features box`, which the `.deb` ships), else the one
/// cargo built for this test (default features).
pub fn gateway_bin() -> std::ffi::OsString {
    std::env::var_os("ZHIAN_GATEWAY_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_zhian-gateway").into())
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Wall clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_millis()).expect("milliseconds fit in i64")
}

/// Start of the tumbling window (aligned to the Unix epoch) that holds `ts_ms`.
pub fn window_start(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(WINDOW_MS) * WINDOW_MS
}

/// Time from now until wall clock reaches `at_ms` (zero when already past).
pub fn until_ms(at_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(at_ms - now_ms()).unwrap_or(0))
}

/// Polls `cond` every 100 ms until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of a text file (or a note that it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n);
            lines[from..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Quotes a string for TOML (a JSON string is a valid TOML basic string).
pub fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("string to JSON")
}

/// Human-readable difference between an expected and an actual map.
pub fn map_diff<K: Ord + Debug, V: PartialEq + Debug>(
    expected: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> String {
    let mut out = Vec::new();
    for (k, want) in expected {
        match actual.get(k) {
            None => out.push(format!("  missing {k:?}: expected {want:?}")),
            Some(got) if got != want => {
                out.push(format!("  wrong   {k:?}: expected {want:?}, got {got:?}"))
            }
            Some(_) => {}
        }
    }
    for (k, got) in actual {
        if !expected.contains_key(k) {
            out.push(format!("  extra   {k:?}: got {got:?}"));
        }
    }
    if out.is_empty() {
        "  (no difference)".to_string()
    } else {
        out.join("\n")
    }
}

/// Sends SIGTERM to a process (libc is not a dependency: use kill(1)).
fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill -TERM");
    assert!(status.success(), "kill -TERM {pid} failed: {status}");
}

/// Waits up to `timeout` for a child to exit.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A deterministic xorshift64* generator: reproducible workloads without a rand dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n).expect("usize fits in u64");
        usize::try_from(self.next_u64() % n64).expect("below n fits in usize")
    }
}

// ---------------------------------------------------------------------------------------------
// Mosquitto
// ---------------------------------------------------------------------------------------------

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
             max_inflight_messages 1000\n\
             max_queued_messages 1000000\n\
             persistence {persistence}\n\
             persistence_location {location}/\n\
             log_dest file {log}\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
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
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon and its CLI
// ---------------------------------------------------------------------------------------------

fn gateway_command() -> Command {
    let mut cmd = Command::new(gateway_bin());
    // Configuration must come from the file only: drop any ZHIAN_* overrides of the caller.
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ZHIAN_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "info,zhian_gateway=debug")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    cmd
}

/// `zhian-gateway run --config <file>`, stdout and stderr appended to a log file.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    pub fn start(config: &Path, log: &Path) -> Daemon {
        Self::start_with_env(config, log, &[])
    }

    /// As [`Daemon::start`], with extra environment variables (LD_PRELOAD of libfaketime, say).
    pub fn start_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open daemon log");
        writeln!(
            out,
            "===== harness: starting daemon at unix ms {} =====",
            now_ms()
        )
        .expect("write daemon log");
        let child = gateway_command()
            .envs(env.iter().copied())
            .arg("run")
            .arg("--config")
            .arg(config)
            .stdout(out.try_clone().expect("clone file handle"))
            .stderr(out)
            .spawn()
            .expect("spawn zhian-gateway run");
        Daemon { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Exit status if the process has already exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on daemon")
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) -> ExitStatus {
        let _ = self.child.kill();
        self.child.wait().expect("wait for killed daemon")
    }

    /// SIGTERM and wait (up to 10 s, then SIGKILL): the exit status and how long the exit took.
    pub fn term(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        sigterm(self.pid());
        match wait_child(&mut self.child, Duration::from_secs(10)) {
            Some(status) => (status, started.elapsed()),
            None => {
                let status = self.kill9();
                (status, started.elapsed())
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            self.kill9();
        }
    }
}

/// Output of one CLI invocation.
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `zhian-gateway <args>` to completion (killed after `timeout`, which fails the test).
pub fn run_cli<S: AsRef<OsStr>>(args: &[S], scratch: &Path, timeout: Duration) -> CliOutput {
    run_cli_with(args, scratch, timeout, &[])
}

/// As [`run_cli`] (15 s at most), with extra environment variables.
pub fn run_cli_env<S: AsRef<OsStr>>(args: &[S], scratch: &Path, env: &[(&str, &str)]) -> CliOutput {
    run_cli_with(args, scratch, Duration::from_secs(15), env)
}

fn run_cli_with<S: AsRef<OsStr>>(
    args: &[S],
    scratch: &Path,
    timeout: Duration,
    env: &[(&str, &str)],
) -> CliOutput {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let out_path = scratch.join(format!("cli-{n}.stdout"));
    let err_path = scratch.join(format!("cli-{n}.stderr"));
    let mut child = gateway_command()
        .envs(env.iter().copied())
        .args(args)
        .stdout(File::create(&out_path).expect("create stdout file"))
        .stderr(File::create(&err_path).expect("create stderr file"))
        .spawn()
        .expect("spawn zhian-gateway");
    let status = match wait_child(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "zhian-gateway {:?} still running after {timeout:?}; stderr:\n{}",
                args.iter()
                    .map(|a| a.as_ref().to_owned())
                    .collect::<Vec<_>>(),
                tail(&err_path, 50)
            );
        }
    };
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    CliOutput {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// `zhian-gateway check-config --config <config>` (15 s at most).
pub fn check_config(config: &Path, scratch: &Path) -> CliOutput {
    let args = [
        OsStr::new("check-config"),
        OsStr::new("--config"),
        config.as_os_str(),
    ];
    run_cli(&args, scratch, Duration::from_secs(15))
}

/// The test config (see the brief); `upstream_extra` is appended to the `[upstream]` table.
pub fn config_text(
    data_dir: &Path,
    device_port: u16,
    district_port: u16,
    upstream_extra: &str,
) -> String {
    format!(
        r#"[gateway]
id = "{GATEWAY_ID}"
data_dir = {data_dir}
district = "富阳区"
compound = "春江花园"

[mqtt]
url = "mqtt://127.0.0.1:{device_port}"
client_id = "{DEVICE_CLIENT_ID}"

[upstream]
url = "mqtt://127.0.0.1:{district_port}"
topic_prefix = "zhian/district"
heartbeat = "1s"
reconnect_max = "2s"
{upstream_extra}
[aggregate]
window = "2s"
grace = "1s"
max_lateness = "1h"
max_future_skew = "5m"

[status]
enabled = false
"#,
        data_dir = toml_string(&data_dir.to_string_lossy()),
    )
}

/// [`config_text`] with the status page on 127.0.0.1:`status_port`.
pub fn config_with_status(
    data_dir: &Path,
    device_port: u16,
    district_port: u16,
    status_port: u16,
) -> String {
    let base = config_text(data_dir, device_port, district_port, "");
    assert!(base.contains("[status]\nenabled = false\n"));
    base.replace(
        "[status]\nenabled = false\n",
        &format!("[status]\nenabled = true\nlisten = \"127.0.0.1:{status_port}\"\n"),
    )
}

/// GET `/api/status` as JSON (None on a transport error or a non-200 answer).
pub fn api_status(port: u16) -> Option<Value> {
    let r = http(port, "GET", "/api/status", None).ok()?;
    (r.status == 200).then(|| r.json())
}

/// A file's text (empty if it cannot be read), e.g. a daemon log.
pub fn log_text(p: &Path) -> String {
    String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned()
}

// ---------------------------------------------------------------------------------------------
// MQTT clients: upstream collector, device publisher, session seeding, retained probe
// ---------------------------------------------------------------------------------------------

/// One message seen on the district broker.
#[derive(Clone, Debug)]
pub struct Msg {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// Wall clock (Unix ms) when the collector received it.
    pub at_ms: i64,
}

impl Msg {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "upstream payload on {} is not JSON ({e}): {}",
                self.topic,
                self.text()
            )
        })
    }
}

/// Event loop of a collector: records every PUBLISH, re-subscribes after each CONNACK and
/// keeps reconnecting (with a pause) until the request channel closes or `stop` is set.
fn collector_loop(
    mut conn: Connection,
    client: Arc<Mutex<Option<Client>>>,
    filter: String,
    msgs: Arc<Mutex<Vec<Msg>>>,
    subscribed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    loop {
        match conn.recv() {
            // The request channel closed: the owner dropped the client.
            Err(_) => break,
            Ok(Ok(MqttEvent::Incoming(Incoming::ConnAck(_)))) => {
                if let Some(c) = client.lock().expect("client lock").as_ref() {
                    let _ = c.try_subscribe(filter.as_str(), QoS::AtLeastOnce);
                }
            }
            Ok(Ok(MqttEvent::Incoming(Incoming::SubAck(_)))) => {
                subscribed.store(true, Ordering::SeqCst);
            }
            Ok(Ok(MqttEvent::Incoming(Incoming::Publish(p)))) => {
                msgs.lock().expect("messages lock").push(Msg {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    retain: p.retain,
                    at_ms: now_ms(),
                });
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                subscribed.store(false, Ordering::SeqCst);
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Collects everything published under `zhian/district/#` on the district broker, through a
/// persistent session (clean_session = false, fixed client id) that survives broker restarts.
pub struct Upstream {
    msgs: Arc<Mutex<Vec<Msg>>>,
    client: Arc<Mutex<Option<Client>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Connects and subscribes; returns once the SUBACK arrived.
    pub fn start(port: u16, client_id: &str) -> Upstream {
        Self::start_opts(
            MqttOptions::new(client_id, "127.0.0.1", port),
            port,
            client_id,
        )
    }

    /// As [`Upstream::start`], with a username and password.
    pub fn start_with_credentials(port: u16, client_id: &str, user: &str, pw: &str) -> Upstream {
        let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
        opts.set_credentials(user, pw);
        Self::start_opts(opts, port, client_id)
    }

    fn start_opts(mut opts: MqttOptions, port: u16, client_id: &str) -> Upstream {
        opts.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(16 << 20, 64 << 10);
        let (client, conn) = Client::new(opts, 64);
        let client = Arc::new(Mutex::new(Some(client)));
        let msgs = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (client, msgs, subscribed, stop) = (
                client.clone(),
                msgs.clone(),
                subscribed.clone(),
                stop.clone(),
            );
            thread::Builder::new()
                .name(format!("collector-{client_id}"))
                .spawn(move || {
                    collector_loop(
                        conn,
                        client,
                        "zhian/district/#".to_string(),
                        msgs,
                        subscribed,
                        stop,
                    )
                })
                .expect("spawn collector thread")
        };
        let upstream = Upstream {
            msgs,
            client,
            stop,
            thread: Some(thread),
        };
        assert!(
            wait_until(Duration::from_secs(10), || subscribed
                .load(Ordering::SeqCst)),
            "upstream collector could not subscribe on port {port}"
        );
        upstream
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Msg> {
        self.msgs.lock().expect("messages lock").clone()
    }

    /// Messages on `{PREFIX}/{leaf}`.
    pub fn on(&self, leaf: &str) -> Vec<Msg> {
        let topic = format!("{PREFIX}/{leaf}");
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    pub fn summaries(&self) -> Vec<Summary> {
        self.on("summary").iter().map(Summary::parse).collect()
    }

    /// Per (window.start, window.secs), the summary with the highest rev (the platform's view).
    /// A rev sent in parts (`"part": i, "parts": n`) counts only once all its parts arrived,
    /// and then as the union of their rows.
    pub fn latest_revs(&self) -> BTreeMap<(i64, u64), Summary> {
        // (start, secs, rev) -> (parts expected, parts seen, merged summary)
        type Gathered = (u64, BTreeSet<u64>, Summary);
        let mut revs: BTreeMap<(i64, u64, u64), Gathered> = BTreeMap::new();
        for s in self.summaries() {
            let part = s.json["part"].as_u64();
            let parts = s.json["parts"].as_u64().unwrap_or(1);
            let e = revs.entry((s.start_ms, s.secs, s.rev)).or_insert_with(|| {
                (
                    parts,
                    BTreeSet::new(),
                    Summary {
                        counts: Vec::new(),
                        ..s.clone()
                    },
                )
            });
            if e.1.insert(part.unwrap_or(1)) {
                e.2.counts.extend(s.counts.iter().cloned());
            }
        }
        let mut best: BTreeMap<(i64, u64), Summary> = BTreeMap::new();
        for ((start, secs, rev), (parts, seen, s)) in revs {
            if seen.len() as u64 != parts {
                continue;
            }
            if best.get(&(start, secs)).is_none_or(|b| rev > b.rev) {
                best.insert((start, secs), s);
            }
        }
        best
    }

    /// Per (window start, kind, device, action, result): n of the highest-rev summary.
    pub fn window_totals(&self) -> WindowTotals {
        let mut out = WindowTotals::new();
        for ((start, _), s) in self.latest_revs() {
            for (key, n) in &s.counts {
                if *n > 0 {
                    *out.entry((start, key.clone())).or_default() += n;
                }
            }
        }
        out
    }

    /// Per (kind, device, action, result): the sum over windows of the highest-rev summaries.
    pub fn totals(&self) -> Totals {
        collapse(&self.window_totals())
    }

    pub fn latest_heartbeat(&self) -> Option<Value> {
        self.on("heartbeat").last().map(Msg::json)
    }

    /// `state` of the last status message received (live or retained).
    pub fn latest_status(&self) -> Option<String> {
        self.on("status")
            .last()
            .and_then(|m| m.json()["state"].as_str().map(str::to_string))
    }

    /// Contract violations in the summaries received so far (empty when all is well).
    pub fn summary_problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen: BTreeMap<(i64, u64, u64), Vec<(Key, u64)>> = BTreeMap::new();
        for s in self.summaries() {
            let j = &s.json;
            if j["schema"] != "zhian.summary.v1" {
                problems.push(format!("bad schema: {j}"));
            }
            if j["gateway"] != GATEWAY_ID {
                problems.push(format!("bad gateway: {j}"));
            }
            if j["site"]["district"] != "富阳区" || j["site"]["compound"] != "春江花园" {
                problems.push(format!("site labels not copied: {j}"));
            }
            if !s.start_text.ends_with('Z') {
                problems.push(format!("window.start not UTC 'Z': {}", s.start_text));
            }
            let secs_ms = i64::try_from(s.secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000);
            if s.secs == 0 || s.start_ms.rem_euclid(secs_ms) != 0 {
                problems.push(format!("window not epoch-aligned: {j}"));
            }
            if s.counts.is_empty() {
                problems.push(format!("empty window sent: {j}"));
            }
            if s.counts.iter().any(|(_, n)| *n == 0) {
                problems.push(format!("row with n = 0: {j}"));
            }
            let keys: Vec<&Key> = s.counts.iter().map(|(k, _)| k).collect();
            if keys.windows(2).any(|w| w[0] >= w[1]) {
                problems.push(format!(
                    "counts not sorted/unique by kind, device, action, result: {j}"
                ));
            }
            // Parts of one rev carry different rows by design: key them by part too.
            let part = j["part"].as_u64().unwrap_or(0);
            if let (Some(p), Some(n)) = (j["part"].as_u64(), j["parts"].as_u64()) {
                if p == 0 || p > n {
                    problems.push(format!("part {p} of {n}: {j}"));
                }
            }
            match seen.get(&(s.start_ms, s.secs, s.rev * 1_000_000 + part)) {
                Some(prev) if *prev != s.counts => problems.push(format!(
                    "two different summaries with the same window and rev: {prev:?} vs {j}"
                )),
                Some(_) => {}
                None => {
                    seen.insert(
                        (s.start_ms, s.secs, s.rev * 1_000_000 + part),
                        s.counts.clone(),
                    );
                }
            }
        }
        problems
    }

    /// Upstream payloads that contain any of `markers` (raw text or any decoded JSON string).
    pub fn subject_leaks(&self, markers: &[&str]) -> Vec<String> {
        let mut leaks = Vec::new();
        for m in self.messages() {
            let mut texts = vec![m.text()];
            if let Ok(v) = serde_json::from_slice::<Value>(&m.payload) {
                collect_strings(&v, &mut texts);
            }
            if texts
                .iter()
                .any(|t| markers.iter().any(|mk| t.contains(mk)))
            {
                leaks.push(format!("{}: {}", m.topic, m.text()));
            }
        }
        leaks
    }

    /// A short listing of what arrived, for failure messages.
    pub fn dump(&self) -> String {
        let msgs = self.messages();
        let from = msgs.len().saturating_sub(40);
        let mut out = format!(
            "{} upstream messages; the last {}:\n",
            msgs.len(),
            msgs.len() - from
        );
        for m in &msgs[from..] {
            let text = m.text();
            let short: String = text.chars().take(400).collect();
            out.push_str(&format!(
                "  [{}] {} retain={} {short}\n",
                m.at_ms, m.topic, m.retain
            ));
        }
        out
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(client) = self.client.lock().expect("client lock").take() {
            let _ = client.try_disconnect();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => {
            for (k, item) in map {
                out.push(k.clone());
                collect_strings(item, out);
            }
        }
        _ => {}
    }
}

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

/// Creates a persistent session `client_id` subscribed to `filter` at QoS 1, then disconnects:
/// the broker queues every matching message for that session until its owner connects.
pub fn seed_session(port: u16, client_id: &str, filter: &str) {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(1));
    let (client, mut conn) = Client::new(opts, 10);
    client
        .subscribe(filter, QoS::AtLeastOnce)
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

/// The retained message on `topic`, read by a fresh clean-session client (None if none arrives
/// within about a second after the SUBACK, or if the broker is unreachable within `timeout`).
pub fn fetch_retained(port: u16, topic: &str, timeout: Duration) -> Option<Msg> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let id = format!(
        "probe-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(1));
    let (client, mut conn) = Client::new(opts, 10);
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .expect("queue subscribe");
    let mut deadline = Instant::now() + timeout;
    let mut found = None;
    while Instant::now() < deadline {
        match conn.recv() {
            Ok(Ok(MqttEvent::Incoming(Incoming::SubAck(_)))) => {
                deadline = deadline.min(Instant::now() + Duration::from_secs(1));
            }
            Ok(Ok(MqttEvent::Incoming(Incoming::Publish(p)))) if p.retain => {
                found = Some(Msg {
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                    retain: true,
                    at_ms: now_ms(),
                });
                break;
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => thread::sleep(Duration::from_millis(100)),
            Err(_) => break,
        }
    }
    let _ = client.try_disconnect();
    drop(client);
    found
}

// ---------------------------------------------------------------------------------------------
// Summaries and expected counts
// ---------------------------------------------------------------------------------------------

/// (kind, device, action, result)
pub type Key = (String, String, String, String);
/// Per key, the number of events.
pub type Totals = BTreeMap<Key, u64>;
/// Per (window start in Unix ms, key), the number of events.
pub type WindowTotals = BTreeMap<(i64, Key), u64>;

/// A parsed `zhian.summary.v1` message.
#[derive(Clone, Debug)]
pub struct Summary {
    pub start_ms: i64,
    pub start_text: String,
    pub secs: u64,
    pub rev: u64,
    pub counts: Vec<(Key, u64)>,
    pub json: Value,
    pub at_ms: i64,
}

impl Summary {
    /// Parses a summary; panics (failing the test) on anything that breaks the contract shape.
    pub fn parse(msg: &Msg) -> Summary {
        let json = msg.json();
        let bad = |what: &str| -> ! { panic!("summary {what}: {json}") };
        let start_text = json["window"]["start"]
            .as_str()
            .unwrap_or_else(|| bad("without window.start string"))
            .to_string();
        let start = OffsetDateTime::parse(&start_text, &Rfc3339)
            .unwrap_or_else(|_| bad("with a window.start that is not RFC 3339"));
        let start_ms = i64::try_from(start.unix_timestamp_nanos() / 1_000_000)
            .unwrap_or_else(|_| bad("with an absurd window.start"));
        let secs = json["window"]["secs"]
            .as_u64()
            .unwrap_or_else(|| bad("without integer window.secs"));
        let rev = json["rev"]
            .as_u64()
            .unwrap_or_else(|| bad("without integer rev"));
        let rows = json["counts"]
            .as_array()
            .unwrap_or_else(|| bad("without a counts array"));
        let mut counts = Vec::new();
        for row in rows {
            let field = |name: &str| {
                row[name]
                    .as_str()
                    .unwrap_or_else(|| bad(&format!("row without string {name}")))
                    .to_string()
            };
            let key = (
                field("kind"),
                field("device"),
                field("action"),
                field("result"),
            );
            let n = row["n"]
                .as_u64()
                .unwrap_or_else(|| bad("row without integer n"));
            counts.push((key, n));
        }
        Summary {
            start_ms,
            start_text,
            secs,
            rev,
            counts,
            json: json.clone(),
            at_ms: msg.at_ms,
        }
    }

    /// Sum of n over all rows.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

/// Window totals summed over windows.
pub fn collapse(windows: &WindowTotals) -> Totals {
    let mut out = Totals::new();
    for ((_, key), n) in windows {
        *out.entry(key.clone()).or_default() += n;
    }
    out
}

/// Expected window totals for a set of unique events (each counted once).
pub fn expected_windows<'a>(events: impl IntoIterator<Item = &'a Event>) -> WindowTotals {
    let mut out = WindowTotals::new();
    for e in events {
        *out.entry((window_start(e.ts_ms), e.key())).or_default() += 1;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Device events and workloads
// ---------------------------------------------------------------------------------------------

/// How an event's `ts` is written.
#[derive(Clone, Copy, Debug)]
pub enum TsStyle {
    /// Integer Unix milliseconds.
    Millis,
    /// RFC 3339 in UTC ("...Z").
    Utc,
    /// RFC 3339 at +08:00 (China Standard Time).
    Plus8,
}

/// Formats `ts_ms` as a JSON `ts` value.
pub fn ts_value(ts_ms: i64, style: TsStyle) -> Value {
    let offset = match style {
        TsStyle::Millis => return json!(ts_ms),
        TsStyle::Utc => UtcOffset::UTC,
        TsStyle::Plus8 => UtcOffset::from_hms(8, 0, 0).expect("valid offset"),
    };
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
        .expect("timestamp in range")
        .to_offset(offset);
    json!(at.format(&Rfc3339).expect("format RFC 3339"))
}

/// One device event (valid per the contract).
#[derive(Clone, Debug)]
pub struct Event {
    pub kind: String,
    pub device: String,
    pub id: String,
    pub action: String,
    pub result: Option<String>,
    pub subject: Option<String>,
    pub ts_ms: i64,
    pub ts_style: TsStyle,
    /// Also write `kind` and `device` into the payload (they must equal the topic's).
    pub echo_topic: bool,
}

impl Event {
    pub fn new(kind: &str, device: &str, id: &str, action: &str) -> Event {
        Event {
            kind: kind.to_string(),
            device: device.to_string(),
            id: id.to_string(),
            action: action.to_string(),
            result: None,
            subject: None,
            ts_ms: now_ms(),
            ts_style: TsStyle::Millis,
            echo_topic: false,
        }
    }

    pub fn result(mut self, result: &str) -> Event {
        self.result = Some(result.to_string());
        self
    }

    pub fn subject(mut self, subject: &str) -> Event {
        self.subject = Some(subject.to_string());
        self
    }

    pub fn at(mut self, ts_ms: i64) -> Event {
        self.ts_ms = ts_ms;
        self
    }

    pub fn topic(&self) -> String {
        format!("zhian/{}/{}", self.kind, self.device)
    }

    /// The payload as a JSON object (tests may tamper with it before sending).
    pub fn json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("ts".into(), ts_value(self.ts_ms, self.ts_style));
        m.insert("action".into(), json!(self.action));
        if let Some(r) = &self.result {
            m.insert("result".into(), json!(r));
        }
        if let Some(s) = &self.subject {
            m.insert("subject".into(), json!(s));
        }
        if self.echo_topic {
            m.insert("kind".into(), json!(self.kind));
            m.insert("device".into(), json!(self.device));
        }
        m
    }

    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(&self.json()).expect("serialise event")
    }

    /// The summary row this event counts under (`result` defaults to `ok`).
    pub fn key(&self) -> Key {
        (
            self.kind.clone(),
            self.device.clone(),
            self.action.clone(),
            self.result.clone().unwrap_or_else(|| "ok".to_string()),
        )
    }
}

/// `n` unique events over three access doors and one vehicle gate, with mixed actions, results
/// (including an omitted result, counted as `ok`), subjects and `ts` styles. `ts_ms` is set when
/// sent (see [`send_plan`]).
pub fn mixed_events(rng: &mut Rng, n: usize) -> Vec<Event> {
    const DEVICES: [(&str, &str); 4] = [
        ("access", "door-1"),
        ("access", "door-2"),
        ("access", "door-3"),
        ("vehicle", "gate-1"),
    ];
    (0..n)
        .map(|seq| {
            let (kind, device) = DEVICES[rng.below(DEVICES.len())];
            let action = if rng.below(2) == 0 { "entry" } else { "exit" };
            let id = format!("{device}-{seq:06}");
            let mut e = Event::new(kind, device, &id, action);
            if kind == "access" {
                let result = if rng.below(5) == 0 {
                    "denied"
                } else {
                    "granted"
                };
                let card = format!("card:SUBJ{:05}", rng.below(100_000));
                e = e.result(result).subject(&card);
            } else {
                if rng.below(2) == 0 {
                    e = e.result("granted");
                }
                let plate = format!("plate:浙A·SUBJ{:04}", rng.below(10_000));
                e = e.subject(&plate);
            }
            e.ts_style = match seq % 3 {
                0 => TsStyle::Millis,
                1 => TsStyle::Utc,
                _ => TsStyle::Plus8,
            };
            e.echo_topic = seq % 7 == 0;
            e
        })
        .collect()
}

/// One step of a send plan.
#[derive(Clone, Copy, Debug)]
pub enum Slot {
    /// Send event i for the first time (stamped with the wall clock at that moment).
    New(usize),
    /// Re-send event i's exact payload (same id and ts).
    Dup(usize),
}

/// Every event once, in order, plus `n_dups` re-sends of random events: half right after the
/// original, half at a random later point.
pub fn plan_with_duplicates(rng: &mut Rng, n_unique: usize, n_dups: usize) -> Vec<Slot> {
    assert!(n_unique > 0);
    let mut keyed: Vec<(usize, Slot)> = (0..n_unique).map(|i| (i * 4, Slot::New(i))).collect();
    let end = n_unique * 4;
    for j in 0..n_dups {
        let target = rng.below(n_unique);
        let at = if j % 2 == 0 {
            target * 4 + 1
        } else {
            let from = target * 4 + 2;
            from + rng.below(end - from)
        };
        keyed.push((at, Slot::Dup(target)));
    }
    keyed.sort_by_key(|(at, _)| *at);
    keyed.into_iter().map(|(_, slot)| slot).collect()
}

/// Sends a plan through `publisher`: a new event gets `ts_ms = now` when sent; a duplicate
/// re-sends the original's bytes. `before(k)` runs before the k-th message (for pacing).
pub fn send_plan(
    publisher: &mut Publisher,
    events: &mut [Event],
    plan: &[Slot],
    mut before: impl FnMut(usize),
) {
    let mut payloads: Vec<Option<Vec<u8>>> = vec![None; events.len()];
    for (k, slot) in plan.iter().enumerate() {
        before(k);
        match *slot {
            Slot::New(i) => {
                events[i].ts_ms = now_ms();
                let payload = events[i].payload();
                payloads[i] = Some(payload.clone());
                publisher.send(&events[i].topic(), payload);
            }
            Slot::Dup(i) => {
                let payload = payloads[i]
                    .clone()
                    .expect("plan re-sends an event before its first send");
                publisher.send(&events[i].topic(), payload);
            }
        }
    }
}

/// Number of re-sends in a plan.
pub fn duplicates_in(plan: &[Slot]) -> usize {
    plan.iter().filter(|s| matches!(s, Slot::Dup(_))).count()
}

// ---------------------------------------------------------------------------------------------
// A whole site: two brokers, the collector, the daemon
// ---------------------------------------------------------------------------------------------

/// Reads a heartbeat counter (`counters.<name>`).
pub fn hb_counter(hb: &Value, name: &str) -> Option<u64> {
    hb["counters"][name].as_u64()
}

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

// ---------------------------------------------------------------------------------------------
// A site with a config of the test's own
// ---------------------------------------------------------------------------------------------

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

/// The libfaketime library (Debian package `faketime`).
pub fn libfaketime() -> String {
    let found = fs::read_dir("/usr/lib")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime (apt-get install faketime; scripts/test-deps.sh does)");
    found.display().to_string()
}

/// The daemon under libfaketime, its clock `offset_s` seconds ahead of the real one (the test
/// rewrites the file to step it).
pub fn faked_daemon(cfg: &Path, log: &Path, clock_file: &Path, offset_s: i64) -> Daemon {
    fs::write(clock_file, format!("+{offset_s}\n")).unwrap();
    let lib = libfaketime();
    let clock_path = clock_file.display().to_string();
    Daemon::start_with_env(
        cfg,
        log,
        &[
            ("LD_PRELOAD", lib.as_str()),
            ("FAKETIME_TIMESTAMP_FILE", clock_path.as_str()),
            ("FAKETIME_CACHE_DURATION", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
}

/// Seconds from now (real) to the next local midnight at UTC+8.
pub fn to_next_midnight_s() -> (i64, i64) {
    let real_s = now_ms() / 1000;
    let day = 86_400;
    let next = ((real_s + 8 * 3600) / day + 1) * day - 8 * 3600;
    (real_s, next)
}

/// `zhian-gateway ARGS` with `input` on stdin (`hash-password`, `care-pseudonym`).
pub fn run_with_stdin<S: AsRef<OsStr>>(args: &[S], input: &str) -> std::process::Output {
    let mut child = gateway_command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn zhian-gateway");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for zhian-gateway")
}

/// A tmpfs mounted for a test (a filesystem that fills for real), unmounted on drop. Needs root
/// (CI runs as root).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs needs root (CI runs as root)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
