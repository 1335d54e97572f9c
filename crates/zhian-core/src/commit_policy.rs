//! When the committer commits a batch: the group-commit policy, pure (no clock of its own:
//! every call gets `now_ms`).
//!
//! Each commit costs the flash a fixed amount (copy-on-write pages of each table it touches,
//! the table tree, the header: 20-30 KB measured here) whatever it holds, so the fewer commits
//! the better, as long as
//! - a device message waits at most `linger` for its acknowledgement (the broker redelivers
//!   unacknowledged messages only on a new session, so waiting longer buys nothing),
//! - an alert is committed (and so sent upstream) at once,
//! - a batch never waits for messages the site broker will not send: a broker sends at most its
//!   in-flight limit of unacknowledged QoS 1 messages (mosquitto `max_inflight_messages`,
//!   default 20), so a batch holding that many commits at once. The limit is configured
//!   (`mqtt.max_inflight`) or learned: a batch of at least [`MIN_STALL_BATCH`] messages that
//!   arrived quickly and then stopped ([`stall_after_ms`]) is committed at once, and two such
//!   stalls in a row at the same size are the broker's window (a pause in the devices' traffic
//!   stops a batch at a random size; a broker's limit stops it at the same one). Every
//!   [`PROBE_EVERY`]th batch ignores the learned limit, so a wrong guess is corrected,
//! - and a full batch (`batch_max`) commits at once.

/// The fewest unacknowledged messages a stalled batch must hold to teach the in-flight limit.
pub const MIN_STALL_BATCH: u32 = 8;
/// Every this many batches, the learned limit is ignored once (a probe).
pub const PROBE_EVERY: u64 = 32;

/// Why a batch is committed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// It holds `batch_max` items.
    Full,
    /// It holds an alert.
    Alert,
    /// It holds as many unacknowledged messages as the broker sends (configured or learned).
    Inflight,
    /// Messages stopped arriving after a quick run: the broker's in-flight limit, probably.
    Stall,
    /// Its oldest message waited `linger`.
    Linger,
}

/// What is in the batch being gathered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Batch {
    /// Items (events, rejects, Modbus readings).
    pub items: usize,
    /// Messages that wait for an acknowledgement (QoS 1 from the site broker).
    pub unacked: u32,
    pub has_alert: bool,
    /// When the first item arrived.
    pub first_ms: i64,
    /// When the latest unacknowledged message arrived, and the first one.
    pub first_unacked_ms: i64,
    pub last_unacked_ms: i64,
}

impl Batch {
    /// Record an item arriving at `now_ms`.
    pub fn add(&mut self, now_ms: i64, unacked: bool, alert: bool) {
        if self.items == 0 {
            self.first_ms = now_ms;
        }
        self.items += 1;
        self.has_alert |= alert;
        if unacked {
            if self.unacked == 0 {
                self.first_unacked_ms = now_ms;
            }
            self.unacked += 1;
            self.last_unacked_ms = now_ms;
        }
    }
}

/// How long a silence after the latest message means the broker stopped sending: eight mean
/// gaps of this batch, between 50 and 250 ms (scheduling jitter on a loaded box reaches tens of
/// milliseconds; a broker waiting for acknowledgements waits for ever).
pub fn stall_after_ms(b: &Batch) -> i64 {
    let gaps = i64::from(b.unacked.saturating_sub(1)).max(1);
    let mean = (b.last_unacked_ms - b.first_unacked_ms) / gaps;
    (8 * mean).clamp(50, 250)
}

/// The policy and what it learned.
#[derive(Debug, Clone)]
pub struct CommitPolicy {
    pub linger_ms: i64,
    pub batch_max: usize,
    /// `mqtt.max_inflight`: 0 unknown (learn it).
    pub configured_inflight: u32,
    learned: Option<u32>,
    /// The size of the last batch, if it stalled.
    last_stall: Option<u32>,
    batches: u64,
}

impl CommitPolicy {
    pub fn new(linger_ms: i64, batch_max: usize, configured_inflight: u32) -> Self {
        CommitPolicy {
            linger_ms,
            batch_max,
            configured_inflight,
            learned: None,
            last_stall: None,
            batches: 0,
        }
    }

    /// The in-flight limit in force for the next batch.
    pub fn inflight_limit(&self) -> Option<u32> {
        if self.configured_inflight > 0 {
            return Some(self.configured_inflight);
        }
        let probing = self.batches % PROBE_EVERY == PROBE_EVERY - 1;
        self.learned.filter(|_| !probing)
    }

    /// The learned in-flight limit, if any (status and tests).
    pub fn learned(&self) -> Option<u32> {
        self.learned
    }

    /// Commit now (and why), or `Err(at)`: wait until `at` (ms) unless more arrives.
    pub fn decide(&self, b: &Batch, now_ms: i64) -> Result<Trigger, i64> {
        if b.items == 0 {
            return Err(i64::MAX);
        }
        if b.items >= self.batch_max {
            return Ok(Trigger::Full);
        }
        if b.has_alert {
            return Ok(Trigger::Alert);
        }
        if let Some(limit) = self.inflight_limit() {
            if b.unacked >= limit {
                return Ok(Trigger::Inflight);
            }
        }
        let linger_at = b.first_ms + self.linger_ms;
        if now_ms >= linger_at {
            return Ok(Trigger::Linger);
        }
        if self.configured_inflight == 0 && b.unacked >= MIN_STALL_BATCH {
            let stall_at = b.last_unacked_ms + stall_after_ms(b);
            if now_ms >= stall_at {
                return Ok(Trigger::Stall);
            }
            return Err(stall_at.min(linger_at));
        }
        Err(linger_at)
    }

    /// The batch `b` was committed because of `why`: learn from it.
    pub fn committed(&mut self, b: &Batch, why: Trigger) {
        self.batches += 1;
        if self.configured_inflight > 0 {
            return;
        }
        match why {
            Trigger::Stall => {
                if self.last_stall == Some(b.unacked) {
                    self.learned = Some(b.unacked);
                }
                self.last_stall = Some(b.unacked);
                return;
            }
            // More arrived than the learned limit: the broker sends more than we thought.
            _ if self.learned.is_some_and(|l| b.unacked > l) => self.learned = None,
            _ => {}
        }
        self.last_stall = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(times: &[i64]) -> Batch {
        let mut b = Batch::default();
        for &t in times {
            b.add(t, true, false);
        }
        b
    }

    #[test]
    fn sparse_events_wait_for_the_linger() {
        let p = CommitPolicy::new(1500, 2048, 0);
        // 5 events/s, evenly: no stall, commits at first + linger.
        let b = batch(&[0, 200, 400, 600, 800, 1000, 1200, 1400]);
        assert_eq!(p.decide(&b, 1450), Err(1500));
        assert_eq!(p.decide(&b, 1500), Ok(Trigger::Linger));
    }

    #[test]
    fn alerts_and_full_batches_commit_at_once() {
        let p = CommitPolicy::new(1500, 3, 0);
        let mut b = batch(&[0]);
        b.add(1, true, true);
        assert_eq!(p.decide(&b, 1), Ok(Trigger::Alert));
        let b = batch(&[0, 1, 2]);
        assert_eq!(p.decide(&b, 2), Ok(Trigger::Full));
    }

    #[test]
    fn a_configured_inflight_limit_commits_when_reached() {
        let p = CommitPolicy::new(1500, 2048, 20);
        let times: Vec<i64> = (0..20).collect();
        assert_eq!(p.decide(&batch(&times[..19]), 19), Err(1500));
        assert_eq!(p.decide(&batch(&times), 19), Ok(Trigger::Inflight));
    }

    #[test]
    fn a_stalled_burst_teaches_the_limit_and_probes_correct_it() {
        let mut p = CommitPolicy::new(1500, 2048, 0);
        // 20 messages in 19 ms, then nothing: the broker's window.
        let times: Vec<i64> = (0..20).collect();
        let b = batch(&times);
        assert_eq!(p.decide(&b, 25), Err(69));
        assert_eq!(p.decide(&b, 69), Ok(Trigger::Stall));
        p.committed(&b, Trigger::Stall);
        assert_eq!(p.learned(), None, "one stall could be a pause in traffic");
        p.committed(&b, Trigger::Stall);
        assert_eq!(
            p.learned(),
            Some(20),
            "two at the same size are the broker's window"
        );
        assert_eq!(p.decide(&b, 19), Ok(Trigger::Inflight));
        // A later batch that grows past it (a probe) forgets the guess.
        let big: Vec<i64> = (0..40).collect();
        p.committed(&batch(&big), Trigger::Linger);
        assert_eq!(p.learned(), None);
    }

    #[test]
    fn jitter_stalls_at_random_sizes_teach_nothing() {
        let mut p = CommitPolicy::new(1500, 2048, 0);
        for n in [23u32, 41, 17, 30] {
            let times: Vec<i64> = (0..i64::from(n)).map(|t| t * 2).collect();
            p.committed(&batch(&times), Trigger::Stall);
        }
        assert_eq!(p.learned(), None);
    }

    proptest! {
        /// Whatever arrives, a batch never waits past its linger, never holds more than
        /// batch_max, and the wait deadline is never in the past.
        #[test]
        fn never_waits_past_linger(gaps in proptest::collection::vec(0i64..400, 1..200),
                                   linger in 1i64..2000, max in 1usize..300, inflight in 0u32..50) {
            let p = CommitPolicy::new(linger, max, inflight);
            let mut b = Batch::default();
            let mut now = 0;
            for g in gaps {
                now += g;
                // Before the next arrival, the policy must have fired if a deadline passed.
                if let Err(at) = p.decide(&b, now) {
                    prop_assert!(b.items == 0 || at <= b.first_ms + linger);
                } else {
                    b = Batch::default();
                }
                b.add(now, true, false);
                prop_assert!(b.items <= max);
                if p.decide(&b, now).is_ok() {
                    b = Batch::default();
                }
            }
        }
    }
}
