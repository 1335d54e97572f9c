//! End-to-end tests of the Modbus input: the real binary polls a pymodbus peer
//! (`tests/modbus_peer.py`) over Modbus TCP and over an RTU line (a socat pty pair); the counts
//! that reach the district broker are checked against the peer's own ground truth, across a
//! kill -9 of the daemon. Needs socat, pymodbus and pyserial: `scripts/test-deps.sh` installs them.

use crate::common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use zhian_gateway::config::{
    Dur, ModbusDevice, ModbusPoint, Parity, PointType, Role, Rtu, Table, WordOrder,
};
use zhian_gateway::core::event::Kind;

/// `poll` of every test device.
const POLL_MS: u64 = 250;
/// Seconds of counter movement the peer runs (its `--seconds`).
const RUN_SECS: u64 = 12;
/// When the daemon is killed, counted from the start of the movement.
const KILL_AT: Duration = Duration::from_secs(5);
/// How long the daemon stays dead.
const DEAD_FOR: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Prerequisites and child processes
// ---------------------------------------------------------------------------------------------

const DEPS_HINT: &str = "run scripts/test-deps.sh (installs socat, pymodbus and pyserial)";

fn require_python_deps() {
    let ok = Command::new("python3")
        .args(["-c", "import pymodbus, serial"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 cannot import pymodbus and serial (pyserial): {DEPS_HINT}"
    );
}

fn require_socat() {
    let ok = Command::new("socat")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "socat is not installed: {DEPS_HINT}");
}

/// A child process that is killed (SIGKILL) and reaped on drop.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Spawns `cmd` with stdout and stderr sent to `<dir>/<name>.stdout|.stderr`.
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let out = File::create(dir.join(format!("{name}.stdout"))).expect("create stdout file");
        let err = File::create(dir.join(format!("{name}.stderr"))).expect("create stderr file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({cmd:?}): {e}; {DEPS_HINT}"));
        Proc {
            name: name.to_string(),
            child,
        }
    }

    /// Panics (with the stderr tail) if the process has exited.
    fn assert_running(&mut self, dir: &Path) {
        if let Some(status) = self.child.try_wait().expect("try_wait on child") {
            panic!(
                "{} exited ({status}); stderr:\n{}",
                self.name,
                tail(&dir.join(format!("{}.stderr", self.name)), 30)
            );
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pymodbus peer and its ground truth.
struct Peer {
    proc: Proc,
    dir: PathBuf,
    state: PathBuf,
    start_file: PathBuf,
}

impl Peer {
    /// Starts `tests/modbus_peer.py` with `transport` args (`--mode tcp --port P` or
    /// `--mode rtu --serial PATH`); returns once it printed READY.
    fn start(dir: &Path, transport: &[&OsStr]) -> Peer {
        let state = dir.join("peer-state.json");
        let start_file = dir.join("peer-start");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/modbus_peer.py");
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .args(transport)
            .args(["--plan", "basic", "--seconds", &RUN_SECS.to_string()])
            .arg("--state")
            .arg(&state)
            .arg("--start-file")
            .arg(&start_file);
        let mut peer = Peer {
            proc: Proc::spawn("peer", cmd, dir),
            dir: dir.to_path_buf(),
            state,
            start_file,
        };
        let stdout = dir.join("peer.stdout");
        let ready = wait_until(Duration::from_secs(20), || {
            peer.proc.assert_running(dir);
            fs::read_to_string(&stdout).is_ok_and(|s| s.lines().any(|l| l.trim() == "READY"))
        });
        assert!(
            ready,
            "modbus peer did not print READY within 20 s; stderr:\n{}",
            tail(&dir.join("peer.stderr"), 30)
        );
        peer
    }

    /// The latest state file (None before the first write).
    fn state(&self) -> Option<Value> {
        let text = fs::read_to_string(&self.state).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Lets the plan's movement begin.
    fn start_moving(&self) {
        File::create(&self.start_file).expect("create the peer's start file");
    }

    /// Waits for `done: true`; returns that state.
    fn wait_done(&mut self, timeout: Duration) -> Value {
        let mut last = None;
        let dir = self.dir.clone();
        let ok = wait_until(timeout, || {
            self.proc.assert_running(&dir);
            last = self.state();
            last.as_ref().is_some_and(|s| s["done"] == true)
        });
        assert!(
            ok,
            "modbus peer not done within {timeout:?}; last state: {last:?}"
        );
        last.expect("peer state")
    }
}

/// `increments` of `counter` on `unit` in a peer state.
fn increments(state: &Value, unit: u8, counter: &str) -> u64 {
    state["units"][unit.to_string()][counter]["increments"]
        .as_u64()
        .unwrap_or_else(|| {
            panic!("peer state has no increments for unit {unit} {counter}: {state}")
        })
}

/// A socat pty pair `<dir>/ttyGW` (the daemon's end) and `<dir>/ttyPEER` (the peer's end).
fn socat_pair(dir: &Path) -> (Proc, PathBuf, PathBuf) {
    let gw = dir.join("ttyGW");
    let peer = dir.join("ttyPEER");
    let mut cmd = Command::new("socat");
    cmd.arg("-d")
        .arg("-d")
        .arg(format!("pty,raw,echo=0,link={}", gw.display()))
        .arg(format!("pty,raw,echo=0,link={}", peer.display()));
    let mut proc = Proc::spawn("socat", cmd, dir);
    let ok = wait_until(Duration::from_secs(10), || {
        proc.assert_running(dir);
        gw.exists() && peer.exists()
    });
    assert!(
        ok,
        "socat did not create {} and {} within 10 s; stderr:\n{}",
        gw.display(),
        peer.display(),
        tail(&dir.join("socat.stderr"), 20)
    );
    (proc, gw, peer)
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// A state point (no action).
fn state_point(name: &str, table: Table, address: u32, ty: PointType) -> ModbusPoint {
    ModbusPoint {
        role: Role::State,
        action: None,
        ..counter_point(name, table, address, ty, "")
    }
}

/// The four points of the `basic` plan.
fn basic_points() -> Vec<ModbusPoint> {
    vec![
        ModbusPoint {
            result: Some("ok".into()),
            wrap: true,
            ..counter_point("in_count", Table::Holding, 0, PointType::U16, "entry")
        },
        ModbusPoint {
            result: Some("ok".into()),
            word_order: WordOrder::Big,
            ..counter_point("out_count", Table::Holding, 2, PointType::U32, "exit")
        },
        state_point("barrier_open", Table::Coil, 0, PointType::Bool),
        state_point("temp_c", Table::Holding, 10, PointType::F32),
    ]
}

/// Where a device is.
#[derive(Clone, Copy)]
enum Line<'a> {
    Tcp(u16),
    /// An RTU line at this path (None: a config without one).
    Rtu(Option<&'a Path>),
}

/// A device polled every `POLL_MS` with a 300 ms timeout, offline after 3 failed polls.
fn device(name: &str, kind: Kind, line: Line, unit: u8, points: Vec<ModbusPoint>) -> ModbusDevice {
    let mut d = modbus_tcp(name, kind, "");
    match line {
        Line::Tcp(port) => d.tcp = Some(format!("127.0.0.1:{port}")),
        Line::Rtu(path) => {
            d.tcp = None;
            d.rtu = Some(Rtu {
                path: path.map(Path::to_path_buf),
                baud: 9600,
                parity: Parity::None,
                data_bits: 8,
                stop_bits: 1,
            });
        }
    }
    d.unit = unit;
    d.poll = Dur::millis(POLL_MS);
    d.timeout = Dur::millis(300);
    d.offline_after = 3;
    d.points = points;
    d
}

// ---------------------------------------------------------------------------------------------
// What arrives upstream
// ---------------------------------------------------------------------------------------------

/// The heartbeat's `modbus` entry for `device`.
fn modbus_entry<'a>(hb: &'a Value, device: &str) -> Option<&'a Value> {
    hb["modbus"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == device)
}

fn online(hb: &Value, device: &str) -> bool {
    modbus_entry(hb, device).is_some_and(|d| d["online"] == true)
}

fn polls(hb: &Value, device: &str) -> u64 {
    modbus_entry(hb, device)
        .and_then(|d| d["polls"].as_u64())
        .unwrap_or_else(|| panic!("heartbeat has no integer modbus polls for {device}: {hb}"))
}

fn key(kind: &str, device: &str, action: &str) -> Key {
    (
        kind.to_string(),
        device.to_string(),
        action.to_string(),
        "ok".to_string(),
    )
}

/// A site for a Modbus test: brokers and collector, the daemon polling `devices` (started by
/// the test); a failing test also prints the peer's and socat's files.
fn modbus_site(b: SiteBuilder, devices: Vec<ModbusDevice>) -> Site {
    b.config(|c| c.modbus.devices = devices)
        .show_on_failure("peer.stderr")
        .show_on_failure("socat.stderr")
        .show_on_failure("peer-state.json")
        .unstarted()
        .start()
}

fn assert_daemon_running(site: &Site) {
    if let Some(status) = site.daemon_exited() {
        panic!("daemon exited unexpectedly: {status}");
    }
}

/// Waits for a heartbeat received at or after `since_ms` that satisfies `pred`.
fn wait_heartbeat(
    site: &Site,
    what: &str,
    since_ms: i64,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Msg {
    let mut found = None;
    let ok = wait_until(timeout, || {
        assert_daemon_running(site);
        found = site
            .upstream()
            .on("heartbeat")
            .into_iter()
            .rev()
            .take_while(|m| m.at_ms >= since_ms)
            .find(|m| pred(&m.json()));
        found.is_some()
    });
    let latest = site.upstream().latest_heartbeat();
    assert!(
        ok,
        "no heartbeat with {what} within {timeout:?}; latest: {latest:?}"
    );
    found.expect("heartbeat found")
}

/// Waits until the upstream totals equal `expected`, then checks they stay so and that the
/// summaries keep the contract.
fn assert_totals(site: &Site, expected: &Totals, timeout: Duration) {
    let up = site.upstream();
    let ok = wait_until(timeout, || up.totals() == *expected);
    let actual = up.totals();
    assert!(
        ok,
        "upstream totals differ from the peer's increments after {timeout:?}:\n{}\n{}",
        map_diff(expected, &actual),
        up.dump()
    );
    // Nothing more may arrive: no late double count, no re-issue that changes a window. The
    // pause is the check (longer than a window and its grace), not a wait.
    thread::sleep(Duration::from_millis(2_500));
    let later = up.totals();
    assert!(
        later == *expected,
        "upstream totals changed after matching:\n{}",
        map_diff(expected, &later)
    );
    let problems = up.summary_problems();
    assert!(
        problems.is_empty(),
        "summary contract problems:\n{}",
        problems.join("\n")
    );
    assert_daemon_running(site);
}

/// Movement started at `moving`: kill -9 the daemon at `KILL_AT`, start it again `DEAD_FOR`
/// later. Returns the wall clock (Unix ms) of the restart.
fn kill_and_restart(site: &Site, moving: Instant) -> i64 {
    // The kill lands at a moment of the peer's plan (the wall clock is what is waited for),
    // failing early if the daemon dies meanwhile.
    wait_every(Duration::from_millis(50), DEADLINE, || {
        assert_daemon_running(site);
        Instant::now() >= moving + KILL_AT
    });
    site.kill9_daemon();
    // The scenario: the daemon stays dead while the counters move.
    thread::sleep(DEAD_FOR);
    let restarted = now_ms();
    site.start_daemon();
    restarted
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn modbus_tcp_counters_exact_across_kill9() {
    require_python_deps();
    let b = Site::build("mb-tcp");
    let port = free_port();
    let port_arg = port.to_string();
    let mut peer = Peer::start(
        b.root(),
        &[
            OsStr::new("--mode"),
            OsStr::new("tcp"),
            OsStr::new("--port"),
            OsStr::new(&port_arg),
        ],
    );
    let gate = device("gate-1", Kind::Vehicle, Line::Tcp(port), 1, basic_points());
    let site = modbus_site(b, vec![gate]);
    site.start_daemon();
    // The baseline is the first value the daemon reads: only then may the counters move.
    wait_heartbeat(&site, "gate-1 online", 0, Duration::from_secs(20), |hb| {
        online(hb, "gate-1")
    });

    peer.start_moving();
    let moving = Instant::now();
    let restarted = kill_and_restart(&site, moving);
    wait_heartbeat(
        &site,
        "gate-1 online after the restart",
        restarted,
        Duration::from_secs(15),
        |hb| online(hb, "gate-1"),
    );

    let done = peer.wait_done(Duration::from_secs(RUN_SECS + 20));
    let expected: Totals = [
        (
            key("vehicle", "gate-1", "entry"),
            increments(&done, 1, "in_count"),
        ),
        (
            key("vehicle", "gate-1", "exit"),
            increments(&done, 1, "out_count"),
        ),
    ]
    .into_iter()
    .collect();
    // Sanity of the plan itself: in_count wrapped, out_count was reset.
    assert!(
        done["units"]["1"]["in_count"]["wraps"].as_u64() >= Some(1)
            && done["units"]["1"]["out_count"]["resets"].as_u64() >= Some(1),
        "the peer's plan did not wrap in_count and reset out_count: {done}"
    );
    eprintln!("peer truth (gate-1): {expected:?}");
    assert_totals(&site, &expected, Duration::from_secs(20));

    let done_ms = now_ms();
    let hb = wait_heartbeat(
        &site,
        "gate-1 online after the run",
        done_ms,
        Duration::from_secs(10),
        |hb| online(hb, "gate-1"),
    )
    .json();
    let entry = modbus_entry(&hb, "gate-1").expect("gate-1 entry");
    assert!(
        entry["states"]["barrier_open"].is_boolean(),
        "states.barrier_open is not a bool: {entry}"
    );
    let temp = entry["states"]["temp_c"]
        .as_f64()
        .unwrap_or_else(|| panic!("states.temp_c is not a number: {entry}"));
    assert!((temp - 21.5).abs() < 1e-6, "temp_c {temp} != 21.5: {entry}");
    // The peer froze its values: the state shown is the final coil.
    let final_coil = done["units"]["1"]["barrier_open"]["value"].clone();
    assert_eq!(
        entry["states"]["barrier_open"], final_coil,
        "barrier_open differs from the peer's final coil: {entry}"
    );
    assert!(
        entry["last_seen"].is_string(),
        "last_seen of an online device: {entry}"
    );
    assert!(entry["errors"].is_u64(), "errors is not a count: {entry}");
    assert_eq!(hb["devices"]["online"], 1, "devices in {hb}");
    assert_eq!(hb["devices"]["offline"], 0, "devices in {hb}");
    // The coil toggled every second: the heartbeats showed both values at some point.
    let seen: Vec<Value> = site
        .upstream()
        .on("heartbeat")
        .iter()
        .filter_map(|m| {
            modbus_entry(&m.json(), "gate-1").map(|e| e["states"]["barrier_open"].clone())
        })
        .collect();
    assert!(
        seen.contains(&Value::Bool(true)) && seen.contains(&Value::Bool(false)),
        "barrier_open never changed across {} heartbeats: {seen:?}",
        seen.len()
    );
}

#[test]
fn modbus_rtu_two_live_units_one_silent() {
    require_python_deps();
    require_socat();
    let b = Site::build("mb-rtu");
    let (_socat, tty_gw, tty_peer) = socat_pair(b.root());
    let mut peer = Peer::start(
        b.root(),
        &[
            OsStr::new("--mode"),
            OsStr::new("rtu"),
            OsStr::new("--serial"),
            tty_peer.as_os_str(),
        ],
    );
    let devices = [("door-a", 1), ("door-b", 2), ("door-c", 3)]
        .map(|(name, unit)| {
            let line = Line::Rtu(Some(&tty_gw));
            device(name, Kind::Access, line, unit, basic_points())
        })
        .to_vec();
    let site = modbus_site(b, devices);
    site.start_daemon();
    wait_heartbeat(
        &site,
        "door-a and door-b online",
        0,
        Duration::from_secs(20),
        |hb| online(hb, "door-a") && online(hb, "door-b"),
    );

    peer.start_moving();
    let moving = Instant::now();
    let restarted = kill_and_restart(&site, moving);
    let first = wait_heartbeat(
        &site,
        "door-a and door-b online after the restart",
        restarted,
        Duration::from_secs(15),
        |hb| online(hb, "door-a") && online(hb, "door-b"),
    );

    let done = peer.wait_done(Duration::from_secs(RUN_SECS + 20));
    let mut expected = Totals::new();
    for (name, unit) in [("door-a", 1), ("door-b", 2)] {
        expected.insert(
            key("access", name, "entry"),
            increments(&done, unit, "in_count"),
        );
        expected.insert(
            key("access", name, "exit"),
            increments(&done, unit, "out_count"),
        );
    }
    eprintln!("peer truth (door-a, door-b): {expected:?}");
    // door-c (unit 3) never answers: no row of it may appear.
    assert_totals(&site, &expected, Duration::from_secs(20));

    let last = wait_heartbeat(
        &site,
        "door-c offline, door-a and door-b online",
        now_ms(),
        Duration::from_secs(10),
        |hb| online(hb, "door-a") && online(hb, "door-b") && !online(hb, "door-c"),
    );
    let hb = last.json();
    let c = modbus_entry(&hb, "door-c").expect("door-c entry in the heartbeat");
    assert_eq!(c["online"], false, "door-c: {c}");
    assert!(
        c["errors"].as_u64().is_some_and(|n| n > 0),
        "door-c has no errors: {c}"
    );
    assert!(c["last_error"].is_string(), "door-c has no last_error: {c}");
    assert_eq!(hb["devices"]["online"], 2, "devices in {hb}");
    assert_eq!(hb["devices"]["offline"], 1, "devices in {hb}");

    // The silent unit must not stall the bus: between the two heartbeats (both from the
    // restarted daemon) door-a and door-b were each polled more often than door-c was tried
    // (it is backed off after each timeout, and the live units are served meanwhile). Counts
    // against counts, not against the clock: a loaded machine slows both alike.
    let first_hb = first.json();
    let c_first = modbus_entry(&first_hb, "door-c")
        .and_then(|d| d["errors"].as_u64())
        .unwrap_or(0);
    let c_tries = c["errors"].as_u64().unwrap_or(0).saturating_sub(c_first);
    for name in ["door-a", "door-b"] {
        let grew = polls(&hb, name).saturating_sub(polls(&first_hb, name));
        eprintln!("{name}: {grew} polls while door-c was tried {c_tries} times");
        assert!(
            grew > c_tries.max(1),
            "{name} was polled {grew} times while the silent door-c was tried {c_tries} times: \
             the silent unit stalls the bus?\nfirst: {first_hb}\nlast: {hb}"
        );
    }
}

#[test]
fn modbus_bad_config_names_key() {
    // Nothing runs: config files and check-config on them.
    let site = Site::build("mb-config")
        .no_device_broker()
        .no_district_broker()
        .unstarted()
        .start();
    let dir = site.root.as_path();
    let base = site.gw().config.clone();
    let tcp = Line::Tcp(free_port());

    let counter_f32 = counter_point("in_count", Table::Holding, 0, PointType::F32, "entry");
    let far_address = counter_point("in_count", Table::Holding, 70000, PointType::U16, "entry");
    let cases = [
        (
            "counter of type f32",
            device("gate-1", Kind::Vehicle, tcp, 1, vec![counter_f32]),
            "modbus.devices[0].points[0].type",
        ),
        (
            "RTU device without path",
            device("door-a", Kind::Access, Line::Rtu(None), 1, basic_points()),
            "modbus.devices[0].rtu.path",
        ),
        (
            "address 70000",
            device("gate-1", Kind::Vehicle, tcp, 1, vec![far_address]),
            "modbus.devices[0].points[0].address",
        ),
    ];
    for (i, (what, device, key_path)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("bad-{i}.toml"));
        let mut c = base.clone();
        c.modbus.devices = vec![device];
        write_config(&path, &c);
        let out = check_config(&path, dir);
        assert_eq!(
            out.status.code(),
            Some(78),
            "check-config with a {what}: {}\nstderr:\n{}",
            out.status,
            out.stderr
        );
        assert!(
            out.stderr.contains(key_path),
            "check-config with a {what}: stderr does not name {key_path}:\n{}",
            out.stderr
        );
    }

    // The same devices, valid, pass: the failures above come from the named keys alone.
    let good = dir.join("good.toml");
    let tty = dir.join("ttyGW");
    let mut c = base.clone();
    c.modbus.devices = vec![
        device("gate-1", Kind::Vehicle, tcp, 1, basic_points()),
        device(
            "door-a",
            Kind::Access,
            Line::Rtu(Some(&tty)),
            1,
            basic_points(),
        ),
    ];
    write_config(&good, &c);
    let out = check_config(&good, dir);
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config on a valid Modbus config: {}\nstderr:\n{}",
        out.status,
        out.stderr
    );
}
