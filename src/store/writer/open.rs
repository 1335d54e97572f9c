//! Opening the file for writing: tables created, the format checked and migrated (format 1,
//! hashed subjects scrubbed), the dedup key read or made.

use super::*;

/// Check the format (migrating formats 1 and 2), make the dedup key and every table. One
/// commit.
pub(super) fn prepare(db: &redb::Database) -> Result<[u8; 32], StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    let key = {
        let mut meta = txn.open_table(META)?;
        let format: Option<Result<u32, usize>> = meta.get("format")?.map(|f| {
            let v = f.value();
            v.try_into().map(u32::from_le_bytes).map_err(|_| v.len())
        });
        let from = match format {
            None => FORMAT,
            Some(Ok(v @ (1 | 2 | FORMAT))) => v,
            Some(Ok(v)) => return Err(StoreError::Format(v)),
            Some(Err(len)) => return Err(StoreError::Format(len as u32 | 0x8000_0000)),
        };
        // Formats 1 and 2 kept one key, `subject_key`, for subjects and dedup hashes alike.
        // It stays the dedup key (so the held hashes still match), and the subjects hashed
        // with it are scrubbed below: the store then holds no key that reverses a subject.
        let legacy: Option<[u8; 32]> = meta
            .get("subject_key")?
            .and_then(|k| k.value().try_into().ok());
        let existing: Option<[u8; 32]> = meta
            .get("dedup_key")?
            .and_then(|k| k.value().try_into().ok());
        let key = match existing.or(legacy) {
            Some(k) => k,
            None => {
                let mut k = [0u8; 32];
                getrandom::fill(&mut k).map_err(|e| StoreError::Random(e.to_string()))?;
                k
            }
        };
        if existing.is_none() {
            meta.insert("dedup_key", key.as_slice())?;
        }
        if from == 1 {
            migrate_v1(&txn, &mut meta, &key)?;
        }
        if legacy.is_some() {
            meta.remove("subject_key")?;
            let scrubbed = scrub_hashed_subjects(&txn)?;
            tracing::info!(
                scrubbed,
                "store: the subject key left the store file; subjects hashed with it were removed from the raw events (pseudonym keys now live in privacy.key_dir)"
            );
        }
        if format != Some(Ok(FORMAT)) {
            meta.insert("format", FORMAT.to_le_bytes().as_slice())?;
        }
        key
    };
    // Create every table so readers never meet a missing one.
    txn.open_table(EVENTS)?;
    txn.open_table(DEDUP_LOG)?;
    txn.open_table(WINDOWS)?;
    txn.open_table(OUTBOX)?;
    txn.open_table(COUNTERS)?;
    txn.open_table(STATES)?;
    txn.open_table(DEVICES)?;
    txn.open_table(DEVICE_SOURCES)?;
    txn.open_table(days::DAYS)?;
    txn.open_table(days::DAY_SUBJECTS)?;
    txn.open_table(care_store::CARE)?;
    txn.open_table(super::super::presence::PRESENCE)?;
    txn.open_table(key_ids::KEY_IDS)?;
    txn.commit()?;
    Ok(key)
}

/// Format 2 -> 3: rewrite every raw event whose subject was hashed with the old in-store key
/// without its subject. Returns how many rows changed.
pub(super) fn scrub_hashed_subjects(txn: &redb::WriteTransaction) -> Result<usize, StoreError> {
    let mut events = txn.open_table(EVENTS)?;
    let mut changed: Vec<((u64, u64), Vec<u8>)> = Vec::new();
    for row in events.iter()? {
        let (k, v) = row?;
        let mut rec = decode_event(v.value())?;
        if matches!(rec.subject, StoredSubject::Hashed(_)) {
            rec.subject = StoredSubject::None;
            let bytes = match event_hash(v.value()) {
                Some(h) => encode_event(&rec, h),
                None => encode(&rec),
            };
            changed.push((k.value(), bytes));
        }
    }
    for (k, v) in &changed {
        events.insert(*k, v.as_slice())?;
    }
    Ok(changed.len())
}

/// Format 1 -> 2: dedup keys become hashes in `dedup_log`, the open-window index goes (the
/// windows say whether they are open), and the sequence counter becomes a reservation.
pub(super) fn migrate_v1(
    txn: &redb::WriteTransaction,
    meta: &mut Table<&'static str, &'static [u8]>,
    key: &[u8; 32],
) -> Result<(), StoreError> {
    let mut by_time: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    let mut n = 0usize;
    {
        let old = txn.open_table(DEDUP_V1)?;
        for row in old.iter()? {
            let (k, v) = row?;
            by_time
                .entry(v.value())
                .or_default()
                .push(dedup_hash(key, k.value()));
            n += 1;
        }
    }
    let mut seq = read_u64(meta, "next_seq")?;
    {
        let mut log = txn.open_table(DEDUP_LOG)?;
        for (t, hashes) in by_time {
            log.insert((t, seq), pack_hashes(&hashes).as_slice())?;
            seq += 1;
        }
    }
    txn.delete_table(DEDUP_V1)?;
    txn.delete_table(DEDUP_BY_TIME_V1)?;
    txn.delete_table(OPEN_WINDOWS_V1)?;
    meta.remove("next_seq")?;
    meta.insert("seq_reserved", (seq + SEQ_BLOCK).to_le_bytes().as_slice())?;
    tracing::info!(dedup_keys = n, "store: migrated from format 1 to {FORMAT}");
    Ok(())
}
