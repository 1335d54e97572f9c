//! The district connection epoch (contract: "Upstream", `status`): a number that increases with
//! every connection the gateway makes to the district broker, across restarts and power cuts.
//!
//! It orders what the district hears about this gateway: `status` (`online` at connect,
//! `offline` as the will or at a clean stop) and each heartbeat carry the epoch of the connection
//! they belong to, so a receiver keeps the state of the highest epoch (and, within one epoch,
//! `offline` over `online`) whatever order the messages arrive in.
//!
//! On disk: `<data_dir>/upstream.epoch`, one decimal number and a newline, replaced atomically
//! ([`crate::durable_file`]: written to a temporary file, fsync'd, renamed over, the directory
//! fsync'd) before the connection that uses it is opened. The next epoch is
//! `max(last + 1, now in Unix seconds)`: the clock floor keeps a box whose data dir was wiped or
//! replaced (a fresh store) above every epoch its earlier life used, as long as its clock was
//! right; the `last + 1` keeps it increasing when the clock steps back. Kept outside the redb
//! store, which has one writer (the committer): this file has one writer too, the forwarder.

use std::fs;
use std::path::{Path, PathBuf};

/// File name of the epoch in the data dir.
pub const FILE_NAME: &str = "upstream.epoch";

/// The largest epoch: 2^53, the largest integer every JSON reader keeps exactly.
pub const MAX_EPOCH: u64 = 1 << 53;

/// The persisted epoch counter. One per process (the forwarder's).
#[derive(Debug)]
pub struct Epochs {
    path: PathBuf,
    last: u64,
}

impl Epochs {
    /// Read the last epoch from `data_dir` (0 when there is none, or the file cannot be read:
    /// the clock floor still orders the next one after it).
    pub fn open(data_dir: &Path) -> Epochs {
        let path = data_dir.join(FILE_NAME);
        let last = fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            // Past 2^53 a JSON reader may round it, and the receiver keeps a bigint: a file
            // holding more is damaged, not a history to continue.
            .filter(|e| *e <= MAX_EPOCH)
            .unwrap_or(0);
        Epochs { path, last }
    }

    /// The last epoch handed out (or read at open).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The epoch for a new connection at `now_secs` (Unix seconds), made durable before it is
    /// returned. When it cannot be written (a full disk) it is still used, and the error
    /// returned beside it: the clock floor keeps the next life above it in all but the case of
    /// a clock stepped back across a restart.
    pub fn next(&mut self, now_secs: u64) -> (u64, Option<std::io::Error>) {
        let epoch = self.last.saturating_add(1).max(now_secs).min(MAX_EPOCH);
        self.last = epoch;
        (epoch, self.persist(epoch).err())
    }

    fn persist(&self, epoch: u64) -> std::io::Result<()> {
        crate::durable_file::write(&self.path, format!("{epoch}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn increases_across_reopen_and_clock_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Epochs::open(dir.path());
        assert_eq!(e.last(), 0);
        let (a, err) = e.next(1_000);
        assert!(err.is_none());
        assert_eq!(a, 1_000);
        // Several connections within one second still increase.
        let (b, _) = e.next(1_000);
        assert_eq!(b, 1_001);
        // A clock stepped back: still increasing.
        let (c, _) = e.next(10);
        assert_eq!(c, 1_002);
        // A restart reads what was written.
        let mut again = Epochs::open(dir.path());
        assert_eq!(again.last(), 1_002);
        assert_eq!(again.next(5).0, 1_003);
        // The clock floor: a fresh data dir with a later clock is above the old life.
        let fresh = tempfile::tempdir().unwrap();
        assert_eq!(Epochs::open(fresh.path()).next(2_000).0, 2_000);
    }

    #[test]
    fn a_damaged_file_starts_from_the_clock() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"\x00garbage").unwrap();
        let mut e = Epochs::open(dir.path());
        assert_eq!(e.next(42).0, 42);
        fs::write(dir.path().join(FILE_NAME), b"18446744073709551615\n").unwrap();
        assert_eq!(Epochs::open(dir.path()).next(42).0, 42);
    }
}
