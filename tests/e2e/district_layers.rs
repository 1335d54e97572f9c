//! The five layers at the district (issue 22): rollups by compound, community, street and
//! district maintained in the batch's transaction equal a recount from raw rows after a
//! randomized run (re-issues, split revs with parts in any order, incomplete revs,
//! redeliveries, a month boundary and a local midnight, two receivers sharing the
//! subscription, one killed with -9); a compound moved to another community moves from the
//! windows it closed after the move; `[retention]` drops whole months, rollups outlive them,
//! and a window older than the kept months is a reject.

use crate::common;

use common::district::DISTRICT_PREFIX as PREFIX;
use common::district::*;
use common::pg::Postgres;
use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

/// The first instant of the UTC month holding `ms`, in Unix ms.
fn month_start(ms: i64) -> i64 {
    let t = time::OffsetDateTime::from_unix_timestamp(ms / 1000).unwrap();
    t.replace_day(1)
        .unwrap()
        .replace_time(time::Time::MIDNIGHT)
        .unix_timestamp()
        * 1000
}

fn site(g: usize, moved: bool) -> serde_json::Value {
    // 12 compounds over 4 communities over 2 streets; gateway 0 moves from 社区0 to 社区3.
    let community = if g == 0 && moved { 3 } else { g % 4 };
    json!({"district": "富阳区", "street": format!("街道{}", community % 2),
           "community": format!("社区{community}"), "compound": format!("小区{g:02}")})
}

fn summary_with(
    g: usize,
    start_ms: i64,
    rev: i64,
    part: Option<(i64, i64)>,
    rows: &[(String, String, String, i64)],
    moved: bool,
) -> Vec<u8> {
    let mut v = json!({"schema": "zhian.summary.v1", "gateway": format!("lay-{g:02}"),
        "site": site(g, moved), "window": {"start": rfc(start_ms), "secs": 60}, "rev": rev,
        "counts": rows.iter().map(|(k, d, a, n)| json!({"kind": k, "device": d, "action": a, "result": "ok", "n": n})).collect::<Vec<_>>()});
    if let Some((i, n)) = part {
        v["part"] = json!(i);
        v["parts"] = json!(n);
    }
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn rollups_equal_a_recount_after_random_reissues_parts_and_a_moved_compound() {
    let site_ = Site::build("layers")
        .no_device_broker()
        .persistent_district()
        .no_collector()
        .no_gateway()
        .start();
    let pg = Postgres::start(&site_.root.join("pg"), free_port());
    let port = site_.district().port;
    let rlog = site_.root.join("receivers.log");
    let (c1, c2) = (site_.root.join("r1.toml"), site_.root.join("r2.toml"));
    let h1 = receiver_config(&c1, &pg.url(), port, "lay-r1");
    let h2 = receiver_config(&c2, &pg.url(), port, "lay-r2");
    let mut r1 = start_receiver(&c1, &rlog);
    let _r2 = start_receiver(&c2, &rlog);
    wait_healthy(h1, &rlog);
    wait_healthy(h2, &rlog);

    // Windows from 10 h before the current UTC month's start to 2 h after: across the
    // previous month's end and a Shanghai midnight (16:00 UTC).
    let m0 = month_start(now_ms());
    let lo = m0 - 10 * 3_600_000;
    let move_at = m0 - 4 * 3_600_000;
    let mut rng = Rng::new(22);
    let mut msgs: Vec<(String, Vec<u8>)> = Vec::new();
    // The model: per window, the highest complete rev's total.
    let mut want: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut gw0_before = 0i64;
    let mut gw0_after = 0i64;
    for g in 0..12usize {
        let gw = format!("lay-{g:02}");
        let mut starts: Vec<i64> = (0..30)
            .map(|_| lo + rng.below(720) as i64 * 60_000)
            .collect();
        starts.sort_unstable();
        starts.dedup();
        for start in starts {
            let moved = start >= move_at;
            let revs = 1 + rng.below(3) as i64;
            let mut in_force = None;
            for rev in 0..revs {
                let rows: Vec<(String, String, String, i64)> = (0..1 + rng.below(4))
                    .map(|i| {
                        let kind = ["access", "vehicle", "camera"][rng.below(3)];
                        let action = ["entry", "exit"][rng.below(2)];
                        (
                            kind.to_string(),
                            format!("d{i}"),
                            action.to_string(),
                            1 + rng.below(20) as i64,
                        )
                    })
                    .collect();
                // Distinct (kind, device, action) per rev: sum duplicates the way the box does.
                let mut dedup: BTreeMap<(String, String, String), i64> = BTreeMap::new();
                for (k, d, a, n) in &rows {
                    *dedup.entry((k.clone(), d.clone(), a.clone())).or_insert(0) += n;
                }
                let rows: Vec<(String, String, String, i64)> = dedup
                    .into_iter()
                    .map(|((k, d, a), n)| (k, d, a, n))
                    .collect();
                let total: i64 = rows.iter().map(|r| r.3).sum();
                let parts = (1 + rng.below(3)).min(rows.len()) as i64;
                // One rev in eight is missing a part (never complete; not in force).
                let incomplete = parts > 1 && rng.below(8) == 0;
                for p in 1..=parts {
                    if incomplete && p == parts {
                        continue;
                    }
                    let share: Vec<_> = rows
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| (*i as i64) % parts == p - 1)
                        .map(|(_, r)| r.clone())
                        .collect();
                    let part = (parts > 1).then_some((p, parts));
                    let payload = summary_with(g, start, rev, part, &share, moved);
                    if rng.below(5) == 0 {
                        msgs.push((format!("{PREFIX}/{gw}/summary"), payload.clone()));
                    }
                    msgs.push((format!("{PREFIX}/{gw}/summary"), payload));
                }
                if !incomplete {
                    in_force = Some(total);
                }
            }
            if let Some(total) = in_force {
                want.insert((gw.clone(), rfc(start)), total);
                if g == 0 {
                    if moved {
                        gw0_after += total;
                    } else {
                        gw0_before += total;
                    }
                }
            }
        }
    }
    // Any order: revs and parts arrive shuffled.
    for i in (1..msgs.len()).rev() {
        msgs.swap(i, rng.below(i + 1));
    }
    let mut p = Publisher::connect(port, "layers-pub");
    let half = msgs.len() / 2;
    for (t, m) in &msgs[..half] {
        p.send(t, m.clone());
    }
    p.wait_all_acked(Duration::from_secs(60));
    // A receiver killed with -9 mid-stream, and started again.
    let _ = r1.0.kill();
    let _ = r1.0.wait();
    r1 = start_receiver(&c1, &rlog);
    for (t, m) in &msgs[half..] {
        p.send(t, m.clone());
    }
    p.wait_all_acked(Duration::from_secs(60));
    wait_healthy(h1, &rlog);
    assert!(
        wait_until(Duration::from_secs(90), || in_db(&pg) == want),
        "windows in force equal the model: {} of {} windows\n{}",
        in_db(&pg).len(),
        want.len(),
        tail(&rlog, 30)
    );
    drop(r1);
    assert_eq!(
        rollup_mismatches(&pg),
        Some(0),
        "rollups equal a recount from raw rows"
    );
    // Every layer sums to the same total per day.
    let totals = pg
        .psql("SELECT layer, sum(n) FROM counts_by_layer GROUP BY 1 ORDER BY 1")
        .unwrap();
    let all: i64 = want.values().sum();
    for l in totals.lines() {
        let (layer, n) = l.split_once('|').unwrap();
        assert_eq!(n.parse::<i64>().unwrap(), all, "layer {layer}: {totals}");
    }
    // The moved compound: its windows before the move under 社区0, after under 社区3.
    let under = |community: &str| -> i64 {
        pg.psql(&format!(
            "SELECT coalesce(sum(n), 0) FROM counts_by_layer
             WHERE layer = 'compound' AND name = '小区00' AND parent = '{community}'"
        ))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(-1)
    };
    assert_eq!(under("社区0"), gw0_before);
    assert_eq!(under("社区3"), gw0_after);
    assert!(gw0_before > 0 && gw0_after > 0, "the move is exercised");
    // The drill-down's parents: each community under its street, each street under the district.
    let parents = pg
        .psql("SELECT DISTINCT layer, name, parent FROM counts_by_layer WHERE layer IN ('street', 'community') ORDER BY 1, 2")
        .unwrap();
    assert_eq!(
        parents.trim(),
        "community|社区0|街道0\ncommunity|社区1|街道1\ncommunity|社区2|街道0\ncommunity|社区3|街道1\nstreet|街道0|富阳区\nstreet|街道1|富阳区"
    );
    // gateway_state names each gateway's street and community.
    assert_eq!(
        pg.psql("SELECT street, community FROM gateway_state WHERE gateway = 'lay-05'")
            .unwrap()
            .trim(),
        "街道1|社区1"
    );
}

#[test]
fn retention_drops_whole_months_and_rollups_outlive_them() {
    let site_ = Site::build("retention")
        .no_device_broker()
        .persistent_district()
        .no_collector()
        .no_gateway()
        .start();
    let pg = Postgres::start(&site_.root.join("pg"), free_port());
    let port = site_.district().port;
    let rlog = site_.root.join("receivers.log");
    let cfg = site_.root.join("r.toml");
    let h = receiver_config(&cfg, &pg.url(), port, "ret-r1");
    let r = start_receiver(&cfg, &rlog);
    wait_healthy(h, &rlog);
    // A window 70 days ago and one now.
    let old = (now_ms() - 70 * 86_400_000) / 60_000 * 60_000;
    let new = (now_ms() - 120_000) / 60_000 * 60_000;
    let old_month = time::OffsetDateTime::from_unix_timestamp(old / 1000).unwrap();
    let old_part = format!(
        "window_rows_p{:04}{:02}",
        old_month.year(),
        u8::from(old_month.month())
    );
    let mut p = Publisher::connect(port, "ret-pub");
    for (start, n) in [(old, 5), (new, 7)] {
        p.send(
            &format!("{PREFIX}/ret-01/summary"),
            summary("ret-01", start, 0, None, &[("door-1", n)]),
        );
    }
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || in_db(&pg).len() == 2),
        "both windows kept: {:?}\n{}",
        in_db(&pg),
        tail(&rlog, 20)
    );
    let exists = |t: &str| {
        pg.psql(&format!("SELECT to_regclass('{t}') IS NOT NULL"))
            .map(|s| s.trim() == "t")
    };
    assert_eq!(exists(&old_part), Some(true));
    let district_total = || {
        pg.psql("SELECT sum(n) FROM counts_by_layer WHERE layer = 'district'")
            .and_then(|s| s.trim().parse::<i64>().ok())
    };
    assert_eq!(district_total(), Some(12));
    drop(r);

    // Raw rows kept for 31 days: the old window's month goes whole, its rollups stay.
    let h = receiver_config_with(&cfg, &pg.url(), port, "ret-r1", "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[retention]\nwindow_rows = \"31d\"\nevery = \"1s\"\n"),
    )
    .unwrap();
    let _r = start_receiver(&cfg, &rlog);
    wait_healthy(h, &rlog);
    assert!(
        wait_until(Duration::from_secs(30), || exists(&old_part) == Some(false)),
        "{old_part} dropped\n{}",
        tail(&rlog, 20)
    );
    assert!(log_text(&rlog).contains("retention: dropped months"));
    assert_eq!(in_db(&pg).len(), 1, "the old window's raw rows are gone");
    assert_eq!(district_total(), Some(12), "rollups outlive raw rows");
    // A re-issue of the dropped window is a reject: it could not subtract what it replaces.
    p.send(
        &format!("{PREFIX}/ret-01/summary"),
        summary("ret-01", old, 1, None, &[("door-1", 50)]),
    );
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || pg
            .psql("SELECT count(*) FROM rejects WHERE reason = 'outside_retention'")
            .is_some_and(|s| s.trim() == "1")),
        "outside_retention reject\n{}",
        tail(&rlog, 20)
    );
    // Counted and logged like any other reject (a break-it run found it silent).
    assert!(
        metric(
            h,
            "zhian_district_messages_total{topic_kind=\"summary\",outcome=\"rejected\"}"
        ) >= 1.0
    );
    assert!(log_text(&rlog)
        .lines()
        .any(|l| l.contains("message rejected") && l.contains("outside_retention")));
    assert_eq!(district_total(), Some(12));
    assert_eq!(rollup_mismatches(&pg).map(|_| ()), Some(()));

    // A month dropped under a running receiver (by hand; a break-it run found the messages
    // became rejects): it is created again and nothing is lost or refused.
    let next = month_start(month_start(now_ms()) + 40 * 86_400_000);
    let next_t = time::OffsetDateTime::from_unix_timestamp(next / 1000).unwrap();
    let suffix = format!("{:04}{:02}", next_t.year(), u8::from(next_t.month()));
    pg.psql(&format!(
        "DROP TABLE window_rows_p{suffix}, windows_p{suffix}"
    ))
    .expect("drop next month's raw partitions");
    p.send(
        &format!("{PREFIX}/ret-01/summary"),
        summary("ret-01", next + 60_000, 0, None, &[("door-1", 3)]),
    );
    p.wait_all_acked(Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || in_db(&pg).len() == 2),
        "the window in the dropped month is kept: {:?}\n{}",
        in_db(&pg),
        tail(&rlog, 20)
    );
    assert_eq!(exists(&format!("window_rows_p{suffix}")), Some(true));
    assert_eq!(
        pg.psql("SELECT count(*) FROM rejects WHERE reason <> 'outside_retention'")
            .map(|s| s.trim().to_string()),
        Some("0".into())
    );
    assert_eq!(district_total(), Some(15));
    assert_eq!(rollup_mismatches(&pg).map(|_| ()), Some(()));
}
