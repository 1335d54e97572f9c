//! Care watch (独居老人关怀, contract: "Care watch"): residents who live alone, listed by the
//! keyed pseudonym of their card or face id, with an alias (a flat number, never a name), a
//! silence limit and optional quiet hours. Pure: `now` and the site's offset are passed in.
//!
//! Rules:
//! - A resident's silence runs from the last access event of their subject (event time), or,
//!   before any, from when the watch of them started.
//! - Once the silence reaches the limit, one `silent` notice. During quiet hours (site time,
//!   e.g. `22:00-07:00`) no `silent` notice is raised: it waits for the quiet hours to end, so
//!   nobody is called at night for a resident asleep.
//! - The first access event after a `silent` notice gives one `seen` notice; later events
//!   give none.

use serde::{Deserialize, Serialize};

/// A 16-byte keyed pseudonym (BLAKE3 with the box's care key, which does not rotate).
pub type CarePseudonym = [u8; 16];

/// Quiet hours: minutes of the local day, `start..end`, wrapping past midnight when
/// `start > end` (`22:00-07:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quiet {
    pub start_min: u32,
    pub end_min: u32,
}

impl Quiet {
    /// Parse `HH:MM-HH:MM`.
    pub fn parse(s: &str) -> Option<Quiet> {
        let (a, b) = s.split_once('-')?;
        let min = |t: &str| -> Option<u32> {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let q = Quiet {
            start_min: min(a)?,
            end_min: min(b)?,
        };
        (q.start_min != q.end_min).then_some(q)
    }

    /// Whether `now_ms` falls in the quiet hours at UTC offset `offset_ms`.
    pub fn contains(&self, now_ms: i64, offset_ms: i64) -> bool {
        let m = ((now_ms + offset_ms).rem_euclid(86_400_000) / 60_000) as u32;
        if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&m)
        } else {
            m >= self.start_min || m < self.end_min
        }
    }
}

/// One watched resident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resident {
    pub pseudonym: CarePseudonym,
    /// A flat number such as `3-2-601`.
    pub alias: String,
    pub silence_ms: i64,
    pub quiet: Option<Quiet>,
}

/// A resident's state, as stored (record version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CareRecordV1 {
    /// The last access event's time, or when the watch started (see `seen_ever`).
    pub last_seen_ms: i64,
    /// Whether `last_seen_ms` is an event (false: the watch's start).
    pub seen_ever: bool,
    /// A `silent` notice was sent and no `seen` since.
    pub silent: bool,
}

impl CareRecordV1 {
    /// The state of a resident whose watch starts at `now_ms`.
    pub fn start(now_ms: i64) -> Self {
        CareRecordV1 {
            last_seen_ms: now_ms,
            seen_ever: false,
            silent: false,
        }
    }
}

/// One resident as the page shows them: alias, last access event (`None`: none since the watch
/// began), whether a `silent` notice is out, the silence limit, and whether they are listed by
/// a pseudonym of a care key the box lost (never matched again until relisted; never judged
/// silent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CareLine {
    pub alias: String,
    pub last_seen_ms: Option<i64>,
    pub silent: bool,
    pub silence_ms: i64,
    pub key_lost: bool,
}

/// A care-watch notice for upstream and the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub alias: String,
    /// `silent` or `seen`.
    pub state: zhian_proto::CareState,
    /// The last access event's time (`None`: never seen since the watch began).
    pub last_seen_ms: Option<i64>,
    /// How long the resident was (or has been) silent, seconds.
    pub silent_secs: i64,
}

/// An access event of the resident, stamped `ts_ms`: updates the state; a `seen` notice when
/// the resident had been reported silent.
pub fn seen(r: &Resident, st: &mut CareRecordV1, ts_ms: i64) -> Option<Notice> {
    // Only a pass after the last one (or after the watch began) says anything new: a late or
    // redelivered older event neither clears a silence nor moves the last pass back.
    if ts_ms <= st.last_seen_ms {
        return None;
    }
    let before = *st;
    st.last_seen_ms = ts_ms;
    st.seen_ever = true;
    if before.silent {
        st.silent = false;
        return Some(Notice {
            alias: r.alias.clone(),
            state: zhian_proto::CareState::Seen,
            last_seen_ms: Some(st.last_seen_ms),
            silent_secs: ((ts_ms - before.last_seen_ms) / 1000).max(0),
        });
    }
    None
}

/// The silence check at `now_ms`: one `silent` notice when the limit has passed, outside quiet
/// hours.
pub fn check(r: &Resident, st: &mut CareRecordV1, now_ms: i64, offset_ms: i64) -> Option<Notice> {
    if st.silent || now_ms - st.last_seen_ms < r.silence_ms {
        return None;
    }
    if r.quiet.is_some_and(|q| q.contains(now_ms, offset_ms)) {
        return None;
    }
    st.silent = true;
    Some(Notice {
        alias: r.alias.clone(),
        state: zhian_proto::CareState::Silent,
        last_seen_ms: st.seen_ever.then_some(st.last_seen_ms),
        silent_secs: (now_ms - st.last_seen_ms) / 1000,
    })
}

/// The `zhian.care.v1` payload (contract: "Upstream"): alias only, never a subject.
pub fn care_json(gateway: &str, n: &Notice) -> Vec<u8> {
    use zhian_proto::Message;
    zhian_proto::Care {
        schema: zhian_proto::CareV1,
        gateway: gateway.to_string(),
        alias: n.alias.clone(),
        state: n.state,
        last_seen: n.last_seen_ms.map(zhian_proto::Timestamp),
        silent_secs: n.silent_secs,
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const H: i64 = 3_600_000;

    fn resident(quiet: Option<&str>) -> Resident {
        Resident {
            pseudonym: [1; 16],
            alias: "3-2-601".into(),
            silence_ms: 24 * H,
            quiet: quiet.and_then(Quiet::parse),
        }
    }

    #[test]
    fn silent_once_then_seen_once() {
        let r = resident(None);
        let t0 = 1_796_000_000_000;
        let mut st = CareRecordV1::start(t0);
        assert_eq!(check(&r, &mut st, t0 + 24 * H - 1, 0), None);
        let n = check(&r, &mut st, t0 + 24 * H, 0).unwrap();
        assert_eq!(
            (n.state, n.last_seen_ms, n.silent_secs),
            (zhian_proto::CareState::Silent, None, 24 * 3600)
        );
        assert_eq!(check(&r, &mut st, t0 + 30 * H, 0), None, "one notice");
        let n = seen(&r, &mut st, t0 + 31 * H).unwrap();
        assert_eq!(
            (n.state, n.last_seen_ms),
            (zhian_proto::CareState::Seen, Some(t0 + 31 * H))
        );
        assert_eq!(n.silent_secs, 31 * 3600);
        assert_eq!(seen(&r, &mut st, t0 + 32 * H), None, "one notice");
        let json: serde_json::Value = serde_json::from_slice(&care_json("gw", &n)).unwrap();
        assert_eq!(json["alias"], "3-2-601");
        assert_eq!(json["state"], "seen");
    }

    #[test]
    fn an_older_event_neither_clears_a_silence_nor_moves_the_last_pass_back() {
        let r = resident(None);
        let t0 = 1_796_000_000_000;
        let mut st = CareRecordV1::start(t0);
        assert!(seen(&r, &mut st, t0 + H).is_none());
        assert!(check(&r, &mut st, t0 + 26 * H, 0).is_some());
        assert_eq!(seen(&r, &mut st, t0 + H), None, "a redelivered old pass");
        assert_eq!(seen(&r, &mut st, t0 - H), None, "a pass before the watch");
        assert!(st.silent);
        assert_eq!(st.last_seen_ms, t0 + H);
        assert!(seen(&r, &mut st, t0 + 27 * H).is_some());
    }

    #[test]
    fn quiet_hours_hold_the_silent_notice_until_morning() {
        let r = resident(Some("22:00-07:00"));
        let off = 8 * H;
        // Local 2026-11-30 23:00 = 15:00Z.
        let night = time::macros::datetime!(2026-11-30 23:00 +8).unix_timestamp() * 1000;
        let mut st = CareRecordV1::start(night - 24 * H);
        assert_eq!(check(&r, &mut st, night, off), None, "quiet");
        assert_eq!(
            check(&r, &mut st, night + 7 * H + 59 * 60_000, off),
            None,
            "06:59"
        );
        assert!(check(&r, &mut st, night + 8 * H, off).is_some(), "07:00");
        assert!(Quiet::parse("22:00-07:00").unwrap().contains(night, off));
        assert!(!Quiet::parse("01:00-05:00").unwrap().contains(night, off));
        assert_eq!(Quiet::parse("25:00-07:00"), None);
        assert_eq!(Quiet::parse("07:00-07:00"), None);
    }

    proptest! {
        /// Whatever the order of events and checks, notices alternate silent, seen, silent...
        /// and never two of one kind in a row.
        #[test]
        fn notices_alternate(steps in proptest::collection::vec((any::<bool>(), 0i64..50 * H), 1..60)) {
            let r = resident(None);
            let mut st = CareRecordV1::start(0);
            let mut now = 0;
            let mut last: Option<zhian_proto::CareState> = None;
            for (is_event, dt) in steps {
                now += dt;
                let n = if is_event { seen(&r, &mut st, now) } else { check(&r, &mut st, now, 0) };
                if let Some(n) = n {
                    prop_assert_ne!(Some(n.state), last);
                    prop_assert!(last.is_some() || n.state == zhian_proto::CareState::Silent);
                    last = Some(n.state);
                }
            }
        }
    }
}
