//! Event-time tumbling windows aligned to the Unix epoch, and the time rules for accepting events.

use super::event::Reject;

/// Windows are kept at least this long (48 h), for the status page.
pub const KEEP_WINDOWS_MS: u64 = 48 * 3_600_000;

/// Window and lateness settings, all in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCfg {
    pub window_ms: u64,
    pub grace_ms: u64,
    pub max_lateness_ms: u64,
    pub max_future_skew_ms: u64,
}

impl WindowCfg {
    /// Start of the window holding `ts_ms`: floor(ts / window) * window.
    pub fn start_of(&self, ts_ms: i64) -> i64 {
        let w = self.window_ms as i64;
        ts_ms.div_euclid(w) * w
    }

    /// End (exclusive) of the window starting at `start`.
    pub fn end_of(&self, start: i64) -> i64 {
        start + self.window_ms as i64
    }

    /// A window is summarised once the wall clock passes its end + grace.
    pub fn is_due(&self, start: i64, now_ms: i64) -> bool {
        now_ms >= self.end_of(start) + self.grace_ms as i64
    }

    /// Events older than `now - max_lateness` or newer than `now + max_future_skew` are rejected.
    /// The committer counts events stamped ahead of a trusted clock at receipt before they get
    /// here ([`super::clock::ClockTrust::receive`]), so `TooFarFuture` is a guard, not a rule
    /// any device meets.
    pub fn check_time(&self, ts_ms: i64, now_ms: i64) -> Result<(), Reject> {
        if ts_ms < now_ms - self.max_lateness_ms as i64 {
            Err(Reject::TooLate)
        } else if ts_ms > now_ms + self.max_future_skew_ms as i64 {
            Err(Reject::TooFarFuture)
        } else {
            Ok(())
        }
    }

    /// Windows starting before this can hold no event that is still accepted (the oldest
    /// accepted ts is `now - max_lateness`, whose window starts up to one window earlier), so
    /// once summarised they may be forgotten. One extra hour covers a clock stepped back by NTP.
    /// Windows are kept at least 48 h in any case: the status page's "today" and its 24 h chart
    /// are read from them; and a day longer than the lateness, since a day's `daily` message
    /// (re-issued up to `max_lateness` after the day ends) sums the day's windows.
    pub fn forget_before(&self, now_ms: i64) -> i64 {
        let keep =
            (self.max_lateness_ms + 86_400_000 + self.window_ms + 3_600_000).max(KEEP_WINDOWS_MS);
        now_ms - keep as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CFG: WindowCfg = WindowCfg {
        window_ms: 60_000,
        grace_ms: 10_000,
        max_lateness_ms: 86_400_000,
        max_future_skew_ms: 300_000,
    };

    #[test]
    fn aligned_to_epoch() {
        assert_eq!(CFG.start_of(0), 0);
        assert_eq!(CFG.start_of(59_999), 0);
        assert_eq!(CFG.start_of(60_000), 60_000);
        assert!(!CFG.is_due(0, 69_999));
        assert!(CFG.is_due(0, 70_000));
    }

    #[test]
    fn time_rules() {
        let now = 1_000_000_000;
        assert_eq!(CFG.check_time(now - 86_400_001, now), Err(Reject::TooLate));
        assert_eq!(CFG.check_time(now - 86_400_000, now), Ok(()));
        assert_eq!(CFG.check_time(now + 300_000, now), Ok(()));
        assert_eq!(
            CFG.check_time(now + 300_001, now),
            Err(Reject::TooFarFuture)
        );
    }

    proptest! {
        #[test]
        fn forgotten_windows_cannot_receive_events(
            now in 100_000_000_000i64..200_000_000_000,
            w in 1u64..86_400,
            late in 1u64..86_400 * 7,
            back in 0u64..86_400 * 7,
        ) {
            let cfg = WindowCfg { window_ms: w * 1000, max_lateness_ms: late * 1000, ..CFG };
            // The oldest event still accepted lands in a window at or after the cutoff.
            let oldest = now - (back.min(late) * 1000) as i64;
            prop_assert!(cfg.start_of(oldest) >= cfg.forget_before(now));
        }

        #[test]
        fn start_contains_ts(ts in 0i64..4_000_000_000_000, w in 1u64..86_400) {
            let cfg = WindowCfg { window_ms: w * 1000, ..CFG };
            let s = cfg.start_of(ts);
            prop_assert!(s <= ts && ts < cfg.end_of(s));
            prop_assert_eq!(s % (w as i64 * 1000), 0);
        }
    }
}
