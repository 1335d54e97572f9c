//! Shared, lock-light counters and device health, read by the heartbeat (and later the status
//! page and metrics). Written by the tasks that own each fact; nobody else computes them.

use crate::core::event::{Kind, Reject};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

/// How many recent rejects are kept for the status page.
pub const RECENT_REJECTS: usize = 50;

/// A rejected message as the status page shows it: never its subject or payload.
#[derive(Debug, Clone, Serialize)]
pub struct RejectNote {
    pub at_ms: i64,
    pub topic: String,
    pub reason: &'static str,
    /// Which rule, when the reason alone does not say (`unmapped`: the source and field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// What is known about one MQTT device.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceSeen {
    /// When it last sent an accepted event (0: never since start).
    pub last_seen_ms: i64,
    pub accepted: u64,
    pub rejected: u64,
    /// The reason its last rejected message was rejected.
    pub last_error: Option<&'static str>,
    /// Flagged `clock_skew`: its latest event was stamped this far (ms) beyond
    /// `max_future_skew` ahead of the trusted gateway clock, and counted at receipt.
    pub clock_ahead_ms: Option<i64>,
}

/// Why a device left the device table (`zhian_devices_forgotten_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    /// `health.max_devices` was reached and it was the longest silent.
    Bound,
    /// The `[[mqtt.sources]]` entry it was learned through is gone or changed (SIGHUP, start).
    Unmapped,
    /// `zhian-gateway devices forget`.
    Installer,
}

impl Forgotten {
    pub const ALL: [Forgotten; 3] = [Forgotten::Bound, Forgotten::Unmapped, Forgotten::Installer];

    pub fn as_str(self) -> &'static str {
        match self {
            Forgotten::Bound => "bound",
            Forgotten::Unmapped => "unmapped",
            Forgotten::Installer => "installer",
        }
    }
}

/// Health of one Modbus device: the one place the heartbeat and status page read it from.
#[derive(Debug, Clone, Default)]
pub struct ModbusHealth {
    pub kind: Kind,
    pub online: bool,
    pub polls: u64,
    pub errors: u64,
    pub fails_in_row: u32,
    pub last_error: Option<String>,
    pub last_seen_ms: Option<i64>,
    /// Events counted from this device's counters since start.
    pub counted: u64,
    /// Counter readings dropped as misreads by the glitch rule since start.
    pub glitches: u64,
    pub last_count_ms: Option<i64>,
    /// Latest value of each state point.
    pub states: BTreeMap<String, crate::core::counter::Value>,
}

/// A camera incident sent upstream as an alert, as the status page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct AlertNote {
    pub at_ms: i64,
    pub kind: Kind,
    pub device: String,
    pub action: String,
    pub id: String,
    pub ts_ms: i64,
}

/// How many recent alerts are kept for the status page.
pub const RECENT_ALERTS: usize = 50;

#[derive(Debug)]
pub struct Stats {
    pub started: Instant,
    pub received: AtomicU64,
    accepted: [AtomicU64; 3],
    duplicate: [AtomicU64; 3],
    rejected: [AtomicU64; Reject::ALL.len()],
    /// Rejects per kind: access, camera, vehicle, and unknown (no valid topic).
    rejected_kind: [AtomicU64; 4],
    /// Store write transactions (fsync included).
    pub commit_seconds: prometheus_client::metrics::histogram::Histogram,
    /// From queueing a publish upstream to its PUBACK.
    pub publish_seconds: prometheus_client::metrics::histogram::Histogram,
    /// Per committed batch: how long its first message waited from arriving at the committer
    /// to being committed and acknowledged (the longest acknowledgement delay in the batch).
    pub ack_wait_seconds: prometheus_client::metrics::histogram::Histogram,
    /// The longest such wait since start (ms).
    pub ack_wait_max_ms: AtomicU64,
    /// Core tasks that stopped while the daemon was not shutting down.
    down: Mutex<Vec<&'static str>>,
    recent_alerts: Mutex<VecDeque<AlertNote>>,
    pub commits: AtomicU64,
    /// Monotonic time (ms since `started`, +1) of the committer's latest loop turn: it turns
    /// at least every tick (≤ 1 s), so a stale value means the pipeline is stuck (the input of
    /// the systemd watchdog and `/healthz`). 0: never turned.
    pub committer_alive: std::sync::atomic::AtomicI64,
    pub commit_micros_total: AtomicU64,
    pub upstream_connected: AtomicBool,
    /// The district connection epoch in use (or last used): see [`crate::epoch`].
    pub upstream_epoch: AtomicU64,
    /// 1 while connected to the site (device) broker.
    pub site_connected: AtomicBool,
    pub upstream_published: AtomicU64,
    /// The packet limit summaries are sent under: `upstream.max_packet_size`, or the smaller
    /// one learned from the district broker.
    pub upstream_max_packet: AtomicU64,
    /// The packet limit learned from the district broker (it closed the connection on a larger
    /// publish), 0 while none was learned. Kept for the life of the process.
    pub upstream_learned_max_packet: AtomicU64,
    pub outbox_pending: AtomicU64,
    /// Outbox entries parked (the district broker kept refusing them).
    pub outbox_parked: AtomicU64,
    pub store_bytes: AtomicU64,
    devices: Mutex<BTreeMap<(Kind, String), DeviceSeen>>,
    modbus: Mutex<BTreeMap<String, ModbusHealth>>,
    recent_rejects: Mutex<VecDeque<RejectNote>>,
    /// Why intake is paused (nothing is acknowledged meanwhile), if it is.
    paused: Mutex<Option<Paused>>,
    /// False while the gateway clock is not trusted: the Modbus input stamps nothing.
    pub clock_trusted: AtomicBool,
    /// The store clock less the wall clock, ms (positive after a step back, negative while a
    /// step forward is held; see `core::clock::StoreClock`). The Modbus input adds it to the
    /// time it stamps readings with, so they land in the windows the store is on.
    pub clock_offset_ms: AtomicI64,
    /// What is wrong with the site (device) broker's answer to our subscription, if anything.
    site_problem: Mutex<Option<String>>,
    /// The `[health]` rules (replaced on SIGHUP).
    cadence: std::sync::RwLock<std::sync::Arc<crate::config::Cadence>>,
    /// Per link (site, district): connected or not, since when, why.
    links: Mutex<BTreeMap<crate::link::Link, LinkState>>,
    /// Per link (site, district): a connection failure that needs an operator.
    link_problems: Mutex<BTreeMap<crate::link::Link, crate::link::Problem>>,
    /// A store file this run moved aside as damaged, and why.
    pub quarantined: Mutex<Option<crate::store::damage::Quarantined>>,
    /// The care watch, as the page shows it.
    care: Mutex<Vec<crate::core::care::CareLine>>,
    /// Keys the key dir lost that still matter (committer, each tick).
    keys_lost: Mutex<Vec<crate::keys::KeyLoss>>,
    /// Where the running config came from (the fleet link sets it).
    config_view: Mutex<ConfigView>,
    /// Vehicles inside (the committer, each tick); `None` while `[occupancy]` is off.
    occupancy: Mutex<Option<OccupancyView>>,
    /// Devices forgotten since start, per [`Forgotten`] reason.
    devices_forgotten: [AtomicU64; 3],
    /// Events stamped beyond `max_future_skew` ahead of the trusted gateway clock and counted
    /// at receipt, per kind.
    counted_at_receipt: [AtomicU64; 3],
    /// Status page: failed logins, and requests refused by the per-address rate limit.
    pub http_auth_failures: AtomicU64,
    pub http_rate_limited: AtomicU64,
}

/// Where the running config came from (contract: "Fleet configuration"), for the page and
/// `/api/status`: the installer's file alone, or with a fleet overlay (its serial, whether on
/// probation, the keys it sets), and the last change rolled back or refused.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConfigView {
    /// `file` or `fleet`.
    pub source: &'static str,
    /// The fleet serial in force (on probation or applied).
    pub serial: Option<u64>,
    /// `probation` or `applied`.
    pub state: Option<&'static str>,
    /// When the box took the change in force (RFC 3339).
    pub since: Option<String>,
    /// The key paths the overlay sets.
    pub keys: Vec<String>,
    /// Fingerprints of the trusted fleet keys (`None`: remote configuration is off).
    pub trust: Option<String>,
    pub rolled_back: Option<ConfigEvent>,
    pub rejected: Option<ConfigEvent>,
    /// Why the recorded fleet overlay is not in force (the installer's file no longer takes
    /// it, or `fleet.json` cannot be read): the box runs its file alone.
    pub problem: Option<String>,
}

impl Default for ConfigView {
    fn default() -> Self {
        ConfigView {
            source: "file",
            serial: None,
            state: None,
            since: None,
            keys: Vec::new(),
            trust: None,
            rolled_back: None,
            rejected: None,
            problem: None,
        }
    }
}

/// Long stays listed on the page and in `/api/status` (the oldest first; the count is whole).
pub const LONG_STAYS_LISTED: usize = 50;

/// Vehicles inside (实有车辆, contract: "Vehicles inside"), as `/api/status` shows them under
/// `occupancy`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OccupancyView {
    /// Vehicles inside: the presence set plus the last stocktake's adjustment, never below 0.
    pub inside: u64,
    /// `occupancy.capacity` (spaces).
    pub capacity: Option<u64>,
    /// Free spaces: capacity − inside, never below 0.
    pub free: Option<u64>,
    /// Stays at least `occupancy.long_stay` old.
    pub long_stay: u64,
    /// The oldest [`LONG_STAYS_LISTED`] of those stays, oldest first: plate masked to two and
    /// two characters, entry time, gate (`long_stay` counts them all).
    pub long_stays: Vec<LongStay>,
    /// Stays dropped past `occupancy.max_stay` (cumulative).
    pub missed_exits: u64,
    /// Exits with no known entry (cumulative).
    pub unmatched_exits: u64,
    /// Vehicles in the presence set (without the stocktake's adjustment).
    pub in_set: u64,
    /// The last stocktake: (counted, when, ms).
    #[serde(skip)]
    pub stocktake: Option<(u64, i64)>,
    /// When the last stocktake was recorded (RFC 3339) and what was counted.
    pub stocktake_at: Option<String>,
    pub stocktake_count: Option<u64>,
    /// The last stocktake's adjustment (counted − set size then).
    pub adjust: i64,
}

/// One long stay on the page.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LongStay {
    /// Masked: its first two and last two characters.
    pub plate: String,
    #[serde(skip)]
    pub entry_ms: i64,
    /// Entry time, RFC 3339.
    pub entry: String,
    pub gate: String,
}

/// A fleet change rolled back or refused: its serial, why, when (RFC 3339).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ConfigEvent {
    pub serial: u64,
    pub reason: String,
    pub at: String,
}

/// One broker connection (`site`: the device broker; `district`: upstream), as the page, the API
/// and `/healthz` show it.
#[derive(Debug, Clone, Serialize)]
pub struct LinkState {
    /// The broker's URL (no credentials: they are separate keys).
    pub url: String,
    pub connected: bool,
    /// Wall clock (Unix ms) since when it has been connected, or not.
    pub since_ms: i64,
    /// Why not connected: one of `link::DOWN_REASONS`.
    pub reason: Option<&'static str>,
    /// The last error, as the MQTT client reported it (English; for the log and `?lang=en`).
    pub error: Option<String>,
    /// Failed attempts since it went down.
    pub attempts: u64,
    /// When the last WARN about it was logged (wall ms), for the reminder rate.
    #[serde(skip)]
    pub warned_ms: i64,
    /// Whether it has connected at least once since start.
    #[serde(skip)]
    pub ever_connected: bool,
}

/// What a link report changed, so the caller logs each state change once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkChange {
    /// Nothing new (another failed attempt while down): DEBUG.
    Same,
    /// It went down (or failed its first attempt), or has been down another
    /// `REMIND_EVERY_MS`: WARN.
    Down,
    /// Still down, for another reason now (the broker's port closed after the connection
    /// was lost, say): DEBUG, like every failed attempt.
    Reason,
    /// It came up after `down_ms` (`first`: the first time since start): INFO.
    Up { down_ms: i64, first: bool },
}

/// Why intake pauses (the `reason` label of `zhian_intake_paused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    /// The store's disk is full (ENOSPC, EDQUOT).
    DiskFull,
    /// The store's disk fails writes (EIO, EROFS, ...).
    DiskError,
    /// The gateway clock cannot be trusted.
    ClockUntrusted,
}

impl PauseReason {
    /// Every reason, in label order.
    pub const ALL: [PauseReason; 3] = [
        PauseReason::DiskFull,
        PauseReason::DiskError,
        PauseReason::ClockUntrusted,
    ];

    /// The label value: `disk_full`, `disk_error`, `clock_untrusted`.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::DiskFull => "disk_full",
            PauseReason::DiskError => "disk_error",
            PauseReason::ClockUntrusted => "clock_untrusted",
        }
    }

    /// A disk's fault (full or failing): one pause while the errno moves between them.
    pub fn is_disk(self) -> bool {
        matches!(self, PauseReason::DiskFull | PauseReason::DiskError)
    }
}

impl std::fmt::Display for PauseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Intake paused: devices' messages wait unacknowledged in the site broker.
#[derive(Debug, Clone, Serialize)]
pub struct Paused {
    pub reason: PauseReason,
    /// The error, as the store reported it.
    pub detail: String,
    /// Wall clock (Unix ms) when intake paused.
    pub since_ms: i64,
}

/// Marks its task down when dropped before the stop token was cancelled.
pub struct TaskGuard {
    stats: std::sync::Arc<Stats>,
    name: &'static str,
    stop: tokio_util::sync::CancellationToken,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if !self.stop.is_cancelled() {
            tracing::error!(task = self.name, "core task stopped unexpectedly");
            self.stats.down.lock().map(|mut d| d.push(self.name)).ok();
        }
    }
}

fn kind_index(k: Kind) -> usize {
    match k {
        Kind::Access => 0,
        Kind::Camera => 1,
        Kind::Vehicle => 2,
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            started: Instant::now(),
            received: AtomicU64::new(0),
            accepted: Default::default(),
            duplicate: Default::default(),
            rejected: Default::default(),
            rejected_kind: Default::default(),
            commit_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0005, 2.0, 14),
            ),
            // 1 ms to about 9 h: a PUBACK that waited out a district outage still lands in a
            // bucket, not only in +Inf.
            publish_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 25),
            ),
            ack_wait_seconds: prometheus_client::metrics::histogram::Histogram::new([
                0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 1.9, 2.0, 3.0, 5.0,
            ]),
            ack_wait_max_ms: AtomicU64::new(0),
            down: Mutex::new(Vec::new()),
            recent_alerts: Mutex::new(VecDeque::new()),
            commits: AtomicU64::new(0),
            committer_alive: std::sync::atomic::AtomicI64::new(0),
            commit_micros_total: AtomicU64::new(0),
            upstream_connected: AtomicBool::new(false),
            upstream_epoch: AtomicU64::new(0),
            site_connected: AtomicBool::new(false),
            upstream_published: AtomicU64::new(0),
            upstream_max_packet: AtomicU64::new(0),
            upstream_learned_max_packet: AtomicU64::new(0),
            outbox_pending: AtomicU64::new(0),
            outbox_parked: AtomicU64::new(0),
            store_bytes: AtomicU64::new(0),
            devices: Mutex::new(BTreeMap::new()),
            modbus: Mutex::new(BTreeMap::new()),
            recent_rejects: Mutex::new(VecDeque::new()),
            paused: Mutex::new(None),
            clock_trusted: AtomicBool::new(true),
            clock_offset_ms: AtomicI64::new(0),
            site_problem: Mutex::new(None),
            link_problems: Mutex::new(BTreeMap::new()),
            links: Mutex::new(BTreeMap::new()),
            cadence: Default::default(),
            quarantined: Mutex::new(None),
            devices_forgotten: Default::default(),
            counted_at_receipt: Default::default(),
            care: Mutex::new(Vec::new()),
            keys_lost: Mutex::new(Vec::new()),
            config_view: Mutex::new(ConfigView::default()),
            occupancy: Mutex::new(None),
            http_auth_failures: AtomicU64::new(0),
            http_rate_limited: AtomicU64::new(0),
        }
    }
}

/// A copy of the counters, for the heartbeat.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CounterSnapshot {
    pub received: u64,
    pub accepted: u64,
    pub duplicate: u64,
    pub rejected: u64,
    pub rejected_by_reason: BTreeMap<&'static str, u64>,
    /// Store write transactions, and their mean duration (fsync included).
    pub commits: u64,
    pub commit_avg_us: u64,
    /// The longest a device message waited for its commit and acknowledgement (ms).
    pub ack_wait_max_ms: u64,
    /// Devices forgotten since start: `bound` (`health.max_devices`), `unmapped` (their source
    /// changed), `installer` (`devices forget`).
    pub devices_forgotten: BTreeMap<&'static str, u64>,
    /// Events stamped beyond `max_future_skew` ahead of the trusted gateway clock, counted at
    /// receipt (their devices are flagged `clock_skew`).
    pub counted_at_receipt: u64,
}

impl From<CounterSnapshot> for zhian_proto::Counters {
    /// The heartbeat's `counters` (contract: "Upstream", heartbeat).
    fn from(c: CounterSnapshot) -> Self {
        let names = |m: BTreeMap<&'static str, u64>| {
            m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
        };
        zhian_proto::Counters {
            received: c.received,
            accepted: c.accepted,
            duplicate: c.duplicate,
            rejected: c.rejected,
            rejected_by_reason: names(c.rejected_by_reason),
            commits: c.commits,
            commit_avg_us: c.commit_avg_us,
            ack_wait_max_ms: c.ack_wait_max_ms,
            devices_forgotten: names(c.devices_forgotten),
            counted_at_receipt: c.counted_at_receipt,
        }
    }
}

impl Stats {
    pub fn accepted(&self, kind: Kind, device: &str, now_ms: i64) {
        self.accepted[kind_index(kind)].fetch_add(1, Relaxed);
        let mut d = self.devices.lock().expect("devices lock");
        let e = d.entry((kind, device.to_string())).or_default();
        e.last_seen_ms = e.last_seen_ms.max(now_ms);
        e.accepted += 1;
    }

    /// `device` left the device table (page, API, metrics, heartbeat) for `why`.
    pub fn forget_device(&self, kind: Kind, device: &str, why: Forgotten) {
        self.devices_forgotten[why as usize].fetch_add(1, Relaxed);
        self.devices
            .lock()
            .expect("devices lock")
            .remove(&(kind, device.to_string()));
    }

    /// Devices forgotten since start for `why`.
    pub fn forgotten_of(&self, why: Forgotten) -> u64 {
        self.devices_forgotten[why as usize].load(Relaxed)
    }

    /// An accepted event of `kind` was counted at receipt (stamped too far ahead).
    pub fn counted_at_receipt(&self, kind: Kind) {
        self.counted_at_receipt[kind_index(kind)].fetch_add(1, Relaxed);
    }

    /// Events of `kind` counted at receipt since start.
    pub fn counted_at_receipt_of(&self, kind: Kind) -> u64 {
        self.counted_at_receipt[kind_index(kind)].load(Relaxed)
    }

    /// Flag a known device `clock_skew` (`Some(ms ahead)`) or lower its flag.
    pub fn set_clock_skew(&self, kind: Kind, device: &str, ahead_ms: Option<i64>) {
        if let Some(d) = self
            .devices
            .lock()
            .expect("devices lock")
            .get_mut(&(kind, device.to_string()))
        {
            d.clock_ahead_ms = ahead_ms;
        }
    }

    /// `n` events produced by a Modbus counter of `device`.
    pub fn counted(&self, kind: Kind, device: &str, n: u64, now_ms: i64) {
        self.accepted[kind_index(kind)].fetch_add(n, Relaxed);
        if n > 0 {
            let mut m = self.modbus.lock().expect("modbus lock");
            if let Some(h) = m.get_mut(device) {
                h.counted += n;
                h.last_count_ms = Some(now_ms);
            }
        }
    }

    /// Register a Modbus device (offline until its first good poll).
    pub fn modbus_register(&self, name: &str, kind: Kind) {
        self.modbus
            .lock()
            .expect("modbus lock")
            .entry(name.to_string())
            .or_insert_with(|| ModbusHealth {
                kind,
                ..ModbusHealth::default()
            });
    }

    /// Forget the health of Modbus devices not in `names` (after a reload removed them).
    pub fn modbus_retain<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let keep: std::collections::BTreeSet<&str> = names.into_iter().collect();
        self.modbus
            .lock()
            .expect("modbus lock")
            .retain(|n, _| keep.contains(n.as_str()));
    }

    /// Update a Modbus device's health.
    pub fn modbus_update(&self, name: &str, f: impl FnOnce(&mut ModbusHealth)) {
        if let Some(h) = self.modbus.lock().expect("modbus lock").get_mut(name) {
            f(h);
        }
    }

    pub fn modbus(&self) -> BTreeMap<String, ModbusHealth> {
        self.modbus.lock().expect("modbus lock").clone()
    }

    pub fn duplicate(&self, kind: Kind) {
        self.duplicate[kind_index(kind)].fetch_add(1, Relaxed);
    }

    pub fn rejected(&self, reason: Reject, topic: &str, now_ms: i64) {
        self.rejected_because(reason, topic, None, now_ms)
    }

    /// As [`Stats::rejected`], with the rule that failed.
    pub fn rejected_because(&self, reason: Reject, topic: &str, detail: Option<&str>, now_ms: i64) {
        self.rejected[reason.index()].fetch_add(1, Relaxed);
        let parsed = crate::core::event::parse_topic(topic);
        let k = parsed.map_or(3, |(kind, _)| kind_index(kind));
        self.rejected_kind[k].fetch_add(1, Relaxed);
        // Only a device already known carries its rejects: a rejected message never creates
        // one (a flood of invented ids would otherwise grow the page and the metrics).
        if let Ok((kind, device)) = parsed {
            let mut d = self.devices.lock().expect("devices lock");
            if let Some(e) = d.get_mut(&(kind, device.to_string())) {
                e.rejected += 1;
                e.last_error = Some(reason.as_str());
            }
        }
        let mut r = self.recent_rejects.lock().expect("rejects lock");
        if r.len() >= RECENT_REJECTS {
            r.pop_front();
        }
        r.push_back(RejectNote {
            at_ms: now_ms,
            topic: topic.chars().take(200).collect(),
            reason: reason.as_str(),
            detail: detail.map(|d| d.chars().take(300).collect()),
        });
    }

    /// Rejected messages of a kind (`None`: topic without a valid kind).
    pub fn rejected_kind_of(&self, kind: Option<Kind>) -> u64 {
        self.rejected_kind[kind.map_or(3, kind_index)].load(Relaxed)
    }

    pub fn alert(&self, note: AlertNote) {
        let mut r = self.recent_alerts.lock().expect("alerts lock");
        if r.len() >= RECENT_ALERTS {
            r.pop_front();
        }
        r.push_back(note);
    }

    pub fn recent_alerts(&self) -> Vec<AlertNote> {
        self.recent_alerts
            .lock()
            .expect("alerts lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Guard for a core task: if it ends (or panics) before `stop` is cancelled, the pipeline
    /// is marked unhealthy (`/healthz` answers 503, the watchdog stops being fed).
    pub fn task_guard(
        self: &std::sync::Arc<Self>,
        name: &'static str,
        stop: tokio_util::sync::CancellationToken,
    ) -> TaskGuard {
        TaskGuard {
            stats: self.clone(),
            name,
            stop,
        }
    }

    /// A batch was committed and acknowledged `waited_ms` after its first message arrived.
    pub fn ack_wait(&self, waited_ms: i64) {
        let ms = waited_ms.max(0) as u64;
        self.ack_wait_seconds.observe(ms as f64 / 1000.0);
        self.ack_wait_max_ms.fetch_max(ms, Relaxed);
    }

    /// Record a committer loop turn (monotonic).
    pub fn committer_turned(&self) {
        self.committer_alive
            .store(self.started.elapsed().as_millis() as i64 + 1, Relaxed);
    }

    /// Milliseconds since the committer last turned (None: never).
    pub fn committer_idle_ms(&self) -> Option<i64> {
        let last = self.committer_alive.load(Relaxed);
        (last > 0).then(|| self.started.elapsed().as_millis() as i64 + 1 - last)
    }

    /// Core tasks that died; empty while the pipeline runs.
    pub fn down(&self) -> Vec<&'static str> {
        self.down.lock().expect("down lock").clone()
    }

    pub fn accepted_of(&self, kind: Kind) -> u64 {
        self.accepted[kind_index(kind)].load(Relaxed)
    }

    pub fn duplicate_of(&self, kind: Kind) -> u64 {
        self.duplicate[kind_index(kind)].load(Relaxed)
    }

    pub fn rejected_of(&self, reason: Reject) -> u64 {
        self.rejected[reason.index()].load(Relaxed)
    }

    pub fn counters(&self) -> CounterSnapshot {
        let commits = self.commits.load(Relaxed);
        let rejected_by_reason: BTreeMap<_, _> = Reject::ALL
            .iter()
            .map(|r| (r.as_str(), self.rejected_of(*r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        CounterSnapshot {
            received: self.received.load(Relaxed),
            accepted: Kind::ALL.iter().map(|k| self.accepted_of(*k)).sum(),
            duplicate: Kind::ALL.iter().map(|k| self.duplicate_of(*k)).sum(),
            rejected: rejected_by_reason.values().sum(),
            rejected_by_reason,
            commits,
            commit_avg_us: self.commit_micros_total.load(Relaxed) / commits.max(1),
            ack_wait_max_ms: self.ack_wait_max_ms.load(Relaxed),
            devices_forgotten: Forgotten::ALL
                .iter()
                .map(|f| (f.as_str(), self.forgotten_of(*f)))
                .collect(),
            counted_at_receipt: Kind::ALL
                .iter()
                .map(|k| self.counted_at_receipt_of(*k))
                .sum(),
        }
    }

    pub fn devices(&self) -> BTreeMap<(Kind, String), DeviceSeen> {
        self.devices.lock().expect("devices lock").clone()
    }

    /// Pause intake for `reason` (kept from the first failure while it lasts).
    pub fn pause(&self, reason: PauseReason, detail: String, now_ms: i64) {
        let mut p = self.paused.lock().expect("paused lock");
        match p.as_mut() {
            // One pause, even as the errno moves between ENOSPC and EIO: keep its start.
            Some(cur) if cur.reason == reason || (cur.reason.is_disk() && reason.is_disk()) => {
                cur.reason = reason;
                cur.detail = detail;
            }
            _ => {
                *p = Some(Paused {
                    reason,
                    detail,
                    since_ms: now_ms,
                })
            }
        }
    }

    /// Set (or clear) `link`'s problem. Returns true if it changed (log it at ERROR then).
    pub fn set_link_problem(
        &self,
        link: crate::link::Link,
        p: Option<crate::link::Problem>,
    ) -> bool {
        let mut m = self.link_problems.lock().expect("links lock");
        match p {
            Some(p) => m.insert(link, p.clone()).as_ref() != Some(&p),
            None => m.remove(&link).is_some(),
        }
    }

    /// Links with a problem that needs an operator.
    pub fn link_problems(&self) -> BTreeMap<crate::link::Link, crate::link::Problem> {
        self.link_problems.lock().expect("links lock").clone()
    }

    /// The `[health]` rules in force.
    pub fn cadence(&self) -> std::sync::Arc<crate::config::Cadence> {
        self.cadence.read().expect("cadence lock").clone()
    }

    /// The care watch as the store has it (committer, each tick).
    pub fn set_care(&self, list: Vec<crate::core::care::CareLine>) {
        *self.care.lock().expect("care lock") = list;
    }

    /// The care watch, as the page shows it.
    pub fn care(&self) -> Vec<crate::core::care::CareLine> {
        self.care.lock().expect("care lock").clone()
    }

    /// The keys the key dir lost that still matter, as the store has them (committer, each
    /// tick).
    pub fn set_keys_lost(&self, lost: Vec<crate::keys::KeyLoss>) {
        *self.keys_lost.lock().expect("keys lock") = lost;
    }

    /// The keys the key dir lost that still matter (page, `/api/status`, metrics).
    pub fn keys_lost(&self) -> Vec<crate::keys::KeyLoss> {
        self.keys_lost.lock().expect("keys lock").clone()
    }

    /// Where the running config came from (the fleet link, at start and at each step).
    pub fn set_config_view(&self, v: ConfigView) {
        *self.config_view.lock().expect("config lock") = v;
    }

    /// Where the running config came from (page, `/api/status`, metrics).
    pub fn config_view(&self) -> ConfigView {
        self.config_view.lock().expect("config lock").clone()
    }

    /// Vehicles inside as the store has them (committer, each tick).
    pub fn set_occupancy(&self, v: Option<OccupancyView>) {
        *self.occupancy.lock().expect("occupancy lock") = v;
    }

    /// Vehicles inside (page, `/api/status`, metrics).
    pub fn occupancy(&self) -> Option<OccupancyView> {
        self.occupancy.lock().expect("occupancy lock").clone()
    }

    /// Put new `[health]` rules in force (start, SIGHUP).
    pub fn set_cadence(&self, c: crate::config::Cadence) {
        *self.cadence.write().expect("cadence lock") = std::sync::Arc::new(c);
    }

    /// A device the store remembers from before this start, last seen at `last_seen_ms`.
    pub fn remember_device(&self, kind: Kind, device: &str, last_seen_ms: i64) {
        let mut d = self.devices.lock().expect("devices lock");
        let e = d.entry((kind, device.to_string())).or_default();
        e.last_seen_ms = e.last_seen_ms.max(last_seen_ms);
    }

    /// A link starts (before its first attempt): down, `connecting`, since `now_ms`.
    pub fn link_start(&self, link: crate::link::Link, url: &str, now_ms: i64) {
        self.links.lock().expect("links lock").insert(
            link,
            LinkState {
                url: url.to_string(),
                connected: false,
                since_ms: now_ms,
                reason: Some("connecting"),
                error: None,
                attempts: 0,
                warned_ms: 0,
                ever_connected: false,
            },
        );
    }

    /// `link` connected (CONNACK).
    pub fn link_up(&self, link: crate::link::Link, now_ms: i64) -> LinkChange {
        if link == crate::link::Link::Site {
            self.site_connected.store(true, Relaxed);
        } else {
            self.upstream_connected.store(true, Relaxed);
        }
        let mut m = self.links.lock().expect("links lock");
        let Some(l) = m.get_mut(&link) else {
            return LinkChange::Same;
        };
        if l.connected {
            return LinkChange::Same;
        }
        let down_ms = now_ms - l.since_ms;
        let first = !l.ever_connected;
        l.ever_connected = true;
        l.connected = true;
        l.since_ms = now_ms;
        l.reason = None;
        l.error = None;
        l.attempts = 0;
        LinkChange::Up { down_ms, first }
    }

    /// A connection attempt of `link` failed, or the connection was lost.
    pub fn link_down(
        &self,
        link: crate::link::Link,
        reason: &'static str,
        error: String,
        now_ms: i64,
    ) -> LinkChange {
        if link == crate::link::Link::Site {
            self.site_connected.store(false, Relaxed);
        } else {
            self.upstream_connected.store(false, Relaxed);
        }
        let mut m = self.links.lock().expect("links lock");
        let Some(l) = m.get_mut(&link) else {
            return LinkChange::Same;
        };
        let change = if l.connected
            || l.reason == Some("connecting")
            || now_ms - l.warned_ms >= crate::link::REMIND_EVERY_MS
        {
            l.warned_ms = now_ms;
            LinkChange::Down
        } else if l.reason != Some(reason) {
            LinkChange::Reason
        } else {
            LinkChange::Same
        };
        if l.connected {
            l.since_ms = now_ms;
            l.attempts = 0;
        }
        l.connected = false;
        l.reason = Some(reason);
        l.error = Some(error);
        l.attempts += 1;
        change
    }

    /// Both links' state.
    pub fn links(&self) -> BTreeMap<crate::link::Link, LinkState> {
        self.links.lock().expect("links lock").clone()
    }

    /// Set (or clear) what is wrong with the site broker's subscription grant.
    pub fn set_site_problem(&self, p: Option<String>) {
        *self.site_problem.lock().expect("site lock") = p;
    }

    /// What is wrong with the site broker's subscription grant, if anything.
    pub fn site_problem(&self) -> Option<String> {
        self.site_problem.lock().expect("site lock").clone()
    }

    /// Intake runs again; returns what the pause was.
    pub fn resume(&self) -> Option<Paused> {
        self.paused.lock().expect("paused lock").take()
    }

    /// Why intake is paused, if it is.
    pub fn paused(&self) -> Option<Paused> {
        self.paused.lock().expect("paused lock").clone()
    }

    pub fn recent_rejects(&self) -> Vec<RejectNote> {
        self.recent_rejects
            .lock()
            .expect("rejects lock")
            .iter()
            .cloned()
            .collect()
    }
}
