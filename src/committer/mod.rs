//! The committer: the only writer of the store. Group-commits what the inputs hand it, then
//! acknowledges each message to its source, in arrival order, only after the commit.
//!
//! It runs on a blocking thread (redb and fsync are synchronous) and takes work from one bounded
//! channel, so a slow disk slows the inputs down instead of growing memory. When to commit is
//! [`CommitPolicy`]'s call (flash wear against acknowledgement delay; see that module).
//!
//! A full or failing disk (ENOSPC, EIO) never stops it: the failed batch is kept and nothing of
//! it is acknowledged, intake pauses (the page, metrics, heartbeat and `/healthz` say why), the
//! store is reopened and the same batch retried with backoff until a write succeeds.

use crate::backoff::Backoff;
use crate::clock::now_ms;
use crate::config::OnDamage;
use crate::core::clock::{ClockTrust, Flag, Step, StoreClock};
use crate::core::commit_policy::{Batch, CommitPolicy};
use crate::core::commit_schedule::{ClockCheck, Schedule};
use crate::core::devices::{device_key, split_key};
use crate::core::engine::{CounterReading, Engine, Input, Outcome};
use crate::core::event::{Event, Reject};
use crate::devices::SourceMarks;
use crate::stats::{AlertNote, Forgotten, Stats};
use crate::store::{
    damage, CommitReport, OutboxKey, Retention, StateUpdate, StoreError, StoreWriter,
};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

mod clock;
mod devices;

/// Called once the message's outcome is committed (for MQTT: sends the PUBACK).
pub struct Ack(Box<dyn FnOnce() + Send>);

impl Ack {
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Ack(Box::new(f))
    }

    /// One ack per event of a message that holds `n` (a vendor batch, `each`): the message's
    /// own ack runs when the last of them runs, i.e. once every event's outcome is committed.
    /// One that is dropped unrun (intake stopping) leaves the message unacknowledged, and the
    /// broker redelivers it (each event then deduplicated by its own id).
    pub fn split(self, n: usize) -> Vec<Ack> {
        if n <= 1 {
            return vec![self];
        }
        let shared = std::sync::Arc::new((
            std::sync::atomic::AtomicUsize::new(n),
            std::sync::Mutex::new(Some(self)),
        ));
        (0..n)
            .map(|_| {
                let shared = shared.clone();
                Ack::new(move || {
                    if shared.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                        let ack = shared.1.lock().unwrap_or_else(|e| e.into_inner()).take();
                        if let Some(ack) = ack {
                            (ack.0)();
                        }
                    }
                })
            })
            .collect()
    }
}

/// One message from an input.
pub enum Intake {
    /// A valid event, to be deduplicated, stored and counted. `topic` is the one it came on
    /// (for the recent-rejects list, should the engine reject it as too late or too early).
    Event {
        event: Event,
        topic: String,
        ack: Option<Ack>,
    },
    /// A message that broke a rule; counted and acknowledged, never stored. `detail` says which
    /// rule, where there is more to say than the reason (a vendor source's field, `unmapped`).
    Rejected {
        reason: Reject,
        topic: String,
        detail: Option<String>,
        ack: Option<Ack>,
    },
    /// One Modbus poll's values that changed (or were read for the first time since start):
    /// counters become counts, states are kept, all in the batch's transaction.
    Reading {
        counters: Vec<CounterReading>,
        states: Vec<StateUpdate>,
    },
}

impl Intake {
    fn take_ack(&mut self) -> Option<Ack> {
        match self {
            Intake::Event { ack, .. } | Intake::Rejected { ack, .. } => ack.take(),
            Intake::Reading { .. } => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct CommitterCfg {
    pub batch_max: usize,
    /// `store.batch_linger`: the longest a message waits for its commit.
    pub linger: Duration,
    /// `mqtt.max_inflight` (0: learn it).
    pub max_inflight: u32,
    /// How often idle maintenance (closing due windows, purges, the size bound) is considered.
    pub tick: Duration,
    pub retention: Retention,
    /// `store.max_size` in bytes.
    pub max_bytes: u64,
    pub on_damage: OnDamage,
    /// MQTT device input is on: the care watch waits for the site link (see `care_hold`).
    pub site_input: bool,
}

/// PUBACKed outbox entries wait this long for a batch to ride with before they get a commit of
/// their own (a crash before it only re-sends them; the platform keeps the highest rev).
pub const ACK_LINGER: Duration = Duration::from_secs(5);

/// The care watch raises no `silent` notice until the site link has been up this long (and
/// never while it is down or intake is paused): the messages queued on the site broker while
/// the gateway was away arrive first. Found by a break-it run: a restart after downtime sent
/// `silent` notices for residents whose passes were still queued, then `seen` ones.
pub const CARE_SETTLE: Duration = Duration::from_secs(20);

pub struct Committer {
    pub writer: StoreWriter,
    pub engine: Engine,
    pub cfg: CommitterCfg,
    pub intake: flume::Receiver<Intake>,
    /// Outbox keys the forwarder saw PUBACKed.
    pub acked: flume::Receiver<OutboxKey>,
    pub stats: Arc<Stats>,
    /// Woken when new outbox entries were committed.
    pub outbox_ready: Arc<Notify>,
    /// Outbox keys the forwarder gave up on (the district broker kept refusing them): parked.
    pub park: flume::Receiver<OutboxKey>,
    /// Whether the gateway clock can be trusted (contract: "Clocks").
    pub clock: ClockTrust,
    /// `clock.require_sync`: ask the kernel whether the clock is synchronized.
    pub require_sync: bool,
    /// The store's clock (see `store_now`), on the monotonic ms since `mono_origin`.
    pub store_clock: StoreClock,
    /// What the store clock last did about a step, to log changes once.
    pub clock_step: Step,
    /// The store time the last transaction was written with (ms).
    pub committed_at: i64,
    /// A large batch was committed since the allocator last released freed memory.
    pub trim_due: bool,
    pub mono_origin: Instant,
    /// Since when the site link has been up (for [`CARE_SETTLE`]).
    pub site_up_since: Option<Instant>,
    /// Set when shutdown comes while the disk cannot be written: nothing more is tried, what
    /// remains stays unacknowledged (the site broker redelivers it after the restart).
    pub abandoned: bool,
    /// New `alerts.actions` from a config reload (SIGHUP).
    pub alert_updates: flume::Receiver<Vec<String>>,
    /// A reloaded care list (SIGHUP).
    pub care_updates: flume::Receiver<Vec<crate::config::CareResident>>,
    /// A reloaded `[occupancy]` (SIGHUP, or a fleet change).
    pub occupancy_updates: flume::Receiver<Option<crate::store::OccupancyCfg>>,
    /// Cancelled at shutdown: a retry loop on a failing disk gives up (nothing it holds was
    /// acknowledged, so the broker redelivers it).
    pub stop: CancellationToken,
    /// The `[[mqtt.sources]]` in force, as marks: which source a device was learned through.
    pub source_marks: SourceMarks,
    /// New marks from a config reload (SIGHUP): devices that no longer map are forgotten.
    pub source_updates: flume::Receiver<SourceMarks>,
    /// Devices that no longer map are still to be forgotten (at start, after a reload, after
    /// a write that failed).
    pub unmapped_due: bool,
    /// When devices were last forgotten at `health.max_devices` (one WARN per burst).
    pub bound_burst: Option<Instant>,
    /// `clock_skew` WARNs in the current [`BOUND_BURST`] period: since when, how many.
    pub skew_warns: (Option<Instant>, u32),
}

/// Devices forgotten at the bound within this long of the previous ones are one burst: one
/// WARN for it. Also the period of [`SKEW_WARNS`].
pub const BOUND_BURST: Duration = Duration::from_secs(600);

/// At most this many `clock_skew` WARNs (one per device) in a [`BOUND_BURST`] period; past it
/// they are DEBUG (a flood of invented devices stamping ahead cannot flood the journal; the
/// page and metrics still flag every one).
pub const SKEW_WARNS: u32 = 20;

/// Return freed heap memory to the system (glibc keeps it otherwise; RSS would stay at a
/// burst's peak). Other C libraries: nothing to do.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Milliseconds on the committer's monotonic clock.
fn mono_ms(start: Instant) -> i64 {
    start.elapsed().as_millis() as i64
}

impl Committer {
    /// Run until every intake sender is gone and drained, and the forwarder has closed its
    /// PUBACK channel (so acknowledgements received during shutdown are not lost).
    ///
    /// Disk faults pause and retry (see the module); other store errors (a record this build
    /// cannot read, a damaged store with `on_damage = "refuse"`) are returned.
    pub fn run(mut self) -> Result<(), StoreError> {
        let clock = Instant::now();
        let mut sched = Schedule::new(
            CommitPolicy::new(
                self.cfg.linger.as_millis() as i64,
                self.cfg.batch_max,
                self.cfg.max_inflight,
            ),
            self.cfg.tick.as_millis() as i64,
            ACK_LINGER.as_millis() as i64,
        );
        let mut items: Vec<Intake> = Vec::with_capacity(self.cfg.batch_max);
        let mut shape = Batch::default();
        let mut acked: Vec<OutboxKey> = Vec::new();
        let mut to_park: Vec<OutboxKey> = Vec::new();
        loop {
            let now = mono_ms(clock);
            let wake = sched.wake_at(&shape, now);
            if sched.held() && items.len() >= self.cfg.batch_max {
                // Held and full: take nothing more (the broker keeps the rest).
                std::thread::sleep(Duration::from_millis((wake - now).clamp(0, 1000) as u64));
            } else if !sched.closing && wake > now {
                let deadline = Instant::now() + Duration::from_millis((wake - now) as u64);
                match self.intake.recv_deadline(deadline) {
                    Ok(first) => {
                        self.take(&mut items, &mut shape, first, mono_ms(clock));
                        // Everything already queued joins at once.
                        while items.len() < self.cfg.batch_max {
                            match self.intake.try_recv() {
                                Ok(i) => self.take(&mut items, &mut shape, i, mono_ms(clock)),
                                Err(_) => break,
                            }
                        }
                    }
                    Err(flume::RecvTimeoutError::Timeout) => {}
                    Err(flume::RecvTimeoutError::Disconnected) => sched.closing = true,
                }
            } else if sched.closing {
                while items.len() < self.cfg.batch_max {
                    match self.intake.try_recv() {
                        Ok(i) => self.take(&mut items, &mut shape, i, mono_ms(clock)),
                        Err(_) => break,
                    }
                }
            }
            if let Some(actions) = self.alert_updates.try_iter().last() {
                self.engine.alert_actions = actions;
            }
            if let Some(o) = self.occupancy_updates.try_iter().last() {
                self.writer.set_occupancy(o);
            }
            if let Some(care) = self.care_updates.try_iter().last() {
                self.writer.set_care(&care);
                self.stats.set_care(self.writer.care_overview());
                self.stats.set_keys_lost(self.writer.keys_lost(now_ms()));
            }
            to_park.extend(self.park.try_iter());
            if !to_park.is_empty() {
                match self.writer.park(&to_park) {
                    Ok(n) => {
                        tracing::debug!(parked = n, "outbox entries parked");
                        to_park.clear();
                        if let Ok(o) = self.writer.store().overview() {
                            self.stats
                                .outbox_pending
                                .store(o.pending_summaries + o.pending_alerts, Relaxed);
                            self.stats.outbox_parked.store(o.parked, Relaxed);
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot park outbox entries yet; retrying")
                    }
                }
            }
            let before = acked.len();
            acked.extend(self.acked.try_iter());
            if acked.len() > before {
                sched.acks_arrived(mono_ms(clock));
            }
            self.stats.committer_turned();
            let now = mono_ms(clock);
            let require_check = self.require_sync || !self.stats.clock_trusted.load(Relaxed);
            let turn = sched.turn(
                now,
                &shape,
                !acked.is_empty(),
                require_check,
                |check| match check {
                    ClockCheck::Batch => self.clock_holds(&mut items, now),
                    ClockCheck::Idle => self.clock_holds(&mut [], now),
                },
            );
            if turn.drop_held {
                // Shutdown with an untrusted clock: committing now would count the held events
                // at a receive time nobody trusts and acknowledge them. Leave them
                // unacknowledged: the site broker redelivers them after the restart.
                tracing::warn!(held = items.len(), "shutdown while the gateway clock is not trusted: the held messages stay unacknowledged for redelivery");
                items.clear();
                shape = Batch::default();
            }
            if turn.writes() {
                let commit_batch = turn.trigger.is_some() || sched.closing;
                let mut none = Vec::new();
                let batch = if commit_batch { &mut items } else { &mut none };
                let wrote = self.commit(batch, &mut acked, turn.tick, turn.acks_due)?;
                sched.done(&turn, &shape, wrote, !acked.is_empty());
                if let Some(why) = turn.trigger {
                    // The batch's first message waited this long for its acknowledgement.
                    let waited_ms = mono_ms(clock) - shape.first_ms;
                    self.stats.ack_wait(waited_ms);
                    tracing::debug!(
                        ?why,
                        items = shape.items,
                        unacked = shape.unacked,
                        waited_ms,
                        "batch committed"
                    );
                }
                if commit_batch {
                    shape = Batch::default();
                }
            }
            if sched.closing && items.is_empty() && self.intake.is_empty() {
                tracing::debug!("committer: intake closed and drained");
                return self.finish_acked(acked);
            }
        }
    }

    /// Add an item to the batch.
    fn take(&self, items: &mut Vec<Intake>, shape: &mut Batch, i: Intake, now: i64) {
        let unacked = matches!(
            &i,
            Intake::Event { ack: Some(_), .. } | Intake::Rejected { ack: Some(_), .. }
        );
        let alert = matches!(&i, Intake::Event { event, .. } if self.engine.is_alert(event));
        shape.add(now, unacked, alert);
        items.push(i);
    }

    /// After the intake closed: delete what the forwarder still reports PUBACKed until it is gone.
    fn finish_acked(mut self, mut acked: Vec<OutboxKey>) -> Result<(), StoreError> {
        loop {
            if self.abandoned {
                // The disk refused; the entries are re-sent after the restart (the platform
                // keeps the highest rev, so nothing counts twice).
                return Ok(());
            }
            match self.acked.recv_timeout(self.cfg.tick) {
                Ok(k) => acked.push(k),
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => {
                    acked.extend(self.acked.try_iter());
                    if !acked.is_empty() {
                        self.commit(&mut Vec::new(), &mut acked, false, true)?;
                    }
                    // Clean stop: the devices' last-seen times as of now.
                    if let Err(e) = self.writer.flush_devices() {
                        tracing::warn!(error = %e, "store: cannot write the devices' last-seen times at stop (they read up to 5 min older after the restart)");
                    }
                    return Ok(());
                }
            }
            acked.extend(self.acked.try_iter());
            if !acked.is_empty() {
                self.commit(&mut Vec::new(), &mut acked, false, true)?;
            }
        }
    }

    /// Write one transaction, retrying through disk faults (intake paused meanwhile). Returns
    /// `Ok(None)` when shutdown came first (nothing written, nothing to acknowledge).
    fn write(
        &mut self,
        inputs: &[Input],
        states: &[StateUpdate],
        acked: &[OutboxKey],
        maintain: Option<&Retention>,
    ) -> Result<Option<CommitReport>, StoreError> {
        if self.abandoned {
            return Ok(None);
        }
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut reopen_needed = false;
        loop {
            let attempt = if reopen_needed {
                self.writer.reopen().and_then(|_| {
                    self.writer.set_max_bytes(self.cfg.max_bytes);
                    self.commit_now(inputs, states, acked, maintain)
                })
            } else {
                self.commit_now(inputs, states, acked, maintain)
            };
            let e = match attempt {
                Ok(r) => {
                    if self.stats.paused().is_some_and(|p| p.reason.is_disk()) {
                        if let Some(p) = self.stats.resume() {
                            tracing::warn!(
                                reason = p.reason.as_str(),
                                paused_secs = (now_ms() - p.since_ms) / 1000,
                                "store writes succeed again: intake resumed"
                            );
                        }
                    }
                    return Ok(Some(r));
                }
                Err(e) => e,
            };
            match (&e, e.disk_fault()) {
                (StoreError::AlreadyOpen(_), _) => {} // a reader still holds the old handle
                (_, Some(fault)) => {
                    if self.stats.paused().is_none() {
                        tracing::error!(error = %e, reason = fault.reason().as_str(), "store write failed: intake paused, nothing of the batch acknowledged; retrying until the disk takes writes again");
                    }
                    self.stats.pause(fault.reason(), e.to_string(), now_ms());
                }
                (StoreError::Damaged { path, reason }, _) => {
                    if self.cfg.on_damage == OnDamage::Refuse {
                        return Err(e);
                    }
                    let to = damage::quarantine(path, now_ms())?;
                    tracing::error!(file = %path.display(), moved_to = %to.display(), %reason, "store damaged while running: moved it aside, continuing with a fresh store");
                    *self.stats.quarantined.lock().expect("lock") = Some(damage::Quarantined {
                        file: to
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        bytes: std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0),
                        reason: Some(reason.clone()),
                    });
                }
                // Not the disk: a reopen (with its integrity check) tells damage from a bug.
                _ if !reopen_needed => {
                    tracing::warn!(error = %e, "store write failed; reopening the store to check it");
                }
                _ => return Err(e),
            }
            reopen_needed = true;
            let delay = backoff.next_delay();
            let until = Instant::now() + delay;
            while Instant::now() < until {
                if self.stop.is_cancelled() && self.stats.paused().is_some() {
                    tracing::warn!("shutdown while the store cannot be written: what was not committed stays unacknowledged and the site broker redelivers it after the restart");
                    self.abandoned = true;
                    return Ok(None);
                }
                self.stats.committer_turned();
                std::thread::sleep(Duration::from_millis(100).min(delay));
            }
        }
    }

    /// Events stamped more than `max_future_skew` ahead of the trusted gateway clock count at
    /// the gateway's receive time (the store clock now), and their devices are flagged
    /// `clock_skew` (one WARN per device and run; contract: "Clocks"). Called only for a batch
    /// the clock was trusted for, after the store clock saw the devices' own times. Returns,
    /// per item, whether it was re-stamped and the device's flag to show.
    fn stamp(&mut self, batch: &mut [Intake]) -> Vec<Option<(bool, Option<i64>)>> {
        let mut now: Option<i64> = None;
        let mut out = Vec::with_capacity(batch.len());
        for intake in batch.iter_mut() {
            let Intake::Event { event, .. } = intake else {
                out.push(None);
                continue;
            };
            let now = *now.get_or_insert_with(|| self.store_now());
            let key = device_key(event.kind, &event.device);
            let r = self.clock.receive(&key, event.ts_ms, now);
            let restamped = r.ts_ms != event.ts_ms;
            let shown = match r.flag {
                Flag::Raised { ahead_ms, warn } => {
                    let (since, n) = &mut self.skew_warns;
                    if since.is_none_or(|t| t.elapsed() >= BOUND_BURST) {
                        *since = Some(Instant::now());
                        *n = 0;
                    }
                    if warn && *n < SKEW_WARNS {
                        *n += 1;
                        tracing::warn!(
                            kind = event.kind.as_str(),
                            device = %crate::logfmt::Clean(&event.device),
                            ahead_s = ahead_ms / 1000,
                            max_future_skew_s = self.clock.max_future_skew_ms / 1000,
                            "device clock ahead of the gateway clock: its events are counted at the gateway's receive time (clock_skew; set the device's clock or NTP)"
                        );
                        if *n == SKEW_WARNS {
                            tracing::warn!("many devices stamp ahead of the gateway clock: the next ones this 10 minutes are logged at DEBUG (all are flagged clock_skew on the page and in the metrics)");
                        }
                    } else {
                        tracing::debug!(
                            kind = event.kind.as_str(),
                            device = %crate::logfmt::Clean(&event.device),
                            ahead_s = ahead_ms / 1000,
                            "device clock ahead of the gateway clock (clock_skew)"
                        );
                    }
                    Some(ahead_ms)
                }
                Flag::Same { ahead_ms } => ahead_ms,
                Flag::Cleared => {
                    tracing::info!(
                        kind = event.kind.as_str(),
                        device = %crate::logfmt::Clean(&event.device),
                        "device clock agrees with the gateway clock again: its events count at their own time"
                    );
                    None
                }
            };
            event.ts_ms = r.ts_ms;
            out.push(Some((restamped, shown)));
        }
        out
    }

    fn commit_now(
        &mut self,
        inputs: &[Input],
        states: &[StateUpdate],
        acked: &[OutboxKey],
        maintain: Option<&Retention>,
    ) -> Result<CommitReport, StoreError> {
        let started = Instant::now();
        let now = self.store_now();
        let r = self
            .writer
            .commit_inputs(&self.engine, inputs, states, acked, now, maintain)?;
        self.committed_at = now;
        let micros = started.elapsed().as_micros() as u64;
        self.stats.commits.fetch_add(1, Relaxed);
        self.stats.commit_micros_total.fetch_add(micros, Relaxed);
        self.stats.commit_seconds.observe(micros as f64 / 1e6);
        Ok(r)
    }

    /// Commit one batch (with the PUBACKed deletions when anything is written or `acks_due`),
    /// then acknowledge its messages in order. On a store error nothing is acknowledged and
    /// the error is returned. Returns whether a transaction was written.
    fn commit(
        &mut self,
        batch: &mut Vec<Intake>,
        acked: &mut Vec<OutboxKey>,
        tick: bool,
        acks_due: bool,
    ) -> Result<bool, StoreError> {
        let retention = self.cfg.retention;
        if tick && batch.is_empty() && self.trim_due {
            // A burst is over: hand the allocator's freed memory back to the system, so the
            // steady RSS is what the daemon holds, not what the burst needed.
            release_freed_memory();
            self.trim_due = false;
        }
        if tick {
            let now = self.store_now();
            self.writer.destroy_expired_keys(now);
            // Memory only: hashes of raw events past the dedup TTL (the rows stay for their
            // retention).
            if let Err(e) = self.writer.forget_expired_hashes(
                now_ms(),
                self.cfg.retention.dedup_ttl_ms,
                self.cfg.retention.purge_batch,
            ) {
                tracing::debug!(error = %e, "store: cannot forget expired dedup hashes yet");
            }
            self.writer.set_max_bytes(self.cfg.max_bytes);
            self.stats.set_care(self.writer.care_overview());
            self.stats
                .set_occupancy(self.writer.occupancy_overview(now_ms()));
            self.stats.set_keys_lost(self.writer.keys_lost(now));
            let up = !self.cfg.site_input || self.stats.site_connected.load(Relaxed);
            self.site_up_since = match (up, self.site_up_since) {
                (false, _) => None,
                (true, None) => Some(Instant::now()),
                (true, s) => s,
            };
            let hold = self.stats.paused().is_some()
                || self.site_up_since.is_none_or(|t| t.elapsed() < CARE_SETTLE);
            self.writer.set_care_hold(hold);
            self.stats
                .store_bytes
                .store(self.writer.store().file_bytes(), Relaxed);
        }
        if tick {
            if let Some(marks) = self.source_updates.try_iter().last() {
                self.source_marks = marks;
                self.unmapped_due = true;
            }
            if self.unmapped_due && self.stats.paused().is_none() {
                self.forget_unmapped();
            }
            if self.stats.paused().is_none() {
                self.serve_requests();
            }
        }
        self.writer
            .set_max_devices(self.stats.cadence().max_devices);
        self.witness(batch);
        let stamps = self.stamp(batch);
        let mut marks = std::collections::HashMap::new();
        for i in batch.iter() {
            if let Intake::Event { event, topic, .. } = i {
                let key = device_key(event.kind, &event.device);
                let mark = self.source_marks.mark_for(topic);
                if self.writer.device_mark(&key) != mark {
                    marks.insert(key, mark.to_string());
                }
            }
        }
        self.writer.stage_device_marks(marks);
        let mut inputs: Vec<Input> = Vec::with_capacity(batch.len());
        let mut states: Vec<&StateUpdate> = Vec::new();
        for i in batch.iter() {
            match i {
                Intake::Event { event, .. } => inputs.push(Input::Event(event)),
                Intake::Rejected { .. } => {}
                Intake::Reading {
                    counters,
                    states: s,
                } => {
                    inputs.extend(counters.iter().map(Input::Counter));
                    states.extend(s.iter());
                }
            }
        }
        let states: Vec<StateUpdate> = states.into_iter().cloned().collect();
        let now = self.store_now();
        let maintain = tick
            && self
                .writer
                .maintenance_due(&self.engine, &retention, now)
                .unwrap_or(true);
        let acks_ride = acks_due || !inputs.is_empty() || !states.is_empty() || maintain;
        let nothing_to_write =
            inputs.is_empty() && states.is_empty() && !maintain && (!acks_due || acked.is_empty());
        let report = if nothing_to_write {
            // Only rejects (or nothing): nothing to write.
            None
        } else {
            let to_delete: &[OutboxKey] = if acks_ride { acked } else { &[] };
            match self.write(&inputs, &states, to_delete, maintain.then_some(&retention))? {
                Some(r) => {
                    if acks_ride {
                        acked.clear();
                    }
                    Some(r)
                }
                // Shutdown while the disk fails: acknowledge nothing, and give up the PUBACKed
                // deletions too (re-sent after the restart; the platform keeps the highest
                // rev), so nothing is retried in a loop.
                None => {
                    drop(inputs);
                    batch.clear();
                    acked.clear();
                    return Ok(false);
                }
            }
        };
        let wrote = report.is_some();
        self.trim_due |= wrote && batch.len() > 64;
        drop(inputs);
        // The store's time of this commit: the devices' last seen agrees with the store's.
        let now = if wrote { self.committed_at } else { now_ms() };
        let mut outcomes = report.as_ref().map(|r| r.outcomes.iter());
        for (mut intake, stamp) in batch.drain(..).zip(stamps) {
            let ack = intake.take_ack();
            match &intake {
                Intake::Event { event, topic, .. } => {
                    let outcome = outcomes
                        .as_mut()
                        .and_then(|o| o.next())
                        .copied()
                        .unwrap_or(Outcome::Duplicate);
                    match outcome {
                        Outcome::Accepted => {
                            self.stats.accepted(event.kind, &event.device, now);
                            if let Some((restamped, shown)) = stamp {
                                if restamped {
                                    self.stats.counted_at_receipt(event.kind);
                                }
                                self.stats.set_clock_skew(event.kind, &event.device, shown);
                            }
                            if self.engine.is_alert(event) {
                                self.stats.alert(AlertNote {
                                    at_ms: now,
                                    kind: event.kind,
                                    device: event.device.clone(),
                                    action: event.action.clone(),
                                    id: event.id.clone(),
                                    ts_ms: event.ts_ms,
                                });
                            }
                        }
                        Outcome::Duplicate => self.stats.duplicate(event.kind),
                        Outcome::Rejected(reason) => self.stats.rejected(reason, topic, now),
                        Outcome::Counted(_) | Outcome::Glitch(_) => {}
                    }
                    if outcome != Outcome::Accepted {
                        // The clock keeps flags only for devices in the table (a redelivered
                        // duplicate of a forgotten device must not grow it).
                        let key = device_key(event.kind, &event.device);
                        if !self.writer.knows_device(&key) {
                            self.clock.forget(&key);
                        }
                    }
                }
                Intake::Rejected {
                    reason,
                    topic,
                    detail,
                    ..
                } => self
                    .stats
                    .rejected_because(*reason, topic, detail.as_deref(), now),
                Intake::Reading { counters, .. } => {
                    for c in counters {
                        match outcomes.as_mut().and_then(|o| o.next()).copied() {
                            Some(Outcome::Counted(step)) => {
                                self.stats.counted(c.kind, &c.device, step.events(), now);
                            }
                            Some(Outcome::Glitch(step)) => {
                                tracing::warn!(device = %c.device, point = %c.point, reading = c.value, "Modbus counter misread (glitch rule): the held readings were dropped, this reading continues from the last counted value");
                                self.stats.modbus_update(&c.device, |h| h.glitches += 1);
                                self.stats.counted(c.kind, &c.device, step.events(), now);
                            }
                            _ => {}
                        }
                    }
                }
            }
            if let Some(ack) = ack {
                (ack.0)();
            }
        }
        if let Some(r) = report {
            if !r.forgotten.is_empty() {
                self.forgotten_at_bound(&r.forgotten);
            }
            if r.emitted > 0 || r.deleted_outbox > 0 {
                if let Ok(n) = self.writer.store().outbox_len() {
                    self.stats.outbox_pending.store(n, Relaxed);
                }
            }
            if r.emitted > 0 {
                self.outbox_ready.notify_one();
            }
            if r.dropped_summaries + r.dropped_alerts > 0 {
                tracing::error!(
                    summaries = r.dropped_summaries,
                    alerts = r.dropped_alerts,
                    "disk pressure: dropped pending upstream messages"
                );
            }
            if r.pressure_events > 0 || r.dropped_dedup_keys > 0 {
                tracing::warn!(
                    raw_events = r.pressure_events,
                    dedup_keys = r.dropped_dedup_keys,
                    live_bytes = self.writer.live_bytes(),
                    max_bytes = self.cfg.max_bytes,
                    "store near its size bound: deleted the oldest rows"
                );
            }
            if r.purged_dedup + r.purged_events > 0 {
                tracing::debug!(
                    dedup = r.purged_dedup,
                    events = r.purged_events,
                    "purged expired rows"
                );
            }
        }
        Ok(wrote)
    }
}
