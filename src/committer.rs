//! The committer: the only writer of the store. Group-commits what the inputs hand it, then
//! acknowledges each message to its source, in arrival order, only after the commit.
//!
//! It runs on a blocking thread (redb and fsync are synchronous) and takes work from one bounded
//! channel, so a slow disk slows the inputs down instead of growing memory.

use crate::core::engine::{CounterReading, Engine, Input, Outcome};
use crate::core::event::{Event, Reject};
use crate::stats::{AlertNote, Stats};
use crate::store::{OutboxKey, Pressure, Retention, StateUpdate, Store, StoreError};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Called once the message's outcome is committed (for MQTT: sends the PUBACK).
pub struct Ack(Box<dyn FnOnce() + Send>);

impl Ack {
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Ack(Box::new(f))
    }
}

/// One message from an input.
pub enum Intake {
    /// A valid event, to be deduplicated, stored and counted.
    Event { event: Event, ack: Option<Ack> },
    /// A message that broke a rule; counted and acknowledged, never stored.
    Rejected {
        reason: Reject,
        topic: String,
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
    pub linger: Duration,
    /// How often idle maintenance (closing due windows, purges) is considered.
    pub tick: Duration,
    pub retention: Retention,
    /// `store.max_size` in bytes.
    pub max_bytes: u64,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub struct Committer {
    pub store: Arc<Store>,
    pub engine: Engine,
    pub cfg: CommitterCfg,
    pub intake: flume::Receiver<Intake>,
    /// Outbox keys the forwarder saw PUBACKed.
    pub acked: flume::Receiver<OutboxKey>,
    pub stats: Arc<Stats>,
    /// Woken when new outbox entries were committed.
    pub outbox_ready: Arc<Notify>,
}

impl Committer {
    /// Run until every intake sender is gone and drained, and the forwarder has closed its
    /// PUBACK channel (so acknowledgements received during shutdown are not lost).
    ///
    /// A store error is fatal: redb refuses every later transaction after an I/O error until
    /// the file is reopened, so the daemon exits (non-zero) and systemd restarts it; reopening
    /// repairs the file. Nothing in the failed batch was acknowledged, so nothing is lost.
    pub fn run(self) -> Result<(), StoreError> {
        let mut next_tick = Instant::now();
        let mut batch: Vec<Intake> = Vec::with_capacity(self.cfg.batch_max);
        let mut acked: Vec<OutboxKey> = Vec::new();
        let mut closing = false;
        loop {
            if batch.is_empty() && !closing {
                let wait = next_tick.saturating_duration_since(Instant::now());
                match self.intake.recv_timeout(wait) {
                    Ok(first) => {
                        batch.push(first);
                        closing = self.fill(&mut batch);
                    }
                    Err(flume::RecvTimeoutError::Timeout) => {}
                    Err(flume::RecvTimeoutError::Disconnected) => closing = true,
                }
            } else if closing {
                // Drain whatever is left without waiting.
                while batch.len() < self.cfg.batch_max {
                    match self.intake.try_recv() {
                        Ok(i) => batch.push(i),
                        Err(_) => break,
                    }
                }
            }
            acked.extend(self.acked.try_iter());
            self.stats.committer_turned();
            let tick = Instant::now() >= next_tick;
            if tick {
                next_tick = Instant::now() + self.cfg.tick;
            }
            if !batch.is_empty() || !acked.is_empty() || tick {
                self.commit(&mut batch, &mut acked, tick)?;
            }
            if closing && batch.is_empty() && self.intake.is_empty() {
                tracing::debug!("committer: intake closed and drained");
                return self.finish_acked(acked);
            }
        }
    }

    /// After the intake closed: delete what the forwarder still reports PUBACKed until it is gone.
    fn finish_acked(&self, mut acked: Vec<OutboxKey>) -> Result<(), StoreError> {
        loop {
            match self.acked.recv_timeout(self.cfg.tick) {
                Ok(k) => acked.push(k),
                Err(flume::RecvTimeoutError::Timeout) => {}
                Err(flume::RecvTimeoutError::Disconnected) => {
                    acked.extend(self.acked.try_iter());
                    if !acked.is_empty() {
                        self.commit(&mut Vec::new(), &mut acked, false)?;
                    }
                    return Ok(());
                }
            }
            acked.extend(self.acked.try_iter());
            if !acked.is_empty() {
                self.commit(&mut Vec::new(), &mut acked, false)?;
            }
        }
    }

    /// Take more messages for this batch: everything already queued, then (with a linger) what
    /// arrives before the linger ends, up to `batch_max`. Returns true if the intake closed.
    fn fill(&self, batch: &mut Vec<Intake>) -> bool {
        let deadline = Instant::now() + self.cfg.linger;
        while batch.len() < self.cfg.batch_max {
            match self.intake.try_recv() {
                Ok(i) => batch.push(i),
                Err(flume::TryRecvError::Disconnected) => return true,
                Err(flume::TryRecvError::Empty) => {
                    if self.cfg.linger.is_zero() {
                        return false;
                    }
                    match self.intake.recv_deadline(deadline) {
                        Ok(i) => batch.push(i),
                        Err(flume::RecvTimeoutError::Timeout) => return false,
                        Err(flume::RecvTimeoutError::Disconnected) => return true,
                    }
                }
            }
        }
        false
    }

    /// Commit one batch, then acknowledge its messages in order. On a store error nothing is
    /// acknowledged and the error is returned.
    fn commit(
        &self,
        batch: &mut Vec<Intake>,
        acked: &mut Vec<OutboxKey>,
        tick: bool,
    ) -> Result<(), StoreError> {
        let mut retention = self.cfg.retention;
        if tick {
            let file = self.store.file_bytes();
            let last = self.stats.store_bytes.swap(file, Relaxed);
            retention.pressure = Pressure::of(file, last, self.cfg.max_bytes);
            if retention.pressure != Pressure::None {
                tracing::warn!(file_bytes = file, max_bytes = self.cfg.max_bytes, pressure = ?retention.pressure, "store near its size bound: deleting the oldest raw events");
            }
        }
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
        let now = now_ms();
        let maintain = tick && self.store.maintenance_due(&self.engine, &retention, now)?;
        let report = if inputs.is_empty() && states.is_empty() && acked.is_empty() && !maintain {
            // Only rejects (or nothing): nothing to write.
            None
        } else {
            let started = Instant::now();
            let r = self
                .store
                .commit_inputs(
                    &self.engine,
                    &inputs,
                    &states,
                    acked,
                    now,
                    maintain.then_some(&retention),
                )
                .inspect_err(|e| {
                    // Nothing was acknowledged: the devices' broker keeps the messages.
                    tracing::error!(error = %e, inputs = inputs.len(), "committer: commit failed; nothing acknowledged; stopping so the store is reopened (and repaired)");
                })?;
            let micros = started.elapsed().as_micros() as u64;
            self.stats.commits.fetch_add(1, Relaxed);
            self.stats.commit_micros_total.fetch_add(micros, Relaxed);
            self.stats.commit_seconds.observe(micros as f64 / 1e6);
            tracing::trace!(
                inputs = inputs.len(),
                acked = acked.len(),
                micros,
                "committed"
            );
            Some(r)
        };
        drop(inputs);
        acked.clear();
        let now = now_ms();
        let mut outcomes = report.as_ref().map(|r| r.outcomes.iter());
        for mut intake in batch.drain(..) {
            let ack = intake.take_ack();
            match &intake {
                Intake::Event { event, .. } => {
                    let outcome = outcomes
                        .as_mut()
                        .and_then(|o| o.next())
                        .copied()
                        .unwrap_or(Outcome::Duplicate);
                    match outcome {
                        Outcome::Accepted => {
                            self.stats.accepted(event.kind, &event.device, now);
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
                        Outcome::Rejected(reason) => {
                            let topic = format!("zhian/{}/{}", event.kind, event.device);
                            self.stats.rejected(reason, &topic, now)
                        }
                        Outcome::Counted(_) => {}
                    }
                }
                Intake::Rejected { reason, topic, .. } => self.stats.rejected(*reason, topic, now),
                Intake::Reading { counters, .. } => {
                    for c in counters {
                        if let Some(Outcome::Counted(step)) =
                            outcomes.as_mut().and_then(|o| o.next()).copied()
                        {
                            self.stats.counted(c.kind, &c.device, step.events(), now);
                        }
                    }
                }
            }
            if let Some(ack) = ack {
                (ack.0)();
            }
        }
        if let Some(r) = report {
            if r.emitted > 0 || r.deleted_outbox > 0 {
                if let Ok(n) = self.store.outbox_len() {
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
            if r.purged_dedup + r.purged_events > 0 {
                tracing::debug!(
                    dedup = r.purged_dedup,
                    events = r.purged_events,
                    "purged expired rows"
                );
            }
        }
        Ok(())
    }
}
