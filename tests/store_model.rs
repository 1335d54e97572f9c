//! The redb store against the in-memory model: random batches with duplicates, out-of-order and
//! late events, forwarder acks and store reopens (restarts) give exactly the model's summaries.

use proptest::prelude::*;
use zhian_gateway::config::SubjectMode;
use zhian_gateway::core::engine::{Emit, Engine, MemLedger};
use zhian_gateway::core::event::{Event, Kind};
use zhian_gateway::core::summary::Site;
use zhian_gateway::core::window::WindowCfg;
use zhian_gateway::store::{Store, CLASS_SUMMARY};

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

#[derive(Debug, Clone)]
enum Step {
    Batch(Vec<(u8, u8, i64)>),
    Advance(i64),
    /// Close and reopen the store (a restart).
    Reopen,
    /// The forwarder got PUBACKs for the first `n` pending summaries.
    Ack(usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => prop::collection::vec((0u8..3, 0u8..30, -70_000i64..8_000), 0..10).prop_map(Step::Batch),
        2 => (0i64..15_000).prop_map(Step::Advance),
        1 => Just(Step::Reopen),
        1 => (0usize..4).prop_map(Step::Ack),
    ]
}

fn mk(d: u8, id: u8, ts: i64) -> Event {
    Event {
        kind: if d == 2 { Kind::Vehicle } else { Kind::Access },
        device: format!("dev{d}"),
        id: format!("e{id}"),
        ts_ms: ts,
        action: "entry".into(),
        result: "ok".into(),
        subject: Some(format!("card:{id}")),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_memory_model(steps in prop::collection::vec(step(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let en = engine();
        let (mut store, mut w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        let mut model = MemLedger::default();
        let mut now: i64 = 50_000_000;
        // Everything the store ever emitted (payloads), in order, including acked ones.
        let mut sent: Vec<Vec<u8>> = Vec::new();
        let mut seen_seq = std::collections::BTreeSet::new();
        let collect = |store: &Store, sent: &mut Vec<Vec<u8>>, seen: &mut std::collections::BTreeSet<u64>| {
            for (k, rec) in store.outbox_after(CLASS_SUMMARY, None, usize::MAX).unwrap() {
                if seen.insert(k.1) {
                    sent.push(rec.payload);
                }
            }
        };
        for s in steps {
            match s {
                Step::Batch(evs) => {
                    let batch: Vec<Event> = evs.iter().map(|(d, i, o)| mk(*d, *i, now + o)).collect();
                    let refs: Vec<&Event> = batch.iter().collect();
                    let got = w.commit(&en, &refs, &[], now, None).unwrap().outcomes;
                    let want = en.apply(&mut model, &batch, now).unwrap();
                    prop_assert_eq!(got, want);
                }
                Step::Advance(d) => {
                    now += d;
                    w.commit(&en, &[], &[], now, None).unwrap();
                    en.close_due(&mut model, now).unwrap();
                }
                Step::Reopen => {
                    drop((store, w));
                    (store, w) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
                }
                Step::Ack(n) => {
                    collect(&store, &mut sent, &mut seen_seq);
                    let keys: Vec<_> = store
                        .outbox_after(CLASS_SUMMARY, None, n)
                        .unwrap()
                        .into_iter()
                        .map(|(k, _)| k)
                        .collect();
                    w.commit(&en, &[], &keys, now, None).unwrap();
                }
            }
            collect(&store, &mut sent, &mut seen_seq);
        }
        let model_sent: Vec<Vec<u8>> = model
            .outbox
            .iter()
            .filter_map(|e| match e {
                Emit::Summary { payload, .. } => Some(payload.clone()),
                Emit::Alert { .. } => None,
            })
            .collect();
        prop_assert_eq!(sent, model_sent);
        // Windows agree too.
        let windows = store.windows().unwrap();
        let model_windows: Vec<_> = model.windows.values().cloned().collect();
        prop_assert_eq!(windows, model_windows);
        // Raw events: the accepted ones, with no subject in clear.
        prop_assert_eq!(store.raw_events().unwrap().len(), model.raw.len());
    }
}
