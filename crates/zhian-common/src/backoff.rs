//! Capped exponential backoff with full jitter, for every reconnect loop.
//!
//! Full jitter (a uniform draw between zero and the capped exponential) spreads 150 compounds
//! that lost the same district broker over the whole interval instead of reconnecting in step.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// Forget past failures (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: `min` plus a uniform draw from `[0, min(max, min * 2^attempt) - min]`.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self
            .min
            .saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let spread = exp.saturating_sub(self.min).as_millis() as u64;
        self.min + Duration::from_millis(fastrand::u64(0..=spread))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut last_cap = Duration::ZERO;
        for i in 0..10 {
            let d = b.next_delay();
            let cap = (Duration::from_millis(100) * 2u32.pow(i)).min(Duration::from_secs(2));
            assert!(
                d >= Duration::from_millis(100) && d <= cap,
                "{d:?} > {cap:?}"
            );
            last_cap = cap;
        }
        assert_eq!(last_cap, Duration::from_secs(2));
        // Jitter: many draws at the cap are not all the same.
        let draws: std::collections::BTreeSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(draws.len() > 5);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
