//! Vehicles inside at the district (contract: "Vehicles inside"): eight boxes' occupancy
//! reports over two streets and four communities, published at QoS 1 as the boxes do,
//! scrambled and partly redelivered, land in `occupancy` as each gateway's newest report, and
//! `occupancy_by_layer` equals a recount of those in the test at every layer (inside, known
//! capacity, free spaces never below 0 per gateway, long stays, missed exits, gateways, the
//! oldest report), with a gateway without a capacity and one without a compound label. Late
//! older reports change nothing; a window's report restated with greater figures replaces the
//! row and the first statement redelivered after it does not; malformed reports are rejects
//! and intake goes on. The operators' query in docs/district-operations.md runs as written.

use crate::common;

use common::district::DISTRICT_PREFIX as PREFIX;
use common::district::*;
use common::pg::Postgres;
use common::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const GATEWAYS: usize = 8;
/// Windows reported per gateway; gateway 8 stopped after its third (a stale box).
const WINDOWS: i64 = 6;

/// Gateway `g` (1-based): `occ-0g`.
fn gw(g: usize) -> String {
    format!("occ-{g:02}")
}

/// Its labels as sent: community `(g - 1) % 4`, street `community % 2`; gateway 6 sends no
/// compound (it rolls up as its gateway id).
fn site(g: usize) -> serde_json::Value {
    let c = (g - 1) % 4;
    let mut s = json!({"district": "富阳区", "street": format!("街道{}", c % 2),
                       "community": format!("社区{c}")});
    if g != 6 {
        s["compound"] = json!(format!("小区{g}"));
    }
    s
}

/// What gateway `g` reports for window `k`: (inside, capacity, long_stay, missed_exits), with
/// `extra` vehicles inside (a report of the same window restated with other figures).
/// Gateway 3 has no capacity; gateway 2 is over its capacity (free 0, not negative).
fn figures(g: usize, k: i64, extra: u64) -> (u64, Option<u64>, u64, u64) {
    let (g, k) = (g as u64, k as u64);
    let inside = 20 * g + 3 * k + extra;
    let capacity = match g {
        3 => None,
        2 => Some(30),
        _ => Some(50 * g),
    };
    (inside, capacity, (g + k) % 4, g + k)
}

/// The report of gateway `g` for window `k` (its `at` is the window's end: `t0 + k` minutes).
fn report(g: usize, k: i64, extra: u64, t0: i64) -> (String, Vec<u8>) {
    let (inside, capacity, long_stay, missed) = figures(g, k, extra);
    let mut v = json!({"schema": "zhian.occupancy.v1", "gateway": gw(g), "site": site(g),
        "at": rfc(t0 + k * 60_000), "inside": inside, "long_stay": long_stay,
        "missed_exits": missed});
    if let Some(c) = capacity {
        v["capacity"] = json!(c);
    }
    (
        format!("{PREFIX}/{}/occupancy", gw(g)),
        serde_json::to_vec(&v).unwrap(),
    )
}

/// The recount: `occupancy_by_layer` as `psql -At` prints it (ordered by layer, name, parent
/// in byte order), from each gateway's newest report `latest[g]` (window, extra).
fn recount(latest: &BTreeMap<usize, (i64, u64)>, t0: i64) -> String {
    #[derive(Default)]
    struct Agg {
        inside: u64,
        capacity: Option<u64>,
        free: Option<u64>,
        long_stay: u64,
        missed: u64,
        gateways: u64,
        at: i64,
    }
    let mut by: BTreeMap<(String, String, String), Agg> = BTreeMap::new();
    for (&g, &(k, extra)) in latest {
        let s = site(g);
        let label = |k: &str| s[k].as_str().unwrap_or("").to_string();
        let compound = s["compound"].as_str().map_or_else(|| gw(g), str::to_string);
        let (inside, capacity, long_stay, missed) = figures(g, k, extra);
        let at = t0 + k * 60_000;
        for key in [
            ("compound", compound.clone(), label("community")),
            ("community", label("community"), label("street")),
            ("street", label("street"), label("district")),
            ("district", label("district"), String::new()),
        ] {
            let a = by
                .entry((key.0.to_string(), key.1, key.2))
                .or_insert_with(|| Agg {
                    at: i64::MAX,
                    ..Agg::default()
                });
            a.inside += inside;
            if let Some(c) = capacity {
                *a.capacity.get_or_insert(0) += c;
                *a.free.get_or_insert(0) += c.saturating_sub(inside);
            }
            a.long_stay += long_stay;
            a.missed += missed;
            a.gateways += 1;
            a.at = a.at.min(at);
        }
    }
    let opt = |v: Option<u64>| v.map_or_else(String::new, |v| v.to_string());
    by.into_iter()
        .map(|((layer, name, parent), a)| {
            format!(
                "{layer}|{name}|{parent}|{}|{}|{}|{}|{}|{}|{}\n",
                a.inside,
                opt(a.capacity),
                opt(a.free),
                a.long_stay,
                a.missed,
                a.gateways,
                a.at
            )
        })
        .collect()
}

fn view(pg: &Postgres) -> String {
    pg.psql(
        "SELECT layer, name, parent, inside, capacity, free, long_stay, missed_exits, gateways,
                (extract(epoch FROM at) * 1000)::bigint
         FROM occupancy_by_layer
         ORDER BY layer COLLATE \"C\", name COLLATE \"C\", parent COLLATE \"C\"",
    )
    .unwrap_or_default()
}

#[test]
fn occupancy_by_layer_equals_a_recount_of_the_newest_reports() {
    let site_ = Site::build("district-occupancy")
        .no_device_broker()
        .persistent_district()
        .no_collector()
        .no_gateway()
        .start();
    let pg = Postgres::start(&site_.root.join("pg"), free_port());
    let port = site_.district().port;
    let log = site_.root.join("receiver.log");
    let cfg = site_.root.join("r.toml");
    let health = receiver_config(&cfg, &pg.url(), port, "occ-r1");
    let _r = start_receiver(&cfg, &log);
    wait_healthy(health, &log);

    // Whole minutes, an hour ago (inside the kept months).
    let t0 = (now_ms() - 3_600_000) / 60_000 * 60_000;
    let mut rng = Rng::new(7);
    let mut latest: BTreeMap<usize, (i64, u64)> = BTreeMap::new();
    let mut msgs: Vec<(String, Vec<u8>)> = Vec::new();
    for g in 1..=GATEWAYS {
        let windows = if g == 8 { 3 } else { WINDOWS };
        for k in 0..windows {
            for _ in 0..1 + rng.below(2) {
                msgs.push(report(g, k, 0, t0));
            }
        }
        latest.insert(g, (windows - 1, 0));
    }
    for i in (1..msgs.len()).rev() {
        msgs.swap(i, rng.below(i + 1));
    }
    let mut valid = msgs.len();
    let mut p = Publisher::connect(port, "occ-pub");
    for (t, m) in &msgs {
        p.send(t, m.clone());
    }
    p.wait_all_acked(Duration::from_secs(60));
    let want = recount(&latest, t0);
    assert!(
        wait_until(Duration::from_secs(60), || view(&pg) == want),
        "occupancy_by_layer equals the recount:\n{}\nwant:\n{want}\n{}",
        view(&pg),
        tail(&log, 30)
    );
    // The shape the recount checked: 8 compounds, 4 communities, 2 streets, 1 district; the
    // compound without a capacity has none and no free spaces; the one over capacity none free.
    assert_eq!(want.lines().count(), 15, "{want}");
    assert!(want.contains("compound|小区3|社区2|75||"), "{want}");
    assert!(want.contains("compound|小区2|社区1|55|30|0|"), "{want}");
    assert!(want.contains("compound|occ-06|社区1|"), "{want}");
    assert!(want.starts_with("community|社区0|街道0|"), "{want}");

    // Malformed reports (rejects), late older reports (a box's backlog: nothing changes),
    // gateway 4's latest window restated with more vehicles inside (the same `at`, greater
    // figures: it replaces the row kept), then one newer report, last: one receiver commits in
    // arrival order, so once it is in, everything before it is.
    let malformed = [
        (
            format!("{PREFIX}/occ-05/occupancy"),
            br#"{"schema":"zhian.occupancy.v1","gateway":"occ-05","site":{},"at":"2026-11-30T00:00:00Z","inside":-1,"long_stay":0,"missed_exits":0}"#.to_vec(),
        ),
        (
            format!("{PREFIX}/occ-05/occupancy"),
            br#"{"schema":"zhian.occupancy.v1","gateway":"occ-06","site":{},"at":"2026-11-30T00:00:00Z","inside":1,"long_stay":0,"missed_exits":0}"#.to_vec(),
        ),
    ];
    for (t, m) in &malformed {
        p.send(t, m.clone());
    }
    let mut phase2: Vec<(String, Vec<u8>)> = (1..=GATEWAYS).map(|g| report(g, 1, 0, t0)).collect();
    phase2.push(report(4, WINDOWS - 1, 2, t0));
    phase2.push(report(1, WINDOWS, 0, t0));
    for (t, m) in &phase2 {
        p.send(t, m.clone());
    }
    valid += phase2.len();
    p.wait_all_acked(Duration::from_secs(60));
    latest.insert(1, (WINDOWS, 0));
    latest.insert(4, (WINDOWS - 1, 2));
    let want = recount(&latest, t0);
    assert!(
        wait_until(Duration::from_secs(60), || view(&pg) == want),
        "after the late older reports, a restated one and a newer one:\n{}\nwant:\n{want}\n{}",
        view(&pg),
        tail(&log, 30)
    );
    // Gateway 4's first statement of that window again (a redelivery after the restatement:
    // ranks lower, changes nothing), and another newer report last.
    let phase3 = [report(4, WINDOWS - 1, 0, t0), report(1, WINDOWS + 1, 0, t0)];
    for (t, m) in &phase3 {
        p.send(t, m.clone());
    }
    valid += phase3.len();
    p.wait_all_acked(Duration::from_secs(60));
    latest.insert(1, (WINDOWS + 1, 0));
    let want = recount(&latest, t0);
    assert!(
        wait_until(Duration::from_secs(60), || view(&pg) == want),
        "after the redelivered lower statement:\n{}\nwant:\n{want}\n{}",
        view(&pg),
        tail(&log, 30)
    );
    // One row per gateway, each its newest report.
    let rows = pg
        .psql(
            "SELECT gateway, (extract(epoch FROM at) * 1000)::bigint, inside, compound
             FROM occupancy ORDER BY 1",
        )
        .unwrap();
    let want_rows: String = latest
        .iter()
        .map(|(&g, &(k, extra))| {
            let compound = if g == 6 { gw(g) } else { format!("小区{g}") };
            let inside = figures(g, k, extra).0;
            format!("{}|{}|{inside}|{compound}\n", gw(g), t0 + k * 60_000)
        })
        .collect();
    assert_eq!(rows, want_rows);

    // The malformed reports are rejects; every valid one was taken.
    assert_eq!(
        pg.psql("SELECT topic, reason FROM rejects ORDER BY reason")
            .unwrap(),
        format!(
            "{PREFIX}/occ-05/occupancy|gateway_mismatch\n{PREFIX}/occ-05/occupancy|invalid_field\n"
        )
    );
    // (Counted just after the commit: waited for.)
    let counted = |outcome: &str| {
        metric(
            health,
            &format!(
                "zhian_district_messages_total{{topic_kind=\"occupancy\",outcome=\"{outcome}\"}}"
            ),
        ) as usize
    };
    assert!(
        wait_until(Duration::from_secs(10), || counted("rejected") == 2
            && counted("kept") == valid),
        "occupancy messages counted: {} rejected, {} of {valid} kept",
        counted("rejected"),
        counted("kept")
    );

    // The operators' query (docs/district-operations.md), as written there: free spaces per
    // community, equal to the recount's community rows.
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/district-operations.md"),
    )
    .unwrap();
    let query = doc
        .split("## Vehicles inside (occupancy)")
        .nth(1)
        .and_then(|s| s.split("```sql").nth(1))
        .and_then(|q| q.split("```").next())
        .expect("the section's query");
    let got: Vec<String> = pg
        .psql(query)
        .unwrap_or_else(|| panic!("the documented query runs:\n{query}"))
        .lines()
        .map(|l| l.split('|').take(5).collect::<Vec<_>>().join("|"))
        .collect();
    let mut from_recount: Vec<String> = want
        .lines()
        .filter_map(|l| l.strip_prefix("community|"))
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            // street, community, inside, capacity, free
            format!("{}|{}|{}|{}|{}", f[1], f[0], f[2], f[3], f[4])
        })
        .collect();
    from_recount.sort();
    let mut got_sorted = got.clone();
    got_sorted.sort();
    assert_eq!(got_sorted, from_recount, "{got:?}");
    assert_eq!(got.len(), 4);
}

/// Six real boxes (the real binary, each with its own `[occupancy]`) over two streets and three
/// communities (two boxes each), one real receiver and PostgreSQL: cars in and out at every box, duplicates, an
/// unmatched exit, a `kill -9` of one box with cars arriving while it is down, a stocktake at
/// another. At each step `occupancy_by_layer` equals the sum of the boxes' models per
/// community, street and district; a box stopped for good keeps its last report, and the
/// layer's `at` shows how old it is.
#[test]
fn six_real_boxes_roll_up_by_street_and_community() {
    const BOXES: usize = 6;
    let mut site = Site::build("occ-boxes")
        .persistent_device()
        .persistent_district()
        .no_gateway()
        .config(|c| c.status.enabled = false)
        .start();
    let pg = Postgres::start(&site.root.join("pg"), free_port());
    let rcfg = site.root.join("district.toml");
    let health = receiver_config(&rcfg, &pg.url(), site.district().port, "occ-boxes-r1");
    let rlog = site.root.join("receiver.log");
    let _receiver = start_receiver(&rcfg, &rlog);
    wait_healthy(health, &rlog);
    // Box i: community i % 3 (two boxes each), in street (i % 3) % 2; 50 + 10 i spaces.
    let street = |i: usize| format!("街道{}", (i % 3) % 2);
    let community = |i: usize| format!("社区{}", i % 3);
    for i in 0..BOXES {
        site.add_gateway(&format!("b{i}"), |c| {
            c.gateway.id = format!("occ-box-{i}");
            c.gateway.street = Some(street(i));
            c.gateway.community = Some(community(i));
            c.gateway.compound = Some(format!("小区{i}"));
            c.mqtt.client_id = Some(format!("occ-box-{i}-dev"));
            c.mqtt.topics = vec![format!("b{i}/+/+")];
            c.occupancy = Some(zhian_gateway::config::Occupancy {
                capacity: Some(50 + 10 * i as u32),
                long_stay: zhian_gateway::config::Dur::secs(3600),
                max_stay: zhian_gateway::config::Dur::secs(30 * 86_400),
            });
        });
    }
    let mut p = site.publisher();
    // The model: per box, per plate, inside by the newest read.
    let mut inside: Vec<BTreeMap<String, bool>> = vec![BTreeMap::new(); BOXES];
    let mut adjust = [0i64; BOXES];
    let mut seq = 0u64;
    let mut read = |p: &mut Publisher, b: usize, plate: &str, action: &str, twice: bool| {
        seq += 1;
        let e = Event::new("vehicle", "gate-1", &format!("r{seq}"), action)
            .subject(plate)
            .at(now_ms());
        let topic = format!("b{b}/vehicle/gate-1");
        p.send(&topic, e.payload());
        if twice {
            p.send(&topic, e.payload());
        }
    };
    let count = |inside: &[BTreeMap<String, bool>], adjust: &[i64; BOXES], b: usize| -> i64 {
        (inside[b].values().filter(|x| **x).count() as i64 + adjust[b]).max(0)
    };
    // What occupancy_by_layer must say: (layer, name) -> (inside, capacity, gateways).
    let want = |inside: &[BTreeMap<String, bool>], adjust: &[i64; BOXES]| -> String {
        let mut m: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
        for b in 0..BOXES {
            let n = count(inside, adjust, b);
            for key in [
                ("district".to_string(), "富阳区".to_string()),
                ("street".to_string(), street(b)),
                ("community".to_string(), community(b)),
            ] {
                let e = m.entry(key).or_default();
                e.0 += n;
                e.1 += 50 + 10 * b as i64;
                e.2 += 1;
            }
        }
        m.into_iter()
            .map(|((l, n), (i, c, g))| format!("{l}|{n}|{i}|{c}|{g}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let view = |pg: &Postgres| -> String {
        pg.psql(
            "SELECT layer, name, inside, capacity, gateways FROM occupancy_by_layer
             WHERE layer IN ('district', 'street', 'community') ORDER BY layer, name",
        )
        .unwrap_or_default()
        .trim()
        .to_string()
    };
    let settle = |what: &str, want: String| {
        assert!(
            wait_until(Duration::from_secs(60), || view(&pg) == want),
            "{what}: occupancy_by_layer\n{}\nwant\n{want}\nreceiver log:\n{}",
            view(&pg),
            tail(&rlog, 20)
        );
    };

    // Step 1: 5 + 3 i cars into box i, every fourth read delivered twice.
    for (b, cars) in inside.iter_mut().enumerate() {
        for k in 0..5 + 3 * b {
            let plate = format!("浙A{b}{k:04}");
            read(&mut p, b, &plate, "entry", k % 4 == 0);
            cars.insert(plate, true);
        }
    }
    p.wait_all_acked(Duration::from_secs(60));
    settle("after the entries", want(&inside, &adjust));

    // Step 2: box 1 is killed (-9); its cars keep coming, the broker keeps them; two leave
    // the others, one exit with no entry at box 4 (counted, not subtracted).
    site.gateway(1).kill9();
    for k in 0..4 {
        let plate = format!("浙B1{k:04}");
        read(&mut p, 1, &plate, "entry", false);
        inside[1].insert(plate, true);
    }
    for b in [0, 2, 3, 5] {
        for k in 0..2 {
            let plate = format!("浙A{b}{k:04}");
            read(&mut p, b, &plate, "exit", k == 1);
            inside[b].insert(plate, false);
        }
    }
    read(&mut p, 4, "浙Z99999", "exit", false);
    p.wait_all_acked(Duration::from_secs(60));
    site.gateway(1).start();
    settle("after box 1's kill -9 and restart", want(&inside, &adjust));

    // Step 3: a stocktake at box 3 (the guard counts 20); then one of its unknown cars leaves.
    let cfg = site.gateway(3).config_path.to_str().unwrap().to_string();
    let out = run_cli(
        &["occupancy", "set", "--config", &cfg, "--count", "20"],
        &site.root,
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", out.stderr);
    adjust[3] = 20 - inside[3].values().filter(|x| **x).count() as i64;
    settle("after the stocktake at box 3", want(&inside, &adjust));
    read(&mut p, 3, "浙Y00001", "exit", false);
    adjust[3] -= 1;
    p.wait_all_acked(Duration::from_secs(60));
    settle("after an unknown car left box 3", want(&inside, &adjust));

    // Step 4: box 5 stops for good. Its last report stays in the roll-up; the district's `at`
    // (the oldest latest report) stops at it while the others keep reporting.
    site.gateway(5).term();
    let at = |layer: &str, name: &str| -> i64 {
        pg.psql(&format!(
            "SELECT (extract(epoch FROM at) * 1000)::bigint FROM occupancy_by_layer
             WHERE layer = '{layer}' AND name = '{name}'"
        ))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    };
    let latest = |g: usize| -> i64 {
        pg.psql(&format!(
            "SELECT (extract(epoch FROM at) * 1000)::bigint FROM occupancy WHERE gateway = 'occ-box-{g}'"
        ))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    };
    let stopped_at = latest(5);
    let t = now_ms();
    eventually("the other boxes report after box 5 stopped", || {
        (0..5).all(|g| latest(g) > t)
    });
    assert_eq!(latest(5), stopped_at, "box 5 sends no more");
    assert_eq!(at("community", &community(5)), stopped_at);
    assert_eq!(at("street", &street(5)), stopped_at);
    assert_eq!(at("district", "富阳区"), stopped_at);
    assert!(at("community", &community(3)) > t);
    settle("with box 5 stopped", want(&inside, &adjust));
    eprintln!("six boxes at the district:\n{}", view(&pg));
    for b in 0..BOXES {
        if b != 5 {
            site.gateway(b).term();
        }
    }
}
