//! The forwarder's pure state: what was sent on a connection and what came back ([`Session`]:
//! pkids bound in issue order, send units acknowledged whole, the suspect when the broker
//! closes the connection), and what it keeps across connections about refusals
//! ([`PacketLimit`], [`Refusals`]). No client, no store, no clock (`now` is passed in); the I/O
//! loop in `mod.rs` only drives it.

use super::{MIN_LEARNED_PACKET, PARK_AFTER};
use crate::store::{OutboxKey, OutboxRecordV1};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The district broker's packet limit as far as this process knows it: `upstream.max_packet_size`
/// (summaries are issued split under it) or, once the broker closed the connection on a larger
/// publish, a smaller limit learned from that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PacketLimit {
    pub(super) configured: usize,
    pub(super) learned: Option<usize>,
}

impl PacketLimit {
    pub(super) fn current(&self) -> usize {
        self.learned.unwrap_or(self.configured)
    }

    /// The broker closed the connection with a publish of `refused` packet bytes not
    /// acknowledged, after it had acknowledged one of `proven` bytes on that connection. A
    /// publish no larger than one it took cannot be refused for its size; a larger one may be:
    /// the limit drops to half of it (or to `proven`, known to pass, if that is more), never
    /// below [`MIN_LEARNED_PACKET`]. Returns whether the limit dropped.
    pub(super) fn refused(&mut self, refused: usize, proven: usize) -> bool {
        if refused <= proven {
            return false;
        }
        let target = (refused / 2).max(proven).max(MIN_LEARNED_PACKET);
        if target < refused && target < self.current() {
            self.learned = Some(target);
            true
        } else {
            false
        }
    }
}

/// What the forwarder keeps across connections about the broker refusing messages.
pub(super) struct Refusals {
    /// Connections lost while this send unit (by its first key) was the suspect.
    pub(super) blamed: HashMap<OutboxKey, u32>,
    pub(super) limit: PacketLimit,
}

impl Refusals {
    /// The broker closed a connection with the send unit of `keys` blamed: one more try
    /// charged to it (by its first key). True when this was its `PARK_AFTER`th: park it (its
    /// count is forgotten). Empty `keys`: nothing to charge.
    pub(super) fn charge(&mut self, keys: &[OutboxKey]) -> bool {
        let Some(&first) = keys.first() else {
            return false;
        };
        let n = self.blamed.entry(first).or_insert(0);
        *n += 1;
        if *n >= PARK_AFTER {
            self.blamed.remove(&first);
            true
        } else {
            false
        }
    }
}

/// What a lost connection says, judged from what was in flight ([`Session::judge_refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Verdict {
    /// The limit dropped because of a refused publish of this many packet bytes.
    pub(super) learned_from: Option<usize>,
    /// The send unit to charge a try to (`None`: nothing in flight).
    pub(super) blame: Option<u64>,
}

/// What a queued publish was, in issue order, to bind the pkid rumqttc assigns.
pub(super) enum Sent {
    /// Publish `idx` of send unit `unit`.
    Outbox {
        unit: u64,
        idx: usize,
    },
    Status,
    Other,
}

/// One send unit: one outbox entry, or the parts of one summary rev split again as one. Its
/// keys are reported acked once every publish of it is.
pub(super) struct Unit {
    pub(super) keys: Vec<OutboxKey>,
    pub(super) pubs: Vec<Pub>,
    pub(super) unacked: usize,
}

pub(super) struct Pub {
    /// Packet bytes (payload, topic and MQTT header).
    pub(super) bytes: usize,
    /// Whether a smaller packet limit would send these rows in smaller publishes.
    pub(super) shrinks: bool,
    pub(super) acked: bool,
}

/// A publish prepared but not yet taken by the client (its request queue was full).
pub(super) struct Queued {
    pub(super) unit: u64,
    pub(super) idx: usize,
    pub(super) topic: String,
    pub(super) payload: Vec<u8>,
}

/// What was sent on one connection to the district broker and what came back: the pure state
/// the forwarder's I/O loop drives (rumqttc's `MqttState` is the model). No client, no clock:
/// `now` is passed in.
pub(super) struct Session {
    pub(super) sent: VecDeque<Sent>,
    /// pkid -> (unit, publish index, queued at).
    pub(super) by_pkid: HashMap<u16, (u64, usize, Instant)>,
    pub(super) queued_at: VecDeque<Instant>,
    /// Outbox keys in a send unit not yet acknowledged whole, and their unit.
    pub(super) inflight: BTreeMap<OutboxKey, u64>,
    pub(super) units: BTreeMap<u64, Unit>,
    pub(super) next_unit: u64,
    /// Outbox publishes not yet acknowledged (what `upstream.max_inflight` bounds).
    pub(super) publishes: usize,
    /// Publishes of a unit the client did not take yet, in order.
    pub(super) queue: VecDeque<Queued>,
    /// The largest publish (packet bytes) the broker acknowledged on this connection.
    pub(super) proven: usize,
    /// The packet limit summaries are sent under on this connection.
    pub(super) limit: usize,
    pub(super) cursor: [Option<u64>; 2],
    /// Summaries read from the outbox, not yet sent (the cursor is past them).
    pub(super) ahead: VecDeque<(OutboxKey, OutboxRecordV1)>,
    /// Whether the alerts class may hold something unsent.
    pub(super) check_alerts: bool,
    pub(super) status_pkid: Option<u16>,
    pub(super) status_acked: bool,
    /// This connection's epoch.
    pub(super) epoch: u64,
}

impl Session {
    /// A connection's state at connect: nothing sent, the packet limit known so far, its epoch.
    pub(super) fn new(limit: usize, epoch: u64) -> Session {
        Session {
            sent: VecDeque::new(),
            by_pkid: HashMap::new(),
            queued_at: VecDeque::new(),
            inflight: BTreeMap::new(),
            units: BTreeMap::new(),
            next_unit: 0,
            publishes: 0,
            queue: VecDeque::new(),
            proven: 0,
            limit,
            cursor: [None, None],
            ahead: VecDeque::new(),
            check_alerts: true,
            status_pkid: None,
            status_acked: false,
            epoch,
        }
    }

    /// A new send unit's id.
    pub(super) fn next_unit(&mut self) -> u64 {
        let unit = self.next_unit;
        self.next_unit += 1;
        unit
    }

    /// Send unit `unit` of the outbox entries `keys` goes out as `pubs` (queued in order).
    pub(super) fn open_unit(&mut self, unit: u64, keys: Vec<OutboxKey>, pubs: Vec<Pub>) {
        self.publishes += pubs.len();
        for k in &keys {
            self.inflight.insert(*k, unit);
        }
        self.units.insert(
            unit,
            Unit {
                keys,
                unacked: pubs.len(),
                pubs,
            },
        );
    }

    /// The client took a publish of `sent` at `now`; its pkid is bound by the next
    /// [`Session::bind`].
    pub(super) fn record_sent(&mut self, sent: Sent, now: Instant) {
        self.sent.push_back(sent);
        self.queued_at.push_back(now);
    }

    /// The broker closed the connection: if the [`Session::suspect`] is larger than any publish
    /// it acknowledged, the packet limit may drop (a size refusal); the suspect is blamed unless
    /// it will shrink under the new limit (it is simply sent again that way). Otherwise (not a
    /// size refusal) the suspect, or else the oldest unacknowledged entry, is blamed.
    pub(super) fn judge_refusal(&self, limit: &mut PacketLimit) -> Verdict {
        match self.suspect() {
            Some((unit, bytes, shrinks)) if bytes > self.proven => {
                if limit.refused(bytes, self.proven) {
                    Verdict {
                        learned_from: Some(bytes),
                        blame: (!shrinks).then_some(unit),
                    }
                } else {
                    Verdict {
                        learned_from: None,
                        blame: Some(unit),
                    }
                }
            }
            _ => Verdict {
                learned_from: None,
                blame: self.inflight.values().next().copied(),
            },
        }
    }

    /// rumqttc reports publishes in the order they were queued: bind the pkid to what we queued.
    pub(super) fn bind(&mut self, pkid: u16, now: Instant) {
        let at = self.queued_at.pop_front().unwrap_or(now);
        match self.sent.pop_front() {
            Some(Sent::Outbox { unit, idx }) => {
                self.by_pkid.insert(pkid, (unit, idx, at));
            }
            Some(Sent::Status) => self.status_pkid = Some(pkid),
            Some(Sent::Other) => {}
            None => tracing::warn!(pkid, "forwarder: publish event with nothing queued"),
        }
    }

    /// A PUBACK for an outbox publish: returns its unit's keys once the whole unit is
    /// acknowledged, and the queue-to-PUBACK time. `None` if `pkid` is not an outbox publish.
    pub(super) fn puback(
        &mut self,
        pkid: u16,
        now: Instant,
    ) -> Option<(Option<Vec<OutboxKey>>, Duration)> {
        let (unit_id, idx, at) = self.by_pkid.remove(&pkid)?;
        self.publishes = self.publishes.saturating_sub(1);
        let unit = self.units.get_mut(&unit_id)?;
        let p = unit.pubs.get_mut(idx)?;
        if !p.acked {
            p.acked = true;
            unit.unacked = unit.unacked.saturating_sub(1);
            self.proven = self.proven.max(p.bytes);
        }
        if unit.unacked > 0 {
            return Some((None, now.saturating_duration_since(at)));
        }
        let unit = self.units.remove(&unit_id)?;
        for k in &unit.keys {
            self.inflight.remove(k);
        }
        Some((Some(unit.keys), now.saturating_duration_since(at)))
    }

    /// The publish the broker most likely closed the connection on: the largest one written
    /// (its pkid bound) and not acknowledged; the earliest unit of those as large. Returns its
    /// unit, packet bytes and whether it would shrink under a smaller limit.
    pub(super) fn suspect(&self) -> Option<(u64, usize, bool)> {
        let mut best: Option<(u64, usize, bool)> = None;
        for &(unit, idx, _) in self.by_pkid.values() {
            let Some(p) = self.units.get(&unit).and_then(|u| u.pubs.get(idx)) else {
                continue;
            };
            if p.acked {
                continue;
            }
            let better = match best {
                None => true,
                Some((bu, bb, _)) => p.bytes > bb || (p.bytes == bb && unit < bu),
            };
            if better {
                best = Some((unit, p.bytes, p.shrinks));
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_packet_limit_is_learned_from_refusals_larger_than_what_passed() {
        let mut l = PacketLimit {
            configured: 256 << 10,
            learned: None,
        };
        // Nothing larger than what the broker took: not a size refusal.
        assert!(!l.refused(70_000, 70_000));
        assert_eq!(l.current(), 256 << 10);
        // A 70 KB publish refused after 300 bytes passed: half of it.
        assert!(l.refused(70_000, 300));
        assert_eq!(l.learned, Some(35_000));
        // A size known to pass is kept when it is more than half.
        assert!(l.refused(34_000, 20_000));
        assert_eq!(l.current(), 20_000);
        // Never up again, never below the floor.
        assert!(!l.refused(60_000, 0));
        assert_eq!(l.current(), 20_000);
        assert!(l.refused(1_500, 0));
        assert_eq!(l.current(), MIN_LEARNED_PACKET);
        assert!(!l.refused(1_200, 0));
        assert!(!l.refused(900, 0));
        assert_eq!(l.current(), MIN_LEARNED_PACKET);
    }

    fn conn() -> Session {
        let mut c = Session::new(1 << 20, 1);
        c.check_alerts = false;
        c
    }

    fn add(c: &mut Session, keys: &[OutboxKey], sizes: &[(usize, bool)]) -> u64 {
        let unit = c.next_unit();
        for (idx, _) in sizes.iter().enumerate() {
            c.record_sent(Sent::Outbox { unit, idx }, Instant::now());
        }
        c.open_unit(
            unit,
            keys.to_vec(),
            sizes
                .iter()
                .map(|&(bytes, shrinks)| Pub {
                    bytes,
                    shrinks,
                    acked: false,
                })
                .collect(),
        );
        unit
    }

    #[test]
    fn a_unit_is_acked_after_all_its_publishes_and_the_suspect_is_the_largest_written() {
        let mut c = conn();
        add(&mut c, &[(1, 10)], &[(500, true)]);
        let b = add(
            &mut c,
            &[(1, 11), (1, 12), (1, 13)],
            &[(30_000, true), (20_000, true)],
        );
        // Nothing written yet: no suspect.
        assert_eq!(c.suspect(), None);
        for pkid in 1..=3 {
            c.bind(pkid, Instant::now());
        }
        assert_eq!(c.suspect(), Some((b, 30_000, true)));
        assert_eq!(c.publishes, 3);
        // Unit a: one publish.
        let (done, _) = c.puback(1, Instant::now()).unwrap();
        assert_eq!(done, Some(vec![(1, 10)]));
        assert_eq!(c.proven, 500);
        // Unit b: its keys only after both publishes.
        assert_eq!(c.puback(2, Instant::now()).unwrap().0, None);
        assert_eq!(c.suspect(), Some((b, 20_000, true)));
        assert!(c.inflight.contains_key(&(1, 12)));
        assert_eq!(
            c.puback(3, Instant::now()).unwrap().0,
            Some(vec![(1, 11), (1, 12), (1, 13)])
        );
        assert!(c.inflight.is_empty() && c.units.is_empty());
        assert_eq!((c.publishes, c.proven), (0, 30_000));
        assert!(
            c.puback(3, Instant::now()).is_none(),
            "a PUBACK counted once"
        );
    }

    #[test]
    fn a_refusal_larger_than_what_passed_teaches_the_limit_and_blames_only_what_cannot_shrink() {
        let mut limit = PacketLimit {
            configured: 256 << 10,
            learned: None,
        };
        let mut c = conn();
        add(&mut c, &[(1, 1)], &[(300, false)]);
        add(&mut c, &[(1, 2)], &[(70_000, true)]);
        for pkid in 1..=2 {
            c.bind(pkid, Instant::now());
        }
        c.puback(1, Instant::now());
        // 70 KB refused after 300 bytes passed: learned, and the summary shrinks: no blame.
        let v = c.judge_refusal(&mut limit);
        assert_eq!((v.learned_from, v.blame), (Some(70_000), None));
        assert_eq!(limit.current(), 35_000);
        // The same again cannot teach more than the floor allows; an alert never shrinks.
        let mut c = conn();
        let alert = add(&mut c, &[(0, 7)], &[(40_000, false)]);
        c.bind(1, Instant::now());
        let v = c.judge_refusal(&mut limit);
        assert_eq!((v.learned_from, v.blame), (Some(40_000), Some(alert)));
        // Nothing larger than what passed: not a size refusal; the oldest in flight is blamed.
        let mut c = conn();
        let first = add(&mut c, &[(1, 9)], &[(500, true)]);
        assert_eq!(
            c.judge_refusal(&mut limit),
            Verdict {
                learned_from: None,
                blame: Some(first)
            }
        );
    }

    #[test]
    fn a_unit_is_parked_on_its_third_charge_and_then_forgotten() {
        let mut r = Refusals {
            blamed: HashMap::new(),
            limit: PacketLimit {
                configured: 1 << 20,
                learned: None,
            },
        };
        let keys = [(1, 5), (1, 6)];
        assert!(!r.charge(&keys));
        assert!(!r.charge(&keys));
        assert!(r.charge(&keys), "parked after PARK_AFTER tries");
        assert!(r.blamed.is_empty());
        assert!(!r.charge(&[]));
    }

    use proptest::prelude::*;

    proptest! {
        /// Against a model: whatever order PUBACKs arrive in (and repeated), a unit's keys are
        /// reported exactly once, after its last publish; the in-flight count is the bound
        /// publishes not yet acknowledged; the proven size is the largest acknowledged.
        #[test]
        fn units_are_reported_once_after_their_last_puback(
            units in proptest::collection::vec(proptest::collection::vec(1usize..100_000, 1..4), 1..8),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let mut c = conn();
            let mut pkid = 0u16;
            let mut pubs: Vec<(u16, u64, usize)> = Vec::new();
            for (i, sizes) in units.iter().enumerate() {
                let keys = [(1u8, i as u64)];
                let unit = add(&mut c, &keys, &sizes.iter().map(|&b| (b, true)).collect::<Vec<_>>());
                for &b in sizes {
                    pkid += 1;
                    c.bind(pkid, Instant::now());
                    pubs.push((pkid, unit, b));
                }
            }
            let mut acked = std::collections::BTreeSet::new();
            let mut reported: Vec<u64> = Vec::new();
            let mut proven = 0;
            // Random PUBACKs (repeats included), then every one in order.
            let all: Vec<usize> = order.iter().map(|ix| ix.index(pubs.len())).chain(0..pubs.len()).collect();
            for i in all {
                let (p, unit, bytes) = pubs[i];
                let first = acked.insert(p);
                match c.puback(p, Instant::now()) {
                    None => prop_assert!(!first, "a first PUBACK is always known"),
                    Some((done, _)) => {
                        prop_assert!(first);
                        proven = proven.max(bytes);
                        let unit_done = pubs.iter().filter(|x| x.1 == unit).all(|x| acked.contains(&x.0));
                        prop_assert_eq!(done.is_some(), unit_done);
                        if let Some(keys) = done {
                            prop_assert_eq!(keys, vec![(1u8, unit)]);
                            prop_assert!(!reported.contains(&unit));
                            reported.push(unit);
                        }
                    }
                }
                prop_assert_eq!(c.publishes, pubs.len() - acked.len());
                prop_assert_eq!(c.proven, proven);
            }
            prop_assert_eq!(reported.len(), units.len());
            prop_assert!(c.inflight.is_empty() && c.units.is_empty());
        }
    }
}
