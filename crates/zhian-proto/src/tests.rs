//! Every message round-trips (serialize, parse, equal), and the wire shape is the contract's.

use super::*;
use proptest::prelude::*;

/// 1970-01-01 to 9999-12-31T23:59:59.999Z: what RFC 3339 writes with a four-digit year.
fn ts() -> impl Strategy<Value = Timestamp> {
    (0i64..=253_402_300_799_999).prop_map(Timestamp)
}

fn text() -> impl Strategy<Value = String> {
    ".{0,12}"
}

fn site() -> impl Strategy<Value = Site> {
    (
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
        proptest::option::of(text()),
    )
        .prop_map(|(district, street, community, compound)| Site {
            district,
            street,
            community,
            compound,
        })
}

fn count() -> impl Strategy<Value = Count> {
    (
        prop_oneof![Just("access"), Just("camera"), Just("vehicle")],
        text(),
        text(),
        text(),
        any::<u64>(),
    )
        .prop_map(|(kind, device, action, result, n)| Count {
            kind: kind.into(),
            device,
            action,
            result,
            n,
        })
}

#[test]
fn config_state_topic_is_a_leaf_of_two_levels() {
    assert_eq!(
        topic("zhian/v1", "gw-1", Leaf::ConfigState),
        "zhian/v1/gw-1/config/state"
    );
    assert_eq!(
        parse_topic("zhian/v1", "zhian/v1/gw-1/config/state"),
        Ok(("gw-1", Leaf::ConfigState))
    );
    assert_eq!(
        parse_topic("zhian/v1", "zhian/v1/gw-1/config/set"),
        Err(TopicError::Shape)
    );
    let set: ConfigSet = serde_json::from_str(
        r#"{"schema":"zhian.config.v1","serial":3,"fragment":"[alerts]","sig":"x"}"#,
    )
    .unwrap();
    assert_eq!(set.serial, 3);
}

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    if M::LEAF != Leaf::Status || v.get("schema").is_some() {
        assert_eq!(
            v["schema"],
            M::SCHEMA,
            "{}",
            String::from_utf8_lossy(&bytes)
        );
    }
    let back: M = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(&back, m);
}

proptest! {
    #[test]
    fn summaries_round_trip(
        gateway in "[a-z0-9-]{1,64}", site in site(), start in ts(), secs in 1u32..=86_400,
        rev in any::<u32>(), part in proptest::option::of((1u32..5, 5u32..9)),
        counts in proptest::collection::vec(count(), 0..6),
    ) {
        round_trip(&Summary {
            schema: SummaryV1, gateway, site, window: Window { start, secs }, rev,
            part: part.map(|p| p.0), parts: part.map(|p| p.1), counts,
        });
    }

    #[test]
    fn alerts_round_trip(gateway in "[a-z0-9-]{1,64}", device in text(), action in text(),
                         id in text(), at in ts()) {
        round_trip(&Alert { schema: AlertV1, gateway, kind: "camera".into(), device, action, id, ts: at });
    }

    #[test]
    fn care_notices_round_trip(gateway in "[a-z0-9-]{1,64}", alias in text(), silent in any::<bool>(),
                               last_seen in proptest::option::of(ts()), silent_secs in any::<i64>()) {
        let state = if silent { CareState::Silent } else { CareState::Seen };
        round_trip(&Care { schema: CareV1, gateway, alias, state, last_seen, silent_secs });
    }

    #[test]
    fn dailies_round_trip(gateway in "[a-z0-9-]{1,64}", site in site(), rev in any::<u32>(),
                          distinct in proptest::option::of((any::<u64>(), any::<u64>())),
                          key_generations in proptest::option::of(2u32..=64),
                          counts in proptest::collection::vec(count(), 0..6)) {
        let d = Daily {
            schema: DailyV1, gateway, site, date: "2026-11-30".into(), tz: "+08:00".into(), rev,
            distinct: Distinct {
                access_subjects: distinct.map(|d| d.0), vehicles: distinct.map(|d| d.1),
                key_generations,
            },
            counts,
        };
        round_trip(&d);
        // One key: the field is left out, so the payload is what it was before the field.
        let v: serde_json::Value = serde_json::from_slice(&d.to_bytes()).unwrap();
        prop_assert_eq!(v["distinct"].get("key_generations").is_some(), key_generations.is_some());
    }

    #[test]
    fn statuses_round_trip(online in any::<bool>(), gateway in proptest::option::of("[a-z0-9-]{1,64}"),
                           epoch in proptest::option::of(0u64..=1 << 53), since in proptest::option::of(ts()),
                           street in proptest::option::of(".{0,12}")) {
        let state = if online { LinkState::Online } else { LinkState::Offline };
        let site = street.map(|s| Site { street: Some(s), ..Site::default() });
        round_trip(&Status { schema: StatusV1, state, gateway, epoch, version: Some("0.1.0".into()), since, site });
    }

    #[test]
    fn config_states_round_trip(serial in any::<u64>(), phase in 0usize..5, reason in proptest::option::of(".{0,40}"),
                                at in proptest::option::of(ts()), gateway in proptest::option::of("[a-z0-9-]{1,64}")) {
        let state = ConfigPhase::ALL[phase];
        let m = ConfigState { schema: ConfigStateV1, gateway, serial, state, reason, config_hash: "ab".repeat(32), at };
        round_trip(&m);
        let v: serde_json::Value = serde_json::from_slice(&m.to_bytes()).unwrap();
        prop_assert_eq!(v["state"].as_str(), Some(state.as_str()));
    }

    #[test]
    fn a_config_signature_covers_gateway_serial_and_fragment(g in "[a-z0-9-]{1,8}", s in any::<u64>(), f in ".{0,40}") {
        let b = config_signed_bytes(&g, s, &f);
        prop_assert_ne!(&b, &config_signed_bytes(&format!("{g}x"), s, &f));
        prop_assert_ne!(&b, &config_signed_bytes(&g, s.wrapping_add(1), &f));
        prop_assert_ne!(&b, &config_signed_bytes(&g, s, &format!("{f} ")));
    }

    #[test]
    fn heartbeats_round_trip(gateway in "[a-z0-9-]{1,64}", epoch in 0u64..=1 << 53, n in any::<u64>(),
                             oldest in proptest::option::of(ts()), reason in text()) {
        round_trip(&Heartbeat {
            schema: HeartbeatV1, gateway, epoch: Some(epoch), version: "0.1.0".into(), uptime_secs: n,
            devices: DeviceCounts { online: n / 2, offline: 3 }, pending_summaries: n, pending_alerts: 1,
            parked: 0, oldest_pending_window: oldest, store_bytes: n,
            counters: Counters {
                received: n, rejected_by_reason: [(reason.clone(), 2)].into(), ..Counters::default()
            },
            dropped: Dropped::default(),
            intake_paused: Some(Paused { reason: "disk_full".into(), detail: reason.clone(), since_ms: 5 }),
            store_quarantined: vec![Quarantined { file: "x.redb".into(), bytes: 9, reason: None }],
            link_problems: [("site".to_string(), Problem { reason: "refused".into(), detail: reason })].into(),
            modbus: vec![ModbusDevice {
                name: "gate-1".into(), kind: "vehicle".into(), online: true, polls: 3, errors: 0,
                last_error: None, last_seen: oldest, counted: 7, glitches: 0,
                states: [("barrier".to_string(), serde_json::json!(1))].into_iter().collect(),
            }],
        });
    }

    #[test]
    fn timestamps_round_trip_through_text(t in ts()) {
        prop_assert_eq!(Timestamp::parse(&rfc3339_utc(t.0)), Some(t));
    }

    #[test]
    fn topics_round_trip(gateway in "[a-z0-9-]{1,64}", i in 0usize..6) {
        let leaf = Leaf::ALL[i];
        let t = topic("zhian/district", &gateway, leaf);
        prop_assert_eq!(parse_topic("zhian/district", &t), Ok((gateway.as_str(), leaf)));
    }
}

#[test]
fn a_summary_is_the_contracts_shape() {
    let s = Summary {
        schema: SummaryV1,
        gateway: "fy-fuchun-jiangbin-01".into(),
        site: Site {
            compound: Some("春江花园".into()),
            ..Site::default()
        },
        window: Window {
            start: Timestamp::parse("2026-11-28T00:00:00Z").unwrap(),
            secs: 60,
        },
        rev: 0,
        part: None,
        parts: None,
        counts: vec![Count {
            kind: "access".into(),
            device: "door-3".into(),
            action: "entry".into(),
            result: "granted".into(),
            n: 42,
        }],
    };
    assert_eq!(
        String::from_utf8(s.to_bytes()).unwrap(),
        r#"{"schema":"zhian.summary.v1","gateway":"fy-fuchun-jiangbin-01","site":{"compound":"春江花园"},"window":{"start":"2026-11-28T00:00:00Z","secs":60},"rev":0,"counts":[{"kind":"access","device":"door-3","action":"entry","result":"granted","n":42}]}"#
    );
}

#[test]
fn a_daily_without_key_generations_parses_and_one_with_them_says_so() {
    let old = br#"{"schema":"zhian.daily.v1","gateway":"g","site":{},"date":"2026-11-30","tz":"+08:00","rev":0,"distinct":{"access_subjects":3,"vehicles":null},"counts":[]}"#;
    let d: Daily = serde_json::from_slice(old).unwrap();
    assert_eq!(d.distinct.key_generations, None);
    assert_eq!(
        d.to_bytes(),
        old.to_vec(),
        "an old payload is written back unchanged"
    );
    let new = br#"{"schema":"zhian.daily.v1","gateway":"g","date":"2026-11-30","tz":"+08:00","rev":0,"distinct":{"access_subjects":3,"vehicles":0,"key_generations":2},"counts":[]}"#;
    let d: Daily = serde_json::from_slice(new).unwrap();
    assert_eq!(d.distinct.key_generations, Some(2));
}

#[test]
fn a_wrong_schema_or_time_does_not_parse() {
    let bad = br#"{"schema":"zhian.summary.v2","gateway":"g","window":{"start":"2026-11-28T00:00:00Z","secs":60},"rev":0,"counts":[]}"#;
    let e = serde_json::from_slice::<Summary>(bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expected \"zhian.summary.v1\""), "{e}");
    let bad = br#"{"schema":"zhian.alert.v1","gateway":"g","kind":"camera","device":"d","action":"a","id":"1","ts":"yesterday"}"#;
    assert!(serde_json::from_slice::<Alert>(bad).is_err());
    // Unix milliseconds are a time too (some senders write numbers).
    let ms = br#"{"schema":"zhian.alert.v1","gateway":"g","kind":"camera","device":"d","action":"a","id":"1","ts":1764288000000}"#;
    assert_eq!(
        serde_json::from_slice::<Alert>(ms).unwrap().ts,
        Timestamp(1_764_288_000_000)
    );
}

#[test]
fn a_status_without_schema_or_gateway_parses() {
    let s: Status = serde_json::from_slice(br#"{"state":"offline","epoch":7}"#).unwrap();
    assert_eq!(
        (s.state, s.epoch, s.gateway),
        (LinkState::Offline, Some(7), None)
    );
}

#[test]
fn topics_outside_the_contract_are_refused() {
    let p = "zhian/district";
    assert_eq!(
        parse_topic(p, "other/gw-1/summary"),
        Err(TopicError::NotUnderPrefix)
    );
    assert_eq!(
        parse_topic(p, "zhian/district/gw-1/a/b"),
        Err(TopicError::Shape)
    );
    assert_eq!(
        parse_topic(p, "zhian/district/GW/summary"),
        Err(TopicError::Gateway)
    );
    assert_eq!(
        parse_topic(p, "zhian/district/gw-1/news"),
        Err(TopicError::UnknownLeaf("news".into()))
    );
}
