//! The device table from outside the committer: which `[[mqtt.sources]]` entry a device was
//! learned through (its *mark*), and the installer's requests (`zhian-gateway devices forget`,
//! `devices list`) to a running daemon.
//!
//! **Marks.** A source's mark is a short hash of what decides the devices it makes: its topic
//! filter, `each`, and its `kind` and `device` rules (not its name, nor the other fields). A
//! device keeps the mark of the source its latest accepted event came through (none for the
//! canonical `zhian/{kind}/{device}` topics). After a SIGHUP, and at start, a device whose mark
//! names no configured source any more no longer maps (a fixed mapping mistake, a source
//! removed) and is forgotten at once; a real device among them comes back with its next event.
//!
//! **Requests.** The status page is read-only and the daemon holds the store's lock, so an
//! installer's request travels as a file in the data dir: the command writes
//! `devices-request-<id>.json` (durably, through a temporary name: [`crate::durable_file`]),
//! the committer picks it up on its next tick (at most a second), acts, writes
//! `devices-request-<id>.answer` (the same way) and removes the request; the command prints the
//! answer and removes it. A request made while the daemon is stopped waits there and is applied
//! when it starts (the command says so after [`ANSWER_WAIT`] and exits 75). Only root and the
//! service user can write the data dir, which is also who may change the store.

use crate::config::sources::SourceCfg;
use crate::core::devices::{pattern_names, split_key};
use crate::core::event::Kind;
use crate::core::summary::rfc3339_utc;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One configured source as the device table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceMark {
    pub name: String,
    pub topic: String,
    pub mark: String,
}

/// The configured sources' marks, in config order (the first whose filter matches a topic is
/// the one the device input maps it with).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceMarks(pub Vec<SourceMark>);

impl SourceMarks {
    pub fn of(sources: &[SourceCfg]) -> Self {
        SourceMarks(
            sources
                .iter()
                .enumerate()
                .map(|(i, s)| SourceMark {
                    name: s.name.clone().unwrap_or_else(|| format!("sources[{i}]")),
                    topic: s.topic.clone(),
                    mark: mark_of(s),
                })
                .collect(),
        )
    }

    /// The mark of the source that maps `topic` ("" for a canonical topic).
    pub fn mark_for(&self, topic: &str) -> &str {
        self.0
            .iter()
            .find(|s| crate::core::mapping::topic_matches(&s.topic, topic))
            .map_or("", |s| s.mark.as_str())
    }

    /// Whether a device stored with `mark` still maps: canonical, or its source is configured.
    pub fn still_maps(&self, mark: &str) -> bool {
        mark.is_empty() || self.0.iter().any(|s| s.mark == mark)
    }

    /// How `devices list` names a mark.
    pub fn describe(&self, mark: &str) -> String {
        if mark.is_empty() {
            return "canonical topic".into();
        }
        match self.0.iter().find(|s| s.mark == mark) {
            Some(s) => format!("source {:?}", s.name),
            None => "a source no longer configured".into(),
        }
    }
}

/// A source's mark: 16 hex digits of BLAKE3 over its topic, `each`, `kind` and `device` as
/// written (JSON, keys sorted).
fn mark_of(s: &SourceCfg) -> String {
    let v = serde_json::json!({
        "topic": s.topic,
        "each": s.each,
        "kind": s.kind,
        "device": s.device,
    });
    let text = serde_json::to_string(&v).unwrap_or_default();
    blake3::hash(text.as_bytes()).to_hex()[..16].to_string()
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// Request and answer files start with this, in the data dir.
pub const REQUEST_PREFIX: &str = "devices-request-";
/// How long the command waits for the daemon's answer.
pub const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// Answers nobody collected are removed after this long.
const STALE_ANSWER: Duration = Duration::from_secs(3600);
/// sysexits.h EX_TEMPFAIL: the request is queued, not applied yet.
pub const EX_TEMPFAIL: u8 = 75;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Forget,
    List,
    /// `zhian-gateway occupancy set --count N`: a stocktake of the vehicles inside (盘点).
    Stocktake,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub op: Op,
    /// Globs (`*`, `?`) on the device name, or on `kind/name` when they hold a `/`. `list`
    /// with none lists every device.
    pub patterns: Vec<String>,
    /// The counted vehicles, for [`Op::Stocktake`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceLine {
    pub kind: Kind,
    pub device: String,
    pub last_seen: String,
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub op: Op,
    /// Why nothing was done (e.g. the store cannot be written right now).
    pub error: Option<String>,
    /// The devices listed, or forgotten.
    pub devices: Vec<DeviceLine>,
}

/// The devices of `known` (key, last seen, mark) that `patterns` name (all when there are none).
pub fn select(
    known: &[(String, i64, String)],
    patterns: &[String],
    marks: &SourceMarks,
) -> Vec<(String, DeviceLine)> {
    known
        .iter()
        .filter_map(|(key, seen, mark)| {
            let (kind, device) = split_key(key)?;
            let named =
                patterns.is_empty() || patterns.iter().any(|p| pattern_names(p, kind, device));
            named.then(|| {
                (
                    key.clone(),
                    DeviceLine {
                        kind,
                        device: device.to_string(),
                        last_seen: rfc3339_utc(*seen),
                        source: marks.describe(mark),
                    },
                )
            })
        })
        .collect()
}

/// Requests waiting in `data_dir`, oldest first; answers nobody collected are removed.
pub fn pending_requests(data_dir: &Path) -> Vec<(PathBuf, Result<Request, String>)> {
    let Ok(dir) = std::fs::read_dir(data_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(REQUEST_PREFIX) {
            continue;
        }
        let path = entry.path();
        if name.ends_with(".answer") {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_ANSWER);
            if stale {
                let _ = std::fs::remove_file(&path);
            }
        } else if name.ends_with(".json") {
            let req = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()));
            out.push((path, req));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Write the answer beside `request` and remove the request.
pub fn answer(request: &Path, answer: &Answer) -> std::io::Result<()> {
    let target = request.with_extension("answer");
    crate::durable_file::write(
        &target,
        &serde_json::to_vec_pretty(answer).unwrap_or_default(),
    )?;
    std::fs::remove_file(request)
}

/// `zhian-gateway devices forget|list`: send the request to the daemon through `data_dir` and
/// print its answer. Exit 0 done, 1 nothing matched or the daemon refused, 75 queued (no
/// daemon answered within [`ANSWER_WAIT`]).
pub fn cli(data_dir: &Path, req: Request, json: bool) -> u8 {
    let id = format!(
        "{}{}-{}",
        REQUEST_PREFIX,
        crate::clock::now_ms(),
        std::process::id()
    );
    let path = data_dir.join(format!("{id}.json"));
    let written = crate::durable_file::write(&path, &serde_json::to_vec(&req).unwrap_or_default());
    if let Err(e) = written {
        let _ = std::fs::remove_file(crate::durable_file::tmp_path(&path));
        eprintln!(
            "cannot write the request into {}: {e} (run as root or as the service user)",
            data_dir.display()
        );
        return 1;
    }
    let answer_path = path.with_extension("answer");
    let until = std::time::Instant::now() + ANSWER_WAIT;
    let answer: Answer = loop {
        if let Ok(bytes) = std::fs::read(&answer_path) {
            let _ = std::fs::remove_file(&answer_path);
            match serde_json::from_slice(&bytes) {
                Ok(a) => break a,
                Err(e) => {
                    eprintln!("the daemon's answer cannot be read: {e}");
                    return 1;
                }
            }
        }
        if std::time::Instant::now() >= until {
            match req.op {
                Op::Forget => eprintln!(
                    "no answer from a running daemon within {} s: the request stays queued in {} and is applied when the daemon runs",
                    ANSWER_WAIT.as_secs(),
                    path.display()
                ),
                Op::List | Op::Stocktake => {
                    let _ = std::fs::remove_file(&path);
                    eprintln!(
                        "no answer from a running daemon within {} s (is it running? `zhian-gateway inspect --data-dir {}` reads the store while it is stopped)",
                        ANSWER_WAIT.as_secs(),
                        data_dir.display()
                    );
                }
            }
            return EX_TEMPFAIL;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
    }
    if let Some(e) = &answer.error {
        eprintln!("the daemon did not do it: {e}");
        return 1;
    }
    if !json {
        for d in &answer.devices {
            println!(
                "{:<8} {:<40} last seen {}  ({})",
                d.kind.as_str(),
                d.device,
                d.last_seen,
                d.source
            );
        }
    }
    if req.op == Op::Stocktake {
        println!(
            "stocktake of {} vehicle(s) recorded: vehicles inside = {} from now, plus entries less exits after it (README, \"Vehicles inside\")",
            req.count.unwrap_or(0),
            req.count.unwrap_or(0)
        );
        return 0;
    }
    match (req.op, answer.devices.len()) {
        (Op::Forget, 0) => {
            eprintln!("no known device matches {:?}", req.patterns);
            1
        }
        (Op::Forget, n) => {
            if !json {
                println!("{n} device(s) forgotten (their counted events stay; a device comes back with its next event)");
            }
            0
        }
        (Op::List, _) | (Op::Stocktake, _) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(topic: &str, device: &str) -> SourceCfg {
        let text = format!(
            "topic = \"{topic}\"\nkind = \"camera\"\ndevice = \"{device}\"\nid = \"/id\"\nts = \"/ts\"\naction = \"plate\"\n"
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn a_source_mark_follows_the_device_rule_not_the_name() {
        let a = source("lpr/+/event", "/plate");
        let mut renamed = a.clone();
        renamed.name = Some("plates".into());
        let fixed = source("lpr/+/event", "topic[1]");
        let marks = SourceMarks::of(std::slice::from_ref(&a));
        assert_eq!(SourceMarks::of(&[renamed]).0[0].mark, marks.0[0].mark);
        let fixed_marks = SourceMarks::of(&[fixed]);
        assert_ne!(fixed_marks.0[0].mark, marks.0[0].mark);
        let m = marks.mark_for("lpr/cam-1/event").to_string();
        assert_eq!(m.len(), 16);
        assert_eq!(marks.mark_for("zhian/access/door-1"), "");
        assert!(marks.still_maps(&m) && marks.still_maps(""));
        assert!(
            !fixed_marks.still_maps(&m),
            "the old rule's devices no longer map"
        );
        assert_eq!(fixed_marks.describe(&m), "a source no longer configured");
        assert_eq!(marks.describe(&m), "source \"sources[0]\"");
    }

    #[test]
    fn requests_are_picked_up_and_answered() {
        let dir = tempfile::tempdir().unwrap();
        let req = Request {
            op: Op::Forget,
            patterns: vec!["plate-*".into()],
            count: None,
        };
        let path = dir.path().join(format!("{REQUEST_PREFIX}1-2.json"));
        std::fs::write(&path, serde_json::to_vec(&req).unwrap()).unwrap();
        std::fs::write(
            dir.path().join(format!("{REQUEST_PREFIX}3-4.json.tmp")),
            b"{",
        )
        .unwrap();
        let got = pending_requests(dir.path());
        assert_eq!(got.len(), 1, "a request still being written is left alone");
        assert_eq!(got[0].1.as_ref().unwrap().patterns, ["plate-*"]);
        answer(
            &got[0].0,
            &Answer {
                op: Op::Forget,
                error: None,
                devices: Vec::new(),
            },
        )
        .unwrap();
        assert!(!path.exists());
        assert!(path.with_extension("answer").exists());
        let known = vec![
            ("camera\0plate-1".to_string(), 0, String::new()),
            ("access\0door-1".to_string(), 0, String::new()),
        ];
        let marks = SourceMarks::default();
        let picked = select(&known, &["plate-*".into()], &marks);
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].1.device, "plate-1");
        assert_eq!(select(&known, &[], &marks).len(), 2);
    }
}
