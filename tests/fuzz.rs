//! Hostile input, on stable Rust: coverage-free fuzzing with proptest over the three decoders a
//! device or an installer can feed (the payload decoder, the config loader, Modbus register
//! decoding). Each starts from the checked-in corpus (`tests/fuzz_corpus/`) and mutates it:
//! flipped bytes, truncations, splices, random bytes. The property is the contract's: any input
//! gets a result (an event or a reject reason, a config or problems naming keys, a value or
//! none), never a panic. `FUZZ_CASES` sets the case count (default 20,000 per target, a few
//! seconds in CI); a failure proptest finds is kept in `tests/fuzz.proptest-regressions` and
//! replayed first from then on.

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, FileFailurePersistence};
use std::path::Path;
use zhian_gateway::core::counter::{decode, Kind as PointKind};
use zhian_gateway::core::event::parse;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

fn runner() -> RunnerConfig {
    RunnerConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..RunnerConfig::default()
    }
}

fn corpus(dir: &str) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(dir);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .flatten()
        .map(|e| std::fs::read(e.path()).unwrap())
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {}", path.display());
    out
}

/// A corpus entry mutated: bytes overwritten, a cut, a splice of random bytes.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    (
        0..n,
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..16),
        any::<Option<prop::sample::Index>>(),
        proptest::collection::vec(any::<u8>(), 0..32),
        any::<prop::sample::Index>(),
    )
        .prop_map(move |(i, flips, cut, splice, at)| {
            let mut b = seeds[i].clone();
            for (idx, v) in flips {
                if !b.is_empty() {
                    let k = idx.index(b.len());
                    b[k] = v;
                }
            }
            if let Some(c) = cut {
                let len = b.len();
                b.truncate(c.index(len + 1));
            }
            let len = b.len();
            let at = at.index(len + 1);
            b.splice(at..at, splice);
            b
        })
}

#[test]
fn payload_decoder_never_panics() {
    let seeds = corpus("payload");
    // The corpus itself decodes to an event or a reason.
    for s in &seeds {
        let _ = parse("zhian/access/door-1", s);
    }
    let topics = prop::sample::select(vec![
        "zhian/access/door-1",
        "zhian/camera/cam-1",
        "zhian/vehicle/gate-1",
        "zhian/unknown/x",
        "zhian//",
        "zhian/access/door-1/extra",
        "",
    ]);
    let strategy = (
        topics,
        prop_oneof![
            mutated(seeds),
            proptest::collection::vec(any::<u8>(), 0..512)
        ],
    );
    proptest::test_runner::TestRunner::new(runner())
        .run(&strategy, |(topic, bytes)| {
            match parse(topic, &bytes) {
                Ok(e) => {
                    // An accepted event always satisfies the contract's field rules.
                    prop_assert!(!e.id.is_empty() && e.id.chars().count() <= 128);
                    prop_assert!(!e.action.is_empty() && e.action.len() <= 64);
                }
                Err(reason) => prop_assert!(!reason.as_str().is_empty()),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn config_loader_never_panics_and_names_keys() {
    let seeds = corpus("config");
    let strategy = prop_oneof![
        mutated(seeds),
        proptest::collection::vec(any::<u8>(), 0..256)
    ];
    proptest::test_runner::TestRunner::new(RunnerConfig {
        cases: cases() / 4,
        ..runner()
    })
    .run(&strategy, |bytes| {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(problems) = zhian_gateway::config::load_str(&text) {
            prop_assert!(!problems.is_empty());
            for p in problems {
                prop_assert!(!p.key.is_empty(), "a problem without a key: {p}");
            }
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn register_decoding_never_panics() {
    let kinds = prop::sample::select(vec![
        PointKind::U16,
        PointKind::U32,
        PointKind::I32,
        PointKind::F32,
        PointKind::Bool,
    ]);
    let strategy = (
        kinds,
        proptest::collection::vec(any::<u16>(), 0..4),
        any::<bool>(),
    );
    proptest::test_runner::TestRunner::new(runner())
        .run(&strategy, |(kind, words, big)| {
            let v = decode(kind, &words, big);
            let needs = match kind {
                PointKind::U16 | PointKind::Bool => 1,
                _ => 2,
            };
            prop_assert_eq!(v.is_some(), words.len() >= needs);
            Ok(())
        })
        .unwrap();
}
