//! `zhian-gateway inspect --data-dir DIR`: the offline view of a store, and its refusal while
//! the store is open.

use std::process::Command;
use zhian_gateway::config::SubjectMode;
use zhian_gateway::core::counter::{Value, Width};
use zhian_gateway::core::engine::{CounterReading, Engine, Input};
use zhian_gateway::core::event::{Event, Kind};
use zhian_gateway::core::summary::Site;
use zhian_gateway::core::window::WindowCfg;
use zhian_gateway::store::{StateUpdate, Store};

fn engine() -> Engine {
    Engine {
        window: WindowCfg {
            window_ms: 60_000,
            grace_ms: 10_000,
            max_lateness_ms: 3_600_000,
            max_future_skew_ms: 60_000,
        },
        dedup_ttl_ms: 3_600_000,
        gateway: "gw".into(),
        site: Site::default(),
        alert_actions: vec![],
        max_summary_bytes: usize::MAX,
    }
}

fn inspect(dir: &std::path::Path) -> std::process::Output {
    Command::new(
        std::env::var_os("ZHIAN_GATEWAY_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_zhian-gateway").into()),
    )
    .args(["inspect", "--json", "--data-dir"])
    .arg(dir)
    .output()
    .unwrap()
}

#[test]
fn inspect_reports_the_store_offline() {
    let dir = tempfile::tempdir().unwrap();
    let en = engine();
    let now = zhian_gateway::clock::now_ms();
    {
        let (_s, mut s) = Store::open(dir.path(), SubjectMode::Hashed).unwrap();
        let old = Event {
            kind: Kind::Access,
            device: "door-1".into(),
            id: "a".into(),
            ts_ms: now - 600_000,
            action: "entry".into(),
            result: "ok".into(),
            subject: Some("card:1".into()),
        };
        let fresh = Event {
            id: "b".into(),
            ts_ms: now,
            ..old.clone()
        };
        let reading = CounterReading {
            kind: Kind::Vehicle,
            device: "gate-east".into(),
            point: "plates_in".into(),
            action: "entry".into(),
            result: "ok".into(),
            value: 42,
            width: Width::U32,
            wrap: false,
            max_step: 1000,
            ts_ms: now,
        };
        let state = StateUpdate {
            key: "vehicle\0gate-east\0barrier_open".into(),
            value: Value::Bool(true),
            ts_ms: now,
        };
        s.commit_inputs(
            &en,
            &[
                Input::Event(&old),
                Input::Event(&fresh),
                Input::Counter(&reading),
            ],
            &[state],
            &[],
            now,
            None,
        )
        .unwrap();
        // While the store is open, inspect refuses (and says why).
        let busy = inspect(dir.path());
        assert!(!busy.status.success());
        assert!(
            String::from_utf8_lossy(&busy.stderr).contains("stop the daemon"),
            "{}",
            String::from_utf8_lossy(&busy.stderr)
        );
    }
    let out = inspect(dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["pending_summaries"], 1, "{r}");
    assert_eq!(r["open_windows"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["dedup_keys"], 2);
    assert_eq!(r["raw_events"], 2);
    assert_eq!(r["device_states"][0]["device"], "gate-east");
    assert_eq!(r["device_states"][0]["value"], true);
    assert_eq!(r["counters"][0]["value"], 42);
    assert!(r["file_bytes"].as_u64().unwrap() > 0);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("card:1"));
    // Read-only: the file is unchanged by inspecting.
    let before = std::fs::read(dir.path().join("zhian.redb")).unwrap();
    assert!(inspect(dir.path()).status.success());
    assert_eq!(
        before,
        std::fs::read(dir.path().join("zhian.redb")).unwrap()
    );
}
