//! The decision engine: what happens to each event of a batch, and which windows close.
//!
//! The engine works against a [`Ledger`], the state it needs (dedup keys, windows, raw events,
//! the outbox). The store implements it on one redb write transaction, so everything one batch
//! decides commits together or not at all; tests implement it in memory.

use super::counter::{judge, CounterState, Step, Width};
use super::event::{Event, Kind, Reject};
use super::summary::{alert_json, summary_parts, CountKey, Site, WindowState};
use super::window::WindowCfg;
use std::collections::BTreeMap;

/// What happened to one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Rejected(Reject),
    /// A counter reading, and what it meant (`Increase(0)` while a suspicious reading is held).
    Counted(Step),
    /// A held counter reading was a misread and was dropped; this reading counted `Step`.
    Glitch(Step),
}

/// One reading of a Modbus counter point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterReading {
    pub kind: Kind,
    /// The Modbus device's name: the summary's `device`.
    pub device: String,
    pub point: String,
    pub action: String,
    pub result: String,
    pub value: i64,
    pub width: Width,
    pub wrap: bool,
    /// The glitch rule's bound: a reading that rises by more than this per poll is held.
    pub max_step: u64,
    /// Poll time: the increase's events are stamped with it.
    pub ts_ms: i64,
}

impl CounterReading {
    /// The key the last value is kept under.
    pub fn key(&self) -> String {
        format!("{}\0{}\0{}", self.kind, self.device, self.point)
    }
}

/// What the engine decides about.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Event(&'a Event),
    Counter(&'a CounterReading),
}

/// Something to send upstream, produced inside a batch and stored in the outbox by the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emit {
    /// A camera incident listed in `alerts.actions`; sent ahead of any summary backlog.
    Alert { payload: Vec<u8> },
    /// Revision `rev` of the window starting at `start_ms`.
    Summary {
        start_ms: i64,
        rev: u32,
        payload: Vec<u8>,
    },
}

/// The state the engine reads and writes. All calls of one batch happen in one transaction.
pub trait Ledger {
    type Error;
    /// When the dedup key was first accepted, if it is held.
    fn first_seen(&mut self, key: &str) -> Result<Option<i64>, Self::Error>;
    /// Hold `key` as first accepted at `now_ms`, replacing an expired `previous` entry.
    fn remember(
        &mut self,
        key: &str,
        now_ms: i64,
        previous: Option<i64>,
    ) -> Result<(), Self::Error>;
    /// Keep the raw event (the ledger applies the privacy mode to its subject).
    fn record(&mut self, event: &Event, now_ms: i64) -> Result<(), Self::Error>;
    fn window(&mut self, start_ms: i64) -> Result<Option<WindowState>, Self::Error>;
    /// Store a window; a window with `issued == None` is open.
    fn put_window(&mut self, w: &WindowState) -> Result<(), Self::Error>;
    /// Starts of open windows with `start_ms <= max_start`, oldest first.
    fn open_windows_until(&mut self, max_start: i64) -> Result<Vec<i64>, Self::Error>;
    fn emit(&mut self, e: Emit) -> Result<(), Self::Error>;
    /// The last committed value of a counter.
    fn counter(&mut self, key: &str) -> Result<CounterState, Self::Error>;
    fn set_counter(
        &mut self,
        key: &str,
        state: CounterState,
        now_ms: i64,
    ) -> Result<(), Self::Error>;
}

/// Pure decision rule for dedup: a key first seen less than `ttl_ms` ago is a duplicate.
pub fn is_duplicate(first_seen: Option<i64>, now_ms: i64, ttl_ms: u64) -> bool {
    matches!(first_seen, Some(t) if now_ms - t < ttl_ms as i64)
}

/// Settings of the engine, derived from the config.
#[derive(Debug, Clone)]
pub struct Engine {
    pub window: WindowCfg,
    pub dedup_ttl_ms: u64,
    pub gateway: String,
    pub site: Site,
    pub alert_actions: Vec<String>,
    /// Largest summary payload (bytes): larger summaries are split into parts
    /// (`upstream.max_packet_size` less the topic and MQTT headers).
    pub max_summary_bytes: usize,
}

impl Engine {
    fn secs(&self) -> u32 {
        (self.window.window_ms / 1000) as u32
    }

    /// Whether `e` is a camera incident sent upstream at once (`alerts.actions`).
    pub fn is_alert(&self, e: &Event) -> bool {
        e.kind == Kind::Camera && self.alert_actions.contains(&e.action)
    }

    /// Decide every event of a batch at time `now_ms`, then close the windows that are due.
    /// Returns one outcome per event, in order.
    pub fn apply<'a, L: Ledger>(
        &self,
        ledger: &mut L,
        events: impl IntoIterator<Item = &'a Event>,
        now_ms: i64,
    ) -> Result<Vec<Outcome>, L::Error> {
        self.apply_inputs(ledger, events.into_iter().map(Input::Event), now_ms)
    }

    /// As [`Engine::apply`], for events and counter readings mixed in arrival order.
    pub fn apply_inputs<'a, L: Ledger>(
        &self,
        ledger: &mut L,
        inputs: impl IntoIterator<Item = Input<'a>>,
        now_ms: i64,
    ) -> Result<Vec<Outcome>, L::Error> {
        let mut outcomes = Vec::new();
        let mut touched: BTreeMap<i64, WindowState> = BTreeMap::new();
        for input in inputs {
            let e = match input {
                Input::Event(e) => e,
                Input::Counter(c) => {
                    let key = c.key();
                    let j = judge(ledger.counter(&key)?, c.value, c.width, c.wrap, c.max_step);
                    ledger.set_counter(&key, j.state, now_ms)?;
                    let s = j.step;
                    let n = s.events();
                    if n > 0 {
                        let start = self.window.start_of(c.ts_ms);
                        let w = Self::touch(&mut touched, ledger, start, self.secs())?;
                        w.add(
                            CountKey {
                                kind: c.kind,
                                device: c.device.clone(),
                                action: c.action.clone(),
                                result: c.result.clone(),
                            },
                            n,
                        );
                    }
                    outcomes.push(if !j.glitches.is_empty() {
                        Outcome::Glitch(s)
                    } else {
                        Outcome::Counted(s)
                    });
                    continue;
                }
            };
            let key = e.dedup_key();
            let prev = ledger.first_seen(&key)?;
            if is_duplicate(prev, now_ms, self.dedup_ttl_ms) {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            if let Err(r) = self.window.check_time(e.ts_ms, now_ms) {
                outcomes.push(Outcome::Rejected(r));
                continue;
            }
            ledger.remember(&key, now_ms, prev)?;
            ledger.record(e, now_ms)?;
            let start = self.window.start_of(e.ts_ms);
            Self::touch(&mut touched, ledger, start, self.secs())?.add(CountKey::of(e), 1);
            if self.is_alert(e) {
                ledger.emit(Emit::Alert {
                    payload: alert_json(&self.gateway, e),
                })?;
            }
            outcomes.push(Outcome::Accepted);
        }
        for (_, mut w) in touched {
            if w.issued.is_some() {
                // A late event for a summarised window: re-issue the whole window, rev + 1.
                self.issue(ledger, &mut w)?;
            }
            ledger.put_window(&w)?;
        }
        self.close_due(ledger, now_ms)?;
        Ok(outcomes)
    }

    /// The window starting at `start`, loaded once per batch.
    fn touch<'t, L: Ledger>(
        touched: &'t mut BTreeMap<i64, WindowState>,
        ledger: &mut L,
        start: i64,
        secs: u32,
    ) -> Result<&'t mut WindowState, L::Error> {
        Ok(match touched.entry(start) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let w = ledger
                    .window(start)?
                    .unwrap_or_else(|| WindowState::new(start, secs));
                v.insert(w)
            }
        })
    }

    /// Summarise (rev 0) every open window whose end + grace has passed. Returns how many.
    pub fn close_due<L: Ledger>(&self, ledger: &mut L, now_ms: i64) -> Result<usize, L::Error> {
        let max_start = now_ms - self.window.window_ms as i64 - self.window.grace_ms as i64;
        let due = ledger.open_windows_until(max_start)?;
        let mut n = 0;
        for start in due {
            if let Some(mut w) = ledger.window(start)? {
                if w.issued.is_none() && self.window.is_due(start, now_ms) {
                    self.issue(ledger, &mut w)?;
                    ledger.put_window(&w)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    fn issue<L: Ledger>(&self, ledger: &mut L, w: &mut WindowState) -> Result<(), L::Error> {
        let rev = w.next_rev();
        w.issued = Some(rev);
        if w.total() == 0 {
            return Ok(());
        }
        for payload in summary_parts(&self.gateway, &self.site, w, rev, self.max_summary_bytes) {
            ledger.emit(Emit::Summary {
                start_ms: w.start_ms,
                rev,
                payload,
            })?;
        }
        Ok(())
    }
}

/// An in-memory ledger: the reference for tests and the model the store must agree with.
#[derive(Debug, Clone, Default)]
pub struct MemLedger {
    pub counters: BTreeMap<String, CounterState>,
    pub dedup: BTreeMap<String, i64>,
    pub windows: BTreeMap<i64, WindowState>,
    pub raw: Vec<Event>,
    pub outbox: Vec<Emit>,
}

impl Ledger for MemLedger {
    type Error = std::convert::Infallible;
    fn first_seen(&mut self, key: &str) -> Result<Option<i64>, Self::Error> {
        Ok(self.dedup.get(key).copied())
    }
    fn remember(
        &mut self,
        key: &str,
        now_ms: i64,
        _previous: Option<i64>,
    ) -> Result<(), Self::Error> {
        self.dedup.insert(key.to_string(), now_ms);
        Ok(())
    }
    fn record(&mut self, event: &Event, _now_ms: i64) -> Result<(), Self::Error> {
        self.raw.push(event.clone());
        Ok(())
    }
    fn window(&mut self, start_ms: i64) -> Result<Option<WindowState>, Self::Error> {
        Ok(self.windows.get(&start_ms).cloned())
    }
    fn put_window(&mut self, w: &WindowState) -> Result<(), Self::Error> {
        self.windows.insert(w.start_ms, w.clone());
        Ok(())
    }
    fn open_windows_until(&mut self, max_start: i64) -> Result<Vec<i64>, Self::Error> {
        Ok(self
            .windows
            .range(..=max_start)
            .filter(|(_, w)| w.issued.is_none())
            .map(|(s, _)| *s)
            .collect())
    }
    fn emit(&mut self, e: Emit) -> Result<(), Self::Error> {
        self.outbox.push(e);
        Ok(())
    }
    fn counter(&mut self, key: &str) -> Result<CounterState, Self::Error> {
        Ok(self.counters.get(key).cloned().unwrap_or_default())
    }
    fn set_counter(
        &mut self,
        key: &str,
        state: CounterState,
        _now_ms: i64,
    ) -> Result<(), Self::Error> {
        self.counters.insert(key.to_string(), state);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    fn engine() -> Engine {
        Engine {
            window: WindowCfg {
                window_ms: 10_000,
                grace_ms: 2_000,
                max_lateness_ms: 60_000,
                max_future_skew_ms: 5_000,
            },
            dedup_ttl_ms: 40_000,
            gateway: "gw".into(),
            site: Site::default(),
            alert_actions: vec!["fire_lane_blocked".into()],
            max_summary_bytes: usize::MAX,
        }
    }

    fn ev(kind: Kind, device: &str, id: &str, ts: i64, action: &str) -> Event {
        Event {
            kind,
            device: device.into(),
            id: id.into(),
            ts_ms: ts,
            action: action.into(),
            result: "ok".into(),
            subject: Some("card:1".into()),
        }
    }

    /// (window start, rev) -> counts, as the platform would keep them (highest rev wins).
    fn platform_view(outbox: &[Emit]) -> BTreeMap<i64, (u32, BTreeMap<String, u64>)> {
        let mut best: BTreeMap<i64, (u32, BTreeMap<String, u64>)> = BTreeMap::new();
        for e in outbox {
            if let Emit::Summary {
                start_ms,
                rev,
                payload,
            } = e
            {
                let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
                let mut counts = BTreeMap::new();
                for c in v["counts"].as_array().unwrap() {
                    let k = format!(
                        "{}/{}/{}",
                        c["kind"].as_str().unwrap(),
                        c["device"].as_str().unwrap(),
                        c["action"].as_str().unwrap()
                    );
                    counts.insert(k, c["n"].as_u64().unwrap());
                }
                match best.get(start_ms) {
                    Some((r, _)) if *r >= *rev => {}
                    _ => {
                        best.insert(*start_ms, (*rev, counts));
                    }
                }
            }
        }
        best
    }

    #[test]
    fn late_event_reissues_with_next_rev() {
        let en = engine();
        let mut l = MemLedger::default();
        let t0 = 1_000_000;
        en.apply(&mut l, &[ev(Kind::Access, "d1", "a", t0, "entry")], t0)
            .unwrap();
        assert!(l.outbox.is_empty());
        en.close_due(&mut l, t0 + 12_000).unwrap();
        assert_eq!(l.outbox.len(), 1);
        en.apply(
            &mut l,
            &[ev(Kind::Access, "d1", "b", t0 + 1, "entry")],
            t0 + 20_000,
        )
        .unwrap();
        let view = platform_view(&l.outbox);
        assert_eq!(
            view[&t0],
            (1, BTreeMap::from([("access/d1/entry".to_string(), 2)]))
        );
    }

    #[test]
    fn alerts_sent_and_counted() {
        let en = engine();
        let mut l = MemLedger::default();
        let out = en
            .apply(
                &mut l,
                &[
                    ev(Kind::Camera, "c1", "x", 5_000, "fire_lane_blocked"),
                    ev(Kind::Camera, "c1", "y", 5_000, "stranger"),
                ],
                5_000,
            )
            .unwrap();
        assert_eq!(out, vec![Outcome::Accepted, Outcome::Accepted]);
        let alerts: Vec<_> = l
            .outbox
            .iter()
            .filter(|e| matches!(e, Emit::Alert { .. }))
            .collect();
        assert_eq!(alerts.len(), 1);
        if let Emit::Alert { payload } = alerts[0] {
            let text = String::from_utf8_lossy(payload);
            assert!(!text.contains("card:"), "{text}");
        }
        assert_eq!(l.windows[&0].total(), 2);
    }

    #[test]
    fn duplicates_and_time_rules() {
        let en = engine();
        let mut l = MemLedger::default();
        let now = 1_000_000;
        let batch = [
            ev(Kind::Access, "d", "1", now, "entry"),
            ev(Kind::Access, "d", "1", now, "entry"),
            ev(Kind::Camera, "d", "1", now, "stranger"),
            ev(Kind::Access, "d", "2", now - 60_001, "entry"),
            ev(Kind::Access, "d", "3", now + 5_001, "entry"),
        ];
        let out = en.apply(&mut l, &batch, now).unwrap();
        assert_eq!(
            out,
            vec![
                Outcome::Accepted,
                Outcome::Duplicate,
                Outcome::Accepted,
                Outcome::Rejected(Reject::TooLate),
                Outcome::Rejected(Reject::TooFarFuture)
            ]
        );
        // After the TTL the same id counts again.
        let out = en.apply(&mut l, &batch[..1], now + 40_000).unwrap();
        assert_eq!(out, vec![Outcome::Accepted]);
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// Deliver events (device index, id, ts offset from now) as one batch.
        Batch(Vec<(u8, u8, i64)>),
        /// Advance the clock.
        Advance(i64),
        /// The daemon dies before committing the next batch: it is delivered again later.
        CrashBeforeCommit(Vec<(u8, u8, i64)>),
    }

    fn step() -> impl Strategy<Value = Step> {
        let evs = prop::collection::vec((0u8..3, 0u8..40, -70_000i64..8_000), 0..12);
        prop_oneof![
            4 => evs.clone().prop_map(Step::Batch),
            2 => (0i64..15_000).prop_map(Step::Advance),
            1 => evs.prop_map(Step::CrashBeforeCommit),
        ]
    }

    proptest! {
        /// Random streams with duplicates, out-of-order and late events, and crashes give exactly
        /// the model's counts: an event counts once if it was first delivered within the time
        /// rules and its id was not seen (accepted) within the TTL.
        #[test]
        fn engine_agrees_with_model(steps in prop::collection::vec(step(), 1..60)) {
            let en = engine();
            let mut l = MemLedger::default();
            let mut now: i64 = 10_000_000;
            // Model state.
            let mut seen: HashMap<String, i64> = HashMap::new();
            let mut expected: BTreeMap<i64, BTreeMap<String, u64>> = BTreeMap::new();
            let mut redeliver: Vec<Event> = Vec::new();
            let mk = |d: u8, id: u8, ts: i64| Event {
                kind: Kind::Access,
                device: format!("d{d}"),
                id: format!("e{id}"),
                ts_ms: ts,
                action: "entry".into(),
                result: "ok".into(),
                subject: None,
            };
            for s in steps {
                match s {
                    Step::Advance(d) => {
                        now += d;
                        en.close_due(&mut l, now).unwrap();
                    }
                    Step::CrashBeforeCommit(evs) => {
                        let batch: Vec<Event> = evs.iter().map(|(d, i, o)| mk(*d, *i, now + o)).collect();
                        let mut scratch = l.clone();
                        en.apply(&mut scratch, &batch, now).unwrap();
                        // Nothing committed; the broker redelivers the whole batch.
                        redeliver.extend(batch);
                    }
                    Step::Batch(evs) => {
                        let mut batch: Vec<Event> = std::mem::take(&mut redeliver);
                        batch.extend(evs.iter().map(|(d, i, o)| mk(*d, *i, now + o)));
                        let out = en.apply(&mut l, &batch, now).unwrap();
                        for (e, o) in batch.iter().zip(out) {
                            let key = e.dedup_key();
                            let dup = matches!(seen.get(&key), Some(t) if now - t < 40_000);
                            let expect = if dup {
                                Outcome::Duplicate
                            } else if e.ts_ms < now - 60_000 {
                                Outcome::Rejected(Reject::TooLate)
                            } else if e.ts_ms > now + 5_000 {
                                Outcome::Rejected(Reject::TooFarFuture)
                            } else {
                                seen.insert(key, now);
                                *expected
                                    .entry(e.ts_ms.div_euclid(10_000) * 10_000)
                                    .or_default()
                                    .entry(format!("access/{}/entry", e.device))
                                    .or_default() += 1;
                                Outcome::Accepted
                            };
                            prop_assert_eq!(o, expect);
                        }
                    }
                }
            }
            // Drain: deliver what is pending, then let every window close.
            let pending = std::mem::take(&mut redeliver);
            en.apply(&mut l, &pending, now).unwrap();
            for e in &pending {
                let key = e.dedup_key();
                let dup = matches!(seen.get(&key), Some(t) if now - t < 40_000);
                if !dup && e.ts_ms >= now - 60_000 && e.ts_ms <= now + 5_000 {
                    seen.insert(key, now);
                    *expected.entry(e.ts_ms.div_euclid(10_000) * 10_000).or_default()
                        .entry(format!("access/{}/entry", e.device)).or_default() += 1;
                }
            }
            now += 100_000;
            en.close_due(&mut l, now).unwrap();
            let view = platform_view(&l.outbox);
            let got: BTreeMap<i64, BTreeMap<String, u64>> = view.into_iter().map(|(k, (_, c))| (k, c)).collect();
            prop_assert_eq!(&got, &expected);
            // Revisions of a window are issued in increasing order with no gaps.
            let mut revs: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
            for e in &l.outbox {
                if let Emit::Summary { start_ms, rev, .. } = e {
                    revs.entry(*start_ms).or_default().push(*rev);
                }
            }
            for r in revs.values() {
                let want: Vec<u32> = (0..r.len() as u32).collect();
                prop_assert_eq!(r, &want);
            }
            // No empty window was ever sent.
            let starts: BTreeSet<i64> = revs.keys().copied().collect();
            let with_events: BTreeSet<i64> = expected.keys().copied().collect();
            prop_assert_eq!(starts, with_events);
        }
    }
}
