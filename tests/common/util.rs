//! Small utilities: ports, the wall clock and windows, log files, a deterministic RNG, map
//! differences, libfaketime and a tmpfs.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rumqttc::{Client, Connection, Event as MqttEvent, Incoming, MqttOptions, Outgoing, QoS};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use super::*;

/// A TCP port that was free a moment ago (bind 127.0.0.1:0, read the port, drop the listener).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// Wall clock in Unix milliseconds.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(since.as_millis()).expect("milliseconds fit in i64")
}

/// Start of the tumbling window (aligned to the Unix epoch) that holds `ts_ms`.
pub fn window_start(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(WINDOW_MS) * WINDOW_MS
}

/// Time from now until wall clock reaches `at_ms` (zero when already past).
pub fn until_ms(at_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(at_ms - now_ms()).unwrap_or(0))
}

/// The last `n` lines of a text file (or a note that it cannot be read).
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(n);
            lines[from..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Human-readable difference between an expected and an actual map.
pub fn map_diff<K: Ord + Debug, V: PartialEq + Debug>(
    expected: &BTreeMap<K, V>,
    actual: &BTreeMap<K, V>,
) -> String {
    let mut out = Vec::new();
    for (k, want) in expected {
        match actual.get(k) {
            None => out.push(format!("  missing {k:?}: expected {want:?}")),
            Some(got) if got != want => {
                out.push(format!("  wrong   {k:?}: expected {want:?}, got {got:?}"))
            }
            Some(_) => {}
        }
    }
    for (k, got) in actual {
        if !expected.contains_key(k) {
            out.push(format!("  extra   {k:?}: got {got:?}"));
        }
    }
    if out.is_empty() {
        "  (no difference)".to_string()
    } else {
        out.join("\n")
    }
}

/// A deterministic xorshift64* generator: reproducible workloads without a rand dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n).expect("usize fits in u64");
        usize::try_from(self.next_u64() % n64).expect("below n fits in usize")
    }
}

/// A file's text (empty if it cannot be read), e.g. a daemon log.
pub fn log_text(p: &Path) -> String {
    String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned()
}

/// The libfaketime library (Debian package `faketime`).
pub fn libfaketime() -> String {
    let found = fs::read_dir("/usr/lib")
        .unwrap()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime (apt-get install faketime; scripts/test-deps.sh does)");
    found.display().to_string()
}

/// Seconds from now (real) to the next local midnight at UTC+8.
pub fn to_next_midnight_s() -> (i64, i64) {
    let real_s = now_ms() / 1000;
    let day = 86_400;
    let next = ((real_s + 8 * 3600) / day + 1) * day - 8 * 3600;
    (real_s, next)
}

/// A tmpfs mounted for a test (a filesystem that fills for real), unmounted on drop. Needs root
/// (CI runs as root).
pub struct Tmpfs(pub PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs needs root (CI runs as root)");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
