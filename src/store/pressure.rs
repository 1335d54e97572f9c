//! Disk pressure: keeping the data dir within `store.max_size`, measured as `du` measures it.
//!
//! redb grows its file by doubling the usable space once no free page is left (redb 4.6
//! `TransactionalMemory::grow`, for files under its 4 GiB region size), and reuses freed pages
//! afterwards, so the file is a high-water mark that can jump to twice the live data. The bound
//! therefore holds only if the live data stays under half the budget: pressure is judged on
//! the writer's estimate of the pages its rows take ([`live_estimate`]), not on the file size.
//!
//! Eviction order (contract, "Disk pressure"): raw events past retention (ordinary
//! maintenance), then the oldest raw events, then the oldest dedup hashes (which only shortens
//! how far back a redelivery is recognised), and last the oldest pending summaries and alerts.
//! Everything dropped is counted in `meta` and carried in the heartbeat.

use std::path::Path;

/// Retention and purge settings the writer applies on each maintenance pass.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub dedup_ttl_ms: u64,
    pub raw_retention_ms: u64,
    /// Most rows of each kind deleted per maintenance pass.
    pub purge_batch: usize,
}

/// How hard the store presses against its budget right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Pressure {
    #[default]
    None,
    /// Delete the oldest raw events.
    Raw,
    /// Delete the oldest raw events; with none left the oldest dedup hashes, then the oldest
    /// pending messages.
    Hard,
}

/// Share of the budget the live data may reach before raw events go early (per mille).
pub const RAW_AT_PERMILLE: u64 = 330;
/// Share of the budget at which dedup hashes and then pending messages go too (per mille).
/// Under half, with room for redb's doubling, page overhead and pages freed two commits late.
pub const HARD_AT_PERMILLE: u64 = 400;

impl Pressure {
    /// The pressure for live data `live` bytes against `budget` bytes.
    pub fn of(live: u64, budget: u64) -> Pressure {
        if live >= budget / 1000 * HARD_AT_PERMILLE {
            Pressure::Hard
        } else if live >= budget / 1000 * RAW_AT_PERMILLE {
            Pressure::Raw
        } else {
            Pressure::None
        }
    }
}

/// Pages the rows take, estimated from their key and value bytes: B-tree leaves run between
/// half and fully used, so twice the row bytes, plus a fixed allowance for branch pages, the
/// table and free-page trees, headers, and pages freed by the last two commits (redb reuses a
/// freed page only two transactions later, redb issue #829).
pub fn live_estimate(row_bytes: u64) -> u64 {
    row_bytes * 2 + (1 << 20)
}

/// Bytes the data dir's other files take on disk (as `du` counts them: allocated blocks),
/// everything except the store file itself.
pub fn others_bytes(data_dir: &Path, store_file: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(data_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path() != store_file)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Bytes the store file takes on disk (allocated blocks).
pub fn file_du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        let b = 100_000;
        assert_eq!(Pressure::of(10_000, b), Pressure::None);
        assert_eq!(Pressure::of(33_000, b), Pressure::Raw);
        assert_eq!(Pressure::of(40_000, b), Pressure::Hard);
        assert!(Pressure::Hard > Pressure::Raw);
    }
}
