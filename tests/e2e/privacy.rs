//! Privacy on the box (issue 12): a stolen data dir or backup cannot reverse or link the
//! residents' pseudonyms, a day's key dies with its day, and raw events past retention leave no
//! byte of their subject behind. Driven through the daemon binary, a real mosquitto and
//! libfaketime.

use crate::common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use zhian_gateway::config::{Dur, SubjectMode};

/// Every regular file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The attack of the issue, made stronger: every 32-byte window of every file is tried as the
/// BLAKE3 key for `subject`, and a window that turns it into `pseudonym` is a key found.
/// Returns the files (and offsets) where one was.
fn keys_found(paths: &[PathBuf], subject: &str, pseudonym: &[u8; 16]) -> Vec<String> {
    let mut found = Vec::new();
    for p in paths {
        let bytes = fs::read(p).unwrap_or_default();
        for (off, w) in bytes.windows(32).enumerate() {
            if w.iter().all(|b| *b == 0) {
                continue;
            }
            let key: [u8; 32] = w.try_into().unwrap();
            if blake3::keyed_hash(&key, subject.as_bytes()).as_bytes()[..16] == pseudonym[..] {
                found.push(format!("{} @ {off}", p.display()));
            }
        }
    }
    found
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn access(id: &str, ts_ms: i64, subject: &str) -> Vec<u8> {
    serde_json::json!({"id": id, "ts": ts_ms, "action": "entry", "result": "granted",
        "subject": subject})
    .to_string()
    .into_bytes()
}

#[test]
fn pseudonyms_cannot_be_reversed_from_the_data_dir_and_die_with_their_day() {
    // The daemon's clock 60 s before the next local midnight (site time zone +08:00). (The
    // status page shows the test when the daemon took a step of its clock.)
    let (real_s, next_midnight) = to_next_midnight_s();
    let offset_s = next_midnight - 60 - real_s;
    let site = Site::build("pseudonyms")
        .status()
        .config(|c| c.aggregate.max_lateness = Dur::secs(60))
        .faketime(&format!("+{offset_s}"))
        .start();
    let (up, log, dir) = (site.upstream(), site.log_path(), site.data_dir());
    let key_dir = site.root.join("data.keys");
    let fake_now = |off: i64| now_ms() + off * 1000;

    // Residents pass the doors before midnight: plates and cards a 110,000-candidate list
    // would contain.
    let subjects: Vec<String> = (0..20)
        .map(|i| {
            if i % 2 == 0 {
                format!("浙A{:05}", 12_000 + i)
            } else {
                format!("card:{}", 88_200 + i)
            }
        })
        .collect();
    let mut p = site.publisher();
    for (i, s) in subjects.iter().enumerate() {
        p.send(
            &format!("zhian/access/door-{}", i % 3),
            access(&format!("p-{i}"), fake_now(offset_s), s),
        );
    }
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == 20),
        "20 counted: {:?}; log:\n{}",
        up.totals(),
        tail(&log, 30)
    );

    // Today's key is beside the data dir, owner-only, and it is the one that keyed them.
    let key_files = files(&key_dir);
    assert_eq!(key_files.len(), 1, "{key_files:?}");
    let key_file = key_files[0].clone();
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&key_dir), 0o700);
    assert_eq!(mode(&key_file), 0o600);
    let key: [u8; 32] = fs::read(&key_file).unwrap().try_into().unwrap();
    let pseudonym: [u8; 16] = blake3::keyed_hash(&key, subjects[0].as_bytes()).as_bytes()[..16]
        .try_into()
        .unwrap();
    let store_bytes = fs::read(dir.join("zhian.redb")).unwrap();
    assert!(
        contains(&store_bytes, &pseudonym),
        "the store keeps the pseudonym made with the key in the key dir (the attack can work)"
    );
    assert!(!contains(&store_bytes, subjects[0].as_bytes()));
    // Anyone holding the data dir (a copy, a backup) finds no key in it.
    let backup = site.root.join("backup");
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(&dir)
        .arg(&backup)
        .status()
        .unwrap();
    assert!(out.success());
    let found = keys_found(&files(&backup), &subjects[0], &pseudonym);
    assert!(found.is_empty(), "a key in the data dir: {found:?}");
    // The test's attack does find the key where it is.
    assert_eq!(
        keys_found(std::slice::from_ref(&key_file), &subjects[0], &pseudonym).len(),
        1
    );

    // Past midnight and the accepted lateness (1 min): NTP-like step, vouched for by a device
    // stamped with the new time. The day's key is destroyed.
    let offset2 = next_midnight + 120 - real_s;
    site.set_clock(&format!("+{offset2}"));
    site.wait_step_held(170_000);
    p.send(
        "zhian/access/door-0",
        access("next-day-1", fake_now(offset2), &subjects[0]),
    );
    assert!(
        wait_until(Duration::from_secs(30), || !key_file.exists()),
        "yesterday's key destroyed; log:\n{}",
        tail(&log, 30)
    );
    // The key file goes a moment before the line saying so is written.
    assert!(wait_until(Duration::from_secs(10), || log_text(&log)
        .contains("pseudonym key destroyed")));
    assert!(wait_until(Duration::from_secs(30), || up
        .totals()
        .values()
        .sum::<u64>()
        == 21));
    let (status, _) = site.term_daemon();
    assert!(status.success());
    // Nothing on the box reverses yesterday's pseudonyms any more: not the data dir, not the
    // key dir (today's key keys today's pseudonyms only).
    let mut everything = files(&dir);
    everything.extend(files(&key_dir));
    assert!(!everything.is_empty());
    let found = keys_found(&everything, &subjects[0], &pseudonym);
    assert!(found.is_empty(), "yesterday's key survived: {found:?}");
    let today: Vec<PathBuf> = files(&key_dir);
    assert_eq!(today.len(), 1, "{today:?}");
    assert_ne!(today[0], key_file);
    assert!(up
        .subject_leaks(&subjects.iter().map(String::as_str).collect::<Vec<_>>())
        .is_empty());
}

#[test]
fn raw_events_past_retention_leave_no_readable_byte_of_their_subject() {
    let (real_s, midnight) = to_next_midnight_s();
    let offset = midnight - 60 - real_s;
    let site = Site::build("retention")
        .status()
        .config(|c| {
            c.privacy.subjects = SubjectMode::Plain;
            c.store.raw_retention = Dur::secs(3);
        })
        .faketime(&format!("+{offset}"))
        .start();
    let (up, log, dir) = (site.upstream(), site.log_path(), site.data_dir());
    let key_dir = site.root.join("data.keys");
    let mut p = site.publisher();
    let marker = |i: usize| format!("card:MARKER-{i:04}-浙A");
    for i in 0..200 {
        p.send(
            &format!("zhian/access/door-{}", i % 4),
            access(&format!("r-{i}"), now_ms() + offset * 1000, &marker(i)),
        );
    }
    assert!(
        wait_until(Duration::from_secs(30), || up
            .totals()
            .values()
            .sum::<u64>()
            == 200),
        "{:?}; log:\n{}",
        up.totals(),
        tail(&log, 20)
    );
    let found = |dirs: &[&Path], needle: &str| -> Vec<String> {
        dirs.iter()
            .flat_map(|d| files(d))
            .filter(|f| contains(&fs::read(f).unwrap_or_default(), needle.as_bytes()))
            .map(|f| f.display().to_string())
            .collect()
    };
    // Stored sealed with today's key: no marker byte in the data dir even now.
    // (A pseudonym key too: the day's distinct counts are counted from pseudonyms.)
    let sealed: Vec<PathBuf> = files(&key_dir)
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("sealed-"))
        .collect();
    assert_eq!(sealed.len(), 1, "{sealed:?}");
    assert!(sealed[0]
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("sealed-"));
    assert!(found(&[&dir], "MARKER-").is_empty());
    // Past the day and the retention: the raw events go and the day's key is destroyed, so
    // whatever bytes of theirs remain in the file cannot be read.
    let offset2 = midnight + 120 - real_s;
    site.set_clock(&format!("+{offset2}"));
    site.wait_step_held(170_000);
    p.send(
        "zhian/access/door-0",
        access("next-day", now_ms() + offset2 * 1000, "card:OTHER-1"),
    );
    assert!(
        wait_until(Duration::from_secs(30), || !sealed[0].exists()),
        "the sealing key of the expired day is destroyed; log:\n{}",
        tail(&log, 20)
    );
    // The key file goes a moment before the line saying so is written.
    assert!(wait_until(Duration::from_secs(10), || log_text(&log)
        .contains("sealing key destroyed")));
    let (status, _) = site.term_daemon();
    assert!(status.success());
    assert!(found(&[&dir, &key_dir], "MARKER-").is_empty());
    assert!(!files(&key_dir).contains(&sealed[0]));
}
