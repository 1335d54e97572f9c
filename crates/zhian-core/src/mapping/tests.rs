//! The vendor mapping's unit and property tests: samples as vendors send them, encodings,
//! numbers by value, batches, times.

use super::*;

fn ptr(p: &str) -> Rule {
    Rule {
        from: From::Pointer(p.into()),
        map: None,
        default: None,
        format: TsFormat::Auto,
    }
}

fn hik() -> Source {
    Source {
        name: "hik".into(),
        topic: "hik/acs/+/event".into(),
        encoding: Encoding::Utf8,
        each: None,
        kind: Rule::constant("access"),
        device: Rule {
            from: From::Topic(2),
            ..Rule::constant("")
        },
        id: Rule {
            from: From::Join(
                vec![
                    Part::Field("device"),
                    Part::Pointer("/AccessControllerEvent/serialNo".into()),
                ],
                "-".into(),
            ),
            ..Rule::constant("")
        },
        ts: Rule {
            format: TsFormat::Rfc3339,
            ..ptr("/dateTime")
        },
        action: Rule::constant("entry"),
        result: Some(Rule {
            map: Some(
                [
                    ("1".to_string(), "granted".to_string()),
                    ("9".into(), "denied".into()),
                ]
                .into(),
            ),
            ..ptr("/AccessControllerEvent/subEventType")
        }),
        subject: Some(ptr("/AccessControllerEvent/cardNo")),
    }
}

#[test]
fn maps_a_nested_vendor_event() {
    let p = br#"{"dateTime":"2026-11-30T08:15:02+08:00","eventType":"AccessControllerEvent",
        "AccessControllerEvent":{"majorEventType":5,"subEventType":1,"cardNo":"3011223344","serialNo":4521}}"#;
    let e = map(&hik(), "hik/acs/door-3/event", p, 8 * 3600).unwrap();
    assert_eq!(
        (e.kind, e.device.as_str(), e.id.as_str()),
        (Kind::Access, "door-3", "door-3-4521")
    );
    assert_eq!(e.result, "granted");
    assert_eq!(e.subject.as_deref(), Some("3011223344"));
    assert_eq!(e.ts_ms, rfc3339_ms("2026-11-30T00:15:02Z").unwrap());
    // A code not in the map names the rule.
    let p = br#"{"dateTime":"2026-11-30T08:15:02+08:00","AccessControllerEvent":{"subEventType":77,"serialNo":1}}"#;
    let (r, u) = map(&hik(), "hik/acs/door-3/event", p, 0).unwrap_err();
    assert_eq!(r, Reject::Unmapped);
    let u = u.unwrap();
    assert_eq!(u.field, "result");
    assert!(u.to_string().contains("\"77\" is not in its map"), "{u}");
    // A missing serial number: the id's join part is named.
    let p =
        br#"{"dateTime":"2026-11-30T08:15:02+08:00","AccessControllerEvent":{"subEventType":1}}"#;
    let u = map(&hik(), "hik/acs/door-3/event", p, 0)
        .unwrap_err()
        .1
        .unwrap();
    assert_eq!(u.field, "id");
    assert!(u.why.contains("/AccessControllerEvent/serialNo"), "{u}");
}

#[test]
fn times_in_every_format() {
    assert_eq!(
        local_ms("2026-11-30 08:16:40", 8 * 3600),
        rfc3339_ms("2026-11-30T00:16:40Z")
    );
    assert_eq!(
        local_ms("2026-11-30T08:16:40.5", 8 * 3600),
        Some(rfc3339_ms("2026-11-30T00:16:40Z").unwrap() + 500)
    );
    assert_eq!(local_ms("30/11/2026 08:16", 0), None);
    let mut s = hik();
    let local_want = rfc3339_ms("2026-11-30T00:16:40Z").unwrap();
    for (fmt, v, want) in [
        (TsFormat::EpochS, "1796001400", 1_796_001_400_000),
        (TsFormat::EpochS, "\"1796001400.25\"", 1_796_001_400_250),
        (TsFormat::EpochMs, "1796001400123", 1_796_001_400_123),
        (TsFormat::Auto, "1796001400", 1_796_001_400_000),
        (TsFormat::Auto, "1796001400123", 1_796_001_400_123),
        (TsFormat::Local, "\"2026-11-30 08:16:40\"", local_want),
    ] {
        s.ts = Rule {
            format: fmt,
            ..ptr("/t")
        };
        let p = format!(r#"{{"t":{v},"AccessControllerEvent":{{"subEventType":1,"serialNo":1}}}}"#);
        let e = map(&s, "hik/acs/d/event", p.as_bytes(), 8 * 3600).unwrap();
        assert_eq!(e.ts_ms, want, "{fmt:?} {v}");
    }
}

#[test]
fn gbk_payloads_keep_their_characters() {
    let mut s = hik();
    s.subject = Some(ptr("/plate"));
    let text = r#"{"dateTime":"2026-12-04T12:37:42+08:00","plate":"浙A12345","AccessControllerEvent":{"subEventType":1,"serialNo":7}}"#;
    let (gbk, _, bad) = encoding_rs::GBK.encode(text);
    assert!(!bad);
    assert!(
        std::str::from_utf8(&gbk).is_err(),
        "the sample is not UTF-8"
    );
    assert_eq!(
        map(&s, "hik/acs/d/event", &gbk, 0).unwrap_err().0,
        Reject::InvalidUtf8
    );
    for enc in [Encoding::Gb18030, Encoding::Auto] {
        s.encoding = enc;
        let e = map(&s, "hik/acs/d/event", &gbk, 0).unwrap();
        assert_eq!(e.subject.as_deref(), Some("浙A12345"), "{enc:?}");
    }
    // auto still reads UTF-8 as UTF-8.
    let e = map(&s, "hik/acs/d/event", text.as_bytes(), 0).unwrap();
    assert_eq!(e.subject.as_deref(), Some("浙A12345"));
    // GBK that is also valid UTF-8 (鲁 is C2 B3, "³" in UTF-8): auto reads it as GBK.
    s.encoding = Encoding::Auto;
    let lu = r#"{"dateTime":"2026-12-04T12:37:42+08:00","plate":"鲁A12345","AccessControllerEvent":{"subEventType":1,"serialNo":8}}"#;
    let (lu_gbk, _, _) = encoding_rs::GBK.encode(lu);
    assert!(
        std::str::from_utf8(&lu_gbk).is_ok(),
        "the trap: valid UTF-8"
    );
    let e = map(&s, "hik/acs/d/event", &lu_gbk, 0).unwrap();
    assert_eq!(e.subject.as_deref(), Some("鲁A12345"));
    // A byte-order mark is not an invalid payload.
    let mut bom = b"\xef\xbb\xbf".to_vec();
    bom.extend_from_slice(text.as_bytes());
    assert!(map(&s, "hik/acs/d/event", &bom, 0).is_ok());
    // Bytes that are neither: a reject, never a replacement character in an id.
    s.encoding = Encoding::Gb18030;
    assert_eq!(
        map(&s, "hik/acs/d/event", b"{\"a\":\"\xff\xff\"}", 0)
            .unwrap_err()
            .0,
        Reject::InvalidUtf8
    );
}

#[test]
fn numbers_match_maps_by_value_and_ids_keep_their_text() {
    let s = hik();
    for code in ["1", "1.0", "\"1\"", "1e0", "\" 1 \""] {
        let p = format!(
            r#"{{"dateTime":"2026-11-30T08:15:02+08:00","AccessControllerEvent":{{"subEventType":{code},"serialNo":1}}}}"#
        );
        let e = map(&s, "hik/acs/d/event", p.as_bytes(), 0).unwrap();
        assert_eq!(e.result, "granted", "{code}");
    }
    let p = br#"{"dateTime":"2026-11-30T08:15:02+08:00","AccessControllerEvent":{"subEventType":9.0,"serialNo":1}}"#;
    assert_eq!(map(&s, "hik/acs/d/event", p, 0).unwrap().result, "denied");
    // 1.5 is in no map and there is no default: unmapped, never a silent category.
    let p = br#"{"dateTime":"2026-11-30T08:15:02+08:00","AccessControllerEvent":{"subEventType":1.5,"serialNo":1}}"#;
    let u = map(&s, "hik/acs/d/event", p, 0).unwrap_err().1.unwrap();
    assert_eq!(u.field, "result");
    // Serial numbers past 2^64 (and with a fraction) keep their exact text.
    let mut ids = std::collections::BTreeSet::new();
    for serial in ["123456789012345678901", "123456789012345678902", "7.10"] {
        let p = format!(
            r#"{{"dateTime":"2026-11-30T08:15:02+08:00","AccessControllerEvent":{{"subEventType":1,"serialNo":{serial}}}}}"#
        );
        let e = map(&s, "hik/acs/d/event", p.as_bytes(), 0).unwrap();
        assert_eq!(e.id, format!("d-{serial}"));
        ids.insert(e.id);
    }
    assert_eq!(ids.len(), 3);
}

#[test]
fn a_batch_maps_each_element_with_the_message_around_it() {
    let mut s = hik();
    s.each = Some("/events".into());
    s.ts = Rule {
        format: TsFormat::Auto,
        ..ptr("/dateTime")
    };
    let p = br#"{"dateTime":"2026-11-30T08:15:02+08:00","events":[
        {"AccessControllerEvent":{"subEventType":1,"serialNo":1}},
        {"AccessControllerEvent":{"subEventType":9,"serialNo":2},"dateTime":"2026-11-30T08:15:09+08:00"},
        {"AccessControllerEvent":{"subEventType":77,"serialNo":3}}]}"#;
    let out = map_all(&s, "hik/acs/d/event", p, 0);
    assert_eq!(out.len(), 3);
    let e0 = out[0].as_ref().unwrap();
    let e1 = out[1].as_ref().unwrap();
    assert_eq!((e0.id.as_str(), e0.result.as_str()), ("d-1", "granted"));
    assert_eq!((e1.id.as_str(), e1.result.as_str()), ("d-2", "denied"));
    // The element's own time wins over the message's.
    assert_eq!(e1.ts_ms - e0.ts_ms, 7_000);
    let u = out[2].as_ref().unwrap_err().1.clone().unwrap();
    assert!(u.why.starts_with("element 2:"), "{u}");
    // An element without an id does not borrow the message's (nor its subject).
    let p = br#"{"dateTime":"2026-11-30T08:15:02+08:00","serialNo":77,"events":[
        {"AccessControllerEvent":{"subEventType":1,"serialNo":1}},
        {"AccessControllerEvent":{"subEventType":1}}, "not an object"]}"#;
    let out = map_all(&s, "hik/acs/d/event", p, 0);
    assert!(out[0].is_ok());
    assert_eq!(out[1].as_ref().unwrap_err().1.as_ref().unwrap().field, "id");
    assert_eq!(
        out[2].as_ref().unwrap_err().1.as_ref().unwrap().field,
        "each"
    );
    for bad in [&br#"{"events":[]}"#[..], br#"{"events":{}}"#, br#"{}"#] {
        let out = map_all(&s, "hik/acs/d/event", bad, 0);
        assert_eq!(out.len(), 1);
        assert_eq!(
            out[0].as_ref().unwrap_err().1.as_ref().unwrap().field,
            "each"
        );
    }
}

#[test]
fn vendor_time_stamps_in_auto() {
    let want = rfc3339_ms("2026-12-04T04:37:42Z").unwrap();
    let site = 8 * 3600;
    for t in [
        "2026-12-04T12:37:42+08:00",
        "2026-12-04T12:37:42+0800",
        "2026-12-04 12:37:42+0800",
        "2026-12-04T12:37:42+08:00[Asia/Shanghai]",
        "2026-12-04 12:37:42 CST",
        "2026-12-04 04:37:42 UTC",
        "2026-12-04 12:37:42",
    ] {
        assert_eq!(auto_ms(t, site), Some(want), "{t}");
    }
    // A zone suffix needs its offset; a critical one asks for a check not done here.
    assert_eq!(auto_ms("2026-12-04T12:37:42[UTC]", site), None);
    assert_eq!(auto_ms("2026-12-04 12:37:42[Asia/Shanghai]", site), None);
    assert_eq!(
        auto_ms("2026-12-04T12:37:42+08:00[!Asia/Shanghai]", site),
        None
    );
    assert_eq!(auto_ms("2026-12-04T04:37:42Z[UTC]", site), Some(want));
    // CST at a site that is not on +08:00 is not read as China time; nonsense is not a time.
    assert_eq!(auto_ms("2026-12-04 12:37:42 CST", 0), None);
    assert_eq!(auto_ms("2026-12-04 12:37:42 XYZ", site), None);
    assert_eq!(auto_ms("yesterday", site), None);
}

#[test]
fn filters_match_like_mqtt() {
    assert!(topic_matches("a/+/c", "a/b/c"));
    assert!(topic_matches("a/#", "a/b/c"));
    assert!(topic_matches("#", "x"));
    assert!(!topic_matches("a/+", "a/b/c"));
    assert!(!topic_matches("a/b", "a/b/c"));
    assert!(topic_matches("a/b/c", "a/b/c"));
}
