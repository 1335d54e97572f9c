//! `run(config, shutdown)` as a library: it keeps running with no input enabled, and stops
//! cleanly when the shutdown future resolves.

use std::time::{Duration, Instant};
use zhian_gateway::config::Config;

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.gateway.id = "lib-test".into();
    cfg.gateway.data_dir = dir.to_path_buf();
    cfg.mqtt.enabled = false;
    cfg.upstream.enabled = false;
    cfg.status.enabled = false;
    assert!(zhian_gateway::config::validate(&cfg).is_empty());
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_until_shutdown_with_no_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let r = zhian_gateway::run(
        config(dir.path()),
        tokio::time::sleep(Duration::from_millis(1500)),
    )
    .await;
    assert!(r.is_ok(), "{r:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "stopped early after {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500) + Duration::from_secs(5),
        "shutdown took {took:?}"
    );
    assert!(dir.path().join("zhian.redb").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = redb::Database::create(dir.path().join("zhian.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("meta"))
                .unwrap();
            meta.insert("format", 99u32.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let r = zhian_gateway::run(config(dir.path()), std::future::pending()).await;
    let e = r.expect_err("must refuse").to_string();
    assert!(e.contains("format"), "{e}");
}
