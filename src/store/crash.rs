//! A redb [`StorageBackend`] for power-cut tests (test builds only).
//!
//! [`CrashDisk`] keeps two images of the file: the one the running process sees (every write
//! applied at once) and the one a power cut would leave, which only a completed `sync_data`
//! advances. Writes and length changes since the last completed sync are kept apart, in order.
//! Armed with [`CrashDisk::cut_at`], the `k`th `sync_data` never completes: it fails, the power
//! is off from then on (every later call fails, so nothing after it is acknowledged), and the
//! image that survives is taken, per [`Cut`]:
//! - [`Cut::Drop`]: the synced image; every unsynced write is lost.
//! - [`Cut::Torn`]: the synced image plus a prefix of the unsynced writes, in the order they
//!   were issued, the last one torn at a 512-byte sector boundary of the file. Where the cut
//!   falls is chosen from a seed (deterministic).
//!
//! redb's own `tests/crash_consistency.rs` (its `CrashBackend`: a live and a durable image,
//! frozen at the nth sync) is the pattern.

use redb::StorageBackend;
use std::sync::{Arc, Mutex};

/// A disk sector: writes tear at multiples of this many bytes of the file.
pub(crate) const SECTOR: u64 = 512;

/// What survives a power cut of the unsynced writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// None of them.
    Drop,
    /// A prefix of them, the last torn at a sector boundary; the seed chooses where.
    Torn { seed: u64 },
}

/// One change not yet synced.
#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

impl Op {
    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            Op::Write { offset, data } => {
                let at = *offset as usize;
                if image.len() < at + data.len() {
                    image.resize(at + data.len(), 0);
                }
                image[at..at + data.len()].copy_from_slice(data);
            }
            Op::SetLen(len) => image.resize(*len as usize, 0),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// What the running process reads: every write applied.
    live: Vec<u8>,
    /// What the last completed `sync_data` made durable.
    synced: Vec<u8>,
    /// Changes since that sync, in the order they were made.
    pending: Vec<Op>,
    /// `sync_data` calls so far (the one that fails at the cut included).
    syncs: u64,
    /// Cut the power at this sync (1-based), keeping what `Cut` says.
    cut_at: Option<(u64, Cut)>,
    /// The image the power cut left, once it happened.
    survived: Option<Vec<u8>>,
}

/// The disk under a test's store. Cloning shares it: hand one clone to redb, keep the other.
#[derive(Debug, Clone, Default)]
pub(crate) struct CrashDisk {
    state: Arc<Mutex<State>>,
}

fn power_off() -> std::io::Error {
    std::io::Error::other("power cut (test)")
}

/// splitmix64: a small deterministic generator for where a torn write ends.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl CrashDisk {
    /// A fresh, empty disk that keeps the power on.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// An empty disk whose power goes at the `sync`th `sync_data` (1-based), leaving `cut`.
    pub(crate) fn cut_at(sync: u64, cut: Cut) -> Self {
        let d = Self::default();
        d.lock().cut_at = Some((sync, cut));
        d
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `sync_data` calls so far.
    pub(crate) fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// The image the power cut left, once it happened.
    pub(crate) fn survived(&self) -> Option<Vec<u8>> {
        self.lock().survived.clone()
    }

    /// Changes not yet synced (a test of the backend itself reads this).
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.lock().pending.len()
    }
}

/// The synced image plus a prefix of `pending` cut into sector pieces: the seed picks how many
/// pieces land (at least one when there is any, all of them at most: a sync whose data all
/// reached the disk but whose caller never heard back).
fn torn(synced: &[u8], pending: &[Op], seed: u64) -> Vec<u8> {
    let mut pieces: Vec<Op> = Vec::new();
    for op in pending {
        match op {
            Op::SetLen(_) => pieces.push(op.clone()),
            Op::Write { offset, data } => {
                let mut at = *offset;
                let end = offset + data.len() as u64;
                while at < end {
                    let next = ((at / SECTOR + 1) * SECTOR).min(end);
                    let from = (at - offset) as usize;
                    let to = (next - offset) as usize;
                    pieces.push(Op::Write {
                        offset: at,
                        data: data[from..to].to_vec(),
                    });
                    at = next;
                }
            }
        }
    }
    let mut image = synced.to_vec();
    if pieces.is_empty() {
        return image;
    }
    let keep = 1 + (mix(seed) % pieces.len() as u64) as usize;
    for p in &pieces[..keep] {
        p.apply(&mut image);
    }
    image
}

impl StorageBackend for CrashDisk {
    fn len(&self) -> Result<u64, std::io::Error> {
        let s = self.lock();
        if s.survived.is_some() {
            return Err(power_off());
        }
        Ok(s.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        let s = self.lock();
        if s.survived.is_some() {
            return Err(power_off());
        }
        let at = offset as usize;
        if at + out.len() > s.live.len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        out.copy_from_slice(&s.live[at..at + out.len()]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        let mut s = self.lock();
        if s.survived.is_some() {
            return Err(power_off());
        }
        let op = Op::SetLen(len);
        op.apply(&mut s.live);
        s.pending.push(op);
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        let mut s = self.lock();
        if s.survived.is_some() {
            return Err(power_off());
        }
        s.syncs += 1;
        let pending = std::mem::take(&mut s.pending);
        match s.cut_at {
            Some((at, cut)) if at == s.syncs => {
                let image = match cut {
                    Cut::Drop => s.synced.clone(),
                    Cut::Torn { seed } => torn(&s.synced, &pending, seed),
                };
                s.survived = Some(image);
                Err(power_off())
            }
            _ => {
                for op in &pending {
                    op.apply(&mut s.synced);
                }
                Ok(())
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        let mut s = self.lock();
        if s.survived.is_some() {
            return Err(power_off());
        }
        let op = Op::Write {
            offset,
            data: data.to_vec(),
        };
        op.apply(&mut s.live);
        s.pending.push(op);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_runs_on_it_and_every_commit_syncs() {
        use crate::core::event::{Event, Kind};
        let disk = CrashDisk::new();
        let dir = tempfile::tempdir().unwrap();
        let (s, mut w) = crate::store::Store::open_on_backend(
            dir.path(),
            disk.clone(),
            crate::config::SubjectMode::Hashed,
            None,
        )
        .unwrap();
        let opened = disk.syncs();
        assert!(opened > 0);
        let e = Event {
            kind: Kind::Access,
            device: "door-1".into(),
            id: "a".into(),
            ts_ms: 1_000_000_000,
            action: "entry".into(),
            result: "granted".into(),
            subject: None,
        };
        let en = crate::core::engine::Engine {
            window: crate::core::window::WindowCfg {
                window_ms: 10_000,
                grace_ms: 1_000,
                max_lateness_ms: 3_600_000,
                max_future_skew_ms: 60_000,
            },
            dedup_ttl_ms: 600_000,
            gateway: "gw".into(),
            site: Default::default(),
            alert_actions: vec![],
            max_summary_bytes: usize::MAX,
        };
        w.commit(&en, &[&e], &[], e.ts_ms, None).unwrap();
        assert!(disk.syncs() > opened, "a commit is made durable");
        assert_eq!(s.raw_events().unwrap().len(), 1);
        assert!(!s.path().exists(), "nothing on the file system");
        assert!(disk.survived().is_none());
    }

    #[test]
    fn unsynced_writes_are_dropped_or_torn_at_a_sector_boundary() {
        // Synced: 1024 bytes of 1. Unsynced: 1500 bytes of 2 from offset 100 (four sector
        // pieces: 100..512, 512..1024, 1024..1536, 1536..1600), then a length change.
        let prepare = |d: &CrashDisk| {
            d.write(0, &[1; 1024]).unwrap();
            d.sync_data().unwrap();
            d.write(100, &[2; 1500]).unwrap();
            d.set_len(4096).unwrap();
            assert_eq!(d.pending(), 2);
            assert_eq!(d.len().unwrap(), 4096, "the process sees its writes");
        };
        let d = CrashDisk::cut_at(2, Cut::Drop);
        prepare(&d);
        assert!(d.sync_data().is_err());
        assert_eq!(d.survived().unwrap(), vec![1; 1024]);
        assert!(d.read(0, &mut [0; 1]).is_err(), "the power stays off");
        assert!(d.write(0, &[0]).is_err());

        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let d = CrashDisk::cut_at(2, Cut::Torn { seed });
            prepare(&d);
            assert!(d.sync_data().is_err());
            let img = d.survived().unwrap();
            // A prefix: the bytes of 2 run from offset 100 to a sector boundary (or the end of
            // the write), and the file grew only when every write before the length change
            // landed.
            let twos = img.iter().filter(|b| **b == 2).count();
            let end = 100 + twos;
            assert!(img[100..end].iter().all(|b| *b == 2));
            assert!(end % SECTOR as usize == 0 || end == 1600, "torn at {end}");
            assert!(img[..100].iter().all(|b| *b == 1));
            match img.len() {
                4096 => assert_eq!(end, 1600),
                n => assert_eq!(n, end.max(1024)),
            }
            assert!(img[end..end.max(1024)].iter().all(|b| *b == 1));
            seen.insert((end, img.len()));
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>(),
            vec![
                (512, 1024),
                (1024, 1024),
                (1536, 1536),
                (1600, 1600),
                (1600, 4096)
            ],
            "every prefix, none empty"
        );
    }
}
