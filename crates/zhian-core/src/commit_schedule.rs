//! The committer's turn, decided: when to commit the batch being gathered, when to write the
//! PUBACKed deletions, when to tick (close windows, trim), and what to do with a batch while the
//! gateway clock is not trusted. Pure: every call gets `now_ms` (the committer's monotonic
//! milliseconds) and the clock check's answer through a closure; the committer's loop only
//! receives, asks [`Schedule::turn`] and does what the [`Turn`] says.
//!
//! Rules (the committer's module doc has the why):
//! - a batch commits when [`CommitPolicy::decide`] says so, or at once when closing;
//! - while the clock is not trusted the batch is held, unacknowledged, and looked at again
//!   every [`HOLD_RECHECK_MS`]; nothing ticks meanwhile; when trust returns it commits at once
//!   (as `Linger` if nothing else triggers); a shutdown with the clock untrusted drops the held
//!   batch unacknowledged (the site broker redelivers it after the restart);
//! - PUBACKed keys are deleted `ack_linger_ms` after the first arrived (one write for many), or
//!   at once when closing;
//! - every `tick_ms` a turn ticks (windows close, retention trims, the idle clock check runs).

use crate::commit_policy::{Batch, CommitPolicy, Trigger};

/// While the clock is not trusted, a held batch is looked at again this often (ms).
pub const HOLD_RECHECK_MS: i64 = 1000;

/// What the clock check is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockCheck {
    /// Is the batch about to be committed to be held (the clock not trusted)?
    Batch,
    /// Nothing to commit this tick: look at the clock anyway (so the page says it is not
    /// trusted); the answer is not used.
    Idle,
}

/// What one turn of the committer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Turn {
    /// Commit the batch, for this reason.
    pub trigger: Option<Trigger>,
    /// Write the PUBACKed deletions now.
    pub acks_due: bool,
    /// Close due windows, trim, refresh (the tick).
    pub tick: bool,
    /// Shutdown with the clock untrusted: drop the held batch unacknowledged.
    pub drop_held: bool,
}

impl Turn {
    /// Whether the turn writes anything (a commit, deletions or a tick).
    pub fn writes(&self) -> bool {
        self.trigger.is_some() || self.acks_due || self.tick
    }
}

/// The committer's schedule: the group-commit policy plus the held batch, the acks' linger and
/// the tick.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub policy: CommitPolicy,
    tick_ms: i64,
    ack_linger_ms: i64,
    next_tick: i64,
    /// When the first PUBACKed key not yet deleted arrived.
    acked_since: Option<i64>,
    /// While the clock is not trusted the batch is held, looked at again at this time.
    held_until: Option<i64>,
    /// The intake closed: drain, commit what is left, stop.
    pub closing: bool,
}

impl Schedule {
    /// A schedule with `policy`, ticking every `tick_ms`, deleting PUBACKed keys
    /// `ack_linger_ms` after the first arrived. The first turn ticks.
    pub fn new(policy: CommitPolicy, tick_ms: i64, ack_linger_ms: i64) -> Schedule {
        Schedule {
            policy,
            tick_ms,
            ack_linger_ms,
            next_tick: 0,
            acked_since: None,
            held_until: None,
            closing: false,
        }
    }

    /// Whether a batch is held for an untrusted clock.
    pub fn held(&self) -> bool {
        self.held_until.is_some()
    }

    /// When the loop must look again, at the latest, with `shape` gathered at `now`: the
    /// batch's commit time (or the held batch's next look), the acks' linger, the next tick.
    pub fn wake_at(&self, shape: &Batch, now: i64) -> i64 {
        let batch_at = match (self.held_until, self.policy.decide(shape, now)) {
            (Some(at), _) => at,
            (None, Ok(_)) => now,
            (None, Err(at)) => at,
        };
        let ack_at = self
            .acked_since
            .map_or(i64::MAX, |t| t + self.ack_linger_ms);
        batch_at.min(ack_at).min(self.next_tick)
    }

    /// PUBACKed keys arrived at `now`.
    pub fn acks_arrived(&mut self, now: i64) {
        self.acked_since.get_or_insert(now);
    }

    /// Decide the turn at `now` for the batch `shape`, with PUBACKed keys waiting when
    /// `acks_waiting`. `clock_holds` answers the [`ClockCheck`]: true while the clock is not
    /// trusted (and then intake is paused by the caller). `require_check` makes an idle tick
    /// look at the clock (it is not trusted, or trust needs the kernel's sync).
    pub fn turn(
        &mut self,
        now: i64,
        shape: &Batch,
        acks_waiting: bool,
        require_check: bool,
        mut clock_holds: impl FnMut(ClockCheck) -> bool,
    ) -> Turn {
        let tick = now >= self.next_tick;
        if tick {
            self.next_tick = now + self.tick_ms;
        }
        let mut trigger = if self.closing && shape.items > 0 {
            Some(Trigger::Full)
        } else {
            self.policy.decide(shape, now).ok()
        };
        let mut drop_held = false;
        if self.held_until.is_some_and(|at| now < at) && !self.closing {
            trigger = None;
        } else if trigger.is_some() || self.held_until.is_some() {
            // Commit only with a clock we trust; else hold the batch, unacknowledged.
            if clock_holds(ClockCheck::Batch) {
                if self.closing {
                    drop_held = shape.items > 0;
                } else {
                    self.held_until = Some(now + HOLD_RECHECK_MS);
                }
                trigger = None;
            } else if self.held_until.take().is_some() {
                trigger = trigger.or(Some(Trigger::Linger));
            }
        } else if tick && require_check {
            clock_holds(ClockCheck::Idle);
        }
        let acks_due = self
            .acked_since
            .is_some_and(|t| now >= t + self.ack_linger_ms)
            || (self.closing && acks_waiting);
        Turn {
            trigger,
            acks_due,
            tick: tick && self.held_until.is_none(),
            drop_held,
        }
    }

    /// The turn's writes are done: `wrote` (the deletions went in) or no PUBACKed key waits any
    /// more restarts the acks' linger; a committed batch teaches the policy.
    pub fn done(&mut self, turn: &Turn, shape: &Batch, wrote: bool, acks_waiting: bool) {
        if wrote || !acks_waiting {
            self.acked_since = None;
        }
        if let Some(why) = turn.trigger {
            self.policy.committed(shape, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn schedule() -> Schedule {
        Schedule::new(CommitPolicy::new(20, 100, 0), 250, 5_000)
    }

    fn one(at: i64) -> Batch {
        let mut b = Batch::default();
        b.add(at, true, false);
        b
    }

    #[test]
    fn a_lone_message_commits_after_linger_and_the_first_turn_ticks() {
        let mut s = schedule();
        let b = one(0);
        let t = s.turn(0, &b, false, false, |_| false);
        assert_eq!((t.trigger, t.tick), (None, true));
        assert_eq!(s.wake_at(&b, 1), 20);
        let t = s.turn(20, &b, false, false, |_| false);
        assert_eq!(t.trigger, Some(Trigger::Linger));
        assert!(!t.tick, "the next tick is 250 ms on");
    }

    #[test]
    fn an_untrusted_clock_holds_the_batch_without_ticks_then_commits_when_trust_returns() {
        let mut s = schedule();
        let b = one(0);
        let t = s.turn(20, &b, false, false, |c| {
            assert_eq!(c, ClockCheck::Batch);
            true
        });
        assert_eq!((t.trigger, t.tick, s.held()), (None, false, true));
        // Woken by the tick (which does nothing while held) before the recheck at 1,020.
        assert_eq!(s.wake_at(&b, 21), 270);
        // Before the recheck nothing is asked and nothing commits.
        let t = s.turn(500, &b, false, false, |_| {
            panic!("asked before the recheck")
        });
        assert_eq!((t.trigger, t.tick), (None, false));
        // Trust returns: commit at once.
        let t = s.turn(1_020, &b, false, false, |_| false);
        assert_eq!((t.trigger, s.held()), (Some(Trigger::Linger), false));
    }

    #[test]
    fn a_shutdown_with_the_clock_untrusted_drops_the_held_batch_unacknowledged() {
        let mut s = schedule();
        let b = one(0);
        s.turn(20, &b, false, false, |_| true);
        s.closing = true;
        let t = s.turn(30, &b, false, false, |_| true);
        assert_eq!((t.trigger, t.drop_held), (None, true));
    }

    #[test]
    fn pubacked_deletions_wait_for_the_linger_or_the_shutdown() {
        let mut s = schedule();
        let empty = Batch::default();
        s.turn(0, &empty, false, false, |_| false);
        s.acks_arrived(100);
        s.acks_arrived(200);
        assert_eq!(s.wake_at(&empty, 300), 250, "the tick comes first");
        let t = s.turn(300, &empty, true, false, |_| false);
        assert!(!t.acks_due);
        let t = s.turn(5_100, &empty, true, false, |_| false);
        assert!(t.acks_due, "5 s after the first");
        s.done(&t, &empty, true, true);
        let t = s.turn(5_200, &empty, true, false, |_| false);
        assert!(!t.acks_due);
        s.closing = true;
        assert!(s.turn(5_300, &empty, true, false, |_| false).acks_due);
    }

    #[test]
    fn an_idle_tick_looks_at_the_clock_only_when_asked_to() {
        let mut s = schedule();
        let empty = Batch::default();
        let mut asked = Vec::new();
        s.turn(0, &empty, false, false, |c| {
            asked.push(c);
            false
        });
        s.turn(250, &empty, false, true, |c| {
            asked.push(c);
            true
        });
        assert_eq!(asked, [ClockCheck::Idle]);
    }

    proptest! {
        /// With a trusted clock, a gathered batch never waits past its linger: at its linger
        /// time (or earlier) a turn commits it; with the clock untrusted nothing commits.
        #[test]
        fn a_batch_never_waits_past_its_linger_with_a_trusted_clock(
            arrivals in proptest::collection::vec(0i64..15, 1..30),
            trusted in any::<bool>(),
        ) {
            let mut s = schedule();
            let mut b = Batch::default();
            let mut now = 0;
            for gap in arrivals {
                now += gap;
                b.add(now, true, false);
                if b.items >= 100 { break; }
            }
            let first = b.first_ms;
            let mut committed = None;
            let mut t = now;
            while t <= first + 20 + HOLD_RECHECK_MS {
                let turn = s.turn(t, &b, false, false, |_| !trusted);
                if turn.trigger.is_some() { committed = Some(t); break; }
                t = s.wake_at(&b, t).max(t + 1);
            }
            if trusted {
                let at = committed.expect("committed");
                prop_assert!(at <= (first + 20).max(now));
            } else {
                prop_assert_eq!(committed, None);
            }
        }
    }
}
