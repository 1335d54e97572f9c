//! What a site's tests check upstream: the retained status, the platform's view of the
//! windows against the events sent, heartbeats, and that no subject leaves the box.

use std::thread;
use std::time::Duration;

use serde_json::Value;

use super::*;

impl Site {
    /// `state` of the retained status message, read by a fresh client.
    pub fn retained_status(&self) -> Option<String> {
        let topic = format!("{PREFIX}/status");
        fetch_retained(self.district().port, &topic, Duration::from_secs(3))
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
        let ok = wait_until(timeout, || self.upstream().window_totals() == *expected);
        let actual = self.upstream().window_totals();
        assert!(
            ok,
            "upstream windows differ from the events sent (after {timeout:?}):\n{}\n\
             totals:\n{}\n{}",
            map_diff(expected, &actual),
            map_diff(&collapse(expected), &collapse(&actual)),
            self.upstream().dump()
        );
        // Nothing more may change it: no spurious re-issue or extra window. The pause is the
        // check (a stretch of wall time longer than a window plus its grace), not a wait.
        thread::sleep(Duration::from_millis(2_500));
        let later = self.upstream().window_totals();
        assert!(
            later == *expected,
            "upstream windows changed after matching:\n{}",
            map_diff(expected, &later)
        );
        let problems = self.upstream().summary_problems();
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
            self.upstream()
                .latest_heartbeat()
                .is_some_and(|hb| pred(&hb))
        });
        let latest = self.upstream().latest_heartbeat();
        assert!(
            ok,
            "no heartbeat with {what} within {timeout:?}; latest: {latest:?}"
        );
        latest.expect("heartbeat present")
    }

    /// No upstream payload carries any subject marker.
    pub fn assert_no_subject_leaks(&self) {
        let leaks = self.upstream().subject_leaks(SUBJECT_MARKERS);
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

    /// Waits until the first gateway's store clock holds a forward step of its wall clock (the
    /// store is behind the wall by more than `ms`; needs the status page): only then can a
    /// device's event vouch for the step (an event that arrives before the daemon saw the
    /// step is no evidence either way).
    pub fn wait_step_held(&self, ms: i64) {
        self.wait_for_status("the forward step of the clock seen and held", |s| {
            s["clock_offset_ms"].as_i64().is_some_and(|off| off < -ms)
        });
    }
}
