//! The committer and the gateway clock: whether the batch is held while the clock cannot be
//! trusted (intake paused, on the page), what the store's clock says now, and the devices'
//! clocks witnessed in a batch.

use super::*;
use crate::stats::PauseReason;

impl Committer {
    /// Look at the batch's events and the clock: true (and intake paused) while the gateway
    /// clock cannot be trusted, so the batch is held unacknowledged. When trust returns, Modbus
    /// readings stamped meanwhile get the trusted time.
    pub(super) fn clock_holds(&mut self, items: &mut [Intake], mono: i64) -> bool {
        // The store's clock, which a step back does not move back: after a step back the
        // devices are not "ahead" of it, so nothing pauses and nothing reopens.
        self.witness(items);
        let wall = self.store_now();
        for i in items.iter() {
            if let Intake::Event { event, .. } = i {
                let key = device_key(event.kind, &event.device);
                self.clock.observe(&key, event.ts_ms, wall, mono);
            }
        }
        let synced = self.require_sync.then(crate::clock::kernel_synced);
        match self.clock.judge(wall, mono, synced) {
            Some(d) => {
                let detail = d.describe(wall);
                if self.stats.paused().map(|p| p.reason) != Some(PauseReason::ClockUntrusted) {
                    tracing::error!(%detail, "gateway clock not trusted: intake paused, nothing acknowledged, Modbus readings not stamped, until it is");
                }
                self.stats.pause(PauseReason::ClockUntrusted, detail, wall);
                self.stats.clock_trusted.store(false, Relaxed);
                true
            }
            None => {
                if !self.stats.clock_trusted.swap(true, Relaxed) {
                    for i in items.iter_mut() {
                        if let Intake::Reading { counters, states } = i {
                            counters.iter_mut().for_each(|c| c.ts_ms = wall);
                            states.iter_mut().for_each(|s| s.ts_ms = wall);
                        }
                    }
                }
                if self
                    .stats
                    .paused()
                    .is_some_and(|p| p.reason == PauseReason::ClockUntrusted)
                {
                    self.stats.resume();
                    tracing::warn!("gateway clock trusted again: intake resumed");
                }
                false
            }
        }
    }

    /// Show the store clock the batch's device timestamps: evidence for or against a held
    /// forward step of the wall clock.
    pub(super) fn witness(&mut self, items: &[Intake]) {
        let (wall, mono) = (now_ms(), mono_ms(self.mono_origin));
        for i in items {
            if let Intake::Event { event, .. } = i {
                self.store_clock.witness(event.ts_ms, wall, mono);
            }
        }
    }

    /// The time for the store and the windows ([`StoreClock`]): never earlier than what was
    /// handed over before, and across a step of the wall clock (back, or forward until a
    /// device vouches for it) advancing at the monotonic clock's pace. So a step neither
    /// reopens windows nor closes them early. Publishes the offset for the Modbus input.
    pub(super) fn store_now(&mut self) -> i64 {
        let wall = now_ms();
        let (t, step) = self.store_clock.now(wall, mono_ms(self.mono_origin));
        self.stats.clock_offset_ms.store(t - wall, Relaxed);
        let kind = |s: &Step| std::mem::discriminant(s);
        if kind(&step) != kind(&self.clock_step) {
            match step {
                Step::None => tracing::info!("store clock follows the wall clock again"),
                Step::Back { by_ms } => tracing::warn!(
                    behind_s = by_ms / 1000,
                    "wall clock stepped back: windows keep the monotonic pace until it catches up (none reopens)"
                ),
                Step::ForwardHeld { by_ms } => tracing::warn!(
                    ahead_s = by_ms / 1000,
                    "wall clock stepped forward: not believed until a device's events agree (windows keep the monotonic pace, none closes early)"
                ),
            }
        }
        self.clock_step = step;
        t
    }
}
